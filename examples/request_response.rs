//! Request/response over a queue: a caller pushes a job and waits for its result.
//!
//! `push_and_wait` writes the job with a flag asking the worker to keep its result, then waits
//! for the notification the worker's outcome statement sends (no polling). Many callers in one
//! process share one listener. A job that fails for good (dead-lettered) or is killed comes
//! back with its error; a job that takes longer than the timeout gives `Error::Timeout` and
//! keeps running.
//!
//! ```sh
//! cargo run --example request_response
//! ```
use std::time::Duration;

use apalis::prelude::*;
use apalis_pgmq_notify::{Config, PgmqStorage, QueueName, Runtime};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Quote {
    item: String,
    quantity: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Price {
    item: String,
    total_cents: u64,
}

async fn price(q: Quote) -> Result<Price, BoxDynError> {
    let unit = match q.item.as_str() {
        "apple" => 40,
        "pear" => 55,
        other => return Err(Box::new(AbortError::new(format!("no price for {other:?}")))),
    };
    Ok(Price {
        item: q.item,
        total_cents: unit * u64::from(q.quantity),
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxDynError> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL (scripts/with-pg.sh starts a throwaway PostgreSQL)")?;
    let pool = sqlx::PgPool::connect(&url).await?;
    apalis_pgmq_notify::setup(&pool).await?;
    let runtime = Runtime::new(&pool);
    let storage: PgmqStorage<Quote> =
        PgmqStorage::with_config(&runtime, QueueName::new("quotes")?, Config::default())?;
    storage.create_queue().await?;

    let worker = WorkerBuilder::new("pricer")
        .backend(storage.clone())
        .concurrency(8)
        .build(price);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async move {
        let _ = stopped.await;
        Ok::<(), std::io::Error>(())
    }));

    // Twenty callers at once, then one the worker refuses.
    let mut calls = tokio::task::JoinSet::new();
    for quantity in 1..=20u32 {
        let storage = storage.clone();
        calls.spawn(async move {
            let item = if quantity % 2 == 0 { "apple" } else { "pear" };
            let q = Quote {
                item: item.to_owned(),
                quantity,
            };
            // A task: it could carry a key, a priority or an id of its own.
            let task = TaskBuilder::new(q).priority(quantity as usize % 3).build();
            storage
                .push_and_wait::<Price>(task, Duration::from_secs(30))
                .await
        });
    }
    let mut total = 0;
    while let Some(answer) = calls.join_next().await {
        let answer = answer??;
        let price = answer.take()?;
        total += price.total_cents;
    }
    let expected: u64 = (1..=20u64)
        .map(|n| if n % 2 == 0 { 40 * n } else { 55 * n })
        .sum();
    assert_eq!(total, expected);
    println!("20 quotes answered, {total} cents in all");

    let refused = storage
        .push_and_wait::<Price>(
            TaskBuilder::new(Quote {
                item: "durian".into(),
                quantity: 1,
            })
            .build(),
            Duration::from_secs(30),
        )
        .await?;
    println!(
        "durian: {:?} after {} attempt(s): {:?}",
        refused.status, refused.attempt, refused.result
    );
    assert_eq!(refused.status, Status::Killed);
    assert!(refused.result.is_err());

    let _ = stop.send(());
    running.await??;
    storage.drop_queue().await?;
    runtime.shutdown().await?;
    Ok(())
}
