"""pg_locks: locks held and awaited, per database and lock mode.

``granted`` counts the locks held, ``waiting`` those awaited, and
``longest_wait_seconds`` is how long the oldest wait has lasted (NULL with no
wait).  Locks on no database -- transaction IDs, virtual transaction IDs,
shared catalogs -- count under database ``''``.  The collector's own locks
(the one its query takes on the view) are left out.

Cost: ``pg_lock_status()`` copies the lock table under the 16 lock-manager
partition locks (shared: a backend needing a heavyweight lock outside its
fast path waits meanwhile), then every backend's fast-path locks and the
predicate locks (SERIALIZABLE); no catalog is read but pg_database.  About
3 us per lock held: 1 ms idle, 10 ms with 3,000 locks, the partition locks
held for the copy only.  Only the counts leave the server, no relation,
query or process.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="pg_locks",
    columns=(
        Column("datname", "text", "key"),
        Column("mode", "text", "key"),
        Column("granted", "integer", "gauge"),
        Column("waiting", "integer", "gauge"),
        Column("longest_wait_seconds", "double precision", "gauge"),
    ),
    queries={130000: "pg_locks_post_130000.sql", 140000: "pg_locks.sql"},
    priority=3,
    description="locks held and awaited per database and lock mode",
)
