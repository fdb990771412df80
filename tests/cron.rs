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
