//! What the campaign (campaign.rs) and its checker (check.rs) share: the queues, the kinds of
//! fault and of job, and the append-only JSON-lines logs. The checker reads only these, so it
//! does not depend on how the campaign runs.

use std::{io::Write as _, path::Path, sync::Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The plain queue (and `push_and_wait`, keyed, delayed, poison jobs).
pub(crate) const QUEUE: &str = "camp";
/// The queue whose workers claim by priority.
pub(crate) const PRIO_QUEUE: &str = "camp_prio";
// ------------------------------------------------------------------ fault kinds

/// What the campaign can do to the system. New kinds are added here; those the library does not
/// support yet exist as hooks and are never scheduled (`supported` is false).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FaultKind {
    /// SIGKILL one worker process; a new one takes its place after a pause.
    KillWorker,
    /// `pg_ctl restart -m fast`.
    PgRestartFast,
    /// `pg_ctl restart -m immediate` (a crash, with recovery).
    PgRestartImmediate,
    /// `pg_terminate_backend` of some random sessions (pool or listener) of one worker.
    TerminateBackends,
    /// One worker's network drops every byte for a while (no reset), then heals.
    Blackhole,
    /// One worker's connections go silent for good (half-open); new ones flow again after a
    /// while.
    Freeze,
    /// One worker's network forwards every chunk late, for a while.
    SlowNetwork,
    /// Stop PgBouncer (SIGTERM: every connection through it dropped at once) and start it
    /// again. Behind scripts/with-pgbouncer.sh the campaign's slots 1 and 3 reach the server
    /// through it; without it the fault is recorded as skipped.
    #[serde(rename = "pgbouncer_restart")]
    PgBouncerRestart,
    /// Fail the primary of a pg_auto_failover formation over (`campaign --formation`, under
    /// scripts/with-formation.sh): `perform failover`, `perform switchover`, its postmaster
    /// SIGKILLed, or its whole node killed and started again; then wait until the formation is
    /// stable. Left out of a campaign against one server.
    Failover,
}

impl FaultKind {
    pub(crate) const ALL: [FaultKind; 9] = [
        FaultKind::KillWorker,
        FaultKind::PgRestartFast,
        FaultKind::PgRestartImmediate,
        FaultKind::TerminateBackends,
        FaultKind::Blackhole,
        FaultKind::Freeze,
        FaultKind::SlowNetwork,
        FaultKind::PgBouncerRestart,
        FaultKind::Failover,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            FaultKind::KillWorker => "kill_worker",
            FaultKind::PgRestartFast => "pg_restart_fast",
            FaultKind::PgRestartImmediate => "pg_restart_immediate",
            FaultKind::TerminateBackends => "terminate_backends",
            FaultKind::Blackhole => "blackhole",
            FaultKind::Freeze => "freeze",
            FaultKind::SlowNetwork => "slow_network",
            FaultKind::PgBouncerRestart => "pgbouncer_restart",
            FaultKind::Failover => "failover",
        }
    }

    /// Relative frequency in the schedule.
    pub(crate) fn weight(self) -> u64 {
        match self {
            FaultKind::KillWorker => 20,
            FaultKind::PgRestartFast | FaultKind::PgRestartImmediate => 6,
            FaultKind::TerminateBackends => 20,
            FaultKind::Blackhole => 16,
            FaultKind::Freeze => 10,
            FaultKind::SlowNetwork => 14,
            FaultKind::PgBouncerRestart => 6,
            FaultKind::Failover => 6,
        }
    }

    /// Whether it keeps its worker slot busy (no other such fault on the slot meanwhile).
    pub(crate) fn holds_slot(self) -> bool {
        matches!(
            self,
            FaultKind::KillWorker
                | FaultKind::Blackhole
                | FaultKind::Freeze
                | FaultKind::SlowNetwork
        )
    }

    pub(crate) fn targets_worker(self) -> bool {
        self.holds_slot() || self == FaultKind::TerminateBackends
    }
}

/// The kinds of push the producers make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum JobKind {
    /// `TaskSink::push` or `push_with`.
    Plain,
    /// `push_task_with` with an idempotency key (some keys pushed again on purpose).
    Keyed,
    /// `push_task_with` with `run_after`.
    Delayed,
    /// `push_task_with` with a priority, on the priority queue.
    Prio,
    /// `push_and_wait` with a timeout.
    Wait,
    /// Always fails; `max_attempts(3)`: dead-lettered.
    Doomed,
    /// Returns `AbortError`: deleted by design.
    Abort,
    /// A body that does not decode, sent with raw SQL: dead-lettered, never run.
    Poison,
}

impl JobKind {
    pub(crate) const ALL: [JobKind; 8] = [
        JobKind::Plain,
        JobKind::Keyed,
        JobKind::Delayed,
        JobKind::Prio,
        JobKind::Wait,
        JobKind::Doomed,
        JobKind::Abort,
        JobKind::Poison,
    ];
    pub(crate) const WEIGHTS: [u64; 8] = [34, 16, 12, 20, 10, 3, 3, 2];

    pub(crate) fn name(self) -> &'static str {
        match self {
            JobKind::Plain => "plain",
            JobKind::Keyed => "keyed",
            JobKind::Delayed => "delayed",
            JobKind::Prio => "prio",
            JobKind::Wait => "wait",
            JobKind::Doomed => "doomed",
            JobKind::Abort => "abort",
            JobKind::Poison => "poison",
        }
    }
}

// ------------------------------------------------------------------ append-only logs

/// One JSON object per line, one `write` per line.
pub(crate) struct JsonLog {
    file: Mutex<std::fs::File>,
}

impl JsonLog {
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            file: Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        })
    }

    pub(crate) fn line(&self, v: &Value) {
        let mut text = v.to_string();
        text.push('\n');
        if let Ok(mut f) = self.file.lock() {
            let _ = f.write_all(text.as_bytes());
        }
    }
}

/// Reads a JSON-lines file; a torn last line is skipped.
pub(crate) fn read_json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::FaultKind;

    /// The logs carry the serde name and the checker counts by `name()`: they must agree.
    #[test]
    fn serde_names_are_the_names() {
        for k in FaultKind::ALL {
            let serde = serde_json::to_value(k).expect("serialise");
            assert_eq!(serde.as_str(), Some(k.name()), "{k:?}");
        }
    }
}
