-- apalis-pgmq-notify: a producer's insert calls no function while nobody waits on its queue.
--
-- 0003's trigger ran a function on every insert statement (a read of the listeners table):
-- about 30 % of a CPU-bound producer. Now the trigger's WHEN clause compares a per-session
-- cache ("nobody waits on this queue", at a version) with the version of the listeners, read
-- from a sequence without calling any function of ours; only when they differ does the
-- function run, look, notify or refresh the cache. Still nothing is written and no lock is
-- taken that another session holds: the version is bumped by the *worker*, after its arming
-- has committed (apalis_pgmq.listeners_changed()), so a producer that reads the new version
-- also sees the arming. The race with an insert already past its WHEN clause when the worker
-- arms is closed as before by the worker's settle checks (see src/notify/wakeup.rs).
--
-- Any role may read the version (it is only a counter), so a PGMQ-only producer still needs no
-- grant in apalis_pgmq; bumping it goes through a SECURITY DEFINER function.
GRANT SELECT ON SEQUENCE apalis_pgmq.listeners_version TO PUBLIC;

CREATE OR REPLACE FUNCTION apalis_pgmq.listeners_changed()
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT nextval('apalis_pgmq.listeners_version') $$;

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

DO $$
DECLARE
  r record;
BEGIN
  FOR r IN
    SELECT substr(c.relname, 3) AS queue_name, x.args
      FROM pg_trigger t
      JOIN pg_class c ON c.oid = t.tgrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
      CROSS JOIN LATERAL apalis_pgmq.notify_trigger(substr(c.relname, 3)) AS x
     WHERE n.nspname = 'pgmq' AND t.tgname = 'apalis_notify'
       AND t.tgfoid = 'apalis_pgmq.notify_on_demand()'::regprocedure
  LOOP
    PERFORM apalis_pgmq.enable_notify(r.queue_name, r.args[2], coalesce(r.args[3], ''), 'on_demand');
  END LOOP;
END
$$;
