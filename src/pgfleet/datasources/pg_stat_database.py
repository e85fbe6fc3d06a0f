"""pg_stat_database joined with pg_stat_database_conflicts, one row per database."""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

_COUNTERS = (
    "xact_commit", "xact_rollback", "blks_read", "blks_hit", "tup_returned",
    "tup_fetched", "tup_inserted", "tup_updated", "tup_deleted", "conflicts",
    "temp_files", "temp_bytes", "deadlocks", "checksum_failures",
    "sessions", "sessions_abandoned", "sessions_fatal", "sessions_killed",
    "confl_tablespace", "confl_lock", "confl_snapshot", "confl_bufferpin",
    "confl_deadlock", "confl_active_logicalslot",
)
_TIMES = ("blk_read_time", "blk_write_time", "session_time", "active_time",
          "idle_in_transaction_time")

DATASOURCE = Datasource(
    module="pg_stat_database",
    columns=(
        Column("datname", "text", "key"),
        Column("stats_reset", "timestamptz", "epoch"),
        Column("numbackends", "integer", "gauge"),
        *(Column(n, "bigint", "counter") for n in _COUNTERS),
        *(Column(n, "double precision", "counter") for n in _TIMES),
    ),
    queries={140000: "pg_stat_database.sql", 160000: "pg_stat_database_post_160000.sql"},
    priority=1,
    description="transactions, tuples, blocks, temp files, deadlocks and conflicts per database",
)
