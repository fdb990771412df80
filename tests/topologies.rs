//! Production topologies (issue 22): PgBouncer in front of the server, a read replica.
//!
//! These tests need the servers the project's scripts start, and say so and pass without them:
//! `scripts/test.sh` runs the suite under `scripts/with-pgbouncer.sh` and
//! `scripts/with-replica.sh`, which export `APALIS_PGBOUNCER_*` and `APALIS_REPLICA_URL`. Each
//! test makes its own database and reaches it through PgBouncer under aliases of its own
//! (appended to PgBouncer's included databases file, then RELOAD), one per pool mode.

mod common;

use std::{
    io::Write,
    process::Command,
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use apalis::prelude::*;
use apalis_pgmq_notify::{Config, Error, PgmqStorage, QueueName, Runtime};
use common::{TestDb, count, drained, stop_worker, wait_for};
use serde::{Deserialize, Serialize};
use sqlx::{
    Connection, PgConnection, PgPool, Row,
    postgres::{PgConnectOptions, PgPoolOptions},
};

const WAIT: Duration = Duration::from_secs(60);
/// Far below the workers' 60 s fallback poll: a pickup this quick came from a notification.
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

async fn record(job: Job, log: Data<Log>) -> Result<(), BoxDynError> {
    log.lock().expect("lock").push(job.id);
    if job.id.is_multiple_of(3) {
        return Err("ids divisible by 3 fail".into());
    }
    Ok(())
}

async fn succeed(job: Job, log: Data<Log>) -> Result<(), BoxDynError> {
    log.lock().expect("lock").push(job.id);
    Ok(())
}

fn handled(log: &Log, id: u32) -> bool {
    log.lock().expect("lock").contains(&id)
}

async fn wait_handled(log: &Log, id: u32, within: Duration) {
    wait_for(within, &format!("job {id} to be handled"), || async {
        handled(log, id).then_some(())
    })
    .await;
}

/// Waits until a worker has armed its wake-up on `queue` with an arming newer than `arm_id`
/// (0: any arming). A worker that found a job by its read right after arming keeps that
/// arming, so a loop waits for any arming, not a newer one: an answered arming is disarmed.
async fn armed_after(pool: &PgPool, queue: &str, arm_id: i64) -> i64 {
    let sql = format!(
        "SELECT coalesce(max(arm_id), -1) FROM apalis_pgmq.listeners \
         WHERE channel = 'apq.q.{queue}' AND armed AND NOT persistent AND arm_id > {arm_id}"
    );
    wait_for(WAIT, &format!("a worker of {queue} to arm"), || async {
        let id = count(pool, &sql).await;
        (id >= 0).then_some(id)
    })
    .await
}

/// The PgBouncer of `scripts/with-pgbouncer.sh`.
struct Bouncer {
    /// Any pooled URL: its host, port and user.
    base: PgConnectOptions,
    admin: PgConnectOptions,
    /// The included `[databases]` file.
    databases: String,
    /// `host=.. port=..` of the server.
    server: String,
}

/// Serialises appends to PgBouncer's databases file (the tests of this binary run in threads).
static DATABASES: Mutex<()> = Mutex::new(());

fn bouncer() -> Option<Bouncer> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(url), Some(admin), Some(databases), Some(server)) = (
        var("APALIS_PGBOUNCER_SESSION_URL"),
        var("APALIS_PGBOUNCER_ADMIN_URL"),
        var("APALIS_PGBOUNCER_DATABASES_INI"),
        var("APALIS_PGBOUNCER_SERVER"),
    ) else {
        eprintln!(
            "skipped: no PgBouncer (run under scripts/with-pgbouncer.sh, as scripts/test.sh does)"
        );
        return None;
    };
    Some(Bouncer {
        base: PgConnectOptions::from_str(&url).expect("pooled URL parses"),
        admin: PgConnectOptions::from_str(&admin).expect("admin URL parses"),
        databases,
        server,
    })
}

impl Bouncer {
    /// Connect options reaching `db` through PgBouncer in `mode` (session or transaction),
    /// with `pool_size` server connections for the alias.
    async fn alias(&self, db: &TestDb, mode: &str, pool_size: u32) -> PgConnectOptions {
        let alias = format!("{}_{}", db.name, &mode[..1]);
        {
            let _guard = DATABASES.lock().expect("lock");
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&self.databases)
                .expect("open PgBouncer's databases file");
            writeln!(
                file,
                "{alias} = {} dbname={} pool_mode={mode} pool_size={pool_size}",
                self.server, db.name
            )
            .expect("append a database");
        }
        self.admin_command("RELOAD").await;
        self.base.clone().database(&alias)
    }

    /// Runs a command on PgBouncer's admin console (simple protocol only).
    async fn admin_command(&self, sql: &str) -> Vec<sqlx::postgres::PgRow> {
        let mut admin = PgConnection::connect_with(&self.admin)
            .await
            .expect("connect to PgBouncer's admin console");
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_all(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = admin.close().await;
        rows
    }
}

async fn pool_on(options: PgConnectOptions, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .expect("connect through PgBouncer")
}

#[tokio::test]
async fn through_a_session_pooler_producers_workers_outcomes_and_wakeups_work() {
    let Some(b) = bouncer() else { return };
    let db = TestDb::fresh().await;
    // Room for the pool (6), the listener, and setup's two short-lived connections.
    let pool = pool_on(b.alias(&db, "session", 10).await, 6).await;
    apalis_pgmq_notify::setup(&pool)
        .await
        .expect("setup through a session pooler");
    let runtime = Runtime::new(&pool);
    let queue = "pooled";
    let mut s = storage_on(&runtime, queue, slow_poll().max_attempts(1));
    s.create_queue().await.expect("create");
    s.push(Job { id: 1 }).await.expect("push");
    s.push_bulk((2..=9).map(|id| Job { id }).collect())
        .await
        .expect("push_bulk");
    let mut tx = pool.begin().await.expect("begin");
    s.push_with(&mut *tx, &Job { id: 10 })
        .await
        .expect("push_with");
    tx.commit().await.expect("commit");
    let mut tx = pool.begin().await.expect("begin");
    s.push_with(&mut *tx, &Job { id: 11 })
        .await
        .expect("push_with");
    tx.rollback().await.expect("rollback");

    let log: Log = Arc::default();
    let worker = WorkerBuilder::new("pooled")
        .backend(s.clone())
        .data(log.clone())
        .concurrency(4)
        .build(record);
    let (stop, join) = spawn_worker!(worker);
    drained(&db.pool, queue).await;
    // Every job ran once; the failures (no attempts left) are dead letters, the rest archived.
    let archived = || count(&db.pool, "SELECT count(*) FROM pgmq.a_pooled");
    let dead = || count(&db.pool, "SELECT count(*) FROM pgmq.q_pooled_dlq");
    wait_for(WAIT, "every outcome written", || async {
        (archived().await == 7 && dead().await == 3).then_some(())
    })
    .await;
    let mut ran = log.lock().expect("lock").clone();
    ran.sort_unstable();
    assert_eq!(
        ran,
        (1..=10).collect::<Vec<_>>(),
        "the rolled-back push never ran"
    );

    // The listener LISTENs through the pooler (a session of its own there): a job another
    // client sends while the worker waits (no in-process wake-up) is picked up long before
    // the 60 s fallback poll, by the notification.
    let arm = armed_after(&db.pool, queue, 0).await;
    sqlx::raw_sql("SELECT pgmq.send('pooled', '{\"id\": 13}'::jsonb)")
        .execute(&db.pool)
        .await
        .expect("send");
    wait_handled(&log, 13, QUICK).await;
    assert!(arm > 0);
    assert!(
        runtime.listener_stats().received > 0,
        "{:?}",
        runtime.listener_stats()
    );
    stop_worker(stop, join).await;
    runtime.shutdown().await.expect("shutdown");
    pool.close().await;
}

#[tokio::test]
async fn the_listener_can_have_a_direct_connection_beside_a_pooled_pool() {
    let Some(b) = bouncer() else { return };
    let db = TestDb::setup().await;
    let pool = pool_on(b.alias(&db, "session", 8).await, 4).await;
    // The README's example: the pool through PgBouncer, the listener straight to PostgreSQL.
    let direct = db.options.clone().application_name("apq-direct-listener");
    let runtime = Runtime::new(&pool).listener_connect_options(direct);
    let queue = "beside";
    let s = storage_on(&runtime, queue, slow_poll());
    s.create_queue().await.expect("create");
    let log: Log = Arc::default();
    let worker = WorkerBuilder::new("beside")
        .backend(s.clone())
        .data(log.clone())
        .build(succeed);
    let (stop, join) = spawn_worker!(worker);
    // Pushed from another runtime (as another process would: no in-process wake-up), so each
    // pickup is the listener's doing.
    let producer = storage_on(&Runtime::new(&pool), queue, slow_poll());
    for id in 1..=3 {
        armed_after(&db.pool, queue, 0).await;
        producer.push_with(&pool, &Job { id }).await.expect("push");
        wait_handled(&log, id, QUICK).await;
    }
    // The LISTEN session is the direct one: PostgreSQL sees it, PgBouncer has no such client.
    let direct_sessions = count(
        &db.pool,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'apq-direct-listener'",
    )
    .await;
    assert_eq!(direct_sessions, 1, "one direct listener session");
    let clients = b.admin_command("SHOW CLIENTS").await;
    let through_bouncer = clients
        .iter()
        .filter(|r| {
            r.try_get::<String, _>("application_name").ok().as_deref()
                == Some("apq-direct-listener")
        })
        .count();
    assert_eq!(
        through_bouncer, 0,
        "the listener did not go through PgBouncer"
    );
    stop_worker(stop, join).await;
    runtime.shutdown().await.expect("shutdown");
    pool.close().await;
}

fn is_transaction_pooler(e: &Error) -> bool {
    matches!(e, Error::TransactionPooler { .. }) && e.to_string().contains("pool_mode = session")
}

#[tokio::test]
async fn a_transaction_pooler_is_refused_at_start_saying_what_to_change() {
    let Some(b) = bouncer() else { return };
    let db = TestDb::setup().await;
    let tx_options = b.alias(&db, "transaction", 2).await;
    let session_options = b.alias(&db, "session", 4).await;

    // The check itself: direct and session mode pass, transaction mode does not.
    apalis_pgmq_notify::check_session_pooling(&db.options)
        .await
        .expect("a direct connection passes");
    apalis_pgmq_notify::check_session_pooling(&session_options)
        .await
        .expect("a session pooler passes");
    let e = apalis_pgmq_notify::check_session_pooling(&tx_options)
        .await
        .expect_err("a transaction pooler is refused");
    assert!(is_transaction_pooler(&e), "{e}");

    // setup() refuses it before taking its session lock.
    let tx_pool = pool_on(tx_options.clone(), 2).await;
    let e = apalis_pgmq_notify::setup(&tx_pool)
        .await
        .expect_err("setup refuses a transaction pooler");
    assert!(is_transaction_pooler(&e), "{e}");

    // A worker whose pool, or whose listener, goes through it stops at start with the error.
    let queue = "refused";
    storage_on(&db.runtime(), queue, slow_poll())
        .create_queue()
        .await
        .expect("create");
    for (runtime, what) in [
        (Runtime::new(&tx_pool), "the pool's connection"),
        (
            Runtime::new(&db.pool).listener_connect_options(tx_options.clone()),
            "the listener's connection",
        ),
    ] {
        let worker = WorkerBuilder::new("refused")
            .backend(storage_on(&runtime, queue, slow_poll()))
            .data(Log::default())
            .build(record);
        let err = tokio::time::timeout(WAIT, worker.run())
            .await
            .expect("the worker stops at start")
            .expect_err("the worker refuses a transaction pooler");
        let text = err.to_string();
        assert!(
            text.contains(what) && text.contains("pool_mode = session"),
            "{text}"
        );
        // The runtime's rows are deleted through the same pool: through the transaction
        // pooler this can fail (another client's prepared statement), which is the point.
        let _ = runtime.shutdown().await;
    }
    tx_pool.close().await;

    // The CLI too, and it works through session mode.
    let url = |o: &PgConnectOptions| {
        format!(
            "postgres://{}@{}:{}/{}?sslmode=disable",
            o.get_username(),
            o.get_host(),
            o.get_port(),
            o.get_database().expect("database")
        )
    };
    let out = cli(&["queues"], &url(&tx_options));
    assert_eq!(out.0, Some(1), "{out:?}");
    assert!(out.2.contains("pool_mode = session"), "{out:?}");
    let out = cli(&["queues"], &url(&session_options));
    assert_eq!(out.0, Some(0), "{out:?}");
    assert!(out.1.contains("refused"), "{out:?}");
}

/// Runs the CLI: (exit code, stdout, stderr).
fn cli(args: &[&str], database_url: &str) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_apalis-pgmq-notify"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .output()
        .expect("run the CLI");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The insert trigger's per-session cache ("this session already notified for arming N",
/// "nothing to do at listeners version V", in session settings) is a fact about the server
/// session's own committed transactions, whichever client sent them: sharing a server session
/// between clients (a transaction pooler, or a session pooler handing a session to the next
/// client after DISCARD ALL, which clears it) must never cost a wake-up. Here every push
/// comes from a new client on a pool of one server session, in both modes, and an idle
/// worker with a 60 s fallback poll must wake for each.
#[tokio::test]
async fn the_nobody_waits_cache_stays_correct_when_clients_share_server_sessions() {
    let Some(b) = bouncer() else { return };
    let db = TestDb::setup().await;
    let queue = "shared_sessions";
    let s = storage_on(&db.runtime(), queue, slow_poll());
    s.create_queue().await.expect("create");
    let modes = [
        b.alias(&db, "transaction", 1).await,
        b.alias(&db, "session", 1).await,
    ];
    let log: Log = Arc::default();
    let worker = WorkerBuilder::new("shared")
        .backend(s.clone())
        .data(log.clone())
        .build(succeed);
    let (stop, join) = spawn_worker!(worker);
    let mut server_sessions = std::collections::HashSet::new();
    for id in 1..=12u32 {
        armed_after(&db.pool, queue, 0).await;
        // As a client in any language would: simple protocol, one statement.
        let mut client = PgConnection::connect_with(&modes[(id % 2) as usize])
            .await
            .expect("connect through PgBouncer");
        let row = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SELECT pgmq.send('{queue}', '{{\"id\": {id}}}'::jsonb), pg_backend_pid()"
        )))
        .fetch_one(&mut client)
        .await
        .expect("send");
        server_sessions.insert((id % 2, row.try_get::<i32, _>(1).expect("pid")));
        client.close().await.expect("close");
        wait_handled(&log, id, QUICK).await;
    }
    assert_eq!(
        server_sessions.len(),
        2,
        "one server session per mode, shared by six clients each: {server_sessions:?}"
    );
    stop_worker(stop, join).await;
}

/// The replica of `scripts/with-replica.sh`, on `db`'s database once it has replayed
/// everything the primary had written when `ready` (a query returning one bigint) gave `want`
/// there.
/// How long a test waits for the replica to replay up to the primary's position.
const REPLAY_WAIT: Duration = Duration::from_secs(300);

async fn replica_of(db: &TestDb, ready: &str, want: i64) -> Option<(PgPool, String)> {
    let Some(url) = std::env::var("APALIS_REPLICA_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!(
            "skipped: no replica (run under scripts/with-replica.sh, as scripts/test.sh does)"
        );
        return None;
    };
    let on_primary: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(ready.to_owned()))
        .fetch_one(&db.pool)
        .await
        .expect("the ready query on the primary");
    assert_eq!(on_primary, want, "the primary itself is not ready: {ready}");
    // The insert position, not pg_current_wal_lsn() (the write position): the test server runs
    // with synchronous_commit = off, so the commit record of what was just written may still
    // be in the WAL buffers, behind the write position; waiting for that once let the replica
    // answer 0 rows after "replaying" up to it.
    let target: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(&db.pool)
        .await
        .expect("the primary's WAL position");
    // The replica replays everything the suite wrote before (the plan tests alone write some
    // 600 000 rows): on a loaded two-core machine it was seen minutes behind. Wait on its
    // replay position, from the database the URL names (the test's own database does not
    // exist there until replayed), and say where it stands if it never gets there.
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(PgConnectOptions::from_str(&url).expect("replica URL parses"))
        .await
        .expect("connect to the replica");
    let deadline = std::time::Instant::now() + REPLAY_WAIT;
    loop {
        let (done, state): (bool, String) = sqlx::query_as(
            "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, false), \
                    format('replayed %s, received %s, receiver %s, replay paused %s', \
                           pg_last_wal_replay_lsn(), pg_last_wal_receive_lsn(), \
                           coalesce((SELECT status FROM pg_stat_wal_receiver), 'not running'), \
                           pg_is_wal_replay_paused())",
        )
        .bind(&target)
        .fetch_one(&admin)
        .await
        .expect("the replica's replay position");
        if done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replica did not replay up to {target} in {REPLAY_WAIT:?}: {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin.close().await;
    let options = PgConnectOptions::from_str(&url)
        .expect("replica URL parses")
        .database(&db.name);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.clone())
        .await
        .expect("connect to the replicated database");
    let replicated: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(ready.to_owned()))
        .fetch_one(&pool)
        .await
        .expect("the ready query on the replica");
    assert_eq!(
        replicated, want,
        "replayed, yet the replica answers otherwise: {ready}"
    );
    let cli_url = format!(
        "postgres://{}@{}:{}/{}?sslmode=disable",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        db.name
    );
    Some((pool, cli_url))
}

#[tokio::test]
async fn a_replica_serves_reads_and_refuses_writes_saying_it_is_a_replica() {
    use apalis_core::backend::{Filter, ListQueues, ListTasks, ListWorkers, Metrics};

    let db = TestDb::setup().await;
    let queue = "replicated";
    let mut s = storage_on(&db.runtime(), queue, slow_poll());
    s.create_queue().await.expect("create");
    s.push_bulk((1..=3).map(|id| Job { id }).collect())
        .await
        .expect("push");
    let Some((replica, url)) = replica_of(&db, "SELECT count(*) FROM pgmq.q_replicated", 3).await
    else {
        return;
    };
    let name = QueueName::new(queue).expect("name");

    // Reads: the overview, the gauges, the board's API (apalis' introspection traits).
    let overview = apalis_pgmq_notify::queues_overview(&replica)
        .await
        .expect("overview on the replica");
    assert_eq!(overview.len(), 1);
    assert_eq!(overview[0].visible, Some(3));
    let gauges = apalis_pgmq_notify::sample_queue_gauges(&replica)
        .await
        .expect("gauges on the replica");
    assert_eq!(gauges.len(), 1);
    assert_eq!((gauges[0].0.as_str(), gauges[0].1.pending), (queue, 3));
    let board = storage_on(&Runtime::new(&replica), queue, slow_poll());
    let queues = board
        .list_queues()
        .await
        .expect("list_queues on the replica");
    assert_eq!(queues.len(), 1);
    let tasks = board
        .list_tasks(&Filter {
            status: None,
            page: 1,
            page_size: Some(10),
        })
        .await
        .expect("list_tasks on the replica");
    assert_eq!(tasks.len(), 3);
    let global = board.global().await.expect("global on the replica");
    assert!(
        global
            .iter()
            .any(|st| st.title == "TOTAL_JOBS" && st.value == "3"),
        "{global:?}"
    );

    // Writes: refused, saying it is a replica.
    let e = apalis_pgmq_notify::pause(&replica, &name)
        .await
        .expect_err("pause writes");
    assert!(
        matches!(e, Error::ReadOnly { .. }) && e.to_string().contains("connect to the primary"),
        "{e}"
    );

    // The CLI: read commands work, write commands refuse before doing anything.
    assert!(
        board.list_workers().await.expect("list_workers").is_empty(),
        "the board shows no workers on a standby"
    );
    let out = cli(&["workers"], &url);
    assert_eq!(out.0, Some(1), "{out:?}");
    assert!(out.2.contains("list the workers on the primary"), "{out:?}");
    for args in [
        vec!["queues"],
        vec!["queues", "--json"],
        vec!["dlq", "list", queue],
        vec!["migrate", "--check"],
    ] {
        let out = cli(&args, &url);
        assert_eq!(out.0, Some(0), "{args:?}: {out:?}");
    }
    let id = count(&db.pool, "SELECT min(msg_id) FROM pgmq.q_replicated").await;
    let out = cli(&["job", "show", queue, &id.to_string()], &url);
    assert_eq!(out.0, Some(0), "{out:?}");
    for args in [
        vec!["pause", queue],
        vec!["migrate"],
        vec!["create-queue", "another"],
        vec!["prune"],
        vec!["job", "delete", queue, "1"],
    ] {
        let out = cli(&args, &url);
        assert_eq!(out.0, Some(1), "{args:?}: {out:?}");
        assert!(
            out.2.contains("read-only") && out.2.contains("hot standby"),
            "{args:?}: {out:?}"
        );
    }
    // Nothing changed on the primary.
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_replicated").await,
        3
    );
    replica.close().await;
}

/// Two servers, one a standby: a multi-host string with `target_session_attrs` chooses as
/// libpq does, the pool refuses connections that land on the wrong one, and a runtime given
/// the hosts moves its pool back to the primary when its listener connects.
#[tokio::test]
async fn a_multi_host_string_chooses_the_writable_server_and_follows_it() {
    use apalis_pgmq_notify::{MultiHost, TargetSessionAttrs};

    let db = TestDb::setup().await;
    let queue = "multi";
    storage_on(&db.runtime(), queue, slow_poll())
        .create_queue()
        .await
        .expect("create");
    let Some((replica, _)) = replica_of(
        &db,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'pgmq' AND tablename = 'q_multi'",
        1,
    )
    .await
    else {
        return;
    };
    let standby = replica.connect_options();
    let (sp, pp) = (standby.get_port(), db.options.get_port());
    let user = db.options.get_username();
    let name = &db.name;
    // Nothing listens on the first host: it is skipped as libpq skips it.
    let dead = 1;
    let url = |attrs: &str| {
        format!(
            "postgres://{user}@127.0.0.1:{dead},127.0.0.1:{sp},127.0.0.1:{pp}/{name}?sslmode=disable&target_session_attrs={attrs}"
        )
    };
    for (attrs, want) in [
        ("read-write", pp),
        ("primary", pp),
        ("standby", sp),
        ("read-only", sp),
        ("any", sp),
        ("prefer-standby", sp),
    ] {
        let hosts = MultiHost::parse(&url(attrs)).expect("parses");
        let chosen = hosts.choose().await.expect("a host fits");
        assert_eq!(chosen.get_port(), want, "{attrs}");
    }
    let keywords = format!(
        "host=127.0.0.1,127.0.0.1 port={sp},{pp} user={user} dbname={name} sslmode=disable target_session_attrs=read-write"
    );
    let hosts = MultiHost::parse(&keywords).expect("parses");
    assert_eq!(hosts.target(), TargetSessionAttrs::ReadWrite);
    assert_eq!(hosts.choose().await.expect("chosen").get_port(), pp);
    let only_standby = MultiHost::parse(&format!(
        "postgres://{user}@127.0.0.1:{sp}/{name}?sslmode=disable&target_session_attrs=read-write"
    ))
    .expect("parses");
    let e = only_standby.choose().await.expect_err("no primary");
    assert!(e.to_string().contains("hot standby"), "{e}");

    // The pool: on the primary; pointed at the standby (a stale choice), it refuses the
    // connection instead of handing it out; follow() moves it back.
    let hosts = MultiHost::parse(&url("read-write")).expect("parses");
    let pool = hosts
        .connect_pool(
            PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(2)),
        )
        .await
        .expect("pool");
    let port: i32 = sqlx::query_scalar("SELECT inet_server_port()")
        .fetch_one(&pool)
        .await
        .expect("query");
    assert_eq!(port, i32::from(pp));
    pool.set_connect_options((*standby).clone());
    pool.close().await;
    let pool = hosts
        .connect_pool(
            PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(2)),
        )
        .await
        .expect("pool");
    pool.set_connect_options((*standby).clone());
    assert!(
        pool.acquire().await.is_err(),
        "a connection to the standby is refused"
    );
    hosts.follow(&pool).await.expect("follow");
    assert_eq!(pool.connect_options().get_port(), pp);

    // A runtime given the hosts: its listener's connect moves a stale pool to the primary,
    // and the worker runs what is pushed.
    pool.set_connect_options((*standby).clone());
    let runtime = Runtime::new(&pool).hosts(hosts.clone());
    let s = storage_on(&runtime, queue, slow_poll());
    let log: Log = Arc::default();
    let worker = WorkerBuilder::new("multi")
        .backend(s.clone())
        .data(log.clone())
        .build(succeed);
    let (stop, join) = spawn_worker!(worker);
    let producer = storage_on(&db.runtime(), queue, slow_poll());
    producer
        .push_with(&db.pool, &Job { id: 1 })
        .await
        .expect("push");
    wait_handled(&log, 1, WAIT).await;
    assert_eq!(pool.connect_options().get_port(), pp);
    stop_worker(stop, join).await;
    runtime.shutdown().await.expect("shutdown");
    pool.close().await;

    // The CLI takes the same strings: a write command goes to the primary.
    let out = cli(&["pause", queue], &url("read-write"));
    assert_eq!(out.0, Some(0), "{out:?}");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM apalis_pgmq.paused WHERE queue = 'multi'"
        )
        .await,
        1
    );
    // And the keyword form, standby first: the write goes to the primary.
    let out = cli(&["resume", queue], &keywords);
    assert_eq!(out.0, Some(0), "{out:?}");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM apalis_pgmq.paused WHERE queue = 'multi'"
        )
        .await,
        0
    );
    replica.close().await;
}

/// When each job started.
type Starts = Arc<Mutex<Vec<(u32, std::time::Instant)>>>;

/// Figures for BENCHMARKS.md, not a check: burn-down and idle pickup through PgBouncer
/// (session mode, listener included) against direct, in one run on one server.
/// `scripts/with-pg.sh scripts/with-pgbouncer.sh --mode session -- cargo test --all-features
/// --test topologies -- --ignored --nocapture measure`
#[tokio::test]
#[ignore = "a measurement: run it by name"]
async fn measure_burn_down_and_pickup_through_pgbouncer_against_direct() {
    let Some(b) = bouncer() else { return };
    const JOBS: u32 = 20_000;
    const PICKUPS: usize = 40;
    for round in 0..2 {
        for through in ["direct", "pgbouncer"] {
            let db = TestDb::setup().await;
            let options = if through == "direct" {
                db.options.clone()
            } else {
                b.alias(&db, "session", 40).await
            };
            let pool = pool_on(options, 20).await;
            let runtime = Runtime::new(&pool);
            let queue = "measured";
            let s = storage_on(&runtime, queue, slow_poll());
            s.create_queue().await.expect("create");
            let ids: Vec<u32> = (1..=JOBS).collect();
            for chunk in ids.chunks(1000) {
                s.push_bulk_with(&db.pool, chunk.iter().map(|&id| Job { id }))
                    .await
                    .expect("push");
            }
            let started: Starts = Arc::default();
            let log = started.clone();
            let worker = WorkerBuilder::new("measured")
                .backend(s.clone())
                .data(log)
                .concurrency(32)
                .build(|job: Job, log: Data<Starts>| async move {
                    log.lock()
                        .expect("lock")
                        .push((job.id, std::time::Instant::now()));
                    Ok::<(), BoxDynError>(())
                });
            let t0 = std::time::Instant::now();
            let (stop, join) = spawn_worker!(worker);
            wait_for(Duration::from_secs(600), "the burn-down", || async {
                (count(&db.pool, "SELECT count(*) FROM pgmq.a_measured").await == i64::from(JOBS))
                    .then_some(())
            })
            .await;
            let burn = f64::from(JOBS) / t0.elapsed().as_secs_f64();
            stop_worker(stop, join).await;
            // Idle pickup on a queue of its own, whose worker has only ever waited.
            let idle = storage_on(&runtime, "idle", slow_poll());
            idle.create_queue().await.expect("create");
            let log = started.clone();
            let worker = WorkerBuilder::new("idle")
                .backend(idle.clone())
                .data(log)
                .build(|job: Job, log: Data<Starts>| async move {
                    log.lock()
                        .expect("lock")
                        .push((job.id, std::time::Instant::now()));
                    Ok::<(), BoxDynError>(())
                });
            let (stop, join) = spawn_worker!(worker);
            // Pushed as another process would (another runtime: no in-process wake-up), so
            // every pickup is a notification's, through the pooler or not.
            let producer_runtime = Runtime::new(&pool);
            let producer = storage_on(&producer_runtime, "idle", slow_poll());
            let mut pickups = Vec::new();
            for i in 0..PICKUPS {
                let id = JOBS + 1 + i as u32;
                let armed =
                    tokio::time::timeout(Duration::from_secs(20), armed_after(&db.pool, "idle", 0))
                        .await;
                if armed.is_err() {
                    {
                        let rows: Vec<(String, String, bool, bool, i64, i64)> = sqlx::query_as(
                            "SELECT channel, owner, armed, persistent, arm_id, gen FROM apalis_pgmq.listeners",
                        )
                        .fetch_all(&db.pool)
                        .await
                        .expect("listeners");
                        panic!(
                            "{through} pickup {i}: the idle worker did not arm within 20 s; listeners: {rows:?}; stats {:?}",
                            runtime.listener_stats()
                        );
                    }
                }
                let pushed = std::time::Instant::now();
                producer.push_with(&pool, &Job { id }).await.expect("push");
                let at = wait_for(QUICK, "the pickup", || async {
                    started
                        .lock()
                        .expect("lock")
                        .iter()
                        .find(|(j, _)| *j == id)
                        .map(|(_, t)| *t)
                })
                .await;
                pickups.push(at.duration_since(pushed).as_secs_f64() * 1000.0);
            }
            pickups.sort_by(f64::total_cmp);
            let pct = |p: f64| pickups[((pickups.len() - 1) as f64 * p).round() as usize];
            println!(
                "MEASURE round {round} {through:9}: burn-down {burn:.0} jobs/s; idle pickup p50 {:.2} ms, p95 {:.2} ms, max {:.2} ms ({PICKUPS} pickups)",
                pct(0.5),
                pct(0.95),
                pct(1.0)
            );
            stop_worker(stop, join).await;
            runtime.shutdown().await.expect("shutdown");
            pool.close().await;
        }
    }
}

type Runs = Arc<Mutex<Vec<(u32, std::time::Instant, std::time::Instant)>>>;

/// The longest time without an event among `times` (sorted) from `from` on, and when the
/// first event after `from` came.
fn longest_gap(times: &[std::time::Instant], from: std::time::Instant) -> Duration {
    let mut last = from;
    let mut longest = Duration::ZERO;
    for &t in times.iter().filter(|&&t| t >= from) {
        longest = longest.max(t.duration_since(last));
        last = t;
    }
    longest
}

/// A pg_auto_failover formation (monitor, primary, synchronous standbys) under a steady
/// load of pushes and runs: `perform failover`, `perform switchover` (to a standby), then the primary's
/// postmaster SIGKILLed. The runtime connects with the formation's multi-host URL and follows
/// the primary. Checks that every acknowledged push ran and was archived exactly once, that
/// no job ran twice at once, and prints how long producers and workers went without progress
/// after each action. Run by `scripts/topo-tests.sh` (it needs `scripts/with-formation.sh`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a pg_auto_failover formation: scripts/topo-tests.sh"]
async fn failover_under_load_loses_no_acknowledged_push() {
    use apalis_pgmq_notify::MultiHost;
    let (Some(url), Some(ctl)) = (
        std::env::var("APALIS_FORMATION_URL").ok(),
        std::env::var("APALIS_FORMATION_CTL").ok(),
    ) else {
        eprintln!("skipped: no formation (run scripts/topo-tests.sh)");
        return;
    };
    let hosts = MultiHost::parse(&url).expect("the formation's URL parses");
    let pool = hosts
        .connect_pool(
            PgPoolOptions::new()
                .max_connections(10)
                .acquire_timeout(Duration::from_secs(3)),
        )
        .await
        .expect("pool");
    apalis_pgmq_notify::setup(&pool).await.expect("setup");
    let runtime = Runtime::new(&pool).hosts(hosts.clone());
    let queue = format!("failover_{}", std::process::id());
    let config = Config::default()
        .poll_interval(Duration::from_secs(2))
        .visibility_timeout(Duration::from_secs(30))
        .listener_health_check(Duration::from_secs(2));
    let s = storage_on(&runtime, &queue, config);
    s.create_queue().await.expect("create");

    let runs: Runs = Arc::default();
    let worker = WorkerBuilder::new("failover")
        .backend(s.clone())
        .data(runs.clone())
        .concurrency(8)
        .build(|job: Job, runs: Data<Runs>| async move {
            let start = std::time::Instant::now();
            runs.lock()
                .expect("lock")
                .push((job.id, start, std::time::Instant::now()));
            Ok::<(), BoxDynError>(())
        });
    let (stop_worker_tx, worker_join) = spawn_worker!(worker);

    // One producer, a push every 10 ms (the load's pace), acknowledged ids recorded.
    let acked: Arc<Mutex<Vec<(u32, i64, std::time::Instant)>>> = Arc::default();
    let push_errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (s, pool, acked, errors, stop) = (
            s.clone(),
            pool.clone(),
            acked.clone(),
            push_errors.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut id = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                id += 1;
                match s.push_with(&pool, &Job { id }).await {
                    Ok(msg_id) => {
                        acked
                            .lock()
                            .expect("lock")
                            .push((id, msg_id, std::time::Instant::now()))
                    }
                    Err(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let progress = |since: std::time::Instant| {
        let pushes = acked
            .lock()
            .expect("lock")
            .iter()
            .filter(|a| a.2 > since)
            .count();
        let ran = runs
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.1 > since)
            .count();
        (pushes, ran)
    };
    let began = std::time::Instant::now();
    wait_for(WAIT, "a warm-up", || async {
        let (p, r) = progress(began);
        (p >= 100 && r >= 100).then_some(())
    })
    .await;

    let mut report = Vec::new();
    for action in ["failover", "switchover", "kill-postgres"] {
        let t = std::time::Instant::now();
        let out = tokio::process::Command::new(&ctl)
            .arg(action)
            .output()
            .await
            .expect("run formation-ctl");
        assert!(out.status.success(), "{action}: {out:?}");
        let said = String::from_utf8_lossy(&out.stdout)
            .trim()
            .replace('\n', " ");
        // Resumed: 50 pushes acknowledged and 50 jobs started after the action.
        wait_for(
            Duration::from_secs(120),
            &format!("progress after {action}"),
            || async {
                let (p, r) = progress(t);
                (p >= 50 && r >= 50).then_some(())
            },
        )
        .await;
        let ack_times: Vec<_> = acked.lock().expect("lock").iter().map(|a| a.2).collect();
        let mut run_times: Vec<_> = runs.lock().expect("lock").iter().map(|r| r.1).collect();
        run_times.sort_unstable();
        report.push(format!(
            "{action}: formation-ctl said {said:?}; longest without an acknowledged push {:.2} s, without a job started {:.2} s; pool on port {}",
            longest_gap(&ack_times, t).as_secs_f64(),
            longest_gap(&run_times, t).as_secs_f64(),
            pool.connect_options().get_port()
        ));
        let stable = tokio::process::Command::new(&ctl)
            .args(["wait-stable", "120"])
            .output()
            .await
            .expect("run formation-ctl");
        assert!(
            stable.status.success(),
            "wait-stable after {action}: {stable:?}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    producer.await.expect("producer");

    // Every acknowledged push ran and is archived once; none ran twice at once.
    let acked = acked.lock().expect("lock").clone();
    let msg_ids: Vec<i64> = acked.iter().map(|a| a.1).collect();
    let archived_sql = format!("SELECT count(*) FROM pgmq.a_{queue} WHERE msg_id = ANY($1)");
    let archived = wait_for(
        Duration::from_secs(120),
        "every acknowledged push archived",
        || {
            let (pool, sql, ids) = (pool.clone(), archived_sql.clone(), msg_ids.clone());
            async move {
                let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(ids.clone())
                    .fetch_one(&pool)
                    .await
                    .ok()?;
                (n == ids.len() as i64).then_some(n)
            }
        },
    )
    .await;
    let still_queued: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM pgmq.q_{queue} WHERE msg_id = ANY($1)"
    )))
    .bind(msg_ids.clone())
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(
        still_queued, 0,
        "an acknowledged job is both archived and queued"
    );
    let runs = runs.lock().expect("lock").clone();
    let mut by_id: std::collections::HashMap<u32, Vec<(std::time::Instant, std::time::Instant)>> =
        std::collections::HashMap::new();
    for (id, start, end) in &runs {
        by_id.entry(*id).or_default().push((*start, *end));
    }
    let mut overlaps = 0;
    let mut twice = 0;
    for spans in by_id.values_mut() {
        spans.sort();
        twice += usize::from(spans.len() > 1);
        overlaps += spans.windows(2).filter(|w| w[1].0 < w[0].1).count();
    }
    let never_ran = acked.iter().filter(|a| !by_id.contains_key(&a.0)).count();
    let pickups: Vec<Duration> = acked
        .iter()
        .filter_map(|a| {
            by_id
                .get(&a.0)
                .and_then(|s| s.first())
                .map(|s| s.0.saturating_duration_since(a.2))
        })
        .collect();
    let slow = pickups
        .iter()
        .filter(|d| **d > Duration::from_secs(15))
        .count();
    let worst_pickup = acked
        .iter()
        .filter_map(|a| {
            by_id
                .get(&a.0)
                .and_then(|s| s.first())
                .map(|s| s.0.saturating_duration_since(a.2))
        })
        .max()
        .unwrap_or_default();
    for line in &report {
        println!("FAILOVER {line}");
    }
    println!(
        "FAILOVER totals: {} acknowledged pushes ({} failed pushes, retried by nobody), {archived} archived, {} jobs ran more than once (sequentially), {overlaps} overlapping runs, {never_ran} never ran; the slowest pickup {:.2} s, {slow} pickups over 15 s (half the 30 s visibility timeout); {} jobs given back from claims whose answer was lost",
        acked.len(),
        push_errors.load(std::sync::atomic::Ordering::Relaxed),
        twice,
        worst_pickup.as_secs_f64(),
        apalis_pgmq_notify::testing::lost_claims_released(&s)
    );
    assert_eq!(never_ran, 0, "every acknowledged push ran");
    assert_eq!(overlaps, 0, "no job ran twice at once");
    // A claim whose answer the failover took is given back on the new primary: no job waits
    // out the visibility timeout.
    assert_eq!(slow, 0, "pickups over 15 s");
    stop_worker(stop_worker_tx, worker_join).await;
    runtime.shutdown().await.expect("shutdown");
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT pgmq.drop_queue('{queue}')"
    )))
    .execute(&pool)
    .await;
    pool.close().await;
}
