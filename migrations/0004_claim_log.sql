-- apalis-pgmq-notify: claims a worker can find again after losing their answer.
--
-- A worker's claim leases messages in one statement. When its answer is lost after the commit
-- (a failover to a synchronous standby, a connection cut between the commit and the answer, a
-- statement deadline that passed while the server still ran it), the messages stay leased for
-- the whole visibility timeout and nothing runs them: the worker does not know it holds them.
-- So every claim that leases messages also writes one row here, in the same statement: a token
-- the worker chose (random, 128 bits), the claim's transaction id, the ids it leased and when
-- the lease ends. A worker that did not get its claim's answer looks its token up on its next
-- connection (to the new primary after a failover: the row is replicated with the claim) and
-- makes visible again each message whose row version is still the one its claim wrote
-- (`xmin` = the claim's transaction) while the lease runs: a message anyone has touched since
-- (a renewal, an outcome, a claim by another worker after the lease ended) is left alone, and
-- so is one locked by another transaction at that moment. The read the claim
-- counted is given back, as a worker's release does. Rows past `until` are of no use and are
-- deleted by the workers (a few thousand at a time, one worker of the database at a time).
-- Workers need INSERT, SELECT and DELETE on it.

-- The token is the key: a token drawn twice fails the second claim (it is tried again)
-- instead of naming another worker's claim. Rows are inserted in `until` order, so its index
-- grows at its right edge; the pruning reads it.
CREATE TABLE IF NOT EXISTS apalis_pgmq.claim_log (
  token      uuid        PRIMARY KEY,
  claimed_by xid8        NOT NULL,
  ids        bigint[]    NOT NULL,
  until      timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS claim_log_until_idx ON apalis_pgmq.claim_log (until);
REVOKE ALL ON apalis_pgmq.claim_log FROM PUBLIC;
