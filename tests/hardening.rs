//! Every outcome bounded, every failure contained: outcomes PostgreSQL would refuse, handlers
//! that always defer or ask to retry later, and pushes that fail half-way.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use apalis::prelude::*;
use apalis_pgmq_notify::{Backoff, Config, PgmqStorage, QueueName};
use common::{TestDb, count, drained, stop_worker, wait_for};
use serde::{Deserialize, Serialize};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u32,
    kind: String,
}

fn job(id: u32, kind: &str) -> Job {
    Job {
        id,
        kind: kind.to_owned(),
    }
}

async fn poison_or_good(job: Job) -> Result<(), BoxDynError> {
    match job.kind.as_str() {
        "nul" => Err(Box::new(std::io::Error::other("bad\0byte in an error"))),
        "panic_nul" => panic!("panic with a\0NUL"),
        "far_retry" => Err(Box::new(RetryAfterError::new(
            "see you in 300 000 years",
            Duration::from_secs(10_000_000_000_000),
        ))),
        _ => Ok(()),
    }
}

#[tokio::test]
async fn outcomes_postgres_would_refuse_never_block_the_others() {
    let db = TestDb::setup().await;
    let queue = "poison_outcomes";
    let s: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.pool,
        QueueName::new(queue).expect("name"),
        Config::default()
            .max_attempts(2)
            .backoff(Backoff::default().base(Duration::from_millis(50)))
            .fetch_batch_size(50),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    let mut jobs: Vec<Job> = (0..30).map(|i| job(i, "good")).collect();
    jobs.insert(3, job(100, "nul"));
    jobs.insert(10, job(101, "panic_nul"));
    jobs.insert(20, job(102, "far_retry"));
    s.push_bulk_with(&db.pool, jobs.iter().cloned())
        .await
        .expect("push");
    let worker = WorkerBuilder::new("poison-outcomes")
        .backend(s.clone())
        .concurrency(8)
        .build(poison_or_good);
    let (stop, join) = spawn_worker!(worker);
    wait_for(WAIT, "30 good jobs archived", || async {
        (count(&db.pool, "SELECT count(*) FROM pgmq.a_poison_outcomes").await == 30).then_some(())
    })
    .await;
    wait_for(WAIT, "the two failures dead-lettered", || async {
        (count(&db.pool, "SELECT count(*) FROM pgmq.q_poison_outcomes_dlq").await == 2)
            .then_some(())
    })
    .await;
    // Shutdown completes: nothing is stuck in the outcome writer.
    tokio::time::timeout(WAIT, stop_worker(stop, join))
        .await
        .expect("graceful shutdown finishes");
    let errors: Vec<String> = sqlx::query_scalar(
        "SELECT headers->'apalis_dead_letter'->>'error' FROM pgmq.q_poison_outcomes_dlq \
         ORDER BY (message->>'id')::int",
    )
    .fetch_all(&db.pool)
    .await
    .expect("dead letters");
    assert_eq!(errors[0], "bad\\u0000byte in an error", "NUL kept visibly");
    assert!(
        errors[1].contains("panic with a\\u0000NUL"),
        "{}",
        errors[1]
    );
    // A retry-after beyond what PostgreSQL stores is clamped: with an attempt left, the job is
    // scheduled about 100 years out instead of wedging the outcome writer.
    let left: Vec<(i32, f64)> = sqlx::query_as(
        "SELECT read_ct, extract(epoch FROM vt - clock_timestamp())::float8 \
         FROM pgmq.q_poison_outcomes",
    )
    .fetch_all(&db.pool)
    .await
    .expect("rows");
    assert_eq!(left.len(), 1, "the far retry is still queued: {left:?}");
    let years = left[0].1 / (365.0 * 24.0 * 3600.0);
    assert!(
        (99.0..=101.0).contains(&years),
        "clamped to ~100 years, got {years}"
    );
}

#[tokio::test]
async fn deferrals_and_retry_afters_use_up_attempts_and_end_in_the_dead_letter_queue() {
    let db = TestDb::setup().await;
    for (queue, deferring) in [("always_defers", true), ("always_later", false)] {
        let s: PgmqStorage<Job> = PgmqStorage::with_config(
            &db.pool,
            QueueName::new(queue).expect("name"),
            Config::default()
                .max_attempts(3)
                .defer_delay(Duration::from_millis(20)),
        )
        .expect("config");
        s.create_queue().await.expect("create");
        s.push_with(&db.pool, &job(1, "x")).await.expect("push");
        let runs = Arc::new(AtomicUsize::new(0));
        let worker = WorkerBuilder::new(queue)
            .backend(s.clone())
            .data(runs.clone())
            .build(move |_j: Job, runs: Data<Arc<AtomicUsize>>| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                if deferring {
                    Err::<(), BoxDynError>(Box::new(DeferredError::new("not yet")))
                } else {
                    Err::<(), BoxDynError>(Box::new(RetryAfterError::new(
                        "later",
                        Duration::from_millis(20),
                    )))
                }
            });
        let (stop, join) = spawn_worker!(worker);
        let dlq = format!("SELECT count(*) FROM pgmq.q_{queue}_dlq");
        wait_for(WAIT, "the dead letter", || async {
            (count(&db.pool, &dlq).await == 1).then_some(())
        })
        .await;
        drained(&db.pool, queue).await;
        stop_worker(stop, join).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "{queue}: max_attempts bounds the runs"
        );
        let info: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT headers->'apalis_dead_letter' FROM pgmq.q_{queue}_dlq"
        )))
        .fetch_one(&db.pool)
        .await
        .expect("info");
        let reason = if deferring {
            "deferred_exhausted"
        } else {
            "retry_after_exhausted"
        };
        assert_eq!(info["reason"], reason, "{info}");
        assert_eq!(info["attempts"], 3, "{info}");
    }
}

#[tokio::test]
async fn a_failed_push_leaves_nothing_behind() {
    let db = TestDb::setup().await;
    let queue = "failed_push";
    let mut s: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.pool,
        QueueName::new(queue).expect("name"),
        Config::default().max_payload_bytes(1024),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    let huge = job(2, &"x".repeat(4096));
    let err = s
        .push_bulk(vec![job(1, "valid"), huge.clone()])
        .await
        .expect_err("one item is too large");
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
    // A later, unrelated push writes only itself.
    s.push(job(3, "later")).await.expect("push");
    let ids: Vec<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT (message->>'id')::int FROM pgmq.q_{queue} ORDER BY msg_id"
    )))
    .fetch_all(&db.pool)
    .await
    .expect("ids");
    assert_eq!(ids, vec![3], "the failed batch left nothing behind");
    // The same for a stream and a single push.
    s.push_stream(&mut futures::stream::iter(vec![
        job(4, "valid"),
        huge.clone(),
    ]))
    .await
    .expect_err("the stream fails");
    s.push(huge).await.expect_err("too large");
    s.push(job(5, "later")).await.expect("push");
    let ids: Vec<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT (message->>'id')::int FROM pgmq.q_{queue} ORDER BY msg_id"
    )))
    .fetch_all(&db.pool)
    .await
    .expect("ids");
    assert_eq!(ids, vec![3, 5]);
}
