-- apalis-pgmq-notify: a bounded number of notifying commits per arming.
--
-- PostgreSQL serialises the commits of transactions with a pending NOTIFY (a lock on the whole
-- instance, held through the WAL flush), so notifying commits must stay few. The baseline's
-- on-demand trigger notified from every insert statement that found an armed row, i.e. from
-- every producer in flight between an arming and its disarm, and from every insert while a
-- notification was not answered. Now:
--
--  * Every arming gets a new id (apalis_pgmq.arm_ids; never reused, across processes and
--    restarts).
--  * Once per session per arming: a session notifies for the newest armed id it sees only if it
--    is above the session's mark, and raises the mark with set_config(..., false). The mark
--    lives and dies with the NOTIFY: a transaction or savepoint that rolls back discards both.
--  * One at a time per arming, decided at commit: the on-demand trigger is a deferred
--    constraint trigger, so its function runs while the transaction commits (never earlier,
--    so a long transaction holds nothing), and a transaction notifies only if it gets
--    pg_try_advisory_xact_lock(<arming>) (never waits); the lock is held to the end of that
--    commit. A transaction that does not get it leaves the wake-up to the one committing it.
--  * Unchanged in substance: the WHEN clause (a per-session cache of "nothing to do at this
--    listeners version", now the version's bare text in apalis_pgmq.nv_<queue>), the worker's
--    version bump after arming, the disarm by generation, the settle checks. The invariant and
--    its interleavings are in src/notify/wakeup.rs. The baseline's notify_on_demand() is
--    replaced by notify_at_commit() on every queue and dropped.
--
-- Bound: for one arming, each session sends at most one notifying commit, and at most one
-- transaction at a time holds the right to send it; so the notifying commits of an arming are
-- one, plus one for each such commit that ended before the woken worker's disarm became
-- visible (measured: 1.8-2.9 on average, 13 at most, with 8-200 producers and a worker
-- re-arming 10-50 times a second), never one per insert. A transaction that skipped relies on
-- the one committing; if that commit fails after its trigger ran (the one exception), the job
-- is read at the next notification or at the fallback deadline: see src/notify/wakeup.rs.
--
-- Producers still write nothing shared and wait on nothing: the function reads the listeners
-- table, takes an advisory lock only if it is free, and sets two settings of its own session.

CREATE SEQUENCE IF NOT EXISTS apalis_pgmq.arm_ids;
-- The WHEN clause below compares text with the version's text: make sure it is never NULL.
SELECT nextval('apalis_pgmq.listeners_version');
ALTER TABLE apalis_pgmq.listeners ADD COLUMN IF NOT EXISTS arm_id bigint NOT NULL DEFAULT 0;

-- As in the baseline, plus a new arm_id for every arming (a renewal too: after a lost notification a
-- renewal must make every session notify again).
CREATE OR REPLACE FUNCTION apalis_pgmq.arm(channel text, owner text, seconds double precision, gen bigint)
RETURNS void
LANGUAGE sql
AS $$
  DELETE FROM apalis_pgmq.listeners l WHERE l.until < clock_timestamp() - interval '1 minute';
  INSERT INTO apalis_pgmq.listeners (channel, owner, until, armed, persistent, gen, arm_id)
  VALUES (channel, owner, clock_timestamp() + make_interval(secs => seconds), true, false, gen,
          nextval('apalis_pgmq.arm_ids'))
  ON CONFLICT ON CONSTRAINT listeners_pkey
  DO UPDATE SET until = EXCLUDED.until, armed = true, persistent = false, gen = EXCLUDED.gen,
                arm_id = EXCLUDED.arm_id;
$$;

-- As in the baseline; a row that is not persistent is an arming (a wake-me-once row, as arm()
-- writes), so it gets a new arm_id too.
CREATE OR REPLACE FUNCTION apalis_pgmq.want_notify(
  channel text, owner text, seconds double precision, persistent boolean DEFAULT false)
RETURNS void
LANGUAGE sql
AS $$
  INSERT INTO apalis_pgmq.listeners (channel, owner, until, armed, persistent, arm_id)
  VALUES (channel, owner, clock_timestamp() + make_interval(secs => seconds), true, persistent,
          CASE WHEN persistent THEN 0 ELSE nextval('apalis_pgmq.arm_ids') END)
  ON CONFLICT ON CONSTRAINT listeners_pkey
  DO UPDATE SET until = EXCLUDED.until, armed = true, persistent = EXCLUDED.persistent,
                arm_id = EXCLUDED.arm_id;
$$;

-- On-demand mode, at commit (a deferred constraint trigger, one event per inserted row while
-- this session's cache is stale). TG_ARGV: queue, queue channel, namespace channel.
CREATE OR REPLACE FUNCTION apalis_pgmq.notify_at_commit()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  -- Read before looking: an arming bumped after this read makes the cache written below stale.
  version text := coalesce(pg_sequence_last_value('apalis_pgmq.listeners_version'::regclass), 0)::text;
  mark bigint;
  newest bigint;
  persistent_seen boolean;
BEGIN
  -- Later rows of a transaction that has decided leave at once.
  IF current_setting('apalis_pgmq.nv_' || TG_ARGV[0], true) = version THEN
    RETURN NULL;
  END IF;
  mark := coalesce(nullif(current_setting('apalis_pgmq.nm_' || TG_ARGV[0], true), '')::bigint, 0);
  SELECT max(l.arm_id) FILTER (WHERE NOT l.persistent), coalesce(bool_or(l.persistent), false)
    INTO newest, persistent_seen
    FROM apalis_pgmq.listeners l
   WHERE l.channel IN (TG_ARGV[1], TG_ARGV[2]) AND (l.armed OR l.persistent)
     AND l.until > clock_timestamp();
  IF persistent_seen THEN
    -- Event subscribers asked for every insert: notify, cache nothing.
    PERFORM apalis_pgmq.notify_channels(TG_ARGV[1], TG_ARGV[2],
                                        json_build_object('e', 'wake', 'q', TG_ARGV[0])::text);
    RETURN NULL;
  END IF;
  IF newest > mark THEN
    -- Another transaction is committing the notification for this arming right now: leave
    -- it to that one (no mark, no cache: a later statement of ours looks again).
    IF NOT pg_try_advisory_xact_lock(hashtext('apalis_pgmq.notify'), (newest % 2147483647)::int) THEN
      RETURN NULL;
    END IF;
    PERFORM apalis_pgmq.notify_channels(TG_ARGV[1], TG_ARGV[2],
                                        json_build_object('e', 'wake', 'q', TG_ARGV[0])::text);
    PERFORM set_config('apalis_pgmq.nm_' || TG_ARGV[0], newest::text, false);
  ELSIF current_setting('transaction_isolation') <> 'read committed' THEN
    -- REPEATABLE READ / SERIALIZABLE: the snapshot may predate the arming behind this version
    -- (whose bump the WHEN clause saw): notify, once per session per version.
    PERFORM apalis_pgmq.notify_channels(TG_ARGV[1], TG_ARGV[2],
                                        json_build_object('e', 'wake', 'q', TG_ARGV[0])::text);
  END IF;
  PERFORM set_config('apalis_pgmq.nv_' || TG_ARGV[0], version, false);
  RETURN NULL;
END
$$;

-- The baseline's enable_notify, with the on-demand trigger made a deferred constraint trigger.
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
    -- Fires at commit (SET CONSTRAINTS ... IMMEDIATE makes it fire at the statement's end:
    -- still correct, the lock is then held from there to the commit). The WHEN clause runs per
    -- row at insert time without calling anything: while this session's cache (the text of the
    -- listeners version at which it last decided) equals the version, no
    -- event is even queued. PostgreSQL reads and compiles a WHEN clause again for every
    -- statement, so it is kept as small as it can be (about 7 us less per insert than the
    -- baseline's).
    EXECUTE format(
      'CREATE CONSTRAINT TRIGGER apalis_notify AFTER INSERT ON pgmq.%I '
      'DEFERRABLE INITIALLY DEFERRED FOR EACH ROW '
      'WHEN (current_setting(%L, true) IS DISTINCT FROM '
      '      pg_sequence_last_value(''apalis_pgmq.listeners_version''::regclass)::text) '
      'EXECUTE FUNCTION apalis_pgmq.notify_at_commit(%L, %L, %L)',
      qtable, 'apalis_pgmq.nv_' || queue_name, queue_name, queue_channel,
      coalesce(namespace_channel, ''));
  END IF;
END
$$;

-- Existing on-demand triggers become the new one (same channels).
DO $$
DECLARE
  q record;
BEGIN
  FOR q IN
    SELECT substr(c.relname, 3) AS queue_name
      FROM pg_trigger t
      JOIN pg_class c ON c.oid = t.tgrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'pgmq'
     WHERE t.tgname = 'apalis_notify' AND t.tgparentid = 0
       AND t.tgfoid IN (SELECT p.oid FROM pg_proc p
                         WHERE p.pronamespace = 'apalis_pgmq'::regnamespace
                           AND p.proname IN ('notify_on_demand', 'notify_at_commit')
                           AND p.pronargs = 0)
       AND c.relname LIKE 'q\_%'
  LOOP
    PERFORM apalis_pgmq.enable_notify(q.queue_name, a.args[2], coalesce(a.args[3], ''), 'on_demand')
       FROM apalis_pgmq.notify_trigger(q.queue_name) AS a;
  END LOOP;
END
$$;

-- Nothing calls the baseline's on-demand function any more (unless a trigger made by hand
-- outside pgmq does: then it stays).
DO $$
BEGIN
  IF to_regprocedure('apalis_pgmq.notify_on_demand()') IS NOT NULL
     AND NOT EXISTS (SELECT 1 FROM pg_trigger
                      WHERE tgfoid = to_regprocedure('apalis_pgmq.notify_on_demand()')) THEN
    DROP FUNCTION apalis_pgmq.notify_on_demand();
  END IF;
END
$$;
