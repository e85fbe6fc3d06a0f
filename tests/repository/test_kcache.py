"""pg_stat_kcache as the UI reads it (repository.kcache): CPU seconds and
bytes per server, database and query, as totals and as series whose rates
add back up to the totals.  Real snapshots of PostgreSQL 15 with
pg_stat_kcache, taken by the CLI; PostgreSQL 18 has no pg_stat_kcache.

A server's and a database's totals come from the rollup, a few rows per
snapshot: they must be what the statements' window totals sum to, over
ranges that cut aggregation windows, start or end on a snapshot, and reach
the points not yet aggregated (a filled-in history, no server needed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import pytest

from pgfleet.cluster import Cluster
from pgfleet.repository import kcache, reads
from pgfleet.repository.reads import Buckets, Conn
from tests.fix_clusters import NewDatabase
from tests.fix_repository import RunCli, add_server, connect, scalar_int

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


# Three windows of 10 snapshots a minute apart, then 4 snapshots waiting in
# _current: 34 minutes from BASE, all within the last day.
BASE = "date_trunc('hour', now() - interval '3 hours', 'UTC')"
# What the metrics are, written out here rather than taken from kcache: the
# planning and execution columns summed, a missing value counting as zero.
WINDOW_EXPRS = {
    "cpu_user": "sum(coalesce(plan_user_time, 0) + coalesce(exec_user_time, 0))",
    "cpu_system": "sum(coalesce(plan_system_time, 0) + coalesce(exec_system_time, 0))",
    "cpu": "sum(coalesce(plan_user_time, 0) + coalesce(exec_user_time, 0)"
    " + coalesce(plan_system_time, 0) + coalesce(exec_system_time, 0))",
    "reads": "sum(coalesce(plan_reads, 0) + coalesce(exec_reads, 0))",
    "writes": "sum(coalesce(plan_writes, 0) + coalesce(exec_writes, 0))",
}


def _fill(repo: str, srvid: int) -> None:
    """Statement k's figures at snapshot i, different per statement and
    snapshot; some without a database (NULL keys), some missing now and
    then, some columns NULL (a zero delta, as stored)."""
    insert = f"""
        INSERT INTO pgfleet.pg_stat_kcache_current
               (srvid, ts, datname, rolname, toplevel, queryid, plan_user_time, exec_user_time,
                plan_system_time, exec_system_time, plan_reads, exec_reads, exec_writes)
        SELECT %(srvid)s, {BASE} + i * interval '1 minute',
               CASE WHEN k %% 7 = 0 THEN NULL ELSE 'db' || k %% 3 END, 'app', true, k,
               nullif((k * i) %% 3, 0) / 1000.0, ((k * 37 + i * 11) %% 101) / 300.0 + k / 1024.0,
               nullif(i %% 4, 0) / 700.0, (k %% 5 + 1) / 900.0,
               nullif((k + i) %% 4, 0) * 8192, k * 8192 * (1 + i %% 3),
               nullif((k * i) %% 6, 0) * 4096
          FROM generate_series(1, 40) k, generate_series(%(lo)s::int, %(hi)s::int) i
         WHERE (k + i) %% 3 <> 0 OR k < 10
    """
    with connect(repo) as conn:
        for w in range(3):
            conn.execute(insert, {"srvid": srvid, "lo": 10 * w, "hi": 10 * w + 9})
            conn.execute("SELECT pgfleet.metric_aggregate('pg_stat_kcache', %s)", (srvid,))
        conn.execute(insert, {"srvid": srvid, "lo": 30, "hi": 33})
        # What the snapshots write as they go, made from the points.
        conn.execute("SELECT pgfleet.metric_rollup_rebuild('pg_stat_kcache')")


def _same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got.keys() == expected.keys()
    for k, v in got.items():
        want = expected[k]
        # Sums of floats in another order may differ in the last bits.
        exact = not (isinstance(v, float) and isinstance(want, float))
        assert v == (want if exact else pytest.approx(want, rel=1e-12)), k


def test_server_and_database_totals_from_the_rollup_are_the_window_totals(
    repo: str, run_cli: RunCli
) -> None:
    res = run_cli("server", "add", "kcrollup", "--host", "kcrollup.invalid")
    assert res.rc == 0, res.err
    srvid = next(s["srvid"] for s in json.loads(run_cli("server", "list", "--json").out))
    _fill(repo, srvid)
    with connect(repo) as conn:
        row = conn.execute(f"SELECT {BASE}").fetchone()
    assert row is not None
    base: datetime = row[0]
    minute = timedelta(minutes=1)
    ranges = [
        (base + 4.5 * minute, base + 32 * minute),  # cuts a window, ends among the waiting points
        (base + 4.5 * minute, base + 25.5 * minute),  # cuts the first and the last window
        (base + 5 * minute, base + 20 * minute),  # starts and ends on a snapshot: both count
        (base + 10 * minute, base + 10 * minute),  # one snapshot, the first of a window
        (base - 30 * minute, base + 2.5 * minute),  # before any point, then into one
        (base - 30 * minute, base - 10 * minute),  # nothing
    ]

    async def check(conn: Conn) -> None:
        for start, end in ranges:
            # The databases' ranking: the same figures, the largest first.
            dbs = await kcache.databases(conn, srvid, start, end)
            every = await reads.sums(
                conn, "pg_stat_kcache", srvid, start, end, ["datname"], WINDOW_EXPRS
            )
            expected = {r["datname"]: r for r in every if any(r[m] for m in kcache.METRICS)}
            assert [d["datname"] for d in dbs] == sorted(
                expected, key=lambda n: -expected[n]["cpu"]
            ), (start, end)
            for d in dbs:
                _same(d, expected[d["datname"]])
            # Totals of the server and of each database.
            for datname in (None, "db0", "db1", "nodb"):
                where = {"datname": datname} if datname else None
                got = await kcache.totals(conn, srvid, start, end, datname=datname)
                [want] = await reads.sums(
                    conn, "pg_stat_kcache", srvid, start, end, [], WINDOW_EXPRS, where=where
                )
                _same(got, {m: want[m] for m in kcache.METRICS})
            assert (start, end) == ranges[-1] or dbs, "the range holds points"
        # Statements without a database count as one.
        dbs = await kcache.databases(conn, srvid, *ranges[0])
        assert None in {d["datname"] for d in dbs}
        # Read from the rollup indeed: without it, a server has no totals,
        # its statements' window totals unchanged.
        await conn.execute("DELETE FROM pgfleet.pg_stat_kcache_rollup WHERE srvid = %s", (srvid,))
        assert await kcache.totals(conn, srvid, *ranges[0]) == dict.fromkeys(kcache.METRICS)
        assert await kcache.databases(conn, srvid, *ranges[0]) == []
        assert (await kcache.top_queries(conn, srvid, *ranges[0]))[0]["cpu"] > 0

    _read(repo, check)
