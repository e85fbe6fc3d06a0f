"""Explaining statement texts of monitored servers: never executing them.

A statement text pgfleet holds (pg_stat_statements' normalized query) is
hostile: anyone who may run a query on a monitored server chose it, and
utility statements are kept whole, not normalized.  What must always hold
when advice or a plan puts one in front of PostgreSQL:

- **Explained, never executed.**  Only ``EXPLAIN`` without ``ANALYZE``
  ever sees the text, after :func:`check_plannable` found a plannable
  statement (SELECT, INSERT, UPDATE, DELETE, MERGE, VALUES, TABLE, WITH).
- **One statement.**  The text first reaches the server as ``PREPARE
  pgfleet_explain AS <text>`` through the *extended* protocol (a Parse
  message), which refuses a string of more than one statement ("cannot
  insert multiple commands into a prepared statement"): ``SELECT 1; DROP
  TABLE t`` fails there, before anything runs.  PREPARE parses and analyzes;
  it plans and executes nothing, and its grammar takes only SELECT, INSERT,
  UPDATE, DELETE and MERGE.  Then:

  - before PostgreSQL 16, ``EXPLAIN EXECUTE pgfleet_explain(NULL, ...)``
    with ``plan_cache_mode = force_generic_plan``: the parameters' values
    are never looked at by a generic plan (a custom plan would fold the
    NULLs into "One-Time Filter: false"), and EXPLAIN EXECUTE only plans.
    The statement is prepared again for each EXPLAIN: a cached generic plan
    would not see hypothetical indexes made since;
  - from 16 on, ``EXPLAIN (GENERIC_PLAN) <text>``, which cannot go through
    the extended protocol (its ``$n`` become the EXPLAIN's own parameters,
    which Bind must then supply, and supplied values are folded as
    constants): it is sent with the simple protocol once the PREPARE above
    proved the text one statement.  The prefix changes nothing to how the
    text is split (a complete token and a space come before it, nothing
    after it), so it is one statement there too.

- **Read only, bounded.**  Everything happens in one ``READ ONLY``
  transaction, rolled back at the end, with ``statement_timeout``,
  ``lock_timeout`` and ``idle_in_transaction_session_timeout``; each
  statement in a savepoint, so one failure does not end the session.
- **As little privilege as configured.**  The connection's role is the
  server's monitoring role; with `role`, the transaction switches to that
  (lower) role with ``SET LOCAL ROLE`` first.  EXPLAIN checks privileges as
  execution would: the role needs SELECT (and, to explain an INSERT,
  UPDATE or DELETE, those privileges) on the tables, e.g. through
  ``pg_read_all_data``; without them, the reason says "permission denied".
- **Names resolved as the statement's role would.**  The connection pins
  ``search_path`` to ``pg_catalog, pg_temp`` (see connections.py); a
  normalized text names tables as the application did, so each EXPLAIN
  gets the search_path the statement's role has by default in its database
  (``ALTER ROLE/DATABASE ... SET search_path``, else PostgreSQL's default),
  ``$user`` meaning that role, between ``pg_catalog`` (first: built-ins
  cannot be shadowed) and ``pg_temp`` (last).

What remains: planning evaluates immutable functions of constant
arguments, and such a function, written by a user of the monitored
server, runs as the EXPLAIN's role, read-only and within the timeout.
That is why `role` exists: give it no more than the application's users
have (docs/advice.md).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Literal

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.rows import dict_row

from pgfleet.errors import PgfleetError, ServerError
from pgfleet.snapshot.model import mark

PLANNABLE = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES", "TABLE", "WITH"})
# The prepared statement each EXPLAIN goes through; the savepoint around it.
STATEMENT = "pgfleet_explain"
_SAVEPOINT = "pgfleet_explain"
# PostgreSQL 16: EXPLAIN (GENERIC_PLAN).
GENERIC_PLAN_VERSION = 160000

Format = Literal["json", "text"]
Conn = psycopg.AsyncConnection[Any]


class NotExplainable(PgfleetError):
    """A statement text pgfleet refused, or PostgreSQL could not explain: the message says why."""


def first_keyword(text: str) -> str | None:
    """The statement's first keyword, upper case, after blanks, comments and
    opening parentheses; None if it does not start with a word."""
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace() or text[i] == "(":
            i += 1
        elif text.startswith("--", i):
            end = text.find("\n", i)
            if end < 0:
                return None
            i = end + 1
        elif text.startswith("/*", i):
            # PostgreSQL's block comments nest.
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            if depth:
                return None
        else:
            break
    m = re.match(r"[A-Za-z]+", text[i:])
    return m.group(0).upper() if m else None


def check_plannable(text: str) -> None:
    """Raise NotExplainable unless `text` starts as a plannable statement
    (the PREPARE of :class:`ExplainSession` checks it is only one)."""
    if "\x00" in text:
        raise NotExplainable("the statement text holds a NUL character")
    word = first_keyword(text)
    if word not in PLANNABLE:
        what = f"not {word}" if word else "and this text does not start with a keyword"
        raise NotExplainable(
            f"only SELECT, INSERT, UPDATE, DELETE, MERGE, VALUES, TABLE and WITH statements "
            f"are explained, {what}"
        )


def reason_of(e: psycopg.Error) -> str:
    """One line saying why PostgreSQL refused, without a traceback."""
    if isinstance(e, pgerrors.QueryCanceled):
        return "cancelled by statement_timeout"
    if isinstance(e, pgerrors.LockNotAvailable):
        return "a lock could not be taken in time (lock_timeout)"
    primary = e.diag.message_primary if e.diag else None
    text = primary or str(e).strip() or type(e).__name__
    return " ".join(text.split())


def search_path_of(setting: str, rolname: str | None) -> str:
    """A statement's search_path from its role's `setting` (``"$user",
    public``): ``$user`` as that role, between pg_catalog and pg_temp."""
    items = []
    for item in re.findall(r'(?:"(?:[^"]|"")*"|[^,])+', setting):
        item = item.strip()
        if item in ("$user", '"$user"'):
            if not rolname:
                continue
            item = '"' + rolname.replace('"', '""') + '"'
        if item and item.strip('"') not in ("pg_catalog", "pg_temp"):
            items.append(item)
    return ", ".join(["pg_catalog", *items, "pg_temp"])


# The role's search_path in the current database, in PostgreSQL's order of
# precedence: database and role, role, database, then the built-in default
# (not postgresql.conf's: pg_settings shows our session's pinned value, and
# pg_file_settings is for superusers).
_SEARCH_PATH = """
SELECT coalesce(
         (SELECT pg_catalog.substr(c, 13) FROM pg_catalog.pg_db_role_setting s,
                 pg_catalog.unnest(s.setconfig) c
           WHERE s.setdatabase = d.oid AND s.setrole = r.oid
             AND c OPERATOR(pg_catalog.~~) 'search\\_path=%%' LIMIT 1),
         (SELECT pg_catalog.substr(c, 13) FROM pg_catalog.pg_db_role_setting s,
                 pg_catalog.unnest(s.setconfig) c
           WHERE s.setdatabase = 0 AND s.setrole = r.oid
             AND c OPERATOR(pg_catalog.~~) 'search\\_path=%%' LIMIT 1),
         (SELECT pg_catalog.substr(c, 13) FROM pg_catalog.pg_db_role_setting s,
                 pg_catalog.unnest(s.setconfig) c
           WHERE s.setdatabase = d.oid AND s.setrole = 0
             AND c OPERATOR(pg_catalog.~~) 'search\\_path=%%' LIMIT 1),
         (SELECT boot_val FROM pg_catalog.pg_settings WHERE name = 'search_path')) AS path
  FROM pg_catalog.pg_database d
  LEFT JOIN pg_catalog.pg_roles r ON r.rolname = %(role)s
 WHERE d.datname = pg_catalog.current_database()
"""


class ExplainSession:
    """One READ ONLY transaction on a monitored database's connection, in
    which statement texts are explained (see the module).  Use as ``async
    with ExplainSession(conn, timeout=2) as s: await s.explain(text)``; it
    is rolled back on exit."""

    def __init__(self, conn: Conn, *, timeout: float, role: str | None = None) -> None:
        self.conn = conn
        self.timeout = timeout
        self.role = role
        self.explains = 0
        self._paths: dict[str | None, str] = {}

    @property
    def server_version(self) -> int:
        return self.conn.info.server_version

    async def __aenter__(self) -> ExplainSession:
        # Our statements are few: psycopg's own prepared statements would be
        # more to leave behind on the server.
        self.conn.prepare_threshold = None
        await self.conn.execute(mark("BEGIN READ ONLY"))
        ms = str(max(1, round(self.timeout * 1000)))
        await self.set_local("statement_timeout", ms)
        await self.set_local("lock_timeout", ms)
        # If we vanish mid-session, the server ends it soon after.
        await self.set_local("idle_in_transaction_session_timeout", str(int(ms) * 10))
        return self

    async def __aexit__(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.conn.closed and not self.conn.broken:
            await self.conn.execute(mark("ROLLBACK"))

    async def set_local(self, name: str, value: str) -> None:
        """``SET LOCAL name = value``, the value as a parameter."""
        await self.conn.execute(mark("SELECT pg_catalog.set_config(%s, %s, true)"), (name, value))

    async def switch_role(self) -> None:
        """``SET LOCAL ROLE`` to the configured role, if any; NotExplainable
        if the connection's role may not."""
        if self.role is None:
            return
        try:
            async with self.savepoint():
                await self.set_local("role", self.role)
        except psycopg.Error as e:
            raise NotExplainable(f"cannot switch to role {self.role!r}: {reason_of(e)}") from None

    async def fetch(self, query: str | sql.Composable, params: Any = None) -> list[dict[str, Any]]:
        """Rows of one of our own statements (marked as pgfleet's)."""
        text = query if isinstance(query, str) else query.as_string(self.conn)
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(mark(text), params)
            return await cur.fetchall() if cur.description is not None else []

    @asynccontextmanager
    async def savepoint(self, *, keep: bool = True) -> AsyncIterator[None]:
        """A savepoint: rolled back to (and the error raised again) on a
        PostgreSQL error, so that the transaction goes on; rolled back to
        in any case unless `keep`, undoing the settings made inside."""
        await self.conn.execute(mark(f"SAVEPOINT {_SAVEPOINT}"))
        try:
            yield
        except psycopg.Error:
            if not self.conn.broken:
                await self._rollback_to()
            raise
        if keep:
            await self.conn.execute(mark(f"RELEASE SAVEPOINT {_SAVEPOINT}"))
        else:
            await self._rollback_to()

    async def _rollback_to(self) -> None:
        await self.conn.execute(mark(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}"))
        await self.conn.execute(mark(f"RELEASE SAVEPOINT {_SAVEPOINT}"))

    async def search_path(self, rolname: str | None) -> str:
        """The search_path statements of `rolname` run with here (see the module)."""
        if rolname not in self._paths:
            # In a savepoint: cancelled by the timeout, it must not end the
            # transaction the other statements are explained in.
            async with self.savepoint():
                rows = await self.fetch(_SEARCH_PATH, {"role": rolname})
            setting = rows[0]["path"] if rows and rows[0]["path"] is not None else ""
            self._paths[rolname] = search_path_of(setting, rolname)
        return self._paths[rolname]

    async def explain(self, text: str, *, fmt: Format = "json", rolname: str | None = None) -> Any:
        """The generic plan of `text` (EXPLAIN's JSON document, or its text),
        with names resolved as `rolname`'s; NotExplainable saying why not."""
        check_plannable(text)
        self.explains += 1
        prepared = False
        try:
            path = await self.search_path(rolname)
            # Rolled back whatever happens: the statement's search_path and
            # plan_cache_mode must not outlive its EXPLAIN, under which our
            # own catalog queries would run next.
            async with self.savepoint(keep=False):
                await self.set_local("search_path", path)
                # The extended protocol (binary=True forces it, parameters or
                # not): one statement, or an error before anything runs.
                await self.conn.execute(f"PREPARE {STATEMENT} AS {text}", binary=True)
                prepared = True
                plan = await self._explain_prepared(text, fmt)
        except psycopg.Error as e:
            if self.conn.broken:
                raise ServerError(f"connection lost: {reason_of(e)}") from None
            raise NotExplainable(reason_of(e)) from None
        finally:
            # Prepared statements outlive a rolled back savepoint.
            if prepared and not self.conn.broken:
                await self._deallocate()
        return plan

    async def _explain_prepared(self, text: str, fmt: Format) -> Any:
        options = "FORMAT JSON" if fmt == "json" else "FORMAT TEXT"
        if self.server_version >= GENERIC_PLAN_VERSION:
            await self._deallocate()
            # The simple protocol, the only one GENERIC_PLAN works with: the
            # PREPARE above proved the text one statement.
            query = f"EXPLAIN /* pgfleet */ (GENERIC_PLAN, {options}) {text}"
        else:
            rows = await self.fetch(
                "SELECT pg_catalog.cardinality(parameter_types) AS n"
                " FROM pg_catalog.pg_prepared_statements WHERE name = %s",
                (STATEMENT,),
            )
            n = int(rows[0]["n"]) if rows else 0
            await self.set_local("plan_cache_mode", "force_generic_plan")
            args = f"({', '.join(['NULL'] * n)})" if n else ""
            query = mark(f"EXPLAIN ({options}) EXECUTE {STATEMENT}{args}")
        async with self.conn.cursor() as cur:
            await cur.execute(query)
            rows2 = await cur.fetchall()
        if fmt == "json":
            return rows2[0][0] if rows2 else None
        return "\n".join(str(r[0]) for r in rows2)

    async def _deallocate(self) -> None:
        rows = await self.fetch(
            "SELECT 1 AS x FROM pg_catalog.pg_prepared_statements WHERE name = %s", (STATEMENT,)
        )
        if rows:
            await self.conn.execute(mark(f"DEALLOCATE {STATEMENT}"))


def total_cost(plan: Any) -> float | None:
    """The top node's total cost in EXPLAIN's JSON document."""
    try:
        return float(plan[0]["Plan"]["Total Cost"])
    except (TypeError, KeyError, IndexError, ValueError):
        return None


def index_names(plan: Any) -> set[str]:
    """Every index an EXPLAIN JSON document's nodes use."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            name = node.get("Index Name")
            if isinstance(name, str):
                names.add(name)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(plan)
    return names
