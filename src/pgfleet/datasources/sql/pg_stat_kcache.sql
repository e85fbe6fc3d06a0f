-- pg_stat_kcache 2.2 and later (the "top" column appeared in 2.2.0).
SELECT pg_catalog.now() AS ts, d.datname, r.rolname, k.top AS toplevel, k.queryid,
       k.plan_reads, k.plan_writes, k.plan_minflts, k.plan_majflts,
       k.plan_nvcsws, k.plan_nivcsws,
       k.exec_reads, k.exec_writes, k.exec_minflts, k.exec_majflts,
       k.exec_nvcsws, k.exec_nivcsws,
       k.plan_user_time, k.plan_system_time, k.exec_user_time, k.exec_system_time
  FROM @extschema:pg_stat_kcache@.pg_stat_kcache() k
  JOIN pg_catalog.pg_database d ON d.oid = k.dbid
  JOIN pg_catalog.pg_roles r ON r.oid = k.userid
 WHERE k.queryid IS NOT NULL
