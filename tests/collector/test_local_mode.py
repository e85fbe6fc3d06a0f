"""Local mode in the daemon: ``[collector] local = true`` snapshots srvid 0,
the repository's own instance, at its frequency; of two collectors sharing a
repository one does it, and the other takes over when it stops.
"""

from __future__ import annotations

import time

from tests.fix_daemon import DaemonFactory, wait_until
from tests.fix_repository import RunCli, connect, scalar_int


def local_snapshots(repo: str) -> int:
    return scalar_int(
        repo, "SELECT coalesce(max(snapshots), 0) FROM pgfleet.snapshot_state WHERE srvid = 0"
    )


def test_local_mode_one_collector_at_a_time(
    repo: str, run_cli: RunCli, daemon: DaemonFactory
) -> None:
    with connect(repo) as conn:
        conn.execute("UPDATE pgfleet.servers SET frequency = 1 WHERE srvid = 0")
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    # Off by default: nothing snapshots srvid 0.
    off = daemon(repo, name="off")
    time.sleep(3)
    assert local_snapshots(repo) == 0
    assert off.stop() == 0

    a = daemon(repo, name="a", collector={"local": True})
    b = daemon(repo, name="b", collector={"local": True})
    wait_until(lambda: local_snapshots(repo) >= 3, 30, "local snapshots")
    # Through the same sources as remote servers: pg_stat_statements' rows.
    wait_until(
        lambda: (
            scalar_int(repo, "SELECT count(*) FROM pgfleet.pg_stat_statements_last WHERE srvid = 0")
            > 0
        ),
        10,
        "pg_stat_statements rows of srvid 0",
    )
    # One collector takes them: about one a second, not two.
    n0, t0 = local_snapshots(repo), time.monotonic()
    time.sleep(4)
    rate = (local_snapshots(repo) - n0) / (time.monotonic() - t0)
    assert 0.3 <= rate <= 1.4, rate
    takers = [d for d in (a, b) if d.find("local snapshots: this collector takes them")]
    assert len(takers) == 1, [d.name for d in takers]

    # The other takes over when it stops.
    taker = takers[0]
    other = b if taker is a else a
    assert taker.stop() == 0
    n1 = local_snapshots(repo)
    wait_until(lambda: local_snapshots(repo) >= n1 + 2, 30, "the other collector's snapshots")
    assert other.find("local snapshots: this collector takes them")
