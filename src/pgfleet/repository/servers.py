"""The servers registry: what to monitor and how to reach it.

Passwords never enter the repository: a server carries at most a *reference*
(``env:NAME`` or ``file:/path``) that the collector resolves when it connects;
without one, libpq's own passfile, service file or PGPASSWORD apply.

This is the one module that writes ``pgfleet.servers``: the CLI's sync CRUD
(``pgfleet server add/update/remove``) and the collectors' async discovery
sync alike, so that what a row may hold is decided in one place.
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

_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$")
_PASSWORD_REF_RE = re.compile(r"^(env|file):.+$")


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
    """Check user-supplied settings; raise ConfigError naming the bad one."""
    out = dict(changes)
    if "alias" in out and not _ALIAS_RE.match(str(out["alias"])):
        raise ConfigError(
            f"invalid alias {out['alias']!r}: use letters, digits and _ . : @ - "
            "(starting with a letter or digit)"
        )
    if "port" in out and not (1 <= int(out["port"]) <= 65535):
        raise ConfigError(f"invalid port {out['port']}: must be between 1 and 65535")
    if "frequency" in out and int(out["frequency"]) < 1:
        raise ConfigError(f"invalid frequency {out['frequency']}: must be at least 1 second")
    if "coalesce" in out and int(out["coalesce"]) < 1:
        raise ConfigError(f"invalid coalesce {out['coalesce']}: must be at least 1")
    ref = out.get("password_ref")
    if ref is not None and not _PASSWORD_REF_RE.match(ref):
        raise ConfigError(
            f"invalid password reference {ref!r}: use env:VARIABLE or file:/path "
            "(passwords are never stored in the repository)"
        )
    if "options" in out:
        out["options"] = _check_options(str(out["options"]))
    return out


def _check_options(options: str) -> str:
    try:
        params = psycopg.conninfo.conninfo_to_dict(options) if options.strip() else {}
    except psycopg.ProgrammingError as e:
        raise ConfigError(f"invalid connection options {options!r}: {e}") from None
    if "password" in params:
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


def _fetch(
    conn: psycopg.Connection[Any], where: sql.Composable, args: tuple[Any, ...]
) -> list[Server]:
    fields = _fields()
    with conn.cursor(row_factory=class_row(Server)) as cur:
        cur.execute(
            sql.SQL("SELECT {} FROM pgfleet.servers WHERE {} ORDER BY srvid").format(fields, where),
            args,
        )
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


# -- The collectors' side: discovery


async def fetch_enabled(
    conn: psycopg.AsyncConnection[Any], aliases: Sequence[str], *, registered: bool
) -> list[Server]:
    """The enabled servers a collector may collect, in srvid order.

    Those named in ``aliases`` (the providers' targets) and, with
    ``registered``, those added with 'pgfleet server add' (no provider).
    The local server (srvid 0), the repository's own instance, is left out:
    collectors do not snapshot it (``pgfleet snapshot --local`` does).
    """
    where = [sql.SQL("alias = ANY (%(aliases)s)")]
    if registered:
        where.append(sql.SQL("provider IS NULL"))
    query = sql.SQL(
        "SELECT {} FROM pgfleet.servers WHERE srvid <> 0 AND enabled AND ({}) ORDER BY srvid"
    ).format(_fields(), sql.SQL(" OR ").join(where))
    async with conn.cursor(row_factory=class_row(Server)) as cur:
        await cur.execute(query, {"aliases": list(aliases)})
        return await cur.fetchall()


async def upsert_discovered(
    conn: psycopg.AsyncConnection[Any], targets: Sequence[Mapping[str, Any]]
) -> None:
    """Register discovered servers under their alias, or bring their row up to date.

    Each target maps ``alias``, the :data:`SYNCED` columns and ``provider``.
    A row is rewritten only if something changed, so that an unchanged fleet
    costs no dead tuples.
    """
    if not targets:
        return
    cols = ("alias", *SYNCED, "provider")
    stmt = sql.SQL(
        "INSERT INTO pgfleet.servers ({cols}) VALUES ({vals}) "
        "ON CONFLICT (alias) DO UPDATE SET {sets} "
        "WHERE ({old}) IS DISTINCT FROM ({new})"
    ).format(
        cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
        vals=sql.SQL(", ").join(sql.Placeholder() * len(cols)),
        sets=sql.SQL(", ").join(
            sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c)) for c in cols[1:]
        ),
        old=sql.SQL(", ").join(sql.SQL("servers.{}").format(sql.Identifier(c)) for c in cols),
        new=sql.SQL(", ").join(sql.SQL("excluded.{}").format(sql.Identifier(c)) for c in cols),
    )
    async with conn.transaction(), conn.cursor() as cur:
        await cur.executemany(stmt, [[t[c] for c in cols] for t in targets])
