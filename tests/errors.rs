//! Errors a caller can act on, through the library and through the CLI: each arrives as the
//! variant that says what to do, and no message carries PostgreSQL's "at line N" (a line of
//! the server's own C source) or, on the command line, a Rust function to call.

mod common;

use std::{
    process::{Command, Output},
    time::Duration,
};

use apalis::prelude::*;
use apalis_pgmq_notify::{Delay, Error, PgmqQueue, PgmqStorage, QueueName, Runtime};
use common::TestDb;
use serde_json::json;

fn cli(args: &[&str], database_url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_apalis-pgmq-notify"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .output()
        .expect("run the CLI")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A CLI failure (exit 1) whose message contains `needle`, with no server line number and no
/// Rust function to call.
fn fails_with(o: &Output, needle: &str) {
    let t = text(o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains(needle), "{needle:?} not in: {t}");
    assert!(!t.contains("at line"), "{t}");
    for rust in [
        "setup(&pool)",
        "create_queue()",
        "PgmqStorage::",
        "apalis_pgmq_notify::",
    ] {
        assert!(!t.contains(rust), "a CLI user cannot call {rust}: {t}");
    }
}

/// `url` with its user replaced.
fn as_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("scheme");
    let host = rest.split_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{user}@{host}")
}

/// `url` with its database replaced.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, ""), |(b, q)| (b, q));
    let cut = base.rfind('/').expect("a database");
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{}/{database}{query}", &base[..cut])
}

fn closed_port() -> u16 {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    port
}

/// A storage on a pool that may not connect, for the push paths that report why.
fn unconnectable(options: sqlx::postgres::PgConnectOptions) -> PgmqStorage<u32> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy_with(options);
    PgmqStorage::new(&Runtime::new(&pool), QueueName::new("email").expect("name"))
}

/// The storage's error inside apalis' sink error.
fn pushed(e: TaskSinkError<Error>) -> Error {
    match e {
        TaskSinkError::PushError(e) => e,
        other => panic!("not the storage's error: {other}"),
    }
}

fn clean(e: &Error) -> String {
    let t = e.to_string();
    assert!(!t.contains("at line"), "{t}");
    t
}

#[tokio::test]
async fn the_library_tells_connection_problems_apart() {
    let db = TestDb::setup().await;
    // A database that does not exist: fix the URL, do not retry.
    let mut s = unconnectable(db.options.clone().database("no_such_db"));
    let e = pushed(s.push(1).await.expect_err("no database"));
    assert!(matches!(e, Error::ConnectionRejected { .. }), "{e:?}");
    assert!(
        clean(&e).contains("does not exist") && !e.is_retryable(),
        "{e}"
    );
    // A role that may not log in (the test server trusts every password, so a role without
    // LOGIN stands for a failed authentication: the same class of errors, 28).
    sqlx::query("CREATE ROLE cannot_login NOLOGIN")
        .execute(&db.pool)
        .await
        .ok();
    let mut s = unconnectable(db.options.clone().username("cannot_login"));
    let e = pushed(s.push(1).await.expect_err("no login"));
    assert!(matches!(e, Error::ConnectionRejected { .. }), "{e:?}");
    assert!(clean(&e).contains("not permitted to log in"), "{e}");
    // Nothing listens: unreachable, worth retrying later.
    let mut s = unconnectable(db.options.clone().host("127.0.0.1").port(closed_port()));
    let e = pushed(s.push(1).await.expect_err("closed port"));
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
    assert!(
        clean(&e).to_lowercase().contains("refused") && e.is_retryable(),
        "{e}"
    );
}

#[tokio::test]
async fn the_library_tells_schema_rights_and_conflicts_apart() {
    // Not set up.
    let bare = TestDb::fresh().await;
    let q = PgmqQueue::new(QueueName::new("email").expect("name"));
    let e = apalis_pgmq_notify::list_queues(&bare.pool)
        .await
        .expect_err("no PGMQ");
    assert!(matches!(e, Error::NotSetUp { .. }), "{e:?}");
    assert!(clean(&e).contains("apalis-pgmq-notify migrate"), "{e}");
    // A queue that does not exist.
    let db = TestDb::setup().await;
    let e = q.send(&db.pool, &json!({})).await.expect_err("no queue");
    assert!(
        matches!(&e, Error::QueueMissing { queue } if queue == "email"),
        "{e:?}"
    );
    clean(&e);
    // A key taken by a job that plain SQL pushed: a plain push with the same key is refused
    // as a duplicate (not an opaque database error), and nothing is written.
    let s: PgmqStorage<u32> =
        PgmqStorage::new(&db.runtime(), QueueName::new("email").expect("name"));
    s.create_queue().await.expect("create");
    let headers = json!({"apalis": {"idempotency_key": "k"}});
    sqlx::query("SELECT pgmq.send('email', '1'::jsonb, $1::jsonb)")
        .bind(&headers)
        .execute(&db.pool)
        .await
        .expect("plain SQL push");
    let e = q
        .send_with(&db.pool, &json!(2), Some(&headers), Delay::Now)
        .await
        .expect_err("key taken");
    assert!(
        matches!(&e, Error::Duplicate { constraint: Some(c), .. } if c.ends_with("_key_idx")),
        "{e:?}"
    );
    assert!(clean(&e).contains("idempotency key"), "{e}");
    assert_eq!(
        common::count(&db.pool, "SELECT count(*) FROM pgmq.q_email").await,
        1
    );
    // A key taken by a job this REPEATABLE READ transaction cannot see: retry the transaction.
    let mut tx = db.pool.begin().await.expect("begin");
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .expect("isolation");
    sqlx::query("SELECT 1")
        .execute(&mut *tx)
        .await
        .expect("snapshot");
    s.push_task_with(
        &db.pool,
        TaskBuilder::new(3).idempotency_key("late").build(),
    )
    .await
    .expect("another session takes the key");
    let e = s
        .push_task_with(&mut tx, TaskBuilder::new(4).idempotency_key("late").build())
        .await
        .expect_err("invisible key");
    assert!(
        matches!(e, Error::Conflict { .. }) && e.is_retryable(),
        "{e:?}"
    );
    clean(&e);
    drop(tx);
    // A role that may use PGMQ's schema but not insert into the queue.
    let (role, pool) =
        common::producer_role(&db, "email", "REVOKE INSERT ON pgmq.q_email FROM {role}").await;
    let e = q.send(&pool, &json!(5)).await.expect_err("no INSERT");
    assert!(matches!(e, Error::PermissionDenied { .. }), "{e:?}");
    assert!(clean(&e).contains("q_email"), "{e}");
    pool.close().await;
    common::drop_role(&db, &role).await;
}

#[tokio::test]
async fn the_cli_says_what_to_do_without_server_lines_or_rust() {
    let db = TestDb::setup().await;
    let url = db.url();
    // Nothing listens.
    let closed = format!("postgres://nobody@127.0.0.1:{}/nothing", closed_port());
    fails_with(&cli(&["queues"], &closed), "refused");
    // A database that does not exist.
    let missing = with_database(&url, "no_such_db");
    fails_with(
        &cli(&["queues"], &missing),
        "database \"no_such_db\" does not exist",
    );
    fails_with(&cli(&["queues"], &missing), "check the database URL");
    // A role that may not log in (stands for a wrong password on this trusting server).
    sqlx::query("CREATE ROLE cli_cannot_login NOLOGIN")
        .execute(&db.pool)
        .await
        .ok();
    fails_with(
        &cli(&["queues"], &as_user(&url, "cli_cannot_login")),
        "not permitted to log in",
    );
    // Not set up: the command to run.
    let bare = TestDb::fresh().await;
    fails_with(
        &cli(&["queues"], &bare.url()),
        "run `apalis-pgmq-notify migrate`",
    );
    // A queue that does not exist: the command that creates it.
    fails_with(
        &cli(&["dlq", "list", "nope"], &url),
        "create it with `apalis-pgmq-notify create-queue nope`",
    );
    // A dead letter whose key plain SQL took meanwhile: replaying it is refused as a
    // duplicate, in words.
    assert!(cli(&["create-queue", "uq"], &url).status.success());
    let headers = json!({"apalis": {"idempotency_key": "k"}});
    sqlx::query("SELECT pgmq.send('uq', '1'::jsonb, $1::jsonb)")
        .bind(&headers)
        .execute(&db.pool)
        .await
        .expect("plain SQL push");
    sqlx::query(
        "INSERT INTO pgmq.q_uq_dlq (vt, message, headers) VALUES (clock_timestamp(), '2', $1)",
    )
    .bind(&headers)
    .execute(&db.pool)
    .await
    .expect("dead letter");
    fails_with(
        &cli(&["dlq", "replay", "uq", "--all"], &url),
        "idempotency key",
    );
}
