//! Error types.

use crate::queue::QueueNameError;

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
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

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

    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),

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

    /// A background task the backend depends on is gone (the runtime is shutting down).
    #[error("background task stopped: {0}")]
    Stopped(&'static str),
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
