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

/// The project's migrations, in order. Never edit one that has shipped; add a new one.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "notify",
        sql: include_str!("../migrations/0002_notify.sql"),
    },
    Migration {
        version: 3,
        name: "wakeups",
        sql: include_str!("../migrations/0003_wakeups.sql"),
    },
    Migration {
        version: 4,
        name: "retry_headers",
        sql: include_str!("../migrations/0004_retry_headers.sql"),
    },
    Migration {
        version: 5,
        name: "queue_name_rule",
        sql: include_str!("../migrations/0005_queue_name_rule.sql"),
    },
    Migration {
        version: 6,
        name: "registry",
        sql: include_str!("../migrations/0006_registry.sql"),
    },
    Migration {
        version: 7,
        name: "operations",
        sql: include_str!("../migrations/0007_operations.sql"),
    },
    Migration {
        version: 8,
        name: "partitions",
        sql: include_str!("../migrations/0008_partitions.sql"),
    },
    Migration {
        version: 9,
        name: "unique_keys",
        sql: include_str!("../migrations/0009_unique_keys.sql"),
    },
    Migration {
        version: 10,
        name: "priorities",
        sql: include_str!("../migrations/0010_priorities.sql"),
    },
    Migration {
        version: 11,
        name: "results",
        sql: include_str!("../migrations/0011_results.sql"),
    },
];

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
    /// Installed by this `setup` call, from the SQL embedded in the `pgmq` crate.
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
/// - When the `pgmq` schema is absent, installs PGMQ's SQL API from the SQL embedded in the `pgmq`
///   crate (no network, no extension needed).
/// - When PGMQ is present (extension or SQL install) it is used as is; if it is older than
///   [`MIN_PGMQ_VERSION`] this fails with [`Error::PgmqTooOld`], naming the version found.
/// - Applies `migrations/*.sql`, recording them in `apalis_pgmq.schema_migrations` (never in
///   `public._sqlx_migrations`, so your own sqlx migrations are unaffected).
///
/// Idempotent, and safe when several processes call it at once: callers are serialised by a
/// PostgreSQL advisory lock held on a dedicated connection (not one of the pool's).
///
/// # Errors
///
/// [`Error::PgmqTooOld`], [`Error::PgmqInstall`], [`Error::Migration`] or [`Error::Database`].
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
        tracing::info!("PGMQ not found; installing its SQL API from the embedded scripts");
        pgmq::install::install_sql_from_embedded(pool)
            .await
            .map_err(|e| Error::PgmqInstall(e.to_string()))?;
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
/// crate's schema is absent). Reads only; whether PGMQ itself is installed is not checked.
///
/// # Errors
///
/// [`Error::Database`] if the database cannot be read.
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
    let done: Vec<i32> = if exists {
        sqlx::query_scalar(crate::sql::APPLIED_VERSIONS)
            .fetch_all(pool)
            .await?
    } else {
        Vec::new()
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

/// FNV-1a, to notice a shipped migration being edited.
fn checksum(sql: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sql.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

async fn apply_migrations(conn: &mut PgConnection) -> Result<Vec<i32>> {
    sqlx::raw_sql(
        "CREATE SCHEMA IF NOT EXISTS apalis_pgmq; \
         CREATE TABLE IF NOT EXISTS apalis_pgmq.schema_migrations ( \
             version integer PRIMARY KEY, \
             name text NOT NULL, \
             checksum bigint NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut *conn)
    .await?;
    let rows = sqlx::query(crate::sql::APPLIED_MIGRATIONS)
        .fetch_all(&mut *conn)
        .await?;
    let mut done = Vec::with_capacity(rows.len());
    for row in &rows {
        done.push((row.try_get::<i32, _>(0)?, row.try_get::<i64, _>(1)?));
    }
    let mut applied = Vec::new();
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
        sqlx::raw_sql(m.sql)
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::Migration {
                version: m.version,
                name: m.name,
                reason: e.to_string(),
            })?;
        sqlx::query(crate::sql::RECORD_MIGRATION)
            .bind(m.version)
            .bind(m.name)
            .bind(sum)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
        applied.push(m.version);
    }
    Ok(applied)
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
}
