-- apalis-pgmq-notify: job results. With Config::store_results (or for a job pushed by
-- push_and_wait), the statement that writes a job's final outcome also writes its result here
-- and notifies the queue's results channel, so waiters (WaitForCompletion, push_and_wait) wake
-- without polling. Only final outcomes: done, killed, and failed with no attempts left.
CREATE TABLE IF NOT EXISTS apalis_pgmq.results (
  queue text NOT NULL,
  msg_id bigint NOT NULL,
  -- The id the producer chose for the job (headers.apalis.task_id), when it is not the message
  -- id.
  job_id text,
  status text NOT NULL CHECK (status IN ('Done', 'Failed', 'Killed')),
  attempt integer NOT NULL,
  -- The handler's output as JSON (Done), or NULL.
  result jsonb,
  -- The error's text (Failed, Killed; or why the output could not be kept), or NULL.
  error text,
  finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (queue, msg_id)
);

-- Waiters may ask by the producer's id; only jobs that have one are in this index. It holds the
-- id's SHA-256 (apalis_pgmq.key_hash, 0009), not the id: a btree entry holds at most ~2.7 kB,
-- and a longer id must not make the statement that writes the job's outcome fail.
CREATE INDEX IF NOT EXISTS results_job_idx ON apalis_pgmq.results (queue, apalis_pgmq.key_hash(job_id))
  WHERE job_id IS NOT NULL;
-- Retention deletes what finished long ago: a BRIN index, nearly free to maintain.
CREATE INDEX IF NOT EXISTS results_finished_idx ON apalis_pgmq.results USING brin (finished_at);
