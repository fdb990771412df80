//! The apalis backend against a real PostgreSQL: outcomes, attempts, backoff, leases, pools,
//! capacity, shutdown, pushing.

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use apalis::prelude::*;
use apalis_pgmq_notify::{
    Backoff, Config, DoneAction, Error, ExhaustedAction, KilledAction, MessageInfo, PgmqStorage,
    QueueName,
};
use common::{TestDb, count, drained, rows, stop_worker, wait_for};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(30);

/// What handlers record for the test to check.
type Log<T> = Arc<Mutex<Vec<T>>>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Job {
    id: u32,
}

/// Fast polling and no LISTEN: these tests exercise the backend on its own.
fn config() -> Config {
    Config::default()
        .poll_interval(Duration::from_millis(50))
        .listen(false)
}

fn storage(db: &TestDb, queue: &str, config: Config) -> PgmqStorage<Job> {
    PgmqStorage::with_config(&db.runtime(), QueueName::new(queue).expect("name"), config)
        .expect("config")
}

async fn archived(db: &TestDb, queue: &str) -> i64 {
    count(&db.pool, &format!("SELECT count(*) FROM pgmq.a_{queue}")).await
}

async fn queued(db: &TestDb, queue: &str) -> i64 {
    count(&db.pool, &format!("SELECT count(*) FROM pgmq.q_{queue}")).await
}

async fn dead_letters(db: &TestDb, queue: &str) -> Vec<(Value, Value)> {
    // Bodies as text: a dead letter may be valid jsonb too deep for serde_json.
    let rows: Vec<(String, Value)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT coalesce(message::text, 'null'), headers FROM pgmq.q_{queue}_dlq ORDER BY msg_id"
    )))
    .fetch_all(&db.pool)
    .await
    .expect("dead letters");
    rows.into_iter()
        .map(|(body, headers)| {
            let body = serde_json::from_str(&body)
                .unwrap_or_else(|_| Value::String(format!("unreadable, {} bytes", body.len())));
            (body, headers)
        })
        .collect()
}

#[tokio::test]
async fn done_is_archived_or_deleted() {
    let db = TestDb::setup().await;
    for (queue, action) in [
        ("done_a", DoneAction::Archive),
        ("done_d", DoneAction::Delete),
    ] {
        let mut s = storage(&db, queue, config().on_done(action));
        s.create_queue().await.expect("create");
        s.push_bulk((0..5).map(|id| Job { id }).collect())
            .await
            .expect("push");
        let worker = WorkerBuilder::new(queue)
            .backend(s.clone())
            .build(|_job: Job| async { Ok::<(), BoxDynError>(()) });
        let (stop, join) = spawn_worker!(worker);
        drained(&db.pool, queue).await;
        stop_worker(stop, join).await;
        let expected = if action == DoneAction::Archive { 5 } else { 0 };
        assert_eq!(archived(&db, queue).await, expected, "{action:?}");
    }
}

#[tokio::test]
async fn killed_is_deleted_by_default_and_configurable() {
    let db = TestDb::setup().await;
    let cases = [
        ("kill_del", KilledAction::Delete, 0, 0),
        ("kill_arc", KilledAction::Archive, 1, 0),
        ("kill_dlq", KilledAction::DeadLetter, 0, 1),
    ];
    for (queue, action, want_archived, want_dead) in cases {
        let mut s = storage(&db, queue, config().on_killed(action));
        s.create_queue().await.expect("create");
        s.push(Job { id: 1 }).await.expect("push");
        let worker = WorkerBuilder::new(queue)
            .backend(s.clone())
            .build(|_job: Job| async {
                Err::<(), BoxDynError>(Box::new(AbortError::new("not worth retrying")))
            });
        let (stop, join) = spawn_worker!(worker);
        drained(&db.pool, queue).await;
        stop_worker(stop, join).await;
        assert_eq!(archived(&db, queue).await, want_archived, "{action:?}");
        let dead = dead_letters(&db, queue).await;
        assert_eq!(dead.len(), want_dead, "{action:?}");
        if let Some((message, headers)) = dead.first() {
            assert_eq!(message, &json!({"id": 1}));
            let info = &headers["apalis_dead_letter"];
            assert_eq!(info["reason"], "killed");
            assert!(
                info["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("not worth retrying")
            );
        }
    }
}

#[tokio::test]
async fn failures_back_off_then_dead_letter() {
    let db = TestDb::setup().await;
    let queue = "fail_backoff";
    let cfg = config().max_attempts(3).backoff(
        Backoff::default()
            .base(Duration::from_secs(60))
            .factor(2.0)
            .jitter(0.0),
    );
    let s = storage(&db, queue, cfg);
    s.create_queue().await.expect("create");
    let task = TaskBuilder::new(Job { id: 7 })
        .metadata(&TenantMeta("acme".into()))
        .build();
    let mut conn = db.pool.acquire().await.expect("conn");
    let id = s.push_task_with(&mut conn, task).await.expect("push").id();
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .build(|job: Job| async move {
            Err::<(), BoxDynError>(format!("job {} always fails", job.id).into())
        });
    let (stop, join) = spawn_worker!(worker);
    for (attempt, backoff) in [(1, 60.0), (2, 120.0)] {
        // The failure is written as a visibility time `backoff` seconds ahead: check the value
        // instead of waiting through it.
        let (_, read_ct, secs) = wait_for(WAIT, "the failure to be recorded", || async {
            rows(&db.pool, queue)
                .await
                .into_iter()
                .find(|r| r.0 == id && r.1 == attempt && r.2 > backoff - 10.0)
        })
        .await;
        assert_eq!(read_ct, attempt);
        assert!(
            secs <= backoff + 0.5,
            "attempt {attempt}: vt {secs} s ahead, expected {backoff}"
        );
        // Make it due now, as if the backoff had passed.
        s.queue()
            .set_vt(&db.pool, id, apalis_pgmq_notify::Delay::Now)
            .await
            .expect("set_vt");
    }
    wait_for(WAIT, "the job to be dead-lettered", || async {
        (queued(&db, queue).await == 0).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    let dead = dead_letters(&db, queue).await;
    assert_eq!(dead.len(), 1);
    let (message, headers) = &dead[0];
    assert_eq!(message, &json!({"id": 7}));
    // Original headers are kept, with the dead-letter record beside them.
    assert_eq!(headers["apalis"]["metadata"]["tenant"], "acme");
    let info = &headers["apalis_dead_letter"];
    assert_eq!(info["reason"], "failed");
    assert_eq!(info["error"], "job 7 always fails");
    assert_eq!(info["attempts"], 3);
    assert_eq!(info["msg_id"], id);
    assert_eq!(info["queue"], queue);
    assert!(info["at"].is_string());
    assert_eq!(archived(&db, queue).await, 0);
}

#[derive(Debug, Clone, PartialEq)]
struct TenantMeta(String);

impl Metadata for TenantMeta {
    type Error = MetadataError;
    fn inject(&self, store: &mut MetadataStore) -> Result<(), Self::Error> {
        store.insert("tenant", self.0.clone())
    }
    fn extract(store: &MetadataStore) -> Result<Self, Self::Error> {
        Ok(Self(store.get("tenant").unwrap_or_default().to_owned()))
    }
}

#[tokio::test]
async fn exhausted_can_archive_or_delete() {
    let db = TestDb::setup().await;
    for (queue, action, want_archived) in [
        ("exh_arc", ExhaustedAction::Archive, 1),
        ("exh_del", ExhaustedAction::Delete, 0),
    ] {
        let s = storage(&db, queue, config().max_attempts(1).on_exhausted(action));
        s.create_queue().await.expect("create");
        s.push_with(&db.pool, &Job { id: 1 }).await.expect("push");
        let worker = WorkerBuilder::new(queue)
            .backend(s.clone())
            .build(|_job: Job| async { Err::<(), BoxDynError>("nope".into()) });
        let (stop, join) = spawn_worker!(worker);
        drained(&db.pool, queue).await;
        stop_worker(stop, join).await;
        assert_eq!(archived(&db, queue).await, want_archived, "{action:?}");
        assert!(dead_letters(&db, queue).await.is_empty(), "{action:?}");
    }
}

#[tokio::test]
async fn retry_after_and_deferred_set_the_visibility_time() {
    let db = TestDb::setup().await;
    let queue = "retry_after";
    let s = storage(&db, queue, config());
    s.create_queue().await.expect("create");
    let later = s.push_with(&db.pool, &Job { id: 1 }).await.expect("push");
    let deferred = s.push_with(&db.pool, &Job { id: 2 }).await.expect("push");
    let deferred_runs = Arc::new(AtomicUsize::new(0));
    let runs = deferred_runs.clone();
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .data(runs)
        .build(|job: Job, runs: Data<Arc<AtomicUsize>>| async move {
            if job.id == 1 {
                return Err::<(), BoxDynError>(Box::new(RetryAfterError::new(
                    "rate limited",
                    Duration::from_secs(300),
                )));
            }
            if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(Box::new(DeferredError::new("not yet")));
            }
            Ok(())
        });
    let (stop, join) = spawn_worker!(worker);
    let secs = wait_for(WAIT, "retry-after to be recorded", || async {
        rows(&db.pool, queue)
            .await
            .into_iter()
            .find(|r| r.0 == later && r.2 > 200.0)
            .map(|r| r.2)
    })
    .await;
    assert!((290.0..=300.5).contains(&secs), "visible again in {secs} s");
    // Deferred: visible again at once, so it ran a second time and succeeded.
    wait_for(WAIT, "deferred job to be archived", || async {
        (archived(&db, queue).await == 1).then_some(())
    })
    .await;
    assert_eq!(deferred_runs.load(Ordering::SeqCst), 2);
    let archived_id: i64 = sqlx::query_scalar("SELECT msg_id FROM pgmq.a_retry_after")
        .fetch_one(&db.pool)
        .await
        .expect("archived row");
    assert_eq!(archived_id, deferred);
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn undecodable_messages_are_dead_lettered_and_work_continues() {
    let db = TestDb::setup().await;
    let queue = "poison";
    let s = storage(&db, queue, config());
    s.create_queue().await.expect("create");
    for bad in [
        r#"{"id": "not a number"}"#,
        r#"[1, 2, 3]"#,
        r#""just a string""#,
        r#"{"unrelated": true}"#,
    ] {
        sqlx::query("SELECT pgmq.send('poison', $1::jsonb)")
            .bind(bad)
            .execute(&db.pool)
            .await
            .expect("send poison");
    }
    sqlx::query("INSERT INTO pgmq.q_poison (vt, message) VALUES (clock_timestamp(), NULL)")
        .execute(&db.pool)
        .await
        .expect("send NULL");
    // Valid jsonb, but deeper than any JSON reader here accepts.
    let deep = format!("{}1{}", "[".repeat(2000), "]".repeat(2000));
    sqlx::query("SELECT pgmq.send('poison', $1::jsonb)")
        .bind(&deep)
        .execute(&db.pool)
        .await
        .expect("send deep");
    s.push_with(&db.pool, &Job { id: 42 })
        .await
        .expect("push good");
    let seen: Log<u32> = Arc::default();
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .data(seen.clone())
        .build(|job: Job, seen: Data<Log<u32>>| async move {
            seen.lock().expect("lock").push(job.id);
            Ok::<(), BoxDynError>(())
        });
    let (stop, join) = spawn_worker!(worker);
    drained(&db.pool, queue).await;
    stop_worker(stop, join).await;
    assert_eq!(*seen.lock().expect("lock"), vec![42]);
    let dead = dead_letters(&db, queue).await;
    assert_eq!(dead.len(), 6);
    for (_, headers) in &dead {
        let info = &headers["apalis_dead_letter"];
        assert_eq!(info["reason"], "undecodable");
        assert!(!info["error"].as_str().unwrap_or("").is_empty());
        assert!(
            info["expected_type"]
                .as_str()
                .unwrap_or("")
                .ends_with("Job")
        );
    }
    assert_eq!(
        dead[0].0,
        json!({"id": "not a number"}),
        "message kept as sent"
    );
    assert_eq!(dead[4].0, Value::Null);
}

#[tokio::test]
async fn a_panicking_handler_is_a_failure_and_the_worker_survives() {
    let db = TestDb::setup().await;
    let queue = "panics";
    let s = storage(
        &db,
        queue,
        config()
            .max_attempts(2)
            .backoff(Backoff::default().base(Duration::ZERO).jitter(0.0)),
    );
    s.create_queue().await.expect("create");
    s.push_with(&db.pool, &Job { id: 1 }).await.expect("push");
    let ok = Arc::new(AtomicUsize::new(0));
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .data(ok.clone())
        .build(|job: Job, ok: Data<Arc<AtomicUsize>>| async move {
            if job.id == 1 {
                panic!("handler bug for job {}", job.id);
            }
            ok.fetch_add(1, Ordering::SeqCst);
            Ok::<(), BoxDynError>(())
        });
    let (stop, join) = spawn_worker!(worker);
    wait_for(WAIT, "the panicking job to be dead-lettered", || async {
        (dead_letters(&db, queue).await.len() == 1).then_some(())
    })
    .await;
    s.push_with(&db.pool, &Job { id: 2 })
        .await
        .expect("push after panic");
    wait_for(WAIT, "the next job to run", || async {
        (ok.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    let dead = dead_letters(&db, queue).await;
    let info = &dead[0].1["apalis_dead_letter"];
    assert_eq!(info["reason"], "failed");
    assert_eq!(info["attempts"], 2);
    assert!(
        info["error"]
            .as_str()
            .unwrap_or("")
            .contains("handler bug for job 1"),
        "{info}"
    );
}

#[tokio::test]
async fn attempts_are_read_ct_starting_at_one() {
    let db = TestDb::setup().await;
    let queue = "attempts";
    let s = storage(
        &db,
        queue,
        config()
            .max_attempts(5)
            .backoff(Backoff::default().base(Duration::ZERO).jitter(0.0)),
    );
    s.create_queue().await.expect("create");
    s.push_with(&db.pool, &Job { id: 1 }).await.expect("push");
    let seen: Log<(usize, i32)> = Arc::default();
    let worker =
        WorkerBuilder::new(queue)
            .backend(s.clone())
            .data(seen.clone())
            .build(
                |_job: Job,
                 attempt: Attempt,
                 msg: Data<MessageInfo>,
                 seen: Data<Log<(usize, i32)>>| async move {
                    seen.lock()
                        .expect("lock")
                        .push((attempt.current(), msg.read_ct));
                    if msg.read_ct < 3 {
                        return Err::<(), BoxDynError>("again".into());
                    }
                    Ok(())
                },
            );
    let (stop, join) = spawn_worker!(worker);
    wait_for(WAIT, "the third attempt to succeed", || async {
        (archived(&db, queue).await == 1).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    assert_eq!(*seen.lock().expect("lock"), vec![(1, 1), (2, 2), (3, 3)]);
    let read_ct: i32 = sqlx::query_scalar("SELECT read_ct FROM pgmq.a_attempts")
        .fetch_one(&db.pool)
        .await
        .expect("archived");
    assert_eq!(read_ct, 3);
}

#[tokio::test]
async fn a_job_longer_than_the_visibility_timeout_keeps_its_lease() {
    let db = TestDb::setup().await;
    let queue = "long_job";
    let vt = Duration::from_secs(1);
    let s = storage(&db, queue, config().visibility_timeout(vt));
    s.create_queue().await.expect("create");
    let id = s.push_with(&db.pool, &Job { id: 1 }).await.expect("push");
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .data((started.clone(), release.clone(), runs.clone()))
        .build(
            |_job: Job, signals: Data<(Arc<Notify>, Arc<Notify>, Arc<AtomicUsize>)>| async move {
                let (started, release, runs) = &*signals;
                runs.fetch_add(1, Ordering::SeqCst);
                started.notify_one();
                release.notified().await;
                Ok::<(), BoxDynError>(())
            },
        );
    let (stop, join) = spawn_worker!(worker);
    started.notified().await;
    let first_vt: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT vt FROM pgmq.q_long_job")
            .fetch_one(&db.pool)
            .await
            .expect("vt");
    // Wait until the job has run for three visibility timeouts, by the database's clock.
    wait_for(WAIT, "three visibility timeouts to pass", || async {
        let past: bool = sqlx::query_scalar("SELECT clock_timestamp() > $1 + interval '2 seconds'")
            .bind(first_vt)
            .fetch_one(&db.pool)
            .await
            .expect("clock");
        past.then_some(())
    })
    .await;
    // A competing reader finds nothing: the lease was renewed, the message is still hidden.
    let stolen = s
        .queue()
        .read(&db.pool, Duration::from_secs(30), 10)
        .await
        .expect("read");
    assert!(stolen.is_empty(), "another reader got {stolen:?}");
    let (_, read_ct, secs) = rows(&db.pool, queue).await[0];
    assert_eq!(read_ct, 1, "delivered once");
    assert!(secs > 0.0, "still hidden");
    release.notify_one();
    wait_for(WAIT, "the job to be archived", || async {
        (archived(&db, queue).await == 1).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let archived_id: i64 = sqlx::query_scalar("SELECT msg_id FROM pgmq.a_long_job")
        .fetch_one(&db.pool)
        .await
        .expect("archived");
    assert_eq!(archived_id, id);
}

#[tokio::test]
async fn a_pool_of_workers_handles_each_job_exactly_once() {
    let db = TestDb::setup().await;
    let queue = "pool_exact";
    const JOBS: u32 = 3000;
    let s = storage(&db, queue, config().fetch_batch_size(50));
    s.create_queue().await.expect("create");
    s.push_bulk_with(&db.pool, (0..JOBS).map(|id| Job { id }))
        .await
        .expect("push");
    let counts: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let mut running = Vec::new();
    for w in 0..3 {
        let worker = WorkerBuilder::new(format!("pool-{w}"))
            .backend(s.clone())
            .data(counts.clone())
            .concurrency(10)
            .build(
                |job: Job, counts: Data<Arc<Mutex<HashMap<u32, u32>>>>| async move {
                    tokio::task::yield_now().await;
                    *counts.lock().expect("lock").entry(job.id).or_default() += 1;
                    Ok::<(), BoxDynError>(())
                },
            );
        running.push(spawn_worker!(worker));
    }
    wait_for(Duration::from_secs(120), "all jobs archived", || async {
        (archived(&db, queue).await == i64::from(JOBS)).then_some(())
    })
    .await;
    for (stop, join) in running {
        stop_worker(stop, join).await;
    }
    let counts = counts.lock().expect("lock").clone();
    assert_eq!(counts.len(), JOBS as usize, "every job ran");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "jobs handled more than once: {twice:?}");
    assert_eq!(queued(&db, queue).await, 0);
    let max_read: i32 = sqlx::query_scalar("SELECT max(read_ct) FROM pgmq.a_pool_exact")
        .fetch_one(&db.pool)
        .await
        .expect("max");
    assert_eq!(max_read, 1, "no message was delivered twice");
}

#[tokio::test]
async fn a_full_worker_does_not_hoard_messages() {
    let db = TestDb::setup().await;
    let queue = "no_hoard";
    let s = storage(&db, queue, config().fetch_batch_size(20));
    s.create_queue().await.expect("create");
    s.push_bulk_with(&db.pool, (0..20).map(|id| Job { id }))
        .await
        .expect("push");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .data((gate.clone(), started.clone()))
        .concurrency(2)
        .build(
            |_job: Job, g: Data<(Arc<tokio::sync::Semaphore>, Arc<AtomicUsize>)>| async move {
                let (gate, started) = &*g;
                started.fetch_add(1, Ordering::SeqCst);
                let permit = gate
                    .acquire()
                    .await
                    .map_err(|e| Box::new(e) as BoxDynError)?;
                permit.forget();
                Ok::<(), BoxDynError>(())
            },
        );
    let (stop, join) = spawn_worker!(worker);
    // Two jobs run and block; the other 18 must be visible to other workers, with their read
    // given back (a release is not an attempt).
    let state = wait_for(WAIT, "two claimed, eighteen released", || async {
        let r = rows(&db.pool, queue).await;
        let claimed: Vec<_> = r.iter().filter(|x| x.2 > 0.0).collect();
        let free = r.iter().filter(|x| x.2 <= 0.0 && x.1 == 0).count();
        (started.load(Ordering::SeqCst) == 2 && claimed.len() == 2 && free == 18).then_some(r)
    })
    .await;
    assert!(state.iter().filter(|x| x.2 > 0.0).all(|x| x.1 == 1));
    gate.add_permits(20);
    wait_for(WAIT, "all jobs archived", || async {
        (archived(&db, queue).await == 20).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    let max_read: i32 = sqlx::query_scalar("SELECT max(read_ct) FROM pgmq.a_no_hoard")
        .fetch_one(&db.pool)
        .await
        .expect("max");
    assert_eq!(max_read, 1, "released messages did not count as attempts");
}

#[tokio::test]
async fn shutdown_releases_claimed_but_unstarted_messages() {
    let db = TestDb::setup().await;
    let queue = "shutdown_release";
    let s = storage(&db, queue, config().fetch_batch_size(20));
    s.create_queue().await.expect("create");
    s.push_bulk_with(&db.pool, (0..20).map(|id| Job { id }))
        .await
        .expect("push");
    // The first job stops the worker: everything else it claimed must be handed back.
    let worker = WorkerBuilder::new(queue).backend(s.clone()).build(
        |_job: Job, worker: WorkerContext| async move {
            worker.stop().map_err(|e| Box::new(e) as BoxDynError)?;
            Ok::<(), BoxDynError>(())
        },
    );
    tokio::time::timeout(WAIT, worker.run())
        .await
        .expect("worker stopped")
        .expect("worker ok");
    let r = rows(&db.pool, queue).await;
    let handled = 20 - r.len();
    assert!(handled >= 1, "at least the first job ran");
    assert_eq!(
        archived(&db, queue).await as usize,
        handled,
        "outcomes flushed on shutdown"
    );
    assert!(
        r.iter().all(|x| x.2 <= 0.0 && x.1 == 0),
        "every unstarted message is visible now with read_ct 0: {r:?}"
    );
}

#[tokio::test]
async fn handlers_can_push_jobs() {
    let db = TestDb::setup().await;
    let queue = "chain";
    let mut s = storage(&db, queue, config());
    s.create_queue().await.expect("create");
    s.push(Job { id: 1 }).await.expect("push");
    let seen: Log<u32> = Arc::default();
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .data(s.clone())
        .data(seen.clone())
        .build(
            |job: Job, storage: Data<PgmqStorage<Job>>, seen: Data<Log<u32>>| async move {
                seen.lock().expect("lock").push(job.id);
                if job.id < 5 {
                    let mut storage = (*storage).clone();
                    storage.push(Job { id: job.id + 1 }).await?;
                }
                Ok::<(), BoxDynError>(())
            },
        );
    let (stop, join) = spawn_worker!(worker);
    wait_for(WAIT, "the chain to finish", || async {
        (archived(&db, queue).await == 5).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    assert_eq!(*seen.lock().expect("lock"), vec![1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn enqueue_in_the_callers_transaction() {
    let db = TestDb::setup().await;
    let queue = "tx_push";
    let s = storage(&db, queue, config());
    s.create_queue().await.expect("create");
    sqlx::query("CREATE TABLE orders (id int PRIMARY KEY)")
        .execute(&db.pool)
        .await
        .expect("table");

    let mut tx = db.pool.begin().await.expect("begin");
    sqlx::query("INSERT INTO orders VALUES (1)")
        .execute(&mut *tx)
        .await
        .expect("order");
    s.push_with(&mut *tx, &Job { id: 1 }).await.expect("push");
    s.push_task_with(&mut tx, TaskBuilder::new(Job { id: 2 }).build())
        .await
        .expect("push task");
    s.push_bulk_with(&mut *tx, [Job { id: 3 }])
        .await
        .expect("bulk");
    tx.rollback().await.expect("rollback");
    assert_eq!(queued(&db, queue).await, 0, "rolled back: no job");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM orders").await, 0);

    let mut tx = db.pool.begin().await.expect("begin");
    sqlx::query("INSERT INTO orders VALUES (2)")
        .execute(&mut *tx)
        .await
        .expect("order");
    let id = s.push_with(&mut *tx, &Job { id: 10 }).await.expect("push");
    tx.commit().await.expect("commit");

    let seen: Log<(u32, i64)> = Arc::default();
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .data(seen.clone())
        .build(
            |job: Job, msg: Data<MessageInfo>, seen: Data<Log<(u32, i64)>>| async move {
                seen.lock().expect("lock").push((job.id, msg.msg_id));
                Ok::<(), BoxDynError>(())
            },
        );
    let (stop, join) = spawn_worker!(worker);
    wait_for(WAIT, "the committed job", || async {
        (archived(&db, queue).await == 1).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    assert_eq!(*seen.lock().expect("lock"), vec![(10, id)]);
}

#[tokio::test]
async fn a_job_sent_with_sql_is_processed() {
    let db = TestDb::setup().await;
    let queue = "from_sql";
    let s = storage(&db, queue, config());
    s.create_queue().await.expect("create");
    let seen: Log<(u32, Option<Value>)> = Arc::default();
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .data(seen.clone())
        .build(
            |job: Job, msg: Data<MessageInfo>, seen: Data<Log<(u32, Option<Value>)>>| async move {
                seen.lock()
                    .expect("lock")
                    .push((job.id, msg.headers.clone()));
                Ok::<(), BoxDynError>(())
            },
        );
    let (stop, join) = spawn_worker!(worker);
    sqlx::query(
        "SELECT pgmq.send('from_sql', '{\"id\": 5}'::jsonb, '{\"x-trace\": \"abc\"}'::jsonb)",
    )
    .execute(&db.pool)
    .await
    .expect("pgmq.send");
    sqlx::query("SELECT pgmq.send_batch('from_sql', ARRAY['{\"id\": 6}', '{\"id\": 7}']::jsonb[])")
        .execute(&db.pool)
        .await
        .expect("pgmq.send_batch");
    wait_for(WAIT, "the SQL jobs", || async {
        (archived(&db, queue).await == 3).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0], (5, Some(json!({"x-trace": "abc"}))));
}

#[tokio::test]
async fn task_builder_options_round_trip() {
    let db = TestDb::setup().await;
    let queue = "meta_rt";
    let mut s = storage(&db, queue, config());
    s.create_queue().await.expect("create");
    let task = TaskBuilder::new(Job { id: 1 })
        .max_attempts(4)
        .priority(9)
        .idempotency_key("order-1")
        .metadata(&TenantMeta("acme".into()))
        .build();
    s.push_task(task).await.expect("push_task");
    // Delayed by an hour: stays hidden.
    let delayed = TaskBuilder::new(Job { id: 2 })
        .run_after(Duration::from_secs(3600))
        .build();
    let mut conn = db.pool.acquire().await.expect("conn");
    let delayed_id = s
        .push_task_with(&mut conn, delayed)
        .await
        .expect("push delayed")
        .id();
    type Seen = (
        u32,
        Option<usize>,
        Option<usize>,
        Option<String>,
        Option<String>,
        Option<u64>,
    );
    let seen: Log<Seen> = Arc::default();
    let record = seen.clone();
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .map_request(move |task: Task<Job>| {
            record.lock().expect("lock").push((
                task.args.id,
                task.max_attempts(),
                task.priority(),
                task.idempotency_key().map(str::to_owned),
                task.metadata().get("tenant").map(str::to_owned),
                task.task_id().and_then(TaskId::as_int),
            ));
            task
        })
        .build(|_job: Job, tenant: Meta<TenantMeta>| async move {
            assert_eq!(tenant.0.0, "acme");
            Ok::<(), BoxDynError>(())
        });
    let (stop, join) = spawn_worker!(worker);
    wait_for(WAIT, "the job", || async {
        (archived(&db, queue).await == 1).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    let (id, max_attempts, priority, key, tenant, task_id) = seen[0].clone();
    assert_eq!(
        (
            id,
            max_attempts,
            priority,
            key.as_deref(),
            tenant.as_deref()
        ),
        (1, Some(4), Some(9), Some("order-1"), Some("acme"))
    );
    let archived_id: i64 = sqlx::query_scalar("SELECT msg_id FROM pgmq.a_meta_rt")
        .fetch_one(&db.pool)
        .await
        .expect("archived");
    assert_eq!(
        task_id,
        u64::try_from(archived_id).ok(),
        "task id is msg_id"
    );
    let r = rows(&db.pool, queue).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, delayed_id);
    assert!(
        (3500.0..=3601.0).contains(&r[0].2),
        "delayed by an hour: {}",
        r[0].2
    );
}

#[tokio::test]
async fn tower_retry_layer_composes() {
    let db = TestDb::setup().await;
    let queue = "tower_retry";
    let s = storage(&db, queue, config());
    s.create_queue().await.expect("create");
    s.push_with(&db.pool, &Job { id: 1 }).await.expect("push");
    let calls = Arc::new(AtomicUsize::new(0));
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .data(calls.clone())
        .retry(RetryPolicy::retries(3))
        .build(|_job: Job, calls: Data<Arc<AtomicUsize>>| async move {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                return Err::<(), BoxDynError>("flaky".into());
            }
            Ok(())
        });
    let (stop, join) = spawn_worker!(worker);
    wait_for(WAIT, "the job", || async {
        (archived(&db, queue).await == 1).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3, "retried in process");
    let read_ct: i32 = sqlx::query_scalar("SELECT read_ct FROM pgmq.a_tower_retry")
        .fetch_one(&db.pool)
        .await
        .expect("archived");
    assert_eq!(read_ct, 1, "one delivery");
}

#[tokio::test]
async fn oversize_jobs_are_refused_when_pushed() {
    let db = TestDb::setup().await;
    let queue = "too_big";
    let mut s: PgmqStorage<String> = PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        config().max_payload_bytes(1024),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    let big = "x".repeat(2048);
    match s.push_with(&db.pool, &big).await {
        Err(Error::PayloadTooLarge { limit: 1024, .. }) => {}
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let err = s.push(big).await.expect_err("TaskSink refuses too");
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
    assert_eq!(queued(&db, queue).await, 0);
    s.push("small".to_owned())
        .await
        .expect("a small job still fits");
    assert_eq!(queued(&db, queue).await, 1);
}

#[tokio::test]
async fn invalid_config_is_refused() {
    let db = TestDb::fresh().await;
    let err = PgmqStorage::<Job>::with_config(
        &db.runtime(),
        QueueName::new("x").expect("name"),
        Config::default().visibility_timeout(Duration::ZERO),
    )
    .expect_err("zero vt");
    assert!(
        matches!(&err, Error::Config { setting, .. } if setting == "leases.visibility_timeout"),
        "{err}"
    );
}
