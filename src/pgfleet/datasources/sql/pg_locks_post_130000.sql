-- PostgreSQL 13: no waitstart, so no longest wait.
-- Counts per database and mode only: no relation, query or process leaves
-- the server.
SELECT pg_catalog.now() AS ts, coalesce(d.datname::pg_catalog.text, '') AS datname, l.mode,
       pg_catalog.count(*) FILTER (WHERE l.granted)::integer AS granted,
       pg_catalog.count(*) FILTER (WHERE NOT l.granted)::integer AS waiting,
       NULL::double precision AS longest_wait_seconds
  FROM pg_catalog.pg_locks l
  LEFT JOIN pg_catalog.pg_database d ON d.oid = l.database
 WHERE l.pid IS DISTINCT FROM pg_catalog.pg_backend_pid()
 GROUP BY coalesce(d.datname::pg_catalog.text, ''), l.mode
