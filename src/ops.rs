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
/// [`Error::QueueMissing`](crate::error::Error::QueueMissing) if PGMQ has no such queue (nothing is
/// written), [`Error::Database`](crate::Error::Database) if the statement fails.
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
    let changed: Option<bool> = sqlx::query_scalar(crate::sql::PAUSE)
        .bind(queue.as_str())
        .fetch_one(pool)
        .await?;
    changed.ok_or_else(|| crate::error::Error::QueueMissing {
        queue: queue.as_str().to_owned(),
    })
}

/// Resumes a paused queue and wakes its idle workers (a notification on its channels, named by
/// `channels` as the workers' configuration names them). Returns `false` if it was not paused.
///
/// # Errors
///
/// [`Error::QueueMissing`](crate::error::Error::QueueMissing) if PGMQ has no such queue,
/// [`Error::Database`](crate::Error::Database) if the statement fails.
///
/// # Example
///
/// See [`pause`].
pub async fn resume(pool: &PgPool, queue: &QueueName, channels: &NotifyChannels) -> Result<bool> {
    let changed: Option<bool> = sqlx::query_scalar(crate::sql::RESUME)
        .bind(queue.as_str())
        .bind(channels.queue_channel(queue))
        .bind(channels.namespace_channel(&channels.namespace(queue)))
        .fetch_one(pool)
        .await?;
    changed.ok_or_else(|| crate::error::Error::QueueMissing {
        queue: queue.as_str().to_owned(),
    })
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
///
/// Counts are `None` when they could not be taken; [`error`](Self::error) then says why (a
/// queue whose name this crate does not serve, a missing privilege, ...). A count is never a
/// zero standing in for an error.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct QueueOverview {
    /// The queue, as PGMQ names it.
    pub queue: String,
    /// Messages in the queue table, whatever their state.
    pub depth: Option<i64>,
    /// Visible now (pending).
    pub visible: Option<i64>,
    /// Delayed, never read.
    pub scheduled: Option<i64>,
    /// Leased by a worker (running).
    pub running: Option<i64>,
    /// Failed and waiting out a retry's backoff (not running).
    pub retrying: Option<i64>,
    /// Age of the oldest visible job, in seconds.
    pub oldest_pending_secs: Option<f64>,
    /// Archived (done) jobs (an estimate above 100 000).
    pub archived: Option<i64>,
    /// Dead letters (killed included). A queue without a dead-letter queue has none.
    pub dead_letters: Option<i64>,
    /// The notification trigger's mode (`on_demand`, `batch`, `message`), or none.
    pub notify: Option<String>,
    /// Whether the queue is paused.
    pub paused: bool,
    /// Why the counts are missing, or why this crate cannot serve the queue (its workers would
    /// refuse the name); `None` when all is well.
    pub error: Option<String>,
}

/// Samples the `apalis_pgmq_queue_jobs` gauges (jobs by state, feature `metrics`) of every
/// queue once, from this process, and returns the counts it set. Reads only: a dashboard or
/// exporter process may run it on a read replica, where workers (whose heartbeat samples the
/// gauges otherwise) cannot run. Without the `metrics` feature it only counts.
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) if the queues cannot be listed.
///
/// # Example
///
/// ```no_run
/// # async fn run(replica: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// for (queue, counts) in apalis_pgmq_notify::sample_queue_gauges(&replica).await? {
///     println!("{queue}: {} pending", counts.pending);
/// }
/// # Ok(()) }
/// ```
pub async fn sample_queue_gauges(
    pool: &PgPool,
) -> Result<Vec<(QueueName, crate::queue::QueueCounts)>> {
    let all = list_queues(pool).await?;
    let names: std::collections::HashSet<&str> =
        all.iter().map(|q| q.queue_name.as_str()).collect();
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
        let counts = PgmqQueue::new(name.clone()).counts(pool).await?;
        crate::obs::queue_jobs(name.as_str(), &counts);
        out.push((name, counts));
    }
    Ok(out)
}

impl QueueOverview {
    fn failed(queue: &str, paused: bool, error: String) -> Self {
        Self {
            queue: queue.to_owned(),
            depth: None,
            visible: None,
            scheduled: None,
            running: None,
            retrying: None,
            oldest_pending_secs: None,
            archived: None,
            dead_letters: None,
            notify: None,
            paused,
            error: Some(error),
        }
    }
}

/// Every PGMQ queue (dead-letter queues with their queue) at a glance, whoever created it.
///
/// A queue made by another PGMQ client is counted like ours (no dead-letter queue yet: no dead
/// letters). A queue whose name this crate does not serve (upper case, `-`, longer than
/// [`MAX_QUEUE_NAME_LEN`](crate::MAX_QUEUE_NAME_LEN)) is listed with its depth and visible count
/// from `pgmq.metrics` and the reason in [`QueueOverview::error`]; so is a queue whose counts
/// failed (the error, not zeros).
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) if the queues cannot be listed.
///
/// # Example
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// for q in apalis_pgmq_notify::queues_overview(&pool).await? {
///     match &q.error {
///         None => println!("{}: {:?} visible, {:?} dead", q.queue, q.visible, q.dead_letters),
///         Some(e) => println!("{}: {e}", q.queue),
///     }
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
        if is_dlq {
            continue;
        }
        let is_paused = paused.iter().any(|p| p == &info.queue_name);
        let name = match QueueName::new(&info.queue_name) {
            Ok(name) => name,
            Err(why) => {
                out.push(unserved(pool, &info.queue_name, is_paused, &why.to_string()).await);
                continue;
            }
        };
        let q = PgmqQueue::new(name.clone());
        let counts = match q.counts(pool).await {
            Ok(c) => c,
            Err(e) => {
                out.push(QueueOverview::failed(
                    name.as_str(),
                    is_paused,
                    format!("could not count its jobs: {e}"),
                ));
                continue;
            }
        };
        let notify = notify_mode(pool, &name).await?.map(|(mode, _)| {
            match mode {
                crate::notify::NotifyMode::Batch => "batch",
                crate::notify::NotifyMode::Message { .. } => "message",
                _ => "on_demand",
            }
            .to_owned()
        });
        out.push(QueueOverview {
            queue: name.as_str().to_owned(),
            depth: Some(counts.pending + counts.scheduled + counts.running + counts.retrying),
            visible: Some(counts.pending),
            scheduled: Some(counts.scheduled),
            running: Some(counts.running),
            retrying: Some(counts.retrying),
            oldest_pending_secs: counts.oldest_pending_secs,
            archived: Some(counts.done),
            dead_letters: Some(counts.dead + counts.killed),
            notify,
            paused: is_paused,
            error: None,
        });
    }
    Ok(out)
}

/// A queue this crate cannot serve: PGMQ's own depth and visible count, and the reason.
async fn unserved(pool: &PgPool, queue: &str, paused: bool, why: &str) -> QueueOverview {
    let reason = format!("not served by apalis-pgmq-notify ({why})");
    let row: std::result::Result<(i64, i64), sqlx::Error> = sqlx::query(crate::sql::QUEUE_METRICS)
        .bind(queue)
        .fetch_one(pool)
        .await
        .and_then(|r| {
            use sqlx::Row;
            Ok((r.try_get(1)?, r.try_get(6)?))
        });
    match row {
        Ok((depth, visible)) => {
            let mut o = QueueOverview::failed(queue, paused, reason);
            o.depth = Some(depth);
            o.visible = Some(visible);
            o
        }
        Err(e) => QueueOverview::failed(queue, paused, format!("{reason}; pgmq.metrics: {e}")),
    }
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
/// `dead_letter_retention` (`None`: keep), in batches of 10 000, each its own short statement,
/// and the job keys whose hold ended (`apalis_pgmq.job_keys`).
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
    // Job keys whose hold ended (their job gone, its idempotency window over).
    prune_keys(pool, queue, usize::MAX).await?;
    Ok(pruned)
}

/// Up to `batches` batches of deleting `queue`'s job keys whose hold ended; returns how many.
pub(crate) async fn prune_keys(pool: &PgPool, queue: &QueueName, batches: usize) -> Result<u64> {
    let mut total = 0u64;
    for _ in 0..batches {
        let n: i64 = sqlx::query_scalar(crate::sql::PRUNE_KEYS)
            .bind(queue.as_str())
            .bind(crate::queue::PRUNE_BATCH)
            .fetch_one(pool)
            .await?;
        total += u64::try_from(n).unwrap_or(0);
        if n < crate::queue::PRUNE_BATCH {
            break;
        }
    }
    Ok(total)
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
