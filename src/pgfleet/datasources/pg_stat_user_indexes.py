"""pg_stat_user_indexes joined with pg_statio_user_indexes, per database.

``size`` is ``pg_relation_size()`` of the index: one stat() per segment file.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="pg_stat_user_indexes",
    columns=(
        Column("datname", "text", "key"),
        Column("schemaname", "text", "key"),
        Column("relname", "text", "key"),
        Column("indexrelname", "text", "key"),
        Column("size", "bigint", "gauge"),
        Column("idx_scan", "bigint", "counter"),
        Column("idx_tup_read", "bigint", "counter"),
        Column("idx_tup_fetch", "bigint", "counter"),
        Column("idx_blks_read", "bigint", "counter"),
        Column("idx_blks_hit", "bigint", "counter"),
    ),
    queries={140000: "pg_stat_user_indexes.sql"},
    per_database=True,
    scope="datname",
    priority=20,
    description="scans and block I/O per index",
)
