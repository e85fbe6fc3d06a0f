-- PostgreSQL 13: no session statistics (sessions*, *_time of sessions) yet.
SELECT pg_catalog.now() AS ts, d.datname, d.stats_reset, d.numbackends,
       d.xact_commit, d.xact_rollback, d.blks_read, d.blks_hit, d.tup_returned,
       d.tup_fetched, d.tup_inserted, d.tup_updated, d.tup_deleted, d.conflicts,
       d.temp_files, d.temp_bytes, d.deadlocks, d.checksum_failures,
       NULL::bigint AS sessions, NULL::bigint AS sessions_abandoned,
       NULL::bigint AS sessions_fatal, NULL::bigint AS sessions_killed,
       c.confl_tablespace, c.confl_lock, c.confl_snapshot, c.confl_bufferpin,
       c.confl_deadlock, NULL::bigint AS confl_active_logicalslot,
       d.blk_read_time, d.blk_write_time, NULL::double precision AS session_time,
       NULL::double precision AS active_time, NULL::double precision AS idle_in_transaction_time,
       -- Transactions and multixacts since the oldest not frozen yet: how
       -- close the database is to wraparound (pg_database: no file read).
       pg_catalog.age(b.datfrozenxid) AS xid_age, pg_catalog.mxid_age(b.datminmxid) AS mxid_age
  FROM pg_catalog.pg_stat_database d
  LEFT JOIN pg_catalog.pg_stat_database_conflicts c USING (datid)
  JOIN pg_catalog.pg_database b ON b.oid = d.datid
 WHERE d.datname IS NOT NULL
