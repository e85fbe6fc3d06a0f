"""pg_stat_io (PostgreSQL 16+): one row per (backend_type, object, context).

PostgreSQL 18 replaced ``op_bytes`` by ``read_bytes``/``write_bytes``/
``extend_bytes``; on 16 and 17 we compute them as operations times
``op_bytes`` (always the block size there), so the byte counters mean the
same on every version.  Combinations a backend type cannot do have NULL
counters, as in the view.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="pg_stat_io",
    columns=(
        Column("backend_type", "text", "key"),
        Column("object", "text", "key"),
        Column("context", "text", "key"),
        Column("stats_reset", "timestamptz", "epoch"),
        Column("reads", "bigint", "counter"),
        Column("read_bytes", "numeric", "counter"),
        Column("read_time", "double precision", "counter"),
        Column("writes", "bigint", "counter"),
        Column("write_bytes", "numeric", "counter"),
        Column("write_time", "double precision", "counter"),
        Column("writebacks", "bigint", "counter"),
        Column("writeback_time", "double precision", "counter"),
        Column("extends", "bigint", "counter"),
        Column("extend_bytes", "numeric", "counter"),
        Column("extend_time", "double precision", "counter"),
        Column("hits", "bigint", "counter"),
        Column("evictions", "bigint", "counter"),
        Column("reuses", "bigint", "counter"),
        Column("fsyncs", "bigint", "counter"),
        Column("fsync_time", "double precision", "counter"),
    ),
    queries={160000: "pg_stat_io.sql", 180000: "pg_stat_io_post_180000.sql"},
    priority=4,
    description="reads, writes, extends, hits and fsyncs per backend type, object and context",
)
