//! The runtime: the one owner of this process's work on a database.
//!
//! A [`Runtime`] holds everything that runs in the background for the storages, waiters and
//! event subscribers made from it, each as a service it starts when first needed and stops in
//! [`Runtime::shutdown`]:
//!
//! | service | what | started by |
//! |---|---|---|
//! | listener (`notify/listener.rs`) | the one LISTEN connection; wakes workers, feeds waiters and subscribers | the first worker, waiter or subscription |
//! | maintenance (`maintenance.rs`) | worker registry heartbeat, retention, partition upkeep, gauges, event subscriptions' rows, clean-ups | the first worker or subscription |
//! | result watch, per queue (`results.rs`) | reads stored results for waiters | the first waiter of the queue |
//! | completer, per storage (`ack/completer.rs`) | writes job outcomes in batches | the storage's first worker |
//! | lease keeper, per storage (`lease.rs`) | renews the leases of running jobs | the storage's first worker |
//! | push writer, per storage (`backend/combine.rs`) | writes pushes that arrive together in one statement; ends when none waits | a push through the storage's pool |
//!
//! Services run as tasks of the runtime's own task sets, never detached: shutdown asks them to
//! stop and awaits them; a runtime dropped without shutdown aborts them (the last resort).
//!
//! # Shutdown
//!
//! [`Runtime::shutdown`] stops in dependency order:
//!
//! 1. Workers: every worker's stream ends (apalis then lets its running jobs finish), each
//!    releases the messages it claimed but did not start, and waits until its outcomes are
//!    written; new workers and waiters are refused. Bounded by the grace period.
//! 2. Per-storage services: the completers write what is left and stop; the keepers stop; a
//!    push writer finishes its statement.
//! 3. Process services: the maintenance service does its queued chores, the listener closes
//!    its connection, waiters and event streams end.
//! 4. This runtime's rows: its workers' rows in `apalis_pgmq.workers` and its wake-up and
//!    subscription rows in `apalis_pgmq.listeners` are deleted.
//!
//! When it returns, no task of the runtime runs and every connection it took from the pool is
//! back in the pool (closing the pool is the application's: it may share it). A push through a
//! storage's pool after that still works (pushes do not need the runtime): its writer is a task
//! of its own that ends with the push.

pub(crate) mod events;
pub(crate) mod maintenance;
pub(crate) mod results;
pub(crate) mod snapshots;

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use sqlx::{PgPool, postgres::PgConnectOptions};
use tokio::{
    sync::{Notify, mpsc, oneshot, watch},
    task::JoinSet,
    time::Instant,
};

use crate::{
    error::{Error, Result},
    notify::{
        ListenerStats, WakeSignal,
        events::{Payload, Stats},
        listener::{self, Dispatch},
    },
    queue::QueueName,
    util::Stop,
};
use events::EventSender;
use maintenance::{Chore, Maintenance};
use results::ResultWatch;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How long [`Runtime::shutdown`] waits for workers to stop (their running jobs to finish).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// How long shutdown waits, once the workers are stopped, for the services to stop and the
/// runtime's rows to be deleted (one bound for all of it).
const SERVICES_GRACE: Duration = Duration::from_secs(5);

/// The owner of this process's background work on one database: the listener, maintenance,
/// result watches and, per storage, the completer and lease keeper (see the module docs).
///
/// Make one per database and process, build storages from it, and [`shutdown`](Self::shutdown)
/// it when the application stops. Cloning is cheap; clones are the same runtime.
///
/// # Example
///
/// ```no_run
/// use apalis::prelude::*;
/// use apalis_pgmq_notify::{PgmqStorage, QueueName, Runtime};
///
/// async fn send_email(to: String) -> Result<(), BoxDynError> {
///     println!("sending to {to}");
///     Ok(())
/// }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::PgPool::connect("postgres://localhost/app").await?;
/// apalis_pgmq_notify::setup(&pool).await?;
/// let runtime = Runtime::new(&pool);
/// let storage = PgmqStorage::<String>::new(&runtime, QueueName::new("email")?);
/// Monitor::new()
///     .register(move |_| {
///         WorkerBuilder::new("email").backend(storage.clone()).build(send_email)
///     })
///     .run_with_signal(tokio::signal::ctrl_c())
///     .await?;
/// // Outcomes written, leases released, this process's rows removed, tasks stopped.
/// runtime.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("owner", &self.inner.owner)
            .field("phase", &*self.inner.phase.borrow())
            .finish_non_exhaustive()
    }
}

/// Where a runtime is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    /// Shutdown has begun: workers end, nothing new starts.
    Stopping,
    Stopped,
}

/// A set of services stopped together.
struct Services {
    tasks: Mutex<JoinSet<()>>,
    stop: watch::Sender<bool>,
    stop_rx: Stop,
}

impl Services {
    fn new() -> Self {
        let (stop, stop_rx) = Stop::new();
        Self {
            tasks: Mutex::new(JoinSet::new()),
            stop,
            stop_rx,
        }
    }

    /// Runs `service` (it gets the set's stop request) as a task of this set.
    fn spawn<F>(&self, service: impl FnOnce(Stop) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let fut = service(self.stop_rx.clone());
        let mut tasks = lock(&self.tasks);
        // Forget the tasks that ended on their own.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(fut);
    }

    /// Asks every service to stop and waits for them until `deadline`; aborts the rest.
    /// Returns how many had to be aborted.
    async fn stop(&self, deadline: Instant) -> usize {
        let _ = self.stop.send(true);
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        while !tasks.is_empty() {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    let left = tasks.len();
                    tasks.shutdown().await;
                    return left;
                }
            }
        }
        0
    }
}

/// The runtime's state, shared by its handles; its tasks hold only a weak reference, so a
/// runtime whose handles are all gone is dropped, and its task sets abort what still runs.
pub(crate) struct Inner {
    pub(crate) pool: PgPool,
    /// Identifies this runtime's rows in `apalis_pgmq.listeners` and `apalis_pgmq.workers`.
    pub(crate) owner: String,
    phase: watch::Sender<Phase>,
    /// Serialises shutdowns (a second call waits for the first).
    shutting_down: tokio::sync::Mutex<()>,
    /// Workers whose stream has not closed yet.
    workers: AtomicUsize,
    workers_changed: Notify,
    /// Completers and lease keepers.
    queue_services: Services,
    /// Listener, maintenance, result watches.
    process_services: Services,
    /// The listener's counters.
    pub(crate) stats: Arc<Stats>,
    /// How often the listener proves its connection (milliseconds; the shortest asked for).
    health_interval_ms: AtomicU64,
    /// One wake signal per queue.
    signals: Mutex<HashMap<QueueName, Weak<WakeSignal>>>,
    /// Event subscribers by channel.
    pub(crate) subscribers: Mutex<HashMap<String, Vec<EventSender>>>,
    /// Result watches by results channel. Entries stay when a watch ends: the channel stays
    /// LISTENed, and its notifications must still be told apart from queue events.
    watches: Mutex<HashMap<String, Weak<ResultWatch>>>,
    /// Commands to the listener, once it is started.
    listener: Mutex<Option<mpsc::UnboundedSender<listener::Command>>>,
    /// Where the listener connects, when not where the pool does (a direct connection beside a
    /// transaction pooler).
    listener_options: Mutex<Option<PgConnectOptions>>,
    /// The maintenance service's state and its commands, once it is started.
    pub(crate) maintenance: Maintenance,
    /// The hosts of a multi-host connection string, when the pool was made from one: the
    /// listener chooses among them at every (re)connect, and moves the pool.
    hosts: Mutex<Option<crate::topology::MultiHost>>,
    /// Set once the pool's (and the listener's) connections were seen to keep a server
    /// session each (no transaction pooler): checked at the first worker's start.
    sessions_checked: tokio::sync::OnceCell<()>,
}

impl Runtime {
    /// A runtime for the database `pool` talks to. Starts nothing until something needs it.
    #[must_use]
    pub fn new(pool: &PgPool) -> Self {
        crate::obs::describe();
        let (phase, _) = watch::channel(Phase::Running);
        Self {
            inner: Arc::new(Inner {
                pool: pool.clone(),
                owner: format!(
                    "{}.{:016x}",
                    std::process::id(),
                    (crate::util::random_unit() * 2f64.powi(53)) as u64
                ),
                phase,
                shutting_down: tokio::sync::Mutex::new(()),
                workers: AtomicUsize::new(0),
                workers_changed: Notify::new(),
                queue_services: Services::new(),
                process_services: Services::new(),
                stats: Arc::default(),
                health_interval_ms: AtomicU64::new(u64::MAX),
                signals: Mutex::default(),
                subscribers: Mutex::default(),
                watches: Mutex::default(),
                listener: Mutex::default(),
                listener_options: Mutex::default(),
                maintenance: Maintenance::default(),
                hosts: Mutex::default(),
                sessions_checked: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// The listener connects with `options` instead of the pool's: LISTEN needs a session of
    /// its own, so behind a transaction pooler (PgBouncer in transaction mode) give it a direct
    /// connection to the server while the pool goes through the pooler. Takes effect at the
    /// listener's next connection.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::Runtime;
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let pooled = sqlx::PgPool::connect("postgres://app@pgbouncer:6432/app").await?;
    /// let direct: sqlx::postgres::PgConnectOptions = "postgres://app@db:5432/app".parse()?;
    /// let runtime = Runtime::new(&pooled).listener_connect_options(direct);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn listener_connect_options(self, options: PgConnectOptions) -> Self {
        *lock(&self.inner.listener_options) = Some(options);
        self
    }

    /// Checks, once per runtime (again after a failed check), that neither the pool nor the
    /// listener goes through a pooler in transaction mode
    /// ([`check_session_pooling`](crate::check_session_pooling)); bounded in time, a server out
    /// of reach is [`Error::Unreachable`].
    pub(crate) async fn check_sessions(&self) -> Result<()> {
        const BOUND: Duration = Duration::from_secs(15);
        let check = async {
            let pool_options = self.inner.pool.connect_options();
            crate::topology::check_named(&pool_options, "the pool's connection").await?;
            let listener = lock(&self.inner.listener_options).clone();
            if let Some(options) = listener {
                crate::topology::check_named(&options, "the listener's connection").await?;
            }
            Ok::<(), Error>(())
        };
        self.inner
            .sessions_checked
            .get_or_try_init(|| async {
                tokio::time::timeout(BOUND, check)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::Unreachable {
                            cause: format!(
                                "checking the connections' sessions took longer than {}",
                                crate::config::human::HumanDuration(BOUND)
                            ),
                        })
                    })
            })
            .await
            .map(|_| ())
    }

    /// The hosts of the multi-host connection string the pool was made from
    /// ([`MultiHost::connect_pool`](crate::MultiHost::connect_pool)): every time the listener
    /// (re)connects, the runtime chooses the host that fits the string's
    /// `target_session_attrs` again, points the pool there
    /// ([`MultiHost::follow`](crate::MultiHost::follow)) and LISTENs there (unless
    /// [`listener_connect_options`](Self::listener_connect_options) says otherwise). After a
    /// failover the listener's connection breaks, and both follow the new primary.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), apalis_pgmq_notify::Error> {
    /// use apalis_pgmq_notify::{MultiHost, Runtime};
    /// let hosts: MultiHost =
    ///     "postgres://app@db1:5432,db2:5432/app?target_session_attrs=read-write".parse()?;
    /// let pool = hosts.connect_pool(sqlx::postgres::PgPoolOptions::new()).await?;
    /// let runtime = Runtime::new(&pool).hosts(hosts);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn hosts(self, hosts: crate::topology::MultiHost) -> Self {
        *lock(&self.inner.hosts) = Some(hosts);
        self
    }

    /// The pool.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Counters of the runtime's listener: notifications received, parse errors, reconnects.
    #[must_use]
    pub fn listener_stats(&self) -> ListenerStats {
        self.inner.stats.snapshot()
    }

    /// Whether [`shutdown`](Self::shutdown) has begun.
    #[must_use]
    pub fn is_shut_down(&self) -> bool {
        *self.inner.phase.borrow() != Phase::Running
    }

    /// Stops everything this runtime runs, in order (see the module docs), waiting at most
    /// [`DEFAULT_SHUTDOWN_GRACE`] for workers to finish their running jobs. Idempotent; a call
    /// during another waits for it.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if this runtime's rows could not be deleted (they expire by
    /// themselves); the services are stopped all the same.
    pub async fn shutdown(&self) -> Result<()> {
        self.shutdown_within(DEFAULT_SHUTDOWN_GRACE).await
    }

    /// [`shutdown`](Self::shutdown), waiting at most `grace` for workers. Workers that have
    /// not stopped by then are left to their leases: the keeper stops, and their messages are
    /// delivered again once their visibility timeout passes.
    ///
    /// # Errors
    ///
    /// As [`shutdown`](Self::shutdown).
    pub async fn shutdown_within(&self, grace: Duration) -> Result<()> {
        let inner = &self.inner;
        let _one = inner.shutting_down.lock().await;
        if *inner.phase.borrow() == Phase::Stopped {
            return Ok(());
        }
        inner.phase.send_replace(Phase::Stopping);
        // 1. Workers: their streams end; each closes (releases, flushes) on its own task.
        let deadline = Instant::now() + grace;
        loop {
            let changed = inner.workers_changed.notified();
            let left = inner.workers.load(Ordering::SeqCst);
            if left == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                tracing::warn!(workers = left, grace = ?grace,
                    "workers did not stop within the shutdown grace period; their jobs are delivered again once their leases lapse");
                break;
            }
        }
        // 2. Completers write what is left; keepers stop.
        let services_by = Instant::now() + SERVICES_GRACE;
        let aborted = inner.queue_services.stop(services_by).await;
        if aborted > 0 {
            tracing::error!(
                aborted,
                "completers, lease keepers or push writers did not stop in time; outcomes not written are delivered again, pushes in flight got an error"
            );
        }
        // 3. Listener, maintenance (its queued chores first), result watches.
        let aborted = inner.process_services.stop(services_by).await;
        if aborted > 0 {
            tracing::warn!(aborted, "background services did not stop in time; aborted");
        }
        *lock(&inner.listener) = None;
        // Event streams end once their senders are gone.
        lock(&inner.subscribers).clear();
        // 4. This runtime's rows, once nothing can write them again.
        let rows = match tokio::time::timeout_at(
            services_by.max(Instant::now() + Duration::from_secs(1)),
            self.forget_rows(),
        )
        .await
        {
            Ok(rows) => rows,
            Err(_) => Err(Error::Stopped(
                "the runtime's rows could not be deleted in time; they expire by themselves",
            )),
        };
        inner.phase.send_replace(Phase::Stopped);
        rows
    }

    /// Deletes this runtime's worker and listener rows.
    async fn forget_rows(&self) -> Result<()> {
        let pool = &self.inner.pool;
        let owner = &self.inner.owner;
        let workers = sqlx::query(crate::sql::FORGET_WORKER_OWNER)
            .bind(owner)
            .execute(pool)
            .await;
        let listeners = crate::notify::forget_owner(pool, owner).await;
        workers?;
        listeners?;
        Ok(())
    }
}

impl Inner {
    /// Refuses new work once shutdown has begun.
    pub(crate) fn check_running(&self) -> Result<()> {
        if *self.phase.borrow() == Phase::Running {
            Ok(())
        } else {
            Err(Error::Stopped("the runtime is shut down"))
        }
    }

    /// A receiver of the runtime's phase, for workers that end when shutdown begins.
    pub(crate) fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// A worker's stream starts: counted until its guard is dropped (its stream closed).
    pub(crate) fn worker_started(self: &Arc<Self>) -> Result<WorkerGuard> {
        self.check_running()?;
        self.workers.fetch_add(1, Ordering::SeqCst);
        Ok(WorkerGuard {
            inner: Arc::downgrade(self),
        })
    }

    /// Runs a per-storage service (completer, keeper).
    pub(crate) fn spawn_queue_service<F>(&self, service: impl FnOnce(Stop) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.queue_services.spawn(service);
    }

    /// Runs a process service (listener, maintenance, result watch).
    pub(crate) fn spawn_process_service<F>(&self, service: impl FnOnce(Stop) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.process_services.spawn(service);
    }

    /// Asks the listener to prove its connection at least every `interval`.
    pub(crate) fn health_check_at_least_every(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(100);
        self.health_interval_ms.fetch_min(ms, Ordering::Relaxed);
    }

    /// The wake signal of `queue` (shared by every storage of this queue in the runtime).
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

    fn live_signals(&self) -> Vec<Arc<WakeSignal>> {
        lock(&self.signals)
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// The result watch of `queue`, whose results channel is `channel` (shared by every
    /// waiter of that queue in the runtime); started when first needed.
    pub(crate) fn result_watch(&self, queue: &QueueName, channel: String) -> Arc<ResultWatch> {
        let mut watches = lock(&self.watches);
        if let Some(w) = watches.get(&channel).and_then(Weak::upgrade) {
            return w;
        }
        let w = ResultWatch::new(self.pool.clone(), queue.clone());
        let weak = Arc::downgrade(&w);
        self.spawn_process_service(|stop| results::run(weak, stop));
        watches.insert(channel, Arc::downgrade(&w));
        w
    }

    /// `None` if `channel` is not a results channel; `Some(None)` if it is one whose waiters
    /// are all gone.
    fn result_watch_if_any(&self, channel: &str) -> Option<Option<Arc<ResultWatch>>> {
        lock(&self.watches).get(channel).map(Weak::upgrade)
    }

    /// Asks the listener to LISTEN on `channel`; the receiver resolves once it does (or never,
    /// if the database cannot be reached: callers wait with a timeout).
    pub(crate) fn listen(self: &Arc<Self>, channel: String) -> oneshot::Receiver<()> {
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.check_running().is_err() {
            return ack_rx;
        }
        let mut slot = lock(&self.listener);
        let tx = match slot.as_ref().filter(|tx| !tx.is_closed()) {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                let (owner, stats) = (Arc::downgrade(self), self.stats.clone());
                self.spawn_process_service(|stop| listener::run(owner, rx, stats, stop));
                *slot = Some(tx.clone());
                tx
            }
        };
        let _ = tx.send(listener::Command::Listen(channel, ack_tx));
        ack_rx
    }

    /// Hands work to the maintenance service, starting it if needed.
    pub(crate) fn chore(self: &Arc<Self>, chore: Chore) {
        if *self.phase.borrow() == Phase::Stopped {
            tracing::debug!(
                "a clean-up arrived after the runtime stopped; its rows expire by themselves"
            );
            return;
        }
        if let Some(rx) = self.maintenance.send(chore) {
            let weak = Arc::downgrade(self);
            self.spawn_process_service(|stop| maintenance::run(weak, rx, stop));
        }
    }

    /// Delivers `event` to `senders`, waiting for a full subscriber at most its send timeout.
    async fn deliver(&self, senders: &[EventSender], event: crate::notify::QueueEvent) {
        for s in senders {
            if s.deliver(event.clone()).await {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
            } else if !s.is_closed() {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        lock(&self.subscribers).retain(|_, v| {
            v.retain(|s| !s.is_closed());
            !v.is_empty()
        });
    }
}

impl Dispatch for Inner {
    async fn connect_options(self: &Arc<Self>) -> PgConnectOptions {
        let hosts = lock(&self.hosts).clone();
        if let Some(hosts) = hosts {
            // Every (re)connect of the listener chooses the host again and moves the pool
            // there too: after a failover both follow the new primary.
            match hosts.follow(&self.pool).await {
                Ok(chosen) => {
                    return lock(&self.listener_options).clone().unwrap_or(chosen);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "choosing a host for the listener failed; trying the pool's current one");
                }
            }
        }
        lock(&self.listener_options)
            .clone()
            .unwrap_or_else(|| (*self.pool.connect_options()).clone())
    }

    fn health_interval(&self) -> Duration {
        match self.health_interval_ms.load(Ordering::Relaxed) {
            u64::MAX => Duration::from_millis(crate::notify::DEFAULT_HEALTH_CHECK_MS),
            ms => Duration::from_millis(ms),
        }
    }

    /// Notifications sent while disconnected are lost: every worker reads again and re-arms,
    /// every result watch looks at all its ids, and subscribers are told.
    async fn after_connect(self: &Arc<Self>, reconnected: bool) {
        for s in self.live_signals() {
            s.forget_arming();
            s.wake();
        }
        let watches: Vec<_> = lock(&self.watches)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        watches.iter().for_each(|w| w.look_at_all());
        if reconnected {
            // Once per subscriber, however many channels it listens on.
            let mut all: Vec<EventSender> = Vec::new();
            for s in lock(&self.subscribers).values().flatten() {
                if !all.iter().any(|a| a.same_as(s)) {
                    all.push(s.clone());
                }
            }
            self.deliver(&all, crate::notify::QueueEvent::Reconnected)
                .await;
        }
    }

    /// Wakes the queue's workers (answering this runtime's arming), then delivers the event.
    async fn dispatch(self: &Arc<Self>, channel: &str, payload: &str) {
        if let Some(watch) = self.result_watch_if_any(channel) {
            if let Some(w) = watch {
                w.announced(payload);
            }
            return;
        }
        let parsed: Payload = match serde_json::from_str(payload) {
            Ok(p) => p,
            Err(e) => {
                self.stats.parse_error();
                tracing::debug!(channel, error = %e, "ignoring a notification that is not an event");
                return;
            }
        };
        if let Some(signal) = self.signal_if_any(&parsed.q) {
            // Our arming is answered: its row is disarmed (producers stop notifying), and an
            // idle worker arms again with a new generation.
            if let Some((channel, generation)) = signal.answered() {
                self.chore(Chore::Disarm {
                    channel,
                    owner: self.owner.clone(),
                    generation,
                });
            }
            let delay = parsed.delay();
            if delay > Duration::from_millis(1) {
                signal.wake_at(Instant::now() + delay);
            } else {
                signal.wake();
            }
        }
        let senders: Vec<EventSender> = lock(&self.subscribers)
            .get(channel)
            .cloned()
            .unwrap_or_default();
        if senders.is_empty() {
            return;
        }
        let Some(event) = parsed.into_event() else {
            self.stats.parse_error();
            return;
        };
        self.deliver(&senders, event).await;
    }
}

/// Counts a worker until its stream has closed (dropped then).
#[derive(Debug)]
pub(crate) struct WorkerGuard {
    inner: Weak<Inner>,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.workers.fetch_sub(1, Ordering::SeqCst);
            inner.workers_changed.notify_waiters();
        }
    }
}
