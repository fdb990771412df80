//! Operating queues with workers running: pause and resume, retention pruning.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use apalis::prelude::*;
use apalis_pgmq_notify::{Config, NotifyChannels, PgmqStorage, QueueName, pause, prune, resume};
use common::{TestDb, count, stop_worker, wait_for};
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u32,
}

type Log = Arc<Mutex<Vec<u32>>>;

#[tokio::test]
async fn a_paused_queue_is_not_claimed_until_resumed_and_resuming_wakes_the_worker() {
    let db = TestDb::setup().await;
    let name = QueueName::new("pausable").expect("name");
    // A minute's fallback poll: a quick pickup after resuming comes from its notification.
    let s: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.runtime(),
        name.clone(),
        Config::default().poll_interval(Duration::from_secs(60)),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    let log: Log = Arc::default();
    let worker = WorkerBuilder::new("pausable")
        .backend(s.clone())
        .data(log.clone())
        .build(|job: Job, log: Data<Log>| async move {
            log.lock().expect("lock").push(job.id);
            Ok::<(), BoxDynError>(())
        });
    let (stop, join) = spawn_worker!(worker);
    s.push_with(&db.pool, &Job { id: 1 }).await.expect("push");
    wait_for(WAIT, "the first job", || async {
        log.lock().expect("lock").contains(&1).then_some(())
    })
    .await;
    // Idle and armed: the next push notifies it.
    wait_for(WAIT, "the worker to arm", || async {
        (count(
            &db.pool,
            "SELECT count(*) FROM apalis_pgmq.listeners WHERE armed",
        )
        .await
            > 0)
        .then_some(())
    })
    .await;
    assert!(pause(&db.pool, &name).await.expect("pause"));
    assert!(
        !pause(&db.pool, &name).await.expect("pause twice"),
        "already paused"
    );
    // Its notification (or, in the instant after an arming, the settle check) wakes the worker,
    // whose claim finds the queue paused. An observation window, not synchronisation: the
    // worker reads within milliseconds and gets nothing.
    s.push_with(&db.pool, &Job { id: 2 }).await.expect("push");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM pgmq.q_pausable WHERE read_ct = 0"
        )
        .await,
        1,
        "not claimed while paused"
    );
    assert!(
        resume(&db.pool, &name, &NotifyChannels::default())
            .await
            .expect("resume")
    );
    wait_for(Duration::from_secs(10), "job 2 after resuming", || async {
        log.lock().expect("lock").contains(&2).then_some(())
    })
    .await;
    assert!(
        !resume(&db.pool, &name, &NotifyChannels::default())
            .await
            .expect("again")
    );
    stop_worker(stop, join).await;
}

/// Rows in the archive and the dead letters: `old` of them 2 hours old, `new` just now.
async fn aged_rows(db: &TestDb, queue: &str, old: i64, new: i64) {
    let archive = format!("a_{queue}");
    let dead = format!("q_{queue}_dlq");
    for (n, age) in [(old, "2 hours"), (new, "0 seconds")] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO pgmq.{archive} (msg_id, read_ct, enqueued_at, vt, message, archived_at) \
             SELECT g, 1, clock_timestamp() - interval '{age}', clock_timestamp(), '{{}}'::jsonb, \
                    clock_timestamp() - interval '{age}' \
             FROM generate_series((SELECT coalesce(max(msg_id), 0) + 1 FROM pgmq.{archive}), \
                                  (SELECT coalesce(max(msg_id), 0) + {n} FROM pgmq.{archive})) g"
        )))
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("rows in {archive}: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO pgmq.{dead} (read_ct, enqueued_at, vt, message) \
             SELECT 1, clock_timestamp() - interval '{age}', clock_timestamp(), '{{}}'::jsonb \
             FROM generate_series(1, {n})"
        )))
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("rows in {dead}: {e}"));
    }
}

#[tokio::test]
async fn prune_deletes_only_what_retention_allows_in_batches() {
    let db = TestDb::setup().await;
    let name = QueueName::new("retained").expect("name");
    PgmqStorage::<Job>::new(&db.runtime(), name.clone())
        .create_queue()
        .await
        .expect("create");
    aged_rows(&db, "retained", 25_000, 100).await;
    let hour = Duration::from_secs(3600);
    let pruned = prune(&db.pool, &name, Some(hour), Some(hour))
        .await
        .expect("prune");
    assert_eq!(pruned.archived, 25_000, "three batches of at most 10 000");
    assert_eq!(pruned.dead_letters, 25_000);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.a_retained").await,
        100,
        "recent kept"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_retained_dlq").await,
        100
    );
    let again = prune(&db.pool, &name, Some(hour), Some(hour))
        .await
        .expect("prune");
    assert_eq!((again.archived, again.dead_letters), (0, 0));
    let kept = prune(&db.pool, &name, None, None)
        .await
        .expect("keep everything");
    assert_eq!((kept.archived, kept.dead_letters), (0, 0));
}

#[tokio::test]
async fn a_worker_process_prunes_past_retention_on_its_own() {
    let db = TestDb::setup().await;
    let name = QueueName::new("janitor").expect("name");
    let s: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.runtime(),
        name,
        Config::default()
            .heartbeat_interval(Duration::from_secs(1))
            .archive_retention(Some(Duration::from_secs(3600)))
            .dead_letter_retention(None),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    aged_rows(&db, "janitor", 500, 10).await;
    let worker = WorkerBuilder::new("janitor")
        .backend(s.clone())
        .build(|_job: Job| async { Ok::<(), BoxDynError>(()) });
    let (stop, join) = spawn_worker!(worker);
    wait_for(
        WAIT,
        "the archive pruned by the worker's process",
        || async {
            (count(&db.pool, "SELECT count(*) FROM pgmq.a_janitor").await == 10).then_some(())
        },
    )
    .await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_janitor_dlq").await,
        510,
        "dead letters kept: their retention is off"
    );
    stop_worker(stop, join).await;
}
