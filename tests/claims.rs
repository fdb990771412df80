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
use sqlx::AssertSqlSafe;

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

/// The lease of the claims whose answer the test makes the worker lose: long, so a job that
/// waited it out would show.
const LONG_LEASE: Duration = Duration::from_secs(600);

/// A worker reaching the database through a proxy loses a claim's answer: the claim is held
/// on a lock until the proxy has closed the worker's connections, then commits, and its answer
/// goes nowhere (a server that died after the commit, a failover to a synchronous standby).
/// Returns the proxy, the storage and the ids of the jobs that claim leased.
async fn lose_a_claim(
    db: &TestDb,
    queue: &str,
    recover: bool,
    touch_one: bool,
    seen: &Seen,
) -> (
    common::proxy::Proxy,
    PgmqStorage<Job>,
    (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), WorkerError>>,
    ),
) {
    let proxy = proxy_for(db, Duration::ZERO).await;
    // One connection: the claim that waits on the lock below is on the connection where the
    // worker's earlier claims ran, so its statement is prepared and its bind, execute and sync
    // are sent together and run without reading the socket again (on a fresh connection the
    // lock would be waited for while preparing, and the execute never sent).
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(db.options.clone().host("127.0.0.1").port(proxy.port))
        .await
        .expect("connect through the proxy");
    let config = Config::default()
        .visibility_timeout(LONG_LEASE)
        .poll_interval(Duration::from_millis(300))
        .listen(false)
        // No claim floor: the jobs are backdated below it.
        .claim_floor_sweep(None)
        .recover_lost_claims(recover);
    let storage: PgmqStorage<Job> = PgmqStorage::with_config(
        &Runtime::new(&pool),
        QueueName::new(queue).expect("name"),
        config,
    )
    .expect("config");
    storage.create_queue().await.expect("create");
    let worker = WorkerBuilder::new(format!("{queue}-worker"))
        .backend(storage.clone())
        .data(seen.clone())
        .concurrency(8)
        .build(record);
    let handle = spawn_worker!(worker);
    // The worker is up: it ran a job.
    storage
        .push_with(&db.pool, &Job { id: 0 })
        .await
        .expect("push");
    wait_for(WAIT, "the worker to run job 0", || async {
        seen.lock().expect("lock").contains_key(&0).then_some(())
    })
    .await;

    // Job 0's outcome is written: nothing of the worker's but its claims writes the queue
    // table from now on.
    wait_for(WAIT, "job 0 to be archived", || async {
        (count(&db.pool, &format!("SELECT count(*) FROM pgmq.a_{queue}")).await == 1).then_some(())
    })
    .await;
    // Five jobs, hidden for an hour; a transaction locks the queue table against writers (its
    // readers, such as the worker's probe of the next visible time, go on) and makes the five
    // visible since long ago (a claim reads `vt <= now()`, its start; the claim that waits may
    // have begun before). The worker's next claim waits on that lock before it touches a row.
    for id in 1..=5 {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT pgmq.send('{queue}', '{{\"id\": {id}}}'::jsonb, 3600)"
        )))
        .execute(&db.pool)
        .await
        .expect("send");
    }
    let mut lock = db.pool.begin().await.expect("begin");
    sqlx::query(AssertSqlSafe(format!(
        "LOCK TABLE pgmq.q_{queue} IN EXCLUSIVE MODE"
    )))
    .execute(&mut *lock)
    .await
    .expect("lock");
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE pgmq.q_{queue} SET vt = now() - interval '1 hour' WHERE msg_id > 1"
    )))
    .execute(&mut *lock)
    .await
    .expect("backdate");
    let claim: i32 = wait_for(WAIT, "the worker's claim to wait on the lock", || async {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
               AND query LIKE '%AS visible_since%'",
        )
        .fetch_optional(&db.pool)
        .await
        .expect("pg_stat_activity")
    })
    .await;
    // The server goes away for the worker: its connections are closed under it, and new ones
    // are refused. Then the claim gets its lock, leases the five jobs and commits, and its
    // answer has nowhere to go. The worker reaches the database again once that claim has
    // ended (so no claim of its own races the lost one).
    proxy.refuse(true);
    assert!(proxy.cut() > 0, "the worker had connections to close");
    lock.commit().await.expect("unlock");
    wait_for(WAIT, "the lost claim's backend to end", || async {
        let gone: bool =
            sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                .bind(claim)
                .fetch_one(&db.pool)
                .await
                .expect("pg_stat_activity");
        gone.then_some(())
    })
    .await;
    assert_eq!(
        count(
            &db.pool,
            &format!("SELECT count(*) FROM pgmq.q_{queue} WHERE msg_id > 1 AND read_ct = 1")
        )
        .await,
        5,
        "the lost claim leased the five jobs"
    );
    if touch_one {
        // Someone writes one of them meanwhile (a renewal, an operator's set_vt): its row is
        // no longer the version the lost claim wrote, and it must be left alone.
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE pgmq.q_{queue} SET vt = vt + interval '1 second' WHERE msg_id = 2"
        )))
        .execute(&db.pool)
        .await
        .expect("touch");
    }
    proxy.refuse(false);
    (proxy, storage, handle)
}

#[tokio::test]
async fn a_claim_whose_answer_was_lost_is_given_back_on_the_next_connection() {
    let db = TestDb::setup().await;
    let queue = "lost_claim";
    let seen: Seen = Arc::default();
    let started = std::time::Instant::now();
    let (_proxy, storage, (stop, join)) = lose_a_claim(&db, queue, true, true, &seen).await;
    // The jobs the lost claim leased run, long before their leases would have ended; job 1,
    // written by someone else after the claim, is not the claim's to give back.
    wait_for(WAIT, "jobs 2-5 to run", || async {
        let s = seen.lock().expect("lock");
        (2..=5).all(|id| s.contains_key(&id)).then_some(())
    })
    .await;
    assert!(
        started.elapsed() < LONG_LEASE / 4,
        "the jobs ran {:?} after the start; they waited for their lease",
        started.elapsed()
    );
    assert_eq!(
        apalis_pgmq_notify::testing::lost_claims_released(&storage),
        4,
        "the worker gave back the four untouched jobs of the claim whose answer it lost"
    );
    stop_worker(stop, join).await;
    let s = seen.lock().expect("lock").clone();
    assert!(s.values().all(|&n| n == 1), "each job ran once: {s:?}");
    assert!(!s.contains_key(&1), "job 1 was not given back: {s:?}");
    // The lost claim's read was given back: each job was read once, by the run that did it.
    assert_eq!(
        count(
            &db.pool,
            &format!("SELECT count(*) FROM pgmq.a_{queue} WHERE read_ct = 1")
        )
        .await,
        5
    );
    // Job 1 is still leased, as its writer left it.
    assert_eq!(
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM pgmq.q_{queue} \
                 WHERE msg_id = 2 AND read_ct = 1 AND vt > clock_timestamp() + interval '300 seconds'"
            )
        )
        .await,
        1
    );
    assert_eq!(
        count(&db.pool, &format!("SELECT count(*) FROM pgmq.q_{queue}")).await,
        1
    );
}

/// The same loss without the claim log: the five jobs stay leased to nobody while the worker
/// runs later jobs (the check above can fail).
#[tokio::test]
async fn without_the_claim_log_a_lost_claims_jobs_wait_out_their_lease() {
    let db = TestDb::setup().await;
    let queue = "lost_claim_off";
    let seen: Seen = Arc::default();
    let (_proxy, storage, (stop, join)) = lose_a_claim(&db, queue, false, false, &seen).await;
    let leased = format!(
        "SELECT count(*) FROM pgmq.q_{queue} \
         WHERE msg_id BETWEEN 2 AND 6 AND read_ct = 1 AND vt > clock_timestamp() + interval '300 seconds'"
    );
    wait_for(WAIT, "the lost claim to commit", || async {
        (count(&db.pool, &leased).await == 5).then_some(())
    })
    .await;
    // The worker works: a later job runs; the five stay leased, read once, by nobody.
    storage
        .push_with(&db.pool, &Job { id: 6 })
        .await
        .expect("push");
    wait_for(WAIT, "the worker to run job 6", || async {
        seen.lock().expect("lock").contains_key(&6).then_some(())
    })
    .await;
    assert_eq!(count(&db.pool, &leased).await, 5);
    let s = seen.lock().expect("lock").clone();
    assert!((1..=5).all(|id| !s.contains_key(&id)), "{s:?}");
    assert_eq!(
        apalis_pgmq_notify::testing::lost_claims_released(&storage),
        0
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM apalis_pgmq.claim_log").await,
        0,
        "nothing logged"
    );
    stop_worker(stop, join).await;
}

/// The claim log keeps only claims whose lease may still run: a busy worker deletes the rows
/// past their lease (every 10 s at most, beside its claims).
#[tokio::test]
async fn a_busy_worker_prunes_the_claim_log() {
    let db = TestDb::setup().await;
    let queue = "claim_log_prune";
    let config = Config::default()
        .visibility_timeout(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(200));
    let storage: PgmqStorage<Job> =
        PgmqStorage::with_config(&db.runtime(), QueueName::new(queue).expect("name"), config)
            .expect("config");
    storage.create_queue().await.expect("create");
    let seen: Seen = Arc::default();
    let worker = WorkerBuilder::new("pruner")
        .backend(storage.clone())
        .data(seen.clone())
        .concurrency(4)
        .build(record);
    let (stop, join) = spawn_worker!(worker);
    storage
        .push_with(&db.pool, &Job { id: 0 })
        .await
        .expect("push");
    // The first claim's row, with the job it leased.
    let first: String = wait_for(WAIT, "the first claim to be logged", || async {
        sqlx::query_scalar(
            "SELECT token::text FROM apalis_pgmq.claim_log WHERE ids = ARRAY[1]::bigint[]",
        )
        .fetch_optional(&db.pool)
        .await
        .expect("claim_log")
    })
    .await;
    let mut id = 1;
    wait_for(WAIT, "the first claim's row to be pruned", || {
        id += 1;
        let (storage, pool, first) = (storage.clone(), db.pool.clone(), first.clone());
        async move {
            // The worker keeps claiming (a job at a time): each logged claim may prune.
            storage.push_with(&pool, &Job { id }).await.expect("push");
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM apalis_pgmq.claim_log WHERE token = $1::text::uuid",
            )
            .bind(&first)
            .fetch_one(&pool)
            .await
            .expect("claim_log");
            (left == 0).then_some(())
        }
    })
    .await;
    stop_worker(stop, join).await;
    // What is left is recent: no row more than a prune interval and a lease past its end.
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM apalis_pgmq.claim_log WHERE until < now() - interval '30 seconds'"
        )
        .await,
        0
    );
}

/// A worker with exactly the rights the README lists runs jobs, logs its claims and prunes the
/// log; without `DELETE` on the log it refuses to start, naming the grant.
#[tokio::test]
async fn a_worker_with_the_readme_rights_logs_and_prunes_its_claims() {
    let db = TestDb::setup().await;
    let queue = "claim_log_rights";
    let admin: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        Config::default(),
    )
    .expect("config");
    admin.create_queue().await.expect("create");
    let role = format!("cl_{}", &db.name[9..]);
    for sql in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT USAGE ON SCHEMA pgmq, apalis_pgmq TO {role}"),
        format!("GRANT SELECT ON pgmq.meta, apalis_pgmq.paused TO {role}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON pgmq.q_{queue} TO {role}"),
        format!("GRANT SELECT, INSERT ON pgmq.a_{queue} TO {role}"),
        format!("GRANT SELECT, INSERT ON pgmq.q_{queue}_dlq TO {role}"),
        format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON apalis_pgmq.listeners, apalis_pgmq.workers TO {role}"
        ),
        format!("GRANT INSERT, SELECT ON apalis_pgmq.claim_log TO {role}"),
    ] {
        sqlx::query(AssertSqlSafe(sql.clone()))
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
    let config = Config::default().visibility_timeout(Duration::from_secs(1));
    let storage = || -> PgmqStorage<Job> {
        PgmqStorage::with_config(
            &runtime,
            QueueName::new(queue).expect("name"),
            config.clone(),
        )
        .expect("config")
    };
    let seen: Seen = Arc::default();
    // Without DELETE on the log: refused at start, with the grant to run.
    let refused = WorkerBuilder::new("no-delete")
        .backend(storage())
        .data(seen.clone())
        .build(record);
    let err = tokio::time::timeout(WAIT, refused.run())
        .await
        .expect("the worker stops at once")
        .expect_err("missing right");
    assert!(
        err.to_string()
            .contains(&format!("GRANT DELETE ON apalis_pgmq.claim_log TO {role}")),
        "{err}"
    );
    sqlx::query(AssertSqlSafe(format!(
        "GRANT DELETE ON apalis_pgmq.claim_log TO {role}"
    )))
    .execute(&db.pool)
    .await
    .expect("grant");
    let worker = WorkerBuilder::new("readme-rights")
        .backend(storage())
        .data(seen.clone())
        .concurrency(4)
        .build(record);
    let (stop, join) = spawn_worker!(worker);
    admin
        .push_with(&db.pool, &Job { id: 0 })
        .await
        .expect("push");
    wait_for(WAIT, "job 0 to run and its claim to be logged", || async {
        (seen.lock().expect("lock").contains_key(&0)
            && count(&db.pool, "SELECT count(*) FROM apalis_pgmq.claim_log").await > 0)
            .then_some(())
    })
    .await;
    // The worker keeps claiming, one job at a time, until its prune has removed the first
    // claim's row (past its 1 s lease).
    let mut id = 0;
    wait_for(WAIT, "the worker to prune its own log", || {
        id += 1;
        let (admin, pool) = (admin.clone(), db.pool.clone());
        async move {
            admin.push_with(&pool, &Job { id }).await.expect("push");
            let first_gone: bool = sqlx::query_scalar(
                "SELECT NOT EXISTS (SELECT 1 FROM apalis_pgmq.claim_log WHERE ids = ARRAY[1]::bigint[])",
            )
            .fetch_one(&pool)
            .await
            .expect("claim_log");
            first_gone.then_some(())
        }
    })
    .await;
    stop_worker(stop, join).await;
    runtime.shutdown().await.expect("shutdown");
    pool.close().await;
    // Every job the worker finished was archived: none was dead-lettered for an outcome it
    // could not write.
    assert_eq!(
        count(
            &db.pool,
            &format!("SELECT count(*) FROM pgmq.q_{queue}_dlq")
        )
        .await,
        0
    );
    let ran = seen.lock().expect("lock").len() as i64;
    assert!(ran > 0);
    assert_eq!(
        count(&db.pool, &format!("SELECT count(*) FROM pgmq.a_{queue}")).await,
        ran
    );
    common::drop_role(&db, &role).await;
}
