"""Plans of statements pg_stat_statements saw, end to end: snapshotted by
the CLI, explained from the repository's text in the statement's own
database; refused with a reason on PostgreSQL 15, on a hostile text, on a
statement without a text."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from pgfleet.advice import plans
from pgfleet.advice.explain import Format
from pgfleet.advice.plans import Plan
from pgfleet.cluster import Cluster
from pgfleet.config import CollectorConfig
from pgfleet.repository.servers import Server
from tests.advice.fix_advice import (
    PASSWORD,
    PW_VAR,
    ensure_monitor,
    register,
    server_of,
    snapshot,
)
from tests.fix_clusters import NewDatabase
from tests.fix_repository import RunCli, connect, scalar_int

STATEMENT = "SELECT b FROM t WHERE a = %s"


def _explain(
    repo: str,
    server: Server,
    queryid: int,
    *,
    datname: str | None = None,
    fmt: Format = "json",
    role: str | None = None,
) -> Plan:
    async def run() -> Plan:
        async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn:
            return await plans.explain_statement(
                conn, server, CollectorConfig(), queryid, datname=datname, fmt=fmt, role=role
            )

    return asyncio.run(run())


def test_plans(
    repo: str,
    run_cli: RunCli,
    monitored: Cluster,
    new_database: NewDatabase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ensure_monitor(monitored)
    monkeypatch.setenv(PW_VAR, PASSWORD)
    dsn = new_database(monitored)
    dbname = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (a int PRIMARY KEY, b text)")
        conn.execute("INSERT INTO t SELECT g, g::text FROM generate_series(1, 1000) g")
        conn.execute("CREATE TABLE victim (id int)")
        conn.execute("ANALYZE t")
        for a in (5, 6, 7):
            conn.execute(STATEMENT, (a,))
    register(run_cli, "planned", dsn)
    snapshot(run_cli, "planned")
    server = server_of(repo, "planned")
    queryid = scalar_int(
        repo,
        "SELECT queryid FROM pgfleet.pg_stat_statements_once"
        " WHERE srvid = %s AND datname = %s AND query = 'SELECT b FROM t WHERE a = $1'",
        (server.srvid, dbname),
    )

    plan = _explain(repo, server, queryid)
    assert plan.datname == dbname and plan.query == "SELECT b FROM t WHERE a = $1"
    assert plan.server_version_num is not None
    if monitored.version_num < 160000:
        assert not plan.ok and plan.plan is None
        assert plan.reason == (
            "plans need EXPLAIN (GENERIC_PLAN), PostgreSQL 16 or later: server 'planned' "
            f"runs PostgreSQL {plan.server_version_num // 10000}.{plan.server_version_num % 10000}"
        )
        return
    assert plan.ok, plan.reason
    assert plan.plan[0]["Plan"]["Node Type"] == "Index Scan"
    assert plan.plan[0]["Plan"]["Index Name"] == "t_pkey"
    assert plan.to_dict()["ok"] is True
    text = _explain(repo, server, queryid, fmt="text", datname=dbname)
    assert text.ok and "Index Scan using t_pkey on t" in text.plan

    # No text, a text in another database than asked, several databases.
    assert (
        _explain(repo, server, 12345).reason == "pg_stat_statements kept no text of statement 12345"
    )
    other = _explain(repo, server, queryid, datname="elsewhere")
    assert (
        other.reason
        == f"pg_stat_statements kept no text of statement {queryid} in database 'elsewhere'"
    )
    with connect(repo) as conn:
        conn.execute(
            "INSERT INTO pgfleet.pg_stat_statements_once"
            " (srvid, datname, rolname, toplevel, queryid, query, first_seen)"
            " VALUES (%s, 'elsewhere', 'app', true, %s, 'SELECT 1', now())",
            (server.srvid, queryid),
        )
    both = _explain(repo, server, queryid)
    assert (
        both.reason
        == f"the statement ran in several databases ({', '.join(sorted([dbname, 'elsewhere']))}): choose one"
    )

    # A hostile server's texts: refused, nothing run.
    with connect(repo) as conn:
        for i, query in enumerate(["SELECT 1; DROP TABLE victim", "DROP TABLE victim"]):
            conn.execute(
                "INSERT INTO pgfleet.pg_stat_statements_once"
                " (srvid, datname, rolname, toplevel, queryid, query, first_seen)"
                " VALUES (%s, %s, 'postgres', true, %s, %s, now())",
                (server.srvid, dbname, 777 + i, query),
            )
    multi = _explain(repo, server, 777)
    assert multi.reason == "cannot insert multiple commands into a prepared statement"
    drop = _explain(repo, server, 778)
    assert drop.reason is not None and drop.reason.endswith(", not DROP")
    assert monitored.execute("SELECT count(*) FROM victim", dbname=dbname) == [(0,)]

    # A role to explain as, that the monitoring role may not take.
    role = _explain(repo, server, queryid, datname=dbname, role="no_such_role")
    assert role.reason is not None and role.reason.startswith(
        "cannot switch to role 'no_such_role'"
    )
