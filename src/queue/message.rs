//! The values the queue layer reads and writes: messages as stored, messages to send, what a
//! push wrote, what PGMQ reports about queues, and what a handler learns about its message.

use std::time::Duration;

use apalis_core::task::task_id::TaskId;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{Row, postgres::PgRow};

use super::QueueName;

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
    /// Visible from this instant. A time in the past means at once, and is written as the
    /// time of the write: the job is ordered behind the jobs already visible, not by the time
    /// given (the workers' claim floor, `claims.floor_sweep`, reads from recent times).
    At(DateTime<Utc>),
}

impl Delay {
    /// A delay of whole seconds, as PGMQ's integer `delay` argument.
    #[must_use]
    pub fn seconds(secs: u64) -> Self {
        Self::After(Duration::from_secs(secs))
    }

    /// `(at, secs)` as bound into SQL: `GREATEST(COALESCE(at, -infinity), clock_timestamp() +
    /// secs)` (a time in the past is the time of the write).
    pub(super) fn bind_parts(self) -> (Option<DateTime<Utc>>, f64) {
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
pub(super) const READ_COLS: &str =
    "msg_id, read_ct, enqueued_at, last_read_at, vt, message::text, headers::text";

impl Message {
    pub(super) fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
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
        // Headers are written by any producer: a value serde_json cannot hold (a number out of
        // f64's range, such as a priority of 1e400) is read as null, and headers that still
        // cannot be read are ignored; only the body decides whether the job decodes.
        let headers = headers.and_then(|t| {
            serde_json::from_str::<Value>(&t)
                .or_else(|_| serde_json::from_str::<Value>(&null_out_of_range_numbers(&t)))
                .ok()
        });
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

/// `json` with every number that does not fit an `f64` (e.g. `1e400`, `-1e400`) replaced by
/// `null`; strings are copied untouched. PostgreSQL's `jsonb` keeps such numbers (they are
/// `numeric`), serde_json refuses them.
fn null_out_of_range_numbers(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut chars = json.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => {
                out.push(c);
                let mut escaped = false;
                for (_, c) in chars.by_ref() {
                    out.push(c);
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    }
                }
            }
            '-' | '0'..='9' => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, d)) = chars.peek() {
                    if d.is_ascii_digit() || matches!(d, '.' | 'e' | 'E' | '+' | '-') {
                        end = j + d.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let number = &json[i..end];
                if number.parse::<f64>().is_ok_and(f64::is_finite) {
                    out.push_str(number);
                } else {
                    out.push_str("null");
                }
            }
            _ => out.push(c),
        }
    }
    out
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

    /// The job's apalis task id by its message id ([`task_id`]), for
    /// [`results`](crate::PgmqStorage::results) and `WaitForCompletion`.
    #[must_use]
    pub fn task_id(&self) -> TaskId {
        task_id(self.id)
    }

    /// Whether the key was taken and nothing was written.
    #[must_use]
    pub fn is_duplicate(&self) -> bool {
        self.duplicate
    }
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
    pub(super) fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
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
    /// PGMQ's message id (the task id unless the producer chose one; see [`task_id`]).
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

/// The apalis task id of the job with message id `msg_id`.
///
/// Ids are `i64` throughout this crate's API (PGMQ's `bigint msg_id`, what SQL and every PGMQ
/// client see, and `BackendConfig::Id`); apalis' integer task ids are `u64`. PGMQ's ids are
/// never negative, so this is `TaskId::Int` of the same number; a negative number (which PGMQ
/// never makes) becomes a string id, never another job's id.
///
/// Every place that takes a task id (`results`, `WaitForCompletion`, `FetchById`) also
/// finds a job by this form of its message id, even when its producer chose a task id.
///
/// # Example
///
/// ```
/// use apalis_core::task::task_id::TaskId;
/// assert_eq!(apalis_pgmq_notify::task_id(42), TaskId::from_int(42));
/// assert_eq!(apalis_pgmq_notify::msg_id(&TaskId::from_int(42)), Some(42));
/// ```
#[must_use]
pub fn task_id(msg_id: i64) -> TaskId {
    u64::try_from(msg_id).map_or_else(
        |_| TaskId::from_string(msg_id.to_string()),
        TaskId::from_int,
    )
}

/// The message id a task id stands for, if it is one: the inverse of [`task_id`].
#[must_use]
pub fn msg_id(task_id: &TaskId) -> Option<i64> {
    match task_id.as_int() {
        Some(n) => i64::try_from(n).ok(),
        None => task_id
            .as_string()
            .and_then(|s| s.parse().ok())
            .filter(|n: &i64| *n < 0),
    }
}

/// The longest delay this crate gives a message (a retry, a delayed push): PostgreSQL cannot
/// store times far beyond it (a `RetryAfterError` of 10^13 s would fail with "timestamp out of
/// range"), so longer ones are clamped to it.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::null_out_of_range_numbers;
    use serde_json::{Value, json};

    #[test]
    fn out_of_range_numbers_become_null_and_strings_stay() {
        let text = r#"{"apalis": {"priority": 1e400, "max_attempts": 3, "x": -1E+400},
                       "s": "1e400 \"2e999\"", "n": [-0.5, 12]}"#;
        assert!(serde_json::from_str::<Value>(text).is_err());
        let v: Value = serde_json::from_str(&null_out_of_range_numbers(text)).expect("parses");
        assert_eq!(
            v,
            json!({"apalis": {"priority": null, "max_attempts": 3, "x": null},
                   "s": "1e400 \"2e999\"", "n": [-0.5, 12]})
        );
    }
}
