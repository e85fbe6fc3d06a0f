"""pg_stat_archiver, a single row: WAL archiving progress and failures."""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="pg_stat_archiver",
    columns=(
        Column("stats_reset", "timestamptz", "epoch"),
        Column("archived_count", "bigint", "counter"),
        Column("failed_count", "bigint", "counter"),
        Column("last_archived_wal", "text", "gauge"),
        Column("last_archived_time", "timestamptz", "gauge"),
        Column("last_failed_wal", "text", "gauge"),
        Column("last_failed_time", "timestamptz", "gauge"),
    ),
    queries={130000: "pg_stat_archiver.sql"},
    priority=5,
    description="WAL files archived and archiving failures",
)
