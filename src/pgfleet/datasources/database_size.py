"""Each database's size, from its catalog: per database, one row.

``size`` is the ``relpages`` of every relation with storage -- tables,
indexes, TOAST tables and their indexes, materialized views, sequences, other
sessions' temporary tables -- times the block size: as of each relation's
last VACUUM, ANALYZE, CREATE INDEX or REINDEX (0 before the first), without
the free space and visibility maps.  Autovacuum keeps it close for tables
that change; a table loaded since its last ANALYZE counts what it had then.

Why not ``pg_database_size()``, exact: it stat()s every file of every
database, on every snapshot -- 100-120 ms for 31,000 files (5,000 tables and
their indexes) on this machine, seconds on a server with a few hundred
thousand relations.  This reads pg_class only (6 ms for the same 20,000
relations, one database), opens no relation and takes no lock, and runs in
the batch each database's visit sends anyway.  Template databases are not
visited, so they have no row.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="database_size",
    columns=(
        Column("datname", "text", "key"),
        Column("size", "bigint", "gauge"),
    ),
    queries={130000: "database_size.sql"},
    per_database=True,
    scope="datname",
    priority=20,
    description="size of each database, from its relations' pages (no file read)",
)
