//! Backend configuration: one [`Config`], grouped by what each setting governs, which is also
//! the configuration file (TOML or JSON; see [`file`]).
//!
//! The groups follow a job's path through the backend, so a reader of a file finds a setting
//! where it acts:
//!
//! | group | governs |
//! |---|---|
//! | [`leases`](LeaseConfig) | how long a claimed job stays invisible to others |
//! | [`claims`](ClaimConfig) | how a worker takes jobs: batch sizes, adaptation, priorities |
//! | [`wakeups`](WakeupConfig) | how an idle worker learns of new jobs: LISTEN/NOTIFY, channels, trigger mode, fallback poll |
//! | [`retries`](RetryConfig) | what happens between failed runs: attempts, backoff, deferral |
//! | [`outcomes`](OutcomeConfig) | where finished jobs go, and how outcomes are batched |
//! | [`pushes`](PushConfig) | what a producer may push: payload size, idempotency window |
//! | [`retention`](RetentionConfig) | how long the archive and the dead letters are kept |
//! | [`results`](ResultConfig) | whether job results are kept, and for how long |
//! | [`process`](ProcessConfig) | per-process services every storage shares (heartbeat, listener health check): the shortest value among a process's storages applies |
//! | [`metrics`](MetricsConfig) | an optional `kind` label on the storage's job metrics |

pub(crate) mod file;
pub(crate) mod human;
mod notify;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::notify::{NotifyChannels, NotifyMode};
use crate::queue::DEFAULT_MAX_PAYLOAD_BYTES;

/// The default [`ProcessConfig::heartbeat_interval`].
pub(crate) const DEFAULT_HEARTBEAT_MS: u64 = 30_000;

/// What happens to a job that completed successfully (`Done`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DoneAction {
    /// Move it to the archive table `pgmq.a_<queue>` (PGMQ's `archive`). The default.
    #[default]
    Archive,
    /// Delete it.
    Delete,
}

/// What happens to a job whose handler returned an `AbortError` (`Killed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
/// (so retries of jobs that failed together spread out). In a file:
/// `backoff = { base = "1s", factor = 2.0, max = "1h", jitter = 0.2 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// The delay after the first failure.
    #[serde(with = "human::duration")]
    base: Duration,
    /// Growth per attempt (≥ 1).
    factor: f64,
    /// The cap of every delay.
    #[serde(with = "human::duration")]
    max: Duration,
    /// Fraction of a delay removed at random, in `[0, 1]`.
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
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return bad(
                "retries.backoff.factor",
                format!("must be a finite number ≥ 1, got {}", self.factor),
            );
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return bad(
                "retries.backoff.jitter",
                format!("must be within [0, 1], got {}", self.jitter),
            );
        }
        if self.max > YEAR {
            return bad(
                "retries.backoff.max",
                format!("must be at most 365d, got {}", shown(self.max)),
            );
        }
        if self.base > self.max {
            return bad(
                "retries.backoff.base",
                format!(
                    "{} is larger than the cap retries.backoff.max ({})",
                    shown(self.base),
                    shown(self.max)
                ),
            );
        }
        Ok(())
    }
}

/// The longest deadline of a storage's statements, in seconds (see `Config::statement_deadline`).
const STATEMENT_DEADLINE_MAX_SECS: u64 = 60;

/// Leases: how long a claimed job stays invisible to other workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LeaseConfig {
    /// How long a claimed message stays invisible to other readers (default 30 s, 1 s to 7
    /// days). Renewed every third of it while the handler runs, so it bounds how soon a crashed
    /// worker's jobs run again, not how long a job may run.
    #[serde(with = "human::duration")]
    pub visibility_timeout: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(30),
        }
    }
}

/// Claims: how a worker takes jobs from its queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ClaimConfig {
    /// Messages claimed by a worker's first read, and every read when claims do not adapt
    /// (default 100, 1 to 10 000).
    pub batch_size: usize,
    /// The largest claim an adapting worker grows to (default 1 000, at most 10 000).
    pub max_batch_size: usize,
    /// Whether claims adapt: grow while the worker keeps up, shrink when it is full, overlap
    /// while reads are slow (default on).
    pub adaptive: bool,
    /// Whether workers claim higher `TaskBuilder::priority` first (default off).
    pub priorities: bool,
    /// Claims in visibility order start at the claim floor, a lower bound on the `vt` of every
    /// visible message learned from earlier claims, so an old snapshot held elsewhere in the
    /// database does not make each claim step over every dead index entry since it began; at
    /// most this often (default 10 s, 1 s to 1 day; never more than a twentieth of the time) one
    /// statement beside the claims looks below it for a message written with a `vt` in the past
    /// by hand, and drops the floor if it finds one. `"off"`: no floor (see the crate docs, "Old
    /// snapshots").
    #[serde(with = "human::or_off")]
    pub floor_sweep: Option<Duration>,
    /// Whether a claim that leases messages also writes them to `apalis_pgmq.claim_log`, in
    /// the same statement, so that a worker that loses a claim's answer (a failover, a
    /// connection cut after the commit) gives those messages back as soon as it reaches the
    /// database again instead of leaving them leased for the whole visibility timeout
    /// (default on; workers then need `INSERT, SELECT, DELETE` on the table).
    pub recover_lost: bool,
}

impl Default for ClaimConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            max_batch_size: 1000,
            adaptive: true,
            priorities: false,
            floor_sweep: Some(Duration::from_secs(10)),
            recover_lost: true,
        }
    }
}

/// Wake-ups: how an idle worker learns that jobs arrived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct WakeupConfig {
    /// Whether workers wake on LISTEN/NOTIFY (default on). Off, they rely on the fallback poll
    /// and on known visibility times only.
    pub listen: bool,
    /// How the queue's trigger announces inserts (default on-demand). In a file: `"on_demand"`,
    /// `"batch"`, `"message"` (7 000-byte budget) or `{ message = { max_payload_bytes = N } }`.
    pub mode: NotifyMode,
    /// Channel names: `{ prefix = "apq.", namespace_pattern = "...", default_namespace = "default" }`.
    pub channels: NotifyChannels,
    /// Fallback poll interval when no notification arrives, before jitter (default 30 s, 10 ms
    /// to 1 day).
    #[serde(with = "human::duration")]
    pub poll_interval: Duration,
    /// Fraction of `poll_interval` added or removed at random, in `[0, 1)` (default 0.1), so
    /// workers do not poll in step.
    pub poll_jitter: f64,
    /// After a busy period, how long an idle worker keeps re-reading before it arms a wake-up
    /// (default 10 ms, at most 1 s; on-demand mode).
    #[serde(with = "human::duration")]
    pub linger: Duration,
}

impl Default for WakeupConfig {
    fn default() -> Self {
        Self {
            listen: true,
            mode: NotifyMode::OnDemand,
            channels: NotifyChannels::default(),
            poll_interval: Duration::from_secs(30),
            poll_jitter: 0.1,
            linger: Duration::from_millis(10),
        }
    }
}

/// Retries: what happens between failed runs of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Runs before a failing job is given up (default 25, at least 1). A job pushed with
    /// `TaskBuilder::max_attempts` keeps its own value.
    pub max_attempts: u32,
    /// Delay between failed attempts.
    pub backoff: Backoff,
    /// How long a job whose handler returned `DeferredError` waits before it is visible again
    /// (default 1 s, at most 1 h), so a handler that always defers cannot loop hot.
    #[serde(with = "human::duration")]
    pub defer_delay: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 25,
            backoff: Backoff::default(),
            defer_delay: Duration::from_secs(1),
        }
    }
}

/// Outcomes: where finished jobs go, and how outcomes are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct OutcomeConfig {
    /// Done: `"archive"` (default) or `"delete"`.
    pub on_done: DoneAction,
    /// Killed (`AbortError`): `"delete"` (default), `"archive"` or `"dead_letter"`.
    pub on_killed: KilledAction,
    /// Failed with no attempts left: `"dead_letter"` (default), `"archive"` or `"delete"`.
    pub on_exhausted: ExhaustedAction,
    /// Most outcomes written in one statement (default 500, 1 to 10 000).
    pub batch_size: usize,
    /// Longest wait for more outcomes to share a statement (default 5 ms, at most 1 s).
    #[serde(with = "human::duration")]
    pub flush_interval: Duration,
}

impl Default for OutcomeConfig {
    fn default() -> Self {
        Self {
            on_done: DoneAction::Archive,
            on_killed: KilledAction::Delete,
            on_exhausted: ExhaustedAction::DeadLetter,
            batch_size: 500,
            flush_interval: Duration::from_millis(5),
        }
    }
}

/// Pushes: what producers of this storage may write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PushConfig {
    /// Largest accepted job payload (message plus headers, encoded), in bytes (default 1 MiB,
    /// at most 256 MiB). Also bounds a stored result.
    pub max_payload_bytes: usize,
    /// How long a finished (archived) job keeps its idempotency key taken (default `"off"`: a
    /// key is free once its job leaves the queue). At most `retention.archive`.
    #[serde(with = "human::or_off")]
    pub idempotency_window: Option<Duration>,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            idempotency_window: None,
        }
    }
}

/// Retention: how long finished jobs are kept. A worker process prunes past it, one process
/// per queue at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetentionConfig {
    /// Done (archived) jobs (default 7 days; `"forever"` keeps everything).
    #[serde(with = "human::or_forever")]
    pub archive: Option<Duration>,
    /// Dead letters (default 30 days; `"forever"` keeps everything).
    #[serde(with = "human::or_forever")]
    pub dead_letters: Option<Duration>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            archive: Some(Duration::from_secs(7 * 24 * 3600)),
            dead_letters: Some(Duration::from_secs(30 * 24 * 3600)),
        }
    }
}

/// Results: whether workers keep each finished job's result for waiters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ResultConfig {
    /// Whether workers keep every finished job's result (default off; jobs pushed with
    /// `push_and_wait` keep theirs anyway).
    pub store: bool,
    /// How long stored results are kept (default 1 day, at least 1 s; `"forever"`).
    #[serde(with = "human::or_forever")]
    pub retention: Option<Duration>,
}

impl Default for ResultConfig {
    fn default() -> Self {
        Self {
            store: false,
            retention: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

/// Per-process services that every storage of a [`Runtime`](crate::Runtime) shares: each
/// uses the shortest value among the process's storages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ProcessConfig {
    /// How often the process refreshes its workers' rows in the worker registry, and prunes
    /// (default 30 s, 1 s to 1 h).
    #[serde(with = "human::duration")]
    pub heartbeat_interval: Duration,
    /// How soon a LISTEN connection that silently stopped delivering is replaced (default
    /// 10 s, 1 s to 1 h).
    #[serde(with = "human::duration")]
    pub listener_health_check: Duration,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(DEFAULT_HEARTBEAT_MS),
            listener_health_check: Duration::from_millis(crate::notify::DEFAULT_HEALTH_CHECK_MS),
        }
    }
}

/// Metrics (feature `metrics`; see the crate docs' "Metrics").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MetricsConfig {
    /// A `kind` label on this storage's job metrics, beside `queue` (default `""`: no label): a
    /// name for the job type, e.g. `"email"`, when several storages share a queue or dashboards
    /// group by job type. At most 64 characters, no control characters.
    pub kind: String,
}

impl MetricsConfig {
    /// The `kind` label's value, if one is set (`""` sets none).
    pub(crate) fn kind_label(&self) -> Option<&str> {
        Some(self.kind.as_str()).filter(|k| !k.is_empty())
    }
}

/// Configuration of a [`PgmqStorage`](crate::PgmqStorage), grouped by what each setting
/// governs (see the [module docs](self) and the README's "Configuration").
///
/// Build it with `Config::default()` and consuming setters, set a group's public fields, or
/// load a file ([`Config::from_toml`], [`Config::from_json`], [`Config::load`]): the file is
/// this struct, every key optional. The storage validates it once when built
/// ([`PgmqStorage::with_config`](crate::PgmqStorage::with_config)).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use apalis_pgmq_notify::{Backoff, Config, DoneAction};
///
/// let mut config = Config::default()
///     .visibility_timeout(Duration::from_secs(60))
///     .max_attempts(5)
///     .backoff(Backoff::default().base(Duration::from_millis(500)))
///     .on_done(DoneAction::Delete);
/// config.claims.priorities = true;
/// assert_eq!(config.leases.visibility_timeout, Duration::from_secs(60));
/// config.validate()?;
///
/// let same = Config::from_toml(r#"
///     leases = { visibility_timeout = "60s" }
///     claims = { priorities = true }
///     retries = { max_attempts = 5, backoff = { base = "500ms" } }
///     outcomes = { on_done = "delete" }
/// "#)?;
/// assert_eq!(same, config);
/// # Ok::<(), apalis_pgmq_notify::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// How long a claimed job stays invisible to others.
    pub leases: LeaseConfig,
    /// How a worker takes jobs.
    pub claims: ClaimConfig,
    /// How an idle worker learns of new jobs.
    pub wakeups: WakeupConfig,
    /// What happens between failed runs.
    pub retries: RetryConfig,
    /// Where finished jobs go.
    pub outcomes: OutcomeConfig,
    /// What producers may push.
    pub pushes: PushConfig,
    /// How long the archive and dead letters are kept.
    pub retention: RetentionConfig,
    /// Whether job results are kept.
    pub results: ResultConfig,
    /// Per-process services shared by every storage of a runtime.
    pub process: ProcessConfig,
    /// Labels of the metrics.
    pub metrics: MetricsConfig,
}

impl Config {
    /// Visibility timeout of claimed messages (`leases.visibility_timeout`; default 30 s, 1 s
    /// to 7 days). The lease is renewed every third of it while a job runs.
    #[must_use]
    pub fn visibility_timeout(mut self, vt: Duration) -> Self {
        self.leases.visibility_timeout = vt;
        self
    }

    /// Messages claimed by a worker's first read (`claims.batch_size`; default 100, 1 to
    /// 10 000). With [`adaptive_claims`](Self::adaptive_claims) on (the default) later claims
    /// grow up to [`max_fetch_batch_size`](Self::max_fetch_batch_size) while the worker keeps
    /// up and shrink when it does not; off, every claim is this size. A worker never holds
    /// more than it can start; see the crate docs on capacity.
    #[must_use]
    pub fn fetch_batch_size(mut self, n: usize) -> Self {
        self.claims.batch_size = n;
        self
    }

    /// How long a job that finished (was archived) keeps its idempotency key taken
    /// (`pushes.idempotency_window`), so a push with the same key within the window writes
    /// nothing (default `None`: a key is taken only while its job is pending, scheduled,
    /// running or waiting for a retry). "At most once per hour": `Some(1 h)`. Needs the
    /// archive (`DoneAction::Archive`, the default) and is at most the archive retention.
    #[must_use]
    pub fn idempotency_window(mut self, window: Option<Duration>) -> Self {
        self.pushes.idempotency_window = window;
        self
    }

    /// Whether workers claim jobs with a higher `TaskBuilder::priority` first
    /// (`claims.priorities`; default off). Jobs without a priority (plain PGMQ messages too)
    /// have priority 0; a priority that is not a number counts as 0. Starvation is bounded:
    /// one claim in every [`FAIR_EVERY`](crate::FAIR_EVERY) takes the messages visible
    /// longest, whatever their priority. On, the queue gets an index on `(priority DESC, vt)`
    /// (created by `create_queue` and workers, as the table's owner), which every insert
    /// maintains.
    #[must_use]
    pub fn priorities(mut self, on: bool) -> Self {
        self.claims.priorities = on;
        self
    }

    /// Whether workers keep each finished job's result (`results.store`; default off): its
    /// final status (`Done`, `Killed`, or `Failed` with no attempts left), its attempt, and
    /// the handler's output as JSON (serde) or the error's text, in `apalis_pgmq.results`,
    /// readable by job id with [`WaitForCompletion`](apalis_core::backend::WaitForCompletion)
    /// and [`PgmqStorage::results`](crate::PgmqStorage::results), for
    /// [`result_retention`](Self::result_retention). The result is written by the same
    /// statement as the job's outcome and announced on the queue's results channel, so
    /// waiters wake without polling. Jobs pushed with
    /// [`push_and_wait`](crate::PgmqStorage::push_and_wait) keep their result whatever this
    /// says. A retry is not a result: waiters wait for the final one.
    #[must_use]
    pub fn store_results(mut self, on: bool) -> Self {
        self.results.store = on;
        self
    }

    /// How long stored results are kept (`results.retention`; default 1 day; `None`:
    /// forever). Workers prune older ones with the archive, in batches;
    /// [`prune_results`](crate::prune_results) does it on demand.
    #[must_use]
    pub fn result_retention(mut self, keep: Option<Duration>) -> Self {
        self.results.retention = keep;
        self
    }

    /// The largest claim an adapting worker grows to (`claims.max_batch_size`; default 1 000,
    /// at least `fetch_batch_size`, at most 10 000).
    #[must_use]
    pub fn max_fetch_batch_size(mut self, n: usize) -> Self {
        self.claims.max_batch_size = n;
        self
    }

    /// Whether claims adapt (`claims.adaptive`; default on): the claim size doubles while
    /// reads come back full and the worker has started everything before the next claim
    /// arrives, halves when the worker is full with messages still held, and while the backlog
    /// lasts and even the fastest recent claim takes 2 ms or more (a far database, large
    /// claims) the next claim is sent before the previous one is used up (up to four in
    /// flight, fewer on a small pool). Off: one claim of `fetch_batch_size` at a time, sent
    /// when the previous one is used up.
    #[must_use]
    pub fn adaptive_claims(mut self, on: bool) -> Self {
        self.claims.adaptive = on;
        self
    }

    /// The claim floor's sweep (`claims.floor_sweep`; default 10 s): claims in visibility
    /// order read the `vt` index from a lower bound learned from earlier claims, and at most
    /// this often a statement beside them looks below it, for messages written with a `vt` in
    /// the past by hand. `None` turns the floor off. See the crate docs, "Old snapshots".
    #[must_use]
    pub fn claim_floor_sweep(mut self, every: Option<Duration>) -> Self {
        self.claims.floor_sweep = every;
        self
    }

    /// Lost claims (`claims.recover_lost`; default on): each claim that leases messages also
    /// writes them, in the same statement, to `apalis_pgmq.claim_log` under a token of the
    /// worker's, so that a worker that does not get a claim's answer (a failover, a connection
    /// cut after the commit, a deadline that passed while the server still ran it) makes those
    /// messages visible again as soon as it reaches the database, instead of leaving them
    /// leased for the visibility timeout. Off, the claim writes one row less. See the crate
    /// docs, "Failover".
    #[must_use]
    pub fn recover_lost_claims(mut self, on: bool) -> Self {
        self.claims.recover_lost = on;
        self
    }

    /// Fallback poll interval (`wakeups.poll_interval`; default 30 s): how often an idle
    /// worker looks at the queue when no notification arrives.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.wakeups.poll_interval = interval;
        self
    }

    /// Jitter fraction of the poll interval in `[0, 1)` (`wakeups.poll_jitter`; default 0.1).
    #[must_use]
    pub fn poll_jitter(mut self, jitter: f64) -> Self {
        self.wakeups.poll_jitter = jitter;
        self
    }

    /// Default attempts before a failing job is given up (`retries.max_attempts`; default
    /// 25). A job pushed with `TaskBuilder::max_attempts` keeps its own value.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.retries.max_attempts = n;
        self
    }

    /// Backoff between failed attempts (`retries.backoff`).
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.retries.backoff = backoff;
        self
    }

    /// What to do with successful jobs (`outcomes.on_done`; default archive).
    #[must_use]
    pub fn on_done(mut self, action: DoneAction) -> Self {
        self.outcomes.on_done = action;
        self
    }

    /// What to do with killed jobs (`outcomes.on_killed`; default delete).
    #[must_use]
    pub fn on_killed(mut self, action: KilledAction) -> Self {
        self.outcomes.on_killed = action;
        self
    }

    /// What to do with jobs that failed their last attempt (`outcomes.on_exhausted`; default
    /// dead-letter).
    #[must_use]
    pub fn on_exhausted(mut self, action: ExhaustedAction) -> Self {
        self.outcomes.on_exhausted = action;
        self
    }

    /// Most completions written in one statement (`outcomes.batch_size`; default 500).
    #[must_use]
    pub fn completion_batch_size(mut self, n: usize) -> Self {
        self.outcomes.batch_size = n;
        self
    }

    /// Longest wait for more completions to share a statement (`outcomes.flush_interval`;
    /// default 5 ms).
    #[must_use]
    pub fn completion_flush_interval(mut self, interval: Duration) -> Self {
        self.outcomes.flush_interval = interval;
        self
    }

    /// Largest accepted job payload in bytes (`pushes.max_payload_bytes`; default 1 MiB).
    #[must_use]
    pub fn max_payload_bytes(mut self, n: usize) -> Self {
        self.pushes.max_payload_bytes = n;
        self
    }

    /// Whether workers wake on LISTEN/NOTIFY (`wakeups.listen`; default `true`). With `false`
    /// they rely on the fallback poll interval and on known visibility times only.
    #[must_use]
    pub fn listen(mut self, on: bool) -> Self {
        self.wakeups.listen = on;
        self
    }

    /// Channel names (prefix and namespace pattern) for this queue's notifications
    /// (`wakeups.channels`).
    #[must_use]
    pub fn notify_channels(mut self, channels: NotifyChannels) -> Self {
        self.wakeups.channels = channels;
        self
    }

    /// How the queue's trigger announces inserts (`wakeups.mode`; default
    /// [`NotifyMode::OnDemand`]). Workers install the trigger on their queue when listening is
    /// on.
    #[must_use]
    pub fn notify_mode(mut self, mode: NotifyMode) -> Self {
        self.wakeups.mode = mode;
        self
    }

    /// After a busy period, how long an idle worker keeps re-reading every 2 ms before it arms a
    /// wake-up (`wakeups.linger`; default 10 ms; on-demand notifications only). Under a steady
    /// stream of jobs the worker then rarely arms, so producers rarely pay for a NOTIFY;
    /// `Duration::ZERO` arms at once.
    #[must_use]
    pub fn linger(mut self, linger: Duration) -> Self {
        self.wakeups.linger = linger;
        self
    }

    /// How soon a LISTEN connection that silently stopped delivering (half-open TCP) is
    /// detected and replaced (`process.listener_health_check`; default 10 s, 1 s to 1 h). The
    /// listener pings its connection (a protocol round trip, not a statement) after half of
    /// this without traffic, and gives up on it after the other half. One listener serves a
    /// process: it uses the shortest value of its storages.
    #[must_use]
    pub fn listener_health_check(mut self, interval: Duration) -> Self {
        self.process.listener_health_check = interval;
        self
    }

    /// How long a job whose handler returned `DeferredError` waits before it is visible again
    /// (`retries.defer_delay`; default 1 s, at most 1 h). A deferral uses up an attempt like
    /// any other run, so a handler that always defers ends in the dead-letter queue after
    /// `max_attempts` runs.
    #[must_use]
    pub fn defer_delay(mut self, delay: Duration) -> Self {
        self.retries.defer_delay = delay;
        self
    }

    /// How often a process refreshes the rows of its workers in the worker registry
    /// (`process.heartbeat_interval`, `apalis_pgmq.workers`; default 30 s, 1 s to 1 h): one
    /// statement per interval for all of a process's workers. A worker whose process died
    /// stops being listed after three intervals. One heartbeat serves a process: it uses the
    /// shortest value of its storages.
    #[must_use]
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.process.heartbeat_interval = interval;
        self
    }

    /// A `kind` label on this storage's job metrics (`metrics.kind`; default `""`, none; feature
    /// `metrics`): jobs enqueued, claimed, done, retried, killed, dead-lettered, released, lease
    /// renewals and losses, pickup latency and duration carry `kind = <kind>` beside `queue`.
    #[must_use]
    pub fn metrics_kind(mut self, kind: impl Into<String>) -> Self {
        self.metrics.kind = kind.into();
        self
    }

    /// How long done (archived) jobs are kept (`retention.archive`; default 7 days; `None`
    /// keeps everything). A worker process prunes older ones after its heartbeats, in batches
    /// of 10 000, one process per queue at a time; `apalis-pgmq-notify prune` and
    /// [`prune`](crate::prune) do it on demand.
    #[must_use]
    pub fn archive_retention(mut self, keep: Option<Duration>) -> Self {
        self.retention.archive = keep;
        self
    }

    /// How long dead letters are kept (`retention.dead_letters`; default 30 days; `None`
    /// keeps everything).
    #[must_use]
    pub fn dead_letter_retention(mut self, keep: Option<Duration>) -> Self {
        self.retention.dead_letters = keep;
        self
    }

    /// The deadline of each statement of a storage's background work (a worker's claims and
    /// wake-up steps, outcome writes, releases): the visibility timeout, at most a minute. A statement slower
    /// than that is of no use (a claim's leases have lapsed by then; the keeper gives a lease
    /// up before it) and most likely waits on a connection that lost its request; its
    /// connection is closed and the step tried again (see `src/deadline.rs`).
    pub(crate) fn statement_deadline(&self) -> Duration {
        self.leases
            .visibility_timeout
            .min(Duration::from_secs(STATEMENT_DEADLINE_MAX_SECS))
    }

    /// Re-reads while lingering.
    pub(crate) fn linger_polls(&self) -> u32 {
        let step = crate::notify::wakeup::LINGER_STEP.as_micros().max(1);
        u32::try_from(self.wakeups.linger.as_micros() / step).unwrap_or(u32::MAX)
    }

    /// The visibility timeout (`leases.visibility_timeout`).
    #[must_use]
    pub fn get_visibility_timeout(&self) -> Duration {
        self.leases.visibility_timeout
    }

    /// The default maximum attempts (`retries.max_attempts`).
    #[must_use]
    pub fn get_max_attempts(&self) -> u32 {
        self.retries.max_attempts
    }

    /// The backoff (`retries.backoff`).
    #[must_use]
    pub fn get_backoff(&self) -> Backoff {
        self.retries.backoff
    }

    /// Every setting as `(key, value)`, keys dotted as in a file (`leases.visibility_timeout`)
    /// and sorted, values as a file writes them (`"30s"`, `100`, `"archive"`): what the CLI's
    /// `validate` prints, and what to log at start-up.
    ///
    /// # Example
    ///
    /// ```
    /// let settings = apalis_pgmq_notify::Config::default().settings();
    /// assert!(settings.contains(&("leases.visibility_timeout".to_owned(), "\"30s\"".to_owned())));
    /// ```
    #[must_use]
    pub fn settings(&self) -> Vec<(String, String)> {
        fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, v, out);
                    }
                }
                other => out.push((prefix.to_owned(), other.to_string())),
            }
        }
        let mut out = Vec::new();
        // Serializing plain data to a JSON value cannot fail; an empty list would say so.
        if let Ok(v) = serde_json::to_value(self) {
            walk("", &v, &mut out);
        }
        out.sort();
        out
    }

    /// Checks every value; called once when a storage is built, and by [`Config::load`] and
    /// the `from_*` parsers.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the first setting out of range by its key in a file (e.g.
    /// `leases.visibility_timeout`), with its value and the allowed range.
    pub fn validate(&self) -> Result<()> {
        // Upper bounds keep every value within what PostgreSQL stores and what a worker can
        // wait for (tokio timers, `make_interval`): an out-of-range value fails here, once,
        // rather than every read later.
        const SECOND: Duration = Duration::from_secs(1);
        const HOUR: Duration = Duration::from_secs(3600);
        const DAY: Duration = Duration::from_secs(24 * 3600);
        let within = |key: &'static str, v: Duration, lo: Duration, hi: Duration| -> Result<()> {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                bad(
                    key,
                    format!(
                        "must be within {}..={}, got {}",
                        shown(lo),
                        shown(hi),
                        shown(v)
                    ),
                )
            }
        };
        let count = |key: &'static str, v: usize, lo: usize, hi: usize| -> Result<()> {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                bad(key, format!("must be within {lo}..={hi}, got {v}"))
            }
        };
        within(
            "leases.visibility_timeout",
            self.leases.visibility_timeout,
            SECOND,
            DAY * 7,
        )?;
        count("claims.batch_size", self.claims.batch_size, 1, 10_000)?;
        if let Some(every) = self.claims.floor_sweep {
            within("claims.floor_sweep", every, SECOND, DAY)?;
        }
        count(
            "claims.max_batch_size",
            self.claims.max_batch_size,
            1,
            10_000,
        )?;
        within(
            "wakeups.poll_interval",
            self.wakeups.poll_interval,
            Duration::from_millis(10),
            DAY,
        )?;
        if !(0.0..1.0).contains(&self.wakeups.poll_jitter) {
            return bad(
                "wakeups.poll_jitter",
                format!("must be within [0, 1), got {}", self.wakeups.poll_jitter),
            );
        }
        within(
            "wakeups.linger",
            self.wakeups.linger,
            Duration::ZERO,
            SECOND,
        )?;
        if self.retries.max_attempts == 0 {
            return bad(
                "retries.max_attempts",
                "must be at least 1, got 0".to_owned(),
            );
        }
        self.retries.backoff.validate()?;
        within(
            "retries.defer_delay",
            self.retries.defer_delay,
            Duration::ZERO,
            HOUR,
        )?;
        count("outcomes.batch_size", self.outcomes.batch_size, 1, 10_000)?;
        within(
            "outcomes.flush_interval",
            self.outcomes.flush_interval,
            Duration::ZERO,
            SECOND,
        )?;
        let kind = &self.metrics.kind;
        if kind.chars().count() > 64 || kind.chars().any(char::is_control) {
            return bad(
                "metrics.kind",
                format!("must be at most 64 characters without control characters, got {kind:?}"),
            );
        }
        if !(1..=256 * 1024 * 1024).contains(&self.pushes.max_payload_bytes) {
            return bad(
                "pushes.max_payload_bytes",
                format!(
                    "must be within 1..=268435456 (256 MiB; jsonb's limit is 255 MiB), got {}",
                    self.pushes.max_payload_bytes
                ),
            );
        }
        if let (Some(w), Some(r)) = (self.pushes.idempotency_window, self.retention.archive)
            && w > r
        {
            return bad(
                "pushes.idempotency_window",
                format!(
                    "{} must not exceed retention.archive ({}): pruned jobs cannot hold their keys",
                    shown(w),
                    shown(r)
                ),
            );
        }
        if let Some(r) = self.results.retention
            && r < SECOND
        {
            return bad(
                "results.retention",
                format!(
                    "must be at least 1s (\"forever\" keeps results), got {}",
                    shown(r)
                ),
            );
        }
        within(
            "process.heartbeat_interval",
            self.process.heartbeat_interval,
            SECOND,
            HOUR,
        )?;
        within(
            "process.listener_health_check",
            self.process.listener_health_check,
            SECOND,
            HOUR,
        )?;
        Ok(())
    }
}

/// A duration as a file writes it.
fn shown(d: Duration) -> String {
    human::HumanDuration(d).to_string()
}

fn bad(setting: &'static str, reason: String) -> Result<()> {
    Err(Error::Config {
        setting: setting.to_owned(),
        reason,
    })
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
    fn validation_names_the_setting_by_its_key() {
        assert!(Config::default().validate().is_ok());
        let named = |c: Config, key: &str| {
            let err = c.validate().expect_err(key);
            assert!(
                matches!(&err, Error::Config { setting, .. } if setting == key),
                "{key}: {err}"
            );
            assert!(err.to_string().contains(key), "{err}");
        };
        named(
            Config::default().visibility_timeout(Duration::from_millis(10)),
            "leases.visibility_timeout",
        );
        named(
            Config::default().visibility_timeout(Duration::from_secs(10_000_000_000_000)),
            "leases.visibility_timeout",
        );
        named(Config::default().fetch_batch_size(0), "claims.batch_size");
        named(
            Config::default().max_fetch_batch_size(20_000),
            "claims.max_batch_size",
        );
        named(Config::default().max_attempts(0), "retries.max_attempts");
        named(Config::default().poll_jitter(1.0), "wakeups.poll_jitter");
        named(
            Config::default().poll_interval(Duration::from_secs(1 << 40)),
            "wakeups.poll_interval",
        );
        named(
            Config::default().poll_interval(Duration::from_millis(1)),
            "wakeups.poll_interval",
        );
        named(
            Config::default().linger(Duration::from_secs(2)),
            "wakeups.linger",
        );
        named(
            Config::default().defer_delay(Duration::from_secs(7200)),
            "retries.defer_delay",
        );
        named(
            Config::default().backoff(Backoff::default().max(Duration::from_secs(1 << 40))),
            "retries.backoff.max",
        );
        named(
            Config::default().backoff(Backoff::default().factor(0.5)),
            "retries.backoff.factor",
        );
        named(
            Config::default().backoff(Backoff::default().jitter(2.0)),
            "retries.backoff.jitter",
        );
        named(
            Config::default().backoff(Backoff::default().base(Duration::from_secs(7200))),
            "retries.backoff.base",
        );
        named(
            Config::default().completion_batch_size(0),
            "outcomes.batch_size",
        );
        named(
            Config::default().completion_flush_interval(Duration::from_secs(2)),
            "outcomes.flush_interval",
        );
        named(
            Config::default().max_payload_bytes(0),
            "pushes.max_payload_bytes",
        );
        named(
            Config::default()
                .idempotency_window(Some(Duration::from_secs(30 * 86_400)))
                .archive_retention(Some(Duration::from_secs(86_400))),
            "pushes.idempotency_window",
        );
        named(
            Config::default().result_retention(Some(Duration::from_millis(10))),
            "results.retention",
        );
        named(
            Config::default().heartbeat_interval(Duration::ZERO),
            "process.heartbeat_interval",
        );
        named(
            Config::default().listener_health_check(Duration::from_secs(7200)),
            "process.listener_health_check",
        );
        named(Config::default().metrics_kind("a\nb"), "metrics.kind");
        named(
            Config::default().metrics_kind("k".repeat(65)),
            "metrics.kind",
        );
        Config::default()
            .metrics_kind("k".repeat(64))
            .validate()
            .expect("64 characters are accepted");
        Config::default()
            .metrics_kind("")
            .validate()
            .expect("empty: no label");
    }

    #[test]
    fn every_setting_is_listed() {
        let keys: Vec<String> = Config::default()
            .settings()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            [
                "claims.adaptive",
                "claims.batch_size",
                "claims.floor_sweep",
                "claims.max_batch_size",
                "claims.priorities",
                "claims.recover_lost",
                "leases.visibility_timeout",
                "metrics.kind",
                "outcomes.batch_size",
                "outcomes.flush_interval",
                "outcomes.on_done",
                "outcomes.on_exhausted",
                "outcomes.on_killed",
                "process.heartbeat_interval",
                "process.listener_health_check",
                "pushes.idempotency_window",
                "pushes.max_payload_bytes",
                "results.retention",
                "results.store",
                "retention.archive",
                "retention.dead_letters",
                "retries.backoff.base",
                "retries.backoff.factor",
                "retries.backoff.jitter",
                "retries.backoff.max",
                "retries.defer_delay",
                "retries.max_attempts",
                "wakeups.channels.default_namespace",
                "wakeups.channels.namespace_pattern",
                "wakeups.channels.prefix",
                "wakeups.linger",
                "wakeups.listen",
                "wakeups.mode",
                "wakeups.poll_interval",
                "wakeups.poll_jitter",
            ]
        );
    }
}
