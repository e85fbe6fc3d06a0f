"""pg_settings: one row per parameter; gauges, so only changes are stored.

Rows whose value comes from the collector's own session (source ``client``
or ``session``: application_name, statement_timeout, client_encoding...) are
left out, as they describe the collector, not the server.  Values set with
ALTER DATABASE/ROLE ... SET still show as seen by the collector's database
and role.  pg_monitor includes pg_read_all_settings, so superuser-only
parameters are visible.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="settings",
    columns=(
        Column("name", "text", "key"),
        Column("setting", "text", "gauge"),
        Column("unit", "text", "gauge"),
        Column("source", "text", "gauge"),
        Column("pending_restart", "boolean", "gauge"),
    ),
    queries={140000: "settings.sql"},
    priority=30,
    description="configuration parameters and their changes",
)
