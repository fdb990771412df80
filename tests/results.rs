//! Job results: `Config::store_results`, `WaitForCompletion`, `push_and_wait`, and what happens
//! to waiters when the listener dies, when results are huge or unstorable, when the role may
//! not write them.

mod common;

use std::time::Duration;

use apalis::prelude::*;
use apalis_core::{
    backend::{TaskResult, WaitForCompletion},
    task::{builder::TaskBuilder, task_id::TaskId},
};
use apalis_pgmq_notify::{Config, Error, PgmqStorage, QueueName, Runtime, prune_results};
use common::{TestDb, count, stop_worker, wait_for};
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(60);

fn storage_on(runtime: &Runtime, queue: &str, config: Config) -> PgmqStorage<u32> {
    PgmqStorage::with_config(runtime, QueueName::new(queue).expect("name"), config).expect("config")
}

/// 0 → its square; 1 → always fails; 2 → killed; 3 → fails on its first run only.
async fn handler(n: u32, attempt: Attempt) -> Result<u64, BoxDynError> {
    match n % 10 {
        1 => Err("always broken".into()),
        2 => Err(Box::new(AbortError::new("not wanted"))),
        3 if attempt.current() <= 1 => Err("flaky".into()),
        _ => Ok(u64::from(n) * u64::from(n)),
    }
}

async fn collect(s: &mut PgmqStorage<u32>, ids: Vec<TaskId>) -> Vec<TaskResult<u64>> {
    let stream = WaitForCompletion::<u64>::wait_for(s, ids.clone());
    let got: Vec<_> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>())
        .await
        .expect("every result within the timeout");
    let mut out: Vec<TaskResult<u64>> = got.into_iter().map(|r| r.expect("result")).collect();
    out.sort_by_key(|r| r.task_id.as_int());
    out
}

fn tid(id: i64) -> TaskId {
    apalis_pgmq_notify::task_id(id)
}

#[tokio::test]
async fn push_and_wait_returns_the_output_whatever_the_workers_keep() {
    let db = TestDb::setup().await;
    // The workers keep no results (the default); push_and_wait asks for this job's.
    let s = storage_on(&db.runtime(), "paw", Config::default());
    s.create_queue().await.expect("create");
    // No worker yet: the wait ends with a timeout naming the job, which is left alone.
    match s
        .push_and_wait::<u64>(TaskBuilder::new(4).build(), Duration::from_millis(300))
        .await
    {
        Err(Error::Timeout {
            task_id,
            msg_id,
            waited,
        }) => {
            assert_eq!(
                task_id,
                tid(msg_id),
                "no task id of its own: the message id"
            );
            assert_eq!(waited, Duration::from_millis(300));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(count(&db.pool, "SELECT count(*) FROM pgmq.q_paw").await, 1);
    let plain = s.push_with(&db.pool, &5).await.expect("push");
    let worker = WorkerBuilder::new("paw").backend(s.clone()).build(handler);
    let (stop, join) = spawn_worker!(worker);
    let r = s
        .push_and_wait::<u64>(TaskBuilder::new(14).build(), Duration::from_secs(60))
        .await
        .expect("result");
    assert_eq!(r.status, Status::Done);
    assert_eq!(r.attempt, 1);
    assert_eq!(r.result, Ok(196));
    common::drained(&db.pool, "paw").await;
    // The job pushed before the worker started kept its result too; the plain push did not.
    let kept = s
        .results::<u64>([tid(plain), r.task_id.clone(), tid(1)])
        .await
        .expect("read");
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(
        kept.iter()
            .any(|k| k.task_id == tid(1) && k.result == Ok(16))
    );
    assert!(kept.iter().all(|k| k.task_id != tid(plain)));
    // A result that does not decode as the type asked for is an error that says so.
    match s.results::<String>([r.task_id.clone()]).await {
        Err(Error::ResultType { expected, .. }) => assert!(expected.contains("String")),
        other => panic!("expected a type error, got {other:?}"),
    }
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn failed_killed_and_retried_jobs_report_their_final_outcome() {
    let db = TestDb::setup().await;
    let mut s = storage_on(
        &db.runtime(),
        "outcomes",
        Config::default()
            .store_results(true)
            .max_attempts(2)
            .backoff(apalis_pgmq_notify::Backoff::default().base(Duration::from_millis(10))),
    );
    s.create_queue().await.expect("create");
    let ids = s
        .push_bulk_with(&db.pool, [10, 11, 12, 13])
        .await
        .expect("push");
    let worker = WorkerBuilder::new("outcomes")
        .backend(s.clone())
        .concurrency(4)
        .build(handler);
    let (stop, join) = spawn_worker!(worker);
    let got = collect(&mut s, ids.iter().map(|&i| tid(i)).collect()).await;
    assert_eq!(got.len(), 4);
    assert_eq!((got[0].status.clone(), got[0].attempt), (Status::Done, 1));
    assert_eq!(got[0].result, Ok(100));
    // Failed with no attempts left (dead-lettered): the last error, after both runs.
    assert_eq!((got[1].status.clone(), got[1].attempt), (Status::Failed, 2));
    assert_eq!(got[1].result, Err("always broken".to_owned()));
    // Killed: its error at once.
    assert_eq!((got[2].status.clone(), got[2].attempt), (Status::Killed, 1));
    assert!(
        got[2]
            .result
            .as_ref()
            .is_err_and(|e| e.contains("not wanted")),
        "{:?}",
        got[2].result
    );
    // A retry is not a result: the waiter got the second run's success.
    assert_eq!((got[3].status.clone(), got[3].attempt), (Status::Done, 2));
    assert_eq!(got[3].result, Ok(169));
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_outcomes_dlq").await,
        1
    );
    // check_status reads the same without waiting.
    let now = WaitForCompletion::<u64>::check_status(&mut s, [tid(ids[1]), tid(999_999)])
        .await
        .expect("check");
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].status, Status::Failed);
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn a_thousand_waiters_share_one_listener() {
    let db = TestDb::setup().await;
    let s = storage_on(&db.runtime(), "many", Config::default().store_results(true));
    s.create_queue().await.expect("create");
    let ids = s
        .push_bulk_with(&db.pool, (0..1000u32).map(|i| i * 10))
        .await
        .expect("push");
    let mut waiters = tokio::task::JoinSet::new();
    // Every id once, and the first ten a second time (two waiters of one job, racing).
    for &id in ids.iter().chain(&ids[..10]) {
        let mut mine = s.clone();
        waiters.spawn(async move {
            let mut stream = WaitForCompletion::<u64>::wait_for_single(&mut mine, tid(id));
            let r = stream.next().await.expect("a result").expect("decodes");
            assert!(stream.next().await.is_none(), "one result per id");
            (id, r)
        });
    }
    let worker = WorkerBuilder::new("many")
        .backend(s.clone())
        .concurrency(50)
        .build(handler);
    let (stop, join) = spawn_worker!(worker);
    let mut done = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Some(joined) = tokio::time::timeout_at(deadline, waiters.join_next())
        .await
        .expect("every waiter within the timeout")
    {
        let (id, r) = joined.expect("waiter");
        assert_eq!(r.task_id, tid(id));
        assert_eq!(r.status, Status::Done);
        let n = u64::try_from(id - ids[0]).expect("offset") * 10;
        assert_eq!(r.result, Ok(n * n));
        done += 1;
    }
    assert_eq!(done, 1010);
    let listeners = count(
        &db.pool,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND query ILIKE 'LISTEN%'",
    )
    .await;
    assert_eq!(listeners, 1, "one LISTEN connection for the process");
    assert_eq!(s.listener_stats().reconnects, 0);
    // Announcements nobody waits for any more are not mistaken for malformed queue events.
    // (Notifications are dispatched in order: once the later job's result has come, the
    // earlier one's announcement was handled.)
    let unwatched = s.push_with(&db.pool, &20).await.expect("push");
    wait_for(WAIT, "the result nobody waits for", || async {
        let kept = s.results::<u64>([tid(unwatched)]).await.expect("read");
        (!kept.is_empty()).then_some(())
    })
    .await;
    let later = s
        .push_and_wait::<u64>(TaskBuilder::new(30).build(), WAIT)
        .await
        .expect("the later job's result");
    assert_eq!(later.result, Ok(900));
    assert_eq!(s.listener_stats().parse_errors, 0);
    stop_worker(stop, join).await;
}

/// Waits until a waiter has made its first look at the results table (seen in
/// `pg_stat_activity`, from a connection of its own: a pool connection reused for the check
/// would overwrite the look it is looking for).
async fn looked(db: &TestDb) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect_with(&db.options)
        .await
        .expect("connect");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND query LIKE 'SELECT coalesce(job_id, msg_id::text)%'",
        )
        .fetch_one(&mut conn)
        .await
        .expect("activity");
        if n > 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for the waiter's first look"
        );
        tokio::time::sleep(Duration::from_millis(10)).await; // the poll interval of a condition wait
    }
}

#[tokio::test]
async fn a_waiter_whose_listener_goes_silent_still_gets_the_result() {
    let db = TestDb::setup().await;
    let proxy = common::proxy::Proxy::to_server(&db.options, Duration::ZERO).await;
    let far = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .connect_with(db.options.clone().host("127.0.0.1").port(proxy.port))
        .await
        .expect("connect through the proxy");
    let config = Config::default()
        .store_results(true)
        .listener_health_check(Duration::from_secs(1));
    // The waiter's process reaches the database through the proxy; the worker's does not.
    let mut waiter = storage_on(&Runtime::new(&far), "silent", config.clone());
    let here = storage_on(&db.runtime(), "silent", config);
    here.create_queue().await.expect("create");
    let id = here.push_with(&db.pool, &7).await.expect("push");
    let wait = tokio::spawn(async move {
        let mut stream = WaitForCompletion::<u64>::wait_for_single(&mut waiter, tid(id));
        let r = stream.next().await;
        (r, waiter.listener_stats().reconnects)
    });
    looked(&db).await;
    wait_for(WAIT, "the waiter's LISTEN", || async {
        (proxy.silence_listeners() == 1).then_some(())
    })
    .await;
    // The result is written (and announced) while the waiter's listener hears nothing.
    let worker = WorkerBuilder::new("silent")
        .backend(here.clone())
        .build(handler);
    let (stop, join) = spawn_worker!(worker);
    let (r, reconnects) = tokio::time::timeout(WAIT, wait)
        .await
        .expect("the result within the timeout")
        .expect("waiter");
    let r = r.expect("a result").expect("decodes");
    assert_eq!(r.result, Ok(49));
    assert!(reconnects >= 1, "found after the listener was replaced");
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn a_waiter_whose_listener_is_terminated_gets_the_result() {
    let db = TestDb::setup().await;
    let mut s = storage_on(
        &db.runtime(),
        "killed_listener",
        Config::default().store_results(true),
    );
    s.create_queue().await.expect("create");
    let id = s.push_with(&db.pool, &8).await.expect("push");
    let mut waiter = s.clone();
    let wait = tokio::spawn(async move {
        let mut stream = WaitForCompletion::<u64>::wait_for_single(&mut waiter, tid(id));
        stream.next().await
    });
    looked(&db).await;
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
         AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(&db.pool)
    .await
    .expect("find listener");
    assert_eq!(pids.len(), 1);
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pids[0])
        .execute(&db.pool)
        .await
        .expect("terminate");
    let worker = WorkerBuilder::new("killed-listener")
        .backend(s.clone())
        .build(handler);
    let (stop, join) = spawn_worker!(worker);
    let r = tokio::time::timeout(WAIT, wait)
        .await
        .expect("the result within the timeout")
        .expect("waiter")
        .expect("a result")
        .expect("decodes");
    assert_eq!(r.result, Ok(64));
    wait_for(WAIT, "the listener to come back", || async {
        (s.listener_stats().reconnects >= 1).then_some(())
    })
    .await;
    let again = WaitForCompletion::<u64>::check_status(&mut s, [tid(id)])
        .await
        .expect("check");
    assert_eq!(again.len(), 1);
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn outputs_that_cannot_be_kept_never_cost_the_job_its_outcome() {
    let db = TestDb::setup().await;
    let queue = QueueName::new("unkeepable").expect("name");
    let mut s: PgmqStorage<u32> = PgmqStorage::with_config(
        &db.runtime(),
        queue,
        Config::default()
            .store_results(true)
            .max_payload_bytes(10_000),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    let ids = s.push_bulk_with(&db.pool, [0, 1, 2]).await.expect("push");
    let worker = WorkerBuilder::new("unkeepable")
        .backend(s.clone())
        .build(|n: u32| async move {
            Ok::<String, BoxDynError>(match n {
                0 => "x".repeat(50_000),
                1 => "nul\0inside".to_owned(),
                _ => "fine".to_owned(),
            })
        });
    let (stop, join) = spawn_worker!(worker);
    let stream = WaitForCompletion::<String>::wait_for(
        &mut s,
        ids.iter().map(|&i| tid(i)).collect::<Vec<_>>(),
    );
    let mut got: Vec<TaskResult<String>> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>())
        .await
        .expect("every result")
        .into_iter()
        .map(|r| r.expect("result"))
        .collect();
    got.sort_by_key(|r| r.task_id.as_int());
    assert!(got.iter().all(|r| r.status == Status::Done), "{got:?}");
    assert!(
        got[0]
            .result
            .as_ref()
            .is_err_and(|e| e.contains("larger than max_payload_bytes")),
        "{:?}",
        got[0].result
    );
    assert!(
        got[1].result.as_ref().is_err_and(|e| e.contains("NUL")),
        "{:?}",
        got[1].result
    );
    assert_eq!(got[2].result, Ok("fine".to_owned()));
    // Every job was archived as usual.
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.a_unkeepable").await,
        3
    );
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn a_role_that_may_not_write_results_still_finishes_jobs() {
    let db = TestDb::setup().await;
    let queue = "norights";
    let admin = storage_on(&db.runtime(), queue, Config::default());
    admin.create_queue().await.expect("create");
    let role = format!("w_{}", &db.name[9..]);
    for sql in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT USAGE ON SCHEMA pgmq, apalis_pgmq TO {role}"),
        format!("GRANT ALL ON ALL TABLES IN SCHEMA pgmq TO {role}"),
        format!("GRANT ALL ON ALL SEQUENCES IN SCHEMA pgmq TO {role}"),
        format!("GRANT ALL ON ALL TABLES IN SCHEMA apalis_pgmq TO {role}"),
        format!("GRANT ALL ON ALL SEQUENCES IN SCHEMA apalis_pgmq TO {role}"),
        format!("REVOKE ALL ON apalis_pgmq.results FROM {role}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(5)
        .connect_with(db.options.clone().username(&role))
        .await
        .expect("connect as the worker role");
    let runtime = Runtime::new(&pool);
    let config = Config::default()
        .listen(false)
        .poll_interval(Duration::from_millis(50));
    // Asked to keep every result, the worker refuses to start and says which right is missing.
    let strict = storage_on(&runtime, queue, config.clone().store_results(true));
    let refused = WorkerBuilder::new("strict").backend(strict).build(handler);
    let err = tokio::time::timeout(WAIT, refused.run())
        .await
        .expect("the worker stops at once")
        .expect_err("missing right");
    assert!(
        err.to_string().contains("apalis_pgmq.results"),
        "the error names the table: {err}"
    );
    // Not asked to keep results, it runs a job that asks for its own (push_and_wait): the
    // result cannot be written, the job's outcome is.
    let lenient = storage_on(&runtime, queue, config);
    let worker = WorkerBuilder::new("lenient")
        .backend(lenient)
        .build(handler);
    let (stop, join) = spawn_worker!(worker);
    let waiting = tokio::spawn({
        let admin = admin.clone();
        async move {
            admin
                .push_and_wait::<u64>(TaskBuilder::new(4).build(), WAIT)
                .await
        }
    });
    wait_for(WAIT, "the job to be archived", || async {
        (count(&db.pool, "SELECT count(*) FROM pgmq.a_norights").await == 1).then_some(())
    })
    .await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM apalis_pgmq.results").await,
        0
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_norights").await,
        0
    );
    waiting.abort();
    // A waiter that may not read the results hears so at once, rather than waiting in vain.
    let reader = storage_on(&runtime, queue, Config::default().listen(false));
    match tokio::time::timeout(
        WAIT,
        reader.push_and_wait::<u64>(TaskBuilder::new(4).build(), WAIT),
    )
    .await
    {
        Ok(Err(Error::ResultsUnreadable(why))) => {
            assert!(why.contains("permission denied"), "{why}")
        }
        other => panic!("expected ResultsUnreadable, got {other:?}"),
    }
    stop_worker(stop, join).await;
    pool.close().await;
    common::drop_role(&db, &role).await;
}

#[tokio::test]
async fn producer_chosen_task_ids_are_the_jobs_ids() {
    let db = TestDb::setup().await;
    let mut s = storage_on(
        &db.runtime(),
        "chosen",
        Config::default().store_results(true),
    );
    s.create_queue().await.expect("create");
    let mut conn = db.pool.acquire().await.expect("conn");
    let pushed = s
        .push_task_with(
            &mut conn,
            TaskBuilder::new(6u32)
                .task_id(TaskId::from_string("order-6"))
                .build(),
        )
        .await
        .expect("push");
    let numbered = s
        .push_task_with(
            &mut conn,
            TaskBuilder::new(9u32)
                .task_id(TaskId::from_int(u64::MAX - 1))
                .build(),
        )
        .await
        .expect("push");
    drop(conn);
    let seen: std::sync::Arc<std::sync::Mutex<Vec<TaskId>>> = Default::default();
    let log = seen.clone();
    let worker = WorkerBuilder::new("chosen")
        .backend(s.clone())
        .data(log)
        .build(
            |n: u32, id: TaskId, log: Data<std::sync::Arc<std::sync::Mutex<Vec<TaskId>>>>| async move {
                log.lock().expect("lock").push(id);
                Ok::<u64, BoxDynError>(u64::from(n) + 1)
            },
        );
    let (stop, join) = spawn_worker!(worker);
    let got = {
        let stream = WaitForCompletion::<u64>::wait_for(
            &mut s,
            [
                TaskId::from_string("order-6"),
                TaskId::from_int(u64::MAX - 1),
            ],
        );
        tokio::time::timeout(WAIT, stream.collect::<Vec<_>>())
            .await
            .expect("both results")
    };
    assert_eq!(got.len(), 2);
    for r in got {
        let r = r.expect("result");
        match r.task_id {
            TaskId::String(ref s) if s == "order-6" => assert_eq!(r.result, Ok(7)),
            TaskId::Int(n) if n == u64::MAX - 1 => assert_eq!(r.result, Ok(10)),
            ref other => panic!("unexpected {other:?}"),
        }
    }
    let mut ids = seen.lock().expect("lock").clone();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            TaskId::from_int(u64::MAX - 1),
            TaskId::from_string("order-6")
        ],
        "the handler sees the ids the producer chose"
    );
    // The message id finds the same result.
    let by_msg = s.results::<u64>([tid(pushed.id())]).await.expect("read");
    assert_eq!(by_msg.len(), 1);
    assert_eq!(by_msg[0].result, Ok(7));
    assert_eq!(by_msg[0].task_id, tid(pushed.id()));
    let _ = numbered;
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn results_expire() {
    let db = TestDb::setup().await;
    assert!(
        PgmqStorage::<u32>::with_config(
            &db.runtime(),
            QueueName::new("x").expect("name"),
            Config::default().result_retention(Some(Duration::from_millis(10)))
        )
        .is_err(),
        "a retention under a second is refused"
    );
    let s = storage_on(&db.runtime(), "expiring", Config::default());
    s.create_queue().await.expect("create");
    let worker = WorkerBuilder::new("expiring")
        .backend(s.clone())
        .build(handler);
    let (stop, join) = spawn_worker!(worker);
    let r = s
        .push_and_wait::<u64>(TaskBuilder::new(4).build(), WAIT)
        .await
        .expect("result");
    assert_eq!(r.status, Status::Done);
    stop_worker(stop, join).await;
    let name = QueueName::new("expiring").expect("name");
    assert_eq!(
        prune_results(&db.pool, &name, Duration::from_secs(3600))
            .await
            .expect("prune"),
        0,
        "younger than the retention: kept"
    );
    assert_eq!(
        prune_results(&db.pool, &name, Duration::ZERO)
            .await
            .expect("prune"),
        1
    );
    assert!(
        s.results::<u64>([r.task_id])
            .await
            .expect("read")
            .is_empty()
    );
}

#[tokio::test]
async fn announcements_too_long_for_a_notification_still_wake_every_waiter() {
    let db = TestDb::setup().await;
    // Outcomes gather for up to 500 ms, so a statement carries many of them.
    let s = storage_on(
        &db.runtime(),
        "long_ids",
        Config::default()
            .store_results(true)
            .completion_flush_interval(Duration::from_millis(500)),
    );
    s.create_queue().await.expect("create");
    // 300 jobs with 100-byte ids: one outcome statement's ids would not fit a notification, so
    // it announces "*" and the watch looks at every id it waits for.
    let ids: Vec<TaskId> = (0..300)
        .map(|i| TaskId::from_string(format!("{i:0>100}")))
        .collect();
    let mut conn = db.pool.acquire().await.expect("conn");
    for (i, id) in ids.iter().enumerate() {
        let task = TaskBuilder::new(u32::try_from(i).expect("small") * 10)
            .task_id(id.clone())
            .build();
        s.push_task_with(&mut conn, task).await.expect("push");
    }
    drop(conn);
    let mut spy = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .expect("listener");
    spy.listen("apq.r.long_ids").await.expect("listen");
    let mut waiter = s.clone();
    let waiting = tokio::spawn(async move {
        let stream = WaitForCompletion::<u64>::wait_for(&mut waiter, ids);
        stream.collect::<Vec<_>>().await
    });
    looked(&db).await;
    let worker = WorkerBuilder::new("long-ids")
        .backend(s.clone())
        .concurrency(100)
        .build(handler);
    let (stop, join) = spawn_worker!(worker);
    let got = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("every result")
        .expect("waiter");
    assert_eq!(got.len(), 300);
    // Read the announcements until the "*" one: each must fit a notification.
    let star = tokio::time::timeout(WAIT, async {
        loop {
            let n = spy.recv().await.expect("notification");
            assert!(n.payload().len() <= 7900, "{} bytes", n.payload().len());
            if n.payload() == "\"*\"" {
                return;
            }
        }
    })
    .await;
    assert!(star.is_ok(), "a statement announced \"*\"");
    assert!(
        got.iter()
            .all(|r| r.as_ref().is_ok_and(|r| r.status == Status::Done))
    );
    assert_eq!(s.listener_stats().parse_errors, 0);
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn a_worker_process_prunes_results_past_their_retention() {
    let db = TestDb::setup().await;
    let s = storage_on(
        &db.runtime(),
        "old_results",
        Config::default()
            .heartbeat_interval(Duration::from_secs(1))
            .result_retention(Some(Duration::from_secs(3600))),
    );
    s.create_queue().await.expect("create");
    // 300 results finished two hours ago, 10 a minute ago, and one of another queue.
    sqlx::query(
        "INSERT INTO apalis_pgmq.results (queue, msg_id, status, attempt, result, finished_at) \
         SELECT 'old_results', g, 'Done', 1, 'null'::jsonb, \
                now() - CASE WHEN g <= 300 THEN interval '2 hours' ELSE interval '1 minute' END \
         FROM generate_series(1, 310) g \
         UNION ALL SELECT 'other', 1, 'Done', 1, 'null', now() - interval '2 hours'",
    )
    .execute(&db.pool)
    .await
    .expect("results");
    let worker = WorkerBuilder::new("old-results")
        .backend(s.clone())
        .build(handler);
    let (stop, join) = spawn_worker!(worker);
    wait_for(
        WAIT,
        "old results pruned by the worker's process",
        || async {
            (count(
                &db.pool,
                "SELECT count(*) FROM apalis_pgmq.results WHERE queue = 'old_results'",
            )
            .await
                == 10)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM apalis_pgmq.results WHERE queue = 'other'"
        )
        .await,
        1,
        "another queue's results are its own workers' business"
    );
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn a_task_id_longer_than_an_index_entry_keeps_its_result() {
    let db = TestDb::setup().await;
    let mut s = storage_on(
        &db.runtime(),
        "long_id",
        Config::default().store_results(true),
    );
    s.create_queue().await.expect("create");
    // Incompressible, 20 kB: far beyond what a btree entry holds (~2.7 kB).
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let long: String = (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + u8::try_from(x % 26).expect("letter"))
        })
        .collect();
    let mut conn = db.pool.acquire().await.expect("conn");
    s.push_task_with(
        &mut conn,
        TaskBuilder::new(5u32)
            .task_id(TaskId::from_string(long.clone()))
            .build(),
    )
    .await
    .expect("push");
    drop(conn);
    let worker = WorkerBuilder::new("long-id")
        .backend(s.clone())
        .build(handler);
    let (stop, join) = spawn_worker!(worker);
    let mut stream =
        WaitForCompletion::<u64>::wait_for_single(&mut s, TaskId::from_string(long.clone()));
    let r = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("the result within the timeout")
        .expect("a result")
        .expect("decodes");
    assert_eq!(r.result, Ok(25));
    assert_eq!(r.task_id, TaskId::from_string(long));
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.a_long_id").await,
        1,
        "archived once, not delivered again"
    );
    stop_worker(stop, join).await;
}

/// `push_and_wait` takes a task: a waited job can have a key, a priority and a task id of its
/// own, and a second wait with the same key waits for the first job instead of pushing.
#[tokio::test]
async fn a_waited_job_has_a_key_a_priority_and_its_own_task_id() {
    let db = TestDb::setup().await;
    let s = storage_on(
        &db.runtime(),
        "paw_task",
        Config::default().priorities(true),
    );
    s.create_queue().await.expect("create");
    let task = || {
        TaskBuilder::new(7)
            .idempotency_key("quote:7")
            .priority(9)
            .max_attempts(2)
            .task_id(TaskId::from_string("order-7"))
            .build()
    };
    // No worker yet: the timeout names the task by its own id, and the job is written with
    // its key, priority, attempts and id.
    let (task_id, msg_id) = match s
        .push_and_wait::<u64>(task(), Duration::from_millis(200))
        .await
    {
        Err(Error::Timeout {
            task_id, msg_id, ..
        }) => (task_id, msg_id),
        other => panic!("expected a timeout, got {other:?}"),
    };
    assert_eq!(task_id, TaskId::from_string("order-7"));
    let headers: serde_json::Value =
        sqlx::query_scalar("SELECT headers->'apalis' FROM pgmq.q_paw_task WHERE msg_id = $1")
            .bind(msg_id)
            .fetch_one(&db.pool)
            .await
            .expect("the job");
    assert_eq!(headers["idempotency_key"], "quote:7", "{headers}");
    assert_eq!(headers["priority"], 9, "{headers}");
    assert_eq!(headers["max_attempts"], 2, "{headers}");
    assert_eq!(headers["task_id"], "order-7", "{headers}");
    assert_eq!(headers["result"], true, "{headers}");
    // A worker runs it; a second wait with the same key writes nothing and gets its result.
    let worker = WorkerBuilder::new("paw_task")
        .backend(s.clone())
        .build(handler);
    let (stop, join) = spawn_worker!(worker);
    let again = s
        .push_and_wait::<u64>(task(), WAIT)
        .await
        .expect("the first job's result");
    assert_eq!(again.result, Ok(49));
    assert_eq!(again.status, Status::Done);
    assert_eq!(
        again.task_id,
        tid(msg_id),
        "the job it waited for is the first one"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.a_paw_task").await,
        1
    );
    // A fresh key: the result carries the task's own id.
    let own = s
        .push_and_wait::<u64>(
            TaskBuilder::new(8)
                .idempotency_key("quote:8")
                .priority(3)
                .task_id(TaskId::from_string("order-8"))
                .build(),
            WAIT,
        )
        .await
        .expect("result");
    assert_eq!(own.task_id, TaskId::from_string("order-8"));
    assert_eq!(own.result, Ok(64));
    stop_worker(stop, join).await;
}
