//! Leases: the messages this process has claimed, and the keeper that renews them.
//!
//! Every claimed message is in the [`LeaseTable`] from the read that claimed it until its outcome
//! is written (or it is released). The keeper renews the visibility time of all of them in one
//! statement whenever the oldest has used a third of the visibility timeout, so a job that runs
//! longer than the timeout is never delivered to another worker while it runs. A renewal never
//! waits for a row lock (waiting could close a deadlock with a release or an outcome statement
//! on the same rows, which PostgreSQL breaks only after a second): a row another transaction
//! holds is reported busy, keeps its expiry and is renewed again shortly. Renewal and
//! completion are fenced by `read_ct`: if the message was delivered again after a lost lease, the
//! stale holder's writes match no row.
//!
//! A lease this process can no longer prove is *lost*: when renewals have failed (or hung) until
//! a local deadline a margin before the lease may lapse (`expires − margin`, margin a tenth of
//! the visibility timeout, at least 100 ms), the keeper logs it at error, drops it from the table
//! and raises its [`LostFlag`]; the ack layer then drops the handler's future, so the job stops
//! before another worker can claim it, and writes no outcome.

use crate::error::Describe;
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sqlx::PgPool;
use tokio::{sync::Notify, time::Instant};

use crate::{
    deadline::Conn,
    notify::{
        WakeSignal,
        wakeup::{WakeTarget, wake_others},
    },
    queue::{Delivery, PgmqQueue, Renewal},
    util::Stop,
};

/// One claimed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    /// The `read_ct` of our delivery: the fencing token for every write about this message.
    pub(crate) read_ct: i32,
    /// When our claim lapses at the latest (a local, conservative estimate of `vt`).
    pub(crate) expires: Instant,
    /// Raised if the lease is lost while its handler runs (set when the handler starts).
    pub(crate) lost: Option<Arc<LostFlag>>,
}

/// Raised when a running job's lease can no longer be proven.
#[derive(Debug, Default)]
pub(crate) struct LostFlag {
    lost: AtomicBool,
    notify: Notify,
}

impl PartialEq for LostFlag {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for LostFlag {}

impl LostFlag {
    fn raise(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Resolves once the lease is lost.
    pub(crate) async fn lost(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lost.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// How soon a renewal tries again the leases it found busy (at most a twentieth of the
/// visibility timeout).
const BUSY_RETRY: Duration = Duration::from_millis(25);

/// The messages this process holds for one queue.
#[derive(Debug, Default)]
pub(crate) struct LeaseTable {
    leases: Mutex<HashMap<i64, Lease>>,
    /// Wakes the keeper when a lease is added or the table is closed.
    changed: Notify,
    /// Wakes workers waiting for outcomes to be written (see `wait_unwritten_below`).
    shrunk: Notify,
    /// Outcomes queued for the completer and not written yet.
    unwritten: std::sync::atomic::AtomicUsize,
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

    /// An outcome was queued for the completer.
    pub(crate) fn outcome_queued(&self) {
        self.unwritten.fetch_add(1, Ordering::Relaxed);
    }

    /// The completer wrote (or gave up on) `n` outcomes.
    pub(crate) fn outcomes_written(&self, n: usize) {
        let _ = self
            .unwritten
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
        self.shrunk.notify_waiters();
    }

    /// Outcomes queued and not written yet.
    pub(crate) fn unwritten(&self) -> usize {
        self.unwritten.load(Ordering::Relaxed)
    }

    /// Waits until fewer than `n` outcomes are unwritten, or the table is closed.
    pub(crate) async fn wait_unwritten_below(&self, n: usize) {
        loop {
            let shrunk = self.shrunk.notified();
            if self.unwritten() < n || self.closed.load(Ordering::Relaxed) {
                return;
            }
            shrunk.await;
        }
    }

    pub(crate) fn get(&self, msg_id: i64) -> Option<Lease> {
        self.lock().get(&msg_id).cloned()
    }

    /// A flag raised if this delivery's lease is lost (`None` if it is not held any more).
    pub(crate) fn watch(&self, msg_id: i64, read_ct: i32) -> Option<Arc<LostFlag>> {
        let mut leases = self.lock();
        let lease = leases.get_mut(&msg_id).filter(|l| l.read_ct == read_ct)?;
        Some(lease.lost.get_or_insert_with(Arc::default).clone())
    }

    /// Drops every lease whose local deadline (`expires − margin`) has passed by `now`, raising
    /// their flags. Returns how many.
    pub(crate) fn declare_lost(&self, now: Instant, margin: Duration) -> usize {
        let mut leases = self.lock();
        let lost: Vec<i64> = leases
            .iter()
            .filter(|(_, l)| l.expires <= now + margin)
            .map(|(id, _)| *id)
            .collect();
        for id in &lost {
            if let Some(l) = leases.remove(id)
                && let Some(flag) = l.lost
            {
                flag.raise();
            }
        }
        lost.len()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.lock().values().map(|l| l.expires).min()
    }

    fn expiring_before(&self, deadline: Instant) -> Vec<Delivery> {
        self.lock()
            .iter()
            .filter(|(_, l)| l.expires <= deadline)
            .map(|(id, l)| Delivery {
                msg_id: *id,
                read_ct: l.read_ct,
            })
            .collect()
    }

    /// Applies a renewal: `renewed` get the new expiry, `busy` keep theirs (tried again), the
    /// rest of `batch` is not ours any more.
    fn renewed(&self, batch: &[Delivery], renewed: &[i64], busy: &[i64], expires: Instant) {
        let mut leases = self.lock();
        for d in batch {
            if let Some(lease) = leases.get_mut(&d.msg_id) {
                if lease.read_ct != d.read_ct || busy.binary_search(&d.msg_id).is_ok() {
                    continue;
                }
                if renewed.binary_search(&d.msg_id).is_ok() {
                    lease.expires = expires;
                } else {
                    // Completed meanwhile, or the message is gone: nothing left to renew.
                    leases.remove(&d.msg_id);
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

/// Makes messages a worker held but did not start visible now, and wakes idle workers of this
/// runtime and of other processes, each statement within `deadline` (see `src/deadline.rs`).
/// On failure they become visible when their lease lapses.
pub(crate) async fn release(
    pool: &PgPool,
    queue: &PgmqQueue,
    held: &[Delivery],
    signal: &WakeSignal,
    wake: Option<&WakeTarget>,
    deadline: Duration,
) {
    if held.is_empty() {
        return;
    }
    let count = held.len();
    let by = Instant::now() + deadline;
    let mut conn = match Conn::acquire(pool, by).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(queue = %queue.name(), error = %crate::error::Error::from(e).describe(), count,
                "could not release held messages; they become visible when their lease lapses");
            return;
        }
    };
    match conn
        .run(by, "releasing held messages", |c| queue.release(c, held))
        .await
    {
        Ok(_) => {
            tracing::debug!(queue = %queue.name(), count, "released claimed messages");
            crate::obs::released(queue.name().as_str(), queue.metrics_kind(), count);
            signal.wake();
            if let Some(target) = wake
                && let Err(e) = conn
                    .run(by, "waking other processes' workers", |c| {
                        wake_others(c, target, Duration::ZERO)
                    })
                    .await
            {
                tracing::debug!(queue = %queue.name(), error = %e.describe(),
                    "could not wake other processes' workers; they find the messages at their next poll");
            }
        }
        Err(e) => tracing::warn!(queue = %queue.name(), error = %e.describe(), count,
            "could not release held messages; they become visible when their lease lapses"),
    }
}

/// How long before a lease may lapse this process gives up on it when it cannot renew it.
pub(crate) fn lost_margin(vt: Duration) -> Duration {
    (vt / 10).max(Duration::from_millis(100))
}

/// Renews leases until the table is closed or the runtime asks it to stop. Runs no query while
/// the table is empty.
pub(crate) async fn keeper(
    table: Arc<LeaseTable>,
    pool: PgPool,
    queue: PgmqQueue,
    vt: Duration,
    mut stop: Stop,
) {
    // Renew once a third of the timeout has passed: two more renewals fit before it lapses.
    let renew_when_left = vt.mul_f64(2.0 / 3.0);
    // Leases due soon after the first are renewed in the same statement.
    let slack = vt / 6;
    let margin = lost_margin(vt);
    let mut failures = 0u32;
    loop {
        let notified = table.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if table.is_closed() || stop.is_requested() {
            return;
        }
        let lost = table.declare_lost(Instant::now(), margin);
        if lost > 0 {
            tracing::error!(lost, timeout = ?vt,
                "could not renew leases before they may lapse; stopping their jobs (another worker may take them)");
        }
        let due = table.next_expiry().map(|e| e - renew_when_left);
        match due {
            Some(due) if due <= Instant::now() => {}
            Some(due) => {
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    () = &mut notified => {}
                    () = stop.requested() => return,
                }
                continue;
            }
            None => {
                // Bounded wait as a safety net; an idle keeper issues no queries.
                tokio::select! {
                    () = tokio::time::sleep(vt / 3) => {}
                    () = &mut notified => {}
                    () = stop.requested() => return,
                }
                continue;
            }
        }
        let started = Instant::now();
        let batch = table.expiring_before(started + renew_when_left + slack);
        if batch.is_empty() {
            continue;
        }
        // A renewal that hangs (a frozen connection) must not keep us past the deadline; its
        // connection is then closed, not handed back to the pool (see `src/deadline.rs`).
        let give_up_at = table
            .next_expiry()
            .map_or(started + vt, |e| e - margin)
            .max(started + Duration::from_millis(10));
        let renewal = async {
            let mut conn = Conn::acquire(&pool, give_up_at).await?;
            conn.run(give_up_at, "renewing leases", |c| {
                queue.renew(c, &batch, vt)
            })
            .await
        }
        .await;
        match renewal {
            Ok(Renewal { renewed, busy }) => {
                failures = 0;
                crate::obs::renewed(queue.name().as_str(), queue.metrics_kind(), renewed.len());
                let gone = batch.len() - renewed.len() - busy.len();
                if gone > 0 {
                    tracing::debug!(gone, "some leases were not renewed (completed or gone)");
                }
                table.renewed(&batch, &renewed, &busy, started + vt);
                if !busy.is_empty() {
                    // Held by another transaction (their outcome being written, most often):
                    // try them again shortly, not at once.
                    tracing::debug!(
                        busy = busy.len(),
                        "some leases were busy; renewing them again shortly"
                    );
                    let again = Instant::now() + BUSY_RETRY.min(vt / 20);
                    tokio::time::sleep_until(again.min(give_up_at)).await;
                }
            }
            Err(e) => {
                failures += 1;
                crate::obs::renewal_failed(queue.name().as_str(), queue.metrics_kind());
                tracing::warn!(error = %e.describe(), leases = batch.len(), "lease renewal failed; retrying");
                let retry_at = Instant::now() + crate::util::error_backoff(failures).min(vt / 10);
                tokio::time::sleep_until(retry_at.min(give_up_at)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(msg_id: i64, read_ct: i32) -> Delivery {
        Delivery { msg_id, read_ct }
    }

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
                    lost: None,
                },
            ),
            (
                2,
                Lease {
                    read_ct: 3,
                    expires: now,
                    lost: None,
                },
            ),
        ]);
        assert!(
            !t.remove(1, 2),
            "a stale delivery cannot remove the current lease"
        );
        assert!(t.remove(1, 1));
        assert_eq!(t.len(), 1);
        t.insert_many([(
            4,
            Lease {
                read_ct: 1,
                expires: now,
                lost: None,
            },
        )]);
        let later = now + Duration::from_secs(30);
        t.renewed(&[d(2, 3), d(4, 1)], &[], &[4], later);
        assert_eq!(t.len(), 1, "a lease that matched no row is dropped");
        assert_eq!(
            t.get(4).map(|l| l.expires),
            Some(now),
            "a busy lease is kept as it was, to be renewed again"
        );
        t.renewed(&[d(4, 1)], &[4], &[], later);
        assert_eq!(t.get(4).map(|l| l.expires), Some(later));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_past_its_deadline_is_declared_lost_and_its_flag_raised() {
        let t = LeaseTable::default();
        let now = Instant::now();
        let vt = Duration::from_secs(10);
        t.insert_many([(
            7,
            Lease {
                read_ct: 1,
                expires: now + vt,
                lost: None,
            },
        )]);
        assert!(t.watch(7, 2).is_none(), "another delivery's flag");
        let flag = t.watch(7, 1).expect("held");
        let margin = lost_margin(vt);
        assert_eq!(t.declare_lost(now + vt - margin * 2, margin), 0);
        assert_eq!(t.declare_lost(now + vt - margin, margin), 1);
        assert_eq!(t.len(), 0);
        tokio::time::timeout(Duration::from_secs(1), flag.lost())
            .await
            .expect("the flag is raised");
    }
}
