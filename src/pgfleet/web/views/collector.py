"""The collectors: who runs, what each server's collection is doing, and the
reload and force-snapshot buttons (members of pgfleet_admin only).

Live state comes through the command channel (:mod:`pgfleet.collector.commands`,
``WORKERS_STATUS``), sent from the user's own repository connection so the
collectors check the user's membership themselves; what the repository
knows (collectors' leases, each server's last snapshot) is shown to anyone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import psycopg

from pgfleet.errors import PgfleetError
from pgfleet.repository import reads
from pgfleet.web.page import Ctx, Page
from pgfleet.web.sessions import User

logger = logging.getLogger("pgfleet.web")


def command(user: User, name: str, *args: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send a command as `user` and wait for the collectors' answers (blocking)."""
    from pgfleet.collector import commands

    if user.conninfo is None or not user.is_admin:
        raise PgfleetError("commanding the collectors needs a role member of pgfleet_admin")
    try:
        with psycopg.connect(user.conninfo, autocommit=True) as conn:
            answers = commands.request(conn, name, *args, timeout=timeout)
    except psycopg.Error as e:
        raise PgfleetError(str(e).strip().splitlines()[0]) from None
    return [{"command": a.command, "ok": a.ok, "data": a.data, "pid": a.pid} for a in answers]


async def _live(ctx: Ctx) -> dict[str, Any]:
    if not ctx.user.is_admin:
        return {"available": False, "reason": "shown to members of pgfleet_admin only"}
    try:
        answers = await asyncio.to_thread(command, ctx.user, "WORKERS_STATUS")
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


async def build(ctx: Ctx) -> dict[str, Any]:
    data = await ctx.gather({
        "collectors": ctx.read(reads.collectors),
        "leases": ctx.read(reads.leases),
        "servers": ctx.read(reads.snapshot_state),
        "live": _live(ctx),
    })  # fmt: skip
    leases = data.pop("leases")
    for s in data["servers"]:
        s["collector"] = leases.get(s["srvid"])
    return {"can_command": ctx.user.is_admin and ctx.user.conninfo is not None, **data}


PAGE = Page(
    name="collector",
    path="/collector",
    template="collector.html",
    build=build,
    html_parts=frozenset({"collectors", "leases", "servers", "live"}),
    timed=False,
)
