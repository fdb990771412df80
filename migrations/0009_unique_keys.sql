-- apalis-pgmq-notify: unique jobs. A job's idempotency key (headers.apalis.idempotency_key) is
-- unique per queue while the job is in the queue table: pending, scheduled, running or waiting
-- for a retry. A partial unique index enforces it for every producer (this crate's pushes skip a
-- taken key and return the existing job; a plain pgmq.send with a taken key fails with
-- unique_violation). The archive gets a plain index on the key and archived_at, so a push can
-- also refuse a key whose job finished within a window. Partitioned queues cannot have a unique
-- index that leaves out the partition key: they get neither index.
--
-- The indexes hold a SHA-256 of the key, not the key: a btree entry holds at most ~2.7 kB, and
-- a longer key (any producer's, hostile or not) must not make its insert fail.
CREATE OR REPLACE FUNCTION apalis_pgmq.key_hash(key text)
RETURNS bytea
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
AS $$ SELECT sha256(convert_to(key, 'UTF8')) $$;

CREATE OR REPLACE FUNCTION apalis_pgmq.index_unique_keys(queue_name text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  q text := 'q_' || queue_name;
  a text := 'a_' || queue_name;
BEGIN
  PERFORM apalis_pgmq.check_queue_name(queue_name);
  IF to_regclass(format('pgmq.%I', q)) IS NULL THEN
    RETURN false;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = format('pgmq.%I', q)::regclass) THEN
    RETURN false;
  END IF;
  IF to_regclass(format('pgmq.%I', q || '_key_idx')) IS NULL THEN
    EXECUTE format(
      'CREATE UNIQUE INDEX IF NOT EXISTS %I ON pgmq.%I (apalis_pgmq.key_hash(headers->''apalis''->>''idempotency_key'')) '
      'WHERE (headers->''apalis''->>''idempotency_key'') IS NOT NULL',
      q || '_key_idx', q);
  END IF;
  IF to_regclass(format('pgmq.%I', a)) IS NOT NULL
     AND to_regclass(format('pgmq.%I', a || '_key_idx')) IS NULL THEN
    EXECUTE format(
      'CREATE INDEX IF NOT EXISTS %I ON pgmq.%I (apalis_pgmq.key_hash(headers->''apalis''->>''idempotency_key''), archived_at) '
      'WHERE (headers->''apalis''->>''idempotency_key'') IS NOT NULL',
      a || '_key_idx', a);
  END IF;
  RETURN true;
END
$$;
