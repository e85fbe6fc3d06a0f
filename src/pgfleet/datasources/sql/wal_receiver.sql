-- pg_stat_wal_receiver is empty on a primary, so this returns no row there.
-- Not its conninfo (PostgreSQL masks the password in it, but not the rest).
SELECT pg_catalog.now() AS ts, w.status, w.sender_host, w.sender_port, w.slot_name,
       (w.latest_end_lsn - w.flushed_lsn)::bigint AS receive_lag_bytes,
       (w.flushed_lsn - pg_catalog.pg_last_wal_replay_lsn())::bigint AS replay_lag_bytes,
       CASE WHEN pg_catalog.pg_last_wal_replay_lsn() >= w.flushed_lsn THEN 0
            ELSE extract(epoch FROM pg_catalog.now() - pg_catalog.pg_last_xact_replay_timestamp())
       END::double precision AS replay_lag
  FROM pg_catalog.pg_stat_wal_receiver w
