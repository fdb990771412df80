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
//! then rolled back (a claim that failed, a late outcome that failed). So now and then, at most
//! every `claims.floor_sweep` (10 s by default) and never more than 1/[`SWEEP_SHARE`] of the
//! time, a *sweep* looks below the floor for a visible row: one statement, run beside the
//! claims (a runtime task), never in their way, because under an old snapshot it walks every
//! dead entry the floor lets the claims skip. If it finds one, the floor is dropped and the
//! queue's workers are woken: the next claims read from the start (and learn a new floor).
//! Such a row waits for the next sweep, which starts with a claim (an idle worker's fallback
//! poll). A sweep has the statement deadline; one that runs out of it (a snapshot so old that
//! its dead entries take longer to walk) is tried again `SWEEP_SHARE` times its length later.
//! Claims by priority do not use the floor (their index is ordered by priority first). A server that restarted or changed (`pg_postmaster_start_time()`, a lower
//! `xmax`: a crash may have lost the last claims' commits, a failover those the standby had not
//! received, and their rows are visible again below the floor), a clock that went back or a
//! paused queue drop it or keep it from rising.

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

/// Candidates kept waiting at most (a writer open for long stops promotion): beyond it the
/// middle one is dropped, so the oldest (the nearest to promotion) and the newest stay.
const MAX_WAITING: usize = 64;

/// How a claim is bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Bound {
    /// The floor to claim from (`None`: from the lowest entry).
    pub(crate) floor: Option<DateTime<Utc>>,
    /// The floor's state it was computed from: a claim computed before a reset reports into
    /// nothing.
    epoch: u64,
}

/// A sweep to run: is anything visible below `floor`?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sweep {
    pub(crate) floor: DateTime<Utc>,
    epoch: u64,
}

/// What a claim took: `got` of the `asked` messages, the highest `vt` among them.
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
    /// The server's start time, as the claims see it.
    server: Option<DateTime<Utc>>,
    /// The highest `xmax` seen, and when the claim that saw it came back: a claim sent after
    /// that which sees a lower one is on another server.
    last_xmax: (i64, Option<Instant>),
    /// When the floor was last raised: a claim sent after that whose `now()` is below the floor
    /// saw the clock go back.
    raised: Option<Instant>,
    /// When the next sweep is due (`None`: when the floor first forms plus the interval).
    next_sweep: Option<Instant>,
    sweeping: bool,
    epoch: u64,
    /// Sweeps that ran, and those that found a job below the floor (for the tests).
    sweeps: (u64, u64),
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

    /// The bound for a claim.
    pub(crate) fn bound(&self) -> Bound {
        Bound {
            floor: self.floor,
            epoch: self.epoch,
        }
    }

    /// The floor for the idle probe (the earliest `vt`).
    pub(crate) fn probe_floor(&self) -> Option<DateTime<Utc>> {
        self.floor
    }

    /// The sweep to run now, if one is due and none is running.
    pub(crate) fn sweep_due(&mut self, now: Instant) -> Option<Sweep> {
        let (floor, every) = (self.floor?, self.sweep_every?);
        if self.sweeping {
            return None;
        }
        let due = *self.next_sweep.get_or_insert(now + every);
        if now < due {
            return None;
        }
        self.sweeping = true;
        Some(Sweep {
            floor,
            epoch: self.epoch,
        })
    }

    /// A sweep that ran from `started` to `done` found a visible job below its floor
    /// (`Some(true)`), nothing (`Some(false)`), or failed (`None`, e.g. out of time under an old
    /// snapshot: it is tried again later, the floor kept).
    pub(crate) fn swept(
        &mut self,
        sweep: Sweep,
        started: Instant,
        done: Instant,
        found: Option<bool>,
    ) {
        self.sweeping = false;
        if let Some(every) = self.sweep_every {
            let took = done.saturating_duration_since(started);
            self.next_sweep = Some(done + every.max(took * SWEEP_SHARE));
        }
        if found.is_some() {
            self.sweeps.0 += 1;
        }
        if found == Some(true) {
            self.sweeps.1 += 1;
            if sweep.epoch == self.epoch {
                self.reset();
            }
        }
    }

    /// The floor now in force.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn floor(&self) -> Option<DateTime<Utc>> {
        self.floor
    }

    /// Sweeps that ran, and those that found a job below the floor.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn sweeps(&self) -> (u64, u64) {
        self.sweeps
    }

    /// Forgets what the floor was learned from (not the sweeps' schedule).
    pub(crate) fn reset(&mut self) {
        self.floor = None;
        self.pending.clear();
        self.waiting.clear();
        self.raised = None;
        self.epoch += 1;
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
        if self.sweep_every.is_none() {
            return;
        }
        let after = |t: Option<Instant>| t.is_none_or(|t| started >= t);
        let restarted = self.server.is_some_and(|s| s != seen.server_start);
        let other_server = seen.xmax < self.last_xmax.0 && after(self.last_xmax.1);
        let clock_back = self.floor.is_some_and(|f| seen.at < f) && after(self.raised);
        if restarted || other_server || clock_back {
            self.reset();
            self.server = Some(seen.server_start);
            self.last_xmax = (seen.xmax, Some(done));
            return;
        }
        self.server = Some(seen.server_start);
        if seen.xmax >= self.last_xmax.0 {
            self.last_xmax = (seen.xmax, Some(done));
        }
        if bound.epoch != self.epoch {
            // Bounded by a floor since dropped: what it shows is about that floor.
            return;
        }
        let Took {
            asked,
            got,
            highest,
        } = took;
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
            self.waiting.remove(MAX_WAITING / 2);
        }
        // Those whose writers have all ended before this snapshot, and below which this claim
        // left nothing, become the floor.
        if let Some(own) = own {
            let mut rest = VecDeque::with_capacity(self.waiting.len());
            for (candidate, xmax) in self.waiting.drain(..) {
                if xmax <= seen.xmin && candidate <= own {
                    if self.floor.is_none_or(|f| candidate > f) {
                        self.floor = Some(candidate);
                        self.raised = Some(done);
                    }
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

    /// The floor a candidate of `secs` gives (less the margin).
    fn fl(secs: i64) -> Option<DateTime<Utc>> {
        Some(t(secs) - MARGIN)
    }

    fn took(asked: usize, got: usize, highest: Option<DateTime<Utc>>) -> Took {
        Took {
            asked,
            got,
            highest,
        }
    }

    fn seen(at: i64, xmin: i64, xmax: i64) -> Seen {
        Seen {
            at: t(at),
            xmin,
            xmax,
            paused: false,
            server_start: t(-1_000_000),
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

    /// One claim of `asked` that got `got`, run on the clock.
    fn run(f: &mut ClaimFloor, c: &mut Clock, took: Took, seen: Seen) {
        let (s, d) = c.claim();
        f.claimed(f.bound(), s, d, took, seen);
    }

    /// A floor formed by empty claims at t=100, 101, 102 (no writers).
    fn formed(c: &mut Clock) -> ClaimFloor {
        let mut f = ClaimFloor::new(Some(EVERY));
        for i in 0..3 {
            run(&mut f, c, took(10, 0, None), seen(100 + i, 5, 5));
        }
        assert_eq!(f.floor(), fl(101));
        f
    }

    #[test]
    fn a_candidate_waits_for_a_later_snapshot_and_for_every_older_writer() {
        let mut f = ClaimFloor::new(Some(EVERY));
        let mut c = Clock(Instant::now());
        // An empty claim at t=100: nothing visible below 100, once writers before it ended.
        run(&mut f, &mut c, took(10, 0, None), seen(100, 50, 60));
        assert_eq!(
            f.floor(),
            None,
            "not before a snapshot taken after the claim"
        );
        // The next snapshot's xmax is 65, but a writer (xid 55) is still running.
        run(&mut f, &mut c, took(10, 0, None), seen(101, 55, 65));
        assert_eq!(
            f.floor(),
            None,
            "not while a transaction older than 65 runs"
        );
        run(&mut f, &mut c, took(10, 0, None), seen(102, 65, 70));
        assert_eq!(f.floor(), fl(100));
        run(&mut f, &mut c, took(10, 0, None), seen(103, 70, 71));
        assert_eq!(f.floor(), fl(101));
        assert_eq!(f.bound().floor, fl(101));
        assert_eq!(f.probe_floor(), fl(101));
    }

    #[test]
    fn a_full_claim_bounds_by_the_highest_vt_it_took_and_a_paused_queue_by_nothing() {
        let mut f = ClaimFloor::new(Some(EVERY));
        let mut c = Clock(Instant::now());
        run(&mut f, &mut c, took(10, 10, Some(t(40))), seen(100, 5, 5));
        run(&mut f, &mut c, took(10, 0, None), seen(100, 5, 5));
        assert_eq!(f.floor(), fl(40), "a full claim: the backlog starts at 40");
        let mut p = ClaimFloor::new(Some(EVERY));
        for _ in 0..3 {
            let mut paused = seen(200, 5, 5);
            paused.paused = true;
            run(&mut p, &mut c, took(10, 0, None), paused);
        }
        assert_eq!(
            p.floor(),
            None,
            "a paused queue's claim finds nothing, whatever waits"
        );
    }

    #[test]
    fn a_claim_sent_before_the_candidates_came_back_does_not_confirm_them() {
        let mut f = ClaimFloor::new(Some(EVERY));
        let base = Instant::now();
        let ms = Duration::from_millis;
        // Two claims in flight together: A (1..5 ms) and B (2..6 ms).
        let b = f.bound();
        f.claimed(
            b,
            base + ms(1),
            base + ms(5),
            took(10, 0, None),
            seen(100, 9, 10),
        );
        f.claimed(
            b,
            base + ms(2),
            base + ms(6),
            took(10, 0, None),
            seen(100, 10, 10),
        );
        // B started before A came back: its snapshot may miss a writer that locked during A.
        // A third claim, started after both, while a writer older than 12 runs.
        f.claimed(
            b,
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
            b,
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
    fn a_candidate_needs_a_later_claim_that_left_nothing_below_it() {
        let mut f = ClaimFloor::new(Some(EVERY));
        let mut c = Clock(Instant::now());
        // Empty at t=100, while a producer (xid 7) had inserted a row with vt 90, uncommitted.
        run(&mut f, &mut c, took(10, 0, None), seen(100, 7, 8));
        run(&mut f, &mut c, took(10, 10, Some(t(50))), seen(101, 7, 9));
        // The producer committed; the next claim is full of an older backlog (up to vt 60): it
        // does not show that nothing is left below 100 (the row at 90 may be there).
        run(&mut f, &mut c, took(10, 10, Some(t(60))), seen(102, 9, 9));
        assert_eq!(
            f.floor(),
            fl(50),
            "only the candidate the full claim confirmed"
        );
        run(&mut f, &mut c, took(10, 3, Some(t(90))), seen(103, 9, 9));
        assert_eq!(
            f.floor(),
            fl(100),
            "this claim took everything visible up to 103"
        );
    }

    #[test]
    fn a_restarted_or_other_server_or_a_clock_gone_back_drops_it() {
        let mut c = Clock(Instant::now());
        let mut f = formed(&mut c);
        let mut restarted = seen(103, 5, 5);
        restarted.server_start = t(50);
        run(&mut f, &mut c, took(10, 0, None), restarted);
        assert_eq!(
            f.floor(),
            None,
            "a restart may have lost the last claims' commits"
        );
        let mut f = formed(&mut c);
        run(&mut f, &mut c, took(10, 0, None), seen(104, 4, 4));
        assert_eq!(f.floor(), None, "older transaction ids: another server");
        let mut f = formed(&mut c);
        run(&mut f, &mut c, took(10, 0, None), seen(50, 5, 5));
        assert_eq!(f.floor(), None, "the clock went back behind the floor");
    }

    #[test]
    fn a_claim_bounded_before_a_reset_reports_nothing_and_late_ones_do_not_reset() {
        let mut c = Clock(Instant::now());
        let mut f = formed(&mut c);
        let old = f.bound();
        let (s_old, _) = c.claim();
        // A sweep finds a job below the floor: dropped.
        let due = c.0 + EVERY + EVERY;
        assert!(f.sweep_due(c.0).is_none(), "not due yet");
        let sw = f.sweep_due(due).expect("due");
        f.swept(sw, due, due, Some(true));
        assert_eq!(f.floor(), None);
        // The claim bounded by the old floor comes back: it says nothing about the new state.
        f.claimed(old, s_old, due, took(10, 0, None), seen(103, 5, 5));
        assert_eq!(f.floor(), None);
        // Two claims in flight: the one sent first comes back last with a lower xmax and an
        // older now(): not another server, not a clock that went back.
        let mut f = formed(&mut c);
        let (s1, _) = c.claim();
        let (s2, d2) = c.claim();
        let b = f.bound();
        f.claimed(b, s2, d2, took(10, 0, None), seen(110, 9, 9));
        let floor = f.floor();
        f.claimed(
            b,
            s1,
            d2 + Duration::from_millis(1),
            took(10, 0, None),
            seen(99, 5, 5),
        );
        assert!(
            f.floor().is_some() && f.floor() >= floor,
            "kept: {:?}",
            f.floor()
        );
    }

    #[test]
    fn sweeps_come_at_most_every_interval_and_share_one_at_a_time() {
        let mut c = Clock(Instant::now());
        let mut f = formed(&mut c);
        let now = c.0;
        assert!(
            f.sweep_due(now).is_none(),
            "the first one an interval after the floor formed"
        );
        let due = now + EVERY;
        let sw = f.sweep_due(due).expect("due");
        assert_eq!(sw.floor, fl(101).expect("floor"));
        assert!(f.sweep_due(due).is_none(), "one at a time");
        // A slow sweep (2 s) that found nothing puts the next one 40 s later.
        let done = due + Duration::from_secs(2);
        f.swept(sw, due, done, Some(false));
        assert_eq!(f.floor(), fl(101), "nothing below: kept");
        assert!(f.sweep_due(done + Duration::from_secs(39)).is_none());
        let sw = f.sweep_due(done + Duration::from_secs(41)).expect("due");
        // One that ran out of time keeps the floor too.
        f.swept(sw, done, done + Duration::from_secs(5), None);
        assert_eq!(f.floor(), fl(101));
        assert_eq!(f.sweeps(), (1, 0));
    }

    #[test]
    fn off_means_no_floor_and_no_sweep() {
        let mut f = ClaimFloor::new(None);
        let mut c = Clock(Instant::now());
        for i in 0..4 {
            run(&mut f, &mut c, took(10, 0, None), seen(100 + i, 5, 5));
        }
        assert_eq!(f.floor(), None);
        assert!(f.sweep_due(c.0 + DAY).is_none());
    }

    const DAY: Duration = Duration::from_secs(86_400);
}
