//! A check that every statement this crate issues is valid SQL against a real database.

use sqlx::{Executor, PgPool};

use crate::{
    error::{Error, Result},
    queue::{PgmqQueue, QueueName},
};

/// Prepares (parses and plans, without running) every statement this crate issues: the fixed
/// ones and those built for `queue` and its dead-letter queue, which must exist. Returns how
/// many were prepared. Meant for tests and deployment checks: a statement that does not match
/// the database (a renamed column, a missing function, a PGMQ too old) fails here, named.
///
/// # Errors
///
/// [`Error::Config`] naming the statement that failed to prepare and why;
/// [`Error::Database`] if the database cannot be reached.
///
/// # Example
///
/// ```no_run
/// # use apalis_pgmq_notify::{PgmqStorage, QueueName, prepare_every_statement};
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// let q = QueueName::new("email")?;
/// # let runtime = apalis_pgmq_notify::Runtime::new(&pool);
/// PgmqStorage::<String>::new(&runtime, q.clone()).create_queue().await?;
/// let n = prepare_every_statement(&pool, &q).await?;
/// println!("{n} statements prepared");
/// # Ok(()) }
/// ```
#[doc(hidden)]
pub async fn prepare_every_statement(pool: &PgPool, queue: &QueueName) -> Result<usize> {
    let q = PgmqQueue::new(queue.clone());
    let mut all: Vec<(String, String)> = crate::sql::ALL
        .iter()
        .map(|(name, sql)| ((*name).to_owned(), (*sql).to_owned()))
        .collect();
    for (handle, dead_letters) in [(q.clone(), false), (q.dead_letter(), true)] {
        for (name, sql) in handle.statements() {
            // A dead-letter queue has no dead-letter queue of its own: outcomes and dead-letter
            // lookups are for queues only.
            if dead_letters
                && matches!(
                    name,
                    "complete"
                        | "complete_results"
                        | "list_dead"
                        | "find_dead"
                        | "counts"
                        | "prune_dead"
                        | "prune_dead_elected"
                        | "replay"
                        | "delete_dead"
                        | "count_dead"
                )
            {
                continue;
            }
            all.push((format!("{}.{name}", handle.name()), sql.to_string()));
        }
    }
    // Read only where PGMQ keeps a migrations table (some installs do not).
    let has_pgmq_migrations: bool = sqlx::query_scalar(crate::sql::PGMQ_MIGRATIONS_PRESENT)
        .fetch_one(pool)
        .await?;
    let mut prepared = 0;
    for (name, sql) in all {
        if name == "pgmq_migrations" && !has_pgmq_migrations {
            continue;
        }
        pool.prepare(sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(sql)))
            .await
            .map_err(|e| match Error::from(e) {
                e @ (Error::Unreachable { .. } | Error::ConnectionRejected { .. }) => e,
                e => Error::SchemaMismatch {
                    what: format!("statement {name} does not prepare: {e}"),
                },
            })?;
        prepared += 1;
    }
    Ok(prepared)
}
