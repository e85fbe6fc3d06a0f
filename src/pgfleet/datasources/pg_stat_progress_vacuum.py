"""pg_stat_progress_vacuum: the VACUUMs running now, per database.

One row per table being vacuumed (a table is vacuumed by one process at a
time), named in its own database, hence per database: the view lists every
database's, by OID.  Nothing when nothing runs, which is most of the time.

``started`` is when the vacuum of this table began (its backend's
transaction: VACUUM and autovacuum take one transaction per table).
``autovacuum`` tells an autovacuum worker's from a manual VACUUM's, and
``wraparound`` an autovacuum run to prevent wraparound (which cannot be
cancelled and ignores cost limits) -- from the worker's activity text, which
a pg_monitor role can read; only the two booleans leave the server.

PostgreSQL 17 counts dead tuples' memory in bytes (``dead_tuple_bytes``,
``max_dead_tuple_bytes``) and item IDs where 14 to 16 counted tuples
against a maximum (``max_dead_tuples``): ``dead_tuples`` is either, the others
are NULL where a version does not have them.  ``indexes_total`` and
``indexes_processed`` appeared in 17.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="pg_stat_progress_vacuum",
    columns=(
        Column("datname", "text", "key"),
        Column("schemaname", "text", "key"),
        Column("relname", "text", "key"),
        Column("phase", "text", "gauge"),
        Column("autovacuum", "boolean", "gauge"),
        Column("wraparound", "boolean", "gauge"),
        Column("started", "timestamptz", "gauge"),
        Column("heap_blks_total", "bigint", "gauge"),
        Column("heap_blks_scanned", "bigint", "gauge"),
        Column("heap_blks_vacuumed", "bigint", "gauge"),
        Column("index_vacuum_count", "bigint", "gauge"),
        Column("dead_tuples", "bigint", "gauge"),
        Column("max_dead_tuples", "bigint", "gauge"),
        Column("dead_tuple_bytes", "bigint", "gauge"),
        Column("max_dead_tuple_bytes", "bigint", "gauge"),
        Column("indexes_total", "bigint", "gauge"),
        Column("indexes_processed", "bigint", "gauge"),
    ),
    queries={
        130000: "pg_stat_progress_vacuum.sql",
        170000: "pg_stat_progress_vacuum_post_170000.sql",
    },
    per_database=True,
    scope="datname",
    priority=20,
    description="VACUUMs in progress: phase, blocks scanned and vacuumed, dead tuples",
)
