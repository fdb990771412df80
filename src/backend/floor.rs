//! The claim floor: a lower bound on the `vt` of every message a claim can find, so a claim
//! reads the `vt` index from the floor up to `now()` instead of from its oldest entry.
//!
//! Why: while any snapshot is held in the database (a forgotten `BEGIN`, `pg_dump`, a standby's
//! feedback), vacuum cannot remove the index entries that claims and outcomes leave behind.
//! They sit at the low end of the `vt` index: the entry of every message's first visibility
//! time once it was claimed, and the entry of its lease once it was archived and the lease's
//! time passed. A claim in visibility order starts at the lowest entry and steps over every
//! one of them, so its cost grew with the snapshot's age (measured: pickup p99 4.6x after
//! 80 s at 2 000 jobs/s, a collapse at 5 000). With a floor, it steps over the entries between
//! the floor and now only: those of the last moments.
//!
//! # Where the floor comes from
//!
//! A claim in visibility order takes the visible, unlocked messages with the lowest `vt` first.
//! When it comes back with `got` of the `asked`:
//! - `got < asked`: every visible unlocked message (`vt <= now()`) was taken, so none is left
//!   below the claim's `now()` (`at`);
//! - `got == asked`: none is left below the highest `vt` it took.
//!
//! That bound is a *candidate*. It does not yet hold for rows the claim could not see: rows
//! of transactions in progress at the claim's snapshot (a producer's insert not yet committed,
//! whose `vt` is its insert's time, maybe minutes ago). Every such transaction had its
//! transaction id before the claim came back. So the candidate first takes the `xmax` of a
//! snapshot taken after the claim came back (the next claim's: above all those ids), then
//! becomes the floor at a later claim whose snapshot's `xmin` (the oldest running transaction)
//! is at least that `xmax`, so it sees what all of them committed, *and* whose own candidate is
//! at least as high, so it took (or saw taken) every visible row below. A transaction that
//! writes later writes `vt` from its own clock (PGMQ's `send` and `set_vt`, this crate's
//! pushes, retries and releases all do), so at or above the candidate.
//!
//! A snapshot held by a reader (`pg_dump`, a `REPEATABLE READ` report, a `BEGIN` that only
//! read) has no transaction id: it holds back vacuum, not the floor. A transaction that wrote
//! and stays open holds back both, and the claim is then as it was without a floor.
//!
//! # What the floor cannot see: the sweep
//!
//! A client that writes a `vt` in the past by hand (`UPDATE ... SET vt = '2020-01-01'`,
//! `pgmq.set_vt` with a negative offset, an `INSERT` with `vt = now()` in a transaction that
//! started before the candidate and had written nothing yet) can put a visible row below the
//! floor; so can a transaction that had locked visible rows a confirming claim skipped and
//! then rolled back (a claim that failed, a late outcome that failed). So now and then a claim (or the idle probe) goes without the floor: a *sweep*, at
//! most every `claims.floor_sweep` (10 s by default) and never more than 1/[`SWEEP_SHARE`] of
//! the time (a sweep under
//! an old snapshot walks every dead entry, which is what the floor avoids). Such a row waits
//! for the next sweep. Claims by priority do not use the floor (their index is ordered by
//! priority first); a failed claim, a paused queue, a clock that went back or a server with
//! older transaction ids (a failover to a restored backup) drop it.

use std::{collections::VecDeque, time::Duration};

use chrono::{DateTime, Utc};

use tokio::time::Instant;

use crate::queue::Seen;

/// A sweep costs at most 1/`SWEEP_SHARE` of the time: after a sweep that took `d`, the next
/// comes no sooner than `SWEEP_SHARE * d` later.
pub(crate) const SWEEP_SHARE: u32 = 20;

/// Taken off every candidate: an insert evaluates its `vt` (the clock) a moment before its
/// transaction gets its id, and a claim that completes in between must not count it as
/// ended. A second more of entries is what each claim then steps over.
const MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// Candidates kept waiting at most (a writer open for long stops promotion; the oldest are
/// dropped, which only delays the floor).
const MAX_WAITING: usize = 64;

/// How a claim should be bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Bound {
    /// The floor to claim from (`None`: from the lowest entry).
    pub(crate) floor: Option<DateTime<Utc>>,
    /// This claim goes without a floor it had: a sweep.
    pub(crate) sweep: bool,
}

/// What a claim took: `got` of the `asked` messages, the highest `vt` among them `highest`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Took {
    pub(crate) asked: usize,
    pub(crate) got: usize,
    pub(crate) highest: Option<DateTime<Utc>>,
}

/// The claim floor of one worker's queue (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct ClaimFloor {
    /// The least time between two sweeps; `None`: no floor at all.
    sweep_every: Option<Duration>,
    floor: Option<DateTime<Utc>>,
    /// Candidates from claims that came back, with when they came back, waiting for a claim
    /// started after that.
    pending: Vec<(DateTime<Utc>, Instant)>,
    /// Candidates with the `xmax` of a snapshot taken after their claim came back, waiting for
    /// an `xmin` at or above it.
    waiting: VecDeque<(DateTime<Utc>, i64)>,
    /// The highest `xmax` seen: a lower one means another server.
    last_xmax: i64,
    next_sweep: Option<Instant>,
}

impl ClaimFloor {
    /// A floor that sweeps at most every `sweep_every` (`None`: no floor, every claim reads
    /// from the lowest entry).
    pub(crate) fn new(sweep_every: Option<Duration>) -> Self {
        Self {
            sweep_every,
            ..Self::default()
        }
    }

    /// The bound for a claim (or an idle probe) starting at `now`.
    pub(crate) fn bound(&self, now: Instant) -> Bound {
        match self.floor {
            None => Bound {
                floor: None,
                sweep: false,
            },
            Some(f) if self.next_sweep.is_none_or(|at| now < at) => Bound {
                floor: Some(f),
                sweep: false,
            },
            Some(_) => Bound {
                floor: None,
                sweep: true,
            },
        }
    }

    /// The floor now in force.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn floor(&self) -> Option<DateTime<Utc>> {
        self.floor
    }

    /// Forgets everything: after a failed claim, or anything that says the server changed.
    pub(crate) fn reset(&mut self) {
        *self = Self::new(self.sweep_every);
    }

    /// A statement bounded by `bound` that started at `started` ran until `done`.
    fn ran(&mut self, bound: Bound, started: Instant, done: Instant) {
        let Some(every) = self.sweep_every else {
            return;
        };
        if bound.sweep || (bound.floor.is_none() && self.next_sweep.is_none()) {
            let took = done.saturating_duration_since(started);
            self.next_sweep = Some(done + every.max(took * SWEEP_SHARE));
        }
    }

    /// An idle probe (the earliest `vt`) bounded by `bound` ran from `started` to `done`.
    pub(crate) fn probed(&mut self, bound: Bound, started: Instant, done: Instant) {
        self.ran(bound, started, done);
    }

    /// A claim in visibility order bounded by `bound`, sent at `started`, came back at `done`
    /// with what it took (`took`) and what the database said (`seen`).
    pub(crate) fn claimed(
        &mut self,
        bound: Bound,
        started: Instant,
        done: Instant,
        took: Took,
        seen: Seen,
    ) {
        let Took {
            asked,
            got,
            highest,
        } = took;
        if self.sweep_every.is_none() {
            return;
        }
        if seen.xmax < self.last_xmax || self.floor.is_some_and(|f| seen.at < f) {
            // Older transaction ids, or a clock behind the floor: not the server (or not the
            // clock) the floor was learned on.
            self.reset();
        }
        self.last_xmax = seen.xmax;
        self.ran(bound, started, done);
        // What this claim shows: nothing visible is left below `own` (none from a paused
        // queue's claim, which finds nothing whatever is visible).
        let own = if seen.paused {
            None
        } else if got < asked {
            Some(seen.at)
        } else {
            highest
        }
        .map(|own| own - MARGIN);
        // Candidates whose claim came back before this one was sent get this snapshot's xmax.
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].1 <= started {
                let (candidate, _) = self.pending.swap_remove(i);
                self.waiting.push_back((candidate, seen.xmax));
            } else {
                i += 1;
            }
        }
        while self.waiting.len() > MAX_WAITING {
            self.waiting.pop_front();
        }
        // Those whose writers have all ended before this snapshot, and below which this claim
        // left nothing, become the floor.
        if let Some(own) = own {
            let mut rest = VecDeque::with_capacity(self.waiting.len());
            for (candidate, xmax) in self.waiting.drain(..) {
                if xmax <= seen.xmin && candidate <= own {
                    self.floor = Some(self.floor.map_or(candidate, |f| f.max(candidate)));
                } else {
                    rest.push_back((candidate, xmax));
                }
            }
            self.waiting = rest;
            self.pending.push((own, done));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY: Duration = Duration::from_secs(10);

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap_or_default()
    }

    fn took(asked: usize, got: usize, highest: Option<DateTime<Utc>>) -> Took {
        Took {
            asked,
            got,
            highest,
        }
    }

    /// The floor a candidate of `secs` gives (less the margin).
    fn fl(secs: i64) -> Option<DateTime<Utc>> {
        Some(t(secs) - MARGIN)
    }

    fn seen(at: i64, xmin: i64, xmax: i64) -> Seen {
        Seen {
            at: t(at),
            xmin,
            xmax,
            paused: false,
        }
    }

    /// Claims one after another, each sent 1 ms after the previous came back.
    struct Clock(Instant);
    impl Clock {
        fn claim(&mut self) -> (Instant, Instant) {
            let started = self.0 + Duration::from_millis(1);
            self.0 = started + Duration::from_millis(1);
            (started, self.0)
        }
    }

    #[test]
    fn a_candidate_waits_for_a_later_snapshot_and_for_every_older_writer() {
        let mut f = ClaimFloor::new(Some(EVERY));
        let mut c = Clock(Instant::now());
        let (s, d) = c.claim();
        // An empty claim at t=100: nothing visible below 100, once writers before it ended.
        f.claimed(f.bound(s), s, d, took(10, 0, None), seen(100, 50, 60));
        assert_eq!(
            f.floor(),
            None,
            "not before a snapshot taken after the claim"
        );
        let (s, d) = c.claim();
        // The next snapshot's xmax is 65, but a writer (xid 55) is still running.
        f.claimed(f.bound(s), s, d, took(10, 0, None), seen(101, 55, 65));
        assert_eq!(
            f.floor(),
            None,
            "not while a transaction older than 65 runs"
        );
        let (s, d) = c.claim();
        f.claimed(f.bound(s), s, d, took(10, 0, None), seen(102, 65, 70));
        assert_eq!(f.floor(), fl(100));
        let (s, d) = c.claim();
        f.claimed(f.bound(s), s, d, took(10, 0, None), seen(103, 70, 71));
        assert_eq!(f.floor(), fl(101));
        assert_eq!(f.bound(s + Duration::from_millis(1)).floor, fl(101));
    }

    #[test]
    fn a_full_claim_bounds_by_the_highest_vt_it_took_and_a_paused_queue_by_nothing() {
        let mut f = ClaimFloor::new(Some(EVERY));
        let mut c = Clock(Instant::now());
        let (s, d) = c.claim();
        f.claimed(f.bound(s), s, d, took(10, 10, Some(t(40))), seen(100, 5, 5));
        let (s, d) = c.claim();
        f.claimed(f.bound(s), s, d, took(10, 0, None), seen(100, 5, 5));
        assert_eq!(f.floor(), fl(40), "a full claim: the backlog starts at 40");
        // Paused: the claim found nothing although the backlog is there.
        let mut p = ClaimFloor::new(Some(EVERY));
        for _ in 0..3 {
            let (s, d) = c.claim();
            let mut paused = seen(200, 5, 5);
            paused.paused = true;
            p.claimed(p.bound(s), s, d, took(10, 0, None), paused);
        }
        assert_eq!(p.floor(), None);
    }

    #[test]
    fn a_claim_sent_before_the_candidates_came_back_does_not_confirm_them() {
        let mut f = ClaimFloor::new(Some(EVERY));
        let base = Instant::now();
        let ms = Duration::from_millis;
        // Two claims in flight together: A (1..5 ms) and B (2..6 ms).
        f.claimed(
            f.bound(base),
            base + ms(1),
            base + ms(5),
            took(10, 0, None),
            seen(100, 9, 10),
        );
        f.claimed(
            f.bound(base),
            base + ms(2),
            base + ms(6),
            took(10, 0, None),
            seen(100, 10, 10),
        );
        // B started before A came back: its snapshot may miss a writer that locked during A.
        // A third claim, started after both, with every writer ended.
        f.claimed(
            f.bound(base),
            base + ms(7),
            base + ms(8),
            took(10, 0, None),
            seen(101, 11, 12),
        );
        assert_eq!(
            f.floor(),
            None,
            "confirmed by the third claim's xmax, not yet ended"
        );
        f.claimed(
            f.bound(base),
            base + ms(9),
            base + ms(10),
            took(10, 0, None),
            seen(102, 12, 12),
        );
        assert_eq!(
            f.floor(),
            fl(101),
            "A's, B's and the third claim's candidates"
        );
    }

    #[test]
    fn sweeps_come_at_most_every_interval_and_share_and_a_changed_server_resets() {
        let mut f = ClaimFloor::new(Some(EVERY));
        let start = Instant::now();
        let mut c = Clock(start);
        for i in 0..3 {
            let (s, d) = c.claim();
            f.claimed(f.bound(s), s, d, took(10, 0, None), seen(100 + i, 5, 5));
        }
        assert!(f.floor().is_some());
        let soon = c.0 + Duration::from_millis(1);
        assert!(
            !f.bound(soon).sweep,
            "the first unbounded claims count as a sweep"
        );
        let due = start + EVERY + Duration::from_millis(10);
        let b = f.bound(due);
        assert_eq!(
            b,
            Bound {
                floor: None,
                sweep: true
            }
        );
        // A slow sweep (2 s) puts the next one 40 s later.
        f.claimed(
            b,
            due,
            due + Duration::from_secs(2),
            took(10, 0, None),
            seen(120, 5, 5),
        );
        let after = due + Duration::from_secs(2);
        assert!(!f.bound(after + Duration::from_secs(39)).sweep);
        assert!(f.bound(after + Duration::from_secs(41)).sweep);
        // The clock went back behind the floor: everything is forgotten.
        let (s, d) = (
            after + Duration::from_secs(1),
            after + Duration::from_secs(1),
        );
        f.claimed(f.bound(s), s, d, took(10, 0, None), seen(50, 5, 5));
        assert_eq!(f.floor(), None);
        // Older transaction ids: likewise.
        let mut g = ClaimFloor::new(Some(EVERY));
        for i in 0..3 {
            let (s, d) = c.claim();
            g.claimed(g.bound(s), s, d, took(10, 0, None), seen(100 + i, 500, 500));
        }
        assert!(g.floor().is_some());
        let (s, d) = c.claim();
        g.claimed(g.bound(s), s, d, took(10, 0, None), seen(104, 40, 40));
        assert_eq!(g.floor(), None);
    }

    #[test]
    fn a_candidate_needs_a_later_claim_that_left_nothing_below_it() {
        let mut f = ClaimFloor::new(Some(EVERY));
        let mut c = Clock(Instant::now());
        let (s, d) = c.claim();
        // Empty at t=100, while a producer (xid 7) had inserted a row with vt 90, uncommitted.
        f.claimed(f.bound(s), s, d, took(10, 0, None), seen(100, 7, 8));
        let (s, d) = c.claim();
        f.claimed(f.bound(s), s, d, took(10, 10, Some(t(50))), seen(101, 7, 9));
        // The producer committed; the next claim is full of an older backlog (up to vt 60): it
        // does not show that nothing is left below 100 (the row at 90 may be there).
        let (s, d) = c.claim();
        f.claimed(f.bound(s), s, d, took(10, 10, Some(t(60))), seen(102, 9, 9));
        assert_eq!(
            f.floor(),
            fl(50),
            "only the candidate the full claim confirmed"
        );
        let (s, d) = c.claim();
        f.claimed(f.bound(s), s, d, took(10, 3, Some(t(90))), seen(103, 9, 9));
        assert_eq!(
            f.floor(),
            fl(100),
            "this claim took everything visible up to 103"
        );
    }

    #[test]
    fn off_means_no_floor() {
        let mut f = ClaimFloor::new(None);
        let mut c = Clock(Instant::now());
        for i in 0..4 {
            let (s, d) = c.claim();
            let b = f.bound(s);
            assert_eq!(
                b,
                Bound {
                    floor: None,
                    sweep: false
                }
            );
            f.claimed(b, s, d, took(10, 0, None), seen(100 + i, 5, 5));
        }
        assert_eq!(f.floor(), None);
    }
}
