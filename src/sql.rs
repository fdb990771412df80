//! Every fixed statement this crate issues, each written once. Statements on a queue's own
//! tables are built per queue in `src/queue/` ([`PgmqQueue::statements`]
//! (crate::PgmqQueue)); [`prepare_every_statement`](crate::prepare_every_statement) prepares both
//! kinds against a database, so a typo or a missing function fails a test, not a worker.

/// Used in `src/migrate.rs`.
pub(crate) const ADVISORY_LOCK: &str = "SELECT pg_advisory_lock($1)";

/// Used in `src/migrate.rs`.
pub(crate) const ADVISORY_UNLOCK: &str = "SELECT pg_advisory_unlock($1)";

/// Used in `src/migrate.rs`.
pub(crate) const PGMQ_PRESENT: &str = "SELECT to_regclass('pgmq.meta') IS NOT NULL";

/// Used in `src/migrate.rs`.
pub(crate) const PGMQ_EXTENSION_VERSION: &str =
    "SELECT extversion FROM pg_extension WHERE extname = 'pgmq'";

/// Used in `src/migrate.rs`.
pub(crate) const PGMQ_MIGRATIONS_PRESENT: &str =
    "SELECT to_regclass('pgmq.__pgmq_migrations') IS NOT NULL";

/// Used in `src/migrate.rs`.
pub(crate) const PGMQ_MIGRATIONS: &str = "SELECT version FROM pgmq.__pgmq_migrations";

/// Used in `src/migrate.rs`.
pub(crate) const PGMQ_HAS_HEADERS_AND_LAST_READ: &str = "SELECT EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_type t ON a.attrelid = t.typrelid \
         WHERE t.typname = 'message_record' AND t.typnamespace = to_regnamespace('pgmq') \
           AND a.attname = 'last_read_at' AND NOT a.attisdropped)";

/// Used in `src/migrate.rs`.
pub(crate) const APPLIED_MIGRATIONS: &str =
    "SELECT version, name, checksum FROM apalis_pgmq.schema_migrations ORDER BY version";

/// Used in `src/migrate.rs`: drops the rows of a migration history the baseline replaced.
pub(crate) const FORGET_MIGRATIONS: &str =
    "DELETE FROM apalis_pgmq.schema_migrations WHERE version = ANY($1)";

/// Used in `src/migrate.rs`.
pub(crate) const RECORD_MIGRATION: &str =
    "INSERT INTO apalis_pgmq.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)";

/// Used in `src/notify/mod.rs`.
pub(crate) const WANT_NOTIFY: &str = "SELECT apalis_pgmq.want_notify($1, $2, $3, $4)";

/// Used in `src/notify/mod.rs`.
pub(crate) const UNWANT_NOTIFY: &str = "SELECT apalis_pgmq.unwant_notify($1, $2)";

/// Used in `src/notify/triggers.rs`.
pub(crate) const ENABLE_NOTIFY: &str = "SELECT apalis_pgmq.enable_notify($1, $2, $3, $4, $5)";

/// Used in `src/notify/triggers.rs`.
pub(crate) const DISABLE_NOTIFY: &str = "SELECT apalis_pgmq.disable_notify($1)";

/// Used in `src/notify/triggers.rs`.
pub(crate) const NOTIFY_TRIGGER: &str = "SELECT mode, args FROM apalis_pgmq.notify_trigger($1)";

/// Used in `src/notify/triggers.rs`.
pub(crate) const ENABLE_CREATED_NOTIFY: &str = "SELECT apalis_pgmq.enable_created_notify($1)";

/// Used in `src/notify/wakeup.rs`.
pub(crate) const ARM: &str = "SELECT apalis_pgmq.arm($1, $2, $3, $4)";

/// Used in `src/notify/wakeup.rs`.
pub(crate) const DISARM: &str = "SELECT apalis_pgmq.disarm($1, $2, $3)";

/// Used in `src/notify/wakeup.rs`.
pub(crate) const INSERTS_SETTLED: &str = "SELECT apalis_pgmq.inserts_settled($1)";

/// Used in `src/notify/wakeup.rs`.
pub(crate) const WAKE_OTHERS: &str = "SELECT apalis_pgmq.wake_others($1, $2, $3, $4, $5)";

/// Used in `src/queue/mod.rs`.
pub(crate) const CREATE_QUEUE: &str = "SELECT pgmq.create($1)";

/// Used in `src/queue/mod.rs`.
pub(crate) const CREATE_UNLOGGED_QUEUE: &str = "SELECT pgmq.create_unlogged($1)";

/// Used in `src/queue/mod.rs`.
pub(crate) const DROP_QUEUE: &str = "SELECT pgmq.drop_queue($1)";

/// Used in `src/queue/mod.rs`.
pub(crate) const PURGE_QUEUE: &str = "SELECT pgmq.purge_queue($1)";

/// Used in `src/queue/mod.rs`.
pub(crate) const QUEUE_EXISTS: &str =
    "SELECT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = $1)";

/// Used in `src/queue/mod.rs`.
pub(crate) const QUEUE_METRICS: &str = "SELECT queue_name::text, queue_length, newest_msg_age_sec, oldest_msg_age_sec, \
                    total_messages, scrape_time, queue_visible_length \
             FROM pgmq.metrics($1)";

/// Used in `src/queue/mod.rs`.
pub(crate) const MISSING_WORKER_RIGHT: &str = "SELECT t.i, current_user::text \
             FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS t(o, r, k, i) \
             WHERE NOT CASE WHEN t.k = 'SCHEMA' THEN has_schema_privilege(t.o, t.r) \
                            ELSE has_table_privilege(t.o, t.r) END \
             ORDER BY t.i LIMIT 1";

/// Used in `src/queue/mod.rs`.
pub(crate) const LIST_QUEUES: &str = "SELECT queue_name::text, is_partitioned, is_unlogged, created_at \
         FROM pgmq.list_queues() ORDER BY queue_name";

/// Used in `src/queue/mod.rs`.
pub(crate) const ALL_QUEUE_METRICS: &str = "SELECT queue_name::text, queue_length, newest_msg_age_sec, oldest_msg_age_sec, \
                total_messages, scrape_time, queue_visible_length \
         FROM pgmq.metrics_all() ORDER BY queue_name";

/// Used in `src/queue/mod.rs`.
pub(crate) const INDEX_DEAD_LETTERS: &str = "SELECT apalis_pgmq.index_dead_letters($1)";

/// Used in `src/queue/mod.rs`.
pub(crate) const INDEX_UNIQUE_KEYS: &str = "SELECT apalis_pgmq.index_unique_keys($1)";

/// Used in `src/queue/mod.rs`.
pub(crate) const INDEX_PRIORITIES: &str = "SELECT apalis_pgmq.index_priorities($1)";

/// The most rows one [`PRUNE_CLAIM_LOG`] deletes.
pub(crate) const PRUNE_CLAIM_LOG_BATCH: i64 = 5000;

/// Deletes up to [`PRUNE_CLAIM_LOG_BATCH`] rows of the claim log whose lease has ended, from
/// its `until` index; one worker of the database at a time (a transaction-level advisory lock
/// tried, not waited for: another worker is pruning), which needs no right beyond `SELECT,
/// DELETE` (used in `src/backend/fetch.rs`); how many were deleted (-1: another worker prunes).
pub(crate) const PRUNE_CLAIM_LOG: &str = "WITH turn AS MATERIALIZED \
       (SELECT pg_try_advisory_xact_lock(hashtext('apalis_pgmq.claim_log')) AS mine), \
     gone AS (DELETE FROM apalis_pgmq.claim_log \
       WHERE (SELECT mine FROM turn) \
         AND ctid = ANY(ARRAY(SELECT ctid FROM apalis_pgmq.claim_log WHERE until < now() \
                              ORDER BY until LIMIT 5000)) RETURNING 1) \
     SELECT CASE WHEN (SELECT mine FROM turn) THEN (SELECT count(*) FROM gone) ELSE -1 END";

/// Used in `src/notify/registry.rs`.
pub(crate) const HEARTBEAT: &str =
    "SELECT apalis_pgmq.heartbeat($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// Used in `src/notify/registry.rs`.
pub(crate) const UNREGISTER_WORKER: &str = "DELETE FROM apalis_pgmq.workers WHERE id = $1";

/// Every worker row of one runtime (`$1`, its owner): the runtime stops.
pub(crate) const FORGET_WORKER_OWNER: &str = "DELETE FROM apalis_pgmq.workers WHERE owner = $1";

/// Every listener row of one runtime (`$1`) and of its event subscriptions (`<owner>.ev<n>`).
pub(crate) const FORGET_LISTENER_OWNER: &str =
    "DELETE FROM apalis_pgmq.listeners WHERE owner = $1 OR starts_with(owner, $1 || '.')";

/// Used in `src/backend/expose.rs`.
pub(crate) const LIST_WORKERS: &str = "SELECT name, queue, service, \
        extract(epoch FROM started_at)::bigint, extract(epoch FROM last_heartbeat)::bigint, \
        host, pid, concurrency, in_flight \
     FROM apalis_pgmq.workers \
     WHERE expires_at > clock_timestamp() AND ($1::text IS NULL OR queue = $1) \
     ORDER BY queue, name";

/// Used in `src/queue/inspect.rs`: one process at a time samples a queue's gauges.
pub(crate) const TRY_SAMPLE_LOCK: &str =
    "SELECT pg_try_advisory_xact_lock(hashtext('apalis_pgmq.sample'), hashtext($1))";

/// Used in `src/notify/registry.rs`: one process at a time maintains a queue's partitions
/// (a session lock: the maintenance commits as it goes).
pub(crate) const TRY_MAINTAIN_LOCK: &str =
    "SELECT pg_try_advisory_lock(hashtext('apalis_pgmq.partman'), hashtext($1))";

/// Used in `src/notify/registry.rs`.
pub(crate) const MAINTAIN_UNLOCK: &str =
    "SELECT pg_advisory_unlock(hashtext('apalis_pgmq.partman'), hashtext($1))";

/// Used in `src/ops.rs`.
/// NULL when the queue does not exist (nothing written).
pub(crate) const PAUSE: &str = "SELECT CASE WHEN EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = $1) \
         THEN apalis_pgmq.pause($1) END";

/// Used in `src/ops.rs`.
/// NULL when the queue does not exist and is not paused (a paused queue dropped since can still
/// be resumed, so no row is left behind).
pub(crate) const RESUME: &str = "SELECT CASE WHEN EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = $1) \
              OR EXISTS (SELECT 1 FROM apalis_pgmq.paused WHERE queue = $1) \
         THEN apalis_pgmq.resume($1, $2, $3) END";

/// Used in `src/ops.rs` and `src/runtime/maintenance.rs`: keys whose hold ended (migration
/// 0003's ledger).
/// One batch of at most `$2` rows; rows a push holds are skipped, never waited for.
pub(crate) const PRUNE_KEYS: &str = "WITH old AS (SELECT key_hash FROM apalis_pgmq.job_keys \
                      WHERE queue = $1 AND held_until < clock_timestamp() \
                      LIMIT $2 FOR UPDATE SKIP LOCKED), \
              gone AS (DELETE FROM apalis_pgmq.job_keys j USING old \
                       WHERE j.queue = $1 AND j.key_hash = old.key_hash RETURNING 1) \
         SELECT count(*) FROM gone";

/// Used in `src/backend/mod.rs`: a dropped queue's keys.
pub(crate) const DROP_KEYS: &str = "DELETE FROM apalis_pgmq.job_keys WHERE queue = $1";

/// Used in `src/ops.rs`.
pub(crate) const PAUSED_QUEUES: &str = "SELECT queue FROM apalis_pgmq.paused ORDER BY queue";

/// Used in `src/migrate.rs`.
pub(crate) const MIGRATIONS_TABLE_PRESENT: &str =
    "SELECT to_regclass('apalis_pgmq.schema_migrations') IS NOT NULL";

/// Used in `src/queue/mod.rs`: whether pg_partman is installable, and created.
pub(crate) const PARTMAN_STATUS: &str = "SELECT \
       EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_partman'), \
       EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_partman')";

/// Used in `src/queue/mod.rs`.
pub(crate) const CREATE_PARTMAN: &str =
    "CREATE SCHEMA IF NOT EXISTS partman; CREATE EXTENSION IF NOT EXISTS pg_partman SCHEMA partman";

/// Used in `src/queue/mod.rs`.
pub(crate) const CREATE_PARTITIONED_QUEUE: &str = "SELECT pgmq.create_partitioned($1, $2, $3)";

/// Used in `src/queue/mod.rs`.
pub(crate) const QUEUE_IS_PARTITIONED: &str =
    "SELECT is_partitioned FROM pgmq.meta WHERE queue_name = $1";

/// Used in `src/queue/mod.rs`: pg_partman's maintenance of one parent table (its schema found
/// as PGMQ finds it).
pub(crate) const RUN_PARTMAN_MAINTENANCE: &str = "SELECT apalis_pgmq.run_partman_maintenance($1)";

/// Used in `src/queue/mod.rs`.
pub(crate) const COUNT_PARTITIONS: &str =
    "SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass($1)";

/// Used in `src/notify/wakeup.rs`.
pub(crate) const LISTENERS_CHANGED: &str = "SELECT apalis_pgmq.listeners_changed()";

/// Used in `src/notify/results.rs`: the stored results of a queue's jobs, by the producer's job
/// id (`$2`, found through the hash index, then compared) or message id (`$3`), newest first (a
/// replayed job has one per run).
pub(crate) const FIND_RESULTS: &str = "SELECT coalesce(job_id, msg_id::text), msg_id, status, attempt, result::text, error \
     FROM apalis_pgmq.results \
     WHERE queue = $1 \
       AND (msg_id = ANY($3::bigint[]) \
            OR (job_id IS NOT NULL \
                AND apalis_pgmq.key_hash(job_id) = ANY(ARRAY(SELECT apalis_pgmq.key_hash(k) FROM unnest($2::text[]) k)) \
                AND job_id = ANY($2::text[]))) \
     ORDER BY finished_at DESC";

/// Used in `src/ops.rs`: one batch (`$3` rows) of a queue's results finished more than `$2`
/// seconds ago, while holding the queue's result-pruning lock (`$4`: take it; else prune
/// unconditionally).
pub(crate) const PRUNE_RESULTS: &str = "WITH old AS (SELECT msg_id FROM apalis_pgmq.results \
       WHERE queue = $1 \
         AND (NOT $4 OR (SELECT pg_try_advisory_xact_lock(hashtext('apalis_pgmq.prune_results'), hashtext($1)))) \
         AND finished_at < clock_timestamp() - make_interval(secs => $2::float8) \
       LIMIT $3), \
     gone AS (DELETE FROM apalis_pgmq.results r USING old WHERE r.queue = $1 AND r.msg_id = old.msg_id RETURNING 1) \
     SELECT count(*) FROM gone";

/// The fixed statements, by name.
pub(crate) const ALL: &[(&str, &str)] = &[
    ("find_results", FIND_RESULTS),
    ("prune_results", PRUNE_RESULTS),
    ("listeners_changed", LISTENERS_CHANGED),
    ("partman_status", PARTMAN_STATUS),
    ("queue_is_partitioned", QUEUE_IS_PARTITIONED),
    ("count_partitions", COUNT_PARTITIONS),
    ("migrations_table_present", MIGRATIONS_TABLE_PRESENT),
    ("try_sample_lock", TRY_SAMPLE_LOCK),
    ("try_maintain_lock", TRY_MAINTAIN_LOCK),
    ("maintain_unlock", MAINTAIN_UNLOCK),
    ("pause", PAUSE),
    ("resume", RESUME),
    ("paused_queues", PAUSED_QUEUES),
    ("prune_keys", PRUNE_KEYS),
    ("drop_keys", DROP_KEYS),
    ("index_dead_letters", INDEX_DEAD_LETTERS),
    ("index_unique_keys", INDEX_UNIQUE_KEYS),
    ("index_priorities", INDEX_PRIORITIES),
    ("heartbeat", HEARTBEAT),
    ("unregister_worker", UNREGISTER_WORKER),
    ("forget_worker_owner", FORGET_WORKER_OWNER),
    ("forget_listener_owner", FORGET_LISTENER_OWNER),
    ("list_workers", LIST_WORKERS),
    ("advisory_lock", ADVISORY_LOCK),
    ("advisory_unlock", ADVISORY_UNLOCK),
    ("pgmq_present", PGMQ_PRESENT),
    ("pgmq_extension_version", PGMQ_EXTENSION_VERSION),
    ("pgmq_migrations_present", PGMQ_MIGRATIONS_PRESENT),
    ("pgmq_migrations", PGMQ_MIGRATIONS),
    (
        "pgmq_has_headers_and_last_read",
        PGMQ_HAS_HEADERS_AND_LAST_READ,
    ),
    ("applied_migrations", APPLIED_MIGRATIONS),
    ("record_migration", RECORD_MIGRATION),
    ("forget_migrations", FORGET_MIGRATIONS),
    ("want_notify", WANT_NOTIFY),
    ("unwant_notify", UNWANT_NOTIFY),
    ("enable_notify", ENABLE_NOTIFY),
    ("disable_notify", DISABLE_NOTIFY),
    ("notify_trigger", NOTIFY_TRIGGER),
    ("enable_created_notify", ENABLE_CREATED_NOTIFY),
    ("arm", ARM),
    ("disarm", DISARM),
    ("inserts_settled", INSERTS_SETTLED),
    ("wake_others", WAKE_OTHERS),
    ("create_queue", CREATE_QUEUE),
    ("create_unlogged_queue", CREATE_UNLOGGED_QUEUE),
    ("drop_queue", DROP_QUEUE),
    ("purge_queue", PURGE_QUEUE),
    ("queue_exists", QUEUE_EXISTS),
    ("queue_metrics", QUEUE_METRICS),
    ("missing_worker_right", MISSING_WORKER_RIGHT),
    ("list_queues", LIST_QUEUES),
    ("all_queue_metrics", ALL_QUEUE_METRICS),
];

#[cfg(test)]
mod tests {
    #[test]
    fn the_claim_log_prune_deletes_batches_of_the_size_its_caller_counts() {
        assert!(
            super::PRUNE_CLAIM_LOG.contains(&format!("LIMIT {})", super::PRUNE_CLAIM_LOG_BATCH))
        );
    }
}
