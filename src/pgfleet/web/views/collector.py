"""The collectors: who runs, what each server's collection is doing, and the
reload and force-snapshot buttons (members of pgfleet_admin only).

Live state comes through the command channel (:mod:`pgfleet.collector.commands`,
``WORKERS_STATUS``), sent from the user's own repository connection so the
collectors check the user's membership themselves; what the repository
knows (collectors' leases, each server's last snapshot) is shown to anyone.
A command's connection is blocking (in a thread) and counts under the UI's
cap on repository connections like any other.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import psycopg

from pgfleet.errors import PgfleetError
from pgfleet.repository import reads
from pgfleet.web.page import Ctx, Page, concurrently
from pgfleet.web.sessions import Sessions, User

logger = logging.getLogger("pgfleet.web")


async def command(
    sessions: Sessions, user: User, name: str, *args: str, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Send a command as `user` and wait for the collectors' answers."""
    if user.conninfo is None or not user.is_admin:
        raise PgfleetError("commanding the collectors needs a role member of pgfleet_admin")
    return await sessions.blocking(_command, user.conninfo, name, args, timeout)


def _command(
    conninfo: str, name: str, args: tuple[str, ...], timeout: float
) -> list[dict[str, Any]]:
    from pgfleet.collector import commands

    try:
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
            answers = commands.request(conn, name, *args, timeout=timeout)
    except psycopg.Error as e:
        raise PgfleetError(str(e).strip().splitlines()[0]) from None
    return [{"command": a.command, "ok": a.ok, "data": a.data, "pid": a.pid} for a in answers]


async def _live(ctx: Ctx) -> dict[str, Any]:
    if not ctx.user.is_admin:
        return {"available": False, "reason": "shown to members of pgfleet_admin only"}
    try:
        answers = await command(ctx.state.sessions, ctx.user, "WORKERS_STATUS")
    except PgfleetError as e:
        return {"available": False, "reason": str(e)}
    workers: dict[str, Any] = {}
    for a in answers:
        if a["ok"]:
            try:
                workers.update(json.loads(a["data"]))
            except ValueError:
                logger.warning("unreadable WORKERS_STATUS answer: %.200s", a["data"])
    return {"available": True, "answers": len(answers), "workers": workers}


async def _servers(ctx: Ctx) -> list[dict[str, Any]]:
    servers, leases = await concurrently(ctx.read(reads.snapshot_state), ctx.read(reads.leases))
    for s in servers:
        s["collector"] = leases.get(s["srvid"])
    return list(servers)


async def build(ctx: Ctx) -> dict[str, Any]:
    data = await ctx.gather({
        "collectors": ctx.read(reads.collectors),
        "servers": _servers(ctx),
        "live": _live(ctx),
    })  # fmt: skip
    return {"can_command": ctx.user.is_admin and ctx.user.conninfo is not None, **data}


PAGE = Page(
    name="collector",
    path="/collector",
    template="collector.html",
    build=build,
    html_parts=frozenset({"collectors", "servers", "live"}),
    timed=False,
)
