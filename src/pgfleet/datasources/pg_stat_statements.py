"""pg_stat_statements: one row per (database, role, toplevel, queryid).

The query text is a ``once`` column: it is read on every snapshot (the
extension keeps texts in a file it reads in one go) but the repository stores
it only for new statements.  The version gating follows the server version, so
the extension must be up to date (``ALTER EXTENSION pg_stat_statements UPDATE``
after a major upgrade) or the newer columns are missing.

Entries whose database or role was dropped are left out: their names are gone.

Utility statements keep their literals in the text (``CREATE ROLE ...
PASSWORD 'x'``, ``ALTER SYSTEM SET primary_conninfo = '...'``): a literal after
a word naming a password, a secret, a conninfo or a command, ``password=...``
and a URI's password become ``<redacted>`` on the server (docs/security.md).
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

_COUNTERS = (
    "calls", "plans", "rows",
    "shared_blks_hit", "shared_blks_read", "shared_blks_dirtied", "shared_blks_written",
    "local_blks_hit", "local_blks_read", "local_blks_dirtied", "local_blks_written",
    "temp_blks_read", "temp_blks_written",
    "wal_records", "wal_fpi",
    "jit_functions",
)  # fmt: skip
# Milliseconds.  blk_read_time/blk_write_time are shared_blk_*_time on 17+.
_TIMES = (
    "total_exec_time", "total_plan_time",
    "blk_read_time", "blk_write_time", "temp_blk_read_time", "temp_blk_write_time",
    "jit_generation_time",
)  # fmt: skip

# Execution time statistics over the entry's life (min and max since the last
# pg_stat_statements_reset(minmax_only => true) on 17+): they move with every
# call, but not per interval; the mean is total_exec_time / calls.
_LIFETIME = ("min_exec_time", "max_exec_time", "stddev_exec_time")

DATASOURCE = Datasource(
    module="pg_stat_statements",
    columns=(
        Column("datname", "text", "key"),
        Column("rolname", "text", "key"),
        Column("toplevel", "boolean", "key"),
        Column("queryid", "bigint", "key"),
        # The entry's own stats_since on 17+, pg_stat_statements_info.stats_reset before.
        Column("stats_since", "timestamptz", "epoch"),
        Column("query", "text", "once"),
        *(Column(n, "bigint", "counter") for n in _COUNTERS),
        Column("wal_bytes", "numeric", "counter"),
        *(Column(n, "double precision", "counter") for n in _TIMES),
        # Milliseconds, over the entry's life: added later, so last.  For the
        # exporter only: they move at every call, and stored at every point
        # they would nearly double the history (see datasources' "export").
        *(Column(n, "double precision", "export") for n in _LIFETIME),
    ),
    queries={
        130000: "pg_stat_statements_post_130000.sql",
        140000: "pg_stat_statements.sql",
        150000: "pg_stat_statements_post_150000.sql",
        170000: "pg_stat_statements_post_170000.sql",
    },
    extension="pg_stat_statements",
    priority=2,
    streamed=True,
    description="executions, time, rows, block and WAL usage per normalized statement",
)
