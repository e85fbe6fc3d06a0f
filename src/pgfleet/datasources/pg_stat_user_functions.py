"""pg_stat_user_functions, per database.

Only filled when ``track_functions`` is ``pl`` or ``all`` (the default is
``none``).  Functions are keyed by OID because names are overloaded;
``arguments`` (the input argument types) tells the overloads apart for humans,
and a rename is a gauge change, not a new function.  Times in milliseconds.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="pg_stat_user_functions",
    columns=(
        Column("datname", "text", "key"),
        Column("funcid", "bigint", "key"),
        Column("schemaname", "text", "gauge"),
        Column("funcname", "text", "gauge"),
        Column("arguments", "text", "gauge"),
        Column("calls", "bigint", "counter"),
        Column("total_time", "double precision", "counter"),
        Column("self_time", "double precision", "counter"),
    ),
    queries={130000: "pg_stat_user_functions.sql"},
    per_database=True,
    scope="datname",
    priority=20,
    description="calls and time per function (needs track_functions)",
)
