-- pg_current_wal_lsn() raises during recovery: the CASE keeps it out of reach.
-- Names and addresses only: neither the standby's conninfo nor its user.
WITH pos AS (
    SELECT CASE WHEN pg_catalog.pg_is_in_recovery()
                THEN greatest(pg_catalog.pg_last_wal_receive_lsn(),
                              pg_catalog.pg_last_wal_replay_lsn())
                ELSE pg_catalog.pg_current_wal_lsn() END AS lsn
), r AS (
    SELECT r.*, coalesce(pg_catalog.host(r.client_addr), '') AS addr,
           pg_catalog.count(*) OVER (PARTITION BY r.application_name, r.client_addr) AS same
      FROM pg_catalog.pg_stat_replication r
)
SELECT pg_catalog.now() AS ts,
       CASE WHEN r.same > 1 THEN pg_catalog.format('%s [%s]', r.application_name, r.pid)
            ELSE r.application_name END AS application_name,
       r.addr AS client_addr, r.pid, r.state, r.sync_state,
       (pos.lsn - r.sent_lsn)::bigint AS sent_lag_bytes,
       (pos.lsn - r.write_lsn)::bigint AS write_lag_bytes,
       (pos.lsn - r.flush_lsn)::bigint AS flush_lag_bytes,
       (pos.lsn - r.replay_lsn)::bigint AS replay_lag_bytes,
       extract(epoch FROM r.write_lag)::double precision AS write_lag,
       extract(epoch FROM r.flush_lag)::double precision AS flush_lag,
       extract(epoch FROM r.replay_lag)::double precision AS replay_lag
  FROM r CROSS JOIN pos
