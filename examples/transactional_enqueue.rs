//! Enqueueing inside your own transaction: the job exists only if the transaction commits.
//!
//! `DATABASE_URL=... cargo run --example transactional_enqueue`.

use std::time::Duration;

use apalis::prelude::*;
use apalis_pgmq_notify::{PgmqStorage, QueueName, Runtime, setup};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Welcome {
    user_id: i32,
}

async fn place_user(
    pool: &sqlx::PgPool,
    jobs: &PgmqStorage<Welcome>,
    user_id: i32,
    commit: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO example_users (id) VALUES ($1)")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    let msg_id = jobs.push_with(&mut *tx, &Welcome { user_id }).await?;
    if commit {
        tx.commit().await?;
        println!("user {user_id}: committed with welcome job {msg_id}");
    } else {
        tx.rollback().await?;
        println!("user {user_id}: rolled back; its welcome job {msg_id} never existed");
    }
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
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS example_users; CREATE TABLE example_users (id int PRIMARY KEY)",
    )
    .execute(&pool)
    .await?;
    let jobs = PgmqStorage::<Welcome>::new(&runtime, QueueName::new("example_welcome")?);
    jobs.create_queue().await?;
    jobs.queue().purge(&pool).await?;

    place_user(&pool, &jobs, 1, true).await?;
    place_user(&pool, &jobs, 2, false).await?;
    place_user(&pool, &jobs, 3, true).await?;

    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<i32>();
    let worker = WorkerBuilder::new("welcome")
        .backend(jobs.clone())
        .data(seen_tx)
        .build(
            |job: Welcome, seen: Data<mpsc::UnboundedSender<i32>>| async move {
                println!("welcoming user {}", job.user_id);
                seen.send(job.user_id)
                    .map_err(|e| Box::new(e) as BoxDynError)?;
                Ok::<(), BoxDynError>(())
            },
        );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async move {
        stop_rx.await.ok();
        Ok::<(), std::io::Error>(())
    }));
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while seen.len() < 2 {
            if let Some(id) = seen_rx.recv().await {
                seen.push(id);
            }
        }
    })
    .await?;
    stop_tx.send(()).ok();
    running.await??;
    seen.sort_unstable();
    let left = jobs.queue().metrics(&pool).await?.queue_length;
    println!("welcomed users {seen:?}; jobs left in the queue: {left}");
    if seen != [1, 3] || left != 0 {
        return Err("only the committed users should be welcomed".into());
    }
    runtime.shutdown().await?;
    Ok(())
}
