//! Job results (issue 13): what keeping them costs a burn-down, and how fast a caller gets a
//! job's result back — alone, and with many callers waiting at once — against apalis-postgres'
//! `WaitForCompletion`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_pgmq_notify::{Config as OurConfig, PgmqStorage, QueueName, Runtime};
use apalis_postgres::PostgresStorage;
use futures::StreamExt;
use sqlx::PgPool;

use crate::{
    Res,
    shared::{BenchJob, Counters, Params, Record, latency_values, stop_workers, wait_done},
    spawn_bench_workers,
};

async fn storage(pool: &PgPool, name: &str, config: OurConfig) -> Res<PgmqStorage<BenchJob>> {
    let s = PgmqStorage::with_config(&Runtime::new(pool), QueueName::new(name)?, config)?;
    s.create_queue().await?;
    Ok(s)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// This crate: burn-down with `store_results` off and on (three alternating rounds, medians),
/// `push_and_wait` latency with an idle worker, and many callers waiting at once.
pub async fn ours(pool: &PgPool, p: &Params, system: &str) -> Res<Record> {
    let n = p.burn_jobs;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..3 {
        for keep in [false, true] {
            let name = format!("results_burn_{round}_{keep}");
            let s = storage(pool, &name, OurConfig::default().store_results(keep)).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO pgmq.q_{name} (vt, message) \
                 SELECT clock_timestamp(), jsonb_build_object('t', 0) FROM generate_series(1, {n})"
            )))
            .execute(pool)
            .await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE pgmq.q_{name}")))
                .execute(pool)
                .await?;
            let counters = Arc::new(Counters::default());
            let start = Instant::now();
            let (stop, joins) =
                spawn_bench_workers!(s.clone(), 1usize, p.one_worker_concurrency, counters);
            let ok = wait_done(&counters, n, Duration::from_secs(1800)).await;
            let rate = counters.done() as f64 / start.elapsed().as_secs_f64();
            stop_workers(stop, joins).await;
            if !ok {
                return Err("results burn-down timed out".into());
            }
            if keep {
                let kept: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM apalis_pgmq.results WHERE queue = $1")
                        .bind(&name)
                        .fetch_one(pool)
                        .await?;
                if kept as u64 != n {
                    return Err(format!("{kept} results kept for {n} jobs").into());
                }
                on.push(rate);
            } else {
                off.push(rate);
            }
            s.queue().drop_queue(pool).await.ok();
        }
    }
    let (off, on) = (median(off), median(on));

    // One caller at a time, an idle worker: push, run, keep, announce, read.
    let s = storage(pool, "results_wait", OurConfig::default()).await?;
    let counters = Arc::new(Counters::default());
    let (stop, joins) = spawn_bench_workers!(s.clone(), 1usize, 10usize, counters);
    for _ in 0..10 {
        s.push_and_wait::<()>(
            apalis::prelude::TaskBuilder::new(BenchJob { t: 0 }).build(),
            Duration::from_secs(30),
        )
        .await?;
    }
    let mut samples = Vec::with_capacity(p.result_calls);
    for _ in 0..p.result_calls {
        let t = Instant::now();
        let r = s
            .push_and_wait::<()>(
                apalis::prelude::TaskBuilder::new(BenchJob { t: 0 }).build(),
                Duration::from_secs(30),
            )
            .await?;
        samples.push(t.elapsed().as_micros() as u64);
        if r.status != Status::Done {
            return Err(format!("unexpected status {:?}", r.status).into());
        }
    }
    let lat = latency_values(samples);

    // Many callers at once, all waiting through the one listener.
    let t = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..p.result_waiters {
        let s = s.clone();
        calls.spawn(async move {
            s.push_and_wait::<()>(
                apalis::prelude::TaskBuilder::new(BenchJob { t: 0 }).build(),
                Duration::from_secs(300),
            )
            .await
        });
    }
    while let Some(r) = calls.join_next().await {
        r??;
    }
    let many_secs = t.elapsed().as_secs_f64();
    stop_workers(stop, joins).await;
    s.queue().drop_queue(pool).await.ok();

    let mut rec = Record::new(system, "results")
        .value("burn_down_per_sec", off)
        .value("burn_down_keeping_results_per_sec", on)
        .value("keep_ratio", on / off)
        .value(
            "many_waiters_calls_per_sec",
            p.result_waiters as f64 / many_secs,
        );
    for (k, v) in lat {
        rec = rec.value(&format!("push_and_wait_{k}"), v);
    }
    Ok(rec.note(format!(
        "burn-down: one worker x {}, {n} jobs, store_results off/on, 3 alternating rounds, \
         medians; push_and_wait: {} sequential calls to an idle worker (x10), then {} callers at once",
        p.one_worker_concurrency, p.result_calls, p.result_waiters
    )))
}

/// apalis-postgres (its workers started by the caller): push, then `wait_for_single`, which
/// reads the result table every 500 ms until it is there.
pub async fn apalis_postgres(
    s: PostgresStorage<BenchJob>,
    p: &Params,
    system: &str,
) -> Res<Record> {
    let calls = (p.result_calls / 10).max(10);
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        let mut sink = s.clone();
        let task = TaskBuilder::new(BenchJob { t: 0 })
            .task_id(TaskId::from_ulid(ulid::Ulid::generate()))
            .build();
        let id = task.task_id().cloned().ok_or("no task id")?;
        sink.push_task(task).await?;
        let mut waiter = s.clone();
        let mut stream = WaitForCompletion::<()>::wait_for_single(&mut waiter, id);
        let r = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await?
            .ok_or("no result")??;
        samples.push(t.elapsed().as_micros() as u64);
        if r.status != Status::Done {
            return Err(format!("unexpected status {:?}", r.status).into());
        }
    }
    let mut rec = Record::new(system, "results");
    for (k, v) in latency_values(samples) {
        rec = rec.value(&format!("push_and_wait_{k}"), v);
    }
    Ok(rec.note(format!(
        "{calls} sequential push + wait_for_single calls to an idle worker (x10)"
    )))
}
