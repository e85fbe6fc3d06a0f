"""A database of a server: the server's charts for it, its queries, tables and indexes."""

from __future__ import annotations

from typing import Any

from pgfleet.repository import reads
from pgfleet.web.page import Ctx, NotFound, Page, buckets_for, chart, concurrently, line, values
from pgfleet.web.render import tilde_decode
from pgfleet.web.views import kcache, workload
from pgfleet.web.views.server import load_server, own_of, sort_of


async def _charts(ctx: Ctx, srvid: int, b: reads.Buckets, datname: str) -> list[dict[str, Any]]:
    n = b.count
    common, tables, indexes, cpu = await concurrently(
        workload.charts(ctx, srvid, b, datname),
        ctx.read(reads.rollup_series, "pg_stat_user_tables", srvid, b,
                 ["seq_scan", "idx_scan", "n_tup_ins", "n_tup_upd", "n_tup_del"],
                 where={"datname": datname}),
        ctx.read(reads.rollup_series, "pg_stat_user_indexes", srvid, b,
                 ["idx_scan", "idx_blks_read"], where={"datname": datname}),
        kcache.charts(ctx, srvid, b, datname=datname),
    )  # fmt: skip
    return [
        *common,
        chart("tables", "Table activity", [
            line("sequential scans/s", values(tables, None, "seq_scan", n), "/s"),
            line("index scans/s", values(tables, None, "idx_scan", n), "/s"),
            line("inserts/s", values(tables, None, "n_tup_ins", n), "/s"),
            line("updates/s", values(tables, None, "n_tup_upd", n), "/s"),
            line("deletes/s", values(tables, None, "n_tup_del", n), "/s"),
        ]),
        chart("indexes", "Index activity", [
            line("index scans/s", values(indexes, None, "idx_scan", n), "/s"),
            line("index blocks read/s", values(indexes, None, "idx_blks_read", n), "/s"),
        ]),
        *cpu,
    ]  # fmt: skip


async def build(ctx: Ctx) -> dict[str, Any]:
    srv = await load_server(ctx)
    srvid = srv["srvid"]
    datname = tilde_decode(ctx.request.path_params["datname"])
    # Checked against the server's names before it goes near SQL: a NUL or an
    # overlong name is simply not one of them.
    names = await ctx.read(reads.database_names, srvid)
    if datname not in names:
        raise NotFound(f"server {srv['alias']!r} has no database {datname[:100]!r}")
    b = buckets_for(ctx, srv)
    tr = ctx.range
    sort = sort_of(ctx)
    own = own_of(ctx)
    data = await ctx.gather({
        "charts": _charts(ctx, srvid, b, datname),
        "markers": ctx.read(reads.settings_changes, srvid, tr.start, tr.end),
        "top_queries": ctx.read(reads.top_queries, srvid, tr.start, tr.end, sort=sort,
                                datname=datname, own=own),
        "tables": ctx.read(reads.tables, srvid, datname, tr.start, tr.end),
        "indexes": ctx.read(reads.indexes, srvid, datname, tr.start, tr.end),
        "sessions_waiting": ctx.read(reads.sessions_waiting, srvid, b, datname),
        "kcache": kcache.part(ctx, srvid, datname=datname, own=own),
    })  # fmt: skip
    return {
        "server": srv,
        "database": datname,
        "range": tr.as_json(),
        "sort": sort,
        "own": own,
        "x": b.x() if ctx.wants("charts") else None,
        "bucket_seconds": b.width,
        **data,
    }


PAGE = Page(
    name="database",
    path="/server/{srvid}/database/{datname}",
    template="database.html",
    build=build,
    html_parts=frozenset(
        {"top_queries", "tables", "indexes", "sessions_waiting", "markers", "kcache"}
    ),
)
