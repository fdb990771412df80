//! Every database step of a worker has a deadline: a network that loses requests (a proxy that
//! keeps TCP up and forwards nothing, as a hung pooler, a stopped backend or a dropping
//! middlebox does) delays a worker, never stops it for good, never costs the pool a slot, and
//! never keeps a shutdown waiting.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_pgmq_notify::{Config, PgmqStorage, QueueName, Runtime};
use common::{TestDb, count, proxy::Proxy, stop_worker, wait_for};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, postgres::PgPoolOptions};

/// The lease, and so each statement's deadline (the visibility timeout).
const VT: Duration = Duration::from_secs(2);
/// The fallback poll (the worker does not listen: only the poll finds jobs).
const POLL: Duration = Duration::from_secs(1);
/// The worker's pool, through the proxy.
const POOL: u32 = 3;
/// Room for a loaded machine in the timing bounds.
const SLACK: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u32,
}

type Ran = Arc<Mutex<Vec<(u32, Instant)>>>;

fn ran_at(ran: &Ran, id: u32) -> Option<Instant> {
    ran.lock()
        .expect("lock")
        .iter()
        .find(|(i, _)| *i == id)
        .map(|(_, t)| *t)
}

/// A worker process reaching the database through `proxy`, on its own pool and runtime.
struct Frozen {
    proxy: Proxy,
    pool: PgPool,
    runtime: Runtime,
    storage: PgmqStorage<Job>,
}

async fn through_proxy(db: &TestDb, queue: &str) -> Frozen {
    let proxy = Proxy::to_server(&db.options, Duration::ZERO).await;
    let pool = PgPoolOptions::new()
        .max_connections(POOL)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(db.options.clone().host("127.0.0.1").port(proxy.port))
        .await
        .expect("connect through the proxy");
    let runtime = Runtime::new(&pool);
    let config = Config::default()
        .visibility_timeout(VT)
        .poll_interval(POLL)
        .listen(false);
    let storage: PgmqStorage<Job> =
        PgmqStorage::with_config(&runtime, QueueName::new(queue).expect("name"), config)
            .expect("config");
    storage.create_queue().await.expect("create");
    Frozen {
        proxy,
        pool,
        runtime,
        storage,
    }
}

/// A worker of `storage` that records each job it runs.
macro_rules! worker {
    ($name:expr, $storage:expr, $ran:expr) => {
        WorkerBuilder::new($name)
            .backend($storage)
            .data($ran)
            .concurrency(2)
            .build(|job: Job, ran: Data<Ran>| async move {
                ran.lock().expect("lock").push((job.id, Instant::now()));
                Ok::<(), BoxDynError>(())
            })
    };
}

/// Whether every slot of `pool` can be used at once (a slot lost to a connection that never
/// comes back would leave one acquire waiting).
async fn every_slot_usable(pool: &PgPool) -> bool {
    let all = async {
        let mut conns = Vec::new();
        for _ in 0..POOL {
            conns.push(pool.acquire().await?);
        }
        for c in &mut conns {
            sqlx::query("SELECT 1").execute(&mut **c).await?;
        }
        Ok::<_, sqlx::Error>(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), all).await,
        Ok(Ok(()))
    )
}

#[tokio::test]
async fn a_worker_frozen_mid_claim_claims_again_after_the_thaw_and_keeps_every_pool_slot() {
    let db = TestDb::setup().await;
    let queue = "frozen_claims";
    let f = through_proxy(&db, queue).await;
    let ran: Ran = Arc::default();
    let (stop, join) = spawn_worker!(worker!("frozen-claims", f.storage.clone(), ran.clone()));
    f.storage
        .push_with(&db.pool, &Job { id: 0 })
        .await
        .expect("push");
    wait_for(WAIT, "the worker to run job 0", || async {
        ran_at(&ran, 0).map(|_| ())
    })
    .await;

    // Everything between the worker and the database freezes: no reset, nothing delivered,
    // new connections accepted and never answered.
    let before = f.proxy.swallowed();
    let open = f.pool.size() as usize;
    f.proxy.freeze();
    f.storage
        .push_with(&db.pool, &Job { id: 1 })
        .await
        .expect("push");
    // The worker keeps trying: each try's statement (or connect) is swallowed, passes its
    // deadline and gives its connection up, until every connection open at the freeze was
    // tried and new ones too. Without deadlines the first claim waits for ever.
    wait_for(
        WAIT,
        "the worker to try every connection open at the freeze and a new one",
        || async { (f.proxy.swallowed() > before + open).then_some(()) },
    )
    .await;
    assert!(ran_at(&ran, 1).is_none(), "nothing ran while frozen");

    // New connections flow again (the frozen ones stay silent for ever).
    let thawed = Instant::now();
    f.proxy.thaw();
    let at = wait_for(WAIT, "the worker to run job 1 after the thaw", || async {
        ran_at(&ran, 1)
    })
    .await;
    let took = at.duration_since(thawed);
    // The step in flight at the thaw passes its deadline (the visibility timeout), the worker
    // backs off at most a poll interval, and the next claim runs on a new connection.
    let bound = POLL + VT * 2 + SLACK;
    eprintln!("job 1 ran {took:?} after the thaw (bound {bound:?})");
    assert!(
        took <= bound,
        "job 1 ran {took:?} after the thaw; the bound is {bound:?}"
    );
    let archived = format!("SELECT count(*) FROM pgmq.a_{queue}");
    wait_for(WAIT, "both outcomes written", || async {
        (count(&db.pool, &archived).await == 2).then_some(())
    })
    .await;

    // No slot of the pool was lost to a silent connection (sqlx would ping one for ever
    // before handing it back).
    wait_for(
        Duration::from_secs(20),
        "every slot of the worker's pool usable",
        || async { every_slot_usable(&f.pool).await.then_some(()) },
    )
    .await;

    tokio::time::timeout(Duration::from_secs(15), stop_worker(stop, join))
        .await
        .expect("the worker stops");
    tokio::time::timeout(
        Duration::from_secs(15),
        f.runtime.shutdown_within(Duration::from_secs(5)),
    )
    .await
    .expect("the runtime's shutdown ends")
    .expect("shutdown");
}

#[tokio::test]
async fn a_worker_frozen_mid_step_stops_within_its_grace() {
    let db = TestDb::setup().await;
    let queue = "frozen_stop";
    let f = through_proxy(&db, queue).await;
    let ran: Ran = Arc::default();
    let (stop, join) = spawn_worker!(worker!("frozen-stop", f.storage.clone(), ran.clone()));
    f.storage
        .push_with(&db.pool, &Job { id: 0 })
        .await
        .expect("push");
    wait_for(WAIT, "the worker to run job 0", || async {
        ran_at(&ran, 0).map(|_| ())
    })
    .await;
    let archived = format!("SELECT count(*) FROM pgmq.a_{queue}");
    wait_for(WAIT, "job 0's outcome written", || async {
        (count(&db.pool, &archived).await == 1).then_some(())
    })
    .await;

    let before = f.proxy.swallowed();
    f.proxy.freeze();
    wait_for(
        WAIT,
        "the worker to wait on a frozen connection",
        || async { (f.proxy.swallowed() > before).then_some(()) },
    )
    .await;

    // Stopped while a step waits on the frozen connection: the worker's shutdown is bounded
    // by its grace (10 s for releasing and writing outcomes, 2 s for its rows), whatever the
    // network does.
    let asked = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), stop_worker(stop, join))
        .await
        .expect("the frozen worker stops");
    let took = asked.elapsed();
    eprintln!("the frozen worker stopped in {took:?}");
    assert!(
        took <= Duration::from_secs(12),
        "the frozen worker took {took:?} to stop"
    );
    let asked = Instant::now();
    let shut = tokio::time::timeout(
        Duration::from_secs(20),
        f.runtime.shutdown_within(Duration::from_secs(5)),
    )
    .await
    .expect("the frozen runtime's shutdown ends");
    // The runtime's rows cannot be deleted through a frozen network: shutdown says so (they
    // expire by themselves), in time.
    assert!(
        matches!(shut, Ok(()) | Err(apalis_pgmq_notify::Error::Stopped(_))),
        "{shut:?}"
    );
    assert!(
        asked.elapsed() <= Duration::from_secs(15),
        "the frozen runtime took {:?} to shut down",
        asked.elapsed()
    );
}
