SELECT now() AS ts, current_database() AS datname, f.funcid::bigint AS funcid,
       f.schemaname, f.funcname, oidvectortypes(p.proargtypes) AS arguments,
       f.calls, f.total_time, f.self_time
  FROM pg_stat_user_functions f
  LEFT JOIN pg_proc p ON p.oid = f.funcid
