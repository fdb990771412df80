//! The claim floor (src/backend/floor.rs): claims in visibility order read the `vt` index from
//! a lower bound learned from earlier claims. It must never pass a row that can still become
//! visible below it (a producer's transaction still open), it is in effect (a row written by
//! hand below it waits for the sweep), the sweep finds such a row, and under a held snapshot it
//! is what keeps a claim from stepping over every dead entry since the snapshot began.

mod common;

use std::time::Duration;

use apalis::prelude::*;
use apalis_pgmq_notify::{Config, PgmqStorage, QueueName, testing};
use chrono::{DateTime, Utc};
use common::{TestDb, count, stop_worker, wait_for};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{Connection, Executor};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    n: u32,
}

const DAY: Duration = Duration::from_secs(86_400);
const WAIT: Duration = Duration::from_secs(60);

fn storage(db: &TestDb, queue: &str, config: Config) -> PgmqStorage<Job> {
    PgmqStorage::with_config(&db.runtime(), QueueName::new(queue).expect("name"), config)
        .expect("config")
}

async fn handled(db: &TestDb, queue: &str, n: u32) -> bool {
    count(
        &db.pool,
        &format!("SELECT count(*) FROM pgmq.a_{queue} WHERE (message->>'n')::int = {n}"),
    )
    .await
        > 0
}

async fn wait_handled(db: &TestDb, queue: &str, n: u32) {
    wait_for(WAIT, &format!("job {n} to be handled"), || async {
        handled(db, queue, n).await.then_some(())
    })
    .await;
}

async fn db_now(db: &TestDb) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&db.pool)
        .await
        .expect("clock")
}

/// Pushes jobs one at a time, each waited for, until the worker's floor is above `t`; the
/// numbers used start at `*next`. Transactions of other tests (the ids are the cluster's) can
/// delay it, so this waits on the condition, not a count.
async fn floor_above(
    db: &TestDb,
    s: &mut PgmqStorage<Job>,
    queue: &str,
    t: DateTime<Utc>,
    next: &mut u32,
) -> DateTime<Utc> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(f) = testing::claim_floor(s).filter(|f| *f > t) {
            return f;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the floor did not pass {t} in {WAIT:?}: {:?}",
            testing::claim_floor(s)
        );
        s.push(Job { n: *next }).await.expect("push");
        wait_handled(db, queue, *next).await;
        *next += 1;
    }
}

/// A row written by hand with a `vt` an hour before `t`.
async fn below(db: &TestDb, queue: &str, n: u32, t: DateTime<Utc>) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO pgmq.q_{queue} (vt, message) VALUES ($1 - interval '1 hour', jsonb_build_object('n', $2::int))"
    )))
    .bind(t)
    .bind(i32::try_from(n).expect("n"))
    .execute(&db.pool)
    .await
    .expect("insert below the floor");
}

/// A worker on `$s` whose handler does nothing: `(stop, join)` as `spawn_worker!`.
macro_rules! worker {
    ($s:expr, $queue:expr) => {{
        let w = WorkerBuilder::new($queue)
            .backend($s.clone())
            .build(|_job: Job| async { Ok::<(), BoxDynError>(()) });
        spawn_worker!(w)
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_floor_never_passes_an_open_producers_row_and_is_in_effect() {
    let db = TestDb::setup().await;
    let queue = "floor_open";
    // No sweep during the test: a row below the floor is then never claimed.
    let mut s = storage(&db, queue, Config::default().claim_floor_sweep(Some(DAY)));
    s.create_queue().await.expect("create");
    let (stop, join) = worker!(s, queue);
    let mut next = 1;
    let t0 = db_now(&db).await;
    floor_above(&db, &mut s, queue, t0, &mut next).await;

    // A producer's transaction inserts and stays open.
    let mut producer = db.pool.begin().await.expect("begin");
    let early = s
        .push_with(&mut *producer, &Job { n: 1000 })
        .await
        .expect("push in the transaction");
    let early_vt: DateTime<Utc> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT vt FROM pgmq.q_{queue} WHERE msg_id = $1"
    )))
    .bind(early)
    .fetch_one(&mut *producer)
    .await
    .expect("its vt");
    // A committed row below the floor, written by hand.
    below(&db, queue, 2000, t0).await;
    // The worker goes on claiming while the producer's row is invisible to it, until well past
    // the row's time (more than the floor's 1 s margin): without the producer's transaction
    // holding it back, the floor would pass the row.
    let until = early_vt + chrono::TimeDelta::seconds(3);
    let mut rounds = 0;
    while db_now(&db).await < until || rounds < 20 {
        s.push(Job { n: next }).await.expect("push");
        wait_handled(&db, queue, next).await;
        next += 1;
        rounds += 1;
    }
    let floor = testing::claim_floor(&s).expect("a floor");
    assert!(
        floor <= early_vt,
        "the floor {floor} passed the open producer's row ({early_vt})"
    );
    assert!(floor > t0, "the floor went back: {floor} <= {t0}");
    assert!(
        !handled(&db, queue, 2000).await,
        "the row below the floor was claimed before newer ones: the floor is not in effect"
    );

    producer.commit().await.expect("commit");
    s.push(Job { n: 3000 }).await.expect("push");
    wait_handled(&db, queue, 3000).await;
    wait_handled(&db, queue, 1000).await;
    // Once the producer has ended and its row was taken, the floor passes it.
    floor_above(&db, &mut s, queue, early_vt, &mut next).await;
    assert!(
        !handled(&db, queue, 2000).await,
        "no sweep ran, so the row below the floor is still there"
    );
    assert_eq!(testing::claim_floor_sweeps(&s), (0, 0), "no sweep ran");
    stop_worker(stop, join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_finds_a_row_written_below_the_floor() {
    let db = TestDb::setup().await;
    let queue = "floor_sweep";
    let config = Config::default()
        .claim_floor_sweep(Some(Duration::from_secs(1)))
        .poll_interval(Duration::from_secs(1));
    let mut s = storage(&db, queue, config);
    s.create_queue().await.expect("create");
    let (stop, join) = worker!(s, queue);
    let mut next = 1;
    let t0 = db_now(&db).await;
    let floor = floor_above(&db, &mut s, queue, t0, &mut next).await;
    let sweeps = testing::claim_floor_sweeps(&s);
    below(&db, queue, 2000, t0).await;
    // Another job, so a claim runs now: bounded by the floor, it takes that one only.
    s.push(Job { n: next }).await.expect("push");
    wait_handled(&db, queue, next).await;
    wait_handled(&db, queue, 2000).await;
    assert!(
        testing::claim_floor_sweeps(&s).1 > sweeps.1,
        "found by a sweep (the floor was {floor}, the row an hour before {t0})"
    );
    stop_worker(stop, join).await;
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of the worker's claim with `floor`, on an empty queue, rolled
/// back: the buffers it touched.
async fn claim_buffers(db: &TestDb, queue: &str, floor: Option<DateTime<Utc>>) -> i64 {
    let q = apalis_pgmq_notify::PgmqQueue::new(QueueName::new(queue).expect("name"));
    let sql = testing::lease_statements(&q)
        .into_iter()
        .find(|(name, _)| *name == "claim")
        .map(|(_, sql)| sql)
        .expect("the claim");
    let mut conn = db.pool.acquire().await.expect("conn");
    conn.execute("BEGIN").await.expect("begin");
    conn.execute(sqlx::AssertSqlSafe(format!("PREPARE floor_check AS {sql}")))
        .await
        .expect("prepare");
    let arg = floor.map_or("NULL".to_owned(), |f| format!("'{}'", f.to_rfc3339()));
    let plan: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE floor_check(100, 30, {arg})"
    )))
    .fetch_one(&mut *conn)
    .await
    .expect("explain");
    conn.execute("ROLLBACK").await.expect("rollback");
    let root = &plan[0]["Plan"];
    root["Shared Hit Blocks"].as_i64().unwrap_or(0)
        + root["Shared Read Blocks"].as_i64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_held_snapshot_a_floored_claim_skips_the_dead_entries() {
    let db = TestDb::setup().await;
    let queue = "floor_held";
    let mut s = storage(&db, queue, Config::default().claim_floor_sweep(Some(DAY)));
    s.create_queue().await.expect("create");
    // Another session holds a snapshot: nothing the worker leaves behind can be removed.
    let mut holder = sqlx::PgConnection::connect_with(&db.options)
        .await
        .expect("connect");
    holder
        .execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pg_class")
        .await
        .expect("hold a snapshot");
    let (stop, join) = worker!(s, queue);
    const JOBS: u32 = 20_000;
    for chunk in 0..JOBS / 1000 {
        s.push_bulk(
            (chunk * 1000..(chunk + 1) * 1000)
                .map(|n| Job { n })
                .collect(),
        )
        .await
        .expect("push");
    }
    // 20 000 jobs on a loaded two-core machine, beside the other tests of this file.
    wait_for(WAIT * 3, "every job handled", || async {
        (count(&db.pool, &format!("SELECT count(*) FROM pgmq.a_{queue}")).await == i64::from(JOBS))
            .then_some(())
    })
    .await;
    let mut next = JOBS;
    let t0 = db_now(&db).await;
    let floor = floor_above(&db, &mut s, queue, t0, &mut next).await;
    stop_worker(stop, join).await;
    let dead = count(
        &db.pool,
        &format!("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'q_{queue}'"),
    )
    .await;
    let floored = claim_buffers(&db, queue, Some(floor)).await;
    let whole = claim_buffers(&db, queue, None).await;
    eprintln!("{dead} dead tuples; claim from the floor {floored} buffers, from the start {whole}");
    assert!(
        floored * 5 < whole,
        "a claim from the floor touched {floored} buffers, one from the start {whole}"
    );
    holder
        .execute("ROLLBACK")
        .await
        .expect("release the snapshot");
}
