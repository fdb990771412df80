//! Metrics through the [`metrics`](https://crates.io/crates/metrics) facade, with the `metrics`
//! feature (otherwise every function here does nothing). Install any recorder (Prometheus,
//! StatsD, ...) in your application; names and labels:
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `apalis_pgmq_jobs_claimed_total` | counter | `queue` | messages claimed by workers |
//! | `apalis_pgmq_jobs_done_total` | counter | `queue` | handlers that returned `Ok` |
//! | `apalis_pgmq_jobs_retried_total` | counter | `queue` | failed runs scheduled to run again |
//! | `apalis_pgmq_jobs_dead_lettered_total` | counter | `queue`, `reason` | jobs moved to the dead-letter queue |
//! | `apalis_pgmq_jobs_killed_total` | counter | `queue` | handlers that returned `AbortError` |
//! | `apalis_pgmq_jobs_released_total` | counter | `queue` | claimed messages handed back unstarted |
//! | `apalis_pgmq_lease_renewals_total` | counter | `queue` | leases renewed |
//! | `apalis_pgmq_lease_renewal_failures_total` | counter | `queue` | renewal statements that failed |
//! | `apalis_pgmq_leases_lost_total` | counter | `queue` | running jobs stopped because their lease was lost |
//! | `apalis_pgmq_notifications_received_total` | counter | – | notifications on the LISTEN connection |
//! | `apalis_pgmq_listener_reconnects_total` | counter | – | LISTEN connections re-established |
//! | `apalis_pgmq_pickup_latency_seconds` | histogram | `queue` | from visible to handler start |
//! | `apalis_pgmq_job_duration_seconds` | histogram | `queue` | handler run time |
//! | `apalis_pgmq_queue_jobs` | gauge | `queue`, `state` | jobs by state, sampled by one process per queue on each heartbeat |
//! | `apalis_pgmq_oldest_snapshot_seconds` | gauge | – | how long the oldest transaction holding back vacuum of the database has been open (0: none, or its start is not visible to this role), sampled on each heartbeat |
//! | `apalis_pgmq_oldest_snapshot_xids` | gauge | – | how many transactions ago that oldest snapshot was taken (`age(xmin)`) |

#![cfg_attr(not(feature = "metrics"), allow(unused_variables))]

#[cfg(feature = "metrics")]
fn q(queue: &str) -> [(&'static str, String); 1] {
    [("queue", queue.to_owned())]
}

pub(crate) fn claimed(queue: &str, n: usize) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_jobs_claimed_total", &q(queue)).increment(n as u64);
}

pub(crate) fn done(queue: &str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_jobs_done_total", &q(queue)).increment(1);
}

pub(crate) fn retried(queue: &str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_jobs_retried_total", &q(queue)).increment(1);
}

pub(crate) fn dead_lettered(queue: &str, reason: &str) {
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "apalis_pgmq_jobs_dead_lettered_total",
        "queue" => queue.to_owned(),
        "reason" => reason.to_owned()
    )
    .increment(1);
}

pub(crate) fn killed(queue: &str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_jobs_killed_total", &q(queue)).increment(1);
}

pub(crate) fn released(queue: &str, n: usize) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_jobs_released_total", &q(queue)).increment(n as u64);
}

pub(crate) fn renewed(queue: &str, n: usize) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_lease_renewals_total", &q(queue)).increment(n as u64);
}

pub(crate) fn renewal_failed(queue: &str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_lease_renewal_failures_total", &q(queue)).increment(1);
}

pub(crate) fn leases_lost(queue: &str, n: usize) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_leases_lost_total", &q(queue)).increment(n as u64);
}

pub(crate) fn notification() {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_notifications_received_total").increment(1);
}

pub(crate) fn reconnect() {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_listener_reconnects_total").increment(1);
}

pub(crate) fn pickup_latency(queue: &str, secs: f64) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("apalis_pgmq_pickup_latency_seconds", &q(queue)).record(secs);
}

pub(crate) fn job_duration(queue: &str, secs: f64) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("apalis_pgmq_job_duration_seconds", &q(queue)).record(secs);
}

/// Whether queue gauges are sampled at all (only with the feature: it costs a statement).
pub(crate) const SAMPLES_GAUGES: bool = cfg!(feature = "metrics");

pub(crate) fn queue_jobs(queue: &str, c: &crate::queue::QueueCounts) {
    #[cfg(feature = "metrics")]
    for (state, n) in [
        ("pending", c.pending),
        ("scheduled", c.scheduled),
        ("running", c.running),
        ("retrying", c.retrying),
        ("done", c.done),
        ("dead", c.dead),
        ("killed", c.killed),
    ] {
        metrics::gauge!(
            "apalis_pgmq_queue_jobs",
            "queue" => queue.to_owned(),
            "state" => state
        )
        .set(n as f64);
    }
}

pub(crate) fn oldest_snapshot(found: &crate::horizon::SnapshotHolders) {
    #[cfg(feature = "metrics")]
    {
        let secs = found
            .holders
            .iter()
            .filter_map(|h| h.held)
            .max()
            .map_or(0.0, |d| d.as_secs_f64());
        let xids = found.holders.iter().map(|h| h.xids).max().unwrap_or(0);
        metrics::gauge!("apalis_pgmq_oldest_snapshot_seconds").set(secs);
        metrics::gauge!("apalis_pgmq_oldest_snapshot_xids").set(xids as f64);
    }
}
