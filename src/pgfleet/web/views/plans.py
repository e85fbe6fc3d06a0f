"""A statement's generic plan, on demand from its query page: the
``Explain (generic plan)`` button (a POST) and the page's ``plan`` part.

``EXPLAIN (GENERIC_PLAN)`` of the normalized text in its own database, on
PostgreSQL 16 and later (:mod:`pgfleet.advice.plans`: explained, never
executed, read-only, within ``TIMEOUT`` seconds on the server), as the
server's monitoring role.  The POST waits for it (a few seconds at most:
the connection's ``connect_timeout`` and ``TIMEOUT``), keeps it for the
session (:mod:`..runs`) and goes back to the query page, which shows it.
Who may: as for index advice (:func:`.advice.may_run`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from pgfleet.advice import plans
from pgfleet.advice.explain import GENERIC_PLAN_VERSION
from pgfleet.repository import reads
from pgfleet.web import runs
from pgfleet.web.page import INT8_MAX, Ctx, NotFound, WebState, path_int
from pgfleet.web.sessions import User
from pgfleet.web.views.advice import may_run, server_entry
from pgfleet.web.views.server import load_server

# Seconds EXPLAIN may take on the monitored server.
TIMEOUT = 5.0


def too_old(srv: dict[str, Any]) -> str | None:
    """Why the server cannot give generic plans, when the repository knows its version."""
    version = srv.get("server_version_num")
    if version is not None and int(version) < GENERIC_PLAN_VERSION:
        v = int(version)
        return (
            "plans need EXPLAIN (GENERIC_PLAN), PostgreSQL 16 or later: this server runs"
            f" PostgreSQL {v // 10000}.{v % 10000}"
        )
    return None


def part(
    ctx: Ctx, srv: dict[str, Any], queryid: int, datname: str | None, seen: list[dict[str, Any]]
) -> dict[str, Any]:
    """The query page's ``plan``: whether a plan may be asked for, and the
    session's last one for this statement (and database)."""
    old = too_old(srv)
    why = may_run(ctx.user)
    run = ctx.state.runs.latest(ctx.user.sid, runs.PLAN, (srv["srvid"], queryid, datname))
    return {
        "possible": old is None,
        "reason": old,
        "can_run": old is None and why is None,
        "why_not": why,
        "databases": sorted({r["datname"] for r in seen if r["datname"]}),
        "timeout": TIMEOUT,
        "run": run.to_dict() if run else None,
    }


async def _explain(
    state: WebState, user: User, srvid: int, queryid: int, datname: str | None
) -> dict[str, Any]:
    # The repository connection is held while the server explains: a few
    # seconds at most (connect_timeout and TIMEOUT).
    async with state.sessions.connection(user) as conn:
        server = await server_entry(conn, srvid)
        plan = await plans.explain_statement(
            conn, server, state.config.collector, queryid, datname=datname, fmt="text",
            timeout=TIMEOUT,
        )  # fmt: skip
    return plan.to_dict()


async def explain(ctx: Ctx, form: dict[str, str]) -> str:
    """Explain the statement (POST) and wait for it; the query page to go back to."""
    if why := may_run(ctx.user):
        raise PermissionError(why)
    srv = await load_server(ctx)
    srvid = srv["srvid"]
    queryid = path_int(ctx, "queryid", "queryid", INT8_MAX, -INT8_MAX - 1)
    seen = await ctx.read(reads.query_info, srvid, queryid)
    if not seen:
        raise NotFound(f"server {srv['alias']!r} has no statement with queryid {queryid}")
    datname = form.get("db") or None
    if datname is not None and datname not in {r["datname"] for r in seen}:
        raise NotFound(f"statement {queryid} never ran in database {datname[:100]!r}")
    query = {"db": datname} if datname is not None else {}
    back = f"/server/{srvid}/query/{queryid}?{urlencode(query)}{'&' if query else ''}"
    back += ctx.range.query() + "#plan"
    if old := too_old(srv):
        ctx.request.session["flash"] = {"ok": False, "message": old}
        return back
    try:
        run = ctx.state.runs.start(
            runs.PLAN,
            (srvid, queryid, datname),
            sid=ctx.user.sid,
            username=ctx.user.username,
            address=ctx.address,
            params={"srvid": srvid, "queryid": queryid, "database": datname},
            work=_explain(ctx.state, ctx.user, srvid, queryid, datname),
        )
    except runs.Refused as e:
        ctx.request.session["flash"] = {"ok": False, "message": str(e)}
        return back
    await ctx.state.runs.wait(run)
    return back
