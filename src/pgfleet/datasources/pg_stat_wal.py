"""pg_stat_wal, a single row.

PostgreSQL 18 moved the write and sync counters to pg_stat_io (object
``wal``); they are NULL here from 18 on.  On a standby most counters stay at
zero: WAL replayed is not WAL generated.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="pg_stat_wal",
    columns=(
        Column("stats_reset", "timestamptz", "epoch"),
        Column("wal_records", "bigint", "counter"),
        Column("wal_fpi", "bigint", "counter"),
        Column("wal_bytes", "numeric", "counter"),
        Column("wal_buffers_full", "bigint", "counter"),
        Column("wal_write", "bigint", "counter"),
        Column("wal_sync", "bigint", "counter"),
        Column("wal_write_time", "double precision", "counter"),  # milliseconds
        Column("wal_sync_time", "double precision", "counter"),
    ),
    queries={140000: "pg_stat_wal.sql", 180000: "pg_stat_wal_post_180000.sql"},
    priority=3,
    description="WAL records, full-page images and bytes generated, WAL buffer pressure",
)
