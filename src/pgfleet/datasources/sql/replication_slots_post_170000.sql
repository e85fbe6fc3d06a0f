-- PostgreSQL 17 and later.
WITH pos AS (
    SELECT CASE WHEN pg_catalog.pg_is_in_recovery()
                THEN greatest(pg_catalog.pg_last_wal_receive_lsn(),
                              pg_catalog.pg_last_wal_replay_lsn())
                ELSE pg_catalog.pg_current_wal_lsn() END AS lsn
)
SELECT pg_catalog.now() AS ts, s.slot_name, s.slot_type, s.plugin, s.database, s.temporary,
       s.active, s.wal_status, s.safe_wal_size,
       (pos.lsn - s.restart_lsn)::bigint AS retained_bytes,
       (pos.lsn - s.confirmed_flush_lsn)::bigint AS confirmed_flush_lag_bytes,
       pg_catalog.age(s.xmin) AS xmin_age, pg_catalog.age(s.catalog_xmin) AS catalog_xmin_age,
       s.inactive_since, s.invalidation_reason
  FROM pg_catalog.pg_replication_slots s CROSS JOIN pos
