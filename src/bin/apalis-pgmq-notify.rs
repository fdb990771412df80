//! `apalis-pgmq-notify`: operate PGMQ queues used by apalis workers. A thin layer over the
//! library: every command calls a public function applications can call too.
//!
//! ```text
//! apalis-pgmq-notify migrate [--check | --dry-run | --status | --print-sql]
//! apalis-pgmq-notify queues [--json]
//! apalis-pgmq-notify jobs list <queue> [--state S] [--page N] [--page-size N] [--json]
//! apalis-pgmq-notify jobs retry <queue> --state retrying|dead [--reset-attempts] [--json]
//! apalis-pgmq-notify jobs purge <queue> [--scheduled] (--yes | --dry-run)
//! apalis-pgmq-notify send <queue> <json> [--delay 10m] [--key K] [--priority N] [--max-attempts N] [--json]
//! apalis-pgmq-notify dlq list <queue> [--page N] [--page-size N] [--json]
//! apalis-pgmq-notify dlq show <queue> <id> [--json]
//! apalis-pgmq-notify dlq replay <queue> (<id>... | --all) [--reset-attempts] [--json]
//! apalis-pgmq-notify dlq purge <queue> [--older-than 7d] (--yes | --dry-run)
//! apalis-pgmq-notify job show|retry|delete <queue> <id> [--json]
//! apalis-pgmq-notify pause <queue> / resume <queue> [--json]
//! apalis-pgmq-notify workers [--queue Q] [--json]
//! apalis-pgmq-notify snapshots [--json]
//! apalis-pgmq-notify prune [<queue>...] [--archive-retention 7d] [--dead-letter-retention 30d] [--result-retention 1d]
//! apalis-pgmq-notify create-queue <queue> [--priorities] [--partitioned --partition-interval N --retention-interval N]
//! apalis-pgmq-notify enable-notify|disable-notify <queue>...
//! apalis-pgmq-notify drop-queue <queue>... (--yes | --dry-run)
//! apalis-pgmq-notify generate-migration [<queue>...] / validate <config.toml|config.json>
//! ```
//!
//! Exit status: 0 on success, 1 when the operation fails, 2 for bad usage or input.
//!
//! Defaults that are settings of the library (retentions, channel names, notify mode) are
//! taken from `Config::default()`, never written here.

use std::{process::ExitCode, str::FromStr, time::Duration};

use apalis_core::backend::RunningWorker;
use apalis_pgmq_notify::{
    Config, Delay, Error, HumanDuration, JobRecord, JobState, MultiHost, NotifyChannels,
    NotifyMode, PgmqQueue, PgmqStorage, QueueName, Runtime, TargetSessionAttrs,
    check_session_pooling, check_writable, disable_notify, drop_queue_and_dead_letters,
    enable_notify, migration_status, migrations_sql, notify_migration_sql, notify_mode, pause,
    pending_migrations, pgmq_installed, prune, prune_results, queues_overview, resume,
    running_workers, setup,
};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use sqlx::{ConnectOptions, Connection, postgres::PgConnectOptions};

/// Operate PGMQ queues used by apalis-pgmq-notify workers.
#[derive(Parser)]
#[command(name = "apalis-pgmq-notify", version, about, long_about = None)]
struct Cli {
    /// The database (default: $DATABASE_URL). `sslmode=require`/`verify-full` work (rustls).
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Give up connecting after this long, reporting why (e.g. "5s"; more than zero).
    #[arg(long, global = true, default_value = "5s", value_parser = positive_duration)]
    connect_timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install or check PGMQ and apply this crate's migrations.
    Migrate {
        /// Only check: exit 1 if migrations are pending.
        #[arg(long)]
        check: bool,
        /// Print the SQL of the pending migrations instead of running it (and say whether
        /// PGMQ would be installed first).
        #[arg(long, conflicts_with = "check")]
        dry_run: bool,
        /// Show every migration: applied or pending, with checksums.
        #[arg(long, conflicts_with_all = ["check", "dry_run"])]
        status: bool,
        /// Print the SQL of every migration of this crate, without connecting.
        #[arg(long, conflicts_with_all = ["check", "dry_run", "status"])]
        print_sql: bool,
    },
    /// A queue's jobs: list them by state, retry the retrying or dead ones, purge the pending.
    #[command(subcommand)]
    Jobs(Jobs),
    /// Send a job (JSON) to a queue, as a producer would.
    Send {
        queue: String,
        /// The job's body, JSON (e.g. '{"to": "a@example.com"}').
        body: String,
        /// Visible after this long (e.g. "10m").
        #[arg(long, value_parser = duration)]
        delay: Option<Duration>,
        /// Idempotency key: refused while a job with this key is queued.
        #[arg(long)]
        key: Option<String>,
        /// Priority (higher first, on queues with priorities).
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i32>,
        /// Runs before the job is given up.
        #[arg(long)]
        max_attempts: Option<u32>,
        #[command(flatten)]
        out: Output,
    },
    /// Every PGMQ queue: depth, visible, scheduled, running, retrying, oldest pending, archive,
    /// dead letters, notify mode, paused, and why a queue cannot be counted or served.
    Queues {
        #[command(flatten)]
        out: Output,
    },
    /// Dead letters of a queue.
    #[command(subcommand)]
    Dlq(Dlq),
    /// One job, by id, wherever it is.
    #[command(subcommand)]
    Job(Job),
    /// Stop a queue's workers from claiming jobs (survives restarts).
    Pause {
        queue: String,
        #[command(flatten)]
        out: Output,
    },
    /// Let a paused queue's workers claim jobs again (and wake them).
    Resume {
        queue: String,
        #[command(flatten)]
        channels: Channels,
        #[command(flatten)]
        out: Output,
    },
    /// Running workers, from the worker registry.
    Workers {
        /// Only this queue's.
        #[arg(long)]
        queue: Option<String>,
        #[command(flatten)]
        out: Output,
    },
    /// Who holds back vacuum of the database's tables (queues included): sessions with an old
    /// snapshot, prepared transactions, replication slots, standbys; oldest first.
    Snapshots {
        #[command(flatten)]
        out: Output,
    },
    /// Delete archived jobs and dead letters past their retention (default: every queue).
    Prune {
        queues: Vec<String>,
        /// Keep archived (done) jobs this long ("forever": keep them all).
        #[arg(long, default_value_t = Keep(defaults().retention.archive))]
        archive_retention: Keep,
        /// Keep dead letters this long ("forever": keep them all).
        #[arg(long, default_value_t = Keep(defaults().retention.dead_letters))]
        dead_letter_retention: Keep,
        /// Keep stored job results this long ("forever": keep them all).
        #[arg(long, default_value_t = Keep(defaults().results.retention))]
        result_retention: Keep,
    },
    /// Install LISTEN/NOTIFY triggers on existing PGMQ queues.
    EnableNotify {
        #[arg(required = true)]
        queues: Vec<String>,
        #[command(flatten)]
        channels: Channels,
        #[command(flatten)]
        mode: Mode,
    },
    /// Remove the triggers.
    DisableNotify {
        #[arg(required = true)]
        queues: Vec<String>,
    },
    /// Print (or --output) the SQL that installs notifications, for your own migrations.
    GenerateMigration {
        queues: Vec<String>,
        #[command(flatten)]
        channels: Channels,
        #[command(flatten)]
        mode: Mode,
        /// Also announce created queues.
        #[arg(long)]
        created_events: bool,
        /// Write the SQL to this file.
        #[arg(long)]
        output: Option<String>,
    },
    /// Check a configuration file (.toml or .json) and print every effective setting.
    Validate { file: String },
    /// Create a queue with its dead-letter queue (and notification trigger).
    CreateQueue {
        queue: String,
        /// Partitioned queue and archive tables (PGMQ's create_partitioned; needs pg_partman).
        #[arg(long)]
        partitioned: bool,
        /// Messages (e.g. 10000) or time (e.g. "1 day") per partition.
        #[arg(long, default_value = "10000", requires = "partitioned")]
        partition_interval: String,
        /// How far back the archive keeps partitions (same unit as the partition interval).
        #[arg(long, default_value = "100000", requires = "partitioned")]
        retention_interval: String,
        /// Also create the priority index that workers with priorities claim through.
        #[arg(long)]
        priorities: bool,
    },
    /// Drop queues with their dead-letter queues and archives (needs --yes, or --dry-run).
    DropQueue {
        #[arg(required = true)]
        queues: Vec<String>,
        #[command(flatten)]
        confirm: Confirm,
    },
}

#[derive(Subcommand)]
enum Dlq {
    /// List dead letters, newest first: reason, error, attempts, when.
    List {
        queue: String,
        #[arg(long, default_value_t = 1)]
        page: u32,
        #[arg(long, default_value_t = 20)]
        page_size: u32,
        #[command(flatten)]
        out: Output,
    },
    /// One dead letter, by job id.
    Show {
        queue: String,
        id: i64,
        #[command(flatten)]
        out: Output,
    },
    /// Move dead letters back into the queue, in one transaction.
    Replay {
        queue: String,
        /// Job ids to replay.
        ids: Vec<i64>,
        /// Replay every dead letter of the queue.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Give them a full attempt budget again (default: one more run).
        #[arg(long)]
        reset_attempts: bool,
        #[command(flatten)]
        out: Output,
    },
    /// Delete dead letters (needs --yes, or --dry-run to count them).
    Purge {
        queue: String,
        /// Only those dead for longer than this (e.g. "7d").
        #[arg(long, value_parser = duration)]
        older_than: Option<Duration>,
        #[command(flatten)]
        confirm: Confirm,
    },
}

/// States a listing can filter on.
#[derive(Clone, Copy, clap::ValueEnum)]
enum StateArg {
    Pending,
    Scheduled,
    Running,
    Retrying,
    Done,
    Killed,
    Dead,
}

impl StateArg {
    fn state(self) -> JobState {
        match self {
            Self::Pending => JobState::Pending,
            Self::Scheduled => JobState::Scheduled,
            Self::Running => JobState::Running,
            Self::Retrying => JobState::Retrying,
            Self::Done => JobState::Done,
            Self::Killed => JobState::Killed,
            Self::Dead => JobState::Dead,
        }
    }
}

/// What `jobs retry` retries.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RetryArg {
    /// Failed jobs waiting out their backoff: visible now.
    Retrying,
    /// Dead jobs (not killed ones): back in the queue.
    Dead,
}

#[derive(Subcommand)]
enum Jobs {
    /// List jobs, newest first (live ones, then dead, then done), optionally in one state.
    List {
        queue: String,
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        #[arg(long, default_value_t = 1)]
        page: u32,
        #[arg(long, default_value_t = 20)]
        page_size: u32,
        #[command(flatten)]
        out: Output,
    },
    /// Retry every retrying or every dead job of the queue, in one statement (all or nothing).
    Retry {
        queue: String,
        #[arg(long, value_enum)]
        state: RetryArg,
        /// Dead jobs get a full attempt budget again (default: one more run).
        #[arg(long)]
        reset_attempts: bool,
        #[command(flatten)]
        out: Output,
    },
    /// Delete every pending job (visible now), in one statement; running and retrying jobs
    /// are left alone.
    Purge {
        queue: String,
        /// Also delete scheduled (delayed, never run) jobs.
        #[arg(long)]
        scheduled: bool,
        #[command(flatten)]
        confirm: Confirm,
    },
}

#[derive(Subcommand)]
enum Job {
    /// Show a job: state, attempts, error, body.
    Show {
        queue: String,
        id: i64,
        #[command(flatten)]
        out: Output,
    },
    /// Run a job again now: a waiting or retrying one is made visible; a dead one replayed.
    Retry {
        queue: String,
        id: i64,
        #[command(flatten)]
        out: Output,
    },
    /// Delete a job from the queue or the dead letters.
    Delete {
        queue: String,
        id: i64,
        #[command(flatten)]
        out: Output,
    },
}

/// What a destructive command needs before it deletes anything.
#[derive(Args)]
struct Confirm {
    /// Delete without asking (required when not run interactively).
    #[arg(long, conflicts_with = "dry_run")]
    yes: bool,
    /// Say what would be deleted, and delete nothing.
    #[arg(long)]
    dry_run: bool,
}

impl Confirm {
    /// Whether to go ahead: `--yes`, or "yes" typed at a terminal. Without either, a usage
    /// error that names the flags.
    fn go_ahead(&self, what: &str) -> Result<bool, Failure> {
        use std::io::{BufRead, IsTerminal, Write};
        if self.dry_run {
            return Ok(false);
        }
        if self.yes {
            return Ok(true);
        }
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Err(Failure::Usage(format!(
                "{what}: pass --yes to confirm, or --dry-run to see what would be deleted"
            )));
        }
        eprint!("{what}? Type \"yes\" to confirm: ");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        stdin.lock().read_line(&mut answer)?;
        if answer.trim() == "yes" {
            Ok(true)
        } else {
            Err(Failure::Failed("not confirmed: nothing deleted".to_owned()))
        }
    }
}

#[derive(Args)]
struct Output {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct Channels {
    /// Channel prefix.
    #[arg(long, default_value_t = defaults().wakeups.channels.prefix().to_owned())]
    prefix: String,
    /// Regex with a (?P<namespace>...) group.
    #[arg(long, default_value_t = defaults().wakeups.channels.pattern().to_owned())]
    namespace_pattern: String,
    /// Namespace of queues the pattern misses.
    #[arg(long, default_value_t = defaults().wakeups.channels.default_namespace().to_owned())]
    default_namespace: String,
}

#[derive(Args)]
struct Mode {
    /// on_demand (notify only while a worker waits), batch (always) or message (one per
    /// message with the payload).
    #[arg(long, default_value_t = defaults().wakeups.mode.name().to_owned())]
    mode: String,
    /// Byte budget of a per-message event (message mode; default: the library's).
    #[arg(long)]
    max_payload_bytes: Option<u16>,
}

/// The library's defaults: the one source of every default the CLI shows or uses.
fn defaults() -> Config {
    Config::default()
}

/// "7d", "30m", "10s", "1h 30m".
fn duration(s: &str) -> Result<Duration, String> {
    s.parse::<HumanDuration>().map(|d| d.0)
}

/// A duration that is not zero (a zero timeout would fail every connection).
fn positive_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("must be more than zero".to_owned()),
        d => Ok(d),
    }
}

/// A retention: a duration, or "forever".
#[derive(Clone, Copy)]
struct Keep(Option<Duration>);

impl std::fmt::Display for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(d) => HumanDuration(d).fmt(f),
            None => f.write_str("forever"),
        }
    }
}

impl FromStr for Keep {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "forever" {
            return Ok(Self(None));
        }
        duration(s).map(|d| Self(Some(d)))
    }
}

/// A usage or input error (exit 2) or a failed operation (exit 1).
enum Failure {
    Usage(String),
    Failed(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Self::Failed(explain(&e))
    }
}

impl From<serde_json::Error> for Failure {
    fn from(e: serde_json::Error) -> Self {
        Self::Failed(e.to_string())
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Self::Failed(e.to_string())
    }
}

/// An error as a command-line user acts on it: commands of this tool, never Rust functions.
fn explain(e: &Error) -> String {
    match e {
        Error::NotSetUp { what } => format!(
            "the database is not set up for apalis-pgmq-notify ({what}): run `apalis-pgmq-notify migrate`"
        ),
        Error::QueueMissing { queue } => format!(
            "queue {queue:?} does not exist: create it with `apalis-pgmq-notify create-queue {queue}` \
             (if the database is not set up yet, run `apalis-pgmq-notify migrate` first)"
        ),
        Error::ResultsUnreadable(why) => format!(
            "job results cannot be read ({why}); grant SELECT on apalis_pgmq.results to this role, or run `apalis-pgmq-notify migrate` if the table is missing"
        ),
        other => other.to_string(),
    }
}

fn queue(name: &str) -> Result<QueueName, Failure> {
    QueueName::new(name).map_err(|e| Failure::Usage(e.to_string()))
}

/// A queue PGMQ has: a command on a queue that does not exist fails, naming it.
async fn existing(pool: &sqlx::PgPool, name: &str) -> Result<PgmqQueue, Failure> {
    let q = PgmqQueue::new(queue(name)?);
    if q.exists(pool).await? {
        Ok(q)
    } else {
        Err(Error::QueueMissing {
            queue: name.to_owned(),
        }
        .into())
    }
}

fn channels(c: &Channels) -> Result<NotifyChannels, Failure> {
    NotifyChannels::with_prefix(&c.prefix)
        .and_then(|ch| ch.namespace_pattern(&c.namespace_pattern, &c.default_namespace))
        .map_err(|e| Failure::Usage(e.to_string()))
}

fn mode(m: &Mode) -> Result<NotifyMode, Failure> {
    NotifyMode::from_name(Some(&m.mode), m.max_payload_bytes)
        .map_err(|e| Failure::Usage(e.to_string()))
}

/// Connects once directly (so a refused connection or a failed login is reported as such,
/// within the timeout), then opens a small pool.
async fn pool(cli: &Cli) -> Result<sqlx::PgPool, Failure> {
    let url = cli
        .database_url
        .as_deref()
        .ok_or_else(|| Failure::Usage("set DATABASE_URL or pass --database-url".to_owned()))?;
    // A URL names its scheme; the keyword form (`host=a,b dbname=...`) has none.
    if url.contains("://") {
        let scheme = url.split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("postgres" | "postgresql")) {
            return Err(Failure::Usage(format!(
                "the database URL must start with postgres:// or postgresql:// (got {}); this \
                 tool works with PostgreSQL only",
                scheme.map_or_else(|| "no scheme".to_owned(), |s| format!("{s}://"))
            )));
        }
    }
    // Several hosts (`postgres://h1,h2/db?target_session_attrs=read-write`, or the keyword
    // form): the first that fits, as libpq chooses.
    let several = url.contains(',') || url.contains("target_session_attrs") || !url.contains("://");
    let hosts = if several {
        Some(MultiHost::parse(url).map_err(|e| Failure::Usage(e.to_string()))?)
    } else {
        None
    };
    let options = match hosts {
        Some(hosts) if hosts.hosts().len() > 1 || hosts.target() != TargetSessionAttrs::Any => {
            match tokio::time::timeout(cli.connect_timeout, hosts.choose()).await {
                Ok(chosen) => chosen?,
                Err(_) => {
                    return Err(Failure::Failed(format!(
                        "cannot reach the database: no host fits within {}",
                        HumanDuration(cli.connect_timeout)
                    )));
                }
            }
        }
        Some(hosts) => hosts
            .hosts()
            .first()
            .cloned()
            .ok_or_else(|| Failure::Usage("database URL: no host".to_owned()))?,
        None => PgConnectOptions::from_str(url)
            .map_err(|e| Failure::Usage(format!("database URL: {e}")))?,
    };
    match tokio::time::timeout(cli.connect_timeout, options.connect()).await {
        Ok(Ok(mut conn)) => {
            let checked = check_connection(cli, &mut conn, &options).await;
            let _ = conn.close().await;
            checked?;
        }
        Ok(Err(e)) => return Err(Error::from(e).into()),
        Err(_) => {
            return Err(Failure::Failed(format!(
                "cannot reach the database: no answer within {}",
                HumanDuration(cli.connect_timeout)
            )));
        }
    }
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(cli.connect_timeout)
        .connect_lazy_with(options))
}

/// Refuses a connection through a transaction pooler, and a read-only server (a replica)
/// for a command that writes, each with what to change.
async fn check_connection(
    cli: &Cli,
    conn: &mut sqlx::PgConnection,
    options: &PgConnectOptions,
) -> Result<(), Failure> {
    let checks = async {
        check_session_pooling(options).await?;
        if let Some(command) = writes(&cli.command) {
            check_writable(conn, &format!("`{command}`")).await?;
        }
        Ok::<(), Error>(())
    };
    match tokio::time::timeout(cli.connect_timeout, checks).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Failure::Failed(format!(
            "cannot reach the database: no answer within {}",
            HumanDuration(cli.connect_timeout)
        ))),
    }
}

/// The command's name if it writes to the database (a read-only replica refuses it).
fn writes(command: &Command) -> Option<&'static str> {
    Some(match command {
        Command::Migrate {
            check,
            dry_run,
            status,
            print_sql,
        } => {
            if *check || *dry_run || *status || *print_sql {
                return None;
            }
            "migrate"
        }
        // A dry run deletes nothing: it may look at a replica.
        Command::Dlq(Dlq::Purge { confirm, .. })
        | Command::Jobs(Jobs::Purge { confirm, .. })
        | Command::DropQueue { confirm, .. }
            if confirm.dry_run =>
        {
            return None;
        }
        Command::Jobs(Jobs::List { .. }) | Command::Snapshots { .. } => return None,
        Command::Jobs(Jobs::Retry { .. }) => "jobs retry",
        Command::Jobs(Jobs::Purge { .. }) => "jobs purge",
        Command::Send { .. } => "send",
        Command::Queues { .. }
        | Command::Workers { .. }
        | Command::GenerateMigration { .. }
        | Command::Validate { .. }
        | Command::Dlq(Dlq::List { .. } | Dlq::Show { .. })
        | Command::Job(Job::Show { .. }) => return None,
        Command::Dlq(Dlq::Replay { .. }) => "dlq replay",
        Command::Dlq(Dlq::Purge { .. }) => "dlq purge",
        Command::Job(Job::Retry { .. }) => "job retry",
        Command::Job(Job::Delete { .. }) => "job delete",
        Command::Pause { .. } => "pause",
        Command::Resume { .. } => "resume",
        Command::Prune { .. } => "prune",
        Command::EnableNotify { .. } => "enable-notify",
        Command::DisableNotify { .. } => "disable-notify",
        Command::CreateQueue { .. } => "create-queue",
        Command::DropQueue { .. } => "drop-queue",
    })
}

/// Rows as aligned columns under a header.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = width[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}

fn age(secs: Option<f64>) -> String {
    match secs {
        None => "-".to_owned(),
        Some(s) => HumanDuration(Duration::from_secs(s.max(0.0) as u64)).to_string(),
    }
}

/// The outcome of a write command: JSON with `--json`, a line of text otherwise.
fn report(out: &Output, json: &Value, text: &str) {
    if out.json {
        print_json(json);
    } else {
        println!("{text}");
    }
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// A job as JSON: what an operator needs, with stable keys.
fn job_json(queue: &str, j: &JobRecord) -> Value {
    json!({
        "queue": queue,
        "id": j.id,
        "state": j.state.as_str(),
        "read_ct": j.message.read_ct,
        "attempts": j.attempts(),
        "enqueued_at": j.message.enqueued_at,
        "visible_at": j.message.vt,
        "archived_at": j.archived_at,
        "last_error": j.apalis_header("last_error"),
        "dead_letter": {
            "reason": j.dead_letter("reason"),
            "error": j.dead_letter("error"),
            "at": j.dead_letter("at"),
        },
        "message": j.message.message,
        "headers": j.message.headers,
    })
}

fn short(text: Option<String>, max: usize) -> String {
    let t = text.unwrap_or_default().replace('\n', " ");
    if t.chars().count() <= max {
        t
    } else {
        format!("{}…", t.chars().take(max).collect::<String>())
    }
}

fn show_job(j: &JobRecord) {
    let body = j.message.message.as_ref().map_or_else(
        || "null".to_owned(),
        |m| serde_json::to_string_pretty(m).unwrap_or_default(),
    );
    let mut lines = vec![
        ("id", j.id.to_string()),
        ("state", j.state.as_str().to_owned()),
        ("read count", j.message.read_ct.to_string()),
        ("attempts", j.attempts().to_string()),
        ("enqueued", j.message.enqueued_at.to_rfc3339()),
        ("visible at", j.message.vt.to_rfc3339()),
    ];
    if let Some(a) = j.archived_at {
        lines.push(("archived", a.to_rfc3339()));
    }
    for (label, v) in [
        ("last error", j.apalis_header("last_error")),
        ("dead because", j.dead_letter("reason")),
        ("dead error", j.dead_letter("error")),
        ("dead at", j.dead_letter("at")),
    ] {
        if let Some(v) = v {
            lines.push((label, v));
        }
    }
    for (label, v) in lines {
        println!("{label:<13} {v}");
    }
    println!("message\n{body}");
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Migrate {
            check,
            dry_run,
            status,
            print_sql,
        } => {
            if *print_sql {
                println!(
                    "-- Needs PGMQ, which `migrate` installs where it is missing. {}",
                    pgmq_prerequisite()
                );
                print!("{}", migrations_sql());
                return Ok(());
            }
            let pool = pool(&cli).await?;
            if *status {
                let all = migration_status(&pool).await?;
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|m| {
                        vec![
                            m.version.to_string(),
                            m.name.to_owned(),
                            match m.recorded_checksum {
                                None => "pending".to_owned(),
                                Some(c) if c == m.checksum => "applied".to_owned(),
                                Some(_) => "applied, edited since (checksum differs)".to_owned(),
                            },
                            m.checksum.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["VERSION", "NAME", "STATE", "CHECKSUM"], &rows)
                );
                return Ok(());
            }
            if *check || *dry_run {
                let pending = pending_migrations(&pool).await?;
                if *dry_run {
                    if !pgmq_installed(&pool).await? {
                        println!(
                            "-- PGMQ is not installed here: `migrate` first installs PGMQ's own SQL \
                             (the scripts embedded in the pgmq crate), then runs the migrations \
                             below. {}",
                            pgmq_prerequisite()
                        );
                    }
                    for m in &pending {
                        println!("-- migration {} ({})\n{}", m.version, m.name, m.sql);
                    }
                    if pending.is_empty() {
                        println!("-- up to date: nothing to apply");
                    }
                    return Ok(());
                }
                if pending.is_empty() {
                    println!("up to date");
                    return Ok(());
                }
                let list: Vec<String> = pending
                    .iter()
                    .map(|m| format!("{} ({})", m.version, m.name))
                    .collect();
                return Err(Failure::Failed(format!(
                    "pending migrations: {}; run `apalis-pgmq-notify migrate`",
                    list.join(", ")
                )));
            }
            let r = setup(&pool).await?;
            println!(
                "PGMQ {} ({}); migrations applied now: {}",
                r.pgmq_version,
                r.pgmq_source,
                if r.applied_migrations.is_empty() {
                    "none (up to date)".to_owned()
                } else {
                    r.applied_migrations
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
            Ok(())
        }
        Command::Queues { out } => {
            let pool = pool(&cli).await?;
            let all = queues_overview(&pool).await?;
            if out.json {
                print_json(&serde_json::to_value(&all)?);
                return Ok(());
            }
            let n = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|q| {
                    vec![
                        q.queue.clone(),
                        n(q.depth),
                        n(q.visible),
                        n(q.scheduled),
                        n(q.running),
                        n(q.retrying),
                        age(q.oldest_pending_secs),
                        n(q.archived),
                        n(q.dead_letters),
                        q.notify.clone().unwrap_or_else(|| "-".to_owned()),
                        if q.paused { "yes" } else { "no" }.to_owned(),
                        q.error.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "QUEUE",
                        "DEPTH",
                        "VISIBLE",
                        "SCHEDULED",
                        "RUNNING",
                        "RETRYING",
                        "OLDEST PENDING",
                        "ARCHIVED",
                        "DEAD",
                        "NOTIFY",
                        "PAUSED",
                        "NOTE"
                    ],
                    &rows
                )
            );
            Ok(())
        }
        Command::Dlq(cmd) => dlq(&cli, cmd).await,
        Command::Jobs(cmd) => jobs(&cli, cmd).await,
        Command::Send {
            queue: name,
            body,
            delay,
            key,
            priority,
            max_attempts,
            out,
        } => {
            queue(name)?;
            let body: Value = serde_json::from_str(body)
                .map_err(|e| Failure::Usage(format!("the job's body is not JSON: {e}")))?;
            let mut meta = serde_json::Map::new();
            if let Some(k) = key {
                meta.insert("idempotency_key".into(), json!(k));
            }
            if let Some(p) = priority {
                meta.insert("priority".into(), json!(p));
            }
            if let Some(n) = max_attempts {
                meta.insert("max_attempts".into(), json!(n));
            }
            let headers = (!meta.is_empty()).then(|| json!({ "apalis": meta }));
            let pool = pool(&cli).await?;
            let q = existing(&pool, name).await?;
            let at = delay.map_or(Delay::Now, Delay::After);
            let id = q.send_with(&pool, &body, headers.as_ref(), at).await?;
            if out.json {
                print_json(&json!({"queue": name, "id": id}));
            } else {
                println!("{name}: sent job {id}");
            }
            Ok(())
        }
        Command::Job(cmd) => job(&cli, cmd).await,
        Command::Pause { queue: name, out } => {
            let q = queue(name)?;
            let pool = pool(&cli).await?;
            let changed = pause(&pool, &q).await?;
            report(
                out,
                &json!({"queue": name, "paused": true, "changed": changed}),
                &format!("{q}: {}", if changed { "paused" } else { "already paused" }),
            );
            Ok(())
        }
        Command::Resume {
            queue: name,
            channels: c,
            out,
        } => {
            let q = queue(name)?;
            let ch = channels(c)?;
            let pool = pool(&cli).await?;
            let changed = resume(&pool, &q, &ch).await?;
            report(
                out,
                &json!({"queue": name, "paused": false, "changed": changed}),
                &format!(
                    "{q}: {}",
                    if changed { "resumed" } else { "was not paused" }
                ),
            );
            Ok(())
        }
        Command::Workers { queue: name, out } => {
            let q = name.as_deref().map(queue).transpose()?;
            let pool = pool(&cli).await?;
            let workers: Vec<RunningWorker> = running_workers(&pool, q.as_ref()).await?;
            if out.json {
                print_json(&serde_json::to_value(&workers)?);
                return Ok(());
            }
            let now = chrono::Utc::now().timestamp();
            let ago = |t: u64| {
                let secs = now.saturating_sub(i64::try_from(t).unwrap_or(now)).max(0);
                format!(
                    "{} ago",
                    HumanDuration(Duration::from_secs(secs.unsigned_abs()))
                )
            };
            let rows: Vec<Vec<String>> = workers
                .iter()
                .map(|w| {
                    vec![
                        w.id.clone(),
                        w.queue.clone(),
                        w.backend
                            .trim_start_matches("apalis-pgmq-notify on ")
                            .to_owned(),
                        ago(w.started_at),
                        ago(w.last_heartbeat),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["WORKER", "QUEUE", "WHERE", "STARTED", "LAST HEARTBEAT"],
                    &rows
                )
            );
            Ok(())
        }
        Command::Snapshots { out } => {
            let pool = pool(&cli).await?;
            let found = apalis_pgmq_notify::snapshot_holders(&pool).await?;
            let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
            if out.json {
                let holders: Vec<Value> = found
                    .holders
                    .iter()
                    .map(|h| {
                        json!({
                            "kind": h.kind, "pid": h.pid, "name": h.name, "role": h.role,
                            "application_name": h.application, "state": h.state,
                            "query": h.query, "xids": h.xids, "xmin": h.xmin,
                            "held_secs": h.held.map(|d| d.as_secs_f64()),
                        })
                    })
                    .collect();
                print_json(&json!({ "sees_all": found.sees_all, "holders": holders }));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = found
                .holders
                .iter()
                .map(|h| {
                    vec![
                        h.kind.clone(),
                        h.name
                            .clone()
                            .or_else(|| h.pid.map(|p| p.to_string()))
                            .unwrap_or_else(|| "-".to_owned()),
                        h.held.map_or_else(
                            || "-".to_owned(),
                            |d| HumanDuration(Duration::from_secs(d.as_secs())).to_string(),
                        ),
                        h.xids.to_string(),
                        opt(&h.application),
                        opt(&h.state),
                        opt(&h.query).chars().take(60).collect(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "KIND",
                        "PID/NAME",
                        "OPEN FOR",
                        "XIDS",
                        "APPLICATION",
                        "STATE",
                        "QUERY"
                    ],
                    &rows
                )
            );
            if !found.sees_all {
                println!(
                    "(this role cannot see other roles' start times and queries: grant pg_read_all_stats)"
                );
            }
            Ok(())
        }
        Command::Prune {
            queues: names,
            archive_retention,
            dead_letter_retention,
            result_retention,
        } => {
            let pool = pool(&cli).await?;
            // Every queue, or the named ones; a queue that cannot be pruned is reported and
            // the others are still pruned (exit 1 at the end).
            let mut failures = Vec::new();
            let targets: Vec<QueueName> = if names.is_empty() {
                let mut targets = Vec::new();
                for q in queues_overview(&pool).await? {
                    match QueueName::new(&q.queue) {
                        Ok(name) => targets.push(name),
                        Err(e) => {
                            eprintln!(
                                "{}: skipped: not served by apalis-pgmq-notify ({e})",
                                q.queue
                            );
                            failures.push(q.queue);
                        }
                    }
                }
                targets
            } else {
                names.iter().map(|n| queue(n)).collect::<Result<_, _>>()?
            };
            for q in targets {
                let done = async {
                    if !PgmqQueue::new(q.clone()).exists(&pool).await? {
                        return Err(Error::QueueMissing {
                            queue: q.as_str().to_owned(),
                        });
                    }
                    let n = prune(&pool, &q, archive_retention.0, dead_letter_retention.0).await?;
                    let results = match result_retention.0 {
                        Some(keep) => prune_results(&pool, &q, keep).await?,
                        None => 0,
                    };
                    Ok::<_, Error>((n, results))
                }
                .await;
                match done {
                    Ok((n, results)) => println!(
                        "{q}: {} archived and {} dead jobs deleted, {results} results",
                        n.archived, n.dead_letters
                    ),
                    Err(e) => {
                        eprintln!("{q}: not pruned: {}", explain(&e));
                        failures.push(q.as_str().to_owned());
                    }
                }
            }
            if failures.is_empty() {
                Ok(())
            } else {
                Err(Failure::Failed(format!(
                    "{} queue(s) not pruned: {}",
                    failures.len(),
                    failures.join(", ")
                )))
            }
        }
        Command::EnableNotify {
            queues: names,
            channels: c,
            mode: m,
        } => {
            let queues: Vec<QueueName> =
                names.iter().map(|n| queue(n)).collect::<Result<_, _>>()?;
            let (ch, mode) = (channels(c)?, mode(m)?);
            let pool = pool(&cli).await?;
            for q in &queues {
                enable_notify(&pool, q, &ch, mode).await?;
                match notify_mode(&pool, q).await? {
                    Some((mode, chans)) => println!(
                        "{q}: {} notifications on {}",
                        match mode {
                            NotifyMode::Batch => "batch",
                            NotifyMode::Message { .. } => "per-message",
                            _ => "on-demand",
                        },
                        chans.join(", ")
                    ),
                    None => println!("{q}: no trigger"),
                }
            }
            Ok(())
        }
        Command::DisableNotify { queues: names } => {
            let queues: Vec<QueueName> =
                names.iter().map(|n| queue(n)).collect::<Result<_, _>>()?;
            let pool = pool(&cli).await?;
            for q in &queues {
                let existed = disable_notify(&pool, q).await?;
                println!(
                    "{q}: {}",
                    if existed {
                        "trigger removed"
                    } else {
                        "no trigger"
                    }
                );
            }
            Ok(())
        }
        Command::GenerateMigration {
            queues: names,
            channels: c,
            mode: m,
            created_events,
            output,
        } => {
            let queues: Vec<QueueName> =
                names.iter().map(|n| queue(n)).collect::<Result<_, _>>()?;
            let sql = notify_migration_sql(&queues, &channels(c)?, mode(m)?, *created_events)
                .map_err(|e| Failure::Usage(e.to_string()))?;
            match output {
                Some(path) => {
                    std::fs::write(path, &sql)?;
                    eprintln!("wrote {path} ({} bytes)", sql.len());
                }
                None => print!("{sql}"),
            }
            Ok(())
        }
        Command::Validate { file } => {
            let config = Config::load(file).map_err(|e| match e {
                // A range error names the setting but not the file.
                e @ Error::Config { .. } => Failure::Usage(format!("{file}: {e}")),
                e => Failure::Usage(e.to_string()),
            })?;
            println!("{file}: valid; every effective setting (defaults filled in):");
            let rows: Vec<Vec<String>> = config
                .settings()
                .into_iter()
                .map(|(k, v)| vec![k, v])
                .collect();
            print!("{}", table(&["SETTING", "VALUE"], &rows));
            Ok(())
        }
        Command::CreateQueue {
            queue: name,
            partitioned,
            partition_interval,
            retention_interval,
            priorities,
        } => {
            let q = queue(name)?;
            let pool = pool(&cli).await?;
            let s = PgmqStorage::<Value>::new(&Runtime::new(&pool), q.clone());
            if *partitioned {
                s.create_partitioned_queue(partition_interval, retention_interval)
                    .await?;
                println!(
                    "{q}: created, partitioned by {partition_interval}, archive keeps {retention_interval}"
                );
            } else {
                s.create_queue().await?;
                println!("{q}: created with {q}_dlq");
            }
            if *priorities {
                if s.queue().index_priorities(&pool).await? {
                    println!("{q}: priority index created");
                } else {
                    return Err(Failure::Failed(format!(
                        "{q}: no priority index (a partitioned queue cannot have one)"
                    )));
                }
            }
            Ok(())
        }
        Command::DropQueue {
            queues: names,
            confirm,
        } => {
            let queues: Vec<QueueName> =
                names.iter().map(|n| queue(n)).collect::<Result<_, _>>()?;
            let pool = pool(&cli).await?;
            let mut what = Vec::new();
            for q in &queues {
                let p = PgmqQueue::new(q.clone());
                what.push(if p.exists(&pool).await? {
                    let c = p.counts(&pool).await?;
                    format!(
                        "{q}: {} jobs in the queue, {} archived, {} dead letters",
                        c.pending + c.scheduled + c.running + c.retrying,
                        c.done,
                        c.dead + c.killed
                    )
                } else {
                    format!("{q}: does not exist")
                });
            }
            if !confirm.go_ahead(&format!(
                "drop {} with their jobs, archives and dead letters",
                names.join(", ")
            ))? {
                for w in what {
                    println!("{w} (dry run: would be dropped)");
                }
                return Ok(());
            }
            for q in &queues {
                let existed = drop_queue_and_dead_letters(&pool, q).await?;
                println!(
                    "{q}: {}",
                    if existed {
                        "dropped with its dead-letter queue"
                    } else {
                        "did not exist"
                    }
                );
            }
            Ok(())
        }
    }
}

async fn dlq(cli: &Cli, cmd: &Dlq) -> Result<(), Failure> {
    match cmd {
        Dlq::List {
            queue: name,
            page,
            page_size,
            out,
        } => {
            queue(name)?;
            if *page == 0 || *page_size == 0 {
                return Err(Failure::Usage(
                    "--page and --page-size start at 1".to_owned(),
                ));
            }
            let pool = pool(cli).await?;
            let q = existing(&pool, name).await?;
            let dead = q
                .dead_letters(&pool, (page - 1) * page_size, *page_size)
                .await?;
            if out.json {
                print_json(&Value::Array(
                    dead.iter().map(|j| job_json(name, j)).collect(),
                ));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = dead
                .iter()
                .map(|j| {
                    vec![
                        j.id.to_string(),
                        j.dead_letter("reason").unwrap_or_default(),
                        j.attempts().to_string(),
                        j.message
                            .enqueued_at
                            .format("%Y-%m-%d %H:%M:%S")
                            .to_string(),
                        short(j.dead_letter("error"), 60),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["JOB", "REASON", "ATTEMPTS", "DEAD SINCE (UTC)", "ERROR"],
                    &rows
                )
            );
            Ok(())
        }
        Dlq::Show {
            queue: name,
            id,
            out,
        } => {
            queue(name)?;
            let pool = pool(cli).await?;
            let q = existing(&pool, name).await?;
            let found = q
                .job(&pool, *id)
                .await?
                .filter(|j| j.dead_letter("reason").is_some());
            let Some(j) = found else {
                return Err(Failure::Failed(format!(
                    "no dead letter for job {id} in {name}"
                )));
            };
            if out.json {
                print_json(&job_json(name, &j));
            } else {
                show_job(&j);
            }
            Ok(())
        }
        Dlq::Replay {
            queue: name,
            ids,
            all,
            reset_attempts,
            out,
        } => {
            queue(name)?;
            if ids.is_empty() && !all {
                return Err(Failure::Usage(
                    "name the job ids to replay, or pass --all".to_owned(),
                ));
            }
            let pool = pool(cli).await?;
            let q = existing(&pool, name).await?;
            let which = if *all { None } else { Some(ids.as_slice()) };
            let back = q.replay_dead_letters(&pool, which, *reset_attempts).await?;
            if out.json {
                let pairs: Vec<Value> = back
                    .iter()
                    .map(|(old, new)| json!({"queue": name, "old_id": old, "new_id": new}))
                    .collect();
                print_json(&Value::Array(pairs));
            } else {
                for (old, new) in &back {
                    println!("{name}: dead job {old} -> job {new}");
                }
            }
            eprintln!(
                "{name}: {} dead letters back in the queue{}",
                back.len(),
                if *reset_attempts {
                    " with a full attempt budget"
                } else {
                    ""
                }
            );
            if !*all && back.len() < ids.len() {
                return Err(Failure::Failed(format!(
                    "{} of the {} ids were not dead letters of {name}",
                    ids.len() - back.len(),
                    ids.len()
                )));
            }
            Ok(())
        }
        Dlq::Purge {
            queue: name,
            older_than,
            confirm,
        } => {
            queue(name)?;
            let pool = pool(cli).await?;
            let q = existing(&pool, name).await?;
            let would = q.count_dead_letters(&pool, *older_than).await?;
            if !confirm.go_ahead(&format!("delete {would} dead letters of {name}"))? {
                println!("{name}: {would} dead letters would be deleted (dry run)");
                return Ok(());
            }
            let n = q.purge_dead_letters(&pool, *older_than).await?;
            println!("{name}: {n} dead letters deleted");
            Ok(())
        }
    }
}

async fn jobs(cli: &Cli, cmd: &Jobs) -> Result<(), Failure> {
    match cmd {
        Jobs::List {
            queue: name,
            state,
            page,
            page_size,
            out,
        } => {
            queue(name)?;
            if *page == 0 || *page_size == 0 {
                return Err(Failure::Usage(
                    "--page and --page-size start at 1".to_owned(),
                ));
            }
            let pool = pool(cli).await?;
            let q = existing(&pool, name).await?;
            let list = q
                .jobs(
                    &pool,
                    state.map(StateArg::state),
                    (page - 1) * page_size,
                    *page_size,
                )
                .await?;
            if out.json {
                print_json(&Value::Array(
                    list.iter().map(|j| job_json(name, j)).collect(),
                ));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|j| {
                    vec![
                        j.id.to_string(),
                        j.state.as_str().to_owned(),
                        j.attempts().to_string(),
                        j.message.vt.format("%Y-%m-%d %H:%M:%S").to_string(),
                        short(
                            j.dead_letter("error")
                                .or_else(|| j.apalis_header("last_error")),
                            50,
                        ),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["JOB", "STATE", "ATTEMPTS", "VISIBLE AT (UTC)", "LAST ERROR"],
                    &rows
                )
            );
            Ok(())
        }
        Jobs::Retry {
            queue: name,
            state,
            reset_attempts,
            out,
        } => {
            queue(name)?;
            let pool = pool(cli).await?;
            let q = existing(&pool, name).await?;
            let pairs: Vec<(i64, i64)> = match state {
                RetryArg::Retrying => q
                    .retry_retrying(&pool)
                    .await?
                    .into_iter()
                    .map(|id| (id, id))
                    .collect(),
                RetryArg::Dead => q.replay_dead(&pool, *reset_attempts).await?,
            };
            if out.json {
                let v: Vec<Value> = pairs
                    .iter()
                    .map(|(old, new)| json!({"queue": name, "old_id": old, "new_id": new}))
                    .collect();
                print_json(&Value::Array(v));
            } else {
                for (old, new) in &pairs {
                    if old == new {
                        println!("{name}: job {old} is visible now");
                    } else {
                        println!("{name}: dead job {old} -> job {new}");
                    }
                }
                println!("{name}: {} jobs retried", pairs.len());
            }
            Ok(())
        }
        Jobs::Purge {
            queue: name,
            scheduled,
            confirm,
        } => {
            queue(name)?;
            let pool = pool(cli).await?;
            let q = existing(&pool, name).await?;
            let c = q.counts(&pool).await?;
            let would = c.pending + if *scheduled { c.scheduled } else { 0 };
            let what = if *scheduled {
                "pending and scheduled"
            } else {
                "pending"
            };
            if !confirm.go_ahead(&format!("delete {would} {what} jobs of {name}"))? {
                println!("{name}: {would} {what} jobs would be deleted (dry run)");
                return Ok(());
            }
            let n = q.purge_waiting(&pool, *scheduled).await?;
            println!("{name}: {n} {what} jobs deleted");
            Ok(())
        }
    }
}

async fn job(cli: &Cli, cmd: &Job) -> Result<(), Failure> {
    match cmd {
        Job::Show {
            queue: name,
            id,
            out,
        } => {
            queue(name)?;
            let pool = pool(cli).await?;
            let q = existing(&pool, name).await?;
            let Some(j) = q.job(&pool, *id).await? else {
                return Err(Failure::Failed(format!("no job {id} in {name}")));
            };
            if out.json {
                print_json(&job_json(name, &j));
            } else {
                show_job(&j);
            }
            Ok(())
        }
        Job::Retry {
            queue: name,
            id,
            out,
        } => {
            queue(name)?;
            let pool = pool(cli).await?;
            let q = existing(&pool, name).await?;
            if q.retry_now(&pool, *id).await? {
                report(
                    out,
                    &json!({"queue": name, "old_id": id, "new_id": id}),
                    &format!("{name}: job {id} is visible now"),
                );
                return Ok(());
            }
            let back = q.replay_dead_letters(&pool, Some(&[*id]), false).await?;
            match back.first() {
                Some((_, new_id)) => {
                    report(
                        out,
                        &json!({"queue": name, "old_id": id, "new_id": new_id}),
                        &format!("{name}: dead job {id} -> job {new_id}"),
                    );
                    Ok(())
                }
                None => Err(Failure::Failed(format!(
                    "no job {id} waiting or dead in {name} (done jobs are not retried)"
                ))),
            }
        }
        Job::Delete {
            queue: name,
            id,
            out,
        } => {
            queue(name)?;
            let pool = pool(cli).await?;
            let q = existing(&pool, name).await?;
            if q.delete_job(&pool, *id).await? {
                report(
                    out,
                    &json!({"queue": name, "deleted": id}),
                    &format!("{name}: job {id} deleted"),
                );
                Ok(())
            } else {
                Err(Failure::Failed(format!("no job {id} in {name}")))
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(1)
        }
    }
}

/// How to install PGMQ without `migrate` (its SQL is not printed: the pgmq crate embeds it
/// without exposing the text).
fn pgmq_prerequisite() -> String {
    format!(
        "That SQL is not printed: to install PGMQ yourself, run CREATE EXTENSION pgmq, or \
         PGMQ's pgmq.sql of version {} or later.",
        apalis_pgmq_notify::MIN_PGMQ_VERSION
    )
}
