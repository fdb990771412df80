//! The maintenance service: the runtime's housekeeping on the database, one task per runtime.
//!
//! - **Worker registry.** Every running worker has a row in `apalis_pgmq.workers`, written when
//!   it starts and deleted when it stops cleanly. The service refreshes the rows of all the
//!   runtime's workers in one statement per interval (default 30 s,
//!   [`Config::heartbeat_interval`](crate::Config::heartbeat_interval)) and issues nothing
//!   while the runtime runs no worker. A row whose process died is no longer listed once it
//!   expires (three intervals) and is swept a minute later by any heartbeat.
//! - **Retention.** After its first heartbeat and then every 10 minutes it prunes, for every
//!   queue the runtime's workers serve, archived jobs, dead letters and stored results past
//!   their retention, in batches of 10 000, each in a short transaction holding that queue's
//!   pruning lock (`pg_try_advisory_xact_lock`), so one process at a time prunes a queue.
//! - **Partitions and gauges.** On every heartbeat, pg_partman's upkeep of partitioned queues
//!   and (with the `metrics` feature) the queue gauges, each by one process per queue.
//! - **Event subscriptions.** Their rows in `apalis_pgmq.listeners` are refreshed before they
//!   expire.
//! - **Chores** handed over by parts that cannot wait for the database themselves (a
//!   notification answering an arming, a worker dropped without closing, an event stream
//!   dropped): disarming, releasing held messages, deleting rows. They run in order, and those
//!   still queued when the runtime stops run before the service ends.
//!
//! Every statement has a deadline (`src/deadline.rs`): the heartbeat interval, at least 10 s,
//! for a whole round, and the same for each chore. A statement that passes it gives its
//! connection up (closed, not handed back to the pool); the round ends and the next one tries
//! again.

use crate::error::Describe;
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, PgPool};
use tokio::{sync::mpsc, time::Instant};

use super::{Inner, lock};
use crate::{
    deadline::Conn,
    notify::{WakeSignal, wakeup::WakeTarget},
    queue::{Delivery, PgmqQueue},
    util::Stop,
};

/// Most pruning batches per queue and table in one pruning round.
const PRUNE_BATCHES_PER_ROUND: usize = 10;

/// How often a process prunes (after a heartbeat, at most this often): rarely enough that an
/// idle process stays far below 0.1 statements/s for it.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// How long an event subscription's rows last without a refresh.
pub(crate) const SUBSCRIPTION_TTL: Duration = Duration::from_secs(90);

/// What a worker reports about itself between heartbeats.
#[derive(Debug, Default)]
pub(crate) struct WorkerStats {
    /// Jobs running now.
    pub(crate) in_flight: AtomicUsize,
    /// The concurrency limit learned when it first filled up; 0 while unknown.
    pub(crate) concurrency: AtomicUsize,
}

/// How long a queue keeps done jobs, dead letters and results (`None`: forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Retention {
    pub(crate) archive: Option<Duration>,
    pub(crate) dead_letters: Option<Duration>,
    pub(crate) results: Option<Duration>,
    /// A partitioned queue: pg_partman's maintenance runs on every heartbeat.
    pub(crate) partitioned: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    queue: String,
    service: String,
    started: DateTime<Utc>,
    stats: Arc<WorkerStats>,
}

/// Work handed to the service.
pub(crate) enum Chore {
    /// Something needs the service running (a worker registered, a subscription made).
    Wake,
    /// Clear generation `generation` of `owner`'s arming on `channel`.
    Disarm {
        channel: String,
        owner: String,
        generation: u64,
    },
    /// Make messages a dropped worker held visible again, and wake idle workers.
    Release {
        queue: PgmqQueue,
        held: Vec<Delivery>,
        signal: Arc<WakeSignal>,
        wake: Option<WakeTarget>,
    },
    /// Delete a worker's row (its worker was dropped without closing).
    Unregister(String),
    /// Delete an ended subscription's rows.
    Unwant {
        owner: String,
        channels: Vec<String>,
    },
}

/// The service's state, kept in the runtime so workers and subscriptions can register.
#[derive(Default)]
pub(crate) struct Maintenance {
    /// Chores, once the service runs.
    tx: Mutex<Option<mpsc::UnboundedSender<Chore>>>,
    workers: Mutex<HashMap<String, Entry>>,
    /// Retention of each queue the runtime's workers serve (the shortest asked for).
    retention: Mutex<HashMap<String, (PgmqQueue, Retention)>>,
    /// The shortest heartbeat interval any storage asked for, in milliseconds (0: default).
    interval_ms: AtomicU64,
    next_id: AtomicU64,
    /// Event subscriptions' rows to refresh: owner → channels.
    subscriptions: Mutex<HashMap<String, Vec<String>>>,
    /// The old-snapshot watch's memory (see `snapshots.rs`).
    snapshots: Mutex<super::snapshots::SnapshotWatch>,
    /// Held across a heartbeat and across an unregistration, so a heartbeat in flight cannot
    /// write back the row of a worker that just stopped.
    beat_lock: tokio::sync::Mutex<()>,
}

impl Maintenance {
    /// Queues a chore; returns the receiver when the service is not running yet (the caller
    /// starts it with that receiver).
    pub(crate) fn send(&self, chore: Chore) -> Option<mpsc::UnboundedReceiver<Chore>> {
        let mut tx = lock(&self.tx);
        let chore = match tx.as_ref() {
            Some(t) => match t.send(chore) {
                Ok(()) => return None,
                Err(mpsc::error::SendError(chore)) => chore,
            },
            None => chore,
        };
        let (t, rx) = mpsc::unbounded_channel();
        let _ = t.send(chore);
        *tx = Some(t);
        Some(rx)
    }

    pub(crate) fn heartbeat_at_least_every(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(100);
        let _ = self
            .interval_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
                Some(if cur == 0 { ms } else { cur.min(ms) })
            });
    }

    fn interval(&self) -> Duration {
        match self.interval_ms.load(Ordering::Relaxed) {
            0 => Duration::from_millis(crate::config::DEFAULT_HEARTBEAT_MS),
            ms => Duration::from_millis(ms),
        }
    }

    /// Records an event subscription's rows for refreshing.
    pub(crate) fn subscribed(&self, owner: String, channels: Vec<String>) {
        lock(&self.subscriptions).insert(owner, channels);
    }

    /// Forgets an ended subscription; its rows are deleted by [`Chore::Unwant`].
    pub(crate) fn unsubscribed(&self, owner: &str) -> Option<Vec<String>> {
        lock(&self.subscriptions).remove(owner)
    }

    fn snapshot(&self) -> Vec<(String, Entry)> {
        lock(&self.workers)
            .iter()
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect()
    }
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
async fn beat<'c, E: PgExecutor<'c>>(
    executor: E,
    owner: &str,
    interval: Duration,
    entries: &[(String, Entry)],
) -> crate::error::Result<()> {
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
        .execute(executor)
        .await?;
    Ok(())
}

/// A registered worker; its row is deleted by [`Registration::unregister`] (clean stop) or,
/// failing that, by the maintenance service once this is dropped.
#[derive(Debug)]
pub(crate) struct Registration {
    inner: Weak<Inner>,
    id: String,
    pub(crate) stats: Arc<WorkerStats>,
    done: bool,
}

impl Inner {
    /// Registers a worker of `queue` named `name`: writes its row now, and makes sure the
    /// maintenance service runs.
    pub(crate) async fn register_worker(
        self: &Arc<Self>,
        name: &str,
        queue: &PgmqQueue,
        service: &str,
        retention: Retention,
    ) -> Registration {
        let m = &self.maintenance;
        {
            let mut all = lock(&m.retention);
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
        let id = format!(
            "{name}@{}#{}",
            self.owner,
            m.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let stats = Arc::new(WorkerStats::default());
        let entry = Entry {
            name: name.to_owned(),
            queue: queue.name().as_str().to_owned(),
            service: service.to_owned(),
            started: Utc::now(),
            stats: stats.clone(),
        };
        {
            let _beat = m.beat_lock.lock().await;
            let interval = m.interval();
            let by = Instant::now() + crate::deadline::maintenance(interval);
            let one = [(id.clone(), entry.clone())];
            let written = async {
                let mut conn = Conn::acquire(&self.pool, by).await?;
                conn.run(by, "registering a worker", |c| {
                    beat(c, &self.owner, interval, &one)
                })
                .await
            }
            .await;
            if let Err(e) = written {
                tracing::warn!(worker = name, queue = %queue.name(), error = %e.describe(),
                    "could not register the worker; it runs, but is not listed until the next heartbeat");
            }
            lock(&m.workers).insert(id.clone(), entry);
        }
        self.chore(Chore::Wake);
        Registration {
            inner: Arc::downgrade(self),
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
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let _beat = inner.maintenance.beat_lock.lock().await;
        lock(&inner.maintenance.workers).remove(&self.id);
        let by = Instant::now() + crate::deadline::maintenance(inner.maintenance.interval());
        if let Err(e) = unregister(&inner.pool, &self.id, by).await {
            tracing::debug!(error = %e.describe(), "could not remove the worker's row; it expires by itself");
        }
    }
}

/// Deletes a worker's row, by `by`.
async fn unregister(pool: &PgPool, id: &str, by: Instant) -> crate::error::Result<()> {
    let mut conn = Conn::acquire(pool, by).await?;
    conn.run(by, "removing a worker's row", |c| {
        sqlx::query(crate::sql::UNREGISTER_WORKER)
            .bind(id)
            .execute(c)
    })
    .await?;
    Ok(())
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(inner) = self.inner.upgrade() {
            lock(&inner.maintenance.workers).remove(&self.id);
            inner.chore(Chore::Unregister(std::mem::take(&mut self.id)));
        }
    }
}

/// The service: chores as they come, and the heartbeat round on its interval. Runs until the
/// runtime stops (then does the chores still queued) or is gone.
pub(crate) async fn run(
    inner: Weak<Inner>,
    mut chores: mpsc::UnboundedReceiver<Chore>,
    mut stop: Stop,
) {
    let Some(interval) = inner.upgrade().map(|i| i.maintenance.interval()) else {
        return;
    };
    let mut next_beat = Instant::now() + interval;
    // The first round comes after the first heartbeat: a process that starts prunes at once.
    let mut next_prune = Instant::now();
    let mut next_refresh = Instant::now() + SUBSCRIPTION_TTL / 3;
    loop {
        tokio::select! {
            () = stop.requested() => {
                chores.close();
                while let Some(chore) = chores.recv().await {
                    let Some(i) = inner.upgrade() else { return };
                    do_chore(&i, chore).await;
                }
                return;
            }
            chore = chores.recv() => {
                let (Some(chore), Some(i)) = (chore, inner.upgrade()) else { return };
                do_chore(&i, chore).await;
            }
            () = tokio::time::sleep_until(next_beat) => {
                let Some(i) = inner.upgrade() else { return };
                let interval = i.maintenance.interval();
                next_beat = Instant::now() + interval;
                heartbeat_round(&i, interval, &mut next_prune).await;
            }
            () = tokio::time::sleep_until(next_refresh) => {
                let Some(i) = inner.upgrade() else { return };
                next_refresh = Instant::now() + SUBSCRIPTION_TTL / 3;
                refresh_subscriptions(&i).await;
            }
        }
    }
}

async fn do_chore(inner: &Inner, chore: Chore) {
    let pool = &inner.pool;
    let deadline = crate::deadline::maintenance(inner.maintenance.interval());
    let by = Instant::now() + deadline;
    match chore {
        Chore::Wake => {}
        Chore::Disarm {
            channel,
            owner,
            generation,
        } => {
            let disarmed = async {
                let mut conn = Conn::acquire(pool, by).await?;
                conn.run(by, "disarming a wake-up", |c| {
                    crate::notify::wakeup::disarm(c, &channel, &owner, generation)
                })
                .await
            }
            .await;
            if let Err(e) = disarmed {
                tracing::debug!(%channel, error = %e.describe(),
                    "could not disarm an answered wake-up; producers notify until it expires");
            }
        }
        Chore::Release {
            queue,
            held,
            signal,
            wake,
        } => crate::lease::release(pool, &queue, &held, &signal, wake.as_ref(), deadline).await,
        Chore::Unregister(id) => {
            let _beat = inner.maintenance.beat_lock.lock().await;
            if let Err(e) = unregister(pool, &id, by).await {
                tracing::debug!(error = %e.describe(), "could not remove a worker's row; it expires by itself");
            }
        }
        Chore::Unwant { owner, channels } => {
            for c in &channels {
                if let Err(e) = unwant(pool, c, &owner, by).await {
                    tracing::debug!(channel = %c, error = %e.describe(),
                        "could not remove an event subscription's row; it expires by itself");
                }
            }
        }
    }
}

/// Removes `owner`'s row on `channel`, by `by`.
async fn unwant(
    pool: &PgPool,
    channel: &str,
    owner: &str,
    by: Instant,
) -> crate::error::Result<()> {
    let mut conn = Conn::acquire(pool, by).await?;
    conn.run(by, "removing a subscription's row", |c| {
        crate::notify::unwant(c, channel, owner)
    })
    .await
}

/// One heartbeat for every worker of the runtime (none: no statement), then partition upkeep,
/// gauges and, when due, retention.
async fn heartbeat_round(inner: &Inner, interval: Duration, next_prune: &mut Instant) {
    let m = &inner.maintenance;
    let pool = &inner.pool;
    // One deadline for the whole round: whatever the network does, the round ends by then.
    let by = Instant::now() + crate::deadline::maintenance(interval);
    {
        let _beat = m.beat_lock.lock().await;
        let entries = m.snapshot();
        if entries.is_empty() {
            return;
        }
        let written = async {
            let mut conn = Conn::acquire(pool, by).await?;
            conn.run(by, "the worker heartbeat", |c| {
                beat(c, &inner.owner, interval, &entries)
            })
            .await
        }
        .await;
        if let Err(e) = written {
            tracing::warn!(error = %e.describe(), workers = entries.len(), "worker heartbeat failed");
        }
    }
    let queues: Vec<_> = lock(&m.retention).values().cloned().collect();
    watch_snapshots(inner, &queues, by).await;
    for (queue, _) in queues.iter().filter(|(_, r)| r.partitioned) {
        maintain_elected(pool, queue, by).await;
    }
    if crate::obs::SAMPLES_GAUGES {
        for (queue, _) in &queues {
            sample_gauges(pool, queue, by).await;
        }
    }
    if Instant::now() < *next_prune {
        return;
    }
    *next_prune = Instant::now() + PRUNE_EVERY;
    for (queue, retention) in queues {
        for (dead_letters, keep) in [(false, retention.archive), (true, retention.dead_letters)] {
            let Some(keep) = keep else { continue };
            prune_elected(pool, &queue, dead_letters, keep, by).await;
        }
        if let Some(keep) = retention.results {
            let pruned = async {
                let mut conn = Conn::acquire(pool, by).await?;
                conn.run(by, "pruning job results", |c| {
                    crate::ops::prune_results_batches(
                        c,
                        queue.name(),
                        keep,
                        true,
                        PRUNE_BATCHES_PER_ROUND,
                    )
                })
                .await
            }
            .await;
            match pruned {
                Ok(n) if n > 0 => {
                    tracing::debug!(queue = %queue.name(), deleted = n, "pruned job results past retention");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(queue = %queue.name(), error = %e.describe(), "pruning job results failed");
                }
            }
        }
        // Job keys whose hold ended (their job gone, its idempotency window over).
        match crate::ops::prune_keys(pool, queue.name(), PRUNE_BATCHES_PER_ROUND).await {
            Ok(n) if n > 0 => {
                tracing::debug!(queue = %queue.name(), deleted = n, "pruned job keys past their hold");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(queue = %queue.name(), error = %e.describe(), "pruning job keys failed");
            }
        }
    }
}

/// Refreshes the rows of every live event subscription.
async fn refresh_subscriptions(inner: &Inner) {
    let subs: Vec<(String, Vec<String>)> = lock(&inner.maintenance.subscriptions)
        .iter()
        .map(|(o, c)| (o.clone(), c.clone()))
        .collect();
    let by = Instant::now() + crate::deadline::maintenance(inner.maintenance.interval());
    for (owner, channels) in subs {
        for c in &channels {
            let refreshed = async {
                let mut conn = Conn::acquire(&inner.pool, by).await?;
                conn.run(by, "refreshing a subscription", |x| {
                    crate::notify::want(x, c, &owner, SUBSCRIPTION_TTL.as_secs_f64(), true)
                })
                .await
            }
            .await;
            if let Err(e) = refreshed {
                tracing::debug!(error = %e.describe(), "could not refresh an event subscription");
            }
        }
    }
}

/// One look at who holds back vacuum of the database (see `snapshots.rs`).
async fn watch_snapshots(inner: &Inner, queues: &[(PgmqQueue, Retention)], by: Instant) {
    let looked = async {
        let mut conn = Conn::acquire(&inner.pool, by).await?;
        conn.run(by, "looking for old snapshots", |c| {
            crate::horizon::snapshot_holders(c)
        })
        .await
    };
    let found = match looked.await {
        Ok(found) => found,
        Err(e) => {
            tracing::debug!(error = %e.describe(), "could not look for old snapshots");
            return;
        }
    };
    crate::obs::oldest_snapshot(&found);
    let (reports, partial) = {
        let mut watch = lock(&inner.maintenance.snapshots);
        let partial = watch.say_partial(&found);
        (watch.observe(Instant::now(), &found), partial)
    };
    if partial {
        tracing::info!(
            "this role cannot see other roles' transaction start times and queries \
             (grant pg_read_all_stats): old snapshots are still found by their xmin and pid, \
             their age counted from when this process first saw them"
        );
    }
    if !reports.is_empty() {
        let names: Vec<&str> = queues.iter().map(|(q, _)| q.name().as_str()).collect();
        super::snapshots::log(reports, &names.join(","));
    }
}

/// pg_partman's maintenance of a partitioned queue, by one process at a time, by `by`.
async fn maintain_elected(pool: &PgPool, queue: &PgmqQueue, by: Instant) {
    let elected = async {
        let mut conn = Conn::acquire(pool, by).await?;
        conn.run(by, "partition maintenance", |c| maintain_on(c, queue))
            .await
    };
    match elected.await {
        Ok(Some(dropped)) if dropped > 0 => {
            tracing::debug!(queue = %queue.name(), dropped, "dropped archive partitions past retention");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(queue = %queue.name(), error = %e.describe(), "partition maintenance failed")
        }
    }
}

/// Partition maintenance on `conn` while it holds the queue's maintenance lock; `None` if
/// another session holds it.
async fn maintain_on(
    conn: &mut PgConnection,
    queue: &PgmqQueue,
) -> crate::error::Result<Option<usize>> {
    let got: bool = sqlx::query_scalar(crate::sql::TRY_MAINTAIN_LOCK)
        .bind(queue.name().as_str())
        .fetch_one(&mut *conn)
        .await?;
    if !got {
        return Ok(None);
    }
    let result = queue.maintain_partitions(&mut *conn).await;
    let _ = sqlx::query(crate::sql::MAINTAIN_UNLOCK)
        .bind(queue.name().as_str())
        .execute(&mut *conn)
        .await;
    result.map(Some)
}

/// Counts a queue's jobs for the metrics gauges, if this process holds the queue's sampling
/// lock (one process per queue samples).
async fn sample_gauges(pool: &PgPool, queue: &PgmqQueue, by: Instant) {
    let counted = async {
        let mut conn = Conn::acquire(pool, by).await?;
        conn.run(by, "sampling the queue", |c| queue.counts_elected(c))
            .await
    };
    match counted.await {
        Ok(Some(c)) => crate::obs::queue_jobs(queue.name().as_str(), &c),
        Ok(None) => {}
        Err(e) => {
            tracing::debug!(queue = %queue.name(), error = %e.describe(), "could not sample the queue")
        }
    }
}

/// Up to a few batches of pruning, while this process holds the queue's pruning lock, by `by`.
async fn prune_elected(
    pool: &PgPool,
    queue: &PgmqQueue,
    dead_letters: bool,
    keep: Duration,
    by: Instant,
) {
    let what = if dead_letters {
        "dead letters"
    } else {
        "archived jobs"
    };
    let mut total = 0i64;
    for _ in 0..PRUNE_BATCHES_PER_ROUND {
        let batch = async {
            let mut conn = Conn::acquire(pool, by).await?;
            conn.run(by, "pruning", |c| {
                queue.prune_batch_elected(c, dead_letters, keep)
            })
            .await
        };
        match batch.await {
            Ok(Some(n)) => {
                total += n;
                if n < crate::queue::PRUNE_BATCH {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(queue = %queue.name(), error = %e.describe(), "pruning {what} failed");
                break;
            }
        }
    }
    if total > 0 {
        tracing::debug!(queue = %queue.name(), deleted = total, "pruned {what} past retention");
    }
}
