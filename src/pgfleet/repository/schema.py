"""Create or upgrade the repository schema from numbered SQL migrations.

Migrations are ``migrations/NNNN_name.sql``; each is applied once, in order,
in one transaction with the others, under an advisory lock so two concurrent
``repo upgrade`` runs cannot interleave.  An upgrade only ever adds: collected
data survives it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from pgfleet.errors import RepositoryError

_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every shipped migration, in version order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        m = _MIGRATION_RE.match(entry.name)
        if m:
            found.append(Migration(int(m[1]), m[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    return found


def latest_version() -> int:
    return migrations()[-1].version


def current_version(conn: psycopg.Connection[Any]) -> int | None:
    """The repository's schema version, or None if it was never initialised."""
    row = conn.execute("SELECT to_regclass('pgfleet.schema_migrations') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    row = conn.execute("SELECT max(version) FROM pgfleet.schema_migrations").fetchone()
    return int(row[0]) if row and row[0] is not None else None


async def current_version_async(conn: psycopg.AsyncConnection[Any]) -> int | None:
    """:func:`current_version`, for the collector's event loop."""
    # One statement rather than current_version's two: one round trip.
    cur = await conn.execute(
        "SELECT CASE WHEN to_regclass('pgfleet.schema_migrations') IS NOT NULL"
        " THEN (SELECT max(version) FROM pgfleet.schema_migrations) END"
    )
    row = await cur.fetchone()
    return int(row[0]) if row and row[0] is not None else None


def upgrade(conn: psycopg.Connection[Any]) -> list[Migration]:
    """Apply the missing migrations and (re)install the built-in sources.

    Return the migrations applied (empty if the schema was up to date).
    """
    from pgfleet.repository import sources

    with conn.transaction():
        # Transaction-level: released by commit or rollback, even if the
        # process dies half-way (the transaction is then rolled back whole).
        # Qualified, as everything here: nothing a repository user created in
        # another schema (public) may stand in for it.  The migrations run with
        # the caller's path (0009 resolves the registry's unqualified names
        # with it, once) and pin their own where they define functions.
        conn.execute(
            "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgfleet.migrate'))"
        )
        conn.execute("CREATE SCHEMA IF NOT EXISTS pgfleet")
        conn.execute(
            """CREATE TABLE IF NOT EXISTS pgfleet.schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        have = current_version(conn) or 0
        known = migrations()
        if have > known[-1].version:
            raise RepositoryError(
                f"repository schema version {have} is newer than this pgfleet knows "
                f"({known[-1].version}): upgrade pgfleet"
            )
        applied = []
        for mig in known:
            if mig.version <= have:
                continue
            try:
                conn.execute(mig.sql.encode())  # many statements: no parameters allowed
            except psycopg.Error as e:
                raise RepositoryError(
                    f"migration {mig.version:04d}_{mig.name} failed: {_first_line(e)}"
                ) from e
            conn.execute(
                "INSERT INTO pgfleet.schema_migrations (version, name) VALUES (%s, %s)",
                (mig.version, mig.name),
            )
            applied.append(mig)
        sources.install_builtin(conn)
    return applied


def unconverted(conn: psycopg.Connection[Any]) -> list[str]:
    """The sources whose history from before migration 0012 is not yet in the
    compact form (``<m>_history_v1`` still exists)."""
    return [
        str(r[0])
        for r in conn.execute(
            "SELECT module FROM pgfleet.metric_sources WHERE pg_catalog.to_regclass("
            " 'pgfleet.' || pg_catalog.quote_ident(module || '_history_v1')) IS NOT NULL"
            " ORDER BY module"
        )
    ]


def convert(
    conn: psycopg.Connection[Any],
    batch: int = 5000,
    progress: Callable[[str, int], None] | None = None,
) -> int:
    """Move the history written before migration 0012 into the compact form.

    One batch (about ``batch`` rows of one server) per transaction, so no lock
    is held for long and the collector and the web UI go on meanwhile; the
    readers see the rows in either form.  Safe to stop and run again.  Returns
    the rows converted.
    """
    if current_version(conn) is None:
        return 0
    total = 0
    for module in unconverted(conn):
        while True:
            # Each batch its own transaction, committed before the next, on a
            # connection in autocommit or not.
            if not conn.autocommit:
                conn.commit()
            with conn.transaction():
                row = conn.execute(
                    "SELECT pgfleet.metric_convert(%s, %s)", (module, batch)
                ).fetchone()
            if not conn.autocommit:
                conn.commit()
            n = int(row[0]) if row and row[0] is not None else 0
            if n == 0:
                break
            total += n
            if progress:
                progress(module, n)
    return total


def require_current(conn: psycopg.Connection[Any]) -> None:
    """Raise a clear error unless the repository schema is initialised and current."""
    have = current_version(conn)
    if have is None:
        raise RepositoryError("the repository is not initialised: run 'pgfleet repo init'")
    if have < latest_version():
        raise RepositoryError(
            f"the repository schema is at version {have}, this pgfleet needs "
            f"{latest_version()}: run 'pgfleet repo upgrade'"
        )
    if have > latest_version():
        raise RepositoryError(
            f"repository schema version {have} is newer than this pgfleet knows "
            f"({latest_version()}): upgrade pgfleet"
        )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
