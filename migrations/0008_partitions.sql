-- apalis-pgmq-notify: pg_partman maintenance of one partitioned table (a partitioned queue's
-- archive): partitions past the retention given to pgmq.create_partitioned are dropped.
CREATE OR REPLACE FUNCTION apalis_pgmq.run_partman_maintenance(parent_table text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  EXECUTE format('SELECT %I.run_maintenance(p_parent_table := %L)',
                 pgmq._get_pg_partman_schema(), parent_table);
END
$$;
