"""libpq through psycopg's generators: the one module that touches psycopg internals.

psycopg's public async API awaits once per COPY row and once per statement.
A snapshot moves thousands of rows through a handful of statements, so both
ends drive libpq directly: a multi-statement query whose ``COPY ... TO
STDOUT`` results are drained into spools (:func:`copy_batch`), or whose
``COPY ... FROM STDIN`` are fed from spools (:func:`run_script`), each within
one ``conn.wait()``, handing control to the event loop only when libpq has
to wait for the network.  That halves the collector's CPU per snapshot.

It relies on ``conn.lock``, ``conn.wait``, ``conn.pgconn``,
``conn._notifies_backlog``, ``psycopg.generators.notifies`` and
``Copy._read_gen``: a psycopg upgrade must run the tests.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import IO, Any

import psycopg
from psycopg import pq, sql
from psycopg.abc import Buffer, PQGen
from psycopg.generators import notifies as _notifies
from psycopg.pq.abc import PGconn, PGresult
from psycopg.waiting import Ready, Wait

from pgfleet.snapshot.model import CHUNK


async def copy_out(
    conn: psycopg.AsyncConnection[Any], stmt: sql.Composed, spool: IO[bytes]
) -> None:
    """Run one ``COPY ... TO STDOUT`` into ``spool``."""
    async with conn.cursor().copy(stmt) as copy:
        read_gen = getattr(copy, "_read_gen", None)
        if read_gen is None:  # psycopg changed its internals: the public, slower way
            async for data in copy:
                spool.write(data)
        else:
            await conn.wait(_drain(read_gen, spool))


def _drain(read_gen: Callable[[], PQGen[Buffer]], out: IO[bytes]) -> PQGen[None]:
    """Write every row of a COPY TO into ``out`` within one ``conn.wait()``."""
    while data := (yield from read_gen()):
        out.write(data)


async def copy_batch(
    conn: psycopg.AsyncConnection[Any], query: bytes, outs: list[IO[bytes]]
) -> tuple[list[float], psycopg.Error | None]:
    """Run ``query`` (``COPY ... TO STDOUT`` statements, or ``SELECT``s of one
    COPY-text value) and write the n-th's rows into ``outs[n]``.

    The statements run in order in one implicit transaction: after an error
    the rest are skipped.  Return the seconds each completed statement took
    (as many as completed) and the first error.
    """
    marks = [time.perf_counter()]
    async with conn.lock:
        error = await conn.wait(_copy_many(conn.pgconn, query, outs, marks, conn.info.encoding))
    return [b - a for a, b in itertools.pairwise(marks)], error


def _copy_many(
    pgconn: PGconn, query: bytes, outs: list[IO[bytes]], marks: list[float], encoding: str
) -> PQGen[psycopg.Error | None]:
    """Send ``query`` and drain the n-th COPY into ``outs[n]``, by the chunk.

    Every result is read to the end (libpq's rule for a multi-statement
    query), errors included.
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
                    if size >= CHUNK:
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
        elif status == pq.ExecStatus.TUPLES_OK:
            # A source's rows aggregated by the server into one COPY-text
            # value (see fetch.agg_stmt): one call, whatever the row count.
            value = res.get_value(0, 0) if res.ntuples else None
            if value is not None:
                outs[done].write(value)
                outs[done].write(b"\n")
            done += 1
            marks.append(time.perf_counter())
        elif error is None:
            error = _error(res, encoding)
    return error


async def run_script(
    conn: psycopg.AsyncConnection[Any], query: bytes, spools: list[IO[bytes]]
) -> tuple[list[PGresult], psycopg.Error | None]:
    """Send ``query``, feed the n-th ``COPY FROM STDIN`` from ``spools[n]``.

    Return the result of each statement that completed, in order, and the
    error that stopped the others, if any.
    """
    async with conn.lock:
        return await conn.wait(_script(conn.pgconn, query, spools, conn.info.encoding))


def _script(
    pgconn: PGconn, query: bytes, spools: list[IO[bytes]], encoding: str
) -> PQGen[tuple[list[PGresult], psycopg.Error | None]]:
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
            while chunk := spool.read(CHUNK):
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
            error = _error(res, encoding)
    return results, error


def _error(res: PGresult, encoding: str) -> psycopg.Error:
    if res.status == pq.ExecStatus.FATAL_ERROR:
        return psycopg.errors.error_from_result(res, encoding=encoding)
    return psycopg.ProgrammingError(f"unexpected result status {res.status}")


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


def value(res: PGresult) -> bytes | None:
    """The first column of the first row, as bytes."""
    v = res.get_value(0, 0) if res.ntuples else None
    return bytes(v) if v is not None else None


def int_value(res: PGresult) -> int:
    v = value(res)
    return int(v) if v is not None else -1


def text_rows(res: PGresult, encoding: str) -> list[list[str]]:
    """Every row of a result, as text (NULL as "")."""
    return [
        [bytes(res.get_value(i, c) or b"").decode(encoding) for c in range(res.nfields)]
        for i in range(res.ntuples)
    ]


# Seconds between two wake-ups of a connection waiting for notifications with
# nothing to read.  psycopg's own notifies() wakes every 0.1 s (to notice a
# Ctrl-C in blocking code): in an idle daemon, most of its CPU.  asyncio
# cancels a wait whatever the interval.
_LISTEN_INTERVAL = 60.0


async def notifications(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[psycopg.Notify]:
    """Every notification the connection receives, as it comes, for ever:
    psycopg's ``notifies()`` but for its wake-up interval."""
    async with conn.lock:
        enc = conn.info.encoding
        # What arrived while a query ran (the LISTEN itself) waits in
        # psycopg's backlog, which is off while we read, as notifies() does.
        backlog, conn._notifies_backlog = conn._notifies_backlog, None
        try:
            while backlog:
                yield backlog.popleft()
            while True:
                pgns = await conn.wait(_notifies(conn.pgconn), interval=_LISTEN_INTERVAL)
                for pgn in pgns:
                    yield psycopg.Notify(
                        pgn.relname.decode(enc, "replace"),
                        pgn.extra.decode(enc, "replace"),
                        pgn.be_pid,
                    )
        finally:
            conn._notifies_backlog = backlog if backlog is not None else deque()
