//! Reading a queue's jobs in every state, for dashboards and operators (apalis' `expose`
//! traits, the CLI).
//!
//! A job lives in one of three tables, and its state follows from the row:
//!
//! | where | condition | state |
//! |---|---|---|
//! | `pgmq.q_<queue>` | `vt <= now` | pending (visible: never read, or due again) |
//! | `pgmq.q_<queue>` | `vt > now`, never read | scheduled (delayed) |
//! | `pgmq.q_<queue>` | `vt > now`, read, last failure before the last read | running (leased) |
//! | `pgmq.q_<queue>` | `vt > now`, read, failed after the last read | retrying (waiting for its backoff) |
//! | `pgmq.a_<queue>` | – | done (archived) |
//! | `pgmq.q_<queue>_dlq` | reason `killed` | killed |
//! | `pgmq.q_<queue>_dlq` | another reason | dead |
//!
//! A failed delivery records `failed_epoch` in `headers.apalis` (`apalis_pgmq.retry_headers`), so
//! retrying and running are told apart without parsing text. Pages are read newest first from
//! each table (the archive through its primary key, at most `offset + limit` rows), so a page
//! never scans an archive of millions of rows.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool, Row, postgres::PgRow};

use super::{Message, PgmqQueue, QueueName};

/// The state of a job, as this crate reads it from PGMQ's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum JobState {
    /// Visible now: never read, or due again.
    Pending,
    /// Not visible yet and never read: a delayed job.
    Scheduled,
    /// Leased by a worker.
    Running,
    /// Failed, waiting for its backoff before the next attempt.
    Retrying,
    /// Finished and archived.
    Done,
    /// Ended by an `AbortError` and dead-lettered (the default deletes killed jobs).
    Killed,
    /// In the dead-letter queue: attempts used up, or undecodable.
    Dead,
}

impl JobState {
    /// The name used in SQL and on the command line.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Done => "done",
            Self::Killed => "killed",
            Self::Dead => "dead",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "scheduled" => Self::Scheduled,
            "running" => Self::Running,
            "retrying" => Self::Retrying,
            "done" => Self::Done,
            "killed" => Self::Killed,
            "dead" => Self::Dead,
            _ => return None,
        })
    }

    /// The table a job in this state lives in.
    fn table(self) -> Table {
        match self {
            Self::Pending | Self::Scheduled | Self::Running | Self::Retrying => Table::Queue,
            Self::Done => Table::Archive,
            Self::Killed | Self::Dead => Table::DeadLetters,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Queue,
    Archive,
    DeadLetters,
}

/// One job as read by an inspection query.
#[derive(Debug, Clone)]
pub struct JobRecord {
    /// The job's id: its `msg_id` in the queue (kept in the archive and in the dead letter).
    pub id: i64,
    /// Its state.
    pub state: JobState,
    /// The row itself (for a dead letter: the dead-letter queue's row, whose `msg_id` differs).
    pub message: Message,
    /// When it was archived (done jobs).
    pub archived_at: Option<DateTime<Utc>>,
    /// When its state last changed, as far as the row tells: archived, dead-lettered, last
    /// read, or sent.
    pub changed_at: DateTime<Utc>,
}

impl JobRecord {
    /// `headers.apalis.<key>` as text, if present.
    #[must_use]
    pub fn apalis_header(&self, key: &str) -> Option<String> {
        header_text(self.message.headers.as_ref(), &["apalis", key])
    }

    /// Runs so far: the one attempt count every view shows. For a dead or killed job, the count
    /// recorded when it was dead-lettered (`headers.apalis_dead_letter.attempts`); for a job in
    /// the queue, the larger of the runs its last failed delivery recorded
    /// (`headers.apalis.attempts`, in-process retries included) and PGMQ's `read_ct`.
    #[must_use]
    pub fn attempts(&self) -> u64 {
        let num = |path: &[&str]| {
            let mut v = self.message.headers.as_ref()?;
            for p in path {
                v = v.get(p)?;
            }
            v.as_u64()
        };
        let recorded = num(&["apalis", "attempts"]);
        match self.state {
            JobState::Dead | JobState::Killed => num(&["apalis_dead_letter", "attempts"])
                .or(recorded)
                .unwrap_or(0),
            _ => recorded
                .unwrap_or(0)
                .max(u64::try_from(self.message.read_ct).unwrap_or(0)),
        }
    }

    /// `headers.apalis_dead_letter.<key>` as text, if present.
    #[must_use]
    pub fn dead_letter(&self, key: &str) -> Option<String> {
        header_text(self.message.headers.as_ref(), &["apalis_dead_letter", key])
    }
}

fn header_text(headers: Option<&Value>, path: &[&str]) -> Option<String> {
    let mut v = headers?;
    for p in path {
        v = v.get(p)?;
    }
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Counts of one queue's jobs by state, and its recent throughput.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct QueueCounts {
    /// Visible now.
    pub pending: i64,
    /// Delayed, never read.
    pub scheduled: i64,
    /// Leased by a worker.
    pub running: i64,
    /// Waiting for a backoff.
    pub retrying: i64,
    /// Archived (an estimate from the planner's statistics above 100 000 rows).
    pub done: i64,
    /// In the dead-letter queue, killed ones excluded.
    pub dead: i64,
    /// In the dead-letter queue because their handler aborted (`KilledAction::DeadLetter`).
    pub killed: i64,
    /// Age of the oldest visible job, in seconds.
    pub oldest_pending_secs: Option<f64>,
    /// Jobs archived in the last 5 minutes.
    pub done_last_5_min: i64,
    /// Jobs archived in the last hour.
    pub done_last_hour: i64,
}

/// Rows deleted per pruning statement: small enough for short statements and locks.
pub(crate) const PRUNE_BATCH: i64 = 10_000;

/// SQL of one queue's inspection queries.
#[derive(Debug)]
pub(super) struct InspectSql {
    pub(super) list_queue: Arc<str>,
    pub(super) list_archive: Arc<str>,
    pub(super) list_dead: Arc<str>,
    pub(super) find_queue: Arc<str>,
    pub(super) find_archive: Arc<str>,
    pub(super) find_dead: Arc<str>,
    pub(super) counts: Arc<str>,
    /// `counts` for a queue without a dead-letter queue (made by another PGMQ client): no dead
    /// letters yet.
    pub(super) counts_no_dlq: Arc<str>,
    /// Whether the dead-letter queue's tables exist.
    pub(super) dlq_exists: Arc<str>,
    /// Dead letters older than `$1` seconds (NULL: all): what a purge would delete.
    pub(super) count_dead: Arc<str>,
    pub(super) activity: Arc<str>,
    pub(super) update_waiting: Arc<str>,
    pub(super) prune_archive: Arc<str>,
    pub(super) prune_dead: Arc<str>,
    pub(super) prune_archive_elected: Arc<str>,
    pub(super) prune_dead_elected: Arc<str>,
    pub(super) replay: Arc<str>,
    pub(super) retry_now: Arc<str>,
    /// Every retrying job visible now, in one statement.
    pub(super) retry_retrying: Arc<str>,
    /// Every pending job (and, with `$1`, every scheduled one) deleted, in one statement.
    pub(super) purge_waiting: Arc<str>,
    pub(super) delete_queued: Arc<str>,
    pub(super) delete_dead: Arc<str>,
}

/// The state of a row of the queue table.
const QUEUE_STATE: &str = "CASE WHEN m.vt <= clock_timestamp() THEN 'pending' \
     WHEN m.read_ct = 0 THEN 'scheduled' \
     WHEN jsonb_typeof(m.headers->'apalis'->'failed_epoch') = 'number' \
          AND (m.headers->'apalis'->>'failed_epoch')::float8 \
              >= extract(epoch FROM coalesce(m.last_read_at, m.enqueued_at)) THEN 'retrying' \
     ELSE 'running' END";

/// The state of a row of the dead-letter queue.
const DEAD_STATE: &str =
    "CASE WHEN m.headers->'apalis_dead_letter'->>'reason' = 'killed' THEN 'killed' ELSE 'dead' END";

/// The job id of a dead letter: the original `msg_id` when recorded (a JSON number).
const DEAD_JOB_ID: &str = "CASE WHEN jsonb_typeof(m.headers->'apalis_dead_letter'->'msg_id') = 'number' \
     THEN (m.headers->'apalis_dead_letter'->>'msg_id')::bigint ELSE m.msg_id END";

impl InspectSql {
    pub(super) fn new(name: &QueueName) -> Self {
        let q = name.queue_table();
        let a = name.archive_table();
        let d = name.dead_letter().queue_table();
        let source = name.as_str();
        let cols = "m.msg_id, m.read_ct, m.enqueued_at, m.last_read_at, m.vt, m.message::text, \
                    m.headers::text";
        Self {
            // $1: state filter (NULL: any), $2: rows.
            list_queue: format!(
                "SELECT {cols}, s.state, NULL::timestamptz, m.msg_id, \
                        coalesce(m.last_read_at, m.enqueued_at) AS changed \
                 FROM {q} m CROSS JOIN LATERAL (SELECT {QUEUE_STATE} AS state) s \
                 WHERE $1::text IS NULL OR s.state = $1 \
                 ORDER BY m.msg_id DESC LIMIT $2"
            )
            .into(),
            list_archive: format!(
                "SELECT {cols}, 'done', m.archived_at, m.msg_id, m.archived_at \
                 FROM {a} m ORDER BY m.msg_id DESC LIMIT $1"
            )
            .into(),
            list_dead: format!(
                "SELECT {cols}, s.state, NULL::timestamptz, {DEAD_JOB_ID}, m.enqueued_at \
                 FROM {d} m CROSS JOIN LATERAL (SELECT {DEAD_STATE} AS state) s \
                 WHERE $1::text IS NULL OR s.state = $1 \
                 ORDER BY m.msg_id DESC LIMIT $2"
            )
            .into(),
            find_queue: format!(
                "SELECT {cols}, {QUEUE_STATE}, NULL::timestamptz, m.msg_id, \
                        coalesce(m.last_read_at, m.enqueued_at) \
                 FROM {q} m WHERE m.msg_id = $1"
            )
            .into(),
            find_archive: format!(
                "SELECT {cols}, 'done', m.archived_at, m.msg_id, m.archived_at \
                 FROM {a} m WHERE m.msg_id = $1"
            )
            .into(),
            // Uses the expression index of apalis_pgmq.index_dead_letters.
            find_dead: format!(
                "SELECT {cols}, {DEAD_STATE}, NULL::timestamptz, {DEAD_JOB_ID}, m.enqueued_at \
                 FROM {d} m \
                 WHERE ((m.headers->'apalis_dead_letter'->>'msg_id')::bigint) = $1 \
                 ORDER BY m.msg_id DESC LIMIT 1"
            )
            .into(),
            counts: counts_sql(&q, &a, Some(&d)),
            counts_no_dlq: counts_sql(&q, &a, None),
            count_dead: format!(
                "SELECT count(*) FROM {d} WHERE $1::float8 IS NULL \
                    OR enqueued_at < clock_timestamp() - make_interval(secs => $1)"
            )
            .into(),
            dlq_exists: format!(
                "SELECT to_regclass('{d_lit}') IS NOT NULL",
                d_lit = d.replace('\'', "''")
            )
            .into(),
            // Only a waiting job: visible, or delayed and never read (not leased).
            update_waiting: format!(
                "UPDATE {q} m SET message = $2::text::jsonb \
                 WHERE m.msg_id = $1 AND (m.vt <= clock_timestamp() OR m.read_ct = 0) \
                 RETURNING m.msg_id"
            )
            .into(),
            prune_archive: prune_sql(&a, "archived_at", None),
            prune_dead: prune_sql(&d, "enqueued_at", None),
            prune_archive_elected: prune_sql(&a, "archived_at", Some(source)),
            prune_dead_elected: prune_sql(&d, "enqueued_at", Some(source)),
            // Dead letters back to the queue in one statement (all or nothing): $1 job ids (NULL:
            // every one), $2 reset the attempts. Returns the new message ids.
            replay: format!(
                "WITH dead AS (DELETE FROM {d} m \
                               WHERE ($1::bigint[] IS NULL OR {DEAD_JOB_ID} = ANY($1)) \
                                 AND ($3::text IS NULL OR {DEAD_STATE} = $3) \
                               RETURNING m.msg_id, {DEAD_JOB_ID} AS job_id, m.message, m.headers), \
                      numbered AS (SELECT dead.*, \
                                          nextval(pg_get_serial_sequence('{q_lit}', 'msg_id')) AS new_id \
                                   FROM dead), \
                      back AS (INSERT INTO {q} (msg_id, vt, message, headers) OVERRIDING SYSTEM VALUE \
                               SELECT new_id, clock_timestamp(), message, \
                                      apalis_pgmq.replay_headers(headers, $2::boolean) \
                               FROM numbered ORDER BY msg_id RETURNING msg_id) \
                 SELECT n.job_id, n.new_id FROM numbered n JOIN back b ON b.msg_id = n.new_id \
                 ORDER BY n.new_id",
                q_lit = q.replace('\'', "''")
            )
            .into(),
            // A job in the queue table visible now (a retry without waiting for the backoff).
            retry_now: format!(
                "UPDATE {q} SET vt = clock_timestamp() WHERE msg_id = $1 RETURNING msg_id"
            )
            .into(),
            retry_retrying: format!(
                "UPDATE {q} m SET vt = clock_timestamp() \
                 WHERE m.vt > clock_timestamp() AND ({QUEUE_STATE}) = 'retrying' \
                 RETURNING m.msg_id"
            )
            .into(),
            purge_waiting: format!(
                "WITH gone AS (DELETE FROM {q} m \
                               WHERE m.vt <= clock_timestamp() OR ($1::boolean AND m.read_ct = 0) \
                               RETURNING 1) \
                 SELECT count(*) FROM gone"
            )
            .into(),
            delete_queued: format!("DELETE FROM {q} WHERE msg_id = $1 RETURNING msg_id").into(),
            delete_dead: format!(
                "DELETE FROM {d} m WHERE ((m.headers->'apalis_dead_letter'->>'msg_id')::bigint) = $1 \
                    OR (m.headers->'apalis_dead_letter' IS NULL AND m.msg_id = $1) \
                 RETURNING m.msg_id"
            )
            .into(),
            // Jobs archived on each of the last 7 days (today last), at most 1 000 000 a day.
            activity: format!(
                "SELECT d.i, (SELECT count(*) FROM (SELECT 1 FROM {a} \
                              WHERE archived_at >= date_trunc('day', now()) - make_interval(days => d.i) \
                                AND archived_at < date_trunc('day', now()) - make_interval(days => d.i - 1) \
                              LIMIT 1000000) x) \
                 FROM generate_series(6, 0, -1) AS d(i)"
            )
            .into(),
        }
    }
}

/// Counts of every state in one statement; without a dead-letter table (`dead: None`), no dead
/// letters.
fn counts_sql(q: &str, a: &str, dead: Option<&str>) -> Arc<str> {
    let (dead, killed) = dead.map_or_else(
        || ("0::bigint".to_owned(), "0::bigint".to_owned()),
        |d| {
            (
                format!("(SELECT count(*) FROM {d} m WHERE {DEAD_STATE} = 'dead')"),
                format!("(SELECT count(*) FROM {d} m WHERE {DEAD_STATE} = 'killed')"),
            )
        },
    );
    format!(
        "SELECT count(*) FILTER (WHERE s.state = 'pending'), \
                count(*) FILTER (WHERE s.state = 'scheduled'), \
                count(*) FILTER (WHERE s.state = 'running'), \
                count(*) FILTER (WHERE s.state = 'retrying'), \
                (SELECT CASE WHEN c.reltuples < 100000 THEN (SELECT count(*) FROM {a}) \
                             ELSE c.reltuples::bigint END \
                   FROM pg_class c WHERE c.oid = '{a_lit}'::regclass), \
                {dead}, \
                {killed}, \
                extract(epoch FROM clock_timestamp() \
                        - min(m.enqueued_at) FILTER (WHERE s.state = 'pending'))::float8, \
                (SELECT count(*) FROM {a} WHERE archived_at > clock_timestamp() - interval '5 minutes'), \
                (SELECT count(*) FROM {a} WHERE archived_at > clock_timestamp() - interval '1 hour') \
         FROM {q} m CROSS JOIN LATERAL (SELECT {QUEUE_STATE} AS state) s",
        a_lit = a.replace('\'', "''")
    )
    .into()
}

/// One batch (`$2` rows, oldest first) of `table`'s rows whose `time_col` is older than `$1`
/// seconds by the server's clock (`NULL`: any age). With `elected` (the queue's name), the
/// statement first takes the queue's pruning lock (a transaction lock, taken once by the
/// initplan) and deletes nothing if another session holds it.
fn prune_sql(table: &str, time_col: &str, elected: Option<&str>) -> Arc<str> {
    let lock = elected.map_or_else(String::new, |queue| {
        format!(
            "(SELECT pg_try_advisory_xact_lock(hashtext('apalis_pgmq.prune'), hashtext('{queue}'))) AND "
        )
    });
    format!(
        "WITH old AS (SELECT msg_id FROM {table} \
                      WHERE {lock}($1::float8 IS NULL \
                             OR {time_col} < clock_timestamp() - make_interval(secs => $1)) \
                      ORDER BY msg_id LIMIT $2), \
              gone AS (DELETE FROM {table} m USING old WHERE m.msg_id = old.msg_id RETURNING 1) \
         SELECT count(*) FROM gone"
    )
    .into()
}

fn record(row: &PgRow) -> Result<JobRecord, sqlx::Error> {
    let message = Message::from_row(row)?;
    let state: String = row.try_get(7)?;
    let archived_at: Option<DateTime<Utc>> = row.try_get(8)?;
    let id: i64 = row.try_get(9)?;
    let changed_at: DateTime<Utc> = row.try_get(10)?;
    Ok(JobRecord {
        id,
        state: JobState::parse(&state).unwrap_or(JobState::Pending),
        message,
        archived_at,
        changed_at,
    })
}

impl PgmqQueue {
    /// One page of the queue's jobs, optionally in one state only: `offset` rows skipped, at
    /// most `limit` returned. Without a state, live jobs (queue table) come first, then dead
    /// letters, then done jobs; each newest first.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if a statement fails.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{JobState, PgmqQueue, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// let q = PgmqQueue::new(QueueName::new("email")?);
    /// for job in q.jobs(&pool, Some(JobState::Dead), 0, 20).await? {
    ///     println!("{} {:?} {:?}", job.id, job.state, job.dead_letter("error"));
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn jobs(
        &self,
        pool: &PgPool,
        state: Option<JobState>,
        offset: u32,
        limit: u32,
    ) -> crate::error::Result<Vec<JobRecord>> {
        let want = i64::from(offset) + i64::from(limit);
        let s = &self.sql.inspect;
        let tables: Vec<Table> = match state {
            Some(st) => vec![st.table()],
            None => vec![Table::Queue, Table::DeadLetters, Table::Archive],
        };
        let filter = state.map(JobState::as_str);
        let mut all = Vec::new();
        for t in tables {
            if t == Table::DeadLetters && !self.has_dead_letter_queue(pool).await? {
                continue;
            }
            let rows = match t {
                Table::Queue => {
                    sqlx::query(AssertSqlSafe(s.list_queue.clone()))
                        .bind(filter)
                        .bind(want)
                        .fetch_all(pool)
                        .await?
                }
                Table::Archive => {
                    sqlx::query(AssertSqlSafe(s.list_archive.clone()))
                        .bind(want)
                        .fetch_all(pool)
                        .await?
                }
                Table::DeadLetters => {
                    sqlx::query(AssertSqlSafe(s.list_dead.clone()))
                        .bind(filter)
                        .bind(want)
                        .fetch_all(pool)
                        .await?
                }
            };
            for row in &rows {
                all.push(record(row)?);
            }
        }
        Ok(all
            .into_iter()
            .skip(offset as usize)
            .take(limit as usize)
            .collect())
    }

    /// The job with this id, wherever it is (queue, archive, dead letters), or `None`.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if a statement fails.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqQueue, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// let q = PgmqQueue::new(QueueName::new("email")?);
    /// if let Some(job) = q.job(&pool, 42).await? {
    ///     println!("job 42 is {:?}", job.state);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn job(&self, pool: &PgPool, id: i64) -> crate::error::Result<Option<JobRecord>> {
        let s = &self.sql.inspect;
        for sql in [&s.find_queue, &s.find_archive, &s.find_dead] {
            if Arc::ptr_eq(sql, &s.find_dead) && !self.has_dead_letter_queue(pool).await? {
                continue;
            }
            if let Some(row) = sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(id)
                .fetch_optional(pool)
                .await?
            {
                return Ok(Some(record(&row)?));
            }
        }
        Ok(None)
    }

    /// Counts of the queue's jobs by state, and its recent throughput.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if a statement fails (e.g. the queue does not
    /// exist). A queue without a dead-letter queue (one made by another PGMQ client, before its
    /// first dead letter) has no dead letters.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqQueue, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// let c = PgmqQueue::new(QueueName::new("email")?).counts(&pool).await?;
    /// println!("{} pending, {} dead", c.pending, c.dead);
    /// # Ok(()) }
    /// ```
    pub async fn counts(&self, pool: &PgPool) -> crate::error::Result<QueueCounts> {
        let sql = self.counts_sql(pool).await?;
        let row = sqlx::query(AssertSqlSafe(sql)).fetch_one(pool).await?;
        counts_from(&row)
    }

    /// Whether this queue's dead-letter queue exists. A queue made by another PGMQ client has
    /// none until its first dead letter (the worker creates it then); until then it is empty.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the statement fails.
    pub async fn has_dead_letter_queue<'c, E: sqlx::PgExecutor<'c>>(
        &self,
        executor: E,
    ) -> crate::error::Result<bool> {
        let exists: bool = sqlx::query_scalar(AssertSqlSafe(self.sql.inspect.dlq_exists.clone()))
            .fetch_one(executor)
            .await?;
        Ok(exists)
    }

    /// The counting statement for the tables that exist.
    async fn counts_sql<'c, E: sqlx::PgExecutor<'c>>(
        &self,
        executor: E,
    ) -> crate::error::Result<Arc<str>> {
        Ok(if self.has_dead_letter_queue(executor).await? {
            self.sql.inspect.counts.clone()
        } else {
            self.sql.inspect.counts_no_dlq.clone()
        })
    }
}

fn counts_from(row: &PgRow) -> crate::error::Result<QueueCounts> {
    Ok(QueueCounts {
        pending: row.try_get(0)?,
        scheduled: row.try_get(1)?,
        running: row.try_get(2)?,
        retrying: row.try_get(3)?,
        done: row.try_get::<Option<i64>, _>(4)?.unwrap_or(0),
        dead: row.try_get(5)?,
        killed: row.try_get(6)?,
        oldest_pending_secs: row.try_get(7)?,
        done_last_5_min: row.try_get(8)?,
        done_last_hour: row.try_get(9)?,
    })
}

impl PgmqQueue {
    /// Replaces the body of a waiting job (pending or scheduled, never a leased one); `false`
    /// if no such job.
    pub(crate) async fn update_waiting(
        &self,
        pool: &PgPool,
        id: i64,
        body: &Value,
    ) -> crate::error::Result<bool> {
        let text = serde_json::to_string(body)?;
        if text.len() > self.max_payload_bytes {
            return Err(crate::error::Error::PayloadTooLarge {
                size: text.len(),
                limit: self.max_payload_bytes,
            });
        }
        let row: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.inspect.update_waiting.clone()))
                .bind(id)
                .bind(text)
                .fetch_optional(pool)
                .await?;
        Ok(row.is_some())
    }

    /// Deletes archived jobs older than `older_than` (all, with `None`) in batches of 10 000,
    /// each its own short statement; returns how many.
    pub(crate) async fn prune_archive(
        &self,
        pool: &PgPool,
        older_than: Option<std::time::Duration>,
    ) -> crate::error::Result<usize> {
        self.prune_in_batches(pool, &self.sql.inspect.prune_archive, older_than)
            .await
    }

    async fn prune_in_batches(
        &self,
        pool: &PgPool,
        sql: &Arc<str>,
        older_than: Option<std::time::Duration>,
    ) -> crate::error::Result<usize> {
        // Seconds, capped at what an interval holds comfortably (about 3 000 years).
        let before = older_than.map(|d| d.as_secs_f64().min(1e11));
        let mut total = 0usize;
        loop {
            let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
                .bind(before)
                .bind(PRUNE_BATCH)
                .fetch_one(pool)
                .await?;
            total += usize::try_from(n).unwrap_or(0);
            if n < PRUNE_BATCH {
                return Ok(total);
            }
        }
    }

    /// One batch of pruning (the archive or the dead letters) while holding this queue's
    /// pruning lock, so one process at a time prunes a queue; `None` if another holds it.
    pub(crate) async fn prune_batch_elected(
        &self,
        conn: &mut sqlx::PgConnection,
        dead_letters: bool,
        older_than: std::time::Duration,
    ) -> crate::error::Result<Option<i64>> {
        if dead_letters && !self.has_dead_letter_queue(&mut *conn).await? {
            return Ok(Some(0));
        }
        let sql = if dead_letters {
            &self.sql.inspect.prune_dead_elected
        } else {
            &self.sql.inspect.prune_archive_elected
        };
        // One statement: the lock, the batch and the commit. Not elected and nothing to prune
        // look alike (0), and both end the round.
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
            .bind(older_than.as_secs_f64().min(1e11))
            .bind(PRUNE_BATCH)
            .fetch_one(conn)
            .await?;
        Ok(Some(n))
    }

    /// Moves dead letters back into the queue (`ids`: their job ids; `None`: every one) in one
    /// statement, so an interruption moves all or nothing. With `reset_attempts` they get a full
    /// attempt budget again; without, their attempts continue from where they died (one more
    /// run). Returns each replayed job's old id and its new one (a replayed job is a new
    /// message, with a new id), in the order they were put back.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the statement fails (nothing moved).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use apalis_pgmq_notify::{PgmqQueue, QueueName};
    /// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
    /// let q = PgmqQueue::new(QueueName::new("email")?);
    /// for (old, new) in q.replay_dead_letters(&pool, None, true).await? {
    ///     println!("dead job {old} is job {new} again");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn replay_dead_letters(
        &self,
        pool: &PgPool,
        ids: Option<&[i64]>,
        reset_attempts: bool,
    ) -> crate::error::Result<Vec<(i64, i64)>> {
        if !self.has_dead_letter_queue(pool).await? {
            return Ok(Vec::new());
        }
        let ids: Vec<(i64, i64)> = sqlx::query_as(AssertSqlSafe(self.sql.inspect.replay.clone()))
            .bind(ids)
            .bind(reset_attempts)
            .bind(None::<&str>)
            .fetch_all(pool)
            .await?;
        Ok(ids)
    }

    /// Deletes dead letters older than `older_than` (all, with `None`) in batches of 10 000;
    /// returns how many.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if a statement fails.
    pub async fn purge_dead_letters(
        &self,
        pool: &PgPool,
        older_than: Option<std::time::Duration>,
    ) -> crate::error::Result<usize> {
        if !self.has_dead_letter_queue(pool).await? {
            return Ok(0);
        }
        self.prune_in_batches(pool, &self.sql.inspect.prune_dead, older_than)
            .await
    }

    /// Moves every dead job (attempts used up, undecodable, outcome unwritable; not killed
    /// ones) back into the queue in one statement, all or nothing. Returns old and new ids, as
    /// [`replay_dead_letters`](Self::replay_dead_letters) does.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the statement fails (nothing moved).
    pub async fn replay_dead(
        &self,
        pool: &PgPool,
        reset_attempts: bool,
    ) -> crate::error::Result<Vec<(i64, i64)>> {
        if !self.has_dead_letter_queue(pool).await? {
            return Ok(Vec::new());
        }
        let ids: Vec<(i64, i64)> = sqlx::query_as(AssertSqlSafe(self.sql.inspect.replay.clone()))
            .bind(None::<Vec<i64>>)
            .bind(reset_attempts)
            .bind(JobState::Dead.as_str())
            .fetch_all(pool)
            .await?;
        Ok(ids)
    }

    /// Makes every retrying job (failed, waiting out its backoff) visible now, in one
    /// statement; returns their ids. Running jobs are left alone.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the statement fails (nothing changed).
    pub async fn retry_retrying(&self, pool: &PgPool) -> crate::error::Result<Vec<i64>> {
        let mut ids: Vec<i64> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.inspect.retry_retrying.clone()))
                .fetch_all(pool)
                .await?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Deletes every pending job (visible now) and, with `scheduled`, every delayed job never
    /// run yet, in one statement; returns how many. Running and retrying jobs are left alone.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the statement fails (nothing deleted).
    pub async fn purge_waiting(&self, pool: &PgPool, scheduled: bool) -> crate::error::Result<i64> {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(self.sql.inspect.purge_waiting.clone()))
            .bind(scheduled)
            .fetch_one(pool)
            .await?;
        Ok(n)
    }

    /// How many dead letters [`purge_dead_letters`](Self::purge_dead_letters) would delete now
    /// with the same `older_than` (a dry run).
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the statement fails.
    pub async fn count_dead_letters(
        &self,
        pool: &PgPool,
        older_than: Option<std::time::Duration>,
    ) -> crate::error::Result<i64> {
        if !self.has_dead_letter_queue(pool).await? {
            return Ok(0);
        }
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(self.sql.inspect.count_dead.clone()))
            .bind(older_than.map(|d| d.as_secs_f64().min(1e11)))
            .fetch_one(pool)
            .await?;
        Ok(n)
    }

    /// Makes a waiting, retrying or leased job visible now; `false` if it is not in the queue.
    /// (A dead job is replayed with [`replay_dead_letters`](Self::replay_dead_letters).)
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the statement fails.
    pub async fn retry_now(&self, pool: &PgPool, id: i64) -> crate::error::Result<bool> {
        let row: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.inspect.retry_now.clone()))
                .bind(id)
                .fetch_optional(pool)
                .await?;
        Ok(row.is_some())
    }

    /// Deletes a job from the queue or from the dead letters; `false` if neither has it.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if a statement fails.
    pub async fn delete_job(&self, pool: &PgPool, id: i64) -> crate::error::Result<bool> {
        for sql in [
            &self.sql.inspect.delete_queued,
            &self.sql.inspect.delete_dead,
        ] {
            if Arc::ptr_eq(sql, &self.sql.inspect.delete_dead)
                && !self.has_dead_letter_queue(pool).await?
            {
                continue;
            }
            let row: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
                .bind(id)
                .fetch_optional(pool)
                .await?;
            if row.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// One page of the dead-letter queue (killed and dead jobs), newest first.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the statement fails.
    pub async fn dead_letters(
        &self,
        pool: &PgPool,
        offset: u32,
        limit: u32,
    ) -> crate::error::Result<Vec<JobRecord>> {
        if !self.has_dead_letter_queue(pool).await? {
            return Ok(Vec::new());
        }
        let want = i64::from(offset) + i64::from(limit);
        let rows = sqlx::query(AssertSqlSafe(self.sql.inspect.list_dead.clone()))
            .bind(None::<&str>)
            .bind(want)
            .fetch_all(pool)
            .await?;
        rows.iter()
            .skip(offset as usize)
            .map(|r| record(r).map_err(Into::into))
            .collect()
    }

    /// [`counts`](Self::counts), if this process holds the queue's sampling lock (one process
    /// per queue at a time); `None` otherwise.
    pub(crate) async fn counts_elected(
        &self,
        conn: &mut sqlx::PgConnection,
    ) -> crate::error::Result<Option<QueueCounts>> {
        let mut tx = sqlx::Connection::begin(conn).await?;
        let elected: bool = sqlx::query_scalar(crate::sql::TRY_SAMPLE_LOCK)
            .bind(self.name.as_str())
            .fetch_one(&mut *tx)
            .await?;
        if !elected {
            return Ok(None);
        }
        let sql = self.counts_sql(&mut *tx).await?;
        let row = sqlx::query(AssertSqlSafe(sql)).fetch_one(&mut *tx).await?;
        tx.commit().await?;
        Ok(Some(counts_from(&row)?))
    }

    /// Jobs archived on each of the last 7 days, oldest first (today last).
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) if the statement fails.
    pub async fn daily_done(&self, pool: &PgPool) -> crate::error::Result<Vec<i64>> {
        let rows: Vec<(i32, i64)> =
            sqlx::query_as(AssertSqlSafe(self.sql.inspect.activity.clone()))
                .fetch_all(pool)
                .await?;
        Ok(rows.into_iter().map(|(_, n)| n).collect())
    }
}
