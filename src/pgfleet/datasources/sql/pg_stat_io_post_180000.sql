-- PostgreSQL 18 and later: byte counters of their own, no op_bytes.
SELECT pg_catalog.now() AS ts, backend_type, object, context, stats_reset,
       reads, read_bytes, read_time,
       writes, write_bytes, write_time,
       writebacks, writeback_time,
       extends, extend_bytes, extend_time,
       hits, evictions, reuses, fsyncs, fsync_time
  FROM pg_catalog.pg_stat_io
