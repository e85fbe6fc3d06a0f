"""The fleet: every server, its state, and sparklines of its load."""

from __future__ import annotations

from typing import Any

from pgfleet.repository import reads
from pgfleet.web.page import Ctx, Page


async def _load(ctx: Ctx, b: reads.Buckets) -> dict[str, Any]:
    load = await ctx.read(reads.fleet_load, b)
    return {str(k): v for k, v in load.items()}


async def build(ctx: Ctx) -> dict[str, Any]:
    b = reads.Buckets.over(ctx.range.start, ctx.range.end, points=60, min_width=60)
    data = await ctx.gather({
        "servers": ctx.read(reads.servers),
        "load": _load(ctx, b),
    })  # fmt: skip
    return {"range": ctx.range.as_json(), "x": b.x(), "bucket_seconds": b.width, **data}


PAGE = Page(
    name="fleet",
    path="/fleet",
    template="fleet.html",
    build=build,
    html_parts=frozenset({"servers"}),
)
