"""pg_stat_kcache 2.2+: CPU time, page faults, physical I/O and context switches
per statement, split between planning and execution.

Keys are those of pg_stat_statements, so both join on (datname, rolname,
toplevel, queryid).  Times are in seconds; reads and writes in bytes, as the
kernel saw them (so page cache hits are not reads).  The extension has no
reset timestamp, hence no epoch.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

_COUNTERS = ("reads", "writes", "minflts", "majflts", "nvcsws", "nivcsws")
_TIMES = ("user_time", "system_time")
_PHASES = ("plan", "exec")

DATASOURCE = Datasource(
    module="pg_stat_kcache",
    columns=(
        Column("datname", "text", "key"),
        Column("rolname", "text", "key"),
        Column("toplevel", "boolean", "key"),
        Column("queryid", "bigint", "key"),
        *(Column(f"{p}_{n}", "bigint", "counter") for p in _PHASES for n in _COUNTERS),
        *(Column(f"{p}_{n}", "double precision", "counter") for p in _PHASES for n in _TIMES),
    ),
    queries={140000: "pg_stat_kcache.sql"},
    extension="pg_stat_kcache",
    priority=12,
    description="CPU time, page faults, disk I/O and context switches per statement",
)
