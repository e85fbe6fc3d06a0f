"""pg_stat_activity, sampled: backends counted per database, user, state and wait.

Every key is NOT NULL (NULLs become ``''``: background processes have no
database, user or state).  ``oldest_xact_seconds`` is the age of the oldest
open transaction in the group.  The collector's own backend is left out.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="pg_stat_activity",
    columns=(
        Column("datname", "text", "key"),
        Column("usename", "text", "key"),
        Column("state", "text", "key"),
        Column("wait_event_type", "text", "key"),
        Column("wait_event", "text", "key"),
        Column("backend_type", "text", "key"),
        Column("count", "integer", "gauge"),
        Column("oldest_xact_seconds", "double precision", "gauge"),
    ),
    queries={130000: "pg_stat_activity.sql"},
    priority=3,
    description="backends per database, user, state and wait event",
)
