SELECT pg_catalog.now() AS ts, pg_catalog.pg_postmaster_start_time() AS start_time,
       pg_catalog.pg_conf_load_time() AS conf_load_time
