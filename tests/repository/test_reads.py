"""The web UI's rankings (`reads.sums` with an order and a limit) read in
passes, the first on bounds from window totals when the order is a sum of
counters; they must rank and sum exactly as one pass over every column does,
over ranges that cut aggregation windows at both ends and reach the points
not yet aggregated, whatever the order.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgfleet.repository import reads
from tests.fix_repository import RunCli, connect

# Three windows of 10 snapshots a minute apart, then 4 snapshots waiting in
# _current: 34 minutes from BASE, all within the last day.
BASE = "date_trunc('hour', now() - interval '3 hours', 'UTC')"
STATEMENTS = 120


def _fill(repo: str, srvid: int) -> None:
    # Statement k runs at snapshot i with calls and time that differ per
    # statement and snapshot, so that ranks depend on where the range cuts;
    # some have no database (NULL keys) and some only run now and then.
    insert = f"""
        INSERT INTO pgfleet.pg_stat_statements_current
               (srvid, ts, datname, rolname, toplevel, queryid, calls, rows, total_exec_time,
                shared_blks_read)
        SELECT %(srvid)s, {BASE} + i * interval '1 minute',
               CASE WHEN k %% 7 = 0 THEN NULL ELSE 'db' || k %% 3 END, 'app', true, k,
               1 + (k * i) %% 5, k, ((k * 37 + i * 11) %% 101) / 3.0 + k / 1024.0, nullif(i %% 4, 0)
          FROM generate_series(1, {STATEMENTS}) k, generate_series(%(lo)s::int, %(hi)s::int) i
         WHERE (k + i) %% 3 <> 0 OR k < 40
    """
    with connect(repo) as conn:
        for w in range(3):
            conn.execute(insert, {"srvid": srvid, "lo": 10 * w, "hi": 10 * w + 9})
            conn.execute("SELECT pgfleet.metric_aggregate('pg_stat_statements', %s)", (srvid,))
        conn.execute(insert, {"srvid": srvid, "lo": 30, "hi": 33})


EXPRS = {
    "calls": "sum(calls)",
    "time": "sum(total_exec_time)",
    "rows": "sum(rows)",
    "reads": "sum(shared_blks_read)",
    # A sum of counters as kcache's are written: ranked on bounds too.
    "busy": "sum(coalesce(total_exec_time, 0) + coalesce(shared_blks_read, 0))",
    # Not a sum: ranked without bounds.
    "per_call": "sum(total_exec_time) / sum(calls)",
}
GROUP = ["datname", "queryid"]


async def _both(
    repo: str,
    srvid: int,
    start: datetime,
    end: datetime,
    limit: int,
    datname: str | None,
    order: str = "time",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    where = {"datname": datname} if datname else None
    async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn:
        two = await reads.sums(
            conn, "pg_stat_statements", srvid, start, end, GROUP, EXPRS,
            where=where, order=order, limit=limit,
        )  # fmt: skip
        # One pass, every column of every statement, ranked here.
        every = await reads.sums(
            conn, "pg_stat_statements", srvid, start, end, GROUP, EXPRS, where=where
        )
    every.sort(key=lambda r: -r[order] if r[order] is not None else float("inf"))
    return two, every[:limit]


@pytest.mark.parametrize("most_cut", [reads.MOST_CUT, 10.0])
def test_two_pass_ranking_is_one_pass_ranking(
    repo: str, run_cli: RunCli, monkeypatch: pytest.MonkeyPatch, most_cut: float
) -> None:
    # This fill's windows are short beside its ranges: bounds are read for
    # them only with a higher share of cut windows allowed.
    monkeypatch.setattr(reads, "MOST_CUT", most_cut)
    res = run_cli("server", "add", "ranked", "--host", "ranked.invalid")
    assert res.rc == 0, res.err
    srvid = next(s["srvid"] for s in json.loads(run_cli("server", "list", "--json").out))
    _fill(repo, srvid)
    with connect(repo) as conn:
        row = conn.execute(
            f"SELECT {BASE} + interval '4 minutes 30 seconds', {BASE} + interval '32 minutes',"
            f" {BASE} + interval '25 minutes'"
        ).fetchone()
    assert row is not None
    cut_start, in_current, cut_end = row
    ranges = [
        (cut_start, in_current),  # cuts the first window, ends among the waiting points
        (cut_start, cut_end),  # cuts the first and the last window
        (cut_start - (in_current - cut_start), cut_start),  # before any point, then into one
    ]
    for start, end in ranges:
        for datname in (None, "db1"):
            for limit, order in ((1, "time"), (10, "time"), (200, "time"), (10, "busy"),
                                 (3, "busy"), (10, "per_call")):  # fmt: skip
                two, one = asyncio.run(_both(repo, srvid, start, end, limit, datname, order))
                assert [(r["datname"], r["queryid"]) for r in two] == [
                    (r["datname"], r["queryid"]) for r in one
                ], (start, end, datname, limit, order)
                # Sums of floats in another order may differ in the last bit.
                for a, b in zip(two, one, strict=True):
                    assert a.keys() == b.keys()
                    for k, v in a.items():
                        exact = not isinstance(v, float)
                        assert v == (b[k] if exact else pytest.approx(b[k], rel=1e-12)), k
                assert two, "the range holds points"
    # Statements without a database rank too.
    two, one = asyncio.run(_both(repo, srvid, ranges[0][0], ranges[0][1], 200, None))
    assert any(r["datname"] is None for r in two)

    # On bounds: the winners, and the same as ranking every entry exactly.
    async def bounded(start: datetime, end: datetime, order: str) -> set[tuple[Any, ...]] | None:
        async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn:
            params: dict[str, Any] = {"srvid": srvid, "from": start, "to": end}
            return await reads._bounded(
                conn, "pg_stat_statements", GROUP, order, EXPRS[order], 10, sql.SQL(""),
                params,
            )  # fmt: skip

    if most_cut < 1:
        # Cut windows about as long as the rest of the range: no bounds.
        assert asyncio.run(bounded(*ranges[0], "time")) is None
        return
    for start, end in ranges[:2]:
        for order in ("time", "busy"):
            kept = asyncio.run(bounded(start, end, order))
            two, one = asyncio.run(_both(repo, srvid, start, end, 10, None, order))
            assert kept == {(r["datname"], r["queryid"]) for r in one}, (start, end, order)
    assert asyncio.run(bounded(*ranges[0], "per_call")) is None
    # No window inside the range: nothing to bound on.
    assert asyncio.run(bounded(*ranges[2], "time")) is None


def test_summed_columns() -> None:
    assert reads._summed_columns("sum(calls)") == {"calls"}
    assert reads._summed_columns(
        "coalesce(sum(a), 0) + coalesce(sum(b), 0) + sum(coalesce(c, 0) + d)"
    ) == {"a", "b", "c", "d"}
    for expr in ("sum(a) / nullif(sum(b), 0)", "sum(a) - sum(b)", "max(a)", "sum(a * 2)",
                 "count(*)", "sum(a) + 1"):  # fmt: skip
        assert reads._summed_columns(expr) is None, expr


def test_rollup_sums_are_window_sums(repo: str, run_cli: RunCli) -> None:
    """`reads.rollup_sums` (a server's or a database's sums from the rollup)
    gives what `reads.sums` gives over every statement, on the same ranges."""
    res = run_cli("server", "add", "rolled", "--host", "rolled.invalid")
    assert res.rc == 0, res.err
    srvid = next(s["srvid"] for s in json.loads(run_cli("server", "list", "--json").out))
    _fill(repo, srvid)
    with connect(repo) as conn:
        conn.execute("SELECT pgfleet.metric_rollup_rebuild('pg_stat_statements')")
        row = conn.execute(
            f"SELECT {BASE} + interval '4 minutes 30 seconds', {BASE} + interval '32 minutes',"
            f" {BASE} + interval '5 minutes', {BASE} + interval '20 minutes'"
        ).fetchone()
    assert row is not None
    cut_start, in_current, on_start, on_end = row
    exprs = {"calls": "sum(calls)", "time": "sum(total_exec_time)",
             "reads": "sum(shared_blks_read)", "per_call": "sum(rows) / sum(calls)"}  # fmt: skip

    async def both(start: datetime, end: datetime, group: list[str], where: Any) -> None:
        async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn:
            rolled = await reads.rollup_sums(
                conn, "pg_stat_statements", srvid, start, end, group, exprs, where=where,
                order="time",
            )  # fmt: skip
            every = await reads.sums(
                conn, "pg_stat_statements", srvid, start, end, group, exprs, where=where,
                order="time",
            )  # fmt: skip
        assert [r.get("datname") for r in rolled] == [r.get("datname") for r in every]
        for a, b in zip(rolled, every, strict=True):
            assert a.keys() == b.keys()
            for k, v in a.items():
                exact = not isinstance(v, float)
                assert v == (b[k] if exact else pytest.approx(b[k], rel=1e-12)), (start, end, k)

    for start, end in ((cut_start, in_current), (on_start, on_end), (on_start, on_start)):
        asyncio.run(both(start, end, [], None))
        asyncio.run(both(start, end, ["datname"], None))
        asyncio.run(both(start, end, [], {"datname": "db1"}))
        asyncio.run(both(start, end, [], {"datname": None}))
