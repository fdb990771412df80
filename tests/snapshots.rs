//! Old snapshots: `snapshot_holders` finds a session holding a snapshot, with its pid, age,
//! application name and query, and stops listing it once it ends.

mod common;

use std::time::Duration;

use apalis_pgmq_notify::snapshot_holders;
use common::{TestDb, wait_for};
use sqlx::{Connection, Executor, PgConnection};

#[tokio::test]
async fn a_held_snapshot_is_found_with_its_pid_age_and_query() {
    let db = TestDb::setup().await;
    let mut holder =
        PgConnection::connect_with(&db.options.clone().application_name("forgotten-psql"))
            .await
            .expect("connect");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .expect("pid");
    holder
        .execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .expect("begin");
    let _: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_class")
        .fetch_one(&mut holder)
        .await
        .expect("take the snapshot");
    let found = wait_for(
        Duration::from_secs(10),
        "the holder to be listed",
        || async {
            let found = snapshot_holders(&db.pool).await.expect("snapshot_holders");
            found
                .holders
                .iter()
                .find(|h| h.pid == Some(pid) && h.held.is_some_and(|d| d > Duration::ZERO))
                .cloned()
                .map(|h| (h, found.sees_all))
        },
    )
    .await;
    let (h, sees_all) = found;
    assert_eq!(h.kind, "session");
    assert_eq!(h.application.as_deref(), Some("forgotten-psql"));
    assert_eq!(h.state.as_deref(), Some("idle in transaction"));
    assert!(
        h.query.as_deref().is_some_and(|q| q.contains("pg_class")),
        "{h:?}"
    );
    assert!(h.xids >= 0);
    assert!(sees_all, "the test role is a superuser");
    holder.execute("COMMIT").await.expect("commit");
    wait_for(Duration::from_secs(10), "the holder to be gone", || async {
        let found = snapshot_holders(&db.pool).await.expect("snapshot_holders");
        (!found.holders.iter().any(|h| h.pid == Some(pid))).then_some(())
    })
    .await;
}
