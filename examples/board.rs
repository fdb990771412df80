//! The web board: apalis-board's API and its embedded UI, served with axum, for two queues
//! whose workers succeed, retry and give up on jobs.
//!
//! ```sh
//! scripts/with-pg.sh cargo run --example board        # prints the URL; Ctrl-C to stop
//! BOARD_PORT=8080 scripts/with-pg.sh cargo run --example board
//! ```
//!
//! `scripts/board-check.sh` (run by the test command) starts it, opens the page in headless
//! Chromium and checks what the page shows.

use std::{net::SocketAddr, time::Duration};

use apalis::prelude::*;
use apalis_board::axum::{
    framework::{ApiBuilder, RegisterRoute},
    sse::{TracingBroadcaster, TracingSubscriber},
    ui::ServeUI,
};
use apalis_pgmq_notify::{Backoff, Config, PgmqStorage, QueueName, Runtime, setup};
use axum::{Extension, Router};
use serde_json::{Value, json};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// A job whose `outcome` says how it ends: "ok", "retry" (fails, retried later) or "die" (fails
/// with no attempts left).
async fn work(job: Value, worker: WorkerContext) -> Result<(), BoxDynError> {
    let outcome = job["outcome"].as_str().unwrap_or("ok");
    tracing::info!(worker = worker.name(), ?job, "working");
    match outcome {
        "retry" => Err("the mail server said: try again later".into()),
        "die" => Err("the address does not exist".into()),
        _ => Ok(()),
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxDynError> {
    // Logs to stdout (RUST_LOG honoured) and to the board's live log view.
    let broadcaster = TracingBroadcaster::create();
    tracing_subscriber::registry()
        .with(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with(tracing_subscriber::fmt::layer())
        .with(TracingSubscriber::new(&broadcaster).layer())
        .init();

    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let pool = sqlx::PgPool::connect(&url).await?;
    setup(&pool).await?;
    let runtime = Runtime::new(&pool);

    // Retries an hour out, so the board shows jobs waiting for their backoff.
    let config = Config::default()
        .max_attempts(3)
        .backoff(Backoff::default().base(Duration::from_secs(3600)))
        .heartbeat_interval(Duration::from_secs(5));
    let mut queues = Vec::new();
    for name in ["board_email", "board_reports"] {
        let storage: PgmqStorage<Value> =
            PgmqStorage::with_config(&runtime, QueueName::new(name)?, config.clone())?;
        storage.create_queue().await?;
        let q = storage.queue();
        for i in 0..12 {
            let outcome = match i % 6 {
                4 => "retry",
                5 => "die",
                _ => "ok",
            };
            // "die" jobs get one attempt, so they end in the dead-letter queue at once.
            let headers = (outcome == "die").then(|| json!({"apalis": {"max_attempts": 1}}));
            q.send_with(
                &pool,
                &json!({"to": format!("user{i}@example.com"), "outcome": outcome}),
                headers.as_ref(),
                apalis_pgmq_notify::Delay::Now,
            )
            .await?;
        }
        // And a few for later.
        q.send_with(
            &pool,
            &json!({"to": "later@example.com", "outcome": "ok"}),
            None,
            apalis_pgmq_notify::Delay::After(Duration::from_secs(3600)),
        )
        .await?;
        queues.push((name, storage));
    }

    let mut monitor = Monitor::new();
    for (name, storage) in &queues {
        let (name, storage) = (*name, storage.clone());
        monitor = monitor.register(move |_| {
            WorkerBuilder::new(format!("{name}-worker"))
                .backend(storage.clone())
                .concurrency(4)
                .build(work)
        });
    }

    let mut api = ApiBuilder::new(Router::new());
    for (name, storage) in &queues {
        api = api.register(name, storage.clone());
    }
    let app = Router::new()
        .nest("/api/v1", api.build())
        .fallback_service(ServeUI::new())
        .layer(Extension(broadcaster));

    let port: u16 = std::env::var("BOARD_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let addr = listener.local_addr()?;
    println!("board: http://{addr}/");

    let server = axum::serve(listener, app).with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    tokio::select! {
        r = server => r?,
        r = monitor.run_with_signal(async { tokio::signal::ctrl_c().await }) => r?,
    }
    runtime.shutdown().await?;
    Ok(())
}
