//! The listener task: one connection per database per process, shared by every worker and
//! event subscriber. Reconnects with backoff; after every (re)connect it wakes every queue,
//! because notifications sent while it was disconnected are lost.
//!
//! A connection can also stop delivering without failing (a half-open TCP connection: the peer
//! or a middlebox vanished without a reset). Whenever nothing has arrived for half the health
//! interval, the listener sends a protocol-level ping (a `Sync` round trip, not a statement);
//! no answer within the other half means the connection is dead: it is abandoned, a new one is
//! opened, and every worker reads again. So a silent connection is replaced within the health
//! interval ([`Config::listener_health_check`](crate::Config::listener_health_check)).

use std::{
    collections::BTreeSet,
    sync::{Arc, Weak},
    time::Duration,
};

use sqlx::{
    Acquire, Connection,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};
use tokio::sync::{mpsc, oneshot};

use super::{Hub, events::Stats};
use crate::util::error_backoff;

pub(crate) enum Command {
    /// LISTEN on a channel; answer once the LISTEN is active.
    Listen(String, oneshot::Sender<()>),
}

pub(crate) async fn run(
    hub: Weak<Hub>,
    options: PgConnectOptions,
    mut commands: mpsc::UnboundedReceiver<Command>,
    stats: Arc<Stats>,
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
            match commands.recv().await {
                Some(cmd) => absorb(cmd, &mut channels, &mut waiting),
                None => return,
            }
            continue;
        }
        // A pool of one per connection, used only to open the listening connection: outside
        // every job pool. A new one each time: dropping a listener whose connection went silent
        // leaves sqlx's UNLISTEN hanging on that connection, which must not block the next.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(10))
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(options.clone());
        let connect = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen_all(channels.iter().map(String::as_str)).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = match connect.await {
            Ok(mut l) => {
                // A lost connection must surface as `Ok(None)` at once, never be replaced
                // inside `try_recv`: that future is raced against commands, and if it were
                // dropped mid-reconnect the next LISTEN would quietly open a new connection,
                // with no catch-up for what was sent meanwhile. We reconnect ourselves.
                l.eager_reconnect(false);
                l
            }
            Err(e) => {
                failures += 1;
                let wait = error_backoff(failures);
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, retry_in = ?wait,
                        "LISTEN connection failed; workers fall back to polling until it is back");
                }
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    cmd = commands.recv() => match cmd {
                        Some(cmd) => absorb(cmd, &mut channels, &mut waiting),
                        None => return,
                    },
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
        let Some(h) = hub.upgrade() else { return };
        h.after_connect(reconnected).await;
        let health = h.health_interval();
        drop(h);
        let mut last_heard = tokio::time::Instant::now();

        loop {
            tokio::select! {
                () = tokio::time::sleep_until(last_heard + health / 2) => {
                    let ping = async {
                        let conn = (&mut listener).acquire().await?;
                        conn.ping().await
                    };
                    match tokio::time::timeout(health / 2, ping).await {
                        Ok(Ok(())) => last_heard = tokio::time::Instant::now(),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e,
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
                    None => return,
                    Some(Command::Listen(channel, ack)) => {
                        if channels.contains(&channel) {
                            let _ = ack.send(());
                            continue;
                        }
                        match listener.listen(&channel).await {
                            Ok(()) => {
                                channels.insert(channel);
                                let _ = ack.send(());
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "LISTEN failed; reconnecting");
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
                        let Some(h) = hub.upgrade() else { return };
                        h.dispatch(n.channel(), n.payload()).await;
                    }
                    Ok(None) => {
                        tracing::warn!("LISTEN connection lost; reconnecting");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                        break;
                    }
                },
            }
        }
        drop(listener);
        failures += 1;
        tokio::time::sleep(error_backoff(failures)).await;
    }
}
