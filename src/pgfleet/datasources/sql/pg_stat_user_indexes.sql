SELECT pg_catalog.now() AS ts, pg_catalog.current_database() AS datname,
       i.schemaname, i.relname, i.indexrelname,
       pg_catalog.pg_relation_size(i.indexrelid) AS size,
       i.idx_scan, i.idx_tup_read, i.idx_tup_fetch, io.idx_blks_read, io.idx_blks_hit
  FROM pg_catalog.pg_stat_user_indexes i
  LEFT JOIN pg_catalog.pg_statio_user_indexes io USING (indexrelid)
