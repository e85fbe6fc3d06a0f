"""Take snapshots: run each registered source, store what it returned.

Remote mode, for one server:

1. On the monitored server, every enabled source runs -- the built-in ones
   from their version-gated SQL (nothing to install there beyond the
   statistics extensions), a user's source by calling its query_source
   function with 0 -- as ``COPY (...) TO STDOUT``.  The rows stream into a
   spool (memory, spilling to disk past a few MB), never a Python list.
2. Then one short repository transaction: the spooled rows are COPYed into
   each source's transient table, ``pgfleet.take_snapshot(srvid, modules)``
   stores them (each source in its own subtransaction), the transient tables
   are TRUNCATEd, commit.  A crash anywhere leaves nothing half-written.

Querying the monitored server before opening the repository transaction means
a slow server never holds repository locks, and the repository side of every
snapshot stays a few milliseconds long.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

import psycopg
from psycopg import sql
from psycopg.abc import Buffer, PQGen

from pgfleet.config import CollectorConfig
from pgfleet.connections import connect_server, first_line
from pgfleet.datasources import Datasource, builtin
from pgfleet.errors import ServerError
from pgfleet.repository.servers import Server

# Spooled rows stay in memory up to this size, then spill to a temp file.
SPOOL_MEMORY = 4 * 1024 * 1024
_CHUNK = 256 * 1024


@dataclass(frozen=True)
class RegisteredSource:
    """A snapshot row of the registry (pgfleet.functions)."""

    module: str
    query_source: str | None
    query_cleanup: str | None
    added_manually: bool
    priority: int

    @property
    def tmp_table(self) -> sql.Composable | None:
        if not self.query_source:
            return None
        *schema, name = self.query_source.split(".")
        return sql.Identifier(*schema, name + "_tmp")


@dataclass
class SnapshotResult:
    alias: str
    srvid: int
    stored: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0
    # Of which: querying the monitored server, and writing the repository.
    fetch_seconds: float = 0.0
    store_seconds: float = 0.0

    def summary(self) -> str:
        parts = [
            f"snapshot of {self.alias!r}: {len(self.stored)} source(s) stored, "
            f"{self.rows} row(s), {self.seconds * 1000:.0f} ms"
        ]
        if self.skipped:
            parts.append("skipped: " + "; ".join(f"{m} ({why})" for m, why in self.skipped))
        return "\n".join(parts)


@dataclass(frozen=True)
class ServerInfo:
    version_num: int
    in_recovery: bool
    extensions: frozenset[str]
    databases: tuple[str, ...]


async def registered_sources(repo: psycopg.AsyncConnection[Any]) -> list[RegisteredSource]:
    cur = await repo.execute(
        """SELECT module, query_source, query_cleanup, added_manually, priority
             FROM pgfleet.functions
            WHERE operation = 'snapshot' AND enabled
            ORDER BY priority, module"""
    )
    return [RegisteredSource(*row) for row in await cur.fetchall()]


class ServerSession:
    """The connections to one monitored server: one per database, reused.

    The daemon keeps a session per server for its whole life; a one-shot
    snapshot opens one and closes it.
    """

    def __init__(self, server: Server, cfg: CollectorConfig) -> None:
        self.server = server
        self.cfg = cfg
        self._conns: dict[str, psycopg.AsyncConnection[Any]] = {}

    async def conn(self, dbname: str | None = None) -> psycopg.AsyncConnection[Any]:
        db = dbname or self.server.dbname
        c = self._conns.get(db)
        if c is None or c.closed or c.broken:
            c = await connect_server(self.server, self.cfg, dbname=db)
            self._conns[db] = c
        return c

    async def discard(self, dbname: str | None = None) -> None:
        c = self._conns.pop(dbname or self.server.dbname, None)
        if c is not None:
            await c.close()

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            await c.close()

    async def info(self) -> ServerInfo:
        c = await self.conn()
        cur = await c.execute(
            """SELECT current_setting('server_version_num')::int, pg_is_in_recovery(),
                      ARRAY(SELECT extname::text FROM pg_extension),
                      ARRAY(SELECT datname::text FROM pg_database
                             WHERE datallowconn AND NOT datistemplate ORDER BY datname)"""
        )
        row = await cur.fetchone()
        assert row is not None
        return ServerInfo(row[0], row[1], frozenset(row[2]), tuple(row[3]))


def plan_builtin(ds: Datasource, info: ServerInfo) -> tuple[str | None, str | None]:
    """Return (sql, None) to run the source, or (None, reason) to skip it."""
    query = ds.query_for(info.version_num)
    if query is None:
        return None, f"not available on PostgreSQL {info.version_num // 10000}"
    if ds.extension and ds.extension not in info.extensions:
        return None, f"extension {ds.extension} is not installed"
    if info.in_recovery and not ds.on_standby:
        return None, "not applicable on a standby"
    return query, None


async def _copy_out(
    conn: psycopg.AsyncConnection[Any], srvid: int, query: sql.Composable | str, spool: IO[bytes]
) -> None:
    stmt = sql.SQL("COPY (SELECT {}::integer AS srvid, * FROM ({}) s) TO STDOUT").format(
        sql.Literal(srvid), sql.SQL(query) if isinstance(query, str) else query
    )
    async with conn.cursor().copy(stmt) as copy:
        read_gen = getattr(copy, "_read_gen", None)
        if read_gen is None:  # psycopg changed its internals: the public, slower way
            async for data in copy:
                spool.write(data)
        else:
            await conn.wait(_drain(read_gen, spool))


def _drain(read_gen: Callable[[], PQGen[Buffer]], out: IO[bytes]) -> PQGen[None]:
    """Write every row of a COPY TO into ``out`` within one ``conn.wait()``.

    Iterating over psycopg's async Copy awaits once per row (COPY sends a
    message per row), ~3 us of CPU each; driving its row generator from a
    single wait only hands control to the event loop when libpq actually has
    to wait for the network.  Halves the collector's CPU per snapshot.
    """
    while data := (yield from read_gen()):
        out.write(data)


def _source_error(e: psycopg.Error, cfg: CollectorConfig) -> str:
    if isinstance(e, psycopg.errors.QueryCanceled):
        return f"timed out after {cfg.statement_timeout:g} s (cancelled on the server)"
    if isinstance(e, psycopg.errors.InsufficientPrivilege):
        return f"permission denied: {first_line(e)}"
    return first_line(e)


@dataclass
class Staged:
    """One source's rows, fetched from a monitored server, not yet stored.

    ``spool`` holds the rows in COPY text format (srvid first), positioned at
    its end: ``spool.tell()`` is its size.
    """

    source: RegisteredSource
    spool: IO[bytes]


async def fetch(
    session: ServerSession, sources: Iterable[RegisteredSource], result: SnapshotResult
) -> tuple[ServerInfo, list[Staged]]:
    """Run the sources on the monitored server into spools (step 1)."""
    info = await session.info()
    known = builtin()
    staged: list[Staged] = []
    cfg = session.cfg
    srvid = session.server.srvid
    for src in sources:
        if src.tmp_table is None:
            result.errors.append((src.module, "registered without a query_source function"))
            continue
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115
        ds = None if src.added_manually else known.get(src.module)
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            if ds is not None:
                query, why = plan_builtin(ds, info)
                if query is None:
                    result.skipped.append((src.module, why or "skipped"))
                    spool.close()
                    continue
                dbnames = info.databases if ds.per_database else (None,)
                for db in dbnames:
                    try:
                        conn = await session.conn(db)
                        await _copy_out(conn, srvid, query, spool)
                    except ServerError as e:
                        # One unreachable database (e.g. connection limit)
                        # must not lose the others.
                        result.errors.append((src.module, str(e)))
            else:
                conn = await session.conn()
                assert src.query_source is not None
                cur = await conn.execute(
                    "SELECT to_regprocedure(%s) IS NOT NULL", (src.query_source + "(integer)",)
                )
                row = await cur.fetchone()
                if not row or not row[0]:
                    result.errors.append(
                        (
                            src.module,
                            f"function {src.query_source}(integer) does not exist on the server",
                        )
                    )
                    spool.close()
                    continue
                *schema, name = src.query_source.split(".")
                await _copy_out(
                    conn,
                    srvid,
                    sql.SQL("SELECT * FROM {}(0)").format(sql.Identifier(*schema, name)),
                    spool,
                )
            if src.query_cleanup:
                conn = await session.conn()
                await conn.execute(src.query_cleanup.encode())
        except psycopg.Error as e:
            spool.close()
            if conn is not None and conn.broken:
                raise ServerError(
                    f"server {session.server.alias!r}: connection lost: {first_line(e)}"
                ) from None
            result.errors.append((src.module, _source_error(e, cfg)))
            continue
        staged.append(Staged(src, spool))
    return info, staged


async def store(
    repo: psycopg.AsyncConnection[Any],
    srvid: int,
    info: ServerInfo | None,
    staged: list[Staged],
    result: SnapshotResult,
) -> None:
    """Write spooled rows and take the snapshot, in one transaction (step 2)."""
    async with repo.transaction():
        await repo.execute("SELECT pgfleet.snapshot_lock()")
        # Staging rarely fails (a user's source whose rows do not fit its
        # transient table), so first try every COPY under one savepoint and
        # only on failure redo them one savepoint each, to keep the others.
        try:
            async with repo.transaction():
                rows = 0
                for st in staged:
                    rows += await _stage(repo, st)
            result.rows += rows
            loaded = list(staged)
        except psycopg.Error:
            loaded = []
            for st in staged:
                try:
                    async with repo.transaction():
                        result.rows += await _stage(repo, st)
                    loaded.append(st)
                except psycopg.Error as e:
                    result.errors.append((st.source.module, f"cannot store: {first_line(e)}"))
        modules = [st.source.module for st in loaded]
        await repo.execute("SELECT pgfleet.take_snapshot(%s, %s)", (srvid, modules))
        for module, message in result.errors:
            await repo.execute("SELECT pgfleet.record_error(%s, %s, %s)", (srvid, module, message))
        # The failures take_snapshot recorded, and what we learnt of the server.
        cur = await repo.execute(
            """WITH st AS (
                   UPDATE pgfleet.snapshot_state
                      SET server_version_num = coalesce(%s, server_version_num),
                          in_recovery = coalesce(%s, in_recovery)
                    WHERE srvid = %s)
               SELECT source, message FROM pgfleet.snapshot_errors
                WHERE srvid = %s AND ts = now() AND NOT (source = ANY (%s))""",
            (
                info.version_num if info else None,
                info.in_recovery if info else None,
                srvid,
                srvid,
                [m for m, _ in result.errors],
            ),
        )
        result.errors.extend(await cur.fetchall())
        failed = {m for m, _ in result.errors}
        result.stored = [m for m in modules if m not in failed]
        # Transient rows only ever live inside this transaction.
        tables = {st.source.query_source: st.source.tmp_table for st in loaded if st.spool.tell()}
        if tables:
            await repo.execute(
                sql.SQL("TRUNCATE {}").format(
                    sql.SQL(", ").join(t for t in tables.values() if t is not None)
                )
            )


async def _stage(repo: psycopg.AsyncConnection[Any], st: Staged) -> int:
    """COPY one source's spooled rows into its transient table; return the row count."""
    size = st.spool.tell() if not st.spool.closed else 0
    if size == 0:
        # No rows: nothing to stage or truncate, but the snapshot function
        # still runs (every entry it knew has vanished).
        return 0
    tmp = st.source.tmp_table
    assert tmp is not None
    st.spool.seek(0)
    async with repo.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(tmp)) as cp:
        while chunk := st.spool.read(_CHUNK):
            await cp.write(chunk)
    return max(cp.cursor.rowcount, 0)


async def record_failure(
    repo: psycopg.AsyncConnection[Any], srvid: int, source: str, message: str
) -> None:
    async with repo.transaction():
        await repo.execute(
            "INSERT INTO pgfleet.snapshot_state (srvid) VALUES (%s) ON CONFLICT DO NOTHING",
            (srvid,),
        )
        await repo.execute("SELECT pgfleet.record_error(%s, %s, %s)", (srvid, source, message))


async def snapshot_remote(
    repo: psycopg.AsyncConnection[Any],
    server: Server,
    cfg: CollectorConfig,
    *,
    session: ServerSession | None = None,
) -> SnapshotResult:
    """Take one remote snapshot of ``server`` into the repository.

    Raise ServerError (after recording it) when the server cannot be reached
    at all; per-source failures are recorded and reported in the result.
    """
    t0 = time.perf_counter()
    result = SnapshotResult(server.alias, server.srvid)
    own = session is None
    sess = session or ServerSession(server, cfg)
    staged: list[Staged] = []
    try:
        sources = await registered_sources(repo)
        t1 = time.perf_counter()
        try:
            info, staged = await fetch(sess, sources, result)
        except ServerError as e:
            await sess.close()
            await record_failure(repo, server.srvid, "connection", str(e))
            raise
        t2 = time.perf_counter()
        result.fetch_seconds = t2 - t1
        await store(repo, server.srvid, info, staged, result)
        result.store_seconds = time.perf_counter() - t2
    finally:
        for st in staged:
            st.spool.close()
        if own:
            await sess.close()
    result.seconds = time.perf_counter() - t0
    return result


async def snapshot_local(repo: psycopg.AsyncConnection[Any]) -> SnapshotResult:
    """Take one local snapshot (srvid 0): the repository monitors itself.

    Each source's query_source function reads local data when called with 0;
    built-in sources that cannot run here (version, missing extension) are
    skipped instead of recorded as failures every time.
    """
    t0 = time.perf_counter()
    result = SnapshotResult("local", 0)
    sources = await registered_sources(repo)
    cur = await repo.execute(
        """SELECT current_setting('server_version_num')::int, pg_is_in_recovery(),
                  ARRAY(SELECT extname::text FROM pg_extension)"""
    )
    row = await cur.fetchone()
    assert row is not None
    info = ServerInfo(row[0], row[1], frozenset(row[2]), ())
    known = builtin()
    modules = []
    for src in sources:
        ds = None if src.added_manually else known.get(src.module)
        if ds is not None:
            _, why = plan_builtin(ds, info)
            if why is not None:
                result.skipped.append((src.module, why))
                continue
        modules.append(src.module)
    async with repo.transaction():
        await repo.execute("SELECT pgfleet.take_snapshot(0, %s)", (modules,))
        cur = await repo.execute(
            "SELECT source, message FROM pgfleet.snapshot_errors WHERE srvid = 0 AND ts = now()"
        )
        result.errors.extend(await cur.fetchall())
        await repo.execute(
            "UPDATE pgfleet.snapshot_state SET server_version_num = %s, in_recovery = %s"
            " WHERE srvid = 0",
            (info.version_num, info.in_recovery),
        )
    failed = {m for m, _ in result.errors}
    result.stored = [m for m in modules if m not in failed]
    result.seconds = time.perf_counter() - t0
    return result
