//! Metrics through the [`metrics`](https://crates.io/crates/metrics) facade, with the `metrics`
//! feature (otherwise every function here does nothing). Install any recorder (Prometheus,
//! StatsD, ...) in your application;
//! see the crate docs ("Metrics") for names and labels.
//!
//! Every metric is described (`# HELP` in Prometheus) with its unit the first time the worker
//! runtime starts. Jobs pushed by other PGMQ clients (SQL, Python, ...) are not
//! in `apalis_pgmq_jobs_enqueued_total`; the `apalis_pgmq_queue_jobs` gauge counts them.

#![cfg_attr(not(feature = "metrics"), allow(unused_variables))]

/// Describes every metric (help text and unit) to the installed recorder. Called when a
/// [`Runtime`](crate::Runtime) starts; recorders keep the first description, so calling it
/// again is harmless.
pub(crate) fn describe() {
    #[cfg(feature = "metrics")]
    {
        use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
        describe_counter!(
            "apalis_pgmq_jobs_enqueued_total",
            Unit::Count,
            "Jobs inserted by this process's pushes"
        );
        describe_counter!(
            "apalis_pgmq_jobs_claimed_total",
            Unit::Count,
            "Messages claimed by workers"
        );
        describe_counter!(
            "apalis_pgmq_jobs_done_total",
            Unit::Count,
            "Handlers that returned Ok"
        );
        describe_counter!(
            "apalis_pgmq_jobs_retried_total",
            Unit::Count,
            "Failed runs scheduled to run again"
        );
        describe_counter!(
            "apalis_pgmq_jobs_dead_lettered_total",
            Unit::Count,
            "Dead letters written, by reason (failed, undecodable, outcome_unwritable, killed)"
        );
        describe_counter!(
            "apalis_pgmq_jobs_killed_total",
            Unit::Count,
            "Handlers that returned AbortError"
        );
        describe_counter!(
            "apalis_pgmq_jobs_released_total",
            Unit::Count,
            "Claimed messages handed back unstarted"
        );
        describe_counter!(
            "apalis_pgmq_lease_renewals_total",
            Unit::Count,
            "Leases renewed"
        );
        describe_counter!(
            "apalis_pgmq_lease_renewal_failures_total",
            Unit::Count,
            "Lease renewal statements that failed"
        );
        describe_counter!(
            "apalis_pgmq_leases_lost_total",
            Unit::Count,
            "Running jobs stopped because their lease was lost"
        );
        describe_counter!(
            "apalis_pgmq_notifications_received_total",
            Unit::Count,
            "Notifications received on the LISTEN connection"
        );
        describe_counter!(
            "apalis_pgmq_listener_reconnects_total",
            Unit::Count,
            "LISTEN connections re-established"
        );
        describe_histogram!(
            "apalis_pgmq_pickup_latency_seconds",
            Unit::Seconds,
            "From visible to handler start"
        );
        describe_histogram!(
            "apalis_pgmq_job_duration_seconds",
            Unit::Seconds,
            "Handler run time"
        );
        describe_gauge!(
            "apalis_pgmq_queue_jobs",
            Unit::Count,
            "Jobs by state, sampled by one process per queue on each heartbeat"
        );
        describe_gauge!(
            "apalis_pgmq_oldest_snapshot_seconds",
            Unit::Seconds,
            "How long the oldest transaction holding back vacuum of the database has been open"
        );
        describe_gauge!(
            "apalis_pgmq_oldest_snapshot_xids",
            Unit::Count,
            "How many transactions ago the oldest snapshot holding back vacuum was taken"
        );
    }
}

pub(crate) fn enqueued(queue: &str, kind: Option<&str>, n: usize) {
    #[cfg(feature = "metrics")]
    if n > 0 {
        metrics::counter!("apalis_pgmq_jobs_enqueued_total", &q(queue, kind)).increment(n as u64);
    }
}

/// The labels of a job metric: the queue, and the storage's job kind (`Config::metrics.kind`),
/// empty when it has none. Always both, so a metric has one label set whatever its storages
/// say (some recorders refuse a name with two; Prometheus treats an empty label as absent).
#[cfg(feature = "metrics")]
fn q(queue: &str, kind: Option<&str>) -> Vec<(&'static str, String)> {
    vec![
        ("queue", queue.to_owned()),
        ("kind", kind.unwrap_or_default().to_owned()),
    ]
}

pub(crate) fn claimed(queue: &str, kind: Option<&str>, n: usize) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_jobs_claimed_total", &q(queue, kind)).increment(n as u64);
}

pub(crate) fn done(queue: &str, kind: Option<&str>) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_jobs_done_total", &q(queue, kind)).increment(1);
}

pub(crate) fn retried(queue: &str, kind: Option<&str>) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_jobs_retried_total", &q(queue, kind)).increment(1);
}

pub(crate) fn dead_lettered(queue: &str, kind: Option<&str>, reason: &str) {
    #[cfg(feature = "metrics")]
    {
        let mut labels = q(queue, kind);
        labels.push(("reason", reason.to_owned()));
        metrics::counter!("apalis_pgmq_jobs_dead_lettered_total", &labels).increment(1);
    }
}

pub(crate) fn killed(queue: &str, kind: Option<&str>) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_jobs_killed_total", &q(queue, kind)).increment(1);
}

pub(crate) fn released(queue: &str, kind: Option<&str>, n: usize) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_jobs_released_total", &q(queue, kind)).increment(n as u64);
}

pub(crate) fn renewed(queue: &str, kind: Option<&str>, n: usize) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_lease_renewals_total", &q(queue, kind)).increment(n as u64);
}

pub(crate) fn renewal_failed(queue: &str, kind: Option<&str>) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_lease_renewal_failures_total", &q(queue, kind)).increment(1);
}

pub(crate) fn leases_lost(queue: &str, kind: Option<&str>, n: usize) {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_leases_lost_total", &q(queue, kind)).increment(n as u64);
}

pub(crate) fn notification() {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_notifications_received_total").increment(1);
}

pub(crate) fn reconnect() {
    #[cfg(feature = "metrics")]
    metrics::counter!("apalis_pgmq_listener_reconnects_total").increment(1);
}

pub(crate) fn pickup_latency(queue: &str, kind: Option<&str>, secs: f64) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("apalis_pgmq_pickup_latency_seconds", &q(queue, kind)).record(secs);
}

pub(crate) fn job_duration(queue: &str, kind: Option<&str>, secs: f64) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("apalis_pgmq_job_duration_seconds", &q(queue, kind)).record(secs);
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
