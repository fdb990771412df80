//! The fenced lease protocol of a worker, crate-private: claim messages, renew their leases,
//! release the ones it cannot start, and write each delivery's outcome.
//!
//! Every write about a claimed message is fenced by the `read_ct` of the delivery it belongs
//! to ([`Delivery`]): once the message was delivered again (a lost lease), the stale holder's
//! writes match no row. The statements themselves are in `statements.rs`; this file binds
//! typed batches to them and reads their answers.

use std::{collections::HashSet, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection, PgExecutor, Row};

use super::{MAX_DELAY, Message, PgmqQueue};
use crate::error::Result;

/// One delivery of a message: the message and the `read_ct` its claim gave it, the fencing
/// token of every write about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Delivery {
    pub(crate) msg_id: i64,
    pub(crate) read_ct: i32,
}

impl Delivery {
    /// The delivery a claimed message is.
    pub(crate) fn of(m: &Message) -> Self {
        Self {
            msg_id: m.msg_id,
            read_ct: m.read_ct,
        }
    }
}

/// The `action` codes of the outcome statement, written once: `statements.rs` formats them
/// into its SQL and [`Action::code`] binds them.
pub(super) const ARCHIVE: i16 = 1;
pub(super) const DELETE: i16 = 2;
pub(super) const RETRY: i16 = 3;
pub(super) const DEAD_LETTER: i16 = 4;

/// What becomes of a delivery's message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Moved to the archive (`pgmq.a_<queue>`).
    Archive,
    /// Deleted.
    Delete,
    /// Visible again after `delay` (at most [`MAX_DELAY`]), the runs and the error recorded in
    /// its headers.
    Retry { delay: Duration },
    /// Moved to the dead-letter queue with `info` (why, and what happened) in its headers.
    DeadLetter { info: Value },
}

impl Action {
    /// For logs and dead-letter records.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Archive => "archive",
            Self::Delete => "delete",
            Self::Retry { .. } => "retry",
            Self::DeadLetter { .. } => "dead_letter",
        }
    }

    /// Whether the job is over after this action (a retry is not).
    pub(crate) fn finishes(&self) -> bool {
        !matches!(self, Self::Retry { .. })
    }

    fn code(&self) -> i16 {
        match self {
            Self::Archive => ARCHIVE,
            Self::Delete => DELETE,
            Self::Retry { .. } => RETRY,
            Self::DeadLetter { .. } => DEAD_LETTER,
        }
    }
}

/// A finished job's result, written with its outcome (see
/// [`Config::store_results`](crate::Config::store_results)).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredResult {
    /// The job's id as apalis sees it (the producer's task id, or the message id).
    pub(crate) job_id: String,
    /// `Done`, `Failed` or `Killed` (apalis' `Status` names).
    pub(crate) status: &'static str,
    /// The handler's output as JSON text.
    pub(crate) value: Option<String>,
    /// The error's text, or why the output could not be kept.
    pub(crate) error: Option<String>,
    /// A caller is waiting for it ([`push_and_wait`](crate::PgmqStorage::push_and_wait)): the
    /// completer writes it without waiting for a batch to fill.
    pub(crate) awaited: bool,
}

/// The outcome of one delivery.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outcome {
    pub(crate) delivery: Delivery,
    pub(crate) action: Action,
    /// Runs so far, counting in-process retries (at least `read_ct`): recorded with a retry,
    /// reported with a dead letter.
    pub(crate) attempts: i32,
    /// The error's text (sanitised), recorded with a retry.
    pub(crate) error: Option<String>,
    /// The job's result, kept when the outcome finishes the job (never with a retry).
    pub(crate) result: Option<StoredResult>,
}

impl Outcome {
    /// A caller waits for this job's result.
    pub(crate) fn awaited(&self) -> bool {
        self.action.finishes() && self.result.as_ref().is_some_and(|r| r.awaited)
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

/// The last of `items` for each message id, sorted by id ascending: the batch statements read a
/// row's values at the position of its id in `$1` by binary search, so they bind each message
/// once, in id order (see `statements.rs`). One statement cannot write a row twice either.
fn last_per_message<T>(items: &[T], msg_id: impl Fn(&T) -> i64) -> Vec<&T> {
    let mut seen = HashSet::new();
    let mut last: Vec<&T> = items
        .iter()
        .rev()
        .filter(|item| seen.insert(msg_id(item)))
        .collect();
    last.sort_unstable_by_key(|item| msg_id(item));
    last
}

/// The columns the batch statements bind: `$1` message ids, `$2` their `read_ct`, each message
/// once (its last delivery in `batch`), by id ascending (see [`last_per_message`]).
fn fence_columns(batch: &[Delivery]) -> (Vec<i64>, Vec<i32>) {
    last_per_message(batch, |d| d.msg_id)
        .into_iter()
        .map(|d| (d.msg_id, d.read_ct))
        .unzip()
}

/// What a worker's claim returned: the messages, and for a claim in visibility order what
/// the database said with it (for the claim floor, `backend/floor.rs`).
#[derive(Debug, Default)]
pub(crate) struct Claimed {
    pub(crate) messages: Vec<Message>,
    pub(crate) seen: Option<Seen>,
}

/// What the database said with a claim in visibility order: its `now()`, its snapshot's oldest
/// running and next transaction ids, and whether the queue was paused.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seen {
    pub(crate) at: DateTime<Utc>,
    pub(crate) xmin: i64,
    pub(crate) xmax: i64,
    pub(crate) paused: bool,
    /// `pg_postmaster_start_time()`: another value is a restarted or another server.
    pub(crate) server_start: DateTime<Utc>,
}

impl PgmqQueue {
    /// The statements of the lease protocol by name (claims, outcomes, renewal, release, and
    /// PGMQ's batch calls on ids), for the tests that check their plans (`tests/plans.rs`).
    #[cfg(feature = "testing")]
    pub(crate) fn lease_statements(&self) -> Vec<(&'static str, Arc<str>)> {
        let s = &self.sql;
        vec![
            ("claim", s.claim.clone()),
            ("claim_priority", s.claim_priority.clone()),
            ("claim_logged", s.claim_logged.clone()),
            ("claim_priority_logged", s.claim_priority_logged.clone()),
            ("recover_lost", s.recover_lost.clone()),
            ("read", s.read.clone()),
            ("complete", s.complete.clone()),
            ("complete_results", s.complete_results.clone()),
            ("renew", s.renew.clone()),
            ("release", s.release.clone()),
            ("set_vt_many", s.set_vt_many.clone()),
            ("archive", s.archive.clone()),
            ("delete", s.delete.clone()),
        ]
    }

    /// A worker's claim: up to `qty` visible messages, leased for `vt`, like
    /// [`read`](Self::read) but the messages visible longest first (or by priority), with when
    /// each had become visible, and nothing while the queue is paused
    /// ([`pause`](crate::pause)). A claim in visibility order reads from `floor` up (see
    /// `backend/floor.rs`) and also returns what the floor needs ([`Claimed::seen`]).
    /// With a `token` (a UUID's text), a claim that leases messages also writes them to
    /// `apalis_pgmq.claim_log` under it, in the same statement, so that a worker that loses the
    /// answer can give them back ([`recover_lost`](Self::recover_lost)).
    /// One statement, one round trip: its plan holds whatever the table's statistics say (see
    /// `statements.rs`), so it needs no planner settings of its own.
    pub(crate) async fn claim(
        &self,
        conn: &mut PgConnection,
        vt: Duration,
        qty: usize,
        by_priority: bool,
        floor: Option<DateTime<Utc>>,
        token: Option<&str>,
    ) -> Result<Claimed> {
        if qty == 0 {
            return Ok(Claimed::default());
        }
        let qty = i64::try_from(qty).unwrap_or(i64::MAX);
        if by_priority {
            let sql = match token {
                Some(_) => &self.sql.claim_priority_logged,
                None => &self.sql.claim_priority,
            };
            let mut query = sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(qty)
                .bind(vt.as_secs_f64());
            if let Some(token) = token {
                query = query.bind(token);
            }
            let mut messages = Vec::new();
            for row in query.fetch_all(&mut *conn).await? {
                let mut m = Message::from_row(&row)?;
                m.visible_since = row.try_get("visible_since")?;
                messages.push(m);
            }
            messages.sort_unstable_by_key(|m| m.msg_id);
            return Ok(Claimed {
                messages,
                seen: None,
            });
        }
        let sql = match token {
            Some(_) => &self.sql.claim_logged,
            None => &self.sql.claim,
        };
        let mut query = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(qty)
            .bind(vt.as_secs_f64())
            .bind(floor);
        if let Some(token) = token {
            query = query.bind(token);
        }
        let rows = query.fetch_all(&mut *conn).await?;
        let mut messages = Vec::with_capacity(rows.len());
        let mut seen = None;
        for row in &rows {
            if seen.is_none() {
                seen = Some(Seen {
                    at: row.try_get("at")?,
                    xmin: row.try_get("xmin")?,
                    xmax: row.try_get("xmax")?,
                    paused: row.try_get("paused")?,
                    server_start: row.try_get("server_start")?,
                });
            }
            // The one row of a claim that took nothing has no message.
            if row.try_get::<Option<i64>, _>(0)?.is_none() {
                continue;
            }
            let mut m = Message::from_row(row)?;
            m.visible_since = row.try_get("visible_since")?;
            messages.push(m);
        }
        messages.sort_unstable_by_key(|m| m.msg_id);
        Ok(Claimed { messages, seen })
    }

    /// Gives back the messages of the logged claims `tokens` whose answer the worker lost:
    /// each message whose row is still the version its claim wrote is visible now, the read
    /// the claim counted given back (a message anyone touched since is left alone). Returns
    /// the tokens found (their claims committed; a token not found did not commit, or has not
    /// yet) and the ids made visible, sorted.
    pub(crate) async fn recover_lost(
        &self,
        conn: &mut PgConnection,
        tokens: &[String],
    ) -> Result<(Vec<String>, Vec<i64>)> {
        if tokens.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let (found, released): (Vec<String>, Vec<i64>) =
            sqlx::query_as(AssertSqlSafe(self.sql.recover_lost.clone()))
                .bind(tokens)
                .fetch_one(&mut *conn)
                .await?;
        Ok((found, released))
    }

    /// Whether a message is visible below `floor` (the claim floor's sweep, see
    /// `backend/floor.rs`): under an old snapshot this walks every dead index entry below it.
    pub(crate) async fn visible_below<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        floor: DateTime<Utc>,
    ) -> Result<bool> {
        Ok(
            sqlx::query_scalar(AssertSqlSafe(self.sql.below_floor.clone()))
                .bind(floor)
                .fetch_one(executor)
                .await?,
        )
    }

    /// How long until the earliest message at or above `floor` becomes visible (zero: one is
    /// visible now), by the database clock; `None` if there is none or the queue is paused.
    pub(crate) async fn next_visible_in<'c, E: PgExecutor<'c>>(
        &self,
        executor: E,
        floor: Option<DateTime<Utc>>,
    ) -> Result<Option<Duration>> {
        let secs: Option<f64> = sqlx::query_scalar(AssertSqlSafe(self.sql.next_visible_in.clone()))
            .bind(floor)
            .fetch_one(executor)
            .await?;
        Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
    }

    /// Renews the leases of `batch` to now + `vt`, never waiting for a row lock: a row another
    /// transaction holds is reported busy (see [`Renewal`]).
    /// One statement, one round trip: its plan holds whatever the table's statistics say (see
    /// `statements.rs`), so it needs no planner settings of its own.
    pub(crate) async fn renew(
        &self,
        conn: &mut PgConnection,
        batch: &[Delivery],
        vt: Duration,
    ) -> Result<Renewal> {
        let (ids, cts) = fence_columns(batch);
        let rows: Vec<(i64, bool)> = sqlx::query_as(AssertSqlSafe(self.sql.renew.clone()))
            .bind(ids)
            .bind(cts)
            .bind(vt.as_secs_f64())
            .fetch_all(&mut *conn)
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
    /// One statement, one round trip: its plan holds whatever the table's statistics say (see
    /// `statements.rs`), so it needs no planner settings of its own.
    pub(crate) async fn release(
        &self,
        conn: &mut PgConnection,
        batch: &[Delivery],
    ) -> Result<Vec<i64>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, cts) = fence_columns(batch);
        let mut done: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.release.clone()))
            .bind(ids)
            .bind(cts)
            .fetch_all(&mut *conn)
            .await?;
        done.sort_unstable();
        Ok(done)
    }

    /// Applies a batch of outcomes in one statement, keeping the results that come with them
    /// (`with_results`; announced on `results_channel`). The same message twice keeps its last
    /// outcome (one statement cannot write a row twice). Returns the ids that matched (a stale
    /// delivery's outcome matches nothing), sorted.
    ///
    /// One statement, one round trip: its plan holds whatever the table's statistics say (see
    /// `statements.rs`), so it needs no planner settings of its own.
    pub(crate) async fn complete(
        &self,
        conn: &mut PgConnection,
        batch: &[Outcome],
        with_results: bool,
        results_channel: &str,
    ) -> Result<Vec<i64>, sqlx::Error> {
        let batch = last_per_message(batch, |o| o.delivery.msg_id);
        let with_results = with_results && batch.iter().any(|o| o.result.is_some());
        let n = batch.len();
        let (mut ids, mut cts, mut actions) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut delays, mut infos, mut attempts, mut errors) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut job_ids, mut status, mut values, mut r_errors) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for o in &batch {
            ids.push(o.delivery.msg_id);
            cts.push(o.delivery.read_ct);
            actions.push(o.action.code());
            attempts.push(o.attempts.max(o.delivery.read_ct));
            errors.push(o.error.clone());
            let (delay, info) = match &o.action {
                Action::Retry { delay } => ((*delay).min(MAX_DELAY).as_secs_f64(), None),
                Action::DeadLetter { info } => (0.0, Some(info.to_string())),
                Action::Archive | Action::Delete => (0.0, None),
            };
            delays.push(delay);
            infos.push(info);
            if with_results {
                let r = o.result.as_ref().filter(|_| o.action.finishes());
                job_ids.push(r.map(|r| r.job_id.clone()));
                status.push(r.map(|r| r.status));
                values.push(r.and_then(|r| r.value.clone()));
                r_errors.push(r.and_then(|r| r.error.clone()));
            }
        }
        let sql: &Arc<str> = if with_results {
            &self.sql.complete_results
        } else {
            &self.sql.complete
        };
        let query = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(ids)
            .bind(cts)
            .bind(actions)
            .bind(delays)
            .bind(infos)
            .bind(attempts)
            .bind(errors);
        let query = if with_results {
            query
                .bind(job_ids)
                .bind(status)
                .bind(values)
                .bind(r_errors)
                .bind(results_channel)
        } else {
            query
        };
        let row = query.fetch_one(&mut *conn).await?;
        let mut matched: Vec<i64> = row.try_get(0)?;
        matched.sort_unstable();
        Ok(matched)
    }
}
