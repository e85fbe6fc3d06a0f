"""The servers registry: what to monitor and how to reach it.

Passwords never enter the repository: a server carries at most a *reference*
(``env:NAME`` or ``file:/path``) that the collector resolves when it connects;
without one, libpq's own passfile, service file or PGPASSWORD apply.

This is the one module that writes ``pgfleet.servers``: the CLI's sync CRUD
(``pgfleet server add/update/remove``) and the collectors' async discovery
sync alike, so that what a row may hold is decided in one place.  A
discovery provider writes only the rows it created (``provider``; never
local's, never those of ``server add``): see :func:`upsert_discovered`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from pgfleet.errors import ConfigError, RepositoryError
from pgfleet.snapshot.model import mark

# Matched whole (fullmatch): "$" would let a final newline through, which
# the table's CHECK refuses.
_ALIAS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]*")
_PASSWORD_REF_RE = re.compile(r"(env|file):.+", re.S)
# What the table's CHECK on options refuses, as it says it.
_OPTIONS_PASSWORD_RE = re.compile(r"(^|\s)password\s*=", re.I)
# PostgreSQL's integer.
_INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Server:
    srvid: int
    alias: str
    host: str = ""
    port: int = 5432
    username: str = ""
    dbname: str = "postgres"
    password_ref: str | None = None
    options: str = ""
    frequency: int = 300
    coalesce: int = 100
    retention: timedelta = timedelta(days=7)
    enabled: bool = True

    @property
    def is_local(self) -> bool:
        return self.srvid == 0


# The columns a user may set, with their validators.
EDITABLE = (
    "host",
    "port",
    "username",
    "dbname",
    "password_ref",
    "options",
    "frequency",
    "coalesce",
    "retention",
    "enabled",
)


def validate(changes: dict[str, Any]) -> dict[str, Any]:
    """Check user-supplied settings; raise ConfigError naming the bad one.

    What passes is what the table's constraints accept: a discovery
    provider registers many servers in one statement, which one bad value
    would fail whole.
    """
    out = dict(changes)
    for key, value in out.items():
        if isinstance(value, str) and not _storable(value):
            raise ConfigError(
                f"invalid {key} {value[:70]!r}: contains a NUL character or a lone surrogate"
            )
    if "alias" in out and not _ALIAS_RE.fullmatch(str(out["alias"])):
        raise ConfigError(
            f"invalid alias {str(out['alias'])[:70]!r}: use letters, digits and _ . : @ - "
            "(starting with a letter or digit)"
        )
    if "port" in out and not (1 <= _number(out, "port") <= 65535):
        raise ConfigError(f"invalid port {out['port']}: must be between 1 and 65535")
    if "frequency" in out and not 1 <= _number(out, "frequency") <= _INT_MAX:
        raise ConfigError(
            f"invalid frequency {out['frequency']}: must be between 1 and {_INT_MAX} seconds"
        )
    if "coalesce" in out and not 1 <= _number(out, "coalesce") <= _INT_MAX:
        raise ConfigError(f"invalid coalesce {out['coalesce']}: must be between 1 and {_INT_MAX}")
    ref = out.get("password_ref")
    if ref is not None and not _PASSWORD_REF_RE.fullmatch(str(ref)):
        raise ConfigError(
            f"invalid password reference {str(ref)[:70]!r}: use env:VARIABLE or file:/path "
            "(passwords are never stored in the repository)"
        )
    if "options" in out:
        out["options"] = _check_options(str(out["options"]))
    return out


def _storable(text: str) -> bool:
    """Whether a text column can hold ``text`` (JSON and YAML escapes can make both)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _number(values: dict[str, Any], key: str) -> int:
    try:
        return int(values[key])
    except (TypeError, ValueError):
        raise ConfigError(f"invalid {key} {str(values[key])[:70]!r}: expected a number") from None


def _check_options(options: str) -> str:
    try:
        params = psycopg.conninfo.conninfo_to_dict(options) if options.strip() else {}
    except psycopg.ProgrammingError as e:
        reason = " ".join(str(e).split())  # libpq's ends with a newline
        raise ConfigError(f"invalid connection options {options[:100]!r}: {reason}") from None
    if "password" in params or _OPTIONS_PASSWORD_RE.search(options):
        raise ConfigError(
            "connection options may not contain a password: use --password-ref "
            "env:VARIABLE or file:/path, or libpq's passfile"
        )
    return options.strip()


# The columns a discovery provider (static, file_sd) sets: the others
# (retention, enabled) stay the user's, even on a discovered server.
SYNCED = ("host", "port", "username", "dbname", "password_ref", "options", "frequency", "coalesce")


def _fields() -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(f.name) for f in dataclasses.fields(Server))


def _select(where: sql.Composable) -> sql.Composed:
    return sql.SQL("SELECT {} FROM pgfleet.servers WHERE {} ORDER BY srvid").format(
        _fields(), where
    )


def _fetch(
    conn: psycopg.Connection[Any], where: sql.Composable, args: tuple[Any, ...]
) -> list[Server]:
    with conn.cursor(row_factory=class_row(Server)) as cur:
        cur.execute(_select(where), args)
        return cur.fetchall()


def list_servers(conn: psycopg.Connection[Any], *, include_local: bool = False) -> list[Server]:
    where = sql.SQL("true") if include_local else sql.SQL("srvid <> 0")
    return _fetch(conn, where, ())


def get(conn: psycopg.Connection[Any], alias: str) -> Server:
    found = _fetch(conn, sql.SQL("alias = %s"), (alias,))
    if not found:
        raise ConfigError(f"no server named {alias!r} (see 'pgfleet server list')")
    return found[0]


def add(conn: psycopg.Connection[Any], alias: str, **settings: Any) -> Server:
    settings = validate({"alias": alias, **settings})
    unknown = set(settings) - set(EDITABLE) - {"alias"}
    if unknown:
        raise ConfigError(f"unknown server setting(s): {', '.join(sorted(unknown))}")
    cols = list(settings)
    try:
        with conn.transaction():
            row = conn.execute(
                sql.SQL("INSERT INTO pgfleet.servers ({}) VALUES ({}) RETURNING srvid").format(
                    sql.SQL(", ").join(map(sql.Identifier, cols)),
                    sql.SQL(", ").join(sql.Placeholder() * len(cols)),
                ),
                [settings[c] for c in cols],
            ).fetchone()
    except psycopg.errors.UniqueViolation:
        raise ConfigError(f"a server named {alias!r} already exists") from None
    except psycopg.errors.CheckViolation as e:
        raise ConfigError(f"invalid server setting: {e.diag.message_primary}") from None
    assert row is not None
    return get(conn, alias)


def update(conn: psycopg.Connection[Any], alias: str, **changes: Any) -> Server:
    changes = validate(changes)
    unknown = set(changes) - set(EDITABLE)
    if unknown:
        raise ConfigError(f"unknown server setting(s): {', '.join(sorted(unknown))}")
    server = get(conn, alias)
    if not changes:
        return server
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL("UPDATE pgfleet.servers SET {} WHERE srvid = %s").format(
                    sql.SQL(", ").join(
                        sql.SQL("{} = %s").format(sql.Identifier(c)) for c in changes
                    )
                ),
                [*changes.values(), server.srvid],
            )
    except psycopg.errors.CheckViolation as e:
        raise ConfigError(f"invalid server setting: {e.diag.message_primary}") from None
    return get(conn, alias)


def remove(conn: psycopg.Connection[Any], alias: str, *, purge: bool = False) -> Server:
    """Unregister a server; with ``purge`` also delete everything collected from it."""
    server = get(conn, alias)
    if server.is_local:
        raise ConfigError("the local server (srvid 0) cannot be removed; disable it instead")
    with conn.transaction():
        if purge:
            conn.execute(
                "SELECT pgfleet.metric_forget(module, %s) FROM pgfleet.metric_sources",
                (server.srvid,),
            )
        conn.execute("DELETE FROM pgfleet.metric_state WHERE srvid = %s", (server.srvid,))
        conn.execute("DELETE FROM pgfleet.servers WHERE srvid = %s", (server.srvid,))
    return server


def by_srvid(conn: psycopg.Connection[Any], srvid: int) -> Server:
    found = _fetch(conn, sql.SQL("srvid = %s"), (srvid,))
    if not found:
        raise RepositoryError(f"no server with srvid {srvid}")
    return found[0]


async def fetch_by_srvid(conn: psycopg.AsyncConnection[Any], srvid: int) -> Server:
    """:func:`by_srvid` on an async connection (the web UI's pools, whatever
    their row factory): the server's entry, or RepositoryError if there is
    none.  Marked as pgfleet's own statement, as the UI's other reads are
    (see ``reads.fetch``): a repository monitoring itself hides it."""
    query = mark(_select(sql.SQL("srvid = %s")).as_string(conn))
    async with conn.cursor(row_factory=class_row(Server)) as cur:
        await cur.execute(query, (srvid,))
        found = await cur.fetchone()
    if found is None:
        raise RepositoryError(f"no server with srvid {srvid}")
    return found


# -- The collectors' side: discovery


@dataclass(frozen=True)
class Collision:
    """A provider's target whose alias is another's: the row is left alone."""

    alias: str
    provider: str  # the target's
    owner: str  # whose the row is: "local", "pgfleet server add", or a provider
    origin: str | None  # where the owner found it, if a provider


def _owner(srvid: int, provider: str | None) -> str:
    if srvid == 0:
        return "local"
    return provider or "pgfleet server add"


async def fetch_enabled(
    conn: psycopg.AsyncConnection[Any],
    targets: Sequence[tuple[str, str]],
    *,
    registered: bool,
) -> list[Server]:
    """The enabled servers a collector may collect, in srvid order.

    Those of ``targets``, (alias, provider) pairs: a provider's target is
    its own row, never another's of the same alias; and, with
    ``registered``, those added with 'pgfleet server add' (no provider).
    The local server (srvid 0), the repository's own instance, is left out:
    collectors do not snapshot it (``pgfleet snapshot --local`` does).
    """
    where = [
        sql.SQL(
            "(alias, provider) IN"
            " (SELECT * FROM unnest(%(aliases)s::text[], %(providers)s::text[]))"
        )
    ]
    if registered:
        where.append(sql.SQL("provider IS NULL"))
    query = sql.SQL(
        "SELECT {} FROM pgfleet.servers WHERE srvid <> 0 AND enabled AND ({}) ORDER BY srvid"
    ).format(_fields(), sql.SQL(" OR ").join(where))
    async with conn.cursor(row_factory=class_row(Server)) as cur:
        await cur.execute(
            query,
            {"aliases": [a for a, _ in targets], "providers": [p for _, p in targets]},
        )
        return await cur.fetchall()


async def upsert_discovered(
    conn: psycopg.AsyncConnection[Any], targets: Sequence[Mapping[str, Any]]
) -> list[Collision]:
    """Register discovered servers under their alias, or bring their row up to date.

    Each target maps ``alias``, the :data:`SYNCED` columns, ``provider`` and
    ``origin``.  A provider writes only its own rows: a target whose alias
    is local's, a server's added by hand or another provider's changes
    nothing, and is returned as a :class:`Collision`.  A row is rewritten
    only if something changed, so that an unchanged fleet costs no dead
    tuples.
    """
    if not targets:
        return []
    cols = ("alias", *SYNCED, "provider", "origin")
    stmt = sql.SQL(
        "INSERT INTO pgfleet.servers ({cols}) VALUES ({vals}) "
        "ON CONFLICT (alias) DO UPDATE SET {sets} "
        "WHERE servers.srvid <> 0 AND servers.provider = excluded.provider "
        "AND ({old}) IS DISTINCT FROM ({new})"
    ).format(
        cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
        vals=sql.SQL(", ").join(sql.Placeholder() * len(cols)),
        sets=sql.SQL(", ").join(
            sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c)) for c in cols[1:]
        ),
        old=sql.SQL(", ").join(sql.SQL("servers.{}").format(sql.Identifier(c)) for c in cols),
        new=sql.SQL(", ").join(sql.SQL("excluded.{}").format(sql.Identifier(c)) for c in cols),
    )
    wanted = {t["alias"]: t["provider"] for t in targets}
    async with conn.transaction(), conn.cursor() as cur:
        await cur.executemany(stmt, [[t[c] for c in cols] for t in targets])
        # Whose each row is now, in this transaction: ours, or another's.
        await cur.execute(
            "SELECT alias, srvid, provider, origin FROM pgfleet.servers WHERE alias = ANY (%s)",
            (list(wanted),),
        )
        rows = await cur.fetchall()
    return [
        Collision(alias, wanted[alias], _owner(srvid, provider), origin)
        for alias, srvid, provider, origin in rows
        if srvid == 0 or provider != wanted[alias]
    ]
