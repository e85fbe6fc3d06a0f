"""Step 1 of a remote snapshot: run the sources on the monitored server into spools.

Every enabled source runs -- the built-in ones from their version-gated SQL
(nothing to install on the server beyond the statistics extensions), a
user's source by calling its query_source function with 0 -- as ``COPY
(...) TO STDOUT``.  The rows stream into spools (memory, spilling to disk
past a few MB), never a Python list.  Nothing here touches the repository:
a slow server never holds repository locks.
"""

from __future__ import annotations

import asyncio
import functools
import re
import shutil
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import psycopg
from psycopg import sql

from pgfleet.config import CollectorConfig
from pgfleet.connections import connect_server, first_line
from pgfleet.datasources import EXTSCHEMA, Datasource, builtin
from pgfleet.errors import ServerError
from pgfleet.repository.servers import Server
from pgfleet.snapshot import wire
from pgfleet.snapshot.model import (
    CHUNK,
    Failure,
    FailureKind,
    RegisteredSource,
    ServerInfo,
    SnapshotResult,
    Staged,
    StreamTarget,
    mark,
    new_spool,
)

# Connection slots of a monitored server the collector leaves to its other
# clients: when it has this few free, it visits with its main connection alone.
SPARE_SLOTS = 2

# One statement, one round trip: the server's facts, its free connection slots
# (those an ordinary client may take: superuser_reserved_connections and,
# from PostgreSQL 16, reserved_connections are not for us; walsenders and
# background workers have slots of their own), and its clock.  A role
# without pg_read_all_stats sees another role's backend_type as NULL.
# Every statement sent to the server is marked as ours (see model.mark()).
_INFO = mark(
    """
SELECT pg_catalog.current_setting('server_version_num')::int,
       pg_catalog.pg_is_in_recovery(),
       ARRAY(SELECT extname::text FROM pg_catalog.pg_extension),
       ARRAY(SELECT datname::text FROM pg_catalog.pg_database
              WHERE datallowconn AND NOT datistemplate ORDER BY datname),
       pg_catalog.current_setting('max_connections')::int
         - pg_catalog.current_setting('superuser_reserved_connections')::int
         - coalesce(pg_catalog.current_setting('reserved_connections', true)::int, 0)
         - (SELECT count(*) FROM pg_catalog.pg_stat_activity
             WHERE coalesce(backend_type = 'client backend', datid IS NOT NULL))::int,
       pg_catalog.date_part('epoch', pg_catalog.clock_timestamp())
"""
)


def connection_budget(configured: int, free_slots: int | None) -> int:
    """Connections a snapshot may hold at once: ``configured``, but never so
    many that fewer than SPARE_SLOTS free slots are left to the server's
    other clients; one (the main connection alone) at worst."""
    if free_slots is None:
        return max(1, configured)
    return max(1, min(configured, 1 + free_slots - SPARE_SLOTS))


class ServerSession:
    """The connections to one monitored server.

    What always holds: at most ``budget`` connections are open at once; the
    main one (to the server's own database) is kept between snapshots; every
    other is opened for one database's visit and closed right after it.
    ``budget`` is ``[collector] max_connections_per_server``, lowered by
    :meth:`info` on a server with few free connection slots (see
    :func:`connection_budget`); at one, the main connection is closed while
    another database is visited, and opened again when next needed.

    The daemon keeps a session per server for its whole life; a one-shot
    snapshot opens one and closes it.
    """

    def __init__(self, server: Server, cfg: CollectorConfig) -> None:
        self.server = server
        self.cfg = cfg
        self.budget = max(1, cfg.max_connections_per_server)
        # From the last info(): the server's free connection slots (ours
        # excluded), and its clock minus ours in seconds (None: unknown).
        self.free_slots: int | None = None
        self.skew: float | None = None
        self._main: psycopg.AsyncConnection[Any] | None = None
        self._visiting: set[psycopg.AsyncConnection[Any]] = set()

    async def _connect(self, dbname: str) -> psycopg.AsyncConnection[Any]:
        """Open a connection: every one the session opens goes through here."""
        return await connect_server(self.server, self.cfg, dbname=dbname)

    async def conn(self) -> psycopg.AsyncConnection[Any]:
        """The main connection, opened if need be."""
        c = self._main
        if c is None or c.closed or c.broken:
            self._main = None
            if c is not None:
                await c.close()
            self._check_room()
            c = self._main = await self._connect(self.server.dbname)
        return c

    async def open(self, dbname: str) -> psycopg.AsyncConnection[Any]:
        """A connection to ``dbname`` for one visit; give it back with release()."""
        if dbname == self.server.dbname:
            return await self.conn()
        if self.budget <= 1:
            await self.close_main()
        self._check_room()
        c = await self._connect(dbname)
        self._visiting.add(c)
        return c

    async def release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The visit is over: close ``conn`` unless it is the main connection."""
        if conn in self._visiting:
            self._visiting.discard(conn)
            await conn.close()

    async def close_main(self) -> None:
        c, self._main = self._main, None
        if c is not None:
            await c.close()

    async def close(self) -> None:
        conns = list(self._visiting)
        self._visiting.clear()
        for c in conns:
            await c.close()
        await self.close_main()

    def _check_room(self) -> None:
        held = len(self._visiting) + (self._main is not None)
        # A bug of the caller's, never the server's doing: fetch() keeps to it.
        assert held < self.budget, f"{held} connections open, budget {self.budget}"

    async def info(self) -> ServerInfo:
        c = await self.conn()
        before = time.time()
        cur = await c.execute(_INFO)
        row = await cur.fetchone()
        after = time.time()
        assert row is not None
        self.free_slots = row[4]
        self.budget = connection_budget(self.cfg.max_connections_per_server, row[4])
        # The server read its clock between our sending and our receiving.
        self.skew = None if row[5] is None else float(row[5]) - (before + after) / 2
        return ServerInfo(row[0], row[1], frozenset(row[2]), tuple(row[3]))


def plan_builtin(
    ds: Datasource, info: ServerInfo, *, anywhere: bool = False
) -> tuple[str | None, str | None]:
    """Return (sql, None) to run the source, or (None, reason) to skip it.

    ``anywhere``: the source's extension may be in any database of the
    server, not only the one ``info`` was read in (a remote snapshot visits
    them: see fetch()).
    """
    query = ds.query_for(info.version_num)
    if query is None:
        return None, f"not available on PostgreSQL {info.version_num // 10000}"
    if ds.extension and ds.extension not in info.extensions and not anywhere:
        return None, f"extension {ds.extension} is not installed"
    if info.in_recovery and not ds.on_standby:
        return None, "not applicable on a standby"
    return query, None


def needs_schemas(query: str) -> bool:
    return "@extschema:" in query


async def extension_schemas(conn: psycopg.AsyncConnection[Any]) -> dict[str, str]:
    """Each extension of the connection's database, and its schema as an identifier."""
    cur = await conn.execute(
        mark(
            """SELECT e.extname::text, pg_catalog.quote_ident(n.nspname::text)
                 FROM pg_catalog.pg_extension e
                 JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace"""
        )
    )
    return {name: schema for name, schema in await cur.fetchall()}


def qualify(query: str, schemas: Mapping[str, str]) -> str | None:
    """``query`` with every ``@extschema:NAME@`` replaced by NAME's schema;
    None when one of those extensions is not in ``schemas`` (not installed
    in that database)."""
    missing = False

    def schema(m: re.Match[str]) -> str:
        nonlocal missing
        found = schemas.get(str(m[1]))
        if found is None:
            missing = True
            return m[0]
        return found

    out = EXTSCHEMA.sub(schema, query)
    return None if missing else out


# The SELECT too: with pg_stat_statements.track = all it is counted on its own.
_COPY = mark("COPY (" + mark("SELECT {}::integer AS srvid, * FROM ({}) s") + ") TO STDOUT")


def _copy_stmt(srvid: int, query: sql.Composable) -> sql.Composed:
    return sql.SQL(_COPY).format(sql.Literal(srvid), query)


# Types whose text may hold a backslash, tab, newline or carriage return,
# which COPY's text format escapes; numbers, timestamps, LSNs... never do.
_ESCAPED = frozenset({"text", "name", "bytea", "json", "jsonb", "character varying", "varchar"})
# E'' strings: the same whatever the server's standard_conforming_strings.
_NULL = sql.SQL(r"E'\\N'")


def _field(name: str, type_: str) -> sql.Composable:
    if type_ in ("boolean", "bool"):
        # As COPY writes them (a cast to text says true/false).
        return sql.SQL("CASE s.{} WHEN true THEN 't' WHEN false THEN 'f' ELSE {} END").format(
            sql.Identifier(name), _NULL
        )
    col = sql.SQL("s.{}::pg_catalog.text").format(sql.Identifier(name))
    if type_ in _ESCAPED or type_.endswith("[]"):
        col = sql.SQL(
            r"pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(pg_catalog.replace("
            r"{}, E'\\', E'\\\\'), E'\n', E'\\n'), E'\r', E'\\r'), E'\t', E'\\t')"
        ).format(col)
    return sql.SQL("COALESCE({}, {})").format(col, _NULL)


@functools.cache
def _agg_template(module: str) -> str:
    """A built-in source's rows as one COPY-text value, made by the server (see agg_stmt)."""
    ds = builtin()[module]
    fields = [_field("ts", "timestamptz")] + [_field(c.name, c.type) for c in ds.columns]
    # concat_ws builds each row in one allocation (|| makes one per column);
    # no field is NULL, which it would skip.
    return (
        sql.SQL(
            mark(
                "SELECT pg_catalog.string_agg(pg_catalog.concat_ws(E'\\t', {{srvid}}, {}), E'\\n')"
                " FROM ({{query}}) s"
            )
        )
        .format(sql.SQL(", ").join(fields))
        .as_string(None)
    )


def agg_stmt(srvid: int, ds: Datasource, query: str) -> sql.Composed:
    """The same rows as ``_copy_stmt``, in COPY's text format, as ONE value.

    A ``COPY ... TO STDOUT`` sends each row as its own message, which the
    collector handles one by one in Python: ~1 microsecond a row, so a server
    with 2,000 statements, 500 tables and 1,000 indexes cost more CPU in the
    collector than all the rest of a snapshot.  Here the server formats each
    row as COPY would (the text of each column, ``\\N`` for NULL, backslash
    escapes in the types that may need them) and joins them: one value
    per source, written to the spool as it comes.  The column order is the
    transient table's (``ts``, then the datasource's columns), as the
    datasource tests check.
    """
    return sql.SQL(_agg_template(ds.module)).format(
        srvid=sql.Literal(str(srvid)), query=sql.SQL(query)
    )


def source_failure(module: str, e: psycopg.Error, cfg: CollectorConfig) -> Failure:
    """What a source's query failing on the server means."""
    if isinstance(e, psycopg.errors.QueryCanceled):
        return Failure(
            module,
            FailureKind.TIMEOUT,
            f"timed out after {cfg.statement_timeout:g} s (cancelled on the server)",
        )
    if isinstance(e, psycopg.errors.InsufficientPrivilege):
        return Failure(module, FailureKind.QUERY, f"permission denied: {first_line(e)}")
    return Failure(module, FailureKind.QUERY, first_line(e))


def _lost(session: ServerSession, e: BaseException) -> ServerError:
    return ServerError(f"server {session.server.alias!r}: connection lost: {first_line(e)}")


@dataclass
class _Job:
    """One built-in source's query on one database's connection."""

    src: RegisteredSource
    ds: Datasource
    query: str
    db: str
    spool: IO[bytes]
    # A per-database source loses only this database when it cannot be reached.
    per_database: bool
    # Read as the rows come (a one-shot snapshot's stream): a COPY, row by row.
    streamed: bool = False
    # A cluster-wide source whose extension is not in the main database: run
    # in the first other database found to have it (see fetch()).
    roaming: bool = False
    # Not run here: the extension is not in this database (or a roaming
    # source ran in another one).
    absent: bool = False
    # A per-database connection failure: recorded, the source still stored.
    unreachable: str | None = None
    # A query failure: the source is not stored.
    failed: Failure | None = None
    seconds: float = 0.0


async def fetch(
    session: ServerSession,
    sources: Iterable[RegisteredSource],
    result: SnapshotResult,
    *,
    stream: StreamTarget | None = None,
) -> tuple[ServerInfo, list[Staged]]:
    """Run the sources on the monitored server into spools.

    Built-in sources run as a few multi-statement batches of ``COPY ... TO
    STDOUT``, one per database connection, so that each connection pays one
    round trip, not one per source.  The main connection runs its own
    database's batch, every cluster-wide source among it, while within the
    session's budget of connections (see ServerSession) ``budget - 1`` more
    connections visit the other databases in turn, each for that database's
    per-database sources.  The cluster-wide sources stay on the main
    connection even when a visit could take them: a backend started for
    one visit reads every catalog it needs afresh, which costs more than
    the main connection's running them after its own (bench/snapshot.py's
    server, fetches alone: a median of 28 ms moved, 24 ms kept).  With a
    budget of one, the main connection's batch comes first, then the
    visits, one after the other, the main connection closed.

    A user's source, and any source with a ``query_cleanup``, runs on its
    own afterwards.  Each source's spool holds its rows in the same order as
    when they ran one by one; ``result.phases["fetch <module>"]`` has each
    source's time, ``result.phases["fetch @<db>"]`` each visit's, and
    ``result.failures`` each failure, with its kind.

    Raise ServerError when the server (its main database) cannot be reached
    or a connection is lost half-way.

    ``stream``: give the first source marked ``streamed`` (one query on one
    connection) the stream's spool, so that its rows can be read as they come.
    """
    info = await session.info()
    known = builtin()
    main = session.server.dbname
    jobs: dict[str, list[_Job]] = {}  # per source module, in database order
    alone: list[RegisteredSource] = []
    order: list[RegisteredSource] = []
    # Server-wide sources whose extension is not in the main database.
    roaming: set[str] = set()
    for src in sources:
        if src.tmp_table is None:
            result.fail(src.module, FailureKind.QUERY, "registered without a query_source function")
            continue
        ds = None if src.added_manually else known.get(src.module)
        if ds is not None:
            query, why = plan_builtin(ds, info, anywhere=not src.query_cleanup)
            if query is None:
                result.skipped.append((src.module, why or "skipped"))
                continue
            if not src.query_cleanup:
                # An extension lives in the databases it was created in:
                # PoWA's users, for one, have them in one database only.
                roams = (
                    ds.extension is not None
                    and not ds.per_database
                    and ds.extension not in info.extensions
                )
                if ds.per_database:
                    dbs = info.databases
                elif roams:
                    roaming.add(src.module)
                    dbs = tuple(db for db in info.databases if db != main)
                else:
                    dbs = (main,)
                streams = (
                    stream is not None
                    and stream.source is None
                    and ds.streamed
                    and not ds.per_database
                    and not roams
                )
                jobs[src.module] = [
                    _Job(
                        src,
                        ds,
                        query,
                        db,
                        stream.open(src) if stream is not None and streams else new_spool(),
                        ds.per_database,
                        streamed=streams,
                        roaming=roams,
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
    home = lanes.pop(main, [])
    visits = [(db, lane) for db, lane in lanes.items() if lane]
    extra = session.budget - 1
    # Roaming sources: the database each runs in, the first found to have its extension.
    claimed: dict[str, str] = {}
    staged_alone: dict[str, Staged] = {}
    todo = deque(visits)
    stop = False

    async def timed(db: str, lane: list[_Job]) -> None:
        nonlocal stop
        t0 = time.perf_counter()
        try:
            await _run_lane(session, db, lane, claimed)
        except BaseException:
            stop = True  # the snapshot is lost: visit no more databases
            raise
        finally:
            result.phases["fetch @" + db] = time.perf_counter() - t0

    async def tour() -> None:
        """Visit the databases left, one after the other, on one connection at a time."""
        while todo and not stop:
            db, lane = todo.popleft()
            await timed(db, lane)

    try:
        if extra > 0:
            runs = [tour() for _ in range(min(extra, len(visits)))]
            if home:
                runs.insert(0, timed(main, home))
            for out in await asyncio.gather(*runs, return_exceptions=True):
                if isinstance(out, BaseException):
                    raise out
        else:
            # Alone: the main connection's batch, then each database in turn
            # on a connection of its own, the main one closed meanwhile.
            if home:
                await timed(main, home)
            if todo:
                await session.close_main()
                await tour()
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
        ran = any(not j.absent and not j.unreachable for j in mine)
        # (all() of no job: a roaming source on a server with no other database.)
        if not ran and (src.module in roaming or all(j.absent for j in mine)):
            # Nowhere to run: not a server without rows (stored empty, its
            # entries would vanish).  A database that could not be reached
            # is the per-database sources' failure to report.
            ds = known[src.module]
            unreached = sum(1 for j in mine if j.unreachable)
            why = f"extension {ds.extension} is not installed in any database"
            if unreached:
                why += f" reached ({unreached} could not be)"
            result.skipped.append((src.module, why))
            for job in mine:
                job.spool.close()
            continue
        # Approximate: the server sends a batch's results as its buffer fills.
        result.phases["fetch " + src.module] = sum(j.seconds for j in mine)
        for job in mine:
            # A roaming source lost nothing in a database it could not reach:
            # it ran in another.
            if job.unreachable and not job.roaming:
                result.fail(src.module, FailureKind.CONNECT, job.unreachable)
        failed = next((j.failed for j in mine if j.failed), None)
        if failed is not None:
            result.failures.append(failed)
            for job in mine:
                job.spool.close()
            continue
        spool = mine[0].spool
        for job in mine[1:]:
            job.spool.seek(0)
            shutil.copyfileobj(job.spool, spool, CHUNK)
            job.spool.close()
        staged.append(Staged(src, spool))
    return info, staged


async def _run_lane(
    session: ServerSession, db: str, lane: list[_Job], claimed: dict[str, str]
) -> None:
    """Run one database's jobs in batches, on a connection to it.

    A database that cannot be connected to records the failure in its
    per-database jobs; the main one, with cluster-wide jobs, raises
    ServerError, as does a connection lost half-way: the snapshot is lost.
    """
    try:
        conn = await session.open(db)
    except ServerError as e:
        if any(not j.per_database and not j.roaming for j in lane):
            raise
        for job in lane:
            job.unreachable = str(e)
        return
    try:
        await _run_jobs(session, conn, lane, claimed)
    finally:
        await session.release(conn)


async def _run_jobs(
    session: ServerSession,
    conn: psycopg.AsyncConnection[Any],
    lane: list[_Job],
    claimed: dict[str, str],
) -> None:
    srvid = session.server.srvid
    pending = lane
    if any(needs_schemas(j.query) or j.ds.extension for j in lane):
        try:
            schemas = await extension_schemas(conn)
        except psycopg.Error as e:
            if conn.broken:
                raise _lost(session, e) from None
            schemas = {}
        pending = []
        for job in lane:
            resolved = qualify(job.query, schemas)
            if resolved is None or (job.ds.extension and job.ds.extension not in schemas):
                # An extension's source in a database without the extension:
                # nothing to collect there, and nothing wrong either.
                job.absent = True
                continue
            # No await between the look and the claim: one database wins.
            if job.roaming and claimed.setdefault(job.src.module, job.db) != job.db:
                job.absent = True
                continue
            job.query = resolved
            pending.append(job)
    one_by_one = False
    while pending:
        batch = pending[:1] if one_by_one else pending
        query = b";\n".join(
            (
                _copy_stmt(srvid, sql.SQL(job.query))
                if job.streamed
                else agg_stmt(srvid, job.ds, job.query)
            ).as_bytes(conn)
            for job in batch
        )
        try:
            seconds, error = await wire.copy_batch(conn, query, [j.spool for j in batch])
        except psycopg.Error as e:
            # libpq itself failed (the connection, mostly): where is unknown.
            seconds, error = [], e
            one_by_one = True
        done = len(seconds)
        for job, s in zip(batch, seconds, strict=False):
            job.seconds += s
        if error is None:
            pending = pending[len(batch) :]
            continue
        if conn.broken:
            raise _lost(session, error) from None
        if isinstance(error, psycopg.errors.SyntaxError) and done == 0 and len(batch) > 1:
            # The whole batch is parsed before any of it runs: find the culprit.
            one_by_one = True
            continue
        batch[done].failed = source_failure(batch[done].src.module, error, session.cfg)
        pending = pending[done + 1 :]


async def _fetch_alone(
    session: ServerSession,
    src: RegisteredSource,
    known: dict[str, Datasource],
    info: ServerInfo,
    result: SnapshotResult,
) -> Staged | None:
    """Run one source on its own: a user's source, or one with a cleanup query."""
    t0 = time.perf_counter()
    srvid = session.server.srvid
    spool = new_spool()
    ds = None if src.added_manually else known.get(src.module)
    conn: psycopg.AsyncConnection[Any] | None = None
    try:
        if ds is not None:
            query, _ = plan_builtin(ds, info)
            assert query is not None
            dbnames = info.databases if ds.per_database else (session.server.dbname,)
            for db in dbnames:
                try:
                    conn = await session.open(db)
                except ServerError as e:
                    # One unreachable database (e.g. connection limit)
                    # must not lose the others.
                    result.fail(src.module, FailureKind.CONNECT, str(e))
                    continue
                try:
                    here: str | None = query
                    if needs_schemas(query):
                        here = qualify(query, await extension_schemas(conn))
                    if here is None:
                        continue  # the extension is not in this database
                    await wire.copy_out(conn, _copy_stmt(srvid, sql.SQL(here)), spool)
                except psycopg.Error as e:
                    if conn.broken:
                        raise _lost(session, e) from None
                    raise
                finally:
                    await session.release(conn)
        else:
            conn = await session.conn()
            assert src.query_source is not None
            cur = await conn.execute(
                mark("SELECT to_regprocedure(%s) IS NOT NULL"), (src.query_source + "(integer)",)
            )
            row = await cur.fetchone()
            if not row or not row[0]:
                result.fail(
                    src.module,
                    FailureKind.QUERY,
                    f"function {src.query_source}(integer) does not exist on the server",
                )
                spool.close()
                return None
            *schema, name = src.query_source.split(".")
            call = sql.SQL("SELECT * FROM {}(0)").format(sql.Identifier(*schema, name))
            await wire.copy_out(conn, _copy_stmt(srvid, call), spool)
        if src.query_cleanup:
            conn = await session.conn()
            # Only its first statement is marked, if it holds several.
            await conn.execute(mark(src.query_cleanup).encode())
    except psycopg.Error as e:
        spool.close()
        if conn is not None and conn.broken:
            raise _lost(session, e) from None
        result.failures.append(source_failure(src.module, e, session.cfg))
        return None
    except BaseException:
        spool.close()
        raise
    result.phases["fetch " + src.module] = time.perf_counter() - t0
    return Staged(src, spool)
