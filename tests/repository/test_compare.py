"""Two ranges of a server side by side (repository.compare): a statement
made slower in the second range ranks first, new and gone statements say
so, steady ones are no regression.  Real snapshots of PostgreSQL 18 taken
by the CLI, between which the workload changes."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgfleet.cluster import Cluster
from pgfleet.repository import compare
from tests.fix_clusters import NewDatabase
from tests.fix_repository import RunCli, add_server, scalar_int

# Each statement reads its own table, so that each has its own queryid.
TABLES = ("slowed", "steady", "gone", "fresh")


def _run(conn: psycopg.Connection[Any], table: str, times: int, sleep: float) -> None:
    for _ in range(times):
        conn.execute(f"SELECT x, pg_sleep(%s) FROM {table}", (sleep,))


def _now() -> datetime:
    return datetime.now(UTC)


def _compare(
    repo: str, srvid: int, a: compare.Range, b: compare.Range, **kw: Any
) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn:
            return await compare.compare(conn, srvid, a, b, **kw)

    return asyncio.run(run())


def test_slower_statement_ranks_first(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    dsn = new_database(pg18)
    dbname = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in TABLES:
            conn.execute(f"CREATE TABLE {table} (x int)")
            conn.execute(f"INSERT INTO {table} VALUES (1)")
    add_server(run_cli, "cmp", dsn)
    srvid = scalar_int(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = 'cmp'")
    assert run_cli("snapshot", "cmp").rc == 0
    t1 = _now()
    with psycopg.connect(dsn, autocommit=True) as conn:
        _run(conn, "slowed", 20, 0.001)
        _run(conn, "steady", 20, 0.002)
        _run(conn, "gone", 10, 0.001)
    assert run_cli("snapshot", "cmp").rc == 0
    t2 = _now()
    with psycopg.connect(dsn, autocommit=True) as conn:
        _run(conn, "slowed", 20, 0.02)
        _run(conn, "steady", 20, 0.002)
        _run(conn, "fresh", 10, 0.001)
    time.sleep(0.01)
    assert run_cli("snapshot", "cmp").rc == 0
    t3 = _now()

    got = _compare(repo, srvid, (t1, t2), (t2, t3), datname=dbname)

    # As the web page reads it: each range's pass on its own connection first.
    async def read_first() -> dict[str, Any]:
        async def one(r: compare.Range) -> dict[compare.Key, Any]:
            async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn:
                return await compare.per_statement(conn, srvid, r, datname=dbname)

        ra, rb = await asyncio.gather(one((t1, t2)), one((t2, t3)))
        async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn:
            return await compare.compare(
                conn, srvid, (t1, t2), (t2, t3), datname=dbname, first=(ra, rb)
            )

    assert asyncio.run(read_first()) == got
    by = {next(t for t in TABLES if f"FROM {t}" in (s["query"] or "")): s
          for s in got["statements"] if any(f"FROM {t}" in (s["query"] or "") for t in TABLES)}  # fmt: skip
    assert set(by) == set(TABLES)

    first = got["statements"][0]
    assert first is by["slowed"]
    assert first["kind"] == "slower" and first["regressed"]
    assert first["a"]["calls"] == 20 and first["b"]["calls"] == 20
    assert first["b"]["mean_time"] > 5 * first["a"]["mean_time"]
    assert first["mean_time_change"] > 4
    assert first["extra_time"] > 200  # ms: 20 calls 19 ms slower each, less A's time scaled
    assert first["query"] == "SELECT x, pg_sleep($1) FROM slowed"
    assert first["b"]["rows"] == 20 and first["b"]["rows_per_call"] == 1
    assert set(first["a"]) == set(compare.FIGURES)

    assert by["fresh"]["kind"] == "new" and by["fresh"]["a"] is None
    assert by["fresh"]["regressed"]
    assert by["gone"]["kind"] == "gone" and by["gone"]["b"] is None
    assert by["gone"]["extra_time"] < 0 and not by["gone"]["regressed"]
    assert not by["steady"]["regressed"]
    # Biggest regressions first, improvements last.
    extras = [s["extra_time"] for s in got["statements"]]
    assert extras == sorted(extras, reverse=True)
    assert got["regressed"] >= 2
    assert got["a"]["seconds"] == pytest.approx((t2 - t1).total_seconds())
    assert got["totals"]["b"]["calls"] >= 50

    # The whole server: the same winner; at most `limit` statements.
    top = _compare(repo, srvid, (t1, t2), (t2, t3), limit=1)["statements"]
    assert [s["query"] for s in top] == ["SELECT x, pg_sleep($1) FROM slowed"]
    # pgfleet's own statements are not the server's workload.
    assert not any(s["query"] and "/* pgfleet */" in s["query"] for s in
                   _compare(repo, srvid, (t1, t2), (t2, t3))["statements"])  # fmt: skip
    with pytest.raises(ValueError, match="empty time range"):
        _compare(repo, srvid, (t2, t1), (t2, t3))
    # Ranges without a point: nothing to compare, no error.
    long_ago = (t1 - timedelta(days=3), t1 - timedelta(days=2))
    empty = _compare(repo, srvid, long_ago, long_ago, datname=dbname)
    assert empty["statements"] == [] and empty["totals"]["a"]["statements"] == 0
