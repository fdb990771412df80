//! Throughput at default settings (issue 14): one worker the way an application runs it, where
//! the server's time goes per job, how the rate holds as the backlog grows, pickup behind many
//! delayed messages, and a database far away (a delay-injecting TCP proxy).

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_pgmq_notify::{Config as OurConfig, PgmqStorage, QueueName, Runtime};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::{
    Res,
    proxy::Proxy,
    shared::{
        BenchJob, Counters, Params, Record, gap, latency_values, now_micros, stop_workers,
        wait_done,
    },
    spawn_bench_workers,
};

/// Process CPU time (user + system) in seconds, from `/proc/self/stat`.
pub fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

async fn push_backlog(s: &PgmqStorage<BenchJob>, n: u64) -> Res<()> {
    let mut sink = s.clone();
    let mut left = n;
    while left > 0 {
        let k = left.min(5000);
        sink.push_bulk((0..k).map(|_| BenchJob { t: 0 }).collect())
            .await?;
        left -= k;
    }
    Ok(())
}

async fn storage(pool: &PgPool, name: &str, config: OurConfig) -> Res<PgmqStorage<BenchJob>> {
    let s = PgmqStorage::with_config(&Runtime::new(pool), QueueName::new(name)?, config)?;
    s.create_queue().await?;
    Ok(s)
}

/// Burns `jobs` down with one worker; returns jobs/s.
async fn burn(s: &PgmqStorage<BenchJob>, concurrency: usize, jobs: u64) -> Res<f64> {
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let (stop, joins) = spawn_bench_workers!(s.clone(), 1usize, concurrency, counters);
    let ok = wait_done(&counters, jobs, Duration::from_secs(1800)).await;
    let secs = start.elapsed().as_secs_f64();
    stop_workers(stop, joins).await;
    if !ok {
        return Err(format!("burn-down of {jobs} timed out").into());
    }
    Ok(counters.done() as f64 / secs)
}

/// Burn-down with the default configuration at each backlog size, one worker.
pub async fn growth(pool: &PgPool, p: &Params, system: &str) -> Res<Record> {
    let mut rec = Record::new(system, "growth");
    for &n in &p.growth_jobs {
        let s = storage(
            pool,
            &format!("growth_{n}"),
            OurConfig::default().recover_lost_claims(p.recover_lost),
        )
        .await?;
        push_backlog(&s, n).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "VACUUM ANALYZE pgmq.q_growth_{n}"
        )))
        .execute(pool)
        .await?;
        let rate = burn(&s, p.one_worker_concurrency, n).await?;
        rec = rec.value(&format!("jobs_per_sec_{n}"), rate);
        s.queue().drop_queue(pool).await.ok();
    }
    Ok(rec.note(format!(
        "one worker, concurrency {}, Config::default(){}, bulk-prefilled backlog",
        p.one_worker_concurrency,
        if p.recover_lost {
            ""
        } else {
            " without the claim log"
        }
    )))
}

/// Where the time goes per job at each claim size: statements, commits, WAL, server time
/// (pg_stat_statements, pg_stat_wal, pg_stat_database) and the client's CPU.
pub async fn breakdown(pool: &PgPool, p: &Params, system: &str) -> Res<Vec<Record>> {
    let mut out = Vec::new();
    let mut runs: Vec<(String, OurConfig)> = p
        .breakdown_claims
        .iter()
        .map(|&c| {
            (
                format!("claim {c} (fixed)"),
                OurConfig::default()
                    .fetch_batch_size(c)
                    .adaptive_claims(false),
            )
        })
        .collect();
    runs.push(("default (adaptive)".into(), OurConfig::default()));
    for (label, config) in runs {
        let name = format!("breakdown_{}", out.len());
        let s = storage(pool, &name, config).await?;
        let n = p.burn_jobs;
        push_backlog(&s, n).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE pgmq.q_{name}")))
            .execute(pool)
            .await?;
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(pool)
            .await?;
        sqlx::query("SELECT pg_stat_reset_shared('wal')")
            .execute(pool)
            .await?;
        let commits0: i64 = sqlx::query_scalar(
            "SELECT xact_commit::bigint FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(pool)
        .await?;
        let cpu0 = cpu_secs();
        let rate = burn(&s, p.one_worker_concurrency, n).await?;
        let cpu = cpu_secs() - cpu0;
        // Statistics are reported at the end of each transaction; give the backends a moment.
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(pool)
            .await
            .ok();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let commits1: i64 = sqlx::query_scalar(
            "SELECT xact_commit::bigint FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(pool)
        .await?;
        let wal: i64 = sqlx::query_scalar("SELECT wal_bytes::bigint FROM pg_stat_wal")
            .fetch_one(pool)
            .await?;
        let rows: Vec<(String, i64, i64, f64, i64)> = sqlx::query_as(
            "SELECT regexp_replace(left(query, 90), '\\s+', ' ', 'g'), calls, rows, \
                    total_exec_time, wal_bytes::bigint \
             FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND query NOT ILIKE '%pg_stat%' \
             ORDER BY total_exec_time DESC",
        )
        .fetch_all(pool)
        .await?;
        let (mut calls, mut exec_ms) = (0i64, 0.0f64);
        eprintln!("-- {label}: {n} jobs, {rate:.0} jobs/s");
        eprintln!("   calls    rows   exec ms  WAL kB  statement");
        for (q, c, r, t, w) in &rows {
            calls += c;
            exec_ms += t;
            if *c > 0 {
                eprintln!("{c:>8} {r:>7} {t:>9.1} {:>7} {q}", w / 1024);
            }
        }
        let jobs = n as f64;
        out.push(
            Record::new(system, "breakdown")
                .value("jobs_per_sec", rate)
                .value("statements_per_job", calls as f64 / jobs)
                .value("commits_per_job", (commits1 - commits0) as f64 / jobs)
                .value("wal_bytes_per_job", wal as f64 / jobs)
                .value("server_exec_us_per_job", exec_ms * 1000.0 / jobs)
                .value("client_cpu_us_per_job", cpu * 1e6 / jobs)
                .note(format!(
                    "{label}: one worker x concurrency {}, {n} jobs",
                    p.one_worker_concurrency
                )),
        );
        s.queue().drop_queue(pool).await.ok();
    }
    Ok(out)
}

/// Pickup latency on an idle worker, first with an empty queue, then with `delayed_jobs`
/// messages that are not visible yet (scheduled a day ahead).
pub async fn delayed_pickup(pool: &PgPool, p: &Params, system: &str) -> Res<Record> {
    let s = storage(pool, "delayed", OurConfig::default()).await?;
    let mut rec = Record::new(system, "delayed_pickup");
    for delayed in [0, p.delayed_jobs] {
        if delayed > 0 {
            sqlx::query(
                "INSERT INTO pgmq.q_delayed (vt, message) \
                 SELECT now() + interval '1 day', jsonb_build_object('t', 0) \
                 FROM generate_series(1, $1)",
            )
            .bind(delayed as i64)
            .execute(pool)
            .await?;
            sqlx::query("VACUUM ANALYZE pgmq.q_delayed")
                .execute(pool)
                .await?;
        }
        let counters = Arc::new(Counters::default());
        counters.record.store(true, Ordering::Relaxed);
        let (stop, joins) =
            spawn_bench_workers!(s.clone(), 1usize, p.one_worker_concurrency, counters);
        let mut sink = s.clone();
        sink.push(BenchJob { t: now_micros() }).await?;
        wait_done(&counters, 1, Duration::from_secs(60)).await;
        counters.take_latencies();
        let mut missed = 0;
        for i in 0..p.pickup_samples {
            tokio::time::sleep(gap(i, 20, 60)).await;
            let before = counters.done();
            sink.push(BenchJob { t: now_micros() }).await?;
            if !wait_done(&counters, before + 1, Duration::from_secs(35)).await {
                missed += 1;
            }
        }
        stop_workers(stop, joins).await;
        let lat = latency_values(counters.take_latencies());
        let key = if delayed == 0 { "empty" } else { "delayed" };
        for (k, v) in lat {
            rec = rec.value(&format!("{key}_{k}"), v);
        }
        rec = rec.value(&format!("{key}_missed"), missed as f64);
    }
    let ratio = rec
        .values
        .get("delayed_p50_ms")
        .copied()
        .unwrap_or(f64::NAN)
        / rec.values.get("empty_p50_ms").copied().unwrap_or(f64::NAN);
    s.queue().drop_queue(pool).await.ok();
    Ok(rec.value("p50_ratio", ratio).note(format!(
        "one idle worker; {} samples with an empty queue, then with {} messages scheduled a day ahead",
        p.pickup_samples, p.delayed_jobs
    )))
}

/// A database far away: every byte between the worker and PostgreSQL is delayed `d` ms each
/// way. One worker with `far_concurrency`, jobs of `far_job_ms`, a backlog larger than the
/// window can run; jobs/s over `far_secs` against concurrency / job time.
pub async fn far(opts: &PgConnectOptions, pool: &PgPool, p: &Params, system: &str) -> Res<Record> {
    let target: SocketAddr = format!("{}:{}", opts.get_host(), opts.get_port())
        .parse()
        .or_else(|_| format!("127.0.0.1:{}", opts.get_port()).parse())?;
    let ideal = p.far_concurrency as f64 * 1000.0 / p.far_job_ms as f64;
    let mut rec = Record::new(system, "far").value("ideal_per_sec", ideal);
    for &d in &p.far_delays_ms {
        let proxy = Proxy::start_delayed(target, Duration::from_millis(d)).await;
        let far_opts = opts.clone().host("127.0.0.1").port(proxy.port);
        let far_pool = PgPoolOptions::new()
            .max_connections(10)
            .connect_with(far_opts)
            .await?;
        let name = format!("far_{d}");
        let s = storage(pool, &name, OurConfig::default()).await?;
        let backlog = (ideal * p.far_secs as f64 * 1.5) as u64 + 1000;
        push_backlog(&s, backlog).await?;
        let worker_side: PgmqStorage<BenchJob> = PgmqStorage::with_config(
            &Runtime::new(&far_pool),
            QueueName::new(&name)?,
            OurConfig::default(),
        )?;
        let counters = Arc::new(Counters::default());
        counters.job_ms.store(p.far_job_ms, Ordering::Relaxed);
        let (stop, joins) =
            spawn_bench_workers!(worker_side.clone(), 1usize, p.far_concurrency, counters);
        // Measure after the first jobs ran (connections are open, the claim size has settled).
        wait_done(&counters, 1, Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (c0, t0) = (counters.done(), Instant::now());
        tokio::time::sleep(Duration::from_secs(p.far_secs)).await;
        let rate = (counters.done() - c0) as f64 / t0.elapsed().as_secs_f64();
        stop_workers(stop, joins).await;
        far_pool.close().await;
        drop(proxy);
        rec = rec
            .value(&format!("jobs_per_sec_{d}ms"), rate)
            .value(&format!("share_{d}ms"), rate / ideal);
        s.queue().drop_queue(pool).await.ok();
    }
    Ok(rec.note(format!(
        "one worker, concurrency {}, {} ms jobs, Config::default(), through a proxy delaying \
         each direction by {:?} ms; share = jobs/s / (concurrency / job time)",
        p.far_concurrency, p.far_job_ms, p.far_delays_ms
    )))
}

/// Enqueue cost of idempotency keys: single pushes on one connection without a key, with a
/// fresh key each, and with a key already taken (nothing written); three alternating rounds,
/// medians.
pub async fn unique_enqueue(pool: &PgPool, p: &Params, system: &str) -> Res<Record> {
    let s = storage(pool, "unique_enqueue", OurConfig::default()).await?;
    let mut conn = pool.acquire().await?;
    let n = p.enqueue_single;
    let (mut plain, mut keyed, mut taken) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..3u64 {
        let t = Instant::now();
        for _ in 0..n {
            s.push_task_with(&mut conn, TaskBuilder::new(BenchJob { t: 0 }).build())
                .await?;
        }
        plain.push(n as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for i in 0..n {
            let task = TaskBuilder::new(BenchJob { t: 0 })
                .idempotency_key(format!("k-{round}-{i}"))
                .build();
            s.push_task_with(&mut conn, task).await?;
        }
        keyed.push(n as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for i in 0..n {
            let task = TaskBuilder::new(BenchJob { t: 0 })
                .idempotency_key(format!("k-{round}-{i}"))
                .build();
            if !s.push_task_with(&mut conn, task).await?.is_duplicate() {
                return Err("a taken key was written again".into());
            }
        }
        taken.push(n as f64 / t.elapsed().as_secs_f64());
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (plain, keyed, taken) = (median(plain), median(keyed), median(taken));
    drop(conn);
    s.queue().drop_queue(pool).await.ok();
    Ok(Record::new(system, "unique_enqueue")
        .value("plain_per_sec", plain)
        .value("keyed_per_sec", keyed)
        .value("duplicate_per_sec", taken)
        .value("keyed_ratio", keyed / plain)
        .note(format!(
            "{n} sequential push_task_with on one connection, 3 alternating rounds, medians"
        )))
}

/// Burn-down with mixed priorities (0 to 3, sent by SQL as PGMQ producers would) and
/// `Config::priorities(true)`, against the same backlog without priorities and the default
/// configuration; three alternating rounds, medians.
pub async fn priorities(pool: &PgPool, p: &Params, system: &str) -> Res<Record> {
    let n = p.burn_jobs;
    let (mut plain, mut mixed) = (Vec::new(), Vec::new());
    for round in 0..3 {
        for with_priorities in [false, true] {
            let name = format!("prio_{round}_{with_priorities}");
            let config = OurConfig::default().priorities(with_priorities);
            let s = storage(pool, &name, config).await?;
            let headers = if with_priorities {
                "jsonb_build_object('apalis', jsonb_build_object('priority', g % 4))"
            } else {
                "NULL::jsonb"
            };
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO pgmq.q_{name} (vt, message, headers) \
                 SELECT clock_timestamp(), jsonb_build_object('t', 0), {headers} \
                 FROM generate_series(1, {n}) g"
            )))
            .execute(pool)
            .await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE pgmq.q_{name}")))
                .execute(pool)
                .await?;
            let rate = burn(&s, p.one_worker_concurrency, n).await?;
            if with_priorities {
                mixed.push(rate);
            } else {
                plain.push(rate);
            }
            s.queue().drop_queue(pool).await.ok();
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (plain, mixed) = (median(plain), median(mixed));
    Ok(Record::new(system, "priorities")
        .value("plain_per_sec", plain)
        .value("mixed_priorities_per_sec", mixed)
        .value("ratio", mixed / plain)
        .note(format!(
            "one worker, concurrency {}, {n} jobs; priorities 0-3 with Config::priorities(true) \
             vs none with the default; 3 alternating rounds, medians",
            p.one_worker_concurrency
        )))
}
