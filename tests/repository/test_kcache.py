"""pg_stat_kcache as the UI reads it (repository.kcache): CPU seconds and
bytes per server, database and query, as totals and as series whose rates
add back up to the totals.  Real snapshots of PostgreSQL 15 with
pg_stat_kcache, taken by the CLI; PostgreSQL 18 has no pg_stat_kcache."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import psycopg
import pytest

from pgfleet.cluster import Cluster
from pgfleet.repository import kcache
from pgfleet.repository.reads import Buckets, Conn
from tests.fix_clusters import NewDatabase
from tests.fix_repository import RunCli, add_server, scalar_int

T = TypeVar("T")
CPU_QUERY = "SELECT sum(g) FROM generate_series($2, $1) g"  # psycopg's %s is $1


def _read(repo: str, fn: Callable[[Conn], Awaitable[T]]) -> T:
    async def run() -> T:
        async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn:
            return await fn(conn)

    return asyncio.run(run())


def _now() -> datetime:
    return datetime.now(UTC)


def _back(series: dict[str, list[float | None]], b: Buckets, metric: str) -> float:
    """What a series' rates add up to over its buckets."""
    return sum(v * b.width for v in series[metric] if v is not None)


def test_cpu_and_io_per_server_database_and_query(
    repo: str, run_cli: RunCli, pg15: Cluster, new_database: NewDatabase
) -> None:
    dsn = new_database(pg15)
    dbname = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    add_server(run_cli, "kc", dsn)
    srvid = scalar_int(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = 'kc'")
    assert run_cli("snapshot", "kc").rc == 0
    start = _now()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(3):
            conn.execute("SELECT sum(g) FROM generate_series(1, %s) g", (2_000_000,))
        # A sort spilling to a temporary file: the kernel sees it written
        # (so does generate_series' tuplestore above).
        conn.execute("SET work_mem = '64kB'")
        conn.execute(
            "SELECT count(*) FROM (SELECT md5(g::text) m FROM generate_series(1, %s) g"
            " ORDER BY 1) s",
            (200_000,),
        )
    assert run_cli("snapshot", "kc").rc == 0
    end = _now()
    b = Buckets.over(start, end, points=20, min_width=0.01)

    assert _read(repo, lambda c: kcache.available(c, srvid))
    server = _read(repo, lambda c: kcache.totals(c, srvid, start, end))
    db = _read(repo, lambda c: kcache.totals(c, srvid, start, end, datname=dbname))
    assert set(server) == set(db) == set(kcache.METRICS)
    top = _read(repo, lambda c: kcache.top_queries(c, srvid, start, end, datname=dbname))
    assert top and top[0]["query"] == CPU_QUERY, [r["query"] for r in top]
    queryid = top[0]["queryid"]
    query = _read(repo, lambda c: kcache.totals(c, srvid, start, end, queryid=queryid))

    # Seconds of CPU: the query's user time is most of a second or so, and
    # the parts add up from query to database to server.
    assert query["cpu_user"] is not None and query["cpu_user"] > 0.05
    assert query["cpu"] == pytest.approx(query["cpu_user"] + (query["cpu_system"] or 0.0))
    for metric in ("cpu_user", "cpu"):
        assert query[metric] <= db[metric] <= server[metric]  # type: ignore[operator]
    # Bytes written: the sort's temporary file, at least its 200,000 md5s.
    assert db["writes"] is not None and db["writes"] >= 200_000 * 32
    assert query["reads"] is not None and query["reads"] >= 0

    # Series: rates per second of every metric, one value per bucket,
    # adding back up to the totals.
    for where, totals in (({}, server), ({"datname": dbname}, db), ({"queryid": queryid}, query)):
        s = _read(repo, lambda c, w=where: kcache.series(c, srvid, b, **w))  # type: ignore[misc]
        assert set(s) == set(kcache.METRICS)
        assert all(len(v) == b.count for v in s.values())
        for metric in kcache.METRICS:
            assert _back(s, b, metric) == pytest.approx(totals[metric] or 0.0, rel=1e-6), (
                where, metric)  # fmt: skip

    dbs = _read(repo, lambda c: kcache.databases(c, srvid, start, end))
    mine = [d for d in dbs if d["datname"] == dbname]
    assert mine and mine[0]["cpu"] == pytest.approx(db["cpu"])
    writes_first = _read(repo, lambda c: kcache.top_queries(
        c, srvid, start, end, datname=dbname, sort="writes"))  # fmt: skip
    writes = [r["writes"] for r in writes_first]
    assert writes == sorted(writes, reverse=True) and writes[0] > 0
    # pgfleet's own statements are left out unless asked for.
    assert not any("/* pgfleet */" in (r["query"] or "") for r in top)
    own = _read(repo, lambda c: kcache.top_queries(c, srvid, start, end, own=True, limit=500))
    assert len(own) >= len(top)


def test_a_server_without_pg_stat_kcache(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    add_server(run_cli, "nokc", new_database(pg18))
    srvid = scalar_int(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = 'nokc'")
    start = _now()
    assert run_cli("snapshot", "nokc").rc == 0
    end = _now()
    b = Buckets.over(start, end, points=5, min_width=0.01)
    assert not _read(repo, lambda c: kcache.available(c, srvid))
    assert _read(repo, lambda c: kcache.totals(c, srvid, start, end)) == dict.fromkeys(
        kcache.METRICS
    )
    s = _read(repo, lambda c: kcache.series(c, srvid, b, queryid=1))
    assert s == {m: [None] * b.count for m in kcache.METRICS}
    assert _read(repo, lambda c: kcache.series(c, srvid, b)) == s
    assert _read(repo, lambda c: kcache.top_queries(c, srvid, start, end)) == []
    assert _read(repo, lambda c: kcache.databases(c, srvid, start, end)) == []
