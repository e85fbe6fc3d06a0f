"""pg_settings: one row per parameter; gauges, so only changes are stored.

Rows whose value comes from the collector's own session (source ``client``
or ``session``: application_name, statement_timeout, client_encoding...) are
left out, as they describe the collector, not the server.  Values set with
ALTER DATABASE/ROLE ... SET still show as seen by the collector's database
and role.  pg_monitor includes pg_read_all_settings, so superuser-only
parameters are visible.

A string setting that may hold a secret -- a command (``archive_command``,
``restore_command``...), a conninfo (``primary_conninfo``), a password, an
extension's ``*.password`` or ``*.secret``, a value with ``password=`` or a
URI's password -- is sent as ``redacted sha256:`` and 12 hex digits of its
value's SHA-256 keyed with the server's system identifier: a change still
shows, the value does not (see settings.sql, docs/security.md).

A numeric or boolean setting is also sent as a number in base units, in one
of ``value_bytes`` (memory), ``value_seconds`` (time) or ``value`` (others;
booleans as 1 and 0), so that the exporter reads numbers, not PostgreSQL's
unit names.  They change with the setting, so cost the repository nothing
between changes.
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
        # The setting as a number in base units (see settings.sql): what the
        # exporter shows.  Added later, so last.
        Column("value", "double precision", "gauge"),
        Column("value_bytes", "double precision", "gauge"),
        Column("value_seconds", "double precision", "gauge"),
    ),
    queries={130000: "settings.sql"},
    priority=30,
    description="configuration parameters and their changes",
)
