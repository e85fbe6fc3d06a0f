"""A repository that refuses snapshots for a while loses none of them.

A real ``pgfleet collector`` and a real repository that stops taking
snapshots without going away: read-only, a privilege taken from the
collector's role, out of disk.  Every snapshot taken meanwhile is spooled,
none is dropped, the repository is not asked at every snapshot, and once it
takes snapshots again every one of them is stored, in order.

Disk full is real: the tables a snapshot writes (the transient tables its
rows are COPYed into, which every store empties with a TRUNCATE, and one of
the tables the rows are then stored in) live in a tablespace on a small
tmpfs, filled to the last byte (the test is skipped where tmpfs cannot be
mounted: it needs root).  The WAL is elsewhere, as on a server whose data
disk filled up: PostgreSQL fails the statement, not itself.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgfleet.cluster import Cluster
from pgfleet.repository import schema
from tests.faults import add_servers, spooled_files
from tests.fix_clusters import NewCluster, NewDatabase
from tests.fix_daemon import DaemonFactory, DaemonProcess, wait_until
from tests.fix_repository import new_repository

ALIASES = ("f1", "f2")
# Aggregates would move rows out of pg_stat_database_current, whose row order
# says in which order snapshots were stored: none during the test.
COALESCE = 100_000
# How long the repository refuses snapshots, in seconds.
FAULT = 10.0
# Stores tried while it does, at most: after 1, 2, 4, 8 s..., not at every
# snapshot (two servers, one a second: twenty in ten seconds).
ASKED = 7


@pytest.fixture
def repo(repo_cluster: Cluster, new_database: NewDatabase) -> str:
    """A fresh repository, on this module's own cluster (see fix_daemon)."""
    return new_repository(repo_cluster, new_database)


def stored(repo: str, srvid: int) -> int:
    with psycopg.connect(repo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT snapshots FROM pgfleet.snapshot_state WHERE srvid = %s", (srvid,)
        ).fetchone()
    return int(row[0]) if row else 0


def metrics(d: DaemonProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the daemon's /metrics, by name and labels."""
    with urllib.request.urlopen(d.exporter_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def lost(d: DaemonProcess) -> float:
    """Snapshots the daemon says it dropped (spool) or lost (fresh ones)."""
    m = metrics(d)
    return m[("pgfleet_spool_dropped_total", ())] + sum(
        v
        for (name, labels), v in m.items()
        if name == "pgfleet_snapshots_total" and ("outcome", "dropped") in labels
    )


def outcomes(d: DaemonProcess, alias: str) -> Counter[str]:
    """What the daemon's worker said of each snapshot of ``alias``."""
    out: Counter[str] = Counter()
    for e in d.events():
        msg = str(e.get("msg", ""))
        if e.get("server") == alias and msg.startswith("snapshot ") and " " not in msg[9:]:
            out[msg[9:]] += 1
    return out


def asked(d: DaemonProcess) -> int:
    """Stores the repository refused for now (the first, then the others)."""
    return len(d.find("the repository refuses snapshots: kept for later")) + len(
        d.find("the repository still refuses snapshots")
    )


def refusing(d: DaemonProcess, sqlstate: str) -> bool:
    return any(
        e.get("sqlstate") == sqlstate
        for e in d.find("the repository refuses snapshots: kept for later")
    )


def check_nothing_lost(repo: str, d: DaemonProcess, srvids: dict[str, int]) -> None:
    """Once the repository took everything back: stop the daemon; every
    snapshot it took is stored (or left spooled at the stop), in order."""
    wait_until(lambda: not list((d.workdir / "spool").glob("*.snap")), 40, "an empty spool")
    assert lost(d) == 0
    assert d.stop() == 0
    assert not d.find("snapshot refused by the repository: dropped")
    assert not d.find("spool full: oldest snapshots dropped")
    assert not d.find("lease lost to another collector: snapshot dropped")
    with psycopg.connect(repo, autocommit=True) as conn:
        for alias, srvid in srvids.items():
            said = outcomes(d, alias)
            assert said["dropped"] == 0, (alias, said)
            assert said["spooled"] >= FAULT - 3, (alias, said)
            # Those in flight at the stop are spooled for the next run,
            # unannounced: one per server at most.
            taken = stored(repo, srvid) + spooled_files(d, srvid)
            assert 0 <= taken - (said["stored"] + said["spooled"]) <= 1, (alias, said, taken)
            # Stored in the order they were taken: rows appended (ctid order)
            # with strictly increasing snapshot times.
            ts = [
                r[0]
                for r in conn.execute(
                    """SELECT ts FROM pgfleet.pg_stat_database_current
                        WHERE srvid = %s AND datname = 'postgres' ORDER BY ctid""",
                    (srvid,),
                ).fetchall()
            ]
            assert len(ts) >= said["stored"] and ts == sorted(set(ts)), alias


def run_fault(repo: str, d: DaemonProcess, srvids: dict[str, int], sqlstate: str) -> None:
    """The repository refuses snapshots (the caller made it so) for FAULT seconds."""
    t0 = time.monotonic()
    wait_until(lambda: refusing(d, sqlstate), 15, f"stores refused with {sqlstate}")
    before = {a: outcomes(d, a)["spooled"] for a in ALIASES}
    time.sleep(max(0.0, FAULT - (time.monotonic() - t0)))
    for alias in ALIASES:
        assert outcomes(d, alias)["spooled"] - before[alias] >= FAULT - 5, alias
    assert lost(d) == 0
    assert asked(d) <= ASKED, asked(d)
    assert all(e["sqlstate"] == sqlstate for e in d.find("the repository still refuses snapshots"))


def test_read_only(repo: str, repo_cluster: Cluster, daemon: DaemonFactory, mon: Cluster) -> None:
    """Read-only (as for a failover, or to stop it filling up): 25006."""
    srvids = add_servers(repo, mon, ALIASES, COALESCE)
    d = daemon(repo)
    wait_until(lambda: all(stored(repo, s) >= 2 for s in srvids.values()), 30, "first snapshots")
    try:
        repo_cluster.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        repo_cluster.execute("SELECT pg_reload_conf()")
        run_fault(repo, d, srvids, "25006")
    finally:
        with repo_cluster.connect() as conn:
            conn.autocommit = True
            conn.execute("SET default_transaction_read_only = off")
            conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
            conn.execute("SELECT pg_reload_conf()")
    check_nothing_lost(repo, d, srvids)


def test_privilege_taken_away(
    repo_cluster: Cluster, new_database: NewDatabase, daemon: DaemonFactory, mon: Cluster
) -> None:
    """The collector's role loses a privilege on one of pgfleet's tables: 42501
    (the snapshot, not just that source, is kept)."""
    role = "faults_collector"
    repo_cluster.execute(f"DROP ROLE IF EXISTS {role}")
    repo_cluster.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    admin = new_database(repo_cluster)
    dbname = str(psycopg.conninfo.conninfo_to_dict(admin)["dbname"])
    repo_cluster.execute(f'ALTER DATABASE "{dbname}" OWNER TO {role}')
    # The repository as its owner made it: everything in it is the role's.
    repo = psycopg.conninfo.make_conninfo(admin, user=role, password="pw")
    with psycopg.connect(repo, autocommit=True) as conn:
        schema.upgrade(conn)
    srvids = add_servers(repo, mon, ALIASES, COALESCE)
    d = daemon(repo)
    wait_until(lambda: all(stored(repo, s) >= 2 for s in srvids.values()), 30, "first snapshots")
    table = "pgfleet.pg_stat_database_current"
    with psycopg.connect(repo, autocommit=True) as conn:
        conn.execute(f"REVOKE INSERT ON {table} FROM {role}")
        try:
            run_fault(repo, d, srvids, "42501")
        finally:
            conn.execute(f"GRANT INSERT ON {table} TO {role}")
    check_nothing_lost(repo, d, srvids)
    with psycopg.connect(repo, autocommit=True) as conn:
        # Kept whole, not stored without the source it refused.
        assert conn.execute("SELECT count(*) FROM pgfleet.snapshot_errors").fetchone() == (0,)


_mounts = itertools.count(1)


@contextlib.contextmanager
def tmpfs(where: Path, size: str, owner: str | None) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where``, owned by ``owner``; skip the test if we cannot."""
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs to fill up: {done.stderr.strip()}")
    try:
        if owner is not None:
            pw = pwd.getpwnam(owner)
            os.chown(where, pw.pw_uid, pw.pw_gid)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


def fill(where: Path) -> Path:
    """Fill the file system of ``where`` to the last byte; return the filler."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (65536, 1):
            with contextlib.suppress(OSError):  # ENOSPC
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


def test_disk_full(
    new_cluster: NewCluster,
    new_database: NewDatabase,
    clusters_dir: Path,
    daemon: DaemonFactory,
    mon: Cluster,
) -> None:
    """The repository's disk is full: 53100 (could not extend file)."""
    cluster = new_cluster("disk_full")
    repo = new_repository(cluster, new_database)
    with psycopg.connect(repo, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                r"""SELECT c.oid::regclass::text FROM pg_class c
                    WHERE c.relnamespace = 'pgfleet'::regnamespace AND c.relkind = 'r'
                      AND (c.relname LIKE '%\_src\_tmp' OR c.relname = 'pg_stat_database_current')"""
            ).fetchall()
        ]
    assert len(tables) > 10, tables
    with tmpfs(clusters_dir / f"tiny-{os.getpid()}-{next(_mounts)}", "4m", cluster.os_user) as tiny:
        with psycopg.connect(repo, autocommit=True) as conn:
            conn.execute(f"CREATE TABLESPACE tiny LOCATION '{tiny}'")
            for table in tables:
                conn.execute(f"ALTER TABLE {table} SET TABLESPACE tiny")
        try:
            srvids = add_servers(repo, mon, ALIASES, COALESCE)
            d = daemon(repo)
            wait_until(
                lambda: all(stored(repo, s) >= 2 for s in srvids.values()), 30, "first snapshots"
            )
            filler = fill(tiny)
            try:
                run_fault(repo, d, srvids, "53100")
            finally:
                filler.unlink()
            check_nothing_lost(repo, d, srvids)
        finally:
            # Back on the cluster's own disk, before the tmpfs goes.
            with psycopg.connect(repo, autocommit=True) as conn:
                for table in tables:
                    conn.execute(f"ALTER TABLE {table} SET TABLESPACE pg_default")
                conn.execute("DROP TABLESPACE tiny")
