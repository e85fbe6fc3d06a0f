-- PostgreSQL 16 and later.
SELECT pg_catalog.now() AS ts, d.datname, d.stats_reset, d.numbackends,
       d.xact_commit, d.xact_rollback, d.blks_read, d.blks_hit, d.tup_returned,
       d.tup_fetched, d.tup_inserted, d.tup_updated, d.tup_deleted, d.conflicts,
       d.temp_files, d.temp_bytes, d.deadlocks, d.checksum_failures,
       d.sessions, d.sessions_abandoned, d.sessions_fatal, d.sessions_killed,
       c.confl_tablespace, c.confl_lock, c.confl_snapshot, c.confl_bufferpin,
       c.confl_deadlock, c.confl_active_logicalslot,
       d.blk_read_time, d.blk_write_time, d.session_time, d.active_time,
       d.idle_in_transaction_time
  FROM pg_catalog.pg_stat_database d
  LEFT JOIN pg_catalog.pg_stat_database_conflicts c USING (datid)
 WHERE d.datname IS NOT NULL
