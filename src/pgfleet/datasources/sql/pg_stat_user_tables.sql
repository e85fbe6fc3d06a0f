-- pg_stat_user_tables and pg_statio_user_tables, in one pass over the catalog:
-- the pg_stat_get_* functions those views call, for the relations they list
-- (r, m and p outside pg_catalog, information_schema and pg_toast*), with the
-- same NULLs (no index, no TOAST table; no block I/O for a partitioned table).
-- size is relpages, heap plus TOAST: no relation is opened, so no lock is taken.
SELECT pg_catalog.now() AS ts, pg_catalog.current_database() AS datname,
       n.nspname AS schemaname, c.relname,
       pg_catalog.pg_stat_get_live_tuples(c.oid) AS n_live_tup,
       pg_catalog.pg_stat_get_dead_tuples(c.oid) AS n_dead_tup,
       pg_catalog.pg_stat_get_last_autovacuum_time(c.oid) AS last_autovacuum,
       pg_catalog.pg_stat_get_last_autoanalyze_time(c.oid) AS last_autoanalyze,
       -- relpages is -1 for a partitioned table.
       (GREATEST(c.relpages, 0)::bigint + COALESCE(t.relpages, 0)::bigint)
         * pg_catalog.current_setting('block_size')::bigint AS size,
       pg_catalog.pg_stat_get_numscans(c.oid) AS seq_scan,
       pg_catalog.pg_stat_get_tuples_returned(c.oid) AS seq_tup_read,
       i.idx_scan,
       i.idx_tup_fetch + pg_catalog.pg_stat_get_tuples_fetched(c.oid) AS idx_tup_fetch,
       pg_catalog.pg_stat_get_tuples_inserted(c.oid) AS n_tup_ins,
       pg_catalog.pg_stat_get_tuples_updated(c.oid) AS n_tup_upd,
       pg_catalog.pg_stat_get_tuples_deleted(c.oid) AS n_tup_del,
       pg_catalog.pg_stat_get_tuples_hot_updated(c.oid) AS n_tup_hot_upd,
       pg_catalog.pg_stat_get_vacuum_count(c.oid) AS vacuum_count,
       pg_catalog.pg_stat_get_autovacuum_count(c.oid) AS autovacuum_count,
       pg_catalog.pg_stat_get_analyze_count(c.oid) AS analyze_count,
       pg_catalog.pg_stat_get_autoanalyze_count(c.oid) AS autoanalyze_count,
       -- pg_statio_user_tables leaves partitioned tables out.
       CASE WHEN c.relkind <> 'p'::pg_catalog."char" THEN
           pg_catalog.pg_stat_get_blocks_fetched(c.oid) - pg_catalog.pg_stat_get_blocks_hit(c.oid)
       END AS heap_blks_read,
       CASE WHEN c.relkind <> 'p'::pg_catalog."char" THEN
           pg_catalog.pg_stat_get_blocks_hit(c.oid)
       END AS heap_blks_hit,
       CASE WHEN c.relkind <> 'p'::pg_catalog."char" THEN i.idx_blks_read END AS idx_blks_read,
       CASE WHEN c.relkind <> 'p'::pg_catalog."char" THEN i.idx_blks_hit END AS idx_blks_hit,
       pg_catalog.pg_stat_get_blocks_fetched(t.oid) - pg_catalog.pg_stat_get_blocks_hit(t.oid)
         AS toast_blks_read,
       pg_catalog.pg_stat_get_blocks_hit(t.oid) AS toast_blks_hit,
       pg_catalog.pg_stat_get_last_vacuum_time(c.oid) AS last_vacuum,
       pg_catalog.pg_stat_get_last_analyze_time(c.oid) AS last_analyze
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_catalog.pg_class t ON t.oid = c.reltoastrelid
  -- Per table rather than grouped over all of pg_index: as fast, and it skips
  -- the catalogs' indexes.
  LEFT JOIN LATERAL (
      SELECT pg_catalog.sum(pg_catalog.pg_stat_get_numscans(x.indexrelid))::bigint AS idx_scan,
             pg_catalog.sum(pg_catalog.pg_stat_get_tuples_fetched(x.indexrelid))::bigint
               AS idx_tup_fetch,
             pg_catalog.sum(pg_catalog.pg_stat_get_blocks_fetched(x.indexrelid)
                            - pg_catalog.pg_stat_get_blocks_hit(x.indexrelid))::bigint
               AS idx_blks_read,
             pg_catalog.sum(pg_catalog.pg_stat_get_blocks_hit(x.indexrelid))::bigint
               AS idx_blks_hit
        FROM pg_catalog.pg_index x
       WHERE x.indrelid = c.oid
  ) i ON true
 WHERE c.relkind IN ('r'::pg_catalog."char", 'm'::pg_catalog."char", 'p'::pg_catalog."char")
   AND n.nspname <> 'pg_catalog'::pg_catalog.name
   AND n.nspname <> 'information_schema'::pg_catalog.name
   AND n.nspname !~ '^pg_toast'::pg_catalog.text
