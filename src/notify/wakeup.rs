//! The wake-up protocol: when an idle worker reads, arms, checks and sleeps, and when a
//! producer's commit notifies.
//!
//! This module owns the protocol. The SQL side is in `migrations/0001_baseline.sql` (tables,
//! arming, settle checks) and `migrations/0002_notify_at_commit.sql` (the producers' trigger);
//! the fetcher (`src/backend/fetch.rs`) only runs the [`Step`]s that [`Plan`] chooses and
//! reports back.
//!
//! # The invariant
//!
//! **A job committed while a worker is idle is read by that worker within the notification
//! latency when a notification was sent, and in every case no later than the fallback deadline,
//! which is fixed when the worker goes idle (`now + poll_interval ± jitter`) and which nothing
//! postpones.** Producers pay for this with at most one read-only look at a tiny table per
//! session and arming: they never write a shared row, never wait for a lock, and so never wait
//! on each other or deadlock because of this crate.
//!
//! # The bound
//!
//! PostgreSQL serialises the commits of transactions with a pending NOTIFY (one lock for the
//! whole instance, held through the WAL flush), so notifying commits are kept few: **for one
//! arming, a producer session sends at most one notifying commit, and at most one transaction
//! at a time holds the right to send it.** The notifying commits of an arming are one, plus one
//! for each such commit that completes before the woken worker's disarm is visible: at most the
//! number of producer sessions, never a function of the number of inserts. Event subscribers
//! (persistent rows) are outside the bound: they ask for every insert.
//!
//! # The parts
//!
//! - *Arming.* An idle worker's runtime writes its own row of `apalis_pgmq.listeners`
//!   (`channel`, `owner` = the runtime, `armed`, `until`, `gen`, and a new `arm_id` from
//!   `apalis_pgmq.arm_ids` for every arming), for a time-to-live of about four poll intervals,
//!   and re-arms before it runs out ([`Arming`]). Workers of one runtime share the row. Then it
//!   bumps the listeners' version (a sequence).
//! - *The trigger* is a deferred constraint trigger (`AFTER INSERT ... DEFERRABLE INITIALLY
//!   DEFERRED FOR EACH ROW`): its function runs while the producer's transaction commits. Its
//!   `WHEN` clause, evaluated at the insert without calling anything, compares the version with
//!   this session's cache of the version at which it last decided (`apalis_pgmq.nv_<queue>`);
//!   while they match no event is even queued. The function reads the version, then the armed
//!   rows of the queue's channel; for the newest `arm_id` above this session's mark
//!   (`apalis_pgmq.nm_<queue>`) it takes `pg_try_advisory_xact_lock(arming)` (never waits),
//!   sends one `{"e":"wake"}` NOTIFY and raises the mark. Mark, cache and NOTIFY are set in the
//!   producer's transaction: a rollback (or a rolled-back savepoint) discards them together. A
//!   transaction that does not get the lock leaves the wake-up to the one committing it.
//! - *Disarming.* The runtime that receives the NOTIFY disarms its own row (only the generation
//!   it answered), so a busy queue stops costing producers notifications.
//! - *Settling.* After arming, the worker checks that no other transaction holds
//!   `RowExclusiveLock` on the queue table (every inserting transaction does until it ends); once
//!   none does, it reads once more. It checks at most [`SETTLE_DELAYS`]`.len() + 1` times, then
//!   leaves the rest to the fallback deadline.
//! - *Fallback.* The deadline above, plus the earliest visibility time of any message (probed
//!   once per idle period: delayed jobs, backoffs, leases that may lapse; a message that became
//!   visible since the last read counts as due now) and times announced by other workers'
//!   retries.
//!
//! # Interleavings
//!
//! A producer session P inserts job J in transaction T, which takes `RowExclusiveLock` on the
//! queue table at its insert (`l`) and holds it until it commits (`c`); its commit-time trigger,
//! if an event was queued, runs at `f` (`l < f < c`). Worker W arms arming A (`arm_id` a,
//! committed at `t_A`), bumps the version at `t_V > t_A`, then runs its settle checks; `m_P` is
//! P's mark.
//!
//! 1. **P's insert runs after `t_V`.** The `WHEN` clause saw the version move, so an event is
//!    queued; at `f` the function sees A (READ COMMITTED: its snapshot follows the version read,
//!    which follows `t_V > t_A`).
//!    - a. *a > m_P and P gets the lock*: P notifies; the notification is delivered after `c`;
//!      W's read after it sees J. Latency: the notification's.
//!    - b. *a > m_P, the lock is taken*: another transaction H is between its commit-time trigger
//!      and the end of its commit, with a NOTIFY queued for A. H's commit wakes W; W reads and,
//!      idle again, arms anew and settles. P's `l` precedes `f`, which precedes the end of H's
//!      commit, W's receipt, the new arming and its settle checks: each check fails while P is
//!      open, and the first after `c` reads J (or the read right after H's notification already
//!      saw J). **The one exception**: H fails after its trigger ran (a serialization failure at
//!      commit, a full notification queue, a later deferred constraint of its own, `PREPARE
//!      TRANSACTION`, which refuses a pending NOTIFY): nothing is sent, and J is read at the next
//!      notification for A (the next insert of a session without a mark for A takes the free
//!      lock) or at W's fallback deadline. It needs a commit failing within the moment in which
//!      another transaction's commit-time trigger ran.
//!    - c. *a ≤ m_P*: P's session already committed a notification for an arming at least as new
//!      as A, which reached W after W recorded A: W was woken, read, and arms anew with an id
//!      above m_P; that arming committed after `f > l`, so its settle checks see P until `c`:
//!      as 1b without the exception.
//!    - d. *A already disarmed*: W was woken for A and re-arms after reading: as 1c.
//! 2. **P's insert ran before `t_V`, or found its cache valid.** No event was queued. P's `l`
//!    precedes the bump, which precedes the settle checks: each fails while P is open, the first
//!    after `c` reads J. If P stays open past the last check (a long transaction), W reads J at
//!    its fallback deadline, which a failing check never moves.
//! 3. **P commits before `t_A`.** W's read after arming and settling sees J.
//! 4. **P aborts.** There is no job. Its NOTIFY, mark and cache are discarded together, so its
//!    next insert looks again and notifies. If P held the lock for A, a session that skipped
//!    meanwhile is case 1b's exception.
//! 5. **A notification is lost** (the LISTEN connection dropped, or stopped delivering and was
//!    replaced by the health check). On every (re)connect the runtime wakes every worker (read
//!    before waiting) and forgets its armings, so W re-arms: the new `arm_id` is above every
//!    mark, and the next insert of every session notifies again. Until then the deadline bounds
//!    pickup; meanwhile each session sent at most one notification into the void.
//! 6. **A long transaction, or REPEATABLE READ.** Under READ COMMITTED the decision is made at
//!    commit with a snapshot taken then, and the lock is held only through that commit, so a
//!    long transaction never makes another session skip. Under REPEATABLE READ or SERIALIZABLE
//!    the function's snapshot may predate an arming whose bump the `WHEN` clause saw: finding no
//!    arming above its mark, it notifies anyway, once per session per version.
//! 7. **A long-lived writer** holds `RowExclusiveLock` on the queue table for minutes. It
//!    delays nobody: producers do not look at locks, W's settle checks stop after the schedule
//!    (a few statements per arming, so an idle worker stays far below 0.2 statements/s), and
//!    jobs committed by other producers meanwhile notify as in case 1.
//! 8. **A stale disarm.** W was woken for generation `g` and its disarm runs late, after W
//!    re-armed with `g + 1`: the disarm matches only `gen = g`, so the new arming stays.
//! 9. **The listener is reconnecting.** W keeps its deadline; notifications sent meanwhile are
//!    lost, which case 5 covers once the listener is back; until then the deadline bounds pickup.
//! 10. **Work made visible by an update** (a release at shutdown or over capacity, a retry, a
//!     lease given back) fires no insert trigger: the worker that wrote it wakes its own runtime
//!     directly and other processes through `apalis_pgmq.wake_others`, which notifies only when
//!     some other process waits. Leases that lapse (a crashed worker) are known visibility
//!     times: the probe finds them.
//!
//! Producers take no lock of ours but `pg_try_advisory_xact_lock`, which never waits, and write
//! no row, so two producers inserting into queues x and y in opposite orders cannot deadlock
//! through this crate, and no producer waits on another because of it.

use std::time::Duration;

use sqlx::PgExecutor;
use tokio::time::Instant;

use crate::error::Result;

/// Interval between re-reads while lingering after a busy period.
pub(crate) const LINGER_STEP: Duration = Duration::from_millis(2);

/// Delays between the settle checks after an arming (the first check runs at once). About 4 s in
/// all: inserts in flight at arming that commit within it are read at once; later ones at the
/// fallback deadline.
pub(crate) const SETTLE_DELAYS: [Duration; 5] = [
    Duration::from_millis(5),
    Duration::from_millis(25),
    Duration::from_millis(125),
    Duration::from_millis(625),
    Duration::from_millis(3125),
];

/// The shortest wait before reading again for a message the probe says is visible.
pub(crate) const REPROBE_FLOOR: Duration = Duration::from_millis(5);

/// How long an arming lasts, in poll intervals: long enough that an idle worker re-arms only
/// every few polls, short enough that a crashed process's row stops costing producers
/// notifications soon (rows expired for a minute are swept by the next arming).
pub(crate) const ARM_TTL_POLLS: u32 = 4;

/// Re-arm once fewer than this many poll intervals of the arming are left.
pub(crate) const REARM_WHEN_LEFT_POLLS: f64 = 1.5;

/// What the fetcher should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Read (claim) from the queue now.
    Read,
    /// A read is due but the worker is held back (its outcomes are written more slowly than
    /// its jobs finish): wait for the completer, then ask again. Not idle: nothing is armed.
    AwaitOutcomes,
    /// Arm this process's wake-up, then report with [`Plan::on_armed`].
    Arm,
    /// Check that inserts in flight at arming have ended, then [`Plan::on_settled`].
    CheckSettled,
    /// Look up the earliest future visibility time, then [`Plan::on_probed`].
    Probe,
    /// Wait until this time, a wake-up ([`Plan::on_wake_now`], [`Plan::on_wake_at`]), whichever
    /// comes first; then ask again.
    Sleep(Instant),
}

/// The settle checks left after an arming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settle {
    due: Instant,
    checks_done: usize,
}

/// A source of random numbers in `[0, 1)` for jitter, injected so tests are deterministic.
pub(crate) type Random = Box<dyn FnMut() -> f64 + Send>;

/// A worker's schedule: when to read, wait for its outcomes, arm, check and sleep. Pure: it
/// decides from what it is told, the time it is given and the random numbers it is handed, so
/// tests drive every transition without a database.
pub(crate) struct Plan {
    poll: Duration,
    jitter: f64,
    random: Random,
    linger_polls: u32,
    /// Read before anything else: after a non-empty read, a wake-up, a start or an error.
    read_now: bool,
    /// The fallback deadline, fixed when the worker went idle (the first empty read after work).
    deadline: Option<Instant>,
    settle: Option<Settle>,
    /// Earliest future visibility time: `None` until probed in this idle period.
    next_visible: Option<Option<Instant>>,
    /// A time another worker said work becomes visible (a retry's backoff).
    due: Option<Instant>,
    /// Short re-reads left before arming, after a busy period.
    linger_left: u32,
    /// The next lingering re-read.
    linger_at: Option<Instant>,
    /// After a failed arming, not before this time.
    arm_retry_at: Option<Instant>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("read_now", &self.read_now)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Plan {
    /// `poll` moved up or down by at most `jitter` of itself, at random, fixes each idle
    /// period's fallback deadline; `linger_polls` short re-reads follow a busy period.
    pub(crate) fn new(poll: Duration, jitter: f64, linger_polls: u32, random: Random) -> Self {
        Self {
            poll,
            jitter,
            random,
            linger_polls,
            read_now: true,
            deadline: None,
            settle: None,
            next_visible: None,
            due: None,
            linger_left: 0,
            linger_at: None,
            arm_retry_at: None,
        }
    }

    /// The fallback deadline of an idle period starting at `now`.
    fn deadline_from(&mut self, now: Instant) -> Instant {
        let unit = (self.random)().clamp(0.0, 1.0);
        let factor = 1.0 + self.jitter * (2.0 * unit - 1.0);
        now + self.poll.mul_f64(factor.max(0.0))
    }

    /// Whether a read is due at `now` (what [`next`](Self::next) would answer `Read` for).
    fn read_due(&self, now: Instant) -> bool {
        self.read_now
            || self.deadline.is_some_and(|d| now >= d)
            || self.due.is_some_and(|d| d <= now)
            || self.linger_at.is_some_and(|at| now >= at)
            || matches!(self.next_visible, Some(Some(t)) if t <= now)
    }

    /// The next step at `now`. `wants_arm`: this runtime listens on demand and its arming is
    /// missing or runs out within [`REARM_WHEN_LEFT_POLLS`] poll intervals. `held_back`: the
    /// worker's unwritten outcomes are over their bound; a read that is due waits for them
    /// ([`Step::AwaitOutcomes`]), and the worker does not count as idle meanwhile, so it
    /// never arms a wake-up for that wait.
    pub(crate) fn next(&mut self, now: Instant, wants_arm: bool, held_back: bool) -> Step {
        if held_back && self.read_due(now) {
            return Step::AwaitOutcomes;
        }
        if self.read_now {
            self.read_now = false;
            return Step::Read;
        }
        let deadline = match self.deadline {
            Some(d) => d,
            None => {
                let d = self.deadline_from(now);
                self.deadline = Some(d);
                d
            }
        };
        if now >= deadline {
            return Step::Read;
        }
        if self.due.is_some_and(|d| d <= now) {
            self.due = None;
            return Step::Read;
        }
        if let Some(at) = self.linger_at {
            if now >= at {
                self.linger_at = None;
                return Step::Read;
            }
            return Step::Sleep(at);
        }
        if self.linger_left > 0 {
            self.linger_left -= 1;
            let at = now + LINGER_STEP;
            self.linger_at = Some(at);
            return Step::Sleep(at);
        }
        if wants_arm && self.arm_retry_at.is_none_or(|t| now >= t) {
            return Step::Arm;
        }
        if self.settle.is_some_and(|s| s.due <= now) {
            return Step::CheckSettled;
        }
        match self.next_visible {
            None => return Step::Probe,
            Some(Some(t)) if t <= now => {
                self.next_visible = None;
                return Step::Read;
            }
            Some(_) => {}
        }
        let mut until = deadline;
        for t in [
            self.settle.map(|s| s.due),
            self.next_visible.flatten(),
            self.due,
        ]
        .into_iter()
        .flatten()
        {
            until = until.min(t);
        }
        Step::Sleep(until)
    }

    /// A read returned messages (`got`) or none.
    pub(crate) fn on_read(&mut self, now: Instant, got: bool) {
        if got {
            // Busy: read again at once; the next idle period gets its own deadline.
            self.read_now = true;
            self.deadline = None;
            self.next_visible = None;
            self.linger_left = self.linger_polls;
            self.linger_at = None;
            return;
        }
        if self.deadline.is_none_or(|d| d <= now) {
            self.deadline = Some(self.deadline_from(now));
        }
        if matches!(self.next_visible, Some(Some(t)) if t <= now) {
            self.next_visible = None;
        }
    }

    /// The arming was written (`ok`), or failed (try again after a poll interval).
    pub(crate) fn on_armed(&mut self, now: Instant, ok: bool) {
        if ok {
            self.arm_retry_at = None;
            self.settle = Some(Settle {
                due: now,
                checks_done: 0,
            });
        } else {
            self.arm_retry_at = Some(now + self.poll);
        }
    }

    /// The settle check answered: `settled` means no insert from before the arming is in flight.
    pub(crate) fn on_settled(&mut self, now: Instant, settled: bool) {
        let Some(s) = self.settle.as_mut() else {
            return;
        };
        if settled {
            self.settle = None;
            self.read_now = true;
            return;
        }
        match SETTLE_DELAYS.get(s.checks_done) {
            Some(delay) => {
                s.checks_done += 1;
                s.due = now + *delay;
            }
            // A long-lived writer: the fallback deadline takes over.
            None => self.settle = None,
        }
    }

    /// The settle check could not run: leave it to the deadline.
    pub(crate) fn on_settle_failed(&mut self) {
        self.settle = None;
    }

    /// The earliest message becomes visible in `next` (none: `None`; zero: one is visible
    /// already, e.g. it became visible after the last read, or another worker's claim of it is
    /// still in flight). A known time is at least [`REPROBE_FLOOR`] away, so a message that a
    /// competing claim holds for a moment cannot make an idle worker spin.
    pub(crate) fn on_probed(&mut self, now: Instant, next: Option<Duration>) {
        self.next_visible = Some(next.map(|d| now + d.max(REPROBE_FLOOR)));
    }

    /// A notification, a reconnect or a release: work may be there now, or later (a delayed
    /// job's insert notifies too), so the next idle step probes again.
    pub(crate) fn on_wake_now(&mut self) {
        self.read_now = true;
        self.next_visible = None;
    }

    /// Work becomes visible at `at`.
    pub(crate) fn on_wake_at(&mut self, at: Instant) {
        self.due = Some(self.due.map_or(at, |d| d.min(at)));
    }

    /// An infrastructure error was backed off: start over with a read.
    pub(crate) fn on_recovered(&mut self) {
        self.read_now = true;
    }

    /// The fallback deadline of the current idle period, if idle.
    #[cfg(test)]
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// This runtime's arming of one queue's wake-up (its row in `apalis_pgmq.listeners`), shared
/// by the runtime's workers of the queue. Pure: times are given, so tests drive it with paused
/// time.
///
/// Every arming gets a new generation. It is recorded *before* its row is written, because the
/// notification that answers it can arrive before the write returns; a disarm clears only the
/// generation it answered, so a late disarm never clears a newer arming.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Arming {
    current: Option<Armed>,
    generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Armed {
    until: Instant,
    generation: u64,
}

impl Arming {
    /// How long an arming lasts: about [`ARM_TTL_POLLS`] poll intervals, plus a margin for
    /// the clocks of this process and the server.
    pub(crate) fn ttl(poll: Duration) -> Duration {
        poll * ARM_TTL_POLLS + Duration::from_secs(5)
    }

    /// Whether an idle worker should arm: no arming, or one that ends within `margin`.
    pub(crate) fn wanted(&self, now: Instant, margin: Duration) -> bool {
        self.current.is_none_or(|a| a.until <= now + margin)
    }

    /// Records a new arming lasting `ttl` from `now`; its generation.
    pub(crate) fn begin(&mut self, now: Instant, ttl: Duration) -> u64 {
        self.generation += 1;
        self.current = Some(Armed {
            until: now + ttl,
            generation: self.generation,
        });
        self.generation
    }

    /// The arming of `generation` could not be written.
    pub(crate) fn failed(&mut self, generation: u64) {
        if self.current.is_some_and(|a| a.generation == generation) {
            self.current = None;
        }
    }

    /// A notification answered the arming: the generation to disarm, if armed.
    pub(crate) fn answered(&mut self) -> Option<u64> {
        self.current.take().map(|a| a.generation)
    }

    /// Forgets the arming (after a reconnect the row may be gone or stale).
    pub(crate) fn forget(&mut self) {
        self.current = None;
    }
}

/// Arms `owner`'s wake-up on `channel` as generation `gen` for `ttl`.
pub(crate) async fn arm<'c, E: PgExecutor<'c>>(
    executor: E,
    channel: &str,
    owner: &str,
    ttl: Duration,
    generation: u64,
) -> Result<()> {
    sqlx::query(crate::sql::ARM)
        .bind(channel)
        .bind(owner)
        .bind(ttl.as_secs_f64())
        .bind(i64::try_from(generation).unwrap_or(i64::MAX))
        .execute(executor)
        .await?;
    Ok(())
}

/// Tells producers' sessions that cached "nobody waits" to look again: bumps the listeners
/// version. Called after an arming (or a subscription) has committed, so a producer that reads
/// the new version also sees the row.
pub(crate) async fn listeners_changed<'c, E: PgExecutor<'c>>(executor: E) -> Result<()> {
    sqlx::query(crate::sql::LISTENERS_CHANGED)
        .execute(executor)
        .await?;
    Ok(())
}

/// Clears generation `gen` of `owner`'s arming on `channel` (a newer one stays).
pub(crate) async fn disarm<'c, E: PgExecutor<'c>>(
    executor: E,
    channel: &str,
    owner: &str,
    generation: u64,
) -> Result<()> {
    sqlx::query(crate::sql::DISARM)
        .bind(channel)
        .bind(owner)
        .bind(i64::try_from(generation).unwrap_or(i64::MAX))
        .execute(executor)
        .await?;
    Ok(())
}

/// Whether no transaction other than ours holds `RowExclusiveLock` on the queue table.
pub(crate) async fn inserts_settled<'c, E: PgExecutor<'c>>(
    executor: E,
    queue: &str,
) -> Result<bool> {
    let settled: bool = sqlx::query_scalar(crate::sql::INSERTS_SETTLED)
        .bind(queue)
        .fetch_one(executor)
        .await?;
    Ok(settled)
}

/// Where a queue's wake-ups go, for [`wake_others`].
#[derive(Debug, Clone)]
pub(crate) struct WakeTarget {
    pub(crate) queue: String,
    pub(crate) queue_channel: String,
    pub(crate) namespace_channel: String,
    /// This process's owner prefix in `apalis_pgmq.listeners`.
    pub(crate) owner: String,
}

/// Tells idle workers of other processes that messages become visible in `delay` (after an
/// update no insert trigger sees). Sends nothing when no other process waits.
pub(crate) async fn wake_others<'c, E: PgExecutor<'c>>(
    executor: E,
    target: &WakeTarget,
    delay: Duration,
) -> Result<()> {
    sqlx::query(crate::sql::WAKE_OTHERS)
        .bind(&target.queue)
        .bind(&target.queue_channel)
        .bind(&target.namespace_channel)
        .bind(delay.as_secs_f64())
        .bind(&target.owner)
        .execute(executor)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLL: Duration = Duration::from_secs(30);

    fn fixed(unit: f64) -> Random {
        Box::new(move || unit)
    }

    fn idle_plan(now: Instant) -> Plan {
        let mut p = Plan::new(POLL, 0.0, 0, fixed(0.5));
        assert_eq!(p.next(now, false, false), Step::Read, "a start reads first");
        p.on_read(now, false);
        p
    }

    #[tokio::test(start_paused = true)]
    async fn reads_again_after_work_then_probes_and_sleeps_to_the_deadline() {
        let now = Instant::now();
        let mut p = Plan::new(POLL, 0.0, 0, fixed(0.5));
        assert_eq!(p.next(now, false, false), Step::Read);
        p.on_read(now, true);
        assert_eq!(
            p.next(now, false, false),
            Step::Read,
            "non-empty read: read again"
        );
        p.on_read(now, false);
        assert_eq!(p.deadline(), Some(now + POLL));
        assert_eq!(p.next(now, false, false), Step::Probe);
        p.on_probed(now, None);
        assert_eq!(p.next(now, false, false), Step::Sleep(now + POLL));
        // Nothing moves the deadline: an empty read after a wake-up keeps it.
        let later = now + Duration::from_secs(10);
        p.on_wake_now();
        assert_eq!(p.next(later, false, false), Step::Read);
        p.on_read(later, false);
        assert_eq!(
            p.next(later, false, false),
            Step::Probe,
            "a wake-up may be for a delayed job"
        );
        p.on_probed(later, None);
        assert_eq!(p.next(later, false, false), Step::Sleep(now + POLL));
        // At the deadline: read, and the next idle period gets a new deadline.
        let at = now + POLL;
        assert_eq!(p.next(at, false, false), Step::Read);
        p.on_read(at, false);
        assert_eq!(p.deadline(), Some(at + POLL));
    }

    #[tokio::test(start_paused = true)]
    async fn a_known_visibility_time_or_announced_retry_shortens_the_sleep() {
        let now = Instant::now();
        let mut p = idle_plan(now);
        assert_eq!(p.next(now, false, false), Step::Probe);
        p.on_probed(now, Some(Duration::from_secs(3)));
        let t = now + Duration::from_secs(3);
        assert_eq!(p.next(now, false, false), Step::Sleep(t));
        assert_eq!(
            p.next(t, false, false),
            Step::Read,
            "the delayed job is due"
        );
        p.on_read(t, false);
        assert_eq!(
            p.next(t, false, false),
            Step::Probe,
            "probe again after passing it"
        );
        p.on_probed(t, None);
        p.on_wake_at(t + Duration::from_secs(1));
        assert_eq!(
            p.next(t, false, false),
            Step::Sleep(t + Duration::from_secs(1))
        );
        assert_eq!(p.next(t + Duration::from_secs(1), false, false), Step::Read);
    }

    #[tokio::test(start_paused = true)]
    async fn settle_checks_are_bounded_and_never_postpone_the_deadline() {
        let now = Instant::now();
        let mut p = idle_plan(now);
        assert_eq!(p.next(now, true, false), Step::Arm);
        p.on_armed(now, true);
        let mut t = now;
        let mut checks = 0;
        loop {
            match p.next(t, false, false) {
                Step::CheckSettled => {
                    checks += 1;
                    p.on_settled(t, false);
                }
                Step::Probe => p.on_probed(t, None),
                Step::Sleep(until) => {
                    if until == now + POLL {
                        break;
                    }
                    assert!(until > t);
                    t = until;
                }
                other => panic!("unexpected {other:?} at {:?}", t - now),
            }
        }
        assert_eq!(
            checks,
            SETTLE_DELAYS.len() + 1,
            "a long-lived writer costs a few checks"
        );
        assert!(t - now < Duration::from_secs(5));
        assert_eq!(
            p.next(now + POLL, false, false),
            Step::Read,
            "the deadline still holds"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_settled_check_reads_once() {
        let now = Instant::now();
        let mut p = idle_plan(now);
        assert_eq!(p.next(now, true, false), Step::Arm);
        p.on_armed(now, true);
        assert_eq!(p.next(now, false, false), Step::CheckSettled);
        p.on_settled(now, false);
        let t = now + SETTLE_DELAYS[0];
        assert_eq!(p.next(now, false, false), Step::Probe);
        p.on_probed(now, None);
        assert_eq!(p.next(now, false, false), Step::Sleep(t));
        assert_eq!(p.next(t, false, false), Step::CheckSettled);
        p.on_settled(t, true);
        assert_eq!(p.next(t, false, false), Step::Read);
        p.on_read(t, false);
        assert_eq!(p.next(t, false, false), Step::Sleep(now + POLL));
    }

    #[tokio::test(start_paused = true)]
    async fn lingers_after_work_before_arming_and_backs_off_a_failed_arming() {
        let now = Instant::now();
        let mut p = Plan::new(POLL, 0.0, 2, fixed(0.5));
        assert_eq!(p.next(now, true, false), Step::Read);
        p.on_read(now, true);
        assert_eq!(p.next(now, true, false), Step::Read);
        p.on_read(now, false);
        let mut t = now;
        for _ in 0..2 {
            let Step::Sleep(at) = p.next(t, true, false) else {
                panic!("linger")
            };
            assert_eq!(at, t + LINGER_STEP);
            t = at;
            assert_eq!(p.next(t, true, false), Step::Read);
            p.on_read(t, false);
        }
        assert_eq!(p.next(t, true, false), Step::Arm, "lingering over: arm");
        p.on_armed(t, false);
        assert_eq!(
            p.next(t, true, false),
            Step::Probe,
            "no arming retry at once"
        );
        p.on_probed(t, None);
        assert!(matches!(p.next(t, true, false), Step::Sleep(_)));
        assert_eq!(
            p.next(t + POLL, true, false),
            Step::Read,
            "the deadline came first"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_held_back_by_unwritten_outcomes_never_arms() {
        let now = Instant::now();
        let mut p = Plan::new(POLL, 0.0, 0, fixed(0.5));
        assert_eq!(p.next(now, true, false), Step::Read);
        p.on_read(now, true);
        // Busy, and its outcomes lag: every step is a wait for them, never an arming, however
        // long it lasts (past the fallback deadline too).
        for secs in [0, 1, 10, 60, 600] {
            let t = now + Duration::from_secs(secs);
            assert_eq!(p.next(t, true, true), Step::AwaitOutcomes, "at {secs} s");
        }
        // Caught up: the read that was due runs.
        let t = now + Duration::from_secs(600);
        assert_eq!(p.next(t, true, false), Step::Read);
        p.on_read(t, false);
        // Now idle: arming is allowed, and lagging outcomes do not stop an idle plan from
        // probing or sleeping (nothing to read).
        assert_eq!(p.next(t, true, true), Step::Arm);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_jitter_comes_from_the_injected_source() {
        let now = Instant::now();
        for (unit, expect) in [(0.0, 27.0), (0.5, 30.0), (1.0, 33.0)] {
            let mut p = Plan::new(POLL, 0.1, 0, fixed(unit));
            assert_eq!(p.next(now, false, false), Step::Read);
            p.on_read(now, false);
            let d = p.deadline().expect("idle").duration_since(now);
            assert!((d.as_secs_f64() - expect).abs() < 1e-6, "{unit}: {d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn arming_generations_and_expiry() {
        let now = Instant::now();
        let ttl = Arming::ttl(POLL);
        let margin = POLL.mul_f64(REARM_WHEN_LEFT_POLLS);
        let mut a = Arming::default();
        assert!(a.wanted(now, margin), "nothing armed");
        let g1 = a.begin(now, ttl);
        assert!(!a.wanted(now, margin));
        assert!(!a.wanted(now + ttl - margin - Duration::from_secs(1), margin));
        assert!(
            a.wanted(now + ttl - margin, margin),
            "re-arm before it runs out"
        );
        // Answered: disarm g1; a new arming gets g2, and a late failure of g1 leaves it.
        assert_eq!(a.answered(), Some(g1));
        assert_eq!(a.answered(), None, "answered once");
        let g2 = a.begin(now, ttl);
        assert!(g2 > g1);
        a.failed(g1);
        assert!(
            !a.wanted(now, margin),
            "a stale failure does not clear a newer arming"
        );
        a.failed(g2);
        assert!(a.wanted(now, margin));
        let g3 = a.begin(now, ttl);
        a.forget();
        assert!(a.wanted(now, margin));
        assert!(a.begin(now, ttl) > g3);
    }
}
