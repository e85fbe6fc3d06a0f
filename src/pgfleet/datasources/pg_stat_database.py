"""pg_stat_database joined with pg_stat_database_conflicts, one row per database.

``xid_age`` and ``mxid_age`` come from pg_database: the age, in transactions
and in multixacts, of the oldest ID not frozen yet in the database
(``datfrozenxid``, ``datminmxid``), which reaching 2^31 would be wraparound.
A catalog read, as cheap as the rest.  New columns go last: the repository's
transient tables, COPYed into by position, gain them at the end.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

_COUNTERS = (
    "xact_commit", "xact_rollback", "blks_read", "blks_hit", "tup_returned",
    "tup_fetched", "tup_inserted", "tup_updated", "tup_deleted", "conflicts",
    "temp_files", "temp_bytes", "deadlocks", "checksum_failures",
    "sessions", "sessions_abandoned", "sessions_fatal", "sessions_killed",
    "confl_tablespace", "confl_lock", "confl_snapshot", "confl_bufferpin",
    "confl_deadlock", "confl_active_logicalslot",
)  # fmt: skip
_TIMES = ("blk_read_time", "blk_write_time", "session_time", "active_time",
          "idle_in_transaction_time")  # fmt: skip

DATASOURCE = Datasource(
    module="pg_stat_database",
    columns=(
        Column("datname", "text", "key"),
        Column("stats_reset", "timestamptz", "epoch"),
        Column("numbackends", "integer", "gauge"),
        *(Column(n, "bigint", "counter") for n in _COUNTERS),
        *(Column(n, "double precision", "counter") for n in _TIMES),
        Column("xid_age", "integer", "gauge"),
        Column("mxid_age", "integer", "gauge"),
    ),
    queries={
        130000: "pg_stat_database_post_130000.sql",
        140000: "pg_stat_database.sql",
        160000: "pg_stat_database_post_160000.sql",
    },
    priority=1,
    description="transactions, tuples, blocks, temp files, deadlocks, conflicts, xid ages",
)
