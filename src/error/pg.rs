//! PostgreSQL's error codes (SQLSTATE): the one place in the crate that names them, and what
//! each means to a caller. Every other module asks here.
//!
//! Codes from PostgreSQL's "Appendix A. PostgreSQL Error Codes".

use std::borrow::Cow;

/// `unique_violation`: a unique index refused a row (a job's idempotency key is taken).
pub(crate) const UNIQUE_VIOLATION: &str = "23505";
/// `insufficient_privilege`: the role lacks a right.
pub(crate) const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// `undefined_table`: a relation does not exist.
pub(crate) const UNDEFINED_TABLE: &str = "42P01";
/// `undefined_function`.
pub(crate) const UNDEFINED_FUNCTION: &str = "42883";
/// `invalid_schema_name`: a schema does not exist.
pub(crate) const INVALID_SCHEMA_NAME: &str = "3F000";
/// `invalid_column_reference`: here, no unique index matches an `ON CONFLICT` target.
pub(crate) const INVALID_COLUMN_REFERENCE: &str = "42P10";
/// `serialization_failure`: a REPEATABLE READ or SERIALIZABLE transaction lost a race.
pub(crate) const SERIALIZATION_FAILURE: &str = "40001";
/// `deadlock_detected`.
pub(crate) const DEADLOCK_DETECTED: &str = "40P01";
/// `lock_not_available` (`NOWAIT`, `lock_timeout`).
pub(crate) const LOCK_NOT_AVAILABLE: &str = "55P03";
/// `invalid_catalog_name`: the database named in the URL does not exist.
pub(crate) const INVALID_CATALOG_NAME: &str = "3D000";
/// `too_many_connections`.
pub(crate) const TOO_MANY_CONNECTIONS: &str = "53300";
/// `admin_shutdown`: the session was terminated, or the server is shutting down.
pub(crate) const ADMIN_SHUTDOWN: &str = "57P01";
/// `crash_shutdown`.
pub(crate) const CRASH_SHUTDOWN: &str = "57P02";
/// `cannot_connect_now`: the server is starting up or in recovery.
pub(crate) const CANNOT_CONNECT_NOW: &str = "57P03";
/// `read_only_sql_transaction`: a write on a hot standby or in a read-only transaction.
pub(crate) const READ_ONLY_SQL_TRANSACTION: &str = "25006";
/// `feature_not_supported`: here, an unlogged table read on a hot standby (its rows are not
/// replicated).
pub(crate) const FEATURE_NOT_SUPPORTED: &str = "0A000";
/// Class 08, connection exception.
const CONNECTION_EXCEPTION: &str = "08";
/// Class 28, invalid authorization (wrong password, unknown role, `pg_hba.conf`).
const INVALID_AUTHORIZATION: &str = "28";
/// Class 22, data exception (a value the statement cannot take).
const DATA_EXCEPTION: &str = "22";
/// Class 54, program limit exceeded (a value too large for the statement).
const PROGRAM_LIMIT_EXCEEDED: &str = "54";

/// What a caller does about an error, by its SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Another transaction won a race: run the transaction again.
    Conflict,
    /// The connection or the server went away, or the server is full: try again later.
    Unreachable,
    /// The server refused this login or database: fix the connection settings.
    Rejected,
    /// The role lacks a right: grant it.
    Privilege,
    /// A unique index refused the row.
    Duplicate,
    /// A table, function or schema is missing (setup not run, queue not created).
    Undefined,
    /// The values of the statement cannot be written: retrying them cannot succeed.
    Data,
    /// The server does not take writes (a hot standby, `default_transaction_read_only`).
    ReadOnly,
    /// Anything else.
    Other,
}

/// Classifies a SQLSTATE.
pub(crate) fn classify(code: &str) -> Class {
    match code {
        SERIALIZATION_FAILURE | DEADLOCK_DETECTED | LOCK_NOT_AVAILABLE => Class::Conflict,
        TOO_MANY_CONNECTIONS | ADMIN_SHUTDOWN | CRASH_SHUTDOWN | CANNOT_CONNECT_NOW => {
            Class::Unreachable
        }
        c if c.starts_with(CONNECTION_EXCEPTION) => Class::Unreachable,
        INVALID_CATALOG_NAME => Class::Rejected,
        c if c.starts_with(INVALID_AUTHORIZATION) => Class::Rejected,
        INSUFFICIENT_PRIVILEGE => Class::Privilege,
        READ_ONLY_SQL_TRANSACTION => Class::ReadOnly,
        UNIQUE_VIOLATION => Class::Duplicate,
        UNDEFINED_TABLE | UNDEFINED_FUNCTION | INVALID_SCHEMA_NAME => Class::Undefined,
        c if c.starts_with(DATA_EXCEPTION) || c.starts_with(PROGRAM_LIMIT_EXCEEDED) => Class::Data,
        _ => Class::Other,
    }
}

/// The SQLSTATE of a database error (`None` for other errors).
pub(crate) fn code(e: &sqlx::Error) -> Option<Cow<'_, str>> {
    e.as_database_error().and_then(|d| d.code())
}

/// The class of `e`'s SQLSTATE ([`Class::Other`] for errors that are not the server's).
pub(crate) fn class_of(e: &sqlx::Error) -> Class {
    code(e).map_or(Class::Other, |c| classify(&c))
}

/// The role lacks a right.
pub(crate) fn is_privilege(e: &sqlx::Error) -> bool {
    class_of(e) == Class::Privilege
}

/// A relation does not exist.
pub(crate) fn is_undefined_table(e: &sqlx::Error) -> bool {
    code(e).as_deref() == Some(UNDEFINED_TABLE)
}

/// The values of the statement cannot be written (data exception, program limit).
pub(crate) fn is_data_error(e: &sqlx::Error) -> bool {
    class_of(e) == Class::Data
}

/// An unlogged table (the worker registry) was read on a hot standby.
pub(crate) fn is_unlogged_on_standby(e: &sqlx::Error) -> bool {
    code(e).as_deref() == Some(FEATURE_NOT_SUPPORTED)
}

/// No unique index matches an `ON CONFLICT` target.
pub(crate) fn is_missing_unique_index(e: &sqlx::Error) -> bool {
    code(e).as_deref() == Some(INVALID_COLUMN_REFERENCE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_fall_into_what_a_caller_does() {
        for (code, class) in [
            ("40001", Class::Conflict),
            ("40P01", Class::Conflict),
            ("55P03", Class::Conflict),
            ("08006", Class::Unreachable),
            ("57P01", Class::Unreachable),
            ("53300", Class::Unreachable),
            ("28P01", Class::Rejected),
            ("28000", Class::Rejected),
            ("3D000", Class::Rejected),
            ("42501", Class::Privilege),
            ("23505", Class::Duplicate),
            ("42P01", Class::Undefined),
            ("3F000", Class::Undefined),
            ("22P02", Class::Data),
            ("54000", Class::Data),
            ("25006", Class::ReadOnly),
            ("42601", Class::Other),
        ] {
            assert_eq!(classify(code), class, "{code}");
        }
    }
}
