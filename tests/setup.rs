//! `setup`: PGMQ installation and detection, the project's own migrations.

mod common;

use apalis_pgmq_notify::{Error, PgmqSource, setup};
use common::{TestDb, count};
use serde_json::{Value, json};

/// The PGMQ version whose SQL the `pgmq` crate in Cargo.lock embeds, which `setup()` installs
/// where PGMQ is absent.
const EMBEDDED_PGMQ: &str = "1.13.0";

#[tokio::test]
async fn setup_installs_the_pgmq_version_we_tested() {
    let db = TestDb::fresh().await;
    let report = setup(&db.pool).await.expect("setup");
    assert_eq!(report.pgmq_source, PgmqSource::InstalledNow);
    let recorded: String = sqlx::query_scalar(
        "SELECT version FROM pgmq.__pgmq_migrations \
         ORDER BY string_to_array(version, '.')::int[] DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .expect("PGMQ's own record of its version");
    assert_eq!(
        (report.pgmq_version.as_str(), recorded.as_str()),
        (EMBEDDED_PGMQ, EMBEDDED_PGMQ),
        "the `pgmq` crate now installs another PGMQ version: read PGMQ's changes since \
         {EMBEDDED_PGMQ} (the SQL in src/queue/ mirrors its functions), run the whole suite, and \
         update EMBEDDED_PGMQ, the README and the CHANGELOG"
    );
}

#[tokio::test]
async fn installs_pgmq_then_is_idempotent() {
    let db = TestDb::fresh().await;
    let first = setup(&db.pool).await.expect("first setup");
    assert_eq!(first.pgmq_source, PgmqSource::InstalledNow);
    assert_eq!(first.pgmq_version, EMBEDDED_PGMQ);
    assert_eq!(first.applied_migrations, vec![1, 2, 3, 4]);

    let second = setup(&db.pool).await.expect("second setup");
    assert_eq!(second.pgmq_source, PgmqSource::SqlInstall);
    assert_eq!(second.pgmq_version, EMBEDDED_PGMQ);
    assert!(second.applied_migrations.is_empty());

    // Our history lives in our schema, never in public._sqlx_migrations.
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM apalis_pgmq.schema_migrations"
        )
        .await,
        4
    );
    let sqlx_table: bool =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .expect("query");
    assert!(!sqlx_table);
    // PGMQ's SQL API is usable.
    let v: String = sqlx::query_scalar("SELECT pgmq.format_table_name('x', 'q')")
        .fetch_one(&db.pool)
        .await
        .expect("pgmq function");
    assert_eq!(v, "q_x");
}

#[tokio::test]
async fn concurrent_setups_serialise() {
    let db = TestDb::fresh().await;
    let mut handles = Vec::new();
    for _ in 0..6 {
        let pool = db.pool.clone();
        handles.push(tokio::spawn(async move { setup(&pool).await }));
    }
    let mut installed_now = 0;
    let mut applied = 0;
    for h in handles {
        let report = h.await.expect("join").expect("setup");
        if report.pgmq_source == PgmqSource::InstalledNow {
            installed_now += 1;
        }
        applied += report.applied_migrations.len();
    }
    assert_eq!(installed_now, 1, "PGMQ installed exactly once");
    assert_eq!(applied, 4, "each migration applied exactly once");
}

#[tokio::test]
async fn setup_with_pool_of_one_connection_does_not_deadlock() {
    let db = TestDb::fresh().await;
    let pool = db.pool_with(1).await;
    tokio::time::timeout(std::time::Duration::from_secs(60), setup(&pool))
        .await
        .expect("setup finished")
        .expect("setup ok");
}

#[tokio::test]
async fn uses_an_existing_sql_install() {
    let db = TestDb::fresh().await;
    pgmq::install::install_sql_from_embedded(&db.pool)
        .await
        .expect("install PGMQ the way another application would");
    let report = setup(&db.pool).await.expect("setup");
    assert_eq!(report.pgmq_source, PgmqSource::SqlInstall);
    assert_eq!(report.pgmq_version, EMBEDDED_PGMQ);
}

#[tokio::test]
async fn too_old_pgmq_is_refused_with_its_version() {
    let db = TestDb::fresh().await;
    sqlx::raw_sql(
        "CREATE SCHEMA pgmq;
         CREATE TABLE pgmq.meta (queue_name varchar UNIQUE NOT NULL, is_partitioned boolean NOT NULL,
                                 is_unlogged boolean NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE pgmq.__pgmq_migrations (name text PRIMARY KEY, version text NOT NULL,
                                              run_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO pgmq.__pgmq_migrations (name, version) VALUES ('pgmq.sql', '1.4.0'),
                                                                   ('pgmq--1.4.0--1.4.1.sql', '1.4.1');",
    )
    .execute(&db.pool)
    .await
    .expect("fake an old install");
    let err = setup(&db.pool).await.expect_err("old PGMQ must be refused");
    match &err {
        Error::PgmqTooOld { found, required } => {
            assert_eq!(found, "1.4.1");
            assert_eq!(*required, "1.10.0");
        }
        other => panic!("unexpected error: {other}"),
    }
    let text = err.to_string();
    assert!(text.contains("1.4.1") && text.contains("1.10.0"), "{text}");
    // Nothing of ours was created.
    let ours: bool = sqlx::query_scalar("SELECT to_regnamespace('apalis_pgmq') IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .expect("query");
    assert!(!ours);
}

#[tokio::test]
async fn unversioned_old_install_is_refused() {
    let db = TestDb::fresh().await;
    sqlx::raw_sql(
        "CREATE SCHEMA pgmq;
         CREATE TABLE pgmq.meta (queue_name varchar UNIQUE NOT NULL, is_partitioned boolean NOT NULL,
                                 is_unlogged boolean NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
         CREATE TYPE pgmq.message_record AS (msg_id bigint, read_ct integer, enqueued_at timestamptz,
                                             vt timestamptz, message jsonb, headers jsonb);",
    )
    .execute(&db.pool)
    .await
    .expect("fake an old unversioned install");
    let err = setup(&db.pool).await.expect_err("must be refused");
    assert!(matches!(err, Error::PgmqTooOld { .. }), "{err}");
    assert!(err.to_string().contains("1.10.0"));
}

#[tokio::test]
async fn edited_migration_is_detected() {
    let db = TestDb::setup().await;
    sqlx::query(
        "UPDATE apalis_pgmq.schema_migrations SET checksum = checksum + 1 WHERE version = 1",
    )
    .execute(&db.pool)
    .await
    .expect("tamper");
    let err = setup(&db.pool).await.expect_err("checksum mismatch");
    assert!(matches!(err, Error::Migration { version: 1, .. }), "{err}");
}

#[tokio::test]
async fn dead_letter_headers_keep_the_original() {
    let db = TestDb::setup().await;
    let info = json!({"reason": "failed", "error": "boom"});
    let cases = [
        (json!({"a": 1}), json!({"a": 1, "apalis_dead_letter": info})),
        (Value::Null, json!({"apalis_dead_letter": info})),
        (
            json!([1, 2]),
            json!({"original_headers": [1, 2], "apalis_dead_letter": info}),
        ),
        (
            json!("text"),
            json!({"original_headers": "text", "apalis_dead_letter": info}),
        ),
    ];
    for (headers, expected) in cases {
        let got: Value = sqlx::query_scalar("SELECT apalis_pgmq.dead_letter_headers($1, $2)")
            .bind(&headers)
            .bind(&info)
            .fetch_one(&db.pool)
            .await
            .expect("call");
        assert_eq!(got, expected, "headers {headers}");
    }
    let sql_null: Value =
        sqlx::query_scalar("SELECT apalis_pgmq.dead_letter_headers(NULL::jsonb, $1)")
            .bind(&info)
            .fetch_one(&db.pool)
            .await
            .expect("call");
    assert_eq!(sql_null, json!({"apalis_dead_letter": info}));
}
