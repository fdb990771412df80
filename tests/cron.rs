//! `apalis-cron` feeding this backend from two replicas: each tick becomes exactly one job
//! (the key `<schedule>:<tick>`), also when a replica joins late, and the jobs run once.
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use apalis::prelude::*;
use apalis_cron::CronScheduler;
use apalis_pgmq_notify::{Config, PgmqStorage, QueueName, Runtime};
use common::{TestDb, count, stop_worker, wait_for};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tick {
    at: u64,
}

/// Runs a replica's scheduler for `ticks` ticks, pushing each with its key; returns
/// `(tick, duplicate)` for each.
async fn replica(
    storage: PgmqStorage<Tick>,
    ticks: usize,
    first: Option<Arc<tokio::sync::Notify>>,
) -> Vec<(u64, bool)> {
    let schedule = cron::Schedule::from_str("* * * * * *").expect("schedule");
    let mut stream = Box::pin(CronScheduler::new(schedule).into_stream());
    let mut conn = storage.pool().acquire().await.expect("conn");
    let mut seen = Vec::new();
    while seen.len() < ticks {
        let at = stream
            .next()
            .await
            .expect("a tick")
            .expect("tick")
            .get_timestamp();
        let task = TaskBuilder::new(Tick { at })
            .idempotency_key(format!("nightly:{at}"))
            .build();
        let pushed = storage.push_task_with(&mut conn, task).await.expect("push");
        seen.push((at, pushed.is_duplicate()));
        if let Some(n) = &first {
            n.notify_one();
        }
    }
    seen
}

#[tokio::test]
async fn two_replicas_turn_each_tick_into_one_job() {
    let db = TestDb::setup().await;
    let queue = "cron_ticks";
    // Finished jobs keep their key for an hour, so a lagging replica cannot re-enqueue a tick
    // that already ran.
    let config = Config::default()
        .poll_interval(Duration::from_millis(100))
        .idempotency_window(Some(Duration::from_secs(3600)));
    let storage = |pool: &sqlx::PgPool| {
        PgmqStorage::<Tick>::with_config(
            &Runtime::new(pool),
            QueueName::new(queue).expect("name"),
            config.clone(),
        )
        .expect("config")
    };
    let a = storage(&db.pool_with(2).await);
    let b = storage(&db.pool_with(2).await);
    a.create_queue().await.expect("create");
    let ran: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let worker = WorkerBuilder::new("cron-consumer")
        .backend(a.clone())
        .data(ran.clone())
        .build(
            |t: Tick, ran: Data<Arc<Mutex<BTreeMap<u64, u32>>>>| async move {
                *ran.lock()
                    .map_err(|e| e.to_string())?
                    .entry(t.at)
                    .or_default() += 1;
                Ok::<(), BoxDynError>(())
            },
        );
    let (stop, join) = spawn_worker!(worker);
    // Replica A runs four ticks; replica B joins after A's first tick (it was down) and runs
    // three: both see the ticks they share.
    let first = Arc::new(tokio::sync::Notify::new());
    let ra = tokio::spawn(replica(a.clone(), 4, Some(first.clone())));
    first.notified().await;
    let rb = tokio::spawn(replica(b.clone(), 3, None));
    let (ra, rb) = (ra.await.expect("a"), rb.await.expect("b"));
    let ticks: BTreeSet<u64> = ra.iter().chain(&rb).map(|(t, _)| *t).collect();
    let shared = rb
        .iter()
        .filter(|(t, _)| ra.iter().any(|(u, _)| u == t))
        .count();
    assert!(shared >= 2, "the replicas overlapped: {ra:?} {rb:?}");
    // Exactly one push per tick wrote a job.
    let written = ra.iter().chain(&rb).filter(|(_, dup)| !dup).count();
    assert_eq!(written, ticks.len(), "{ra:?} {rb:?}");
    wait_for(
        Duration::from_secs(30),
        "every tick's job to run",
        || async { (ran.lock().expect("lock").len() == ticks.len()).then_some(()) },
    )
    .await;
    stop_worker(stop, join).await;
    let ran = ran.lock().expect("lock").clone();
    assert_eq!(ran.keys().copied().collect::<BTreeSet<_>>(), ticks);
    assert!(ran.values().all(|n| *n == 1), "each tick ran once: {ran:?}");
    let jobs = count(
        &db.pool,
        &format!(
            "SELECT (SELECT count(*) FROM pgmq.q_{queue}) + (SELECT count(*) FROM pgmq.a_{queue})"
        ),
    )
    .await;
    assert_eq!(jobs, ticks.len() as i64);
}

fn keyed_storage(pool: &sqlx::PgPool, queue: &str) -> PgmqStorage<Tick> {
    PgmqStorage::<Tick>::with_config(
        &Runtime::new(pool),
        QueueName::new(queue).expect("name"),
        Config::default().idempotency_window(Some(Duration::from_secs(3600))),
    )
    .expect("config")
}

/// Jobs (queued or archived) that carry `key`.
async fn jobs_with_key(pool: &sqlx::PgPool, queue: &str, key: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT (SELECT count(*) FROM pgmq.q_{queue} WHERE headers->'apalis'->>'idempotency_key' = $1) \
              + (SELECT count(*) FROM pgmq.a_{queue} WHERE headers->'apalis'->>'idempotency_key' = $1)"
    )))
    .bind(key)
    .fetch_one(pool)
    .await
    .expect("count")
}

/// The race of the issue, made certain: the previous job's archive is written but not committed
/// while three replicas push the same tick (they wait on it); then it commits. Every push is a
/// duplicate, and a plain `pgmq.send` of the key inside the window is refused.
#[tokio::test]
async fn a_push_racing_the_archive_of_the_previous_job_is_a_duplicate() {
    let db = TestDb::setup().await;
    let queue = "cron_race";
    let s = keyed_storage(&db.pool, queue);
    s.create_queue().await.expect("create");
    for tick in 0..3 {
        let key = format!("tick:{tick}");
        let mut conn = db.pool.acquire().await.expect("conn");
        let first = s
            .push_task_with(
                &mut conn,
                TaskBuilder::new(Tick { at: tick })
                    .idempotency_key(key.clone())
                    .build(),
            )
            .await
            .expect("push");
        assert!(!first.is_duplicate());
        let mut tx = db.pool.begin().await.expect("tx");
        s.queue()
            .archive(&mut *tx, &[first.id])
            .await
            .expect("archive");
        let pushers: Vec<_> = (0..3)
            .map(|r| {
                let (s, key, pool) = (s.clone(), key.clone(), db.pool.clone());
                tokio::spawn(async move {
                    let mut conn = pool.acquire().await.expect("conn");
                    s.push_task_with(
                        &mut conn,
                        TaskBuilder::new(Tick { at: tick })
                            .idempotency_key(key)
                            .build(),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("replica {r}: {e}"))
                })
            })
            .collect();
        // Commit only once every replica's push waits on the archive's transaction.
        wait_for(Duration::from_secs(30), "three pushes waiting", || async {
            (count(
                &db.pool,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                   AND datname = current_database()",
            )
            .await
                >= 3)
                .then_some(())
        })
        .await;
        tx.commit().await.expect("commit");
        for p in pushers {
            let pushed = p.await.expect("pusher");
            assert!(pushed.is_duplicate(), "tick {tick}: {pushed:?}");
            assert_eq!(pushed.id, first.id, "the holder is the archived job");
        }
        assert_eq!(jobs_with_key(&db.pool, queue, &key).await, 1, "tick {tick}");
        let plain = sqlx::query("SELECT pgmq.send($1, '{\"at\": 0}', $2, 0)")
            .bind(queue)
            .bind(serde_json::json!({"apalis": {"idempotency_key": key}}))
            .execute(&db.pool)
            .await
            .expect_err("a plain send of a key inside its window");
        assert_eq!(
            plain.as_database_error().and_then(|d| d.code()).as_deref(),
            Some("23505"),
            "{plain}"
        );
    }
}

/// Hundreds of ticks: for each, three replicas push the tick while the previous holder of its
/// key is archived, all released together by a barrier. Each key has one job, ever.
#[tokio::test]
async fn replicas_racing_completions_never_enqueue_a_tick_twice() {
    let db = TestDb::setup().await;
    let queue = "cron_many";
    let s = keyed_storage(&db.pool_with(8).await, queue);
    s.create_queue().await.expect("create");
    let ticks = 200u64;
    for tick in 0..ticks {
        let key = format!("tick:{tick}");
        let mut conn = db.pool.acquire().await.expect("conn");
        let first = s
            .push_task_with(
                &mut conn,
                TaskBuilder::new(Tick { at: tick })
                    .idempotency_key(key.clone())
                    .build(),
            )
            .await
            .expect("push");
        drop(conn);
        let barrier = Arc::new(tokio::sync::Barrier::new(4));
        let archiver = {
            let (s, barrier) = (s.clone(), barrier.clone());
            tokio::spawn(async move {
                let mut conn = s.pool().acquire().await.expect("conn");
                barrier.wait().await;
                s.queue()
                    .archive(&mut *conn, &[first.id])
                    .await
                    .expect("archive");
            })
        };
        let pushers: Vec<_> = (0..3)
            .map(|_| {
                let (s, key, barrier) = (s.clone(), key.clone(), barrier.clone());
                tokio::spawn(async move {
                    let mut conn = s.pool().acquire().await.expect("conn");
                    barrier.wait().await;
                    s.push_task_with(
                        &mut conn,
                        TaskBuilder::new(Tick { at: tick })
                            .idempotency_key(key)
                            .build(),
                    )
                    .await
                    .expect("push")
                })
            })
            .collect();
        archiver.await.expect("archiver");
        for p in pushers {
            assert!(p.await.expect("pusher").is_duplicate(), "tick {tick}");
        }
    }
    let twice = count(
        &db.pool,
        &format!(
            "SELECT count(*) FROM (SELECT k FROM \
               (SELECT headers->'apalis'->>'idempotency_key' k FROM pgmq.q_{queue} \
                UNION ALL SELECT headers->'apalis'->>'idempotency_key' FROM pgmq.a_{queue}) j \
             GROUP BY k HAVING count(*) > 1) d"
        ),
    )
    .await;
    assert_eq!(twice, 0, "no tick enqueued twice");
}
