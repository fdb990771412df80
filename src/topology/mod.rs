//! Production topologies: a connection pooler in front of the server, read replicas.
//!
//! - **PgBouncer in session mode** (`pool_mode = session`) is a transparent connection limit:
//!   everything works through it, the listener too (it then pins one server connection).
//!   Size the pools so that the sum of every process's `max_connections` fits PgBouncer's
//!   `default_pool_size`, or clients wait for a server connection.
//! - **PgBouncer in transaction or statement mode** shares a server session between clients
//!   from one transaction to the next. sqlx sends a statement's Parse and its Bind in two
//!   rounds, so a query outside a transaction can run another client's statement and return
//!   its rows (silently wrong results, measured with PgBouncer 1.18); LISTEN receives nothing;
//!   session advisory locks are taken and released on different server sessions. This crate
//!   refuses such a connection where it can tell: [`setup`](crate::setup), a worker's start
//!   and the CLI fail with [`Error::TransactionPooler`], saying what to change. The check
//!   ([`check_session_pooling`]) looks for one client's statements landing on two server
//!   sessions, or two clients' on one; it never refuses a session-mode pooler or a direct
//!   connection, and can miss a transaction pooler so busy that other clients always take the
//!   freed server session first (it tries three times).
//! - **The listener on its own connection**: give the listener a direct connection (or a
//!   session-mode database of the pooler) with
//!   [`Runtime::listener_connect_options`](crate::Runtime::listener_connect_options), while the
//!   pool goes through a session-mode pooler.
//! - **A read replica (hot standby)**: reads work (the CLI's read commands, the queue overview,
//!   metrics gauges); a write fails with [`Error::ReadOnly`]. The CLI checks before every
//!   command that writes ([`check_writable`]).

mod hosts;

use std::time::Duration;

use sqlx::{ConnectOptions, Connection, PgConnection, Row, postgres::PgConnectOptions};

use crate::error::{Error, Result};
pub use hosts::{MultiHost, TargetSessionAttrs};

/// How many times [`check_session_pooling`] looks.
const POOLING_ROUNDS: usize = 3;

/// How long the second client of [`check_session_pooling`] waits for a server session. A
/// transaction pooler hands it the session the first client just freed at once; a session
/// pooler at its limit keeps it waiting, which says nothing against session pooling.
const SECOND_CLIENT_WAIT: Duration = Duration::from_secs(2);

/// The server session serving `conn`'s next statement (simple protocol: no prepared statement
/// that a transaction pooler could misroute).
async fn backend_pid(conn: &mut PgConnection) -> Result<i32> {
    let row = sqlx::raw_sql("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await?;
    Ok(row.try_get::<i32, _>(0)?)
}

/// Checks that the connections `options` makes keep one server session each, i.e. that they
/// do not go through a pooler in transaction or statement mode (PgBouncer
/// `pool_mode = transaction`), where this crate's statements would run on other clients'
/// sessions. Opens two connections for a moment (simple-protocol queries only). A direct
/// connection and a session-mode pooler pass.
///
/// [`setup`](crate::setup), a worker's start and the CLI run this check themselves; call it
/// when a process only pushes jobs and does not call `setup`.
///
/// # Errors
///
/// [`Error::TransactionPooler`] when the sessions are shared, saying which setting to change;
/// [`Error::Unreachable`] or [`Error::ConnectionRejected`] when a connection fails.
///
/// # Example
///
/// ```no_run
/// # async fn run() -> Result<(), apalis_pgmq_notify::Error> {
/// let options: sqlx::postgres::PgConnectOptions = "postgres://app@pgbouncer:6432/app"
///     .parse()
///     .map_err(apalis_pgmq_notify::Error::from)?;
/// apalis_pgmq_notify::check_session_pooling(&options).await?;
/// # Ok(()) }
/// ```
pub async fn check_session_pooling(options: &PgConnectOptions) -> Result<()> {
    check_named(options, "the connection").await
}

/// [`check_session_pooling`], naming the connection `what` in the error.
pub(crate) async fn check_named(options: &PgConnectOptions, what: &str) -> Result<()> {
    let mut first = options.connect().await?;
    let result = check_session_pooling_on(&mut first, options, what).await;
    let _ = first.close().await;
    result
}

/// [`check_session_pooling`] with `first` as the first client (a connection the caller holds
/// anyway); `what` names the connection in the error.
pub(crate) async fn check_session_pooling_on(
    first: &mut PgConnection,
    options: &PgConnectOptions,
    what: &str,
) -> Result<()> {
    // A session pooler at its limit may keep a second client waiting for a server session:
    // that says nothing against session pooling.
    let mut second = match tokio::time::timeout(SECOND_CLIENT_WAIT, options.connect()).await {
        Ok(conn) => conn?,
        Err(_) => return Ok(()),
    };
    let result = async {
        for _ in 0..POOLING_ROUNDS {
            let before = backend_pid(first).await?;
            // The second client holds a transaction (pinning its server session) while the
            // first asks again. With a session of its own each, the first sees the same
            // session twice and the second another one.
            let opened = tokio::time::timeout(SECOND_CLIENT_WAIT, async {
                sqlx::raw_sql("BEGIN").execute(&mut second).await?;
                backend_pid(&mut second).await
            })
            .await;
            let theirs = match opened {
                Ok(pid) => pid?,
                // A session pooler at its limit: no server session for a second client.
                Err(_) => return Ok(()),
            };
            let after = backend_pid(first).await;
            sqlx::raw_sql("ROLLBACK").execute(&mut second).await?;
            if theirs == before || after? != before {
                return Err(Error::TransactionPooler {
                    what: what.to_owned(),
                });
            }
        }
        Ok(())
    }
    .await;
    let _ = second.close().await;
    result
}

/// Whether the server `conn` is on takes writes: `Err(`[`Error::ReadOnly`]`)` on a hot
/// standby (`pg_is_in_recovery()`) or where `default_transaction_read_only` is on, naming
/// which; `what` (e.g. "`pause`") says what would have written.
///
/// # Errors
///
/// [`Error::ReadOnly`], or a database error from the check itself.
///
/// # Example
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// let mut conn = pool.acquire().await?;
/// apalis_pgmq_notify::check_writable(&mut conn, "pausing a queue").await?;
/// # Ok(()) }
/// ```
pub async fn check_writable(conn: &mut PgConnection, what: &str) -> Result<()> {
    let row = sqlx::raw_sql(
        "SELECT pg_is_in_recovery()::text, current_setting('default_transaction_read_only'), \
         current_setting('transaction_read_only')",
    )
    .fetch_one(&mut *conn)
    .await?;
    let recovery: String = row.try_get(0)?;
    let default_ro: String = row.try_get(1)?;
    let ro: String = row.try_get(2)?;
    let reason = if recovery == "true" {
        "it is a hot standby (a read replica: pg_is_in_recovery() is true)"
    } else if default_ro == "on" {
        "default_transaction_read_only is on"
    } else if ro == "on" {
        "the transaction is read-only (transaction_read_only is on)"
    } else {
        return Ok(());
    };
    Err(Error::ReadOnly {
        reason: format!("{reason}; {what} writes"),
    })
}
