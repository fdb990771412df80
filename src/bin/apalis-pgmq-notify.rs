//! `apalis-pgmq-notify`: a thin command-line wrapper over the library.
//!
//! ```text
//! apalis-pgmq-notify migrate
//! apalis-pgmq-notify enable-notify <queue>... [channel options] [--mode on_demand|batch|message]
//! apalis-pgmq-notify disable-notify <queue>...
//! apalis-pgmq-notify generate-migration [<queue>...] [channel options] [--created-events] [--output FILE]
//! apalis-pgmq-notify validate <config.json>
//! apalis-pgmq-notify drop-queue <queue>...
//! ```
//!
//! Exit status: 0 on success, 1 when the operation fails, 2 for bad usage or input.

use std::process::ExitCode;

use apalis_pgmq_notify::{
    ConfigFile, NotifyChannels, NotifyMode, QueueName, disable_notify, drop_queue_and_dead_letters,
    enable_notify, notify_migration_sql, notify_mode, setup,
};

const USAGE: &str = "\
usage: apalis-pgmq-notify <command> [options]

commands:
  migrate                       install or check PGMQ, apply this crate's migrations
  enable-notify <queue>...      install LISTEN/NOTIFY triggers on existing PGMQ queues
  disable-notify <queue>...     remove them
  generate-migration [<queue>...]
                                print (or --output) the SQL that installs notifications,
                                for projects that run their own migrations
  validate <config.json>        check a storage configuration file
  drop-queue <queue>...         drop queues with their dead-letter queues and archives

options:
  --database-url URL            database (default: $DATABASE_URL)
  --prefix P                    channel prefix (default apq.)
  --namespace-pattern RE        regex with a (?P<namespace>...) group
                                (default (?P<namespace>\\w+)_queue)
  --default-namespace NS        namespace of queues the pattern misses (default: default)
  --mode on_demand|batch|message
                                one NOTIFY per statement while a worker waits (default),
                                always, or one per message with the payload
  --max-payload-bytes N         byte budget of a per-message event (default 7000)
  --created-events              generate-migration: also announce created queues
  --output FILE                 generate-migration: write the SQL to FILE
";

/// A usage or input error (exit 2) or a failed operation (exit 1).
enum Failure {
    Usage(String),
    Failed(String),
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self::Failed(e.to_string())
    }
}

#[derive(Default)]
struct Args {
    command: String,
    positional: Vec<String>,
    database_url: Option<String>,
    prefix: Option<String>,
    namespace_pattern: Option<String>,
    default_namespace: Option<String>,
    mode: Option<String>,
    max_payload_bytes: Option<String>,
    created_events: bool,
    output: Option<String>,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, Failure> {
    let mut args = Args::default();
    let usage = |m: String| Failure::Usage(m);
    while let Some(arg) = argv.next() {
        let mut value = |name: &str| {
            argv.next()
                .ok_or_else(|| usage(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "-h" | "--help" => args.command = "help".to_owned(),
            "--database-url" => args.database_url = Some(value("--database-url")?),
            "--prefix" => args.prefix = Some(value("--prefix")?),
            "--namespace-pattern" => args.namespace_pattern = Some(value("--namespace-pattern")?),
            "--default-namespace" => args.default_namespace = Some(value("--default-namespace")?),
            "--mode" => args.mode = Some(value("--mode")?),
            "--max-payload-bytes" => args.max_payload_bytes = Some(value("--max-payload-bytes")?),
            "--created-events" => args.created_events = true,
            "--output" => args.output = Some(value("--output")?),
            flag if flag.starts_with("--") => return Err(usage(format!("unknown option {flag}"))),
            _ if args.command.is_empty() => args.command = arg,
            _ => args.positional.push(arg),
        }
    }
    Ok(args)
}

impl Args {
    fn channels(&self) -> Result<NotifyChannels, Failure> {
        let mut c = match &self.prefix {
            Some(p) => NotifyChannels::with_prefix(p).map_err(|e| Failure::Usage(e.to_string()))?,
            None => NotifyChannels::default(),
        };
        if self.namespace_pattern.is_some() || self.default_namespace.is_some() {
            c = c
                .namespace_pattern(
                    self.namespace_pattern
                        .as_deref()
                        .unwrap_or(apalis_pgmq_notify::DEFAULT_NAMESPACE_PATTERN),
                    self.default_namespace
                        .as_deref()
                        .unwrap_or(apalis_pgmq_notify::DEFAULT_NAMESPACE),
                )
                .map_err(|e| Failure::Usage(e.to_string()))?;
        }
        Ok(c)
    }

    fn mode(&self) -> Result<NotifyMode, Failure> {
        let bytes = match &self.max_payload_bytes {
            Some(b) => Some(b.parse::<u16>().map_err(|_| {
                Failure::Usage(format!(
                    "--max-payload-bytes {b:?} is not a number up to 7999"
                ))
            })?),
            None => None,
        };
        NotifyMode::from_name(self.mode.as_deref(), bytes)
            .map_err(|e| Failure::Usage(e.to_string()))
    }

    /// Queue names, validated before anything connects to the database.
    fn queues(&self) -> Result<Vec<QueueName>, Failure> {
        self.positional
            .iter()
            .map(|q| QueueName::new(q).map_err(|e| Failure::Usage(e.to_string())))
            .collect()
    }

    async fn pool(&self) -> Result<sqlx::PgPool, Failure> {
        let url = match &self.database_url {
            Some(u) => u.clone(),
            None => std::env::var("DATABASE_URL").map_err(|_| {
                Failure::Usage("set DATABASE_URL or pass --database-url".to_owned())
            })?,
        };
        Ok(sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await?)
    }
}

async fn run(args: Args) -> Result<(), Failure> {
    match args.command.as_str() {
        "" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        "migrate" => {
            let pool = args.pool().await?;
            let r = setup(&pool).await?;
            println!(
                "PGMQ {} ({}); migrations applied now: {}",
                r.pgmq_version,
                r.pgmq_source,
                if r.applied_migrations.is_empty() {
                    "none (up to date)".to_owned()
                } else {
                    format!("{:?}", r.applied_migrations)
                }
            );
            Ok(())
        }
        "enable-notify" => {
            let queues = args.queues()?;
            if queues.is_empty() {
                return Err(Failure::Usage(
                    "enable-notify needs at least one queue".to_owned(),
                ));
            }
            let channels = args.channels()?;
            let mode = args.mode()?;
            let pool = args.pool().await?;
            for q in &queues {
                enable_notify(&pool, q, &channels, mode).await?;
                let installed = notify_mode(&pool, q).await?;
                println!("{q}: {installed:?}");
            }
            Ok(())
        }
        "disable-notify" => {
            let queues = args.queues()?;
            if queues.is_empty() {
                return Err(Failure::Usage(
                    "disable-notify needs at least one queue".to_owned(),
                ));
            }
            let pool = args.pool().await?;
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
        "generate-migration" => {
            let queues = args.queues()?;
            let sql = notify_migration_sql(
                &queues,
                &args.channels()?,
                args.mode()?,
                args.created_events,
            )
            .map_err(|e| Failure::Usage(e.to_string()))?;
            match &args.output {
                Some(path) => {
                    std::fs::write(path, &sql)?;
                    eprintln!("wrote {path} ({} bytes)", sql.len());
                }
                None => print!("{sql}"),
            }
            Ok(())
        }
        "validate" => {
            let [path] = args.positional.as_slice() else {
                return Err(Failure::Usage("validate needs exactly one file".to_owned()));
            };
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::Usage(format!("{path}: {e}")))?;
            let file =
                ConfigFile::from_json(&text).map_err(|e| Failure::Usage(format!("{path}: {e}")))?;
            println!("{path}: valid (queue {})", file.queue);
            println!("{:#?}", file.config);
            Ok(())
        }
        "drop-queue" => {
            let queues = args.queues()?;
            if queues.is_empty() {
                return Err(Failure::Usage(
                    "drop-queue needs at least one queue".to_owned(),
                ));
            }
            let pool = args.pool().await?;
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
        other => Err(Failure::Usage(format!("unknown command {other:?}"))),
    }
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(Failure::Usage(m) | Failure::Failed(m)) => {
            eprintln!("error: {m}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
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
    match runtime.block_on(run(args)) {
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
