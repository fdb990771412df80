//! Retries with backoff, then the dead-letter queue: a flaky job succeeds on its third attempt,
//! a broken one is given up after three and lands in `<queue>_dlq` with its last error, and a
//! message that does not decode (sent with plain SQL) goes there at once.
//!
//! `DATABASE_URL=... cargo run --example retries_and_dead_letters`.

use std::time::Duration;

use apalis::prelude::*;
use apalis_pgmq_notify::{Backoff, Config, MessageInfo, PgmqStorage, QueueName, Runtime, setup};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Charge {
    id: u32,
    flaky: bool,
}

async fn charge(job: Charge, msg: Data<MessageInfo>) -> Result<(), BoxDynError> {
    println!("charge {} attempt {}", job.id, msg.read_ct);
    if job.flaky && msg.read_ct < 3 {
        return Err(format!("payment gateway timeout (attempt {})", msg.read_ct).into());
    }
    if !job.flaky {
        return Err("card declined".into());
    }
    println!("charge {} succeeded", job.id);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // What the backend does, as log lines: RUST_LOG=debug shows every outcome, retry and
    // wake-up; the default shows warnings (dead letters, lost leases) and errors.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let pool = sqlx::PgPool::connect(&std::env::var("DATABASE_URL")?).await?;
    setup(&pool).await?;
    let runtime = Runtime::new(&pool);
    let config = Config::default().max_attempts(3).backoff(
        Backoff::default()
            .base(Duration::from_millis(200))
            .factor(2.0)
            .jitter(0.0),
    );
    let mut jobs =
        PgmqStorage::<Charge>::with_config(&runtime, QueueName::new("example_charges")?, config)?;
    jobs.create_queue().await?;
    jobs.queue().purge(&pool).await?;
    jobs.dead_letter_queue().purge(&pool).await?;
    jobs.push(Charge { id: 1, flaky: true }).await?;
    jobs.push(Charge {
        id: 2,
        flaky: false,
    })
    .await?;
    sqlx::query("SELECT pgmq.send('example_charges', '{\"amount\": \"not a charge\"}'::jsonb)")
        .execute(&pool)
        .await?;

    let worker = WorkerBuilder::new("charges")
        .backend(jobs.clone())
        .build(charge);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async move {
        stop_rx.await.ok();
        Ok::<(), std::io::Error>(())
    }));
    // Wait for the queue to empty: one archived, two dead-lettered.
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let m = jobs.queue().metrics(&pool).await?;
            let dead = jobs.dead_letter_queue().metrics(&pool).await?.queue_length;
            if m.queue_length == 0 && dead == 2 {
                return Ok::<(), apalis_pgmq_notify::Error>(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await??;
    stop_tx.send(()).ok();
    running.await??;

    let dead: Vec<(Value, Value)> =
        sqlx::query_as("SELECT message, headers -> 'apalis_dead_letter' FROM pgmq.q_example_charges_dlq ORDER BY msg_id")
            .fetch_all(&pool)
            .await?;
    for (message, info) in &dead {
        println!(
            "dead letter: {message} — {} after {} attempt(s): {}",
            info["reason"], info["attempts"], info["error"]
        );
    }
    let archived: i64 = sqlx::query_scalar("SELECT count(*) FROM pgmq.a_example_charges")
        .fetch_one(&pool)
        .await?;
    println!("archived (succeeded): {archived}");
    if archived != 1 || dead.len() != 2 {
        return Err("expected one success and two dead letters".into());
    }
    runtime.shutdown().await?;
    Ok(())
}
