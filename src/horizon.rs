//! Old snapshots: what holds back vacuum of the queue tables.
//!
//! Every claim updates a row and every outcome deletes one; vacuum removes the dead versions
//! they leave only once no snapshot can still see them. A transaction left open (a forgotten
//! `BEGIN` in psql, a long report, `pg_dump`), a prepared transaction never committed, a
//! replication slot's `xmin` or a standby with `hot_standby_feedback` holds that horizon back
//! for the whole database: the queue tables grow with the dead rows and claims walk more of
//! them as the snapshot ages. [`snapshot_holders`] lists who holds it; the runtime's
//! maintenance service logs a `WARN` naming them (see the crate docs, "Old snapshots").

use std::time::Duration;

use sqlx::{PgExecutor, Row};

use crate::error::Result;

/// Every holder of the xmin horizon of the current database, oldest first: sessions (by their
/// snapshot or transaction id), prepared transactions, replication slots with an `xmin` and
/// standbys feeding back theirs. Sessions of other databases do not hold back this one's
/// tables and are left out, as are logical slots' `catalog_xmin` (system catalogs only).
const HOLDERS: &str = "\
WITH h AS ( \
  SELECT 'session'::text AS kind, a.pid, NULL::text AS name, a.usename::text AS role, \
         a.application_name::text AS app, a.state::text AS state, left(a.query, 200) AS query, \
         CASE WHEN a.backend_xid IS NOT NULL \
                   AND (a.backend_xmin IS NULL OR age(a.backend_xid) > age(a.backend_xmin)) \
              THEN a.backend_xid ELSE a.backend_xmin END AS xmin, \
         a.xact_start AS since \
    FROM pg_stat_activity a \
   WHERE (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL) AND a.pid <> pg_backend_pid() \
     AND a.datname = current_database() AND a.backend_type IS DISTINCT FROM 'walsender' \
  UNION ALL \
  SELECT 'prepared transaction', NULL, p.gid, p.owner::text, NULL, 'prepared', NULL, \
         p.transaction, p.prepared \
    FROM pg_prepared_xacts p WHERE p.database = current_database() \
  UNION ALL \
  SELECT 'replication slot', s.active_pid, s.slot_name::text, NULL, s.plugin::text, \
         CASE WHEN s.active THEN 'active' ELSE 'inactive' END, NULL, s.xmin, NULL \
    FROM pg_replication_slots s WHERE s.xmin IS NOT NULL \
  UNION ALL \
  SELECT 'standby', r.pid, NULL, r.usename::text, r.application_name::text, r.state::text, NULL, \
         r.backend_xmin, NULL \
    FROM pg_stat_replication r WHERE r.backend_xmin IS NOT NULL) \
SELECT kind, pid, name, role, app, state, query, age(xmin)::int8 AS xids, xmin::text AS xmin, \
       extract(epoch FROM clock_timestamp() - since)::float8 AS held_s, \
       pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS sees_all \
  FROM h ORDER BY age(xmin) DESC LIMIT 10";

/// One holder of the database's xmin horizon.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SnapshotHolder {
    /// `session`, `prepared transaction`, `replication slot` or `standby`.
    pub kind: String,
    /// The backend's process id (a slot's active walsender; `None` for a prepared
    /// transaction or an inactive slot): what `pg_terminate_backend` takes.
    pub pid: Option<i32>,
    /// A prepared transaction's gid or a slot's name.
    pub name: Option<String>,
    /// The role it runs as.
    pub role: Option<String>,
    /// Its `application_name` (a slot: its output plugin).
    pub application: Option<String>,
    /// `active`, `idle in transaction`, ...
    pub state: Option<String>,
    /// The start of its current (or last) query, up to 200 characters; `None` without the
    /// right to see it (another role's session without `pg_read_all_stats`).
    pub query: Option<String>,
    /// How many transactions ago its snapshot was taken (`age(xmin)`).
    pub xids: i64,
    /// The `xmin` it holds, as text: with the kind and pid, what identifies one snapshot.
    pub xmin: String,
    /// How long its transaction has been open (a prepared transaction: since it was prepared);
    /// `None` where PostgreSQL does not say (slots, standbys) or the role may not see it.
    pub held: Option<Duration>,
}

/// What [`snapshot_holders`] found.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct SnapshotHolders {
    /// Oldest first, at most ten.
    pub holders: Vec<SnapshotHolder>,
    /// The role may read every session's start time and query (`pg_read_all_stats`, or a
    /// superuser). Without it, other roles' sessions still show their pid and `xmin`, but
    /// neither how long they have been open nor what they run.
    pub sees_all: bool,
}

/// Who holds back vacuum of the current database's tables, the queues among them: sessions
/// with an old snapshot or transaction id, prepared transactions, replication slots and
/// standbys, oldest first (at most ten), whether young or old. One statement over
/// `pg_stat_activity`, `pg_prepared_xacts`, `pg_replication_slots` and `pg_stat_replication`;
/// any role may run it (see [`SnapshotHolders::sees_all`]).
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) if the statement fails.
///
/// # Example
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// let found = apalis_pgmq_notify::snapshot_holders(&pool).await?;
/// for h in found.holders {
///     println!("{} pid {:?}: {} transactions old, open {:?}", h.kind, h.pid, h.xids, h.held);
/// }
/// # Ok(()) }
/// ```
pub async fn snapshot_holders<'c, E: PgExecutor<'c>>(executor: E) -> Result<SnapshotHolders> {
    let rows = sqlx::query(HOLDERS).fetch_all(executor).await?;
    let mut found = SnapshotHolders {
        holders: Vec::with_capacity(rows.len()),
        sees_all: true,
    };
    for row in &rows {
        let held: Option<f64> = row.try_get("held_s")?;
        found.sees_all = row.try_get("sees_all")?;
        found.holders.push(SnapshotHolder {
            kind: row.try_get("kind")?,
            pid: row.try_get("pid")?,
            name: row.try_get("name")?,
            role: row.try_get("role")?,
            application: row.try_get("app")?,
            state: row.try_get("state")?,
            query: row
                .try_get::<Option<String>, _>("query")?
                .filter(|q| q != "<insufficient privilege>"),
            xids: row.try_get("xids")?,
            xmin: row.try_get("xmin")?,
            held: held.map(|s| Duration::from_secs_f64(s.max(0.0))),
        });
    }
    Ok(found)
}
