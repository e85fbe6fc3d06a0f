"""Take snapshots: run each registered source, store what it returned.

Remote mode, for one server:

1. On the monitored server, every enabled source runs -- the built-in ones
   from their version-gated SQL (nothing to install there beyond the
   statistics extensions), a user's source by calling its query_source
   function with 0 -- as ``COPY (...) TO STDOUT``.  The rows stream into a
   spool (memory, spilling to disk past a few MB), never a Python list.
   Built-in sources go as one multi-statement batch per database
   connection, the connections working at once (see :func:`fetch`).
2. Then one short repository transaction: the spooled rows are COPYed into
   each source's transient table, ``pgfleet.take_snapshot(srvid, modules)``
   stores them (each source in its own subtransaction), the transient tables
   are TRUNCATEd, commit.  A crash anywhere leaves nothing half-written.  It
   is sent as one multi-statement query: a round trip per COPY, plus one
   (see :func:`store`).

Querying the monitored server before opening the repository transaction means
a slow server never holds repository locks, and the repository side of every
snapshot stays a few milliseconds long.  That is how the daemon works.

A one-shot snapshot (:func:`snapshot_remote`) overlaps the two when it can:
when pg_stat_statements' first rows arrive, if the repository's snapshot lock
is free, it opens the transaction and COPYs them into the transient table
while the server is still sending the rest, the other sources being spooled
meanwhile; then step 2 for the others.  It holds the lock while the server answers for at most
``STREAM_HOLD`` seconds: past that it rolls back (releasing the lock) and
stores from the spools as above, which hold every row anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

import psycopg
from psycopg import pq, sql
from psycopg.abc import Buffer, PQGen
from psycopg.pq.abc import PGconn, PGresult
from psycopg.waiting import Ready, Wait

from pgfleet.config import CollectorConfig
from pgfleet.connections import connect_server, first_line
from pgfleet.datasources import Datasource, builtin
from pgfleet.errors import ServerError
from pgfleet.repository.servers import Server

# Spooled rows stay in memory up to this size, then spill to a temp file.
SPOOL_MEMORY = 4 * 1024 * 1024
# Rows are written to spools, and read back into COPY, by the chunk: a write
# per row costs more than reading the row, and a streamed source goes to the
# repository a chunk at a time.
_CHUNK = 64 * 1024
# How long a one-shot snapshot may hold the repository's snapshot lock while
# the monitored server is still answering (see snapshot_remote): other
# stores wait for it.  A normal store holds it for tens of milliseconds.
STREAM_HOLD = 0.2


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
    # Stored sources left out as unchanged since the previous snapshot (see store()).
    unchanged: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Of which: querying the monitored server, and writing the repository.
    fetch_seconds: float = 0.0
    store_seconds: float = 0.0
    # Finer timings of store() (seconds): copy, take_snapshot, truncate...
    phases: dict[str, float] = field(default_factory=dict)

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


class _Stream:
    """The source a one-shot snapshot COPYs into the repository as it arrives.

    :func:`fetch` picks it (the first built-in source marked ``streamed``
    that runs on one connection) and gives it a :class:`_StreamSpool`; every
    write into the spool sets ``more``.  ``ready``: the pick is made (or there
    is none); ``done``: the fetch is over, whatever its outcome.
    """

    def __init__(self) -> None:
        self.source: RegisteredSource | None = None
        self.spool: _StreamSpool | None = None
        self.ready = asyncio.Event()
        self.more = asyncio.Event()
        self.done = False

    def open(self, src: RegisteredSource) -> _StreamSpool:
        self.source = src
        self.spool = _StreamSpool(self)
        return self.spool

    def finish(self) -> None:
        self.done = True
        self.ready.set()
        self.more.set()


class _StreamSpool(tempfile.SpooledTemporaryFile[bytes]):
    """A spool that says when rows were written into it."""

    def __init__(self, stream: _Stream) -> None:
        super().__init__(max_size=SPOOL_MEMORY)
        self._stream = stream

    def write(self, s: Any) -> int:
        n = super().write(s)
        self._stream.more.set()
        return n


@dataclass
class _Job:
    """One built-in source's query on one database's connection."""

    src: RegisteredSource
    query: str
    db: str
    spool: IO[bytes]
    # A per-database source loses only this database when it cannot be reached.
    per_database: bool
    # A cluster-wide source: any database's connection will do.
    flexible: bool = False
    # A per-database connection failure: recorded, the source still stored.
    unreachable: str | None = None
    # A query failure: the source is not stored.
    failed: str | None = None
    seconds: float = 0.0


async def fetch(
    session: ServerSession,
    sources: Iterable[RegisteredSource],
    result: SnapshotResult,
    *,
    stream: _Stream | None = None,
) -> tuple[ServerInfo, list[Staged]]:
    """Run the sources on the monitored server into spools (step 1).

    Built-in sources run as a few multi-statement batches of ``COPY ... TO
    STDOUT``, one per database connection, concurrently: the per-database
    sources on their database's connection, the cluster-wide ones on another
    database's connection when the server has one (pg_stat_statements and
    other extensions' views stay on the main one), so that two server
    backends work at once and each connection pays one round trip, not one
    per source.  A user's source, and any source with a ``query_cleanup``,
    runs on its own afterwards.  Each source's spool holds its rows in the
    same order as when they ran one by one.

    ``stream``: give the first source marked ``streamed`` (one query on one
    connection) the stream's spool, so that its rows can be read as they come.
    """
    info = await session.info()
    known = builtin()
    main = session.server.dbname
    jobs: dict[str, list[_Job]] = {}  # per source module, in database order
    alone: list[RegisteredSource] = []
    order: list[RegisteredSource] = []
    for src in sources:
        if src.tmp_table is None:
            result.errors.append((src.module, "registered without a query_source function"))
            continue
        ds = None if src.added_manually else known.get(src.module)
        if ds is not None:
            query, why = plan_builtin(ds, info)
            if query is None:
                result.skipped.append((src.module, why or "skipped"))
                continue
            if not src.query_cleanup:
                dbs = info.databases if ds.per_database else (main,)
                streams = (
                    stream is not None
                    and stream.source is None
                    and ds.streamed
                    and not ds.per_database
                )
                jobs[src.module] = [
                    _Job(
                        src,
                        query,
                        db,
                        stream.open(src) if stream is not None and streams else _spool(),
                        ds.per_database,
                        flexible=not ds.extension,
                    )
                    for db in dbs
                ]
                order.append(src)
                continue
        alone.append(src)
        order.append(src)
    if stream is not None:
        stream.ready.set()

    lanes: dict[str, list[_Job]] = {}
    for js in jobs.values():
        for job in js:
            lanes.setdefault(job.db, []).append(job)
    helper = next((db for db in lanes if db != main), None)
    if helper is not None:
        moved = [j for j in lanes.get(main, []) if j.flexible and not j.per_database]
        lanes[main] = [j for j in lanes.get(main, []) if j not in moved]
        lanes[helper] = moved + lanes[helper]
    staged_alone: dict[str, Staged] = {}

    async def timed(db: str, lane: list[_Job]) -> list[_Job]:
        t0 = time.perf_counter()
        try:
            return await _run_lane(session, db, lane)
        finally:
            result.phases["fetch @" + db] = time.perf_counter() - t0

    try:
        outcomes = await asyncio.gather(
            *(timed(db, lane) for db, lane in lanes.items() if lane),
            return_exceptions=True,
        )
        for out in outcomes:
            if isinstance(out, BaseException):
                raise out
        # Cluster-wide sources whose helper connection could not be opened.
        retry = [j for out in outcomes if isinstance(out, list) for j in out]
        if retry:
            for job in retry:
                job.unreachable = None
            await _run_lane(session, main, retry, fallback=False)
        for src in alone:
            st = await _fetch_alone(session, src, known, info, result)
            if st is not None:
                staged_alone[src.module] = st
    except BaseException:
        for js in jobs.values():
            for job in js:
                job.spool.close()
        for st in staged_alone.values():
            st.spool.close()
        raise

    staged: list[Staged] = []
    for src in order:
        if src.module in staged_alone:
            staged.append(staged_alone[src.module])
            continue
        mine = jobs.get(src.module)
        if mine is None:
            continue  # a source run alone that failed
        # Approximate: the server sends a batch's results as its buffer fills.
        result.phases["fetch " + src.module] = sum(j.seconds for j in mine)
        for job in mine:
            if job.unreachable:
                result.errors.append((src.module, job.unreachable))
        failed = next((j.failed for j in mine if j.failed), None)
        if failed is not None:
            result.errors.append((src.module, failed))
            for job in mine:
                job.spool.close()
            continue
        spool = mine[0].spool
        for job in mine[1:]:
            job.spool.seek(0)
            shutil.copyfileobj(job.spool, spool, _CHUNK)
            job.spool.close()
        staged.append(Staged(src, spool))
    return info, staged


def _spool() -> IO[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)


async def _run_lane(
    session: ServerSession, db: str, lane: list[_Job], *, fallback: bool = True
) -> list[_Job]:
    """Run one connection's jobs in batches; return the jobs to run elsewhere.

    Those are the cluster-wide jobs of a helper connection that could not be
    opened (``fallback``); a per-database job records the failure instead.
    A connection lost half-way raises ServerError, as it does for the whole
    snapshot.
    """
    try:
        conn = await session.conn(db)
    except ServerError as e:
        if db == session.server.dbname and any(not j.per_database for j in lane):
            raise
        retry = [j for j in lane if fallback and not j.per_database]
        for job in lane:
            if job not in retry:
                job.unreachable = str(e)
        return retry
    pending = lane
    one_by_one = False
    while pending:
        batch = pending[:1] if one_by_one else pending
        try:
            done, error = await _copy_batch(conn, session.server.srvid, batch)
        except psycopg.Error as e:
            # libpq itself failed (the connection, mostly): where is unknown.
            done, error = 0, e
            one_by_one = True
        if error is None:
            pending = pending[len(batch) :]
            continue
        if conn.broken:
            raise ServerError(
                f"server {session.server.alias!r}: connection lost: {first_line(error)}"
            ) from None
        if isinstance(error, psycopg.errors.SyntaxError) and done == 0 and len(batch) > 1:
            # The whole batch is parsed before any of it runs: find the culprit.
            one_by_one = True
            continue
        batch[done].failed = _source_error(error, session.cfg)
        pending = pending[done + 1 :]
    return []


async def _copy_batch(
    conn: psycopg.AsyncConnection[Any], srvid: int, jobs: list[_Job]
) -> tuple[int, psycopg.Error | None]:
    """Run ``jobs`` as one multi-statement query; return (jobs done, first error).

    The statements run in order in one implicit transaction: after an error
    the rest are skipped, and left to the caller.  ``statement_timeout``
    applies to each statement.
    """
    query = b";\n".join(
        sql.SQL("COPY (SELECT {}::integer AS srvid, * FROM ({}) s) TO STDOUT")
        .format(sql.Literal(srvid), sql.SQL(job.query))
        .as_bytes(conn)
        for job in jobs
    )
    marks = [time.perf_counter()]
    async with conn.lock:
        done, error = await conn.wait(
            _copy_many(conn.pgconn, query, [j.spool for j in jobs], marks, conn.info.encoding)
        )
    for i in range(done):
        jobs[i].seconds += marks[i + 1] - marks[i]
    return done, error


def _copy_many(
    pgconn: PGconn, query: bytes, outs: list[IO[bytes]], marks: list[float], encoding: str
) -> PQGen[tuple[int, psycopg.Error | None]]:
    """Send ``query`` (COPY TO statements) and drain the n-th COPY into ``outs[n]``.

    Rows are gathered and written by the chunk: one write per row into a
    spooled file costs more than reading the row.  Every result is read to
    the end (libpq's rule for a multi-statement query), errors included.
    """
    pgconn.send_query(query)
    yield from _flush(pgconn)
    done = 0
    error: psycopg.Error | None = None
    while True:
        res = yield from _next_result(pgconn)
        if res is None:
            break
        status = res.status
        if status == pq.ExecStatus.COPY_OUT:
            out = outs[done]
            buf: list[Buffer] = []
            size = 0
            while True:
                nbytes, data = pgconn.get_copy_data(1)
                if nbytes > 0:
                    buf.append(data)
                    size += nbytes
                    if size >= _CHUNK:
                        out.write(b"".join(buf))
                        buf.clear()
                        size = 0
                elif nbytes == 0:
                    while not (yield Wait.R):
                        continue
                    pgconn.consume_input()
                else:
                    break
            if buf:
                out.write(b"".join(buf))
        elif status == pq.ExecStatus.COMMAND_OK:
            done += 1
            marks.append(time.perf_counter())
        elif error is None:
            if status == pq.ExecStatus.FATAL_ERROR:
                error = psycopg.errors.error_from_result(res, encoding=encoding)
            else:
                error = psycopg.ProgrammingError(f"unexpected result status {status}")
    return done, error


async def _fetch_alone(
    session: ServerSession,
    src: RegisteredSource,
    known: dict[str, Datasource],
    info: ServerInfo,
    result: SnapshotResult,
) -> Staged | None:
    """Run one source on its own: a user's source, or one with a cleanup query."""
    t0 = time.perf_counter()
    cfg = session.cfg
    srvid = session.server.srvid
    spool = _spool()
    ds = None if src.added_manually else known.get(src.module)
    conn: psycopg.AsyncConnection[Any] | None = None
    try:
        if ds is not None:
            query, _ = plan_builtin(ds, info)
            assert query is not None
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
                return None
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
        return None
    except BaseException:
        spool.close()
        raise
    result.phases["fetch " + src.module] = time.perf_counter() - t0
    return Staged(src, spool)


async def store(
    repo: psycopg.AsyncConnection[Any],
    srvid: int,
    info: ServerInfo | None,
    staged: list[Staged],
    result: SnapshotResult,
    *,
    preloaded: frozenset[str] = frozenset(),
) -> None:
    """Write spooled rows and take the snapshot, in one transaction (step 2).

    The whole transaction is one multi-statement query: the snapshot lock,
    a ``COPY ... FROM STDIN`` per source with rows, ``take_snapshot``, the
    fetch errors, the server's facts and the ``TRUNCATE`` of the transient
    tables -- one round trip per COPY, plus one.  Staging rarely fails (a
    user's source whose rows do not fit its transient table): if it does,
    the transaction is rolled back and done again with each COPY under its
    own savepoint, so that the other sources are kept.

    A built-in source whose rows are the same as in the server's previous
    snapshot, which this process stored (the timestamps aside: settings,
    mostly), would write nothing: it is neither staged nor snapshotted, but
    counted as stored -- unless another snapshot of the server was stored
    since (``snapshot_state.snapshots`` says), which costs one more round
    trip when there is such a source.  Its spool is left as it is.

    ``preloaded``: modules whose rows the caller already COPYed into their
    transient tables, in the transaction this one is then a savepoint of.
    """
    ph = result.phases
    t = time.perf_counter()
    rows = result.rows
    errors = len(result.errors)
    key = (repo.info.host, repo.info.port, repo.info.dbname, srvid)
    digests = _digests(staged)
    before = _stored.get(key)
    unchanged = {
        m
        for m, d in digests.items()
        if before and before.digests.get(m) == d and m not in preloaded
    }
    stored: _Stored | None = None
    try:
        try:
            async with repo.transaction():
                stored = await _store_script(
                    repo,
                    srvid,
                    info,
                    result,
                    staged,
                    fast=True,
                    unchanged=unchanged,
                    expect=before.snapshots if before else None,
                    preloaded=preloaded,
                )
        except _StagingFailed:
            # Rolled back: nothing of the first attempt is left.
            result.rows = rows
            del result.errors[errors:]
            ph.pop("copy", None)
            loaded: list[Staged] = []
            async with repo.transaction():
                await repo.execute("SELECT pgfleet.snapshot_lock()")
                for st in staged:
                    if st.source.module in preloaded:
                        loaded.append(st)
                        continue
                    try:
                        async with repo.transaction():
                            result.rows += await _stage(repo, st)
                        loaded.append(st)
                    except psycopg.Error as e:
                        result.errors.append((st.source.module, f"cannot store: {first_line(e)}"))
                stored = await _store_script(
                    repo, srvid, info, result, loaded, fast=False, preloaded=preloaded
                )
    except BaseException:
        _stored.pop(key, None)
        raise
    finally:
        # As the Staged contract says, whatever was read from them.
        for st in staged:
            if not st.spool.closed:
                st.spool.seek(0, io.SEEK_END)
    # Committed, or (in the daemon) part of the caller's transaction: should
    # that fail, the snapshot count will not match next time.
    failed = {m for m, _ in result.errors}
    assert stored is not None
    result.rows += sum(digests[m][1] for m in stored.skipped)
    result.unchanged = [m for m in result.stored if m in stored.skipped]
    stored.digests = {m: d for m, d in digests.items() if m not in failed}
    _stored[key] = stored
    now = time.perf_counter()
    ph["store"] = now - t
    ph["commit"] = now - ph.pop("_end", now)


class _StagingFailed(Exception):
    pass


@dataclass
class _Stored:
    """What this process last stored of a server: its snapshot count after
    that snapshot, and a digest of each built-in source's rows."""

    snapshots: int
    digests: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    # The modules this snapshot left out as unchanged.
    skipped: set[str] = field(default_factory=set)


# Per repository (host, port, dbname) and srvid.
_stored: dict[tuple[str, int, str, int], _Stored] = {}
# Larger spools (pg_stat_statements') are not compared: they always change.
_COMPARED = 256 * 1024


def _digests(staged: list[Staged]) -> dict[str, tuple[bytes, int]]:
    """A digest of the rows of each built-in source that could be unchanged.

    The timestamp (the second field of every row, after srvid) is left out;
    sources with ``delta`` columns are never unchanged (the same non-zero
    delta twice is two rows), nor are user sources (their columns are theirs).
    """
    known = builtin()
    out: dict[str, tuple[bytes, int]] = {}
    for st in staged:
        ds = None if st.source.added_manually else known.get(st.source.module)
        if ds is None or ds.names("delta") or st.spool.closed:
            continue
        size = st.spool.tell()
        if size > _COMPARED:
            continue
        st.spool.seek(0)
        data = st.spool.read(size)
        h = hashlib.blake2b(digest_size=16)
        lines = data.splitlines()
        for line in lines:
            fields = line.split(b"\t", 2)
            h.update(fields[2] if len(fields) > 2 else b"")
            h.update(b"\n")
        out[st.source.module] = (h.digest(), len(lines))
    return out


async def _store_script(
    repo: psycopg.AsyncConnection[Any],
    srvid: int,
    info: ServerInfo | None,
    result: SnapshotResult,
    loaded: list[Staged],
    *,
    fast: bool,
    unchanged: set[str] | None = None,
    expect: int | None = None,
    preloaded: frozenset[str] = frozenset(),
) -> _Stored:
    """Run what a snapshot writes as one multi-statement query.

    ``fast``: the snapshot lock and the COPYs come first in the same query
    (else the caller took the lock and staged ``loaded`` already).
    ``unchanged``: modules to leave out, if the server's snapshot count is
    still ``expect`` (checked under the lock, before the rest is sent).
    ``preloaded``: modules staged already (not COPYed, but TRUNCATEd).
    Return the snapshot count after this snapshot.
    """
    mark = sql.SQL("SELECT extract(epoch FROM clock_timestamp())")
    count = sql.SQL("SELECT snapshots FROM pgfleet.snapshot_state WHERE srvid = {}").format(
        sql.Literal(srvid)
    )
    locked = not fast
    skip: set[str] = set()
    if fast and unchanged and expect is not None:
        results = await _run_script(
            repo, [("lock", sql.SQL("SELECT pgfleet.snapshot_lock()")), ("count", count)], []
        )
        locked = True
        if _int(results[1]) == expect:
            skip = unchanged
    with_rows = [
        st
        for st in loaded
        if not st.spool.closed and st.spool.tell() and st.source.module not in skip
    ]
    modules = [st.source.module for st in loaded if st.source.module not in skip]
    # (what, statement): "copy" statements are fed from ``copies`` in order;
    # "mark" statements read the server's clock, so that the phases are
    # timed where they run (the results of a multi-statement query reach the
    # client together at the end).
    stmts: list[tuple[str, sql.Composable]] = [("mark", mark)]
    copies: list[Staged] = []
    if not locked:
        stmts.append(("lock", sql.SQL("SELECT pgfleet.snapshot_lock()")))
        stmts.append(("mark", mark))
    if fast:
        for st in with_rows:
            if st.source.module in preloaded:
                continue
            tmp = st.source.tmp_table
            assert tmp is not None
            stmts.append(("copy", sql.SQL("COPY {} FROM STDIN").format(tmp)))
            copies.append(st)
        stmts.append(("mark", mark))
    stmts.append(
        (
            "take_snapshot",
            sql.SQL("SELECT pgfleet.take_snapshot({}, {}::text[])").format(
                sql.Literal(srvid), sql.Literal(modules)
            ),
        )
    )
    stmts.append(("mark", mark))
    stmts.append(("count", count))
    for module, message in result.errors:
        stmts.append(
            (
                "record_error",
                sql.SQL("SELECT pgfleet.record_error({}, {}, {})").format(
                    sql.Literal(srvid), sql.Literal(module), sql.Literal(message)
                ),
            )
        )
    # The failures take_snapshot recorded, and what we learnt of the server.
    stmts.append(
        (
            "state",
            sql.SQL(
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
                sql.Literal([m for m, _ in result.errors]),
            ),
        )
    )
    stmts.append(("mark", mark))
    # Transient rows only ever live inside this transaction.
    tables = {st.source.query_source: st.source.tmp_table for st in with_rows}
    if tables:
        stmts.append(
            (
                "truncate",
                sql.SQL("TRUNCATE {}").format(
                    sql.SQL(", ").join(t for t in tables.values() if t is not None)
                ),
            )
        )
        stmts.append(("mark", mark))
    results = await _run_script(repo, stmts, copies, staging=fast)
    ph = result.phases
    enc = repo.info.encoding
    clock: float | None = None
    phase = "start"
    snapshots = 0
    for (what, _), res in zip(stmts, results, strict=True):
        if what == "mark":
            at = float(_value(res) or 0)
            if clock is not None:
                ph[phase] = at - clock
            clock = at
        elif what == "copy":
            result.rows += max(res.command_tuples or 0, 0)
        elif what == "count":
            snapshots = _int(res)
        elif what == "state":
            for i in range(res.ntuples):
                cells = [bytes(res.get_value(i, c) or b"").decode(enc) for c in range(2)]
                result.errors.append((cells[0], cells[1]))
        if what != "mark":
            phase = what
    ph["_end"] = time.perf_counter()
    failed = {m for m, _ in result.errors}
    result.stored = [st.source.module for st in loaded if st.source.module not in failed]
    return _Stored(snapshots, skipped=skip)


def _value(res: PGresult) -> bytes | None:
    v = res.get_value(0, 0) if res.ntuples else None
    return bytes(v) if v is not None else None


def _int(res: PGresult) -> int:
    v = _value(res)
    return int(v) if v is not None else -1


async def _run_script(
    repo: psycopg.AsyncConnection[Any],
    stmts: list[tuple[str, sql.Composable]],
    copies: list[Staged],
    *,
    staging: bool = False,
) -> list[PGresult]:
    """Run ``stmts`` as one query; raise _StagingFailed if a COPY failed."""
    query = b";\n".join(stmt.as_bytes(repo) for _, stmt in stmts)
    async with repo.lock:
        results, error = await repo.wait(
            _script(repo.pgconn, query, [st.spool for st in copies], repo.info.encoding)
        )
    if error is not None:
        if staging and stmts[len(results)][0] == "copy":
            raise _StagingFailed() from error
        raise error
    return results


def _script(
    pgconn: PGconn, query: bytes, spools: list[IO[bytes]], encoding: str
) -> PQGen[tuple[list[PGresult], psycopg.Error | None]]:
    """Send ``query``, feed the n-th ``COPY FROM STDIN`` from ``spools[n]``.

    Return the result of each statement that completed, in order, and the
    error that stopped the others, if any.
    """
    pgconn.send_query(query)
    yield from _flush(pgconn)
    results: list[PGresult] = []
    copies = 0
    error: psycopg.Error | None = None
    while True:
        res = yield from _next_result(pgconn)
        if res is None:
            break
        status = res.status
        if status == pq.ExecStatus.COPY_IN:
            spool = spools[copies]
            copies += 1
            spool.seek(0)
            while chunk := spool.read(_CHUNK):
                while pgconn.put_copy_data(chunk) == 0:
                    while not (yield Wait.W):
                        continue
                yield from _flush(pgconn)
            while pgconn.put_copy_end(None) == 0:
                while not (yield Wait.W):
                    continue
            yield from _flush(pgconn)
        elif status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            results.append(res)
        elif error is None:
            if status == pq.ExecStatus.FATAL_ERROR:
                error = psycopg.errors.error_from_result(res, encoding=encoding)
            else:
                error = psycopg.ProgrammingError(f"unexpected result status {status}")
    return results, error


def _next_result(pgconn: PGconn) -> PQGen[PGresult | None]:
    """The next result of the query in progress; None after its last."""
    while pgconn.is_busy():
        while not (yield Wait.R):
            continue
        pgconn.consume_input()
    return pgconn.get_result()


def _flush(pgconn: PGconn) -> PQGen[None]:
    while pgconn.flush():
        while not (ready := (yield Wait.RW)):
            continue
        if ready & Ready.R:
            pgconn.consume_input()


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
    stream_hold: float = STREAM_HOLD,
) -> SnapshotResult:
    """Take one remote snapshot of ``server`` into the repository.

    Raise ServerError (after recording it) when the server cannot be reached
    at all; per-source failures are recorded and reported in the result.

    The fetch runs as a task; meanwhile, if the snapshot lock is free, the
    streamed source goes into the repository as it arrives (see the module's
    docstring).  ``stream_hold``: how long the lock may be held before the
    fetch is over (0: never stream).
    """
    t0 = time.perf_counter()
    result = SnapshotResult(server.alias, server.srvid)
    own = session is None
    sess = session or ServerSession(server, cfg)
    fetching: asyncio.Task[tuple[ServerInfo, list[Staged]]] | None = None
    try:
        sources = await registered_sources(repo)
        stream = _Stream() if stream_hold > 0 else None
        fetching = asyncio.create_task(_fetch_timed(sess, sources, result, stream))
        try:
            streamed = stream is not None and await _stream_and_store(
                repo, server.srvid, fetching, stream, result, stream_hold
            )
            if not streamed:
                info, staged = await fetching
                t2 = time.perf_counter()
                await store(repo, server.srvid, info, staged, result)
                result.store_seconds = time.perf_counter() - t2
        except ServerError as e:
            await sess.close()
            await record_failure(repo, server.srvid, "connection", str(e))
            raise
    finally:
        if fetching is not None:
            # Whatever happened, the fetch is over or stopped, and its spools
            # closed (fetch() closes them itself when it fails).
            if not fetching.done():
                fetching.cancel()
                await asyncio.wait({fetching})
            if not fetching.cancelled() and fetching.exception() is None:
                for st in fetching.result()[1]:
                    st.spool.close()
        if own:
            await sess.close()
    result.seconds = time.perf_counter() - t0
    return result


async def _fetch_timed(
    session: ServerSession,
    sources: list[RegisteredSource],
    result: SnapshotResult,
    stream: _Stream | None,
) -> tuple[ServerInfo, list[Staged]]:
    t = time.perf_counter()
    try:
        return await fetch(session, sources, result, stream=stream)
    finally:
        result.fetch_seconds = time.perf_counter() - t
        if stream is not None:
            stream.finish()


class _GiveUp(Exception):
    """Stop streaming: roll the repository transaction back, store from the spools."""


async def _stream_and_store(
    repo: psycopg.AsyncConnection[Any],
    srvid: int,
    fetching: asyncio.Task[tuple[ServerInfo, list[Staged]]],
    stream: _Stream,
    result: SnapshotResult,
    hold: float,
) -> bool:
    """Take the snapshot in one transaction opened before the fetch is over.

    Nothing is held until the streamed source's first rows arrive.  Then, if
    the snapshot lock is free, the transaction opens and they go in as they
    come.  Return False (the transaction, if any, rolled back) when there is
    nothing to stream, the fetch is over by then, the lock is taken, the
    fetch is not over within ``hold`` seconds of taking it, or anything went
    wrong with the streamed rows (see _stream_rows): the caller then stores
    as usual, from the spools, which hold every row.
    """
    await stream.ready.wait()
    spool = stream.spool
    if spool is None:
        return False
    while not stream.done and not (not spool.closed and spool.tell()):
        stream.more.clear()
        await stream.more.wait()
    if stream.done:
        return False
    try:
        async with repo.transaction():
            try:
                cur = await repo.execute("SELECT pgfleet.snapshot_try_lock()")
            except psycopg.errors.UndefinedFunction:
                raise _GiveUp("a repository older than migration 0007") from None
            row = await cur.fetchone()
            if not row or not row[0]:
                raise _GiveUp("the snapshot lock is taken")
            t = time.perf_counter()
            await _stream_rows(repo, stream, fetching, t + hold, result)
            info, staged = fetching.result()
            t2 = time.perf_counter()
            result.phases["stream"] = t2 - t
            assert stream.source is not None  # it has a spool
            await store(
                repo, srvid, info, staged, result, preloaded=frozenset({stream.source.module})
            )
            commit = time.perf_counter()
        result.phases["commit"] = result.phases.get("commit", 0.0) + time.perf_counter() - commit
        result.store_seconds = time.perf_counter() - t2
    except _GiveUp:
        result.phases.pop("stream", None)
        return False
    return True


async def _wait_for(event: asyncio.Event, deadline: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), max(0.0, deadline - time.perf_counter()))
    except TimeoutError:
        raise _GiveUp("the server is slow") from None


async def _stream_rows(
    repo: psycopg.AsyncConnection[Any],
    stream: _Stream,
    fetching: asyncio.Task[tuple[ServerInfo, list[Staged]]],
    deadline: float,
    result: SnapshotResult,
) -> None:
    """COPY the streamed source's rows into its transient table as they come.

    Return once the fetch is over and every row of the source is in.  Raise
    _GiveUp -- the caller rolls back and stores as usual, from the spools --
    if the fetch or that source failed, the repository refused the rows, or
    ``deadline`` passed.
    """
    src, spool = stream.source, stream.spool
    assert src is not None and spool is not None
    tmp = src.tmp_table
    assert tmp is not None
    sent = 0
    try:
        async with repo.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(tmp)) as cp:
            while True:
                stream.more.clear()
                # The fetch writes at the spool's end: read behind it and put
                # the position back before anything else runs.
                while not spool.closed and (end := spool.tell()) > sent:
                    if time.perf_counter() > deadline:
                        raise _GiveUp("the server is slow")
                    spool.seek(sent)
                    data = spool.read(min(end - sent, _CHUNK))
                    spool.seek(end)
                    sent += len(data)
                    await cp.write(data)
                if stream.done or spool.closed:
                    break
                await _wait_for(stream.more, deadline)
            if spool.closed:  # the source failed: fetch() closed its spool
                raise _GiveUp("the source failed")
            await asyncio.wait({fetching})
            if fetching.cancelled() or fetching.exception() is not None:
                raise _GiveUp("the fetch failed")
            _, staged = fetching.result()
            if spool.closed or spool.tell() != sent or all(st.spool is not spool for st in staged):
                raise _GiveUp("the source's rows are not what was sent")
    except psycopg.Error as e:
        if repo.broken:
            raise
        # store() meets the same rows again, from the spool, and records why.
        raise _GiveUp(f"the repository refused the rows: {first_line(e)}") from None
    result.rows += max(cp.cursor.rowcount, 0)


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
