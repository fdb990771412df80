//! The runtime owns the process's background work: when `shutdown` returns, every outcome is
//! written, every held lease released (the messages visible again), the runtime's registry
//! and listener rows are gone, and no connection of it is left but idle ones in the pool.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use apalis::prelude::*;
use apalis_pgmq_notify::{Config, Error, PgmqStorage, QueueEvents, QueueName, Runtime};
use common::{TestDb, count, wait_for};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio::sync::Semaphore;

const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u32,
}

/// Handlers that start, then wait until the test lets them finish.
#[derive(Clone)]
struct Gate {
    started: Arc<AtomicUsize>,
    go: Arc<Semaphore>,
}

impl Gate {
    fn new() -> Self {
        Self {
            started: Arc::default(),
            go: Arc::new(Semaphore::new(0)),
        }
    }

    fn open(&self) {
        self.go.add_permits(10_000);
    }
}

async fn gated(_job: Job, gate: Data<Gate>) -> Result<(), BoxDynError> {
    gate.started.fetch_add(1, Ordering::SeqCst);
    let _permit = gate.go.acquire().await?;
    Ok(())
}

/// A pool whose sessions are recognisable in `pg_stat_activity`.
async fn named_pool(db: &TestDb, app: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(10)
        .connect_with(db.options.clone().application_name(app))
        .await
        .expect("connect")
}

async fn sessions(db: &TestDb, app: &str, state: Option<&str>) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
         AND ($2::text IS NULL OR state IS DISTINCT FROM $2)",
    )
    .bind(app)
    .bind(state)
    .fetch_one(&db.pool)
    .await
    .expect("pg_stat_activity")
}

/// Everything a stopped runtime must have left behind: `done` jobs archived, the others
/// visible again in the queue, no rows of its own, only idle pooled connections (none once the
/// pool is closed).
async fn nothing_left(db: &TestDb, pool: &PgPool, app: &str, queue: &str, done: i64, total: i64) {
    assert_eq!(
        count(&db.pool, &format!("SELECT count(*) FROM pgmq.a_{queue}")).await,
        done,
        "every job that ran has its outcome written"
    );
    assert_eq!(
        count(&db.pool, &format!("SELECT count(*) FROM pgmq.q_{queue}")).await,
        total - done
    );
    assert_eq!(
        count(
            &db.pool,
            &format!("SELECT count(*) FROM pgmq.q_{queue} WHERE vt > clock_timestamp()")
        )
        .await,
        0,
        "no lease is held: every message the worker had claimed is visible again"
    );
    assert_eq!(
        count(
            &db.pool,
            &format!("SELECT count(*) FROM pgmq.q_{queue} WHERE read_ct > 0")
        )
        .await,
        0,
        "a message released unstarted has its read given back"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM apalis_pgmq.workers").await,
        0
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM apalis_pgmq.listeners").await,
        0
    );
    assert_eq!(
        sessions(db, app, Some("idle")).await,
        0,
        "no session of the runtime is busy"
    );
    assert_eq!(
        sessions(db, app, None).await,
        i64::from(pool.size()),
        "no session outside the pool (the listener's is closed)"
    );
    assert_eq!(
        pool.num_idle(),
        pool.size() as usize,
        "every connection is back in the pool"
    );
    pool.close().await;
    wait_for(WAIT, "the pool's sessions to end", || async {
        (sessions(db, app, None).await == 0).then_some(())
    })
    .await;
}

async fn storage(runtime: &Runtime, queue: &str) -> PgmqStorage<Job> {
    let s = PgmqStorage::with_config(
        runtime,
        QueueName::new(queue).expect("name"),
        Config::default()
            .fetch_batch_size(20)
            .adaptive_claims(false)
            .poll_interval(Duration::from_secs(60)),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    s
}

#[tokio::test]
async fn shutdown_stops_workers_writes_outcomes_releases_leases_and_leaves_nothing() {
    let db = TestDb::setup().await;
    let app = format!("rt-{}", &db.name[9..]);
    let pool = named_pool(&db, &app).await;
    let runtime = Runtime::new(&pool);
    let queue = "rt_jobs";
    let mut s = storage(&runtime, queue).await;
    s.push_bulk((0..40).map(|id| Job { id }).collect())
        .await
        .expect("push");
    // Someone waiting for a result that never comes, and an event subscriber.
    let unwaited = storage(&runtime, "rt_nobody").await;
    let waiter = tokio::spawn(async move {
        unwaited
            .push_and_wait::<()>(
                apalis_core::task::builder::TaskBuilder::new(Job { id: 0 }).build(),
                WAIT,
            )
            .await
    });
    let mut events = QueueEvents::new(&runtime)
        .queue(&QueueName::new(queue).expect("name"))
        .subscribe()
        .await
        .expect("subscribe");
    let gate = Gate::new();
    let monitor = Monitor::new().register({
        let (s, gate) = (s.clone(), gate.clone());
        move |_| {
            WorkerBuilder::new("rt-worker")
                .backend(s.clone())
                .data(gate.clone())
                .concurrency(4)
                .build(gated)
        }
    });
    let running = tokio::spawn(monitor.run());
    // Four jobs run (and wait), sixteen more are claimed and held.
    wait_for(WAIT, "four handlers to start", || async {
        (gate.started.load(Ordering::SeqCst) == 4).then_some(())
    })
    .await;
    wait_for(WAIT, "the worker to hold claimed messages", || async {
        (count(
            &db.pool,
            &format!("SELECT count(*) FROM pgmq.q_{queue} WHERE read_ct > 0"),
        )
        .await
            > 4)
        .then_some(())
    })
    .await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM apalis_pgmq.workers").await,
        1
    );
    // Shutdown waits for the running jobs; the monitor ends because the workers' streams do.
    let shutting = tokio::spawn({
        let runtime = runtime.clone();
        async move { runtime.shutdown().await }
    });
    wait_for(WAIT, "shutdown to begin", || async {
        runtime.is_shut_down().then_some(())
    })
    .await;
    assert!(!shutting.is_finished(), "shutdown waits for running jobs");
    gate.open();
    tokio::time::timeout(WAIT, shutting)
        .await
        .expect("shutdown returns")
        .expect("join")
        .expect("shutdown");
    tokio::time::timeout(WAIT, running)
        .await
        .expect("the monitor stops with its workers")
        .expect("join")
        .expect("monitor");
    assert_eq!(
        gate.started.load(Ordering::SeqCst),
        4,
        "nothing new started"
    );
    match tokio::time::timeout(WAIT, waiter).await {
        Ok(Ok(Err(Error::Stopped(_)))) => {}
        other => panic!("a waiter ends with the runtime: {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, events.next())
            .await
            .expect("the event stream ends")
            .is_none()
    );
    // A worker started afterwards refuses to run; shutdown again is a no-op.
    let late = WorkerBuilder::new("late").backend(s.clone()).build(gated);
    let err = tokio::time::timeout(WAIT, late.run())
        .await
        .expect("stops at once")
        .expect_err("the runtime is shut down");
    assert!(err.to_string().contains("shut down"), "{err}");
    runtime.shutdown().await.expect("idempotent");
    nothing_left(&db, &pool, &app, queue, 4, 40).await;
}

#[tokio::test]
async fn the_monitors_graceful_shutdown_then_the_runtimes() {
    let db = TestDb::setup().await;
    let app = format!("rtm-{}", &db.name[9..]);
    let pool = named_pool(&db, &app).await;
    let runtime = Runtime::new(&pool);
    let queue = "rt_monitor";
    let mut s = storage(&runtime, queue).await;
    s.push_bulk((0..30).map(|id| Job { id }).collect())
        .await
        .expect("push");
    let gate = Gate::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let monitor = Monitor::new().register({
        let (s, gate) = (s.clone(), gate.clone());
        move |_| {
            WorkerBuilder::new("rtm-worker")
                .backend(s.clone())
                .data(gate.clone())
                .concurrency(3)
                .build(gated)
        }
    });
    let running = tokio::spawn(monitor.run_with_signal(async move {
        let _ = stopped.await;
        Ok(())
    }));
    wait_for(WAIT, "three handlers to start", || async {
        (gate.started.load(Ordering::SeqCst) == 3).then_some(())
    })
    .await;
    let _ = stop.send(());
    gate.open();
    tokio::time::timeout(WAIT, running)
        .await
        .expect("the monitor stops")
        .expect("join")
        .expect("monitor");
    // The workers closed on their own (outcomes written, held messages released); the
    // runtime's shutdown stops the rest.
    tokio::time::timeout(WAIT, runtime.shutdown())
        .await
        .expect("shutdown returns")
        .expect("shutdown");
    nothing_left(&db, &pool, &app, queue, 3, 30).await;
}

#[tokio::test]
async fn a_dropped_runtime_aborts_its_tasks() {
    // The last resort: no shutdown, every handle dropped. The listener's task is aborted and
    // its connection closed.
    let db = TestDb::setup().await;
    let app = format!("rtd-{}", &db.name[9..]);
    let pool = named_pool(&db, &app).await;
    let runtime = Runtime::new(&pool);
    let events = QueueEvents::new(&runtime)
        .queue_created()
        .subscribe()
        .await
        .expect("subscribe");
    // The listener's session is there, outside the pool.
    wait_for(WAIT, "the listener's session", || async {
        (sessions(&db, &app, None).await > i64::from(pool.size())).then_some(())
    })
    .await;
    drop(events);
    drop(runtime);
    wait_for(WAIT, "the listener's session to end", || async {
        (sessions(&db, &app, None).await <= i64::from(pool.size())).then_some(())
    })
    .await;
}
