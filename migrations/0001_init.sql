-- apalis-pgmq-notify: initial schema.
-- The schema itself and apalis_pgmq.schema_migrations are created by setup() before this runs.

COMMENT ON SCHEMA apalis_pgmq IS
  'apalis-pgmq-notify: helper functions and migration history; jobs live in PGMQ queues (schema pgmq)';

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
