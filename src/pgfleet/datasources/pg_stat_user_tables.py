"""pg_stat_user_tables and pg_statio_user_tables, per database.

The columns are the views', but read straight from pg_class, pg_namespace and
pg_index with the pg_stat_get_* functions the views call: one pass over the
catalog rather than two views that each aggregate over pg_index, joined.

``size`` is ``relpages`` of the table and of its TOAST table, times the block
size: as of the last VACUUM, ANALYZE or CREATE INDEX of the table (0 until the
first), leaving out the free space and visibility maps and the TOAST index
that ``pg_table_size()`` counts.  No relation is opened, so no lock is taken:
``pg_table_size()`` locked every table in turn, queued behind any pending
ALTER TABLE, and stat()ed every file of every table.
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
        # Added later: last, as the transient table has them.
        Column("last_vacuum", "timestamptz", "gauge"),
        Column("last_analyze", "timestamptz", "gauge"),
    ),
    queries={130000: "pg_stat_user_tables.sql"},
    per_database=True,
    scope="datname",
    priority=20,
    description="scans, tuple changes, vacuums and block I/O per table",
)
