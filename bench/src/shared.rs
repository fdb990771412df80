//! Measurement code shared by both benchmark binaries (this crate and `pgmq-peer`, which has its
//! own apalis-core). It uses neither sqlx nor apalis directly; the worker macro expands against
//! whichever apalis-core is in scope where it is used.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// The job every system runs: `t` is when it was pushed, in microseconds since [`anchor`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchJob {
    pub t: u64,
}

static ANCHOR: OnceLock<Instant> = OnceLock::new();

/// The process's time origin for push timestamps.
pub fn anchor() -> Instant {
    *ANCHOR.get_or_init(Instant::now)
}

pub fn now_micros() -> u64 {
    u64::try_from(anchor().elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// What handlers record.
#[derive(Debug, Default)]
pub struct Counters {
    pub done: AtomicU64,
    /// Push-to-start latencies in microseconds (only when `record` is on).
    pub latencies: Mutex<Vec<u64>>,
    pub record: std::sync::atomic::AtomicBool,
    /// How long each handler runs, in milliseconds (0: returns at once).
    pub job_ms: AtomicU64,
}

impl Counters {
    pub fn handle(&self, job: &BenchJob) {
        if self.record.load(Ordering::Relaxed) {
            let lat = now_micros().saturating_sub(job.t);
            if let Ok(mut l) = self.latencies.lock() {
                l.push(lat);
            }
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn take_latencies(&self) -> Vec<u64> {
        self.latencies
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default()
    }
}

/// Waits until `counters.done() >= n`; `false` on timeout.
pub async fn wait_done(counters: &Counters, n: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while counters.done() < n {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

/// `p`-th percentile (0..=100) of microsecond samples, in milliseconds.
pub fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0
}

/// p50/p95/p99/max in ms, plus the sample count.
pub fn latency_values(mut samples: Vec<u64>) -> BTreeMap<String, f64> {
    samples.sort_unstable();
    let mut v = BTreeMap::new();
    v.insert("samples".into(), samples.len() as f64);
    v.insert("p50_ms".into(), percentile_ms(&samples, 50.0));
    v.insert("p95_ms".into(), percentile_ms(&samples, 95.0));
    v.insert("p99_ms".into(), percentile_ms(&samples, 99.0));
    v.insert(
        "max_ms".into(),
        samples.last().map_or(f64::NAN, |m| *m as f64 / 1000.0),
    );
    v
}

/// One measurement, printed as a machine-readable line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub system: String,
    pub workload: String,
    pub values: BTreeMap<String, f64>,
    pub note: String,
}

impl Record {
    pub fn new(system: &str, workload: &str) -> Self {
        Self {
            system: system.to_owned(),
            workload: workload.to_owned(),
            values: BTreeMap::new(),
            note: String::new(),
        }
    }

    pub fn value(mut self, k: &str, v: f64) -> Self {
        self.values.insert(k.to_owned(), v);
        self
    }

    pub fn values(mut self, vs: BTreeMap<String, f64>) -> Self {
        self.values.extend(vs);
        self
    }

    pub fn note(mut self, n: impl Into<String>) -> Self {
        self.note = n.into();
        self
    }

    /// Prints `BENCH {json}` on stdout.
    pub fn emit(&self) {
        if let Ok(line) = serde_json::to_string(self) {
            println!("BENCH {line}");
        }
    }
}

/// Parameters shared by both binaries (passed to the peer on its command line as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub burn_jobs: u64,
    pub enqueue_single: u64,
    pub enqueue_bulk_batches: u64,
    pub bulk_size: u64,
    pub workers: usize,
    pub concurrency: usize,
    pub batch_size: usize,
    pub pickup_samples: usize,
    pub idle_secs: u64,
    pub sustained_rate: u64,
    pub sustained_secs: u64,
    pub notify_producers: usize,
    pub notify_secs: u64,
    /// Fallback poll interval given to systems that poll.
    pub poll_ms: u64,
    /// The throughput workloads (`growth`, `breakdown`, `delayed_pickup`, `far`): one worker
    /// with this concurrency, the way an application runs it.
    #[serde(default = "default_one_worker_concurrency")]
    pub one_worker_concurrency: usize,
    /// The numbers of pgbench clients the `producers` workload measures (empty: 8, 64 and 200;
    /// 8 alone with `--quick`).
    #[serde(default)]
    pub producers_clients: Vec<usize>,
    /// Alternating repetitions of each `producers` measurement.
    #[serde(default = "default_producers_reps")]
    pub producers_reps: usize,
    /// Backlogs the `growth` workload burns down, each from a fresh queue.
    #[serde(default = "default_growth_jobs")]
    pub growth_jobs: Vec<u64>,
    /// Claim sizes the `breakdown` workload compares.
    #[serde(default = "default_breakdown_claims")]
    pub breakdown_claims: Vec<usize>,
    /// Delayed (not yet visible) messages in the queue during `delayed_pickup`.
    #[serde(default = "default_delayed_jobs")]
    pub delayed_jobs: u64,
    /// One-way delays the `far` workload injects between the worker and PostgreSQL.
    #[serde(default = "default_far_delays")]
    pub far_delays_ms: Vec<u64>,
    /// `far`: concurrency, job duration and measuring window.
    #[serde(default = "default_far_concurrency")]
    pub far_concurrency: usize,
    #[serde(default = "default_far_job_ms")]
    pub far_job_ms: u64,
    #[serde(default = "default_far_secs")]
    pub far_secs: u64,
    /// `results`: sequential push-and-wait calls timed, and callers waiting at once.
    #[serde(default = "default_result_calls")]
    pub result_calls: usize,
    #[serde(default = "default_result_waiters")]
    pub result_waiters: usize,
    /// `held_snapshot`: arrival rate (jobs/s), the worker's concurrency, seconds before the
    /// snapshot, held, and after, and the reporting window.
    #[serde(default = "default_snapshot_rate")]
    pub snapshot_rate: u64,
    #[serde(default = "default_snapshot_concurrency")]
    pub snapshot_concurrency: usize,
    #[serde(default = "default_snapshot_before")]
    pub snapshot_before_secs: u64,
    #[serde(default = "default_snapshot_hold")]
    pub snapshot_hold_secs: u64,
    #[serde(default = "default_snapshot_before")]
    pub snapshot_after_secs: u64,
    #[serde(default = "default_snapshot_window")]
    pub snapshot_window_secs: u64,
    /// `growth`: whether claims are logged (`Config::recover_lost_claims`, on by default), to
    /// measure what the claim log costs.
    #[serde(default = "default_recover_lost")]
    pub recover_lost: bool,
}

fn default_recover_lost() -> bool {
    true
}

fn default_snapshot_rate() -> u64 {
    2_000
}
fn default_snapshot_concurrency() -> usize {
    50
}
fn default_snapshot_before() -> u64 {
    20
}
fn default_snapshot_hold() -> u64 {
    80
}
fn default_snapshot_window() -> u64 {
    10
}

fn default_result_calls() -> usize {
    300
}
fn default_result_waiters() -> usize {
    1000
}

fn default_one_worker_concurrency() -> usize {
    100
}
fn default_producers_reps() -> usize {
    2
}
fn default_growth_jobs() -> Vec<u64> {
    vec![20_000, 200_000]
}
fn default_breakdown_claims() -> Vec<usize> {
    vec![100, 500]
}
fn default_delayed_jobs() -> u64 {
    1_000_000
}
fn default_far_delays() -> Vec<u64> {
    vec![5, 50]
}
fn default_far_concurrency() -> usize {
    200
}
fn default_far_job_ms() -> u64 {
    20
}
fn default_far_secs() -> u64 {
    10
}

impl Default for Params {
    fn default() -> Self {
        Self {
            burn_jobs: 100_000,
            enqueue_single: 2_000,
            enqueue_bulk_batches: 20,
            bulk_size: 1_000,
            workers: 2,
            concurrency: 32,
            batch_size: 100,
            pickup_samples: 200,
            idle_secs: 10,
            sustained_rate: 1_000,
            sustained_secs: 10,
            notify_producers: 8,
            notify_secs: 5,
            poll_ms: 1_000,
            one_worker_concurrency: default_one_worker_concurrency(),
            producers_clients: Vec::new(),
            producers_reps: default_producers_reps(),
            growth_jobs: default_growth_jobs(),
            breakdown_claims: default_breakdown_claims(),
            delayed_jobs: default_delayed_jobs(),
            far_delays_ms: default_far_delays(),
            far_concurrency: default_far_concurrency(),
            far_job_ms: default_far_job_ms(),
            far_secs: default_far_secs(),
            result_calls: default_result_calls(),
            result_waiters: default_result_waiters(),
            snapshot_rate: default_snapshot_rate(),
            snapshot_concurrency: default_snapshot_concurrency(),
            snapshot_before_secs: default_snapshot_before(),
            snapshot_hold_secs: default_snapshot_hold(),
            snapshot_after_secs: default_snapshot_before(),
            snapshot_window_secs: default_snapshot_window(),
            recover_lost: default_recover_lost(),
        }
    }
}

impl Params {
    pub fn quick() -> Self {
        Self {
            burn_jobs: 3_000,
            enqueue_single: 300,
            enqueue_bulk_batches: 5,
            bulk_size: 500,
            pickup_samples: 30,
            idle_secs: 3,
            sustained_rate: 300,
            sustained_secs: 3,
            notify_secs: 2,
            growth_jobs: vec![3_000],
            breakdown_claims: vec![100],
            delayed_jobs: 20_000,
            far_secs: 3,
            result_calls: 30,
            result_waiters: 100,
            snapshot_rate: 500,
            snapshot_before_secs: 5,
            snapshot_hold_secs: 10,
            snapshot_after_secs: 5,
            snapshot_window_secs: 5,
            ..Self::default()
        }
    }
}

/// Pushes at `rate` per second for `secs` seconds with `producers` tasks calling `push(t)`.
/// Returns how many pushes succeeded.
pub async fn offered_load<F, Fut, E>(rate: u64, secs: u64, producers: usize, push: F) -> u64
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let sent = Arc::new(AtomicU64::new(0));
    let per = (rate as f64 / producers as f64).max(1.0);
    let period = Duration::from_secs_f64(1.0 / per);
    let mut handles = Vec::new();
    for _ in 0..producers {
        let push = push.clone();
        let sent = sent.clone();
        handles.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(secs);
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while Instant::now() < end {
                tick.tick().await;
                match push(now_micros()).await {
                    Ok(()) => {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => eprintln!("push failed: {e}"),
                }
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    sent.load(Ordering::Relaxed)
}

/// Runs `producers` tasks pushing as fast as they can for `secs`; returns pushes per second.
pub async fn max_push_rate<F, Fut, E>(secs: u64, producers: usize, push: F) -> f64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..producers {
        let push = push.clone();
        let sent = sent.clone();
        handles.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < end {
                match push().await {
                    Ok(()) => {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("push failed: {e}");
                        return;
                    }
                }
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    sent.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// A small deterministic jitter in [lo, hi) ms for spacing pickup samples.
pub fn gap(i: usize, lo: u64, hi: u64) -> Duration {
    let x = (i as u64).wrapping_mul(2_654_435_761) % (hi - lo).max(1);
    Duration::from_millis(lo + x)
}

/// Spawns `$workers` apalis workers over clones of `$backend`, each with concurrency
/// `$concurrency`, running a handler that records into `$counters`. Evaluates to
/// `(stop_sender, join_handles)`; send on the sender (or drop it) to stop them.
#[macro_export]
macro_rules! spawn_bench_workers {
    ($backend:expr, $workers:expr, $concurrency:expr, $counters:expr) => {{
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut joins = Vec::new();
        for w in 0..$workers {
            let counters = $counters.clone();
            let mut stop_rx = stop_rx.clone();
            let worker = WorkerBuilder::new(format!("bench-{w}"))
                .backend($backend)
                .data(counters)
                .concurrency($concurrency)
                .build(
                    |job: BenchJob, c: Data<std::sync::Arc<Counters>>| async move {
                        let ms = c.job_ms.load(std::sync::atomic::Ordering::Relaxed);
                        if ms > 0 {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        c.handle(&job);
                        Ok::<(), BoxDynError>(())
                    },
                );
            joins.push(tokio::spawn(worker.run_until(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
                Ok::<(), std::io::Error>(())
            })));
        }
        (stop_tx, joins)
    }};
}

/// Stops workers spawned by [`spawn_bench_workers!`].
pub async fn stop_workers<T>(
    stop: tokio::sync::watch::Sender<bool>,
    joins: Vec<tokio::task::JoinHandle<T>>,
) {
    let _ = stop.send(true);
    for j in joins {
        let _ = tokio::time::timeout(Duration::from_secs(30), j).await;
    }
}

/// Runs one workload against an apalis backend. `$b` is evaluated once per worker and must give
/// a backend of its own; `$sink` gives a clone to push with; `$polling` marks systems that poll.
#[macro_export]
macro_rules! apalis_workload {
    ($params:expr, $emit:expr, $system:expr, $workload:expr, $pool:expr, $b:expr, $sink:expr, $polling:expr) => {{
        let p: Params = $params.clone();
        #[allow(unused_mut)]
        let mut emit = $emit;
        let pool: &PgPool = $pool;
        let system: &str = $system;
        match $workload {
            "burn_down" => {
                let mut sink = $sink;
                let mut left = p.burn_jobs;
                while left > 0 {
                    let n = left.min(1000);
                    sink.push_bulk((0..n).map(|_| job(0)).collect()).await?;
                    left -= n;
                }
                let counters = Arc::new(Counters::default());
                let start = Instant::now();
                let (stop, joins) = spawn_bench_workers!($b, p.workers, p.concurrency, counters);
                let ok = wait_done(&counters, p.burn_jobs, Duration::from_secs(600)).await;
                let secs = start.elapsed().as_secs_f64();
                stop_workers(stop, joins).await;
                let rec = Record::new(system, "burn_down")
                    .value("jobs", p.burn_jobs as f64)
                    .value("secs", secs)
                    .value("jobs_per_sec", counters.done() as f64 / secs)
                    .note(format!(
                        "{} workers x concurrency {}, batch {}{}",
                        p.workers,
                        p.concurrency,
                        p.batch_size,
                        if ok { "" } else { ", TIMED OUT" }
                    ));
                emit(rec);
            }
            "enqueue" => {
                let mut sink = $sink;
                let start = Instant::now();
                for _ in 0..p.enqueue_single {
                    sink.push(job(0)).await?;
                }
                let single = p.enqueue_single as f64 / start.elapsed().as_secs_f64();
                let start = Instant::now();
                for _ in 0..p.enqueue_bulk_batches {
                    sink.push_bulk((0..p.bulk_size).map(|_| job(0)).collect())
                        .await?;
                }
                let bulk =
                    (p.enqueue_bulk_batches * p.bulk_size) as f64 / start.elapsed().as_secs_f64();
                emit(
                    Record::new(system, "enqueue")
                        .value("single_per_sec", single)
                        .value("bulk_per_sec", bulk)
                        .note(format!("TaskSink push / push_bulk of {}", p.bulk_size)),
                );
            }
            "pickup" => {
                let mut sink = $sink;
                let counters = Arc::new(Counters::default());
                counters
                    .record
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let (stop, joins) = spawn_bench_workers!($b, 1usize, p.concurrency, counters);
                // Warm up: the worker has connected and is waiting.
                sink.push(job(now_micros())).await?;
                wait_done(&counters, 1, Duration::from_secs(60)).await;
                counters.take_latencies();
                let polling: bool = $polling;
                let samples = if polling {
                    p.pickup_samples.min(20)
                } else {
                    p.pickup_samples
                };
                let timeout = Duration::from_secs(if polling { 10 } else { 35 });
                let mut missed = 0;
                for i in 0..samples {
                    tokio::time::sleep(gap(i, 20, 60)).await;
                    let before = counters.done();
                    sink.push(job(now_micros())).await?;
                    if !wait_done(&counters, before + 1, timeout).await {
                        missed += 1;
                    }
                }
                stop_workers(stop, joins).await;
                let mut rec = Record::new(system, "pickup")
                    .values(latency_values(counters.take_latencies()))
                    .value("missed", missed as f64);
                if polling {
                    rec = rec.note(format!("polls every {} ms", p.poll_ms));
                }
                emit(rec);
            }
            "idle_cost" => {
                let counters = Arc::new(Counters::default());
                let (stop, joins) = spawn_bench_workers!($b, 1usize, p.concurrency, counters);
                tokio::time::sleep(Duration::from_secs(2)).await;
                let (q0, what) = statement_count(pool).await;
                let start = Instant::now();
                tokio::time::sleep(Duration::from_secs(p.idle_secs)).await;
                let (q1, _) = statement_count(pool).await;
                let per_sec = (q1 - q0) / start.elapsed().as_secs_f64();
                stop_workers(stop, joins).await;
                emit(
                    Record::new(system, "idle_cost")
                        .value("per_sec", per_sec)
                        .note(format!("{what} per second, one idle worker")),
                );
            }
            "sustained" => {
                let counters = Arc::new(Counters::default());
                counters
                    .record
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let (stop, joins) = spawn_bench_workers!($b, p.workers, p.concurrency, counters);
                tokio::time::sleep(Duration::from_millis(500)).await;
                let sink = $sink;
                let start = Instant::now();
                let sent = offered_load(p.sustained_rate, p.sustained_secs, 4, move |t| {
                    let mut s = sink.clone();
                    async move { s.push(job(t)).await }
                })
                .await;
                let in_window = counters.done() as f64 / start.elapsed().as_secs_f64();
                wait_done(&counters, sent, Duration::from_secs(60)).await;
                stop_workers(stop, joins).await;
                emit(
                    Record::new(system, "sustained")
                        .value("offered_per_sec", p.sustained_rate as f64)
                        .value("sent", sent as f64)
                        .value("achieved_per_sec", in_window)
                        .values(latency_values(counters.take_latencies())),
                );
            }
            other => eprintln!("{system}: workload {other} handled elsewhere"),
        }
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    }};
}
