"""SIGTERM while the repository is down: a bounded stop that loses nothing fetched.

The collector's whole way out (in-flight snapshots, the tasks it cancels,
giving back its leases, closing its repository links) is bounded by
``[collector] shutdown_timeout``, whatever the repository does meanwhile:
stopped (connections refused at once) or frozen (SIGSTOP: connections and
queries that never answer).  Snapshots fetched but not stored are in the spool
and stored by the next run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgfleet.cluster import Cluster
from pgfleet.repository import schema
from tests.fix_clusters import NewCluster
from tests.fix_daemon import DaemonFactory, DaemonProcess, wait_until
from tests.fix_repository import RunCli, scalar

SHUTDOWN_TIMEOUT = 3
# Python starting, and the process' own exit after the loop ended.
MARGIN = 2.0


@contextlib.contextmanager
def frozen(cluster: Cluster) -> Iterator[None]:
    """Every process of ``cluster`` stopped (SIGSTOP): it accepts TCP, answers nothing."""
    pids = cluster._processes()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def stored(repo: str) -> int:
    v = scalar(repo, "SELECT coalesce(sum(snapshots), 0)::int FROM pgfleet.snapshot_state")
    assert isinstance(v, int)
    return v


def spool_files(d: DaemonProcess) -> int:
    return len([p for p in (d.workdir / "spool").rglob("*") if p.is_file() and p.suffix == ".snap"])


def stop_timed(d: DaemonProcess) -> tuple[int, float]:
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc is not None
    try:
        rc = d.proc.wait(SHUTDOWN_TIMEOUT + 30)
    except Exception:
        pytest.fail(f"the collector did not exit within {SHUTDOWN_TIMEOUT + 30} s of SIGTERM")
    return rc, time.monotonic() - t0


@pytest.mark.parametrize("outage", ["stopped", "frozen"])
def test_sigterm_during_repository_outage(
    outage: str,
    run_cli: RunCli,
    daemon: DaemonFactory,
    new_cluster: NewCluster,
    tmp_path: Path,
) -> None:
    repo_cluster = new_cluster(f"shutdown_repo_{outage}")
    mon = new_cluster(f"shutdown_mon_{outage}")
    repo = repo_cluster.create_database("pgfleet")
    with psycopg.connect(repo, autocommit=True) as conn:
        schema.upgrade(conn)
    for i in range(4):
        res = run_cli(
            "--repository", repo, "server", "add", f"s{i}",
            "--host", mon.host, "--port", str(mon.port), "--user", "postgres",
            "--frequency", "1",
        )  # fmt: skip
        assert res.rc == 0, res.err
    d = daemon(
        repo,
        collector={"shutdown_timeout": SHUTDOWN_TIMEOUT, "connect_timeout": 2, "store_timeout": 2},
    )
    wait_until(lambda: stored(repo) >= 8, 30, "first snapshots")
    ctx = frozen(repo_cluster) if outage == "frozen" else contextlib.nullcontext()
    if outage == "stopped":
        repo_cluster.stop()
    with ctx:
        if outage == "stopped":
            wait_until(lambda: len(d.find("snapshot spooled")) >= 6, 30, "spooled snapshots")
        else:
            # Stores hang, every worker waits behind them with its snapshot.
            time.sleep(3)
        rc, took = stop_timed(d)
    print(f"{outage}: stopped in {took:.1f} s")
    assert rc == 0, d.text()[-3000:]
    assert took <= SHUTDOWN_TIMEOUT + MARGIN, f"took {took:.1f} s"
    stop = d.find("collector stopped")
    assert stop, d.text()[-3000:]
    spooled = int(stop[-1]["spooled"])
    assert spool_files(d) == spooled
    # Frozen: the snapshot being stored may be in the repository or not: not
    # spooled (the writer's call), the others are.
    assert spooled >= (6 if outage == "stopped" else 3)

    # Nothing fetched was lost: the next run stores every spooled snapshot.
    if outage == "stopped":
        repo_cluster.start()
    before = stored(repo)
    d.start()
    wait_until(lambda: d.find("spooled snapshots stored"), 30, "the spool to drain")
    wait_until(lambda: spool_files(d) == 0, 30, "an empty spool")
    # Those of the stopped run, and new ones taken behind them meanwhile.
    replayed = sum(int(e["snapshots"]) for e in d.find("spooled snapshots stored"))
    assert replayed >= spooled
    assert stored(repo) >= before + spooled
    assert not d.find("spool full: oldest snapshots dropped")
    assert d.stop() == 0
