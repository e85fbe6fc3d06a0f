SELECT now() AS ts, name, setting, unit, source, pending_restart
  FROM pg_settings
 WHERE source NOT IN ('client', 'session')
