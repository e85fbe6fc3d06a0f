-- Counts per database, user, state and wait: no query text, client address
-- or application name leaves the server.
SELECT pg_catalog.now() AS ts, datname, usename, state, wait_event_type, wait_event,
       backend_type,
       pg_catalog.count(*)::integer AS count,
       -- xact_start can be after our own now() (our transaction started first).
       greatest(extract(epoch FROM pg_catalog.max(pg_catalog.now() - xact_start)), 0)::double precision
         AS oldest_xact_seconds
  FROM (SELECT coalesce(datname, '') AS datname, coalesce(usename, '') AS usename,
               coalesce(state, '') AS state, coalesce(wait_event_type, '') AS wait_event_type,
               coalesce(wait_event, '') AS wait_event, coalesce(backend_type, '') AS backend_type,
               xact_start
          FROM pg_catalog.pg_stat_activity
         WHERE pid <> pg_catalog.pg_backend_pid()) a
 GROUP BY datname, usename, state, wait_event_type, wait_event, backend_type
