"""pg_stat_replication: one row per WAL sender (standby, pg_receivewal...).

An entry is identified by ``application_name`` and ``client_addr`` (empty for
a Unix socket), which survive reconnections where ``pid`` does not; when two
senders share both, the pid is appended to the application name so that keys
stay unique.  Lags in bytes are measured against the server's current WAL
position: ``pg_current_wal_lsn()`` on a primary, the last WAL received or
replayed on a cascading standby (where ``pg_current_wal_lsn()`` would raise).
Time lags are in seconds.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="replication",
    columns=(
        Column("application_name", "text", "key"),
        Column("client_addr", "text", "key"),
        Column("pid", "integer", "gauge"),
        Column("state", "text", "gauge"),
        Column("sync_state", "text", "gauge"),
        Column("sent_lag_bytes", "bigint", "gauge"),
        Column("write_lag_bytes", "bigint", "gauge"),
        Column("flush_lag_bytes", "bigint", "gauge"),
        Column("replay_lag_bytes", "bigint", "gauge"),
        Column("write_lag", "double precision", "gauge"),
        Column("flush_lag", "double precision", "gauge"),
        Column("replay_lag", "double precision", "gauge"),
    ),
    queries={130000: "replication.sql"},
    priority=5,
    description="state and lag of each standby streaming from this server",
)
