//! Enqueueing: the `futures::Sink` behind apalis' `TaskSink`, and pushes that run in the
//! caller's own transaction.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use apalis_core::{backend::codec::Codec, task::Task};
use futures::{FutureExt, Sink, future::BoxFuture};
use serde_json::Value;
use sqlx::{Acquire, PgExecutor, Postgres};

use super::{JobMeta, PgmqStorage, Shared};
use crate::{
    error::{Error, Result},
    queue::{Delay, EncodedMessage, PgmqQueue, Pushed},
};

/// Tasks buffered by `start_send` are written by `poll_flush` in one statement; a buffer this
/// large is flushed before accepting more.
const MAX_BUFFERED: usize = 1000;

#[derive(Default)]
pub(crate) struct SinkState {
    buffer: Vec<EncodedMessage>,
    flushing: Option<BoxFuture<'static, Result<()>>>,
}

/// Writes buffered tasks: without keys through the storage's shared writer (one statement,
/// shared with other pushes arriving at the same moment, see `combine.rs`); with keys, those
/// without a key in one statement and each with a key on its own (skipped when the key is
/// taken), in one transaction so the push stays all or nothing.
async fn send_all(
    shared: &Shared,
    batch: Vec<EncodedMessage>,
    window: Option<Duration>,
) -> Result<()> {
    let (queue, pool) = (&shared.queue, &shared.pool);
    if batch.iter().all(|m| m.key.is_none()) {
        shared.pushes.push(shared, batch).await?;
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    let (keyed, plain): (Vec<_>, Vec<_>) = batch.into_iter().partition(|m| m.key.is_some());
    queue.send_encoded(&mut *tx, &plain).await?;
    for m in &keyed {
        if let Some(key) = &m.key {
            queue.send_unique(&mut tx, m, key, window).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Encodes a task (body, apalis headers, `run_at` delay) and checks its size. With
/// `want_result`, the headers ask the workers to keep the job's result whatever their
/// configuration says (`push_and_wait`).
pub(super) fn encode_task(
    queue: &PgmqQueue,
    task: &Task<Value>,
    want_result: bool,
) -> Result<EncodedMessage> {
    let mut headers = JobMeta::headers_of(task);
    if want_result {
        let h = headers.get_or_insert_with(|| serde_json::json!({}));
        if let Some(h) = h.as_object_mut() {
            let meta = h
                .entry(crate::queue::HEADERS_KEY)
                .or_insert_with(|| serde_json::json!({}));
            if let Some(meta) = meta.as_object_mut() {
                meta.insert("result".into(), Value::Bool(true));
            }
        }
    }
    let delay = task
        .run_at()
        .map_or(Delay::Now, |at| delay_until(at, SystemTime::now()));
    queue.encode(&task.args, headers.as_ref(), delay)
}

/// apalis gives `run_at` as whole seconds of the producer's clock (`run_after(d)` is
/// `floor(now + d)`). The wait is measured against that same clock at push time and sent as a
/// delay, which the server adds to its own time: a producer's clock skew changes nothing. The
/// precision is apalis': the job becomes visible up to 1 s before `now + d`.
fn delay_until(run_at: u64, now: SystemTime) -> Delay {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let wait = run_at as f64 - now;
    if wait <= 0.0 {
        return Delay::Now;
    }
    Delay::After(Duration::from_secs_f64(wait).min(crate::queue::MAX_DELAY))
}

impl SinkState {
    fn poll_flush(&mut self, cx: &mut Context<'_>, shared: &Arc<Shared>) -> Poll<Result<()>> {
        loop {
            if let Some(fut) = &mut self.flushing {
                let result = futures::ready!(fut.poll_unpin(cx));
                self.flushing = None;
                result?;
            }
            if self.buffer.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let batch = std::mem::take(&mut self.buffer);
            let shared = shared.clone();
            self.flushing = Some(Box::pin(async move {
                let window = shared.config.pushes.idempotency_window;
                match send_all(&shared, batch, window).await {
                    Ok(()) => Ok(()),
                    Err(e) => Err(crate::util::explain_pool_error(&shared.pool, e).await),
                }
            }));
        }
    }
}

impl<Args, C: Unpin> Sink<Task<Value>> for PgmqStorage<Args, C> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        let shared = this.shared.clone();
        let sink = &mut this.local().sink;
        if sink.flushing.is_some() || sink.buffer.len() >= MAX_BUFFERED {
            return sink.poll_flush(cx, &shared);
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, task: Task<Value>) -> Result<()> {
        let this = self.get_mut();
        match encode_task(&this.shared.queue, &task, false) {
            Ok(encoded) => {
                this.local().sink.buffer.push(encoded);
                Ok(())
            }
            Err(e) => {
                // The push this task belongs to fails as a whole: what it buffered before this
                // task must not be written by a later, unrelated flush.
                this.local().sink.buffer.clear();
                Err(e)
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        let shared = this.shared.clone();
        this.local().sink.poll_flush(cx, &shared)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.poll_flush(cx)
    }
}

impl<Args, C> PgmqStorage<Args, C>
where
    C: Codec<Args, Compact = Value>,
    C::Error: std::error::Error + Send + Sync + 'static,
{
    pub(super) fn encode_args(&self, args: &Args) -> Result<Value> {
        self.codec
            .encode(args)
            .map_err(|e| Error::codec("job arguments", e))
    }

    /// Enqueues one job with `executor`: a pool, a connection, or your own transaction (the job
    /// exists only if the transaction commits). Returns its `msg_id`, which is its task id.
    ///
    /// # Errors
    ///
    /// [`Error::PayloadTooLarge`] or [`Error::Codec`] (nothing written), database errors.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqStorage, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// # let runtime = apalis_pgmq_notify::Runtime::new(&pool);
    /// let storage = PgmqStorage::<String>::new(&runtime, QueueName::new("email")?);
    /// let mut tx = pool.begin().await?;
    /// // ... your own writes in `tx` ...
    /// storage.push_with(&mut *tx, &"a@example.com".to_owned()).await?;
    /// tx.commit().await?; // the job and your writes land together
    /// # Ok(()) }
    /// ```
    pub async fn push_with<'c, E: PgExecutor<'c>>(&self, executor: E, args: &Args) -> Result<i64> {
        let body = self.encode_args(args)?;
        self.shared
            .queue
            .send_with(executor, &body, None, Delay::Now)
            .await
    }

    /// Enqueues a task built with `TaskBuilder` (delay with `run_after`/`run_at_time`, max
    /// attempts, priority, idempotency key, task id, metadata) with `conn`: anything that gives
    /// one connection (`sqlx::Acquire`): `&pool`, `&mut conn` (a pool connection or a
    /// `PgConnection`), or your own transaction, `&mut tx` (the job exists only if it
    /// commits). Returns its `msg_id`. It needs one connection rather than any executor
    /// because a push with a key may run its statement more than once.
    ///
    /// With an idempotency key, the job is written only if no job with that key is pending,
    /// scheduled, running or waiting for a retry on this queue (or, with
    /// [`Config::idempotency_window`](crate::Config::idempotency_window), finished within the
    /// window); otherwise nothing is written and the existing job's id comes back with
    /// [`Pushed::duplicate`] set. Concurrent pushes of one key from many connections write
    /// exactly one job (a unique index decides).
    ///
    /// # Errors
    ///
    /// [`Error::PayloadTooLarge`] or [`Error::Codec`] (nothing written);
    /// [`Error::SchemaMismatch`] if a key is given and the queue has no unique-key index (see
    /// [`PgmqQueue::index_unique_keys`](crate::PgmqQueue::index_unique_keys));
    /// [`Error::Conflict`] if, in a REPEATABLE READ or SERIALIZABLE transaction, the key is
    /// taken by a job the transaction cannot see (retry the transaction); database errors.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_core::task::builder::TaskBuilder;
    /// # use apalis_pgmq_notify::{PgmqStorage, QueueName};
    /// # use std::time::Duration;
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// # let runtime = apalis_pgmq_notify::Runtime::new(&pool);
    /// let storage = PgmqStorage::<String>::new(&runtime, QueueName::new("email")?);
    /// let task = TaskBuilder::new("later@example.com".to_owned())
    ///     .run_after(Duration::from_secs(60))
    ///     .max_attempts(3)
    ///     .build();
    /// let pushed = storage.push_task_with(&pool, task).await?;
    /// let again = TaskBuilder::new("later@example.com".to_owned())
    ///     .idempotency_key("welcome:42")
    ///     .build();
    /// let mut tx = pool.begin().await?;
    /// let first = storage.push_task_with(&mut tx, again.clone()).await?;
    /// let second = storage.push_task_with(&mut tx, again).await?;
    /// tx.commit().await?;
    /// assert!(second.is_duplicate() && second.id() == first.id());
    /// # let _ = pushed;
    /// # Ok(()) }
    /// ```
    // Written as a function returning a `Send` future (sqlx's advice for `Acquire`), so a
    // push with `&mut conn` works inside `tokio::spawn`; the task is encoded before the
    // future, which holds only the storage's shared state, the connection and the bytes.
    pub fn push_task_with<'a, 'c, A>(
        &self,
        conn: A,
        task: Task<Args>,
    ) -> impl Future<Output = Result<Pushed>> + Send + 'a
    where
        A: Acquire<'c, Database = Postgres> + Send + 'a,
    {
        let shared = self.shared.clone();
        let encoded = task
            .try_map_args(|a| self.encode_args(&a))
            .and_then(|task| encode_task(&shared.queue, &task, false));
        async move {
            let encoded = encoded?;
            let mut conn = conn.acquire().await?;
            push_encoded(&shared, &mut conn, &encoded).await
        }
    }
}

/// Writes one encoded task with the storage's pool: without a key through the shared writer
/// (see `combine.rs`), with a key on a connection of its own, unless the key is taken.
pub(super) async fn push_autonomous(shared: &Shared, encoded: EncodedMessage) -> Result<Pushed> {
    if encoded.key.is_none() {
        let ids = shared.pushes.push(shared, vec![encoded]).await?;
        return ids
            .first()
            .map(|&id| Pushed {
                id,
                duplicate: false,
            })
            .ok_or(Error::Database(sqlx::Error::RowNotFound));
    }
    let mut conn = match shared.pool.acquire().await {
        Ok(c) => c,
        Err(e) => return Err(crate::util::explain_pool_error(&shared.pool, e.into()).await),
    };
    push_encoded(shared, &mut conn, &encoded).await
}

/// Writes one encoded task on `conn`: with its key, unless the key is taken.
pub(super) async fn push_encoded(
    shared: &super::Shared,
    conn: &mut sqlx::PgConnection,
    encoded: &EncodedMessage,
) -> Result<Pushed> {
    if let Some(key) = &encoded.key {
        return shared
            .queue
            .send_unique(conn, encoded, key, shared.config.pushes.idempotency_window)
            .await;
    }
    let ids = shared
        .queue
        .send_encoded(&mut *conn, std::slice::from_ref(encoded))
        .await?;
    ids.first()
        .map(|&id| Pushed {
            id,
            duplicate: false,
        })
        .ok_or_else(|| Error::Database(sqlx::Error::RowNotFound))
}

impl<Args, C> PgmqStorage<Args, C>
where
    C: Codec<Args, Compact = Value>,
    C::Error: std::error::Error + Send + Sync + 'static,
{
    /// Enqueues many jobs in one statement with `executor`; returns their `msg_id`s in order.
    ///
    /// # Errors
    ///
    /// [`Error::PayloadTooLarge`] or [`Error::Codec`] (nothing written), database errors.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqStorage, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// # let runtime = apalis_pgmq_notify::Runtime::new(&pool);
    /// let storage = PgmqStorage::<u64>::new(&runtime, QueueName::new("numbers")?);
    /// let ids = storage.push_bulk_with(&pool, 0..1000).await?;
    /// # Ok(()) }
    /// ```
    pub async fn push_bulk_with<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        args: impl IntoIterator<Item = Args>,
    ) -> Result<Vec<i64>> {
        let queue = &self.shared.queue;
        let encoded = args
            .into_iter()
            .map(|a| queue.encode(&self.encode_args(&a)?, None, Delay::Now))
            .collect::<Result<Vec<_>>>()?;
        self.shared.queue.send_encoded(executor, &encoded).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_at_becomes_a_delay_measured_on_the_producers_clock() {
        let now = UNIX_EPOCH + Duration::from_secs_f64(10_000.25);
        assert_eq!(
            delay_until(10_060, now),
            Delay::After(Duration::from_secs_f64(59.75))
        );
        assert_eq!(delay_until(10_000, now), Delay::Now, "in the past: at once");
        // A producer whose clock is an hour behind the server still waits 60 s.
        let behind = now - Duration::from_secs(3600);
        assert_eq!(
            delay_until(10_060 - 3600, behind),
            Delay::After(Duration::from_secs_f64(59.75))
        );
        assert_eq!(
            delay_until(u64::MAX, now),
            Delay::After(crate::queue::MAX_DELAY),
            "clamped"
        );
    }
}
