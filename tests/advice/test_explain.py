"""Statement texts from monitored servers are hostile: explained, never
executed, one statement only, read-only, bounded in time, names resolved as
the statement's role would.  On PostgreSQL 15 (PREPARE, EXPLAIN EXECUTE of
a generic plan) and 18 (EXPLAIN (GENERIC_PLAN)), through the collector's own
connections, as a monitoring role."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import sql

from pgfleet.advice import plans
from pgfleet.advice.explain import (
    ExplainSession,
    NotExplainable,
    check_plannable,
    first_keyword,
    index_names,
    search_path_of,
    total_cost,
)
from pgfleet.cluster import Cluster
from pgfleet.config import CollectorConfig
from pgfleet.connections import connect_server
from pgfleet.repository.servers import Server
from tests.advice.fix_advice import MONITOR, PASSWORD, PW_VAR, ensure_monitor
from tests.fix_clusters import NewDatabase

T = TypeVar("T")

SETUP = """
CREATE TABLE t (a int PRIMARY KEY, b text);
INSERT INTO t SELECT g, g::text FROM generate_series(1, 1000) g;
CREATE TABLE victim (id int);
INSERT INTO victim VALUES (1), (2), (3);
CREATE SEQUENCE s;
ANALYZE t;
"""


@pytest.fixture
def target(
    monitored: Cluster, new_database: NewDatabase, monkeypatch: pytest.MonkeyPatch
) -> tuple[Cluster, Server]:
    """A database of each version, and the server entry a collector would have
    for it, as the monitoring role (which may also write ``victim``)."""
    ensure_monitor(monitored)
    monkeypatch.setenv(PW_VAR, PASSWORD)
    dsn = new_database(monitored)
    dbname = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SETUP)
        # Privileges to explain writes; never used to make them.
        conn.execute(sql.SQL("GRANT INSERT, DELETE ON victim TO {}").format(
            sql.Identifier(MONITOR)))  # fmt: skip
    server = Server(
        srvid=1, alias="target", host=monitored.host, port=monitored.port,
        username=MONITOR, dbname=dbname, password_ref=f"env:{PW_VAR}",
    )  # fmt: skip
    return monitored, server


def _in_session(
    server: Server, body: Callable[[ExplainSession], Awaitable[T]], timeout: float = 2.0
) -> T:
    async def run() -> T:
        conn = await connect_server(server, CollectorConfig())
        async with conn:
            async with ExplainSession(conn, timeout=timeout) as s:
                result = await body(s)
            # Rolled back, usable, nothing prepared left behind.
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            cur = await conn.execute("SELECT count(*) FROM pg_catalog.pg_prepared_statements")
            assert await cur.fetchone() == (0,)
            return result

    return asyncio.run(run())


def _victims(cluster: Cluster, server: Server) -> list[Any]:
    return [r[0] for r in cluster.execute("SELECT id FROM victim ORDER BY 1", dbname=server.dbname)]


def test_first_keyword() -> None:
    assert first_keyword("  /* a /* nested */ b */ -- c\n ((select 1))") == "SELECT"
    assert first_keyword("WITH x AS (DELETE FROM t) SELECT 1") == "WITH"
    assert first_keyword("/* unterminated") is None
    assert first_keyword("-- only a comment") is None
    assert first_keyword("$1") is None
    for text in (
        "DROP TABLE t",
        "COPY t TO STDOUT",
        "EXPLAIN ANALYZE DELETE FROM t",
        "CREATE TABLE x AS SELECT 1",
        "DO $$ BEGIN END $$",
        "",
        "\x00SELECT",
    ):
        with pytest.raises(NotExplainable):
            check_plannable(text)  # fmt: skip
    check_plannable("TABLE t")
    check_plannable("VALUES ($1)")


def test_search_path_of() -> None:
    assert search_path_of('"$user", public', "app") == 'pg_catalog, "app", public, pg_temp'
    assert search_path_of('"$user", public', None) == "pg_catalog, public, pg_temp"
    assert search_path_of('"a,b", pg_catalog, x', 'r"1') == 'pg_catalog, "a,b", x, pg_temp'


def test_hostile_texts_are_never_executed(target: tuple[Cluster, Server]) -> None:
    cluster, server = target
    refused = [
        "SELECT 1; DROP TABLE victim",
        "SELECT a FROM t WHERE a = $1; DELETE FROM victim",
        "SELECT 1;DELETE FROM victim;",
        "DROP TABLE victim",
        "DELETE FROM victim; COMMIT; DROP TABLE victim",
        "COPY victim TO STDOUT",
        "EXPLAIN ANALYZE DELETE FROM victim",
        "SELECT 1 /* unterminated; DROP TABLE victim",
    ]
    explained = [
        "DELETE FROM victim WHERE id = $1",
        "/* a */ -- b\n INSERT INTO victim SELECT g FROM generate_series(1, $1) g",
        "WITH gone AS (DELETE FROM victim RETURNING id) SELECT count(*) FROM gone",
        "SELECT nextval('s')",
        "SELECT pg_catalog.pg_sleep(5)",
    ]

    async def body(s: ExplainSession) -> tuple[list[str], list[Any], float, str]:
        ro = await s.fetch("SHOW transaction_read_only")
        reasons = []
        for text in refused:
            with pytest.raises(NotExplainable) as e:
                await s.explain(text)
            reasons.append(str(e.value))
        started = time.monotonic()
        plans_ = [await s.explain(text) for text in explained]
        return reasons, plans_, time.monotonic() - started, ro[0]["transaction_read_only"]

    reasons, got, seconds, read_only = _in_session(server, body)
    assert read_only == "on"
    assert "cannot insert multiple commands into a prepared statement" in reasons[0]
    assert "cannot insert multiple commands into a prepared statement" in reasons[1]
    assert reasons[3].endswith("statements are explained, not DROP")
    assert reasons[5].endswith(", not COPY")
    assert reasons[6].endswith(", not EXPLAIN")
    # Plans of the writes, none made: the rows, the sequence, no sleep.
    assert got[0][0]["Plan"]["Node Type"] == "ModifyTable"
    assert all(total_cost(p) is not None for p in got)
    assert _victims(cluster, server) == [1, 2, 3]
    seq = cluster.execute("SELECT is_called FROM s", dbname=server.dbname)
    assert seq == [(False,)]
    assert seconds < 4


def test_lock_wait_is_bounded(target: tuple[Cluster, Server]) -> None:
    cluster, server = target
    with cluster.connect(server.dbname, autocommit=False) as locker:
        locker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")

        async def body(s: ExplainSession) -> str:
            with pytest.raises(NotExplainable) as e:
                await s.explain("SELECT b FROM t WHERE a = $1")
            return str(e.value)

        started = time.monotonic()
        reason = _in_session(server, body, timeout=0.5)
        assert time.monotonic() - started < 3
        locker.rollback()
    assert "lock_timeout" in reason or "statement_timeout" in reason


def test_names_resolve_as_the_statement_role(target: tuple[Cluster, Server]) -> None:
    cluster, server = target
    role = f"advice_app_{cluster.port}"
    with cluster.connect(server.dbname) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        conn.execute("CREATE SCHEMA app_s")
        conn.execute("CREATE TABLE app_s.things (x int)")
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE TABLE {}.mine (y int)").format(sql.Identifier(role)))
        conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET search_path = app_s, public")
                     .format(sql.Identifier(role), sql.Identifier(server.dbname)))  # fmt: skip

    async def body(s: ExplainSession) -> tuple[Any, str, Any, str]:
        things = await s.explain("SELECT x FROM things", rolname=role)
        with pytest.raises(NotExplainable) as e:
            await s.explain("SELECT x FROM things", rolname="postgres")
        # public, as PostgreSQL's default path has it.
        t = await s.explain("SELECT b FROM t WHERE a = $1", rolname="postgres")
        # Our own session's path is back to pg_catalog, pg_temp after each.
        path = await s.fetch("SHOW search_path")
        return things, str(e.value), t, path[0]["search_path"]

    things, missing, t, path = _in_session(server, body)
    assert things[0]["Plan"]["Relation Name"] == "things"
    assert 'relation "things" does not exist' in missing
    assert index_names(t) == {"t_pkey"}
    assert path == "pg_catalog,pg_temp"
    with cluster.connect(server.dbname) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} RESET search_path")
                     .format(sql.Identifier(role), sql.Identifier(server.dbname)))  # fmt: skip

    async def dollar_user(s: ExplainSession) -> Any:
        return await s.explain("SELECT y FROM mine", rolname=role)

    assert _in_session(server, dollar_user)[0]["Plan"]["Relation Name"] == "mine"


def test_explain_text_needs_postgresql_16(target: tuple[Cluster, Server]) -> None:
    cluster, server = target

    async def run() -> tuple[Any, str]:
        conn = await connect_server(server, CollectorConfig())
        async with conn:
            try:
                doc = await plans.explain_text(conn, "SELECT b FROM t WHERE a = $1")
            except NotExplainable as e:
                return None, str(e)
            text = await plans.explain_text(conn, "SELECT b FROM t WHERE a = $1", fmt="text")
            return doc, text

    doc, text = asyncio.run(run())
    if cluster.version_num >= 160000:
        assert doc[0]["Plan"]["Index Name"] == "t_pkey"
        assert "Index Scan using t_pkey on t" in text and "Index Cond: (a = $1)" in text
    else:
        assert doc is None
        assert text == (
            "plans need EXPLAIN (GENERIC_PLAN), PostgreSQL 16 or later: "
            "the server runs PostgreSQL 15." + text.rsplit("15.", 1)[1]
        )
