//! Side-by-side benchmark: apalis-pgmq-notify, apalis-postgres 1.0 (plain and with its
//! LISTEN/NOTIFY pubsub), apalis-pgmq 0.1.0-rc.5 (plain and with PGMQ's notify_insert, run by
//! the `pgmq-peer` binary), and the raw SQL ceiling, on one PostgreSQL in one run.
//!
//! ```text
//! scripts/bench.sh [--quick] [--systems a,b,...] [--workloads a,b,...]
//! ```
//!
//! Every measurement prints a `BENCH {json}` line; a table follows at the end.

#[path = "../../tests/common/proxy.rs"]
mod proxy;
mod results;
#[path = "shared.rs"]
mod shared;
mod snapshot;
mod throughput;
mod wakeups;

use std::{
    collections::BTreeMap,
    process::Stdio,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_pgmq_notify::{
    Config as OurConfig, NotifyChannels, NotifyMode, PgmqQueue, PgmqStorage, QueueName, Runtime,
    disable_notify, enable_notify,
};
use apalis_postgres::{Config as PgConfig, PostgresStorage};
use serde_json::json;
use shared::{
    BenchJob, Counters, Params, Record, gap, latency_values, max_push_rate, now_micros,
    offered_load, stop_workers, wait_done,
};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};

const OURS: &str = "apalis-pgmq-notify";
const PG_PLAIN: &str = "apalis-postgres";
const PG_NOTIFY: &str = "apalis-postgres+notify";
const PGMQ_PLAIN: &str = "apalis-pgmq";
const PGMQ_NOTIFY: &str = "apalis-pgmq+notify";
const RAW: &str = "raw-sql";

/// This crate built from an earlier commit (`scripts/bench.sh --baseline REV`), run as a
/// subprocess: its burn-down with the default claim size of that time, one worker.
const BASELINE: &str = "baseline";
const ALL_SYSTEMS: &[&str] = &[
    OURS,
    BASELINE,
    PG_PLAIN,
    PG_NOTIFY,
    PGMQ_PLAIN,
    PGMQ_NOTIFY,
    RAW,
];
const ALL_WORKLOADS: &[&str] = &[
    "burn_down",
    "enqueue",
    "pickup",
    "idle_cost",
    "sustained",
    "notify_cost",
    "retention",
    "growth",
    "breakdown",
    "delayed_pickup",
    "far",
    "unique_enqueue",
    "priorities",
    "results",
    "producers",
    "burst",
    "held_snapshot",
];

pub(crate) type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Bench {
    admin: PgConnectOptions,
    params: Params,
    peer_bin: Option<String>,
    baseline_bin: Option<String>,
    records: Vec<Record>,
}

fn db_name(system: &str, workload: &str) -> String {
    let clean = |s: &str| s.replace(['-', '+'], "_");
    format!("apqb_{}_{}", clean(system), clean(workload))
}

impl Bench {
    async fn admin_pool(&self) -> Res<PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(1)
            .connect_with(self.admin.clone())
            .await?)
    }

    /// A fresh database with pg_stat_statements (when the server preloads it).
    async fn fresh_db(&self, system: &str, workload: &str) -> Res<(PgConnectOptions, PgPool)> {
        let name = db_name(system, workload);
        let admin = self.admin_pool().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&admin)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{name}\" TEMPLATE template0"
        )))
        .execute(&admin)
        .await?;
        admin.close().await;
        let opts = self.admin.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect_with(opts.clone())
            .await?;
        let _ = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&pool)
            .await;
        Ok((opts, pool))
    }

    async fn drop_db(&self, system: &str, workload: &str) {
        if let Ok(admin) = self.admin_pool().await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                db_name(system, workload)
            )))
            .execute(&admin)
            .await;
        }
    }

    fn emit(&mut self, r: Record) {
        r.emit();
        self.records.push(r);
    }
}

/// Statements executed in the current database, from pg_stat_statements; falls back to
/// committed transactions when the extension is not available.
pub async fn statement_count(pool: &PgPool) -> (f64, &'static str) {
    let statements: Result<i64, _> = sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND query NOT ILIKE '%pg_stat%'",
    )
    .fetch_one(pool)
    .await;
    if let Ok(n) = statements {
        return (n as f64, "statements (pg_stat_statements)");
    }
    let tx: i64 = sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database \
         WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(0);
    (tx as f64, "transactions (pg_stat_database)")
}

fn job(t: u64) -> BenchJob {
    BenchJob { t }
}

// ---------------------------------------------------------------- this crate

async fn ours(pool: &PgPool, p: &Params) -> Res<PgmqStorage<BenchJob>> {
    apalis_pgmq_notify::setup(pool).await?;
    let s = PgmqStorage::with_config(
        &Runtime::new(pool),
        QueueName::new("bench")?,
        OurConfig::default().fetch_batch_size(p.batch_size),
    )?;
    s.create_queue().await?;
    Ok(s)
}

// ---------------------------------------------------------------- apalis-postgres

async fn apalis_pg(pool: &PgPool, p: &Params, poll: Duration) -> Res<PostgresStorage<BenchJob>> {
    PostgresStorage::setup(pool).await?;
    Ok(PostgresStorage::<BenchJob>::new(pool).with_config(
        PgConfig::default()
            .queue("bench")
            .batch_size(p.batch_size)
            .heartbeat_interval(poll),
    ))
}

async fn run_ours(bench: &mut Bench, workload: &str) -> Res<()> {
    let (opts, pool) = bench.fresh_db(OURS, workload).await?;
    let p = bench.params.clone();
    let s = ours(&pool, &p).await?;
    if workload == "growth" {
        let r = throughput::growth(&pool, &p, OURS).await?;
        bench.emit(r);
    } else if workload == "breakdown" {
        for r in throughput::breakdown(&pool, &p, OURS).await? {
            bench.emit(r);
        }
    } else if workload == "delayed_pickup" {
        let r = throughput::delayed_pickup(&pool, &p, OURS).await?;
        bench.emit(r);
    } else if workload == "far" {
        let r = throughput::far(&opts, &pool, &p, OURS).await?;
        bench.emit(r);
    } else if workload == "unique_enqueue" {
        let r = throughput::unique_enqueue(&pool, &p, OURS).await?;
        bench.emit(r);
    } else if workload == "priorities" {
        let r = throughput::priorities(&pool, &p, OURS).await?;
        bench.emit(r);
    } else if workload == "results" {
        let r = results::ours(&pool, &p, OURS).await?;
        bench.emit(r);
    } else if workload == "producers" {
        for r in wakeups::producers(&opts, &pool, &p, OURS).await? {
            bench.emit(r);
        }
    } else if workload == "burst" {
        for r in wakeups::burst(&pool, &p, OURS).await? {
            bench.emit(r);
        }
    } else if workload == "held_snapshot" {
        for r in snapshot::held_snapshot(&opts, &pool, &s, &p, OURS).await? {
            bench.emit(r);
        }
    } else if workload == "retention" {
        retention(bench, &pool, &s, &p).await?;
    } else if workload == "notify_cost" {
        let q = s.queue().clone();
        let channels = NotifyChannels::default();
        let push = {
            let s = s.clone();
            move || {
                let mut s = s.clone();
                async move { s.push(job(0)).await }
            }
        };
        // 1. As users run it: producers at full speed while a worker pool consumes. Without a
        //    trigger the workers poll every 10 ms (about the pickup latency notifications give,
        //    so both runs consume alike); with the on-demand trigger they wait for it.
        let polling: PgmqStorage<BenchJob> = PgmqStorage::with_config(
            &Runtime::new(&pool),
            q.name().clone(),
            OurConfig::default()
                .fetch_batch_size(p.batch_size)
                .listen(false)
                .poll_interval(Duration::from_millis(10)),
        )?;
        // Alternate off and on three times and keep the medians: the machine is noisy.
        let (mut offs, mut ons, mut notes) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            disable_notify(&pool, q.name()).await?;
            let counters = Arc::new(Counters::default());
            let (stop, joins) =
                spawn_bench_workers!(polling.clone(), p.workers, p.concurrency, counters);
            offs.push(max_push_rate(p.notify_secs, p.notify_producers, push.clone()).await);
            stop_workers(stop, joins).await;
            q.purge(&pool).await?;
            enable_notify(&pool, q.name(), &channels, NotifyMode::OnDemand).await?;
            let counters = Arc::new(Counters::default());
            let (stop, joins) = spawn_bench_workers!(s.clone(), p.workers, p.concurrency, counters);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = s.listener_stats().received;
            let start = Instant::now();
            ons.push(max_push_rate(p.notify_secs, p.notify_producers, push.clone()).await);
            notes.push(
                (s.listener_stats().received - before) as f64 / start.elapsed().as_secs_f64(),
            );
            stop_workers(stop, joins).await;
            q.purge(&pool).await?;
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (off, on, notifies) = (median(offs), median(ons), median(notes));
        // 2. The always-notify mode, measured like the peers: a listener attached, no workers.
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(&channels.queue_channel(q.name())).await?;
        let drain = tokio::spawn(async move { while listener.recv().await.is_ok() {} });
        disable_notify(&pool, q.name()).await?;
        let quiet = max_push_rate(p.notify_secs, p.notify_producers, push.clone()).await;
        enable_notify(&pool, q.name(), &channels, NotifyMode::Batch).await?;
        let always = max_push_rate(p.notify_secs, p.notify_producers, push).await;
        drain.abort();
        bench.emit(
            notify_record(OURS, on, off, p.notify_producers)
                .value("notifications_per_sec", notifies)
                .value("always_on_per_sec", always)
                .value("always_off_per_sec", quiet)
                .value("always_ratio", always / quiet)
                .note(format!(
                    "{} producers pushing single jobs while {} workers consume (on-demand \
                     trigger vs none); always-notify mode with a bare listener: {:.2}",
                    p.notify_producers,
                    p.workers,
                    always / quiet
                )),
        );
    } else {
        let mut records = Vec::new();
        apalis_workload!(
            p,
            |r: Record| records.push(r),
            OURS,
            workload,
            &pool,
            s.clone(),
            s.clone(),
            false
        )?;
        records.into_iter().for_each(|r| bench.emit(r));
        if workload == "idle_cost" {
            // Over several fallback polls (default 30 s), without and then with another
            // session's transaction open on the queue table (it inserted and stays open, so
            // every settle check after an arming fails).
            let window = Duration::from_secs(p.idle_secs * 7);
            let mut values = Vec::new();
            for open in [false, true] {
                let mut tx = if open {
                    let mut tx = pool.begin().await?;
                    s.push_with(&mut *tx, &job(0)).await?;
                    Some(tx)
                } else {
                    None
                };
                let counters = Arc::new(Counters::default());
                let (stop, joins) =
                    spawn_bench_workers!(s.clone(), 1usize, p.concurrency, counters);
                tokio::time::sleep(Duration::from_secs(2)).await;
                let (q0, _) = statement_count(&pool).await;
                let start = Instant::now();
                tokio::time::sleep(window).await;
                let (q1, _) = statement_count(&pool).await;
                values.push((q1 - q0) / start.elapsed().as_secs_f64());
                stop_workers(stop, joins).await;
                if let Some(tx) = tx.take() {
                    tx.rollback().await?;
                }
            }
            bench.emit(
                Record::new(OURS, "idle_long")
                    .value("per_sec", values[0])
                    .value("open_tx_per_sec", values[1])
                    .note(format!(
                        "one idle worker, default config, {} s window after a 2 s warm-up; \
                         then the same while another session's insert stays uncommitted",
                        window.as_secs()
                    )),
            );
        }
    }
    pool.close().await;
    bench.drop_db(OURS, workload).await;
    Ok(())
}

/// Archive growth and pruning: an archive as a long run leaves it (`burn_jobs` x 5 rows, eight
/// days old), its size without retention and after `prune`, and burn-down with and without
/// pruning running at the same time.
async fn retention(
    bench: &mut Bench,
    pool: &PgPool,
    s: &PgmqStorage<BenchJob>,
    p: &Params,
) -> Res<()> {
    let q = s.queue().name().as_str().to_owned();
    let old_rows = p.burn_jobs * 5;
    let size = |pool: PgPool, q: String| async move {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
            "SELECT pg_total_relation_size('pgmq.a_{q}')"
        )))
        .fetch_one(&pool)
        .await
    };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO pgmq.a_{q} (msg_id, read_ct, enqueued_at, vt, message, archived_at) \
         SELECT -g, 1, now() - interval '8 days', now() - interval '8 days', \
                jsonb_build_object('t', g, 'pad', repeat('x', 40)), now() - interval '8 days' \
         FROM generate_series(1, {old_rows}) g"
    )))
    .execute(pool)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE pgmq.a_{q}")))
        .execute(pool)
        .await?;
    let unpruned = size(pool.clone(), q.clone()).await?;
    // Burn-down alone, then with pruning of the old rows running alongside.
    let mut rates = Vec::new();
    let mut prune_secs = 0.0;
    let mut pruned_rows = 0usize;
    for with_prune in [false, true] {
        let mut sink = s.clone();
        let mut left = p.burn_jobs;
        while left > 0 {
            let n = left.min(1000);
            sink.push_bulk((0..n).map(|_| job(0)).collect()).await?;
            left -= n;
        }
        let counters = Arc::new(Counters::default());
        let start = Instant::now();
        let (stop, joins) = spawn_bench_workers!(s.clone(), p.workers, p.concurrency, counters);
        let pruner = with_prune.then(|| {
            let (pool, name) = (pool.clone(), s.queue().name().clone());
            tokio::spawn(async move {
                let t = Instant::now();
                let r = apalis_pgmq_notify::prune(
                    &pool,
                    &name,
                    Some(Duration::from_secs(7 * 86_400)),
                    None,
                )
                .await;
                (
                    t.elapsed().as_secs_f64(),
                    r.map(|p| p.archived).unwrap_or(0),
                )
            })
        });
        wait_done(&counters, p.burn_jobs, Duration::from_secs(600)).await;
        let secs = start.elapsed().as_secs_f64();
        stop_workers(stop, joins).await;
        rates.push(counters.done() as f64 / secs);
        if let Some(pruner) = pruner {
            let (t, n) = pruner.await?;
            prune_secs = t;
            pruned_rows = n;
        }
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM pgmq.a_{q}")))
        .execute(pool)
        .await?;
    let live: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM pgmq.a_{q}"
    )))
    .fetch_one(pool)
    .await?;
    let after = size(pool.clone(), q.clone()).await?;
    bench.emit(
        Record::new(OURS, "retention")
            .value("old_rows", old_rows as f64)
            .value("archive_mb_unpruned", unpruned as f64 / 1e6)
            .value("archive_mb_after_prune", after as f64 / 1e6)
            .value("archive_rows_after_prune", live as f64)
            .value("pruned_rows", pruned_rows as f64)
            .value(
                "prune_rows_per_sec",
                pruned_rows as f64 / prune_secs.max(1e-9),
            )
            .value("burn_down_per_sec", rates[0])
            .value("burn_down_while_pruning_per_sec", rates[1])
            .value("while_pruning_ratio", rates[1] / rates[0])
            .note(format!(
                "{old_rows} archived rows 8 days old; prune keeps 7 days (batches of 10 000); \
                 size after VACUUM (space is reused, not returned to the OS)"
            )),
    );
    Ok(())
}

fn notify_record(system: &str, on: f64, off: f64, producers: usize) -> Record {
    Record::new(system, "notify_cost")
        .value("on_per_sec", on)
        .value("off_per_sec", off)
        .value("ratio", on / off)
        .note(format!(
            "{producers} producers, single-row sends, a listener attached"
        ))
}

/// Parameters of one burn-down in the `growth` workload: one worker, `n` jobs.
fn one_worker(p: &Params, n: u64) -> Params {
    let mut p = p.clone();
    p.workers = 1;
    p.concurrency = p.one_worker_concurrency;
    p.burn_jobs = n;
    p
}

fn growth_value(rec: &mut Record, n: u64, burn: Option<&Record>) {
    if let Some(v) = burn.and_then(|r| r.values.get("jobs_per_sec")) {
        rec.values.insert(format!("jobs_per_sec_{n}"), *v);
    }
}

async fn run_apalis_pg(bench: &mut Bench, system: &str, workload: &str) -> Res<()> {
    if matches!(
        workload,
        "retention" | "breakdown" | "delayed_pickup" | "far" | "held_snapshot"
    ) {
        return Ok(()); // this crate only
    }
    if workload == "growth" {
        let mut rec = Record::new(system, "growth");
        for n in bench.params.growth_jobs.clone() {
            let p = one_worker(&bench.params, n);
            let (_opts, pool) = bench.fresh_db(system, workload).await?;
            let poll = if system == PG_PLAIN {
                Duration::from_millis(p.poll_ms)
            } else {
                Duration::from_secs(30)
            };
            let s = apalis_pg(&pool, &p, poll).await?;
            let mut records = Vec::new();
            let emit = |r: Record| records.push(r);
            if system == PG_PLAIN {
                apalis_workload!(
                    p,
                    emit,
                    system,
                    "burn_down",
                    &pool,
                    s.clone(),
                    s.clone(),
                    true
                )?;
            } else {
                apalis_workload!(
                    p,
                    emit,
                    system,
                    "burn_down",
                    &pool,
                    s.clone().with_pubsub(),
                    s.clone(),
                    false
                )?;
            }
            growth_value(&mut rec, n, records.first());
            pool.close().await;
            bench.drop_db(system, workload).await;
        }
        bench.emit(rec.note(format!(
            "one worker, concurrency {}, batch {}",
            bench.params.one_worker_concurrency, bench.params.batch_size
        )));
        return Ok(());
    }
    let (_opts, pool) = bench.fresh_db(system, workload).await?;
    let p = bench.params.clone();
    let poll = if system == PG_PLAIN {
        Duration::from_millis(p.poll_ms)
    } else {
        Duration::from_secs(30)
    };
    let s = apalis_pg(&pool, &p, poll).await?;
    if workload == "results" {
        if system == PG_NOTIFY {
            let counters = Arc::new(Counters::default());
            let (stop, joins) =
                spawn_bench_workers!(s.clone().with_pubsub(), 1usize, 10usize, counters);
            let r = results::apalis_postgres(s.clone(), &p, system).await;
            stop_workers(stop, joins).await;
            bench.emit(r?);
        }
        pool.close().await;
        bench.drop_db(system, workload).await;
        return Ok(());
    }
    if workload == "notify_cost" {
        if system != PG_PLAIN {
            pool.close().await;
            bench.drop_db(system, workload).await;
            return Ok(()); // the trigger is the same in both modes: measured once
        }
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen("apalis::job::insert").await?;
        let drain = tokio::spawn(async move { while listener.recv().await.is_ok() {} });
        let push = {
            let s = s.clone();
            move || {
                let mut s = s.clone();
                async move { s.push(job(0)).await }
            }
        };
        sqlx::query("DROP TRIGGER IF EXISTS notify_workers ON apalis.jobs")
            .execute(&pool)
            .await?;
        let off = max_push_rate(p.notify_secs, p.notify_producers, push.clone()).await;
        sqlx::query(
            "CREATE TRIGGER notify_workers AFTER INSERT ON apalis.jobs \
             FOR EACH ROW EXECUTE FUNCTION apalis.notify_new_jobs()",
        )
        .execute(&pool)
        .await?;
        let on = max_push_rate(p.notify_secs, p.notify_producers, push).await;
        drain.abort();
        bench.emit(
            notify_record("apalis-postgres", on, off, p.notify_producers).note(format!(
                "{} producers, per-row NOTIFY trigger (same in both modes), a listener attached",
                p.notify_producers
            )),
        );
    } else {
        let mut records = Vec::new();
        let emit = |r: Record| records.push(r);
        if system == PG_PLAIN {
            apalis_workload!(p, emit, system, workload, &pool, s.clone(), s.clone(), true)?;
        } else {
            apalis_workload!(
                p,
                emit,
                system,
                workload,
                &pool,
                s.clone().with_pubsub(),
                s.clone(),
                false
            )?;
        }
        records.into_iter().for_each(|r| bench.emit(r));
    }
    pool.close().await;
    bench.drop_db(system, workload).await;
    Ok(())
}

// ---------------------------------------------------------------- raw SQL ceiling

async fn run_raw(bench: &mut Bench, workload: &str) -> Res<()> {
    if workload == "breakdown" {
        // The PGMQ-shaped ceiling at each claim size, one run each.
        let mut p = bench.params.clone();
        for claim in p.breakdown_claims.clone() {
            p.batch_size = claim;
            let saved = std::mem::replace(&mut bench.params, p.clone());
            let n = bench.records.len();
            let r = Box::pin(run_raw(bench, "burn_down")).await;
            bench.params = saved;
            r?;
            for rec in &mut bench.records[n..] {
                rec.workload = format!("{}_claim_{claim}", rec.workload);
            }
        }
        return Ok(());
    }
    if !matches!(workload, "burn_down" | "enqueue" | "notify_cost") {
        return Ok(());
    }
    let (_opts, pool) = bench.fresh_db(RAW, workload).await?;
    let p = bench.params.clone();
    apalis_pgmq_notify::setup(&pool).await?;
    let q = PgmqQueue::new(QueueName::new("raw")?);
    q.create(&pool).await?;
    const SEND_MANY: &str = "INSERT INTO pgmq.q_raw (vt, message) \
        SELECT clock_timestamp(), m FROM unnest($1::jsonb[]) AS t(m)";
    const SEND_ONE: &str = "INSERT INTO pgmq.q_raw (vt, message) VALUES (clock_timestamp(), $1)";
    let body = json!({"t": 0});
    match workload {
        "burn_down" => {
            let mut left = p.burn_jobs;
            while left > 0 {
                let n = left.min(1000);
                let batch: Vec<serde_json::Value> = (0..n).map(|_| body.clone()).collect();
                sqlx::query(SEND_MANY).bind(batch).execute(&pool).await?;
                left -= n;
            }
            // PGMQ-shaped: claim a batch the way pgmq.read does (FOR UPDATE SKIP LOCKED, set
            // vt, read_ct + 1), then archive it the way pgmq.archive does; no job framework.
            const CLAIM: &str = "WITH c AS (SELECT msg_id FROM pgmq.q_raw \
                  WHERE vt <= clock_timestamp() ORDER BY msg_id LIMIT $1 FOR UPDATE SKIP LOCKED) \
                UPDATE pgmq.q_raw m SET vt = clock_timestamp() + interval '30 seconds', \
                  read_ct = read_ct + 1, last_read_at = clock_timestamp() \
                FROM c WHERE m.msg_id = c.msg_id RETURNING m.msg_id";
            const ARCHIVE: &str = "WITH d AS (DELETE FROM pgmq.q_raw WHERE msg_id = ANY($1) \
                  RETURNING msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers) \
                INSERT INTO pgmq.a_raw (msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers) \
                SELECT * FROM d";
            // The pop-style variant: one statement deleting and archiving (no lease at all).
            const POP_ARCHIVE: &str = "WITH c AS (SELECT msg_id FROM pgmq.q_raw \
                  WHERE vt <= clock_timestamp() ORDER BY msg_id LIMIT $1 FOR UPDATE SKIP LOCKED), \
                d AS (DELETE FROM pgmq.q_raw q USING c WHERE q.msg_id = c.msg_id RETURNING q.*) \
                INSERT INTO pgmq.a_raw (msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers) \
                SELECT msg_id, read_ct + 1, enqueued_at, clock_timestamp(), vt, message, headers FROM d";
            let consumers = p.workers * 2;
            for (variant, pop) in [("burn_down", false), ("burn_down_pop", true)] {
                if pop {
                    let mut left = p.burn_jobs;
                    while left > 0 {
                        let n = left.min(1000);
                        let batch: Vec<serde_json::Value> = (0..n).map(|_| body.clone()).collect();
                        sqlx::query(SEND_MANY).bind(batch).execute(&pool).await?;
                        left -= n;
                    }
                }
                let start = Instant::now();
                let mut handles = Vec::new();
                for _ in 0..consumers {
                    let pool = pool.clone();
                    let batch = p.batch_size as i64;
                    handles.push(tokio::spawn(async move {
                        let mut n = 0u64;
                        loop {
                            let step = if pop {
                                sqlx::query(POP_ARCHIVE)
                                    .bind(batch)
                                    .execute(&pool)
                                    .await
                                    .map(|r| r.rows_affected())
                            } else {
                                match sqlx::query_scalar::<_, i64>(CLAIM)
                                    .bind(batch)
                                    .fetch_all(&pool)
                                    .await
                                {
                                    Ok(ids) if ids.is_empty() => Ok(0),
                                    Ok(ids) => sqlx::query(ARCHIVE)
                                        .bind(ids)
                                        .execute(&pool)
                                        .await
                                        .map(|r| r.rows_affected()),
                                    Err(e) => Err(e),
                                }
                            };
                            match step {
                                Ok(0) => break n,
                                Ok(k) => n += k,
                                Err(e) => {
                                    eprintln!("raw consumer: {e}");
                                    break n;
                                }
                            }
                        }
                    }));
                }
                let mut done = 0;
                for h in handles {
                    done += h.await.unwrap_or(0);
                }
                let secs = start.elapsed().as_secs_f64();
                bench.emit(
                    Record::new(RAW, variant)
                        .value("jobs", done as f64)
                        .value("secs", secs)
                        .value("jobs_per_sec", done as f64 / secs)
                        .note(if pop {
                            format!("{consumers} connections: one DELETE ... archive statement per {} (pop, no lease)", p.batch_size)
                        } else {
                            format!("{consumers} connections: claim {} like pgmq.read, then archive like pgmq.archive", p.batch_size)
                        }),
                );
            }
        }
        "enqueue" => {
            let start = Instant::now();
            for _ in 0..p.enqueue_single {
                sqlx::query(SEND_ONE).bind(&body).execute(&pool).await?;
            }
            let single = p.enqueue_single as f64 / start.elapsed().as_secs_f64();
            let start = Instant::now();
            for _ in 0..p.enqueue_bulk_batches {
                let batch: Vec<serde_json::Value> =
                    (0..p.bulk_size).map(|_| body.clone()).collect();
                sqlx::query(SEND_MANY).bind(batch).execute(&pool).await?;
            }
            let bulk =
                (p.enqueue_bulk_batches * p.bulk_size) as f64 / start.elapsed().as_secs_f64();
            bench.emit(
                Record::new(RAW, "enqueue")
                    .value("single_per_sec", single)
                    .value("bulk_per_sec", bulk)
                    .note("one INSERT per job / one INSERT ... unnest per batch"),
            );
        }
        _ => {
            let push = {
                let pool = pool.clone();
                let body = body.clone();
                move || {
                    let pool = pool.clone();
                    let body = body.clone();
                    async move {
                        sqlx::query(SEND_ONE)
                            .bind(body)
                            .execute(&pool)
                            .await
                            .map(|_| ())
                    }
                }
            };
            let off = max_push_rate(p.notify_secs, p.notify_producers, push).await;
            bench.emit(
                Record::new(RAW, "notify_cost")
                    .value("off_per_sec", off)
                    .note("single-row INSERT, no trigger"),
            );
        }
    }
    pool.close().await;
    bench.drop_db(RAW, workload).await;
    Ok(())
}

// ---------------------------------------------------------------- apalis-pgmq (subprocess)

/// Runs the earlier harness for one of this crate's workloads with `--set key=value`
/// overrides; returns the records it printed for that workload.
async fn run_earlier(bin: &str, workload: &str, sets: &[(&str, String)]) -> Res<Vec<Record>> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["--systems", OURS, "--workloads", workload]);
    for (k, v) in sets {
        cmd.args(["--set", &format!("{k}={v}")]);
    }
    let out = cmd
        .env("DATABASE_URL", std::env::var("DATABASE_URL")?)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("BENCH "))
        .filter_map(|j| serde_json::from_str::<Record>(j).ok())
        .filter(|r| r.workload == workload)
        .collect())
}

/// This crate at an earlier commit (`scripts/bench.sh --baseline REV`), run by that commit's
/// own harness against the same server: `growth` as its burn-down with one worker at each size
/// (the default claim size of the time), and the workloads it knows with the same parameters.
async fn run_baseline(bench: &mut Bench, workload: &str) -> Res<()> {
    if !matches!(
        workload,
        "growth" | "pickup" | "idle_cost" | "burn_down" | "held_snapshot"
    ) {
        return Ok(());
    }
    let Some(bin) = bench.baseline_bin.clone() else {
        eprintln!("baseline: skipped (scripts/bench.sh --baseline REV builds it)");
        return Ok(());
    };
    let p = &bench.params;
    if workload != "growth" {
        let sets = [
            ("burn_jobs", p.burn_jobs.to_string()),
            ("pickup_samples", p.pickup_samples.to_string()),
            ("idle_secs", p.idle_secs.to_string()),
            ("snapshot_rate", p.snapshot_rate.to_string()),
            ("snapshot_concurrency", p.snapshot_concurrency.to_string()),
            ("snapshot_before_secs", p.snapshot_before_secs.to_string()),
            ("snapshot_hold_secs", p.snapshot_hold_secs.to_string()),
            ("snapshot_after_secs", p.snapshot_after_secs.to_string()),
            ("snapshot_window_secs", p.snapshot_window_secs.to_string()),
        ];
        for mut r in run_earlier(&bin, workload, &sets).await? {
            r.system = BASELINE.to_owned();
            bench.emit(r);
        }
        return Ok(());
    }
    let mut rec = Record::new(BASELINE, "growth");
    for n in p.growth_jobs.clone() {
        let one = one_worker(&bench.params, n);
        let sets = [
            ("workers", one.workers.to_string()),
            ("concurrency", one.concurrency.to_string()),
            ("burn_jobs", n.to_string()),
        ];
        let burn = run_earlier(&bin, "burn_down", &sets).await?;
        growth_value(&mut rec, n, burn.first());
    }
    bench.emit(rec.note(format!(
        "this crate at {}: 1 worker x concurrency {}, its default claim size",
        std::env::var("APQ_BASELINE_REV").unwrap_or_default(),
        bench.params.one_worker_concurrency
    )));
    Ok(())
}

async fn run_peer(bench: &mut Bench, system: &str, workload: &str) -> Res<()> {
    if matches!(
        workload,
        "retention"
            | "growth"
            | "breakdown"
            | "delayed_pickup"
            | "far"
            | "unique_enqueue"
            | "priorities"
            | "results"
            | "held_snapshot"
    ) {
        // This crate only; apalis-pgmq is 4-8x slower than apalis-postgres in every run, so the
        // growth comparison is against apalis-postgres.
        return Ok(());
    }
    let Some(bin) = bench.peer_bin.clone() else {
        eprintln!("{system}: skipped (no --peer-bin; build bench/pgmq-peer)");
        return Ok(());
    };
    let (opts, pool) = bench.fresh_db(system, workload).await?;
    // apalis-pgmq expects PGMQ to be installed already: install it the same way for everyone.
    apalis_pgmq_notify::setup(&pool).await?;
    pool.close().await;
    let url = format!(
        "postgres://{}@{}:{}/{}",
        opts.get_username(),
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or_default()
    );
    let out = tokio::process::Command::new(&bin)
        .args([
            "--system",
            system,
            "--workload",
            workload,
            "--database-url",
            &url,
            "--params",
            &serde_json::to_string(&bench.params)?,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .await?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(json) = line.strip_prefix("BENCH ")
            && let Ok(r) = serde_json::from_str::<Record>(json)
        {
            bench.emit(r);
        }
    }
    if !out.status.success() {
        eprintln!("{system} {workload}: peer exited with {}", out.status);
    }
    bench.drop_db(system, workload).await;
    Ok(())
}

// ---------------------------------------------------------------- report

fn table(records: &[Record]) {
    let metrics: &[(&str, &str, &str)] = &[
        ("burn_down", "jobs_per_sec", "burn-down, jobs/s"),
        (
            "burn_down_pop",
            "jobs_per_sec",
            "burn-down, pop without lease, jobs/s",
        ),
        ("enqueue", "single_per_sec", "enqueue single, jobs/s"),
        ("enqueue", "bulk_per_sec", "enqueue bulk, jobs/s"),
        ("pickup", "p50_ms", "idle pickup p50, ms"),
        ("pickup", "p95_ms", "idle pickup p95, ms"),
        ("pickup", "p99_ms", "idle pickup p99, ms"),
        ("pickup", "max_ms", "idle pickup max, ms"),
        ("idle_cost", "per_sec", "idle cost, queries/s/worker"),
        (
            "idle_long",
            "per_sec",
            "idle cost over several polls, statements/s",
        ),
        (
            "idle_long",
            "open_tx_per_sec",
            "the same, a writer's transaction open, statements/s",
        ),
        (
            "sustained",
            "achieved_per_sec",
            "sustained: achieved jobs/s",
        ),
        ("sustained", "p50_ms", "sustained pickup p50, ms"),
        ("sustained", "p99_ms", "sustained pickup p99, ms"),
        ("notify_cost", "on_per_sec", "producer with NOTIFY, jobs/s"),
        ("notify_cost", "off_per_sec", "producer without, jobs/s"),
        ("notify_cost", "ratio", "NOTIFY on / off"),
        ("notify_cost", "always_ratio", "always-notify on / off"),
        (
            "retention",
            "archive_mb_unpruned",
            "archive, MB, old rows kept",
        ),
        (
            "retention",
            "archive_mb_after_prune",
            "archive, MB, after prune + VACUUM",
        ),
        ("retention", "prune_rows_per_sec", "prune, rows/s"),
        (
            "growth",
            "jobs_per_sec_20000",
            "burn-down 1 worker, 20 000 jobs, jobs/s",
        ),
        (
            "growth",
            "jobs_per_sec_200000",
            "burn-down 1 worker, 200 000 jobs, jobs/s",
        ),
        (
            "growth",
            "jobs_per_sec_2000000",
            "burn-down 1 worker, 2 000 000 jobs, jobs/s",
        ),
        ("far", "share_5ms", "far database 5 ms, share of ideal"),
        ("far", "share_50ms", "far database 50 ms, share of ideal"),
        (
            "delayed_pickup",
            "p50_ratio",
            "pickup p50 behind 1M delayed / empty",
        ),
        ("unique_enqueue", "keyed_ratio", "push with a key / without"),
        ("priorities", "ratio", "burn-down, mixed priorities / none"),
        ("results", "keep_ratio", "burn-down keeping results / not"),
        (
            "results",
            "push_and_wait_p50_ms",
            "push and wait for the result, p50 ms",
        ),
        (
            "results",
            "many_waiters_calls_per_sec",
            "callers waiting at once, calls/s",
        ),
        (
            "retention",
            "burn_down_per_sec",
            "burn-down, jobs/s (no pruning)",
        ),
        (
            "retention",
            "burn_down_while_pruning_per_sec",
            "burn-down while pruning, jobs/s",
        ),
    ];
    let systems: Vec<&str> = ALL_SYSTEMS
        .iter()
        .copied()
        .filter(|s| records.iter().any(|r| r.system == *s))
        .collect();
    print!("\n| metric |");
    for s in &systems {
        print!(" {s} |");
    }
    println!();
    print!("|---|");
    for _ in &systems {
        print!("---:|");
    }
    println!();
    for (workload, key, label) in metrics {
        let row: Vec<String> = systems
            .iter()
            .map(|s| {
                records
                    .iter()
                    .find(|r| r.system == *s && r.workload == *workload)
                    .and_then(|r| r.values.get(*key))
                    .map_or("–".to_owned(), |v| fmt_num(*v))
            })
            .collect();
        if row.iter().all(|c| c == "–") {
            continue;
        }
        println!("| {label} | {} |", row.join(" | "));
    }
    println!();
    // Ratios to the best peer and to the ceiling.
    let get = |s: &str, w: &str, k: &str| {
        records
            .iter()
            .find(|r| r.system == s && r.workload == w)
            .and_then(|r| r.values.get(k).copied())
    };
    if let Some(ours) = get(OURS, "burn_down", "jobs_per_sec") {
        let best_peer = [PG_PLAIN, PG_NOTIFY, PGMQ_PLAIN, PGMQ_NOTIFY]
            .iter()
            .filter_map(|s| get(s, "burn_down", "jobs_per_sec").map(|v| (*s, v)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((peer, v)) = best_peer {
            println!("burn-down: {:.2}x the best peer ({peer})", ours / v);
        }
        if let Some(raw) = get(RAW, "burn_down", "jobs_per_sec") {
            println!(
                "burn-down: {:.0}% of the raw SQL ceiling",
                100.0 * ours / raw
            );
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "–".to_owned()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[tokio::main]
async fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let mut params = Params::default();
    let mut systems: Vec<String> = ALL_SYSTEMS.iter().map(|s| (*s).to_owned()).collect();
    let mut workloads: Vec<String> = ALL_WORKLOADS.iter().map(|s| (*s).to_owned()).collect();
    let mut peer_bin = std::env::var("APQ_PEER_BIN").ok();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => params = Params::quick(),
            "--systems" => {
                systems = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::to_owned)
                    .collect()
            }
            "--workloads" => {
                workloads = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::to_owned)
                    .collect()
            }
            "--peer-bin" => peer_bin = args.next(),
            "--set" => {
                // --set key=value overrides one parameter, e.g. --set burn_jobs=100000
                let kv = args.next().unwrap_or_default();
                let (k, v) = kv.split_once('=').ok_or("--set needs key=value")?;
                let mut json = serde_json::to_value(&params)?;
                json[k] = serde_json::from_str(v)?;
                params = serde_json::from_value(json)?;
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set")?;
    let admin = PgConnectOptions::from_str(&url)?;
    let mut bench = Bench {
        admin,
        params,
        peer_bin,
        baseline_bin: std::env::var("APQ_BASELINE_BIN").ok(),
        records: Vec::new(),
    };
    shared::anchor();
    eprintln!("params: {}", serde_json::to_string(&bench.params)?);
    for workload in &workloads {
        for system in &systems {
            eprintln!("== {system} / {workload}");
            let result = match system.as_str() {
                OURS => run_ours(&mut bench, workload).await,
                PG_PLAIN | PG_NOTIFY => run_apalis_pg(&mut bench, system, workload).await,
                BASELINE => run_baseline(&mut bench, workload).await,
                PGMQ_PLAIN | PGMQ_NOTIFY => run_peer(&mut bench, system, workload).await,
                RAW => run_raw(&mut bench, workload).await,
                other => Err(format!("unknown system {other}").into()),
            };
            if let Err(e) = result {
                eprintln!("{system} / {workload} failed: {e}");
                bench.emit(Record::new(system, workload).note(format!("failed: {e}")));
            }
        }
    }
    let by_system: BTreeMap<&str, usize> =
        bench.records.iter().fold(BTreeMap::new(), |mut m, r| {
            *m.entry(r.system.as_str()).or_default() += 1;
            m
        });
    eprintln!("records per system: {by_system:?}");
    table(&bench.records);
    Ok(())
}
