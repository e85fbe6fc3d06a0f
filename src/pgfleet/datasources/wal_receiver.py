"""pg_stat_wal_receiver, a single row on a streaming standby, none elsewhere.

``receive_lag_bytes`` is how far the WAL flushed here is behind the end of
WAL last reported by the sender; ``replay_lag_bytes`` how far replay is behind
what was received.  ``replay_lag`` (seconds) is the age of the last replayed
transaction, or 0 when everything received is replayed, so that an idle
primary does not look like a lagging standby.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="wal_receiver",
    columns=(
        Column("status", "text", "gauge"),
        Column("sender_host", "text", "gauge"),
        Column("sender_port", "integer", "gauge"),
        Column("slot_name", "text", "gauge"),
        Column("receive_lag_bytes", "bigint", "gauge"),
        Column("replay_lag_bytes", "bigint", "gauge"),
        Column("replay_lag", "double precision", "gauge"),
    ),
    queries={130000: "wal_receiver.sql"},
    priority=5,
    description="state and lag of this standby's WAL receiver",
)
