//! The SQL of one queue, built once from its validated name: every statement on a queue's own
//! tables is written here, once (the `read_ct` fence, the archive's column list, the claim, the
//! outcome statement), and [`prepare_every_statement`](crate::prepare_every_statement) prepares
//! them all against a real database.

use std::sync::Arc;

use super::{
    QueueName,
    delivery::{ARCHIVE, DEAD_LETTER, DELETE, RETRY},
    inspect::InspectSql,
    message::READ_COLS,
};

/// The columns an archived message keeps, in the order of `pgmq.a_<queue>`: written once, used
/// by every statement that moves rows to an archive.
const ARCHIVE_COLS: &str = "msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers";

/// Where the row's id sits in `$1`, found by binary search: the batch statements bind their
/// ids sorted ascending, each once (see `delivery.rs`), and `width_bucket` over a sorted array
/// returns how many of its elements are at most the id, so the id's own position. A row's
/// per-row values are read at that position, in O(log n) (`array_position` walked the array:
/// quadratic per batch, measured 92 ms against 8 ms for an outcome batch of 2 000).
macro_rules! pos {
    () => {
        "width_bucket(m.msg_id, $1::bigint[])"
    };
}

/// The fence of a row already found by its id (see [`FENCE`]): the id at its position in `$1`
/// is its own (an unsorted batch, which the crate never binds, then matches nothing instead of
/// reading another row's values), and the row still carries the `read_ct` at that position in
/// `$2`.
const FENCE_CT: &str = concat!(
    "($1::bigint[])[",
    pos!(),
    "] = m.msg_id AND m.read_ct = ($2::int[])[",
    pos!(),
    "]"
);

/// The fence of every write about a claimed message: the row must still carry the `read_ct`
/// of our delivery, so a stale holder's writes match no row once the message was delivered
/// again. `$1` holds the batch's message ids (each once, sorted ascending), `$2` their
/// `read_ct` at the same position.
///
/// Why positions and not a join with `unnest($1, $2)`: no statement on the queue table joins it
/// to anything. A join gives the planner a choice that depends on the table's statistics of one
/// moment: after the table was analysed (or vacuumed) while momentarily empty, PostgreSQL plans
/// the join as a nested loop or merge join over the *whole* primary key, and once a backlog
/// builds up every outcome, renewal and claim walks it (measured: 23 s per outcome batch with
/// 200 000 rows; 1 job/s). A restriction `msg_id = ANY(<array>)` leaves only one index probe
/// per id, or a sequential scan that PostgreSQL costs on the table's real current size, never on
/// its last statistics (see `tests/plans.rs`: a queue analysed empty, the same under a held
/// snapshot, and one vacuumed while it held 100 rows, each then given 200 000 jobs). Planner
/// settings (`SET LOCAL enable_seqscan = off` ...) would force the same, but each statement then
/// needs a transaction of its own, two more round trips: measured, a third of the burn-down.
const FENCE: &str = concat!(
    "m.msg_id = ANY($1::bigint[]) AND ($1::bigint[])[",
    pos!(),
    "] = m.msg_id AND m.read_ct = ($2::int[])[",
    pos!(),
    "]"
);

/// The `i`-th parameter's element (an array of `typ`) at the position of the row's `msg_id` in
/// `$1`: the per-row values of a batch, read without a join (see [`FENCE`]). Only in a
/// statement whose `WHERE` holds [`FENCE_CT`], which checks that position.
fn at(i: u8, typ: &str) -> String {
    format!("(${i}::{typ}[])[{}]", pos!())
}

/// The rows of the queue table `m` whose ids a CTE returned: `m.msg_id = ANY(ARRAY(...))`, an
/// uncorrelated subquery run once, so the statement probes the primary key per id whatever the
/// statistics say (see [`FENCE`]).
fn ids_of(cte: &str) -> String {
    format!("m.msg_id = ANY(ARRAY(SELECT msg_id FROM {cte}))")
}

/// A CTE `locked` that locks the rows of the batch (`$1`, `$2`, see [`FENCE`]) still carrying
/// our `read_ct`, one at a time in `msg_id` order
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
fn locked_cte(q: &str, wait: bool) -> String {
    let lock = if wait {
        "ORDER BY m.msg_id FOR UPDATE OF m"
    } else {
        "FOR UPDATE OF m SKIP LOCKED"
    };
    format!("locked AS MATERIALIZED (SELECT m.msg_id FROM {q} m WHERE {FENCE} {lock})")
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
    /// A worker's claim with priorities: highest priority (`PRIORITY_OF`) first, then
    /// visible longest, from the `(priority DESC, vt)` index.
    Priority,
}

/// PGMQ's read (claim visible messages, lease them for `$2` seconds, count the read), with an
/// extra condition on the claimed rows and, with `visible_since`, the visibility time each row
/// had before the claim as an eighth column. With `log` (and `visible_since`), a claim that
/// leases messages also writes them to `apalis_pgmq.claim_log` under the worker's token (`$4`
/// in visibility order, `$3` by priority), so that a worker that loses the answer can give
/// them back (`recover_lost`).
fn read_sql(q: &str, paused: &str, visible_since: bool, pick_by: Pick, log: bool) -> Arc<str> {
    let also = if paused.is_empty() {
        String::new()
    } else {
        format!("AND NOT {paused}")
    };
    // With `visible_since`, the claimed ids and their visibility times go into one row of two
    // arrays sorted by id, and each updated row reads its time there by binary search: no join
    // of the table (see `FENCE`), and no per-row scan of the claimed rows (a correlated subquery
    // on `cte` cost 0.28 ms more per claim of 100 than a join, 29 ms more per claim of 1 000).
    let (pick, picked, claimed, ret) = if visible_since {
        (
            ", vt AS visible_since",
            ", picked AS MATERIALIZED (SELECT array_agg(msg_id ORDER BY msg_id) AS ids, \
                        array_agg(visible_since ORDER BY msg_id) AS since FROM cte)",
            "m.msg_id = ANY((SELECT ids FROM picked)::bigint[])".to_owned(),
            ", (SELECT p.since[width_bucket(m.msg_id, p.ids)] FROM picked p) AS visible_since",
        )
    } else {
        ("", "", ids_of("cte"), "")
    };
    let (visible, order) = match pick_by {
        Pick::Id => ("vt <= clock_timestamp()", "msg_id ASC"),
        // From the claim floor `$3` (NULL: none), see `backend/floor.rs`: both bounds are
        // stable, so they bound the index scan.
        Pick::Visibility => (
            "vt >= coalesce($3::timestamptz, '-infinity'::timestamptz) AND vt <= now()",
            "vt ASC",
        ),
        Pick::Priority => ("vt <= now()", ""),
    };
    let by_priority = format!("{PRIORITY_OF} DESC, vt ASC");
    let order = if order.is_empty() {
        by_priority.as_str()
    } else {
        order
    };
    let update = format!(
        "UPDATE {q} m SET last_read_at = clock_timestamp(), \
                          vt = clock_timestamp() + make_interval(secs => $2::float8), \
                          read_ct = read_ct + 1 \
         WHERE {claimed} \
         RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.last_read_at, m.vt, \
                   m.message::text AS message, m.headers::text AS headers{ret}",
    );
    // The log row commits with the claim, or neither does; the claim's transaction id is the
    // `xmin` of every row version it writes. A claim that took nothing writes nothing.
    let logged = match (log && visible_since, pick_by) {
        (true, Pick::Visibility | Pick::Priority) => format!(
            ", logged AS (INSERT INTO apalis_pgmq.claim_log (token, claimed_by, ids, until) \
                         SELECT ${token}::text::uuid, pg_current_xact_id(), ids, \
                                clock_timestamp() + make_interval(secs => $2::float8) \
                         FROM picked WHERE ids IS NOT NULL)",
            token = if matches!(pick_by, Pick::Visibility) {
                4
            } else {
                3
            },
        ),
        _ => String::new(),
    };
    let ctes = format!(
        "WITH cte AS (SELECT msg_id{pick} FROM {q} WHERE {visible} {also} \
                      ORDER BY {order} LIMIT $1 FOR UPDATE SKIP LOCKED){picked}{logged}"
    );
    if !matches!(pick_by, Pick::Visibility) {
        return format!("{ctes} {update}").into();
    }
    // The claim in visibility order also says what its floor needs (`backend/floor.rs`), in
    // one row even when it claimed nothing: its `now()`, its snapshot's oldest running and
    // next transaction ids, and whether the queue is paused (`{paused}`).
    format!(
        "{ctes}, claimed AS ({update}), \
         seen AS (SELECT now() AS at, \
                         pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin, \
                         pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax, \
                         {paused} AS paused, pg_postmaster_start_time() AS server_start) \
         SELECT c.msg_id, c.read_ct, c.enqueued_at, c.last_read_at, c.vt, c.message, c.headers, \
                c.visible_since, s.at, s.xmin, s.xmax, s.paused, s.server_start \
         FROM seen s LEFT JOIN claimed c ON true"
    )
    .into()
}

/// A job's idempotency key in its headers (`alias`: `""`, `"a."`). The unique index
/// (`apalis_pgmq.index_unique_keys`) is on [`key_hash_sql`] of it, so statements that use the
/// index compare the hash, then the key itself.
fn key_of(alias: &str) -> String {
    format!("({alias}headers->'apalis'->>'idempotency_key')")
}

/// The SHA-256 of a key's bytes, written with built-in immutable functions only (the indexes
/// use it, and a producer then needs no right on this crate's functions): escaping every
/// backslash makes the `bytea` input the text's bytes. Migration 0003 writes the same.
fn key_hash_sql(key: &str) -> String {
    format!("sha256(replace({key}, '\\', '\\\\')::bytea)")
}

/// [`key_hash_sql`] of [`key_of`].
fn key_hash_of(alias: &str) -> String {
    key_hash_sql(&key_of(alias))
}

/// A job's priority, as `apalis_pgmq.priority_of` computes it, written with built-in immutable
/// functions only (the priority index of migration 0003 is on this exact expression).
const PRIORITY_OF: &str = "(CASE WHEN jsonb_typeof(headers->'apalis'->'priority') = 'number' \
     THEN least(greatest((headers->'apalis'->>'priority')::numeric, -1000000), 1000000)::integer \
     ELSE 0 END)";

/// The statement that applies a batch of outcomes (see `delivery.rs`): archive, delete, retry
/// (visible after `delay`, the runs and error recorded in the headers) or dead-letter (with
/// `info` merged into the headers), each fenced by its delivery's `read_ct`. The batch's
/// `action` column holds the codes of [`Action`](super::delivery::Action).
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
    // The rows of one action: their ids from the batch (the only index condition: a second
    // `msg_id = ANY($1)` made each action's scan probe the whole batch), then the fence (see
    // `FENCE`: no join, the per-row values are read by position; each message once, sorted).
    let of_action = |code: i16| {
        format!("m.msg_id = ANY(ARRAY(SELECT msg_id FROM t WHERE action = {code})) AND {FENCE_CT}")
    };
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
           DELETE FROM {q} m WHERE {archive} RETURNING {m_cols}), \
         archive_rows AS (INSERT INTO {a} ({COLS}) SELECT {COLS} FROM archived RETURNING msg_id), \
         deleted AS ( \
           DELETE FROM {q} m WHERE {delete} RETURNING m.msg_id), \
         retried AS ( \
           UPDATE {q} m SET vt = clock_timestamp() + make_interval(secs => {delay}), \
                            headers = apalis_pgmq.retry_headers(m.headers, {attempts}, {err}) \
           WHERE {retry} RETURNING m.msg_id), \
         dead AS ( \
           DELETE FROM {q} m WHERE {dead} \
           RETURNING m.msg_id, greatest(m.read_ct, {attempts}) AS runs, m.message, m.headers, \
                     {info} AS info), \
         dead_rows AS ( \
           INSERT INTO {d} (vt, message, headers) \
           SELECT clock_timestamp(), message, apalis_pgmq.dead_letter_headers(headers, \
                    info::jsonb || jsonb_build_object('queue', '{source}', 'msg_id', msg_id, \
                                                      'attempts', runs, 'at', now())) \
           FROM dead ORDER BY msg_id RETURNING msg_id){stored} \
         SELECT ARRAY(SELECT msg_id FROM archived) || ARRAY(SELECT msg_id FROM deleted) \
             || ARRAY(SELECT msg_id FROM retried) || ARRAY(SELECT msg_id FROM dead), \
                (SELECT count(*) FROM archive_rows) + (SELECT count(*) FROM dead_rows){select_more}",
        archive = of_action(ARCHIVE),
        delete = of_action(DELETE),
        retry = of_action(RETRY),
        dead = of_action(DEAD_LETTER),
        delay = at(4, "float8"),
        info = at(5, "text"),
        attempts = at(6, "int"),
        err = at(7, "text"),
    )
    .into()
}

/// SQL text built once per queue from its validated name.
#[derive(Debug)]
pub(super) struct QueueSql {
    pub(super) send_one: Arc<str>,
    pub(super) send_many: Arc<str>,
    /// One message with an idempotency key: inserted unless the key is taken (see
    /// `send_unique`).
    pub(super) send_unique: Arc<str>,
    pub(super) read: Arc<str>,
    /// A worker's read: as `read`, but nothing while the queue is paused.
    pub(super) claim: Arc<str>,
    /// As `claim`, highest priority first.
    pub(super) claim_priority: Arc<str>,
    /// As `claim`, also writing the claim to `apalis_pgmq.claim_log` under the token `$4`.
    pub(super) claim_logged: Arc<str>,
    /// As `claim_priority`, also writing the claim to `apalis_pgmq.claim_log` under the token
    /// `$3`.
    pub(super) claim_priority_logged: Arc<str>,
    /// Gives back the messages of logged claims whose answer was lost (tokens `$1`).
    pub(super) recover_lost: Arc<str>,
    pub(super) set_vt_one: Arc<str>,
    pub(super) set_vt_many: Arc<str>,
    pub(super) archive: Arc<str>,
    pub(super) delete: Arc<str>,
    pub(super) next_visible: Arc<str>,
    pub(super) next_visible_in: Arc<str>,
    /// Whether a message is visible below the claim floor `$1` (the floor's sweep).
    pub(super) below_floor: Arc<str>,
    pub(super) tables_exist: Arc<str>,
    /// Lease renewal of a batch of `(msg_id, read_ct)`, fenced.
    pub(super) renew: Arc<str>,
    /// Release of claimed-but-unstarted messages: visible now, the read given back, fenced.
    pub(super) release: Arc<str>,
    /// One statement applying a batch of mixed job outcomes, fenced.
    pub(super) complete: Arc<str>,
    /// As `complete`, also keeping the results of the finished jobs that have one
    /// (`apalis_pgmq.results`) and announcing them on the results channel (`$12`).
    pub(super) complete_results: Arc<str>,
    /// Listing, finding and counting jobs in every state.
    pub(super) inspect: InspectSql,
}

impl QueueSql {
    pub(super) fn new(name: &QueueName) -> Self {
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
        // A time in the past is written as the time of the write: visible at once, and never
        // below the claim floor (`backend/floor.rs`) of a worker that would then not see it
        // until its next sweep.
        let vt = "GREATEST(COALESCE($3::timestamptz, '-infinity'), clock_timestamp() + make_interval(secs => $4::float8))";
        let locked_ids = locked_ids_cte(&q);
        let locked_batch = locked_cte(&q, true);
        let locked_free = locked_cte(&q, false);
        let locked = ids_of("locked");
        let paused = format!(
            "EXISTS (SELECT 1 FROM apalis_pgmq.paused p WHERE p.queue = '{}')",
            source.replace('\'', "''")
        );
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
                 SELECT GREATEST(COALESCE(t.at, '-infinity'), clock_timestamp() + make_interval(secs => t.secs)), \
                        t.m::jsonb, t.h::jsonb \
                 FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::float8[]) AS t(m, h, at, secs) \
                 RETURNING msg_id"
            )
            .into(),
            // $5: the key; $6: how long a finished job keeps its key (NULL: not at all), written
            // to its headers as `idempotency_window` for the key ledger (migration 0003). The
            // ledger's trigger takes the key in this statement, atomically with the insert,
            // whatever the timing of the previous holder's completion; `apalis_pgmq.skip_key`
            // makes it skip this row instead of raising when the key is taken, and the holder
            // is reported. A job archived before the ledger existed is found in the archive
            // (`prior`). Zero rows: the holder's row was committed after this statement's
            // snapshot and is gone again; the caller runs it again. The transaction takes its id
            // (`skip_key.xid`) before the row's `vt` is read from the clock: `ON CONFLICT` may
            // wait on another insert of the key after that, and the claim floor
            // (`backend/floor.rs`) holds back for transactions with an id only.
            send_unique: format!(
                "WITH prior AS (SELECT a.msg_id FROM {a} a \
                   WHERE $6::float8 IS NOT NULL \
                     AND {key_hash_a} = {key_hash_5} AND {key_a} = $5::text \
                     AND a.archived_at > clock_timestamp() - make_interval(secs => $6::float8) \
                   ORDER BY a.archived_at DESC LIMIT 1), \
                 skip_key AS (SELECT set_config('apalis_pgmq.skip_key', encode({key_hash_5}, 'hex'), true), \
                                     pg_current_xact_id() AS xid \
                   WHERE NOT EXISTS (SELECT 1 FROM prior)), \
                 ins AS (INSERT INTO {q} (vt, message, headers) \
                   SELECT {vt}, $1::text::jsonb, \
                          CASE WHEN $6::float8 IS NULL THEN $2::text::jsonb \
                               ELSE jsonb_set($2::text::jsonb, '{{apalis,idempotency_window}}', \
                                              to_jsonb($6::float8)) END \
                   FROM skip_key \
                   ON CONFLICT ({key_hash}) WHERE {key} IS NOT NULL DO NOTHING \
                   RETURNING msg_id), \
                 holder AS (SELECT apalis_pgmq.key_holder('{source}', {key_hash_5}) AS msg_id \
                   WHERE NOT EXISTS (SELECT 1 FROM ins) AND NOT EXISTS (SELECT 1 FROM prior)) \
                 SELECT msg_id, false FROM ins \
                 UNION ALL SELECT msg_id, true FROM prior \
                 UNION ALL SELECT msg_id, true FROM holder WHERE msg_id IS NOT NULL \
                 UNION ALL SELECT q.msg_id, true FROM {q} q \
                   WHERE NOT EXISTS (SELECT 1 FROM ins) AND NOT EXISTS (SELECT 1 FROM prior) \
                     AND {key_hash_q} = {key_hash_5} AND {key_q} = $5::text \
                 LIMIT 1",
                key = key_of(""),
                key_hash = key_hash_of(""),
                key_a = key_of("a."),
                key_hash_a = key_hash_of("a."),
                key_q = key_of("q."),
                key_hash_q = key_hash_of("q."),
                key_hash_5 = key_hash_sql("$5::text"),
            )
            .into(),
            // A worker's claim is PGMQ's read plus three things: nothing while the queue is
            // paused, when each message had become visible (for pickup latency), and the
            // messages visible longest first, read from the `vt` index (see `Pick`).
            claim: read_sql(&q, &paused, true, Pick::Visibility, false),
            claim_priority: read_sql(&q, &paused, true, Pick::Priority, false),
            claim_logged: read_sql(&q, &paused, true, Pick::Visibility, true),
            claim_priority_logged: read_sql(&q, &paused, true, Pick::Priority, true),
            read: read_sql(&q, "", false, Pick::Id, false),
            // The messages of the logged claims `$1` (tokens) whose row is still the version
            // the claim wrote, while their lease runs: visible now, the claim's read given back
            // (see `claim_log`). A row locked by another transaction is skipped, never waited
            // for (whoever holds it is writing it: its `xmin` is about to change). Returns the
            // tokens found (their claims committed) and the ids released.
            recover_lost: format!(
                "WITH found AS MATERIALIZED (SELECT l.token, l.claimed_by, l.ids, l.until FROM apalis_pgmq.claim_log l \
                                             WHERE l.token = ANY($1::text[]::uuid[])), \
                 mine AS MATERIALIZED (SELECT m.msg_id FROM {q} m, found f \
                                       WHERE f.until > clock_timestamp() AND m.msg_id = ANY(f.ids) \
                                         AND m.xmin = xid(f.claimed_by) \
                                       ORDER BY m.msg_id FOR UPDATE OF m SKIP LOCKED), \
                 released AS (UPDATE {q} m SET vt = clock_timestamp(), read_ct = m.read_ct - 1 \
                              WHERE m.msg_id = ANY(ARRAY(SELECT msg_id FROM mine)) \
                              RETURNING m.msg_id) \
                 SELECT ARRAY(SELECT token::text FROM found), ARRAY(SELECT msg_id FROM released ORDER BY msg_id)"
            )
            .into(),
            set_vt_one: format!(
                "UPDATE {q} SET vt = GREATEST(COALESCE($2::timestamptz, '-infinity'), clock_timestamp() + make_interval(secs => $3::float8)) \
                 WHERE msg_id = $1 RETURNING {READ_COLS}"
            )
            .into(),
            set_vt_many: format!(
                "WITH {locked_ids} \
                 UPDATE {q} m SET vt = GREATEST(COALESCE($2::timestamptz, '-infinity'), clock_timestamp() + make_interval(secs => $3::float8)) \
                 WHERE {locked} RETURNING m.msg_id"
            )
            .into(),
            archive: format!(
                "WITH {locked_ids}, \
                 archived AS (DELETE FROM {q} m WHERE {locked} RETURNING {m_cols}) \
                 INSERT INTO {a} ({COLS}) SELECT {COLS} FROM archived RETURNING msg_id"
            )
            .into(),
            delete: format!(
                "WITH {locked_ids} \
                 DELETE FROM {q} m WHERE {locked} RETURNING m.msg_id"
            )
            .into(),
            next_visible: format!("SELECT min(vt) FROM {q} WHERE vt > clock_timestamp()").into(),
            // Over every row, visible ones included (then it is zero or less): a message that
            // became visible between a worker's empty read and this look is not missed. Nothing
            // while the queue is paused (its workers wait for the resume notification).
            next_visible_in: format!(
                "SELECT EXTRACT(EPOCH FROM min(vt) - clock_timestamp())::float8 FROM {q} \
                 WHERE vt >= coalesce($1::timestamptz, '-infinity'::timestamptz) AND NOT {paused}"
            )
            .into(),
            below_floor: format!(
                "SELECT EXISTS (SELECT 1 FROM {q} WHERE vt < $1::timestamptz AND vt <= now())"
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
                             WHERE {locked} RETURNING m.msg_id) \
                 SELECT msg_id, true FROM renewed \
                 UNION ALL \
                 SELECT m.msg_id, false FROM {q} m \
                 WHERE {FENCE} AND (SELECT count(*) FROM locked) < cardinality($1::bigint[]) \
                   AND m.msg_id <> ALL(ARRAY(SELECT msg_id FROM locked))"
            )
            .into(),
            release: format!(
                "WITH {locked_batch} \
                 UPDATE {q} m SET vt = clock_timestamp(), read_ct = m.read_ct - 1 \
                 WHERE {locked} RETURNING m.msg_id"
            )
            .into(),
            complete: complete_sql(&q, &a, &d, &m_cols, source, false),
            complete_results: complete_sql(&q, &a, &d, &m_cols, source, true),
            inspect: InspectSql::new(name),
        }
    }
}
