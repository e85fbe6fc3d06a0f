-- PostgreSQL 14 to 16: everything in pg_stat_bgwriter.
SELECT pg_catalog.now() AS ts, stats_reset,
       checkpoints_timed, checkpoints_req, NULL::bigint AS checkpoints_done,
       NULL::bigint AS restartpoints_timed, NULL::bigint AS restartpoints_req,
       NULL::bigint AS restartpoints_done,
       buffers_checkpoint, NULL::bigint AS slru_written, buffers_clean, maxwritten_clean,
       buffers_backend, buffers_backend_fsync, buffers_alloc,
       checkpoint_write_time, checkpoint_sync_time
  FROM pg_catalog.pg_stat_bgwriter
