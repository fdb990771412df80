-- apalis-pgmq-notify: one queue-name rule in SQL and Rust (QueueName): 1 to 43 bytes of
-- [a-z0-9_], starting with a letter or '_'. 0002 allowed 47 bytes here, so the SQL entry points
-- accepted names the Rust API refuses.
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
