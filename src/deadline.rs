//! Deadlines on the library's own statements: the background work (the worker's claims and
//! wake-up steps, outcome writes, lease renewal and release, heartbeat and maintenance) never
//! waits on the database for ever.
//!
//! A connection that keeps TCP up but loses a request or its answer (a hung pooler, a stopped
//! backend, a middlebox that drops traffic) fails no statement: it waits until the kernel gives
//! up, about 15 minutes later, or never when the peer's kernel acknowledges every byte. So each
//! statement runs on a connection taken from the pool for it ([`Conn`]), within a deadline, and
//! a connection whose statement did not end (its deadline passed, or the caller stopped
//! waiting) is **closed, not handed back**: sqlx hands a connection back through a `ping`
//! with no bound of its own, which on a silent connection never returns, and the pool would
//! lose that slot for good. `PoolConnection::close_on_drop` closes it within sqlx's own bound
//! (5 s) and frees the slot; the pool opens a new connection when one is next needed.
//! A connection whose statement ended is handed back with the same check, bounded (a network
//! may freeze between the answer and the check).
//!
//! The deadlines ([`Config::statement_deadline`](crate::Config) for a storage's work, the
//! maintenance deadline for the runtime's) are long enough for a statement slowed by load, and
//! no longer than the time after which its result would be of no use (a claim answered after
//! the visibility timeout hands out messages whose leases have lapsed).

use std::{future::Future, time::Duration};

use sqlx::{PgConnection, PgPool, Postgres, pool::PoolConnection};
use tokio::time::{Instant, timeout_at};

/// The shortest deadline of the runtime's maintenance statements (heartbeat, retention,
/// partitions, gauges): they may work on large tables and nothing waits on them.
pub(crate) const MAINTENANCE_FLOOR: Duration = Duration::from_secs(10);

/// The deadline of one round of maintenance with heartbeat `interval`: the interval (a round
/// that takes longer is overdue anyway), at least [`MAINTENANCE_FLOOR`].
pub(crate) fn maintenance(interval: Duration) -> Duration {
    interval.max(MAINTENANCE_FLOOR)
}

/// A statement's deadline passed: the error the caller sees (an I/O time-out, so the crate's
/// error is [`Error::Unreachable`](crate::Error::Unreachable), retryable).
fn late(what: &str, limit: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer from the database within {limit:?} ({what}); the connection was closed"),
    ))
}

/// A pool connection for bounded statements: closed instead of returned to the pool when it is
/// dropped while a statement runs on it or after a statement failed.
#[derive(Debug)]
pub(crate) struct Conn {
    conn: PoolConnection<Postgres>,
    /// A statement is in flight, or the last one failed or passed its deadline: the connection
    /// cannot be trusted to answer, so dropping it closes it.
    suspect: bool,
}

impl Conn {
    /// Takes a connection from `pool` by `by`.
    ///
    /// # Errors
    ///
    /// The pool's error, or an I/O time-out if `by` passed first (sqlx checks an idle
    /// connection with a round trip, which a silent network never answers).
    pub(crate) async fn acquire(pool: &PgPool, by: Instant) -> Result<Self, sqlx::Error> {
        let limit = by.saturating_duration_since(Instant::now());
        match timeout_at(by, pool.acquire()).await {
            Ok(Ok(conn)) => Ok(Self {
                conn,
                suspect: false,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(late("taking a connection from the pool", limit)),
        }
    }

    /// Runs `statement` on this connection by `by`. If it fails or `by` passes first, the
    /// connection is marked to be closed when dropped (keep using it only to try again and
    /// fail fast; callers drop it).
    ///
    /// # Errors
    ///
    /// The statement's error, or an I/O time-out (as the crate's error,
    /// [`Error::Unreachable`](crate::Error::Unreachable)) if `by` passed first.
    pub(crate) async fn run<'s, T, E, Fut>(
        &'s mut self,
        by: Instant,
        what: &str,
        statement: impl FnOnce(&'s mut PgConnection) -> Fut,
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>> + 's,
        E: From<sqlx::Error>,
    {
        let limit = by.saturating_duration_since(Instant::now());
        let Self { conn, suspect } = self;
        *suspect = true;
        match timeout_at(by, statement(conn)).await {
            Ok(Ok(v)) => {
                *suspect = false;
                Ok(v)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(E::from(late(what, limit))),
        }
    }

    /// Keeps a connection whose statement failed for a reason of its own (the data, a right),
    /// not the connection's: it goes back to the pool when dropped.
    pub(crate) fn trust(&mut self) {
        self.suspect = false;
    }
}

/// The longest a connection handed back to the pool may take to answer sqlx's check (one
/// round trip); past it the connection is closed and its slot freed.
const RETURN_TIMEOUT: Duration = Duration::from_secs(5);

impl Drop for Conn {
    fn drop(&mut self) {
        if self.suspect {
            // Closed within sqlx's bound instead of pinged for ever; the slot is freed.
            self.conn.close_on_drop();
            return;
        }
        // Handed back: sqlx checks the connection with a `ping` first, which a network that
        // froze since the last answer never answers. The same hand-back, bounded: past
        // `RETURN_TIMEOUT` the future is dropped, which closes the connection and frees its
        // slot. (sqlx spawns this task itself when a connection is dropped; this one only adds
        // the bound. Without a runtime the connection drops as sqlx would have it.)
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let back = self.conn.return_to_pool();
            rt.spawn(async move {
                let _ = tokio::time::timeout(RETURN_TIMEOUT, back).await;
            });
        }
    }
}
