"""pg_wait_sampling: wait event samples per (event type, event, queryid).

The profile is kept per backend pid; we sum over pids.  pg_wait_sampling 1.1
keeps a backend's entries after it exits, so the sum never goes down except
on a reset of the profile, which the repository detects like any counter
reset: ``count`` is an ordinary counter and a role with only pg_monitor can
read it (resetting the profile would need a grant beyond pg_monitor).

Because the profile keeps every pid that ever waited, it (and this query)
grows with the number of backends a server has ever had; set
``pg_wait_sampling.profile_pid = off`` on busy servers to aggregate over
pids in the extension itself.  ``queryid`` is 0 for waits outside a query or
when ``pg_wait_sampling.profile_queries`` is off.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="pg_wait_sampling",
    columns=(
        Column("event_type", "text", "key"),
        Column("event", "text", "key"),
        Column("queryid", "bigint", "key"),
        Column("count", "bigint", "counter"),
    ),
    queries={140000: "pg_wait_sampling.sql"},
    extension="pg_wait_sampling",
    priority=12,
    description="sampled wait events per event and query",
)
