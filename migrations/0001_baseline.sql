-- apalis-pgmq-notify 0.1.0: the baseline. Every table, sequence, index and function of schema
-- apalis_pgmq, each defined once, as the crate uses it.
--
-- setup() creates the schema and apalis_pgmq.schema_migrations before this runs, and records
-- this file there with its checksum. Released migrations are never edited: a change is a new
-- file, migrations/0002_<name>.sql, and so on (a test pins every migration's checksum).
--
-- Every statement here is idempotent (CREATE OR REPLACE, IF NOT EXISTS), so it also upgrades a
-- database that applied the migrations of the development versions before 0.1.0, which setup()
-- recognises by their rows and replaces by this file's row in the same transaction.
--
-- Jobs live in PGMQ's tables (schema pgmq): this schema holds only what PGMQ lacks.
--   1. helpers for headers: dead letters, retries, replays, idempotency keys, priorities;
--   2. notifications: who waits (listeners), the insert triggers, and the wake-up protocol;
--   3. per-queue indexes, built on demand by create_queue and by workers;
--   4. the worker registry, pausing, pg_partman maintenance, job results.
-- Functions that take a queue's name check it first (apalis_pgmq.check_queue_name), so a name
-- is never spliced into SQL unchecked.

COMMENT ON SCHEMA apalis_pgmq IS
  'apalis-pgmq-notify: helper functions and migration history; jobs live in PGMQ queues (schema pgmq)';

-- The queue-name rule of QueueName (src/queue/name.rs): 1 to 43 bytes of [a-z0-9_], starting
-- with a letter or '_'. 43 keeps every identifier PGMQ derives from a name (the longest is
-- archived_at_idx_<name>_dlq) within PostgreSQL's 63 bytes.
CREATE OR REPLACE FUNCTION apalis_pgmq.check_queue_name(queue_name text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  IF queue_name IS NULL OR queue_name !~ '^[a-z_][a-z0-9_]{0,42}$' THEN
    RAISE EXCEPTION 'invalid queue name %: use 1 to 43 bytes of [a-z0-9_], starting with a letter or _',
      quote_literal(coalesce(queue_name, 'NULL'))
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
END
$$;

---------------------------------------------------------------------------------------------
-- 1. Headers
---------------------------------------------------------------------------------------------

-- Headers of a dead-lettered message: the original headers kept as they were, plus one key,
-- "apalis_dead_letter", describing why and when. Headers that are not a JSON object (another
-- client may send any JSON) are kept under "original_headers".
CREATE OR REPLACE FUNCTION apalis_pgmq.dead_letter_headers(headers jsonb, info jsonb)
RETURNS jsonb
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
AS $$
  SELECT CASE
           WHEN headers IS NULL OR jsonb_typeof(headers) = 'null' THEN '{}'::jsonb
           WHEN jsonb_typeof(headers) = 'object' THEN headers
           ELSE jsonb_build_object('original_headers', headers)
         END
         || jsonb_build_object('apalis_dead_letter', info)
$$;

-- What a failed delivery that will run again leaves in the message's headers, under
-- headers.apalis:
--   attempts      runs so far, counting in-process (tower) retries, so the next delivery's
--                 Attempt continues from there instead of going back to PGMQ's read_ct;
--   last_error    the error's text (NULs escaped, at most 4 KiB);
--   failed_at     when it failed (server time);
--   failed_epoch  the same as seconds since the epoch, which status queries compare with
--                 last_read_at without parsing text: a retrying job failed after its last
--                 read, a running one was read after its last failure.
-- Headers that are not a JSON object (another PGMQ client may send any JSON) are left as they
-- are: such a job's attempts then follow read_ct.
CREATE OR REPLACE FUNCTION apalis_pgmq.retry_headers(headers jsonb, attempts integer, last_error text)
RETURNS jsonb
LANGUAGE sql
STABLE
AS $$
  SELECT CASE
           WHEN headers IS NULL OR jsonb_typeof(headers) = 'null' THEN
             jsonb_build_object('apalis', jsonb_build_object(
               'attempts', attempts, 'last_error', last_error, 'failed_at', now(),
               'failed_epoch', extract(epoch FROM now())))
           WHEN jsonb_typeof(headers) = 'object' THEN
             headers || jsonb_build_object('apalis',
               (CASE WHEN jsonb_typeof(headers->'apalis') = 'object' THEN headers->'apalis'
                     ELSE '{}'::jsonb END)
               || jsonb_build_object('attempts', attempts, 'last_error', last_error,
                                     'failed_at', now(), 'failed_epoch', extract(epoch FROM now())))
           ELSE headers
         END
$$;

-- The headers a replayed dead letter goes back with: without the dead-letter record; with
-- `reset`, without the attempts and error of earlier deliveries (a full budget again);
-- otherwise the attempts continue from where the job died (it gets one more run).
CREATE OR REPLACE FUNCTION apalis_pgmq.replay_headers(headers jsonb, reset boolean)
RETURNS jsonb
LANGUAGE sql
IMMUTABLE
AS $$
  SELECT CASE
    WHEN headers IS NULL OR jsonb_typeof(headers) <> 'object' THEN headers
    WHEN reset THEN
      CASE WHEN jsonb_typeof(headers->'apalis') = 'object'
           THEN (headers - 'apalis_dead_letter')
                || jsonb_build_object('apalis', (headers->'apalis')
                     - 'attempts' - 'last_error' - 'failed_at' - 'failed_epoch')
           ELSE headers - 'apalis_dead_letter' END
    ELSE
      (headers - 'apalis_dead_letter')
      || CASE WHEN jsonb_typeof(headers->'apalis_dead_letter'->'attempts') = 'number'
              THEN jsonb_build_object('apalis',
                     (CASE WHEN jsonb_typeof(headers->'apalis') = 'object' THEN headers->'apalis'
                           ELSE '{}'::jsonb END)
                     || jsonb_build_object('attempts', headers->'apalis_dead_letter'->'attempts'))
              ELSE '{}'::jsonb END
  END
$$;

-- Unique jobs. A job's idempotency key (headers.apalis.idempotency_key) is unique per queue
-- while the job is in the queue table: pending, scheduled, running or waiting for a retry. A
-- partial unique index on the key's hash enforces it for every producer (this crate's pushes
-- skip a taken key and return the existing job; a plain pgmq.send with a taken key fails with
-- unique_violation). Indexes hold this SHA-256 of a key or id, never the text: a btree entry
-- holds at most ~2.7 kB, and a longer key (any producer's, hostile or not) must not make its
-- insert fail.
CREATE OR REPLACE FUNCTION apalis_pgmq.key_hash(key text)
RETURNS bytea
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
AS $$ SELECT sha256(convert_to(key, 'UTF8')) $$;

-- A job's priority: headers.apalis.priority (apalis' TaskBuilder::priority; higher runs first),
-- clamped to +-1 000 000. Never fails: a producer sending a priority that is not a number (or
-- no headers at all, as plain PGMQ clients do) gets the default 0 instead of an error from the
-- priority index.
CREATE OR REPLACE FUNCTION apalis_pgmq.priority_of(headers jsonb)
RETURNS integer
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
AS $$
  SELECT CASE
           WHEN jsonb_typeof(headers->'apalis'->'priority') = 'number' THEN
             least(greatest((headers->'apalis'->>'priority')::numeric, -1000000), 1000000)::integer
           ELSE 0
         END
$$;

---------------------------------------------------------------------------------------------
-- 2. Notifications
---------------------------------------------------------------------------------------------
--
-- Each queue table pgmq.q_<queue> may carry one trigger, apalis_notify, installed by
-- enable_notify in one of three modes (channel names are computed by the application and
-- passed as trigger arguments: queue, queue channel, namespace channel[, byte budget]):
--
--   on_demand (default)  statement level; sends {"e": "wake", "q": <queue>} only while a
--                        listener waits on the queue's or the namespace's channel.
--   batch                statement level; always sends {"e": "ready"|"batch", "q", "id": <first
--                        msg_id>, "n": <rows>, "d": <seconds until the earliest is visible>}.
--   message              row level; the message and headers inline ("e": "message") when the
--                        payload fits the byte budget, else a signal-only "ready" event with
--                        "big": true. A payload is never truncated.
--
-- PostgreSQL serialises the commits of notifying transactions, so the on-demand mode notifies
-- sparingly. Its protocol is documented, interleaving by interleaving, in
-- src/notify/wakeup.rs. In short: an idle worker process arms its own row of
-- apalis_pgmq.listeners (arm); a producer's trigger only *reads* whether an armed row exists
-- and, if so, sends one NOTIFY; the woken process disarms its own row (disarm). Producers never
-- write a shared row and never take a lock another session holds, so they never wait on one
-- another or deadlock because of this crate.
--
-- While nobody waits on a queue, its trigger's function is not even called: each session caches
-- "nobody waits on this queue" in a setting, together with the version of the listeners (the
-- sequence apalis_pgmq.listeners_version), and the trigger's WHEN clause compares the two
-- without running a query. The *worker* bumps the version after its arming has committed
-- (listeners_changed), so a producer that reads the new version also sees the arming; an insert
-- already past its WHEN clause when the worker arms is covered by the worker's settle checks
-- (inserts_settled).
--
-- Every function a producer's insert can reach is SECURITY DEFINER with a fixed search_path,
-- owned by the role that ran setup(), and the version is readable by any role: a role with only
-- PGMQ's rights on pgmq.q_<queue> can insert, trigger installed or not, without any grant in
-- this schema.

-- Who waits for notifications on a channel: one row per listening process (owner), valid until
-- `until`. `armed`: the next insert should notify (an idle worker, until woken). `persistent`:
-- every insert should (event subscribers). `gen`: the arming's generation, so a late disarm
-- clears only the arming it answered, never a newer one.
CREATE UNLOGGED TABLE IF NOT EXISTS apalis_pgmq.listeners (
  channel text NOT NULL,
  owner text NOT NULL,
  until timestamptz NOT NULL,
  armed boolean NOT NULL DEFAULT true,
  persistent boolean NOT NULL DEFAULT false,
  gen bigint NOT NULL DEFAULT 0,
  PRIMARY KEY (channel, owner)
);

-- The listeners' version: bumped after an arming or a subscription has committed. Any role may
-- read it (it is only a counter); bumping it goes through listeners_changed().
CREATE SEQUENCE IF NOT EXISTS apalis_pgmq.listeners_version;
GRANT SELECT ON SEQUENCE apalis_pgmq.listeners_version TO PUBLIC;

CREATE OR REPLACE FUNCTION apalis_pgmq.listeners_changed()
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT nextval('apalis_pgmq.listeners_version') $$;

-- Sends `payload` on the queue channel, and on the namespace channel when there is one.
CREATE OR REPLACE FUNCTION apalis_pgmq.notify_channels(queue_channel text, namespace_channel text, payload text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  PERFORM pg_notify(queue_channel, payload);
  IF coalesce(namespace_channel, '') <> '' THEN
    PERFORM pg_notify(namespace_channel, payload);
  END IF;
END
$$;

-- On-demand mode, called when the session's cache is stale: one read-only look at the
-- listeners table, one NOTIFY when an armed (or persistent) listener waits on the queue's or
-- namespace's channel, else the cache is refreshed.
CREATE OR REPLACE FUNCTION apalis_pgmq.notify_on_demand()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  -- Read before looking: an arming that bumps the version after this read makes the cache
  -- written below stale at once, so the next statement looks again.
  version text := coalesce(pg_sequence_last_value('apalis_pgmq.listeners_version'::regclass), 0)::text;
BEGIN
  -- TG_ARGV: queue, queue channel, namespace channel
  IF EXISTS (SELECT 1 FROM apalis_pgmq.listeners l
              WHERE l.channel IN (TG_ARGV[1], TG_ARGV[2]) AND (l.armed OR l.persistent)
                AND l.until > clock_timestamp()) THEN
    PERFORM apalis_pgmq.notify_channels(TG_ARGV[1], TG_ARGV[2],
                                        json_build_object('e', 'wake', 'q', TG_ARGV[0])::text);
  ELSE
    -- Session-wide (not local): persists after this function and this transaction.
    PERFORM set_config('apalis_pgmq.nc_' || TG_ARGV[0], version || '|n', false);
  END IF;
  RETURN NULL;
END
$$;

-- Batch mode: one event per statement, however many rows it inserted.
CREATE OR REPLACE FUNCTION apalis_pgmq.notify_batch()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  n bigint;
  first_id bigint;
  delay double precision;
BEGIN
  -- TG_ARGV: queue, queue channel, namespace channel
  SELECT count(*), min(msg_id), extract(epoch FROM min(vt) - clock_timestamp())
    INTO n, first_id, delay
    FROM new_rows;
  IF n = 0 THEN
    RETURN NULL;
  END IF;
  PERFORM apalis_pgmq.notify_channels(TG_ARGV[1], TG_ARGV[2], json_build_object(
      'e', CASE WHEN n = 1 THEN 'ready' ELSE 'batch' END,
      'q', TG_ARGV[0],
      'id', first_id,
      'n', n,
      'd', round(greatest(coalesce(delay, 0), 0)::numeric, 3))::text);
  RETURN NULL;
END
$$;

-- Message mode: one event per row, the message inline when the event fits TG_ARGV[3] bytes.
CREATE OR REPLACE FUNCTION apalis_pgmq.notify_message()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  delay numeric := round(greatest(extract(epoch FROM NEW.vt - clock_timestamp()), 0)::numeric, 3);
  payload text;
BEGIN
  payload := json_build_object(
      'e', 'message', 'q', TG_ARGV[0], 'id', NEW.msg_id, 'n', 1, 'd', delay,
      'm', NEW.message, 'h', NEW.headers)::text;
  -- octet_length counts bytes, not characters: multi-byte text cannot slip past the budget.
  IF octet_length(payload) > TG_ARGV[3]::int THEN
    payload := json_build_object(
        'e', 'ready', 'q', TG_ARGV[0], 'id', NEW.msg_id, 'n', 1, 'd', delay, 'big', true)::text;
  END IF;
  PERFORM apalis_pgmq.notify_channels(TG_ARGV[1], TG_ARGV[2], payload);
  RETURN NULL;
END
$$;

-- Queue-created events: a row trigger on pgmq.meta (see enable_created_notify).
CREATE OR REPLACE FUNCTION apalis_pgmq.notify_created()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  PERFORM pg_notify(TG_ARGV[0], json_build_object('e', 'created', 'q', NEW.queue_name)::text);
  RETURN NULL;
END
$$;

-- A worker process arms its wake-up on `channel` (generation `gen`) for `seconds`, and sweeps
-- rows that expired more than a minute ago (a crashed process's). Touches only its own row and
-- dead rows; producers never wait on it.
CREATE OR REPLACE FUNCTION apalis_pgmq.arm(channel text, owner text, seconds double precision, gen bigint)
RETURNS void
LANGUAGE sql
AS $$
  DELETE FROM apalis_pgmq.listeners l WHERE l.until < clock_timestamp() - interval '1 minute';
  INSERT INTO apalis_pgmq.listeners (channel, owner, until, armed, persistent, gen)
  VALUES (channel, owner, clock_timestamp() + make_interval(secs => seconds), true, false, gen)
  ON CONFLICT ON CONSTRAINT listeners_pkey
  DO UPDATE SET until = EXCLUDED.until, armed = true, persistent = false, gen = EXCLUDED.gen;
$$;

-- The woken worker clears the arming it answered (a newer arming, another generation, stays).
CREATE OR REPLACE FUNCTION apalis_pgmq.disarm(channel text, owner text, gen bigint)
RETURNS void
LANGUAGE sql
AS $$
  UPDATE apalis_pgmq.listeners l SET armed = false
   WHERE l.channel = disarm.channel AND l.owner = disarm.owner AND l.gen = disarm.gen AND l.armed;
$$;

-- Event subscribers (QueueEvents): a persistent row (every insert notifies) for `seconds`,
-- renewed while they listen. Callers bump the version with listeners_changed() once this has
-- committed.
CREATE OR REPLACE FUNCTION apalis_pgmq.want_notify(
  channel text, owner text, seconds double precision, persistent boolean DEFAULT false)
RETURNS void
LANGUAGE sql
AS $$
  INSERT INTO apalis_pgmq.listeners (channel, owner, until, armed, persistent)
  VALUES (channel, owner, clock_timestamp() + make_interval(secs => seconds), true, persistent)
  ON CONFLICT ON CONSTRAINT listeners_pkey
  DO UPDATE SET until = EXCLUDED.until, armed = true, persistent = EXCLUDED.persistent;
$$;

-- Removes `owner`'s row on `channel`: a subscription ending, or the last worker of a queue in a
-- process stopping.
CREATE OR REPLACE FUNCTION apalis_pgmq.unwant_notify(channel text, owner text)
RETURNS void
LANGUAGE sql
AS $$
  DELETE FROM apalis_pgmq.listeners l WHERE l.channel = unwant_notify.channel AND l.owner = unwant_notify.owner
$$;

-- A worker made messages visible by an update (a release, a retry, a lease given back), which
-- no insert trigger sees: wake idle workers of *other* processes (`me` is this process's owner
-- prefix) if any waits, with the delay until the messages are visible. Returns whether it sent.
CREATE OR REPLACE FUNCTION apalis_pgmq.wake_others(
  queue_name text, queue_channel text, namespace_channel text, delay double precision, me text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM apalis_pgmq.listeners l
                  WHERE l.channel IN (queue_channel, namespace_channel) AND (l.armed OR l.persistent)
                    AND l.until > clock_timestamp()
                    AND l.owner <> me AND l.owner NOT LIKE me || '.%') THEN
    RETURN false;
  END IF;
  PERFORM apalis_pgmq.notify_channels(queue_channel, namespace_channel, json_build_object(
      'e', 'wake', 'q', queue_name, 'd', round(greatest(coalesce(delay, 0), 0)::numeric, 3))::text);
  RETURN true;
END
$$;

-- The settle check, after arming (committed) and bumping the version: whether every transaction
-- that had written to the queue table before has ended (none but this session holds
-- RowExclusiveLock on it; every inserting transaction does until it ends). Read-only.
CREATE OR REPLACE FUNCTION apalis_pgmq.inserts_settled(queue_name text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  qtable regclass := to_regclass(format('pgmq.%I', 'q_' || queue_name));
BEGIN
  IF qtable IS NULL THEN
    RETURN true;
  END IF;
  RETURN NOT EXISTS (
    SELECT 1 FROM pg_locks l
     WHERE l.locktype = 'relation' AND l.relation = qtable
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND l.mode = 'RowExclusiveLock' AND l.granted AND l.pid <> pg_backend_pid());
END
$$;

-- Installs (or replaces) the notification trigger of one queue.
CREATE OR REPLACE FUNCTION apalis_pgmq.enable_notify(
  queue_name text,
  queue_channel text,
  namespace_channel text DEFAULT '',
  mode text DEFAULT 'on_demand',
  max_payload_bytes integer DEFAULT 7000
)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  qtable text := 'q_' || queue_name;
BEGIN
  PERFORM apalis_pgmq.check_queue_name(queue_name);
  IF to_regclass(format('pgmq.%I', qtable)) IS NULL THEN
    RAISE EXCEPTION 'queue % does not exist', queue_name USING ERRCODE = 'undefined_table';
  END IF;
  IF queue_channel IS NULL OR octet_length(queue_channel) NOT BETWEEN 1 AND 63
     OR octet_length(coalesce(namespace_channel, '')) > 63 THEN
    RAISE EXCEPTION 'channel names must be 1 to 63 bytes' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF mode NOT IN ('on_demand', 'batch', 'message') THEN
    RAISE EXCEPTION 'mode must be on_demand, batch or message, got %', mode
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF max_payload_bytes NOT BETWEEN 256 AND 7999 THEN
    RAISE EXCEPTION 'max_payload_bytes must be within 256..7999 (NOTIFY payloads are limited to 8000 bytes)'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  EXECUTE format('DROP TRIGGER IF EXISTS apalis_notify ON pgmq.%I', qtable);
  IF mode = 'message' THEN
    EXECUTE format(
      'CREATE TRIGGER apalis_notify AFTER INSERT ON pgmq.%I '
      'FOR EACH ROW EXECUTE FUNCTION apalis_pgmq.notify_message(%L, %L, %L, %L)',
      qtable, queue_name, queue_channel, coalesce(namespace_channel, ''), max_payload_bytes::text);
  ELSIF mode = 'batch' THEN
    EXECUTE format(
      'CREATE TRIGGER apalis_notify AFTER INSERT ON pgmq.%I REFERENCING NEW TABLE AS new_rows '
      'FOR EACH STATEMENT EXECUTE FUNCTION apalis_pgmq.notify_batch(%L, %L, %L)',
      qtable, queue_name, queue_channel, coalesce(namespace_channel, ''));
  ELSE
    -- The WHEN clause is evaluated without calling the function: while this session's cache
    -- says nobody listens at the current listeners version, the insert costs nothing more.
    EXECUTE format(
      'CREATE TRIGGER apalis_notify AFTER INSERT ON pgmq.%I FOR EACH STATEMENT '
      'WHEN (coalesce(current_setting(%L, true), '''') IS DISTINCT FROM '
      '      (coalesce(pg_sequence_last_value(''apalis_pgmq.listeners_version''::regclass), 0)::text || ''|n'')) '
      'EXECUTE FUNCTION apalis_pgmq.notify_on_demand(%L, %L, %L)',
      qtable, 'apalis_pgmq.nc_' || queue_name, queue_name, queue_channel,
      coalesce(namespace_channel, ''));
  END IF;
END
$$;

-- Removes the notification trigger of one queue; whether there was one.
CREATE OR REPLACE FUNCTION apalis_pgmq.disable_notify(queue_name text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  qtable text := 'q_' || queue_name;
  existed boolean;
BEGIN
  PERFORM apalis_pgmq.check_queue_name(queue_name);
  IF to_regclass(format('pgmq.%I', qtable)) IS NULL THEN
    RETURN false;
  END IF;
  SELECT EXISTS (SELECT 1 FROM pg_trigger
                 WHERE tgrelid = to_regclass(format('pgmq.%I', qtable)) AND tgname = 'apalis_notify')
    INTO existed;
  EXECUTE format('DROP TRIGGER IF EXISTS apalis_notify ON pgmq.%I', qtable);
  RETURN existed;
END
$$;

-- The installed trigger of one queue: its mode and arguments (no row when none is installed).
CREATE OR REPLACE FUNCTION apalis_pgmq.notify_trigger(queue_name text)
RETURNS TABLE (mode text, args text[])
LANGUAGE sql
STABLE
AS $$
  SELECT CASE x.tgfoid
              WHEN 'apalis_pgmq.notify_message()'::regprocedure THEN 'message'
              WHEN 'apalis_pgmq.notify_batch()'::regprocedure THEN 'batch'
              ELSE 'on_demand' END,
         x.a
    FROM (SELECT t.tgfoid,
                 (SELECT array_agg(v ORDER BY i)
                    FROM unnest(string_to_array(
                           regexp_replace(encode(t.tgargs, 'escape'), '\\000$', ''), '\000'))
                         WITH ORDINALITY AS u(v, i)) AS a
            FROM pg_trigger t
           WHERE t.tgrelid = to_regclass(format('pgmq.%I', 'q_' || queue_name))
             AND t.tgname = 'apalis_notify') AS x
$$;

-- Queue-created events on a channel (one trigger on pgmq.meta per channel).
CREATE OR REPLACE FUNCTION apalis_pgmq.enable_created_notify(channel text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  trigger_name text := 'apalis_created_' || substr(md5(channel), 1, 12);
BEGIN
  IF channel IS NULL OR octet_length(channel) NOT BETWEEN 1 AND 63 THEN
    RAISE EXCEPTION 'channel names must be 1 to 63 bytes' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_trigger
                 WHERE tgrelid = 'pgmq.meta'::regclass AND tgname = trigger_name) THEN
    EXECUTE format(
      'CREATE TRIGGER %I AFTER INSERT ON pgmq.meta FOR EACH ROW '
      'EXECUTE FUNCTION apalis_pgmq.notify_created(%L)', trigger_name, channel);
  END IF;
END
$$;

---------------------------------------------------------------------------------------------
-- 3. Per-queue indexes (created by create_queue and by workers, as the table's owner; each
--    returns at once when its index exists, so no lock is taken on a busy table)
---------------------------------------------------------------------------------------------

-- Dead letters keep their job's id in headers.apalis_dead_letter.msg_id: index it per
-- dead-letter queue so a job can be found by id once dead.
CREATE OR REPLACE FUNCTION apalis_pgmq.index_dead_letters(queue_name text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM apalis_pgmq.check_queue_name(queue_name);
  IF to_regclass(format('pgmq.%I', 'q_' || queue_name || '_dlq')) IS NULL
     OR to_regclass(format('pgmq.%I', 'q_' || queue_name || '_dlq_job_idx')) IS NOT NULL THEN
    RETURN;  -- nothing to index, or done already (no lock taken on a busy table)
  END IF;
  EXECUTE format(
    'CREATE INDEX IF NOT EXISTS %I ON pgmq.%I (((headers->''apalis_dead_letter''->>''msg_id'')::bigint))',
    'q_' || queue_name || '_dlq_job_idx', 'q_' || queue_name || '_dlq');
END
$$;

-- Unique jobs (see key_hash): the partial unique index on the queue table, and a plain index on
-- the key and archived_at in the archive, so a push can also refuse a key whose job finished
-- within Config::idempotency_window. Partitioned queues cannot have a unique index that leaves
-- out the partition key: they get neither index (false).
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

-- The index a priority claim reads (Config::priorities): priority descending, then visibility
-- time.
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
      'CREATE INDEX IF NOT EXISTS %I ON pgmq.%I (apalis_pgmq.priority_of(headers) DESC, vt)',
      q || '_prio_idx', q);
  END IF;
  RETURN true;
END
$$;

---------------------------------------------------------------------------------------------
-- 4. Workers, pausing, partitions, results
---------------------------------------------------------------------------------------------

-- The worker registry. Every running worker has a row, written when it starts, refreshed by its
-- process's heartbeat (one statement for all of a process's workers) and deleted when it stops
-- cleanly. A row whose process died stops being listed at expires_at and is swept a minute
-- later by any heartbeat.
CREATE UNLOGGED TABLE IF NOT EXISTS apalis_pgmq.workers (
  id text PRIMARY KEY,              -- the worker's name and its process (owner)
  name text NOT NULL,               -- the name given to WorkerBuilder::new
  queue text NOT NULL,
  owner text NOT NULL,              -- the process, as in apalis_pgmq.listeners
  host text NOT NULL,
  pid integer NOT NULL,
  service text NOT NULL DEFAULT '',
  concurrency integer,              -- learned when the worker first fills up; NULL before
  in_flight integer NOT NULL DEFAULT 0,
  started_at timestamptz NOT NULL DEFAULT now(),
  last_heartbeat timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS workers_queue_idx ON apalis_pgmq.workers (queue);

-- One process's heartbeat: upserts each of its workers, sweeps rows expired for a minute.
CREATE OR REPLACE FUNCTION apalis_pgmq.heartbeat(
  ids text[], names text[], queues text[], owner text, host text, pid integer,
  services text[], concurrencies integer[], in_flights integer[], started timestamptz[],
  ttl double precision)
RETURNS void
LANGUAGE sql
AS $$
  DELETE FROM apalis_pgmq.workers w WHERE w.expires_at < clock_timestamp() - interval '1 minute';
  INSERT INTO apalis_pgmq.workers AS w
    (id, name, queue, owner, host, pid, service, concurrency, in_flight, started_at,
     last_heartbeat, expires_at)
  SELECT t.id, t.name, t.queue, heartbeat.owner, heartbeat.host, heartbeat.pid, t.service,
         t.concurrency, t.in_flight, t.started, clock_timestamp(),
         clock_timestamp() + make_interval(secs => ttl)
    FROM unnest(ids, names, queues, services, concurrencies, in_flights, started)
         AS t(id, name, queue, service, concurrency, in_flight, started)
  ON CONFLICT (id) DO UPDATE
    SET concurrency = EXCLUDED.concurrency, in_flight = EXCLUDED.in_flight,
        last_heartbeat = EXCLUDED.last_heartbeat, expires_at = EXCLUDED.expires_at;
$$;

-- A paused queue's workers claim nothing (their claim checks this table; pausing needs no
-- notification and survives restarts). Resuming deletes the row and wakes idle workers.
CREATE TABLE IF NOT EXISTS apalis_pgmq.paused (
  queue text PRIMARY KEY,
  paused_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION apalis_pgmq.pause(queue_name text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM apalis_pgmq.check_queue_name(queue_name);
  INSERT INTO apalis_pgmq.paused (queue) VALUES (queue_name) ON CONFLICT DO NOTHING;
  RETURN FOUND;
END
$$;

CREATE OR REPLACE FUNCTION apalis_pgmq.resume(queue_name text, queue_channel text, namespace_channel text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM apalis_pgmq.check_queue_name(queue_name);
  DELETE FROM apalis_pgmq.paused WHERE queue = queue_name;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  PERFORM apalis_pgmq.notify_channels(queue_channel, namespace_channel,
                                      json_build_object('e', 'wake', 'q', queue_name)::text);
  RETURN true;
END
$$;

-- pg_partman maintenance of one partitioned table (a partitioned queue's, or its archive's):
-- partitions are made ahead, and those past the retention given to pgmq.create_partitioned are
-- dropped. pg_partman's schema is found as PGMQ finds it.
CREATE OR REPLACE FUNCTION apalis_pgmq.run_partman_maintenance(parent_table text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  EXECUTE format('SELECT %I.run_maintenance(p_parent_table := %L)',
                 pgmq._get_pg_partman_schema(), parent_table);
END
$$;

-- Job results. With Config::store_results (or for a job pushed by push_and_wait), the
-- statement that writes a job's final outcome also writes its result here and notifies the
-- queue's results channel, so waiters (WaitForCompletion, push_and_wait) wake without polling.
-- Only final outcomes: done, killed, and failed with no attempts left.
CREATE TABLE IF NOT EXISTS apalis_pgmq.results (
  queue text NOT NULL,
  msg_id bigint NOT NULL,
  -- The id the producer chose for the job (headers.apalis.task_id), when it is not the message
  -- id.
  job_id text,
  status text NOT NULL CHECK (status IN ('Done', 'Failed', 'Killed')),
  attempt integer NOT NULL,
  -- The handler's output as JSON (Done), or NULL.
  result jsonb,
  -- The error's text (Failed, Killed; or why the output could not be kept), or NULL.
  error text,
  finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (queue, msg_id)
);

-- Waiters may ask by the producer's id; only jobs that have one are in this index. It holds the
-- id's hash (key_hash), not the id, so a long id cannot make the outcome statement fail.
CREATE INDEX IF NOT EXISTS results_job_idx ON apalis_pgmq.results (queue, apalis_pgmq.key_hash(job_id))
  WHERE job_id IS NOT NULL;
-- Retention deletes what finished long ago: a BRIN index, nearly free to maintain.
CREATE INDEX IF NOT EXISTS results_finished_idx ON apalis_pgmq.results USING brin (finished_at);
