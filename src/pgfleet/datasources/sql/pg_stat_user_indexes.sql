-- pg_stat_user_indexes and pg_statio_user_indexes, in one pass over the
-- catalog: the pg_stat_get_* functions those views call, for the indexes they
-- list (of r and m relations outside pg_catalog, information_schema and pg_toast*).
-- size is relpages: no index is opened, so no lock is taken.
SELECT pg_catalog.now() AS ts, pg_catalog.current_database() AS datname,
       n.nspname AS schemaname, c.relname, i.relname AS indexrelname,
       i.relpages::bigint * pg_catalog.current_setting('block_size')::bigint AS size,
       pg_catalog.pg_stat_get_numscans(i.oid) AS idx_scan,
       pg_catalog.pg_stat_get_tuples_returned(i.oid) AS idx_tup_read,
       pg_catalog.pg_stat_get_tuples_fetched(i.oid) AS idx_tup_fetch,
       pg_catalog.pg_stat_get_blocks_fetched(i.oid) - pg_catalog.pg_stat_get_blocks_hit(i.oid)
         AS idx_blks_read,
       pg_catalog.pg_stat_get_blocks_hit(i.oid) AS idx_blks_hit
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_index x ON x.indrelid = c.oid
  JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid
 WHERE c.relkind IN ('r'::pg_catalog."char", 'm'::pg_catalog."char")
   AND n.nspname <> 'pg_catalog'::pg_catalog.name
   AND n.nspname <> 'information_schema'::pg_catalog.name
   AND n.nspname !~ '^pg_toast'::pg_catalog.text
