//! Unique jobs against a real PostgreSQL: one job per idempotency key while it is queued,
//! running or retrying, under concurrent pushes from many connections, from plain SQL, through
//! apalis' `TaskSink`, and within a window after it finished.
mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use apalis::prelude::*;
use apalis_pgmq_notify::{Backoff, Config, Error, PgmqStorage, QueueName};
use common::{TestDb, count, stop_worker, wait_for};
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u32,
}

fn keyed(id: u32, key: &str) -> Task<Job> {
    TaskBuilder::new(Job { id }).idempotency_key(key).build()
}

async fn storage(db: &TestDb, queue: &str, config: Config) -> PgmqStorage<Job> {
    let s = PgmqStorage::with_config(&db.runtime(), QueueName::new(queue).expect("name"), config)
        .expect("config");
    s.create_queue().await.expect("create");
    s
}

async fn queued(db: &TestDb, queue: &str) -> i64 {
    count(&db.pool, &format!("SELECT count(*) FROM pgmq.q_{queue}")).await
}

#[tokio::test]
async fn concurrent_pushes_of_one_key_write_exactly_one_job() {
    let db = TestDb::setup().await;
    let queue = "unique_race";
    let s = storage(&db, queue, Config::default().listen(false)).await;
    let pool = db.pool_with(20).await;
    let mut tasks = Vec::new();
    for i in 0..60u32 {
        let (s, pool) = (s.clone(), pool.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await.expect("conn");
            s.push_task_with(&mut conn, keyed(i, "report:2026-11-26"))
                .await
                .expect("push")
        }));
    }
    let mut pushed = Vec::new();
    for t in tasks {
        pushed.push(t.await.expect("join"));
    }
    assert_eq!(queued(&db, queue).await, 1, "one job");
    let fresh: Vec<_> = pushed.iter().filter(|p| !p.is_duplicate()).collect();
    assert_eq!(fresh.len(), 1, "exactly one push wrote: {pushed:?}");
    assert!(
        pushed.iter().all(|p| p.id() == fresh[0].id()),
        "every duplicate names the job that exists: {pushed:?}"
    );
    // Different keys and no key are not affected.
    let mut conn = db.pool.acquire().await.expect("conn");
    assert!(
        !s.push_task_with(&mut conn, keyed(1, "report:2026-11-27"))
            .await
            .expect("push")
            .is_duplicate()
    );
    for _ in 0..2 {
        let p = s
            .push_task_with(&mut conn, TaskBuilder::new(Job { id: 9 }).build())
            .await
            .expect("push");
        assert!(!p.is_duplicate());
    }
    assert_eq!(queued(&db, queue).await, 4);
}

#[tokio::test]
async fn a_key_is_taken_while_its_job_runs_or_retries_and_free_once_done() {
    let db = TestDb::setup().await;
    let queue = "unique_life";
    let config = Config::default()
        .poll_interval(Duration::from_millis(50))
        .listen(false)
        .backoff(
            Backoff::default()
                .base(Duration::from_secs(3600))
                .jitter(0.0),
        );
    let s = storage(&db, queue, config).await;
    let mut conn = db.pool.acquire().await.expect("conn");
    let first = s
        .push_task_with(&mut conn, keyed(1, "k"))
        .await
        .expect("push");
    // The handler fails the first run (a retry an hour away) and blocks on the second.
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .data((runs.clone(), gate.clone()))
        .build(
            |_job: Job, d: Data<(Arc<AtomicUsize>, Arc<tokio::sync::Semaphore>)>| async move {
                let (runs, gate) = &*d;
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err::<(), BoxDynError>("first run fails".into());
                }
                let permit = gate.acquire().await.map_err(|e| e.to_string())?;
                permit.forget();
                Ok(())
            },
        );
    let (stop, join) = spawn_worker!(worker);
    // Waiting for its retry (an hour away): the key is taken.
    let retry =
        format!("SELECT count(*) FROM pgmq.q_{queue} WHERE vt > now() + interval '30 minutes'");
    wait_for(WAIT, "the retry to be scheduled", || async {
        (count(&db.pool, &retry).await == 1).then_some(())
    })
    .await;
    let again = s
        .push_task_with(&mut conn, keyed(2, "k"))
        .await
        .expect("push");
    assert!(
        again.is_duplicate() && again.id() == first.id(),
        "{again:?}"
    );
    // Make the retry due now; while it runs (blocked), the key is still taken.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE pgmq.q_{queue} SET vt = now()"
    )))
    .execute(&db.pool)
    .await
    .expect("due");
    wait_for(WAIT, "the second run", || async {
        (runs.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    let running = s
        .push_task_with(&mut conn, keyed(3, "k"))
        .await
        .expect("push");
    assert!(running.is_duplicate() && running.id() == first.id());
    gate.add_permits(1);
    let archive = format!("SELECT count(*) FROM pgmq.a_{queue}");
    wait_for(WAIT, "the job archived", || async {
        (count(&db.pool, &archive).await == 1).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    // Done: without a window the key is free again.
    let after = s
        .push_task_with(&mut conn, keyed(4, "k"))
        .await
        .expect("push");
    assert!(!after.is_duplicate() && after.id() != first.id());
}

#[tokio::test]
async fn a_window_keeps_a_finished_jobs_key_taken() {
    let db = TestDb::setup().await;
    let queue = "unique_window";
    let hourly = Config::default()
        .listen(false)
        .poll_interval(Duration::from_millis(50))
        .idempotency_window(Some(Duration::from_secs(3600)));
    let s = storage(&db, queue, hourly).await;
    let mut conn = db.pool.acquire().await.expect("conn");
    let first = s
        .push_task_with(&mut conn, keyed(1, "hourly:10"))
        .await
        .expect("push");
    let done = Arc::new(AtomicUsize::new(0));
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .data(done.clone())
        .build(|_job: Job, d: Data<Arc<AtomicUsize>>| async move {
            d.fetch_add(1, Ordering::SeqCst);
            Ok::<(), BoxDynError>(())
        });
    let (stop, join) = spawn_worker!(worker);
    let archive = format!("SELECT count(*) FROM pgmq.a_{queue}");
    wait_for(WAIT, "the job archived", || async {
        (count(&db.pool, &archive).await == 1).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    let again = s
        .push_task_with(&mut conn, keyed(2, "hourly:10"))
        .await
        .expect("push");
    assert!(
        again.is_duplicate() && again.id() == first.id(),
        "{again:?}"
    );
    assert_eq!(queued(&db, queue).await, 0);
    // Once the window has passed (the archive row and the key's hold made 2 hours old), the
    // key is free.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "UPDATE pgmq.a_{queue} SET archived_at = now() - interval '2 hours'; \
         UPDATE apalis_pgmq.job_keys SET held_until = held_until - interval '2 hours' \
          WHERE queue = '{queue}'"
    )))
    .execute(&db.pool)
    .await
    .expect("age");
    let later = s
        .push_task_with(&mut conn, keyed(3, "hourly:10"))
        .await
        .expect("push");
    assert!(!later.is_duplicate());
    // A window longer than the archive is kept makes no sense: refused.
    let e = PgmqStorage::<Job>::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        Config::default()
            .archive_retention(Some(Duration::from_secs(60)))
            .idempotency_window(Some(Duration::from_secs(3600))),
    )
    .expect_err("refused");
    assert!(e.to_string().contains("idempotency_window"), "{e}");
}

#[tokio::test]
async fn sql_producers_and_the_task_sink_respect_keys() {
    let db = TestDb::setup().await;
    let queue = "unique_sql";
    let s = storage(&db, queue, Config::default().listen(false)).await;
    let headers = serde_json::json!({"apalis": {"idempotency_key": "from-sql"}});
    let id: i64 = sqlx::query_scalar("SELECT pgmq.send($1, $2, $3, 0)")
        .bind(queue)
        .bind(serde_json::json!({"id": 7}))
        .bind(&headers)
        .fetch_one(&db.pool)
        .await
        .expect("send");
    // A plain pgmq.send with a taken key is refused by the index (unique_violation)...
    let e = sqlx::query("SELECT pgmq.send($1, $2, $3, 0)")
        .bind(queue)
        .bind(serde_json::json!({"id": 8}))
        .bind(&headers)
        .execute(&db.pool)
        .await
        .expect_err("refused");
    assert_eq!(
        e.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("23505")
    );
    // ... and this crate's push returns the SQL-sent job.
    let mut conn = db.pool.acquire().await.expect("conn");
    let p = s
        .push_task_with(&mut conn, keyed(9, "from-sql"))
        .await
        .expect("push");
    assert!(p.is_duplicate() && p.id() == id);
    // apalis' TaskSink: three tasks, two sharing a key, plus one without: three jobs.
    let mut sink = s.clone();
    sink.push_task(keyed(1, "sink-a")).await.expect("push");
    sink.push_task(keyed(2, "sink-a")).await.expect("push");
    sink.push_task(keyed(3, "sink-b")).await.expect("push");
    sink.push(Job { id: 4 }).await.expect("push");
    assert_eq!(
        queued(&db, queue).await,
        4,
        "the SQL job, sink-a, sink-b, the keyless one"
    );
}

#[tokio::test]
async fn a_queue_without_the_key_index_says_what_to_do() {
    let db = TestDb::setup().await;
    let queue = "unique_noindex";
    let s = storage(&db, queue, Config::default().listen(false)).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP INDEX pgmq.q_{queue}_key_idx"
    )))
    .execute(&db.pool)
    .await
    .expect("drop index");
    let mut conn = db.pool.acquire().await.expect("conn");
    let e = s
        .push_task_with(&mut conn, keyed(1, "k"))
        .await
        .expect_err("refused");
    assert!(matches!(e, Error::SchemaMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains("create_queue"), "{e}");
    assert_eq!(queued(&db, queue).await, 0, "nothing half-written");
    // Keyless pushes are unaffected; creating the queue again restores the index.
    s.push_task_with(&mut conn, TaskBuilder::new(Job { id: 2 }).build())
        .await
        .expect("keyless push");
    s.create_queue().await.expect("create again");
    assert!(
        !s.push_task_with(&mut conn, keyed(3, "k"))
            .await
            .expect("push")
            .is_duplicate()
    );
}

#[tokio::test]
async fn a_huge_key_is_unique_like_any_other_and_never_refuses_a_producer() {
    let db = TestDb::setup().await;
    let queue = "unique_huge";
    let s = storage(&db, queue, Config::default().listen(false)).await;
    // Far beyond what a btree entry can hold (about 2.7 kB), and not compressible.
    let key = noise(20_000, 1);
    let mut conn = db.pool.acquire().await.expect("conn");
    let first = s
        .push_task_with(&mut conn, keyed(1, &key))
        .await
        .expect("a huge key is accepted");
    let again = s
        .push_task_with(&mut conn, keyed(2, &key))
        .await
        .expect("push");
    assert!(again.is_duplicate() && again.id() == first.id());
    // Keys that share a long prefix are still different keys.
    let other = format!("{key}-other");
    assert!(
        !s.push_task_with(&mut conn, keyed(3, &other))
            .await
            .expect("push")
            .is_duplicate()
    );
    // A plain PGMQ producer with such a header is not refused either.
    sqlx::query("SELECT pgmq.send($1, $2, $3, 0)")
        .bind(queue)
        .bind(serde_json::json!({"id": 4}))
        .bind(serde_json::json!({"apalis": {"idempotency_key": noise(20_000, 2)}}))
        .execute(&db.pool)
        .await
        .expect("send");
    assert_eq!(queued(&db, queue).await, 3);
}

/// `len` characters that do not compress (a fixed pseudo-random sequence per `seed`).
fn noise(len: usize, seed: u64) -> String {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            char::from(b'!' + ((x >> 33) % 90) as u8)
        })
        .collect()
}

#[tokio::test]
async fn a_key_pushed_in_an_open_transaction_decides_only_when_it_ends() {
    let db = TestDb::setup().await;
    let queue = "unique_open_tx";
    let s = storage(&db, queue, Config::default().listen(false)).await;
    // Another key is not held up by the open transaction.
    let mut tx = db.pool.begin().await.expect("begin");
    let held = s
        .push_task_with(&mut tx, keyed(1, "k"))
        .await
        .expect("push in tx");
    assert!(!held.is_duplicate());
    let mut conn = db.pool.acquire().await.expect("conn");
    assert!(
        !s.push_task_with(&mut conn, keyed(2, "other"))
            .await
            .expect("push")
            .is_duplicate()
    );
    // The same key waits for that transaction, like any unique constraint...
    let (s2, pool) = (s.clone(), db.pool.clone());
    let waiting = tokio::spawn(async move {
        let mut conn = pool.acquire().await.expect("conn");
        s2.push_task_with(&mut conn, keyed(3, "k"))
            .await
            .expect("push")
    });
    wait_for(WAIT, "the second push to wait on the first", || async {
        let waits = count(
            &db.pool,
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
               AND query LIKE 'WITH prior AS%'",
        )
        .await;
        (waits == 1).then_some(())
    })
    .await;
    // ... and, the transaction rolled back, the key is free: it writes.
    tx.rollback().await.expect("rollback");
    let pushed = waiting.await.expect("join");
    assert!(!pushed.is_duplicate() && pushed.id() != held.id());
    assert_eq!(queued(&db, queue).await, 2, "\"other\" and the second k");
}

/// `push_task_with` takes anything that gives one connection: the pool, a connection, or a
/// transaction (whose pushes vanish with its rollback), and its future can be spawned.
#[tokio::test]
async fn push_task_with_takes_a_pool_a_connection_or_a_transaction() {
    let db = TestDb::setup().await;
    let queue = "acquire";
    let s = storage(&db, queue, Config::default().listen(false)).await;
    let by_pool = s
        .push_task_with(&db.pool, keyed(1, "a"))
        .await
        .expect("with &pool");
    let mut conn = db.pool.acquire().await.expect("conn");
    let by_conn = s
        .push_task_with(&mut conn, keyed(2, "b"))
        .await
        .expect("with &mut PoolConnection");
    let again = s
        .push_task_with(&mut *conn, keyed(3, "a"))
        .await
        .expect("with &mut PgConnection");
    assert!(again.is_duplicate() && again.id() == by_pool.id());
    assert!(!by_conn.is_duplicate());
    drop(conn);
    let mut tx = db.pool.begin().await.expect("begin");
    let in_tx = s
        .push_task_with(&mut tx, keyed(4, "c"))
        .await
        .expect("with &mut Transaction");
    assert!(!in_tx.is_duplicate());
    s.push_task_with(&mut tx, TaskBuilder::new(Job { id: 5 }).build())
        .await
        .expect("keyless, in the transaction");
    tx.rollback().await.expect("rollback");
    assert_eq!(
        queued(&db, queue).await,
        2,
        "the transaction's pushes are gone"
    );
    let (s2, pool) = (s.clone(), db.pool.clone());
    let spawned = tokio::spawn(async move {
        let mut conn = pool.acquire().await.expect("conn");
        s2.push_task_with(&mut conn, keyed(6, "c")).await
    });
    assert!(!spawned.await.expect("join").expect("push").is_duplicate());
    assert_eq!(queued(&db, queue).await, 3);
}

/// A key's hold outlives its job by the window, then `prune` deletes it; a key whose job is
/// still queued is never pruned.
#[tokio::test]
async fn prune_deletes_key_holds_that_ended() {
    let db = TestDb::setup().await;
    let queue = "unique_prune";
    let s = storage(
        &db,
        queue,
        Config::default().idempotency_window(Some(Duration::from_secs(3600))),
    )
    .await;
    let mut conn = db.pool.acquire().await.expect("conn");
    let done = s
        .push_task_with(&mut conn, keyed(1, "done"))
        .await
        .expect("push");
    s.push_task_with(&mut conn, keyed(2, "queued"))
        .await
        .expect("push");
    s.queue()
        .archive(&mut *conn, &[done.id()])
        .await
        .expect("archive");
    let holds = format!("SELECT count(*) FROM apalis_pgmq.job_keys WHERE queue = '{queue}'");
    let name = QueueName::new(queue).expect("name");
    apalis_pgmq_notify::prune(&db.pool, &name, None, None)
        .await
        .expect("prune");
    assert_eq!(count(&db.pool, &holds).await, 2, "both keys are held");
    sqlx::raw_sql(
        "UPDATE apalis_pgmq.job_keys SET held_until = now() - interval '1 second' \
          WHERE held_until < 'infinity'; \
         UPDATE pgmq.a_unique_prune SET archived_at = now() - interval '2 hours'",
    )
    .execute(&db.pool)
    .await
    .expect("age");
    apalis_pgmq_notify::prune(&db.pool, &name, None, None)
        .await
        .expect("prune");
    assert_eq!(
        count(&db.pool, &holds).await,
        1,
        "the ended hold is gone, the queued job's stays"
    );
    let again = s
        .push_task_with(&mut conn, keyed(3, "queued"))
        .await
        .expect("push");
    assert!(again.is_duplicate());
    let fresh = s
        .push_task_with(&mut conn, keyed(4, "done"))
        .await
        .expect("push");
    assert!(!fresh.is_duplicate(), "the window is over");
}
