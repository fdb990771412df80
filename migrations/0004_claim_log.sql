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
-- (`xmin` = the claim's transaction): a message anyone has touched since (a renewal, an
-- outcome, a claim by another worker after the lease ended) is left alone. The read the claim
-- counted is given back, as a worker's release does. Rows past `until` are of no use and are
-- deleted by the workers (a few thousand at a time, skipping rows another worker is deleting).
-- Workers need INSERT, SELECT and DELETE on it.

CREATE TABLE IF NOT EXISTS apalis_pgmq.claim_log (
  token      uuid        NOT NULL,
  claimed_by xid8        NOT NULL,
  ids        bigint[]    NOT NULL,
  until      timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS claim_log_token_idx ON apalis_pgmq.claim_log (token);
REVOKE ALL ON apalis_pgmq.claim_log FROM PUBLIC;
