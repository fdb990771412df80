//! Priorities against a real PostgreSQL: higher first, one claim in `FAIR_EVERY` oldest-first
//! (the starvation bound), and producers that send no priority or a nonsensical one.
mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use apalis::prelude::*;
use apalis_pgmq_notify::{Config, FAIR_EVERY, PgmqStorage, QueueName};
use common::{TestDb, stop_worker, wait_for};
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u32,
}

/// One job per claim, one at a time: the run order is the claim order.
fn config() -> Config {
    Config::default()
        .priorities(true)
        .fetch_batch_size(1)
        .adaptive_claims(false)
        .listen(false)
        .poll_interval(Duration::from_millis(50))
}

async fn run_all(s: &PgmqStorage<Job>, n: usize) -> Vec<u32> {
    let order: Arc<Mutex<Vec<u32>>> = Arc::default();
    let worker = WorkerBuilder::new("prio")
        .backend(s.clone())
        .data(order.clone())
        .concurrency(1)
        .build(|job: Job, order: Data<Arc<Mutex<Vec<u32>>>>| async move {
            order.lock().map_err(|e| e.to_string())?.push(job.id);
            Ok::<(), BoxDynError>(())
        });
    let (stop, join) = spawn_worker!(worker);
    wait_for(WAIT, "every job run", || async {
        (order.lock().expect("lock").len() == n).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    order.lock().expect("lock").clone()
}

#[tokio::test]
async fn higher_priorities_run_first_without_starving_the_others() {
    let db = TestDb::setup().await;
    let queue = "prio_order";
    let s: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        config(),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    let mut conn = db.pool.acquire().await.expect("conn");
    // 16 low-priority jobs (ids 0..16) queued first, then 32 high-priority ones (100..132).
    for id in 0..16 {
        s.push_task_with(&mut conn, TaskBuilder::new(Job { id }).build())
            .await
            .expect("push");
    }
    for id in 100..132 {
        let task = TaskBuilder::new(Job { id }).priority(5).build();
        s.push_task_with(&mut conn, task).await.expect("push");
    }
    let order = run_all(&s, 48).await;
    let high = |id: &u32| *id >= 100;
    assert!(
        order[..3].iter().all(high),
        "high priority first: {order:?}"
    );
    assert!(
        order[..FAIR_EVERY as usize]
            .iter()
            .filter(|i| high(i))
            .count()
            >= FAIR_EVERY as usize - 2,
        "mostly high while both wait: {order:?}"
    );
    // The bound: while both kinds wait, every FAIR_EVERY + 1 consecutive runs include a low one.
    let last_high = order.iter().rposition(high).expect("some high");
    for w in order[..=last_high].windows(FAIR_EVERY as usize + 1) {
        assert!(w.iter().any(|i| !high(i)), "a low job starved: {order:?}");
    }
    // Within one priority, the job visible longest runs first.
    let lows: Vec<u32> = order.iter().copied().filter(|i| !high(i)).collect();
    assert_eq!(lows, (0..16).collect::<Vec<_>>());
    let highs: Vec<u32> = order.iter().copied().filter(high).collect();
    assert_eq!(highs, (100..132).collect::<Vec<_>>());
}

#[tokio::test]
async fn plain_pgmq_messages_and_odd_priorities_get_a_sane_priority() {
    let db = TestDb::setup().await;
    let queue = "prio_plain";
    let s: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        config(),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    // Producers that know nothing of priorities, or send nonsense: every insert succeeds.
    for (id, headers) in [
        (1, None),
        (
            2,
            Some(serde_json::json!({"apalis": {"priority": "urgent"}})),
        ),
        (3, Some(serde_json::json!({"apalis": {"priority": 1e30}}))),
        (4, Some(serde_json::json!({"apalis": {"priority": -5}}))),
        (5, Some(serde_json::json!({"apalis": {"priority": 3}}))),
        (6, Some(serde_json::json!(["not", "an", "object"]))),
    ] {
        sqlx::query("SELECT pgmq.send($1, $2, $3, 0)")
            .bind(queue)
            .bind(serde_json::json!({ "id": id }))
            .bind(headers)
            .execute(&db.pool)
            .await
            .expect("send");
    }
    let prios: Vec<i32> = sqlx::query_scalar(
        "SELECT apalis_pgmq.priority_of(headers) FROM pgmq.q_prio_plain ORDER BY msg_id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("priorities");
    assert_eq!(prios, vec![0, 0, 1_000_000, -5, 3, 0]);
    let order = run_all(&s, 6).await;
    assert_eq!(order[..2], [3, 5], "the highest first: {order:?}");
    assert_eq!(
        *order.last().expect("last"),
        4,
        "the negative one last: {order:?}"
    );
}

#[tokio::test]
async fn a_producer_with_only_pgmq_rights_sends_into_a_queue_with_priorities_and_keys() {
    let db = TestDb::setup().await;
    let queue = "prio_rights";
    let s: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        config(),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    // The priority index calls apalis_pgmq.priority_of and the key index reads the headers:
    // neither needs a right in apalis_pgmq from the producer.
    let (role, producer) = common::producer_role(&db, queue, "").await;
    let headers = serde_json::json!({"apalis": {"priority": 2, "idempotency_key": "once"}});
    for id in [1, 2] {
        let sent = sqlx::query("SELECT pgmq.send($1, $2, $3, 0)")
            .bind(queue)
            .bind(serde_json::json!({ "id": id }))
            .bind(&headers)
            .execute(&producer)
            .await;
        match id {
            1 => {
                sent.expect("a plain PGMQ producer sends");
            }
            _ => {
                let e = sent.expect_err("the key is taken");
                assert_eq!(
                    e.as_database_error().and_then(|d| d.code()).as_deref(),
                    Some("23505")
                );
            }
        }
    }
    sqlx::query("SELECT pgmq.send($1, $2)")
        .bind(queue)
        .bind(serde_json::json!({ "id": 3 }))
        .execute(&producer)
        .await
        .expect("a message without headers");
    producer.close().await;
    assert_eq!(run_all(&s, 2).await, vec![1, 3], "priority 2 first");
    common::drop_role(&db, &role).await;
}

/// Priorities PostgreSQL keeps but serde_json cannot hold (`1e400`, `-1e400`, written by SQL):
/// the jobs run (priority 0 in the decoder, clamped by the index), none is dead-lettered.
#[tokio::test]
async fn out_of_range_priorities_from_sql_never_lose_the_job() {
    let db = TestDb::setup().await;
    let queue = "prio_hostile";
    let s: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        config(),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    sqlx::raw_sql(
        "SELECT pgmq.send('prio_hostile', '{\"id\": 1}', '{\"apalis\": {\"priority\": 1e400}}'::jsonb, 0); \
         SELECT pgmq.send('prio_hostile', '{\"id\": 2}', '{\"apalis\": {\"priority\": -1e400, \"max_attempts\": 2}}'::jsonb, 0); \
         SELECT pgmq.send('prio_hostile', '{\"id\": 3}', '{\"apalis\": {\"metadata\": {\"x\": 2e999}}}'::jsonb, 0);",
    )
    .execute(&db.pool)
    .await
    .expect("hostile headers from SQL");
    let mut order = run_all(&s, 3).await;
    order.sort_unstable();
    assert_eq!(order, vec![1, 2, 3]);
    assert_eq!(
        common::count(&db.pool, "SELECT count(*) FROM pgmq.a_prio_hostile").await,
        3
    );
    let dead = sqlx::query_scalar::<_, bool>(
        "SELECT to_regclass('pgmq.q_prio_hostile_dlq') IS NOT NULL \
           AND EXISTS (SELECT 1 FROM pgmq.q_prio_hostile_dlq)",
    )
    .fetch_one(&db.pool)
    .await
    .expect("dead letters");
    assert!(!dead, "no job dead-lettered");
}

/// A hardened database: PUBLIC's EXECUTE on every function of apalis_pgmq revoked. A producer
/// with PGMQ's rights only still sends into a queue with priorities and keys (the indexes are
/// over built-in expressions; the key ledger's triggers run as their owner), and a taken key is
/// still refused.
#[tokio::test]
async fn a_pgmq_producer_keeps_working_when_public_execute_is_revoked() {
    let db = TestDb::setup().await;
    let queue = "prio_hardened";
    let s: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        config(),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    sqlx::raw_sql(
        "REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA apalis_pgmq FROM PUBLIC; \
         REVOKE EXECUTE ON FUNCTION apalis_pgmq.key_hash(text), apalis_pgmq.priority_of(jsonb) FROM PUBLIC;",
    )
    .execute(&db.pool)
    .await
    .expect("revoke");
    let (role, producer) = common::producer_role(&db, queue, "").await;
    for (id, headers) in [
        (
            1,
            serde_json::json!({"apalis": {"priority": 1, "idempotency_key": "k1"}}),
        ),
        (2, serde_json::json!({"apalis": {"priority": 9}})),
        (3, serde_json::json!({"apalis": {"idempotency_key": "k1"}})),
    ] {
        let sent = sqlx::query("SELECT pgmq.send($1, $2, $3, 0)")
            .bind(queue)
            .bind(serde_json::json!({ "id": id }))
            .bind(&headers)
            .execute(&producer)
            .await;
        if id == 3 {
            let e = sent.expect_err("the key is taken");
            assert_eq!(
                e.as_database_error().and_then(|d| d.code()).as_deref(),
                Some("23505"),
                "{e}"
            );
        } else {
            sent.unwrap_or_else(|e| panic!("job {id}: {e}"));
        }
    }
    producer.close().await;
    assert_eq!(run_all(&s, 2).await, vec![2, 1], "priority 9 first");
    common::drop_role(&db, &role).await;
}
