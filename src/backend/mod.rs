//! The apalis backend: [`PgmqStorage`].

mod claims;
mod combine;
pub use claims::FAIR_EVERY;
mod expose;
pub use expose::running_workers;
mod fetch;
mod floor;
mod lost;
mod results;
mod sink;

use std::{
    marker::PhantomData,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    task::{Context, Poll},
};

use apalis_codec::json::JsonCodec;
use apalis_core::{
    backend::{Backend, BackendConfig, WireFormatBackend, codec::Codec, finalize::Durable},
    task::{Task, builder::TaskBuilder},
    worker::context::WorkerContext,
};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::lease::LeaseTable;
use crate::{
    ack::{
        AckContext, AckLayer,
        completer::{self, CompleterCtx},
    },
    config::Config,
    error::{Error, Result},
    notify::{self, Subscription, WakeSignal},
    queue::{
        Action, Delivery, JobMeta, Message, MessageInfo, Outcome, PgmqQueue, QueueName,
        StoredResult, wants_result,
    },
    runtime::Runtime,
};
use fetch::Fetcher;
use sink::SinkState;
use tokio::sync::oneshot;

/// Metadata keys apalis-workflow puts on the tasks of a workflow's later steps.
const WORKFLOW_METADATA_PREFIX: &str = "apalis_workflow.";

/// State shared by every clone of a storage and by its workers' ack layers.
pub(crate) struct Shared {
    pub(crate) pool: PgPool,
    pub(crate) queue: PgmqQueue,
    pub(crate) dlq: PgmqQueue,
    pub(crate) config: Config,
    pub(crate) leases: Arc<LeaseTable>,
    /// What the ack layer needs (configuration, leases, the completer started on first use).
    pub(crate) ack: Arc<AckContext>,
    /// The runtime that runs this storage's background work.
    pub(crate) runtime: Runtime,
    /// Wakes this queue's workers: notifications, retries written, messages released.
    pub(crate) signal: Arc<WakeSignal>,
    /// Pushes without a key through the pool, written together (see `combine.rs`).
    pub(crate) pushes: Arc<combine::Combiner>,
    /// Where this worker's claims in visibility order start (see `floor.rs`).
    pub(crate) floor: std::sync::Mutex<floor::ClaimFloor>,
    /// The worker's claims whose answer was lost, to give back (see `lost.rs`).
    pub(crate) lost: std::sync::Mutex<lost::LostClaims>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.leases.close();
    }
}

impl Shared {
    /// Starts the completer and the lease keeper (services of the runtime) if they are not
    /// running yet.
    pub(crate) fn start_background(&self) -> Result<()> {
        if self.ack.completer.get().is_some() {
            return Ok(());
        }
        self.runtime.inner.check_running()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoTokioRuntime);
        }
        self.ack.completer.get_or_init(|| {
            let inner = &self.runtime.inner;
            let (table, pool, queue, vt) = (
                self.leases.clone(),
                self.pool.clone(),
                self.queue.clone(),
                self.config.leases.visibility_timeout,
            );
            inner.spawn_queue_service(|stop| crate::lease::keeper(table, pool, queue, vt, stop));
            let (handle, run) = completer::completer(CompleterCtx {
                pool: self.pool.clone(),
                queue: self.queue.clone(),
                dlq: self.dlq.clone(),
                leases: self.leases.clone(),
                signal: self.signal.clone(),
                wake_target: self.wake_target(),
                batch_size: self.config.outcomes.batch_size,
                flush_interval: self.config.outcomes.flush_interval,
                results_channel: self
                    .config
                    .wakeups
                    .channels
                    .results_channel(self.queue.name()),
                deadline: self.config.statement_deadline(),
            });
            inner.spawn_queue_service(run);
            handle
        });
        Ok(())
    }

    pub(crate) fn complete(&self, completion: Outcome) {
        self.ack.complete(completion);
    }

    pub(crate) async fn flush_completions(&self) {
        self.ack.flush().await;
    }

    /// Whether idle workers announce themselves (listening, with an on-demand trigger).
    pub(crate) fn announces(&self) -> bool {
        self.config.wakeups.listen && self.config.wakeups.mode == notify::NotifyMode::OnDemand
    }

    /// Where wake-ups for this queue go, when workers listen.
    pub(crate) fn wake_target(&self) -> Option<notify::wakeup::WakeTarget> {
        let c = &self.config;
        c.wakeups.listen.then(|| notify::wakeup::WakeTarget {
            queue: self.queue.name().as_str().to_owned(),
            queue_channel: c.wakeups.channels.queue_channel(self.queue.name()),
            namespace_channel: c
                .wakeups
                .channels
                .namespace_channel(&c.wakeups.channels.namespace(self.queue.name())),
            owner: self.runtime.inner.owner.clone(),
        })
    }

    /// A worker's wake-up subscription, and (when listening) a receiver that resolves once the
    /// LISTEN on the queue's channel is active.
    pub(crate) fn subscribe(&self) -> (Subscription, Option<oneshot::Receiver<()>>) {
        let sub = self.signal.subscribe();
        let ack = self.config.wakeups.listen.then(|| {
            let channel = self
                .config
                .wakeups
                .channels
                .queue_channel(self.queue.name());
            self.signal.arm_on(channel.clone());
            self.runtime.inner.listen(channel)
        });
        (sub, ack)
    }
}

/// A PGMQ queue as an apalis backend.
///
/// - `Backend`: workers claim messages with `FOR UPDATE SKIP LOCKED`, never more than they can
///   start, renew the lease of running jobs, and wait on LISTEN/NOTIFY (plus a fallback poll)
///   when the queue is empty.
/// - `BackendConfig` (durable), `WireFormatBackend` (the codec, JSON by default) and
///   `futures::Sink`, so apalis' `TaskSink` (`push`, `push_bulk`, `push_stream`, `push_task`)
///   works on it.
/// - [`push_with`](Self::push_with) and friends enqueue inside your own transaction.
///
/// The task id is the message's `msg_id`; the attempt is PGMQ's `read_ct` (the first delivery is
/// attempt 1). Cloning is cheap; clones share the pool, the lease keeper and the completer, and
/// each clone given to a worker keeps its own fetch state.
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
/// let mut storage = PgmqStorage::<String>::new(&runtime, QueueName::new("email")?);
/// storage.push("a@example.com".to_owned()).await?;
/// Monitor::new()
///     .register_n(2, move |index, _restarts| {
///         WorkerBuilder::new(format!("email-worker-{index}"))
///             .backend(storage.clone())
///             .concurrency(4)
///             .build(send_email)
///     })
///     .run_with_signal(tokio::signal::ctrl_c())
///     .await?;
/// runtime.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct PgmqStorage<Args, C = JsonCodec<Value>> {
    shared: Arc<Shared>,
    codec: C,
    /// Per-clone mutable state. The mutex is never contended (the worker owns the storage); it
    /// only makes the storage `Sync`, which `WorkerBuilder::data` requires.
    local: Mutex<Local>,
    _args: PhantomData<fn() -> Args>,
}

#[derive(Default)]
struct Local {
    fetch: Fetcher,
    sink: SinkState,
}

impl<Args, C: Clone> Clone for PgmqStorage<Args, C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            codec: self.codec.clone(),
            local: Mutex::new(Local::default()),
            _args: PhantomData,
        }
    }
}

impl<Args, C> std::fmt::Debug for PgmqStorage<Args, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgmqStorage")
            .field("queue", self.shared.queue.name())
            .field("args", &std::any::type_name::<Args>())
            .finish_non_exhaustive()
    }
}

impl<Args> PgmqStorage<Args, JsonCodec<Value>> {
    /// A storage for `queue` on `runtime`'s database, with the default [`Config`] and the
    /// JSON codec. Runs no SQL; the queue (and its dead-letter queue) is created by the first
    /// worker, or by [`create_queue`](Self::create_queue).
    #[must_use]
    pub fn new(runtime: &Runtime, queue: QueueName) -> Self {
        Self::build(runtime, queue, Config::default(), JsonCodec::default())
    }

    /// A storage with a configuration, validated here.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if a value is out of range.
    pub fn with_config(runtime: &Runtime, queue: QueueName, config: Config) -> Result<Self> {
        config.validate()?;
        Ok(Self::build(runtime, queue, config, JsonCodec::default()))
    }
}

impl<Args, C> PgmqStorage<Args, C> {
    /// A storage with a custom codec whose compact form is JSON (`serde_json::Value`).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if a configuration value is out of range.
    pub fn with_codec(
        runtime: &Runtime,
        queue: QueueName,
        config: Config,
        codec: C,
    ) -> Result<Self> {
        config.validate()?;
        Ok(Self::build(runtime, queue, config, codec))
    }

    fn build(runtime: &Runtime, queue: QueueName, config: Config, codec: C) -> Self {
        let q = PgmqQueue::new(queue)
            .with_max_payload_bytes(config.pushes.max_payload_bytes)
            .with_metrics_kind(config.metrics.kind_label());
        let dlq = q.dead_letter();
        let leases = Arc::new(LeaseTable::default());
        let ack = Arc::new(AckContext {
            queue: q.name().clone(),
            config: config.clone(),
            leases: leases.clone(),
            completer: OnceLock::new(),
        });
        let inner = &runtime.inner;
        if config.wakeups.listen {
            inner.health_check_at_least_every(config.process.listener_health_check);
        }
        inner
            .maintenance
            .heartbeat_at_least_every(config.process.heartbeat_interval);
        let signal = inner.signal(q.name());
        let floor_sweep = config.claims.floor_sweep;
        Self {
            shared: Arc::new(Shared {
                pool: inner.pool.clone(),
                queue: q,
                dlq,
                config,
                leases: leases.clone(),
                ack,
                runtime: runtime.clone(),
                signal,
                pushes: Arc::default(),
                floor: std::sync::Mutex::new(floor::ClaimFloor::new(floor_sweep)),
                lost: std::sync::Mutex::default(),
            }),
            codec,
            local: Mutex::new(Local::default()),
            _args: PhantomData,
        }
    }

    /// The claim floor its worker has learned (see `floor.rs`), for the tests.
    #[cfg(feature = "testing")]
    pub(crate) fn claim_floor(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.shared.floor.lock().map_or(None, |f| f.floor())
    }

    /// The sweeps below its floor that ran, and those that found a job there, for the tests.
    #[cfg(feature = "testing")]
    pub(crate) fn claim_floor_sweeps(&self) -> (u64, u64) {
        self.shared.floor.lock().map_or((0, 0), |f| f.sweeps())
    }

    /// Messages its worker gave back from claims whose answer was lost, for the tests.
    #[cfg(feature = "testing")]
    pub(crate) fn lost_claims_released(&self) -> u64 {
        self.shared.lost.lock().map_or(0, |l| l.released())
    }

    /// The pool.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    /// The queue, for direct PGMQ operations (metrics, purge, ...).
    #[must_use]
    pub fn queue(&self) -> &PgmqQueue {
        &self.shared.queue
    }

    /// The dead-letter queue, `<queue>_dlq`.
    #[must_use]
    pub fn dead_letter_queue(&self) -> &PgmqQueue {
        &self.shared.dlq
    }

    /// The configuration.
    #[must_use]
    pub fn get_config(&self) -> &Config {
        &self.shared.config
    }

    /// The runtime this storage belongs to.
    #[must_use]
    pub fn runtime(&self) -> &Runtime {
        &self.shared.runtime
    }

    /// Counters of the runtime's listener (shared by every storage and event subscriber of the
    /// runtime): notifications received, parse errors, reconnects.
    #[must_use]
    pub fn listener_stats(&self) -> crate::notify::ListenerStats {
        self.shared.runtime.listener_stats()
    }

    /// Creates the queue and its dead-letter queue (idempotent), and installs its notification
    /// trigger when listening is on.
    ///
    /// # Errors
    ///
    /// [`Error::Database`], e.g. when [`setup`](crate::setup) has not been run.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqStorage, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// # let runtime = apalis_pgmq_notify::Runtime::new(&pool);
    /// let storage = PgmqStorage::<String>::new(&runtime, QueueName::new("email")?);
    /// storage.create_queue().await?;
    /// # Ok(()) }
    /// ```
    pub async fn create_queue(&self) -> Result<()> {
        self.shared.queue.create(&self.shared.pool).await?;
        self.shared.dlq.create(&self.shared.pool).await?;
        self.shared
            .queue
            .index_dead_letters(&self.shared.pool)
            .await?;
        self.shared
            .queue
            .index_unique_keys(&self.shared.pool)
            .await?;
        let c = &self.shared.config;
        if c.claims.priorities {
            self.shared
                .queue
                .index_priorities(&self.shared.pool)
                .await?;
        }
        if !c.wakeups.listen {
            return Ok(());
        }
        notify::ensure_notify(
            &mut *self.shared.pool.acquire().await?,
            self.shared.queue.name(),
            &c.wakeups.channels,
            c.wakeups.mode,
        )
        .await
    }

    /// Creates the queue partitioned (see [`PgmqQueue::create_partitioned`]; needs pg_partman),
    /// its dead-letter queue (not partitioned), and its notification trigger when listening.
    /// The backend works on a partitioned queue as on any other.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] without pg_partman; [`Error::Database`] if a statement fails.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqStorage, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// # let runtime = apalis_pgmq_notify::Runtime::new(&pool);
    /// let storage = PgmqStorage::<String>::new(&runtime, QueueName::new("events")?);
    /// storage.create_partitioned_queue("1 day", "7 days").await?;
    /// # Ok(()) }
    /// ```
    pub async fn create_partitioned_queue(
        &self,
        partition_interval: &str,
        retention_interval: &str,
    ) -> Result<()> {
        self.shared
            .queue
            .create_partitioned(&self.shared.pool, partition_interval, retention_interval)
            .await?;
        self.create_queue().await
    }

    /// Drops the queue **and its dead-letter queue** (`<queue>_dlq`), with their archives, in
    /// one transaction. Returns whether the queue existed. (PGMQ's own `pgmq.drop_queue` drops
    /// only the queue it is given and leaves `<queue>_dlq` behind.)
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if a statement fails; nothing is dropped then.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqStorage, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// # let runtime = apalis_pgmq_notify::Runtime::new(&pool);
    /// let storage = PgmqStorage::<String>::new(&runtime, QueueName::new("old")?);
    /// storage.drop_queue().await?;
    /// # Ok(()) }
    /// ```
    pub async fn drop_queue(&self) -> Result<bool> {
        drop_queue_and_dead_letters(&self.shared.pool, self.shared.queue.name()).await
    }

    fn local(&mut self) -> &mut Local {
        self.local.get_mut().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Drops `queue` and `<queue>_dlq` in one transaction; whether `queue` existed.
///
/// # Errors
///
/// [`Error::Database`] if a statement fails; nothing is dropped then.
///
/// # Example
///
/// ```no_run
/// # use apalis_pgmq_notify::{QueueName, drop_queue_and_dead_letters};
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// drop_queue_and_dead_letters(&pool, &QueueName::new("old")?).await?;
/// # Ok(()) }
/// ```
pub async fn drop_queue_and_dead_letters(pool: &PgPool, queue: &QueueName) -> Result<bool> {
    let q = PgmqQueue::new(queue.clone());
    let mut tx = pool.begin().await?;
    let existed = q.drop_queue(&mut *tx).await?;
    q.dead_letter().drop_queue(&mut *tx).await?;
    sqlx::query(crate::sql::DROP_KEYS)
        .bind(queue.as_str())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(existed)
}

impl<Args, C> PgmqStorage<Args, C>
where
    C: Codec<Args, Compact = Value>,
    C::Error: std::fmt::Display,
{
    /// Turns a claimed message into a task, or dead-letters it if it does not decode.
    ///
    /// Messages that carry apalis-workflow step metadata are not checked here: a workflow's
    /// later steps hold the previous step's output, not `Args`, and the workflow decodes them
    /// itself (a step that does not decode then fails like any handler error).
    fn message_to_task(&self, mut m: Message, worker: &WorkerContext) -> Option<Task<Value>> {
        if let Some(error) = &m.decode_error {
            tracing::warn!(queue = %self.shared.queue.name(), msg_id = m.msg_id, %error,
                "message cannot be read; moving it to the dead-letter queue");
            self.dead_letter_undecodable(&m, error);
            return None;
        }
        let body = m.message.take().unwrap_or(Value::Null);
        let meta = JobMeta::from_headers(m.headers.as_ref());
        let workflow_step = meta
            .metadata
            .keys()
            .any(|k| k.starts_with(WORKFLOW_METADATA_PREFIX));
        if !workflow_step && let Err(e) = self.codec.decode(&body) {
            tracing::warn!(queue = %self.shared.queue.name(), msg_id = m.msg_id, error = %e,
                "message does not decode as {}; moving it to the dead-letter queue",
                std::any::type_name::<Args>());
            self.dead_letter_undecodable(&m, &e.to_string());
            return None;
        }
        // Attempt never goes backwards: continue from the runs the last failed delivery reached
        // (in-process retries included), or from PGMQ's read count.
        let attempt_before = usize::try_from(m.read_ct.saturating_sub(1).max(0))
            .unwrap_or(0)
            .max(meta.attempts.unwrap_or(0));
        let task_id = meta
            .task_id
            .unwrap_or_else(|| crate::queue::task_id(m.msg_id));
        let mut builder = TaskBuilder::new(body)
            .task_id(task_id)
            .attempt(attempt_before)
            .max_attempts(
                meta.max_attempts
                    .unwrap_or(self.shared.config.retries.max_attempts as usize),
            )
            .with_metadata(meta.metadata)
            .queue(self.shared.queue.name().as_str().into())
            .lock_at(
                m.last_read_at
                    .and_then(|t| u64::try_from(t.timestamp()).ok()),
            )
            .lock_by(Some(worker.name().to_owned()))
            .data(MessageInfo {
                queue: self.shared.queue.name().clone(),
                msg_id: m.msg_id,
                read_ct: m.read_ct,
                enqueued_at: m.enqueued_at,
                vt: m.vt,
                visible_since: m.visible_since.unwrap_or(m.enqueued_at),
                headers: m.headers,
            });
        if let Some(p) = meta.priority {
            builder = builder.priority(p);
        }
        if let Some(k) = meta.idempotency_key {
            builder = builder.idempotency_key(k);
        }
        Some(builder.build())
    }
}

impl<Args, C> PgmqStorage<Args, C> {
    /// Sends a message that cannot become a task to the dead-letter queue, with the reason.
    fn dead_letter_undecodable(&self, m: &Message, error: &str) {
        let awaited = wants_result(m.headers.as_ref());
        let result = (self.shared.config.results.store || awaited).then(|| {
            let job_id = JobMeta::from_headers(m.headers.as_ref())
                .task_id
                .map_or_else(|| m.msg_id.to_string(), |t| t.to_string());
            StoredResult {
                job_id,
                status: "Failed",
                value: None,
                error: Some(crate::util::clean_text(
                    &format!("the job cannot be read: {error}"),
                    crate::ack::MAX_ERROR_TEXT,
                )),
                awaited,
            }
        });
        self.shared.complete(Outcome {
            delivery: Delivery::of(m),
            attempts: m.read_ct,
            error: None,
            result,
            action: Action::DeadLetter {
                info: json!({
                    "reason": "undecodable",
                    "error": crate::util::clean_text(error, crate::ack::MAX_ERROR_TEXT),
                    "expected_type": std::any::type_name::<Args>(),
                }),
            },
        });
    }
}

impl<Args, C> Backend for PgmqStorage<Args, C>
where
    C: Codec<Args, Compact = Value>,
    C::Error: std::fmt::Display,
{
    type Task = Task<Value>;
    type Error = Error;

    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        let shared = self.shared.clone();
        self.local().fetch.poll_ready(cx, &shared, worker)
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        let shared = self.shared.clone();
        loop {
            let polled = self.local().fetch.poll_next(cx, &shared, worker);
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(m))) => {
                    if let Some(task) = self.message_to_task(m, worker) {
                        return Poll::Ready(Some(Ok(task)));
                    }
                }
            }
        }
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        let shared = self.shared.clone();
        self.local().fetch.poll_close(cx, &shared).map(Ok)
    }
}

impl<Args, C> BackendConfig for PgmqStorage<Args, C> {
    type Args = Args;
    /// The type apalis generates task ids with (`GenerateId`: apalis-workflow names the
    /// tasks it fans out before they are pushed), not the message id: message ids are `i64`
    /// throughout this crate (see [`task_id`](crate::task_id)). `GenerateId` cannot be
    /// implemented for `i64`, and a generated id must exist before its message does.
    type Id = u64;
    type Kind = Durable;
    type Config = Config;
    type Layer = AckLayer;

    fn config(&self) -> &Self::Config {
        &self.shared.config
    }

    fn middleware(&mut self, _worker: &mut WorkerContext) -> Self::Layer {
        AckLayer::new(self.shared.ack.clone())
    }
}

impl<Args, C: Send + 'static> WireFormatBackend for PgmqStorage<Args, C> {
    type Codec = C;
    type Compact = Value;

    fn codec(&self) -> &Self::Codec {
        &self.codec
    }
}
