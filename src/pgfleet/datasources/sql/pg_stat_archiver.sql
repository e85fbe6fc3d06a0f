SELECT pg_catalog.now() AS ts, stats_reset, archived_count, failed_count,
       last_archived_wal, last_archived_time, last_failed_wal, last_failed_time
  FROM pg_catalog.pg_stat_archiver
