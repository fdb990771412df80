//! Quickstart: set up the database, create a queue, send, read and archive messages.
//!
//! Run with `scripts/demo.sh` (starts PostgreSQL for you) or with `DATABASE_URL` set:
//! `cargo run --example quickstart`.

use std::time::Duration;

use apalis_pgmq_notify::{NewMessage, PgmqQueue, QueueName, setup};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url =
        std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL or run scripts/demo.sh")?;
    let pool = sqlx::PgPool::connect(&url).await?;
    let report = setup(&pool).await?;
    println!(
        "setup: PGMQ {} ({})",
        report.pgmq_version, report.pgmq_source
    );

    let queue = PgmqQueue::new(QueueName::new("quickstart")?);
    queue.create(&pool).await?;
    queue.purge(&pool).await?;
    let batch: Vec<_> = (1..=5)
        .map(|i| NewMessage::new(json!({ "n": i })))
        .collect();
    let ids = queue.send_batch(&pool, &batch).await?;
    println!("sent {} messages: {:?}", ids.len(), ids);

    let read = queue.read(&pool, Duration::from_secs(30), 10).await?;
    for m in &read {
        println!(
            "read msg {} attempt {}: {}",
            m.msg_id,
            m.read_ct,
            m.message.clone().unwrap_or_default()
        );
    }
    let archived = queue
        .archive(&pool, &read.iter().map(|m| m.msg_id).collect::<Vec<_>>())
        .await?;
    println!("archived {} messages", archived.len());
    let metrics = queue.metrics(&pool).await?;
    println!("queue length now {}", metrics.queue_length);
    if archived.len() != ids.len() || metrics.queue_length != 0 {
        return Err("not every message was processed".into());
    }
    Ok(())
}
