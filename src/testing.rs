//! The statements that write about claimed messages, callable on their own: for the tests that
//! race them against each other on a real database. Not part of the API.

use sqlx::PgPool;

use crate::{
    error::Result,
    queue::{Outcomes, PgmqQueue},
};

pub use crate::queue::Renewal;

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
    Ok(queue.renew_leases(pool, batch, secs).await?)
}

/// Releases `batch`: visible now, the read given back; the ids released, sorted.
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) if the statement fails.
pub async fn release(pool: &PgPool, queue: &PgmqQueue, batch: &[(i64, i32)]) -> Result<Vec<i64>> {
    Ok(queue.release_leases(pool, batch).await?)
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
    let mut o = Outcomes::default();
    for (id, ct) in batch {
        o.msg_ids.push(*id);
        o.read_cts.push(*ct);
        o.actions.push(1);
        o.delays.push(0.0);
        o.infos.push(None);
        o.attempts.push(*ct);
        o.errors.push(None);
    }
    let (ids, _) = queue.complete(pool, o, "").await?;
    Ok(ids)
}
