//! Waiting for job results: one watch per queue and process, fed by the shared listener.
//!
//! Every waiter of a queue in this process (however many: `WaitForCompletion` streams,
//! `push_and_wait` calls, a workflow's fan-in) registers the job ids it waits for in the queue's
//! [`ResultWatch`]. One task per watch reads the results table, one statement for all the ids
//! that need a look, and hands each row to the waiters of its id. Nothing polls:
//!
//! - A waiter registers its ids, then makes sure the listener LISTENs on the queue's results
//!   channel (`<prefix>r.<queue>`), and only then asks for a first look. A result committed
//!   before that look is found by it; one committed after the LISTEN was active is announced
//!   (the statement that writes a result notifies in the same transaction). So there is no
//!   interleaving in which a result is written and the waiter neither reads nor hears of it.
//! - A notification names the ids it announces (a JSON array; `"*"` when they would not fit):
//!   the watch looks only at those its waiters want.
//! - Notifications sent while the listener is disconnected are lost. After every reconnect the
//!   runtime asks every watch to look at all of its ids again, and the listener's health check
//!   replaces a connection that silently stopped delivering (see `listener.rs`), so a result
//!   written meanwhile is found within that interval.
//! - A look that fails (database unreachable) is retried with backoff, for all ids. A look that
//!   cannot succeed (the role may not read the table, or it is missing) ends its waiters with
//!   the error; so does the runtime's shutdown.

use crate::error::Describe;
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, Weak},
};

use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};

use super::lock;
use crate::{
    queue::QueueName,
    util::{Stop, error_backoff},
};

/// A stored result, as read from `apalis_pgmq.results`.
#[derive(Debug, Clone)]
pub(crate) struct ResultRow {
    /// The producer's id for the job, or else its message id, as text.
    pub(crate) job_id: String,
    pub(crate) msg_id: i64,
    pub(crate) status: String,
    pub(crate) attempt: i32,
    /// The handler's output as JSON text.
    pub(crate) result: Option<String>,
    pub(crate) error: Option<String>,
}

type Row = (String, i64, String, i32, Option<String>, Option<String>);

/// Reads the results of `keys` (job ids; those that are numbers are also tried as message ids).
pub(crate) async fn find(
    pool: &PgPool,
    queue: &QueueName,
    keys: &[String],
) -> crate::error::Result<Vec<ResultRow>> {
    let msg_ids: Vec<i64> = keys.iter().filter_map(|k| k.parse().ok()).collect();
    let rows: Vec<Row> = sqlx::query_as(crate::sql::FIND_RESULTS)
        .bind(queue.as_str())
        .bind(keys)
        .bind(msg_ids)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(job_id, msg_id, status, attempt, result, error)| ResultRow {
                job_id,
                msg_id,
                status,
                attempt,
                result,
                error,
            },
        )
        .collect())
}

/// Which ids a watch must look at.
#[derive(Debug, Default)]
enum Look {
    #[default]
    Nothing,
    Some(HashSet<String>),
    All,
}

impl Look {
    fn add(&mut self, keys: impl IntoIterator<Item = String>) {
        match self {
            Self::All => {}
            Self::Some(set) => set.extend(keys),
            Self::Nothing => *self = Self::Some(keys.into_iter().collect()),
        }
    }
}

/// Why a waiter will receive nothing more.
#[derive(Debug, Clone)]
pub(crate) enum Ended {
    /// Results cannot be read (the role lacks the right, or the table is missing).
    Unreadable(String),
    /// The runtime stopped.
    Stopped,
}

/// What a waiter receives: `(the id it waited for, its row)`, or why nothing more will come.
pub(crate) type Delivery = Result<(String, ResultRow), Ended>;

/// Where a waiter's rows go.
type RowSender = mpsc::UnboundedSender<Delivery>;

#[derive(Default)]
struct State {
    /// Waiters by the id they wait for: (waiter, where its rows go).
    waiters: HashMap<String, Vec<(u64, RowSender)>>,
    look: Look,
    next_waiter: u64,
}

/// The waiters of one queue in this process.
pub(crate) struct ResultWatch {
    pool: PgPool,
    queue: QueueName,
    state: Mutex<State>,
    /// Wakes the watch's task: something to look at, or the watch is gone.
    wake: Arc<Notify>,
}

impl std::fmt::Debug for ResultWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultWatch")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Drop for ResultWatch {
    fn drop(&mut self) {
        // The task holds only a weak reference: wake it so it sees the watch is gone.
        self.wake.notify_one();
    }
}

/// A waiter's place in a watch; leaving it (drop) forgets the ids it still waited for.
pub(crate) struct Waiter {
    watch: Arc<ResultWatch>,
    id: u64,
    keys: Vec<String>,
    /// `(the id waited for, its result)`, once each; or why results cannot be read.
    pub(crate) rows: mpsc::UnboundedReceiver<Delivery>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut state = lock(&self.watch.state);
        for k in &self.keys {
            if let Some(list) = state.waiters.get_mut(k) {
                list.retain(|(w, _)| *w != self.id);
                if list.is_empty() {
                    state.waiters.remove(k);
                }
            }
        }
    }
}

impl Waiter {
    /// Asks for a first look at this waiter's ids: call once the LISTEN is active.
    pub(crate) fn look_now(&self) {
        lock(&self.watch.state).look.add(self.keys.iter().cloned());
        self.watch.wake.notify_one();
    }
}

impl ResultWatch {
    /// A watch; its service is [`run`], which the runtime starts.
    pub(crate) fn new(pool: PgPool, queue: QueueName) -> Arc<Self> {
        Arc::new(Self {
            pool,
            queue,
            state: Mutex::default(),
            wake: Arc::new(Notify::new()),
        })
    }

    /// Registers a waiter for `keys` (job ids as text). Call [`Waiter::look_now`] once the
    /// LISTEN on the queue's results channel is active.
    pub(crate) fn register(self: &Arc<Self>, keys: Vec<String>) -> Waiter {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = lock(&self.state);
        state.next_waiter += 1;
        let id = state.next_waiter;
        for k in &keys {
            state
                .waiters
                .entry(k.clone())
                .or_default()
                .push((id, tx.clone()));
        }
        drop(state);
        Waiter {
            watch: self.clone(),
            id,
            keys,
            rows: rx,
        }
    }

    /// A notification on the results channel: a JSON array of the ids announced, or anything
    /// else for "look at everything".
    pub(crate) fn announced(&self, payload: &str) {
        let keys: Option<Vec<String>> = serde_json::from_str(payload).ok();
        let mut state = lock(&self.state);
        match keys {
            Some(keys) => {
                let wanted: Vec<String> = keys
                    .into_iter()
                    .filter(|k| state.waiters.contains_key(k))
                    .collect();
                if wanted.is_empty() {
                    return;
                }
                state.look.add(wanted);
            }
            None => state.look = Look::All,
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Look at every id again (after the listener reconnected: notifications may be lost).
    pub(crate) fn look_at_all(&self) {
        lock(&self.state).look = Look::All;
        self.wake.notify_one();
    }

    /// The ids to look at now (only those still waited for).
    fn take_look(&self) -> Vec<String> {
        let mut state = lock(&self.state);
        match std::mem::take(&mut state.look) {
            Look::Nothing => Vec::new(),
            Look::All => state.waiters.keys().cloned().collect(),
            Look::Some(set) => set
                .into_iter()
                .filter(|k| state.waiters.contains_key(k))
                .collect(),
        }
    }

    /// Tells the waiters of `keys` (all, when `None`) why nothing more will come, and forgets
    /// them.
    fn fail(&self, keys: Option<&[String]>, why: &Ended) {
        let mut state = lock(&self.state);
        let keys: Vec<String> = match keys {
            Some(k) => k.to_vec(),
            None => state.waiters.keys().cloned().collect(),
        };
        for k in keys {
            if let Some(list) = state.waiters.remove(&k) {
                for (_, tx) in list {
                    let _ = tx.send(Err(why.clone()));
                }
            }
        }
    }

    /// Hands each row to the waiters of its job id and of its message id.
    fn deliver(&self, rows: Vec<ResultRow>) {
        let mut state = lock(&self.state);
        for row in rows {
            let msg_key = row.msg_id.to_string();
            for key in [row.job_id.clone(), msg_key] {
                if let Some(list) = state.waiters.remove(&key) {
                    for (_, tx) in list {
                        let _ = tx.send(Ok((key.clone(), row.clone())));
                    }
                }
            }
        }
    }
}

/// The watch's service: one look (one statement) per wake-up, for every id that needs one,
/// until the watch is gone or the runtime stops (its waiters are then told).
pub(crate) async fn run(watch: Weak<ResultWatch>, mut stop: Stop) {
    let Some(wake) = watch.upgrade().map(|w| w.wake.clone()) else {
        return;
    };
    let mut failures = 0u32;
    loop {
        tokio::select! {
            () = wake.notified() => {}
            () = stop.requested() => {
                if let Some(w) = watch.upgrade() {
                    w.fail(None, &Ended::Stopped);
                }
                return;
            }
        }
        let Some(w) = watch.upgrade() else { return };
        let keys = w.take_look();
        if keys.is_empty() {
            continue;
        }
        // At most a few thousand ids per statement.
        for chunk in keys.chunks(5000) {
            match find(&w.pool, &w.queue, chunk).await {
                Ok(rows) => {
                    failures = 0;
                    w.deliver(rows);
                }
                Err(e) if cannot_read(&e) => {
                    // Waiting cannot help: the role lacks the right, or the table is missing.
                    tracing::error!(queue = %w.queue, error = %e.describe(), "job results cannot be read");
                    w.fail(Some(chunk), &Ended::Unreadable(e.to_string()));
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(queue = %w.queue, error = %e.describe(), failures,
                        "reading job results for waiters failed; retrying");
                    lock(&w.state).look = Look::All;
                    let pause = error_backoff(failures);
                    drop(w);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = stop.requested() => {
                            if let Some(w) = watch.upgrade() {
                                w.fail(None, &Ended::Stopped);
                            }
                            return;
                        }
                    }
                    wake.notify_one();
                    break;
                }
            }
        }
    }
}

/// Errors that retrying cannot cure: a missing right, a missing table (setup not run).
fn cannot_read(e: &crate::error::Error) -> bool {
    match e {
        crate::error::Error::NotSetUp { .. } | crate::error::Error::PermissionDenied { .. } => true,
        crate::error::Error::Database(d) => crate::error::pg::is_undefined_table(d),
        _ => false,
    }
}
