-- PostgreSQL 16 and 17: bytes are operations times op_bytes.
SELECT now() AS ts, backend_type, object, context, stats_reset,
       reads, reads * op_bytes::numeric AS read_bytes, read_time,
       writes, writes * op_bytes::numeric AS write_bytes, write_time,
       writebacks, writeback_time,
       extends, extends * op_bytes::numeric AS extend_bytes, extend_time,
       hits, evictions, reuses, fsyncs, fsync_time
  FROM pg_stat_io
