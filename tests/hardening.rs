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
use apalis_pgmq_notify::{Backoff, Config, PgmqStorage, QueueName, Runtime};
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
        &db.runtime(),
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
            &db.runtime(),
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
        &db.runtime(),
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

/// Records when a handler's future is dropped (stopped) without finishing.
struct StopGuard {
    id: u32,
    stopped: Arc<std::sync::Mutex<Vec<(u32, std::time::Instant)>>>,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.stopped.lock() {
            s.push((self.id, std::time::Instant::now()));
        }
    }
}

type Times = Arc<std::sync::Mutex<Vec<(u32, std::time::Instant)>>>;

/// What process A's handler records (one `Data` type: two `Data<Times>` would be one).
#[derive(Clone)]
struct Probe {
    started: Times,
    stopped: Times,
}

#[tokio::test]
async fn a_frozen_worker_stops_its_jobs_before_another_worker_runs_them() {
    let db = TestDb::setup().await;
    let queue = "frozen";
    let proxy = common::proxy::Proxy::to_server(&db.options, Duration::ZERO).await;
    let pool_a = sqlx::postgres::PgPoolOptions::new()
        .max_connections(5)
        .connect_with(db.options.clone().host("127.0.0.1").port(proxy.port))
        .await
        .expect("connect through the proxy");
    let config = Config::default()
        .visibility_timeout(Duration::from_secs(3))
        .poll_interval(Duration::from_secs(60));
    let a: PgmqStorage<Job> = PgmqStorage::with_config(
        &Runtime::new(&pool_a),
        QueueName::new(queue).expect("name"),
        config.clone(),
    )
    .expect("config");
    a.create_queue().await.expect("create");
    let started: Times = Arc::default();
    let stopped: Times = Arc::default();
    let worker_a = WorkerBuilder::new("frozen-a")
        .backend(a.clone())
        .data(Probe {
            started: started.clone(),
            stopped: stopped.clone(),
        })
        .concurrency(10)
        .build(|job: Job, probe: Data<Probe>| async move {
            probe
                .started
                .lock()
                .expect("lock")
                .push((job.id, std::time::Instant::now()));
            let _guard = StopGuard {
                id: job.id,
                stopped: probe.stopped.clone(),
            };
            // Runs far longer than the lease; only a stop ends it.
            std::future::pending::<()>().await;
            Ok::<(), BoxDynError>(())
        });
    let (stop_a, join_a) = spawn_worker!(worker_a);
    a.push_bulk_with(&db.pool, (0..5).map(|i| job(i, "long")))
        .await
        .expect("push");
    wait_for(WAIT, "process A to run all five", || async {
        let n = started.lock().expect("lock").len();
        (n == 5).then_some(())
    })
    .await;
    // Everything between A and the database freezes (no reset, nothing delivered).
    proxy.freeze();
    // Process B, on a direct connection, takes the jobs once A's leases lapse.
    let b: PgmqStorage<Job> =
        PgmqStorage::with_config(&db.runtime(), QueueName::new(queue).expect("name"), config)
            .expect("config");
    let b_started: Times = Arc::default();
    let worker_b = WorkerBuilder::new("frozen-b")
        .backend(b.clone())
        .data(b_started.clone())
        .concurrency(10)
        .build(|job: Job, started: Data<Times>| async move {
            started
                .lock()
                .expect("lock")
                .push((job.id, std::time::Instant::now()));
            Ok::<(), BoxDynError>(())
        });
    let (stop_b, join_b) = spawn_worker!(worker_b);
    wait_for(WAIT, "process B to run all five", || async {
        (b_started.lock().expect("lock").len() >= 5).then_some(())
    })
    .await;
    let stops = stopped.lock().expect("lock").clone();
    for (id, b_at) in b_started.lock().expect("lock").iter() {
        let a_stop = stops
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, t)| *t)
            .unwrap_or_else(|| panic!("job {id}: A never stopped it while B ran it"));
        assert!(
            a_stop < *b_at,
            "job {id}: A stopped it {:?} after B started it",
            a_stop - *b_at
        );
    }
    drop(proxy);
    tokio::time::timeout(Duration::from_secs(40), stop_worker(stop_a, join_a))
        .await
        .expect("the frozen worker's shutdown ends");
    stop_worker(stop_b, join_b).await;
    drained(&db.pool, queue).await;
}

#[tokio::test]
async fn attempt_never_goes_backwards_and_tower_retries_count_against_max_attempts() {
    let db = TestDb::setup().await;
    // (queue, tower retries, backend max_attempts, expected attempts seen)
    let cases: [(&str, usize, u32, Vec<usize>); 2] = [
        ("tower_more", 3, 2, vec![1, 2, 3, 4]),
        ("tower_less", 1, 5, vec![1, 2, 3, 4, 5]),
    ];
    for (queue, retries, max_attempts, expected) in cases {
        let s: PgmqStorage<Job> = PgmqStorage::with_config(
            &db.runtime(),
            QueueName::new(queue).expect("name"),
            Config::default().max_attempts(max_attempts).backoff(
                Backoff::default()
                    .base(Duration::from_millis(20))
                    .jitter(0.0),
            ),
        )
        .expect("config");
        s.create_queue().await.expect("create");
        s.push_with(&db.pool, &job(1, "x")).await.expect("push");
        let seen: Arc<std::sync::Mutex<Vec<usize>>> = Arc::default();
        let worker = WorkerBuilder::new(queue)
            .backend(s.clone())
            .data(seen.clone())
            .retry(RetryPolicy::retries(retries))
            .build(
                |_j: Job, attempt: Attempt, seen: Data<Arc<std::sync::Mutex<Vec<usize>>>>| async move {
                    seen.lock().expect("lock").push(attempt.current());
                    Err::<(), BoxDynError>("always fails".into())
                },
            );
        let (stop, join) = spawn_worker!(worker);
        let dlq = format!("SELECT count(*) FROM pgmq.q_{queue}_dlq");
        wait_for(WAIT, "the dead letter", || async {
            (count(&db.pool, &dlq).await == 1).then_some(())
        })
        .await;
        stop_worker(stop, join).await;
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen, expected, "{queue}: attempts seen by the handler");
        let info: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT headers->'apalis_dead_letter' FROM pgmq.q_{queue}_dlq"
        )))
        .fetch_one(&db.pool)
        .await
        .expect("info");
        assert_eq!(info["attempts"], expected.len(), "{queue}: {info}");
        if max_attempts > 2 {
            // The failed deliveries left the last error in the headers.
            let last: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT headers->'apalis' FROM pgmq.q_{queue}_dlq"
            )))
            .fetch_one(&db.pool)
            .await
            .expect("headers");
            assert_eq!(last["last_error"], "always fails", "{last}");
            assert!(last["failed_at"].is_string(), "{last}");
        }
    }
}

#[tokio::test]
async fn errors_say_what_to_do() {
    // No setup(): the push says so, and a worker stops at start saying so.
    let bare = TestDb::fresh().await;
    let s: PgmqStorage<Job> =
        PgmqStorage::new(&bare.runtime(), QueueName::new("email").expect("name"));
    let err = s.create_queue().await.expect_err("no PGMQ");
    let text = err.to_string();
    assert!(
        matches!(err, apalis_pgmq_notify::Error::NotSetUp { .. }) && text.contains("setup(&pool)"),
        "{text}"
    );
    assert!(!text.contains("at line"), "{text}");
    let worker = WorkerBuilder::new("not-set-up")
        .backend(s.clone())
        .build(poison_or_good);
    let err = tokio::time::timeout(WAIT, worker.run())
        .await
        .expect("the worker stops")
        .expect_err("fails at start");
    assert!(err.to_string().contains("setup(&pool)"), "{err}");
    // A queue never created: named, with what to call.
    let db = TestDb::setup().await;
    let s: PgmqStorage<Job> =
        PgmqStorage::new(&db.runtime(), QueueName::new("never").expect("name"));
    let err = s
        .push_with(&db.pool, &job(1, "x"))
        .await
        .expect_err("no queue");
    let text = err.to_string();
    assert!(
        matches!(&err, apalis_pgmq_notify::Error::QueueMissing { queue } if queue == "never")
            && text.contains("create_queue()"),
        "{text}"
    );
    // A closed port: the cause, not "pool timed out".
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy_with(db.options.clone().host("127.0.0.1").port(port));
    let mut s: PgmqStorage<Job> =
        PgmqStorage::new(&Runtime::new(&pool), QueueName::new("email").expect("name"));
    let err = s.push(job(1, "x")).await.expect_err("nothing listens");
    let text = err.to_string();
    assert!(
        text.contains("cannot reach the database") && text.to_lowercase().contains("refused"),
        "{text}"
    );
}
