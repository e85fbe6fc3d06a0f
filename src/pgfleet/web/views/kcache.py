"""CPU time and physical I/O (pg_stat_kcache) on the server, database and
query pages: two charts and a part of the page's data, ``kcache``.

Shown only when the repository holds pg_stat_kcache figures of the server
(:func:`pgfleet.repository.kcache.available`); otherwise the part says so
and the charts are left out.  Units are :mod:`pgfleet.repository.kcache`'s:
series in CPU seconds per second (cores kept busy) and bytes per second,
totals in seconds and bytes.
"""

from __future__ import annotations

from typing import Any

from pgfleet.repository import kcache
from pgfleet.repository.reads import Buckets
from pgfleet.web.page import Ctx, chart, concurrently, line

NOTE = (
    "No pg_stat_kcache figures for this server: CPU time (user and system) and the reads"
    " and writes the kernel did for each statement need the pg_stat_kcache extension"
    " (in shared_preload_libraries, and installed in one of the server's databases)."
)


def sort_of(ctx: Ctx) -> str:
    """The ranking of the top queries by CPU (``?ksort=``)."""
    sort = ctx.request.query_params.get("ksort", "cpu")
    return sort if sort in kcache.SORTS else "cpu"


async def charts(
    ctx: Ctx,
    srvid: int,
    b: Buckets,
    *,
    datname: str | None = None,
    queryid: int | None = None,
) -> list[dict[str, Any]]:
    """The CPU and physical I/O charts, or none without pg_stat_kcache."""
    if not await ctx.read(kcache.available, srvid):
        return []
    s = await ctx.read(kcache.series, srvid, b, datname=datname, queryid=queryid)
    return [
        chart("cpu", "CPU time (pg_stat_kcache)", [
            line("user", s["cpu_user"], "cores"),
            line("system", s["cpu_system"], "cores"),
        ], note="CPU seconds per second, from getrusage(): the cores kept busy on average"),
        chart("os_io", "Physical reads and writes (pg_stat_kcache)", [
            line("read", s["reads"], "B/s"),
            line("written", s["writes"], "B/s"),
        ], note="bytes the kernel read from and wrote to storage: page cache hits are no reads"),
    ]  # fmt: skip


async def totals(
    ctx: Ctx, srvid: int, *, datname: str | None = None, queryid: int | None = None
) -> dict[str, float | None]:
    """Seconds and bytes over the range: a server's or a database's from the
    per-database rollup, a query's from its window totals
    (:func:`pgfleet.repository.kcache.totals`)."""
    tr = ctx.range
    return await ctx.read(kcache.totals, srvid, tr.start, tr.end, datname=datname, queryid=queryid)


async def part(
    ctx: Ctx,
    srvid: int,
    *,
    datname: str | None = None,
    queryid: int | None = None,
    own: bool = False,
) -> dict[str, Any]:
    """The page's ``kcache``: ``available``, and then ``totals`` over the
    range and, but for a query, ``top_queries`` (by ``sort``)."""
    if not await ctx.read(kcache.available, srvid):
        return {"available": False, "note": NOTE}
    tr = ctx.range
    sort = sort_of(ctx)
    out: dict[str, Any] = {"available": True, "sort": sort}
    if queryid is not None:
        out["totals"] = await totals(ctx, srvid, datname=datname, queryid=queryid)
        return out
    sums, rows = await concurrently(
        totals(ctx, srvid, datname=datname),
        ctx.read(kcache.top_queries, srvid, tr.start, tr.end, datname=datname, sort=sort,
                 own=own),
    )  # fmt: skip
    return {**out, "totals": sums, "top_queries": rows}
