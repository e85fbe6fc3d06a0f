-- The database's relations with storage (tables, indexes, TOAST, materialized
-- views, sequences), their pages as of their last VACUUM/ANALYZE/CREATE INDEX
-- (relpages): no relation is opened and no file stat()ed, where
-- pg_database_size() stats every file.
SELECT pg_catalog.now() AS ts, pg_catalog.current_database() AS datname,
       coalesce(pg_catalog.sum(c.relpages::bigint), 0)::bigint
         * pg_catalog.current_setting('block_size')::bigint AS size
  FROM pg_catalog.pg_class c
 WHERE c.relkind IN ('r'::pg_catalog."char", 'i'::pg_catalog."char", 't'::pg_catalog."char",
                     'm'::pg_catalog."char", 'S'::pg_catalog."char")
