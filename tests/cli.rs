//! The command-line tool, run as a process.

mod common;

use std::process::{Command, Output};

use apalis_pgmq_notify::{NotifyMode, PgmqQueue, QueueName, notify_mode};
use common::TestDb;

fn cli(args: &[&str], database_url: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_apalis-pgmq-notify"));
    cmd.args(args).env_remove("DATABASE_URL");
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    cmd.output().expect("run the CLI")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn migrate_then_enable_and_disable_notify() {
    let db = TestDb::fresh().await;
    let url = db.url();
    let out = cli(&["migrate"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("PGMQ 1.13.0"), "{}", text(&out));
    let again = cli(&["migrate"], Some(&url));
    assert!(again.status.success());
    assert!(text(&again).contains("up to date"), "{}", text(&again));

    let q = PgmqQueue::new(QueueName::new("orders_queue").expect("name"));
    q.create(&db.pool).await.expect("create");
    let out = cli(
        &[
            "enable-notify",
            "orders_queue",
            "--mode",
            "message",
            "--max-payload-bytes",
            "3000",
        ],
        Some(&url),
    );
    assert!(out.status.success(), "{}", text(&out));
    let installed = notify_mode(&db.pool, q.name()).await.expect("status");
    assert_eq!(
        installed,
        Some((
            NotifyMode::Message {
                max_payload_bytes: 3000
            },
            vec!["apq.q.orders_queue".to_owned(), "apq.ns.orders".to_owned()]
        ))
    );
    let out = cli(&["disable-notify", "orders_queue"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(notify_mode(&db.pool, q.name()).await.expect("status"), None);

    let out = cli(&["enable-notify", "missing_queue"], Some(&url));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("does not exist"), "{}", text(&out));
}

#[test]
fn hostile_names_are_refused_before_connecting() {
    // The database URL points nowhere: the name is rejected before any connection is tried.
    for name in [
        "x'; drop table pgmq.meta; --",
        "Orders",
        "a b",
        &"q".repeat(44),
    ] {
        let out = cli(
            &["enable-notify", name],
            Some("postgres://nobody@127.0.0.1:1/nothing"),
        );
        assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out));
        assert!(text(&out).contains("invalid queue name"), "{}", text(&out));
    }
}

#[test]
fn generate_migration_escapes_and_validates() {
    let dir = std::env::temp_dir().join(format!("apq-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("notify.sql");
    let out = cli(
        &[
            "generate-migration",
            "billing_queue",
            "email",
            "--prefix",
            "app.",
            "--created-events",
            "--output",
            file.to_str().expect("utf-8 path"),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out));
    let sql = std::fs::read_to_string(&file).expect("written");
    assert!(sql.contains(
        "SELECT apalis_pgmq.enable_notify('billing_queue', 'app.q.billing_queue', 'app.ns.billing', 'on_demand', 7000);"
    ));
    assert!(sql.contains("'email', 'app.q.email', 'app.ns.default'"));
    assert!(sql.contains("SELECT apalis_pgmq.enable_created_notify('app.created');"));
    assert!(sql.contains("CREATE OR REPLACE FUNCTION apalis_pgmq.notify_batch()"));
    for bad in [
        vec!["generate-migration", "--prefix", "x'y"],
        vec!["generate-migration", "--namespace-pattern", "("],
        vec!["generate-migration", "--mode", "per-row"],
        vec!["generate-migration", "--max-payload-bytes", "9000"],
        vec!["generate-migration", "bad name"],
        vec!["generate-migration", "--nonsense"],
        vec!["frobnicate"],
    ] {
        let out = cli(&bad, None);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn validate_checks_config_files() {
    let dir = std::env::temp_dir().join(format!("apq-cli-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let good = dir.join("good.json");
    std::fs::write(
        &good,
        r#"{"queue": "email", "max_attempts": 5, "backoff": {"base_ms": 200},
            "notify": {"prefix": "app.", "mode": "message"}}"#,
    )
    .expect("write");
    let out = cli(&["validate", good.to_str().expect("path")], None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("valid (queue email)"));
    for (name, body, needle) in [
        (
            "typo.json",
            r#"{"queue": "email", "max_atempts": 5}"#,
            "unknown field",
        ),
        (
            "range.json",
            r#"{"queue": "email", "fetch_batch_size": 0}"#,
            "fetch_batch_size",
        ),
        ("name.json", r#"{"queue": "e-mail"}"#, "invalid queue name"),
        ("broken.json", "{", "EOF"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, body).expect("write");
        let out = cli(&["validate", path.to_str().expect("path")], None);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out));
        assert!(text(&out).contains(needle), "{name}: {}", text(&out));
    }
    let out = cli(&["validate", "/nonexistent/config.json"], None);
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn drop_queue_takes_the_dead_letter_queue_with_it() {
    let db = TestDb::setup().await;
    let url = db.url();
    let s = apalis_pgmq_notify::PgmqStorage::<String>::new(
        &db.pool,
        QueueName::new("gone").expect("name"),
    );
    s.create_queue().await.expect("create");
    let tables =
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'pgmq' AND tablename LIKE '%gone%'";
    assert_eq!(
        common::count(&db.pool, tables).await,
        4,
        "queue, archive, dlq, dlq archive"
    );
    let out = cli(&["drop-queue", "gone"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("dropped with its dead-letter queue"),
        "{}",
        text(&out)
    );
    assert_eq!(common::count(&db.pool, tables).await, 0);
    let out = cli(&["drop-queue", "gone"], Some(&url));
    assert!(text(&out).contains("did not exist"), "{}", text(&out));
    // The library call does the same.
    s.create_queue().await.expect("create again");
    assert!(s.drop_queue().await.expect("drop"));
    assert_eq!(common::count(&db.pool, tables).await, 0);
}
