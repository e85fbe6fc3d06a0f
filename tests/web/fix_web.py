"""Fixtures for the web UI: a repository with a monitored server under load,
snapshotted through the CLI, and the app served by uvicorn in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import uvicorn
from psycopg import sql

from pgfleet.backup.catalog import BackupInfo, Kind, State
from pgfleet.cluster import Cluster
from pgfleet.config import Config, RepositoryConfig, WebConfig
from pgfleet.repository import backups
from pgfleet.web.app import create_app
from tests.fix_clusters import NewDatabase
from tests.fix_repository import RunCli, add_server, connect, one_row, scalar

# Names a monitored server may return: they must come out as text, never markup.
HOSTILE_DB = '<img src=x onerror="window.__pwned=1">db'
HOSTILE_COMMENT = "</script><script>window.__pwned=2</script><b>bold</b>"
TOKEN = "test-token-0123456789"
# What a backup catalog may hold (a label, an error text): text too.
HOSTILE_BACKUP = '<img src=x onerror="window.__pwned=3">'


@dataclass
class Fleet:
    repo: str
    srvid: int
    mon_dsn: str
    reader: tuple[str, str]  # a pgfleet_read role and its password
    admin: tuple[str, str]


def _load(dsn: str, n: int) -> None:
    with connect(dsn) as conn:
        for i in range(n):
            # pg_sleep: the session-wide cluster also runs every other test's
            # statements; this one must top the server's list by time.
            conn.execute("SELECT count(*), pg_sleep(0.002) FROM work WHERE id < %s", (i,))
            conn.execute("UPDATE work SET v = v || 'x' WHERE id = %s", (i % 50,))
        conn.execute(f"SELECT 1 AS x /* {HOSTILE_COMMENT} */")


@pytest.fixture
def fleet(repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase) -> Fleet:
    """A server 'mon' snapshotted 4 times under a little load, a hostile database
    name and query text in it; a reader and an admin role on the repository."""
    mon = new_database(pg18)
    with connect(mon) as conn:
        conn.execute("CREATE TABLE work (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO work SELECT g, 'v' FROM generate_series(1, 500) g")
        conn.execute("CREATE INDEX ON work (v)")
    with connect(pg18.dsn()) as conn:
        hostile = sql.Identifier(HOSTILE_DB)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(hostile))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(hostile))
        # The cluster is shared by the whole session: start from no
        # statements so this fixture's load is the server's top workload.
        conn.execute("SELECT pg_stat_statements_reset()")
    add_server(run_cli, "mon", mon, "--frequency", "1")
    srvid = scalar(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = 'mon'")
    assert isinstance(srvid, int)
    for i in range(4):
        _load(mon, 200 + 50 * i)
        res = run_cli("snapshot", "mon")
        assert res.rc == 0, res.err
        time.sleep(1.1)
    reader, admin = web_roles(repo, pg18.port)
    return Fleet(repo, srvid, mon, reader, admin)


def web_roles(repo: str, suffix: int) -> tuple[tuple[str, str], tuple[str, str]]:
    """A pgfleet_read role and a pgfleet_admin role of the repository, with
    their passwords (made again)."""
    reader, admin = (f"web_reader_{suffix}", "r3ader!"), (f"web_admin_{suffix}", "adm1n!")
    with connect(repo) as conn:
        for (name, password), role in ((reader, "pgfleet_read"), (admin, "pgfleet_admin")):
            conn.execute(f"DROP ROLE IF EXISTS {name}")
            conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE {role}")
    return reader, admin


def web_config(repo: str, **web: Any) -> Config:
    """`web` holds `WebConfig` fields."""
    return Config(repository=RepositoryConfig(dsn=repo), web=WebConfig(token=TOKEN, **web))


@contextlib.contextmanager
def serving(cfg: Config) -> Iterator[str]:
    """The app on a free port of 127.0.0.1, in a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(cfg), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="pgfleet-web", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the web UI did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def record_backups(fleet: Fleet) -> list[BackupInfo]:
    """Three backups of 'mon' in the repository's copy of its catalog, around its
    snapshots: valid before them, invalid amid them (a hostile error text), and
    one in progress since just after them (a hostile label).  Oldest first."""
    with connect(fleet.repo) as conn:
        lo, hi = one_row(
            conn,
            "SELECT min(ts), max(ts) FROM pgfleet.pg_stat_statements_rollup WHERE srvid = %s",
            (fleet.srvid,),
        )
        s = timedelta(seconds=1)

        def made(start: Any, state: State, **kw: Any) -> BackupInfo:
            return BackupInfo(id=start.strftime("%Y%m%dT%H%M%SZ"), server="mon", state=state,
                              started=start, timeline=1, **kw)  # fmt: skip

        listed = [
            made(
                lo - 4 * s,
                State.VALID,
                finished=lo - s,
                start_lsn="0/2000028",
                end_lsn="0/2000138",
                start_wal="000000010000000000000002",
                end_wal="000000010000000000000002",
                raw_bytes=31_457_280,
                stored_bytes=4_194_304,
            ),
            made(
                lo + s,
                State.INVALID,
                kind=Kind.INCREMENTAL,
                finished=lo + 2 * s,
                start_lsn="0/4000028",
                error=f"pg_basebackup: error: {HOSTILE_BACKUP}",
            ),
            made(hi + s, State.IN_PROGRESS, label=HOSTILE_BACKUP, start_lsn="0/6000028"),
        ]
        backups.mirror(conn, fleet.srvid, listed)
    return listed
