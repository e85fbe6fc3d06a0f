-- PostgreSQL 18 and later: pg_stat_checkpointer gained num_done and slru_written.
SELECT pg_catalog.now() AS ts, b.stats_reset,
       c.num_timed AS checkpoints_timed, c.num_requested AS checkpoints_req,
       c.num_done AS checkpoints_done,
       c.restartpoints_timed, c.restartpoints_req, c.restartpoints_done,
       c.buffers_written AS buffers_checkpoint, c.slru_written,
       b.buffers_clean, b.maxwritten_clean,
       NULL::bigint AS buffers_backend, NULL::bigint AS buffers_backend_fsync, b.buffers_alloc,
       c.write_time AS checkpoint_write_time, c.sync_time AS checkpoint_sync_time
  FROM pg_catalog.pg_stat_bgwriter b CROSS JOIN pg_catalog.pg_stat_checkpointer c
