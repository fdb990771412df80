//! apalis' introspection traits (`backend::expose` and friends), so `Expose` and apalis-board's
//! `ApiBuilder::register` work with [`PgmqStorage`].
//!
//! How PGMQ's tables map to apalis' [`Status`] (see [`JobState`] for where each lives):
//!
//! | our state | apalis `Status` | the task's `state` metadata |
//! |---|---|---|
//! | pending | `Pending` | `pending` |
//! | scheduled | `Queued` | `scheduled` |
//! | running | `Running` | `running` |
//! | retrying | `Failed` | `retrying` (+ `last_error`, `failed_at`) |
//! | done | `Done` | `done` |
//! | killed (dead-lettered) | `Killed` | `killed` (+ `dead_reason`, `dead_error`, `dead_at`) |
//! | dead | `Failed` | `dead` (+ `dead_reason`, `dead_error`, `dead_at`) |
//!
//! A filter on `Failed` lists retrying jobs, then dead ones. `Metrics::global` and the queues'
//! statistics use the titles apalis-board knows (`TOTAL_JOBS`, `PENDING_JOBS` (scheduled
//! included), `RUNNING_JOBS`, `DONE_JOBS`, `FAILED_JOBS` (retrying and dead), `KILLED_JOBS`);
//! `Metrics::fetch_by_queue` adds `SCHEDULED_JOBS`, `RETRYING_JOBS`, `DEAD_JOBS`,
//! `OLDEST_PENDING_AGE_SECS`, `DONE_LAST_5_MIN`, `DONE_LAST_HOUR` and
//! `THROUGHPUT_PER_SEC_5_MIN`. Pages are read with bounded index
//! scans (see `src/queue/inspect.rs`).

use std::time::Duration;

use apalis_codec::json::JsonCodec;
use apalis_core::{
    backend::{
        Backend, FetchById, Filter, ListAllTasks, ListQueues, ListTasks, ListWorkers, Metrics,
        QueueInfo, Reschedule, RunningWorker, StatType, Statistic, Update, Vacuum,
    },
    task::{Task, builder::TaskBuilder, metadata::MetadataStore, status::Status, task_id::TaskId},
};
use serde_json::Value;
use sqlx::PgPool;

use super::{JobMeta, PgmqStorage};
use crate::{
    error::{Error, Result},
    queue::{Delay, JobRecord, JobState, PgmqQueue, QueueCounts, QueueName, list_queues},
};

/// The states an apalis status filter selects, in listing order.
fn states_of(status: Option<&Status>) -> Vec<Option<JobState>> {
    match status {
        None => vec![None],
        Some(Status::Pending) => vec![Some(JobState::Pending)],
        Some(Status::Queued) => vec![Some(JobState::Scheduled)],
        Some(Status::Running) => vec![Some(JobState::Running)],
        Some(Status::Failed) => vec![Some(JobState::Retrying), Some(JobState::Dead)],
        Some(Status::Done) => vec![Some(JobState::Done)],
        Some(Status::Killed) => vec![Some(JobState::Killed)],
        // A status added to apalis later: nothing of ours maps to it.
        Some(_) => vec![],
    }
}

fn status_of(state: JobState) -> Status {
    match state {
        JobState::Pending => Status::Pending,
        JobState::Scheduled => Status::Queued,
        JobState::Running => Status::Running,
        JobState::Done => Status::Done,
        JobState::Killed => Status::Killed,
        JobState::Retrying | JobState::Dead => Status::Failed,
    }
}

fn secs(t: chrono::DateTime<chrono::Utc>) -> Option<u64> {
    u64::try_from(t.timestamp()).ok()
}

/// A job record as an apalis task (arguments as stored JSON).
fn to_task(rec: JobRecord, queue: &QueueName, default_max_attempts: usize) -> Task<Value> {
    let meta = JobMeta::from_headers(rec.message.headers.as_ref());
    let mut md: MetadataStore = meta.metadata.clone();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            let _ = md.insert(k, v);
        }
    };
    put("state", Some(rec.state.as_str().to_owned()));
    put("last_error", rec.apalis_header("last_error"));
    put("failed_at", rec.apalis_header("failed_at"));
    put("dead_reason", rec.dead_letter("reason"));
    put("dead_error", rec.dead_letter("error"));
    put("dead_at", rec.dead_letter("at"));
    put("decode_error", rec.message.decode_error.clone());
    let attempt = usize::try_from(rec.attempts()).unwrap_or(usize::MAX);
    let body = rec.message.message.clone().unwrap_or(Value::Null);
    let mut b = TaskBuilder::new(body)
        .task_id(crate::queue::task_id(rec.id))
        .attempt(attempt)
        .status(status_of(rec.state))
        .max_attempts(meta.max_attempts.unwrap_or(default_max_attempts))
        .queue(queue.as_str().into())
        .lock_at(rec.message.last_read_at.and_then(secs))
        .done_at(rec.archived_at.and_then(secs))
        .with_metadata(md);
    if let Some(at) = secs(rec.message.vt) {
        b = b.run_at_timestamp(at);
    }
    if let Some(p) = meta.priority {
        b = b.priority(p);
    }
    if let Some(k) = meta.idempotency_key {
        b = b.idempotency_key(k);
    }
    b.build()
}

/// One page of `queue`'s tasks for an apalis filter.
async fn page(
    pool: &PgPool,
    queue: &PgmqQueue,
    filter: &Filter,
    default_max_attempts: usize,
) -> Result<Vec<Task<Value>>> {
    let (offset, limit) = (filter.offset(), filter.limit());
    let mut records = Vec::new();
    for state in states_of(filter.status.as_ref()) {
        records.extend(queue.jobs(pool, state, 0, offset + limit).await?);
    }
    Ok(records
        .into_iter()
        .skip(offset as usize)
        .take(limit as usize)
        .map(|r| to_task(r, queue.name(), default_max_attempts))
        .collect())
}

/// The application queues (dead-letter queues are shown with their queue, not on their own).
async fn app_queues(pool: &PgPool) -> Result<Vec<QueueName>> {
    let all = list_queues(pool).await?;
    let names: std::collections::HashSet<&str> =
        all.iter().map(|q| q.queue_name.as_str()).collect();
    Ok(all
        .iter()
        .filter(|q| {
            q.queue_name
                .strip_suffix(crate::queue::DEAD_LETTER_SUFFIX)
                .is_none_or(|base| !names.contains(base))
        })
        .filter_map(|q| QueueName::new(&q.queue_name).ok())
        .collect())
}

fn stat(title: &str, stat_type: StatType, value: String, priority: u64) -> Statistic {
    Statistic {
        title: title.to_owned(),
        stat_type,
        value,
        priority: Some(priority),
    }
}

/// The counts under the titles apalis-board 1.0 knows (it labels others "Total Jobs" and
/// decides from `FAILED_JOBS` and `KILLED_JOBS` whether to load those tabs).
fn board_stats(c: &QueueCounts) -> Vec<Statistic> {
    let n = |v: i64| v.to_string();
    let total = c.pending + c.scheduled + c.running + c.retrying + c.done + c.dead + c.killed;
    vec![
        stat("TOTAL_JOBS", StatType::Number, n(total), 1),
        stat(
            "PENDING_JOBS",
            StatType::Number,
            n(c.pending + c.scheduled),
            1,
        ),
        stat("RUNNING_JOBS", StatType::Number, n(c.running), 1),
        stat("DONE_JOBS", StatType::Number, n(c.done), 1),
        stat("FAILED_JOBS", StatType::Number, n(c.retrying + c.dead), 1),
        stat("KILLED_JOBS", StatType::Number, n(c.killed), 1),
    ]
}

/// All counts: the board's, then this crate's finer ones.
fn stats_of(c: &QueueCounts) -> Vec<Statistic> {
    let n = |v: i64| v.to_string();
    let mut stats = board_stats(c);
    stats.extend([
        stat("SCHEDULED_JOBS", StatType::Number, n(c.scheduled), 2),
        stat("RETRYING_JOBS", StatType::Number, n(c.retrying), 2),
        stat("DEAD_JOBS", StatType::Number, n(c.dead), 2),
        stat(
            "OLDEST_PENDING_AGE_SECS",
            StatType::Decimal,
            format!("{:.1}", c.oldest_pending_secs.unwrap_or(0.0)),
            2,
        ),
        stat("DONE_LAST_5_MIN", StatType::Number, n(c.done_last_5_min), 3),
        stat("DONE_LAST_HOUR", StatType::Number, n(c.done_last_hour), 3),
        stat(
            "THROUGHPUT_PER_SEC_5_MIN",
            StatType::Decimal,
            format!("{:.2}", c.done_last_5_min as f64 / 300.0),
            3,
        ),
    ]);
    stats
}

fn sum(all: &[QueueCounts]) -> QueueCounts {
    let mut t = QueueCounts::default();
    for c in all {
        t.pending += c.pending;
        t.scheduled += c.scheduled;
        t.running += c.running;
        t.retrying += c.retrying;
        t.done += c.done;
        t.dead += c.dead;
        t.killed += c.killed;
        t.done_last_5_min += c.done_last_5_min;
        t.done_last_hour += c.done_last_hour;
        t.oldest_pending_secs = match (t.oldest_pending_secs, c.oldest_pending_secs) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    t
}

/// The running workers of `queue` (all queues: `None`), from the worker registry: those whose
/// process sent a heartbeat within three intervals. What `ListWorkers` and the CLI's `workers`
/// show.
///
/// # Errors
///
/// [`Error::Database`] if the statement fails; [`Error::ReadOnly`] on a hot standby, where
/// the registry (an unlogged table) is not replicated.
///
/// # Example
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// for w in apalis_pgmq_notify::running_workers(&pool, None).await? {
///     println!("{} on {}: {}", w.id, w.queue, w.backend);
/// }
/// # Ok(()) }
/// ```
pub async fn running_workers(
    pool: &PgPool,
    queue: Option<&QueueName>,
) -> Result<Vec<RunningWorker>> {
    workers(pool, queue.map(QueueName::as_str)).await
}

/// The workers for the board: none on a hot standby, where the registry is not replicated
/// (the board's other pages work there).
async fn known_workers(pool: &PgPool, queue: Option<&str>) -> Result<Vec<RunningWorker>> {
    match workers(pool, queue).await {
        Err(Error::ReadOnly { .. }) => Ok(Vec::new()),
        other => other,
    }
}

async fn workers(pool: &PgPool, queue: Option<&str>) -> Result<Vec<RunningWorker>> {
    type Row = (
        String,
        String,
        String,
        i64,
        i64,
        String,
        i32,
        Option<i32>,
        i32,
    );
    let rows: Vec<Row> = match sqlx::query_as(crate::sql::LIST_WORKERS)
        .bind(queue)
        .fetch_all(pool)
        .await
    {
        Ok(rows) => rows,
        Err(e) if crate::error::pg::is_unlogged_on_standby(&e) => {
            return Err(Error::ReadOnly {
                reason: "it is a hot standby, and the worker registry (an unlogged table) is not \
                         replicated: list the workers on the primary"
                    .to_owned(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    Ok(rows
        .into_iter()
        .map(
            |(name, queue, service, started, beat, host, pid, concurrency, in_flight)| {
                RunningWorker {
                    id: name,
                    queue,
                    backend: format!(
                        "apalis-pgmq-notify on {host} (pid {pid}), {in_flight} running{}",
                        concurrency.map(|c| format!(" of {c}")).unwrap_or_default()
                    ),
                    started_at: u64::try_from(started).unwrap_or(0),
                    last_heartbeat: u64::try_from(beat).unwrap_or(0),
                    layers: service,
                }
            },
        )
        .collect())
}

impl<Args, C> PgmqStorage<Args, C> {
    fn default_max_attempts(&self) -> usize {
        self.shared.config.retries.max_attempts as usize
    }

    /// The message id behind a task id.
    fn msg_id(task_id: &TaskId) -> Result<i64> {
        crate::queue::msg_id(task_id)
            .ok_or_else(|| Error::NotFound(format!("task id {task_id} is not a PGMQ message id")))
    }
}

impl<Args, C> ListQueues for PgmqStorage<Args, C>
where
    Self: Backend<Error = Error>,
{
    fn list_queues(&self) -> impl Future<Output = Result<Vec<QueueInfo>>> + Send {
        let pool = self.shared.pool.clone();
        async move {
            let mut out = Vec::new();
            let all_workers = known_workers(&pool, None).await?;
            for name in app_queues(&pool).await? {
                let q = PgmqQueue::new(name.clone());
                // A queue that cannot be counted is an error, never a row of zeros.
                let counts = q.counts(&pool).await?;
                let activity = q
                    .daily_done(&pool)
                    .await?
                    .into_iter()
                    .map(|n| usize::try_from(n).unwrap_or(0))
                    .collect();
                let workers = all_workers
                    .iter()
                    .filter(|w| w.queue == name.as_str())
                    .map(|w| w.id.clone())
                    .collect();
                out.push(QueueInfo {
                    name: name.as_str().to_owned(),
                    stats: board_stats(&counts),
                    workers,
                    activity,
                });
            }
            Ok(out)
        }
    }
}

impl<Args, C> ListWorkers for PgmqStorage<Args, C>
where
    Self: Backend<Error = Error>,
{
    fn list_workers(&self) -> impl Future<Output = Result<Vec<RunningWorker>>> + Send {
        let pool = self.shared.pool.clone();
        let queue = self.shared.queue.name().as_str().to_owned();
        async move { known_workers(&pool, Some(&queue)).await }
    }

    fn list_all_workers(&self) -> impl Future<Output = Result<Vec<RunningWorker>>> + Send {
        let pool = self.shared.pool.clone();
        async move { known_workers(&pool, None).await }
    }
}

impl<Args, C> ListTasks for PgmqStorage<Args, C>
where
    Self: Backend<Error = Error> + apalis_core::backend::WireFormatBackend<Compact = Value>,
{
    fn list_tasks(&self, filter: &Filter) -> impl Future<Output = Result<Vec<Task<Value>>>> + Send {
        let pool = self.shared.pool.clone();
        let queue = self.shared.queue.clone();
        let filter = filter.clone();
        let max = self.default_max_attempts();
        async move { page(&pool, &queue, &filter, max).await }
    }
}

impl<Args, C> ListAllTasks for PgmqStorage<Args, C>
where
    Self: Backend<Error = Error> + apalis_core::backend::WireFormatBackend<Compact = Value>,
{
    fn list_all_tasks(
        &self,
        filter: &Filter,
    ) -> impl Future<Output = Result<Vec<Task<Value>>>> + Send {
        let pool = self.shared.pool.clone();
        let filter = filter.clone();
        let max = self.default_max_attempts();
        async move {
            let (offset, limit) = (filter.offset(), filter.limit());
            // Every queue's first `offset + limit`, then the page of their concatenation.
            let wide = Filter {
                status: filter.status.clone(),
                page: 1,
                page_size: Some(offset + limit),
            };
            let mut all = Vec::new();
            for name in app_queues(&pool).await? {
                all.extend(page(&pool, &PgmqQueue::new(name), &wide, max).await?);
            }
            Ok(all
                .into_iter()
                .skip(offset as usize)
                .take(limit as usize)
                .collect())
        }
    }
}

impl<Args, C> Metrics for PgmqStorage<Args, C>
where
    Self: Backend<Error = Error>,
{
    fn global(&self) -> impl Future<Output = Result<Vec<Statistic>>> + Send {
        let pool = self.shared.pool.clone();
        async move {
            let mut all = Vec::new();
            for name in app_queues(&pool).await? {
                all.push(PgmqQueue::new(name).counts(&pool).await?);
            }
            // The board shows every overall statistic as a card and knows only its own titles;
            // the finer counts are per queue (`fetch_by_queue`, `PgmqQueue::counts`).
            Ok(board_stats(&sum(&all)))
        }
    }

    fn fetch_by_queue(&self) -> impl Future<Output = Result<Vec<Statistic>>> + Send {
        let pool = self.shared.pool.clone();
        let queue = self.shared.queue.clone();
        async move { Ok(stats_of(&queue.counts(&pool).await?)) }
    }
}

impl<Args, C> FetchById for PgmqStorage<Args, C>
where
    Self: Backend<Error = Error, Task = Task<Value>>,
{
    fn fetch_by_id(
        &mut self,
        task_id: &TaskId,
    ) -> impl Future<Output = Result<Option<Task<Value>>>> + Send {
        let pool = self.shared.pool.clone();
        let queue = self.shared.queue.clone();
        let max = self.default_max_attempts();
        let id = Self::msg_id(task_id);
        async move {
            let Ok(id) = id else { return Ok(None) };
            Ok(queue
                .job(&pool, id)
                .await?
                .map(|r| to_task(r, queue.name(), max)))
        }
    }
}

impl<Args, C> Reschedule for PgmqStorage<Args, C>
where
    Self: Backend<Error = Error, Task = Task<Value>>,
{
    /// Makes a job in the queue table visible after `wait` (from the server's clock). A done
    /// or dead job cannot be rescheduled: replay it from the dead-letter queue instead.
    fn reschedule(
        &mut self,
        task: Task<Value>,
        wait: Duration,
    ) -> impl Future<Output = Result<()>> + Send {
        let pool = self.shared.pool.clone();
        let queue = self.shared.queue.clone();
        let id = task.task_id().map(Self::msg_id);
        async move {
            let id = id.ok_or_else(|| Error::NotFound("the task has no id".to_owned()))??;
            match queue.set_vt(&pool, id, Delay::After(wait)).await? {
                Some(_) => Ok(()),
                None => Err(Error::NotFound(format!(
                    "job {id} is not in queue {} (it may be done or dead)",
                    queue.name()
                ))),
            }
        }
    }
}

impl<Args, C> Update for PgmqStorage<Args, C>
where
    Self: Backend<Error = Error, Task = Task<Value>>,
{
    /// Replaces the arguments of a job that is waiting (pending or scheduled, not leased).
    fn update(&mut self, task: Task<Value>) -> impl Future<Output = Result<()>> + Send {
        let pool = self.shared.pool.clone();
        let queue = self.shared.queue.clone();
        let id = task.task_id().map(Self::msg_id);
        let body = task.args;
        async move {
            let id = id.ok_or_else(|| Error::NotFound("the task has no id".to_owned()))??;
            if queue.update_waiting(&pool, id, &body).await? {
                Ok(())
            } else {
                Err(Error::NotFound(format!(
                    "job {id} of queue {} is not waiting (running, done, dead or gone)",
                    queue.name()
                )))
            }
        }
    }
}

impl<Args, C> Vacuum for PgmqStorage<Args, C>
where
    Self: Backend<Error = Error>,
{
    /// Deletes every done (archived) job, in batches.
    fn vacuum(&mut self) -> impl Future<Output = Result<usize>> + Send {
        let pool = self.shared.pool.clone();
        let queue = self.shared.queue.clone();
        async move { queue.prune_archive(&pool, None).await }
    }

    /// Deletes done jobs archived more than `duration` ago, in batches.
    fn vacuum_before(&mut self, duration: Duration) -> impl Future<Output = Result<usize>> + Send {
        let pool = self.shared.pool.clone();
        let queue = self.shared.queue.clone();
        async move { queue.prune_archive(&pool, Some(duration)).await }
    }
}

/// Keeps the type checker honest: the default storage exposes everything apalis-board needs.
#[allow(dead_code)]
fn _exposes_everything()
where
    PgmqStorage<Value, JsonCodec<Value>>: apalis_core::backend::Expose<Value, apalis_core::backend::finalize::Durable>
        + FetchById
        + Reschedule
        + Update
        + Vacuum,
{
}
