-- apalis-pgmq-notify: operating queues: pause and resume, replay dead letters.

-- A paused queue's workers claim nothing (their claim checks this table; pausing needs no
-- notification and survives restarts). Resuming deletes the row and wakes idle workers.
CREATE TABLE IF NOT EXISTS apalis_pgmq.paused (
  queue text PRIMARY KEY,
  paused_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION apalis_pgmq.pause(queue_name text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM apalis_pgmq.check_queue_name(queue_name);
  INSERT INTO apalis_pgmq.paused (queue) VALUES (queue_name) ON CONFLICT DO NOTHING;
  RETURN FOUND;
END
$$;

CREATE OR REPLACE FUNCTION apalis_pgmq.resume(queue_name text, queue_channel text, namespace_channel text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM apalis_pgmq.check_queue_name(queue_name);
  DELETE FROM apalis_pgmq.paused WHERE queue = queue_name;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  PERFORM apalis_pgmq.notify_channels(queue_channel, namespace_channel,
                                      json_build_object('e', 'wake', 'q', queue_name)::text);
  RETURN true;
END
$$;

-- The headers a replayed dead letter goes back with: without the dead-letter record; with
-- `reset`, without the attempts and error of earlier deliveries (a full budget again);
-- otherwise the attempts continue from where the job died (it gets one more run).
CREATE OR REPLACE FUNCTION apalis_pgmq.replay_headers(headers jsonb, reset boolean)
RETURNS jsonb
LANGUAGE sql
IMMUTABLE
AS $$
  SELECT CASE
    WHEN headers IS NULL OR jsonb_typeof(headers) <> 'object' THEN headers
    WHEN reset THEN
      CASE WHEN jsonb_typeof(headers->'apalis') = 'object'
           THEN (headers - 'apalis_dead_letter')
                || jsonb_build_object('apalis', (headers->'apalis')
                     - 'attempts' - 'last_error' - 'failed_at' - 'failed_epoch')
           ELSE headers - 'apalis_dead_letter' END
    ELSE
      (headers - 'apalis_dead_letter')
      || CASE WHEN jsonb_typeof(headers->'apalis_dead_letter'->'attempts') = 'number'
              THEN jsonb_build_object('apalis',
                     (CASE WHEN jsonb_typeof(headers->'apalis') = 'object' THEN headers->'apalis'
                           ELSE '{}'::jsonb END)
                     || jsonb_build_object('attempts', headers->'apalis_dead_letter'->'attempts'))
              ELSE '{}'::jsonb END
  END
$$;
