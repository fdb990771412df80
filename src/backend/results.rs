//! Job results: apalis' [`WaitForCompletion`], [`PgmqStorage::push_and_wait`] and
//! [`PgmqStorage::results`]. Waiters of a queue in one process share one watch and the
//! process's one listener (see `notify/results.rs` for why no result is missed).

use std::{collections::HashMap, time::Duration};

use apalis_core::{
    backend::{TaskResult, WaitForCompletion, codec::Codec},
    task::{Task, status::Status, task_id::TaskId},
};
use futures::{StreamExt, stream::BoxStream};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{PgmqStorage, Shared};
use crate::{
    error::{Error, Result},
    runtime::results::{self, Ended, ResultRow},
};

/// A stored row as apalis' `TaskResult`, for the id the waiter asked for.
fn task_result<O: DeserializeOwned>(asked: TaskId, row: ResultRow) -> Result<TaskResult<O>> {
    let status: Status = row.status.parse().map_err(|_| Error::ResultType {
        task_id: asked.clone(),
        expected: "a job status",
        error: format!("unknown status {:?}", row.status),
    })?;
    let result = match (row.error, row.result) {
        (Some(error), _) => Err(error),
        // No output stored is JSON `null` (what `()` encodes to).
        (None, output) => Ok(
            serde_json::from_str::<O>(output.as_deref().unwrap_or("null")).map_err(|e| {
                Error::ResultType {
                    task_id: asked.clone(),
                    expected: std::any::type_name::<O>(),
                    error: e.to_string(),
                }
            })?,
        ),
    };
    Ok(TaskResult {
        task_id: asked,
        attempt: usize::try_from(row.attempt).unwrap_or(0),
        status,
        result,
    })
}

/// Waits for the results of `ids` (each yielded once, as it arrives).
fn wait_stream<O: DeserializeOwned + Send + 'static>(
    shared: std::sync::Arc<Shared>,
    ids: impl IntoIterator<Item = TaskId>,
) -> BoxStream<'static, Result<TaskResult<O>>> {
    let asked: HashMap<String, TaskId> = ids.into_iter().map(|t| (t.to_string(), t)).collect();
    if asked.is_empty() {
        return futures::stream::empty().boxed();
    }
    let inner = shared.runtime.inner.clone();
    if let Err(e) = inner.check_running() {
        return futures::stream::once(async move { Err(e) }).boxed();
    }
    let subscribe = async move {
        let c = &shared.config;
        let channel = c.wakeups.channels.results_channel(shared.queue.name());
        let watch = inner.result_watch(shared.queue.name(), channel.clone());
        let waiter = watch.register(asked.keys().cloned().collect());
        inner.health_check_at_least_every(c.process.listener_health_check);
        // Registered first, then listening, then the first look: a result written before the
        // look is read by it, one written after the LISTEN is active is announced.
        let _ = inner.listen(channel).await;
        waiter.look_now();
        (waiter, asked, shared)
    };
    futures::stream::once(subscribe)
        .flat_map(|(waiter, asked, shared)| {
            futures::stream::unfold(
                (waiter, asked, shared),
                |(mut waiter, mut asked, shared)| async move {
                    loop {
                        if asked.is_empty() {
                            return None;
                        }
                        let (key, row) = match waiter.rows.recv().await? {
                            Ok(delivered) => delivered,
                            Err(why) => {
                                // Nothing more will come for any of these ids.
                                asked.clear();
                                let e = match why {
                                    Ended::Unreadable(why) => Error::ResultsUnreadable(why),
                                    Ended::Stopped => Error::Stopped("the runtime is shut down"),
                                };
                                return Some((Err(e), (waiter, asked, shared)));
                            }
                        };
                        let Some(id) = asked.remove(&key) else {
                            continue;
                        };
                        return Some((task_result(id, row), (waiter, asked, shared)));
                    }
                },
            )
        })
        .boxed()
}

impl<Args, C, O> WaitForCompletion<O> for PgmqStorage<Args, C>
where
    C: Codec<Args, Compact = Value>,
    C::Error: std::fmt::Display,
    O: DeserializeOwned + Send + 'static,
    Args: 'static,
    C: 'static,
{
    type ResultStream = BoxStream<'static, Result<TaskResult<O>>>;

    /// Yields each job's result once it is final (`Done`, `Killed`, or `Failed` with no
    /// attempts left; a retry is not final), woken by notifications, never by polling. Results
    /// are kept only with [`Config::store_results`](crate::Config::store_results) on the
    /// workers, or for jobs pushed with [`push_and_wait`](PgmqStorage::push_and_wait): the
    /// stream waits for ever for a job whose result is not kept. Ids are the task ids apalis
    /// shows (a producer's `TaskBuilder::task_id`, else the message id).
    fn wait_for(&mut self, task_ids: impl IntoIterator<Item = TaskId>) -> Self::ResultStream {
        wait_stream(self.shared.clone(), task_ids)
    }

    fn check_status(
        &mut self,
        task_ids: impl IntoIterator<Item = TaskId> + Send,
    ) -> impl Future<Output = Result<Vec<TaskResult<O>>>> + Send {
        let ids: Vec<TaskId> = task_ids.into_iter().collect();
        let shared = self.shared.clone();
        async move { read_results(&shared, ids).await }
    }
}

/// The stored results of `ids`, for those that have one.
async fn read_results<O: DeserializeOwned>(
    shared: &Shared,
    ids: Vec<TaskId>,
) -> Result<Vec<TaskResult<O>>> {
    let mut asked: HashMap<String, TaskId> = ids.into_iter().map(|t| (t.to_string(), t)).collect();
    let keys: Vec<String> = asked.keys().cloned().collect();
    let rows = results::find(&shared.pool, shared.queue.name(), &keys).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let key = if asked.contains_key(&row.job_id) {
            row.job_id.clone()
        } else {
            row.msg_id.to_string()
        };
        if let Some(id) = asked.remove(&key) {
            out.push(task_result(id, row)?);
        }
    }
    Ok(out)
}

impl<Args, C> PgmqStorage<Args, C>
where
    C: Codec<Args, Compact = Value>,
    C::Error: std::error::Error + Send + Sync + 'static,
{
    /// Pushes a task built with `TaskBuilder` (so it can have a key, a priority, a delay,
    /// `max_attempts`, a task id, metadata; `TaskBuilder::new(args).build()` for none) and waits
    /// for its result, for at most `timeout`: the handler's output (`Ok`), or, for a job that
    /// was killed or failed with no attempts left (dead-lettered), its error (`Err` with the
    /// error's text) and status. The job's result is kept whatever
    /// [`Config::store_results`](crate::Config::store_results) says on the workers (it asks for
    /// it in its headers), for [`Config::result_retention`](crate::Config::result_retention).
    /// The result carries the task's own id when it has one.
    ///
    /// With an idempotency key that is taken, nothing is written and this waits for the job
    /// that holds the key; its result is kept only if it too was pushed by `push_and_wait`, or
    /// its workers store results (otherwise this ends with [`Error::Timeout`]).
    ///
    /// Woken by a notification from the statement that writes the result; many concurrent
    /// calls in a process share one listener and one reader.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the job has not finished in time (it keeps going; its result can
    /// be read later with [`results`](Self::results)); [`Error::ResultType`] if the output does
    /// not decode as `O`; [`Error::ResultsUnreadable`] if the role may not read
    /// `apalis_pgmq.results` (or `setup` has not created it); push errors
    /// ([`Error::PayloadTooLarge`], [`Error::Codec`], database errors).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_core::task::builder::TaskBuilder;
    /// # use apalis_pgmq_notify::{PgmqStorage, QueueName};
    /// # use std::time::Duration;
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// # let runtime = apalis_pgmq_notify::Runtime::new(&pool);
    /// let storage = PgmqStorage::<u32>::new(&runtime, QueueName::new("square")?);
    /// let task = TaskBuilder::new(12).priority(5).build();
    /// let done = storage.push_and_wait::<u64>(task, Duration::from_secs(10)).await?;
    /// assert_eq!(done.take(), Ok(144));
    /// # Ok(()) }
    /// ```
    pub async fn push_and_wait<O: DeserializeOwned + Send + 'static>(
        &self,
        task: Task<Args>,
        timeout: Duration,
    ) -> Result<TaskResult<O>> {
        let chosen = task.task_id().cloned();
        let task = task.try_map_args(|a| self.encode_args(&a))?;
        let encoded = super::sink::encode_task(&self.shared.queue, &task, true)?;
        let pushed = super::sink::push_autonomous(&self.shared, encoded).await?;
        // Wait by message id: unambiguous, and announced with every stored result.
        let by_msg = pushed.task_id();
        let own = chosen.filter(|_| !pushed.duplicate);
        let mut stream = wait_stream::<O>(self.shared.clone(), [by_msg.clone()]);
        match tokio::time::timeout(timeout, stream.next()).await {
            Ok(Some(result)) => result.map(|mut r| {
                if let Some(id) = own {
                    r.task_id = id;
                }
                r
            }),
            Ok(None) => Err(Error::Stopped("the result watch")),
            Err(_) => Err(Error::Timeout {
                task_id: own.unwrap_or(by_msg),
                msg_id: pushed.id,
                waited: timeout,
            }),
        }
    }

    /// The stored results of `ids` (task ids as apalis shows them, or message ids), for the
    /// jobs that finished and kept one; unfinished or unknown jobs are left out.
    ///
    /// # Errors
    ///
    /// [`Error::Database`]; [`Error::ResultType`] if an output does not decode as `O`.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_core::task::task_id::TaskId;
    /// # use apalis_pgmq_notify::{PgmqStorage, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// # let runtime = apalis_pgmq_notify::Runtime::new(&pool);
    /// let storage = PgmqStorage::<u32>::new(&runtime, QueueName::new("square")?);
    /// for r in storage.results::<u64>([apalis_pgmq_notify::task_id(7)]).await? {
    ///     println!("{}: {:?} {:?}", r.task_id, r.status, r.result);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn results<O: DeserializeOwned>(
        &self,
        ids: impl IntoIterator<Item = TaskId>,
    ) -> Result<Vec<TaskResult<O>>> {
        read_results(&self.shared, ids.into_iter().collect()).await
    }
}
