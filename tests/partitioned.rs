//! PGMQ's partitioned queues (pg_partman) through this crate's API and backend.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use apalis::prelude::*;
use apalis_pgmq_notify::{Config, PgmqStorage, QueueName, prune};
use common::{TestDb, count, stop_worker, wait_for};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u32,
    fail: bool,
}

async fn partman_available(db: &TestDb) -> bool {
    sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_partman')",
    )
    .fetch_one(&db.pool)
    .await
    .expect("query")
}

#[tokio::test]
async fn the_backend_works_unchanged_on_a_partitioned_queue_and_prune_drops_partitions() {
    let db = TestDb::setup().await;
    if !partman_available(&db).await {
        println!(
            "skipped: pg_partman is not installed on this server (Debian: postgresql-15-partman; \
             scripts/with-pg.sh installs it)"
        );
        return;
    }
    let name = QueueName::new("parts").expect("name");
    let s: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.runtime(),
        name.clone(),
        Config::default()
            .max_attempts(1)
            .poll_interval(Duration::from_secs(60)),
    )
    .expect("config");
    // Partitions of 10 message ids; the archive keeps the last 20.
    s.create_partitioned_queue("10", "20")
        .await
        .expect("partitioned");
    assert!(s.queue().is_partitioned(&db.pool).await.expect("meta"));
    let log: Arc<Mutex<Vec<u32>>> = Arc::default();
    let worker = WorkerBuilder::new("parts")
        .backend(s.clone())
        .data(log.clone())
        .concurrency(4)
        .build(|job: Job, log: Data<Arc<Mutex<Vec<u32>>>>| async move {
            log.lock().expect("lock").push(job.id);
            if job.fail {
                Err::<(), BoxDynError>("fails".into())
            } else {
                Ok(())
            }
        });
    let (stop, join) = spawn_worker!(worker);
    // Pushed in tens. Before each ten, pg_partman's maintenance makes partitions ahead of the
    // ids of both tables (a worker process runs it on each heartbeat; here it is run by hand,
    // after the archive has caught up, so no id outruns the partitions made for it).
    for batch in 0..6u32 {
        prune(&db.pool, &name, None, None)
            .await
            .expect("maintenance");
        for id in batch * 10..batch * 10 + 10 {
            s.push_with(
                &db.pool,
                &Job {
                    id,
                    fail: id % 20 == 7,
                },
            )
            .await
            .expect("push");
        }
        // Handled, and every outcome written (the queue table is empty again). The archive's
        // count is no measure: maintenance drops its old partitions as it goes.
        let want = (batch * 10 + 10) as usize;
        wait_for(Duration::from_secs(60), "the batch handled", || async {
            (log.lock().expect("lock").len() == want
                && count(&db.pool, "SELECT count(*) FROM pgmq.q_parts").await == 0)
                .then_some(())
        })
        .await;
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_parts_dlq").await,
        3
    );
    stop_worker(stop, join).await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_parts").await,
        0
    );
    assert_eq!(log.lock().expect("lock").len(), 60, "each job ran once");
    // Retention: pg_partman dropped the archive partitions older than the last 20 ids.
    prune(&db.pool, &name, None, None).await.expect("prune");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM pgmq.a_parts WHERE msg_id < 30"
        )
        .await,
        0,
        "old partitions dropped"
    );
    assert!(
        count(
            &db.pool,
            "SELECT count(*) FROM pgmq.a_parts WHERE msg_id >= 40"
        )
        .await
            >= 19,
        "recent rows kept"
    );
}

#[tokio::test]
async fn the_cli_creates_a_partitioned_queue() {
    let db = TestDb::setup().await;
    if !partman_available(&db).await {
        println!("skipped: pg_partman is not installed on this server");
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_apalis-pgmq-notify"))
        .args([
            "create-queue",
            "cli_parts",
            "--partitioned",
            "--partition-interval",
            "100",
        ])
        .env("DATABASE_URL", db.url())
        .output()
        .expect("run the CLI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let partitioned: bool =
        sqlx::query_scalar("SELECT is_partitioned FROM pgmq.meta WHERE queue_name = 'cli_parts'")
            .fetch_one(&db.pool)
            .await
            .expect("meta");
    assert!(partitioned);
}
