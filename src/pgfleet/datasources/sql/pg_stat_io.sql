-- PostgreSQL 16 and 17: bytes are operations times op_bytes, both numeric so
-- that * is exactly pg_catalog's numeric one (see datasources/__init__.py).
SELECT pg_catalog.now() AS ts, backend_type, object, context, stats_reset,
       reads, reads::numeric * op_bytes::numeric AS read_bytes, read_time,
       writes, writes::numeric * op_bytes::numeric AS write_bytes, write_time,
       writebacks, writeback_time,
       extends, extends::numeric * op_bytes::numeric AS extend_bytes, extend_time,
       hits, evictions, reuses, fsyncs, fsync_time
  FROM pg_catalog.pg_stat_io
