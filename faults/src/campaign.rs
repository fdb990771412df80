//! Issue 22, "an hour of random faults": a seeded random schedule of faults over N minutes while
//! producers push steadily, then an independent check (`check.rs`).
//!
//! ```text
//! apalis-pgmq-notify-faults campaign --minutes 2 [--seed N] [--dir D] [--formation]
//! apalis-pgmq-notify-faults check --dir D        # the checker alone, on a kept campaign
//! apalis-pgmq-notify-faults failover-times --dir D   # stalls around its failovers (logs only)
//! ```
//!
//! With `--formation` (under `scripts/with-formation.sh`) the campaign runs against a
//! pg_auto_failover formation: every process connects with the formation's multi-host string,
//! and the schedule fails the primary over (`perform failover`, `perform switchover`, its
//! postmaster SIGKILLed, its node killed and started again) beside the worker kills and
//! terminated sessions. The proxies' network faults, PostgreSQL restarts (pg_autoctl owns the
//! servers) and PgBouncer restarts are left out there (see [`FORMATION_SKIPS`]).
//!
//! Who writes what (everything in one directory, each line one `write`, so it survives SIGKILL):
//! - `campaign.json`: the parameters (seed, minutes, database, queues, visibility timeout).
//! - `producer.log`: the producers' own log: `T` before each push (its id, kind, key), `A` when
//!   the push was acknowledged (with the message id, and whether a keyed push was refused as a
//!   duplicate), `F` when it failed, `W` for what each `push_and_wait` returned.
//! - `w<slot>-<generation>.log`: one per worker process, written by its handlers: `B` (boot),
//!   `S`/`E`/`X` per run (start, end with its result, stopped: the future was dropped), and `D`,
//!   appended by the orchestrator once `waitpid` has returned for that process (its death: any
//!   run it left unfinished ended by then).
//! - `faults.log`: the faults as applied (start and end of each), used only to count them and to
//!   tell which re-runs after a finished run a fault can explain; never to excuse a lost,
//!   doubled or overlapping job.

use std::{
    collections::BTreeMap,
    io::BufRead,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_pgmq_notify::{
    Backoff, Config, Error as PgmqError, MessageInfo, MultiHost, PgmqStorage, QueueName, Runtime,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{
    Bouncer, Ctx, PgControl, Res, arg, now_micros, proxy,
    vocab::{FaultKind, JobKind, JsonLog, PRIO_QUEUE, QUEUE},
};

/// Visibility timeout of every worker: short, so leases matter.
const VT_MS: u64 = 2500;
/// Default attempts of a job (a job pushed with `max_attempts` keeps its own).
const MAX_ATTEMPTS: u32 = 8;
/// How long a `push_and_wait` waits.
const WAIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Worker processes: their concurrency (per queue).
const SLOTS: [usize; 4] = [1, 4, 16, 48];
/// The slots that reach the server through PgBouncer when the campaign runs behind it.
const BOUNCER_SLOTS: [usize; 2] = [1, 3];
/// Pushes per second, all kinds together.
const PUSH_RATE: u64 = 15;
/// Longest `run_after` of a delayed job, in seconds.
const MAX_DELAY_S: u64 = 12;
/// Kinds a campaign against one server leaves out: there is no standby to fail over to.
const ONE_SERVER_SKIPS: [FaultKind; 1] = [FaultKind::Failover];
/// Kinds a campaign against a formation leaves out: pg_autoctl owns its servers (a `pg_ctl
/// restart` would fight it; its failovers, switchovers and kills take their place), and the
/// slots connect with the formation's multi-host string, not through a proxy or PgBouncer in
/// front of one server.
const FORMATION_SKIPS: [FaultKind; 6] = [
    FaultKind::PgRestartFast,
    FaultKind::PgRestartImmediate,
    FaultKind::Blackhole,
    FaultKind::Freeze,
    FaultKind::SlowNetwork,
    FaultKind::PgBouncerRestart,
];

// ------------------------------------------------------------------ seeded randomness

/// SplitMix64: small, fast, and the same sequence for a seed on every platform and version
/// (the schedule of a seed must replay).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// An index drawn with the given weights.
    pub(crate) fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut x = self.next_u64() % total.max(1);
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Fault {
    /// Milliseconds after the campaign's start.
    at_ms: u64,
    kind: FaultKind,
    slot: Option<usize>,
    /// How long it lasts (network faults), or how long a killed worker stays dead.
    dur_ms: u64,
    /// Its size: sessions to terminate, or the slow network's delay in ms.
    n: u64,
    /// A random number for choices made when it is applied (which sessions).
    pick: u64,
}

/// The schedule of a seed: the same faults, at the same offsets, for every run of that seed
/// (with the same `skip`: kinds left out of the draw).
pub(crate) fn schedule(seed: u64, minutes: f64, slots: usize, skip: &[FaultKind]) -> Vec<Fault> {
    let mut rng = Rng::new(seed ^ 0x5EED_FA17_0000_0001);
    let total_ms = (minutes * 60_000.0) as u64;
    let kinds: Vec<FaultKind> = FaultKind::ALL
        .into_iter()
        .filter(|k| !skip.contains(k))
        .collect();
    if kinds.is_empty() {
        return Vec::new();
    }
    let weights: Vec<u64> = kinds.iter().map(|k| k.weight()).collect();
    let mut busy_until = vec![0u64; slots];
    let mut out = Vec::new();
    // The first fault after a few seconds of calm, then one every 2–10 s.
    let mut t = 3_000 + rng.range(0, 3_000);
    while t < total_ms {
        let kind = kinds[rng.weighted(&weights)];
        let wanted = rng.range(0, slots as u64 - 1) as usize;
        let dur_ms = match kind {
            FaultKind::KillWorker => rng.range(200, 4_000),
            FaultKind::Blackhole | FaultKind::Freeze => rng.range(500, 8_000),
            FaultKind::SlowNetwork => rng.range(1_000, 10_000),
            _ => 0,
        };
        let n = match kind {
            FaultKind::TerminateBackends => rng.range(1, 4),
            FaultKind::SlowNetwork => rng.range(20, 400),
            _ => 0,
        };
        let pick = rng.next_u64();
        let mut slot = None;
        if kind.targets_worker() {
            // The wanted slot, or the next one free of a slot-holding fault.
            slot = (0..slots)
                .map(|i| (wanted + i) % slots)
                .find(|s| !kind.holds_slot() || busy_until[*s] <= t);
            if slot.is_none() {
                t += rng.range(2_000, 10_000);
                continue;
            }
        }
        if let (Some(s), true) = (slot, kind.holds_slot()) {
            // A little margin after the end, so a restarted worker gets going first.
            busy_until[s] = t + dur_ms + 1_000;
        }
        // A fault still active when the time is up is healed then.
        out.push(Fault {
            at_ms: t,
            kind,
            slot,
            dur_ms,
            n,
            pick,
        });
        t += rng.range(2_000, 10_000);
    }
    out
}

// ------------------------------------------------------------------ jobs

/// A campaign job. What the handler does is in the job, so every run of it behaves alike.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CampJob {
    /// The producer's id for this push (unique per push attempt).
    pub(crate) lid: u64,
    /// How long the handler sleeps.
    pub(crate) ms: u64,
    /// Fails while the attempt (`read_ct`) is at most this.
    #[serde(default)]
    pub(crate) fail_until: u32,
    /// Fails by panicking rather than with an error.
    #[serde(default)]
    pub(crate) panic: bool,
    /// Returns `AbortError`: killed, deleted by design.
    #[serde(default)]
    pub(crate) abort: bool,
}

/// A handler duration: mostly short, a quarter around a second, some longer than the lease.
fn duration_ms(rng: &mut Rng) -> u64 {
    match rng.weighted(&[60, 25, 15]) {
        0 => rng.range(5, 300),
        1 => rng.range(300, 1_500),
        _ => rng.range(VT_MS, 7_000),
    }
}

// ------------------------------------------------------------------ worker processes

/// Logs `X` if a run's future is dropped before it ends.
struct RunGuard {
    log: Arc<JsonLog>,
    line: Value,
    done: bool,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if !self.done {
            let mut l = self.line.clone();
            l["k"] = json!("X");
            l["at"] = json!(now_micros());
            self.log.line(&l);
        }
    }
}

async fn camp_handle(
    job: CampJob,
    info: Data<MessageInfo>,
    log: Data<Arc<JsonLog>>,
) -> Result<u64, BoxDynError> {
    let base = json!({
        "lid": job.lid,
        "q": info.queue.as_str(),
        "msg": info.msg_id,
        "rc": info.read_ct,
        "pid": std::process::id(),
    });
    let mut start = base.clone();
    start["k"] = json!("S");
    start["at"] = json!(now_micros());
    log.line(&start);
    let mut guard = RunGuard {
        log: (*log).clone(),
        line: base.clone(),
        done: false,
    };
    tokio::time::sleep(Duration::from_millis(job.ms)).await;
    let attempt = u32::try_from(info.read_ct).unwrap_or(0);
    let result = if job.abort {
        "abort"
    } else if attempt <= job.fail_until {
        if job.panic { "panic" } else { "fail" }
    } else {
        "ok"
    };
    guard.done = true;
    let mut end = base;
    end["k"] = json!("E");
    end["at"] = json!(now_micros());
    end["r"] = json!(result);
    log.line(&end);
    match result {
        "abort" => Err(Box::new(AbortError::new("aborted on purpose"))),
        "panic" => panic!("campaign job {} panics on purpose", job.lid),
        "fail" => Err(format!("campaign job {} fails on purpose", job.lid).into()),
        _ => Ok(job.lid),
    }
}

/// `camp-worker`: one process, one runtime, a worker on each queue.
pub(crate) fn worker_main(args: &[String]) -> Res<()> {
    let url = arg(args, "--url").ok_or("--url")?.to_owned();
    let name = arg(args, "--name").ok_or("--name")?.to_owned();
    let concurrency: usize = arg(args, "--concurrency").unwrap_or("4").parse()?;
    let vt_ms: u64 = arg(args, "--vt-ms").unwrap_or("2500").parse()?;
    let log_path = PathBuf::from(arg(args, "--log").ok_or("--log")?);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("APALIS_FAULTS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let log = Arc::new(JsonLog::open(&log_path)?);
        log.line(&json!({"k": "B", "pid": std::process::id(), "at": now_micros(), "name": name}));
        let options = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5));
        // A formation's multi-host string: the pool on the host that takes writes, and the
        // runtime following it (the name is in the string, as `application_name`).
        let hosts = if url.contains(',') {
            Some(MultiHost::parse(&url)?)
        } else {
            None
        };
        let pool = match &hosts {
            // A worker started during a failover finds no primary for a while: it waits for
            // one (two minutes at most), as a deployment's process would be restarted.
            Some(h) => {
                let mut tries = 0;
                loop {
                    match h.connect_pool(options.clone()).await {
                        Ok(pool) => break pool,
                        Err(e) if tries < 240 => {
                            tries += 1;
                            if tries == 1 {
                                eprintln!("no writable host yet ({e}); waiting");
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            None => {
                options.connect_lazy_with(PgConnectOptions::from_str(&url)?.application_name(&name))
            }
        };
        let config = Config::default()
            .visibility_timeout(Duration::from_millis(vt_ms))
            .max_attempts(MAX_ATTEMPTS)
            .backoff(
                Backoff::default()
                    .base(Duration::from_millis(200))
                    .max(Duration::from_secs(2)),
            );
        let runtime = match hosts {
            Some(h) => Runtime::new(&pool).hosts(h),
            None => Runtime::new(&pool),
        };
        let plain =
            PgmqStorage::<CampJob>::with_config(&runtime, QueueName::new(QUEUE)?, config.clone())?;
        let prio = PgmqStorage::<CampJob>::with_config(
            &runtime,
            QueueName::new(PRIO_QUEUE)?,
            config.priorities(true),
        )?;
        // Stop gracefully when the orchestrator closes our stdin.
        let (tx, rx) = tokio::sync::watch::channel(false);
        std::thread::spawn(move || {
            let mut sink = String::new();
            while std::io::stdin()
                .lock()
                .read_line(&mut sink)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
            let _ = tx.send(true);
        });
        let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
            Ok::<(), std::io::Error>(())
        };
        let w1 = WorkerBuilder::new(format!("{name}-plain"))
            .backend(plain)
            .data(log.clone())
            .concurrency(concurrency)
            .build(camp_handle);
        let w2 = WorkerBuilder::new(format!("{name}-prio"))
            .backend(prio)
            .data(log)
            .concurrency(concurrency.div_ceil(2))
            .build(camp_handle);
        let (r1, r2) = tokio::join!(w1.run_until(stop(rx.clone())), w2.run_until(stop(rx)));
        if let Err(e) = runtime.shutdown().await {
            eprintln!("runtime shutdown: {e}");
        }
        r1?;
        r2?;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    })
}

// ------------------------------------------------------------------ the orchestrator

/// A worker slot: its proxy (every fault on the slot's network goes through it) and its
/// current process.
struct Slot {
    idx: usize,
    concurrency: usize,
    /// The slot's proxy; none against a formation (the slot uses its multi-host string).
    proxy: Option<proxy::Proxy>,
    url: String,
    child: Option<Child>,
    log: PathBuf,
    generation: u32,
}

impl Slot {
    fn name(&self) -> String {
        format!("camp-w{}", self.idx)
    }

    fn spawn(&mut self, exe: &Path, dir: &Path) -> Res<()> {
        self.generation += 1;
        self.log = dir.join(format!("w{}-{}.log", self.idx, self.generation));
        let err =
            std::fs::File::create(dir.join(format!("w{}-{}.stderr", self.idx, self.generation)))?;
        let child = Command::new(exe)
            .args([
                "camp-worker",
                "--url",
                &self.url,
                "--name",
                &self.name(),
                "--concurrency",
                &self.concurrency.to_string(),
                "--vt-ms",
                &VT_MS.to_string(),
                "--log",
                self.log.to_str().ok_or("log path")?,
            ])
            // The jobs that panic on purpose: one line each in stderr, not a backtrace.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Appends the process's death to its log, once `waitpid` has returned.
    fn record_death(&self, pid: u32, cause: &str) {
        if let Ok(log) = JsonLog::open(&self.log) {
            log.line(&json!({"k": "D", "pid": pid, "at": now_micros(), "cause": cause}));
        }
    }

    /// SIGKILL and reap.
    async fn kill(&mut self) -> Option<u32> {
        let mut child = self.child.take()?;
        let pid = child.id();
        let reaped = tokio::task::spawn_blocking(move || {
            let _ = child.kill();
            child.wait()
        })
        .await;
        let cause = match reaped {
            Ok(Ok(status)) => format!("killed ({status})"),
            _ => "killed (wait failed)".to_owned(),
        };
        self.record_death(pid, &cause);
        Some(pid)
    }

    /// Closes stdin (graceful stop), waits up to 30 s, then kills.
    async fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let pid = child.id();
        drop(child.stdin.take());
        let (ok, cause) = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        return (status.success(), format!("stopped ({status})"));
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return (false, "did not stop in 30 s: killed".to_owned());
                    }
                }
            }
        })
        .await
        .unwrap_or((false, "stop task failed".to_owned()));
        self.record_death(pid, &cause);
        ok
    }

    /// A process that exited on its own (not killed by us): recorded, reaped, and replaced.
    fn exited_by_itself(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                let pid = child.id();
                self.child = None;
                let cause = format!("exited by itself ({status})");
                self.record_death(pid, &cause);
                Some(cause)
            }
            _ => None,
        }
    }
}

/// Terminates up to `n` of the sessions named `app`, chosen with `pick`; returns how many.
async fn terminate(pool: &PgPool, app: &str, n: u64, pick: u64) -> Res<usize> {
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid",
    )
    .bind(app)
    .fetch_all(pool)
    .await?;
    let mut rng = Rng::new(pick);
    let mut left = pids;
    let mut done = 0;
    for _ in 0..n {
        if left.is_empty() {
            break;
        }
        let i = rng.range(0, left.len() as u64 - 1) as usize;
        let pid = left.swap_remove(i);
        let ok: Option<bool> = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(pool)
            .await?;
        if ok == Some(true) {
            done += 1;
        }
    }
    Ok(done)
}

/// An active fault's end, to heal it.
#[derive(Debug, Clone)]
struct Pending {
    at_ms: u64,
    fault: usize,
}

/// Applies the schedule; returns when its time is up, with every fault healed and every slot
/// running a worker.
/// What applying faults needs besides the schedule and the slots.
struct FaultEnv<'a> {
    pg: Option<&'a PgControl>,
    /// PgBouncer in front of some slots (scripts/with-pgbouncer.sh), restarted by the schedule.
    bouncer: Option<&'a Bouncer>,
    /// The orchestrator's own pool, straight to the server (terminations).
    pool: &'a PgPool,
    /// The formation the schedule fails over (`--formation`).
    formation: Option<&'a Formation>,
    exe: &'a Path,
    dir: &'a Path,
    flog: &'a JsonLog,
}

async fn run_faults(
    plan: &[Fault],
    slots: &mut [Slot],
    minutes: f64,
    env: FaultEnv<'_>,
) -> Res<()> {
    let FaultEnv {
        pg,
        bouncer,
        pool,
        formation,
        exe,
        dir,
        flog,
    } = env;
    let start = tokio::time::Instant::now();
    let total = Duration::from_secs_f64(minutes * 60.0);
    let mut pending: Vec<Pending> = Vec::new();
    let mut next = 0usize;
    let record = |phase: &str, f: &Fault, detail: String| {
        flog.line(&json!({
            "phase": phase,
            "kind": f.kind,
            "slot": f.slot,
            "at": now_micros(),
            "offset_ms": f.at_ms,
            "detail": detail,
        }));
    };
    loop {
        // Workers that died on their own are a finding: recorded and replaced at once.
        for s in slots.iter_mut() {
            if let Some(cause) = s.exited_by_itself() {
                eprintln!("   worker slot {} {cause}; restarting it", s.idx);
                flog.line(&json!({"phase": "unexpected_exit", "slot": s.idx, "at": now_micros(), "detail": cause}));
                s.spawn(exe, dir)?;
            }
        }
        let due_start = plan.get(next).map(|f| f.at_ms);
        let due_end = pending.iter().map(|p| p.at_ms).min();
        let due = match (due_start, due_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(at_ms) = due.filter(|d| Duration::from_millis(*d) < total) else {
            break;
        };
        // Wake at least every second to notice workers that exited by themselves.
        let when = start + Duration::from_millis(at_ms);
        if tokio::time::Instant::now() + Duration::from_secs(1) < when {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        tokio::time::sleep_until(when).await;
        if due_end == Some(at_ms) {
            let i = pending
                .iter()
                .position(|p| p.at_ms == at_ms)
                .ok_or("pending")?;
            let p = pending.swap_remove(i);
            end_fault(&plan[p.fault], slots, exe, dir, &record)?;
            continue;
        }
        let f = &plan[next];
        let idx = next;
        next += 1;
        let slot = f.slot.map(|s| &mut slots[s]);
        let detail = match (f.kind, slot) {
            (FaultKind::KillWorker, Some(s)) => match s.kill().await {
                Some(pid) => format!("pid {pid} killed; back in {} ms", f.dur_ms),
                None => "no process".into(),
            },
            (FaultKind::Blackhole, Some(Slot { proxy: Some(p), .. })) => {
                p.blackhole();
                format!("for {} ms", f.dur_ms)
            }
            (FaultKind::Freeze, Some(Slot { proxy: Some(p), .. })) => {
                p.freeze();
                format!("for {} ms", f.dur_ms)
            }
            (FaultKind::SlowNetwork, Some(Slot { proxy: Some(p), .. })) => {
                p.slow(Duration::from_millis(f.n));
                format!("{} ms per chunk each way, for {} ms", f.n, f.dur_ms)
            }
            (FaultKind::Blackhole | FaultKind::Freeze | FaultKind::SlowNetwork, Some(_)) => {
                "skipped: the slot has no proxy".into()
            }
            (FaultKind::TerminateBackends, Some(s)) => {
                match terminate(pool, &s.name(), f.n, f.pick).await {
                    Ok(k) => format!("{k} of {} asked terminated", f.n),
                    Err(e) => format!("skipped: {e}"),
                }
            }
            (FaultKind::PgRestartFast | FaultKind::PgRestartImmediate, _) => match pg {
                Some(pg) => {
                    let mode = if f.kind == FaultKind::PgRestartFast {
                        "fast"
                    } else {
                        "immediate"
                    };
                    record("start", f, format!("pg_ctl restart -m {mode}"));
                    let pg = pg.clone();
                    record("end", f, down_and_back(move || pg.restart(mode)).await);
                    continue;
                }
                None => "skipped: the server was not started by scripts/with-pg.sh".into(),
            },
            (FaultKind::PgBouncerRestart, _) => match bouncer {
                Some(b) => {
                    record(
                        "start",
                        f,
                        "PgBouncer stopped (SIGTERM) and started again".into(),
                    );
                    let b = b.clone();
                    record("end", f, down_and_back(move || b.restart()).await);
                    continue;
                }
                None => "skipped: no PgBouncer (run under scripts/with-pgbouncer.sh)".into(),
            },
            (FaultKind::Failover, _) => match formation {
                Some(fm) => {
                    let action = FailoverAction::pick(f.pick);
                    record("start", f, action.describe().into());
                    let ctl = fm.ctl.clone();
                    let detail = down_and_back(move || action.run(&ctl)).await;
                    // The orchestrator's pool follows the new primary (the workers' and the
                    // producers' runtimes do so by themselves).
                    let followed = match fm.hosts.follow(pool).await {
                        Ok(o) => format!("; the orchestrator follows to port {}", o.get_port()),
                        Err(e) => format!("; the orchestrator could not follow yet: {e}"),
                    };
                    record("end", f, format!("{detail}{followed}"));
                    continue;
                }
                None => {
                    "skipped: no formation (run with --formation under scripts/with-formation.sh)"
                        .into()
                }
            },
            (_, None) => "skipped: no slot".into(),
        };
        record("start", f, detail);
        if f.kind.holds_slot() {
            pending.push(Pending {
                at_ms: f.at_ms + f.dur_ms,
                fault: idx,
            });
        } else {
            record("end", f, String::new());
        }
    }
    // Time is up: heal what is still active, in order.
    pending.sort_by_key(|p| p.at_ms);
    for p in pending {
        end_fault(&plan[p.fault], slots, exe, dir, &record)?;
    }
    Ok(())
}

/// Runs a blocking restart (of PostgreSQL or PgBouncer) off the runtime's threads; the fault
/// log's end detail: how long the service was down, or why the restart failed (which the
/// checker counts).
async fn down_and_back(restart: impl FnOnce() -> Res<()> + Send + 'static) -> String {
    let t = Instant::now();
    let r = tokio::task::spawn_blocking(move || restart().map_err(|e| e.to_string()))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    match r {
        Ok(()) => format!("down and back in {:.2} s", t.elapsed().as_secs_f64()),
        Err(e) => format!("failed: {e}"),
    }
}

fn end_fault(
    f: &Fault,
    slots: &mut [Slot],
    exe: &Path,
    dir: &Path,
    record: &impl Fn(&str, &Fault, String),
) -> Res<()> {
    let Some(s) = f.slot.map(|i| &mut slots[i]) else {
        return Ok(());
    };
    let detail = match f.kind {
        FaultKind::KillWorker => {
            if s.child.is_none() {
                s.spawn(exe, dir)?;
            }
            "restarted".to_owned()
        }
        FaultKind::Blackhole => {
            if let Some(p) = &s.proxy {
                p.heal();
            }
            "healed".to_owned()
        }
        FaultKind::Freeze => {
            if let Some(p) = &s.proxy {
                p.thaw();
            }
            "thawed (frozen connections stay silent)".to_owned()
        }
        FaultKind::SlowNetwork => {
            if let Some(p) = &s.proxy {
                p.slow(Duration::ZERO);
            }
            "fast again".to_owned()
        }
        _ => String::new(),
    };
    record("end", f, detail);
    Ok(())
}

// ------------------------------------------------------------------ the formation

/// The pg_auto_failover formation of `--formation` (scripts/with-formation.sh).
struct Formation {
    /// `scripts/formation-ctl.sh`.
    ctl: PathBuf,
    /// The formation's hosts, on the campaign's database: what the orchestrator's pool follows.
    hosts: MultiHost,
    /// The multi-host string of the campaign's database.
    url: String,
}

impl Formation {
    fn from_env() -> Res<Self> {
        let url = std::env::var("APALIS_FORMATION_URL")
            .map_err(|_| "--formation: APALIS_FORMATION_URL is not set (run under scripts/with-formation.sh)")?;
        let ctl = std::env::var("APALIS_FORMATION_CTL")
            .map_err(|_| "--formation: APALIS_FORMATION_CTL is not set (run under scripts/with-formation.sh)")?;
        let hosts = MultiHost::parse(&url)?;
        Ok(Self {
            ctl: PathBuf::from(ctl),
            hosts,
            url,
        })
    }

    /// The formation's string on database `db` with `application_name` `app` (the formation's
    /// URL form: `postgres://user@h1:p1,h2:p2/postgres?target_session_attrs=...`).
    fn url_for(&self, db: &str, app: &str) -> Res<String> {
        let (head, query) = self.url.split_once('?').unwrap_or((self.url.as_str(), ""));
        let authority_end = head
            .find("://")
            .map(|i| i + 3)
            .and_then(|start| head[start..].find('/').map(|j| start + j))
            .ok_or("the formation URL has no database")?;
        let sep = if query.is_empty() { "" } else { "&" };
        Ok(format!(
            "{}/{db}?{query}{sep}application_name={app}",
            &head[..authority_end]
        ))
    }
}

/// What one `failover` fault does to the formation, chosen by its `pick`.
#[derive(Debug, Clone, Copy)]
enum FailoverAction {
    /// `pg_autoctl perform failover`.
    Failover,
    /// `pg_autoctl perform switchover`.
    Switchover,
    /// SIGKILL of the primary's postmaster: its keeper restarts it in place (crash recovery).
    KillPostgres,
    /// SIGKILL of the primary's keeper and postmaster (a machine dying): the monitor promotes
    /// a standby; the node is started again and rejoins as a standby.
    KillNode,
}

impl FailoverAction {
    fn pick(pick: u64) -> Self {
        match pick % 4 {
            0 => Self::Failover,
            1 => Self::Switchover,
            2 => Self::KillPostgres,
            _ => Self::KillNode,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Failover => "pg_autoctl perform failover",
            Self::Switchover => "pg_autoctl perform switchover",
            Self::KillPostgres => "SIGKILL of the primary's postmaster",
            Self::KillNode => {
                "SIGKILL of the primary's node (keeper and postmaster), then started again"
            }
        }
    }

    /// Runs it, then waits until the formation is stable again (one primary, every other node secondary).
    fn run(self, ctl: &Path) -> Res<()> {
        let sh = |args: &[&str]| -> Res<String> {
            let out = Command::new(ctl)
                .args(args)
                .stderr(Stdio::inherit())
                .output()?;
            if !out.status.success() {
                return Err(
                    format!("formation-ctl {} failed ({})", args.join(" "), out.status).into(),
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        };
        // A settled formation first: the monitor may still be moving the nodes after the
        // last fault (a killed postmaster that wait-stable saw before the monitor did).
        sh(&["wait-stable", "180"])?;
        match self {
            Self::Failover => drop(sh(&["failover"])?),
            Self::Switchover => drop(sh(&["switchover"])?),
            Self::KillPostgres => drop(sh(&["kill-postgres"])?),
            Self::KillNode => {
                let primary = sh(&["primary"])?;
                sh(&["kill-node", &primary])?;
                sh(&["wait-writable", "120"])?;
                sh(&["start-node", &primary])?;
            }
        }
        // Writes are taken again, and the nodes are one primary and secondaries.
        sh(&["wait-writable", "120"])?;
        sh(&["wait-stable", "180"])?;
        Ok(())
    }
}

// ------------------------------------------------------------------ producers

struct Producers {
    log: Arc<JsonLog>,
    /// Raised when a push fails: against a formation the pool then follows the primary.
    push_failed: Arc<tokio::sync::Notify>,
    pool: PgPool,
    plain: PgmqStorage<CampJob>,
    prio: PgmqStorage<CampJob>,
}

fn err_text(e: &dyn std::fmt::Display) -> String {
    e.to_string().chars().take(200).collect()
}

impl Producers {
    fn tried(&self, lid: u64, kind: JobKind, extra: Value) {
        let mut l = json!({"k": "T", "lid": lid, "kind": kind, "at": now_micros()});
        if let (Some(o), Some(e)) = (l.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        self.log.line(&l);
    }

    fn acked(
        &self,
        lid: u64,
        kind: JobKind,
        q: &str,
        msg: Option<i64>,
        dup: bool,
        key: Option<&str>,
    ) {
        self.log.line(&json!({
            "k": "A", "lid": lid, "kind": kind, "q": q, "msg": msg, "dup": dup, "key": key,
            "at": now_micros(),
        }));
    }

    fn failed(&self, lid: u64, kind: JobKind, e: &dyn std::fmt::Display) {
        self.push_failed.notify_one();
        self.log.line(
            &json!({"k": "F", "lid": lid, "kind": kind, "at": now_micros(), "error": err_text(e)}),
        );
    }

    async fn task_push(
        &self,
        storage: &PgmqStorage<CampJob>,
        task: Task<CampJob>,
    ) -> Result<apalis_pgmq_notify::Pushed, PgmqError> {
        let mut conn = self.pool.acquire().await?;
        storage.push_task_with(&mut conn, task).await
    }

    /// Pushes one job of `kind`; logs the try and the outcome.
    async fn push(
        &self,
        lid: u64,
        kind: JobKind,
        job: CampJob,
        rng: &mut Rng,
        keys: &mut Vec<String>,
        sink: &mut PgmqStorage<CampJob>,
    ) {
        match kind {
            JobKind::Plain => {
                self.tried(lid, kind, json!({}));
                if rng.chance(0.5) {
                    match sink.push(job).await {
                        Ok(()) => self.acked(lid, kind, QUEUE, None, false, None),
                        Err(e) => self.failed(lid, kind, &e),
                    }
                } else {
                    match self.plain.push_with(&self.pool, &job).await {
                        Ok(id) => self.acked(lid, kind, QUEUE, Some(id), false, None),
                        Err(e) => self.failed(lid, kind, &e),
                    }
                }
            }
            JobKind::Keyed => {
                // A new key, or (a third of the time) one of the last few again.
                let key = if !keys.is_empty() && rng.chance(0.35) {
                    keys[rng.range(0, keys.len() as u64 - 1) as usize].clone()
                } else {
                    let k = format!("key-{lid}");
                    keys.push(k.clone());
                    if keys.len() > 8 {
                        keys.remove(0);
                    }
                    k
                };
                // Sometimes the same key twice in a row: the second is refused while the first
                // is pending.
                let twice = rng.chance(0.2);
                self.tried(lid, kind, json!({"key": key, "twice": twice}));
                let task = TaskBuilder::new(job.clone()).idempotency_key(&key).build();
                match self.task_push(&self.plain, task).await {
                    Ok(p) => self.acked(lid, kind, QUEUE, Some(p.id), p.duplicate, Some(&key)),
                    Err(e) => {
                        self.failed(lid, kind, &e);
                        return;
                    }
                }
                if twice {
                    let lid2 = lid + 1_000_000_000;
                    let mut again = job;
                    again.lid = lid2;
                    self.tried(lid2, kind, json!({"key": key}));
                    let task = TaskBuilder::new(again).idempotency_key(&key).build();
                    match self.task_push(&self.plain, task).await {
                        Ok(p) => {
                            self.acked(lid2, kind, QUEUE, Some(p.id), p.duplicate, Some(&key));
                        }
                        Err(e) => self.failed(lid2, kind, &e),
                    }
                }
            }
            JobKind::Delayed => {
                let delay_ms = rng.range(1_000, MAX_DELAY_S * 1000);
                // Logged before the task is built: run_after counts from the build.
                self.tried(lid, kind, json!({"delay_ms": delay_ms}));
                let task = TaskBuilder::new(job)
                    .run_after(Duration::from_millis(delay_ms))
                    .build();
                match self.task_push(&self.plain, task).await {
                    Ok(p) => self.acked(lid, kind, QUEUE, Some(p.id), p.duplicate, None),
                    Err(e) => self.failed(lid, kind, &e),
                }
            }
            JobKind::Prio => {
                let priority = rng.range(0, 9) as usize;
                self.tried(lid, kind, json!({"priority": priority}));
                let task = TaskBuilder::new(job).priority(priority).build();
                match self.task_push(&self.prio, task).await {
                    Ok(p) => self.acked(lid, kind, PRIO_QUEUE, Some(p.id), p.duplicate, None),
                    Err(e) => self.failed(lid, kind, &e),
                }
            }
            JobKind::Doomed => {
                self.tried(lid, kind, json!({}));
                let task = TaskBuilder::new(job).max_attempts(3).build();
                match self.task_push(&self.plain, task).await {
                    Ok(p) => self.acked(lid, kind, QUEUE, Some(p.id), p.duplicate, None),
                    Err(e) => self.failed(lid, kind, &e),
                }
            }
            JobKind::Abort => {
                self.tried(lid, kind, json!({}));
                match self.plain.push_with(&self.pool, &job).await {
                    Ok(id) => self.acked(lid, kind, QUEUE, Some(id), false, None),
                    Err(e) => self.failed(lid, kind, &e),
                }
            }
            JobKind::Poison => {
                self.tried(lid, kind, json!({}));
                // `ms` of the wrong type: undecodable, but the checker can read the id.
                let body = json!({"lid": lid, "ms": "not a number"}).to_string();
                let r: Result<i64, sqlx::Error> =
                    sqlx::query_scalar("SELECT pgmq.send($1, $2::jsonb)")
                        .bind(QUEUE)
                        .bind(body)
                        .fetch_one(&self.pool)
                        .await;
                match r {
                    Ok(id) => self.acked(lid, kind, QUEUE, Some(id), false, None),
                    Err(e) => self.failed(lid, kind, &e),
                }
            }
            JobKind::Wait => unreachable!("waits are spawned"),
        }
    }
}

/// `push_and_wait`, bounded from outside too (a wait that never returns is a finding).
async fn wait_one(p: Arc<Producers>, lid: u64, job: CampJob) {
    p.tried(
        lid,
        JobKind::Wait,
        json!({"timeout_ms": WAIT_TIMEOUT.as_millis() as u64}),
    );
    let r = tokio::time::timeout(
        WAIT_TIMEOUT + Duration::from_secs(60),
        p.plain.push_and_wait::<u64>(job.into(), WAIT_TIMEOUT),
    )
    .await;
    let (outcome, msg, detail) = match r {
        Err(_) => ("hung", None, "no answer 60 s after the timeout".to_owned()),
        Ok(Ok(done)) => {
            let msg = done.task_id.to_string().parse::<i64>().ok();
            match done.result {
                Ok(v) => ("ok", msg, v.to_string()),
                Err(e) => ("err", msg, err_text(&e)),
            }
        }
        Ok(Err(PgmqError::Timeout { msg_id, .. })) => ("timeout", Some(msg_id), String::new()),
        Ok(Err(
            e @ (PgmqError::Stopped(_)
            | PgmqError::ResultsUnreadable(_)
            | PgmqError::ResultType { .. }),
        )) => ("wait_error", None, err_text(&e)),
        // Before the id is known: the push itself failed (not acknowledged).
        Ok(Err(e)) => ("push_failed", None, err_text(&e)),
    };
    if matches!(outcome, "ok" | "err" | "timeout") {
        p.acked(lid, JobKind::Wait, QUEUE, msg, false, None);
    } else if outcome == "push_failed" {
        p.failed(lid, JobKind::Wait, &detail);
    }
    p.log.line(&json!({
        "k": "W", "lid": lid, "msg": msg, "outcome": outcome, "detail": detail, "at": now_micros(),
    }));
}

/// Pushes at `PUSH_RATE` per second for `minutes`, the kinds and their behaviour drawn from
/// the seed; returns once every `push_and_wait` has returned. The mix of a seed is the same on
/// every run; which pushes succeed depends on the faults' timing.
async fn produce(
    p: Arc<Producers>,
    seed: u64,
    minutes: f64,
) -> std::collections::BTreeMap<&'static str, u64> {
    let mut rng = Rng::new(seed ^ 0x0B5E_55ED_0000_0002);
    let mut keys = Vec::new();
    let mut waits = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / PUSH_RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let total = (minutes * 60.0 * PUSH_RATE as f64) as u64;
    let mut sink = p.plain.clone();
    let mut counts = BTreeMap::new();
    for lid in 1..=total {
        tick.tick().await;
        let kind = JobKind::ALL[rng.weighted(&JobKind::WEIGHTS)];
        let failing = matches!(
            kind,
            JobKind::Plain | JobKind::Prio | JobKind::Keyed | JobKind::Wait
        ) && rng.chance(0.15);
        let job = CampJob {
            lid,
            ms: duration_ms(&mut rng),
            fail_until: if kind == JobKind::Doomed {
                u32::MAX
            } else if failing {
                rng.range(1, 2) as u32
            } else {
                0
            },
            panic: rng.chance(0.3),
            abort: kind == JobKind::Abort,
        };
        *counts.entry(kind.name()).or_insert(0) += 1;
        if kind == JobKind::Wait {
            waits.spawn(wait_one(p.clone(), lid, job));
        } else {
            p.push(lid, kind, job, &mut rng, &mut keys, &mut sink).await;
        }
    }
    while waits.join_next().await.is_some() {}
    counts
}

// ------------------------------------------------------------------ the campaign

/// `campaign --minutes M [--seed N] [--dir D]`.
pub(crate) async fn campaign(args: &[String]) -> Res<bool> {
    let minutes: f64 = arg(args, "--minutes").unwrap_or("2").parse()?;
    let seed: u64 = match arg(args, "--seed") {
        Some(s) => s.parse()?,
        None => Rng::new(now_micros() ^ u64::from(std::process::id()) << 32).next_u64() >> 1,
    };
    // --skip kind,kind: kinds left out of the draw (the same seed and skip replay).
    let skip: Vec<FaultKind> = match arg(args, "--skip") {
        Some(list) => list
            .split(',')
            .map(|n| {
                FaultKind::ALL
                    .into_iter()
                    .find(|k| k.name() == n)
                    .ok_or_else(|| format!("--skip: no fault kind {n:?}"))
            })
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let formation = if args.iter().any(|a| a == "--formation") {
        Some(Formation::from_env()?)
    } else {
        None
    };
    let mut replay = if skip.is_empty() {
        format!("--seed {seed}")
    } else {
        let names: Vec<&str> = skip.iter().map(|k| k.name()).collect();
        format!("--seed {seed} --skip {}", names.join(","))
    };
    // What the topology cannot do is left out of the draw, the same way on every replay.
    let mut skip = skip;
    if formation.is_some() {
        replay.push_str(" --formation");
        skip.extend(FORMATION_SKIPS);
    } else {
        skip.extend(ONE_SERVER_SKIPS);
    }
    println!("campaign seed: {seed} ({minutes} min; replay with {replay})");
    let admin = match &formation {
        // The database is created on the primary of now, and replicated.
        Some(f) => f.hosts.choose().await?,
        None => PgConnectOptions::from_str(
            &std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set")?,
        )?,
    };
    let dir = match arg(args, "--dir") {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join(format!("apalis-campaign-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let ctx = Ctx {
        admin,
        exe: std::env::current_exe()?,
        dir: dir.clone(),
        pg: if formation.is_some() {
            None
        } else {
            PgControl::from_env()
        },
        quick: false,
    };
    if formation.is_some() {
        println!(
            "against the pg_auto_failover formation (scripts/with-formation.sh): failovers scheduled, network faults and restarts left out"
        );
    } else if ctx.pg.is_none() {
        println!(
            "the server was not started by scripts/with-pg.sh: PostgreSQL restarts are skipped"
        );
    }
    let started = Instant::now();
    let db = ctx.fresh("campaign").await?;
    let base = Config::default().visibility_timeout(Duration::from_millis(VT_MS));
    let plain =
        PgmqStorage::<CampJob>::with_config(&db.runtime, QueueName::new(QUEUE)?, base.clone())?;
    plain.create_queue().await?;
    let prio = PgmqStorage::<CampJob>::with_config(
        &db.runtime,
        QueueName::new(PRIO_QUEUE)?,
        base.priorities(true),
    )?;
    prio.create_queue().await?;
    let db_name = "faults_campaign";
    // Against a formation: the campaign's database through the formation's string, followed
    // across failovers (terminations, the settling, the checker).
    let formation = match formation {
        Some(f) => {
            let url = f.url_for(db_name, "camp-orchestrator")?;
            let hosts = MultiHost::parse(&url)?;
            let pool = hosts
                .connect_pool(
                    PgPoolOptions::new()
                        .max_connections(4)
                        .acquire_timeout(Duration::from_secs(5)),
                )
                .await?;
            Some((Formation { hosts, ..f }, pool))
        }
        None => None,
    };
    let opool = formation.as_ref().map_or(&db.pool, |(_, p)| p);
    std::fs::write(
        dir.join("campaign.json"),
        serde_json::to_string_pretty(&json!({
            "seed": seed, "skip": skip, "minutes": minutes, "database": db_name, "queues": [QUEUE, PRIO_QUEUE],
            "formation": formation.is_some(),
            "vt_ms": VT_MS, "slots": SLOTS, "push_rate": PUSH_RATE,
            "wait_timeout_ms": WAIT_TIMEOUT.as_millis() as u64, "max_attempts": MAX_ATTEMPTS,
        }))?,
    )?;
    let plan = schedule(seed, minutes, SLOTS.len(), &skip);
    std::fs::write(
        dir.join("schedule.json"),
        serde_json::to_string_pretty(&plan)?,
    )?;
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &plan {
        *by_kind.entry(f.kind.name()).or_default() += 1;
    }
    println!("schedule: {} faults {:?}", plan.len(), by_kind);

    // Worker slots, each behind its own proxy; behind PgBouncer (session pooling, which LISTEN
    // needs), the odd ones reach the server through it, and the schedule restarts it.
    let bouncer = if formation.is_some() {
        None
    } else {
        Bouncer::from_env()
    };
    let alias = format!("{db_name}_pgb");
    match &bouncer {
        Some(b) => {
            b.add_database(&alias, db_name, 200)?;
            println!(
                "slots {BOUNCER_SLOTS:?} through PgBouncer (session pooling) on port {}",
                b.port
            );
        }
        None => println!(
            "no PgBouncer (scripts/with-pgbouncer.sh): every slot direct, PgBouncer restarts skipped"
        ),
    }
    let mut slots = Vec::new();
    for (idx, concurrency) in SLOTS.into_iter().enumerate() {
        let (proxy, url) = match (&formation, &bouncer) {
            (Some((f, _)), _) => (None, f.url_for(db_name, &format!("camp-w{idx}"))?),
            (None, Some(b)) if BOUNCER_SLOTS.contains(&idx) => {
                let (proxy, url) = ctx.through_bouncer(&db, db_name, b.port, &alias).await?;
                (Some(proxy), url)
            }
            _ => {
                let (proxy, proxied) = ctx.through_proxy(&db).await?;
                (Some(proxy), proxied.url)
            }
        };
        let mut slot = Slot {
            idx,
            concurrency,
            proxy,
            url,
            child: None,
            log: PathBuf::new(),
            generation: 0,
        };
        slot.spawn(&ctx.exe, &dir)?;
        slots.push(slot);
    }

    // Producers: their own pool and runtime, straight to the server (against a formation,
    // with its string, moved to the new primary after a failed push, as the README says a
    // process without workers does).
    let poptions = PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(5));
    let (ppool, phosts) = match &formation {
        Some((f, _)) => {
            let hosts = MultiHost::parse(&f.url_for(db_name, "camp-producer")?)?;
            (hosts.connect_pool(poptions).await?, Some(hosts))
        }
        None => (
            poptions.connect_lazy_with(
                PgConnectOptions::from_str(&db.url)?.application_name("camp-producer"),
            ),
            None,
        ),
    };
    let pruntime = match &phosts {
        Some(h) => Runtime::new(&ppool).hosts(h.clone()),
        None => Runtime::new(&ppool),
    };
    let push_failed = Arc::new(tokio::sync::Notify::new());
    let follower = phosts.map(|hosts| {
        let (pool, failed) = (ppool.clone(), push_failed.clone());
        tokio::spawn(async move {
            loop {
                failed.notified().await;
                let _ = hosts.follow(&pool).await;
            }
        })
    });
    let producers = Arc::new(Producers {
        log: Arc::new(JsonLog::open(&dir.join("producer.log"))?),
        push_failed,
        pool: ppool.clone(),
        plain: PgmqStorage::with_config(&pruntime, QueueName::new(QUEUE)?, Config::default())?,
        prio: PgmqStorage::with_config(
            &pruntime,
            QueueName::new(PRIO_QUEUE)?,
            Config::default().priorities(true),
        )?,
    });
    let producing = tokio::spawn(produce(producers.clone(), seed, minutes));

    let flog = JsonLog::open(&dir.join("faults.log"))?;
    let env = FaultEnv {
        pg: ctx.pg.as_ref(),
        bouncer: bouncer.as_ref(),
        pool: opool,
        formation: formation.as_ref().map(|(f, _)| f),
        exe: &ctx.exe,
        dir: &dir,
        flog: &flog,
    };
    let faults = run_faults(&plan, &mut slots, minutes, env).await;
    let pushed = producing.await?;
    faults?;
    println!(
        "campaign over after {:.0} s (faults healed, producers done: {:?}); settling",
        started.elapsed().as_secs_f64(),
        pushed
    );

    // Settle: every worker running, nothing injected, until both queues are empty (or 3 min).
    let settle = Instant::now();
    let deadline = settle + Duration::from_secs(180);
    loop {
        for s in slots.iter_mut() {
            if let Some(cause) = s.exited_by_itself() {
                flog.line(&json!({"phase": "unexpected_exit", "slot": s.idx, "at": now_micros(), "detail": cause}));
                s.spawn(&ctx.exe, &dir)?;
            }
        }
        let left: Result<i64, sqlx::Error> = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM pgmq.q_camp) + (SELECT count(*) FROM pgmq.q_camp_prio)",
        )
        .fetch_one(opool)
        .await;
        if matches!(left, Ok(0)) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("settled in {:.1} s", settle.elapsed().as_secs_f64());
    let mut stopped = true;
    for s in slots.iter_mut() {
        stopped &= s.stop().await;
    }
    drop(slots);
    if let Err(e) = pruntime.shutdown().await {
        eprintln!("producer runtime shutdown: {e}");
    }
    if let Some(f) = follower {
        f.abort();
    }
    if let Some((f, pool)) = &formation {
        f.hosts.follow(pool).await?;
    }

    let report = super::check::check(&dir, opool).await?;
    let ok = report.ok && stopped;
    println!("{}", report.text);
    if !stopped {
        println!("a worker process did not stop gracefully at the end");
    }
    println!(
        "campaign {} in {:.0} s; seed {seed}",
        if ok { "passed" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    if !ok {
        println!(
            "FAILED: replay the schedule with {replay}; logs kept in {}",
            dir.display()
        );
    } else if std::env::var_os("APALIS_FAULTS_KEEP").is_some() || arg(args, "--dir").is_some() {
        println!("logs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_schedule() {
        let a = serde_json::to_string(&schedule(42, 10.0, 4, &ONE_SERVER_SKIPS)).unwrap();
        let b = serde_json::to_string(&schedule(42, 10.0, 4, &ONE_SERVER_SKIPS)).unwrap();
        let c = serde_json::to_string(&schedule(43, 10.0, 4, &ONE_SERVER_SKIPS)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn an_hour_schedules_every_kind_its_topology_can_apply() {
        for skips in [&ONE_SERVER_SKIPS[..], &FORMATION_SKIPS[..]] {
            let plan = schedule(7, 60.0, SLOTS.len(), skips);
            for k in FaultKind::ALL {
                let n = plan.iter().filter(|f| f.kind == k).count();
                assert_eq!(n > 0, !skips.contains(&k), "{k:?}: {n}");
            }
            assert!(plan.iter().all(|f| f.at_ms < 3_600_000));
            assert!(plan.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
        }
    }

    #[test]
    fn the_formation_string_names_the_database_and_the_process() {
        let f = Formation {
            ctl: PathBuf::new(),
            hosts: MultiHost::parse("postgres://postgres@127.0.0.1:5433,127.0.0.1:5434/postgres")
                .unwrap(),
            url: "postgres://postgres@127.0.0.1:5433,127.0.0.1:5434/postgres?target_session_attrs=read-write&sslmode=disable".into(),
        };
        assert_eq!(
            f.url_for("faults_campaign", "camp-w2").unwrap(),
            "postgres://postgres@127.0.0.1:5433,127.0.0.1:5434/faults_campaign?target_session_attrs=read-write&sslmode=disable&application_name=camp-w2"
        );
        let o = MultiHost::parse(&f.url_for("db", "x").unwrap()).unwrap();
        assert_eq!(o.hosts().len(), 2);
        assert_eq!(o.hosts()[1].get_database(), Some("db"));
        assert_eq!(o.hosts()[0].get_application_name(), Some("x"));
    }

    #[test]
    fn faults_that_hold_a_slot_never_overlap_on_it() {
        for seed in 0..20 {
            let plan = schedule(seed, 30.0, 4, &[]);
            for slot in 0..4 {
                let held: Vec<&Fault> = plan
                    .iter()
                    .filter(|f| f.kind.holds_slot() && f.slot == Some(slot))
                    .collect();
                for w in held.windows(2) {
                    assert!(w[0].at_ms + w[0].dur_ms < w[1].at_ms, "seed {seed}: {w:?}");
                }
            }
        }
    }

    #[test]
    fn rng_ranges_are_inclusive_and_bounded() {
        let mut rng = Rng::new(1);
        let mut seen = [false; 3];
        for _ in 0..1000 {
            let x = rng.range(2, 4);
            assert!((2..=4).contains(&x));
            seen[(x - 2) as usize] = true;
        }
        assert_eq!(seen, [true; 3]);
        assert_eq!(rng.weighted(&[0, 5, 0]), 1);
    }
}
