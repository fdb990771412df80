//! The wake-up protocol as real applications use a database (see `src/notify/wakeup.rs`):
//! producers never wait on it, never deadlock through it and need no rights in our schema;
//! pickup stays bounded whatever other sessions do; a silent listener connection is replaced;
//! work made visible by an update in one process wakes idle workers of another.
//!
//! Workers here have a 60 s fallback poll unless a test says otherwise, so a pickup within
//! seconds comes from a notification (or a known visibility time).

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_pgmq_notify::{
    Config, NotifyChannels, NotifyMode, PgmqStorage, QueueName, Runtime, enable_notify,
};
use common::{TestDb, count, proxy::Proxy, stop_worker, wait_for};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, postgres::PgPoolOptions};

const WAIT: Duration = Duration::from_secs(30);
/// Far below the 60 s fallback poll.
const QUICK: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u32,
}

type Log = Arc<Mutex<Vec<u32>>>;

fn slow_poll() -> Config {
    Config::default().poll_interval(Duration::from_secs(60))
}

fn storage_on(runtime: &Runtime, queue: &str, config: Config) -> PgmqStorage<Job> {
    PgmqStorage::with_config(runtime, QueueName::new(queue).expect("name"), config).expect("config")
}

fn handled(log: &Log, id: u32) -> bool {
    log.lock().expect("lock").contains(&id)
}

async fn record(job: Job, log: Data<Log>) -> Result<(), BoxDynError> {
    log.lock().expect("lock").push(job.id);
    Ok(())
}

async fn wait_handled(log: &Log, id: u32, within: Duration) {
    wait_for(within, &format!("job {id} to be handled"), || async {
        handled(log, id).then_some(())
    })
    .await;
}

/// Waits until a worker process has armed its wake-up on `queue`'s channel.
async fn armed_on(pool: &PgPool, queue: &str) -> i64 {
    armed_after(pool, queue, 0).await
}

/// Waits until a worker process has armed its wake-up on `queue`'s channel with an arming
/// newer than `arm_id` (every arming gets a new id); returns the arming's id.
async fn armed_after(pool: &PgPool, queue: &str, arm_id: i64) -> i64 {
    armed_after_within(pool, queue, arm_id, WAIT).await
}

/// As [`armed_after`], waiting up to `timeout`.
async fn armed_after_within(pool: &PgPool, queue: &str, arm_id: i64, timeout: Duration) -> i64 {
    let sql = format!(
        "SELECT coalesce(max(arm_id), -1) FROM apalis_pgmq.listeners \
         WHERE channel = 'apq.q.{queue}' AND armed AND NOT persistent AND arm_id > {arm_id}"
    );
    wait_for(timeout, &format!("a worker of {queue} to arm"), || async {
        let id = count(pool, &sql).await;
        (id >= 0).then_some(id)
    })
    .await
}

macro_rules! worker {
    ($name:expr, $s:expr, $log:expr) => {{
        let worker = WorkerBuilder::new($name)
            .backend($s.clone())
            .data($log.clone())
            .concurrency(4)
            .build(record);
        spawn_worker!(worker)
    }};
}

/// A pool that reaches the test database through `proxy`: to the crate, another server (so
/// another listener and another owner in `apalis_pgmq.listeners`, as another process has).
async fn pool_through(db: &TestDb, proxy: &Proxy) -> PgPool {
    PgPoolOptions::new()
        .max_connections(10)
        .connect_with(db.options.clone().host("127.0.0.1").port(proxy.port))
        .await
        .expect("connect through the proxy")
}

async fn proxy_to_server(db: &TestDb) -> Proxy {
    Proxy::to_server(&db.options, Duration::ZERO).await
}

#[tokio::test]
async fn an_open_producer_transaction_does_not_stall_other_producers() {
    let db = TestDb::setup().await;
    let s = storage_on(&db.runtime(), "open_tx", slow_poll());
    s.create_queue().await.expect("create");
    let log: Log = Arc::default();
    let (stop, join) = worker!("open-tx", s, log);
    armed_on(&db.pool, "open_tx").await;
    // A request's transaction enqueues while the worker waits, then stays open.
    let mut request = db.pool.begin().await.expect("begin");
    s.push_with(&mut *request, &Job { id: 1000 })
        .await
        .expect("push in the open transaction");
    // Other producers are not held up by it, and their jobs are picked up by notification.
    for id in 1..=10 {
        armed_on(&db.pool, "open_tx").await;
        tokio::time::timeout(QUICK, s.push_with(&db.pool, &Job { id }))
            .await
            .unwrap_or_else(|_| panic!("push {id} waited on the open transaction"))
            .expect("push");
        wait_handled(&log, id, QUICK).await;
    }
    assert!(!handled(&log, 1000), "an uncommitted job cannot have run");
    request.commit().await.expect("commit");
    wait_handled(&log, 1000, WAIT).await;
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn producers_inserting_into_two_queues_in_opposite_orders_never_deadlock() {
    let db = TestDb::setup().await;
    let x = storage_on(&db.runtime(), "order_x", slow_poll());
    let y = storage_on(&db.runtime(), "order_y", slow_poll());
    x.create_queue().await.expect("create x");
    y.create_queue().await.expect("create y");
    let log: Log = Arc::default();
    let (stop_x, join_x) = worker!("order-x", x, log);
    let (stop_y, join_y) = worker!("order-y", y, log);
    let rounds = 25u32;
    for round in 0..rounds {
        // Both queues have a waiting worker: every insert below runs the trigger's look-up.
        armed_on(&db.pool, "order_x").await;
        armed_on(&db.pool, "order_y").await;
        let mut t1 = db.pool.begin().await.expect("t1");
        let mut t2 = db.pool.begin().await.expect("t2");
        let id = round * 4;
        let step = |what: &'static str| {
            move |r: Result<Result<i64, _>, _>| match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("round {round}, {what}: {e}"),
                Err(_) => panic!("round {round}, {what}: blocked"),
            }
        };
        step("t1 into x")(tokio::time::timeout(QUICK, x.push_with(&mut *t1, &Job { id })).await);
        step("t2 into y")(
            tokio::time::timeout(QUICK, y.push_with(&mut *t2, &Job { id: id + 1 })).await,
        );
        step("t1 into y")(
            tokio::time::timeout(QUICK, y.push_with(&mut *t1, &Job { id: id + 2 })).await,
        );
        step("t2 into x")(
            tokio::time::timeout(QUICK, x.push_with(&mut *t2, &Job { id: id + 3 })).await,
        );
        t1.commit().await.expect("commit t1");
        t2.commit().await.expect("commit t2");
        for i in id..id + 4 {
            wait_handled(&log, i, QUICK).await;
        }
    }
    assert_eq!(log.lock().expect("lock").len(), (rounds * 4) as usize);
    stop_worker(stop_x, join_x).await;
    stop_worker(stop_y, join_y).await;
}

#[tokio::test]
async fn a_producer_with_only_pgmq_rights_sends_in_every_notify_mode() {
    let db = TestDb::setup().await;
    let queue = "rights";
    let s = storage_on(&db.runtime(), queue, slow_poll());
    s.create_queue().await.expect("create");
    let (role, producer) = common::producer_role(&db, queue, "").await;
    let log: Log = Arc::default();
    let (stop, join) = worker!("rights", s, log);
    let q = QueueName::new(queue).expect("name");
    let modes = [
        NotifyMode::OnDemand,
        NotifyMode::Batch,
        NotifyMode::message(),
    ];
    for (i, mode) in modes.into_iter().enumerate() {
        enable_notify(&db.pool, &q, &NotifyChannels::default(), mode)
            .await
            .expect("enable");
        if mode == NotifyMode::OnDemand {
            armed_on(&db.pool, queue).await;
        }
        let id = u32::try_from(i).expect("small") * 10;
        sqlx::query("SELECT pgmq.send($1, jsonb_build_object('id', $2::int))")
            .bind(queue)
            .bind(i32::try_from(id).expect("small"))
            .execute(&producer)
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: pgmq.send as a plain PGMQ producer: {e}"));
        sqlx::query(
            "SELECT pgmq.send_batch($1, ARRAY[jsonb_build_object('id', $2::int), \
             jsonb_build_object('id', $2::int + 1)])",
        )
        .bind(queue)
        .bind(i32::try_from(id + 1).expect("small"))
        .execute(&producer)
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: pgmq.send_batch as a plain PGMQ producer: {e}"));
        for j in id..id + 3 {
            wait_handled(&log, j, QUICK).await;
        }
    }
    stop_worker(stop, join).await;
    producer.close().await;
    common::drop_role(&db, &role).await;
}

#[tokio::test]
async fn a_worker_without_its_rights_fails_at_start_naming_the_right() {
    let db = TestDb::setup().await;
    let queue = "no_rights";
    let s = storage_on(&db.runtime(), queue, slow_poll());
    s.create_queue().await.expect("create");
    s.push_with(&db.pool, &Job { id: 1 }).await.expect("push");
    // Rights to read and push, not to lease, archive or dead-letter.
    let (role, pool) = common::producer_role(&db, queue, "").await;
    let weak = storage_on(&Runtime::new(&pool), queue, slow_poll());
    let log: Log = Arc::default();
    let worker = WorkerBuilder::new("no-rights")
        .backend(weak)
        .data(log.clone())
        .build(record);
    let err = tokio::time::timeout(WAIT, worker.run())
        .await
        .expect("the worker stops at start")
        .expect_err("a worker without its rights fails");
    let text = err.to_string();
    assert!(
        text.contains("lacks UPDATE on pgmq.\"q_no_rights\"") && text.contains("GRANT UPDATE"),
        "{text}"
    );
    assert!(log.lock().expect("lock").is_empty(), "no job ran");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM pgmq.q_no_rights WHERE read_ct = 0"
        )
        .await,
        1,
        "the job was not even claimed"
    );
    pool.close().await;
    common::drop_role(&db, &role).await;
}

#[tokio::test]
async fn a_job_that_sent_no_notification_is_read_by_the_fallback_deadline_while_a_writer_stays_open()
 {
    let db = TestDb::setup().await;
    let queue = "long_writer";
    let poll = Duration::from_secs(2);
    let s = storage_on(
        &db.runtime(),
        queue,
        Config::default().poll_interval(poll).poll_jitter(0.0),
    );
    s.create_queue().await.expect("create");
    // A long-lived writer: has inserted, stays open for the whole test (settle checks fail).
    let mut writer = db.pool.begin().await.expect("writer");
    s.push_with(&mut *writer, &Job { id: 999 })
        .await
        .expect("writer push");
    // A producer session whose "nobody waits" cache is valid (its last insert found nobody
    // armed), inserting before the worker arms and committing after: its trigger queued no
    // event, so its commit sends no notification.
    let mut session = db.pool.acquire().await.expect("producer session");
    s.push_with(&mut *session, &Job { id: 0 })
        .await
        .expect("a first push finds nobody waiting");
    let mut producer = sqlx::Connection::begin(&mut *session)
        .await
        .expect("producer");
    s.push_with(&mut *producer, &Job { id: 1 })
        .await
        .expect("push");
    let log: Log = Arc::default();
    let (stop, join) = worker!("long-writer", s, log);
    armed_on(&db.pool, queue).await;
    let received_before = s.listener_stats().received;
    producer.commit().await.expect("commit");
    let committed = Instant::now();
    // Bounded by the fallback deadline (2 s), not postponed by the open writer.
    wait_handled(&log, 1, poll * 4).await;
    println!("picked up {:?} after commit", committed.elapsed());
    assert_eq!(
        s.listener_stats().received,
        received_before,
        "no notification was sent: the fallback poll found it"
    );
    assert!(!handled(&log, 999));
    writer.rollback().await.expect("rollback");
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn a_silent_listener_connection_is_replaced_within_the_health_interval() {
    let db = TestDb::setup().await;
    let proxy = proxy_to_server(&db).await;
    let pool = pool_through(&db, &proxy).await;
    let queue = "silent";
    let s = storage_on(
        &Runtime::new(&pool),
        queue,
        slow_poll().listener_health_check(Duration::from_secs(2)),
    );
    s.create_queue().await.expect("create");
    let log: Log = Arc::default();
    let (stop, join) = worker!("silent", s, log);
    let lost_arming = armed_on(&db.pool, queue).await;
    let reconnects = s.listener_stats().reconnects;
    // The LISTEN connection goes half-open: no reset, nothing delivered either way.
    assert_eq!(proxy.silence_listeners(), 1, "one listening connection");
    let pushed = Instant::now();
    s.push_with(&db.pool, &Job { id: 1 }).await.expect("push");
    // Its notification is lost; the health check replaces the connection (2 s) and the worker
    // reads again, long before the 60 s fallback.
    wait_for(QUICK, "the silent connection to be replaced", || async {
        (s.listener_stats().reconnects > reconnects).then_some(())
    })
    .await;
    wait_handled(&log, 1, QUICK).await;
    println!("picked up {:?} after push", pushed.elapsed());
    // And the new connection delivers, once the worker has armed anew (its arming whose
    // notification was lost is forgotten at the reconnect: a session notifies once per arming).
    // A push in the instant between an arming and its version bump is read by the settle check
    // instead, without a notification: push again.
    let received = s.listener_stats().received;
    let mut arming = lost_arming;
    for id in 2..7 {
        arming = armed_after(&db.pool, queue, arming).await;
        s.push_with(&db.pool, &Job { id }).await.expect("push");
        wait_handled(&log, id, QUICK).await;
        if s.listener_stats().received > received {
            break;
        }
    }
    wait_for(QUICK, "a notification on the new connection", || async {
        (s.listener_stats().received > received).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn a_retry_written_in_one_process_wakes_an_idle_worker_in_another() {
    let db = TestDb::setup().await;
    let queue = "cross";
    // Process A: its handler holds job 1 until told, then asks for a retry.
    let a = storage_on(
        &db.runtime(),
        queue,
        slow_poll().visibility_timeout(Duration::from_secs(60)),
    );
    a.create_queue().await.expect("create");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let runs = Arc::new(Mutex::new(Vec::<&'static str>::new()));
    let worker_a = WorkerBuilder::new("cross-a")
        .backend(a.clone())
        .data(gate.clone())
        .data(runs.clone())
        .build(
            |_job: Job,
             gate: Data<Arc<tokio::sync::Semaphore>>,
             runs: Data<Arc<Mutex<Vec<&'static str>>>>| async move {
                runs.lock().expect("lock").push("a");
                gate.acquire()
                    .await
                    .map_err(|e| Box::new(e) as BoxDynError)?
                    .forget();
                Err::<(), BoxDynError>(Box::new(DeferredError::new("later")))
            },
        );
    let (stop_a, join_a) = spawn_worker!(worker_a);
    a.push_with(&db.pool, &Job { id: 1 }).await.expect("push");
    wait_for(WAIT, "process A to run the job", || async {
        (!runs.lock().expect("lock").is_empty()).then_some(())
    })
    .await;
    // Process B (another listener and owner), idle and armed while A holds the job.
    let proxy = proxy_to_server(&db).await;
    let pool_b = pool_through(&db, &proxy).await;
    let b = storage_on(&Runtime::new(&pool_b), queue, slow_poll());
    let log: Log = Arc::default();
    let (stop_b, join_b) = worker!("cross-b", b, log);
    // B's row appears when it arms; nothing notifies B before the retry.
    wait_for(WAIT, "process B to arm", || async {
        (count(
            &db.pool,
            "SELECT count(DISTINCT owner) FROM apalis_pgmq.listeners WHERE channel = 'apq.q.cross'",
        )
        .await
            >= 2)
            .then_some(())
    })
    .await;
    let received = b.listener_stats().received;
    // A stops: its job ends with a deferral (visible again now) and A leaves. Only an update
    // made it visible: no insert trigger fired.
    let stopping = tokio::spawn(stop_worker(stop_a, join_a));
    gate.add_permits(1);
    stopping.await.expect("A stopped");
    wait_handled(&log, 1, QUICK).await;
    // B was notified (its read may beat the notification, so wait for it).
    wait_for(QUICK, "process B's notification", || async {
        (b.listener_stats().received > received).then_some(())
    })
    .await;
    stop_worker(stop_b, join_b).await;
}

#[tokio::test]
async fn a_release_in_one_process_wakes_an_idle_worker_in_another() {
    let db = TestDb::setup().await;
    let queue = "rel";
    // Process A: concurrency 1, so of the two jobs it claims it starts one and releases the
    // other (a release gives the read back: read_ct goes down).
    let a = storage_on(&db.runtime(), queue, slow_poll().fetch_batch_size(10));
    a.create_queue().await.expect("create");
    // Hold the release in the database until process B waits, so B cannot see the job before.
    sqlx::raw_sql(
        "CREATE FUNCTION hold_release() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.read_ct < OLD.read_ct THEN PERFORM pg_advisory_xact_lock_shared(4242); END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER hold_release BEFORE UPDATE ON pgmq.q_rel \
         FOR EACH ROW EXECUTE FUNCTION hold_release();",
    )
    .execute(&db.pool)
    .await
    .expect("hold trigger");
    let mut holder = db.pool.acquire().await.expect("holder");
    sqlx::query("SELECT pg_advisory_lock(4242)")
        .execute(&mut *holder)
        .await
        .expect("hold");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let worker_a = WorkerBuilder::new("rel-a")
        .backend(a.clone())
        .data(gate.clone())
        .concurrency(1)
        .build(
            |_job: Job, gate: Data<Arc<tokio::sync::Semaphore>>| async move {
                gate.acquire()
                    .await
                    .map_err(|e| Box::new(e) as BoxDynError)?
                    .forget();
                Ok::<(), BoxDynError>(())
            },
        );
    let (stop_a, join_a) = spawn_worker!(worker_a);
    armed_on(&db.pool, queue).await;
    a.push_bulk_with(&db.pool, [Job { id: 1 }, Job { id: 2 }])
        .await
        .expect("push two");
    wait_for(WAIT, "process A's release to wait on the hold", || async {
        (count(
            &db.pool,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND NOT granted",
        )
        .await
            > 0)
            .then_some(())
    })
    .await;
    // Process B (another listener and owner) arms while the release is held.
    let proxy = proxy_to_server(&db).await;
    let pool_b = pool_through(&db, &proxy).await;
    let b = storage_on(&Runtime::new(&pool_b), queue, slow_poll());
    let log: Log = Arc::default();
    let (stop_b, join_b) = worker!("rel-b", b, log);
    wait_for(WAIT, "process B to arm", || async {
        (count(
            &db.pool,
            "SELECT count(DISTINCT owner) FROM apalis_pgmq.listeners WHERE channel = 'apq.q.rel'",
        )
        .await
            >= 2)
            .then_some(())
    })
    .await;
    let received = b.listener_stats().received;
    assert!(
        log.lock().expect("lock").is_empty(),
        "B has seen nothing yet"
    );
    sqlx::query("SELECT pg_advisory_unlock(4242)")
        .execute(&mut *holder)
        .await
        .expect("let the release through");
    // Only an update made job 2 visible; B hears of it and runs it (its fallback is 60 s and
    // the lease it saw ran 30 s).
    wait_handled(&log, 2, QUICK).await;
    wait_for(QUICK, "process B's notification", || async {
        (b.listener_stats().received > received).then_some(())
    })
    .await;
    gate.add_permits(1);
    stop_worker(stop_a, join_a).await;
    stop_worker(stop_b, join_b).await;
}

#[tokio::test]
async fn a_listener_cut_off_for_a_minute_is_back_within_one_health_interval_of_the_heal() {
    // The listener's network drops every byte, both ways, for 60 s (new connections get no
    // answer either); the pool stays reachable. Connecting and LISTENing must be bounded, or the
    // first attempt into the dead network hangs long after the network is back.
    const OUTAGE: Duration = Duration::from_secs(60);
    let health = Duration::from_secs(2);
    let db = TestDb::setup().await;
    let proxy = proxy_to_server(&db).await;
    let runtime = Runtime::new(&db.pool)
        .listener_connect_options(db.options.clone().host("127.0.0.1").port(proxy.port));
    let queue = "blackholed";
    let s = storage_on(&runtime, queue, slow_poll().listener_health_check(health));
    s.create_queue().await.expect("create");
    let log: Log = Arc::default();
    let (stop, join) = worker!("blackholed", s, log);
    let lost_arming = armed_on(&db.pool, queue).await;
    let reconnects = s.listener_stats().reconnects;
    let attempts = proxy.accepted();
    proxy.blackhole();
    let cut = Instant::now();
    // Pushes during the outage: their notifications are lost.
    for id in 1..=3 {
        s.push_with(&db.pool, &Job { id }).await.expect("push");
    }
    // The outage lasts a minute (its length, not a wait for something to happen); meanwhile
    // the listener gives up on the dead connection and keeps trying new ones.
    tokio::time::sleep_until((cut + OUTAGE).into()).await;
    assert!(
        proxy.accepted() >= attempts + 3,
        "abandoned attempts are retried: {} new connections in {OUTAGE:?}",
        proxy.accepted() - attempts
    );
    proxy.heal();
    let healed = Instant::now();
    // Back within the health interval plus the backoff (at most 10 s after many failures).
    wait_for(
        health + Duration::from_secs(15),
        "the listener to reconnect",
        || async { (s.listener_stats().reconnects > reconnects).then_some(()) },
    )
    .await;
    println!("listener back {:?} after the heal", healed.elapsed());
    // The reconnect makes the worker read: the jobs pushed during the outage are handled.
    for id in 1..=3 {
        wait_handled(&log, id, QUICK).await;
    }
    // And pushes are picked up by notification again, in milliseconds.
    let received = s.listener_stats().received;
    let mut arming = lost_arming;
    let mut fastest = Duration::MAX;
    for id in 4..10 {
        // On a loaded machine the listener's 2 s health check may fail again right after the
        // heal, and each reconnect waits out its backoff (up to 10 s) before the worker arms.
        arming = armed_after_within(&db.pool, queue, arming, WAIT * 3).await;
        let pushed = Instant::now();
        s.push_with(&db.pool, &Job { id }).await.expect("push");
        wait_handled(&log, id, QUICK).await;
        fastest = fastest.min(pushed.elapsed());
        if s.listener_stats().received > received {
            break;
        }
    }
    assert!(
        s.listener_stats().received > received,
        "the new connection delivers"
    );
    println!("pickup after the heal: {fastest:?}");
    assert!(fastest < Duration::from_secs(1), "{fastest:?}");
    stop_worker(stop, join).await;
}
