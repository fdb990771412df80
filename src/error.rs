//! Error types.

/// Everything that can go wrong in this crate.
///
/// Errors are values, never panics: a bad queue name, an oversize payload, an old PGMQ or a database
/// that went away each arrive here with enough context to act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A queue name failed validation; no SQL was run.
    #[error(transparent)]
    InvalidQueueName(#[from] QueueNameError),

    /// The database returned an error or could not be reached.
    #[error("database error: {}", strip_line(&.0.to_string()))]
    Database(sqlx::Error),

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
         pgmq.create('{queue}')); a worker creates its own queue when it starts. If PGMQ itself \
         is missing, call apalis_pgmq_notify::setup(&pool) first"
    )]
    QueueMissing {
        /// The queue's name.
        queue: String,
    },

    /// The job or task asked for does not exist (in the state the operation needs).
    #[error("not found: {0}")]
    NotFound(String),

    /// No connection to the database could be made; `cause` is the connect error itself (not
    /// the pool's "timed out").
    #[error("cannot reach the database: {cause}")]
    Unreachable {
        /// Why connecting failed (refused, authentication, too many connections, ...).
        cause: String,
    },

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

    /// A value could not be encoded to or decoded from JSON.
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),

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

    /// The database role lacks a right the operation needs; nothing was done.
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

    /// A job did not finish within the time a waiter allowed; the job itself is unaffected.
    #[error(
        "job {job_id} did not finish within {waited:?}; it is still pending, running or waiting for a retry (its result can be read later if it is kept)"
    )]
    Timeout {
        /// The job waited for.
        job_id: String,
        /// How long the waiter waited.
        waited: std::time::Duration,
    },

    /// A stored job result does not decode as the type the waiter asked for.
    #[error("the result of job {job_id} does not decode as {expected}: {error}")]
    ResultType {
        /// The job.
        job_id: String,
        /// The type asked for.
        expected: &'static str,
        /// The decoding error.
        error: String,
    },

    /// Job results cannot be read: the role lacks `SELECT` on `apalis_pgmq.results`, or
    /// [`setup`](crate::setup) has not created it. Waiting would not help.
    #[error(
        "job results cannot be read ({0}); grant SELECT on apalis_pgmq.results to this role, and run apalis_pgmq_notify::setup(&pool) if the table is missing"
    )]
    ResultsUnreadable(String),

    /// A background task the backend depends on is gone (the runtime is shutting down).
    #[error("background task stopped: {0}")]
    Stopped(&'static str),
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

impl Error {
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
}

/// PostgreSQL's internal "at line N" (of a PL/pgSQL function) says nothing to the reader.
fn strip_line(text: &str) -> String {
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

impl From<sqlx::Error> for Error {
    /// Classifies what a user can act on: a database that was never set up, a queue that does
    /// not exist; everything else stays [`Error::Database`].
    fn from(e: sqlx::Error) -> Self {
        if let Some(db) = e.as_database_error() {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let message = strip_line(db.message());
            let ours = message.contains("pgmq") || message.contains("apalis_pgmq");
            match code.as_str() {
                // invalid_schema_name, undefined_function
                "3F000" | "42883" if ours => return Self::NotSetUp { what: message },
                // undefined_table: relation "pgmq.q_<queue>" does not exist
                "42P01" => {
                    if let Some(queue) = missing_queue(&message) {
                        return Self::QueueMissing { queue };
                    }
                    if ours {
                        return Self::NotSetUp { what: message };
                    }
                }
                _ => {}
            }
        }
        Self::Database(e)
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
    fn internal_line_numbers_are_stripped() {
        assert_eq!(
            strip_line("schema \"pgmq\" does not exist at line 3099"),
            "schema \"pgmq\" does not exist"
        );
        assert_eq!(strip_line("nothing at line x"), "nothing at line x");
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
}
