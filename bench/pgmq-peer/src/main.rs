//! Runs the benchmark workloads against apalis-pgmq 0.1.0-rc.5 (apalis-core 1.0.0-rc.10), for
//! the main harness in `bench/`, which creates the database and reads the `BENCH` lines.
//!
//! `apalis-pgmq-peer-bench --system apalis-pgmq|apalis-pgmq+notify --workload W
//!  --database-url URL --params JSON`

#[path = "../../src/shared.rs"]
mod shared;

use std::{sync::Arc, time::Duration, time::Instant};

use apalis::layers::WorkerBuilderExt;
use apalis_core::{
    backend::{TaskSink, ext::BackendExt},
    error::BoxDynError,
    task::data::Data,
    worker::builder::WorkerBuilder,
};
use apalis_pgmq::{Config, PGMQueue};
use futures::StreamExt;
use shared::{
    BenchJob, Counters, Params, Record, gap, latency_values, max_push_rate, now_micros,
    offered_load, stop_workers, wait_done,
};
use sqlx::{PgPool, postgres::PgListener};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn job(t: u64) -> BenchJob {
    BenchJob { t }
}

async fn statement_count(pool: &PgPool) -> (f64, &'static str) {
    let statements: Result<i64, _> = sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND query NOT ILIKE '%pg_stat%'",
    )
    .fetch_one(pool)
    .await;
    match statements {
        Ok(n) => (n as f64, "statements (pg_stat_statements)"),
        Err(_) => (f64::NAN, "unavailable"),
    }
}

/// A stream of PGMQ's insert notifications for the queue (after `pgmq.enable_notify_insert`).
async fn insert_stream(
    pool: &PgPool,
) -> Res<std::pin::Pin<Box<dyn futures::Stream<Item = ()> + Send>>> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen("pgmq.q_bench.INSERT").await?;
    Ok(Box::pin(listener.into_stream().map(|_| ())))
}

#[tokio::main]
async fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let (mut system, mut workload, mut url, mut params) =
        (String::new(), String::new(), String::new(), Params::default());
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--system" => system = v,
            "--workload" => workload = v,
            "--database-url" => url = v,
            "--params" => params = serde_json::from_str(&v)?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    shared::anchor();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(20)
        .connect(&url)
        .await?;
    let p = params;
    let notify = system.ends_with("+notify");
    PGMQueue::setup(&pool).await?;
    let config = Config::default()
        .queue("bench")
        .batch_size(p.batch_size)
        .heartbeat(Duration::from_millis(p.poll_ms));
    PGMQueue::create(&pool, &config).await?;
    let queue = PGMQueue::<BenchJob>::new(pool.clone()).with_config(config);
    let emit = |r: Record| r.emit();

    if workload == "notify_cost" {
        if notify {
            return Ok(()); // measured once, under the plain name
        }
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen("pgmq.q_bench.INSERT").await?;
        let drain = tokio::spawn(async move { while listener.recv().await.is_ok() {} });
        let push = {
            let q = queue.clone();
            move || {
                let mut q = q.clone();
                async move { q.push(job(0)).await }
            }
        };
        let off = max_push_rate(p.notify_secs, p.notify_producers, push.clone()).await;
        sqlx::query("SELECT pgmq.enable_notify_insert('bench')")
            .execute(&pool)
            .await?;
        let on = max_push_rate(p.notify_secs, p.notify_producers, push).await;
        drain.abort();
        emit(
            Record::new("apalis-pgmq", "notify_cost")
                .value("on_per_sec", on)
                .value("off_per_sec", off)
                .value("ratio", on / off)
                .note(format!(
                    "{} producers, PGMQ enable_notify_insert (250 ms throttle), a listener attached",
                    p.notify_producers
                )),
        );
        return Ok(());
    }
    if notify {
        sqlx::query("SELECT pgmq.enable_notify_insert('bench')")
            .execute(&pool)
            .await?;
        let workers = if matches!(workload.as_str(), "pickup" | "idle_cost") { 1 } else { p.workers };
        let mut streams = Vec::new();
        for _ in 0..workers {
            streams.push(insert_stream(&pool).await?);
        }
        apalis_workload!(
            p,
            emit,
            system.as_str(),
            workload.as_str(),
            &pool,
            queue.clone().poll_with_stream(streams.pop().ok_or("no stream")?),
            queue.clone(),
            false
        )?;
    } else {
        apalis_workload!(
            p,
            emit,
            system.as_str(),
            workload.as_str(),
            &pool,
            queue.clone(),
            queue.clone(),
            true
        )?;
    }
    Ok(())
}
