-- apalis-pgmq-notify: what a failed delivery leaves in the message's headers.
--
-- When a delivery fails and the job will run again, the worker records under headers.apalis:
--   attempts   runs so far, counting in-process retries (tower), so the next delivery's Attempt
--              continues from there instead of going back to PGMQ's read_ct;
--   last_error the error's text (NULs escaped, at most 4 KiB);
--   failed_at  when it failed (server time).
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
               'attempts', attempts, 'last_error', last_error, 'failed_at', now()))
           WHEN jsonb_typeof(headers) = 'object' THEN
             headers || jsonb_build_object('apalis',
               (CASE WHEN jsonb_typeof(headers->'apalis') = 'object' THEN headers->'apalis'
                     ELSE '{}'::jsonb END)
               || jsonb_build_object('attempts', attempts, 'last_error', last_error,
                                     'failed_at', now()))
           ELSE headers
         END
$$;
