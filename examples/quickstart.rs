//! Quickstart: push jobs, run a pool of workers over them, print what happened, exit.
//!
//! Run with `scripts/demo.sh` (starts PostgreSQL for you), or with `DATABASE_URL` set:
//! `cargo run --example quickstart`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use apalis::prelude::*;
use apalis_pgmq_notify::{MessageInfo, PgmqStorage, QueueName, Runtime, setup};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Email {
    to: String,
    subject: String,
}

/// Counts handled jobs and signals when all have been seen.
#[derive(Clone)]
struct Progress {
    done: Arc<AtomicUsize>,
    expected: usize,
    all_done: Arc<Notify>,
}

async fn send_email(
    email: Email,
    msg: Data<MessageInfo>,
    progress: Data<Progress>,
    worker: WorkerContext,
) -> Result<(), BoxDynError> {
    // Real work would go here.
    tokio::task::yield_now().await;
    let n = progress.done.fetch_add(1, Ordering::SeqCst) + 1;
    println!(
        "[{}] job {} (attempt {}): email to {} about {:?}",
        worker.name(),
        msg.msg_id,
        msg.read_ct,
        email.to,
        email.subject
    );
    if n == progress.expected {
        progress.all_done.notify_one();
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
    let url =
        std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL or run scripts/demo.sh")?;
    let pool = sqlx::PgPool::connect(&url).await?;
    let report = setup(&pool).await?;
    println!(
        "setup: PGMQ {} ({}), migrations applied now: {:?}",
        report.pgmq_version, report.pgmq_source, report.applied_migrations
    );

    // One runtime per database: it owns the listener, the completers and lease keepers, the
    // worker registry; `shutdown` stops them all.
    let runtime = Runtime::new(&pool);
    let mut storage = PgmqStorage::<Email>::new(&runtime, QueueName::new("quickstart_email")?);
    storage.create_queue().await?;
    storage.queue().purge(&pool).await?;

    // 1. apalis' TaskSink.
    let emails: Vec<Email> = (1..=8)
        .map(|i| Email {
            to: format!("user{i}@example.com"),
            subject: format!("welcome #{i}"),
        })
        .collect();
    storage.push_bulk(emails).await?;
    // 2. In your own transaction: the job exists only if the transaction commits.
    let mut tx = pool.begin().await?;
    let id = storage
        .push_with(
            &mut *tx,
            &Email {
                to: "tx@example.com".into(),
                subject: "sent with the order".into(),
            },
        )
        .await?;
    tx.commit().await?;
    println!("pushed 8 jobs with TaskSink and job {id} inside a transaction");
    // 3. From plain SQL, as any PGMQ client would.
    sqlx::query(
        "SELECT pgmq.send('quickstart_email', '{\"to\": \"sql@example.com\", \"subject\": \"from SQL\"}')",
    )
    .execute(&pool)
    .await?;
    println!("pushed 1 job with select pgmq.send(...)");

    let progress = Progress {
        done: Arc::new(AtomicUsize::new(0)),
        expected: 10,
        all_done: Arc::new(Notify::new()),
    };
    let all_done = progress.all_done.clone();
    // Two workers sharing the queue; `register_n` passes each its index (0, 1) and the number
    // of times it was restarted.
    let monitor = Monitor::new()
        .register_n(2, {
            let storage = storage.clone();
            let progress = progress.clone();
            move |index, _restarts| {
                WorkerBuilder::new(format!("email-worker-{index}"))
                    .backend(storage.clone())
                    .data(progress.clone())
                    .concurrency(4)
                    .build(send_email)
            }
        })
        .shutdown_timeout(Duration::from_secs(10));
    tokio::time::timeout(
        Duration::from_secs(60),
        monitor.run_with_signal(async move {
            all_done.notified().await;
            Ok(())
        }),
    )
    .await??;
    // The workers have stopped (their outcomes written): stop the rest.
    runtime.shutdown().await?;

    let metrics = storage.queue().metrics(&pool).await?;
    let archived: i64 = sqlx::query_scalar("SELECT count(*) FROM pgmq.a_quickstart_email")
        .fetch_one(&pool)
        .await?;
    println!(
        "done: {} jobs handled, {} archived, {} left in the queue",
        progress.done.load(Ordering::SeqCst),
        archived,
        metrics.queue_length
    );
    if metrics.queue_length != 0 || archived < 10 {
        return Err("not every job was processed".into());
    }
    Ok(())
}
