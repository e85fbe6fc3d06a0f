"""The postmaster: when it started, and when the configuration was last loaded.

One row.  ``start_time`` changes at every restart of the server (a crash
included), so its history in the repository is the server's restarts;
``conf_load_time`` is when the collector's own backend last (re)read the
configuration files (at its start, then at each reload): the collector's
main connection is kept between snapshots, so a reload shows at the next
snapshot.  Two function calls: nothing read from disk.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="postmaster",
    columns=(
        Column("start_time", "timestamptz", "gauge"),
        Column("conf_load_time", "timestamptz", "gauge"),
    ),
    queries={130000: "postmaster.sql"},
    priority=3,
    description="when the server started, and when its configuration was last loaded",
)
