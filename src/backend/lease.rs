//! Leases: the messages this process has claimed, and the keeper that renews them.
//!
//! Every claimed message is in the [`LeaseTable`] from the read that claimed it until its outcome
//! is written (or it is released). The keeper renews the visibility time of all of them in one
//! statement whenever the oldest has used a third of the visibility timeout, so a job that runs
//! longer than the timeout is never delivered to another worker while it runs. Renewal and
//! completion are fenced by `read_ct`: if the message was delivered again after a lost lease, the
//! stale holder's writes match no row.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sqlx::{AssertSqlSafe, PgPool};
use tokio::{sync::Notify, time::Instant};

use crate::queue::QueueName;

/// One claimed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    /// The `read_ct` of our delivery: the fencing token for every write about this message.
    pub(crate) read_ct: i32,
    /// When our claim lapses at the latest (a local, conservative estimate of `vt`).
    pub(crate) expires: Instant,
}

/// The messages this process holds for one queue.
#[derive(Debug, Default)]
pub(crate) struct LeaseTable {
    leases: Mutex<HashMap<i64, Lease>>,
    /// Wakes the keeper when a lease is added or the table is closed.
    changed: Notify,
    closed: AtomicBool,
}

impl LeaseTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<i64, Lease>> {
        self.leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn insert_many(&self, items: impl IntoIterator<Item = (i64, Lease)>) {
        self.lock().extend(items);
        self.changed.notify_one();
    }

    /// Removes the lease if it is still ours for this delivery.
    pub(crate) fn remove(&self, msg_id: i64, read_ct: i32) -> bool {
        let mut leases = self.lock();
        if leases.get(&msg_id).is_some_and(|l| l.read_ct == read_ct) {
            leases.remove(&msg_id);
            true
        } else {
            false
        }
    }

    pub(crate) fn get(&self, msg_id: i64) -> Option<Lease> {
        self.lock().get(&msg_id).copied()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.lock().values().map(|l| l.expires).min()
    }

    fn expiring_before(&self, deadline: Instant) -> Vec<(i64, i32)> {
        self.lock()
            .iter()
            .filter(|(_, l)| l.expires <= deadline)
            .map(|(id, l)| (*id, l.read_ct))
            .collect()
    }

    fn renewed(&self, batch: &[(i64, i32)], renewed: &[i64], expires: Instant) {
        let mut leases = self.lock();
        for (id, read_ct) in batch {
            let still_ours = renewed.binary_search(id).is_ok();
            if let Some(lease) = leases.get_mut(id) {
                if lease.read_ct != *read_ct {
                    continue;
                }
                if still_ours {
                    lease.expires = expires;
                } else {
                    // Completed meanwhile, or the message is gone: nothing left to renew.
                    leases.remove(id);
                }
            }
        }
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.changed.notify_one();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// `UPDATE ... SET vt = now + vt` for a batch of `(msg_id, read_ct)`, fenced by `read_ct`.
pub(crate) fn renew_sql(queue: &QueueName) -> Arc<str> {
    let q = queue.queue_table();
    format!(
        "UPDATE {q} m SET vt = clock_timestamp() + make_interval(secs => $3::float8) \
         FROM unnest($1::bigint[], $2::int[]) AS t(msg_id, read_ct) \
         WHERE m.msg_id = t.msg_id AND m.read_ct = t.read_ct RETURNING m.msg_id"
    )
    .into()
}

/// Makes claimed-but-unstarted messages visible at once and gives back the read they cost
/// (`read_ct - 1`), so a release does not count as an attempt.
pub(crate) fn release_sql(queue: &QueueName) -> Arc<str> {
    let q = queue.queue_table();
    format!(
        "UPDATE {q} m SET vt = clock_timestamp(), read_ct = m.read_ct - 1 \
         FROM unnest($1::bigint[], $2::int[]) AS t(msg_id, read_ct) \
         WHERE m.msg_id = t.msg_id AND m.read_ct = t.read_ct RETURNING m.msg_id"
    )
    .into()
}

/// Runs a `(msg_id, read_ct)` batch statement; returns the ids it matched, sorted.
pub(crate) async fn run_fenced(
    pool: &PgPool,
    sql: &Arc<str>,
    batch: &[(i64, i32)],
    secs: f64,
) -> Result<Vec<i64>, sqlx::Error> {
    let ids: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
    let cts: Vec<i32> = batch.iter().map(|(_, ct)| *ct).collect();
    let mut done: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
        .bind(ids)
        .bind(cts)
        .bind(secs)
        .fetch_all(pool)
        .await?;
    done.sort_unstable();
    Ok(done)
}

/// Renews leases until the table is closed. Runs no query while the table is empty.
pub(crate) async fn keeper(table: Arc<LeaseTable>, pool: PgPool, sql: Arc<str>, vt: Duration) {
    // Renew once a third of the timeout has passed: two more renewals fit before it lapses.
    let renew_when_left = vt.mul_f64(2.0 / 3.0);
    // Leases due soon after the first are renewed in the same statement.
    let slack = vt / 6;
    let mut failures = 0u32;
    loop {
        let notified = table.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if table.is_closed() {
            return;
        }
        let due = table.next_expiry().map(|e| e - renew_when_left);
        match due {
            Some(due) if due <= Instant::now() => {}
            Some(due) => {
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    () = &mut notified => {}
                }
                continue;
            }
            None => {
                // Bounded wait as a safety net; an idle keeper issues no queries.
                tokio::select! {
                    () = tokio::time::sleep(vt / 3) => {}
                    () = &mut notified => {}
                }
                continue;
            }
        }
        let started = Instant::now();
        let batch = table.expiring_before(started + renew_when_left + slack);
        if batch.is_empty() {
            continue;
        }
        match run_fenced(&pool, &sql, &batch, vt.as_secs_f64()).await {
            Ok(renewed) => {
                failures = 0;
                if renewed.len() < batch.len() {
                    tracing::debug!(
                        lost = batch.len() - renewed.len(),
                        "some leases were not renewed (completed or gone)"
                    );
                }
                table.renewed(&batch, &renewed, started + vt);
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, leases = batch.len(), "lease renewal failed; retrying");
                tokio::time::sleep(crate::util::error_backoff(failures).min(vt / 10)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_is_fenced_by_read_ct() {
        let t = LeaseTable::default();
        let now = Instant::now();
        t.insert_many([
            (
                1,
                Lease {
                    read_ct: 1,
                    expires: now,
                },
            ),
            (
                2,
                Lease {
                    read_ct: 3,
                    expires: now,
                },
            ),
        ]);
        assert!(
            !t.remove(1, 2),
            "a stale delivery cannot remove the current lease"
        );
        assert!(t.remove(1, 1));
        assert_eq!(t.len(), 1);
        t.renewed(&[(2, 3)], &[], now);
        assert_eq!(t.len(), 0, "a lease that matched no row is dropped");
    }
}
