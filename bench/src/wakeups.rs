//! Wake-ups at scale: what the notification trigger costs producers, and a burst of waiters.
//!
//! - `producers`: K concurrent single-row producers (pgbench, one `pgmq.send` per transaction,
//!   K = 8 / 64 / 200) on a durable server, for each trigger: removed, the earlier trigger
//!   (migration 0001's on-demand trigger, installed again for the measurement) and the current
//!   one (migration 0002), in three situations: nobody waiting; a worker armed whose
//!   notification never arrives (a row armed by hand: nothing disarms it); a real worker
//!   waiting and consuming. Throughput is compared to the trigger removed in the same
//!   repetition (configurations alternate); the notifying commits are counted on the queue's
//!   channel, and the armings by the listeners' version.
//! - `burst`: 1 000 concurrent `push_and_wait` on one worker pool, with each trigger: every
//!   result checked, the latency percentiles, and the notifications on the wake-up and results
//!   channels.

use std::{
    collections::BTreeMap,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_pgmq_notify::{
    Config as OurConfig, NotifyChannels, NotifyMode, PgmqStorage, QueueName, Runtime,
    disable_notify, enable_notify,
};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgListener},
};

use crate::{
    Res,
    shared::{BenchJob, Counters, Params, Record, latency_values, stop_workers},
    spawn_bench_workers,
};

/// The trigger a measurement runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    None,
    /// Migration 0001's on-demand trigger: every insert statement notifies while an arming is
    /// unanswered.
    Before,
    /// Migration 0002's: once per session per arming, one transaction at a time, at commit.
    Current,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Before => "0001",
            Self::Current => "0002",
        }
    }
}

/// Installs `trigger` on `queue`: the earlier one by applying migration 0001's SQL again (it
/// redefines `enable_notify`, `arm` and the on-demand function as they were), the current one
/// by applying 0002's again (both are idempotent).
async fn install(pool: &PgPool, queue: &QueueName, trigger: Trigger) -> Res<()> {
    match trigger {
        Trigger::None => {
            disable_notify(pool, queue).await?;
            return Ok(());
        }
        Trigger::Before => {
            sqlx::raw_sql(include_str!("../../migrations/0001_baseline.sql"))
                .execute(pool)
                .await?;
        }
        Trigger::Current => {
            // Applying 0002 again is harmless: it converts what 0001 installed back.
            sqlx::raw_sql(include_str!("../../migrations/0002_notify_at_commit.sql"))
                .execute(pool)
                .await?;
        }
    }
    // Re-created through the (re)defined enable_notify.
    disable_notify(pool, queue).await?;
    enable_notify(
        pool,
        queue,
        &NotifyChannels::default(),
        NotifyMode::OnDemand,
    )
    .await?;
    Ok(())
}

/// Counts notifications on `channel` until stopped.
struct Tally {
    count: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Tally {
    async fn start(pool: &PgPool, channel: &str) -> Res<Self> {
        let mut l = PgListener::connect_with(pool).await?;
        l.listen(channel).await?;
        let count = Arc::new(AtomicU64::new(0));
        let c = count.clone();
        let task = tokio::spawn(async move {
            while l.recv().await.is_ok() {
                c.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Self { count, task })
    }

    fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn version(pool: &PgPool) -> Res<i64> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(pg_sequence_last_value('apalis_pgmq.listeners_version'::regclass), 0)",
    )
    .fetch_one(pool)
    .await?)
}

/// pgbench: `clients` sessions, one `pgmq.send` per transaction, for `secs`; transactions/s.
async fn pgbench(opts: &PgConnectOptions, queue: &str, clients: usize, secs: u64) -> Res<f64> {
    let bindir =
        std::env::var("APALIS_PG_BINDIR").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    let script = std::env::temp_dir().join(format!("apq-send-{queue}.sql"));
    std::fs::write(
        &script,
        format!("SELECT pgmq.send('{queue}', '{{\"t\": 0}}'::jsonb);\n"),
    )?;
    let out = tokio::process::Command::new(format!("{bindir}/pgbench"))
        .args([
            "-n",
            "-f",
            &script.to_string_lossy(),
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &secs.to_string(),
            "-h",
            opts.get_host(),
            "-p",
            &opts.get_port().to_string(),
            "-U",
            opts.get_username(),
            opts.get_database().unwrap_or("postgres"),
        ])
        .stdin(Stdio::null())
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| {
            format!(
                "pgbench gave no tps: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into()
        })
}

/// The situations producers meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Situation {
    /// No listener row, no worker.
    Nobody,
    /// One row armed by hand that nothing disarms (a worker whose notification never came).
    Armed,
    /// A real worker pool waiting and consuming (with the trigger removed, it polls every
    /// 200 ms instead, so it consumes too).
    Worker,
}

impl Situation {
    fn name(self) -> &'static str {
        match self {
            Self::Nobody => "nobody",
            Self::Armed => "armed",
            Self::Worker => "worker",
        }
    }
}

/// One repetition's figures of a configuration: ratio to the trigger removed, tps, notifying
/// commits, armings.
type Measured = (f64, f64, u64, i64);

/// One measurement: tps, notifying commits, armings.
async fn one(
    opts: &PgConnectOptions,
    pool: &PgPool,
    name: &QueueName,
    trigger: Trigger,
    situation: Situation,
    clients: usize,
    p: &Params,
) -> Res<(f64, u64, i64)> {
    install(pool, name, trigger).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("TRUNCATE pgmq.q_{name}")))
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM apalis_pgmq.listeners")
        .execute(pool)
        .await?;
    sqlx::query("CHECKPOINT").execute(pool).await?;
    let channel = NotifyChannels::default().queue_channel(name);
    if situation == Situation::Armed {
        sqlx::query("SELECT apalis_pgmq.arm($1, 'ghost', 3600, 1)")
            .bind(&channel)
            .execute(pool)
            .await?;
        sqlx::query("SELECT apalis_pgmq.listeners_changed()")
            .execute(pool)
            .await?;
    }
    let runtime = Runtime::new(pool);
    let workers = if situation == Situation::Worker {
        let config = if trigger == Trigger::None {
            OurConfig::default()
                .listen(false)
                .poll_interval(Duration::from_millis(200))
        } else {
            OurConfig::default()
        };
        let s: PgmqStorage<BenchJob> = PgmqStorage::with_config(&runtime, name.clone(), config)?;
        let counters = Arc::new(Counters::default());
        let (stop, joins) = spawn_bench_workers!(s.clone(), 1usize, p.concurrency, counters);
        // Until the worker has started and (when it listens) armed.
        let deadline = Instant::now() + Duration::from_secs(30);
        while trigger != Trigger::None
            && Instant::now() < deadline
            && sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM apalis_pgmq.listeners WHERE armed AND owner <> 'ghost'",
            )
            .fetch_one(pool)
            .await?
                == 0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some((stop, joins))
    } else {
        None
    };
    let tally = Tally::start(pool, &channel).await?;
    let v0 = version(pool).await?;
    let tps = pgbench(opts, name.as_str(), clients, p.notify_secs).await?;
    let notified = tally.get();
    let armings = version(pool).await? - v0;
    if let Some((stop, joins)) = workers {
        stop_workers(stop, joins).await;
    }
    runtime.shutdown().await?;
    Ok((tps, notified, armings))
}

/// The `producers` workload.
pub async fn producers(
    opts: &PgConnectOptions,
    pool: &PgPool,
    p: &Params,
    system: &str,
) -> Res<Vec<Record>> {
    let name = QueueName::new("producers")?;
    apalis_pgmq_notify::PgmqQueue::new(name.clone())
        .create(pool)
        .await?;
    let clients: Vec<usize> = if !p.producers_clients.is_empty() {
        p.producers_clients.clone()
    } else if p.notify_producers <= 8 && p.notify_secs <= 2 {
        vec![8]
    } else {
        vec![8, 64, 200]
    };
    let configs: Vec<(Trigger, Situation)> = vec![
        (Trigger::None, Situation::Nobody),
        (Trigger::Before, Situation::Nobody),
        (Trigger::Current, Situation::Nobody),
        (Trigger::Before, Situation::Armed),
        (Trigger::Current, Situation::Armed),
        (Trigger::None, Situation::Worker),
        (Trigger::Before, Situation::Worker),
        (Trigger::Current, Situation::Worker),
    ];
    let reps = p.producers_reps.max(1);
    let mut records = Vec::new();
    for &k in &clients {
        // (trigger, situation) -> per repetition (ratio, tps, notifications, armings)
        let mut results: BTreeMap<(&str, &str), Vec<Measured>> = BTreeMap::new();
        for rep in 0..reps {
            let mut order = configs.clone();
            if rep % 2 == 1 {
                order.reverse();
            }
            let mut measured = Vec::new();
            for &(t, s) in &order {
                match one(opts, pool, &name, t, s, k, p).await {
                    Ok((tps, notified, armings)) => measured.push((t, s, tps, notified, armings)),
                    // One client count that the server or the machine cannot serve (200
                    // connections on a loaded machine) leaves the others' figures standing.
                    Err(e) => {
                        records.push(Record::new(system, "producers").note(format!(
                            "trigger {}, {}; {k} clients: failed: {e}",
                            t.name(),
                            s.name()
                        )));
                    }
                }
            }
            let base = |s: Situation| {
                let base_situation = if s == Situation::Worker {
                    Situation::Worker
                } else {
                    Situation::Nobody
                };
                measured
                    .iter()
                    .find(|m| m.0 == Trigger::None && m.1 == base_situation)
                    .map_or(f64::NAN, |m| m.2)
            };
            for &(t, s, tps, notified, armings) in &measured {
                results.entry((t.name(), s.name())).or_default().push((
                    tps / base(s),
                    tps,
                    notified,
                    armings,
                ));
            }
        }
        for ((trigger, situation), v) in results {
            let mut ratios: Vec<f64> = v.iter().map(|x| x.0).collect();
            ratios.sort_by(f64::total_cmp);
            let mean = |f: &dyn Fn(&Measured) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
            let notified = mean(&|x| x.2 as f64);
            let armings = mean(&|x| x.3 as f64);
            records.push(
                Record::new(system, "producers")
                    .value("clients", k as f64)
                    .value("ratio_min", ratios[0])
                    .value("ratio_max", ratios[ratios.len() - 1])
                    .value("ratio_mean", mean(&|x| x.0))
                    .value("tps", mean(&|x| x.1))
                    .value("notifying_commits", notified)
                    .value("armings", armings)
                    .value(
                        "per_arming",
                        if armings > 0.0 {
                            notified / armings
                        } else {
                            0.0
                        },
                    )
                    .note(format!(
                        "trigger {trigger}, {situation}; {k} pgbench clients, one pgmq.send per \
                         transaction, {} s x {reps} alternating repetitions; ratio to the trigger \
                         removed in the same repetition",
                        p.notify_secs
                    )),
            );
        }
    }
    Ok(records)
}

/// The `burst` workload: 1 000 concurrent `push_and_wait` on one worker pool.
pub async fn burst(pool: &PgPool, p: &Params, system: &str) -> Res<Vec<Record>> {
    let callers = p.result_waiters.max(1000);
    let name = QueueName::new("burst")?;
    let mut records = Vec::new();
    for trigger in [Trigger::Before, Trigger::Current] {
        let runtime = Runtime::new(pool);
        let s: PgmqStorage<BenchJob> =
            PgmqStorage::with_config(&runtime, name.clone(), OurConfig::default())?;
        s.create_queue().await?;
        install(pool, &name, trigger).await?;
        let channels = NotifyChannels::default();
        let counters = Arc::new(Counters::default());
        let (stop, joins) = spawn_bench_workers!(s.clone(), 1usize, p.concurrency, counters);
        // Idle and armed before the burst.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM apalis_pgmq.listeners WHERE armed",
            )
            .fetch_one(pool)
            .await?
                == 0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let wakes = Tally::start(pool, &channels.queue_channel(&name)).await?;
        let results = Tally::start(pool, &channels.results_channel(&name)).await?;
        let start = Instant::now();
        let mut calls = tokio::task::JoinSet::new();
        for t in 0..callers as u64 {
            let s = s.clone();
            calls.spawn(async move {
                let t0 = Instant::now();
                let r = s
                    .push_and_wait::<()>(
                        TaskBuilder::new(BenchJob { t }).build(),
                        Duration::from_secs(120),
                    )
                    .await;
                (t0.elapsed(), r)
            });
        }
        let mut samples = Vec::with_capacity(callers);
        let mut wrong = 0u64;
        while let Some(r) = calls.join_next().await {
            let (elapsed, r) = r?;
            match r {
                Ok(res) if res.status == Status::Done && res.result.is_ok() => {}
                _ => wrong += 1,
            }
            samples.push(elapsed.as_micros() as u64);
        }
        let secs = start.elapsed().as_secs_f64();
        stop_workers(stop, joins).await;
        runtime.shutdown().await?;
        let (w, r) = (wakes.get(), results.get());
        drop((wakes, results));
        s.queue().purge(pool).await.ok();
        let mut rec = Record::new(system, "burst")
            .value("callers", callers as f64)
            .value("wrong_results", wrong as f64)
            .value("seconds", secs)
            .value("wake_notifications", w as f64)
            .value("result_notifications", r as f64);
        for (k, v) in latency_values(samples) {
            rec = rec.value(&format!("push_and_wait_{k}"), v);
        }
        records.push(rec.note(format!(
            "trigger {}: {callers} push_and_wait at once, one worker x {}, idle and armed at \
             the start",
            trigger.name(),
            p.concurrency
        )));
    }
    Ok(records)
}
