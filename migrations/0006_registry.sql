-- apalis-pgmq-notify: the worker registry, and an index to find dead letters by their job id.
--
-- Every running worker has a row, written when it starts, refreshed by its process's heartbeat
-- (one statement for all of a process's workers) and deleted when it stops cleanly. A row whose
-- process died stops being listed at expires_at and is swept a minute later by any heartbeat.
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

-- Dead letters keep their job's id in headers.apalis_dead_letter.msg_id: index it per
-- dead-letter queue so a job can be found by id once dead (called when a queue is created).
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

-- A failed delivery also records its time as a number (seconds since the epoch), which status
-- queries compare with last_read_at without parsing text: a retrying job failed after its last
-- read; a running one was read after its last failure.
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
