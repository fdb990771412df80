//! A PostgreSQL job backend for [apalis](https://docs.rs/apalis) 1.0 that keeps jobs in
//! [PGMQ](https://github.com/pgmq/pgmq) queues and wakes workers with LISTEN/NOTIFY.
//!
//! - **Interoperable**: a job is a PGMQ message. Push from Rust (apalis' `TaskSink`, or inside
//!   your own transaction), from SQL (`select pgmq.send('email', '{...}')`), or from any PGMQ
//!   client; inspect queues with `pgmq.metrics()`.
//! - **No busy polling**: an idle worker waits for a notification, a known visibility time
//!   (delayed job, backoff) or a long fallback poll. One LISTEN connection per process.
//! - **Durable outcomes**: `Done` → archive, `Killed` → delete, `Failed` → visible again after
//!   backoff, exhausted → dead-letter queue; written in batches, one statement per flush.
//! - **Leases**: a running job's visibility timeout is renewed, so a long job is never handed
//!   to a second worker while it runs; every write about a message is fenced by its `read_ct`.
//!
//! # Quick start
//!
//! ```no_run
//! use apalis::prelude::*;
//! use apalis_pgmq_notify::{PgmqStorage, QueueName, Runtime, setup};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! struct Email {
//!     to: String,
//! }
//!
//! async fn send_email(email: Email) -> Result<(), BoxDynError> {
//!     println!("sending to {}", email.to);
//!     Ok(())
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let pool = sqlx::PgPool::connect("postgres://localhost/app").await?;
//!     setup(&pool).await?; // installs PGMQ if absent, applies this crate's migrations
//!
//!     // One runtime per database: it owns this process's background work (the listener,
//!     // outcome writers, lease renewals, the worker registry).
//!     let runtime = Runtime::new(&pool);
//!     let mut storage = PgmqStorage::<Email>::new(&runtime, QueueName::new("email")?);
//!     storage.create_queue().await?;
//!     storage.push(Email { to: "a@example.com".into() }).await?;
//!
//!     Monitor::new()
//!         // Two workers (`index` 0 and 1); a worker that stops is restarted.
//!         .register_n(2, move |index, _restarts| {
//!             WorkerBuilder::new(format!("email-{index}"))
//!                 .backend(storage.clone())
//!                 .concurrency(8)
//!                 .build(send_email)
//!         })
//!         .run_with_signal(tokio::signal::ctrl_c())
//!         .await?;
//!     // Outcomes written, leases released, this process's rows removed, its tasks stopped.
//!     runtime.shutdown().await?;
//!     Ok(())
//! }
//! ```
//!
//! # Semantics
//!
//! - The task id is the message's `msg_id`, or the id the producer chose
//!   (`TaskBuilder::task_id`, kept in the headers); the attempt is PGMQ's `read_ct` (first delivery is
//!   attempt 1), or more when in-process retries (a tower retry layer) ran it again: a failed
//!   delivery records the runs reached in its headers, so `Attempt` never goes backwards and
//!   `max_attempts` counts every run. [`MessageInfo`] is available to handlers as
//!   `Data<MessageInfo>`.
//! - apalis metadata (max attempts, priority, idempotency key, `MetadataStore`) is kept in the
//!   message `headers` under the key [`HEADERS_KEY`] (`"apalis"`). A message with no headers (sent
//!   by another client) is a valid job if its body decodes.
//! - Priorities ([`Config::priorities`], off by default): higher `TaskBuilder::priority` first,
//!   one claim in [`FAIR_EVERY`] oldest-first whatever the priority (the starvation bound).
//! - Unique jobs: a task with an idempotency key is written only if no job with that key is
//!   pending, scheduled, running or retrying on the queue (a partial unique index decides, so
//!   concurrent pushes write one job); otherwise
//!   [`PgmqStorage::push_task_with`] returns the existing id with [`Pushed::duplicate`] set.
//!   [`Config::idempotency_window`] keeps a finished job's key taken for a while.
//! - Outcomes, as seen by the backend's ack layer (outside your middleware): see [`AckLayer`].
//!   A panicking handler counts as a failure. A message that does not decode goes to the
//!   dead-letter queue `<queue>_dlq` with the decode error; it never stops the worker.
//! - Delivery is at least once. Within a lease no message is handled by two workers at once: a
//!   worker that cannot renew a lease before it may lapse drops that job's future (the
//!   delivery ends with [`LeaseLost`], writing nothing).
//! - An outcome PostgreSQL refuses never blocks the others (it is dead-lettered with the
//!   reason); `RetryAfterError` and `DeferredError` use up attempts like any failure.
//! - Errors say what to do, one variant per thing a caller does about it (see [`Error`]):
//!   retry ([`Error::is_retryable`]: [`Error::Conflict`], [`Error::Unreachable`]), fix the
//!   connection settings ([`Error::ConnectionRejected`]), a setting ([`Error::Config`]), the
//!   data ([`Error::Codec`]), set the database up ([`Error::NotSetUp`], [`Error::QueueMissing`],
//!   [`Error::SchemaMismatch`]), grant a right ([`Error::MissingPrivilege`],
//!   [`Error::PermissionDenied`]). No message carries PostgreSQL's "at line N".
//! - Ids: a job's message id is an `i64` everywhere (PGMQ's `msg_id`); [`task_id`] gives the
//!   apalis `TaskId` that finds it.
//! - Order: a worker claims the messages visible longest first (by `vt`, from PGMQ's `vt`
//!   index up to `now()`): messages scheduled for later are never scanned.
//! - Claims adapt ([`Config::adaptive_claims`]): they grow from `fetch_batch_size` up to
//!   `max_fetch_batch_size` while the worker keeps up, halve when it is full with messages held,
//!   and while a backlog lasts and claims take 2 ms or more (a far database, large claims) up
//!   to four overlap, so the waits do not add up.
//! - Capacity: a worker learns its concurrency limit the first time it fills up. Running jobs,
//!   held messages and claims in flight then stay within it plus twice what the worker starts
//!   during one claim's round trip (at most four times the limit); a full worker releases held
//!   messages beyond that allowance (`vt = now`, `read_ct` given back).
//! - Shutdown: the worker stops fetching, lets in-flight jobs finish, releases claimed but
//!   unstarted messages and flushes pending outcomes.
//! - Results ([`Config::store_results`], off by default): each finished job's final status,
//!   attempt and output (JSON, so handler outputs must be `serde::Serialize`) or error is kept
//!   for [`Config::result_retention`], written with its outcome. [`PgmqStorage`] implements
//!   apalis' `WaitForCompletion`, and [`PgmqStorage::push_and_wait`] pushes a job and waits for
//!   its result (kept whatever the workers' setting). Waiters are woken by a notification, never
//!   by polling, and share the process's one listener.
//! - Workflows: sequential `apalis_workflow::SteppedFlow` and `GraphFlow` (with
//!   `store_results` on its workers: its fan-in waits with `WaitForCompletion`) run on this
//!   backend.
//!
//! # Configuration
//!
//! One [`Config`], grouped by what each setting governs (`leases`, `claims`, `wakeups`,
//! `retries`, `outcomes`, `pushes`, `retention`, `results`, `process`), built with
//! `Config::default()` and consuming setters or loaded from a file that is the same struct, as
//! TOML or JSON ([`Config::load`]), with durations written `"30s"`, `"7d"`
//! ([`HumanDuration`]). Unknown keys and values out of range are refused with their key.
//!
//! # Wake-ups and events
//!
//! Workers install a trigger on their queue and LISTEN on `<prefix>q.<queue>` through their
//! runtime's one listener; see [`NotifyChannels`]. By default ([`NotifyMode::OnDemand`]) a
//! producer's commit notifies only when an idle worker has armed a wake-up, each producer
//! session at most once per arming and one transaction at a time, and calls nothing while
//! nobody listens: PostgreSQL serialises notifying commits, so busy producers should not pay
//! for wake-ups nobody waits for. Producers never wait on this bookkeeping and need no rights
//! beyond PGMQ's; the protocol, its bound, and why no committed job is left behind are
//! documented in `src/notify/wakeup.rs`.
//! Queues created elsewhere get the trigger with [`enable_notify`] or the CLI's `enable-notify`.
//! [`QueueEvents`] streams typed [`QueueEvent`]s to applications.
//!
//! # Seeing and operating queues
//!
//! [`PgmqStorage`] implements apalis' introspection traits (`ListQueues`, `ListTasks`,
//! `Metrics`, `FetchById`, ...), so apalis-board works with it; workers register themselves in
//! a worker registry. [`queues_overview`], [`pause`]/[`resume`], [`prune`] and the
//! `apalis-pgmq-notify` CLI operate queues; archived jobs and dead letters are pruned after
//! [`Config::archive_retention`] and [`Config::dead_letter_retention`]. Each job runs in a
//! `tracing` span; the `metrics` feature exports counters, histograms and gauges.
//!
//! # Metrics
//!
//! With the `metrics` feature, through the [`metrics`](https://crates.io/crates/metrics) facade
//! (install any recorder, Prometheus, StatsD, ..., before making a [`Runtime`]: it describes
//! every metric, the `# HELP` text and unit, when it is made):
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `apalis_pgmq_jobs_enqueued_total` | counter | `queue` | jobs inserted by this process's pushes (`PgmqStorage`, `PgmqQueue::send*`; a push in a transaction that later rolls back is counted; duplicates of a key are not) |
//! | `apalis_pgmq_jobs_claimed_total` | counter | `queue` | messages claimed by workers |
//! | `apalis_pgmq_jobs_done_total` | counter | `queue` | handlers that returned `Ok` |
//! | `apalis_pgmq_jobs_retried_total` | counter | `queue` | failed runs scheduled to run again |
//! | `apalis_pgmq_jobs_dead_lettered_total` | counter | `queue`, `reason` | dead letters written, by reason: `failed` (attempts used up), `undecodable`, `outcome_unwritable`, `killed` |
//! | `apalis_pgmq_jobs_killed_total` | counter | `queue` | handlers that returned `AbortError` |
//! | `apalis_pgmq_jobs_released_total` | counter | `queue` | claimed messages handed back unstarted |
//! | `apalis_pgmq_lease_renewals_total` | counter | `queue` | leases renewed |
//! | `apalis_pgmq_lease_renewal_failures_total` | counter | `queue` | renewal statements that failed |
//! | `apalis_pgmq_leases_lost_total` | counter | `queue` | running jobs stopped because their lease was lost |
//! | `apalis_pgmq_notifications_received_total` | counter | – | notifications on the LISTEN connection |
//! | `apalis_pgmq_listener_reconnects_total` | counter | – | LISTEN connections re-established |
//! | `apalis_pgmq_pickup_latency_seconds` | histogram | `queue` | from visible to handler start |
//! | `apalis_pgmq_job_duration_seconds` | histogram | `queue` | handler run time |
//! | `apalis_pgmq_queue_jobs` | gauge | `queue`, `state` | jobs by state, sampled by one process per queue on each heartbeat |
//! | `apalis_pgmq_oldest_snapshot_seconds` | gauge | – | how long the oldest transaction holding back vacuum of the database has been open (0: none, or its start is unknown) |
//! | `apalis_pgmq_oldest_snapshot_xids` | gauge | – | how many transactions ago that oldest snapshot was taken (`age(xmin)`) |
//!
//! Jobs pushed by other PGMQ clients (SQL, Python, ...) are not in the enqueue counter; the
//! `apalis_pgmq_queue_jobs` gauge counts them.
//!
//! Every metric above labelled `queue`, except the `apalis_pgmq_queue_jobs` gauge, also
//! carries `kind`: empty (Prometheus treats it as absent) unless the storage sets one with
//! [`Config::metrics_kind`] (`metrics.kind` in a configuration file), a name for the jobs of
//! that storage (for dashboards that group by job type). It is the label of the storage that
//! claims, pushes or finishes the job, not of the message itself: an undecodable message sent
//! by SQL is counted with the consuming storage's kind.
//!
//! # Production topologies
//!
//! PgBouncer in session mode works as is; a pooler in transaction mode is refused at start
//! with [`Error::TransactionPooler`] ([`check_session_pooling`]), and the listener can have a
//! direct connection of its own ([`Runtime::listener_connect_options`]). On a read replica
//! reads work (the overview, the board's API, [`sample_queue_gauges`]) and writes fail with
//! [`Error::ReadOnly`] ([`check_writable`]). [`MultiHost`] parses multi-host connection
//! strings with `target_session_attrs`, builds a pool on the host that fits, and
//! [`Runtime::hosts`] keeps the pool and the listener on it across failovers. A claim whose
//! answer a failover (or a cut connection) took is logged with its jobs in
//! `apalis_pgmq.claim_log`, in the claim's own statement, and the worker gives those jobs back
//! on its next connection instead of leaving them leased for the visibility timeout
//! ([`Config::recover_lost_claims`], on by default; README, "Semantics").
//!
//! # Old snapshots
//!
//! A transaction held open anywhere in the database (a forgotten `BEGIN`, `pg_dump`, a
//! replication slot) keeps vacuum from removing the row versions claims and outcomes leave:
//! the queue tables grow and claims slow down while it stays. A process running workers looks
//! on every heartbeat round and logs a `WARN` naming each holder older than a minute (kind,
//! pid, age, `application_name`, query), at most every five minutes per holder;
//! [`snapshot_holders`] lists them on demand. Claims read the `vt` index from the claim
//! floor, a lower bound on every visible job's `vt` learned from earlier claims, so they do not
//! step over every dead entry since the snapshot began (`claims.floor_sweep`,
//! [`Config::claim_floor_sweep`]). The statements of the lease protocol never depend on the
//! queue table's statistics (one index probe per row, whatever `ANALYZE` last saw). See the
//! README, "Old snapshots".
//!
//! # The queue layer
//!
//! [`PgmqQueue`] wraps one PGMQ queue for direct use: send, read, archive, metrics, … Every
//! write takes any executor, so it can run in your own transaction.
//!
//! # Features
//!
//! - `install-pgmq` (default): [`setup`] installs PGMQ's SQL API where PGMQ is absent, from the
//!   SQL embedded in the `pgmq` crate. Without it, install PGMQ first (the extension, or its SQL
//!   install); `setup` then fails with [`Error::PgmqInstall`] where PGMQ is missing.
//! - `cli` (default): the `apalis-pgmq-notify` command.
//! - `metrics`: counters, histograms and gauges through the `metrics` facade.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod ack;
mod backend;
mod config;
mod deadline;
mod error;
mod horizon;
mod lease;
mod migrate;
mod notify;
mod obs;
mod ops;
mod queue;
mod runtime;
mod sql;
mod sql_check;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
mod topology;
mod util;

pub use ack::{AckLayer, AckService, HandlerPanicked, LeaseLost};
pub use backend::{FAIR_EVERY, PgmqStorage, drop_queue_and_dead_letters, running_workers};
pub use config::{
    Backoff, ClaimConfig, Config, DoneAction, ExhaustedAction, KilledAction, LeaseConfig,
    MetricsConfig, OutcomeConfig, ProcessConfig, PushConfig, ResultConfig, RetentionConfig,
    RetryConfig, WakeupConfig, human::HumanDuration,
};
pub use error::{BoxDynError, Error, QueueNameError, Result};
pub use horizon::{SnapshotHolder, SnapshotHolders, snapshot_holders};
pub use migrate::{
    MIN_PGMQ_VERSION, MigrationStatus, PendingMigration, PgmqSource, SCHEMA, SetupReport,
    migration_status, migrations_sql, pending_migrations, pgmq_installed, setup,
};
pub use notify::{
    DEFAULT_MESSAGE_PAYLOAD_BYTES, DEFAULT_NAMESPACE, DEFAULT_NAMESPACE_PATTERN, ListenerStats,
    MAX_CHANNEL_LEN, MAX_PREFIX_LEN, NotifyChannels, NotifyMode, QueueEvent, disable_notify,
    enable_created_notify, enable_notify, notify_migration_sql, notify_mode,
};
pub use ops::{
    Pruned, QueueOverview, pause, paused_queues, prune, prune_results, queues_overview, resume,
    sample_queue_gauges,
};
pub use queue::{
    DEAD_LETTER_SUFFIX, DEFAULT_MAX_PAYLOAD_BYTES, Delay, HEADERS_KEY, JobRecord, JobState,
    MAX_QUEUE_NAME_LEN, Message, MessageInfo, NewMessage, PgmqQueue, Pushed, QueueCounts,
    QueueInfo, QueueMetrics, QueueName, list_queues, metrics_all, msg_id, task_id,
};
pub use runtime::{
    DEFAULT_SHUTDOWN_GRACE, Runtime,
    events::{EventStream, QueueEvents},
};
pub use sql_check::prepare_every_statement;
pub use topology::{MultiHost, TargetSessionAttrs, check_session_pooling, check_writable};
