//! LISTEN/NOTIFY: the shared listener, channels, triggers, and typed events.
//!
//! One [`Hub`] exists per database in a process. It owns the per-queue wake signals and, once
//! anything needs notifications, one listener task with one dedicated connection (outside every
//! job pool) that LISTENs on the channels of every subscribed queue. After every (re)connect the
//! hub wakes every queue's workers, because notifications sent while disconnected are lost; the
//! workers read again before they wait. Notifications are hints: workers also keep a jittered
//! fallback poll and wake at known visibility times.

mod channel;
mod events;
mod listener;
pub(crate) mod registry;
pub(crate) mod results;
mod signal;
mod triggers;
pub(crate) mod wakeup;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak,
        atomic::{AtomicU64, Ordering},
    },
};

use sqlx::{PgPool, postgres::PgConnectOptions};
use tokio::sync::{mpsc, oneshot};

pub use channel::{
    DEFAULT_NAMESPACE, DEFAULT_NAMESPACE_PATTERN, MAX_CHANNEL_LEN, MAX_PREFIX_LEN, NotifyChannels,
};
pub use events::{EventStream, ListenerStats, QueueEvent, QueueEvents};
pub(crate) use signal::{Disarmer, Subscription, Wake, WakeSignal};
pub(crate) use triggers::ensure_notify;
pub use triggers::{
    DEFAULT_MESSAGE_PAYLOAD_BYTES, NotifyMode, disable_notify, enable_created_notify,
    enable_notify, notify_migration_sql, notify_mode,
};

use crate::queue::QueueName;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Which database a pool talks to; pools with the same key share a hub and its listener.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DbKey(String);

impl DbKey {
    fn of(options: &PgConnectOptions) -> Self {
        let socket = options
            .get_socket()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Self(format!(
            "{}|{}|{}|{}|{}",
            options.get_host(),
            options.get_port(),
            socket,
            options.get_database().unwrap_or_default(),
            options.get_username()
        ))
    }
}

static HUBS: OnceLock<Mutex<HashMap<DbKey, Weak<Hub>>>> = OnceLock::new();

/// Per-database state shared by every storage and event subscriber in the process.
pub(crate) struct Hub {
    options: PgConnectOptions,
    /// One wake signal per queue.
    signals: Mutex<HashMap<QueueName, Weak<WakeSignal>>>,
    /// Event subscribers by channel.
    subscribers: Mutex<HashMap<String, Vec<events::EventSender>>>,
    /// Result waiters by results channel.
    results: Mutex<HashMap<String, Weak<results::ResultWatch>>>,
    /// Commands to the listener task, once it is started.
    listener: Mutex<Option<mpsc::UnboundedSender<listener::Command>>>,
    stats: Arc<events::Stats>,
    /// How often the listener proves its connection still delivers (milliseconds; the shortest
    /// any storage asked for).
    health_interval_ms: AtomicU64,
    /// This process's workers on this database, and their heartbeat.
    pub(crate) registry: registry::Registry,
    /// Identifies this process's rows in `apalis_pgmq.listeners`.
    pub(crate) owner: String,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

/// The hub of the database `pool` talks to.
pub(crate) fn hub(pool: &PgPool) -> Arc<Hub> {
    let options = pool.connect_options();
    let key = DbKey::of(&options);
    let mut hubs = lock(HUBS.get_or_init(Default::default));
    if let Some(hub) = hubs.get(&key).and_then(Weak::upgrade) {
        return hub;
    }
    hubs.retain(|_, w| w.strong_count() > 0);
    let hub = Arc::new(Hub {
        options: (*options).clone(),
        signals: Mutex::default(),
        subscribers: Mutex::default(),
        results: Mutex::default(),
        listener: Mutex::default(),
        stats: Arc::default(),
        health_interval_ms: AtomicU64::new(u64::MAX),
        registry: registry::Registry::new(),
        owner: format!(
            "{}.{:016x}",
            std::process::id(),
            (crate::util::random_unit() * 2f64.powi(53)) as u64
        ),
    });
    hubs.insert(key, Arc::downgrade(&hub));
    hub
}

/// Keeps the listener (and its LISTENs) alive while a worker or subscriber uses it.
#[derive(Debug, Clone)]
pub(crate) struct ListenGuard {
    _hub: Arc<Hub>,
}

/// The default [`Config::listener_health_check`](crate::Config::listener_health_check).
pub(crate) const DEFAULT_HEALTH_CHECK_MS: u64 = 10_000;

impl Hub {
    /// Asks the listener to prove its connection at least every `interval`.
    pub(crate) fn health_check_at_least_every(&self, interval: std::time::Duration) {
        let ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(100);
        self.health_interval_ms.fetch_min(ms, Ordering::Relaxed);
    }

    /// How often the listener proves its connection.
    pub(crate) fn health_interval(&self) -> std::time::Duration {
        match self.health_interval_ms.load(Ordering::Relaxed) {
            u64::MAX => std::time::Duration::from_millis(DEFAULT_HEALTH_CHECK_MS),
            ms => std::time::Duration::from_millis(ms),
        }
    }

    /// The listener's counters.
    pub(crate) fn stats(&self) -> ListenerStats {
        self.stats.snapshot()
    }

    /// The wake signal of `queue` (shared by every storage of this queue in the process).
    pub(crate) fn signal(&self, queue: &QueueName) -> Arc<WakeSignal> {
        let mut signals = lock(&self.signals);
        if let Some(s) = signals.get(queue).and_then(Weak::upgrade) {
            return s;
        }
        signals.retain(|_, w| w.strong_count() > 0);
        let s = Arc::new(WakeSignal::default());
        signals.insert(queue.clone(), Arc::downgrade(&s));
        s
    }

    fn signal_if_any(&self, queue: &str) -> Option<Arc<WakeSignal>> {
        let q = QueueName::new(queue).ok()?;
        lock(&self.signals).get(&q).and_then(Weak::upgrade)
    }

    /// The live signals of every queue.
    fn live_signals(&self) -> Vec<Arc<WakeSignal>> {
        lock(&self.signals)
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// The result watch of the queue whose results channel is `channel` (shared by every waiter
    /// of that queue in the process).
    pub(crate) fn result_watch(
        &self,
        pool: &PgPool,
        queue: &QueueName,
        channel: String,
    ) -> Arc<results::ResultWatch> {
        let mut watches = lock(&self.results);
        if let Some(w) = watches.get(&channel).and_then(Weak::upgrade) {
            return w;
        }
        // Entries are not removed when their watch ends: the channel stays LISTENed, and its
        // notifications must still be told apart from queue events (see `dispatch`).
        let w = results::ResultWatch::start(pool.clone(), queue.clone());
        watches.insert(channel, Arc::downgrade(&w));
        w
    }

    /// `None` if `channel` is not a results channel; `Some(None)` if it is one whose waiters
    /// are all gone.
    fn result_watch_if_any(&self, channel: &str) -> Option<Option<Arc<results::ResultWatch>>> {
        lock(&self.results).get(channel).map(Weak::upgrade)
    }

    /// Every live result watch looks at all of its ids again.
    fn results_look_at_all(&self) {
        let watches: Vec<_> = lock(&self.results)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        watches.iter().for_each(|w| w.look_at_all());
    }

    /// Wakes every queue's workers (after a reconnect: notifications may have been lost).
    fn wake_all(&self) {
        self.live_signals().iter().for_each(|s| s.wake());
    }

    /// Forgets every arming: notifications may have been lost and, after a server restart, the
    /// unlogged listeners table may be empty, so idle workers arm again.
    fn forget_armings(&self) {
        self.live_signals().iter().for_each(|s| s.forget_arming());
    }

    /// Asks the listener to LISTEN on `channel`; the receiver resolves once it does (or never,
    /// if the database cannot be reached: callers wait with a timeout).
    pub(crate) fn listen(self: &Arc<Self>, channel: String) -> oneshot::Receiver<()> {
        let (ack_tx, ack_rx) = oneshot::channel();
        let mut slot = lock(&self.listener);
        let tx = match slot.as_ref().filter(|tx| !tx.is_closed()) {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(listener::run(
                    Arc::downgrade(self),
                    self.options.clone(),
                    rx,
                    self.stats.clone(),
                ));
                *slot = Some(tx.clone());
                tx
            }
        };
        let _ = tx.send(listener::Command::Listen(channel, ack_tx));
        ack_rx
    }
}

/// Registers `owner` on `channel` for `secs` seconds: inserts notify while it is armed (every
/// insert, when `persistent`: event subscribers).
pub(crate) async fn want(
    pool: &PgPool,
    channel: &str,
    owner: &str,
    secs: f64,
    persistent: bool,
) -> crate::Result<()> {
    sqlx::query(crate::sql::WANT_NOTIFY)
        .bind(channel)
        .bind(owner)
        .bind(secs)
        .bind(persistent)
        .execute(pool)
        .await?;
    Ok(())
}

/// Removes `owner`'s row on `channel` (an event subscription ending, the last worker of a queue
/// in this process stopping).
pub(crate) async fn unwant(pool: &PgPool, channel: &str, owner: &str) -> crate::Result<()> {
    sqlx::query(crate::sql::UNWANT_NOTIFY)
        .bind(channel)
        .bind(owner)
        .execute(pool)
        .await?;
    Ok(())
}

/// A worker's subscription for `queue`: the queue's wake signal, plus (when `listen` is set) a
/// LISTEN on its channel. The receiver resolves once the LISTEN is active.
pub(crate) fn subscribe(
    hub: &Arc<Hub>,
    signal: &Arc<WakeSignal>,
    listen_on: Option<String>,
) -> (Subscription, Option<oneshot::Receiver<()>>) {
    let mut sub = signal.subscribe();
    let ack = listen_on.map(|channel| {
        sub.guard = Some(ListenGuard { _hub: hub.clone() });
        hub.listen(channel)
    });
    (sub, ack)
}
