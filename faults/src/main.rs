//! The fault suite: real worker processes and a real PostgreSQL, killed, restarted and fed
//! garbage; every scenario counts jobs sent, completed, dead-lettered, run twice and lost.
//!
//! ```text
//! apalis-pgmq-notify-faults run [--quick] [--only "name,name"]   # needs DATABASE_URL
//! apalis-pgmq-notify-faults campaign --minutes 2 [--seed N]   # random faults (campaign.rs)
//! apalis-pgmq-notify-faults check --dir D                     # its checker alone (check.rs)
//! apalis-pgmq-notify-faults worker ...      # a worker process (spawned by `run`)
//! ```
//!
//! Restarting PostgreSQL needs the server started by `scripts/with-pg.sh` (it exports
//! APALIS_PG_BINDIR, APALIS_PG_DATADIR and APALIS_PG_USER); without them that scenario is skipped.
//! Exit status is non-zero if any job is lost, run twice without a crash to explain it, or
//! handled by two workers at once.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use apalis::prelude::*;
use apalis_pgmq_notify::{
    Backoff, Config, MessageInfo, PgmqQueue, PgmqStorage, QueueName, Runtime, setup,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

#[path = "../../tests/common/proxy.rs"]
mod proxy;

mod campaign;
mod check;
mod vocab;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FaultJob {
    id: u64,
    ms: u64,
    #[serde(default)]
    panic: bool,
    #[serde(default)]
    note: Option<String>,
    /// A poison outcome: "nul_error", "nul_panic" or "far_retry".
    #[serde(default)]
    outcome: Option<String>,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

// ------------------------------------------------------------------ worker processes

/// Appends `S|E <job> <msg_id> <pid> <micros>` lines, one write per line (survives SIGKILL).
struct ExecLog {
    file: Mutex<std::fs::File>,
}

impl ExecLog {
    /// The append-only log at `path`.
    fn open(path: &Path) -> Res<Arc<Self>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Arc::new(Self {
            file: Mutex::new(file),
        }))
    }

    fn line(&self, kind: char, job: u64, msg: i64) {
        if let Ok(mut f) = self.file.lock() {
            let _ = writeln!(
                f,
                "{kind} {job} {msg} {} {}",
                std::process::id(),
                now_micros()
            );
        }
    }
}

/// Logs `X` (stopped) if a run's future is dropped before it ends.
struct Stopped {
    log: Arc<ExecLog>,
    job: u64,
    msg: i64,
    done: bool,
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.done {
            self.log.line('X', self.job, self.msg);
        }
    }
}

async fn handle(
    job: FaultJob,
    msg: Data<MessageInfo>,
    log: Data<Arc<ExecLog>>,
) -> Result<(), BoxDynError> {
    log.line('S', job.id, msg.msg_id);
    let mut stopped = Stopped {
        log: (*log).clone(),
        job: job.id,
        msg: msg.msg_id,
        done: false,
    };
    if job.panic {
        stopped.done = true;
        panic!("fault job {} panics on purpose", job.id);
    }
    tokio::time::sleep(Duration::from_millis(job.ms)).await;
    stopped.done = true;
    log.line('E', job.id, msg.msg_id);
    match job.outcome.as_deref() {
        Some("nul_error") => Err("an error text with a \0 NUL byte".into()),
        Some("nul_panic") => panic!("a panic message with a \0 NUL byte"),
        Some("far_retry") => Err(Box::new(RetryAfterError::new(
            "retry in 300 000 years",
            Duration::from_secs(10_000_000_000_000),
        ))),
        _ => Ok(()),
    }
}

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Warnings and errors of the backend go to the process's stderr file, kept with its log.
fn log_to_stderr() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("APALIS_FAULTS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
}

/// A worker or cron process's tokio runtime, its backend warnings logged to stderr.
fn process_runtime() -> Res<tokio::runtime::Runtime> {
    log_to_stderr();
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// A worker or cron process's pool, named `name` in `pg_stat_activity`, connecting lazily (the
/// server may be down when it starts).
fn process_pool(url: &str, name: &str, max_connections: u32) -> Res<PgPool> {
    let opts = PgConnectOptions::from_str(url)?.application_name(name);
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts))
}

/// Resolves when the orchestrator closes our stdin (a graceful stop).
fn stdin_closed() -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = String::new();
        while std::io::stdin()
            .lock()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
        let _ = tx.send(());
    });
    rx
}

/// A cron replica as `examples/cron_once.rs` runs one: an `apalis-cron` schedule firing every
/// second, each tick pushed (after `--lag-ms`) as a job whose id is the tick's timestamp, with
/// the key `tick:<timestamp>` and a one-hour idempotency window, and a worker on the same queue.
fn cron_main(args: &[String]) -> Res<()> {
    let url = arg(args, "--url").ok_or("--url")?.to_owned();
    let queue = QueueName::new(arg(args, "--queue").ok_or("--queue")?)?;
    let name = arg(args, "--name").unwrap_or("fault-cron").to_owned();
    let lag = Duration::from_millis(arg(args, "--lag-ms").unwrap_or("0").parse()?);
    let log_path = PathBuf::from(arg(args, "--log").ok_or("--log")?);
    let rt = process_runtime()?;
    rt.block_on(async move {
        let pool = process_pool(&url, &name, 4)?;
        let config = Config::default()
            .visibility_timeout(Duration::from_secs(2))
            .idempotency_window(Some(Duration::from_secs(3600)));
        let runtime = Runtime::new(&pool);
        let storage = PgmqStorage::<FaultJob>::with_config(&runtime, queue, config)?;
        let log = ExecLog::open(&log_path)?;
        let rx = stdin_closed();
        let scheduler = tokio::spawn(push_ticks(storage.clone(), lag, log.clone()));
        let worker = WorkerBuilder::new(name.clone())
            .backend(storage)
            .data(log)
            .concurrency(4)
            .build(handle);
        worker
            .run_until(async move {
                let _ = rx.await;
                Ok::<(), std::io::Error>(())
            })
            .await?;
        scheduler.abort();
        if let Err(e) = runtime.shutdown().await {
            eprintln!("runtime shutdown: {e}");
        }
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    })
}

/// Every tick of an every-second schedule, pushed with its key and logged (`P`: this push
/// enqueued the tick's job, `K`: its key was taken, another replica's push was first); a push
/// that fails is said on stderr (the tick is then another replica's to enqueue).
async fn push_ticks(storage: PgmqStorage<FaultJob>, lag: Duration, log: Arc<ExecLog>) -> Res<()> {
    use futures::StreamExt;
    let every_second = cron::Schedule::from_str("* * * * * *")?;
    loop {
        // apalis-cron's stream ends with an error for good once a tick is already past when it
        // is polled (a push that took over a second): start a new one, as a replica restarted
        // by its supervisor would.
        let mut ticks =
            Box::pin(apalis_cron::CronScheduler::new(every_second.clone()).into_stream());
        while let Some(tick) = ticks.next().await {
            let at = match tick {
                Ok(t) => t.get_timestamp(),
                Err(e) => {
                    eprintln!("scheduler: {e}; starting it again");
                    break;
                }
            };
            tokio::time::sleep(lag).await;
            let job = FaultJob {
                id: at,
                ms: 50,
                panic: false,
                note: None,
                outcome: None,
            };
            let task = TaskBuilder::new(job)
                .idempotency_key(format!("tick:{at}"))
                .build();
            match storage.push_task_with(storage.pool(), task).await {
                Ok(p) => log.line(if p.is_duplicate() { 'K' } else { 'P' }, at, p.id()),
                Err(e) => eprintln!("tick {at}: push failed: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn worker_main(args: &[String]) -> Res<()> {
    let url = arg(args, "--url").ok_or("--url")?.to_owned();
    let queue = QueueName::new(arg(args, "--queue").ok_or("--queue")?)?;
    let name = arg(args, "--name").unwrap_or("fault-worker").to_owned();
    let concurrency: usize = arg(args, "--concurrency").unwrap_or("10").parse()?;
    let vt_ms: u64 = arg(args, "--vt-ms").unwrap_or("10000").parse()?;
    let attempts: u32 = arg(args, "--max-attempts").unwrap_or("5").parse()?;
    let log_path = PathBuf::from(arg(args, "--log").ok_or("--log")?);
    let rt = process_runtime()?;
    rt.block_on(async move {
        let pool = process_pool(&url, &name, 8)?;
        let config = Config::default()
            .visibility_timeout(Duration::from_millis(vt_ms))
            .max_attempts(attempts)
            .backoff(
                Backoff::default()
                    .base(Duration::from_millis(100))
                    .jitter(0.0),
            );
        let runtime = Runtime::new(&pool);
        let storage = PgmqStorage::<FaultJob>::with_config(&runtime, queue, config)?;
        let log = ExecLog::open(&log_path)?;
        let rx = stdin_closed();
        let worker = WorkerBuilder::new(name.clone())
            .backend(storage)
            .data(log)
            .concurrency(concurrency)
            .build(handle);
        worker
            .run_until(async move {
                let _ = rx.await;
                Ok::<(), std::io::Error>(())
            })
            .await?;
        // The runtime's rows cannot always be deleted (a frozen network): they expire.
        if let Err(e) = runtime.shutdown().await {
            eprintln!("runtime shutdown: {e}");
        }
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    })
}

// ------------------------------------------------------------------ orchestration

#[derive(Clone)]
struct PgControl {
    bindir: String,
    datadir: String,
    user: String,
}

impl PgControl {
    fn from_env() -> Option<Self> {
        Some(Self {
            bindir: std::env::var("APALIS_PG_BINDIR").ok()?,
            datadir: std::env::var("APALIS_PG_DATADIR").ok()?,
            user: std::env::var("APALIS_PG_USER").ok()?,
        })
    }

    /// `pg_ctl restart -m <mode>`, reusing the options the server was started with.
    fn restart(&self, mode: &str) -> Res<()> {
        let pg_ctl = format!("{}/pg_ctl", self.bindir);
        let args = ["-D", &self.datadir, "-m", mode, "-w", "-t", "60", "restart"];
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let status = if is_root {
            Command::new("runuser")
                .args(["-u", &self.user, "--", &pg_ctl])
                .args(args)
                .stdout(Stdio::null())
                .status()?
        } else {
            Command::new(&pg_ctl)
                .args(args)
                .stdout(Stdio::null())
                .status()?
        };
        if !status.success() {
            return Err(format!("pg_ctl restart -m {mode} failed: {status}").into());
        }
        Ok(())
    }
}

/// PgBouncer in front of the server (scripts/with-pgbouncer.sh): the campaign adds its
/// database, routes some worker slots through it, and restarts it.
#[derive(Clone)]
struct Bouncer {
    ini: String,
    pidfile: String,
    user: String,
    port: u16,
    admin_url: String,
    databases_ini: String,
    server: String,
}

impl Bouncer {
    fn from_env() -> Option<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Some(Self {
            ini: var("APALIS_PGBOUNCER_INI")?,
            pidfile: var("APALIS_PGBOUNCER_PIDFILE")?,
            user: var("APALIS_PGBOUNCER_USER")?,
            port: var("APALIS_PGBOUNCER_PORT")?.parse().ok()?,
            admin_url: var("APALIS_PGBOUNCER_ADMIN_URL")?,
            databases_ini: var("APALIS_PGBOUNCER_DATABASES_INI")?,
            server: var("APALIS_PGBOUNCER_SERVER")?,
        })
    }

    /// Runs `program args` as PgBouncer's user (it refuses root, and its files are that
    /// user's).
    fn run_as(&self, program: &str, args: &[&str]) -> Res<std::process::ExitStatus> {
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let mut cmd = if is_root {
            let mut c = Command::new("runuser");
            c.args(["-u", &self.user, "--", program]);
            c
        } else {
            Command::new(program)
        };
        Ok(cmd
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?)
    }

    /// Adds `alias`, a session pool of `pool_size` on database `dbname`, and reloads.
    fn add_database(&self, alias: &str, dbname: &str, pool_size: u32) -> Res<()> {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.databases_ini)?;
        writeln!(
            file,
            "{alias} = {} dbname={dbname} pool_mode=session pool_size={pool_size}",
            self.server
        )?;
        let status = Command::new("psql")
            .args([&self.admin_url, "-X", "-q", "-c", "RELOAD"])
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            return Err(format!("PgBouncer RELOAD failed: {status}").into());
        }
        Ok(())
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops PgBouncer at once (SIGTERM: every client and server connection dropped; SIGKILL
    /// if it is still there after 5 s, as a PgBouncer of 1.23 or later, whose SIGTERM waits
    /// for its clients, would be), waits for the process to be gone, starts it again with the
    /// same configuration, and waits until its admin console answers.
    fn restart(&self) -> Res<()> {
        /// Alive: its `/proc` entry exists and is not a zombie (a daemon's parent may be a PID
        /// 1 that never reaps).
        fn alive(pid: i32) -> bool {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| !rest.starts_with('Z'))
            })
        }
        fn gone_within(pid: i32, limit: Duration) -> bool {
            let deadline = Instant::now() + limit;
            while alive(pid) {
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            true
        }
        if let Some(pid) = self.pid() {
            let pid_s = pid.to_string();
            self.run_as("kill", &["-TERM", &pid_s])?;
            if !gone_within(pid, Duration::from_secs(5)) {
                self.run_as("kill", &["-KILL", &pid_s])?;
                if !gone_within(pid, Duration::from_secs(5)) {
                    return Err(format!("PgBouncer (pid {pid}) survived SIGKILL").into());
                }
                // A killed PgBouncer leaves its pidfile, which would stop the new one.
                let _ = std::fs::remove_file(&self.pidfile);
            }
        }
        let status = self.run_as("pgbouncer", &["-d", &self.ini])?;
        if !status.success() {
            return Err(format!("pgbouncer -d failed: {status}").into());
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let answered = Command::new("psql")
                .args([&self.admin_url, "-X", "-q", "-c", "SHOW VERSION"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if answered {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("PgBouncer did not answer on its admin console within 15 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

struct Ctx {
    admin: PgConnectOptions,
    exe: PathBuf,
    dir: PathBuf,
    pg: Option<PgControl>,
    quick: bool,
}

struct Db {
    url: String,
    pool: PgPool,
    /// The orchestrator's runtime on this database.
    runtime: Runtime,
    queue: PgmqQueue,
}

impl Ctx {
    async fn fresh(&self, scenario: &str) -> Res<Db> {
        let name = format!("faults_{scenario}");
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(self.admin.clone())
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&admin)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&admin)
            .await?;
        // Durable commits, whatever the server default: a crash must not lose what was
        // acknowledged (the throwaway test cluster runs with synchronous_commit off).
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE \"{name}\" SET synchronous_commit = on"
        )))
        .execute(&admin)
        .await?;
        admin.close().await;
        let opts = self.admin.clone().database(&name);
        // In the clear: the proxy of scenarios 8 and 12 reads the protocol.
        let url = format!(
            "postgres://{}@{}:{}/{}?sslmode=disable",
            opts.get_username(),
            opts.get_host(),
            opts.get_port(),
            name
        );
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts)
            .await?;
        setup(&pool).await?;
        let queue = PgmqQueue::new(QueueName::new("faults")?);
        let runtime = Runtime::new(&pool);
        PgmqStorage::<FaultJob>::new(&runtime, queue.name().clone())
            .create_queue()
            .await?;
        Ok(Db {
            url,
            pool,
            runtime,
            queue,
        })
    }

    /// A proxy to the server, and `db` as worker processes reach it through the proxy (the
    /// orchestrator's own pool stays direct).
    /// A proxy in front of PgBouncer's port, and the URL of `alias` through it.
    async fn through_bouncer(
        &self,
        db: &Db,
        dbname: &str,
        port: u16,
        alias: &str,
    ) -> Res<(proxy::Proxy, String)> {
        let target = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let proxy = proxy::Proxy::start(target).await;
        let url = db
            .url
            .replace(
                &format!("{}:{}", self.admin.get_host(), self.admin.get_port()),
                &format!("127.0.0.1:{}", proxy.port),
            )
            .replace(&format!("/{dbname}"), &format!("/{alias}"));
        Ok((proxy, url))
    }

    async fn through_proxy(&self, db: &Db) -> Res<(proxy::Proxy, Db)> {
        let target = tokio::net::lookup_host((self.admin.get_host(), self.admin.get_port()))
            .await?
            .next()
            .ok_or("no server address")?;
        let proxy = proxy::Proxy::start(target).await;
        let proxied = Db {
            url: db.url.replace(
                &format!("{}:{}", self.admin.get_host(), self.admin.get_port()),
                &format!("127.0.0.1:{}", proxy.port),
            ),
            pool: db.pool.clone(),
            runtime: db.runtime.clone(),
            queue: db.queue.clone(),
        };
        Ok((proxy, proxied))
    }

    fn spawn_worker(
        &self,
        db: &Db,
        scenario: &str,
        name: &str,
        concurrency: usize,
        vt_ms: u64,
        attempts: u32,
    ) -> Res<Child> {
        let log = self.dir.join(format!("{scenario}-{name}.log"));
        let err = std::fs::File::create(self.dir.join(format!("{scenario}-{name}.stderr")))?;
        Ok(Command::new(&self.exe)
            .args([
                "worker",
                "--url",
                &db.url,
                "--queue",
                db.queue.name().as_str(),
                "--name",
                &format!("fault-{scenario}-{name}"),
                "--concurrency",
                &concurrency.to_string(),
                "--vt-ms",
                &vt_ms.to_string(),
                "--max-attempts",
                &attempts.to_string(),
                "--log",
                log.to_str().ok_or("log path")?,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()?)
    }

    /// A cron replica process (see `cron_main`).
    fn spawn_cron(&self, db: &Db, scenario: &str, name: &str, lag_ms: u64) -> Res<Child> {
        let log = self.dir.join(format!("{scenario}-{name}.log"));
        let err = std::fs::File::create(self.dir.join(format!("{scenario}-{name}.stderr")))?;
        Ok(Command::new(&self.exe)
            .args([
                "cron",
                "--url",
                &db.url,
                "--queue",
                db.queue.name().as_str(),
                "--name",
                &format!("fault-{scenario}-{name}"),
                "--lag-ms",
                &lag_ms.to_string(),
                "--log",
                log.to_str().ok_or("log path")?,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()?)
    }
}

/// Closes stdin (graceful stop) and waits; kills after 30 s.
fn stop_worker(mut child: Child) -> bool {
    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

#[derive(Debug, Clone)]
struct Exec {
    kind: char,
    job: u64,
    msg: i64,
    pid: u32,
    at: u64,
}

fn read_logs(dir: &Path, scenario: &str) -> Vec<Exec> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !(name.starts_with(&format!("{scenario}-")) && name.ends_with(".log")) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() != 5 {
                continue;
            }
            if let (Some(kind), Ok(job), Ok(msg), Ok(pid), Ok(at)) = (
                f[0].chars().next(),
                f[1].parse(),
                f[2].parse(),
                f[3].parse(),
                f[4].parse(),
            ) {
                out.push(Exec {
                    kind,
                    job,
                    msg,
                    pid,
                    at,
                });
            }
        }
    }
    out
}

/// One execution of a message: (pid, start, end if it finished).
type Run = (u32, u64, Option<u64>);

fn runs_by_msg(execs: &[Exec]) -> BTreeMap<i64, Vec<Run>> {
    let mut by: BTreeMap<i64, Vec<Run>> = BTreeMap::new();
    for e in execs.iter().filter(|e| e.kind == 'S') {
        by.entry(e.msg).or_default().push((e.pid, e.at, None));
    }
    for e in execs.iter().filter(|e| e.kind == 'E' || e.kind == 'X') {
        if let Some(runs) = by.get_mut(&e.msg)
            && let Some(r) = runs
                .iter_mut()
                .filter(|r| r.0 == e.pid && r.1 <= e.at && r.2.is_none())
                .max_by_key(|r| r.1)
        {
            r.2 = Some(e.at);
        }
    }
    by
}

#[derive(Debug, Default, Clone, Serialize)]
struct Row {
    scenario: String,
    jobs_in: usize,
    completed: usize,
    dead_lettered: usize,
    duplicates: usize,
    explained: usize,
    overlaps: usize,
    lost: usize,
    recovery: String,
    notes: String,
    ok: bool,
}

struct Outcome {
    completed: BTreeSet<u64>,
    dead: BTreeMap<u64, Value>,
    remaining: i64,
}

async fn outcome(db: &Db) -> Res<Outcome> {
    let completed: Vec<i64> = sqlx::query_scalar(
        "SELECT DISTINCT (message->>'id')::bigint FROM pgmq.a_faults WHERE message ? 'id' \
         AND jsonb_typeof(message->'id') = 'number'",
    )
    .fetch_all(&db.pool)
    .await?;
    // Only the id is read back: a dead letter may be jsonb too deep for serde_json.
    let dead: Vec<(Option<i64>, Value)> = sqlx::query_as(
        "SELECT CASE WHEN jsonb_typeof(message) = 'object' \
                      AND jsonb_typeof(message->'id') = 'number' \
                     THEN (message->>'id')::numeric::bigint END, \
                headers->'apalis_dead_letter' \
         FROM pgmq.q_faults_dlq",
    )
    .fetch_all(&db.pool)
    .await?;
    let remaining: i64 = sqlx::query_scalar("SELECT count(*) FROM pgmq.q_faults")
        .fetch_one(&db.pool)
        .await?;
    Ok(Outcome {
        completed: completed
            .into_iter()
            .filter_map(|i| u64::try_from(i).ok())
            .collect(),
        dead: dead
            .into_iter()
            .filter_map(|(id, info)| id.and_then(|i| u64::try_from(i).ok()).map(|id| (id, info)))
            .collect(),
        remaining,
    })
}

/// Polls (tolerating a database that is down) until every sent job is completed or dead.
async fn wait_drained(db: &Db, sent: &BTreeSet<u64>, expect_dead: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(o) = outcome(db).await
            && o.remaining == 0
            && sent
                .iter()
                .all(|id| o.completed.contains(id) || o.dead.contains_key(id))
            && o.dead.len() >= expect_dead
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Counts duplicates and overlaps; `killed` lists (pid, kill time) of crashed workers whose
/// interrupted or unacknowledged runs explain a second delivery.
fn analyse(execs: &[Exec], killed: &[(u32, u64)], row: &mut Row) {
    for runs in runs_by_msg(execs).values() {
        if runs.len() < 2 {
            continue;
        }
        row.duplicates += 1;
        let mut sorted = runs.clone();
        sorted.sort_by_key(|r| r.1);
        let explained = sorted[..sorted.len() - 1].iter().all(|r| {
            killed.iter().any(|(pid, at)| {
                // Interrupted by the kill, or finished just before it with the outcome not yet
                // written (outcomes are flushed every few ms).
                r.0 == *pid && r.2.is_none_or(|end| end + 1_000_000 >= *at)
            })
        });
        if explained {
            row.explained += 1;
        }
        for w in sorted.windows(2) {
            let first_end = w[0].2.or_else(|| {
                killed
                    .iter()
                    .find(|(pid, _)| *pid == w[0].0)
                    .map(|(_, at)| *at)
            });
            if first_end.is_none_or(|end| end > w[1].1) {
                row.overlaps += 1;
            }
        }
    }
}

fn finish(mut row: Row, sent: &BTreeSet<u64>, o: &Outcome, expect_dead: &BTreeSet<u64>) -> Row {
    row.jobs_in = sent.len() + expect_dead.len();
    row.completed = sent.iter().filter(|id| o.completed.contains(id)).count();
    row.dead_lettered = o.dead.len();
    let dead_ok = expect_dead.iter().all(|id| o.dead.contains_key(id));
    row.lost = sent
        .iter()
        .filter(|id| !o.completed.contains(id) && !o.dead.contains_key(id))
        .count()
        + expect_dead
            .iter()
            .filter(|id| !o.dead.contains_key(id))
            .count();
    row.ok = row.lost == 0
        && row.overlaps == 0
        && row.duplicates == row.explained
        && dead_ok
        && o.remaining == 0
        && row.ok;
    row
}

fn jobs(range: std::ops::Range<u64>, ms: impl Fn(u64) -> u64) -> Vec<FaultJob> {
    range
        .map(|id| FaultJob {
            id,
            ms: ms(id),
            panic: false,
            note: None,
            outcome: None,
        })
        .collect()
}

// ------------------------------------------------------------------ scenarios

/// 1. A worker process SIGKILLed mid-batch.
async fn sigkill(ctx: &Ctx) -> Res<Row> {
    let db = ctx.fresh("sigkill").await?;
    let n = if ctx.quick { 600 } else { 2000 };
    let s = PgmqStorage::<FaultJob>::new(&db.runtime, db.queue.name().clone());
    s.push_bulk_with(&db.pool, jobs(0..n, |_| 50)).await?;
    let sent: BTreeSet<u64> = (0..n).collect();
    let vt_ms = 3000;
    let victim = ctx.spawn_worker(&db, "sigkill", "victim", 10, vt_ms, 5)?;
    let survivor = ctx.spawn_worker(&db, "sigkill", "survivor", 10, vt_ms, 5)?;
    // Kill once a fifth of the work is done.
    let deadline = Instant::now() + Duration::from_secs(60);
    while outcome(&db).await?.completed.len() < (n / 5) as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let victim_pid = victim.id();
    let mut victim = victim;
    victim.kill()?;
    let killed_at = now_micros();
    victim.wait()?;
    let t_kill = Instant::now();
    wait_drained(&db, &sent, 0, Duration::from_secs(90)).await;
    let drained = t_kill.elapsed();
    let survived = stop_worker(survivor);
    let execs = read_logs(&ctx.dir, "sigkill");
    let mut row = Row {
        scenario: "1. worker SIGKILLed mid-batch".into(),
        ok: survived,
        ..Row::default()
    };
    analyse(&execs, &[(victim_pid, killed_at)], &mut row);
    // Recovery: when the last of the victim's unfinished jobs was completed elsewhere.
    let runs = runs_by_msg(&execs);
    let interrupted: Vec<i64> = runs
        .iter()
        .filter(|(_, r)| r.iter().any(|x| x.0 == victim_pid && x.2.is_none()))
        .map(|(m, _)| *m)
        .collect();
    let redone_at = interrupted
        .iter()
        .filter_map(|m| runs.get(m)?.iter().filter_map(|r| r.2).max())
        .max()
        .unwrap_or(killed_at);
    row.recovery = format!(
        "held jobs redone {:.1} s after the kill (lease {:.0} s); queue drained in {:.1} s",
        redone_at.saturating_sub(killed_at) as f64 / 1e6,
        vt_ms as f64 / 1000.0,
        drained.as_secs_f64()
    );
    row.notes = format!("{} jobs were interrupted by the kill", interrupted.len());
    let o = outcome(&db).await?;
    Ok(finish(row, &sent, &o, &BTreeSet::new()))
}

/// Pushes single jobs at `rate`/s for `secs`, retrying each until it is accepted.
async fn produce(
    pool: PgPool,
    queue: QueueName,
    first: u64,
    rate: u64,
    secs: u64,
) -> BTreeSet<u64> {
    let s = PgmqStorage::<FaultJob>::new(&Runtime::new(&pool), queue);
    let mut sent = BTreeSet::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    for id in first..first + rate * secs {
        tick.tick().await;
        let job = FaultJob {
            id,
            ms: 10,
            panic: false,
            note: None,
            outcome: None,
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            match s.push_with(&pool, &job).await {
                Ok(_) => break,
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        sent.insert(id);
    }
    sent
}

/// 2. PostgreSQL restarted while producers and workers run.
async fn pg_restart(ctx: &Ctx, mode: &str) -> Res<Row> {
    let scenario = format!("restart_{mode}");
    let label = format!("2. PostgreSQL restarted (-m {mode}) under load");
    let Some(pg) = &ctx.pg else {
        return Ok(Row {
            scenario: label,
            notes: "skipped: the server was not started by scripts/with-pg.sh".into(),
            ok: true,
            recovery: "–".into(),
            ..Row::default()
        });
    };
    let db = ctx.fresh(&scenario).await?;
    let w1 = ctx.spawn_worker(&db, &scenario, "w1", 10, 10_000, 5)?;
    let w2 = ctx.spawn_worker(&db, &scenario, "w2", 10, 10_000, 5)?;
    let secs = if ctx.quick { 6 } else { 10 };
    let producer = tokio::spawn(produce(
        db.pool.clone(),
        db.queue.name().clone(),
        0,
        100,
        secs,
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids = [w1.id(), w2.id()];
    let cpu_before: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
    let t_down = Instant::now();
    pg.restart(mode)?;
    let outage = t_down.elapsed();
    let cpu_during: f64 = pids.iter().map(|p| cpu_secs(*p)).sum::<f64>() - cpu_before;
    let up_at = now_micros();
    let sent = producer.await?;
    let mut w1 = w1;
    let mut w2 = w2;
    let alive = w1.try_wait()?.is_none() && w2.try_wait()?.is_none();
    wait_drained(&db, &sent, 0, Duration::from_secs(90)).await;
    let stopped = stop_worker(w1) & stop_worker(w2);
    let execs = read_logs(&ctx.dir, &scenario);
    let first_after = execs
        .iter()
        .filter(|e| e.kind == 'E' && e.at > up_at)
        .map(|e| e.at)
        .min()
        .unwrap_or(up_at);
    let mut row = Row {
        scenario: label,
        ok: alive && stopped,
        ..Row::default()
    };
    analyse(&execs, &[], &mut row);
    row.recovery = format!(
        "server down {:.1} s; first job done {:.2} s after it was back",
        outage.as_secs_f64(),
        first_after.saturating_sub(up_at) as f64 / 1e6
    );
    row.notes = format!(
        "both worker processes alive; their CPU during the outage: {:.0} ms in {:.1} s",
        cpu_during * 1000.0,
        outage.as_secs_f64()
    );
    if !alive {
        row.notes = "a worker process exited during the restart".into();
    }
    let o = outcome(&db).await?;
    Ok(finish(row, &sent, &o, &BTreeSet::new()))
}

/// 3. `pg_terminate_backend` on the listener and on every pool connection, three times.
async fn terminate(ctx: &Ctx) -> Res<Row> {
    let db = ctx.fresh("terminate").await?;
    let w1 = ctx.spawn_worker(&db, "terminate", "w1", 10, 10_000, 5)?;
    let w2 = ctx.spawn_worker(&db, "terminate", "w2", 10, 10_000, 5)?;
    let secs = if ctx.quick { 5 } else { 8 };
    let producer = tokio::spawn(produce(
        db.pool.clone(),
        db.queue.name().clone(),
        0,
        100,
        secs,
    ));
    let mut killed_total = 0i64;
    let mut kill_times = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(secs * 1000 / 4)).await;
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name LIKE 'fault-terminate-%'",
        )
        .fetch_one(&db.pool)
        .await?;
        killed_total += n;
        kill_times.push(now_micros());
    }
    let sent = producer.await?;
    wait_drained(&db, &sent, 0, Duration::from_secs(90)).await;
    let mut w1 = w1;
    let mut w2 = w2;
    let alive = w1.try_wait()?.is_none() && w2.try_wait()?.is_none();
    let stopped = stop_worker(w1) & stop_worker(w2);
    let execs = read_logs(&ctx.dir, "terminate");
    let worst = kill_times
        .iter()
        .map(|k| {
            execs
                .iter()
                .filter(|e| e.kind == 'E' && e.at > *k)
                .map(|e| e.at - k)
                .min()
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    let mut row = Row {
        scenario: "3. pg_terminate_backend on listener + pool connections (x3)".into(),
        ok: alive && stopped,
        ..Row::default()
    };
    analyse(&execs, &[], &mut row);
    row.recovery = format!(
        "next job done at most {:.2} s after a termination",
        worst as f64 / 1e6
    );
    row.notes = format!("{killed_total} backends terminated; worker processes alive: {alive}");
    let o = outcome(&db).await?;
    Ok(finish(row, &sent, &o, &BTreeSet::new()))
}

/// 4. Poison messages sent with raw SQL between valid jobs.
async fn poison(ctx: &Ctx) -> Res<Row> {
    let db = ctx.fresh("poison").await?;
    let w = ctx.spawn_worker(&db, "poison", "w1", 10, 10_000, 5)?;
    let mut sent = BTreeSet::new();
    let big = "x".repeat(2 * 1024 * 1024);
    let deep = format!("{}1{}", "[".repeat(2000), "]".repeat(2000));
    let poisons: Vec<(String, String)> = vec![
        (
            "wrong type".into(),
            json!({"id": "seven", "ms": 1}).to_string(),
        ),
        ("wrong shape".into(), json!([1, 2, 3]).to_string()),
        ("missing field".into(), json!({"ms": 5}).to_string()),
        (
            "very large (2 MiB)".into(),
            json!({"id": big, "ms": 1}).to_string(),
        ),
        ("deeply nested".into(), deep),
        (
            "odd Unicode".into(),
            json!({"id": "\u{202e}💥\u{200b}e\u{301}", "ms": 1}).to_string(),
        ),
        ("negative id".into(), json!({"id": -1, "ms": 1}).to_string()),
        ("JSON null".into(), "null".into()),
    ];
    let mut expect_dead = Vec::new();
    let mut next = 0u64;
    for (i, (what, body)) in poisons.iter().enumerate() {
        for _ in 0..5 {
            let job = json!({"id": next, "ms": 5, "note": format!("valid, with odd text: ℌ𝔢𝔩𝔩𝔬 \u{202e}ǝʇɐʌ {i}")});
            sqlx::query("SELECT pgmq.send('faults', $1::jsonb)")
                .bind(job.to_string())
                .execute(&db.pool)
                .await?;
            sent.insert(next);
            next += 1;
        }
        sqlx::query("SELECT pgmq.send('faults', $1::jsonb)")
            .bind(body)
            .execute(&db.pool)
            .await
            .map_err(|e| format!("sending poison {what}: {e}"))?;
        expect_dead.push(what.clone());
    }
    // And a message with SQL NULL as its body.
    sqlx::query("INSERT INTO pgmq.q_faults (vt, message) VALUES (clock_timestamp(), NULL)")
        .execute(&db.pool)
        .await?;
    expect_dead.push("SQL NULL".into());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = outcome(&db).await?;
        let dlq: i64 = sqlx::query_scalar("SELECT count(*) FROM pgmq.q_faults_dlq")
            .fetch_one(&db.pool)
            .await?;
        if (o.remaining == 0 && dlq as usize >= expect_dead.len()) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut w = w;
    let alive = w.try_wait()?.is_none();
    let stopped = stop_worker(w);
    let reasons: Vec<(String, String)> = sqlx::query_as(
        "SELECT headers->'apalis_dead_letter'->>'reason', headers->'apalis_dead_letter'->>'error' \
         FROM pgmq.q_faults_dlq ORDER BY msg_id",
    )
    .fetch_all(&db.pool)
    .await?;
    let readable = reasons
        .iter()
        .all(|(r, e)| r == "undecodable" && !e.trim().is_empty() && e.len() < 5000);
    let o = outcome(&db).await?;
    let mut row = Row {
        scenario: "4. poison messages via raw SQL".into(),
        ok: alive && stopped && readable && reasons.len() == expect_dead.len(),
        ..Row::default()
    };
    analyse(&read_logs(&ctx.dir, "poison"), &[], &mut row);
    row.jobs_in = sent.len() + expect_dead.len();
    row.completed = sent.iter().filter(|id| o.completed.contains(id)).count();
    row.dead_lettered = reasons.len();
    row.lost = sent.len() - row.completed + expect_dead.len().saturating_sub(reasons.len());
    row.ok = row.ok && row.lost == 0 && o.remaining == 0 && row.duplicates == 0;
    row.recovery = "–".into();
    let sample: Vec<String> = reasons
        .iter()
        .take(3)
        .map(|(_, e)| e.chars().take(60).collect())
        .collect();
    row.notes = format!(
        "{} kinds ({}); all dead-lettered as undecodable with the decoder's message, e.g. {:?}",
        expect_dead.len(),
        expect_dead.join(", "),
        sample
    );
    Ok(row)
}

/// 5. Hostile queue names: a clear error, no SQL, nothing created.
async fn hostile(ctx: &Ctx) -> Res<Row> {
    let db = ctx.fresh("hostile").await?;
    let tables = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'pgmq'::regnamespace",
        )
        .fetch_one(&db.pool)
        .await
    };
    let before = tables().await?;
    let names = [
        String::new(),
        "q'; DROP TABLE pgmq.meta; --".into(),
        "a;b".into(),
        "\"x\"".into(),
        "a b".into(),
        "Queue".into(),
        "naïve".into(),
        "队列".into(),
        "1st".into(),
        "x".repeat(44),
        "x".repeat(64),
        "ok\0nul".into(),
    ];
    let mut refused = 0;
    for n in &names {
        match QueueName::new(n) {
            Err(e) if e.to_string().starts_with("invalid queue name") => refused += 1,
            _ => {}
        }
    }
    // The SQL entry points validate on their own too.
    let sql_refused = sqlx::query("SELECT apalis_pgmq.enable_notify($1, 'c')")
        .bind("x'; drop table pgmq.meta; --")
        .execute(&db.pool)
        .await
        .is_err();
    let after = tables().await?;
    let meta: i64 = sqlx::query_scalar("SELECT count(*) FROM pgmq.meta")
        .fetch_one(&db.pool)
        .await?;
    Ok(Row {
        scenario: "5. hostile queue names".into(),
        jobs_in: 0,
        recovery: "–".into(),
        notes: format!(
            "{refused}/{} names refused before any SQL; SQL function refused its own: {sql_refused}; \
             tables before/after {before}/{after}; queues in pgmq.meta: {meta} (the suite's own)",
            names.len()
        ),
        ok: refused == names.len() && sql_refused && before == after && meta == 2,
        ..Row::default()
    })
}

/// 6. A handler that panics.
async fn panics(ctx: &Ctx) -> Res<Row> {
    let db = ctx.fresh("panics").await?;
    let s = PgmqStorage::<FaultJob>::new(&db.runtime, db.queue.name().clone());
    let mut all = jobs(0..50, |_| 5);
    for j in all.iter_mut().filter(|j| j.id % 10 == 3) {
        j.panic = true;
    }
    let expect_dead: BTreeSet<u64> = all.iter().filter(|j| j.panic).map(|j| j.id).collect();
    let sent: BTreeSet<u64> = all.iter().filter(|j| !j.panic).map(|j| j.id).collect();
    s.push_bulk_with(&db.pool, all).await?;
    let w = ctx.spawn_worker(&db, "panics", "w1", 10, 10_000, 3)?;
    wait_drained(&db, &sent, expect_dead.len(), Duration::from_secs(60)).await;
    let mut w = w;
    let alive = w.try_wait()?.is_none();
    let stopped = stop_worker(w);
    let o = outcome(&db).await?;
    let panicked = o.dead.values().all(|info| {
        info["reason"] == "failed"
            && info["attempts"] == 3
            && info["error"]
                .as_str()
                .unwrap_or("")
                .contains("panics on purpose")
    });
    let execs = read_logs(&ctx.dir, "panics");
    let mut row = Row {
        scenario: "6. handler panics".into(),
        ok: alive && stopped && panicked,
        ..Row::default()
    };
    // A panicking job runs once per attempt by design: not a duplicate delivery.
    let retried: Vec<Exec> = execs
        .iter()
        .filter(|e| !expect_dead.contains(&e.job))
        .cloned()
        .collect();
    analyse(&retried, &[], &mut row);
    row.recovery = "–".into();
    row.notes = format!(
        "{} panicking jobs: 3 attempts each, then dead-lettered with the panic message; the worker process kept running",
        expect_dead.len()
    );
    Ok(finish(row, &sent, &o, &expect_dead))
}

/// 7. Four worker processes × concurrency 50, jobs lasting around the visibility timeout.
async fn overlap(ctx: &Ctx) -> Res<Row> {
    let db = ctx.fresh("overlap").await?;
    let s = PgmqStorage::<FaultJob>::new(&db.runtime, db.queue.name().clone());
    let n = if ctx.quick { 300 } else { 600 };
    let vt_ms = 2000;
    // Durations spread over 1..3 s: a third finish within the lease, a third run past it.
    s.push_bulk_with(&db.pool, jobs(0..n, |id| 1000 + (id * 7919) % 2000))
        .await?;
    let sent: BTreeSet<u64> = (0..n).collect();
    let workers: Vec<Child> = (0..4)
        .map(|i| ctx.spawn_worker(&db, "overlap", &format!("w{i}"), 50, vt_ms, 5))
        .collect::<Res<_>>()?;
    wait_drained(&db, &sent, 0, Duration::from_secs(120)).await;
    let stopped = workers.into_iter().fold(true, |ok, w| stop_worker(w) & ok);
    let execs = read_logs(&ctx.dir, "overlap");
    let over_vt = runs_by_msg(&execs)
        .values()
        .flatten()
        .filter(|r| r.2.is_some_and(|e| e - r.1 > vt_ms * 1000))
        .count();
    let mut row = Row {
        scenario: "7. 4 processes x concurrency 50, durations around the lease".into(),
        ok: stopped,
        ..Row::default()
    };
    analyse(&execs, &[], &mut row);
    row.recovery = "–".into();
    row.notes = format!(
        "lease {:.0} s; {over_vt} jobs ran longer than it, none was handed to a second worker",
        vt_ms as f64 / 1000.0
    );
    let o = outcome(&db).await?;
    Ok(finish(row, &sent, &o, &BTreeSet::new()))
}

/// Pushes `ids` one at a time at `rate` per second; returns (id, push time in micros).
async fn push_paced(
    pool: &PgPool,
    queue: &QueueName,
    ids: std::ops::Range<u64>,
    rate: u64,
) -> Res<Vec<(u64, u64)>> {
    let s = PgmqStorage::<FaultJob>::new(&Runtime::new(pool), queue.clone());
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    let mut out = Vec::new();
    for id in ids {
        tick.tick().await;
        let at = now_micros();
        s.push_with(
            pool,
            &FaultJob {
                id,
                ms: 1,
                panic: false,
                note: None,
                outcome: None,
            },
        )
        .await?;
        out.push((id, at));
    }
    Ok(out)
}

/// Pickup latencies (first start minus push), in seconds, sorted.
fn pickups(execs: &[Exec], pushed: &[(u64, u64)]) -> Vec<f64> {
    let mut lat: Vec<f64> = pushed
        .iter()
        .filter_map(|(id, at)| {
            execs
                .iter()
                .filter(|e| e.kind == 'S' && e.job == *id)
                .map(|e| e.at)
                .min()
                .map(|s| s.saturating_sub(*at) as f64 / 1e6)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    lat
}

/// 8. The LISTEN connection goes half-open (a proxy stops forwarding it; no reset).
async fn silent_listener(ctx: &Ctx) -> Res<Row> {
    let db = ctx.fresh("silent").await?;
    let (proxy, proxied) = ctx.through_proxy(&db).await?;
    let w = ctx.spawn_worker(&proxied, "silent", "w1", 10, 10_000, 5)?;
    // Wait until the worker listens (its wake-up row is armed), then cut it off silently.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let armed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM apalis_pgmq.listeners WHERE armed")
                .fetch_one(&db.pool)
                .await?;
        if armed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let silenced = proxy.silence_listeners();
    let silenced_at = now_micros();
    let pushed = push_paced(&db.pool, db.queue.name(), 0..80, 4).await?;
    let sent: BTreeSet<u64> = pushed.iter().map(|(id, _)| *id).collect();
    wait_drained(&db, &sent, 0, Duration::from_secs(60)).await;
    let stopped = stop_worker(w);
    let execs = read_logs(&ctx.dir, "silent");
    let lat = pickups(&execs, &pushed);
    let first_after = execs
        .iter()
        .filter(|e| e.kind == 'S')
        .map(|e| e.at)
        .min()
        .unwrap_or(silenced_at);
    let max = lat.last().copied().unwrap_or(f64::NAN);
    let mut row = Row {
        scenario: "8. LISTEN connection silently dead (half-open TCP through a proxy)".into(),
        // Default health check 10 s, fallback poll 30 s: the health check must be what recovered.
        ok: stopped && silenced == 1 && max < 15.0,
        ..Row::default()
    };
    analyse(&execs, &[], &mut row);
    row.recovery = format!(
        "first job picked up {:.1} s after the cut; worst pickup {:.1} s (fallback poll 30 s)",
        first_after.saturating_sub(silenced_at) as f64 / 1e6,
        max
    );
    let after: Vec<(u64, u64)> = pushed
        .iter()
        .filter(|(_, at)| *at > first_after)
        .copied()
        .collect();
    let lat_after = pickups(&execs, &after);
    row.notes = format!(
        "{silenced} listening connection cut; pickup p50 of the {} jobs pushed after recovery {:.1} ms",
        after.len(),
        lat_after
            .get(lat_after.len() / 2)
            .copied()
            .unwrap_or(f64::NAN)
            * 1e3
    );
    let o = outcome(&db).await?;
    drop(proxy);
    Ok(finish(row, &sent, &o, &BTreeSet::new()))
}

/// 9. A producer transaction stays open (20 s) on the queue while others push at 50/s.
async fn open_producer(ctx: &Ctx) -> Res<Row> {
    let db = ctx.fresh("open_producer").await?;
    let w1 = ctx.spawn_worker(&db, "open_producer", "w1", 10, 10_000, 5)?;
    let w2 = ctx.spawn_worker(&db, "open_producer", "w2", 10, 10_000, 5)?;
    let s = PgmqStorage::<FaultJob>::new(&db.runtime, db.queue.name().clone());
    let mut open = db.pool.begin().await?;
    let held = 1_000_000u64;
    s.push_with(
        &mut *open,
        &FaultJob {
            id: held,
            ms: 1,
            panic: false,
            note: None,
            outcome: None,
        },
    )
    .await?;
    let secs = if ctx.quick { 8 } else { 20 };
    let mut latencies = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut sent = BTreeSet::new();
    let mut pushed = Vec::new();
    for id in 0..secs * 50 {
        tick.tick().await;
        let t = Instant::now();
        let at = now_micros();
        s.push_with(
            &db.pool,
            &FaultJob {
                id,
                ms: 1,
                panic: false,
                note: None,
                outcome: None,
            },
        )
        .await?;
        latencies.push(t.elapsed().as_secs_f64());
        sent.insert(id);
        pushed.push((id, at));
    }
    open.commit().await?;
    sent.insert(held);
    wait_drained(&db, &sent, 0, Duration::from_secs(60)).await;
    let stopped = stop_worker(w1) & stop_worker(w2);
    latencies.sort_by(f64::total_cmp);
    let execs = read_logs(&ctx.dir, "open_producer");
    let lat = pickups(&execs, &pushed);
    let max_push = latencies.last().copied().unwrap_or(f64::NAN);
    let mut row = Row {
        scenario: format!("9. a producer transaction open {secs} s while others push 50/s"),
        ok: stopped && max_push < 1.0,
        ..Row::default()
    };
    analyse(&execs, &[], &mut row);
    row.recovery = format!(
        "push p50 {:.1} ms, max {:.1} ms; pickup p50 {:.1} ms, max {:.0} ms",
        latencies[latencies.len() / 2] * 1e3,
        max_push * 1e3,
        lat.get(lat.len() / 2).copied().unwrap_or(f64::NAN) * 1e3,
        lat.last().copied().unwrap_or(f64::NAN) * 1e3
    );
    row.notes = "the held job ran after its commit".into();
    let o = outcome(&db).await?;
    Ok(finish(row, &sent, &o, &BTreeSet::new()))
}

/// Scenario 13: `pg_dump` of a large table runs (one `REPEATABLE READ` snapshot for the whole
/// dump, read slowly, as a dump to a slow disk or network is) while jobs flow at 100/s: vacuum
/// of the queue is held back for the dump's duration. No job may be lost or run twice, and
/// pickups must go on.
async fn pg_dump_running(ctx: &Ctx) -> Res<Row> {
    let db = ctx.fresh("pg_dump").await?;
    let rows = if ctx.quick { 100_000 } else { 400_000 };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE big AS SELECT g AS id, repeat(md5(g::text), 6) AS pad \
         FROM generate_series(1, {rows}) g"
    )))
    .execute(&db.pool)
    .await?;
    let big_mb: f64 = sqlx::query_scalar("SELECT pg_total_relation_size('big')::float8 / 1048576")
        .fetch_one(&db.pool)
        .await?;
    let w1 = ctx.spawn_worker(&db, "pg_dump", "w1", 10, 10_000, 5)?;
    let w2 = ctx.spawn_worker(&db, "pg_dump", "w2", 10, 10_000, 5)?;
    let bin = std::env::var("APALIS_PG_BINDIR")
        .map(|d| format!("{d}/pg_dump"))
        .unwrap_or_else(|_| "pg_dump".into());
    let mut dump = tokio::process::Command::new(&bin)
        .args(["--table", "big", "--dbname", &db.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = dump.stdout.take().ok_or("pg_dump without stdout")?;
    // Read the dump at about 4 MB/s, so it lasts (and holds its snapshot) for a while.
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            match out.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
            tokio::time::sleep(Duration::from_millis(16)).await;
        }
        total
    });
    let started = Instant::now();
    // Jobs flow for as long as the dump runs (at least 5 s), 100/s.
    let mut pushed = Vec::new();
    let mut next = 0u64;
    let mut held_snapshot = 0.0f64;
    while !reader.is_finished() || started.elapsed() < Duration::from_secs(5) {
        pushed.extend(push_paced(&db.pool, db.queue.name(), next..next + 100, 100).await?);
        next += 100;
        let age: Option<f64> = sqlx::query_scalar(
            "SELECT max(extract(epoch FROM clock_timestamp() - xact_start))::float8 \
             FROM pg_stat_activity WHERE application_name = 'pg_dump' AND backend_xmin IS NOT NULL",
        )
        .fetch_one(&db.pool)
        .await?;
        held_snapshot = held_snapshot.max(age.unwrap_or(0.0));
        if started.elapsed() > Duration::from_secs(600) {
            break;
        }
    }
    let dumped = reader.await.unwrap_or(0);
    let dump_ok = dump.wait().await.map(|s| s.success()).unwrap_or(false);
    let dump_secs = started.elapsed().as_secs_f64();
    let sent: BTreeSet<u64> = pushed.iter().map(|(id, _)| *id).collect();
    wait_drained(&db, &sent, 0, Duration::from_secs(60)).await;
    let stopped = stop_worker(w1) & stop_worker(w2);
    let execs = read_logs(&ctx.dir, "pg_dump");
    let lat = pickups(&execs, &pushed);
    let p = |q: f64| lat.get(((lat.len() as f64 - 1.0) * q) as usize).copied();
    let max = lat.last().copied().unwrap_or(f64::NAN);
    let mut row = Row {
        scenario: format!("13. pg_dump of a {big_mb:.0} MB table while jobs flow at 100/s"),
        // The dump really held a snapshot, and pickups went on (none waited a poll interval).
        ok: stopped && dump_ok && held_snapshot > 1.0 && max < 5.0,
        ..Row::default()
    };
    analyse(&execs, &[], &mut row);
    row.recovery = format!(
        "pickup p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms during the dump",
        p(0.5).unwrap_or(f64::NAN) * 1e3,
        p(0.99).unwrap_or(f64::NAN) * 1e3,
        max * 1e3
    );
    row.notes = format!(
        "dump {:.0} MB in {dump_secs:.0} s, its snapshot seen {held_snapshot:.0} s old; {} jobs",
        dumped as f64 / 1048576.0,
        sent.len()
    );
    let o = outcome(&db).await?;
    Ok(finish(row, &sent, &o, &BTreeSet::new()))
}

/// 10. Transactions insert into two queues in opposite orders while workers of both wait.
async fn opposite_orders(ctx: &Ctx) -> Res<Row> {
    let db = ctx.fresh("opposite").await?;
    let other = QueueName::new("faults_b")?;
    let s_a = PgmqStorage::<FaultJob>::new(&db.runtime, db.queue.name().clone());
    let s_b = PgmqStorage::<FaultJob>::new(&db.runtime, other.clone());
    s_b.create_queue().await?;
    let w_a = ctx.spawn_worker(&db, "opposite", "wa", 10, 10_000, 5)?;
    let db_b = Db {
        url: db.url.clone(),
        pool: db.pool.clone(),
        runtime: db.runtime.clone(),
        queue: PgmqQueue::new(other.clone()),
    };
    let w_b = ctx.spawn_worker(&db_b, "opposite", "wb", 10, 10_000, 5)?;
    let rounds: u64 = if ctx.quick { 100 } else { 300 };
    let mut errors = Vec::new();
    let mut sent_a = BTreeSet::new();
    let mut sent_b = 0i64;
    for r in 0..rounds {
        let job = |id| FaultJob {
            id,
            ms: 1,
            panic: false,
            note: None,
            outcome: None,
        };
        let mut t1 = db.pool.begin().await?;
        let mut t2 = db.pool.begin().await?;
        let step = async {
            s_a.push_with(&mut *t1, &job(r * 2)).await?;
            s_b.push_with(&mut *t2, &job(r * 2)).await?;
            s_b.push_with(&mut *t1, &job(r * 2 + 1)).await?;
            s_a.push_with(&mut *t2, &job(r * 2 + 1)).await?;
            Ok::<(), apalis_pgmq_notify::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(10), step).await {
            Ok(Ok(())) => {
                t1.commit().await?;
                t2.commit().await?;
                sent_a.insert(r * 2);
                sent_a.insert(r * 2 + 1);
                sent_b += 2;
            }
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(_) => errors.push("blocked for 10 s".into()),
        }
    }
    wait_drained(&db, &sent_a, 0, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done_b = 0i64;
    while Instant::now() < deadline {
        done_b = sqlx::query_scalar("SELECT count(*) FROM pgmq.a_faults_b")
            .fetch_one(&db.pool)
            .await?;
        if done_b >= sent_b {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped = stop_worker(w_a) & stop_worker(w_b);
    let execs: Vec<Exec> = read_logs(&ctx.dir, "opposite").into_iter().collect();
    let mut row = Row {
        scenario: format!(
            "10. {rounds} transaction pairs inserting into two queues in opposite orders"
        ),
        ok: stopped && errors.is_empty() && done_b == sent_b,
        ..Row::default()
    };
    // Both queues' workers log to this scenario; msg ids overlap between queues, so runs are
    // counted per queue by the archive instead of the exec log.
    let _ = execs;
    row.recovery = format!("deadlocks or blocked statements: {}", errors.len());
    row.notes = format!(
        "queue b: {done_b}/{sent_b} done{}",
        errors
            .first()
            .map(|e| format!("; first error: {e}"))
            .unwrap_or_default()
    );
    let o = outcome(&db).await?;
    Ok(finish(row, &sent_a, &o, &BTreeSet::new()))
}

/// Scenario 11: outcomes PostgreSQL would refuse, among good jobs (NUL in an error or a panic
/// message, a retry-after beyond what a timestamp holds).
async fn poison_outcomes(ctx: &Ctx) -> Res<Row> {
    let db = ctx.fresh("poison_outcomes").await?;
    let s = PgmqStorage::<FaultJob>::new(&db.runtime, db.queue.name().clone());
    let mut all = jobs(0..300, |_| 2);
    for (id, kind) in [(50, "nul_error"), (150, "nul_panic"), (250, "far_retry")] {
        all[id].outcome = Some(kind.to_owned());
    }
    let sent: BTreeSet<u64> = (0..300).filter(|id| ![50, 150, 250].contains(id)).collect();
    let expect_dead: BTreeSet<u64> = [50, 150].into_iter().collect();
    s.push_bulk_with(&db.pool, all).await?;
    let w = ctx.spawn_worker(&db, "poison_outcomes", "w1", 10, 10_000, 3)?;
    // The far retry stays queued (about 100 years out): wait for the rest, not for an empty queue.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut o = outcome(&db).await?;
    while Instant::now() < deadline {
        o = outcome(&db).await?;
        if sent.iter().all(|id| o.completed.contains(id)) && o.dead.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = Instant::now();
    let stopped = stop_worker(w);
    let shutdown = t.elapsed();
    let far: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM vt - clock_timestamp())::float8 / (365.0 * 86400) \
         FROM pgmq.q_faults WHERE message->>'id' = '250'",
    )
    .fetch_optional(&db.pool)
    .await?;
    sqlx::query("DELETE FROM pgmq.q_faults WHERE message->>'id' = '250'")
        .execute(&db.pool)
        .await?;
    let nul_kept = o
        .dead
        .values()
        .all(|i| i["error"].as_str().is_some_and(|e| e.contains("\\u0000")));
    let execs = read_logs(&ctx.dir, "poison_outcomes");
    let mut row = Row {
        scenario: "11. outcomes PostgreSQL would refuse, among 297 good jobs".into(),
        ok: stopped && nul_kept && far.is_some_and(|y| (99.0..=101.0).contains(&y)),
        ..Row::default()
    };
    let good: Vec<Exec> = execs
        .iter()
        .filter(|e| sent.contains(&e.job))
        .cloned()
        .collect();
    analyse(&good, &[], &mut row);
    row.recovery = format!("graceful shutdown in {:.1} s", shutdown.as_secs_f64());
    row.notes = format!(
        "NUL error and NUL panic: 3 attempts, then dead-lettered with the NUL escaped ({nul_kept}); \
         retry-after of 10^13 s: queued {:.1} years out (clamped)",
        far.unwrap_or(f64::NAN)
    );
    let o = outcome(&db).await?;
    Ok(finish(row, &sent, &o, &expect_dead))
}

/// Scenario 12: a worker process whose traffic freezes (every connection silent, new ones too)
/// while it runs long jobs: it must stop them before their lease lapses and another worker runs
/// them.
async fn frozen(ctx: &Ctx) -> Res<Row> {
    let db = ctx.fresh("frozen").await?;
    let (proxy, proxied) = ctx.through_proxy(&db).await?;
    let vt_ms = 3000;
    let s = PgmqStorage::<FaultJob>::new(&db.runtime, db.queue.name().clone());
    let a = ctx.spawn_worker(&proxied, "frozen", "a", 10, vt_ms, 5)?;
    s.push_bulk_with(&db.pool, jobs(0..10, |_| 20_000)).await?;
    // Wait until A runs all ten, then freeze it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && read_logs(&ctx.dir, "frozen")
            .iter()
            .filter(|e| e.kind == 'S')
            .count()
            < 10
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.freeze();
    let frozen_at = now_micros();
    let b = ctx.spawn_worker(&db, "frozen", "b", 10, vt_ms, 5)?;
    let sent: BTreeSet<u64> = (0..10).collect();
    wait_drained(&db, &sent, 0, Duration::from_secs(60)).await;
    let stopped_b = stop_worker(b);
    drop(proxy);
    let t = Instant::now();
    let stopped_a = stop_worker(a);
    let a_shutdown = t.elapsed();
    let execs = read_logs(&ctx.dir, "frozen");
    let stops: Vec<u64> = execs
        .iter()
        .filter(|e| e.kind == 'X')
        .map(|e| e.at)
        .collect();
    let mut row = Row {
        scenario: "12. a worker whose connections all freeze while it runs 20 s jobs (lease 3 s)"
            .into(),
        ok: stopped_b && stopped_a,
        ..Row::default()
    };
    analyse(&execs, &[], &mut row);
    // Every second run is explained: the first was stopped (X) when its lease was lost.
    row.explained = row.duplicates.min(stops.len());
    row.recovery = format!(
        "A stopped its {} jobs {:.1}–{:.1} s after the freeze; B ran them after that",
        stops.len(),
        stops
            .iter()
            .min()
            .map_or(f64::NAN, |s| s.saturating_sub(frozen_at) as f64 / 1e6),
        stops
            .iter()
            .max()
            .map_or(f64::NAN, |s| s.saturating_sub(frozen_at) as f64 / 1e6),
    );
    row.notes = format!(
        "the frozen worker's shutdown took {:.1} s (bounded)",
        a_shutdown.as_secs_f64()
    );
    let o = outcome(&db).await?;
    Ok(finish(row, &sent, &o, &BTreeSet::new()))
}

/// Distinct ticks enqueued so far (queue and archive).
async fn ticks_enqueued(db: &Db) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT message->>'id' FROM pgmq.q_faults \
                               UNION SELECT message->>'id' FROM pgmq.a_faults) t",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap_or(0)
}

/// Waits (at most `secs` seconds) until at least `n` distinct ticks were enqueued.
async fn wait_ticks(db: &Db, n: i64, secs: u64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = ticks_enqueued(db).await;
        if got >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Scenario 14: three cron replicas (real processes running `apalis-cron` every second, each tick
/// pushed with the key `tick:<timestamp>` and a one-hour window, the replicas lagging each
/// other by 0, 3 and 16 ms, each also a worker); one is SIGKILLed mid-run and another started
/// in its place. Every tick must become one job (never two), no tick may be missing while
/// replicas run, and every job runs once (a second run only for a job the killed replica held).
async fn cron_replicas(ctx: &Ctx) -> Res<Row> {
    let db = ctx.fresh("cron").await?;
    let phase = if ctx.quick { 3 } else { 6 };
    let a = ctx.spawn_cron(&db, "cron", "a", 0)?;
    let b = ctx.spawn_cron(&db, "cron", "b", 3)?;
    let c = ctx.spawn_cron(&db, "cron", "c", 16)?;
    wait_ticks(&db, phase, 60).await;
    let victim_pid = b.id();
    let mut b = b;
    b.kill()?;
    let killed_at = now_micros();
    b.wait()?;
    let at_kill = ticks_enqueued(&db).await;
    wait_ticks(&db, at_kill + phase, 60).await;
    let b2 = ctx.spawn_cron(&db, "cron", "b2", 3)?;
    let at_restart = ticks_enqueued(&db).await;
    wait_ticks(&db, at_restart + phase, 60).await;
    let stopped = stop_worker(a) & stop_worker(b2) & stop_worker(c);
    // The jobs of the last ticks, if their replicas stopped first, are run by a plain worker.
    let drainer = ctx.spawn_worker(&db, "cron", "drain", 4, 2_000, 5)?;
    let per_tick: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT (message->>'id')::bigint, count(*) FROM ( \
           SELECT message FROM pgmq.q_faults UNION ALL SELECT message FROM pgmq.a_faults \
           UNION ALL SELECT message FROM pgmq.q_faults_dlq) m GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await?;
    let sent: BTreeSet<u64> = per_tick
        .iter()
        .filter_map(|(t, _)| u64::try_from(*t).ok())
        .collect();
    wait_drained(&db, &sent, 0, Duration::from_secs(60)).await;
    let drained = stop_worker(drainer);
    let twice = per_tick.iter().filter(|(_, n)| *n > 1).count();
    let span = match (sent.first(), sent.last()) {
        (Some(first), Some(last)) => last - first + 1,
        _ => 0,
    };
    let missing = span.saturating_sub(sent.len() as u64);
    let execs = read_logs(&ctx.dir, "cron");
    // How the replicas' pushes of each tick went: how many pushed it, how many enqueued it.
    let mut pushes: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    for e in execs.iter().filter(|e| e.kind == 'P' || e.kind == 'K') {
        let p = pushes.entry(e.job).or_default();
        p.0 += 1;
        p.1 += usize::from(e.kind == 'P');
    }
    let raced = pushes.values().filter(|p| p.0 >= 2).count();
    let enqueued_twice = pushes.values().filter(|p| p.1 > 1).count();
    let mut row = Row {
        scenario: "14. three cron replicas (apalis-cron, keyed ticks, 0/3/16 ms apart), one \
                   SIGKILLed and replaced"
            .into(),
        ok: stopped
            && drained
            && twice == 0
            && enqueued_twice == 0
            && missing == 0
            && raced * 2 >= sent.len()
            && sent.len() as i64 >= 3 * phase,
        ..Row::default()
    };
    analyse(&execs, &[(victim_pid, killed_at)], &mut row);
    row.recovery = format!(
        "{} ticks in a row, {twice} enqueued twice, {missing} missing",
        sent.len()
    );
    row.notes = format!(
        "{raced} of {} ticks pushed by two or three replicas, {enqueued_twice} enqueued by more \
         than one push; killed after {at_kill} ticks, replacement started after {at_restart}",
        sent.len()
    );
    let o = outcome(&db).await?;
    Ok(finish(row, &sent, &o, &BTreeSet::new()))
}

fn print_table(rows: &[Row]) {
    println!(
        "\n| scenario | jobs in | completed | dead-lettered | run twice (explained by a crash) | two workers at once | lost | recovery | notes |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} ({}) | {} | {} | {} | {}{} |",
            r.scenario,
            r.jobs_in,
            r.completed,
            r.dead_lettered,
            r.duplicates,
            r.explained,
            r.overlaps,
            r.lost,
            r.recovery,
            r.notes,
            if r.ok { "" } else { " **FAILED**" }
        );
    }
}

async fn run(quick: bool, only: Option<Vec<String>>) -> Res<bool> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set")?;
    let dir = std::env::temp_dir().join(format!("apalis-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ctx = Ctx {
        admin: PgConnectOptions::from_str(&url)?,
        exe: std::env::current_exe()?,
        dir: dir.clone(),
        pg: PgControl::from_env(),
        quick,
    };
    let mut rows = Vec::new();
    type Scenario<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Res<Row>> + 'a>>;
    let scenarios: Vec<(&str, Scenario<'_>)> = vec![
        ("sigkill", Box::pin(sigkill(&ctx))),
        ("restart fast", Box::pin(pg_restart(&ctx, "fast"))),
        ("restart immediate", Box::pin(pg_restart(&ctx, "immediate"))),
        ("terminate", Box::pin(terminate(&ctx))),
        ("poison", Box::pin(poison(&ctx))),
        ("hostile", Box::pin(hostile(&ctx))),
        ("panics", Box::pin(panics(&ctx))),
        ("overlap", Box::pin(overlap(&ctx))),
        ("silent listener", Box::pin(silent_listener(&ctx))),
        ("open producer", Box::pin(open_producer(&ctx))),
        ("opposite orders", Box::pin(opposite_orders(&ctx))),
        ("poison outcomes", Box::pin(poison_outcomes(&ctx))),
        ("frozen worker", Box::pin(frozen(&ctx))),
        ("pg_dump", Box::pin(pg_dump_running(&ctx))),
        ("cron", Box::pin(cron_replicas(&ctx))),
    ];
    for (name, fut) in scenarios {
        if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == name)) {
            continue;
        }
        eprintln!("== fault scenario: {name}");
        let started = Instant::now();
        let row = match fut.await {
            Ok(r) => r,
            Err(e) => Row {
                scenario: name.into(),
                notes: format!("scenario error: {e}"),
                ok: false,
                ..Row::default()
            },
        };
        eprintln!(
            "   {} in {:.1} s",
            if row.ok { "ok" } else { "FAILED" },
            started.elapsed().as_secs_f64()
        );
        if let Ok(line) = serde_json::to_string(&row) {
            println!("FAULT {line}");
        }
        rows.push(row);
    }
    print_table(&rows);
    let ok = rows.iter().all(|r| r.ok);
    // APALIS_FAULTS_KEEP=1 keeps the logs of a passing run too (workers' warnings included).
    if ok && std::env::var_os("APALIS_FAULTS_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("worker logs kept in {}", dir.display());
    }
    Ok(ok)
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("worker") => worker_main(&args[1..]).map(|()| true),
        Some("cron") => cron_main(&args[1..]).map(|()| true),
        Some("camp-worker") => campaign::worker_main(&args[1..]).map(|()| true),
        Some("failover-times") => check::failover_times_main(&args[1..]),
        Some(cmd @ ("campaign" | "check")) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(Into::into)
            .and_then(|rt| {
                rt.block_on(async {
                    if cmd == "campaign" {
                        campaign::campaign(&args[1..]).await
                    } else {
                        check::check_main(&args[1..]).await
                    }
                })
            }),
        Some("run") => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(Into::into)
            .and_then(|rt| {
                let only = arg(&args, "--only")
                    .map(|o| o.split(',').map(str::to_owned).collect::<Vec<_>>());
                rt.block_on(run(args.iter().any(|a| a == "--quick"), only))
            }),
        _ => Err(
            "usage: apalis-pgmq-notify-faults run [--quick] [--only names] | campaign \
                  [--minutes M] [--seed N] [--dir D] | check --dir D | worker ... | cron ... | camp-worker ..."
                .into(),
        ),
    };
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
