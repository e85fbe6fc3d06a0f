"""The plan of a statement pg_stat_statements saw: on demand, on PostgreSQL 16+.

``EXPLAIN (GENERIC_PLAN)`` of the statement's normalized text (its
constants are ``$1``, ``$2``...) in its own database: the plan PostgreSQL
would choose for any values, without executing anything.  The text comes
from ``pgfleet.pg_stat_statements_once`` and is hostile:
:mod:`pgfleet.advice.explain` is the only way it reaches the server (one
plannable statement, prepared through the extended protocol first, in a
READ ONLY transaction with a timeout, as the monitoring role or the lower
`role` given).

Before PostgreSQL 16 there is no ``GENERIC_PLAN``: the plan is refused with
a reason saying so, before connecting when the repository knows the
server's version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from pgfleet.advice.explain import (
    GENERIC_PLAN_VERSION,
    ExplainSession,
    Format,
    NotExplainable,
    check_plannable,
    reason_of,
)
from pgfleet.config import CollectorConfig
from pgfleet.connections import connect_server
from pgfleet.errors import PgfleetError
from pgfleet.repository import reads
from pgfleet.repository.reads import Conn
from pgfleet.repository.servers import Server


@dataclass(frozen=True)
class Plan:
    """A statement's plan, or why there is none (``reason``)."""

    srvid: int
    queryid: int
    datname: str | None
    rolname: str | None  # the role that ran the statement (names resolved as its)
    query: str | None
    format: str  # "json": EXPLAIN's JSON document (a list); "text": its lines
    plan: Any
    reason: str | None
    server_version_num: int | None
    role: str | None  # the role it was explained as; None: the server's monitoring role

    @property
    def ok(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _version(num: int) -> str:
    return f"{num // 10000}.{num % 10000}" if num >= 100000 else str(num)


def _too_old(alias: str, num: int) -> str:
    return (
        f"plans need EXPLAIN (GENERIC_PLAN), PostgreSQL 16 or later: "
        f"server {alias!r} runs PostgreSQL {_version(num)}"
    )


async def explain_text(
    conn: psycopg.AsyncConnection[Any],
    text: str,
    *,
    fmt: Format = "json",
    rolname: str | None = None,
    role: str | None = None,
    timeout: float = 5.0,
) -> Any:
    """The generic plan of `text` on the monitored database `conn` is
    connected to (PostgreSQL 16+), names resolved as `rolname`'s, explained
    as `role` if given; NotExplainable saying why not."""
    check_plannable(text)
    if conn.info.server_version < GENERIC_PLAN_VERSION:
        raise NotExplainable(
            "plans need EXPLAIN (GENERIC_PLAN), PostgreSQL 16 or later: the server runs "
            f"PostgreSQL {_version(conn.info.server_version)}"
        )
    async with ExplainSession(conn, timeout=timeout, role=role) as s:
        await s.switch_role()
        return await s.explain(text, fmt=fmt, rolname=rolname)


async def explain_statement(
    repo: Conn,
    server: Server,
    cfg: CollectorConfig,
    queryid: int,
    *,
    datname: str | None = None,
    fmt: Format = "json",
    role: str | None = None,
    timeout: float = 5.0,
) -> Plan:
    """The plan of statement `queryid` of `server` (in database `datname`,
    which may be left out when the statement ran in one database only).
    Never raises for what a user could meet: the Plan's ``reason`` says
    why there is no plan."""
    infos = [r for r in await reads.query_info(repo, server.srvid, queryid) if r["datname"]]
    dbs = sorted({r["datname"] for r in infos})
    if datname is not None:
        infos = [r for r in infos if r["datname"] == datname]

    def plan(reason: str | None, info: dict[str, Any] | None = None, **kw: Any) -> Plan:
        return Plan(
            srvid=server.srvid,
            queryid=queryid,
            datname=info["datname"] if info else datname,
            rolname=info["rolname"] if info else None,
            query=info["query"] if info else None,
            format=fmt,
            plan=kw.get("plan"),
            reason=reason,
            server_version_num=kw.get("version"),
            role=role,
        )

    if not infos:
        where = f" in database {datname!r}" if datname is not None else ""
        return plan(f"pg_stat_statements kept no text of statement {queryid}{where}")
    if datname is None and len(dbs) > 1:
        return plan(f"the statement ran in several databases ({', '.join(dbs)}): choose one")
    # The top-level text first: a nested one's $n are its function's arguments.
    info = sorted(infos, key=lambda r: (not r["toplevel"], r["first_seen"]))[0]
    try:
        check_plannable(info["query"])
    except NotExplainable as e:
        return plan(str(e), info)
    known = await reads.server(repo, server.srvid)
    version = known.get("server_version_num") if known else None
    if version is not None and version < GENERIC_PLAN_VERSION:
        return plan(_too_old(server.alias, version), info, version=version)
    try:
        conn = await connect_server(server, cfg, dbname=info["datname"])
    except PgfleetError as e:
        return plan(str(e), info, version=version)
    version = conn.info.server_version
    try:
        async with conn:
            if version < GENERIC_PLAN_VERSION:
                return plan(_too_old(server.alias, version), info, version=version)
            got = await explain_text(
                conn, info["query"], fmt=fmt, rolname=info["rolname"], role=role, timeout=timeout
            )
    except PgfleetError as e:  # NotExplainable among them
        return plan(str(e), info, version=version)
    except psycopg.Error as e:
        return plan(f"server {server.alias!r}: {reason_of(e)}", info, version=version)
    return plan(None, info, plan=got, version=version)
