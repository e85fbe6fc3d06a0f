-- PostgreSQL 14 to 16: no inactive_since nor invalidation_reason.
WITH pos AS (
    SELECT CASE WHEN pg_is_in_recovery()
                THEN greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())
                ELSE pg_current_wal_lsn() END AS lsn
)
SELECT now() AS ts, s.slot_name, s.slot_type, s.plugin, s.database, s.temporary,
       s.active, s.wal_status, s.safe_wal_size,
       (pos.lsn - s.restart_lsn)::bigint AS retained_bytes,
       (pos.lsn - s.confirmed_flush_lsn)::bigint AS confirmed_flush_lag_bytes,
       age(s.xmin) AS xmin_age, age(s.catalog_xmin) AS catalog_xmin_age,
       NULL::timestamptz AS inactive_since, NULL::text AS invalidation_reason
  FROM pg_replication_slots s CROSS JOIN pos
