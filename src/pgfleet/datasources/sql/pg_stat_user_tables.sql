SELECT pg_catalog.now() AS ts, pg_catalog.current_database() AS datname,
       t.schemaname, t.relname,
       t.n_live_tup, t.n_dead_tup, t.last_autovacuum, t.last_autoanalyze,
       pg_catalog.pg_table_size(t.relid) AS size,
       t.seq_scan, t.seq_tup_read, t.idx_scan, t.idx_tup_fetch,
       t.n_tup_ins, t.n_tup_upd, t.n_tup_del, t.n_tup_hot_upd,
       t.vacuum_count, t.autovacuum_count, t.analyze_count, t.autoanalyze_count,
       io.heap_blks_read, io.heap_blks_hit, io.idx_blks_read, io.idx_blks_hit,
       io.toast_blks_read, io.toast_blks_hit
  FROM pg_catalog.pg_stat_user_tables t
  LEFT JOIN pg_catalog.pg_statio_user_tables io USING (relid)
