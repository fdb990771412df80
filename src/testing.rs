//! Hooks for the tests, only with the `testing` feature; not part of the API: the statements that
//! write about claimed messages, callable on their own, for the tests that race them against each
//! other on a real database (tests/locks.rs), their SQL text for the plan tests (tests/plans.rs),
//! the migration checksum (tests/migrations.rs), and a storage's claim floor (tests/floor.rs).

use std::time::Duration;

use sqlx::PgPool;

use crate::{
    error::Result,
    queue::{Action, Delivery, Outcome, PgmqQueue},
};

pub use crate::queue::Renewal;

fn deliveries(batch: &[(i64, i32)]) -> Vec<Delivery> {
    batch
        .iter()
        .map(|&(msg_id, read_ct)| Delivery { msg_id, read_ct })
        .collect()
}

/// Renews the leases of `batch` (`(msg_id, read_ct)`) for `secs`, without waiting for rows
/// another transaction holds (reported busy).
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) if the statement fails.
pub async fn renew(
    pool: &PgPool,
    queue: &PgmqQueue,
    batch: &[(i64, i32)],
    secs: f64,
) -> Result<Renewal> {
    let mut conn = pool.acquire().await?;
    queue
        .renew(&mut conn, &deliveries(batch), Duration::from_secs_f64(secs))
        .await
}

/// Releases `batch`: visible now, the read given back; the ids released, sorted.
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) if the statement fails.
pub async fn release(pool: &PgPool, queue: &PgmqQueue, batch: &[(i64, i32)]) -> Result<Vec<i64>> {
    let mut conn = pool.acquire().await?;
    queue.release(&mut conn, &deliveries(batch)).await
}

/// Writes "done, archive" for every delivery of `batch` in one outcome statement, as the
/// completer does; the ids it matched.
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) if the statement fails.
pub async fn archive_outcomes(
    pool: &PgPool,
    queue: &PgmqQueue,
    batch: &[(i64, i32)],
) -> Result<Vec<i64>> {
    let outcomes: Vec<Outcome> = deliveries(batch)
        .into_iter()
        .map(|delivery| Outcome {
            delivery,
            action: Action::Archive,
            attempts: delivery.read_ct,
            error: None,
            result: None,
        })
        .collect();
    let mut conn = pool.acquire().await?;
    Ok(queue.complete(&mut conn, &outcomes, false, "").await?)
}

/// The SQL text of the lease protocol's statements on `queue`, by name (`claim`,
/// `claim_priority`, `read`, `complete`, `complete_results`, `renew`, `release`,
/// `set_vt_many`, `archive`, `delete`), exactly as the crate sends them, for the tests that
/// `EXPLAIN` them (tests/plans.rs).
#[must_use]
pub fn lease_statements(queue: &PgmqQueue) -> Vec<(&'static str, String)> {
    queue
        .lease_statements()
        .into_iter()
        .map(|(name, sql)| (name, sql.to_string()))
        .collect()
}

/// The checksum `setup` records for a migration's text (for the tests of the migration
/// history).
#[must_use]
pub fn migration_checksum(sql: &str) -> i64 {
    crate::migrate::checksum(sql)
}

/// The claim floor a storage's worker has learned (`None`: none yet, or off): claims in
/// visibility order read the `vt` index from there (see `backend/floor.rs`).
#[must_use]
pub fn claim_floor<Args, C>(
    storage: &crate::PgmqStorage<Args, C>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    storage.claim_floor()
}

/// The sweeps below a storage's claim floor that ran, and those that found a visible job there
/// (see `backend/floor.rs`).
#[must_use]
pub fn claim_floor_sweeps<Args, C>(storage: &crate::PgmqStorage<Args, C>) -> (u64, u64) {
    storage.claim_floor_sweeps()
}

/// Messages a storage's worker gave back from claims whose answer it lost (see
/// `backend/lost.rs`).
#[must_use]
pub fn lost_claims_released<Args, C>(storage: &crate::PgmqStorage<Args, C>) -> u64 {
    storage.lost_claims_released()
}
