//! A cron schedule that fires once per tick however many replicas run it.
//!
//! Every replica runs the same `apalis-cron` schedule and pushes each tick into one queue with
//! the idempotency key `<schedule>:<tick timestamp>`: the first push of a tick writes the job,
//! the others find the key taken and write nothing. `Config::idempotency_window` keeps the key
//! taken after the job ran, so a replica whose clock or scheduler lags cannot enqueue a tick
//! that already ran. A worker (on any replica) runs each job once.
//!
//! Ticks that fall while every replica is down are skipped: `apalis-cron` computes the next
//! tick from the time it starts. With at least one replica up, every tick runs exactly once.
//!
//! ```sh
//! cargo run --example cron_once   # two replicas in one process, three ticks, then exits
//! ```
use std::{
    collections::BTreeSet,
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use apalis::prelude::*;
use apalis_cron::CronScheduler;
use apalis_pgmq_notify::{Config, PgmqStorage, QueueName, Runtime};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Report {
    /// The tick this job is for (seconds since the epoch).
    tick: u64,
}

const SCHEDULE: &str = "report";

/// One replica's scheduler: every tick of `schedule` becomes a keyed push.
async fn replica(
    name: &'static str,
    storage: PgmqStorage<Report>,
    schedule: cron::Schedule,
    ticks: usize,
) -> Result<Vec<(u64, bool)>, BoxDynError> {
    let mut stream = Box::pin(CronScheduler::new(schedule).into_stream());
    let mut conn = storage.pool().acquire().await?;
    let mut seen = Vec::new();
    while seen.len() < ticks {
        let Some(tick) = stream.next().await else {
            break;
        };
        let tick = tick?.get_timestamp();
        let task = TaskBuilder::new(Report { tick })
            .idempotency_key(format!("{SCHEDULE}:{tick}"))
            .build();
        let pushed = storage.push_task_with(&mut conn, task).await?;
        println!(
            "{name}: tick {tick} -> job {} ({})",
            pushed.id(),
            if pushed.is_duplicate() {
                "already enqueued"
            } else {
                "enqueued"
            }
        );
        seen.push((tick, pushed.is_duplicate()));
    }
    Ok(seen)
}

#[tokio::main]
async fn main() -> Result<(), BoxDynError> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL (scripts/with-pg.sh starts a throwaway PostgreSQL)")?;
    let pool = sqlx::PgPool::connect(&url).await?;
    apalis_pgmq_notify::setup(&pool).await?;
    let runtime = Runtime::new(&pool);
    let config = Config::default().idempotency_window(Some(Duration::from_secs(3600)));
    let storage: PgmqStorage<Report> =
        PgmqStorage::with_config(&runtime, QueueName::new("cron_reports")?, config)?;
    storage.create_queue().await?;

    let ran = Arc::new(Mutex::new(Vec::new()));
    let worker = WorkerBuilder::new("reports")
        .backend(storage.clone())
        .data(ran.clone())
        .build(|r: Report, ran: Data<Arc<Mutex<Vec<u64>>>>| async move {
            ran.lock().map_err(|e| e.to_string())?.push(r.tick);
            Ok::<(), BoxDynError>(())
        });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(worker.run_until(async move {
        let _ = stopped.await;
        Ok::<(), std::io::Error>(())
    }));

    // Every second; each replica builds its own scheduler, as separate processes would.
    let every_second = cron::Schedule::from_str("* * * * * *")?;
    let a = tokio::spawn(replica(
        "replica-a",
        storage.clone(),
        every_second.clone(),
        3,
    ));
    let b = tokio::spawn(replica("replica-b", storage.clone(), every_second, 3));
    let (a, b) = (a.await??, b.await??);
    let ticks: BTreeSet<u64> = a.iter().chain(&b).map(|(t, _)| *t).collect();

    // Wait until every tick's job has run, then stop the worker.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let done = ran.lock().map_err(|e| e.to_string())?.len();
        if done >= ticks.len() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    worker.await??;
    let ran = ran.lock().map_err(|e| e.to_string())?.clone();
    println!(
        "{} distinct ticks from two replicas; jobs run: {ran:?}",
        ticks.len()
    );
    if ran.len() != ticks.len() || ran.iter().copied().collect::<BTreeSet<_>>() != ticks {
        return Err(format!("expected each of {ticks:?} once, ran {ran:?}").into());
    }
    storage.drop_queue().await?;
    runtime.shutdown().await?;
    Ok(())
}
