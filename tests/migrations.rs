//! The migration history: the baseline against the development history it replaced (kept in
//! `tests/fixtures/pre-baseline/`), the upgrade of a database that applied that history, and
//! the SQL `generate-migration` writes, each compared object by object with a database that
//! `setup()` prepared.

mod common;

use std::time::Duration;

use apalis::prelude::*;
use apalis_pgmq_notify::{
    Config, NotifyChannels, NotifyMode, PgmqStorage, QueueName, notify_migration_sql,
    pending_migrations, setup, testing::migration_checksum,
};
use common::{TestDb, count, drained, stop_worker};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(60);

/// The eleven migrations of the development versions before 0.1.0, as they were last.
const PRE_BASELINE: [(&str, &str); 11] = [
    ("init", include_str!("fixtures/pre-baseline/0001_init.sql")),
    (
        "notify",
        include_str!("fixtures/pre-baseline/0002_notify.sql"),
    ),
    (
        "wakeups",
        include_str!("fixtures/pre-baseline/0003_wakeups.sql"),
    ),
    (
        "retry_headers",
        include_str!("fixtures/pre-baseline/0004_retry_headers.sql"),
    ),
    (
        "queue_name_rule",
        include_str!("fixtures/pre-baseline/0005_queue_name_rule.sql"),
    ),
    (
        "registry",
        include_str!("fixtures/pre-baseline/0006_registry.sql"),
    ),
    (
        "operations",
        include_str!("fixtures/pre-baseline/0007_operations.sql"),
    ),
    (
        "partitions",
        include_str!("fixtures/pre-baseline/0008_partitions.sql"),
    ),
    (
        "unique_keys",
        include_str!("fixtures/pre-baseline/0009_unique_keys.sql"),
    ),
    (
        "priorities",
        include_str!("fixtures/pre-baseline/0010_priorities.sql"),
    ),
    (
        "results",
        include_str!("fixtures/pre-baseline/0011_results.sql"),
    ),
];

/// A database as the development versions' `setup()` left it: PGMQ, then each old migration in
/// its own transaction, recorded with its name and checksum.
async fn pre_baseline_db() -> TestDb {
    let db = TestDb::fresh().await;
    pgmq::install::install_sql_from_embedded(&db.pool)
        .await
        .expect("PGMQ");
    sqlx::raw_sql(
        "CREATE SCHEMA IF NOT EXISTS apalis_pgmq; \
         CREATE TABLE IF NOT EXISTS apalis_pgmq.schema_migrations ( \
             version integer PRIMARY KEY, \
             name text NOT NULL, \
             checksum bigint NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&db.pool)
    .await
    .expect("migrations table");
    for (i, (name, sql)) in PRE_BASELINE.iter().enumerate() {
        let mut tx = db.pool.begin().await.expect("begin");
        sqlx::raw_sql(*sql)
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("old migration {name}: {e}"));
        sqlx::query(
            "INSERT INTO apalis_pgmq.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
        )
        .bind(i32::try_from(i + 1).expect("small"))
        .bind(*name)
        .bind(migration_checksum(sql))
        .execute(&mut *tx)
        .await
        .expect("record");
        tx.commit().await.expect("commit");
    }
    db
}

/// Every object of schema `apalis_pgmq`, one line each (a function with its whole definition),
/// sorted: functions (`pg_get_functiondef`, rights), tables, sequences and indexes (kind,
/// persistence, rights, comments), columns (type, nullability, default), constraints, index
/// definitions, sequence parameters, triggers, types, and the schema's comment and rights.
const SCHEMA_OBJECTS: &str = "\
SELECT 'function ' || p.oid::regprocedure::text || ' acl=' || coalesce(p.proacl::text, '-') \
       || ' comment=' || coalesce(obj_description(p.oid, 'pg_proc'), '-') || E'\\n' \
       || pg_get_functiondef(p.oid) \
  FROM pg_proc p WHERE p.pronamespace = 'apalis_pgmq'::regnamespace \
UNION ALL \
SELECT 'relation ' || c.relname || ' kind=' || c.relkind::text || ' persistence=' || c.relpersistence::text \
       || ' acl=' || coalesce(c.relacl::text, '-') \
       || ' comment=' || coalesce(obj_description(c.oid, 'pg_class'), '-') \
  FROM pg_class c WHERE c.relnamespace = 'apalis_pgmq'::regnamespace \
UNION ALL \
SELECT 'column ' || c.relname || '.' || a.attname || ' #' || a.attnum || ' ' \
       || format_type(a.atttypid, a.atttypmod) \
       || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END \
       || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '') \
       || coalesce(' comment=' || col_description(c.oid, a.attnum), '') \
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
 WHERE c.relnamespace = 'apalis_pgmq'::regnamespace AND c.relkind IN ('r', 'p') \
   AND a.attnum > 0 AND NOT a.attisdropped \
UNION ALL \
SELECT 'constraint ' || c.relname || '.' || k.conname || ' ' || pg_get_constraintdef(k.oid) \
  FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid \
 WHERE c.relnamespace = 'apalis_pgmq'::regnamespace \
UNION ALL \
SELECT 'index ' || pg_get_indexdef(i.indexrelid) \
  FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
 WHERE c.relnamespace = 'apalis_pgmq'::regnamespace \
UNION ALL \
SELECT 'sequence ' || s.sequencename || ' ' || s.data_type::text || ' start=' || s.start_value \
       || ' min=' || s.min_value || ' max=' || s.max_value || ' increment=' || s.increment_by \
       || ' cycle=' || s.cycle || ' cache=' || s.cache_size \
  FROM pg_sequences s WHERE s.schemaname = 'apalis_pgmq' \
UNION ALL \
SELECT 'trigger ' || t.tgname || ' on ' || t.tgrelid::regclass::text \
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
 WHERE c.relnamespace = 'apalis_pgmq'::regnamespace AND NOT t.tgisinternal \
UNION ALL \
SELECT 'type ' || t.typname || ' ' || t.typtype::text \
  FROM pg_type t WHERE t.typnamespace = 'apalis_pgmq'::regnamespace \
   AND t.typrelid = 0 AND t.typelem = 0 \
UNION ALL \
SELECT 'schema comment=' || coalesce(obj_description(n.oid, 'pg_namespace'), '-') \
       || ' acl=' || coalesce(n.nspacl::text, '-') \
  FROM pg_namespace n WHERE n.nspname = 'apalis_pgmq' \
ORDER BY 1";

async fn schema_objects(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(SCHEMA_OBJECTS)
        .fetch_all(pool)
        .await
        .expect("read the catalog")
}

/// Asserts two object lists are equal, naming the first objects that differ.
fn assert_same(left: &[String], right: &[String], what: &str) {
    let only_left: Vec<&String> = left.iter().filter(|o| !right.contains(o)).collect();
    let only_right: Vec<&String> = right.iter().filter(|o| !left.contains(o)).collect();
    assert!(
        only_left.is_empty() && only_right.is_empty(),
        "{what}:\n--- only in the first:\n{}\n--- only in the second:\n{}",
        only_left
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n\n"),
        only_right
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n\n")
    );
    assert_eq!(left, right, "{what}");
}

async fn recorded(pool: &PgPool) -> Vec<(i32, String, i64)> {
    sqlx::query_as("SELECT version, name, checksum FROM apalis_pgmq.schema_migrations ORDER BY 1")
        .fetch_all(pool)
        .await
        .expect("migration rows")
}

/// A job with an idempotency key (a second push of the key is a duplicate), a job with a
/// priority (`Config::priorities(true)`), and a job whose result is stored and waited for
/// (`push_and_wait`), all run by a worker on `queue`.
async fn a_job_of_each_kind_runs(db: &TestDb, queue: &str) {
    let s: PgmqStorage<u32> = PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        Config::default().priorities(true),
    )
    .expect("config");
    s.create_queue().await.expect("create the queue");
    let mut conn = db.pool.acquire().await.expect("conn");
    let keyed = |n: u32| TaskBuilder::new(n).idempotency_key("once").build();
    let first = s
        .push_task_with(&mut conn, keyed(1))
        .await
        .expect("keyed push");
    let again = s
        .push_task_with(&mut conn, keyed(2))
        .await
        .expect("keyed push again");
    assert!(!first.is_duplicate(), "{first:?}");
    assert!(again.is_duplicate(), "the key is taken: {again:?}");
    assert_eq!(again.id(), first.id());
    s.push_task_with(&mut conn, TaskBuilder::new(3).priority(5).build())
        .await
        .expect("push with a priority");
    drop(conn);
    for index in ["key_idx", "prio_idx"] {
        let sql = format!("SELECT count(*) FROM pg_class WHERE relname = 'q_{queue}_{index}'");
        assert_eq!(count(&db.pool, &sql).await, 1, "{index}");
    }
    let worker = WorkerBuilder::new(format!("{queue}-worker"))
        .backend(s.clone())
        .build(|n: u32| async move { Ok::<u64, BoxDynError>(u64::from(n) * 10) });
    let (stop, join) = spawn_worker!(worker);
    let r = s
        .push_and_wait::<u64>(
            apalis_core::task::builder::TaskBuilder::new(4).build(),
            WAIT,
        )
        .await
        .expect("the stored result");
    assert_eq!(r.status, Status::Done);
    assert_eq!(r.result, Ok(40));
    drained(&db.pool, queue).await;
    stop_worker(stop, join).await;
    let archived = format!("SELECT count(*) FROM pgmq.a_{queue}");
    assert_eq!(count(&db.pool, &archived).await, 3, "three jobs ran");
    let results = format!("SELECT count(*) FROM apalis_pgmq.results WHERE queue = '{queue}'");
    assert_eq!(count(&db.pool, &results).await, 1, "one result kept");
}

#[tokio::test]
async fn the_baseline_defines_what_the_old_history_did() {
    let old = pre_baseline_db().await;
    // The baseline alone (later migrations change the schema on purpose).
    let new = TestDb::fresh().await;
    pgmq::install::install_sql_from_embedded(&new.pool)
        .await
        .expect("PGMQ");
    sqlx::raw_sql(
        "CREATE SCHEMA IF NOT EXISTS apalis_pgmq; \
         CREATE TABLE IF NOT EXISTS apalis_pgmq.schema_migrations ( \
             version integer PRIMARY KEY, \
             name text NOT NULL, \
             checksum bigint NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&new.pool)
    .await
    .expect("migrations table");
    sqlx::raw_sql(include_str!("../migrations/0001_baseline.sql"))
        .execute(&new.pool)
        .await
        .expect("baseline");
    let (old_objects, new_objects) = (
        schema_objects(&old.pool).await,
        schema_objects(&new.pool).await,
    );
    // Code (comments in function bodies included), tables, indexes, sequences, rights: the
    // same. The baseline rewrote only the comments outside function bodies, and no object of
    // the old history was dead, so none is gone.
    assert_same(
        &old_objects,
        &new_objects,
        "the old history and the baseline define different objects",
    );
    assert!(new_objects.len() > 40, "{}", new_objects.len());
}

#[tokio::test]
async fn setup_upgrades_a_database_of_the_old_history() {
    let db = pre_baseline_db().await;
    // A queue from before, with its notification trigger and a job waiting.
    sqlx::raw_sql(
        "SELECT pgmq.create('legacy'); \
         SELECT apalis_pgmq.enable_notify('legacy', 'apq.q.legacy', 'apq.ns.default'); \
         SELECT pgmq.send('legacy', '7'::jsonb);",
    )
    .execute(&db.pool)
    .await
    .expect("an old queue");
    let old_rows = recorded(&db.pool).await;
    assert_eq!(old_rows.len(), 11);

    // What a later setup() would do: apply the baseline.
    let pending = pending_migrations(&db.pool).await.expect("pending");
    assert_eq!(
        pending
            .iter()
            .map(|m| (m.version, m.name))
            .collect::<Vec<_>>(),
        vec![
            (1, "baseline"),
            (2, "notify_at_commit"),
            (3, "keys_and_rights"),
            (4, "claim_log")
        ]
    );
    // The generated SQL does not guess: it says to run setup().
    let script = notify_migration_sql(&[], &NotifyChannels::default(), NotifyMode::Batch, false)
        .expect("sql");
    let err = sqlx::raw_sql(sqlx::AssertSqlSafe(script))
        .execute(&db.pool)
        .await
        .expect_err("the generated SQL refuses the old history");
    assert!(err.to_string().contains("setup()"), "{err}");
    assert_eq!(recorded(&db.pool).await, old_rows, "nothing changed");

    let report = setup(&db.pool).await.expect("setup upgrades");
    assert_eq!(report.applied_migrations, vec![1, 2, 3, 4]);
    let rows = recorded(&db.pool).await;
    assert_eq!(rows.len(), 4, "the old rows are replaced: {rows:?}");
    assert_eq!((rows[0].0, rows[0].1.as_str()), (1, "baseline"));
    assert_eq!((rows[1].0, rows[1].1.as_str()), (2, "notify_at_commit"));
    assert_eq!((rows[2].0, rows[2].1.as_str()), (3, "keys_and_rights"));
    assert_eq!((rows[3].0, rows[3].1.as_str()), (4, "claim_log"));
    assert!(
        pending_migrations(&db.pool)
            .await
            .expect("pending")
            .is_empty()
    );
    assert!(
        setup(&db.pool)
            .await
            .expect("again")
            .applied_migrations
            .is_empty()
    );

    // Exactly what a fresh setup() makes, comments included.
    let fresh = TestDb::setup().await;
    assert_same(
        &schema_objects(&db.pool).await,
        &schema_objects(&fresh.pool).await,
        "an upgraded database differs from a fresh one",
    );
    assert_eq!(recorded(&db.pool).await, recorded(&fresh.pool).await);

    // The old queue's job runs, and new jobs of every kind do.
    let s: PgmqStorage<u32> =
        PgmqStorage::new(&db.runtime(), QueueName::new("legacy").expect("name"));
    let worker = WorkerBuilder::new("legacy-worker")
        .backend(s)
        .build(|_: u32| async move { Ok::<(), BoxDynError>(()) });
    let (stop, join) = spawn_worker!(worker);
    drained(&db.pool, "legacy").await;
    stop_worker(stop, join).await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.a_legacy").await,
        1
    );
    a_job_of_each_kind_runs(&db, "after_upgrade").await;
}

#[tokio::test]
async fn a_partial_old_history_is_refused() {
    let db = pre_baseline_db().await;
    sqlx::query("DELETE FROM apalis_pgmq.schema_migrations WHERE version > 8")
        .execute(&db.pool)
        .await
        .expect("forget the last three");
    let err = setup(&db.pool).await.expect_err("refused");
    assert!(err.to_string().contains("development version"), "{err}");
    assert!(pending_migrations(&db.pool).await.is_err());
    assert_eq!(recorded(&db.pool).await.len(), 8, "nothing changed");
}

#[tokio::test]
async fn the_generated_sql_alone_prepares_a_database() {
    let db = TestDb::fresh().await;
    // A project that installs PGMQ itself and runs the generated SQL as its own migration.
    pgmq::install::install_sql_from_embedded(&db.pool)
        .await
        .expect("PGMQ");
    let script = notify_migration_sql(&[], &NotifyChannels::default(), NotifyMode::Batch, false)
        .expect("sql");
    for _ in 0..2 {
        // Applied in one transaction, as migration tools do; the second time changes nothing.
        let mut tx = db.pool.begin().await.expect("begin");
        sqlx::raw_sql(sqlx::AssertSqlSafe(script.clone()))
            .execute(&mut *tx)
            .await
            .expect("apply the generated SQL");
        tx.commit().await.expect("commit");
    }
    let fresh = TestDb::setup().await;
    assert_same(
        &schema_objects(&db.pool).await,
        &schema_objects(&fresh.pool).await,
        "the generated SQL and setup() prepare different schemas",
    );
    assert_eq!(recorded(&db.pool).await, recorded(&fresh.pool).await);
    assert!(
        pending_migrations(&db.pool)
            .await
            .expect("pending")
            .is_empty()
    );

    a_job_of_each_kind_runs(&db, "generated").await;

    let report = setup(&db.pool).await.expect("setup");
    assert!(
        report.applied_migrations.is_empty(),
        "setup finds every migration applied: {report:?}"
    );
}

#[tokio::test]
async fn the_generated_sql_refuses_an_edited_migration() {
    let db = TestDb::setup().await;
    sqlx::query("UPDATE apalis_pgmq.schema_migrations SET checksum = checksum + 1")
        .execute(&db.pool)
        .await
        .expect("tamper");
    let script = notify_migration_sql(&[], &NotifyChannels::default(), NotifyMode::Batch, false)
        .expect("sql");
    let err = sqlx::raw_sql(sqlx::AssertSqlSafe(script))
        .execute(&db.pool)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("another text"), "{err}");
}
