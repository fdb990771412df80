//! Typed queue events: react to queue activity without being an apalis worker.
//!
//! `DATABASE_URL=... cargo run --example events`.

use std::time::Duration;

use apalis_pgmq_notify::{
    NewMessage, NotifyChannels, NotifyMode, PgmqQueue, QueueEvent, QueueEvents, QueueName, Runtime,
    enable_notify, setup,
};
use futures::StreamExt;
use serde_json::json;

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
    let audit = PgmqQueue::new(QueueName::new("example_audit_queue")?);
    audit.create(&pool).await?;
    audit.purge(&pool).await?;
    // Per-message events with the payload inline (opt-in: one NOTIFY per row).
    enable_notify(
        &pool,
        audit.name(),
        &NotifyChannels::default(),
        NotifyMode::message(),
    )
    .await?;

    let runtime = Runtime::new(&pool);
    let mut events = QueueEvents::new(&runtime)
        .namespace("example_audit") // every queue named example_audit_queue, ..._queue
        .subscribe()
        .await?;

    audit
        .send(&pool, &json!({"user": 1, "action": "login"}))
        .await?;
    audit
        .send(&pool, &json!({"blob": "x".repeat(20_000)}))
        .await?; // too big to inline
    let batch: Vec<_> = (0..3).map(|i| NewMessage::new(json!({"i": i}))).collect();
    audit.send_batch(&pool, &batch).await?;

    for _ in 0..5 {
        let event = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await?
            .ok_or("event stream ended")?;
        match &event {
            QueueEvent::Message {
                msg_id, message, ..
            } => println!("message {msg_id} inline: {message}"),
            QueueEvent::MessageReady {
                msg_id, too_big, ..
            } => {
                println!("message {msg_id} ready (inline: {})", !too_big)
            }
            other => println!("{other:?}"),
        }
    }
    let stats = events.stats();
    println!(
        "listener: {} notifications, {} parse errors, {} reconnects",
        stats.received, stats.parse_errors, stats.reconnects
    );
    runtime.shutdown().await?;
    Ok(())
}
