//! PGMQ operations.
//!
//! [`PgmqQueue`] is a handle to one PGMQ queue. Administrative operations (create, drop, purge,
//! list, metrics) call PGMQ's own SQL functions. The hot paths (send, read, set_vt, archive,
//! delete) run prepared SQL directly on the queue tables, with exactly the effect of the PGMQ
//! function of the same name: `read` sets `vt`, increments `read_ct` and stamps `last_read_at`;
//! `archive` moves the row to `pgmq.a_<queue>` keeping `msg_id` and setting `archived_at`.
//! Messages written here are read by `pgmq.read(...)` and the other way round.
//!
//! Every write takes any executor (`E: PgExecutor<'c>`): a pool, a connection, or the caller's own
//! transaction, so a message can be enqueued atomically with the caller's other writes.

mod inspect;
mod name;

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgExecutor, Row, postgres::PgRow};

pub(crate) use inspect::PRUNE_BATCH;
pub use inspect::{JobRecord, JobState, QueueCounts};
pub use name::{DEAD_LETTER_SUFFIX, MAX_QUEUE_NAME_LEN, QueueName, QueueNameError};

use crate::error::{Error, Result};

/// Default limit on the encoded size of one message plus its headers: 1 MiB.
///
/// PostgreSQL accepts far larger `jsonb` values, but a queue full of multi-megabyte rows reads,
/// vacuums and archives slowly; store large blobs elsewhere and enqueue a reference.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// When a message becomes visible to readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delay {
    /// Visible at once.
    #[default]
    Now,
    /// Visible after this long (sub-second precision is kept).
    After(Duration),
    /// Visible from this instant (a time in the past means at once).
    At(DateTime<Utc>),
}

impl Delay {
    /// A delay of whole seconds, as PGMQ's integer `delay` argument.
    #[must_use]
    pub fn seconds(secs: u64) -> Self {
        Self::After(Duration::from_secs(secs))
    }

    /// `(at, secs)` as bound into SQL: `COALESCE(at, clock_timestamp() + secs)`.
    fn bind_parts(self) -> (Option<DateTime<Utc>>, f64) {
        match self {
            Self::Now => (None, 0.0),
            Self::After(d) => (None, d.as_secs_f64()),
            Self::At(t) => (Some(t), 0.0),
        }
    }
}

/// A message as stored in a PGMQ queue table (the shape of `pgmq.message_record`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Message {
    /// PGMQ's identity column; unique within the queue, increasing in send order.
    pub msg_id: i64,
    /// How many times the message has been read; the current delivery's attempt number.
    pub read_ct: i32,
    /// When the message was sent.
    pub enqueued_at: DateTime<Utc>,
    /// When the message was last read, if ever.
    pub last_read_at: Option<DateTime<Utc>>,
    /// Visibility time: the message is invisible to readers until then.
    pub vt: DateTime<Utc>,
    /// The message body. PGMQ allows SQL `NULL` here.
    pub message: Option<Value>,
    /// Message headers, if any.
    pub headers: Option<Value>,
    /// Set when the stored body or headers is valid `jsonb` but cannot be read as JSON here
    /// (for example nested deeper than 128 levels); `message` and `headers` are then `None`.
    /// One such row never fails the read of the others.
    pub decode_error: Option<String>,
    /// For a worker's claim: when the message had become visible (its visibility time before
    /// the claim), so pickup latency can be measured. `None` for other reads.
    pub(crate) visible_since: Option<DateTime<Utc>>,
}

/// Columns returned by reads: bodies as text, parsed per row (see [`Message::decode_error`]).
const READ_COLS: &str =
    "msg_id, read_ct, enqueued_at, last_read_at, vt, message::text, headers::text";

impl Message {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        let body: Option<String> = row.try_get(5)?;
        let headers: Option<String> = row.try_get(6)?;
        let mut decode_error = None;
        let mut parse = |what: &str, text: Option<String>| {
            text.and_then(|t| match serde_json::from_str::<Value>(&t) {
                Ok(v) => Some(v),
                Err(e) => {
                    decode_error.get_or_insert_with(|| format!("{what} cannot be read: {e}"));
                    None
                }
            })
        };
        let message = parse("message", body);
        let headers = parse("headers", headers);
        let (message, headers) = if decode_error.is_some() {
            (None, None)
        } else {
            (message, headers)
        };
        Ok(Self {
            msg_id: row.try_get(0)?,
            read_ct: row.try_get(1)?,
            enqueued_at: row.try_get(2)?,
            last_read_at: row.try_get(3)?,
            vt: row.try_get(4)?,
            message,
            headers,
            decode_error,
            visible_since: None,
        })
    }
}

/// A message to send: body, optional headers, and when it becomes visible.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// The message body.
    pub message: Value,
    /// Optional headers.
    pub headers: Option<Value>,
    /// When the message becomes visible.
    pub delay: Delay,
}

impl NewMessage {
    /// A message visible at once, without headers.
    #[must_use]
    pub fn new(message: Value) -> Self {
        Self {
            message,
            headers: None,
            delay: Delay::Now,
        }
    }

    /// Sets the headers.
    #[must_use]
    pub fn headers(mut self, headers: Value) -> Self {
        self.headers = Some(headers);
        self
    }

    /// Sets when the message becomes visible.
    #[must_use]
    pub fn delay(mut self, delay: Delay) -> Self {
        self.delay = delay;
        self
    }
}

/// A message already encoded to JSON text, as the sink and the batch send bind it.
#[derive(Debug, Clone)]
pub(crate) struct EncodedMessage {
    pub(crate) message: String,
    pub(crate) headers: Option<String>,
    /// The job's idempotency key, if it has one (also in `headers`).
    pub(crate) key: Option<String>,
    pub(crate) at: Option<DateTime<Utc>>,
    pub(crate) secs: f64,
}

/// What a push wrote: a new job, or nothing because a job with the same idempotency key was
/// already queued (or finished within the configured window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    /// The new job's `msg_id`, or the existing job's when `duplicate`.
    pub id: i64,
    /// Nothing was written: the key was taken by job `id`.
    pub duplicate: bool,
}

impl Pushed {
    /// The job's `msg_id` (new or existing).
    #[must_use]
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Whether the key was taken and nothing was written.
    #[must_use]
    pub fn is_duplicate(&self) -> bool {
        self.duplicate
    }
}

/// The idempotency key in a job's headers (`headers.apalis.idempotency_key`), if any.
fn headers_key(headers: Option<&Value>) -> Option<String> {
    headers?
        .get(crate::HEADERS_KEY)?
        .get("idempotency_key")?
        .as_str()
        .map(str::to_owned)
}

/// A push with a key on a queue without the unique-key index (SQLSTATE 42P10: no constraint
/// matches the `ON CONFLICT`) gets an error that says what to do.
fn unique_index_missing(e: sqlx::Error, queue: &QueueName) -> Error {
    if crate::util::sqlstate(&e).as_deref() == Some("42P10") {
        return Error::Config(format!(
            "queue {queue} has no unique index on idempotency keys: call PgmqStorage::create_queue \
             (or PgmqQueue::index_unique_keys) as the queue's owner; partitioned queues cannot have one"
        ));
    }
    Error::Database(e)
}

/// One row of `pgmq.list_queues()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// The queue's name as recorded in `pgmq.meta`.
    pub queue_name: String,
    /// Whether the queue is partitioned (pg_partman).
    pub is_partitioned: bool,
    /// Whether the queue table is unlogged.
    pub is_unlogged: bool,
    /// When the queue was created.
    pub created_at: DateTime<Utc>,
}

/// One row of `pgmq.metrics(queue)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMetrics {
    /// The queue's name.
    pub queue_name: String,
    /// Messages in the queue table, visible or not.
    pub queue_length: i64,
    /// Age in seconds of the newest message, if any.
    pub newest_msg_age_sec: Option<i32>,
    /// Age in seconds of the oldest message, if any.
    pub oldest_msg_age_sec: Option<i32>,
    /// Messages ever sent to the queue (the identity sequence's last value).
    pub total_messages: i64,
    /// When the metrics were taken.
    pub scrape_time: DateTime<Utc>,
    /// Messages visible now (`vt <= now()`).
    pub queue_visible_length: i64,
}

impl QueueMetrics {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            queue_name: row.try_get(0)?,
            queue_length: row.try_get(1)?,
            newest_msg_age_sec: row.try_get(2)?,
            oldest_msg_age_sec: row.try_get(3)?,
            total_messages: row.try_get(4)?,
            scrape_time: row.try_get(5)?,
            queue_visible_length: row.try_get(6)?,
        })
    }
}

/// What PGMQ knows about the message behind a task.
///
/// Available to handlers as `Data<MessageInfo>`:
///
/// ```no_run
/// use apalis_core::task::data::Data;
/// use apalis_pgmq_notify::MessageInfo;
///
/// async fn handle(job: String, msg: Data<MessageInfo>) {
///     println!("msg {} attempt {} headers {:?}", msg.msg_id, msg.read_ct, msg.headers);
/// }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MessageInfo {
    /// The queue the message came from.
    pub queue: QueueName,
    /// PGMQ's message id (also the task id).
    pub msg_id: i64,
    /// PGMQ's read count: this delivery's attempt number, starting at 1.
    pub read_ct: i32,
    /// When the message was sent.
    pub enqueued_at: DateTime<Utc>,
    /// The visibility time set by this delivery's read (before lease renewals).
    pub vt: DateTime<Utc>,
    /// The message's headers as stored, including the `apalis` key if present.
    pub headers: Option<Value>,
    /// When the message had become visible before this delivery claimed it (the visibility
    /// time it had: its send time, a delay, a backoff, a lapsed lease). Now minus this, when
    /// the handler starts, is the job's pickup latency.
    pub visible_since: DateTime<Utc>,
}

/// The columns an archived message keeps, in the order of `pgmq.a_<queue>`: written once, used
/// by every statement that moves rows to an archive.
pub(crate) const ARCHIVE_COLS: &str =
    "msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers";

/// The fence of every write about a claimed message: the row must still carry the `read_ct`
/// of our delivery (`m` the queue table, `t` the batch), so a stale holder's writes match no row
/// once the message was delivered again.
const FENCE: &str = "m.msg_id = t.msg_id AND m.read_ct = t.read_ct";

/// A CTE `locked` that locks the rows of the batch `pairs` (a `FROM` item named `t` with
/// `msg_id` and `read_ct`) still carrying our `read_ct`, one at a time in `msg_id` order
/// (`wait`) or skipping those another transaction holds (`!wait`), and returns their
/// `msg_id`. The statement then writes only rows it locked, found through `locked`.
///
/// Why: the statements that write about claimed messages run concurrently, often on the same
/// rows (the keeper renews every lease while the completer archives finished jobs and a full
/// worker releases what it cannot start). Two that wait on row locks in different orders
/// deadlock, and PostgreSQL only notices after `deadlock_timeout` (1 s by default), longer than
/// a short lease has left. So the renewal never waits (a row it skips is reported busy and
/// renewed on the next try), the release and PGMQ's batch calls lock in `msg_id` order, and
/// claims skip locked rows. The outcome statement, the one on every job's path, waits in
/// whatever order its plan visits rows: nothing it can meet waits on it in turn (see
/// `complete_sql`).
fn locked_cte(q: &str, pairs: &str, wait: bool) -> String {
    let lock = if wait {
        "ORDER BY m.msg_id FOR UPDATE OF m"
    } else {
        "FOR UPDATE OF m SKIP LOCKED"
    };
    format!("locked AS MATERIALIZED (SELECT m.msg_id FROM {q} m JOIN {pairs} ON {FENCE} {lock})")
}

/// As [`locked_cte`], for a batch of ids without fence (`$1`).
fn locked_ids_cte(q: &str) -> String {
    format!(
        "locked AS MATERIALIZED (SELECT m.msg_id FROM {q} m WHERE m.msg_id = ANY($1::bigint[]) \
                                ORDER BY m.msg_id FOR UPDATE OF m)"
    )
}

/// How a read picks the visible messages it claims.
#[derive(Clone, Copy)]
enum Pick {
    /// PGMQ's `read`: in `msg_id` order. The scan walks the primary key from the oldest id and
    /// tests each row's `vt` (`clock_timestamp()` is volatile, so it cannot bound an index
    /// scan): behind many messages scheduled for later it reads them all.
    Id,
    /// A worker's claim: the messages visible longest first (by `vt`), read from the `vt` index
    /// up to `now()` (stable, so it bounds the scan), so messages scheduled for later, claimed
    /// by other workers or waiting in a retry's backoff are never visited.
    Visibility,
    /// A worker's claim with priorities: highest `apalis_pgmq.priority_of(headers)` first, then
    /// visible longest, from the `(priority DESC, vt)` index.
    Priority,
}

/// PGMQ's read (claim visible messages, lease them for `$2` seconds, count the read), with an
/// extra condition on the claimed rows and, with `visible_since`, the visibility time each row
/// had before the claim as an eighth column.
fn read_sql(q: &str, also: &str, visible_since: bool, pick_by: Pick) -> Arc<str> {
    let (pick, ret) = if visible_since {
        (", vt AS visible_since", ", cte.visible_since")
    } else {
        ("", "")
    };
    let (visible, order) = match pick_by {
        Pick::Id => ("vt <= clock_timestamp()", "msg_id ASC"),
        Pick::Visibility => ("vt <= now()", "vt ASC"),
        Pick::Priority => (
            "vt <= now()",
            "apalis_pgmq.priority_of(headers) DESC, vt ASC",
        ),
    };
    format!(
        "WITH cte AS (SELECT msg_id{pick} FROM {q} WHERE {visible} {also} \
                      ORDER BY {order} LIMIT $1 FOR UPDATE SKIP LOCKED) \
         UPDATE {q} m SET last_read_at = clock_timestamp(), \
                          vt = clock_timestamp() + make_interval(secs => $2::float8), \
                          read_ct = read_ct + 1 \
         FROM cte WHERE m.msg_id = cte.msg_id \
         RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.last_read_at, m.vt, \
                   m.message::text, m.headers::text{ret}"
    )
    .into()
}

/// A job's idempotency key in its headers (`alias`: `""`, `"a."`). The unique index (migration 0009) is on
/// `apalis_pgmq.key_hash` of it, so statements that use the index compare the hash, then the
/// key itself.
fn key_of(alias: &str) -> String {
    format!("({alias}headers->'apalis'->>'idempotency_key')")
}

/// `apalis_pgmq.key_hash` of [`key_of`].
fn key_hash_of(alias: &str) -> String {
    format!("apalis_pgmq.key_hash({})", key_of(alias))
}

/// The statement that applies a batch of outcomes (see [`Outcomes`]): 1 archive, 2 delete,
/// 3 retry (visible after `delay`, the runs and error recorded in the headers), 4 dead-letter
/// (with `info` merged into the headers), each fenced by its delivery's `read_ct`.
///
/// With `results`, the finished jobs (archived, deleted or dead-lettered by this statement, so
/// fenced like their outcome) that carry a result have it upserted into `apalis_pgmq.results`,
/// and one notification on the results channel (`$12`) lists their keys (message ids, and the
/// producer's job ids where there are some) as a JSON array, or `"*"` when that would not fit
/// 7 900 bytes. A third column counts the notifications sent (0 or 1).
///
/// It locks rows in the order its plan visits them (ordering them first cost a third more
/// server time per outcome, measured). That cannot deadlock with this crate's other writes:
/// renewals never wait, a release or another outcome statement touches other rows (a message
/// is claimed by one worker at a time; a stale holder's write fails its fence without waiting,
/// or waits only on a claim, which never waits), and claims skip locked rows. A batch call of
/// an operator or another PGMQ client on messages workers hold can still meet it in the
/// opposite order; PostgreSQL then cancels one of the two after `deadlock_timeout` and the
/// completer writes its batch again.
fn complete_sql(q: &str, a: &str, d: &str, m_cols: &str, source: &str, results: bool) -> Arc<str> {
    const COLS: &str = ARCHIVE_COLS;
    // With results, each outcome's row of `t` also carries its result (status NULL: none).
    let (result_arrays, result_cols, stored, select_more) = if results {
        (
            ", $8::text[], $9::text[], $10::text[], $11::text[]",
            ", job_id, r_status, r_val, r_err",
            format!(
                ", stored AS ( \
                   INSERT INTO apalis_pgmq.results AS x (queue, msg_id, job_id, status, attempt, result, error) \
                   SELECT '{source}', t.msg_id, NULLIF(t.job_id, t.msg_id::text), t.r_status, \
                          greatest(t.attempts, t.read_ct), t.r_val::jsonb, t.r_err \
                   FROM t WHERE t.r_status IS NOT NULL \
                     AND t.msg_id IN (SELECT msg_id FROM archived UNION ALL \
                                      SELECT msg_id FROM deleted UNION ALL \
                                      SELECT msg_id FROM dead) \
                   ON CONFLICT (queue, msg_id) DO UPDATE \
                     SET job_id = EXCLUDED.job_id, status = EXCLUDED.status, attempt = EXCLUDED.attempt, \
                         result = EXCLUDED.result, error = EXCLUDED.error, finished_at = clock_timestamp() \
                   RETURNING x.job_id, x.msg_id), \
                 announced AS ( \
                   SELECT json_agg(k)::text AS keys FROM ( \
                     SELECT msg_id::text AS k FROM stored \
                     UNION ALL SELECT job_id FROM stored WHERE job_id IS NOT NULL) ks)"
            ),
            ", (SELECT count(*) FROM (SELECT pg_notify($12::text, \
                   CASE WHEN octet_length(keys) <= 7900 THEN keys ELSE '\"*\"' END) \
                 FROM announced WHERE keys IS NOT NULL) n)",
        )
    } else {
        ("", "", String::new(), "")
    };
    format!(
        "WITH t AS ( \
           SELECT * FROM unnest($1::bigint[], $2::int[], $3::smallint[], $4::float8[], \
                                $5::text[], $6::int[], $7::text[]{result_arrays}) \
             AS u(msg_id, read_ct, action, delay, info, attempts, err{result_cols})), \
         archived AS ( \
           DELETE FROM {q} m USING t WHERE {FENCE} AND t.action = 1 RETURNING {m_cols}), \
         archive_rows AS (INSERT INTO {a} ({COLS}) SELECT {COLS} FROM archived RETURNING msg_id), \
         deleted AS ( \
           DELETE FROM {q} m USING t WHERE {FENCE} AND t.action = 2 RETURNING m.msg_id), \
         retried AS ( \
           UPDATE {q} m SET vt = clock_timestamp() + make_interval(secs => t.delay), \
                            headers = apalis_pgmq.retry_headers(m.headers, t.attempts, t.err) \
           FROM t WHERE {FENCE} AND t.action = 3 RETURNING m.msg_id), \
         dead AS ( \
           DELETE FROM {q} m USING t WHERE {FENCE} AND t.action = 4 \
           RETURNING m.msg_id, greatest(m.read_ct, t.attempts) AS runs, m.message, m.headers, t.info), \
         dead_rows AS ( \
           INSERT INTO {d} (vt, message, headers) \
           SELECT clock_timestamp(), message, apalis_pgmq.dead_letter_headers(headers, \
                    info::jsonb || jsonb_build_object('queue', '{source}', 'msg_id', msg_id, \
                                                      'attempts', runs, 'at', now())) \
           FROM dead ORDER BY msg_id RETURNING msg_id){stored} \
         SELECT ARRAY(SELECT msg_id FROM archived) || ARRAY(SELECT msg_id FROM deleted) \
             || ARRAY(SELECT msg_id FROM retried) || ARRAY(SELECT msg_id FROM dead), \
                (SELECT count(*) FROM archive_rows) + (SELECT count(*) FROM dead_rows){select_more}"
    )
    .into()
}

/// SQL text built once per queue from its validated name.
#[derive(Debug)]
struct QueueSql {
    send_one: Arc<str>,
    send_many: Arc<str>,
    /// One message with an idempotency key: inserted unless the key is taken (see
    /// `send_unique`).
    send_unique: Arc<str>,
    read: Arc<str>,
    /// A worker's read: as `read`, but nothing while the queue is paused.
    claim: Arc<str>,
    /// As `claim`, highest priority first.
    claim_priority: Arc<str>,
    set_vt_one: Arc<str>,
    set_vt_many: Arc<str>,
    archive: Arc<str>,
    delete: Arc<str>,
    next_visible: Arc<str>,
    next_visible_in: Arc<str>,
    tables_exist: Arc<str>,
    /// Lease renewal of a batch of `(msg_id, read_ct)`, fenced.
    renew: Arc<str>,
    /// Release of claimed-but-unstarted messages: visible now, the read given back, fenced.
    release: Arc<str>,
    /// One statement applying a batch of mixed job outcomes, fenced.
    complete: Arc<str>,
    /// As `complete`, also keeping the results of the finished jobs that have one
    /// (`apalis_pgmq.results`) and announcing them on the results channel (`$12`).
    complete_results: Arc<str>,
    /// Listing, finding and counting jobs in every state.
    inspect: inspect::InspectSql,
}

impl QueueSql {
    fn new(name: &QueueName) -> Self {
        let q = name.queue_table();
        let a = name.archive_table();
        const COLS: &str = ARCHIVE_COLS;
        let d = name.dead_letter().queue_table();
        let source = name.as_str();
        let m_cols = COLS
            .split(", ")
            .map(|c| format!("m.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let vt = "COALESCE($3::timestamptz, clock_timestamp() + make_interval(secs => $4::float8))";
        let locked_ids = locked_ids_cte(&q);
        let batch = "unnest($1::bigint[], $2::int[]) AS t(msg_id, read_ct)";
        let locked_batch = locked_cte(&q, batch, true);
        let locked_free = locked_cte(&q, batch, false);
        Self {
            send_one: format!(
                "INSERT INTO {q} (vt, message, headers) VALUES ({vt}, $1::text::jsonb, $2::text::jsonb) \
                 RETURNING msg_id"
            )
            .into(),
            // `unnest` keeps input order and the identity column is assigned in insert order, so
            // the returned ids sorted ascending line up with the input.
            send_many: format!(
                "INSERT INTO {q} (vt, message, headers) \
                 SELECT COALESCE(t.at, clock_timestamp() + make_interval(secs => t.secs)), \
                        t.m::jsonb, t.h::jsonb \
                 FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::float8[]) AS t(m, h, at, secs) \
                 RETURNING msg_id"
            )
            .into(),
            // $5: the key; $6: how long a finished job keeps its key (NULL: not at all). The key
            // is taken by a message in the queue table (the partial unique index on its hash
            // settles races)
            // or by one archived within the window. Zero rows: the conflicting row was committed
            // after this statement's snapshot; the caller runs it again.
            send_unique: format!(
                "WITH prior AS (SELECT a.msg_id FROM {a} a \
                   WHERE $6::float8 IS NOT NULL \
                     AND {key_hash_a} = apalis_pgmq.key_hash($5::text) AND {key_a} = $5::text \
                     AND a.archived_at > clock_timestamp() - make_interval(secs => $6::float8) \
                   ORDER BY a.archived_at DESC LIMIT 1), \
                 ins AS (INSERT INTO {q} (vt, message, headers) \
                   SELECT {vt}, $1::text::jsonb, $2::text::jsonb WHERE NOT EXISTS (SELECT 1 FROM prior) \
                   ON CONFLICT ({key_hash}) WHERE {key} IS NOT NULL DO NOTHING \
                   RETURNING msg_id) \
                 SELECT msg_id, false FROM ins \
                 UNION ALL SELECT msg_id, true FROM prior \
                 UNION ALL SELECT q.msg_id, true FROM {q} q \
                   WHERE NOT EXISTS (SELECT 1 FROM ins) AND NOT EXISTS (SELECT 1 FROM prior) \
                     AND {key_hash_q} = apalis_pgmq.key_hash($5::text) AND {key_q} = $5::text \
                 LIMIT 1",
                key = key_of(""),
                key_hash = key_hash_of(""),
                key_a = key_of("a."),
                key_hash_a = key_hash_of("a."),
                key_q = key_of("q."),
                key_hash_q = key_hash_of("q."),
            )
            .into(),
            // A worker's claim is PGMQ's read plus three things: nothing while the queue is
            // paused, when each message had become visible (for pickup latency), and the
            // messages visible longest first, read from the `vt` index (see `Pick`).
            claim: read_sql(
                &q,
                &format!(
                    "AND NOT EXISTS (SELECT 1 FROM apalis_pgmq.paused p WHERE p.queue = '{source}')"
                ),
                true,
                Pick::Visibility,
            ),
            claim_priority: read_sql(
                &q,
                &format!(
                    "AND NOT EXISTS (SELECT 1 FROM apalis_pgmq.paused p WHERE p.queue = '{source}')"
                ),
                true,
                Pick::Priority,
            ),
            read: read_sql(&q, "", false, Pick::Id),
            set_vt_one: format!(
                "UPDATE {q} SET vt = COALESCE($2::timestamptz, clock_timestamp() + make_interval(secs => $3::float8)) \
                 WHERE msg_id = $1 RETURNING {READ_COLS}"
            )
            .into(),
            set_vt_many: format!(
                "WITH {locked_ids} \
                 UPDATE {q} m SET vt = COALESCE($2::timestamptz, clock_timestamp() + make_interval(secs => $3::float8)) \
                 FROM locked l WHERE m.msg_id = l.msg_id RETURNING m.msg_id"
            )
            .into(),
            archive: format!(
                "WITH {locked_ids}, \
                 archived AS (DELETE FROM {q} m USING locked l WHERE m.msg_id = l.msg_id RETURNING {m_cols}) \
                 INSERT INTO {a} ({COLS}) SELECT {COLS} FROM archived RETURNING msg_id"
            )
            .into(),
            delete: format!(
                "WITH {locked_ids} \
                 DELETE FROM {q} m USING locked l WHERE m.msg_id = l.msg_id RETURNING m.msg_id"
            )
            .into(),
            next_visible: format!("SELECT min(vt) FROM {q} WHERE vt > clock_timestamp()").into(),
            // Over every row, visible ones included (then it is zero or less): a message that
            // became visible between a worker's empty read and this look is not missed. Nothing
            // while the queue is paused (its workers wait for the resume notification).
            next_visible_in: format!(
                "SELECT EXTRACT(EPOCH FROM min(vt) - clock_timestamp())::float8 FROM {q} \
                 WHERE NOT EXISTS (SELECT 1 FROM apalis_pgmq.paused p WHERE p.queue = '{source}')"
            )
            .into(),
            tables_exist: format!(
                "SELECT to_regclass('{q}') IS NOT NULL AND to_regclass('{a}') IS NOT NULL",
                q = q.replace('\'', "''"),
                a = a.replace('\'', "''")
            )
            .into(),
            // Renewed rows (true), and rows still ours that another transaction holds (false:
            // the completer writing their outcome, most often), so the keeper tries them again.
            // The second look at the batch runs only when some row was not locked.
            renew: format!(
                "WITH {locked_free}, \
                 renewed AS (UPDATE {q} m SET vt = clock_timestamp() + make_interval(secs => $3::float8) \
                             FROM locked l WHERE m.msg_id = l.msg_id RETURNING m.msg_id) \
                 SELECT msg_id, true FROM renewed \
                 UNION ALL \
                 SELECT m.msg_id, false FROM {q} m JOIN {batch} ON {FENCE} \
                 WHERE (SELECT count(*) FROM locked) < cardinality($1::bigint[]) \
                   AND m.msg_id NOT IN (SELECT msg_id FROM locked)"
            )
            .into(),
            release: format!(
                "WITH {locked_batch} \
                 UPDATE {q} m SET vt = clock_timestamp(), read_ct = m.read_ct - 1 \
                 FROM locked l WHERE m.msg_id = l.msg_id RETURNING m.msg_id"
            )
            .into(),
            // Actions: 1 archive, 2 delete, 3 retry (visible after `delay`, the runs and error
            // recorded in the headers), 4 dead-letter (with `info` merged into the headers).
            complete: complete_sql(&q, &a, &d, &m_cols, source, false),
            complete_results: complete_sql(&q, &a, &d, &m_cols, source, true),
            inspect: inspect::InspectSql::new(name),
        }
    }
}

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
        }
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
            return Err(Error::Config(
                "partitioned queues need the pg_partman extension on the server \
                 (Debian: apt-get install postgresql-<major>-partman)"
                    .to_owned(),
            ));
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

    /// Whether the queue was created partitioned (`pgmq.meta`).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the statement fails.
    pub async fn is_partitioned(&self, pool: &sqlx::PgPool) -> Result<bool> {
        let p: Option<bool> = sqlx::query_scalar(crate::sql::QUEUE_IS_PARTITIONED)
            .bind(self.name.as_str())
            .fetch_optional(pool)
            .await?;
        Ok(p.unwrap_or(false))
    }

    /// Runs pg_partman's maintenance on a partitioned queue's tables: partitions are made ahead
    /// of the growing ids (or times), and archive partitions past the retention given at
    /// creation are dropped. Returns how many archive partitions went. Run it often (a worker
    /// process does, on each heartbeat): rows beyond the partitions made ahead land in the
    /// default partition, which blocks making their partition later.
    pub(crate) async fn maintain_partitions(&self, pool: &sqlx::PgPool) -> Result<usize> {
        sqlx::query(crate::sql::RUN_PARTMAN_MAINTENANCE)
            .bind(format!("pgmq.q_{}", self.name.as_str()))
            .execute(pool)
            .await?;
        let table = format!("pgmq.a_{}", self.name.as_str());
        let before: i64 = sqlx::query_scalar(crate::sql::COUNT_PARTITIONS)
            .bind(&table)
            .fetch_one(pool)
            .await?;
        sqlx::query(crate::sql::RUN_PARTMAN_MAINTENANCE)
            .bind(&table)
            .execute(pool)
            .await?;
        let after: i64 = sqlx::query_scalar(crate::sql::COUNT_PARTITIONS)
            .bind(&table)
            .fetch_one(pool)
            .await?;
        Ok(usize::try_from(before - after).unwrap_or(0))
    }

    /// Indexes the dead letters of this queue by job id (idempotent; the dead-letter queue must
    /// exist), so a dead job is found by id without a scan.
    pub(crate) async fn index_dead_letters(&self, pool: &sqlx::PgPool) -> Result<()> {
        sqlx::query(crate::sql::INDEX_DEAD_LETTERS)
            .bind(self.name.as_str())
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
        let key = headers_key(headers_value);
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
                return Ok(Pushed { id, duplicate });
            }
        }
        Err(Error::Config(format!(
            "job key {key:?} on queue {} is taken by a job this transaction cannot see (REPEATABLE READ or SERIALIZABLE); retry the transaction",
            self.name
        )))
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
        Ok(id)
    }

    pub(crate) async fn send_encoded<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        messages: &[EncodedMessage],
    ) -> Result<Vec<i64>> {
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
        ids.sort_unstable();
        Ok(ids)
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

    /// A worker's claim: like [`read`](Self::read), but nothing while the queue is paused
    /// ([`pause`](crate::pause)).
    pub(crate) async fn claim<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        vt: Duration,
        qty: usize,
        by_priority: bool,
    ) -> Result<Vec<Message>> {
        let sql = if by_priority {
            &self.sql.claim_priority
        } else {
            &self.sql.claim
        };
        self.read_with(executor, sql, vt, qty).await
    }

    async fn read_with<'c, E: PgExecutor<'c>>(
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

    /// Sets the visibility time of one message; returns it, or `None` if it does not exist.
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

    /// Sets the visibility time of many messages; returns the ids that exist.
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
    /// Seconds until the earliest message becomes visible (zero or less: one is visible now),
    /// measured by the database clock; `None` if the queue is empty or paused.
    pub(crate) async fn next_visible_in<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
    ) -> Result<Option<Duration>> {
        let secs: Option<f64> = sqlx::query_scalar(AssertSqlSafe(self.sql.next_visible_in.clone()))
            .fetch_one(executor)
            .await?;
        Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
    }

    /// Whether both the queue table and the archive table exist.
    /// Renews the lease of a batch of `(msg_id, read_ct)` to `now + secs`; the ids renewed,
    /// sorted (a message completed or delivered again meanwhile is not).
    pub(crate) async fn renew_leases(
        &self,
        pool: &sqlx::PgPool,
        batch: &[(i64, i32)],
        secs: f64,
    ) -> Result<Renewal, sqlx::Error> {
        let ids: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
        let cts: Vec<i32> = batch.iter().map(|(_, ct)| *ct).collect();
        let rows: Vec<(i64, bool)> = sqlx::query_as(AssertSqlSafe(self.sql.renew.clone()))
            .bind(ids)
            .bind(cts)
            .bind(secs)
            .fetch_all(pool)
            .await?;
        let (mut renewed, mut busy) = (Vec::new(), Vec::new());
        for (id, done) in rows {
            if done {
                renewed.push(id);
            } else {
                busy.push(id);
            }
        }
        renewed.sort_unstable();
        busy.sort_unstable();
        Ok(Renewal { renewed, busy })
    }

    /// Makes claimed-but-unstarted messages visible now and gives back the read they cost, so
    /// a release is not an attempt; the ids released, sorted.
    pub(crate) async fn release_leases(
        &self,
        pool: &sqlx::PgPool,
        batch: &[(i64, i32)],
    ) -> Result<Vec<i64>, sqlx::Error> {
        run_fenced(pool, &self.sql.release, batch, 0.0).await
    }

    /// Applies a batch of job outcomes in one statement (see [`Outcomes`]); returns the ids
    /// that matched (a stale delivery's outcome matches nothing) and the rows written to the
    /// archive and the dead-letter queue.
    pub(crate) async fn complete<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        outcomes: Outcomes,
        results_channel: &str,
    ) -> Result<(Vec<i64>, i64), sqlx::Error> {
        let with_results = outcomes.results.status.iter().any(Option::is_some);
        let sql = if with_results {
            &self.sql.complete_results
        } else {
            &self.sql.complete
        };
        let query = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(outcomes.msg_ids)
            .bind(outcomes.read_cts)
            .bind(outcomes.actions)
            .bind(outcomes.delays)
            .bind(outcomes.infos)
            .bind(outcomes.attempts)
            .bind(outcomes.errors);
        let query = if with_results {
            let r = outcomes.results;
            query
                .bind(r.job_ids)
                .bind(r.status)
                .bind(r.values)
                .bind(r.errors)
                .bind(results_channel)
        } else {
            query
        };
        let row = query.fetch_one(executor).await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
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
            ("set_vt_one", s.set_vt_one.clone()),
            ("set_vt_many", s.set_vt_many.clone()),
            ("archive", s.archive.clone()),
            ("delete", s.delete.clone()),
            ("next_visible", s.next_visible.clone()),
            ("next_visible_in", s.next_visible_in.clone()),
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
            ("delete_queued", s.inspect.delete_queued.clone()),
            ("delete_dead", s.inspect.delete_dead.clone()),
        ]
    }

    pub(crate) async fn tables_exist<'c, E: PgExecutor<'c>>(&self, executor: E) -> Result<bool> {
        let exists: bool = sqlx::query_scalar(AssertSqlSafe(self.sql.tables_exist.clone()))
            .fetch_one(executor)
            .await?;
        Ok(exists)
    }

    /// The first right a worker of this queue needs and lacks (`None`: it has them all).
    /// `dlq` is the queue's dead-letter queue; `listeners`: whether the worker arms wake-ups.
    pub(crate) async fn missing_worker_right(
        &self,
        pool: &sqlx::PgPool,
        dlq: &PgmqQueue,
        listeners: bool,
        results: bool,
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
            (a, "INSERT", "archiving finished jobs", "TABLE".into()),
            (d.clone(), "INSERT", "dead-lettering jobs", "TABLE".into()),
            (d, "SELECT", "dead-lettering jobs", "TABLE".into()),
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
        if results {
            for right in ["SELECT", "INSERT", "UPDATE"] {
                checks.push((
                    "apalis_pgmq.results".into(),
                    right,
                    "keeping job results (Config::store_results)",
                    "TABLE".into(),
                ));
            }
        }
        if listeners {
            checks.push((
                "apalis_pgmq".into(),
                "USAGE",
                "arming wake-ups",
                "SCHEMA".into(),
            ));
            for right in ["SELECT", "INSERT", "UPDATE", "DELETE"] {
                checks.push((
                    "apalis_pgmq.listeners".into(),
                    right,
                    "arming wake-ups (apalis_pgmq.listeners)",
                    "TABLE".into(),
                ));
            }
        }
        let objects: Vec<&str> = checks.iter().map(|c| c.0.as_str()).collect();
        let rights: Vec<&str> = checks.iter().map(|c| c.1).collect();
        let kinds: Vec<&str> = checks.iter().map(|c| c.3.as_str()).collect();
        // One statement: the first check that fails, in order, and the role.
        let missing: Option<(i64, String)> = sqlx::query_as(crate::sql::MISSING_WORKER_RIGHT)
            .bind(objects)
            .bind(rights)
            .bind(kinds)
            .fetch_optional(pool)
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

/// What a lease renewal did with its batch; a delivery in neither list is not ours any more
/// (its outcome was written, or the message was delivered again or is gone).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// Renewed, sorted.
    pub renewed: Vec<i64>,
    /// Still ours but held by another transaction at that moment (the completer writing their
    /// outcome, most often), so not renewed; sorted.
    pub busy: Vec<i64>,
}

/// A batch of job outcomes as columns, for [`PgmqQueue::complete`].
#[derive(Debug, Default)]
pub(crate) struct Outcomes {
    pub(crate) msg_ids: Vec<i64>,
    pub(crate) read_cts: Vec<i32>,
    /// 1 archive, 2 delete, 3 retry, 4 dead-letter.
    pub(crate) actions: Vec<i16>,
    /// Seconds until a retry is visible.
    pub(crate) delays: Vec<f64>,
    /// A dead letter's description (JSON text).
    pub(crate) infos: Vec<Option<String>>,
    /// Runs so far (in-process retries included).
    pub(crate) attempts: Vec<i32>,
    /// A retry's error text.
    pub(crate) errors: Vec<Option<String>>,
    /// Results to keep (see [`StoredResult`](crate::ack::StoredResult)); all empty, or one entry
    /// per outcome with `None` status for outcomes without a result.
    pub(crate) results: ResultColumns,
}

/// The result of each outcome of a batch, column by column (`status` `None`: keep none).
#[derive(Debug, Default)]
pub(crate) struct ResultColumns {
    pub(crate) job_ids: Vec<Option<String>>,
    pub(crate) status: Vec<Option<&'static str>>,
    pub(crate) values: Vec<Option<String>>,
    pub(crate) errors: Vec<Option<String>>,
}

/// Runs a `(msg_id, read_ct)` batch statement; returns the ids it matched, sorted.
async fn run_fenced(
    pool: &sqlx::PgPool,
    sql: &Arc<str>,
    batch: &[(i64, i32)],
    secs: f64,
) -> Result<Vec<i64>, sqlx::Error> {
    let ids: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
    let cts: Vec<i32> = batch.iter().map(|(_, ct)| *ct).collect();
    let mut done: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
        .bind(ids)
        .bind(cts)
        .bind(secs)
        .fetch_all(pool)
        .await?;
    done.sort_unstable();
    Ok(done)
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
