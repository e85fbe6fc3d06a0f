"""One server must never take its own clients' connections.

Seen: a server with 150 databases and max_connections = 60, of which the
collector held 57 backends, between snapshots too, and ordinary clients were
refused.  Now a snapshot holds at most ``max_connections_per_server`` (2)
connections to a server: the main one, kept, and one visiting the other
databases in turn, each closed after its visit; with one or two free slots
left, the main one alone.

The collector connects as a pg_monitor role with a password, as in
production, and names itself with an application_name of its own, which is
what pg_stat_activity is watched for.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg import sql

from pgfleet.cluster import Cluster
from pgfleet.config import CollectorConfig
from pgfleet.repository import servers
from pgfleet.snapshot.fetch import ServerSession
from pgfleet.snapshot.model import FailureKind, SnapshotResult
from pgfleet.snapshot.stream import snapshot_remote
from tests.fix_clusters import NewCluster, NewDatabase
from tests.fix_daemon import DaemonFactory
from tests.fix_repository import RunCli, add_server, connect, new_repository, scalar, scalar_int

APP = "pgfleet faults"
DATABASES = 150


@pytest.fixture
def repo(repo_cluster: Cluster, new_database: NewDatabase) -> str:
    """A fresh repository, on this module's own cluster (see fix_daemon)."""
    return new_repository(repo_cluster, new_database)


def _populate(cluster: Cluster, databases: int) -> None:
    """A table ``t`` in every database, ``db1``... ``dbN`` made from template1,
    a pg_monitor role ``mon`` and an ordinary role ``app``."""
    for db in ("template1", "postgres"):
        cluster.execute("CREATE TABLE t (id int)", dbname=db)
    cluster.execute("CREATE ROLE mon LOGIN PASSWORD 'mon-pw' IN ROLE pg_monitor")
    cluster.execute("CREATE ROLE app LOGIN PASSWORD 'app-pw'")
    with cluster.connect() as conn:
        # FILE_COPY: 40 ms a database here, WAL_LOG 110 (throwaway clusters).
        for i in range(1, databases + 1):
            conn.execute(
                sql.SQL("CREATE DATABASE {} STRATEGY FILE_COPY").format(sql.Identifier(f"db{i}"))
            )


def _server_id(repo: str, alias: str) -> int:
    return scalar_int(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = %s", (alias,))


def _snapshots(repo: str, alias: str) -> int:
    return scalar_int(
        repo,
        """SELECT coalesce(max(st.snapshots), 0) FROM pgfleet.servers s
             LEFT JOIN pgfleet.snapshot_state st USING (srvid) WHERE s.alias = %s""",
        (alias,),
    )


def _collected_databases(repo: str, srvid: int) -> int:
    """Databases whose table ``t`` was stored by the last snapshot."""
    return scalar_int(
        repo,
        """SELECT count(DISTINCT datname) FROM pgfleet.pg_stat_user_tables_last
            WHERE srvid = %s AND relname = 't'""",
        (srvid,),
    )


class Watch:
    """What the server sees of the collector, polled; and an ordinary client
    connecting at every poll."""

    def __init__(self, cluster: Cluster) -> None:
        self.admin = cluster.connect(application_name="watch")
        self.ordinary = cluster.dsn(user="app", password="app-pw")
        self.most = 0
        self.polls = 0
        self.main_only = 0
        self.refused: list[str] = []

    def poll(self) -> list[str]:
        """The databases the collector's backends are on, right now."""
        rows = self.admin.execute(
            "SELECT datname FROM pg_stat_activity WHERE application_name = %s", (APP,)
        ).fetchall()
        dbs = sorted(str(r[0]) for r in rows)
        self.polls += 1
        self.most = max(self.most, len(dbs))
        self.main_only += dbs == ["postgres"]
        try:
            psycopg.connect(self.ordinary, connect_timeout=5, application_name="client").close()
        except psycopg.OperationalError as e:
            self.refused.append(str(e).strip())
        return dbs

    def until(self, condition: Callable[[list[str]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.poll()):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:g} s waiting for {what}", pytrace=False)
            time.sleep(0.05)


@pytest.fixture
def crowded(new_cluster: NewCluster) -> Iterator[Cluster]:
    cluster = new_cluster("crowded", settings={"max_connections": 60, "log_connections": "on"})
    t0 = time.monotonic()
    _populate(cluster, DATABASES)
    print(f"{DATABASES} databases made in {time.monotonic() - t0:.1f} s")
    yield cluster


def _opened_metric(url: str, alias: str) -> int:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf'^pgfleet_connections_opened_total\{{server="{alias}"\}} (\S+)$', text, re.M)
    assert m, "no pgfleet_connections_opened_total for the server"
    return int(float(m[1]))


def test_many_databases_two_connections(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, crowded: Cluster
) -> None:
    """150 databases, max_connections 60, a snapshot every second: never more
    than 2 backends, the main one alone between snapshots, an ordinary client
    always let in, every database's tables collected."""
    add_server(
        run_cli,
        "crowded",
        crowded.dsn(user="mon"),
        "--frequency",
        "1",
        "--password-ref",
        "env:PGFLEET_PW_MON",
    )
    srvid = _server_id(repo, "crowded")
    watch = Watch(crowded)
    d = daemon(repo, env={"PGFLEET_PW_MON": "mon-pw"}, collector={"application_name": APP})
    t0 = time.monotonic()
    watch.until(lambda _: _snapshots(repo, "crowded") >= 3, 180, "three snapshots")
    elapsed = time.monotonic() - t0
    # Every snapshot visits every database.
    assert _collected_databases(repo, srvid) == DATABASES + 1

    # No more snapshots: the one running ends, and only the main connection stays.
    assert run_cli("server", "update", "crowded", "--frequency", "3600").rc == 0
    quiet: list[float] = []

    def settled(dbs: list[str]) -> bool:
        if dbs != ["postgres"]:
            quiet.clear()
            return False
        quiet.append(time.monotonic())
        return quiet[-1] - quiet[0] >= 2.0

    watch.until(settled, 60, "the main connection alone")
    taken = _snapshots(repo, "crowded")
    print(
        f"{taken} snapshots in {elapsed:.1f} s, {watch.polls} polls, "
        f"{watch.main_only} with the main connection alone"
    )
    assert watch.most <= 2, f"{watch.most} backends at once"
    assert watch.refused == []
    assert watch.main_only > 0
    assert (
        scalar(repo, "SELECT count(*) FROM pgfleet.snapshot_errors WHERE srvid = %s", (srvid,)) == 0
    )
    assert _collected_databases(repo, srvid) == DATABASES + 1

    # pgfleet_connections_opened_total counts every connection the server let in.
    authorized = len(
        re.findall(
            rf"connection authorized: user=mon database=\S+ application_name={APP}$",
            crowded.log_file.read_text(errors="replace"),
            re.M,
        )
    )
    # The main connection once, every other database at every snapshot.
    assert authorized >= 1 + taken * DATABASES
    assert _opened_metric(d.exporter_url, "crowded") == authorized
    watch.admin.close()
    assert d.stop() == 0


async def _snapshot(repo: str, session: ServerSession) -> SnapshotResult:
    try:
        async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn:
            return await snapshot_remote(conn, session.server, session.cfg, session=session)
    finally:
        await session.close()


def _settle(holders: list[psycopg.Connection[tuple[object, ...]]]) -> None:
    """Wait for the backends of connections closed by now to be gone."""
    deadline = time.monotonic() + 10
    while True:
        row = (
            holders[0]
            .execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
            .fetchone()
        )
        if row == (len(holders),) or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def test_few_free_slots_one_connection(repo: str, run_cli: RunCli, new_cluster: NewCluster) -> None:
    """One or two free slots: the main connection alone, the others visited
    with it closed.  ``mon`` may hold one connection (CONNECTION LIMIT 1): a
    second one at once would be refused, and recorded."""
    scarce = new_cluster(
        "scarce", settings={"max_connections": 10, "superuser_reserved_connections": 1}
    )
    _populate(scarce, 4)
    scarce.execute("ALTER ROLE mon CONNECTION LIMIT 1")
    add_server(run_cli, "scarce", scarce.dsn(user="mon"), "--password-ref", "env:PGFLEET_PW_MON")
    with connect(repo) as conn:
        server = servers.get(conn, "scarce")
    srvid = server.srvid
    cfg = CollectorConfig(application_name=APP)
    holders: list[psycopg.Connection[tuple[object, ...]]] = []
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PGFLEET_PW_MON", "mon-pw")
            # 9 slots for ordinary clients (10 - 1 reserved); the collector's
            # main connection and these leave 2, then 1.
            for free in (2, 1):
                while len(holders) < 9 - 1 - free:
                    holders.append(scarce.connect(application_name="holder"))
                _settle(holders)
                session = ServerSession(server, cfg)
                result = asyncio.run(_snapshot(repo, session))
                assert (session.free_slots, session.budget) == (free, 1)
                # The same query reads the server's clock: the same as ours here.
                assert session.skew is not None and abs(session.skew) < 5
                assert result.failures == [], result.failures
                assert _collected_databases(repo, srvid) == 5

            # Plenty of room: two at once, which the role limit refuses,
            # for every database visited on the second connection.
            for h in holders:
                h.close()
            holders.clear()
            session = ServerSession(server, cfg)
            result = asyncio.run(_snapshot(repo, session))
            assert session.budget == 2
            refused = [f for f in result.failures if f.kind is FailureKind.CONNECT]
            assert refused and all("too many connections for role" in f.message for f in refused)
            scarce.execute("ALTER ROLE mon CONNECTION LIMIT 2")
            result = asyncio.run(_snapshot(repo, ServerSession(server, cfg)))
            assert result.failures == []
    finally:
        for h in holders:
            h.close()
