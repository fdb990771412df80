//! Pushes through the storage's pool that arrive together share a statement and a commit
//! (src/backend/combine.rs), and each caller still gets its own outcome.

mod common;

use std::collections::HashSet;

use apalis::prelude::*;
use apalis_core::task::builder::TaskBuilder;
use apalis_pgmq_notify::{Config, PgmqStorage, QueueName};
use common::{TestDb, count};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    n: u32,
    text: String,
}

fn storage(db: &TestDb, queue: &str) -> PgmqStorage<Job> {
    PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        Config::default(),
    )
    .expect("config")
}

/// The numbers in the queue's bodies, and how many transactions inserted its rows.
async fn written(db: &TestDb, queue: &str) -> (Vec<u32>, i64) {
    let mut ns: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT (message->>'n')::bigint FROM pgmq.q_{queue} ORDER BY 1"
    )))
    .fetch_all(&db.pool)
    .await
    .expect("bodies");
    ns.dedup();
    let commits = count(
        &db.pool,
        &format!("SELECT count(DISTINCT xmin::text) FROM pgmq.q_{queue}"),
    )
    .await;
    (ns.into_iter().map(|n| n as u32).collect(), commits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_share_commits_and_each_is_written_once() {
    let db = TestDb::setup().await;
    let s = storage(&db, "share");
    s.create_queue().await.expect("create");
    const CALLERS: u32 = 300;
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..CALLERS {
        let mut s = s.clone();
        calls.spawn(async move {
            s.push(Job {
                n,
                text: "x".into(),
            })
            .await
        });
    }
    while let Some(r) = calls.join_next().await {
        r.expect("join").expect("every push succeeds");
    }
    let (ns, commits) = written(&db, "share").await;
    assert_eq!(ns, (0..CALLERS).collect::<Vec<_>>(), "every job once");
    let rows = count(&db.pool, "SELECT count(*) FROM pgmq.q_share").await;
    assert_eq!(rows, i64::from(CALLERS), "no job written twice");
    // One commit per push would be 300; the pushes that arrive while a statement runs share
    // the next one.
    assert!(
        commits < i64::from(CALLERS) / 10,
        "{commits} commits for {CALLERS} concurrent pushes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_wait_callers_together_each_get_their_own_job() {
    let db = TestDb::setup().await;
    let s = storage(&db, "share_wait");
    s.create_queue().await.expect("create");
    let worker = WorkerBuilder::new("share_wait")
        .backend(s.clone())
        .concurrency(20)
        .build(|job: Job| async move { Ok::<u32, BoxDynError>(job.n * 2) });
    let (stop, join) = spawn_worker!(worker);
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..200u32 {
        let s = s.clone();
        calls.spawn(async move {
            let r = s
                .push_and_wait::<u32>(
                    TaskBuilder::new(Job {
                        n,
                        text: String::new(),
                    })
                    .build(),
                    std::time::Duration::from_secs(60),
                )
                .await
                .expect("result");
            (n, r)
        });
    }
    let mut ids = HashSet::new();
    while let Some(r) = calls.join_next().await {
        let (n, r) = r.expect("join");
        assert_eq!(
            r.result.as_ref().ok(),
            Some(&(n * 2)),
            "job {n}: its own result"
        );
        assert!(ids.insert(r.task_id.to_string()), "one id per caller");
    }
    common::stop_worker(stop, join).await;
    let archived = count(&db.pool, "SELECT count(*) FROM pgmq.a_share_wait").await;
    assert_eq!(archived, 200, "every job ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_postgresql_refuses_fails_only_its_own_push() {
    let db = TestDb::setup().await;
    let s = storage(&db, "share_bad");
    s.create_queue().await.expect("create");
    const CALLERS: u32 = 60;
    const BAD: u32 = 17;
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..CALLERS {
        let mut s = s.clone();
        calls.spawn(async move {
            // jsonb has no NUL: PostgreSQL refuses `\u0000` in a string (22P05).
            let text = if n == BAD { "nul\0here" } else { "fine" };
            let r = s
                .push(Job {
                    n,
                    text: text.into(),
                })
                .await;
            (n, r)
        });
    }
    let mut failed = Vec::new();
    while let Some(r) = calls.join_next().await {
        let (n, r) = r.expect("join");
        if let Err(e) = r {
            assert!(
                e.to_string().contains("\\u0000") || e.to_string().contains("Unicode"),
                "the refusal says why: {e}"
            );
            failed.push(n);
        }
    }
    assert_eq!(failed, vec![BAD], "only the refused job's push fails");
    let (ns, _) = written(&db, "share_bad").await;
    let want: Vec<u32> = (0..CALLERS).filter(|&n| n != BAD).collect();
    assert_eq!(ns, want, "every other job written, once");
}
