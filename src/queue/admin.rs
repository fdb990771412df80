//! Administering a queue: creating it (plain, unlogged, partitioned), dropping it, the indexes
//! this crate adds to PGMQ's tables (dead letters by job id, unique idempotency keys,
//! priorities), pg_partman's upkeep, and the rights a worker needs.

use sqlx::{AssertSqlSafe, PgExecutor};

use super::PgmqQueue;
use crate::error::{Error, Result};

impl PgmqQueue {
    /// Creates the queue with `pgmq.create` (idempotent).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if PGMQ is not installed or the statement fails.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqQueue, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// PgmqQueue::new(QueueName::new("email")?).create(&pool).await?;
    /// # Ok(()) }
    /// ```
    pub async fn create<'c, E: PgExecutor<'c>>(&self, executor: E) -> Result<()> {
        sqlx::query(crate::sql::CREATE_QUEUE)
            .bind(self.name.as_str())
            .execute(executor)
            .await?;
        Ok(())
    }

    /// Creates the queue with partitioned queue and archive tables (`pgmq.create_partitioned`),
    /// for queues at scale: `partition_interval` and `retention_interval` are numbers of
    /// messages (`"10000"`, partitioned by `msg_id`) or time intervals (`"1 day"`, by
    /// `enqueued_at`/`archived_at`), as PGMQ takes them. Needs the pg_partman extension: it is
    /// created in schema `partman` when available but not yet created. Old partitions are
    /// dropped by pg_partman's maintenance ([`prune`](crate::prune) runs it for the archive).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if pg_partman is not installed on the server (Debian:
    /// `postgresql-<major>-partman`); [`Error::Database`] if a statement fails.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqQueue, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// PgmqQueue::new(QueueName::new("events")?)
    ///     .create_partitioned(&pool, "1 day", "7 days")
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn create_partitioned(
        &self,
        pool: &sqlx::PgPool,
        partition_interval: &str,
        retention_interval: &str,
    ) -> Result<()> {
        let (available, created): (bool, bool) = sqlx::query_as(crate::sql::PARTMAN_STATUS)
            .fetch_one(pool)
            .await?;
        if !available {
            return Err(Error::SchemaMismatch {
                what: "partitioned queues need the pg_partman extension on the server \
                       (Debian: apt-get install postgresql-<major>-partman)"
                    .to_owned(),
            });
        }
        if !created {
            sqlx::raw_sql(crate::sql::CREATE_PARTMAN)
                .execute(pool)
                .await?;
        }
        sqlx::query(crate::sql::CREATE_PARTITIONED_QUEUE)
            .bind(self.name.as_str())
            .bind(partition_interval)
            .bind(retention_interval)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Creates the queue with an unlogged queue table (`pgmq.create_unlogged`, idempotent).
    ///
    /// Unlogged tables skip the write-ahead log: faster, but emptied after a crash.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if PGMQ is not installed or the statement fails.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqQueue, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// PgmqQueue::new(QueueName::new("scratch")?).create_unlogged(&pool).await?;
    /// # Ok(()) }
    /// ```
    pub async fn create_unlogged<'c, E: PgExecutor<'c>>(&self, executor: E) -> Result<()> {
        sqlx::query(crate::sql::CREATE_UNLOGGED_QUEUE)
            .bind(self.name.as_str())
            .execute(executor)
            .await?;
        Ok(())
    }

    /// Drops the queue and its archive with `pgmq.drop_queue`; `false` if it did not exist.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the statement fails.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqQueue, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// let existed = PgmqQueue::new(QueueName::new("old")?).drop_queue(&pool).await?;
    /// # Ok(()) }
    /// ```
    pub async fn drop_queue<'c, E: PgExecutor<'c>>(&self, executor: E) -> Result<bool> {
        let dropped: bool = sqlx::query_scalar(crate::sql::DROP_QUEUE)
            .bind(self.name.as_str())
            .fetch_one(executor)
            .await?;
        Ok(dropped)
    }

    /// Whether the queue was created partitioned (`pgmq.meta`).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the statement fails.
    pub async fn is_partitioned<'c, E: PgExecutor<'c>>(&self, executor: E) -> Result<bool> {
        let p: Option<bool> = sqlx::query_scalar(crate::sql::QUEUE_IS_PARTITIONED)
            .bind(self.name.as_str())
            .fetch_optional(executor)
            .await?;
        Ok(p.unwrap_or(false))
    }

    /// Runs pg_partman's maintenance on a partitioned queue's tables: partitions are made ahead
    /// of the growing ids (or times), and archive partitions past the retention given at
    /// creation are dropped. Returns how many archive partitions went. Run it often (a worker
    /// process does, on each heartbeat): rows beyond the partitions made ahead land in the
    /// default partition, which blocks making their partition later.
    pub(crate) async fn maintain_partitions(&self, conn: &mut sqlx::PgConnection) -> Result<usize> {
        sqlx::query(crate::sql::RUN_PARTMAN_MAINTENANCE)
            .bind(format!("pgmq.q_{}", self.name.as_str()))
            .execute(&mut *conn)
            .await?;
        let table = format!("pgmq.a_{}", self.name.as_str());
        let before: i64 = sqlx::query_scalar(crate::sql::COUNT_PARTITIONS)
            .bind(&table)
            .fetch_one(&mut *conn)
            .await?;
        sqlx::query(crate::sql::RUN_PARTMAN_MAINTENANCE)
            .bind(&table)
            .execute(&mut *conn)
            .await?;
        let after: i64 = sqlx::query_scalar(crate::sql::COUNT_PARTITIONS)
            .bind(&table)
            .fetch_one(&mut *conn)
            .await?;
        Ok(usize::try_from(before - after).unwrap_or(0))
    }

    /// Indexes the dead letters of this queue by job id (idempotent; the dead-letter queue must
    /// exist), so a dead job is found by id without a scan.
    pub(crate) async fn index_dead_letters<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
    ) -> Result<()> {
        sqlx::query(crate::sql::INDEX_DEAD_LETTERS)
            .bind(self.name.as_str())
            .execute(executor)
            .await?;
        Ok(())
    }

    /// Creates the indexes that make idempotency keys unique in the queue table and findable
    /// in the archive (idempotent; `false` for a partitioned queue, which cannot have them).
    /// [`PgmqStorage::create_queue`](crate::PgmqStorage::create_queue) and workers call it.
    ///
    /// # Errors
    ///
    /// [`Error::Database`], e.g. if the queue table already holds two messages with one key.
    pub async fn index_unique_keys<'c, E: PgExecutor<'c>>(&self, executor: E) -> Result<bool> {
        Ok(sqlx::query_scalar(crate::sql::INDEX_UNIQUE_KEYS)
            .bind(self.name.as_str())
            .fetch_one(executor)
            .await?)
    }

    /// Creates the index a worker with [`Config::priorities`](crate::Config::priorities) claims
    /// from: `(apalis_pgmq.priority_of(headers) DESC, vt)` (idempotent).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the statement fails (creating an index needs the table's owner).
    pub async fn index_priorities<'c, E: PgExecutor<'c>>(&self, executor: E) -> Result<bool> {
        Ok(sqlx::query_scalar(crate::sql::INDEX_PRIORITIES)
            .bind(self.name.as_str())
            .fetch_one(executor)
            .await?)
    }

    pub(crate) async fn tables_exist<'c, E: PgExecutor<'c>>(&self, executor: E) -> Result<bool> {
        let exists: bool = sqlx::query_scalar(AssertSqlSafe(self.sql.tables_exist.clone()))
            .fetch_one(executor)
            .await?;
        Ok(exists)
    }

    /// The first right a worker of this queue needs and lacks (`None`: it has them all).
    /// `dlq` is the queue's dead-letter queue; `listeners`: whether the worker arms wake-ups;
    /// `claim_log`: whether its claims are logged (`claims.recover_lost`).
    pub(crate) async fn missing_worker_right<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        dlq: &PgmqQueue,
        listeners: bool,
        results: bool,
        claim_log: bool,
    ) -> Result<Option<Error>> {
        let q = self.name.queue_table();
        let a = self.name.archive_table();
        let d = dlq.name.queue_table();
        let mut checks: Vec<(String, &'static str, &'static str, String)> = vec![
            (
                "pgmq".into(),
                "USAGE",
                "reaching the queue tables",
                "SCHEMA".into(),
            ),
            (q.clone(), "SELECT", "claiming jobs", "TABLE".into()),
            (
                q.clone(),
                "UPDATE",
                "leasing and retrying jobs",
                "TABLE".into(),
            ),
            (
                q.clone(),
                "DELETE",
                "archiving, deleting and dead-lettering jobs",
                "TABLE".into(),
            ),
            (q, "INSERT", "pushing jobs", "TABLE".into()),
            (
                a.clone(),
                "INSERT",
                "archiving finished jobs",
                "TABLE".into(),
            ),
            (a, "SELECT", "archiving finished jobs", "TABLE".into()),
            (d.clone(), "INSERT", "dead-lettering jobs", "TABLE".into()),
            (d, "SELECT", "dead-lettering jobs", "TABLE".into()),
            (
                "pgmq.meta".into(),
                "SELECT",
                "learning whether the queue is partitioned",
                "TABLE".into(),
            ),
            (
                "apalis_pgmq".into(),
                "USAGE",
                "claiming jobs (pause check)",
                "SCHEMA".into(),
            ),
            (
                "apalis_pgmq.paused".into(),
                "SELECT",
                "claiming jobs (pause check)",
                "TABLE".into(),
            ),
        ];
        // Several rights on one table of this crate's schema, for one purpose.
        let mut on_table = |table: &str, rights: &[&'static str], needed_for: &'static str| {
            for &right in rights {
                checks.push((table.into(), right, needed_for, "TABLE".into()));
            }
        };
        if results {
            on_table(
                "apalis_pgmq.results",
                &["SELECT", "INSERT", "UPDATE"],
                "keeping job results (Config::store_results)",
            );
        }
        on_table(
            "apalis_pgmq.workers",
            &["SELECT", "INSERT", "UPDATE", "DELETE"],
            "the worker registry (heartbeat, the board's and the CLI's worker list)",
        );
        if claim_log {
            on_table(
                "apalis_pgmq.claim_log",
                &["INSERT", "SELECT", "DELETE"],
                "giving back claims whose answer was lost (claims.recover_lost)",
            );
        }
        if listeners {
            on_table(
                "apalis_pgmq.listeners",
                &["SELECT", "INSERT", "UPDATE", "DELETE"],
                "arming wake-ups (apalis_pgmq.listeners)",
            );
        }
        let objects: Vec<&str> = checks.iter().map(|c| c.0.as_str()).collect();
        let rights: Vec<&str> = checks.iter().map(|c| c.1).collect();
        let kinds: Vec<&str> = checks.iter().map(|c| c.3.as_str()).collect();
        // One statement: the first check that fails, in order, and the role.
        let missing: Option<(i64, String)> = sqlx::query_as(crate::sql::MISSING_WORKER_RIGHT)
            .bind(objects)
            .bind(rights)
            .bind(kinds)
            .fetch_optional(executor)
            .await?;
        let Some((i, role)) = missing else {
            return Ok(None);
        };
        let Some((object, right, needed_for, kind)) = usize::try_from(i - 1)
            .ok()
            .and_then(|i| checks.into_iter().nth(i))
        else {
            return Ok(None);
        };
        let on = if kind == "SCHEMA" {
            format!("SCHEMA {object}")
        } else {
            object
        };
        Ok(Some(Error::MissingPrivilege {
            grant: format!("GRANT {right} ON {on} TO {role}"),
            right: format!("{right} on {on}"),
            role,
            needed_for,
        }))
    }
}
