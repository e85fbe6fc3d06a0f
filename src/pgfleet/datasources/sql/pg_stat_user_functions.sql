SELECT pg_catalog.now() AS ts, pg_catalog.current_database() AS datname,
       f.funcid::bigint AS funcid, f.schemaname, f.funcname,
       pg_catalog.oidvectortypes(p.proargtypes) AS arguments,
       f.calls, f.total_time, f.self_time
  FROM pg_catalog.pg_stat_user_functions f
  LEFT JOIN pg_catalog.pg_proc p ON p.oid = f.funcid
