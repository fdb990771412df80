//! The command-line tool, run as a process.

mod common;

use std::process::{Command, Output};

use apalis_pgmq_notify::{NotifyMode, PgmqQueue, QueueName, notify_mode};
use common::{TestDb, count};
use serde_json::Value;

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
    assert!(sql.contains("INSERT INTO apalis_pgmq.schema_migrations"));
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

/// The complete configuration file of the README's "Configuration" section.
fn readme_config() -> String {
    let readme = include_str!("../README.md");
    let section = &readme[readme.find("## Configuration").expect("section")..];
    let start = section.find("```toml\n").expect("a toml block") + "```toml\n".len();
    section[start..][..section[start..].find("```").expect("end of block")].to_owned()
}

/// Every key of a TOML document, dotted.
fn toml_keys(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) if key != "wakeups.mode" => toml_keys(&key, t, out),
            _ => out.push(key),
        }
    }
}

#[test]
fn validate_prints_every_setting_of_the_readme_file() {
    let dir = std::env::temp_dir().join(format!("apq-cli-readme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("apalis.toml");
    let readme = readme_config();
    std::fs::write(&file, &readme).expect("write");
    // The README's file sets every setting, to its default.
    let defaults = apalis_pgmq_notify::Config::default().settings();
    let mut keys = Vec::new();
    toml_keys("", &readme.parse::<toml::Table>().expect("toml"), &mut keys);
    keys.sort();
    let expected: Vec<String> = defaults.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(keys, expected, "the README's file lists every setting");
    assert_eq!(
        apalis_pgmq_notify::Config::load(&file).expect("loads"),
        apalis_pgmq_notify::Config::default()
    );
    let out = cli(&["validate", file.to_str().expect("path")], None);
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(shown.contains(": valid"), "{shown}");
    for (key, value) in &defaults {
        let line = shown
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key.as_str()))
            .unwrap_or_else(|| panic!("{key} not printed: {shown}"));
        assert!(
            line.trim_end().ends_with(value.as_str()),
            "{line} != {value}"
        );
    }
    assert!(!shown.contains("Config {"), "no Rust Debug text: {shown}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn validate_checks_config_files() {
    let dir = std::env::temp_dir().join(format!("apq-cli-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for (name, body) in [
        (
            "good.json",
            r#"{"retries": {"max_attempts": 5, "backoff": {"base": "200ms"}},
                "wakeups": {"channels": {"prefix": "app."}, "mode": "message"}}"#,
        ),
        (
            "good.toml",
            "[retries]\nmax_attempts = 5\nbackoff = { base = \"200ms\" }\n\n[wakeups]\nmode = \"message\"\nchannels = { prefix = \"app.\" }\n",
        ),
    ] {
        let good = dir.join(name);
        std::fs::write(&good, body).expect("write");
        let out = cli(&["validate", good.to_str().expect("path")], None);
        assert!(out.status.success(), "{}", text(&out));
        let shown = text(&out);
        assert!(shown.contains(": valid"), "{shown}");
        for line in [
            "retries.max_attempts                5",
            "retries.backoff.base                \"200ms\"",
            "retries.backoff.max                 \"1h\"",
            "wakeups.channels.prefix             \"app.\"",
            "wakeups.mode                        \"message\"",
        ] {
            assert!(shown.contains(line), "{name}: {line}: {shown}");
        }
    }
    for (name, body, needle) in [
        (
            "typo.toml",
            "[retries]\nmax_atempts = 5\n",
            "unknown field `max_atempts`",
        ),
        (
            "typo.json",
            r#"{"retries": {"max_atempts": 5}}"#,
            "unknown field `max_atempts`",
        ),
        (
            "duration.toml",
            "[leases]\nvisibility_timeout = \"soon\"\n",
            "duration.toml:2:22: leases.visibility_timeout: invalid duration \"soon\"",
        ),
        (
            "seconds.json",
            r#"{"leases": {"visibility_timeout": 30}}"#,
            "leases.visibility_timeout: invalid type: integer `30`",
        ),
        (
            "range.toml",
            "[claims]\nbatch_size = 0\n",
            "range.toml: invalid configuration: claims.batch_size: must be within 1..=10000, got 0",
        ),
        ("broken.json", "{", "EOF"),
        ("config.yaml", "retries: {}", ".toml or .json"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, body).expect("write");
        let out = cli(&["validate", path.to_str().expect("path")], None);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out));
        assert!(text(&out).contains(needle), "{name}: {}", text(&out));
        assert!(!text(&out).contains("at line"), "{name}: {}", text(&out));
    }
    let out = cli(&["validate", "/nonexistent/config.json"], None);
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn defaults_in_help_come_from_the_library() {
    let out = cli(&["prune", "--help"], None);
    let help = text(&out);
    let d = apalis_pgmq_notify::Config::default();
    for (flag, value) in [
        ("--archive-retention", d.retention.archive),
        ("--dead-letter-retention", d.retention.dead_letters),
        ("--result-retention", d.results.retention),
    ] {
        let shown = apalis_pgmq_notify::HumanDuration(value.expect("a default retention"));
        let at = help.find(flag).expect(flag);
        let next = help[at..].find("[default: ").expect("a default") + at;
        assert!(
            help[next..].starts_with(&format!("[default: {shown}]")),
            "{flag}: {help}"
        );
    }
    let out = cli(&["enable-notify", "--help"], None);
    let help = text(&out);
    assert!(
        help.contains(&format!("[default: {}]", d.wakeups.channels.prefix())),
        "{help}"
    );
    assert!(
        help.contains(&format!("[default: {}]", d.wakeups.mode.name())),
        "{help}"
    );
}

#[tokio::test]
async fn drop_queue_takes_the_dead_letter_queue_with_it() {
    let db = TestDb::setup().await;
    let url = db.url();
    let s = apalis_pgmq_notify::PgmqStorage::<String>::new(
        &db.runtime(),
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
    let out = cli(&["drop-queue", "gone", "--yes"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("dropped with its dead-letter queue"),
        "{}",
        text(&out)
    );
    assert_eq!(common::count(&db.pool, tables).await, 0);
    let out = cli(&["drop-queue", "gone", "--yes"], Some(&url));
    assert!(text(&out).contains("did not exist"), "{}", text(&out));
    // The library call does the same.
    s.create_queue().await.expect("create again");
    assert!(s.drop_queue().await.expect("drop"));
    assert_eq!(common::count(&db.pool, tables).await, 0);
}

/// JSON with the values that change from run to run (times, ids) replaced, for golden checks.
fn normalized(text: &str) -> serde_json::Value {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    if k.ends_with("_at") || k == "at" || k == "oldest_pending_secs" {
                        if !x.is_null() {
                            *x = serde_json::json!("<time>");
                        }
                    } else {
                        walk(x);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut v: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    walk(&mut v);
    v
}

/// A queue with a visible job, a scheduled one and two dead letters.
async fn operated(db: &TestDb, name: &str) -> PgmqQueue {
    let s = apalis_pgmq_notify::PgmqStorage::<serde_json::Value>::new(
        &db.runtime(),
        QueueName::new(name).expect("name"),
    );
    s.create_queue().await.expect("create");
    let q = s.queue().clone();
    q.send_with(
        &db.pool,
        &serde_json::json!({"n": 1}),
        None,
        apalis_pgmq_notify::Delay::Now,
    )
    .await
    .expect("send");
    q.send_with(
        &db.pool,
        &serde_json::json!({"n": 2}),
        None,
        apalis_pgmq_notify::Delay::After(std::time::Duration::from_secs(3600)),
    )
    .await
    .expect("send later");
    for (id, reason) in [(101, "failed"), (102, "undecodable")] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO pgmq.q_{name}_dlq (vt, message, headers) VALUES (clock_timestamp(), \
             jsonb_build_object('n', {id}), jsonb_build_object('apalis_dead_letter', \
             jsonb_build_object('reason', '{reason}', 'error', 'boom {id}', 'attempts', 3, \
             'msg_id', {id}, 'queue', '{name}', 'at', now())))"
        )))
        .execute(&db.pool)
        .await
        .expect("dead letter");
    }
    q
}

#[tokio::test]
async fn read_commands_print_tables_and_golden_json() {
    let db = TestDb::setup().await;
    let url = db.url();
    operated(&db, "ops").await;
    let out = cli(&["queues", "--json"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        normalized(&String::from_utf8_lossy(&out.stdout)),
        serde_json::json!([{
            "queue": "ops", "depth": 2, "visible": 1, "scheduled": 1, "running": 0,
            "retrying": 0, "oldest_pending_secs": "<time>", "archived": 0, "dead_letters": 2,
            "notify": "on_demand", "paused": false, "error": null
        }])
    );
    let out = cli(&["queues"], Some(&url));
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table.starts_with("QUEUE  DEPTH  VISIBLE  SCHEDULED"),
        "{table}"
    );
    assert!(
        !table.contains("QueueOverview {"),
        "no Rust Debug text: {table}"
    );
    let out = cli(&["dlq", "list", "ops", "--json"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    let list = normalized(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    assert_eq!(list[0]["id"], 102, "newest first");
    assert_eq!(list[0]["state"], "dead");
    assert_eq!(
        list[0]["dead_letter"],
        serde_json::json!({"reason": "undecodable", "error": "boom 102", "at": "<time>"})
    );
    let out = cli(
        &["dlq", "list", "ops", "--page-size", "1", "--page", "2"],
        Some(&url),
    );
    let page = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(page.contains("101") && !page.contains("102"), "{page}");
    let out = cli(&["dlq", "show", "ops", "101"], Some(&url));
    assert!(text(&out).contains("boom 101"), "{}", text(&out));
    let out = cli(&["job", "show", "ops", "1", "--json"], Some(&url));
    let job = normalized(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(job["state"], "pending");
    assert_eq!(job["message"], serde_json::json!({"n": 1}));
    let out = cli(&["job", "show", "ops", "999"], Some(&url));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let out = cli(&["workers", "--json"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        normalized(&String::from_utf8_lossy(&out.stdout)),
        serde_json::json!([])
    );
}

#[tokio::test]
async fn dlq_replay_is_all_or_nothing_and_job_commands_act() {
    let db = TestDb::setup().await;
    let url = db.url();
    let q = operated(&db, "replay").await;
    // A replay that fails half-way (the second insert is refused) moves nothing.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_second() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.message->>'n' = '102' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_second BEFORE INSERT ON pgmq.q_replay \
         FOR EACH ROW EXECUTE FUNCTION refuse_second();",
    )
    .execute(&db.pool)
    .await
    .expect("trigger");
    let out = cli(&["dlq", "replay", "replay", "--all"], Some(&url));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_replay_dlq").await,
        2
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_replay").await,
        2
    );
    sqlx::raw_sql("DROP TRIGGER refuse_second ON pgmq.q_replay")
        .execute(&db.pool)
        .await
        .expect("drop trigger");
    // Replay one with a fresh budget: its attempts and dead-letter record are gone.
    let out = cli(
        &["dlq", "replay", "replay", "101", "--reset-attempts"],
        Some(&url),
    );
    assert!(out.status.success(), "{}", text(&out));
    let headers: serde_json::Value = sqlx::query_scalar(
        "SELECT coalesce(headers, '{}'::jsonb) FROM pgmq.q_replay WHERE message->>'n' = '101'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("replayed");
    assert!(headers.get("apalis_dead_letter").is_none(), "{headers}");
    assert!(headers["apalis"].get("attempts").is_none(), "{headers}");
    // Without --reset-attempts the count continues (one more run).
    let out = cli(&["dlq", "replay", "replay", "102"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    let attempts: serde_json::Value = sqlx::query_scalar(
        "SELECT headers->'apalis'->'attempts' FROM pgmq.q_replay WHERE message->>'n' = '102'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("replayed");
    assert_eq!(attempts, 3);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_replay_dlq").await,
        0
    );
    // Unknown ids: nothing moved, exit 1.
    let out = cli(&["dlq", "replay", "replay", "4242"], Some(&url));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // job retry makes a scheduled job visible now; job delete removes it.
    let scheduled: i64 =
        sqlx::query_scalar("SELECT msg_id FROM pgmq.q_replay WHERE message->>'n' = '2'")
            .fetch_one(&db.pool)
            .await
            .expect("scheduled");
    let out = cli(
        &["job", "retry", "replay", &scheduled.to_string()],
        Some(&url),
    );
    assert!(out.status.success(), "{}", text(&out));
    let visible = count(
        &db.pool,
        &format!("SELECT count(*) FROM pgmq.q_replay WHERE msg_id = {scheduled} AND vt <= clock_timestamp()"),
    )
    .await;
    assert_eq!(visible, 1);
    let out = cli(
        &["job", "delete", "replay", &scheduled.to_string()],
        Some(&url),
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = cli(
        &["job", "delete", "replay", &scheduled.to_string()],
        Some(&url),
    );
    assert_eq!(out.status.code(), Some(1));
    // dlq purge.
    q.send_with(
        &db.pool,
        &serde_json::json!({"n": 5}),
        None,
        apalis_pgmq_notify::Delay::Now,
    )
    .await
    .expect("send");
    sqlx::query("INSERT INTO pgmq.q_replay_dlq (vt, message) VALUES (clock_timestamp(), '{}')")
        .execute(&db.pool)
        .await
        .expect("dead");
    let out = cli(
        &["dlq", "purge", "replay", "--older-than", "1h", "--yes"],
        Some(&url),
    );
    assert!(
        text(&out).contains("0 dead letters deleted"),
        "{}",
        text(&out)
    );
    let out = cli(&["dlq", "purge", "replay", "--yes"], Some(&url));
    assert!(
        text(&out).contains("1 dead letters deleted"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn migrate_check_and_dry_run() {
    let db = TestDb::fresh().await;
    let url = db.url();
    let out = cli(&["migrate", "--check"], Some(&url));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("pending migrations: 1 (baseline)"),
        "{}",
        text(&out)
    );
    let out = cli(&["migrate", "--dry-run"], Some(&url));
    assert!(out.status.success());
    assert!(
        text(&out).contains("PGMQ is not installed here"),
        "a dry run says PGMQ would be installed first: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("-- migration 1 (baseline)"),
        "{}",
        text(&out)
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'apalis_pgmq'"
        )
        .await,
        0,
        "a dry run changes nothing"
    );
    assert!(cli(&["migrate"], Some(&url)).status.success());
    let out = cli(&["migrate", "--check"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_refused_connection_is_reported_as_such_within_the_timeout() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let started = std::time::Instant::now();
    let out = cli(
        &["queues"],
        Some(&format!("postgres://nobody@127.0.0.1:{port}/nothing")),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out).to_lowercase();
    assert!(
        t.contains("refused") && !t.contains("pool timed out"),
        "{t}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    let out = cli(&["--help"], None);
    assert!(out.status.success());
    assert!(text(&out).contains("dlq"), "{}", text(&out));
    let out = cli(&["--version"], None);
    assert!(text(&out).contains(env!("CARGO_PKG_VERSION")));
    let out = cli(&["dlq", "replay", "q"], Some("postgres://x@127.0.0.1:1/x"));
    assert_eq!(out.status.code(), Some(2), "usage error: {}", text(&out));
}

#[tokio::test]
async fn tls_urls_work_and_a_wrong_certificate_is_refused() {
    let Ok(cert) = std::env::var("APALIS_PG_SSL_CERT") else {
        println!("skipped: the server was not started with TLS by scripts/with-pg.sh");
        return;
    };
    let db = TestDb::setup().await;
    let plain = db.url();
    let base = plain.split('?').next().expect("url");
    let out = cli(&["queues"], Some(&format!("{base}?sslmode=require")));
    assert!(out.status.success(), "sslmode=require: {}", text(&out));
    let verified = base.replace("127.0.0.1", "localhost");
    let out = cli(
        &["queues"],
        Some(&format!(
            "{verified}?sslmode=verify-full&sslrootcert={cert}"
        )),
    );
    assert!(out.status.success(), "verify-full: {}", text(&out));
    // Without trusting the self-signed certificate, verify-full refuses, and says why.
    let out = cli(
        &["queues"],
        Some(&format!("{verified}?sslmode=verify-full")),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).to_lowercase().contains("certificate"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn prune_deletes_results_past_their_retention() {
    let db = TestDb::setup().await;
    let url = db.url();
    let out = cli(&["create-queue", "kept"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    // Two finished jobs' results, one an hour old.
    sqlx::query(
        "INSERT INTO apalis_pgmq.results (queue, msg_id, status, attempt, result, finished_at) \
         VALUES ('kept', 1, 'Done', 1, '1', now() - interval '1 hour'), \
                ('kept', 2, 'Done', 1, '2', now())",
    )
    .execute(&db.pool)
    .await
    .expect("results");
    let out = cli(&["prune", "kept", "--result-retention", "10m"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(", 1 results"), "{}", text(&out));
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM apalis_pgmq.results").await,
        1
    );
    let out = cli(&["prune", "kept", "--result-retention", "soon"], Some(&url));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// Queues made by other PGMQ clients: `pgmq.create` (no dead-letter queue), and names PGMQ
/// allows but this crate does not serve. Every view counts them right or says why not.
#[tokio::test]
async fn queues_made_by_other_pgmq_clients_are_counted_and_pruned() {
    let db = TestDb::setup().await;
    let url = db.url();
    let long = format!("l{}", "o".repeat(44)); // 45 bytes: PGMQ's limit is 47
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SELECT pgmq.create('plain_pgmq'); \
         SELECT pgmq.send('plain_pgmq', jsonb_build_object('n', i)) FROM generate_series(1, 7) i; \
         SELECT pgmq.create('UpperCase_Q'); SELECT pgmq.send('UpperCase_Q', '{{}}'); \
         SELECT pgmq.create('d-queue'); \
         SELECT pgmq.create('{long}'); \
         SELECT pgmq.create('zz_last');"
    )))
    .execute(&db.pool)
    .await
    .expect("queues of another client");
    // Something to prune in the queue listed after the refused ones.
    sqlx::raw_sql(
        "SELECT pgmq.send('zz_last', '{}'); SELECT pgmq.archive('zz_last', 1); \
         UPDATE pgmq.a_zz_last SET archived_at = now() - interval '30 days'",
    )
    .execute(&db.pool)
    .await
    .expect("an old archived job");

    let out = cli(&["queues", "--json"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    let all = normalized(&String::from_utf8_lossy(&out.stdout));
    let find = |name: &str| {
        all.as_array()
            .expect("a list")
            .iter()
            .find(|q| q["queue"] == name)
            .unwrap_or_else(|| panic!("{name} listed: {all}"))
            .clone()
    };
    let plain = find("plain_pgmq");
    assert_eq!(plain["depth"], 7, "{plain}");
    assert_eq!(plain["visible"], 7, "{plain}");
    assert_eq!(
        plain["dead_letters"], 0,
        "no dead-letter queue is an empty one"
    );
    assert_eq!(plain["error"], Value::Null, "{plain}");
    let upper = find("UpperCase_Q");
    assert_eq!(upper["depth"], 1, "PGMQ's own count: {upper}");
    assert_eq!(upper["dead_letters"], Value::Null, "not a zero: {upper}");
    assert!(
        upper["error"]
            .as_str()
            .is_some_and(|e| e.contains("not served")),
        "{upper}"
    );
    for name in ["d-queue", long.as_str()] {
        assert!(find(name)["error"].is_string(), "{name}: {all}");
    }
    let out = cli(&["queues"], Some(&url));
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let row = table
        .lines()
        .find(|l| l.starts_with("plain_pgmq"))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1..3], ["7", "7"], "{table}");

    let out = cli(&["dlq", "list", "plain_pgmq", "--json"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        normalized(&String::from_utf8_lossy(&out.stdout)),
        serde_json::json!([])
    );
    let out = cli(&["dlq", "list", "plain_pgmq"], Some(&url));
    assert!(text(&out).contains("(none)"), "{}", text(&out));
    let out = cli(&["job", "show", "plain_pgmq", "3", "--json"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    let out = cli(&["dlq", "purge", "plain_pgmq", "--yes"], Some(&url));
    assert!(
        text(&out).contains("0 dead letters deleted"),
        "{}",
        text(&out)
    );
    // A queue that does not exist is not an empty one.
    let out = cli(&["dlq", "list", "no_such_queue"], Some(&url));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("\"no_such_queue\" does not exist"),
        "{}",
        text(&out)
    );

    // prune goes on past the queues it cannot prune, reports them, and exits 1 at the end.
    let out = cli(&["prune", "--archive-retention", "7d"], Some(&url));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("plain_pgmq: 0 archived"), "{said}");
    assert!(said.contains("UpperCase_Q: skipped"), "{said}");
    assert!(said.contains("zz_last: 1 archived"), "{said}");
    assert!(said.contains("3 queue(s) not pruned"), "{said}");
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.a_zz_last").await,
        0
    );
}

/// Typos and destructive commands: a missing queue is an error that leaves nothing behind;
/// deleting needs --yes, and --dry-run deletes nothing.
#[tokio::test]
async fn typos_fail_and_destructive_commands_need_yes() {
    let db = TestDb::setup().await;
    let url = db.url();
    operated(&db, "safe").await;
    for args in [
        vec!["pause", "eco_emial"],
        vec!["resume", "no_such_queue"],
        vec!["dlq", "show", "no_such_queue", "1"],
        vec!["job", "retry", "no_such_queue", "1"],
        vec!["dlq", "purge", "no_such_queue", "--yes"],
    ] {
        let out = cli(&args, Some(&url));
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("does not exist"),
            "{args:?}: {}",
            text(&out)
        );
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM apalis_pgmq.paused").await,
        0,
        "nothing left behind"
    );
    // Not interactive and no --yes: refused, nothing deleted.
    let out = cli(&["dlq", "purge", "safe"], Some(&url));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--yes"), "{}", text(&out));
    let out = cli(&["dlq", "purge", "safe", "--dry-run"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("2 dead letters would be deleted"),
        "{}",
        text(&out)
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_safe_dlq").await,
        2
    );
    let out = cli(&["drop-queue", "safe"], Some(&url));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = cli(&["drop-queue", "safe", "--dry-run"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("safe: 2 jobs in the queue, 0 archived, 2 dead letters"),
        "{}",
        text(&out)
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM pgmq.q_safe").await, 2);
    let out = cli(&["dlq", "purge", "safe", "--yes"], Some(&url));
    assert!(
        text(&out).contains("2 dead letters deleted"),
        "{}",
        text(&out)
    );
    let out = cli(&["drop-queue", "safe", "--yes"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    // Pausing a queue that exists still works, and resuming it.
    operated(&db, "real").await;
    let out = cli(&["pause", "real", "--json"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).expect("json"),
        serde_json::json!({"queue": "real", "paused": true, "changed": true})
    );
    assert!(cli(&["resume", "real"], Some(&url)).status.success());
    let out = cli(&["job", "retry", "real", "101", "--json"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    let moved = serde_json::from_slice::<Value>(&out.stdout).expect("json");
    assert_eq!(moved["old_id"], 101, "{moved}");
    assert!(
        moved["new_id"].as_i64().is_some_and(|n| n != 101),
        "{moved}"
    );
}

#[test]
fn a_non_postgres_url_and_a_zero_timeout_are_refused() {
    let out = cli(&["queues"], Some("mysql://root@127.0.0.1:1/db"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("postgres://"), "{}", text(&out));
    let out = cli(
        &["queues", "--connect-timeout", "0s"],
        Some("postgres://nobody@127.0.0.1:1/nothing"),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("more than zero"), "{}", text(&out));
}

/// Replay prints old -> new ids, and `job show` finds the job under its new id; every view
/// gives the same attempt count, as a number.
#[tokio::test]
async fn replay_prints_new_ids_and_attempts_agree() {
    let db = TestDb::setup().await;
    let url = db.url();
    operated(&db, "again").await;
    // A stale count in headers.apalis (1) beside the count at death (3): the latter wins.
    sqlx::query(
        "UPDATE pgmq.q_again_dlq SET headers = headers || '{\"apalis\": {\"attempts\": 1}}'",
    )
    .execute(&db.pool)
    .await
    .expect("stale header");
    let out = cli(&["dlq", "list", "again", "--json"], Some(&url));
    let list = normalized(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(list[0]["attempts"], 3, "{list}");
    assert_eq!(list[0]["queue"], "again", "{list}");
    let out = cli(&["dlq", "show", "again", "101", "--json"], Some(&url));
    let one = normalized(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(one["attempts"], 3, "{one}");
    let out = cli(&["dlq", "show", "again", "101"], Some(&url));
    assert!(text(&out).contains("attempts      3"), "{}", text(&out));
    let out = cli(&["dlq", "list", "again"], Some(&url));
    let table = text(&out);
    let row = table
        .lines()
        .find(|l| l.starts_with("101"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(" 3 "), "{table}");

    let out = cli(
        &["dlq", "replay", "again", "101", "102", "--json"],
        Some(&url),
    );
    assert!(out.status.success(), "{}", text(&out));
    let pairs = normalized(&String::from_utf8_lossy(&out.stdout));
    let pairs = pairs.as_array().expect("a list").clone();
    assert_eq!(pairs.len(), 2, "{pairs:?}");
    for p in &pairs {
        let (old, new) = (
            p["old_id"].as_i64().expect("old"),
            p["new_id"].as_i64().expect("new"),
        );
        let body: serde_json::Value =
            sqlx::query_scalar("SELECT message FROM pgmq.q_again WHERE msg_id = $1")
                .bind(new)
                .fetch_one(&db.pool)
                .await
                .expect("the new id is the replayed job");
        assert_eq!(body["n"], old, "dead job {old} came back as {new}");
        let out = cli(&["job", "show", "again", &new.to_string()], Some(&url));
        assert!(out.status.success(), "{}", text(&out));
    }
    let out = cli(&["dlq", "replay", "again", "--all"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
}

/// Routine work without psql: send, list by state, retry every retrying or dead job, purge
/// pending jobs, migration status, the offline SQL, a queue with priorities.
#[tokio::test]
async fn routine_work_needs_no_psql() {
    let db = TestDb::setup().await;
    let url = db.url();
    let out = cli(&["create-queue", "routine", "--priorities"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'pgmq' AND indexname = 'q_routine_prio_idx'"
        )
        .await,
        1,
        "{}",
        text(&out)
    );
    let out = cli(
        &[
            "send",
            "routine",
            r#"{"n": 1}"#,
            "--priority",
            "-5",
            "--max-attempts",
            "4",
            "--json",
        ],
        Some(&url),
    );
    assert!(out.status.success(), "{}", text(&out));
    let sent: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let id = sent["id"].as_i64().expect("an id");
    let headers: serde_json::Value =
        sqlx::query_scalar("SELECT headers FROM pgmq.q_routine WHERE msg_id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .expect("sent");
    assert_eq!(headers["apalis"]["priority"], -5);
    assert_eq!(headers["apalis"]["max_attempts"], 4);
    assert!(
        cli(
            &[
                "send",
                "routine",
                r#"{"n": 2}"#,
                "--delay",
                "1h",
                "--key",
                "k1"
            ],
            Some(&url)
        )
        .status
        .success()
    );
    let out = cli(&["send", "routine", "not json"], Some(&url));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // Two jobs waiting out a backoff (failed after their last read), one dead letter.
    sqlx::raw_sql(
        "SELECT pgmq.send('routine', '{\"n\": 3}'); SELECT pgmq.send('routine', '{\"n\": 4}'); \
         UPDATE pgmq.q_routine SET read_ct = 1, last_read_at = now() - interval '1 minute', \
                vt = now() + interval '1 hour', \
                headers = jsonb_build_object('apalis', jsonb_build_object('attempts', 1, \
                    'failed_epoch', extract(epoch FROM now()))) \
          WHERE message->>'n' IN ('3', '4'); \
         SELECT pgmq.create('routine_dlq'); \
         INSERT INTO pgmq.q_routine_dlq (vt, message, headers) VALUES (now(), '{\"n\": 5}', \
           '{\"apalis_dead_letter\": {\"reason\": \"failed\", \"attempts\": 2, \"msg_id\": 900}}'), \
           (now(), '{\"n\": 6}', \
           '{\"apalis_dead_letter\": {\"reason\": \"killed\", \"attempts\": 1, \"msg_id\": 901}}');",
    )
    .execute(&db.pool)
    .await
    .expect("retrying and dead jobs");
    let listed = |state: &str| {
        let out = cli(
            &["jobs", "list", "routine", "--state", state, "--json"],
            Some(&url),
        );
        assert!(out.status.success(), "{}", text(&out));
        normalized(&String::from_utf8_lossy(&out.stdout))
    };
    let retrying = listed("retrying");
    assert_eq!(retrying.as_array().map(Vec::len), Some(2), "{retrying}");
    assert_eq!(retrying[0]["state"], "retrying");
    assert_eq!(retrying[0]["attempts"], 1);
    assert_eq!(listed("scheduled").as_array().map(Vec::len), Some(1));
    assert_eq!(listed("dead").as_array().map(Vec::len), Some(1));
    let out = cli(
        &["jobs", "list", "routine", "--page-size", "2", "--page", "2"],
        Some(&url),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).starts_with("JOB  STATE"), "{}", text(&out));
    let out = cli(&["queues", "--json"], Some(&url));
    let q = normalized(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        (q[0]["running"].clone(), q[0]["retrying"].clone()),
        (json(0), json(2)),
        "{q}"
    );

    let out = cli(
        &["jobs", "retry", "routine", "--state", "retrying"],
        Some(&url),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("2 jobs retried"), "{}", text(&out));
    assert_eq!(listed("retrying").as_array().map(Vec::len), Some(0));
    let out = cli(
        &["jobs", "retry", "routine", "--state", "dead", "--json"],
        Some(&url),
    );
    let pairs = normalized(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(pairs.as_array().map(Vec::len), Some(1), "{pairs}");
    assert_eq!(pairs[0]["old_id"], 900, "killed jobs stay: {pairs}");
    assert_eq!(listed("killed").as_array().map(Vec::len), Some(1));

    // Pending now: 1, 3, 4 and the replayed 5; scheduled: 2.
    let out = cli(&["jobs", "purge", "routine"], Some(&url));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = cli(&["jobs", "purge", "routine", "--dry-run"], Some(&url));
    assert!(
        text(&out).contains("4 pending jobs would be deleted"),
        "{}",
        text(&out)
    );
    let out = cli(&["jobs", "purge", "routine", "--yes"], Some(&url));
    assert!(
        text(&out).contains("4 pending jobs deleted"),
        "{}",
        text(&out)
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_routine").await,
        1
    );

    let out = cli(&["migrate", "--status"], Some(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("baseline") && text(&out).contains("applied"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("pending"), "{}", text(&out));
    let out = cli(&["migrate", "--print-sql"], None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("-- migration 1 (baseline)"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("CREATE OR REPLACE FUNCTION apalis_pgmq.priority_of"));
    // PGMQ's own SQL is not printed (the pgmq crate does not expose it); the step is named.
    assert!(
        text(&out).contains("CREATE EXTENSION pgmq"),
        "{}",
        text(&out)
    );
}

fn json(n: i64) -> serde_json::Value {
    serde_json::json!(n)
}
