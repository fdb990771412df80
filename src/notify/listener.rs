//! The listener service: one LISTEN connection per runtime, outside every job pool, shared by
//! every worker, result waiter and event subscriber. It hands each notification to its owner
//! ([`Dispatch`]) and reconnects with backoff; after every (re)connect the owner wakes every
//! queue, because notifications sent while it was disconnected are lost.
//!
//! A connection can also stop delivering without failing (a half-open TCP connection: the peer
//! or a middlebox vanished without a reset). Whenever nothing has arrived for half the health
//! interval, the listener sends a protocol-level ping (a `Sync` round trip, not a statement);
//! no answer within the other half means the connection is dead: it is dropped without being
//! asked anything more, a new one is opened, and every worker reads again. Opening it (connect
//! and every LISTEN) is bounded by the health interval too: an attempt into a network that is
//! still dead is abandoned and retried with backoff, so the listener is back within one health
//! interval (plus backoff) of the network healing. (sqlx sends `UNLISTEN *` on a dropped
//! listener's connection from a task of its own; on a dead connection that task waits until
//! the operating system gives up on the socket, and holds nothing of ours.)

use crate::error::Describe;
use std::{
    collections::BTreeSet,
    future::Future,
    sync::{Arc, Weak},
    time::Duration,
};

use sqlx::{
    Acquire, Connection,
    postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions},
};
use tokio::sync::{mpsc, oneshot};

use super::events::Stats;
use crate::util::{Stop, error_backoff};

/// What the listener does with what it hears: implemented by the runtime.
pub(crate) trait Dispatch: Send + Sync + 'static {
    /// Where to connect (asked again for every connection: it may change, e.g. to a new
    /// primary after a failover).
    fn connect_options(self: &Arc<Self>) -> impl Future<Output = PgConnectOptions> + Send;
    /// How often the connection must prove it still delivers.
    fn health_interval(&self) -> Duration;
    /// The connection is (re)established: notifications may have been lost.
    fn after_connect(self: &Arc<Self>, reconnected: bool) -> impl Future<Output = ()> + Send;
    /// One notification.
    fn dispatch(self: &Arc<Self>, channel: &str, payload: &str) -> impl Future<Output = ()> + Send;
}

pub(crate) enum Command {
    /// LISTEN on a channel; answer once the LISTEN is active.
    Listen(String, oneshot::Sender<()>),
}

/// A pool of one, used only to open the listening connection: outside every job pool. A new
/// one for each connection, so an abandoned connection never delays the next.
fn private_pool(options: &PgConnectOptions, bound: Duration) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(bound)
        .idle_timeout(None)
        .max_lifetime(None)
        .test_before_acquire(false)
        .connect_lazy_with(options.clone())
}

/// Closes a healthy listening connection (the runtime stops): at most a second.
async fn close(listener: PgListener, pool: PgPool) {
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(1), pool.close()).await;
}

/// Runs until `stop` is requested or the owner is gone.
pub(crate) async fn run<D: Dispatch>(
    owner: Weak<D>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    stats: Arc<Stats>,
    mut stop: Stop,
) {
    let mut channels: BTreeSet<String> = BTreeSet::new();
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut failures = 0u32;
    let mut connected_once = false;

    let absorb = |cmd: Command,
                  channels: &mut BTreeSet<String>,
                  waiting: &mut Vec<oneshot::Sender<()>>| match cmd {
        Command::Listen(channel, ack) => {
            channels.insert(channel);
            waiting.push(ack);
        }
    };

    loop {
        while let Ok(cmd) = commands.try_recv() {
            absorb(cmd, &mut channels, &mut waiting);
        }
        if channels.is_empty() {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => absorb(cmd, &mut channels, &mut waiting),
                    None => return,
                },
                () = stop.requested() => return,
            }
            continue;
        }
        let Some(dispatch) = owner.upgrade() else {
            return;
        };
        let health = dispatch.health_interval();
        let options = tokio::select! {
            options = dispatch.connect_options() => options,
            () = stop.requested() => return,
        };
        drop(dispatch);
        let pool = private_pool(&options, health);
        let connect = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen_all(channels.iter().map(String::as_str)).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let attempt = tokio::select! {
            attempt = tokio::time::timeout(health, connect) => attempt,
            () = stop.requested() => return,
        };
        let mut listener = match attempt {
            Ok(Ok(mut l)) => {
                // A lost connection must surface as `Ok(None)` at once, never be replaced
                // inside `try_recv`: that future is raced against commands, and if it were
                // dropped mid-reconnect the next LISTEN would quietly open a new connection,
                // with no catch-up for what was sent meanwhile. We reconnect ourselves.
                l.eager_reconnect(false);
                l
            }
            failed => {
                failures += 1;
                let wait = error_backoff(failures);
                if failures == 1 || failures.is_power_of_two() {
                    match failed {
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e.describe(), failures, retry_in = ?wait,
                            "LISTEN connection failed; workers fall back to polling until it is back")
                        }
                        _ => tracing::warn!(bound = ?health, failures, retry_in = ?wait,
                            "connecting and LISTENing did not finish in time; abandoning the attempt (workers fall back to polling until it is back)"),
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    cmd = commands.recv() => match cmd {
                        Some(cmd) => absorb(cmd, &mut channels, &mut waiting),
                        None => return,
                    },
                    () = stop.requested() => return,
                }
                continue;
            }
        };
        let reconnected = connected_once;
        if reconnected {
            stats.reconnected();
            tracing::info!(
                channels = channels.len(),
                "LISTEN connection re-established"
            );
        }
        connected_once = true;
        failures = 0;
        for ack in waiting.drain(..) {
            let _ = ack.send(());
        }
        let Some(o) = owner.upgrade() else { return };
        o.after_connect(reconnected).await;
        drop(o);
        let mut last_heard = tokio::time::Instant::now();

        loop {
            tokio::select! {
                () = stop.requested() => {
                    close(listener, pool).await;
                    return;
                }
                () = tokio::time::sleep_until(last_heard + health / 2) => {
                    let ping = async {
                        let conn = (&mut listener).acquire().await?;
                        conn.ping().await
                    };
                    match tokio::time::timeout(health / 2, ping).await {
                        Ok(Ok(())) => last_heard = tokio::time::Instant::now(),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e.describe(),
                                "LISTEN connection failed its health check; reconnecting");
                            break;
                        }
                        Err(_) => {
                            tracing::warn!(timeout = ?(health / 2),
                                "LISTEN connection did not answer its health check (silently dead, e.g. half-open TCP); reconnecting");
                            break;
                        }
                    }
                }
                cmd = commands.recv() => match cmd {
                    None => {
                        close(listener, pool).await;
                        return;
                    }
                    Some(Command::Listen(channel, ack)) => {
                        if channels.contains(&channel) {
                            let _ = ack.send(());
                            continue;
                        }
                        // Bounded like the connection: a LISTEN that does not answer means the
                        // connection is dead.
                        match tokio::time::timeout(health / 2, listener.listen(&channel)).await {
                            Ok(Ok(())) => {
                                channels.insert(channel);
                                let _ = ack.send(());
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(error = %e.describe(), "LISTEN failed; reconnecting");
                                channels.insert(channel);
                                waiting.push(ack);
                                break;
                            }
                            Err(_) => {
                                tracing::warn!("LISTEN did not answer in time; reconnecting");
                                channels.insert(channel);
                                waiting.push(ack);
                                break;
                            }
                        }
                    }
                },
                received = listener.try_recv() => match received {
                    Ok(Some(n)) => {
                        last_heard = tokio::time::Instant::now();
                        stats.received();
                        let Some(o) = owner.upgrade() else { return };
                        o.dispatch(n.channel(), n.payload()).await;
                    }
                    Ok(None) => {
                        tracing::warn!("LISTEN connection lost; reconnecting");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.describe(), "LISTEN connection lost; reconnecting");
                        break;
                    }
                },
            }
        }
        // The connection is dead or failed: dropped, never asked anything more.
        drop(listener);
        drop(pool);
        failures += 1;
        tokio::select! {
            () = tokio::time::sleep(error_backoff(failures)) => {}
            () = stop.requested() => return,
        }
    }
}
