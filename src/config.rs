//! Backend configuration.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::notify::{NotifyChannels, NotifyMode};
use crate::queue::DEFAULT_MAX_PAYLOAD_BYTES;

/// The default [`Config::heartbeat_interval`].
pub(crate) const DEFAULT_HEARTBEAT_MS: u64 = 30_000;

/// What happens to a job that completed successfully (`Done`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DoneAction {
    /// Move it to the archive table `pgmq.a_<queue>` (PGMQ's `archive`). The default.
    #[default]
    Archive,
    /// Delete it.
    Delete,
}

/// What happens to a job whose handler returned an `AbortError` (`Killed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KilledAction {
    /// Delete it. The default.
    #[default]
    Delete,
    /// Move it to the archive table.
    Archive,
    /// Move it to the dead-letter queue with the error.
    DeadLetter,
}

/// What happens to a job that failed and has no attempts left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ExhaustedAction {
    /// Move it to the dead-letter queue `<queue>_dlq`, with the last error. The default.
    #[default]
    DeadLetter,
    /// Move it to the archive table.
    Archive,
    /// Delete it.
    Delete,
}

/// Exponential backoff with jitter and a cap, used between failed attempts.
///
/// The delay before attempt `n + 1` after failed attempt `n` is
/// `min(max, base × factor^(n−1))`, then reduced by a random fraction of at most `jitter`
/// (so retries of jobs that failed together spread out).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    factor: f64,
    max: Duration,
    jitter: f64,
}

impl Default for Backoff {
    /// 1 s, doubling, capped at 1 hour, up to 20 % jitter.
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(3600),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// Sets the delay after the first failure.
    #[must_use]
    pub fn base(mut self, base: Duration) -> Self {
        self.base = base;
        self
    }

    /// Sets the growth factor per attempt (≥ 1).
    #[must_use]
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// Sets the cap.
    #[must_use]
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// Sets the jitter fraction in `[0, 1]`: 0 gives exact delays.
    #[must_use]
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay before the next attempt, with no jitter, after failed attempt `attempt`
    /// (1-based): the upper bound of [`Backoff::delay`].
    #[must_use]
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.base.as_secs_f64() * self.factor.powi(exp);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs.max(0.0))
        }
    }

    /// The delay after failed attempt `attempt`, with jitter drawn from `unit` in `[0, 1)`.
    #[must_use]
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        ceiling.mul_f64(1.0 - self.jitter * unit.clamp(0.0, 1.0))
    }

    fn validate(&self) -> Result<()> {
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(Error::Config(format!(
                "backoff factor must be a finite number ≥ 1, got {}",
                self.factor
            )));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(Error::Config(format!(
                "backoff jitter must be within [0, 1], got {}",
                self.jitter
            )));
        }
        if !(self.base.as_secs_f64().is_finite()) || self.max > Duration::from_secs(365 * 24 * 3600)
        {
            return Err(Error::Config(format!(
                "backoff cap must be at most 365 days, got {:?}",
                self.max
            )));
        }
        if self.base > self.max {
            return Err(Error::Config(format!(
                "backoff base {:?} is larger than its cap {:?}",
                self.base, self.max
            )));
        }
        Ok(())
    }
}

/// Configuration of a [`PgmqStorage`](crate::PgmqStorage).
///
/// `Config::default()` then consuming setters; the storage validates it once when built
/// ([`PgmqStorage::with_config`](crate::PgmqStorage::with_config)).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use apalis_pgmq_notify::{Backoff, Config, DoneAction};
///
/// let config = Config::default()
///     .visibility_timeout(Duration::from_secs(60))
///     .max_attempts(5)
///     .backoff(Backoff::default().base(Duration::from_millis(500)))
///     .on_done(DoneAction::Delete);
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a claimed message stays invisible to other readers. Renewed while the handler
    /// runs, so it bounds how soon a crashed worker's jobs are retried, not how long a job may run.
    pub(crate) visibility_timeout: Duration,
    /// Messages claimed by a worker's first read (and every read when claims do not adapt).
    pub(crate) fetch_batch_size: usize,
    /// Largest claim an adapting worker grows to.
    pub(crate) max_fetch_batch_size: usize,
    /// Whether claims adapt (grow while the worker keeps up, overlap while reads are slow).
    pub(crate) adaptive_claims: bool,
    /// Fallback poll interval when no notification arrives (before jitter).
    pub(crate) poll_interval: Duration,
    /// Fraction of `poll_interval` added or removed at random, so workers do not poll in step.
    pub(crate) poll_jitter: f64,
    /// Attempts (deliveries, PGMQ `read_ct`) before a failing job is given up.
    pub(crate) max_attempts: u32,
    /// Delay between failed attempts.
    pub(crate) backoff: Backoff,
    /// Done → archive or delete.
    pub(crate) on_done: DoneAction,
    /// Killed → delete, archive or dead-letter.
    pub(crate) on_killed: KilledAction,
    /// Failed with no attempts left → dead-letter, archive or delete.
    pub(crate) on_exhausted: ExhaustedAction,
    /// Completions written per statement at most.
    pub(crate) completion_batch_size: usize,
    /// How long a completion may wait for others to share its statement.
    pub(crate) completion_flush_interval: Duration,
    /// Largest accepted job payload (message plus headers), in bytes.
    pub(crate) max_payload_bytes: usize,
    /// Whether workers subscribe to LISTEN/NOTIFY wake-ups.
    pub(crate) listen: bool,
    /// Channel names for the queue's notifications.
    pub(crate) channels: NotifyChannels,
    /// How the queue's trigger announces inserts (installed by the worker when listening).
    pub(crate) notify_mode: NotifyMode,
    /// After a busy period, how long an idle worker keeps re-reading before it arms a wake-up.
    pub(crate) linger: Duration,
    /// How soon a LISTEN connection that silently stopped delivering is replaced.
    pub(crate) listener_health_check: Duration,
    /// How long a job that returned `DeferredError` waits before it is visible again, so a
    /// handler that always defers cannot loop hot.
    pub(crate) defer_delay: Duration,
    /// How often a process refreshes its workers' rows in the worker registry (and prunes).
    pub(crate) heartbeat_interval: Duration,
    /// How long done (archived) jobs are kept; `None`: forever.
    pub(crate) archive_retention: Option<Duration>,
    /// How long dead letters are kept; `None`: forever.
    pub(crate) dead_letter_retention: Option<Duration>,
    /// How long a finished (archived) job keeps its idempotency key taken; `None`: the key is
    /// free once the job leaves the queue.
    pub(crate) idempotency_window: Option<Duration>,
    /// Whether workers claim higher priorities first.
    pub(crate) priorities: bool,
    /// Whether workers keep every finished job's result (`apalis_pgmq.results`) for waiters.
    pub(crate) store_results: bool,
    /// How long stored results are kept; `None`: forever.
    pub(crate) result_retention: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(30),
            fetch_batch_size: 100,
            max_fetch_batch_size: 1000,
            adaptive_claims: true,
            poll_interval: Duration::from_secs(30),
            poll_jitter: 0.1,
            max_attempts: 25,
            backoff: Backoff::default(),
            on_done: DoneAction::Archive,
            on_killed: KilledAction::Delete,
            on_exhausted: ExhaustedAction::DeadLetter,
            completion_batch_size: 500,
            completion_flush_interval: Duration::from_millis(5),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            listen: true,
            channels: NotifyChannels::default(),
            notify_mode: NotifyMode::OnDemand,
            linger: Duration::from_millis(10),
            listener_health_check: Duration::from_millis(crate::notify::DEFAULT_HEALTH_CHECK_MS),
            defer_delay: Duration::from_secs(1),
            heartbeat_interval: Duration::from_millis(DEFAULT_HEARTBEAT_MS),
            archive_retention: Some(Duration::from_secs(7 * 24 * 3600)),
            dead_letter_retention: Some(Duration::from_secs(30 * 24 * 3600)),
            idempotency_window: None,
            priorities: false,
            store_results: false,
            result_retention: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

impl Config {
    /// Visibility timeout of claimed messages (default 30 s, at least 1 s). The lease is renewed
    /// every third of it while a job runs.
    #[must_use]
    pub fn visibility_timeout(mut self, vt: Duration) -> Self {
        self.visibility_timeout = vt;
        self
    }

    /// Messages claimed by a worker's first read (default 100, 1 to 10 000). With
    /// [`adaptive_claims`](Self::adaptive_claims) on (the default) later claims grow up to
    /// [`max_fetch_batch_size`](Self::max_fetch_batch_size) while the worker keeps up and
    /// shrink when it does not; off, every claim is this size. A worker never holds more than
    /// it can start; see the crate docs on capacity.
    #[must_use]
    pub fn fetch_batch_size(mut self, n: usize) -> Self {
        self.fetch_batch_size = n;
        self
    }

    /// How long a job that finished (was archived) keeps its idempotency key taken, so a push
    /// with the same key within the window writes nothing (default `None`: a key is taken only
    /// while its job is pending, scheduled, running or waiting for a retry). "At most once per
    /// hour": `Some(1 h)`. Needs the archive (`DoneAction::Archive`, the default) and is at most
    /// the archive retention.
    #[must_use]
    pub fn idempotency_window(mut self, window: Option<Duration>) -> Self {
        self.idempotency_window = window;
        self
    }

    /// Whether workers claim jobs with a higher `TaskBuilder::priority` first (default off).
    /// Jobs without a priority (plain PGMQ messages too) have priority 0; a priority that is not
    /// a number counts as 0. Starvation is bounded: one claim in every
    /// [`FAIR_EVERY`](crate::FAIR_EVERY) takes the messages visible longest, whatever their
    /// priority. On, the queue gets an index on `(priority DESC, vt)` (created by `create_queue`
    /// and workers, as the table's owner), which every insert maintains.
    #[must_use]
    pub fn priorities(mut self, on: bool) -> Self {
        self.priorities = on;
        self
    }

    /// Whether workers keep each finished job's result (default off): its final status
    /// (`Done`, `Killed`, or `Failed` with no attempts left), its attempt, and the handler's
    /// output as JSON (serde) or the error's text, in `apalis_pgmq.results`, readable by job
    /// id with [`WaitForCompletion`](apalis_core::backend::WaitForCompletion) and
    /// [`PgmqStorage::results`](crate::PgmqStorage::results), for
    /// [`result_retention`](Self::result_retention). The result is written by the same
    /// statement as the job's outcome and announced on the queue's results channel, so
    /// waiters wake without polling. Jobs pushed with
    /// [`push_and_wait`](crate::PgmqStorage::push_and_wait) keep their result whatever this
    /// says. A retry is not a result: waiters wait for the final one.
    #[must_use]
    pub fn store_results(mut self, on: bool) -> Self {
        self.store_results = on;
        self
    }

    /// How long stored results are kept (default 1 day; `None`: forever). Workers prune older
    /// ones with the archive, in batches; [`prune_results`](crate::prune_results) does it on
    /// demand.
    #[must_use]
    pub fn result_retention(mut self, keep: Option<Duration>) -> Self {
        self.result_retention = keep;
        self
    }

    /// The largest claim an adapting worker grows to (default 1 000, at least
    /// `fetch_batch_size`, at most 10 000).
    #[must_use]
    pub fn max_fetch_batch_size(mut self, n: usize) -> Self {
        self.max_fetch_batch_size = n;
        self
    }

    /// Whether claims adapt (default on): the claim size doubles while reads come back full and
    /// the worker has started everything before the next claim arrives, halves when the worker
    /// is full with messages still held, and while the backlog lasts and even the fastest
    /// recent claim takes 2 ms or more (a far database, large claims) the next claim is sent
    /// before the previous one is used up (up to four in flight, fewer on a small pool). Off: one claim of `fetch_batch_size` at a time,
    /// sent when the previous one is used up.
    #[must_use]
    pub fn adaptive_claims(mut self, on: bool) -> Self {
        self.adaptive_claims = on;
        self
    }

    /// Fallback poll interval (default 30 s): how often an idle worker looks at the queue when no
    /// notification arrives.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Jitter fraction of the poll interval in `[0, 1)` (default 0.1).
    #[must_use]
    pub fn poll_jitter(mut self, jitter: f64) -> Self {
        self.poll_jitter = jitter;
        self
    }

    /// Default attempts before a failing job is given up (default 25). A job pushed with
    /// `TaskBuilder::max_attempts` keeps its own value.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Backoff between failed attempts.
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// What to do with successful jobs (default archive).
    #[must_use]
    pub fn on_done(mut self, action: DoneAction) -> Self {
        self.on_done = action;
        self
    }

    /// What to do with killed jobs (default delete).
    #[must_use]
    pub fn on_killed(mut self, action: KilledAction) -> Self {
        self.on_killed = action;
        self
    }

    /// What to do with jobs that failed their last attempt (default dead-letter).
    #[must_use]
    pub fn on_exhausted(mut self, action: ExhaustedAction) -> Self {
        self.on_exhausted = action;
        self
    }

    /// Most completions written in one statement (default 500).
    #[must_use]
    pub fn completion_batch_size(mut self, n: usize) -> Self {
        self.completion_batch_size = n;
        self
    }

    /// Longest wait for more completions to share a statement (default 5 ms).
    #[must_use]
    pub fn completion_flush_interval(mut self, interval: Duration) -> Self {
        self.completion_flush_interval = interval;
        self
    }

    /// Largest accepted job payload in bytes (default 1 MiB).
    #[must_use]
    pub fn max_payload_bytes(mut self, n: usize) -> Self {
        self.max_payload_bytes = n;
        self
    }

    /// Whether workers wake on LISTEN/NOTIFY (default `true`). With `false` they rely on the
    /// fallback poll interval and on known visibility times only.
    #[must_use]
    pub fn listen(mut self, on: bool) -> Self {
        self.listen = on;
        self
    }

    /// Channel names (prefix and namespace pattern) for this queue's notifications.
    #[must_use]
    pub fn notify_channels(mut self, channels: NotifyChannels) -> Self {
        self.channels = channels;
        self
    }

    /// How the queue's trigger announces inserts (default [`NotifyMode::OnDemand`]). Workers
    /// install the trigger on their queue when listening is on.
    #[must_use]
    pub fn notify_mode(mut self, mode: NotifyMode) -> Self {
        self.notify_mode = mode;
        self
    }

    /// After a busy period, how long an idle worker keeps re-reading every 2 ms before it arms a
    /// wake-up (default 10 ms; on-demand notifications only). Under a steady stream of jobs the
    /// worker then rarely arms, so producers rarely pay for a NOTIFY; `Duration::ZERO` arms at
    /// once.
    #[must_use]
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// How soon a LISTEN connection that silently stopped delivering (half-open TCP) is
    /// detected and replaced (default 10 s, 1 s to 1 h). The listener pings its connection (a
    /// protocol round trip, not a statement) after half of this without traffic, and gives up
    /// on it after the other half. One listener serves a process: it uses the shortest value of
    /// its storages.
    #[must_use]
    pub fn listener_health_check(mut self, interval: Duration) -> Self {
        self.listener_health_check = interval;
        self
    }

    /// How long a job whose handler returned `DeferredError` waits before it is visible again
    /// (default 1 s, at most 1 h). A deferral uses up an attempt like any other run, so a
    /// handler that always defers ends in the dead-letter queue after `max_attempts` runs.
    #[must_use]
    pub fn defer_delay(mut self, delay: Duration) -> Self {
        self.defer_delay = delay;
        self
    }

    /// How often a process refreshes the rows of its workers in the worker registry
    /// (`apalis_pgmq.workers`; default 30 s, 1 s to 1 h): one statement per interval for all
    /// of a process's workers. A worker whose process died stops being listed after three
    /// intervals. One heartbeat serves a process: it uses the shortest value of its storages.
    #[must_use]
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// How long done (archived) jobs are kept (default 7 days; `None` keeps everything). A
    /// worker process prunes older ones after its heartbeats, in batches of 10 000, one process
    /// per queue at a time; `apalis-pgmq-notify prune` and [`prune`](crate::prune) do it on
    /// demand.
    #[must_use]
    pub fn archive_retention(mut self, keep: Option<Duration>) -> Self {
        self.archive_retention = keep;
        self
    }

    /// How long dead letters are kept (default 30 days; `None` keeps everything).
    #[must_use]
    pub fn dead_letter_retention(mut self, keep: Option<Duration>) -> Self {
        self.dead_letter_retention = keep;
        self
    }

    /// Re-reads while lingering.
    pub(crate) fn linger_polls(&self) -> u32 {
        let step = crate::notify::wakeup::LINGER_STEP.as_micros().max(1);
        u32::try_from(self.linger.as_micros() / step).unwrap_or(u32::MAX)
    }

    /// The visibility timeout.
    #[must_use]
    pub fn get_visibility_timeout(&self) -> Duration {
        self.visibility_timeout
    }

    /// The default maximum attempts.
    #[must_use]
    pub fn get_max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The backoff.
    #[must_use]
    pub fn get_backoff(&self) -> Backoff {
        self.backoff
    }

    /// Checks every value; called once when a storage is built.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the first value out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        // Upper bounds keep every value within what PostgreSQL stores and what a worker can
        // wait for (tokio timers, `make_interval`): an out-of-range value fails here, once,
        // rather than every read later.
        const DAY: Duration = Duration::from_secs(24 * 3600);
        if !(Duration::from_secs(1)..=DAY * 7).contains(&self.visibility_timeout) {
            return bad(format!(
                "visibility_timeout must be within 1 s..=7 days, got {:?}",
                self.visibility_timeout
            ));
        }
        if self.poll_interval > DAY {
            return bad(format!(
                "poll_interval must be at most 1 day, got {:?}",
                self.poll_interval
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.heartbeat_interval)
        {
            return bad(format!(
                "heartbeat_interval must be within 1 s..=1 h, got {:?}",
                self.heartbeat_interval
            ));
        }
        if self.defer_delay > Duration::from_secs(3600) {
            return bad(format!(
                "defer_delay must be at most 1 h, got {:?}",
                self.defer_delay
            ));
        }
        if self.max_payload_bytes > 256 * 1024 * 1024 {
            return bad(format!(
                "max_payload_bytes must be at most 256 MiB (jsonb's limit is 255 MiB), got {}",
                self.max_payload_bytes
            ));
        }
        if !(1..=10_000).contains(&self.fetch_batch_size) {
            return bad(format!(
                "fetch_batch_size must be within 1..=10000, got {}",
                self.fetch_batch_size
            ));
        }
        if let (Some(w), Some(r)) = (self.idempotency_window, self.archive_retention)
            && w > r
        {
            return bad(format!(
                "idempotency_window ({w:?}) must not exceed archive_retention ({r:?}): pruned jobs cannot hold their keys"
            ));
        }
        if self
            .result_retention
            .is_some_and(|r| r < Duration::from_secs(1))
        {
            return bad(format!(
                "result_retention must be at least 1 s (None keeps results forever), got {:?}",
                self.result_retention
            ));
        }
        if self.max_fetch_batch_size > 10_000 {
            return bad(format!(
                "max_fetch_batch_size must be at most 10000, got {}",
                self.max_fetch_batch_size
            ));
        }
        if self.poll_interval < Duration::from_millis(10) {
            return bad(format!(
                "poll_interval must be at least 10 ms, got {:?}",
                self.poll_interval
            ));
        }
        if !(0.0..1.0).contains(&self.poll_jitter) {
            return bad(format!(
                "poll_jitter must be within [0, 1), got {}",
                self.poll_jitter
            ));
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1".to_owned());
        }
        if !(1..=10_000).contains(&self.completion_batch_size) {
            return bad(format!(
                "completion_batch_size must be within 1..=10000, got {}",
                self.completion_batch_size
            ));
        }
        if self.completion_flush_interval > Duration::from_secs(1) {
            return bad(format!(
                "completion_flush_interval must be at most 1 s, got {:?}",
                self.completion_flush_interval
            ));
        }
        if self.max_payload_bytes == 0 {
            return bad("max_payload_bytes must be positive".to_owned());
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600))
            .contains(&self.listener_health_check)
        {
            return bad(format!(
                "listener_health_check must be within 1 s..=1 h, got {:?}",
                self.listener_health_check
            ));
        }
        if self.linger > Duration::from_secs(1) {
            return bad(format!("linger must be at most 1 s, got {:?}", self.linger));
        }
        self.backoff.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff::default()
            .base(Duration::from_secs(2))
            .factor(3.0)
            .max(Duration::from_secs(100))
            .jitter(0.0);
        assert_eq!(b.delay(1, 0.5), Duration::from_secs(2));
        assert_eq!(b.delay(2, 0.5), Duration::from_secs(6));
        assert_eq!(b.delay(3, 0.5), Duration::from_secs(18));
        assert_eq!(b.delay(5, 0.5), Duration::from_secs(100));
        assert_eq!(b.delay(u32::MAX, 0.5), Duration::from_secs(100));
        let j = b.jitter(0.5);
        assert_eq!(j.delay(2, 0.0), Duration::from_secs(6));
        assert_eq!(j.delay(2, 1.0), Duration::from_secs(3));
        assert!(j.delay(2, 0.3) < Duration::from_secs(6));
    }

    #[test]
    fn validation_names_the_bad_value() {
        assert!(Config::default().validate().is_ok());
        let err = Config::default()
            .visibility_timeout(Duration::from_millis(10))
            .validate()
            .expect_err("too short");
        assert!(err.to_string().contains("visibility_timeout"));
        assert!(Config::default().fetch_batch_size(0).validate().is_err());
        assert!(Config::default().max_attempts(0).validate().is_err());
        assert!(Config::default().poll_jitter(1.0).validate().is_err());
        assert!(
            Config::default()
                .visibility_timeout(Duration::from_secs(10_000_000_000_000))
                .validate()
                .is_err(),
            "a visibility timeout PostgreSQL cannot store is refused at load"
        );
        assert!(
            Config::default()
                .poll_interval(Duration::from_secs(1 << 40))
                .validate()
                .is_err()
        );
        assert!(
            Config::default()
                .defer_delay(Duration::from_secs(7200))
                .validate()
                .is_err()
        );
        assert!(
            Config::default()
                .backoff(Backoff::default().max(Duration::from_secs(1 << 40)))
                .validate()
                .is_err()
        );
        assert!(
            Config::default()
                .backoff(Backoff::default().factor(0.5))
                .validate()
                .is_err()
        );
        assert!(
            Config::default()
                .backoff(Backoff::default().base(Duration::from_secs(7200)))
                .validate()
                .is_err()
        );
    }
}
