//! Operating queues: pausing, the state of every queue at a glance, pruning. The CLI is a thin
//! layer over these; applications can call them too.

use std::time::Duration;

use sqlx::PgPool;

use crate::{
    error::Result,
    notify::{NotifyChannels, notify_mode},
    queue::{PgmqQueue, QueueName, list_queues},
};

/// Pauses `queue`: its workers claim nothing until [`resume`]; jobs can still be pushed.
/// Survives restarts (a row in `apalis_pgmq.paused`), takes effect at the workers' next claim.
/// Returns `false` if it was paused already.
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) if the statement fails.
///
/// # Example
///
/// ```no_run
/// # use apalis_pgmq_notify::{QueueName, pause, resume, NotifyChannels};
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// let q = QueueName::new("email")?;
/// pause(&pool, &q).await?;
/// // ... deploy a fix ...
/// resume(&pool, &q, &NotifyChannels::default()).await?;
/// # Ok(()) }
/// ```
pub async fn pause(pool: &PgPool, queue: &QueueName) -> Result<bool> {
    let changed: bool = sqlx::query_scalar(crate::sql::PAUSE)
        .bind(queue.as_str())
        .fetch_one(pool)
        .await?;
    Ok(changed)
}

/// Resumes a paused queue and wakes its idle workers (a notification on its channels, named by
/// `channels` as the workers' configuration names them). Returns `false` if it was not paused.
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) if the statement fails.
///
/// # Example
///
/// See [`pause`].
pub async fn resume(pool: &PgPool, queue: &QueueName, channels: &NotifyChannels) -> Result<bool> {
    let changed: bool = sqlx::query_scalar(crate::sql::RESUME)
        .bind(queue.as_str())
        .bind(channels.queue_channel(queue))
        .bind(channels.namespace_channel(&channels.namespace(queue)))
        .fetch_one(pool)
        .await?;
    Ok(changed)
}

/// The paused queues.
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) if the statement fails.
pub async fn paused_queues(pool: &PgPool) -> Result<Vec<String>> {
    let names: Vec<String> = sqlx::query_scalar(crate::sql::PAUSED_QUEUES)
        .fetch_all(pool)
        .await?;
    Ok(names)
}

/// One queue at a glance.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct QueueOverview {
    /// The queue.
    pub queue: String,
    /// Messages in the queue table, whatever their state.
    pub depth: i64,
    /// Visible now.
    pub visible: i64,
    /// Delayed, never read.
    pub scheduled: i64,
    /// Leased by workers, or waiting for a retry's backoff.
    pub in_flight: i64,
    /// Age of the oldest visible job, in seconds.
    pub oldest_pending_secs: Option<f64>,
    /// Archived (done) jobs (an estimate above 100 000).
    pub archived: i64,
    /// Dead letters (killed included).
    pub dead_letters: i64,
    /// The notification trigger's mode (`on_demand`, `batch`, `message`), or none.
    pub notify: Option<String>,
    /// Whether the queue is paused.
    pub paused: bool,
}

/// Every queue (dead-letter queues with their queue) at a glance.
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) if a statement fails.
///
/// # Example
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// for q in apalis_pgmq_notify::queues_overview(&pool).await? {
///     println!("{}: {} visible, {} dead", q.queue, q.visible, q.dead_letters);
/// }
/// # Ok(()) }
/// ```
pub async fn queues_overview(pool: &PgPool) -> Result<Vec<QueueOverview>> {
    let all = list_queues(pool).await?;
    let names: std::collections::HashSet<&str> =
        all.iter().map(|q| q.queue_name.as_str()).collect();
    let paused = paused_queues(pool).await?;
    let mut out = Vec::new();
    for info in &all {
        let is_dlq = info
            .queue_name
            .strip_suffix(crate::queue::DEAD_LETTER_SUFFIX)
            .is_some_and(|base| names.contains(base));
        let Ok(name) = QueueName::new(&info.queue_name) else {
            continue;
        };
        if is_dlq {
            continue;
        }
        let q = PgmqQueue::new(name.clone());
        let counts = q.counts(pool).await.unwrap_or_default();
        let notify = notify_mode(pool, &name).await?.map(|(mode, _)| {
            match mode {
                crate::NotifyMode::Batch => "batch",
                crate::NotifyMode::Message { .. } => "message",
                _ => "on_demand",
            }
            .to_owned()
        });
        out.push(QueueOverview {
            queue: name.as_str().to_owned(),
            depth: counts.pending + counts.scheduled + counts.running + counts.retrying,
            visible: counts.pending,
            scheduled: counts.scheduled,
            in_flight: counts.running + counts.retrying,
            oldest_pending_secs: counts.oldest_pending_secs,
            archived: counts.done,
            dead_letters: counts.dead + counts.killed,
            notify,
            paused: paused.iter().any(|p| p == name.as_str()),
        });
    }
    Ok(out)
}

/// What [`prune`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Pruned {
    /// Archived jobs deleted.
    pub archived: usize,
    /// Dead letters deleted.
    pub dead_letters: usize,
    /// Archive partitions dropped (partitioned queues: their archive is pruned by pg_partman's
    /// maintenance with the retention given at creation, not row by row).
    pub archive_partitions: usize,
}

/// Deletes `queue`'s archived jobs older than `archive_retention` and dead letters older than
/// `dead_letter_retention` (`None`: keep), in batches of 10 000, each its own short statement.
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) if a statement fails (what was deleted before
/// stays deleted).
///
/// # Example
///
/// ```no_run
/// # use std::time::Duration;
/// # use apalis_pgmq_notify::{QueueName, prune};
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// let day = Duration::from_secs(86_400);
/// let n = prune(&pool, &QueueName::new("email")?, Some(7 * day), Some(30 * day)).await?;
/// println!("{} archived and {} dead jobs deleted", n.archived, n.dead_letters);
/// # Ok(()) }
/// ```
pub async fn prune(
    pool: &PgPool,
    queue: &QueueName,
    archive_retention: Option<Duration>,
    dead_letter_retention: Option<Duration>,
) -> Result<Pruned> {
    let q = PgmqQueue::new(queue.clone());
    let mut pruned = Pruned::default();
    if q.is_partitioned(pool).await? {
        pruned.archive_partitions = q.maintain_partitions(&mut *pool.acquire().await?).await?;
    } else if let Some(keep) = archive_retention {
        pruned.archived = q.prune_archive(pool, Some(keep)).await?;
    }
    if let Some(keep) = dead_letter_retention {
        pruned.dead_letters = q.purge_dead_letters(pool, Some(keep)).await?;
    }
    Ok(pruned)
}

/// Deletes `queue`'s stored job results (see [`Config::store_results`](crate::Config::store_results))
/// that finished more than `older_than` ago, in batches of 10 000, each its own short statement;
/// returns how many. Workers do this on their own after heartbeats, with
/// [`Config::result_retention`](crate::Config::result_retention).
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) if a statement fails (what was deleted before
/// stays deleted).
///
/// # Example
///
/// ```no_run
/// # use std::time::Duration;
/// # use apalis_pgmq_notify::{QueueName, prune_results};
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// let n = prune_results(&pool, &QueueName::new("email")?, Duration::from_secs(3600)).await?;
/// println!("{n} results deleted");
/// # Ok(()) }
/// ```
pub async fn prune_results(pool: &PgPool, queue: &QueueName, older_than: Duration) -> Result<u64> {
    prune_results_batches(
        &mut *pool.acquire().await?,
        queue,
        older_than,
        false,
        usize::MAX,
    )
    .await
}

/// Up to `batches` batches of [`prune_results`]; with `elected`, only while this session holds
/// the queue's result-pruning lock (one process at a time).
pub(crate) async fn prune_results_batches(
    conn: &mut sqlx::PgConnection,
    queue: &QueueName,
    older_than: Duration,
    elected: bool,
    batches: usize,
) -> Result<u64> {
    let mut total = 0u64;
    for _ in 0..batches {
        let n: i64 = sqlx::query_scalar(crate::sql::PRUNE_RESULTS)
            .bind(queue.as_str())
            .bind(older_than.as_secs_f64().min(1e11))
            .bind(crate::queue::PRUNE_BATCH)
            .bind(elected)
            .fetch_one(&mut *conn)
            .await?;
        total += u64::try_from(n).unwrap_or(0);
        if n < crate::queue::PRUNE_BATCH {
            break;
        }
    }
    Ok(total)
}
