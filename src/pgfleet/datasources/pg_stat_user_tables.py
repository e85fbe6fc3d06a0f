"""pg_stat_user_tables joined with pg_statio_user_tables, per database.

``size`` is ``pg_table_size()`` (heap, TOAST, free space and visibility
maps): one stat() per segment file of each table on every snapshot, cheap
but not free on databases with tens of thousands of tables.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

_COUNTERS = (
    "seq_scan", "seq_tup_read", "idx_scan", "idx_tup_fetch",
    "n_tup_ins", "n_tup_upd", "n_tup_del", "n_tup_hot_upd",
    "vacuum_count", "autovacuum_count", "analyze_count", "autoanalyze_count",
    "heap_blks_read", "heap_blks_hit", "idx_blks_read", "idx_blks_hit",
    "toast_blks_read", "toast_blks_hit",
)  # fmt: skip

DATASOURCE = Datasource(
    module="pg_stat_user_tables",
    columns=(
        Column("datname", "text", "key"),
        Column("schemaname", "text", "key"),
        Column("relname", "text", "key"),
        Column("n_live_tup", "bigint", "gauge"),
        Column("n_dead_tup", "bigint", "gauge"),
        Column("last_autovacuum", "timestamptz", "gauge"),
        Column("last_autoanalyze", "timestamptz", "gauge"),
        Column("size", "bigint", "gauge"),
        *(Column(n, "bigint", "counter") for n in _COUNTERS),
    ),
    queries={140000: "pg_stat_user_tables.sql"},
    per_database=True,
    scope="datname",
    priority=20,
    description="scans, tuple changes, vacuums and block I/O per table",
)
