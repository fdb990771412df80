//! Error types: [`Error`], told apart by what a caller does about them, and
//! [`QueueNameError`]. PostgreSQL's error codes are read in one place, [`pg`].

pub(crate) mod pg;

use apalis_core::task::task_id::TaskId;

/// A boxed error from a codec or another library.
pub type BoxDynError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in this crate.
///
/// Errors are values, never panics, and the variants separate what a caller does next:
///
/// | the caller | variants |
/// |---|---|
/// | retries (see [`Error::is_retryable`]) | [`Conflict`](Error::Conflict), [`Unreachable`](Error::Unreachable) |
/// | fixes a setting or its code | [`Config`](Error::Config), [`ConfigFile`](Error::ConfigFile), [`InvalidQueueName`](Error::InvalidQueueName), [`NoTokioRuntime`](Error::NoTokioRuntime), [`PayloadTooLarge`](Error::PayloadTooLarge) |
/// | fixes the data (a value does not encode or decode) | [`Codec`](Error::Codec), [`ResultType`](Error::ResultType) |
/// | fixes the connection settings | [`ConnectionRejected`](Error::ConnectionRejected), [`TransactionPooler`](Error::TransactionPooler), [`ReadOnly`](Error::ReadOnly) |
/// | sets the database up | [`NotSetUp`](Error::NotSetUp), [`QueueMissing`](Error::QueueMissing), [`SchemaMismatch`](Error::SchemaMismatch), [`PgmqTooOld`](Error::PgmqTooOld), [`PgmqInstall`](Error::PgmqInstall), [`Migration`](Error::Migration) |
/// | grants a right | [`MissingPrivilege`](Error::MissingPrivilege), [`PermissionDenied`](Error::PermissionDenied), [`ResultsUnreadable`](Error::ResultsUnreadable) |
/// | takes the answer | [`Duplicate`](Error::Duplicate), [`NotFound`](Error::NotFound), [`Timeout`](Error::Timeout), [`Stopped`](Error::Stopped) |
///
/// [`Database`](Error::Database) is everything else the server reported. No message carries
/// PostgreSQL's "at line N" (a line of the server's own source code).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A queue name failed validation; no SQL was run.
    #[error(transparent)]
    InvalidQueueName(#[from] QueueNameError),

    /// A setting is out of range or inconsistent; nothing ran. Fix the value: retrying cannot
    /// help.
    #[error("invalid configuration: {setting}: {reason}")]
    Config {
        /// The setting, by its key in a configuration file (`leases.visibility_timeout`), or
        /// the argument it came from (`channel prefix`).
        setting: String,
        /// What is wrong with it, with its value and what is allowed.
        reason: String,
    },

    /// A configuration file could not be read or does not parse: malformed TOML or JSON, an
    /// unknown key, a value of the wrong type.
    #[error("{}", file_location(path.as_deref(), *line, *column, message))]
    ConfigFile {
        /// The file, when read from one.
        path: Option<String>,
        /// The 1-based line of the problem, when known.
        line: Option<usize>,
        /// The 1-based column of the problem, when known.
        column: Option<usize>,
        /// What is wrong, starting with the dotted key of the value (`retries.backoff.base:`)
        /// when there is one.
        message: String,
    },

    /// Background work (a worker's completer and lease keeper) was started outside a tokio
    /// runtime.
    #[error("PgmqStorage workers must run inside a tokio runtime")]
    NoTokioRuntime,

    /// A value could not be encoded or decoded (a job's arguments with the storage's codec, a
    /// body as JSON); nothing was written. Retrying the same value cannot help.
    #[error("could not encode or decode {what}: {source}")]
    Codec {
        /// What was being encoded or decoded.
        what: &'static str,
        /// The codec's error.
        #[source]
        source: BoxDynError,
    },

    /// Another transaction won a race (a serialization failure or deadlock, a lock not
    /// available, a key taken by a job this transaction cannot see): run the transaction
    /// again. [`Error::is_retryable`] is true.
    #[error("conflict with another transaction ({reason}); retry the transaction")]
    Conflict {
        /// What conflicted, as PostgreSQL or this crate reported it.
        reason: String,
    },

    /// The database could not be reached or the connection was lost: refused, timed out,
    /// reset, the server shutting down or out of connection slots. Try again later;
    /// [`Error::is_retryable`] is true.
    #[error("cannot reach the database: {cause}")]
    Unreachable {
        /// Why (the connect error itself, not the pool's "timed out").
        cause: String,
    },

    /// The server refused this login or database: a wrong password, an unknown role, a
    /// database that does not exist, a `pg_hba.conf` rule. Fix the connection settings;
    /// retrying cannot help.
    #[error(
        "the database refused the connection: {cause}; check the database URL (user, password, database name)"
    )]
    ConnectionRejected {
        /// The server's reason.
        cause: String,
    },

    /// The connection goes through a pooler that shares server sessions between clients from
    /// one transaction to the next (PgBouncer `pool_mode = transaction` or `statement`), where
    /// sqlx's prepared statements can run on another client's session (wrong results), LISTEN
    /// receives nothing and session locks leak. Nothing ran. See
    /// [`check_session_pooling`](crate::check_session_pooling).
    #[error(
        "{what} goes through a connection pooler in transaction or statement mode (e.g. PgBouncer \
         pool_mode = transaction), which shares server sessions between clients: this crate's \
         prepared statements would run on other clients' sessions. Set pool_mode = session for \
         this database in pgbouncer.ini, or connect directly to PostgreSQL (the listener alone \
         can be given a direct connection with Runtime::listener_connect_options)"
    )]
    TransactionPooler {
        /// Which connection: the pool's, the listener's, the CLI's.
        what: String,
    },

    /// The server does not take writes: a hot standby (a read replica) or a server or role
    /// with `default_transaction_read_only` on (SQLSTATE 25006). Connect to the primary.
    #[error(
        "the database is read-only: {reason}; connect to the primary (a replica serves reads only)"
    )]
    ReadOnly {
        /// Why, and what would have written.
        reason: String,
    },

    /// The database has not been prepared: PGMQ or this crate's SQL is missing.
    #[error(
        "the database is not set up for apalis-pgmq-notify ({what}): call apalis_pgmq_notify::setup(&pool) \
         at start-up or run `apalis-pgmq-notify migrate` once"
    )]
    NotSetUp {
        /// What is missing, as PostgreSQL reported it.
        what: String,
    },

    /// The queue does not exist (its table is missing).
    #[error(
        "queue {queue:?} does not exist: create it with PgmqStorage::create_queue() (or \
         pgmq.create('{queue}'), or `apalis-pgmq-notify create-queue {queue}`); a worker creates its \
         own queue when it starts. If PGMQ itself is missing, call apalis_pgmq_notify::setup(&pool) \
         (or run `apalis-pgmq-notify migrate`) first"
    )]
    QueueMissing {
        /// The queue's name.
        queue: String,
    },

    /// The database lacks something this operation needs that [`setup`](crate::setup) does
    /// not provide, or does not match this build: an extension (pg_partman), a queue's
    /// unique-key index, a statement that does not prepare.
    #[error("{what}")]
    SchemaMismatch {
        /// What is missing or different, and how to fix it.
        what: String,
    },

    /// The job or task asked for does not exist (in the state the operation needs).
    #[error("not found: {0}")]
    NotFound(String),

    /// PGMQ is installed but older than the version whose SQL this crate relies on.
    #[error(
        "PGMQ {found} is installed in this database, but apalis-pgmq-notify needs PGMQ {required} or newer; \
         upgrade PGMQ (ALTER EXTENSION pgmq UPDATE, or re-run its SQL install) and try again"
    )]
    PgmqTooOld {
        /// The version found (or a description of what was found when no version is recorded).
        found: String,
        /// The oldest version this crate supports.
        required: &'static str,
    },

    /// Installing PGMQ's SQL API failed.
    #[error("installing PGMQ failed: {0}")]
    PgmqInstall(String),

    /// One of the project's own migrations failed or was altered after being applied.
    #[error("migration {version} ({name}): {reason}")]
    Migration {
        /// Migration number.
        version: i32,
        /// Migration name.
        name: &'static str,
        /// What went wrong.
        reason: String,
    },

    /// A payload (message plus headers) is larger than the configured limit; nothing was written.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes; nothing was enqueued")]
    PayloadTooLarge {
        /// Encoded size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },

    /// A unique index refused a row: on a queue table, a job with the same idempotency key is
    /// pending, scheduled, running or waiting for a retry (a push through
    /// [`push_task_with`](crate::PgmqStorage::push_task_with) reports that as
    /// [`Pushed::duplicate`](crate::Pushed::duplicate) instead). Nothing was written.
    #[error("{what}")]
    Duplicate {
        /// The index or constraint, when PostgreSQL named it.
        constraint: Option<String>,
        /// What was refused.
        what: String,
    },

    /// The database role lacks a right the operation needs: checked before acting (a
    /// worker's start), so nothing was done, and the `GRANT` that gives it is known.
    #[error(
        "role {role:?} lacks {right}, needed for {needed_for}; grant it (e.g. `{grant}`) or run as a role that has it"
    )]
    MissingPrivilege {
        /// The role the connection uses.
        role: String,
        /// The missing right, e.g. `UPDATE on pgmq.q_email`.
        right: String,
        /// What the right is needed for.
        needed_for: &'static str,
        /// A statement that grants it.
        grant: String,
    },

    /// PostgreSQL refused a statement for a missing right (SQLSTATE 42501); the statement did
    /// nothing. The README's "Rights" lists what each role needs.
    #[error(
        "permission denied: {what}; grant the right to this role (see the README's \"Rights\")"
    )]
    PermissionDenied {
        /// PostgreSQL's message, naming the object.
        what: String,
    },

    /// A job did not finish within the time a waiter allowed; the job itself is unaffected.
    #[error(
        "job {task_id} (message {msg_id}) did not finish within {waited:?}; it is still pending, running or waiting for a retry (its result can be read later if it is kept)"
    )]
    Timeout {
        /// The task id waited for (the producer's, or the message id).
        task_id: TaskId,
        /// The job's message id.
        msg_id: i64,
        /// How long the waiter waited.
        waited: std::time::Duration,
    },

    /// A stored job result does not decode as the type the waiter asked for.
    #[error("the result of job {task_id} does not decode as {expected}: {error}")]
    ResultType {
        /// The job.
        task_id: TaskId,
        /// The type asked for.
        expected: &'static str,
        /// The decoding error.
        error: String,
    },

    /// Job results cannot be read: the role lacks `SELECT` on `apalis_pgmq.results`, or
    /// [`setup`](crate::setup) has not created it. Waiting would not help.
    #[error(
        "job results cannot be read ({0}); grant SELECT on apalis_pgmq.results to this role, and run apalis_pgmq_notify::setup(&pool) (or `apalis-pgmq-notify migrate`) if the table is missing"
    )]
    ResultsUnreadable(String),

    /// A background task the backend depends on is gone (the runtime is shutting down).
    #[error("background task stopped: {0}")]
    Stopped(&'static str),

    /// Any other error the database reported.
    #[error("database error: {}", describe(.0))]
    Database(sqlx::Error),
}

impl Error {
    /// Whether the same operation may succeed if tried again: a conflict with another
    /// transaction ([`Error::Conflict`]; run the whole transaction again), a database out of
    /// reach ([`Error::Unreachable`]; later), or a pool with no free connection in time.
    /// Everything else needs a change first (a setting, the schema, a right, the data).
    ///
    /// # Example
    ///
    /// ```
    /// use apalis_pgmq_notify::Error;
    /// let e = Error::Conflict { reason: "could not serialize access".into() };
    /// assert!(e.is_retryable());
    /// ```
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Conflict { .. }
                | Self::Unreachable { .. }
                | Self::Database(sqlx::Error::PoolTimedOut)
        )
    }

    /// The SQLSTATE PostgreSQL reported, for errors that came from the server as they are
    /// ([`Error::Database`]).
    #[must_use]
    pub fn sqlstate(&self) -> Option<std::borrow::Cow<'_, str>> {
        match self {
            Self::Database(e) => pg::code(e),
            _ => None,
        }
    }

    /// A configuration error for `setting`.
    pub(crate) fn config(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config {
            setting: setting.into(),
            reason: reason.into(),
        }
    }

    /// The message without the "invalid configuration" lead, for errors inside a larger one.
    pub(crate) fn short(&self) -> String {
        match self {
            Self::Config { setting, reason } => format!("{setting}: {reason}"),
            other => other.to_string(),
        }
    }

    /// A codec's error.
    pub(crate) fn codec(what: &'static str, e: impl Into<BoxDynError>) -> Self {
        Self::Codec {
            what,
            source: e.into(),
        }
    }
}

/// `config.toml:3:5: message`, or `configuration: message` without a file.
fn file_location(
    path: Option<&str>,
    line: Option<usize>,
    column: Option<usize>,
    message: &str,
) -> String {
    let mut out = path.unwrap_or("configuration").to_owned();
    if let Some(l) = line {
        out.push_str(&format!(":{l}"));
        if let Some(c) = column {
            out.push_str(&format!(":{c}"));
        }
    }
    format!("{out}: {message}")
}

/// A database error as people read it: the server's message (with its detail and hint), never
/// the "at line N" that sqlx's `Display` appends (a line of PostgreSQL's own source). Every log
/// line and error message that shows a `sqlx::Error` goes through here.
pub(crate) fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => {
            let mut text = db.message().to_owned();
            if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                if let Some(detail) = pg.detail() {
                    text.push_str(": ");
                    text.push_str(detail);
                }
                if let Some(hint) = pg.hint() {
                    text.push_str(" (hint: ");
                    text.push_str(hint);
                    text.push(')');
                }
            }
            text
        }
        other => other.to_string(),
    }
}

/// Errors as log lines and messages show them: one formatting for the crate's errors and
/// sqlx's ([`describe`]), so no "at line N" reaches a log.
pub(crate) trait Describe {
    /// The error's text for a person.
    fn describe(&self) -> String;
}

impl Describe for sqlx::Error {
    fn describe(&self) -> String {
        describe(self)
    }
}

impl Describe for Error {
    fn describe(&self) -> String {
        self.to_string()
    }
}

/// Another library's error text with sqlx's " at line N" (PostgreSQL's own source line)
/// removed, for errors that wrap a `sqlx::Error` we cannot reach (the `pgmq` crate's).
#[cfg(any(feature = "install-pgmq", test))]
pub(crate) fn without_server_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(" at line ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + " at line ".len()..];
        let digits = after.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            out.push_str(" at line ");
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Self::codec("a value as JSON", e)
    }
}

impl From<sqlx::Error> for Error {
    /// Classifies what a caller can act on, by the SQLSTATE ([`pg::classify`]): a conflict to
    /// retry, a server out of reach or refusing the login, a missing right, a duplicate key, a
    /// database never set up or a queue that does not exist; everything else stays
    /// [`Error::Database`].
    fn from(e: sqlx::Error) -> Self {
        if matches!(e, sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed) {
            return Self::Unreachable {
                cause: describe(&e),
            };
        }
        let Some(db) = e.as_database_error() else {
            return Self::Database(e);
        };
        let message = db.message().to_owned();
        match pg::class_of(&e) {
            pg::Class::Conflict => Self::Conflict { reason: message },
            pg::Class::Unreachable => Self::Unreachable { cause: message },
            pg::Class::Rejected => Self::ConnectionRejected { cause: message },
            pg::Class::Privilege => Self::PermissionDenied { what: message },
            pg::Class::ReadOnly => Self::ReadOnly {
                reason: format!(
                    "{message} (a hot standby, or default_transaction_read_only is on)"
                ),
            },
            pg::Class::Duplicate => {
                let constraint = db.constraint().map(str::to_owned);
                let what = match constraint.as_deref() {
                    Some(c) if c.ends_with("_key_idx") => format!(
                        "a job with the same idempotency key is already pending, scheduled, running, waiting for a retry or finished within its idempotency window ({message}); nothing was written"
                    ),
                    _ => format!("{message}; nothing was written"),
                };
                Self::Duplicate { constraint, what }
            }
            pg::Class::Undefined => {
                if pg::is_undefined_table(&e)
                    && let Some(queue) = missing_queue(&message)
                {
                    return Self::QueueMissing { queue };
                }
                if message.contains("pgmq") || message.contains("apalis_pgmq") {
                    return Self::NotSetUp { what: message };
                }
                Self::Database(e)
            }
            pg::Class::Data | pg::Class::Other => Self::Database(e),
        }
    }
}

/// The queue named by `relation "pgmq.q_<queue>" does not exist` (or `a_`), if that is it.
fn missing_queue(message: &str) -> Option<String> {
    let start = message.find("\"pgmq.")? + "\"pgmq.".len();
    let rest = &message[start..];
    let table = &rest[..rest.find('"')?];
    let queue = table
        .strip_prefix("q_")
        .or_else(|| table.strip_prefix("a_"))?;
    Some(queue.trim_end_matches("_dlq").to_owned()).filter(|q| !q.is_empty())
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a queue name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueueNameError {
    /// The name is empty.
    #[error("invalid queue name: the name is empty")]
    Empty,
    /// The name is longer than [`MAX_QUEUE_NAME_LEN`](crate::MAX_QUEUE_NAME_LEN) bytes.
    #[error(
        "invalid queue name {name:?}: {len} bytes is longer than the maximum of {max} bytes \
         (derived identifiers such as archived_at_idx_<name>_dlq must fit PostgreSQL's 63 bytes)"
    )]
    TooLong {
        /// The rejected name.
        name: String,
        /// Its length in bytes.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The name contains a character outside `[a-z0-9_]`, or starts with a digit.
    #[error(
        "invalid queue name {name:?}: character {ch:?} at byte {position} is not allowed; \
         use lower-case ASCII letters, digits and '_', starting with a letter or '_'"
    )]
    InvalidCharacter {
        /// The rejected name.
        name: String,
        /// The offending character.
        ch: char,
        /// Its byte offset.
        position: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lines_are_removed_from_foreign_text() {
        assert_eq!(
            without_server_line("schema \"pgmq\" does not exist at line 3099"),
            "schema \"pgmq\" does not exist"
        );
        assert_eq!(
            without_server_line("nothing at line x"),
            "nothing at line x"
        );
    }

    #[test]
    fn missing_queue_tables_name_the_queue() {
        assert_eq!(
            missing_queue("relation \"pgmq.q_email\" does not exist").as_deref(),
            Some("email")
        );
        assert_eq!(
            missing_queue("relation \"pgmq.a_email_dlq\" does not exist").as_deref(),
            Some("email")
        );
        assert_eq!(missing_queue("relation \"users\" does not exist"), None);
    }

    #[test]
    fn retryable_errors_are_the_transient_ones() {
        assert!(
            Error::Conflict {
                reason: String::new()
            }
            .is_retryable()
        );
        assert!(
            Error::Unreachable {
                cause: String::new()
            }
            .is_retryable()
        );
        assert!(Error::Database(sqlx::Error::PoolTimedOut).is_retryable());
        assert!(
            !Error::NotSetUp {
                what: String::new()
            }
            .is_retryable()
        );
        assert!(!Error::config("x", "y").is_retryable());
        assert!(matches!(
            Error::from(sqlx::Error::Io(std::io::Error::other("reset"))),
            Error::Unreachable { .. }
        ));
    }
}
