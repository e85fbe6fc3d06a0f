"""Two periods of a server or one of its databases side by side, per
statement, the biggest regressions first (:mod:`pgfleet.repository.compare`).

B is the page's range (``range=``, ``from=&to=``); A what it is compared
against (``against=previous|1d|7d``, or ``custom`` with ``a_from=&a_to=``:
:func:`..timerange.parse_against`).  Read from the repository only, so open
to every login, the token included.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from pgfleet.repository import compare
from pgfleet.web import timerange
from pgfleet.web.page import Ctx, Page, concurrently
from pgfleet.web.views.advice import base_path, database_of
from pgfleet.web.views.server import load_server, own_of

AGAINST_LABELS = {
    "previous": "the period just before",
    "1d": "the same period a day before",
    "7d": "the same period a week before",
    "custom": "another period",
}


async def build(ctx: Ctx) -> dict[str, Any]:
    srv = await load_server(ctx)
    srvid = srv["srvid"]
    datname = await database_of(ctx, srv)
    b = ctx.range
    a, against = timerange.parse_against(ctx.request.query_params, b)
    own = own_of(ctx)
    # The two ranges' passes over every statement at once, each on a
    # connection of the pool: most of the page's time.
    ra, rb = await concurrently(
        ctx.read(compare.per_statement, srvid, (a.start, a.end), datname=datname, own=own),
        ctx.read(compare.per_statement, srvid, (b.start, b.end), datname=datname, own=own),
    )
    result = await ctx.read(
        compare.compare, srvid, (a.start, a.end), (b.start, b.end), datname=datname, own=own,
        first=(ra, rb),
    )  # fmt: skip
    query: dict[str, str] = {"against": against}
    if against == "custom":
        query.update(a_from=f"{a.start.timestamp():.0f}", a_to=f"{a.end.timestamp():.0f}")
    return {
        "server": srv,
        "database": datname,
        "range": b.as_json(),
        "against": against,
        "own": own,
        # The query string of this comparison, for links (B's range apart).
        "query": urlencode(query),
        "base": base_path(srvid, datname),
        **result,
    }


SERVER_PAGE = Page(
    name="compare",
    path="/server/{srvid}/compare",
    template="compare.html",
    build=build,
)
DATABASE_PAGE = Page(
    name="compare",
    path="/server/{srvid}/database/{datname}/compare",
    template="compare.html",
    build=build,
)
