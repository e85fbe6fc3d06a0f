"""The repository's side of a snapshot: every statement a snapshot sends.

The statement builders return ``sql.Composable`` so that
:mod:`pgfleet.snapshot.store` can send a whole snapshot as one
multi-statement query (one round trip per COPY, plus one); the functions run
one statement each.  What the statements call (``take_snapshot``,
``record_error``, ``snapshot_lock``...) is defined in the migrations; its
current definition is ``repository/functions.sql``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from pgfleet.snapshot.model import (
    ExportedColumn,
    Failure,
    FailureKind,
    RegisteredSource,
    ServerInfo,
    mark,
)

# The server's clock, read between statements of a multi-statement query to
# time each phase where it runs.
MARK = sql.SQL("SELECT extract(epoch FROM clock_timestamp())")
LOCK = sql.SQL("SELECT pgfleet.snapshot_lock()")
TRY_LOCK = sql.SQL("SELECT pgfleet.snapshot_try_lock()")

# The SQLSTATE ``snapshot_claim`` raises: this snapshot is stored already.
STORED_ALREADY = "PF001"
# SQLSTATE classes of the errors that refuse a snapshot's own rows: data
# exceptions (22: a value that does not parse or fit) and integrity
# constraints (23).  Sent again, the same rows would be refused again.
_ROWS_REFUSED = ("22", "23")


def rows_refused(e: BaseException) -> bool:
    """Whether the repository refused ``e``'s snapshot for its own rows, for good."""
    state = getattr(e, "sqlstate", None)
    return isinstance(state, str) and state[:2] in _ROWS_REFUSED


def stored_already(e: BaseException) -> bool:
    """Whether ``e`` says the snapshot is in the repository already (see :func:`claim`)."""
    return getattr(e, "sqlstate", None) == STORED_ALREADY


async def registered_sources(repo: psycopg.AsyncConnection[Any]) -> list[RegisteredSource]:
    """The enabled snapshot sources, in the order they run, with what user sources export."""
    cur = await repo.execute(
        """SELECT module, query_source, query_cleanup, added_manually, priority,
                  pg_catalog.to_regprocedure('pgfleet.exported_columns()') IS NOT NULL
             FROM pgfleet.functions
            WHERE operation = 'snapshot' AND enabled
            ORDER BY priority, module"""
    )
    rows = await cur.fetchall()
    exports: dict[str, list[ExportedColumn]] = {}
    # Users' sources' declarations (migration 0014): nothing to read without a
    # user's source, nor in a repository left at an older version (the upgrade
    # tests stop the migrations half-way).
    if any(manual and declared for *_, manual, _, declared in rows):
        cur = await repo.execute(
            """SELECT module, column_name, "position", kind, type, help
                 FROM pgfleet.exported_columns()"""
        )
        for module, *column in await cur.fetchall():
            exports.setdefault(module, []).append(ExportedColumn(*column))
    return [
        RegisteredSource(module, source, cleanup, manual, priority, tuple(exports.get(module, ())))
        for module, source, cleanup, manual, priority, _ in rows
    ]


def snapshot_count(srvid: int) -> sql.Composed:
    return sql.SQL("SELECT snapshots FROM pgfleet.snapshot_state WHERE srvid = {}").format(
        sql.Literal(srvid)
    )


def copy_in(src: RegisteredSource) -> sql.Composed:
    tmp = src.tmp_table
    assert tmp is not None
    return sql.SQL("COPY {} FROM STDIN").format(tmp)


def take_snapshot(
    srvid: int, modules: list[str], purge_interval: float | None = None
) -> sql.Composed:
    """``purge_interval``: seconds between two purges of the server at most
    (None: the repository's default, a day)."""
    if purge_interval is None:
        return sql.SQL("SELECT pgfleet.take_snapshot({}, {}::text[])").format(
            sql.Literal(srvid), sql.Literal(modules)
        )
    return sql.SQL("SELECT pgfleet.take_snapshot({}, {}::text[], {}::interval)").format(
        sql.Literal(srvid), sql.Literal(modules), sql.Literal(timedelta(seconds=purge_interval))
    )


def presence(srvid: int, absent: list[str], present: list[str]) -> sql.Composed:
    """Sources unregistered for the server because it lacks their extension
    now (``absent``), and those it ran (``present``, registered again if they
    were not): see migration 0015."""
    call = sql.SQL("PERFORM pgfleet.source_presence({}, {}::text[], {}::text[]);").format(
        sql.Literal(srvid), sql.Literal(absent), sql.Literal(present)
    )
    # In a DO block, run only where the function exists: a repository is
    # never older than its collector in production (the schema is checked
    # at connection), but the upgrade tests snapshot into ones stopped
    # half-way.  PL/pgSQL resolves the call only when it runs.
    return sql.SQL(
        "DO $pgfleet$ BEGIN"
        " IF pg_catalog.to_regprocedure('pgfleet.source_presence(integer,text[],text[])')"
        " IS NOT NULL THEN {} END IF; END $pgfleet$"
    ).format(call)


def claim(srvid: int, key: str) -> sql.Composed:
    """Claim ``key`` as the server's last stored snapshot; fails with
    :data:`STORED_ALREADY` if it is (the snapshot was stored already)."""
    return sql.SQL("SELECT pgfleet.snapshot_claim({}, {}::uuid)").format(
        sql.Literal(srvid), sql.Literal(key)
    )


def clamp(query_sources: list[str], clock: tuple[float, float]) -> sql.Composed:
    """Bring the staged rows of ``query_sources`` to the repository's clock if
    their timestamps are more than a minute off ``clock`` (when the snapshot
    was taken, by the repository's clock); return the shift, in seconds."""
    start, end = (datetime.fromtimestamp(t, UTC) for t in clock)
    return sql.SQL("SELECT pgfleet.snapshot_clamp({}::text[], {}, {})").format(
        sql.Literal(query_sources), sql.Literal(start), sql.Literal(end)
    )


def record_error(srvid: int, failure: Failure) -> sql.Composed:
    return sql.SQL("SELECT pgfleet.record_error({}, {}, {}, {})").format(
        sql.Literal(srvid),
        sql.Literal(failure.source),
        sql.Literal(failure.message),
        sql.Literal(failure.kind.value),
    )


def state(srvid: int, info: ServerInfo | None, recorded: list[str]) -> sql.Composed:
    """Save what we learnt of the server; return (source, message) of the
    failures this snapshot's transaction recorded besides ``recorded``: those
    of ``take_snapshot``, whose registered functions failed (see :func:`failures`)."""
    return sql.SQL(
        """WITH st AS (
               UPDATE pgfleet.snapshot_state
                  SET server_version_num = coalesce({}::integer, server_version_num),
                      in_recovery = coalesce({}::boolean, in_recovery)
                WHERE srvid = {})
           SELECT source, message FROM pgfleet.snapshot_errors
            WHERE srvid = {} AND ts = now() AND NOT (source = ANY ({}::text[]))"""
    ).format(
        sql.Literal(info.version_num if info else None),
        sql.Literal(info.in_recovery if info else None),
        sql.Literal(srvid),
        sql.Literal(srvid),
        sql.Literal(recorded),
    )


def failures(rows: list[list[str]]) -> list[Failure]:
    """The rows of :func:`state` as failures.

    Known to be store failures by where they come from: in a snapshot's
    transaction, only ``take_snapshot`` records failures besides the
    collector's own (``run_operation`` records them with kind ``store``).
    """
    return [Failure(source, FailureKind.STORE, message) for source, message in rows]


def truncate(sources: list[RegisteredSource]) -> sql.Composed:
    tables = {s.query_source: s.tmp_table for s in sources if s.tmp_table is not None}
    return sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(tables.values()))


async def record_failure(repo: psycopg.AsyncConnection[Any], srvid: int, failure: Failure) -> None:
    """Put one failure on the record, in its own transaction."""
    async with repo.transaction():
        await repo.execute(
            "INSERT INTO pgfleet.snapshot_state (srvid) VALUES (%s) ON CONFLICT DO NOTHING",
            (srvid,),
        )
        await repo.execute(record_error(srvid, failure))


async def seed_state(
    conn: psycopg.AsyncConnection[Any], srvid: int, coalesce_seq: int, aggregates: int
) -> None:
    """Start a new server's aggregate and purge counters where given (no-op if it has some)."""
    await conn.execute(
        """INSERT INTO pgfleet.snapshot_state (srvid, coalesce_seq, aggregates)
           VALUES (%s, %s, %s) ON CONFLICT DO NOTHING""",
        (srvid, coalesce_seq, aggregates),
    )


async def local_info(repo: psycopg.AsyncConnection[Any]) -> ServerInfo:
    """The repository's own instance, as the local mode's server (srvid 0)."""
    # Marked, as a remote snapshot's statements are on their server: here
    # the repository is the server (see snapshot.model.mark()).
    cur = await repo.execute(
        mark(
            """SELECT current_setting('server_version_num')::int, pg_is_in_recovery(),
                      ARRAY(SELECT extname::text FROM pg_extension)"""
        )
    )
    row = await cur.fetchone()
    assert row is not None
    return ServerInfo(row[0], row[1], frozenset(row[2]), ())


async def take_local_snapshot(
    repo: psycopg.AsyncConnection[Any],
    info: ServerInfo,
    modules: list[str],
    *,
    absent: list[str] | None = None,
) -> list[Failure]:
    """Snapshot srvid 0 in one transaction; return the failures it recorded.

    ``absent``: the sources skipped because the repository lacks their
    extension, unregistered for srvid 0 (see :func:`presence`)."""
    async with repo.transaction():
        if absent is not None:
            await repo.execute(presence(0, absent, modules))
        # Marked: see local_info().  With pg_stat_statements.track = top, the
        # sources' queries run inside it are not counted on their own.
        await repo.execute(mark("SELECT pgfleet.take_snapshot(0, %s)"), (modules,))
        cur = await repo.execute(
            "SELECT source, message FROM pgfleet.snapshot_errors WHERE srvid = 0 AND ts = now()"
        )
        found = failures([list(r) for r in await cur.fetchall()])
        await repo.execute(
            "UPDATE pgfleet.snapshot_state SET server_version_num = %s, in_recovery = %s"
            " WHERE srvid = 0",
            (info.version_num, info.in_recovery),
        )
    return found
