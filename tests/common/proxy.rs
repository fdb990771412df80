//! A small TCP proxy for fault tests: forwards to PostgreSQL, and can make the connections that
//! have issued `LISTEN` go silent (a half-open connection: no reset, no data, both ends open),
//! or drop every byte in both directions for a while (a network blackhole: nothing is refused
//! or reset, new connections get no answer) and then heal.
//! The benchmark uses it too, with a delay on every byte in each direction (a far database).
//! The fault campaign also thaws a frozen proxy (new connections flow again) and slows one
//! down for a while. A test can also close every connection at once (a server gone).
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

#[derive(Default)]
struct Conn {
    /// The client sent a LISTEN on this connection.
    listens: AtomicBool,
    /// Nothing is forwarded any more, in either direction; the sockets stay open.
    silent: AtomicBool,
    /// The two pipes of the connection, to close it ([`Proxy::cut`]).
    pipes: Mutex<Vec<tokio::task::AbortHandle>>,
}

#[derive(Default)]
struct State {
    conns: Mutex<Vec<Arc<Conn>>>,
    accepted: AtomicUsize,
    /// Every connection, existing and new, is silent.
    frozen: AtomicBool,
    /// Every byte, either way, is dropped; new connections are accepted and left unanswered.
    blackhole: AtomicBool,
    /// New connections are closed as soon as they are accepted (a server that is down).
    refuse: AtomicBool,
    /// Client sockets accepted during a blackhole, held unanswered until the proxy is dropped.
    held: Mutex<Vec<TcpStream>>,
    /// Extra wait, in microseconds, before each chunk is forwarded (a slow network), in each
    /// direction; 0: none.
    slow_us: AtomicU64,
    /// Requests (chunks from a client) that arrived on a silent connection and were never
    /// forwarded: how a test knows a client is waiting on a frozen connection.
    swallowed: AtomicUsize,
}

/// A running proxy; stopped (every connection closed) when dropped.
pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        Self::start_delayed(target, Duration::ZERO).await
    }

    /// As [`Proxy::start`], and every chunk is forwarded `delay` after it arrived, in each
    /// direction (a round trip gains twice `delay`; bandwidth is not limited).
    pub async fn start_delayed(target: SocketAddr, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(State::default());
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let (st, ts) = (state.clone(), tasks.clone());
        tasks.lock().expect("lock").spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if st.refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                if st.blackhole.load(Ordering::SeqCst) {
                    st.accepted.fetch_add(1, Ordering::SeqCst);
                    st.held.lock().expect("lock").push(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                st.accepted.fetch_add(1, Ordering::SeqCst);
                let conn = Arc::new(Conn::default());
                if st.frozen.load(Ordering::SeqCst) {
                    conn.silent.store(true, Ordering::SeqCst);
                }
                st.conns.lock().expect("lock").push(conn.clone());
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let mut tasks = ts.lock().expect("lock");
                let up = tasks.spawn(pipe(cr, sw, conn.clone(), st.clone(), true, delay));
                let down = tasks.spawn(pipe(sr, cw, conn.clone(), st.clone(), false, delay));
                conn.pipes.lock().expect("lock").extend([up, down]);
            }
        });
        Self { port, state, tasks }
    }

    /// A proxy to the PostgreSQL server `options` point at (`delay`: see
    /// [`Proxy::start_delayed`]). Connect through it with `options.clone().host("127.0.0.1")
    /// .port(proxy.port)`.
    pub async fn to_server(options: &sqlx::postgres::PgConnectOptions, delay: Duration) -> Self {
        let addr = tokio::net::lookup_host((options.get_host(), options.get_port()))
            .await
            .expect("resolve the server")
            .next()
            .expect("an address");
        Self::start_delayed(addr, delay).await
    }

    /// Makes every connection that has issued `LISTEN` so far go silent. Returns how many.
    pub fn silence_listeners(&self) -> usize {
        let conns = self.state.conns.lock().expect("lock");
        let mut n = 0;
        for c in conns.iter() {
            if c.listens.load(Ordering::SeqCst) && !c.silent.swap(true, Ordering::SeqCst) {
                n += 1;
            }
        }
        n
    }

    /// Freezes all traffic: every connection, open or opened later, goes silent (no reset).
    pub fn freeze(&self) {
        self.state.frozen.store(true, Ordering::SeqCst);
        for c in self.state.conns.lock().expect("lock").iter() {
            c.silent.store(true, Ordering::SeqCst);
        }
    }

    /// Drops every byte in both directions from now on, on every connection; new connections
    /// are accepted and never answered. Nothing is closed or reset.
    pub fn blackhole(&self) {
        self.state.blackhole.store(true, Ordering::SeqCst);
    }

    /// Ends a blackhole: bytes flow again and new connections are forwarded. (Connections that
    /// lost bytes meanwhile are broken; those left unanswered stay so.)
    pub fn heal(&self) {
        self.state.blackhole.store(false, Ordering::SeqCst);
    }

    /// Ends a freeze for new connections: they are forwarded again. The connections silenced
    /// by the freeze stay silent (half-open) until the proxy is dropped.
    pub fn thaw(&self) {
        self.state.frozen.store(false, Ordering::SeqCst);
    }

    /// Waits `delay` before forwarding each chunk, in each direction, on every connection
    /// (a round trip gains at least twice `delay`, and throughput drops); `Duration::ZERO` ends
    /// it. Applies to proxies started without a fixed delay.
    pub fn slow(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.state.slow_us.store(us, Ordering::SeqCst);
    }

    /// Closes every connection open now, both ends (as a server that dies, or a failover
    /// that moves the address, does): the client reads the end of its stream, and the server
    /// sees its client gone only when it next reads or writes. New connections are forwarded.
    /// Returns how many were open.
    pub fn cut(&self) -> usize {
        let conns = std::mem::take(&mut *self.state.conns.lock().expect("lock"));
        for c in &conns {
            for pipe in c.pipes.lock().expect("lock").drain(..) {
                pipe.abort();
            }
        }
        conns.len()
    }

    /// While `on`, new connections are closed as soon as they are accepted (a server that is
    /// down: the client's connect fails at once).
    pub fn refuse(&self, on: bool) {
        self.state.refuse.store(on, Ordering::SeqCst);
    }

    /// Requests from clients swallowed by silent (frozen) connections so far: each is a
    /// client waiting for an answer that never comes.
    pub fn swallowed(&self) -> usize {
        self.state.swallowed.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(mut t) = self.tasks.lock() {
            t.abort_all();
        }
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    conn: Arc<Conn>,
    state: Arc<State>,
    client_to_server: bool,
    delay: Duration,
) {
    if !delay.is_zero() {
        // Reader and writer apart, so data keeps arriving while earlier chunks wait their turn.
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let writer = tokio::spawn(async move {
            while let Some((due, chunk)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                if to.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let due = tokio::time::Instant::now() + delay;
            if tx.send((due, buf[..n].to_vec())).is_err() {
                break;
            }
        }
        drop(tx);
        let _ = writer.await;
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if client_to_server && buf[..n].windows(8).any(|w| w == b"LISTEN \"") {
            conn.listens.store(true, Ordering::SeqCst);
        }
        if conn.silent.load(Ordering::SeqCst) {
            if client_to_server {
                state.swallowed.fetch_add(1, Ordering::SeqCst);
            }
            // Half-open: hold both sockets, forward nothing, until the proxy is dropped.
            std::future::pending::<()>().await;
        }
        if state.blackhole.load(Ordering::SeqCst) {
            continue;
        }
        let slow = state.slow_us.load(Ordering::SeqCst);
        if slow > 0 {
            tokio::time::sleep(Duration::from_micros(slow)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
