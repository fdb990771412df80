//! Test support: a fresh database per test on the server named by `DATABASE_URL`.
//!
//! Run the suite through `scripts/test.sh`, which starts a throwaway PostgreSQL when
//! `DATABASE_URL` is not set.
#![allow(dead_code)]

pub mod proxy;

use std::{
    str::FromStr,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// The server under test.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "DATABASE_URL is not set: run the tests with `scripts/test.sh`, which starts a \
             throwaway PostgreSQL, or point DATABASE_URL at a server where this role may CREATE DATABASE"
        )
    })
}

/// A database of its own for one test, dropped (with FORCE) when the value is dropped.
pub struct TestDb {
    pub pool: PgPool,
    pub options: PgConnectOptions,
    pub name: String,
    /// The runtime of `pool`, made on first use (one per test database, as an application
    /// makes one per database).
    runtime: std::sync::OnceLock<apalis_pgmq_notify::Runtime>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl TestDb {
    /// An empty database: no PGMQ, no migrations.
    pub async fn fresh() -> Self {
        let admin = PgConnectOptions::from_str(&database_url()).expect("DATABASE_URL parses");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "apq_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            nanos
        );
        let admin_pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(admin.clone())
            .await
            .expect("connect to DATABASE_URL");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{name}\" TEMPLATE template0"
        )))
        .execute(&admin_pool)
        .await
        .expect("CREATE DATABASE");
        admin_pool.close().await;
        let options = admin.database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await
            .expect("connect to the test database");
        Self {
            pool,
            options,
            name,
            runtime: std::sync::OnceLock::new(),
        }
    }

    /// The runtime of this database's pool (the same one on every call).
    pub fn runtime(&self) -> apalis_pgmq_notify::Runtime {
        self.runtime
            .get_or_init(|| apalis_pgmq_notify::Runtime::new(&self.pool))
            .clone()
    }

    /// A database where `setup` has run (PGMQ installed, migrations applied).
    pub async fn setup() -> Self {
        let db = Self::fresh().await;
        apalis_pgmq_notify::setup(&db.pool).await.expect("setup");
        db
    }

    /// A connection URL for this database (DATABASE_URL with the database replaced).
    pub fn url(&self) -> String {
        let base = database_url();
        let (url, query) = match base.split_once('?') {
            Some((u, q)) => (u.to_owned(), format!("?{q}")),
            None => (base.clone(), String::new()),
        };
        let scheme_end = url.find("://").map_or(0, |i| i + 3);
        let host_part = match url[scheme_end..].find('/') {
            Some(i) => &url[..scheme_end + i],
            None => url.as_str(),
        };
        format!("{host_part}/{}{query}", self.name)
    }

    /// A new pool on this database.
    pub async fn pool_with(&self, max_connections: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .connect_with(self.options.clone())
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Async work cannot run in Drop: do it on a thread with its own runtime. The test's pool
        // is not touched there (its connections belong to the test's runtime, which is blocked
        // while we join); DROP DATABASE ... WITH (FORCE) ends those sessions server-side.
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(admin) = PgConnectOptions::from_str(&database_url()) else {
                    return;
                };
                let Ok(admin_pool) = PgPoolOptions::new()
                    .max_connections(1)
                    .connect_with(admin)
                    .await
                else {
                    return;
                };
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&admin_pool)
                .await;
                admin_pool.close().await;
            });
        });
        let _ = handle.join();
    }
}

/// Waits until `check` returns `Some`, polling every few milliseconds; panics after `timeout`.
/// This waits on a condition; it is not a sleep standing in for synchronisation.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Counts rows of a query returning one bigint.
pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Runs a worker in the background: `(stop, join)`. Send on `stop` (or drop it) to shut the
/// worker down gracefully; `join` resolves when it has.
#[macro_export]
macro_rules! spawn_worker {
    ($worker:expr) => {{
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn($worker.run_until(async move {
            let _ = stopped.await;
            Ok::<(), std::io::Error>(())
        }));
        (stop, join)
    }};
}

/// Stops a worker started with [`spawn_worker!`] and checks it ended cleanly.
pub async fn stop_worker<E: std::fmt::Debug>(
    stop: tokio::sync::oneshot::Sender<()>,
    join: tokio::task::JoinHandle<Result<(), E>>,
) {
    let _ = stop.send(());
    join.await.expect("join").expect("worker");
}

/// Waits until the queue table `pgmq.q_<queue>` is empty.
pub async fn drained(pool: &PgPool, queue: &str) {
    let sql = format!("SELECT count(*) FROM pgmq.q_{queue}");
    wait_for(Duration::from_secs(60), "the queue to drain", || async {
        (count(pool, &sql).await == 0).then_some(())
    })
    .await;
}

/// `(msg_id, read_ct, seconds until vt)` of every message in a queue table.
pub async fn rows(pool: &PgPool, queue: &str) -> Vec<(i64, i32, f64)> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT msg_id, read_ct, extract(epoch FROM vt - clock_timestamp())::float8 \
         FROM pgmq.q_{queue} ORDER BY msg_id"
    )))
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("rows of {queue}: {e}"))
}

/// A login role with the rights a PGMQ producer needs on one queue, and none in `apalis_pgmq`.
pub async fn producer_role(db: &TestDb, queue: &str, extra: &str) -> (String, PgPool) {
    let role = format!("p_{}", &db.name[9..]);
    for sql in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT USAGE ON SCHEMA pgmq TO {role}"),
        format!("GRANT SELECT, INSERT ON pgmq.q_{queue} TO {role}"),
        extra.replace("{role}", &role),
    ] {
        if sql.is_empty() {
            continue;
        }
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(db.options.clone().username(&role))
        .await
        .expect("connect as the producer role");
    (role, pool)
}

pub async fn drop_role(db: &TestDb, role: &str) {
    for sql in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&db.pool)
            .await;
    }
}
