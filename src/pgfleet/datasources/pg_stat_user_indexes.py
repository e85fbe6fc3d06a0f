"""pg_stat_user_indexes and pg_statio_user_indexes, per database.

The columns are the views', but read straight from pg_class, pg_namespace and
pg_index with the pg_stat_get_* functions the views call, in one pass.

``size`` is the index's ``relpages`` times the block size: as of the last
VACUUM, ANALYZE, CREATE INDEX or REINDEX.  No index is opened, so no lock is
taken (``pg_relation_size()`` locked each index in turn and stat()ed its files).
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
    queries={130000: "pg_stat_user_indexes.sql"},
    per_database=True,
    scope="datname",
    priority=20,
    description="scans and block I/O per index",
)
