"""pg_replication_slots: one row per slot.

``retained_bytes`` is the WAL the slot holds back: the current WAL position
minus ``restart_lsn``.  On a standby the current position is the last WAL
received or replayed, whichever is further (``pg_current_wal_lsn()`` raises
there): received WAL is on disk too.  ``confirmed_flush_lag_bytes`` is the
same distance for a logical slot's consumer.  ``xmin_age`` and
``catalog_xmin_age`` (in transactions) show slots holding back vacuum.
``inactive_since`` and ``invalidation_reason`` appear in PostgreSQL 17.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="replication_slots",
    columns=(
        Column("slot_name", "text", "key"),
        Column("slot_type", "text", "gauge"),
        Column("plugin", "text", "gauge"),
        Column("database", "text", "gauge"),
        Column("temporary", "boolean", "gauge"),
        Column("active", "boolean", "gauge"),
        Column("wal_status", "text", "gauge"),
        Column("safe_wal_size", "bigint", "gauge"),
        Column("retained_bytes", "bigint", "gauge"),
        Column("confirmed_flush_lag_bytes", "bigint", "gauge"),
        Column("xmin_age", "integer", "gauge"),
        Column("catalog_xmin_age", "integer", "gauge"),
        Column("inactive_since", "timestamptz", "gauge"),
        Column("invalidation_reason", "text", "gauge"),
    ),
    queries={130000: "replication_slots.sql", 170000: "replication_slots_post_170000.sql"},
    priority=5,
    description="replication slots: activity, WAL retained, xmin held back",
)
