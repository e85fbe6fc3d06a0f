"""Index advice for a server or one of its databases: the page shows the
session's last run, a POST starts one (``Suggest indexes for this range``),
never a page load.

A run (:mod:`pgfleet.advice.indexes`) asks the monitored server, for up to
``Limits.deadline`` seconds per database, so it runs in a task of
:mod:`..runs` and the page polls its JSON twin until it is over.  It reads
the repository first, through the user's own pool (the server's entry, then
``indexes.workload``: a few quick reads), and gives that connection back
before the monitored server is asked (``indexes.advise_workload``): a run
never holds a repository connection while it waits on a server.

Who may start one (also plans, :mod:`.plans`): a role that logged in (a
member of ``pgfleet_read``), never the token, which stays read-only: a run
makes this process connect to a monitored server with the collector's
credentials (``[collector]``: the server's monitoring role, its password
reference resolved here), read-only and bounded, but an action all the
same.  One run at a time per user, one advice at a time per server, a few
per user in ten minutes (:mod:`..runs`).  See docs/web.md.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from pgfleet.advice import indexes
from pgfleet.errors import PgfleetError
from pgfleet.repository import reads, servers
from pgfleet.repository.servers import Server
from pgfleet.web import runs
from pgfleet.web.page import Ctx, NotFound, Page, WebState
from pgfleet.web.render import tilde_decode, tilde_encode
from pgfleet.web.sessions import User
from pgfleet.web.views.server import load_server

LIMITS = indexes.Limits()
TOKEN_REFUSED = (
    "index advice and plans connect to the monitored servers: log in with a role"
    " (a member of pgfleet_read) to run them; the token only reads the repository"
)


def may_run(user: User) -> str | None:
    """Why `user` may not start advice or a plan, or None if they may."""
    if user.conninfo is None:
        return TOKEN_REFUSED
    return None


async def server_entry(conn: psycopg.AsyncConnection[Any], srvid: int) -> Server:
    """The server's registry entry (how to reach it), read on one of the
    user's pool connections, so as the user; what went wrong in one line."""
    try:
        return await servers.fetch_by_srvid(conn, srvid)
    except psycopg.Error as e:
        raise PgfleetError(
            "cannot read the server's entry: " + (str(e).strip().splitlines() or ["?"])[0]
        ) from None


async def database_of(ctx: Ctx, srv: dict[str, Any]) -> str | None:
    """The page's database (its path's ``datname``), checked against the
    server's names; None on a server's page."""
    raw = ctx.request.path_params.get("datname")
    if raw is None:
        return None
    datname = tilde_decode(raw)
    names = await ctx.read(reads.database_names, srv["srvid"])
    if datname not in names:
        raise NotFound(f"server {srv['alias']!r} has no database {datname[:100]!r}")
    return datname


def base_path(srvid: int, datname: str | None) -> str:
    db = f"/database/{tilde_encode(datname)}" if datname is not None else ""
    return f"/server/{srvid}{db}"


async def build(ctx: Ctx) -> dict[str, Any]:
    srv = await load_server(ctx)
    datname = await database_of(ctx, srv)
    run = ctx.state.runs.latest(ctx.user.sid, runs.ADVICE, (srv["srvid"], datname))
    why = may_run(ctx.user)
    return {
        "server": srv,
        "database": datname,
        "range": ctx.range.as_json(),
        "can_run": why is None,
        "why_not": why,
        "limits": {
            "max_databases": LIMITS.max_databases,
            "deadline": LIMITS.deadline,
            "max_candidates": LIMITS.max_candidates,
            "min_gain": LIMITS.min_gain,
        },
        "run": run.to_dict() if run else None,
    }


async def _advise(
    state: WebState, user: User, srvid: int, datname: str | None, start: datetime, end: datetime
) -> dict[str, Any]:
    async with state.sessions.connection(user) as conn:
        server = await server_entry(conn, srvid)
        w = await indexes.workload(conn, srvid, start, end, datname=datname)
    # The connection is back in the pool: the server may take minutes.
    advice = await indexes.advise_workload(
        server, state.config.collector, start, end, w, datname=datname, limits=LIMITS
    )
    return advice.to_dict()


async def start(ctx: Ctx, form: dict[str, str]) -> str:
    """Start a run over the form's range (POST); the page to go back to.
    A refusal (one already running, throttled) is told there."""
    if why := may_run(ctx.user):
        raise PermissionError(why)
    srv = await load_server(ctx)
    srvid = srv["srvid"]
    datname = await database_of(ctx, srv)
    tr = ctx.range
    back = f"{base_path(srvid, datname)}/advice?{tr.query()}"
    try:
        ctx.state.runs.start(
            runs.ADVICE,
            (srvid, datname),
            sid=ctx.user.sid,
            username=ctx.user.username,
            address=ctx.address,
            params={"srvid": srvid, "database": datname, "from": tr.start, "to": tr.end},
            work=_advise(ctx.state, ctx.user, srvid, datname, tr.start, tr.end),
            server=srvid,
        )
    except runs.Refused as e:
        ctx.request.session["flash"] = {"ok": False, "message": str(e)}
    return back


SERVER_PAGE = Page(
    name="advice",
    path="/server/{srvid}/advice",
    template="advice.html",
    build=build,
)
DATABASE_PAGE = Page(
    name="advice",
    path="/server/{srvid}/database/{datname}/advice",
    template="advice.html",
    build=build,
)
