-- PostgreSQL 14 to 17.
SELECT pg_catalog.now() AS ts, stats_reset,
       wal_records, wal_fpi, wal_bytes, wal_buffers_full,
       wal_write, wal_sync, wal_write_time, wal_sync_time
  FROM pg_catalog.pg_stat_wal
