//! `setup`: install or check PGMQ, then apply the project's own migrations.

use std::fmt;

use sqlx::{ConnectOptions, Connection, PgConnection, PgPool, Row};

use crate::error::{Error, Result};

/// The oldest PGMQ whose SQL this crate relies on: 1.10.0 added `last_read_at`, which `read`
/// sets and `archive` keeps; 1.5.0 added `headers`.
pub const MIN_PGMQ_VERSION: &str = "1.10.0";
const MIN_PGMQ: Version = Version(1, 10, 0);

/// The schema that holds this crate's own SQL objects and its migrations table.
pub const SCHEMA: &str = "apalis_pgmq";

/// Session advisory lock taken around `setup`, so concurrent callers run it one at a time.
/// (ASCII "apq_setp".)
const SETUP_LOCK_KEY: i64 = 0x6170_715f_7365_7470;

struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// The project's migrations, in order: the one list that [`setup`] applies and
/// [`notify_migration_sql`](crate::notify_migration_sql) writes out. Append-only: a migration
/// that is on the main branch is never edited (a unit test pins each one's checksum); a change is
/// a new migration.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "baseline",
        sql: include_str!("../migrations/0001_baseline.sql"),
    },
    Migration {
        version: 2,
        name: "notify_at_commit",
        sql: include_str!("../migrations/0002_notify_at_commit.sql"),
    },
    Migration {
        version: 3,
        name: "keys_and_rights",
        sql: include_str!("../migrations/0003_keys_and_rights.sql"),
    },
    Migration {
        version: 4,
        name: "claim_log",
        sql: include_str!("../migrations/0004_claim_log.sql"),
    },
];

/// The rows `(version, name, checksum)` that the development versions before 0.1.0 recorded:
/// eleven migrations, edited in place while nothing was released, which the baseline replaces.
/// [`setup`] upgrades a database that has exactly these rows (the baseline is idempotent over
/// the state they describe) and replaces them by the baseline's row, in one transaction. Their
/// SQL is kept for the tests in `tests/fixtures/pre-baseline/`.
const PRE_BASELINE: &[(i32, &str, i64)] = &[
    (1, "init", 853_632_087_567_838_865),
    (2, "notify", 3_784_928_986_957_631_908),
    (3, "wakeups", -5_669_085_650_964_485_183),
    (4, "retry_headers", 2_683_586_737_563_712_604),
    (5, "queue_name_rule", 8_657_239_419_520_148_843),
    (6, "registry", 7_444_886_341_720_293_847),
    (7, "operations", 3_377_512_485_906_377_299),
    (8, "partitions", -3_306_009_979_855_901_004),
    (9, "unique_keys", 8_941_058_419_127_563_611),
    (10, "priorities", -4_690_159_253_222_573_779),
    (11, "results", -9_074_503_632_334_404_746),
];

/// Creates this crate's schema and its migrations table (before any migration runs).
const MIGRATIONS_TABLE: &str = "CREATE SCHEMA IF NOT EXISTS apalis_pgmq;
CREATE TABLE IF NOT EXISTS apalis_pgmq.schema_migrations (
  version integer PRIMARY KEY,
  name text NOT NULL,
  checksum bigint NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
);
";

/// What [`setup`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SetupReport {
    /// The PGMQ version in use afterwards (`"unrecorded"` for an old-style SQL install that
    /// records no version but has every column this crate needs).
    pub pgmq_version: String,
    /// How PGMQ is present: as an extension, a SQL install, or installed by this call.
    pub pgmq_source: PgmqSource,
    /// Migrations applied by this call (empty when already up to date).
    pub applied_migrations: Vec<i32>,
}

/// How PGMQ is present in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PgmqSource {
    /// `CREATE EXTENSION pgmq`.
    Extension,
    /// PGMQ's SQL-only install, done earlier by someone else.
    SqlInstall,
    /// Installed by this `setup` call, from the SQL embedded in the `pgmq` crate (feature
    /// `install-pgmq`).
    InstalledNow,
}

impl fmt::Display for PgmqSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Extension => "extension",
            Self::SqlInstall => "SQL install",
            Self::InstalledNow => "installed now (embedded SQL)",
        })
    }
}

/// Prepares a database: makes sure PGMQ is there, then applies this crate's migrations.
///
/// - When PGMQ is absent, installs PGMQ's SQL API from the SQL embedded in the `pgmq` crate (no
///   network, no extension needed). That needs the `install-pgmq` feature (on by default);
///   without it this fails with [`Error::PgmqInstall`] saying PGMQ must be installed first.
/// - When PGMQ is present (extension or SQL install) it is used as is; if it is older than
///   [`MIN_PGMQ_VERSION`] this fails with [`Error::PgmqTooOld`], naming the version found.
/// - Applies `migrations/*.sql`, recording them in `apalis_pgmq.schema_migrations` (never in
///   `public._sqlx_migrations`, so your own sqlx migrations are unaffected). A database that
///   applied the migrations of a development version before 0.1.0 gets the baseline applied over
///   them, and their rows replaced by the baseline's, in one transaction.
///
/// Idempotent, and safe when several processes call it at once: callers are serialised by a
/// PostgreSQL advisory lock held on a dedicated connection (not one of the pool's).
///
/// # Errors
///
/// [`Error::PgmqTooOld`], [`Error::PgmqInstall`], [`Error::Migration`] or [`Error::Database`];
/// [`Error::TransactionPooler`] when `pool` goes through a pooler in transaction mode (checked
/// first, see [`check_session_pooling`](crate::check_session_pooling)); [`Error::ReadOnly`] on a
/// replica.
///
/// # Example
///
/// ```no_run
/// # async fn run() -> Result<(), apalis_pgmq_notify::Error> {
/// let pool = sqlx::PgPool::connect("postgres://localhost/app").await?;
/// let report = apalis_pgmq_notify::setup(&pool).await?;
/// println!("PGMQ {} ({})", report.pgmq_version, report.pgmq_source);
/// # Ok(()) }
/// ```
pub async fn setup(pool: &PgPool) -> Result<SetupReport> {
    let mut lock_conn = pool.connect_options().connect().await?;
    // Before the session lock: behind a transaction pooler it would be taken and released on
    // different server sessions.
    if let Err(e) = crate::topology::check_session_pooling_on(
        &mut lock_conn,
        &pool.connect_options(),
        "the pool's connection",
    )
    .await
    {
        let _ = lock_conn.close().await;
        return Err(e);
    }
    sqlx::query(crate::sql::ADVISORY_LOCK)
        .bind(SETUP_LOCK_KEY)
        .execute(&mut lock_conn)
        .await?;
    let result = setup_locked(pool, &mut lock_conn).await;
    // Closing the session releases the advisory lock even if the unlock below is not reached.
    let unlock = sqlx::query(crate::sql::ADVISORY_UNLOCK)
        .bind(SETUP_LOCK_KEY)
        .execute(&mut lock_conn)
        .await;
    let _ = lock_conn.close().await;
    let report = result?;
    unlock?;
    Ok(report)
}

async fn setup_locked(pool: &PgPool, conn: &mut PgConnection) -> Result<SetupReport> {
    let present: bool = sqlx::query_scalar(crate::sql::PGMQ_PRESENT)
        .fetch_one(&mut *conn)
        .await?;
    let (version, source) = if present {
        let (version, source) = detect_pgmq(conn).await?;
        (version, source)
    } else {
        install_pgmq(pool).await?;
        let (version, _) = detect_pgmq(conn).await?;
        (version, PgmqSource::InstalledNow)
    };
    let applied_migrations = apply_migrations(conn).await?;
    Ok(SetupReport {
        pgmq_version: version,
        pgmq_source: source,
        applied_migrations,
    })
}

/// Installs PGMQ's SQL API from the SQL embedded in the `pgmq` crate.
#[cfg(feature = "install-pgmq")]
async fn install_pgmq(pool: &PgPool) -> Result<()> {
    tracing::info!("PGMQ not found; installing its SQL API from the embedded scripts");
    pgmq::install::install_sql_from_embedded(pool)
        .await
        .map_err(|e| Error::PgmqInstall(crate::error::without_server_line(&e.to_string())))
}

/// Without the `install-pgmq` feature this build cannot install PGMQ: says so.
#[cfg(not(feature = "install-pgmq"))]
async fn install_pgmq(_pool: &PgPool) -> Result<()> {
    Err(Error::PgmqInstall(
        "PGMQ is not installed in this database (there is no pgmq.meta), and this build of \
         apalis-pgmq-notify cannot install it (its feature `install-pgmq` is off): install PGMQ \
         (CREATE EXTENSION pgmq, or PGMQ's SQL install), then run setup again"
            .to_owned(),
    ))
}

/// Finds the installed PGMQ version and checks it is new enough.
async fn detect_pgmq(conn: &mut PgConnection) -> Result<(String, PgmqSource)> {
    let ext: Option<String> = sqlx::query_scalar(crate::sql::PGMQ_EXTENSION_VERSION)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(v) = ext {
        check_version(&v)?;
        return Ok((v, PgmqSource::Extension));
    }
    let has_table: bool = sqlx::query_scalar(crate::sql::PGMQ_MIGRATIONS_PRESENT)
        .fetch_one(&mut *conn)
        .await?;
    if has_table {
        let rows = sqlx::query(crate::sql::PGMQ_MIGRATIONS)
            .fetch_all(&mut *conn)
            .await?;
        let newest = rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .filter_map(|v| Version::parse(&v).map(|p| (p, v)))
            .max_by_key(|(p, _)| *p);
        if let Some((_, v)) = newest {
            check_version(&v)?;
            return Ok((v, PgmqSource::SqlInstall));
        }
    }
    // An older SQL-only install records no version: check for the newest column we rely on.
    let capable: bool = sqlx::query_scalar(crate::sql::PGMQ_HAS_HEADERS_AND_LAST_READ)
        .fetch_one(&mut *conn)
        .await?;
    if capable {
        Ok(("unrecorded".to_owned(), PgmqSource::SqlInstall))
    } else {
        Err(Error::PgmqTooOld {
            found: "an unversioned SQL install without last_read_at (older than 1.10.0)".to_owned(),
            required: MIN_PGMQ_VERSION,
        })
    }
}

fn check_version(found: &str) -> Result<()> {
    match Version::parse(found) {
        Some(v) if v >= MIN_PGMQ => Ok(()),
        _ => Err(Error::PgmqTooOld {
            found: found.to_owned(),
            required: MIN_PGMQ_VERSION,
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Version(u32, u32, u32);

impl Version {
    fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next().map_or(Some(0), |p| {
            p.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })?;
        Some(Self(major, minor, patch))
    }
}

/// A migration of this crate that a database has not applied yet.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PendingMigration {
    /// Its number.
    pub version: i32,
    /// Its name.
    pub name: &'static str,
    /// Its SQL, as [`setup`] would run it.
    pub sql: &'static str,
}

/// The migrations [`setup`] would apply to this database, in order (all of them when this
/// crate's schema is absent; the baseline and every later one on a database that applied the
/// migrations of a development version before 0.1.0). Reads only; whether PGMQ itself is
/// installed is not checked.
///
/// # Errors
///
/// [`Error::Database`] if the database cannot be read; [`Error::Migration`] if it holds a part
/// of the pre-0.1.0 history, which `setup` refuses too.
///
/// # Example
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// let pending = apalis_pgmq_notify::pending_migrations(&pool).await?;
/// if !pending.is_empty() {
///     eprintln!("run apalis_pgmq_notify::setup (or `apalis-pgmq-notify migrate`) first");
/// }
/// # Ok(()) }
/// ```
pub async fn pending_migrations(pool: &PgPool) -> Result<Vec<PendingMigration>> {
    let exists: bool = sqlx::query_scalar(crate::sql::MIGRATIONS_TABLE_PRESENT)
        .fetch_one(pool)
        .await?;
    let rows = if exists {
        recorded(pool).await?
    } else {
        Vec::new()
    };
    let done: Vec<i32> = match History::of(&rows)? {
        // `setup` applies the baseline there (over what the old rows describe).
        History::PreBaseline => Vec::new(),
        History::Recorded => rows.iter().map(|r| r.version).collect(),
    };
    Ok(MIGRATIONS
        .iter()
        .filter(|m| !done.contains(&m.version))
        .map(|m| PendingMigration {
            version: m.version,
            name: m.name,
            sql: m.sql,
        })
        .collect())
}

/// One of this crate's migrations, and whether a database applied it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct MigrationStatus {
    /// Its number.
    pub version: i32,
    /// Its name.
    pub name: &'static str,
    /// The checksum of its SQL in this build.
    pub checksum: i64,
    /// Whether the database recorded it as applied.
    pub applied: bool,
    /// The checksum the database recorded (differs from `checksum` if the migration was edited
    /// after it was applied: `setup` then refuses).
    pub recorded_checksum: Option<i64>,
}

/// Every migration of this crate, and whether this database applied it (a read-only
/// `migrate --status`).
///
/// # Errors
///
/// [`Error::Database`] if the database cannot be read.
///
/// # Example
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// for m in apalis_pgmq_notify::migration_status(&pool).await? {
///     println!("{} {} {}", m.version, m.name, if m.applied { "applied" } else { "pending" });
/// }
/// # Ok(()) }
/// ```
pub async fn migration_status(pool: &PgPool) -> Result<Vec<MigrationStatus>> {
    let exists: bool = sqlx::query_scalar(crate::sql::MIGRATIONS_TABLE_PRESENT)
        .fetch_one(pool)
        .await?;
    let rows = if exists {
        recorded(pool).await?
    } else {
        Vec::new()
    };
    Ok(MIGRATIONS
        .iter()
        .map(|m| {
            let row = rows
                .iter()
                .find(|r| r.version == m.version && r.name == m.name);
            MigrationStatus {
                version: m.version,
                name: m.name,
                checksum: checksum(m.sql),
                applied: row.is_some(),
                recorded_checksum: row.map(|r| r.checksum),
            }
        })
        .collect())
}

/// Whether PGMQ's SQL API is installed in this database (`pgmq.meta` exists); [`setup`]
/// installs it where it is not.
///
/// # Errors
///
/// [`Error::Database`] if the database cannot be read.
pub async fn pgmq_installed(pool: &PgPool) -> Result<bool> {
    Ok(sqlx::query_scalar(crate::sql::PGMQ_PRESENT)
        .fetch_one(pool)
        .await?)
}

/// The SQL of every migration of this crate, in order, as [`setup`] runs it (after installing
/// PGMQ where it is absent, which this text does not include). Needs no database.
#[must_use]
pub fn migrations_sql() -> String {
    let mut out = String::new();
    for m in MIGRATIONS {
        out.push_str(&format!(
            "-- migration {} ({})\n{}\n",
            m.version, m.name, m.sql
        ));
    }
    out
}

/// FNV-1a of a migration's text, recorded with it, to notice a migration being edited after a
/// database applied it.
pub(crate) fn checksum(sql: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sql.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// One row of `apalis_pgmq.schema_migrations`.
struct Recorded {
    version: i32,
    name: String,
    checksum: i64,
}

async fn recorded<'c, E: sqlx::PgExecutor<'c>>(executor: E) -> Result<Vec<Recorded>> {
    let rows = sqlx::query(crate::sql::APPLIED_MIGRATIONS)
        .fetch_all(executor)
        .await?;
    rows.iter()
        .map(|row| {
            Ok(Recorded {
                version: row.try_get(0)?,
                name: row.try_get(1)?,
                checksum: row.try_get(2)?,
            })
        })
        .collect()
}

/// What a database's migration rows say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum History {
    /// Rows of this crate's [`MIGRATIONS`] (or none).
    Recorded,
    /// Exactly the rows of the development versions before the baseline ([`PRE_BASELINE`]).
    PreBaseline,
}

impl History {
    fn of(rows: &[Recorded]) -> Result<Self> {
        let old = |r: &Recorded| {
            PRE_BASELINE
                .iter()
                .any(|(v, n, _)| *v == r.version && *n == r.name)
                && !MIGRATIONS
                    .iter()
                    .any(|m| m.version == r.version && m.name == r.name)
        };
        if !rows.iter().any(old) {
            return Ok(Self::Recorded);
        }
        let exact = rows.len() == PRE_BASELINE.len()
            && PRE_BASELINE.iter().all(|(v, n, c)| {
                rows.iter()
                    .any(|r| r.version == *v && r.name == *n && r.checksum == *c)
            });
        if exact {
            return Ok(Self::PreBaseline);
        }
        let found: Vec<String> = rows
            .iter()
            .map(|r| format!("{} {}", r.version, r.name))
            .collect();
        Err(Error::Migration {
            version: 1,
            name: MIGRATIONS[0].name,
            reason: format!(
                "apalis_pgmq.schema_migrations holds migrations of a development version before \
                 0.1.0 ({}), but not the complete, final set that setup() can upgrade; upgrade \
                 this database with the development version it came from first, or recreate it",
                found.join(", ")
            ),
        })
    }
}

async fn apply_migrations(conn: &mut PgConnection) -> Result<Vec<i32>> {
    sqlx::raw_sql(MIGRATIONS_TABLE).execute(&mut *conn).await?;
    let rows = recorded(&mut *conn).await?;
    let mut applied = Vec::new();
    let mut done: Vec<(i32, i64)> = match History::of(&rows)? {
        History::Recorded => rows.iter().map(|r| (r.version, r.checksum)).collect(),
        History::PreBaseline => {
            let baseline = &MIGRATIONS[0];
            let sum = checksum(baseline.sql);
            let mut tx = conn.begin().await?;
            run_migration(&mut tx, baseline).await?;
            let old: Vec<i32> = PRE_BASELINE.iter().map(|(v, _, _)| *v).collect();
            sqlx::query(crate::sql::FORGET_MIGRATIONS)
                .bind(&old)
                .execute(&mut *tx)
                .await?;
            sqlx::query(crate::sql::RECORD_MIGRATION)
                .bind(baseline.version)
                .bind(baseline.name)
                .bind(sum)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(
                version = baseline.version,
                name = baseline.name,
                "applied the baseline over a pre-release migration history, and replaced its rows"
            );
            applied.push(baseline.version);
            vec![(baseline.version, sum)]
        }
    };
    for m in MIGRATIONS {
        let sum = checksum(m.sql);
        if let Some((_, recorded)) = done.iter().find(|(v, _)| *v == m.version) {
            if *recorded != sum {
                return Err(Error::Migration {
                    version: m.version,
                    name: m.name,
                    reason: "the applied migration differs from the one in this build".to_owned(),
                });
            }
            continue;
        }
        let mut tx = conn.begin().await?;
        run_migration(&mut tx, m).await?;
        sqlx::query(crate::sql::RECORD_MIGRATION)
            .bind(m.version)
            .bind(m.name)
            .bind(sum)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
        applied.push(m.version);
        done.push((m.version, sum));
    }
    Ok(applied)
}

async fn run_migration(conn: &mut PgConnection, m: &Migration) -> Result<()> {
    sqlx::raw_sql(m.sql)
        .execute(&mut *conn)
        .await
        .map_err(|e| Error::Migration {
            version: m.version,
            name: m.name,
            reason: crate::error::describe(&e),
        })?;
    Ok(())
}

/// Dollar-quote tags of the generated script; a unit test checks no migration contains them.
const SCRIPT_BLOCK_TAG: &str = "$apalis_pgmq_migrate$";
const SCRIPT_SQL_TAG: &str = "$apalis_pgmq_migration$";

/// The SQL that does what [`setup`] does after PGMQ is there, for projects that run their own
/// migrations: creates the schema and the migrations table, then applies each migration of
/// [`MIGRATIONS`] that is not recorded yet and records it with its checksum (so a later `setup`
/// finds it applied), or fails when it is recorded with another checksum. Takes `setup`'s lock
/// for its transaction. Applying it again changes nothing.
pub(crate) fn migration_script() -> String {
    let mut sql = format!(
        "-- Schema apalis_pgmq and its migrations ({} of them), recorded as setup() records them.\n\
         -- Run in one transaction (most migration tools do; psql: --single-transaction): the\n\
         -- lock below then serialises it with setup() and with other runs of this script.\n\
         SELECT pg_advisory_xact_lock({SETUP_LOCK_KEY});\n\n{MIGRATIONS_TABLE}\n",
        MIGRATIONS.len()
    );
    for m in MIGRATIONS {
        let sum = checksum(m.sql);
        let (version, name) = (m.version, m.name);
        sql.push_str(&format!(
            "-- Migration {version} ({name}).\n\
             DO {SCRIPT_BLOCK_TAG}\n\
             DECLARE\n  recorded bigint;\n\
             BEGIN\n  \
               SELECT checksum INTO recorded FROM apalis_pgmq.schema_migrations WHERE version = {version};\n  \
               IF recorded IS NULL THEN\n    \
                 EXECUTE {SCRIPT_SQL_TAG}\n{}{SCRIPT_SQL_TAG};\n    \
                 INSERT INTO apalis_pgmq.schema_migrations (version, name, checksum)\n    \
                 VALUES ({version}, '{name}', {sum});\n  \
               ELSIF recorded <> {sum} THEN\n    \
                 RAISE EXCEPTION 'apalis_pgmq migration {version} ({name}) was applied with another \
                 text (checksum %, expected {sum}); a database with migrations of a development \
                 version is upgraded by setup() (apalis-pgmq-notify migrate)', recorded;\n  \
               END IF;\n\
             END\n\
             {SCRIPT_BLOCK_TAG};\n\n",
            m.sql
        ));
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(Version::parse("1.10.0") > Version::parse("1.9.9"));
        assert_eq!(Version::parse("1.13.0"), Some(Version(1, 13, 0)));
        assert_eq!(Version::parse("1.4"), Some(Version(1, 4, 0)));
        assert_eq!(Version::parse("1.11.0-rc1"), Some(Version(1, 11, 0)));
        assert_eq!(Version::parse("banana"), None);
        assert!(check_version("1.9.0").is_err());
        assert!(check_version("1.10.0").is_ok());
        assert!(check_version("2.0.0").is_ok());
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i32::try_from(i + 1).unwrap_or(-1), "{}", m.name);
        }
        assert_ne!(checksum("a"), checksum("b"));
    }

    /// Every migration on the main branch, with the checksum of its text. Released migrations
    /// are append-only: a database that applied one records its checksum, and `setup` refuses
    /// to run against a build whose text differs.
    const PINNED: &[(i32, &str, i64)] = &[
        (1, "baseline", -1_137_092_230_231_547_476),
        (2, "notify_at_commit", 4_347_617_215_543_089_161),
        (3, "keys_and_rights", 8_886_467_250_151_169_677),
        (4, "claim_log", -3_517_457_498_283_038_235),
    ];

    #[test]
    fn released_migrations_are_never_edited() {
        for m in MIGRATIONS {
            let sum = checksum(m.sql);
            match PINNED.iter().find(|(v, _, _)| *v == m.version) {
                Some((_, name, pinned)) => {
                    assert_eq!(*name, m.name, "migration {} was renamed", m.version);
                    assert_eq!(
                        *pinned,
                        sum,
                        "migrations/{:04}_{}.sql was edited, but released migrations are \
                         append-only: databases that applied it keep its old text and setup() \
                         would refuse them. Revert the edit and add the change as a new migration \
                         (migrations/{:04}_<name>.sql, appended to MIGRATIONS in src/migrate.rs)",
                        m.version,
                        m.name,
                        MIGRATIONS.len() + 1
                    );
                }
                None => panic!(
                    "migration {} ({}) is not pinned: add ({}, {:?}, {}) to PINNED in \
                     src/migrate.rs in the commit that adds it",
                    m.version, m.name, m.version, m.name, sum
                ),
            }
        }
        assert_eq!(
            PINNED.len(),
            MIGRATIONS.len(),
            "a pinned migration was removed"
        );
    }

    #[test]
    fn the_script_quotes_every_migration_safely() {
        for m in MIGRATIONS {
            assert!(!m.sql.contains(SCRIPT_BLOCK_TAG), "{}", m.name);
            assert!(!m.sql.contains(SCRIPT_SQL_TAG), "{}", m.name);
        }
        let script = migration_script();
        for m in MIGRATIONS {
            assert!(script.contains(m.sql), "{}", m.name);
            assert!(script.contains(&format!("{}, '{}', {}", m.version, m.name, checksum(m.sql))));
        }
    }

    #[test]
    fn the_pre_baseline_history_is_told_apart() {
        let row = |version, name: &str, checksum| Recorded {
            version,
            name: name.to_owned(),
            checksum,
        };
        let old: Vec<Recorded> = PRE_BASELINE
            .iter()
            .map(|(v, n, c)| row(*v, n, *c))
            .collect();
        assert_eq!(History::of(&old).ok(), Some(History::PreBaseline));
        assert_eq!(History::of(&[]).ok(), Some(History::Recorded));
        let now = [row(1, "baseline", checksum(MIGRATIONS[0].sql))];
        assert_eq!(History::of(&now).ok(), Some(History::Recorded));
        // Part of the old history, or an edited old migration: refused, not guessed at.
        assert!(History::of(&old[..8]).is_err());
        let mut edited: Vec<Recorded> = PRE_BASELINE
            .iter()
            .map(|(v, n, c)| row(*v, n, *c))
            .collect();
        edited[10].checksum += 1;
        assert!(History::of(&edited).is_err());
    }
}
