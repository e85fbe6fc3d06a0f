-- PostgreSQL 18 and later: writes and syncs are in pg_stat_io (object 'wal').
SELECT pg_catalog.now() AS ts, stats_reset,
       wal_records, wal_fpi, wal_bytes, wal_buffers_full,
       NULL::bigint AS wal_write, NULL::bigint AS wal_sync,
       NULL::double precision AS wal_write_time, NULL::double precision AS wal_sync_time
  FROM pg_catalog.pg_stat_wal
