//! The worker registry: every running worker has a row in `apalis_pgmq.workers`.
//!
//! A worker's row is written when it starts and deleted when it stops cleanly. One heartbeat
//! task per process (per database) refreshes the rows of all its workers in one statement on an
//! interval (default 30 s, [`Config::heartbeat_interval`](crate::Config::heartbeat_interval)),
//! and issues nothing while the process runs no worker. A row whose process died is no longer
//! listed once it expires (three intervals) and is swept a minute later by any heartbeat.
//!
//! The same task applies retention: after its first heartbeat and then every 10 minutes it
//! prunes, for every queue its workers serve, archived jobs, dead letters and stored job results past their retention, in batches of 10 000,
//! each in a short transaction holding that queue's pruning lock (`pg_try_advisory_xact_lock`),
//! so one process at a time prunes a queue and the others skip it.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{Hub, lock};

/// The default heartbeat interval.
pub(crate) const DEFAULT_HEARTBEAT_MS: u64 = 30_000;

/// What a worker reports about itself between heartbeats.
#[derive(Debug, Default)]
pub(crate) struct WorkerStats {
    /// Jobs running now.
    pub(crate) in_flight: AtomicUsize,
    /// The concurrency limit learned when it first filled up; 0 while unknown.
    pub(crate) concurrency: AtomicUsize,
}

/// How long a queue keeps done jobs and dead letters (`None`: forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Retention {
    pub(crate) archive: Option<Duration>,
    pub(crate) dead_letters: Option<Duration>,
    /// Stored job results.
    pub(crate) results: Option<Duration>,
    /// A partitioned queue: pg_partman's maintenance runs on every heartbeat.
    pub(crate) partitioned: bool,
}

/// Most pruning batches per queue and table in one pruning round.
const PRUNE_BATCHES_PER_ROUND: usize = 10;

/// How often a process prunes (after a heartbeat, at most this often): rarely enough that an
/// idle process stays far below 0.1 statements/s for it.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Entry {
    name: String,
    queue: String,
    service: String,
    started: DateTime<Utc>,
    stats: Arc<WorkerStats>,
}

/// The workers of this process on one database.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    workers: Mutex<HashMap<String, Entry>>,
    /// The pool the heartbeat uses (the first registered worker's).
    pool: Mutex<Option<PgPool>>,
    /// Whether the heartbeat task runs.
    beating: std::sync::atomic::AtomicBool,
    /// The shortest interval any storage asked for, in milliseconds (`u64::MAX`: default).
    interval_ms: AtomicU64,
    next_id: AtomicU64,
    /// Retention of each queue this process's workers serve (the shortest asked for).
    retention: Mutex<HashMap<String, (crate::queue::PgmqQueue, Retention)>>,
    /// Held across a heartbeat and across an unregistration, so a heartbeat in flight cannot
    /// write back the row of a worker that just stopped.
    beat_lock: tokio::sync::Mutex<()>,
}

impl Registry {
    pub(crate) fn new() -> Self {
        Self {
            interval_ms: AtomicU64::new(u64::MAX),
            ..Self::default()
        }
    }

    pub(crate) fn heartbeat_at_least_every(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(100);
        self.interval_ms.fetch_min(ms, Ordering::Relaxed);
    }

    fn interval(&self) -> Duration {
        match self.interval_ms.load(Ordering::Relaxed) {
            u64::MAX => Duration::from_millis(DEFAULT_HEARTBEAT_MS),
            ms => Duration::from_millis(ms),
        }
    }
}

/// A registered worker; its row is deleted by [`Registration::unregister`] (clean stop) or,
/// failing that, when this is dropped.
#[derive(Debug)]
pub(crate) struct Registration {
    hub: Arc<Hub>,
    pool: PgPool,
    id: String,
    pub(crate) stats: Arc<WorkerStats>,
    done: bool,
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Writes the rows of `entries` (one statement) with a lifetime of three `interval`s.
async fn beat(
    pool: &PgPool,
    owner: &str,
    interval: Duration,
    entries: &[(String, &Entry)],
) -> crate::Result<()> {
    let ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
    let names: Vec<&str> = entries.iter().map(|(_, e)| e.name.as_str()).collect();
    let queues: Vec<&str> = entries.iter().map(|(_, e)| e.queue.as_str()).collect();
    let services: Vec<&str> = entries.iter().map(|(_, e)| e.service.as_str()).collect();
    let concurrency: Vec<Option<i32>> = entries
        .iter()
        .map(|(_, e)| {
            Some(e.stats.concurrency.load(Ordering::Relaxed))
                .filter(|c| *c > 0)
                .map(|c| i32::try_from(c).unwrap_or(i32::MAX))
        })
        .collect();
    let in_flight: Vec<i32> = entries
        .iter()
        .map(|(_, e)| i32::try_from(e.stats.in_flight.load(Ordering::Relaxed)).unwrap_or(i32::MAX))
        .collect();
    let started: Vec<DateTime<Utc>> = entries.iter().map(|(_, e)| e.started).collect();
    sqlx::query(crate::sql::HEARTBEAT)
        .bind(ids)
        .bind(names)
        .bind(queues)
        .bind(owner)
        .bind(host())
        .bind(i32::try_from(std::process::id()).unwrap_or(i32::MAX))
        .bind(services)
        .bind(concurrency)
        .bind(in_flight)
        .bind(started)
        .bind((interval * 3).as_secs_f64())
        .execute(pool)
        .await?;
    Ok(())
}

impl Hub {
    /// Registers a worker of `queue` named `name`: writes its row now, and starts this
    /// process's heartbeat if it is not running.
    pub(crate) async fn register_worker(
        self: &Arc<Self>,
        pool: &PgPool,
        name: &str,
        queue: &crate::queue::PgmqQueue,
        service: &str,
        retention: Retention,
    ) -> Registration {
        let r = &self.registry;
        {
            let mut all = lock(&r.retention);
            let e = all
                .entry(queue.name().as_str().to_owned())
                .or_insert_with(|| (queue.clone(), retention));
            let shorter = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            e.1.archive = shorter(e.1.archive, retention.archive);
            e.1.dead_letters = shorter(e.1.dead_letters, retention.dead_letters);
            e.1.results = shorter(e.1.results, retention.results);
            e.1.partitioned |= retention.partitioned;
        }
        let queue = queue.name().as_str();
        let id = format!(
            "{name}@{}#{}",
            self.owner,
            r.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let stats = Arc::new(WorkerStats::default());
        let entry = Entry {
            name: name.to_owned(),
            queue: queue.to_owned(),
            service: service.to_owned(),
            started: Utc::now(),
            stats: stats.clone(),
        };
        if let Err(e) = beat(pool, &self.owner, r.interval(), &[(id.clone(), &entry)]).await {
            tracing::warn!(worker = name, %queue, error = %e,
                "could not register the worker; it runs, but is not listed until the next heartbeat");
        }
        lock(&r.workers).insert(id.clone(), entry);
        lock(&r.pool).get_or_insert_with(|| pool.clone());
        if !r.beating.swap(true, Ordering::SeqCst) {
            tokio::spawn(heartbeat(Arc::downgrade(self)));
        }
        Registration {
            hub: self.clone(),
            pool: pool.clone(),
            id,
            stats,
            done: false,
        }
    }
}

impl Registration {
    /// Removes the worker's row (clean stop).
    pub(crate) async fn unregister(mut self) {
        self.done = true;
        let _beat = self.hub.registry.beat_lock.lock().await;
        lock(&self.hub.registry.workers).remove(&self.id);
        if let Err(e) = sqlx::query(crate::sql::UNREGISTER_WORKER)
            .bind(&self.id)
            .execute(&self.pool)
            .await
        {
            tracing::debug!(error = %e, "could not remove the worker's row; it expires by itself");
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        lock(&self.hub.registry.workers).remove(&self.id);
        if tokio::runtime::Handle::try_current().is_ok() {
            let (pool, id) = (self.pool.clone(), std::mem::take(&mut self.id));
            tokio::spawn(async move {
                let _ = sqlx::query(crate::sql::UNREGISTER_WORKER)
                    .bind(id)
                    .execute(&pool)
                    .await;
            });
        }
    }
}

/// One statement per interval for all of this process's workers; none while it has none.
async fn heartbeat(hub: Weak<Hub>) {
    // The first round comes after the first heartbeat: a process that starts prunes at once.
    let mut next_prune = tokio::time::Instant::now();
    loop {
        let interval = match hub.upgrade() {
            Some(h) => h.registry.interval(),
            None => return,
        };
        tokio::time::sleep(interval).await;
        let Some(h) = hub.upgrade() else { return };
        let _beat = h.registry.beat_lock.lock().await;
        let pool = lock(&h.registry.pool).clone();
        let result = {
            let workers = lock(&h.registry.workers);
            if workers.is_empty() {
                None
            } else {
                // Copy what the statement needs, so no lock is held across it.
                let owned: Vec<(String, Entry)> = workers
                    .iter()
                    .map(|(id, e)| {
                        (
                            id.clone(),
                            Entry {
                                name: e.name.clone(),
                                queue: e.queue.clone(),
                                service: e.service.clone(),
                                started: e.started,
                                stats: e.stats.clone(),
                            },
                        )
                    })
                    .collect();
                Some(owned)
            }
        };
        let (Some(entries), Some(pool)) = (result, pool) else {
            continue;
        };
        let refs: Vec<(String, &Entry)> = entries.iter().map(|(id, e)| (id.clone(), e)).collect();
        if let Err(e) = beat(&pool, &h.owner, interval, &refs).await {
            tracing::warn!(error = %e, workers = refs.len(), "worker heartbeat failed");
        }
        drop(_beat);
        let partitioned: Vec<_> = lock(&h.registry.retention)
            .values()
            .filter(|(_, r)| r.partitioned)
            .map(|(q, _)| q.clone())
            .collect();
        for queue in &partitioned {
            maintain_elected(&pool, queue).await;
        }
        if crate::obs::SAMPLES_GAUGES {
            let queues: Vec<_> = lock(&h.registry.retention).values().cloned().collect();
            for (queue, _) in &queues {
                sample_gauges(&pool, queue).await;
            }
        }
        if tokio::time::Instant::now() < next_prune {
            continue;
        }
        next_prune = tokio::time::Instant::now() + PRUNE_EVERY;
        let queues: Vec<_> = lock(&h.registry.retention).values().cloned().collect();
        drop(h);
        for (queue, retention) in queues {
            for (dead_letters, keep) in [(false, retention.archive), (true, retention.dead_letters)]
            {
                let Some(keep) = keep else { continue };
                prune_elected(&pool, &queue, dead_letters, keep).await;
            }
            if let Some(keep) = retention.results {
                match crate::ops::prune_results_batches(
                    &pool,
                    queue.name(),
                    keep,
                    true,
                    PRUNE_BATCHES_PER_ROUND,
                )
                .await
                {
                    Ok(n) if n > 0 => {
                        tracing::debug!(queue = %queue.name(), deleted = n, "pruned job results past retention");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(queue = %queue.name(), error = %e, "pruning job results failed");
                    }
                }
            }
        }
    }
}

/// pg_partman's maintenance of a partitioned queue, by one process at a time.
async fn maintain_elected(pool: &PgPool, queue: &crate::queue::PgmqQueue) {
    let elected = async {
        let mut conn = pool.acquire().await?;
        let got: bool = sqlx::query_scalar(crate::sql::TRY_MAINTAIN_LOCK)
            .bind(queue.name().as_str())
            .fetch_one(&mut *conn)
            .await?;
        if !got {
            return Ok::<_, crate::Error>(None);
        }
        let result = queue.maintain_partitions(pool).await;
        let _ = sqlx::query(crate::sql::MAINTAIN_UNLOCK)
            .bind(queue.name().as_str())
            .execute(&mut *conn)
            .await;
        result.map(Some)
    };
    match elected.await {
        Ok(Some(dropped)) if dropped > 0 => {
            tracing::debug!(queue = %queue.name(), dropped, "dropped archive partitions past retention");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(queue = %queue.name(), error = %e, "partition maintenance failed"),
    }
}

/// Counts a queue's jobs for the metrics gauges, if this process holds the queue's sampling
/// lock (one process per queue samples).
async fn sample_gauges(pool: &PgPool, queue: &crate::queue::PgmqQueue) {
    match queue.counts_elected(pool).await {
        Ok(Some(c)) => crate::obs::queue_jobs(queue.name().as_str(), &c),
        Ok(None) => {}
        Err(e) => tracing::debug!(queue = %queue.name(), error = %e, "could not sample the queue"),
    }
}

/// Up to a few batches of pruning, while this process holds the queue's pruning lock.
async fn prune_elected(
    pool: &PgPool,
    queue: &crate::queue::PgmqQueue,
    dead_letters: bool,
    keep: Duration,
) {
    let what = if dead_letters {
        "dead letters"
    } else {
        "archived jobs"
    };
    let mut total = 0i64;
    for _ in 0..PRUNE_BATCHES_PER_ROUND {
        match queue.prune_batch_elected(pool, dead_letters, keep).await {
            Ok(Some(n)) => {
                total += n;
                if n < crate::queue::PRUNE_BATCH {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(queue = %queue.name(), error = %e, "pruning {what} failed");
                break;
            }
        }
    }
    if total > 0 {
        tracing::debug!(queue = %queue.name(), deleted = total, "pruned {what} past retention");
    }
}
