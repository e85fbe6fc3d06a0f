"""A server: its workload over the range, top queries, databases, waits, errors, backups."""

from __future__ import annotations

from typing import Any

from pgfleet.repository import backups, reads, usage
from pgfleet.web.page import INT4_MAX, Ctx, NotFound, Page, buckets_for, concurrently, path_int
from pgfleet.web.views import kcache, workload


async def load_server(ctx: Ctx) -> dict[str, Any]:
    # 0: the repository itself, when it has snapshotted itself (local mode).
    srvid = path_int(ctx, "srvid", "server", INT4_MAX)
    srv = await ctx.read(reads.server, srvid)
    if srv is None:
        raise NotFound(f"no server with srvid {srvid}")
    return srv


def sort_of(ctx: Ctx) -> str:
    sort = ctx.request.query_params.get("sort", "total_time")
    return sort if sort in reads.QUERY_SORTS else "total_time"


def own_of(ctx: Ctx) -> bool:
    """Whether the top queries include pgfleet's own statements (``?own=1``)."""
    return ctx.request.query_params.get("own") == "1"


async def _charts(ctx: Ctx, srvid: int, b: reads.Buckets) -> list[dict[str, Any]]:
    common, cpu = await concurrently(
        workload.server_charts(ctx, srvid, b), kcache.charts(ctx, srvid, b)
    )
    return [*common, *cpu]


async def build(ctx: Ctx) -> dict[str, Any]:
    srv = await load_server(ctx)
    srvid = srv["srvid"]
    b = buckets_for(ctx, srv)
    tr = ctx.range
    sort = sort_of(ctx)
    own = own_of(ctx)
    data = await ctx.gather({
        "charts": _charts(ctx, srvid, b),
        "markers": ctx.read(reads.settings_changes, srvid, tr.start, tr.end),
        "top_queries": ctx.read(reads.top_queries, srvid, tr.start, tr.end, sort=sort, own=own),
        "databases": ctx.read(reads.databases, srvid, tr.start, tr.end),
        "wait_events": ctx.read(reads.wait_events, srvid, b),
        "sessions_waiting": ctx.read(reads.sessions_waiting, srvid, b, None),
        "errors": ctx.read(reads.errors, srvid),
        "repository": ctx.read(usage.server_summary, srvid),
        "kcache": kcache.part(ctx, srvid, own=own),
        # Every backup the catalog's copy holds, not only the range's: the
        # table lists them all, the charts mark those they show.
        "backups": ctx.read(backups.listed, srvid),
    })  # fmt: skip
    return {
        "server": srv,
        "range": tr.as_json(),
        "sort": sort,
        "own": own,
        "x": b.x() if ctx.wants("charts") else None,
        "bucket_seconds": b.width,
        **data,
    }


PAGE = Page(
    name="server",
    path="/server/{srvid}",  # not {srvid:int}: int() of 5,000 digits raises
    template="server.html",
    build=build,
    html_parts=frozenset(
        {
            "top_queries",
            "databases",
            "wait_events",
            "sessions_waiting",
            "errors",
            "markers",
            "repository",
            "kcache",
            "backups",
        }
    ),
)
