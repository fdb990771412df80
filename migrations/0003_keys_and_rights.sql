-- apalis-pgmq-notify: producers with PGMQ's rights only, and job keys that stay taken for their
-- whole window.
--
-- 1. Rights. The per-queue indexes evaluate their expressions as the inserting role: a producer
--    needed EXECUTE on apalis_pgmq.key_hash and apalis_pgmq.priority_of, so after
--    REVOKE EXECUTE ... FROM PUBLIC every send into a keyed or priority queue failed. The
--    indexes are now over built-in immutable expressions with the same values: the key's
--    SHA-256 over its bytes (`replace(k, '\', '\\')::bytea` is the text's bytes, since every
--    backslash is escaped), and the clamped priority written out. The queries that read the
--    indexes use the same expressions (src/queue/statements.rs).
--
-- 2. Keys. A key was taken while a job with it was in the queue table (the unique index) or
--    archived within the pusher's window (a look at the archive). A push racing the archive of
--    the previous job could see neither: its snapshot predates the archive's commit, and the
--    queue row it waits on is deleted by then. Keys now live in apalis_pgmq.job_keys, one row
--    per (queue, key hash): held ('infinity') while its job is in the queue table, then until
--    its window after the job is archived, free at once if the job is deleted or dead-lettered.
--    A BEFORE INSERT trigger on the queue table takes the key in the insert's own statement
--    (INSERT ... ON CONFLICT DO UPDATE ... WHERE free: a concurrent holder is waited for and
--    its committed row decides), for every producer, plain pgmq.send included: a taken key is
--    refused with unique_violation. Triggers on the queue table (delete) and the archive
--    (insert) move the hold. The window is the job's headers.apalis.idempotency_window
--    (seconds; PgmqStorage writes Config::idempotency_window there); none is 0. The trigger
--    functions are SECURITY DEFINER with a fixed search_path, so producers need no right on
--    the table or this schema's functions.

---------------------------------------------------------------------------------------------
-- 1. Indexes over built-in expressions
---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION apalis_pgmq.index_priorities(queue_name text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  q text := 'q_' || queue_name;
BEGIN
  PERFORM apalis_pgmq.check_queue_name(queue_name);
  IF to_regclass(format('pgmq.%I', q)) IS NULL THEN
    RETURN false;
  END IF;
  IF to_regclass(format('pgmq.%I', q || '_prio_idx')) IS NULL THEN
    EXECUTE format(
      'CREATE INDEX IF NOT EXISTS %I ON pgmq.%I ((CASE WHEN jsonb_typeof(headers->''apalis''->''priority'') = ''number'' '
      'THEN least(greatest((headers->''apalis''->>''priority'')::numeric, -1000000), 1000000)::integer ELSE 0 END) DESC, vt)',
      q || '_prio_idx', q);
  END IF;
  RETURN true;
END
$$;

---------------------------------------------------------------------------------------------
-- 2. The key ledger
---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS apalis_pgmq.job_keys (
  queue       text        NOT NULL,
  key_hash    bytea       NOT NULL,
  -- The job holding the key (its msg_id in the queue table, then in the archive).
  msg_id      bigint      NOT NULL,
  -- 'infinity' while the job is in the queue table; then the end of its window.
  held_until  timestamptz NOT NULL,
  window_secs float8      NOT NULL DEFAULT 0,
  PRIMARY KEY (queue, key_hash)
);
CREATE INDEX IF NOT EXISTS job_keys_expiry_idx ON apalis_pgmq.job_keys (queue, held_until)
  WHERE held_until < 'infinity';
REVOKE ALL ON apalis_pgmq.job_keys FROM PUBLIC;

-- Whether the job `id` is still in the queue table (a hold of 'infinity' whose job is gone, as
-- after pgmq.purge_queue or a dropped and recreated queue, is free).
CREATE OR REPLACE FUNCTION apalis_pgmq.key_holder_live(queue_name text, id bigint)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  live boolean;
BEGIN
  IF to_regclass(format('pgmq.%I', 'q_' || queue_name)) IS NULL THEN
    RETURN false;
  END IF;
  EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgmq.%I WHERE msg_id = $1)', 'q_' || queue_name)
    INTO live USING id;
  RETURN live;
END
$$;

-- The job holding `key_hash` on `queue_name` now, if any (for a push told its key is taken).
CREATE OR REPLACE FUNCTION apalis_pgmq.key_holder(queue_name text, key_hash bytea)
RETURNS bigint
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT j.msg_id FROM apalis_pgmq.job_keys j
   WHERE j.queue = queue_name AND j.key_hash = key_holder.key_hash
     AND (j.held_until > clock_timestamp() AND j.held_until < 'infinity'
          OR j.held_until = 'infinity' AND apalis_pgmq.key_holder_live(queue_name, j.msg_id))
$$;

-- BEFORE INSERT on a keyed queue's table (TG_ARGV[0]: the queue): takes the key, or refuses the
-- row. A push of this crate sets apalis_pgmq.skip_key to the key's hash (hex) for its own
-- statement: its row is then skipped instead (the push reports the holder).
CREATE OR REPLACE FUNCTION apalis_pgmq.key_reserve()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  k text := NEW.headers->'apalis'->>'idempotency_key';
  h bytea := sha256(replace(NEW.headers->'apalis'->>'idempotency_key', '\', '\\')::bytea);
  w float8 := CASE WHEN jsonb_typeof(NEW.headers->'apalis'->'idempotency_window') = 'number'
                   THEN least(greatest((NEW.headers->'apalis'->>'idempotency_window')::numeric, 0), 1e11)::float8
                   ELSE 0 END;
  taken boolean;
BEGIN
  INSERT INTO apalis_pgmq.job_keys AS j (queue, key_hash, msg_id, held_until, window_secs)
  VALUES (TG_ARGV[0], h, NEW.msg_id, 'infinity', w)
  ON CONFLICT (queue, key_hash) DO UPDATE
    SET msg_id = EXCLUDED.msg_id, held_until = 'infinity', window_secs = EXCLUDED.window_secs
    WHERE j.held_until <= clock_timestamp()
       OR (j.held_until = 'infinity' AND NOT apalis_pgmq.key_holder_live(TG_ARGV[0], j.msg_id))
  RETURNING false INTO taken;
  IF taken IS NULL THEN
    IF current_setting('apalis_pgmq.skip_key', true) = encode(h, 'hex') THEN
      RETURN NULL;
    END IF;
    RAISE EXCEPTION 'idempotency key % of queue % is taken: a job with it is queued, or finished within its idempotency window', k, TG_ARGV[0]
      USING ERRCODE = 'unique_violation', CONSTRAINT = 'q_' || TG_ARGV[0] || '_key_idx';
  END IF;
  RETURN NEW;
END
$$;

-- AFTER DELETE on the queue table and AFTER INSERT on the archive (TG_ARGV[0]: the queue): a
-- job that left the queue table frees its key, unless it was archived, which holds the key for
-- its window from now. Whatever the order of the two events, the archive's hold wins.
CREATE OR REPLACE FUNCTION apalis_pgmq.key_release()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    UPDATE apalis_pgmq.job_keys
       SET held_until = clock_timestamp()
     WHERE queue = TG_ARGV[0]
       AND key_hash = sha256(replace(OLD.headers->'apalis'->>'idempotency_key', '\', '\\')::bytea)
       AND msg_id = OLD.msg_id AND held_until = 'infinity';
    RETURN OLD;
  END IF;
  UPDATE apalis_pgmq.job_keys
     SET held_until = clock_timestamp() + make_interval(secs => window_secs)
   WHERE queue = TG_ARGV[0]
     AND key_hash = sha256(replace(NEW.headers->'apalis'->>'idempotency_key', '\', '\\')::bytea)
     AND msg_id = NEW.msg_id;
  RETURN NEW;
END
$$;

-- Unique jobs: the key ledger's triggers, the partial unique index on the queue table and the
-- archive's index on the key and archived_at (for keys archived before the ledger existed).
-- Partitioned queues get none of them (false).
CREATE OR REPLACE FUNCTION apalis_pgmq.index_unique_keys(queue_name text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  q text := 'q_' || queue_name;
  a text := 'a_' || queue_name;
  keyed text := '(%s.headers->''apalis''->>''idempotency_key'') IS NOT NULL';
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
      'CREATE UNIQUE INDEX IF NOT EXISTS %I ON pgmq.%I (sha256(replace(headers->''apalis''->>''idempotency_key'', ''\'', ''\\'')::bytea)) '
      'WHERE (headers->''apalis''->>''idempotency_key'') IS NOT NULL',
      q || '_key_idx', q);
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = format('pgmq.%I', q)::regclass
                                             AND tgname = 'apalis_key_reserve') THEN
    EXECUTE format('CREATE TRIGGER apalis_key_reserve BEFORE INSERT ON pgmq.%I FOR EACH ROW WHEN (%s) '
                   'EXECUTE FUNCTION apalis_pgmq.key_reserve(%L)', q, format(keyed, 'NEW'), queue_name);
    EXECUTE format('CREATE TRIGGER apalis_key_release AFTER DELETE ON pgmq.%I FOR EACH ROW WHEN (%s) '
                   'EXECUTE FUNCTION apalis_pgmq.key_release(%L)', q, format(keyed, 'OLD'), queue_name);
    -- Keys of jobs already queued are held from now on.
    EXECUTE format(
      'INSERT INTO apalis_pgmq.job_keys (queue, key_hash, msg_id, held_until) '
      'SELECT %L, sha256(replace(headers->''apalis''->>''idempotency_key'', ''\'', ''\\'')::bytea), msg_id, ''infinity'' '
      'FROM pgmq.%I WHERE (headers->''apalis''->>''idempotency_key'') IS NOT NULL '
      'ON CONFLICT (queue, key_hash) DO UPDATE SET msg_id = EXCLUDED.msg_id, held_until = ''infinity''',
      queue_name, q);
  END IF;
  IF to_regclass(format('pgmq.%I', a)) IS NOT NULL THEN
    IF to_regclass(format('pgmq.%I', a || '_key_idx')) IS NULL THEN
      EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON pgmq.%I (sha256(replace(headers->''apalis''->>''idempotency_key'', ''\'', ''\\'')::bytea), archived_at) '
        'WHERE (headers->''apalis''->>''idempotency_key'') IS NOT NULL',
        a || '_key_idx', a);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = format('pgmq.%I', a)::regclass
                                               AND tgname = 'apalis_key_archived') THEN
      EXECUTE format('CREATE TRIGGER apalis_key_archived AFTER INSERT ON pgmq.%I FOR EACH ROW WHEN (%s) '
                     'EXECUTE FUNCTION apalis_pgmq.key_release(%L)', a, format(keyed, 'NEW'), queue_name);
    END IF;
  END IF;
  RETURN true;
END
$$;

-- Existing queues: their indexes rebuilt over the built-in expressions, and the ledger's
-- triggers for keyed ones.
DO $$
DECLARE
  m record;
BEGIN
  FOR m IN SELECT queue_name::text AS name FROM pgmq.meta LOOP
    CONTINUE WHEN m.name !~ '^[a-z_][a-z0-9_]{0,42}$';
    IF to_regclass(format('pgmq.%I', 'q_' || m.name || '_prio_idx')) IS NOT NULL THEN
      EXECUTE format('DROP INDEX pgmq.%I', 'q_' || m.name || '_prio_idx');
      PERFORM apalis_pgmq.index_priorities(m.name);
    END IF;
    IF to_regclass(format('pgmq.%I', 'q_' || m.name || '_key_idx')) IS NOT NULL THEN
      EXECUTE format('DROP INDEX pgmq.%I', 'q_' || m.name || '_key_idx');
      IF to_regclass(format('pgmq.%I', 'a_' || m.name || '_key_idx')) IS NOT NULL THEN
        EXECUTE format('DROP INDEX pgmq.%I', 'a_' || m.name || '_key_idx');
      END IF;
      PERFORM apalis_pgmq.index_unique_keys(m.name);
    END IF;
  END LOOP;
END
$$;
