//! Installing the notification triggers.

use sqlx::{PgExecutor, Row};

use super::NotifyChannels;
use crate::{
    error::{Error, Result},
    queue::QueueName,
};

/// Default byte budget of a per-message event: about 7 KB, under PostgreSQL's 8000-byte NOTIFY
/// payload limit.
pub const DEFAULT_MESSAGE_PAYLOAD_BYTES: u16 = 7000;

/// How a queue's inserts are announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum NotifyMode {
    /// A notification at commit, sent only while a listener has announced that it waits (idle
    /// workers arm a wake-up; event subscribers of this crate ask for every insert): for one
    /// arming, each producer session notifies at most once and one transaction at a time,
    /// however many rows it inserts. The default: busy producers pay nothing while every worker
    /// is busy, because PostgreSQL serialises the commits of notifying transactions.
    #[default]
    OnDemand,
    /// One notification per queue per statement, always (for listeners that do not announce
    /// themselves, e.g. your own `LISTEN`).
    Batch,
    /// One notification per message, with the message and headers inline when the whole event
    /// fits `max_payload_bytes` (counted in bytes), else a signal-only event. Opt-in: every row
    /// costs a NOTIFY, which serialises committing producers.
    Message {
        /// Byte budget of one event (256 to 7999).
        max_payload_bytes: u16,
    },
}

impl NotifyMode {
    /// Per-message events with the default byte budget.
    #[must_use]
    pub fn message() -> Self {
        Self::Message {
            max_payload_bytes: DEFAULT_MESSAGE_PAYLOAD_BYTES,
        }
    }

    /// `"on_demand"`, `"batch"` or `"message"`, with an optional byte budget (message mode
    /// only), as written in a configuration file or on a command line. Without a name: the
    /// message mode when a budget is given, else the default (on-demand).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for another name, a budget with another mode, or a budget outside
    /// 256..=7999.
    ///
    /// # Example
    ///
    /// ```
    /// use apalis_pgmq_notify::NotifyMode;
    /// assert_eq!(NotifyMode::from_name(Some("batch"), None)?, NotifyMode::Batch);
    /// assert_eq!(NotifyMode::from_name(None, None)?, NotifyMode::OnDemand);
    /// assert!(NotifyMode::from_name(Some("message"), Some(9000)).is_err());
    /// # Ok::<(), apalis_pgmq_notify::Error>(())
    /// ```
    pub fn from_name(mode: Option<&str>, max_payload_bytes: Option<u16>) -> Result<Self> {
        let mode = mode.unwrap_or(match max_payload_bytes {
            Some(_) => "message",
            None => "on_demand",
        });
        let parsed = match (mode, max_payload_bytes) {
            ("on_demand", None) => Self::OnDemand,
            ("batch", None) => Self::Batch,
            ("batch" | "on_demand", Some(_)) => {
                return Err(Error::config(
                    "max_payload_bytes",
                    "applies to the message mode only",
                ));
            }
            ("message", bytes) => Self::Message {
                max_payload_bytes: bytes.unwrap_or(DEFAULT_MESSAGE_PAYLOAD_BYTES),
            },
            (other, _) => {
                return Err(Error::config(
                    "notify mode",
                    format!("must be \"on_demand\", \"batch\" or \"message\", got {other:?}"),
                ));
            }
        };
        parsed.validate()?;
        Ok(parsed)
    }

    /// The mode's name as a file or the CLI writes it: `"on_demand"`, `"batch"` or
    /// `"message"`.
    #[must_use]
    pub fn name(self) -> &'static str {
        self.sql_parts().0
    }

    fn sql_parts(self) -> (&'static str, i32) {
        match self {
            Self::OnDemand => ("on_demand", i32::from(DEFAULT_MESSAGE_PAYLOAD_BYTES)),
            Self::Batch => ("batch", i32::from(DEFAULT_MESSAGE_PAYLOAD_BYTES)),
            Self::Message { max_payload_bytes } => ("message", i32::from(max_payload_bytes)),
        }
    }

    fn validate(self) -> Result<()> {
        let (_, bytes) = self.sql_parts();
        if !(256..=7999).contains(&bytes) {
            return Err(Error::config(
                "max_payload_bytes",
                format!(
                    "must be within 256..=7999 (NOTIFY payloads are limited to 8000 bytes), got {bytes}"
                ),
            ));
        }
        Ok(())
    }
}

/// Installs (or replaces) the notification trigger of `queue` with `executor`.
///
/// # Errors
///
/// [`Error::Config`] for an out-of-range mode; [`Error::Database`] if the queue does not exist,
/// [`setup`](crate::setup) has not run, or the role may not create triggers on the queue table.
///
/// # Example
///
/// ```no_run
/// # use apalis_pgmq_notify::{NotifyChannels, NotifyMode, QueueName, enable_notify};
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// let q = QueueName::new("orders")?; // a queue created by another PGMQ client
/// enable_notify(&pool, &q, &NotifyChannels::default(), NotifyMode::Batch).await?;
/// # Ok(()) }
/// ```
pub async fn enable_notify<'c, E: PgExecutor<'c>>(
    executor: E,
    queue: &QueueName,
    channels: &NotifyChannels,
    mode: NotifyMode,
) -> Result<()> {
    mode.validate()?;
    let (mode_name, bytes) = mode.sql_parts();
    let ns = channels.namespace_channel(&channels.namespace(queue));
    sqlx::query(crate::sql::ENABLE_NOTIFY)
        .bind(queue.as_str())
        .bind(channels.queue_channel(queue))
        .bind(ns)
        .bind(mode_name)
        .bind(bytes)
        .execute(executor)
        .await?;
    Ok(())
}

/// Removes the notification trigger of `queue`; `false` if there was none.
///
/// # Errors
///
/// [`Error::Database`] if the statement fails.
///
/// # Example
///
/// ```no_run
/// # use apalis_pgmq_notify::{QueueName, disable_notify};
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// disable_notify(&pool, &QueueName::new("orders")?).await?;
/// # Ok(()) }
/// ```
pub async fn disable_notify<'c, E: PgExecutor<'c>>(executor: E, queue: &QueueName) -> Result<bool> {
    let existed: bool = sqlx::query_scalar(crate::sql::DISABLE_NOTIFY)
        .bind(queue.as_str())
        .fetch_one(executor)
        .await?;
    Ok(existed)
}

/// The installed trigger of `queue`: its mode and its channels (queue, namespace), or `None`.
///
/// # Errors
///
/// [`Error::Database`] if the statement fails.
///
/// # Example
///
/// ```no_run
/// # use apalis_pgmq_notify::{QueueName, notify_mode};
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// if let Some((mode, channels)) = notify_mode(&pool, &QueueName::new("orders")?).await? {
///     println!("{mode:?} on {channels:?}");
/// }
/// # Ok(()) }
/// ```
pub async fn notify_mode<'c, E: PgExecutor<'c>>(
    executor: E,
    queue: &QueueName,
) -> Result<Option<(NotifyMode, Vec<String>)>> {
    let row = sqlx::query(crate::sql::NOTIFY_TRIGGER)
        .bind(queue.as_str())
        .fetch_optional(executor)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let mode: String = row.try_get(0)?;
    let args: Vec<String> = row.try_get(1)?;
    let mode = match mode.as_str() {
        "message" => NotifyMode::Message {
            max_payload_bytes: args
                .get(3)
                .and_then(|b| b.parse().ok())
                .unwrap_or(DEFAULT_MESSAGE_PAYLOAD_BYTES),
        },
        "batch" => NotifyMode::Batch,
        _ => NotifyMode::OnDemand,
    };
    let channels = args
        .into_iter()
        .skip(1)
        .take(2)
        .filter(|c| !c.is_empty())
        .collect();
    Ok(Some((mode, channels)))
}

/// Installs the trigger on `pgmq.meta` that announces created queues on
/// [`NotifyChannels::created_channel`] (idempotent).
///
/// # Errors
///
/// [`Error::Database`] if the role may not create triggers on `pgmq.meta`.
///
/// # Example
///
/// ```no_run
/// # use apalis_pgmq_notify::{NotifyChannels, enable_created_notify};
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// enable_created_notify(&pool, &NotifyChannels::default()).await?;
/// # Ok(()) }
/// ```
pub async fn enable_created_notify<'c, E: PgExecutor<'c>>(
    executor: E,
    channels: &NotifyChannels,
) -> Result<()> {
    sqlx::query(crate::sql::ENABLE_CREATED_NOTIFY)
        .bind(channels.created_channel())
        .execute(executor)
        .await?;
    Ok(())
}

/// Installs the trigger unless the same one is already there (avoids DDL on a busy table).
pub(crate) async fn ensure_notify(
    conn: &mut sqlx::PgConnection,
    queue: &QueueName,
    channels: &NotifyChannels,
    mode: NotifyMode,
) -> Result<()> {
    let wanted = vec![
        channels.queue_channel(queue),
        channels.namespace_channel(&channels.namespace(queue)),
    ];
    match notify_mode(&mut *conn, queue).await? {
        Some((m, c)) if m == mode && c == wanted => Ok(()),
        _ => enable_notify(&mut *conn, queue, channels, mode).await,
    }
}

/// A SQL literal: single quotes doubled. The values passed here are validated names.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The SQL that prepares a database as [`setup`](crate::setup) does once PGMQ is there, for
/// projects that run their own migrations instead of calling `setup` at start-up: this crate's
/// schema and migrations table, every migration `setup` applies (each one only if it is not
/// recorded yet, then recorded with its checksum, so a later `setup` finds it applied), then a
/// trigger for each queue (which must exist when the SQL runs), and the queue-created trigger
/// when `created_events` is set. Every value is written as an escaped SQL literal. PGMQ itself
/// (1.10.0 or newer, in schema `pgmq`) must be installed first. Applying the SQL again changes
/// nothing.
///
/// # Errors
///
/// [`Error::Config`] for an out-of-range mode.
///
/// # Example
///
/// ```
/// # use apalis_pgmq_notify::{NotifyChannels, NotifyMode, QueueName, notify_migration_sql};
/// let sql = notify_migration_sql(&[QueueName::new("email")?], &NotifyChannels::default(),
///                                NotifyMode::Batch, false)?;
/// assert!(sql.contains("apalis_pgmq.enable_notify('email', 'apq.q.email'"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn notify_migration_sql(
    queues: &[QueueName],
    channels: &NotifyChannels,
    mode: NotifyMode,
    created_events: bool,
) -> Result<String> {
    mode.validate()?;
    let (mode_name, bytes) = mode.sql_parts();
    let mut sql = format!(
        "-- Generated by apalis-pgmq-notify {}: its schema apalis_pgmq, as setup() prepares it,\n\
         -- and LISTEN/NOTIFY triggers for PGMQ queues.\n\
         -- Requires PGMQ ({} or newer) in schema pgmq.\n\n",
        env!("CARGO_PKG_VERSION"),
        crate::migrate::MIN_PGMQ_VERSION
    );
    sql.push_str(&crate::migrate::migration_script());
    if !queues.is_empty() || created_events {
        sql.push_str("-- Notification triggers.\n");
    }
    for q in queues {
        sql.push_str(&format!(
            "SELECT apalis_pgmq.enable_notify({}, {}, {}, {}, {});\n",
            literal(q.as_str()),
            literal(&channels.queue_channel(q)),
            literal(&channels.namespace_channel(&channels.namespace(q))),
            literal(mode_name),
            bytes
        ));
    }
    if created_events {
        sql.push_str(&format!(
            "SELECT apalis_pgmq.enable_created_notify({});\n",
            literal(&channels.created_channel())
        ));
    }
    Ok(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_escaped() {
        assert_eq!(literal("a'b"), "'a''b'");
        let sql = notify_migration_sql(
            &[QueueName::new("billing_queue").expect("valid")],
            &NotifyChannels::with_prefix("my.").expect("prefix"),
            NotifyMode::message(),
            true,
        )
        .expect("sql");
        assert!(sql.contains(
            "SELECT apalis_pgmq.enable_notify('billing_queue', 'my.q.billing_queue', 'my.ns.billing', 'message', 7000);"
        ));
        assert!(sql.contains("SELECT apalis_pgmq.enable_created_notify('my.created');"));
        assert!(
            notify_migration_sql(
                &[],
                &NotifyChannels::default(),
                NotifyMode::Message {
                    max_payload_bytes: 9000
                },
                false
            )
            .is_err()
        );
    }
}
