//! Pushes of one storage that arrive together share a statement and a commit.
//!
//! A push outside the caller's transaction (`push`, `push_task`, `push_bulk` through the
//! storage's pool, `push_and_wait`) costs a connection, a statement and a durable commit, and
//! PostgreSQL flushes the WAL once per commit. A thousand such pushes at once (the requests of a
//! busy web server) queued for the pool's connections one commit at a time, and the workers'
//! own claims and outcomes queued behind them: 1 000 concurrent `push_and_wait` took 100 ms on a
//! quiet machine, everyone's result arriving at the end (BENCHMARKS.md, "Wake-ups at scale").
//!
//! So the pushes without a key of one storage go through one writer at a time: the first push
//! finds no writer and starts one with its own messages at once (a lone push waits for nobody);
//! the pushes that arrive while it writes are gathered and written by its next statement, one
//! `INSERT ... SELECT FROM unnest(...)` and one commit for all of them, at most
//! [`MAX_MESSAGES`] messages each. Every caller gets its own ids, in the order of its messages.
//!
//! - All or nothing per caller. A shared statement the server refused (so it rolled back) is
//!   written again caller by caller, so a message PostgreSQL refuses (a JSON string with
//!   `\u0000`) fails only its own push. A statement whose answer never came (the connection
//!   broke, the pool gave none) is not written again: it may have committed, so every caller
//!   of it gets an error that says so, as a single push would (writing it again could write
//!   the jobs twice).
//! - Nothing of a caller's transaction is involved: pushes with the caller's executor
//!   (`push_with`, `push_task_with`, `push_bulk_with`) and pushes with an idempotency key (one
//!   statement each, see `send_unique`) do not come here.
//! - The writer is a task of its own, a service of the storage's [`Runtime`](crate::Runtime)
//!   (its shutdown waits for it, as for the completers), so a caller that stops waiting (a
//!   timeout around its push) does not stop the others' statement; its own messages may then
//!   still be written, as when a single push's statement had already been sent. The writer
//!   ends when nothing is waiting; if it is stopped (aborted by a shutdown that outlasted its
//!   grace), the callers still waiting get [`Error::Stopped`] and the next push starts a new
//!   writer.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::Shared;
use crate::{
    error::{Error, Result},
    queue::{EncodedMessage, PgmqQueue},
    runtime::lock,
};

/// The most messages one shared statement writes (a batch of one caller can be larger: it is
/// written alone).
pub(crate) const MAX_MESSAGES: usize = 1000;

struct Request {
    messages: Vec<EncodedMessage>,
    reply: oneshot::Sender<Result<Vec<i64>>>,
}

#[derive(Default)]
struct State {
    waiting: Vec<Request>,
    /// A writer task is running: it takes what is waiting before it stops.
    writing: bool,
}

/// The pushes of one storage waiting for the writer (see the module docs).
#[derive(Default)]
pub(crate) struct Combiner {
    state: Mutex<State>,
}

impl Combiner {
    /// Writes `messages` (none with a key) through the shared writer; their ids, in order.
    pub(crate) async fn push(
        self: &Arc<Self>,
        shared: &Shared,
        messages: Vec<EncodedMessage>,
    ) -> Result<Vec<i64>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut state = lock(&self.state);
            state.waiting.push(Request { messages, reply });
            !std::mem::replace(&mut state.writing, true)
        };
        if start {
            let (combiner, queue, pool) = (self.clone(), shared.queue.clone(), shared.pool.clone());
            shared
                .runtime
                .inner
                .spawn_queue_service(move |_stop| write_all(combiner, queue, pool));
        }
        answer
            .await
            .map_err(|_| Error::Stopped("the push writer"))?
    }
}

/// Clears the writer's flag when the writer ends however it ends, and fails the requests still
/// waiting if it ended without taking them (aborted), so no push waits for a writer that is
/// gone.
struct Writing(Arc<Combiner>);

impl Drop for Writing {
    fn drop(&mut self) {
        let left = {
            let mut state = lock(&self.0.state);
            state.writing = false;
            std::mem::take(&mut state.waiting)
        };
        // Dropping their reply senders answers them with `Error::Stopped`.
        drop(left);
    }
}

/// Writes what is waiting, statement after statement, until nothing is.
async fn write_all(combiner: Arc<Combiner>, queue: PgmqQueue, pool: sqlx::PgPool) {
    let _writing = Writing(combiner.clone());
    loop {
        let batch = {
            let mut state = lock(&combiner.state);
            if state.waiting.is_empty() {
                // `Writing` clears the flag, under this same lock order (never held across
                // an await): a push that adds itself after this finds no writer and starts one.
                return;
            }
            take_batch(&mut state.waiting)
        };
        write(&queue, &pool, batch).await;
    }
}

/// The oldest waiting requests, up to [`MAX_MESSAGES`] messages (at least one request).
fn take_batch(waiting: &mut Vec<Request>) -> Vec<Request> {
    let mut messages = 0;
    let mut n = 0;
    for r in waiting.iter() {
        if n > 0 && messages + r.messages.len() > MAX_MESSAGES {
            break;
        }
        messages += r.messages.len();
        n += 1;
    }
    waiting.drain(..n).collect()
}

async fn write(queue: &PgmqQueue, pool: &sqlx::PgPool, batch: Vec<Request>) {
    if let [_] = batch.as_slice() {
        for r in batch {
            let result = write_one(queue, pool, &r.messages).await;
            let _ = r.reply.send(result);
        }
        return;
    }
    let all: Vec<EncodedMessage> = batch
        .iter()
        .flat_map(|r| r.messages.iter().cloned())
        .collect();
    match queue.send_encoded_raw(pool, &all).await {
        Ok(ids) if ids.len() == all.len() => {
            let mut ids = ids.into_iter();
            for r in batch {
                let own: Vec<i64> = ids.by_ref().take(r.messages.len()).collect();
                let _ = r.reply.send(Ok(own));
            }
        }
        Ok(ids) => {
            // Committed, but not one row per message: nothing can be handed back safely.
            for r in batch {
                let _ = r
                    .reply
                    .send(Err(Error::Database(sqlx::Error::Protocol(format!(
                        "a shared push statement returned {} ids for {} messages",
                        ids.len(),
                        all.len()
                    )))));
            }
        }
        // The server refused the statement: nothing was written. Each caller's messages on
        // their own, so each gets its own outcome.
        Err(e) if e.as_database_error().is_some() => {
            for r in batch {
                let result = write_one(queue, pool, &r.messages).await;
                let _ = r.reply.send(result);
            }
        }
        // No answer: it may have committed (unless no connection was had at all). Every caller
        // gets the error, none is written again.
        Err(e) => {
            let sent = !matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed);
            let first = crate::util::explain_pool_error(pool, e.into()).await;
            for r in batch {
                let _ = r.reply.send(Err(same_again(&first, sent)));
            }
        }
    }
}

/// `e` again for another caller of the same statement (errors are not `Clone`); with `sent`,
/// saying that the push may have been written.
fn same_again(e: &Error, sent: bool) -> Error {
    let maybe = |cause: &str| {
        if sent {
            format!(
                "{cause} (the push shared a statement with others whose answer was lost: it may \
                 or may not have been written)"
            )
        } else {
            cause.to_owned()
        }
    };
    match e {
        Error::Unreachable { cause } => Error::Unreachable {
            cause: maybe(cause),
        },
        Error::ConnectionRejected { cause } => Error::ConnectionRejected {
            cause: cause.clone(),
        },
        Error::Database(inner) => Error::Database(copy_error(inner)),
        other => Error::Unreachable {
            cause: maybe(&other.to_string()),
        },
    }
}

/// The same sqlx error again for another caller (sqlx's error is not `Clone`): the kind of an
/// I/O error and the pool's errors kept, anything else by its text.
fn copy_error(e: &sqlx::Error) -> sqlx::Error {
    match e {
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::WorkerCrashed => sqlx::Error::WorkerCrashed,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

async fn write_one(
    queue: &PgmqQueue,
    pool: &sqlx::PgPool,
    messages: &[EncodedMessage],
) -> Result<Vec<i64>> {
    match queue.send_encoded(pool, messages).await {
        Ok(ids) => Ok(ids),
        Err(e) => Err(crate::util::explain_pool_error(pool, e).await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(n: usize) -> Request {
        let (reply, _) = oneshot::channel();
        let messages = (0..n)
            .map(|i| EncodedMessage {
                message: i.to_string(),
                headers: None,
                key: None,
                at: None,
                secs: 0.0,
            })
            .collect();
        Request { messages, reply }
    }

    #[test]
    fn a_batch_takes_the_oldest_requests_up_to_the_limit() {
        let mut waiting = vec![request(400), request(500), request(200), request(1)];
        let batch = take_batch(&mut waiting);
        assert_eq!(
            batch.iter().map(|r| r.messages.len()).collect::<Vec<_>>(),
            vec![400, 500]
        );
        assert_eq!(waiting.len(), 2);
        let batch = take_batch(&mut waiting);
        assert_eq!(batch.len(), 2);
        assert!(waiting.is_empty());
    }

    #[test]
    fn a_writer_that_is_gone_answers_what_waits_and_lets_the_next_push_start_one() {
        let combiner = Arc::new(Combiner::default());
        let (reply, mut answer) = oneshot::channel();
        {
            let mut state = lock(&combiner.state);
            state.writing = true;
            state.waiting.push(Request {
                messages: Vec::new(),
                reply,
            });
        }
        // The writer's task ends without taking the request (as when a shutdown aborts it).
        drop(Writing(combiner.clone()));
        assert!(
            matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Closed)),
            "the waiting push is answered (Error::Stopped), not left waiting"
        );
        let state = lock(&combiner.state);
        assert!(!state.writing, "the next push starts a writer");
        assert!(state.waiting.is_empty());
    }

    #[test]
    fn a_request_larger_than_the_limit_is_written_alone() {
        let mut waiting = vec![request(1500), request(1)];
        let batch = take_batch(&mut waiting);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].messages.len(), 1500);
        assert_eq!(waiting.len(), 1);
    }
}
