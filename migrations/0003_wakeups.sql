-- apalis-pgmq-notify: wake-ups that never block producers (replaces 0002's on-demand protocol).
--
-- The protocol is documented, interleaving by interleaving, in src/notify/wakeup.rs. In short:
-- an idle worker arms its own row in apalis_pgmq.listeners; a producer's statement-level trigger
-- only *reads* whether an armed row exists and, if so, sends one NOTIFY; the woken worker
-- disarms its own row. Producers never write a shared row, never take a lock another session
-- holds, and so never wait on one another or deadlock because of this crate.
--
-- While nobody waits on a queue its trigger's function is not even called: 0002's WHEN clause
-- compares a per-session cache ("nobody waits on this queue", at a version) with the version of
-- the listeners, a sequence. The version is bumped by the *worker*, after its arming has
-- committed (apalis_pgmq.listeners_changed()), so a producer that reads the new version also
-- sees the arming; an insert already past its WHEN clause when the worker arms is covered by
-- the worker's settle checks (see src/notify/wakeup.rs).
--
-- Every function a producer's insert can reach is SECURITY DEFINER with a fixed search_path,
-- owned by the role that ran setup(), and the version is readable by any role: a role with
-- PGMQ's rights on pgmq.q_<queue> only can insert, trigger installed or not, without any grant
-- in schema apalis_pgmq. 0002's triggers and enable_notify stay as they are: this replaces the
-- functions they call.

-- The arming generation: a worker's disarm only clears the arming it answered, never a newer one.
ALTER TABLE apalis_pgmq.listeners ADD COLUMN IF NOT EXISTS gen bigint NOT NULL DEFAULT 0;

-- Any role may read the version (it is only a counter); bumping it goes through a SECURITY
-- DEFINER function.
GRANT SELECT ON SEQUENCE apalis_pgmq.listeners_version TO PUBLIC;

CREATE OR REPLACE FUNCTION apalis_pgmq.listeners_changed()
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT nextval('apalis_pgmq.listeners_version') $$;

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

-- Event subscribers: a persistent row (every insert notifies) for `seconds`.
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

-- After arming (committed): whether every transaction that had written to the queue table
-- before has ended (none but this session holds RowExclusiveLock on it). Read-only.
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
