//! Adaptive, overlapping claims against a real PostgreSQL: every job once when claims overlap
//! through a far database and two processes compete, what a claim picks first, and messages
//! scheduled for later never slowing a claim down.
mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use apalis::prelude::*;
use apalis_pgmq_notify::{Config, PgmqStorage, QueueName, Runtime};
use common::{TestDb, count, drained, stop_worker, wait_for};
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u32,
}

type Seen = Arc<Mutex<HashMap<u32, u32>>>;

async fn record(job: Job, seen: Data<Seen>) -> Result<(), BoxDynError> {
    // A little work, so the worker is sometimes full and claims must respect its capacity.
    tokio::task::yield_now().await;
    if let Ok(mut s) = seen.lock() {
        *s.entry(job.id).or_default() += 1;
    }
    Ok(())
}

async fn proxy_for(db: &TestDb, delay: Duration) -> common::proxy::Proxy {
    common::proxy::Proxy::to_server(&db.options, delay).await
}

#[tokio::test]
async fn overlapping_claims_through_a_far_database_run_every_job_once() {
    let db = TestDb::setup().await;
    let queue = "overlap";
    let name = QueueName::new(queue).expect("name");
    let jobs = 3000u32;
    // Process A sits 5 ms (each way) from the database with a pool big enough for four claims
    // in flight; process B is next door with a small pool (no overlap). Both start with a
    // claim size of 20 and grow.
    let proxy = proxy_for(&db, Duration::from_millis(5)).await;
    let far_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect_with(db.options.clone().host("127.0.0.1").port(proxy.port))
        .await
        .expect("connect through the proxy");
    let config = Config::default()
        .fetch_batch_size(20)
        .max_fetch_batch_size(400)
        .poll_interval(Duration::from_millis(200));
    let a: PgmqStorage<Job> =
        PgmqStorage::with_config(&Runtime::new(&far_pool), name.clone(), config.clone())
            .expect("config");
    let near_pool = db.pool_with(3).await;
    let b: PgmqStorage<Job> =
        PgmqStorage::with_config(&Runtime::new(&near_pool), name.clone(), config).expect("config");
    a.create_queue().await.expect("create");
    a.push_bulk_with(&db.pool, (0..jobs).map(|id| Job { id }))
        .await
        .expect("push");
    let seen: Seen = Arc::default();
    let wa = WorkerBuilder::new("far")
        .backend(a.clone())
        .data(seen.clone())
        .concurrency(40)
        .build(record);
    let wb = WorkerBuilder::new("near")
        .backend(b.clone())
        .data(seen.clone())
        .concurrency(8)
        .build(record);
    let (stop_a, join_a) = spawn_worker!(wa);
    let (stop_b, join_b) = spawn_worker!(wb);
    drained(&db.pool, queue).await;
    let archive = format!("SELECT count(*) FROM pgmq.a_{queue}");
    wait_for(WAIT, "every outcome archived", || async {
        (count(&db.pool, &archive).await == i64::from(jobs)).then_some(())
    })
    .await;
    stop_worker(stop_a, join_a).await;
    stop_worker(stop_b, join_b).await;
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), jobs as usize, "every job ran");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    // No delivery was lost and handed over again (a lapsed lease would show as read_ct 2).
    let redelivered = count(
        &db.pool,
        &format!("SELECT count(*) FROM pgmq.a_{queue} WHERE read_ct <> 1"),
    )
    .await;
    assert_eq!(redelivered, 0);
    drop(proxy);
}

#[tokio::test]
async fn a_claim_takes_the_messages_visible_longest_first() {
    let db = TestDb::setup().await;
    let queue = "visible_longest";
    let s: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        Config::default().fetch_batch_size(1).adaptive_claims(false),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    // Ids in one order, visibility times in the other (as after retries and schedules): the
    // message visible longest runs first, whatever its id.
    sqlx::query(
        "INSERT INTO pgmq.q_visible_longest (vt, message) \
         SELECT now() - make_interval(secs => g), jsonb_build_object('id', g) \
         FROM generate_series(1, 5) g",
    )
    .execute(&db.pool)
    .await
    .expect("insert");
    let order: Arc<Mutex<Vec<u32>>> = Arc::default();
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .data(order.clone())
        .concurrency(1)
        .build(|job: Job, order: Data<Arc<Mutex<Vec<u32>>>>| async move {
            order.lock().map_err(|e| e.to_string())?.push(job.id);
            Ok::<(), BoxDynError>(())
        });
    let (stop, join) = spawn_worker!(worker);
    wait_for(WAIT, "five jobs", || async {
        (order.lock().expect("lock").len() == 5).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    assert_eq!(*order.lock().expect("lock"), vec![5, 4, 3, 2, 1]);
}

#[tokio::test]
async fn a_claim_does_not_read_through_messages_scheduled_for_later() {
    let db = TestDb::setup().await;
    let queue = "behind_schedule";
    let s: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        Config::default(),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    // 50 000 messages scheduled a day ahead, with lower ids than the one visible message. (How
    // long the claim takes behind them is measured by the bench's `delayed_pickup`.)
    sqlx::query(
        "INSERT INTO pgmq.q_behind_schedule (vt, message) \
         SELECT now() + interval '1 day', jsonb_build_object('id', g) \
         FROM generate_series(1, 50000) g",
    )
    .execute(&db.pool)
    .await
    .expect("insert");
    sqlx::query("ANALYZE pgmq.q_behind_schedule")
        .execute(&db.pool)
        .await
        .expect("analyze");
    let mut sink = s.clone();
    sink.push(Job { id: 0 }).await.expect("push");
    let ran: Arc<Mutex<Vec<u32>>> = Arc::default();
    let worker = WorkerBuilder::new(queue)
        .backend(s.clone())
        .data(ran.clone())
        .build(|job: Job, ran: Data<Arc<Mutex<Vec<u32>>>>| async move {
            ran.lock().map_err(|e| e.to_string())?.push(job.id);
            Ok::<(), BoxDynError>(())
        });
    let (stop, join) = spawn_worker!(worker);
    wait_for(WAIT, "the visible job", || async {
        (!ran.lock().expect("lock").is_empty()).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    assert_eq!(*ran.lock().expect("lock"), vec![0]);
    let still = count(
        &db.pool,
        "SELECT count(*) FROM pgmq.q_behind_schedule WHERE read_ct = 0",
    )
    .await;
    assert_eq!(still, 50000, "nothing scheduled was touched");
}
