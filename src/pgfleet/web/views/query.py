"""One statement (a queryid, optionally in one database): its full text and its
series, its wait events, its predicates."""

from __future__ import annotations

from typing import Any

from pgfleet.repository import reads
from pgfleet.web.page import (
    INT8_MAX,
    Ctx,
    NotFound,
    Page,
    buckets_for,
    chart,
    concurrently,
    line,
    path_int,
    values,
)
from pgfleet.web.views import kcache, plans
from pgfleet.web.views.server import load_server

_EXPRS = {
    "calls": "sum(calls)",
    "total_time": "sum(total_exec_time)",
    "rows": "sum(rows)",
    "hit": "sum(shared_blks_hit)",
    "read": "sum(shared_blks_read)",
    "temp_read": "sum(temp_blks_read)",
    "temp_written": "sum(temp_blks_written)",
    "wal": "sum(wal_bytes)",
    "plans": "sum(plans)",
    "plan_time": "sum(total_plan_time)",
}


async def _charts(
    ctx: Ctx, srvid: int, b: reads.Buckets, where: dict[str, Any]
) -> list[dict[str, Any]]:
    n = b.count
    s, means, waits, cpu = await concurrently(
        ctx.read(reads.series, "pg_stat_statements", srvid, b, _EXPRS, where=where),
        ctx.read(reads.series, "pg_stat_statements", srvid, b,
                 {"mean": "sum(total_exec_time) / nullif(sum(calls), 0)"}, where=where, rate=False),
        ctx.read(reads.series, "pg_wait_sampling", srvid, b, {"samples": "sum(count)"},
                 where={"queryid": where["queryid"]}, group="event_type"),
        kcache.charts(ctx, srvid, b, datname=where.get("datname"), queryid=where["queryid"]),
    )  # fmt: skip

    def v(col: str) -> list[float | None]:
        return values(s, None, col, n)

    out = [
        chart("calls", "Calls", [line("calls/s", v("calls"), "/s")]),
        chart("time", "Time", [
            line("mean time", values(means, None, "mean", n), "ms", fill=False),
            line("total time", v("total_time"), "ms/s"),
        ]),
        chart("rows", "Rows", [line("rows/s", v("rows"), "/s")]),
        chart("blocks", "Shared blocks", [
            line("hit/s", v("hit"), "/s"), line("read/s", v("read"), "/s"),
        ]),
        chart("temp", "Temporary blocks", [
            line("read/s", v("temp_read"), "/s"), line("written/s", v("temp_written"), "/s"),
        ]),
        chart("wal", "WAL", [line("bytes/s", v("wal"), "B/s")]),
        chart("planning", "Planning", [
            line("plans/s", v("plans"), "/s"), line("planning time", v("plan_time"), "ms/s"),
        ]),
    ]  # fmt: skip
    if waits:
        out.append(chart("waits", "Wait events (pg_wait_sampling)", [
            line(str(t or "CPU"), values(waits, t, "samples", n), "/s")
            for t in sorted(waits, key=lambda x: x or "")
        ]))  # fmt: skip
    return [*out, *cpu]


async def build(ctx: Ctx) -> dict[str, Any]:
    srv = await load_server(ctx)
    srvid = srv["srvid"]
    queryid = path_int(ctx, "queryid", "queryid", INT8_MAX, -INT8_MAX - 1)
    datname = ctx.request.query_params.get("db") or None
    seen = await ctx.read(reads.query_info, srvid, queryid)
    if datname is not None:
        seen = [r for r in seen if r["datname"] == datname]
    if not seen:
        raise NotFound(f"server {srv['alias']!r} has no statement with queryid {queryid}")
    where: dict[str, Any] = {"queryid": queryid}
    if datname is not None:
        where["datname"] = datname
    b = buckets_for(ctx, srv)
    tr = ctx.range
    data = await ctx.gather({
        "charts": _charts(ctx, srvid, b, where),
        "markers": ctx.read(reads.settings_changes, srvid, tr.start, tr.end),
        "wait_events": ctx.read(reads.wait_events, srvid, b, queryid=queryid),
        "qualstats": ctx.read(reads.qualstats, srvid, queryid, tr.start, tr.end),
        "kcache": kcache.part(ctx, srvid, datname=datname, queryid=queryid),
    })  # fmt: skip
    if ctx.wants("plan"):
        data["plan"] = plans.part(ctx, srv, queryid, datname, seen)
    return {
        "server": srv,
        "queryid": queryid,
        "database": datname,
        "query": seen[0]["query"],
        "seen_as": [{k: r[k] for k in ("datname", "rolname", "toplevel", "first_seen")}
                    for r in seen],
        "range": tr.as_json(),
        "x": b.x() if ctx.wants("charts") else None,
        "bucket_seconds": b.width,
        **data,
    }  # fmt: skip


PAGE = Page(
    name="query",
    path="/server/{srvid}/query/{queryid}",
    template="query.html",
    build=build,
    html_parts=frozenset({"wait_events", "qualstats", "markers", "kcache", "plan"}),
)
