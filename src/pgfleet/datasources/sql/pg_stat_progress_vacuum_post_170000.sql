-- PostgreSQL 17 and later: dead tuples' memory in bytes, item IDs, indexes.
-- This database's vacuums only: relid means something here alone.  A table
-- dropped since is left out (no name).  The backend's activity is read for
-- its own pid only, and only when a vacuum runs.
SELECT pg_catalog.now() AS ts, pg_catalog.current_database() AS datname,
       n.nspname AS schemaname, c.relname, p.phase,
       a.backend_type = 'autovacuum worker' AS autovacuum,
       a.backend_type = 'autovacuum worker'
         AND pg_catalog.strpos(a.query, '(to prevent wraparound)') > 0 AS wraparound,
       a.xact_start AS started,
       p.heap_blks_total, p.heap_blks_scanned, p.heap_blks_vacuumed, p.index_vacuum_count,
       p.num_dead_item_ids AS dead_tuples, NULL::bigint AS max_dead_tuples,
       p.dead_tuple_bytes, p.max_dead_tuple_bytes,
       p.indexes_total, p.indexes_processed
  FROM pg_catalog.pg_stat_progress_vacuum p
  JOIN pg_catalog.pg_class c ON c.oid = p.relid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN LATERAL pg_catalog.pg_stat_get_activity(p.pid) a ON true
 WHERE p.datname = pg_catalog.current_database()
