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
-- disarms it and notifies, and later inserts skip until the worker, idle again, re-arms it. Busy
-- workers cost producers nothing. Event subscribers keep a persistent row (every insert notifies).
-- To close the race with a worker that arms while an insert that skipped notifying is in
-- flight, every insert takes a shared transaction-level advisory lock on the queue before
-- looking; after arming, a worker takes the exclusive lock once (and at once releases it) before
-- its last read, so every insert that did not notify has committed by then and that read sees it.
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

-- The advisory lock key of a queue: (class, hash of the queue name).
CREATE OR REPLACE FUNCTION apalis_pgmq.queue_lock_class()
RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 1634758001 $$;

CREATE OR REPLACE FUNCTION apalis_pgmq.notify_batch()
RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  n bigint;
  first_id bigint;
  delay double precision;
  payload text;
  wanted boolean;
BEGIN
  -- TG_ARGV: queue, queue channel, namespace channel, mode ('on_demand' | 'always')
  IF TG_NARGS > 3 AND TG_ARGV[3] = 'on_demand' THEN
    PERFORM pg_advisory_xact_lock_shared(apalis_pgmq.queue_lock_class(), hashtext(TG_ARGV[0]));
    -- One query (after the lock, so its snapshot sees every arming that committed before the
    -- lock was granted): disarm wake-me-once rows, and say whether anyone wants this insert.
    WITH disarmed AS (
      UPDATE apalis_pgmq.listeners SET armed = false
       WHERE channel IN (TG_ARGV[1], TG_ARGV[2]) AND armed AND NOT persistent
         AND until > clock_timestamp()
      RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM disarmed)
        OR EXISTS (SELECT 1 FROM apalis_pgmq.listeners
                   WHERE channel IN (TG_ARGV[1], TG_ARGV[2]) AND persistent
                     AND until > clock_timestamp())
      INTO wanted;
    IF NOT wanted THEN
      RETURN NULL;
    END IF;
  END IF;
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
  PERFORM pg_notify(TG_ARGV[1], payload);
  IF TG_NARGS > 2 AND TG_ARGV[2] <> '' THEN
    PERFORM pg_notify(TG_ARGV[2], payload);
  END IF;
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
  PERFORM pg_notify(TG_ARGV[1], payload);
  IF TG_ARGV[2] <> '' THEN
    PERFORM pg_notify(TG_ARGV[2], payload);
  END IF;
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
-- `persistent`).
CREATE OR REPLACE FUNCTION apalis_pgmq.want_notify(
  channel text, owner text, seconds double precision, persistent boolean DEFAULT false)
RETURNS void
LANGUAGE sql
AS $$
  INSERT INTO apalis_pgmq.listeners (channel, owner, until, armed, persistent)
  VALUES (channel, owner, clock_timestamp() + make_interval(secs => seconds), true, persistent)
  ON CONFLICT ON CONSTRAINT listeners_pkey
  DO UPDATE SET until = EXCLUDED.until, armed = true, persistent = EXCLUDED.persistent
$$;

CREATE OR REPLACE FUNCTION apalis_pgmq.unwant_notify(channel text, owner text)
RETURNS void
LANGUAGE sql
AS $$
  DELETE FROM apalis_pgmq.listeners l WHERE l.channel = unwant_notify.channel AND l.owner = unwant_notify.owner
$$;

-- After announcing: true once no insert into the queue that skipped notifying is still in
-- flight (the exclusive lock is taken and released at once).
CREATE OR REPLACE FUNCTION apalis_pgmq.inserts_settled(queue_name text)
RETURNS boolean
LANGUAGE sql
AS $$
  SELECT pg_try_advisory_xact_lock(apalis_pgmq.queue_lock_class(), hashtext(queue_name))
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
  IF queue_name IS NULL OR queue_name !~ '^[a-z_][a-z0-9_]{0,46}$' THEN
    RAISE EXCEPTION 'invalid queue name %', quote_literal(coalesce(queue_name, 'NULL'))
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
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
  ELSE
    EXECUTE format(
      'CREATE TRIGGER apalis_notify AFTER INSERT ON pgmq.%I REFERENCING NEW TABLE AS new_rows '
      'FOR EACH STATEMENT EXECUTE FUNCTION apalis_pgmq.notify_batch(%L, %L, %L, %L)',
      qtable, queue_name, queue_channel, coalesce(namespace_channel, ''),
      CASE WHEN mode = 'batch' THEN 'always' ELSE 'on_demand' END);
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
  IF queue_name IS NULL OR queue_name !~ '^[a-z_][a-z0-9_]{0,46}$' THEN
    RAISE EXCEPTION 'invalid queue name %', quote_literal(coalesce(queue_name, 'NULL'))
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
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
  SELECT CASE WHEN (x.tgtype & 1) = 1 THEN 'message'
              WHEN x.a[4] = 'always' THEN 'batch'
              ELSE 'on_demand' END,
         x.a
    FROM (SELECT t.tgtype,
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
