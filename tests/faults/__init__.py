"""Faults: what the collector does when the repository or a server misbehaves.

Helpers shared by these tests: the servers they snapshot, and the snapshots
a collector holds in its spool.
"""

from __future__ import annotations

import psycopg

from pgfleet.cluster import Cluster
from pgfleet.collector import scheduler
from pgfleet.repository import servers
from tests.fix_daemon import DaemonProcess


def add_servers(repo: str, mon: Cluster, aliases: tuple[str, ...], coalesce: int) -> dict[str, int]:
    """Register ``mon`` under each alias, snapshotted every second; their srvids.

    ``coalesce`` large enough that no aggregate moves rows out of
    ``pg_stat_database_current``, whose row order is the order snapshots
    were stored in (checked: the seeded coalesce offsets stay below it).
    """
    srvids = {}
    with psycopg.connect(repo, autocommit=True) as conn:
        for alias in aliases:
            assert scheduler.spread(alias, coalesce) < coalesce - 1000, alias
            srvids[alias] = servers.add(
                conn,
                alias,
                host=mon.host,
                port=mon.port,
                username="postgres",
                frequency=1,
                coalesce=coalesce,
            ).srvid
    return srvids


def spooled_files(d: DaemonProcess, srvid: int | None = None) -> int:
    """Snapshots in a collector's spool (of one server, or all)."""
    pattern = "*.snap" if srvid is None else f"*-{srvid}.snap"
    return len(list((d.workdir / "spool").glob(pattern)))
