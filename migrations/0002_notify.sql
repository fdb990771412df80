-- apalis-pgmq-notify: notifications for PGMQ queues.
--
-- A statement-level trigger on pgmq.q_<queue> sends at most one NOTIFY per queue per statement,
-- however many rows the statement inserts. Payloads are small JSON objects:
--   {"e": "ready"|"batch", "q": <queue>, "id": <first msg_id>, "n": <rows>, "d": <seconds until
--    the earliest inserted message is visible>}
--
-- PostgreSQL serialises the commits of notifying transactions (the notification queue lock is
-- held through the commit), so a NOTIFY per single-row insert halves a busy producer. The default
-- "on_demand" mode therefore notifies only when a listener has asked to be woken: an idle worker
-- arms a row in apalis_pgmq.listeners ("wake me once"); the first insert that finds it armed
-- disarms it and sends {"e": "wake", "q": <queue>}; later inserts skip until the worker, idle
-- again, re-arms it. Event subscribers keep a persistent row (every insert notifies).
--
-- Inserts must not pay for this while nobody listens. Each session caches "nobody listens to
-- this queue" together with the value of the apalis_pgmq.listeners_version sequence, and the
-- trigger's WHEN clause compares the two without running any query or function body. Arming
-- bumps the sequence after the arming has committed. A worker that armed then waits until no
-- other transaction holds RowExclusiveLock on the queue table (every inserting transaction does,
-- until it ends): an insert that skipped notifying on the old version has then committed, and
-- the worker's next read sees it; an insert after that sees the new version and looks.
--
-- The "batch" mode always notifies. The opt-in "message" mode sends one NOTIFY per row with the
-- message inline when the whole payload fits a byte budget, and a signal-only "ready" event (with
-- "big": true) when it does not: a payload is never truncated.
-- Channel names are computed by the application and passed as trigger arguments.

-- Who waits for notifications: a channel, an owner (one per listening process), until when,
-- whether the next insert should notify (armed), and whether every insert should (persistent).
CREATE UNLOGGED TABLE IF NOT EXISTS apalis_pgmq.listeners (
  channel text NOT NULL,
  owner text NOT NULL,
  until timestamptz NOT NULL,
  armed boolean NOT NULL DEFAULT true,
  persistent boolean NOT NULL DEFAULT false,
  PRIMARY KEY (channel, owner)
);

-- Bumped (after the change commits) whenever a wake-up is armed or a subscription changes, so
-- inserts can cache "nobody is interested" per session and skip the table while it holds.
CREATE SEQUENCE IF NOT EXISTS apalis_pgmq.listeners_version;

CREATE OR REPLACE FUNCTION apalis_pgmq.listeners_changed()
RETURNS bigint LANGUAGE sql AS $$ SELECT nextval('apalis_pgmq.listeners_version') $$;

-- Sends `payload` on the queue channel, and on the namespace channel when there is one.
CREATE OR REPLACE FUNCTION apalis_pgmq.notify_channels(queue_channel text, namespace_channel text, payload text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM pg_notify(queue_channel, payload);
  IF coalesce(namespace_channel, '') <> '' THEN
    PERFORM pg_notify(namespace_channel, payload);
  END IF;
END
$$;

-- Raises unless `queue_name` is a name this crate accepts (the Rust QueueName rules; a
-- dead-letter queue's name may be 4 bytes longer).
CREATE OR REPLACE FUNCTION apalis_pgmq.check_queue_name(queue_name text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  IF queue_name IS NULL OR queue_name !~ '^[a-z_][a-z0-9_]{0,46}$' THEN
    RAISE EXCEPTION 'invalid queue name %', quote_literal(coalesce(queue_name, 'NULL'))
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
END
$$;

CREATE OR REPLACE FUNCTION apalis_pgmq.notify_batch()
RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  n bigint;
  first_id bigint;
  delay double precision;
  payload text;
BEGIN
  -- TG_ARGV: queue, queue channel, namespace channel
  SELECT count(*), min(msg_id), extract(epoch FROM min(vt) - clock_timestamp())
    INTO n, first_id, delay
    FROM new_rows;
  IF n = 0 THEN
    RETURN NULL;
  END IF;
  payload := json_build_object(
      'e', CASE WHEN n = 1 THEN 'ready' ELSE 'batch' END,
      'q', TG_ARGV[0],
      'id', first_id,
      'n', n,
      'd', round(greatest(coalesce(delay, 0), 0)::numeric, 3))::text;
  PERFORM apalis_pgmq.notify_channels(TG_ARGV[1], TG_ARGV[2], payload);
  RETURN NULL;
END
$$;

-- Runs only when the WHEN clause finds no valid "nobody listens" cache (see the header).
CREATE OR REPLACE FUNCTION apalis_pgmq.notify_on_demand()
RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  wanted boolean;
  persistent_seen boolean;
  version text := coalesce(pg_sequence_last_value('apalis_pgmq.listeners_version'::regclass), 0)::text;
  payload text;
BEGIN
  -- TG_ARGV: queue, queue channel, namespace channel. One query: disarm wake-me-once rows, and
  -- see whether anyone wants this insert.
  WITH disarmed AS (
    UPDATE apalis_pgmq.listeners SET armed = false
     WHERE channel IN (TG_ARGV[1], TG_ARGV[2]) AND armed AND NOT persistent
       AND until > clock_timestamp()
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM disarmed),
         EXISTS (SELECT 1 FROM apalis_pgmq.listeners
                 WHERE channel IN (TG_ARGV[1], TG_ARGV[2]) AND persistent
                   AND until > clock_timestamp())
    INTO wanted, persistent_seen;
  IF NOT (wanted OR persistent_seen) THEN
    -- Remember, for this session, until the listeners version moves.
    PERFORM set_config('apalis_pgmq.nc_' || TG_ARGV[0], version || '|n', false);
    RETURN NULL;
  END IF;
  payload := json_build_object('e', 'wake', 'q', TG_ARGV[0])::text;
  PERFORM apalis_pgmq.notify_channels(TG_ARGV[1], TG_ARGV[2], payload);
  RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION apalis_pgmq.notify_message()
RETURNS trigger
LANGUAGE plpgsql
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

CREATE OR REPLACE FUNCTION apalis_pgmq.notify_created()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM pg_notify(TG_ARGV[0], json_build_object('e', 'created', 'q', NEW.queue_name)::text);
  RETURN NULL;
END
$$;

-- Arms `owner`'s wake-up on `channel` for `seconds`: the next insert notifies (every insert, when
-- `persistent`). Inserts cache "nobody listens" per session until the listeners version moves:
-- this bumps it, and callers should call apalis_pgmq.listeners_changed() again once their
-- transaction has committed (this crate's workers do, in their settle check).
CREATE OR REPLACE FUNCTION apalis_pgmq.want_notify(
  channel text, owner text, seconds double precision, persistent boolean DEFAULT false)
RETURNS void
LANGUAGE sql
AS $$
  INSERT INTO apalis_pgmq.listeners (channel, owner, until, armed, persistent)
  VALUES (channel, owner, clock_timestamp() + make_interval(secs => seconds), true, persistent)
  ON CONFLICT ON CONSTRAINT listeners_pkey
  DO UPDATE SET until = EXCLUDED.until, armed = true, persistent = EXCLUDED.persistent;
  SELECT nextval('apalis_pgmq.listeners_version');
  SELECT NULL::void;
$$;

CREATE OR REPLACE FUNCTION apalis_pgmq.unwant_notify(channel text, owner text)
RETURNS void
LANGUAGE sql
AS $$
  DELETE FROM apalis_pgmq.listeners l WHERE l.channel = unwant_notify.channel AND l.owner = unwant_notify.owner
$$;

-- After arming (committed): bumps the listeners version, so inserts from now on look at the
-- listeners table, then says whether every transaction that had inserted into the queue before
-- has ended (none but this one holds RowExclusiveLock on the queue table).
CREATE OR REPLACE FUNCTION apalis_pgmq.inserts_settled(queue_name text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  qtable regclass := to_regclass(format('pgmq.%I', 'q_' || queue_name));
BEGIN
  PERFORM nextval('apalis_pgmq.listeners_version');
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

-- Queue-created events on a channel (one trigger per channel).
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
