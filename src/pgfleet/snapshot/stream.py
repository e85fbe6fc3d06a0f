"""One-shot remote snapshots (``pgfleet snapshot``), overlapping fetch and store.

The daemon fetches, then stores (its single writer would otherwise wait on
a server's fetch).  A one-shot snapshot overlaps the two when it can: when
pg_stat_statements' first rows arrive, if the repository's snapshot lock is
free, it opens the transaction and COPYs them into the transient table while
the server is still sending the rest, the other sources being spooled
meanwhile; then stores the others as usual.  It holds the lock while the
server answers for at most ``STREAM_HOLD`` seconds: past that it rolls back
(releasing the lock) and stores from the spools, which hold every row anyway.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from typing import Any

import psycopg

from pgfleet.config import CollectorConfig
from pgfleet.connections import first_line
from pgfleet.errors import ServerError
from pgfleet.repository import snapshots as q
from pgfleet.repository.servers import Server
from pgfleet.snapshot.fetch import ServerSession, fetch
from pgfleet.snapshot.model import (
    CHUNK,
    SPOOL_MEMORY,
    Failure,
    FailureKind,
    RegisteredSource,
    ServerInfo,
    SnapshotResult,
    Staged,
)
from pgfleet.snapshot.store import store

# How long a one-shot snapshot may hold the repository's snapshot lock while
# the monitored server is still answering: other stores wait for it.  A
# normal store holds it for tens of milliseconds.
STREAM_HOLD = 0.2


class Stream:
    """The source a one-shot snapshot COPYs into the repository as it arrives.

    :func:`~pgfleet.snapshot.fetch.fetch` picks it (the first built-in source
    marked ``streamed`` that runs on one connection) and gives it a
    :class:`StreamSpool`; every write into the spool sets ``more``.
    ``ready``: the pick is made (or there is none); ``done``: the fetch is
    over, whatever its outcome.
    """

    def __init__(self) -> None:
        self.source: RegisteredSource | None = None
        self.spool: StreamSpool | None = None
        self.ready = asyncio.Event()
        self.more = asyncio.Event()
        self.done = False

    def open(self, src: RegisteredSource) -> StreamSpool:
        self.source = src
        self.spool = StreamSpool(self)
        return self.spool

    def finish(self) -> None:
        self.done = True
        self.ready.set()
        self.more.set()


class StreamSpool(tempfile.SpooledTemporaryFile[bytes]):
    """A spool that says when rows were written into it."""

    def __init__(self, stream: Stream) -> None:
        super().__init__(max_size=SPOOL_MEMORY)
        self._stream = stream

    def write(self, s: Any) -> int:
        n = super().write(s)
        self._stream.more.set()
        return n


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
        sources = await q.registered_sources(repo)
        stream = Stream() if stream_hold > 0 else None
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
            await q.record_failure(
                repo, server.srvid, Failure("connection", FailureKind.CONNECT, str(e))
            )
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
    stream: Stream | None,
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
    stream: Stream,
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
                cur = await repo.execute(q.TRY_LOCK)
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
    stream: Stream,
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
    sent = 0
    try:
        async with repo.cursor().copy(q.copy_in(src)) as cp:
            while True:
                stream.more.clear()
                # The fetch writes at the spool's end: read behind it and put
                # the position back before anything else runs.
                while not spool.closed and (end := spool.tell()) > sent:
                    if time.perf_counter() > deadline:
                        raise _GiveUp("the server is slow")
                    spool.seek(sent)
                    data = spool.read(min(end - sent, CHUNK))
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
