//! The PGMQ-compatible surface of a queue: send, read, set the visibility time, archive,
//! delete, purge, metrics. The hot paths run prepared SQL directly on the queue tables with
//! exactly the effect of the PGMQ function of the same name (`read` sets `vt`, increments
//! `read_ct` and stamps `last_read_at`; `archive` moves the row to `pgmq.a_<queue>` keeping
//! `msg_id` and setting `archived_at`), so messages written here are read by `pgmq.read(...)`
//! and the other way round. Every write takes any executor (`E: PgExecutor<'c>`): a pool, a
//! connection, or the caller's own transaction.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgExecutor, Row};

use super::{
    Delay, EncodedMessage, Message, NewMessage, PgmqQueue, Pushed, QueueInfo, QueueMetrics,
    QueueName,
};
use crate::error::{Error, Result};

impl PgmqQueue {
    /// Sends one message, visible at once, without headers; returns its `msg_id`.
    ///
    /// # Errors
    ///
    /// [`Error::PayloadTooLarge`] (nothing written) or [`Error::Database`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqQueue, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// let queue = PgmqQueue::new(QueueName::new("email")?);
    /// let id = queue.send(&pool, &serde_json::json!({"to": "a@example.com"})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send<'c, E: PgExecutor<'c>>(&self, executor: E, message: &Value) -> Result<i64> {
        self.send_with(executor, message, None, Delay::Now).await
    }

    /// Sends one message with optional headers and a delay; returns its `msg_id`.
    ///
    /// # Errors
    ///
    /// [`Error::PayloadTooLarge`] (nothing written) or [`Error::Database`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{Delay, PgmqQueue, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// let queue = PgmqQueue::new(QueueName::new("email")?);
    /// let mut tx = pool.begin().await?;
    /// queue
    ///     .send_with(&mut *tx, &serde_json::json!({"to": "a@example.com"}),
    ///                Some(&serde_json::json!({"trace": "abc"})), Delay::seconds(60))
    ///     .await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_with<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        message: &Value,
        headers: Option<&Value>,
        delay: Delay,
    ) -> Result<i64> {
        let encoded = self.encode(message, headers, delay)?;
        self.send_encoded_one(executor, encoded).await
    }

    /// Sends many messages in one statement; returns their `msg_id`s in input order.
    ///
    /// Either all are written or none (one `INSERT`). An empty slice sends nothing and runs no SQL.
    ///
    /// # Errors
    ///
    /// [`Error::PayloadTooLarge`] if any message is too large (nothing written), or
    /// [`Error::Database`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{NewMessage, PgmqQueue, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// let queue = PgmqQueue::new(QueueName::new("email")?);
    /// let batch: Vec<_> = (0..100).map(|i| NewMessage::new(serde_json::json!(i))).collect();
    /// let ids = queue.send_batch(&pool, &batch).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_batch<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        messages: &[NewMessage],
    ) -> Result<Vec<i64>> {
        let encoded = messages
            .iter()
            .map(|m| self.encode(&m.message, m.headers.as_ref(), m.delay))
            .collect::<Result<Vec<_>>>()?;
        self.send_encoded(executor, &encoded).await
    }

    /// Reads up to `qty` visible messages and hides them for `vt` (like `pgmq.read`).
    ///
    /// Each returned message has `read_ct` incremented, `last_read_at` set and `vt` moved to
    /// now + `vt`. Rows locked by a concurrent reader are skipped (`FOR UPDATE SKIP LOCKED`), so two
    /// readers never receive the same message. Returned in `msg_id` order.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the queue does not exist or the statement fails.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqQueue, QueueName};
    /// # use std::time::Duration;
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// let queue = PgmqQueue::new(QueueName::new("email")?);
    /// for msg in queue.read(&pool, Duration::from_secs(30), 10).await? {
    ///     println!("{} (attempt {})", msg.msg_id, msg.read_ct);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn read<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        vt: Duration,
        qty: usize,
    ) -> Result<Vec<Message>> {
        self.read_with(executor, &self.sql.read, vt, qty).await
    }

    /// Sets the visibility time of one message; returns it, or `None` if it does not exist.
    /// A [`Delay::At`] in the past sets the time of the write (visible at once, and ordered
    /// behind what was already visible), never an earlier one: the workers' claim floor
    /// (`claims.floor_sweep`) would not see a job below it until its next sweep.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the statement fails.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{Delay, PgmqQueue, QueueName};
    /// # use std::time::Duration;
    /// # async fn run(pool: sqlx::PgPool, id: i64) -> Result<(), apalis_pgmq_notify::Error> {
    /// let queue = PgmqQueue::new(QueueName::new("email")?);
    /// queue.set_vt(&pool, id, Delay::After(Duration::from_secs(10))).await?;
    /// # Ok(()) }
    /// ```
    pub async fn set_vt<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        msg_id: i64,
        visible: Delay,
    ) -> Result<Option<Message>> {
        let (at, secs) = visible.bind_parts();
        let row = sqlx::query(AssertSqlSafe(self.sql.set_vt_one.clone()))
            .bind(msg_id)
            .bind(at)
            .bind(secs)
            .fetch_optional(executor)
            .await?;
        Ok(row.as_ref().map(Message::from_row).transpose()?)
    }

    /// Sets the visibility time of many messages; returns the ids that exist. A
    /// [`Delay::At`] in the past sets the time of the write, as [`set_vt`](Self::set_vt).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the statement fails.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{Delay, PgmqQueue, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// let queue = PgmqQueue::new(QueueName::new("email")?);
    /// queue.set_vt_many(&pool, &[1, 2, 3], Delay::Now).await?;
    /// # Ok(()) }
    /// ```
    pub async fn set_vt_many<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        msg_ids: &[i64],
        visible: Delay,
    ) -> Result<Vec<i64>> {
        if msg_ids.is_empty() {
            return Ok(Vec::new());
        }
        let (at, secs) = visible.bind_parts();
        let mut ids: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.set_vt_many.clone()))
            .bind(msg_ids)
            .bind(at)
            .bind(secs)
            .fetch_all(executor)
            .await?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Moves messages to the archive table (like `pgmq.archive`); returns the ids archived.
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
    /// PgmqQueue::new(QueueName::new("email")?).archive(&pool, &[1, 2]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn archive<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        msg_ids: &[i64],
    ) -> Result<Vec<i64>> {
        self.ids_statement(executor, &self.sql.archive, msg_ids)
            .await
    }

    /// Deletes messages (like `pgmq.delete`); returns the ids deleted.
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
    /// PgmqQueue::new(QueueName::new("email")?).delete(&pool, &[3]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn delete<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        msg_ids: &[i64],
    ) -> Result<Vec<i64>> {
        self.ids_statement(executor, &self.sql.delete, msg_ids)
            .await
    }

    /// Deletes every message in the queue (`pgmq.purge_queue`); returns how many there were.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the queue does not exist or the statement fails.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqQueue, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// let removed = PgmqQueue::new(QueueName::new("email")?).purge(&pool).await?;
    /// # Ok(()) }
    /// ```
    pub async fn purge<'c, E: PgExecutor<'c>>(&self, executor: E) -> Result<i64> {
        let n: i64 = sqlx::query_scalar(crate::sql::PURGE_QUEUE)
            .bind(self.name.as_str())
            .fetch_one(executor)
            .await?;
        Ok(n)
    }

    /// Whether the queue exists (is recorded in `pgmq.meta`).
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
    /// if !PgmqQueue::new(QueueName::new("email")?).exists(&pool).await? { /* create it */ }
    /// # Ok(()) }
    /// ```
    pub async fn exists<'c, E: PgExecutor<'c>>(&self, executor: E) -> Result<bool> {
        let exists: bool = sqlx::query_scalar(crate::sql::QUEUE_EXISTS)
            .bind(self.name.as_str())
            .fetch_one(executor)
            .await?;
        Ok(exists)
    }

    /// The queue's metrics, from `pgmq.metrics(queue)`.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the queue does not exist or the statement fails.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqQueue, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// let m = PgmqQueue::new(QueueName::new("email")?).metrics(&pool).await?;
    /// println!("{} waiting, {} visible", m.queue_length, m.queue_visible_length);
    /// # Ok(()) }
    /// ```
    pub async fn metrics<'c, E: PgExecutor<'c>>(&self, executor: E) -> Result<QueueMetrics> {
        let row = sqlx::query(crate::sql::QUEUE_METRICS)
            .bind(self.name.as_str())
            .fetch_one(executor)
            .await?;
        Ok(QueueMetrics::from_row(&row)?)
    }

    /// The earliest visibility time in the future, if any message is hidden (delayed, backing off
    /// or leased). A waiting reader can sleep until then.
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
    /// let next = PgmqQueue::new(QueueName::new("email")?).next_visible_at(&pool).await?;
    /// # Ok(()) }
    /// ```
    pub async fn next_visible_at<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
    ) -> Result<Option<DateTime<Utc>>> {
        let at: Option<DateTime<Utc>> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.next_visible.clone()))
                .fetch_one(executor)
                .await?;
        Ok(at)
    }
}

impl PgmqQueue {
    /// Encodes and size-checks one message.
    pub(crate) fn encode(
        &self,
        message: &Value,
        headers: Option<&Value>,
        delay: Delay,
    ) -> Result<EncodedMessage> {
        let headers_value = headers;
        let message = serde_json::to_string(message)?;
        let headers = headers.map(serde_json::to_string).transpose()?;
        self.check_size(message.len() + headers.as_ref().map_or(0, String::len))?;
        let (at, secs) = delay.bind_parts();
        let key = super::headers::headers_key(headers_value);
        Ok(EncodedMessage {
            message,
            headers,
            key,
            at,
            secs,
        })
    }

    pub(crate) fn check_size(&self, size: usize) -> Result<()> {
        if size > self.max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                size,
                limit: self.max_payload_bytes,
            });
        }
        Ok(())
    }

    async fn send_encoded_one<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        m: EncodedMessage,
    ) -> Result<i64> {
        let id: i64 = sqlx::query_scalar(AssertSqlSafe(self.sql.send_one.clone()))
            .bind(m.message)
            .bind(m.headers)
            .bind(m.at)
            .bind(m.secs)
            .fetch_one(executor)
            .await?;
        crate::obs::enqueued(self.name.as_str(), self.metrics_kind(), 1);
        Ok(id)
    }

    pub(crate) async fn send_encoded<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        messages: &[EncodedMessage],
    ) -> Result<Vec<i64>> {
        Ok(self.send_encoded_raw(executor, messages).await?)
    }

    /// As [`send_encoded`](Self::send_encoded), with sqlx's error as it came (the shared push
    /// writer tells a statement the server refused from one whose answer was lost).
    pub(crate) async fn send_encoded_raw<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        messages: &[EncodedMessage],
    ) -> std::result::Result<Vec<i64>, sqlx::Error> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut bodies = Vec::with_capacity(messages.len());
        let mut headers = Vec::with_capacity(messages.len());
        let mut ats = Vec::with_capacity(messages.len());
        let mut secs = Vec::with_capacity(messages.len());
        for m in messages {
            bodies.push(m.message.as_str());
            headers.push(m.headers.as_deref());
            ats.push(m.at);
            secs.push(m.secs);
        }
        let mut ids: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.send_many.clone()))
            .bind(bodies)
            .bind(headers)
            .bind(ats)
            .bind(secs)
            .fetch_all(executor)
            .await?;
        crate::obs::enqueued(self.name.as_str(), self.metrics_kind(), ids.len());
        ids.sort_unstable();
        Ok(ids)
    }

    /// Sends one message that carries an idempotency key: written unless a message with the
    /// same key is in the queue table, or (with `window`) was archived within `window`.
    /// Returns the new message's id, or the existing one's with `duplicate` set.
    pub(crate) async fn send_unique(
        &self,
        conn: &mut sqlx::PgConnection,
        m: &EncodedMessage,
        key: &str,
        window: Option<Duration>,
    ) -> Result<Pushed> {
        // A conflicting row committed after the statement's snapshot is not visible to its
        // last branch: run it again (a new snapshot) a few times.
        for _ in 0..5 {
            let row: Option<(i64, bool)> =
                sqlx::query_as(AssertSqlSafe(self.sql.send_unique.clone()))
                    .bind(&m.message)
                    .bind(&m.headers)
                    .bind(m.at)
                    .bind(m.secs)
                    .bind(key)
                    .bind(window.map(|w| w.as_secs_f64()))
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(|e| unique_index_missing(e, &self.name))?;
            if let Some((id, duplicate)) = row {
                if !duplicate {
                    crate::obs::enqueued(self.name.as_str(), self.metrics_kind(), 1);
                }
                return Ok(Pushed { id, duplicate });
            }
        }
        Err(Error::Conflict {
            reason: format!(
                "job key {key:?} on queue {} is taken by a job this transaction cannot see (REPEATABLE READ or SERIALIZABLE)",
                self.name
            ),
        })
    }

    pub(super) async fn read_with<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        sql: &Arc<str>,
        vt: Duration,
        qty: usize,
    ) -> Result<Vec<Message>> {
        if qty == 0 {
            return Ok(Vec::new());
        }
        let qty = i64::try_from(qty).unwrap_or(i64::MAX);
        let rows = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(qty)
            .bind(vt.as_secs_f64())
            .fetch_all(executor)
            .await?;
        let mut messages = rows
            .iter()
            .map(|row| {
                let mut m = Message::from_row(row)?;
                if row.len() > 7 {
                    m.visible_since = row.try_get(7)?;
                }
                Ok::<_, sqlx::Error>(m)
            })
            .collect::<Result<Vec<_>, _>>()?;
        messages.sort_unstable_by_key(|m| m.msg_id);
        Ok(messages)
    }

    async fn ids_statement<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        sql: &Arc<str>,
        msg_ids: &[i64],
    ) -> Result<Vec<i64>> {
        if msg_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
            .bind(msg_ids)
            .fetch_all(executor)
            .await?;
        ids.sort_unstable();
        Ok(ids)
    }
}

/// A push with a key on a queue without the unique-key index (SQLSTATE 42P10: no constraint
/// matches the `ON CONFLICT`) gets an error that says what to do.
fn unique_index_missing(e: sqlx::Error, queue: &QueueName) -> Error {
    if crate::error::pg::is_missing_unique_index(&e) {
        return Error::SchemaMismatch {
            what: format!(
                "queue {queue} has no unique index on idempotency keys: call PgmqStorage::create_queue \
                 (or PgmqQueue::index_unique_keys, or `apalis-pgmq-notify create-queue {queue}`) as \
                 the queue's owner; partitioned queues cannot have one"
            ),
        };
    }
    Error::from(e)
}

/// Every queue, from `pgmq.list_queues()`.
///
/// # Errors
///
/// [`Error::Database`] if PGMQ is not installed or the statement fails.
///
/// # Example
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// for q in apalis_pgmq_notify::list_queues(&pool).await? {
///     println!("{}", q.queue_name);
/// }
/// # Ok(()) }
/// ```
pub async fn list_queues<'c, E: PgExecutor<'c>>(executor: E) -> Result<Vec<QueueInfo>> {
    let rows = sqlx::query(crate::sql::LIST_QUEUES)
        .fetch_all(executor)
        .await?;
    rows.iter()
        .map(|row| {
            Ok(QueueInfo {
                queue_name: row.try_get(0)?,
                is_partitioned: row.try_get(1)?,
                is_unlogged: row.try_get(2)?,
                created_at: row.try_get(3)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(Error::from)
}

/// Metrics of every queue, from `pgmq.metrics_all()`.
///
/// # Errors
///
/// [`Error::Database`] if PGMQ is not installed or the statement fails.
///
/// # Example
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// for m in apalis_pgmq_notify::metrics_all(&pool).await? {
///     println!("{}: {}", m.queue_name, m.queue_length);
/// }
/// # Ok(()) }
/// ```
pub async fn metrics_all<'c, E: PgExecutor<'c>>(executor: E) -> Result<Vec<QueueMetrics>> {
    let rows = sqlx::query(crate::sql::ALL_QUEUE_METRICS)
        .fetch_all(executor)
        .await?;
    rows.iter()
        .map(QueueMetrics::from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::from)
}
