//! Pushing jobs from inside a handler: an order job fans out one email job per item, on another
//! queue, through a storage handed to the worker with `.data(...)`.
//!
//! `DATABASE_URL=... cargo run --example push_from_handler` (or `scripts/with-pg.sh cargo run ...`).

use std::time::Duration;

use apalis::prelude::*;
use apalis_pgmq_notify::{PgmqStorage, QueueName, Runtime, setup};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: u32,
    items: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Email {
    order: u32,
    line: String,
}

async fn handle_order(order: Order, emails: Data<PgmqStorage<Email>>) -> Result<(), BoxDynError> {
    println!(
        "order {}: {} items, queueing one email each",
        order.id,
        order.items.len()
    );
    // `push_bulk_with` takes `&self` and any executor; TaskSink's `push` needs a `&mut` clone.
    emails
        .push_bulk_with(
            emails.pool(),
            order.items.iter().map(|line| Email {
                order: order.id,
                line: line.clone(),
            }),
        )
        .await?;
    Ok(())
}

async fn send_email(
    email: Email,
    done: Data<mpsc::UnboundedSender<()>>,
) -> Result<(), BoxDynError> {
    println!("  email for order {}: {}", email.order, email.line);
    done.send(()).map_err(|e| Box::new(e) as BoxDynError)?;
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
    let mut orders = PgmqStorage::<Order>::new(&runtime, QueueName::new("example_orders")?);
    let emails = PgmqStorage::<Email>::new(&runtime, QueueName::new("example_emails")?);
    for s in [orders.queue(), emails.queue()] {
        s.create(&pool).await?;
        s.purge(&pool).await?;
    }
    orders.create_queue().await?;
    emails.create_queue().await?;
    orders
        .push_bulk(vec![
            Order {
                id: 1,
                items: vec!["book".into(), "lamp".into()],
            },
            Order {
                id: 2,
                items: vec!["tea".into(), "cup".into(), "pot".into()],
            },
        ])
        .await?;

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    let order_worker = WorkerBuilder::new("orders")
        .backend(orders.clone())
        .data(emails.clone())
        .build(handle_order);
    let email_worker = WorkerBuilder::new("emails")
        .backend(emails.clone())
        .data(done_tx)
        .concurrency(4)
        .build(send_email);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop_rx = futures::future::FutureExt::shared(async move {
        stop_rx.await.ok();
    });
    let a = tokio::spawn(order_worker.run_until({
        let s = stop_rx.clone();
        async move {
            s.await;
            Ok::<(), std::io::Error>(())
        }
    }));
    let b = tokio::spawn(email_worker.run_until(async move {
        stop_rx.await;
        Ok::<(), std::io::Error>(())
    }));
    tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..5 {
            done_rx.recv().await;
        }
    })
    .await?;
    stop_tx.send(()).ok();
    a.await??;
    b.await??;
    println!("all 5 emails sent from 2 orders");
    runtime.shutdown().await?;
    Ok(())
}
