-- apalis-pgmq-notify: priorities. A job's priority is headers.apalis.priority (apalis'
-- TaskBuilder::priority; higher runs first). Read through a function that never fails, so a
-- producer sending a priority that is not a number (or no headers at all, as plain PGMQ clients
-- do) gets the default 0 instead of an error from the index.
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

-- The index a priority claim reads: priority descending, then visibility time. Created per
-- queue by workers and create_queue when Config::priorities is on.
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
