//! apalis' introspection traits (what apalis-board uses) against real PostgreSQL, with jobs in
//! every state, and the worker registry with two processes and a dead one.

mod common;

use std::time::Duration;

use apalis::prelude::*;
use apalis_core::backend::{
    FetchById, Filter, ListAllTasks, ListQueues, ListTasks, ListWorkers, Metrics, Reschedule,
    Update, Vacuum,
};
use apalis_pgmq_notify::{Config, Delay, JobState, KilledAction, PgmqStorage, QueueName, Runtime};
use common::{TestDb, count, proxy::Proxy, stop_worker, wait_for};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;

const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u32,
    kind: String,
}

fn filter(status: Option<Status>, page: u32, size: u32) -> Filter {
    Filter {
        status,
        page,
        page_size: Some(size),
    }
}

fn ids(tasks: &[Task<Value>]) -> Vec<u32> {
    let mut v: Vec<u32> = tasks
        .iter()
        .filter_map(|t| t.args.get("id").and_then(Value::as_u64))
        .map(|i| u32::try_from(i).expect("small"))
        .collect();
    v.sort_unstable();
    v
}

fn meta(t: &Task<Value>, key: &str) -> Option<String> {
    t.metadata().get(key).map(str::to_owned)
}

/// A queue with jobs in every state: 1-2 pending, 3 scheduled, 4 running, 5 retrying, 6 done,
/// 7 killed, 8 dead, 9 undecodable (dead), 10 sent by SQL without headers (pending).
async fn every_state(db: &TestDb, queue: &str) -> PgmqStorage<Job> {
    let config = Config::default()
        .max_attempts(2)
        .on_killed(KilledAction::DeadLetter)
        .backoff(apalis_pgmq_notify::Backoff::default().base(Duration::from_secs(3600)))
        .poll_interval(Duration::from_secs(60));
    let s: PgmqStorage<Job> =
        PgmqStorage::with_config(&db.runtime(), QueueName::new(queue).expect("name"), config)
            .expect("config");
    s.create_queue().await.expect("create");
    let q = s.queue().clone();
    // Handled by a worker: done, retrying, killed, dead, undecodable.
    for (id, kind) in [(6, "ok"), (5, "fail"), (7, "kill"), (8, "die")] {
        let mut headers = None;
        if kind == "die" {
            headers = Some(json!({"apalis": {"max_attempts": 1}}));
        }
        q.send_with(
            &db.pool,
            &json!({"id": id, "kind": kind}),
            headers.as_ref(),
            Delay::Now,
        )
        .await
        .expect("send");
    }
    q.send_with(&db.pool, &json!({"oops": true}), None, Delay::Now)
        .await
        .expect("send undecodable");
    let worker = WorkerBuilder::new(format!("{queue}-w"))
        .backend(s.clone())
        .build(|job: Job| async move {
            match job.kind.as_str() {
                "fail" | "die" => Err::<(), BoxDynError>("it failed".into()),
                "kill" => Err(Box::new(AbortError::new("killed on purpose")) as BoxDynError),
                _ => Ok(()),
            }
        });
    let (stop, join) = spawn_worker!(worker);
    let dlq = format!("SELECT count(*) FROM pgmq.q_{queue}_dlq");
    let archive = format!("SELECT count(*) FROM pgmq.a_{queue}");
    wait_for(WAIT, "done, killed, dead and undecodable", || async {
        (count(&db.pool, &dlq).await == 3 && count(&db.pool, &archive).await == 1).then_some(())
    })
    .await;
    let retrying =
        format!("SELECT count(*) FROM pgmq.q_{queue} WHERE headers->'apalis' ? 'failed_epoch'");
    wait_for(WAIT, "the retry recorded", || async {
        (count(&db.pool, &retrying).await == 1).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    // Without a worker: pending, scheduled, running (leased by a bare read), SQL-sent.
    q.send_with(
        &db.pool,
        &json!({"id": 4, "kind": "lease"}),
        None,
        Delay::Now,
    )
    .await
    .expect("send");
    let leased = q
        .read(&db.pool, Duration::from_secs(600), 1)
        .await
        .expect("read");
    assert_eq!(leased.len(), 1);
    for id in [1, 2] {
        s.push_with(
            &db.pool,
            &Job {
                id,
                kind: "wait".into(),
            },
        )
        .await
        .expect("push");
    }
    q.send_with(
        &db.pool,
        &json!({"id": 3, "kind": "later"}),
        None,
        Delay::After(Duration::from_secs(3600)),
    )
    .await
    .expect("send delayed");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT pgmq.send('{queue}', '{{\"id\": 10, \"kind\": \"sql\"}}'::jsonb)"
    )))
    .execute(&db.pool)
    .await
    .expect("send by SQL");
    s
}

#[tokio::test]
async fn tasks_are_listed_by_state_with_pages_and_found_by_id() {
    let db = TestDb::setup().await;
    let s = every_state(&db, "states").await;
    let mut finder = s.clone();
    let all = s.list_tasks(&filter(None, 1, 100)).await.expect("all");
    assert_eq!(all.len(), 10, "{:?}", ids(&all));
    let by = |st: Status| {
        let s = s.clone();
        async move { s.list_tasks(&filter(Some(st), 1, 100)).await.expect("list") }
    };
    assert_eq!(ids(&by(Status::Pending).await), vec![1, 2, 10]);
    assert_eq!(ids(&by(Status::Queued).await), vec![3]);
    assert_eq!(ids(&by(Status::Running).await), vec![4]);
    assert_eq!(ids(&by(Status::Done).await), vec![6]);
    assert_eq!(ids(&by(Status::Killed).await), vec![7]);
    let failed = by(Status::Failed).await;
    // Retrying (5) first, then dead (8, and the undecodable one without an id).
    assert_eq!(failed.len(), 3);
    assert_eq!(ids(&failed), vec![5, 8]);
    assert_eq!(meta(&failed[0], "state").as_deref(), Some("retrying"));
    assert_eq!(meta(&failed[0], "last_error").as_deref(), Some("it failed"));
    assert!(meta(&failed[0], "failed_at").is_some());
    let undecodable = failed
        .iter()
        .find(|t| meta(t, "dead_reason").as_deref() == Some("undecodable"))
        .expect("the undecodable message is listed as dead");
    assert!(
        meta(undecodable, "dead_error").is_some_and(|e| e.contains("missing field")),
        "{:?}",
        undecodable.metadata()
    );
    // Pages: 10 jobs in pages of 4.
    let mut seen = Vec::new();
    for page in 1..=3 {
        let p = s.list_tasks(&filter(None, page, 4)).await.expect("page");
        assert_eq!(p.len(), if page == 3 { 2 } else { 4 });
        seen.extend(p.iter().filter_map(|t| t.task_id().cloned()));
    }
    let distinct: std::collections::HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(distinct.len(), 10, "pages do not overlap");
    // Found by id wherever they are.
    let done_id = by(Status::Done).await[0].task_id().cloned().expect("id");
    let done = finder
        .fetch_by_id(&done_id)
        .await
        .expect("fetch")
        .expect("found");
    assert_eq!(done.status(), Status::Done);
    let dead = by(Status::Killed).await[0].task_id().cloned().expect("id");
    let killed = finder
        .fetch_by_id(&dead)
        .await
        .expect("fetch")
        .expect("found");
    assert_eq!(killed.status(), Status::Killed);
    assert!(
        meta(&killed, "dead_error").is_some_and(|e| e.contains("killed on purpose")),
        "{:?}",
        killed.metadata()
    );
    assert!(
        finder
            .fetch_by_id(&TaskId::from_int(999_999))
            .await
            .expect("fetch")
            .is_none()
    );
    // The same through the crate's own API.
    let q = s.queue().clone();
    let done_jobs = q
        .jobs(&db.pool, Some(JobState::Done), 0, 10)
        .await
        .expect("jobs");
    assert_eq!(done_jobs.len(), 1);
    // Across queues.
    let other = every_state(&db, "states_two").await;
    let everything = other
        .list_all_tasks(&filter(None, 1, 100))
        .await
        .expect("all queues");
    assert_eq!(everything.len(), 20);
    let dead_everywhere = other
        .list_all_tasks(&filter(Some(Status::Killed), 1, 100))
        .await
        .expect("killed everywhere");
    assert_eq!(dead_everywhere.len(), 2);
}

#[tokio::test]
async fn queues_and_metrics_count_every_state() {
    let db = TestDb::setup().await;
    let s = every_state(&db, "counted").await;
    let stats = s.fetch_by_queue().await.expect("stats");
    let get = |title: &str| -> String {
        stats
            .iter()
            .find(|st| st.title == title)
            .unwrap_or_else(|| panic!("{title} in {stats:?}"))
            .value
            .clone()
    };
    assert_eq!(
        get("PENDING_JOBS"),
        "4",
        "3 visible and 1 scheduled (the board has no scheduled count)"
    );
    assert_eq!(get("SCHEDULED_JOBS"), "1");
    assert_eq!(get("RUNNING_JOBS"), "1");
    assert_eq!(get("RETRYING_JOBS"), "1");
    assert_eq!(get("DONE_JOBS"), "1");
    assert_eq!(get("DEAD_JOBS"), "2", "dead: 8 and the undecodable one");
    assert_eq!(get("FAILED_JOBS"), "3", "retrying and dead");
    assert_eq!(get("KILLED_JOBS"), "1");
    assert_eq!(get("TOTAL_JOBS"), "10");
    assert_eq!(get("DONE_LAST_HOUR"), "1");
    assert!(
        get("OLDEST_PENDING_AGE_SECS")
            .parse::<f64>()
            .expect("number")
            >= 0.0
    );
    let queues = s.list_queues().await.expect("queues");
    let names: Vec<&str> = queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["counted"],
        "dead-letter queues are not listed on their own"
    );
    assert_eq!(queues[0].activity.len(), 7);
    assert_eq!(queues[0].activity[6], 1, "one job done today");
    let global = s.global().await.expect("global");
    assert!(
        global
            .iter()
            .any(|st| st.title == "TOTAL_JOBS" && st.value == "10"),
        "{global:?}"
    );
}

#[tokio::test]
async fn reschedule_update_and_vacuum() {
    let db = TestDb::setup().await;
    let mut s = every_state(&db, "steered").await;
    let pending = s
        .list_tasks(&filter(Some(Status::Pending), 1, 10))
        .await
        .expect("pending");
    let first = pending[0].clone();
    s.reschedule(first.clone(), Duration::from_secs(600))
        .await
        .expect("reschedule");
    let moved = s
        .fetch_by_id(first.task_id().expect("id"))
        .await
        .expect("fetch")
        .expect("found");
    assert_eq!(
        moved.status(),
        Status::Queued,
        "rescheduled into the future"
    );
    let mut edited = moved.clone();
    edited.args = json!({"id": 42, "kind": "edited"});
    s.update(edited).await.expect("update a waiting job");
    let after = s
        .fetch_by_id(first.task_id().expect("id"))
        .await
        .expect("fetch")
        .expect("found");
    assert_eq!(after.args["id"], 42);
    // A running (leased) job cannot be edited; a done one cannot be rescheduled.
    let running = s
        .list_tasks(&filter(Some(Status::Running), 1, 10))
        .await
        .expect("running");
    assert!(s.update(running[0].clone()).await.is_err());
    let done = s
        .list_tasks(&filter(Some(Status::Done), 1, 10))
        .await
        .expect("done");
    assert!(s.reschedule(done[0].clone(), Duration::ZERO).await.is_err());
    // Vacuum: done jobs older than an hour stay, then all go.
    assert_eq!(
        s.vacuum_before(Duration::from_secs(3600))
            .await
            .expect("vacuum"),
        0
    );
    assert_eq!(s.vacuum().await.expect("vacuum"), 1);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.a_steered").await,
        0
    );
}

#[tokio::test]
async fn the_worker_registry_lists_workers_of_two_processes_and_forgets_a_dead_one() {
    let db = TestDb::setup().await;
    let queue = "registry";
    let config = Config::default()
        .heartbeat_interval(Duration::from_secs(1))
        .poll_interval(Duration::from_secs(60));
    let a: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        config.clone(),
    )
    .expect("config");
    a.create_queue().await.expect("create");
    // Process B reaches the database through a proxy (another listener, another owner).
    let proxy = Proxy::to_server(&db.options, Duration::ZERO).await;
    let pool_b = PgPoolOptions::new()
        .max_connections(5)
        .connect_with(db.options.clone().host("127.0.0.1").port(proxy.port))
        .await
        .expect("connect through the proxy");
    let b: PgmqStorage<Job> = PgmqStorage::with_config(
        &Runtime::new(&pool_b),
        QueueName::new(queue).expect("name"),
        config,
    )
    .expect("config");
    let handler = |_j: Job| async { Ok::<(), BoxDynError>(()) };
    let (stop_a, join_a) = spawn_worker!(
        WorkerBuilder::new("registry-a")
            .backend(a.clone())
            .concurrency(3)
            .build(handler)
    );
    let (stop_b, join_b) = spawn_worker!(
        WorkerBuilder::new("registry-b")
            .backend(b.clone())
            .build(handler)
    );
    let listed = |s: PgmqStorage<Job>| async move {
        let mut names: Vec<String> = s
            .list_workers()
            .await
            .expect("workers")
            .into_iter()
            .map(|w| w.id)
            .collect();
        names.sort();
        names
    };
    wait_for(WAIT, "both workers listed", || {
        let a = a.clone();
        async move { (listed(a).await == ["registry-a", "registry-b"]).then_some(()) }
    })
    .await;
    let all = a.list_all_workers().await.expect("all");
    let wa = all.iter().find(|w| w.id == "registry-a").expect("a");
    assert_eq!(wa.queue, queue);
    assert!(wa.backend.contains("pid"), "{}", wa.backend);
    let pids = count(
        &db.pool,
        "SELECT count(DISTINCT owner) FROM apalis_pgmq.workers",
    )
    .await;
    assert_eq!(pids, 2, "two processes");
    // A stops cleanly: its row goes at once.
    stop_worker(stop_a, join_a).await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM apalis_pgmq.workers WHERE name = 'registry-a'"
        )
        .await,
        0
    );
    // B's process goes silent (its connections freeze): it is no longer listed after three
    // missed heartbeats, though its row is still there until swept.
    proxy.freeze();
    wait_for(WAIT, "the dead worker to drop out of the list", || {
        let a = a.clone();
        async move { listed(a).await.is_empty().then_some(()) }
    })
    .await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM apalis_pgmq.workers WHERE name = 'registry-b'"
        )
        .await,
        1,
        "expired, not yet swept"
    );
    drop(proxy);
    let _ = tokio::time::timeout(Duration::from_secs(30), stop_worker(stop_b, join_b)).await;
}

/// A queue made by another PGMQ client (`pgmq.create`, no dead-letter queue): the board's
/// overview counts its jobs and every status filter answers (Failed was an error).
#[tokio::test]
async fn a_queue_made_by_pgmq_create_answers_every_board_query() {
    let db = TestDb::setup().await;
    sqlx::raw_sql(
        "SELECT pgmq.create('plain_pgmq'); \
         SELECT pgmq.send('plain_pgmq', jsonb_build_object('id', i, 'kind', 'sql')) \
         FROM generate_series(1, 7) i;",
    )
    .execute(&db.pool)
    .await
    .expect("a queue of another client");
    let s: PgmqStorage<Job> =
        PgmqStorage::new(&db.runtime(), QueueName::new("plain_pgmq").expect("name"));
    let global = s.global().await.expect("overview");
    let total = global
        .iter()
        .find(|st| st.title == "TOTAL_JOBS")
        .map(|st| st.value.clone());
    assert_eq!(total.as_deref(), Some("7"), "{global:?}");
    for status in [
        None,
        Some(Status::Pending),
        Some(Status::Queued),
        Some(Status::Running),
        Some(Status::Failed),
        Some(Status::Done),
        Some(Status::Killed),
    ] {
        let tasks = s
            .list_tasks(&filter(status.clone(), 1, 20))
            .await
            .unwrap_or_else(|e| panic!("{status:?}: {e}"));
        let want = if matches!(status, None | Some(Status::Pending)) {
            7
        } else {
            0
        };
        assert_eq!(tasks.len(), want, "{status:?}");
        let all = s
            .list_all_tasks(&filter(status.clone(), 1, 20))
            .await
            .unwrap_or_else(|e| panic!("{status:?}: {e}"));
        assert_eq!(all.len(), want, "{status:?}");
    }
    let queues = s.list_queues().await.expect("queues");
    assert_eq!(queues.len(), 1);
    let stats = s.fetch_by_queue().await.expect("by queue");
    assert!(
        stats
            .iter()
            .any(|st| st.title == "DEAD_JOBS" && st.value == "0"),
        "{stats:?}"
    );
}
