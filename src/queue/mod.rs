//! The queue layer: PGMQ's queues and everything this crate writes into them.
//!
//! [`PgmqQueue`] is a handle to one PGMQ queue (`pgmq.q_<name>`, `pgmq.a_<name>`). Its methods
//! are split by who uses them:
//!
//! | file | what | for |
//! |---|---|---|
//! | `pgmq.rs` | send, read, set_vt, archive, delete, purge, metrics | everyone: the PGMQ-compatible API |
//! | `delivery.rs` | claim, renew, release, complete, on typed deliveries | the worker (crate-private) |
//! | `admin.rs` | create, partitions, indexes, rights | setup and workers starting |
//! | `inspect.rs` | jobs by state, counts, prune, replay, retry | operators (CLI, board) |
//! | `statements.rs` | the SQL of all of the above, built once per queue | |
//! | `headers.rs` | the job headers (`headers.apalis`) | producers and workers |
//! | `message.rs`, `name.rs` | the values read and written; validated names | |

mod admin;
mod delivery;
mod headers;
mod inspect;
mod message;
mod name;
mod pgmq;
mod statements;

use std::sync::Arc;

pub use delivery::Renewal;
pub(crate) use delivery::{Action, Delivery, Outcome, Seen, StoredResult};
pub use headers::HEADERS_KEY;
pub(crate) use headers::{JobMeta, wants_result};
pub(crate) use inspect::PRUNE_BATCH;
pub use inspect::{JobRecord, JobState, QueueCounts};
pub use message::{
    DEFAULT_MAX_PAYLOAD_BYTES, Delay, Message, MessageInfo, NewMessage, Pushed, QueueInfo,
    QueueMetrics, msg_id, task_id,
};
pub(crate) use message::{EncodedMessage, MAX_DELAY};
pub use name::{DEAD_LETTER_SUFFIX, MAX_QUEUE_NAME_LEN, QueueName};
pub use pgmq::{list_queues, metrics_all};

use statements::QueueSql;

/// A handle to one PGMQ queue (`pgmq.q_<name>` and `pgmq.a_<name>`).
///
/// Cheap to clone; the SQL for the queue is built once from its [`QueueName`].
///
/// # Example
///
/// ```no_run
/// use apalis_pgmq_notify::{PgmqQueue, QueueName};
/// use serde_json::json;
/// use std::time::Duration;
///
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// let queue = PgmqQueue::new(QueueName::new("email")?);
/// queue.create(&pool).await?;
/// let id = queue.send(&pool, &json!({"to": "a@example.com"})).await?;
/// let batch = queue.read(&pool, Duration::from_secs(30), 10).await?;
/// assert_eq!(batch[0].msg_id, id);
/// queue.archive(&pool, &[id]).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgmqQueue {
    name: QueueName,
    sql: Arc<QueueSql>,
    max_payload_bytes: usize,
    /// The `kind` label of this handle's job metrics (feature `metrics`).
    metrics_kind: Option<Arc<str>>,
}

impl PgmqQueue {
    /// A handle to the queue `name`. No SQL is run.
    #[must_use]
    pub fn new(name: QueueName) -> Self {
        let sql = Arc::new(QueueSql::new(&name));
        Self {
            name,
            sql,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            metrics_kind: None,
        }
    }

    /// Labels this handle's job metrics (feature `metrics`: jobs enqueued through it, and,
    /// for a storage's queue, claimed, finished, dead-lettered, released, leases) with
    /// `kind = <kind>` beside `queue`; a storage sets it from `Config::metrics.kind`.
    #[must_use]
    pub fn with_metrics_kind(mut self, kind: Option<&str>) -> Self {
        self.metrics_kind = kind.map(Arc::from);
        self
    }

    /// The `kind` label of this handle's job metrics, if any.
    #[must_use]
    pub fn metrics_kind(&self) -> Option<&str> {
        self.metrics_kind.as_deref()
    }

    /// Sets the largest accepted payload (message plus headers, encoded), in bytes.
    #[must_use]
    pub fn with_max_payload_bytes(mut self, limit: usize) -> Self {
        self.max_payload_bytes = limit;
        self
    }

    /// The largest accepted payload in bytes.
    #[must_use]
    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes
    }

    /// The queue's name.
    #[must_use]
    pub fn name(&self) -> &QueueName {
        &self.name
    }

    /// A handle to this queue's dead-letter queue, `<name>_dlq`.
    #[must_use]
    pub fn dead_letter(&self) -> Self {
        Self::new(self.name.dead_letter()).with_max_payload_bytes(self.max_payload_bytes)
    }

    /// Every statement built for this queue, by name, for checks that prepare them all.
    pub(crate) fn statements(&self) -> Vec<(&'static str, Arc<str>)> {
        let s = &self.sql;
        vec![
            ("send_one", s.send_one.clone()),
            ("send_many", s.send_many.clone()),
            ("send_unique", s.send_unique.clone()),
            ("read", s.read.clone()),
            ("claim", s.claim.clone()),
            ("claim_priority", s.claim_priority.clone()),
            ("claim_logged", s.claim_logged.clone()),
            ("claim_priority_logged", s.claim_priority_logged.clone()),
            ("recover_lost", s.recover_lost.clone()),
            ("set_vt_one", s.set_vt_one.clone()),
            ("set_vt_many", s.set_vt_many.clone()),
            ("archive", s.archive.clone()),
            ("delete", s.delete.clone()),
            ("next_visible", s.next_visible.clone()),
            ("next_visible_in", s.next_visible_in.clone()),
            ("below_floor", s.below_floor.clone()),
            ("tables_exist", s.tables_exist.clone()),
            ("renew", s.renew.clone()),
            ("release", s.release.clone()),
            ("complete", s.complete.clone()),
            ("complete_results", s.complete_results.clone()),
            ("list_queue", s.inspect.list_queue.clone()),
            ("list_archive", s.inspect.list_archive.clone()),
            ("list_dead", s.inspect.list_dead.clone()),
            ("find_queue", s.inspect.find_queue.clone()),
            ("find_archive", s.inspect.find_archive.clone()),
            ("find_dead", s.inspect.find_dead.clone()),
            ("counts", s.inspect.counts.clone()),
            ("counts_no_dlq", s.inspect.counts_no_dlq.clone()),
            ("dlq_exists", s.inspect.dlq_exists.clone()),
            ("count_dead", s.inspect.count_dead.clone()),
            ("activity", s.inspect.activity.clone()),
            ("update_waiting", s.inspect.update_waiting.clone()),
            ("prune_archive", s.inspect.prune_archive.clone()),
            ("prune_dead", s.inspect.prune_dead.clone()),
            (
                "prune_archive_elected",
                s.inspect.prune_archive_elected.clone(),
            ),
            ("prune_dead_elected", s.inspect.prune_dead_elected.clone()),
            ("replay", s.inspect.replay.clone()),
            ("retry_now", s.inspect.retry_now.clone()),
            ("retry_retrying", s.inspect.retry_retrying.clone()),
            ("purge_waiting", s.inspect.purge_waiting.clone()),
            ("delete_queued", s.inspect.delete_queued.clone()),
            ("delete_dead", s.inspect.delete_dead.clone()),
        ]
    }
}
