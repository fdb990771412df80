//! `apalis-pgmq-notify`: operate PGMQ queues used by apalis workers. A thin layer over the
//! library: every command calls a public function applications can call too.
//!
//! ```text
//! apalis-pgmq-notify migrate [--check] [--dry-run]
//! apalis-pgmq-notify queues [--json]
//! apalis-pgmq-notify dlq list <queue> [--page N] [--page-size N] [--json]
//! apalis-pgmq-notify dlq show <queue> <id> [--json]
//! apalis-pgmq-notify dlq replay <queue> (<id>... | --all) [--reset-attempts]
//! apalis-pgmq-notify dlq purge <queue> [--older-than 7d]
//! apalis-pgmq-notify job show|retry|delete <queue> <id>
//! apalis-pgmq-notify pause <queue> / resume <queue>
//! apalis-pgmq-notify workers [--queue Q] [--json]
//! apalis-pgmq-notify snapshots [--json]
//! apalis-pgmq-notify prune [<queue>...] [--archive-retention 7d] [--dead-letter-retention 30d] [--result-retention 1d]
//! apalis-pgmq-notify create-queue <queue> [--partitioned --partition-interval N --retention-interval N]
//! apalis-pgmq-notify enable-notify|disable-notify|drop-queue <queue>...
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
    Config, Error, HumanDuration, JobRecord, NotifyChannels, NotifyMode, PgmqQueue, PgmqStorage,
    QueueName, Runtime, disable_notify, drop_queue_and_dead_letters, enable_notify,
    notify_migration_sql, notify_mode, pause, pending_migrations, prune, prune_results,
    queues_overview, resume, running_workers, setup,
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
    /// Give up connecting after this long, reporting why (e.g. "5s").
    #[arg(long, global = true, default_value = "5s", value_parser = duration)]
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
        /// Print the SQL of the pending migrations instead of running it.
        #[arg(long, conflicts_with = "check")]
        dry_run: bool,
    },
    /// Every queue: depth, visible, scheduled, in flight, oldest pending, archive, dead letters,
    /// notify mode, paused.
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
    Pause { queue: String },
    /// Let a paused queue's workers claim jobs again (and wake them).
    Resume {
        queue: String,
        #[command(flatten)]
        channels: Channels,
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
    },
    /// Drop queues with their dead-letter queues and archives.
    DropQueue {
        #[arg(required = true)]
        queues: Vec<String>,
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
    },
    /// Delete dead letters.
    Purge {
        queue: String,
        /// Only those dead for longer than this (e.g. "7d").
        #[arg(long, value_parser = duration)]
        older_than: Option<Duration>,
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
    Retry { queue: String, id: i64 },
    /// Delete a job from the queue or the dead letters.
    Delete { queue: String, id: i64 },
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
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| Failure::Usage(format!("database URL: {e}")))?;
    match tokio::time::timeout(cli.connect_timeout, options.connect()).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
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

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// A job as JSON: what an operator needs, with stable keys.
fn job_json(j: &JobRecord) -> Value {
    json!({
        "id": j.id,
        "state": j.state.as_str(),
        "read_ct": j.message.read_ct,
        "attempts": j.apalis_header("attempts").or_else(|| j.dead_letter("attempts")),
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
        (
            "attempts",
            j.apalis_header("attempts")
                .or_else(|| j.dead_letter("attempts"))
                .unwrap_or_else(|| j.message.read_ct.to_string()),
        ),
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
        Command::Migrate { check, dry_run } => {
            let pool = pool(&cli).await?;
            if *check || *dry_run {
                let pending = pending_migrations(&pool).await?;
                if *dry_run {
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
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|q| {
                    vec![
                        q.queue.clone(),
                        q.depth.to_string(),
                        q.visible.to_string(),
                        q.scheduled.to_string(),
                        q.in_flight.to_string(),
                        age(q.oldest_pending_secs),
                        q.archived.to_string(),
                        q.dead_letters.to_string(),
                        q.notify.clone().unwrap_or_else(|| "-".to_owned()),
                        if q.paused { "yes" } else { "no" }.to_owned(),
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
                        "IN FLIGHT",
                        "OLDEST PENDING",
                        "ARCHIVED",
                        "DEAD",
                        "NOTIFY",
                        "PAUSED"
                    ],
                    &rows
                )
            );
            Ok(())
        }
        Command::Dlq(cmd) => dlq(&cli, cmd).await,
        Command::Job(cmd) => job(&cli, cmd).await,
        Command::Pause { queue: name } => {
            let q = queue(name)?;
            let pool = pool(&cli).await?;
            let changed = pause(&pool, &q).await?;
            println!("{q}: {}", if changed { "paused" } else { "already paused" });
            Ok(())
        }
        Command::Resume {
            queue: name,
            channels: c,
        } => {
            let q = queue(name)?;
            let ch = channels(c)?;
            let pool = pool(&cli).await?;
            let changed = resume(&pool, &q, &ch).await?;
            println!(
                "{q}: {}",
                if changed { "resumed" } else { "was not paused" }
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
            let targets: Vec<QueueName> = if names.is_empty() {
                queues_overview(&pool)
                    .await?
                    .into_iter()
                    .filter_map(|q| QueueName::new(&q.queue).ok())
                    .collect()
            } else {
                names.iter().map(|n| queue(n)).collect::<Result<_, _>>()?
            };
            for q in targets {
                let n = prune(&pool, &q, archive_retention.0, dead_letter_retention.0).await?;
                let results = match result_retention.0 {
                    Some(keep) => prune_results(&pool, &q, keep).await?,
                    None => 0,
                };
                println!(
                    "{q}: {} archived and {} dead jobs deleted, {results} results",
                    n.archived, n.dead_letters
                );
            }
            Ok(())
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
            Ok(())
        }
        Command::DropQueue { queues: names } => {
            let queues: Vec<QueueName> =
                names.iter().map(|n| queue(n)).collect::<Result<_, _>>()?;
            let pool = pool(&cli).await?;
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
            let q = PgmqQueue::new(queue(name)?);
            if *page == 0 || *page_size == 0 {
                return Err(Failure::Usage(
                    "--page and --page-size start at 1".to_owned(),
                ));
            }
            let pool = pool(cli).await?;
            let dead = q
                .dead_letters(&pool, (page - 1) * page_size, *page_size)
                .await?;
            if out.json {
                print_json(&Value::Array(dead.iter().map(job_json).collect()));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = dead
                .iter()
                .map(|j| {
                    vec![
                        j.id.to_string(),
                        j.dead_letter("reason").unwrap_or_default(),
                        j.dead_letter("attempts").unwrap_or_default(),
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
            let q = PgmqQueue::new(queue(name)?);
            let pool = pool(cli).await?;
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
                print_json(&job_json(&j));
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
        } => {
            let q = PgmqQueue::new(queue(name)?);
            if ids.is_empty() && !all {
                return Err(Failure::Usage(
                    "name the job ids to replay, or pass --all".to_owned(),
                ));
            }
            let pool = pool(cli).await?;
            let which = if *all { None } else { Some(ids.as_slice()) };
            let back = q.replay_dead_letters(&pool, which, *reset_attempts).await?;
            println!(
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
        } => {
            let q = PgmqQueue::new(queue(name)?);
            let pool = pool(cli).await?;
            let n = q.purge_dead_letters(&pool, *older_than).await?;
            println!("{name}: {n} dead letters deleted");
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
            let q = PgmqQueue::new(queue(name)?);
            let pool = pool(cli).await?;
            let Some(j) = q.job(&pool, *id).await? else {
                return Err(Failure::Failed(format!("no job {id} in {name}")));
            };
            if out.json {
                print_json(&job_json(&j));
            } else {
                show_job(&j);
            }
            Ok(())
        }
        Job::Retry { queue: name, id } => {
            let q = PgmqQueue::new(queue(name)?);
            let pool = pool(cli).await?;
            if q.retry_now(&pool, *id).await? {
                println!("{name}: job {id} is visible now");
                return Ok(());
            }
            let back = q.replay_dead_letters(&pool, Some(&[*id]), false).await?;
            match back.first() {
                Some(new_id) => {
                    println!("{name}: dead job {id} replayed as job {new_id}");
                    Ok(())
                }
                None => Err(Failure::Failed(format!(
                    "no job {id} waiting or dead in {name} (done jobs are not retried)"
                ))),
            }
        }
        Job::Delete { queue: name, id } => {
            let q = PgmqQueue::new(queue(name)?);
            let pool = pool(cli).await?;
            if q.delete_job(&pool, *id).await? {
                println!("{name}: job {id} deleted");
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
