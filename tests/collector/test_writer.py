"""The daemon's writer in-process, against a real repository: order and lost leases.

The real Writer, Spool, Leases, RepositoryLink and Stats, as the daemon
wires them; no monitored server: each snapshot is one row of a small user
source (``seq``), written in COPY text format by hand, whose snapshot
function appends it to a history table.  The history's serial id is the
order the repository stored the snapshots in; ``n`` is the order they were
taken in.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from pgfleet.collector.lease import Leases
from pgfleet.collector.link import RepositoryLink
from pgfleet.collector.spool import Spool
from pgfleet.collector.stats import Stats
from pgfleet.collector.writer import Outcome, Ticket, Writer
from pgfleet.repository import servers
from pgfleet.repository.servers import Server
from pgfleet.snapshot.model import RegisteredSource, ServerInfo, SnapshotResult, Staged

# A user source by the datasource contract: rows staged in <query_source>_tmp
# (srvid first), stored by its snapshot function.
REPOSITORY_SQL = """
CREATE UNLOGGED TABLE public.seq_src_tmp (
    srvid integer NOT NULL, ts timestamptz NOT NULL, n integer NOT NULL);
CREATE TABLE public.seq_history (
    id bigserial PRIMARY KEY, srvid integer NOT NULL, ts timestamptz NOT NULL,
    n integer NOT NULL, stored_at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION public.seq_snapshot(_srvid integer) RETURNS void LANGUAGE sql AS $$
    INSERT INTO public.seq_history (srvid, ts, n)
    SELECT srvid, ts, n FROM public.seq_src_tmp WHERE srvid = _srvid;
$$;
INSERT INTO pgfleet.functions (module, operation, function_name, query_source, added_manually)
VALUES ('seq', 'snapshot', 'public.seq_snapshot', 'public.seq_src', true);
"""
SOURCE = RegisteredSource("seq", "public.seq_src", None, True, 10)
INFO = ServerInfo(180000, False, frozenset(), ("postgres",))
T0 = time.time()

Conn = psycopg.AsyncConnection[Any]


@dataclass
class Collector:
    """One collector's writer, wired as the daemon wires it."""

    writer: Writer
    link: RepositoryLink
    spool: Spool
    leases: Leases
    stats: Stats
    lost: list[int] = field(default_factory=list)


def setup(repo: str, *aliases: str) -> list[Server]:
    """The ``seq`` source in the repository, and servers nobody connects to."""
    with psycopg.connect(repo, autocommit=True) as conn:
        conn.execute(REPOSITORY_SQL)
        return [servers.add(conn, alias, host="mon.invalid") for alias in aliases]


def collector(dsn: str, spool_dir: Path, owner: str, *, period: float = 60) -> Collector:
    spool = Spool(spool_dir, 10 * 2**20)
    spool.open()
    link = RepositoryLink(dsn, "writer", application_name="test", statement_timeout=10)
    leases, stats = Leases(owner, period), Stats()
    lost: list[int] = []
    writer = Writer(link, spool, leases, stats, store_timeout=10, on_lease_lost=lost.append)
    return Collector(writer, link, spool, leases, stats, lost)


def refused(tmp_path: Path) -> str:
    """A repository DSN that refuses at once: a socket directory with no server."""
    return f"host={tmp_path} port=1 dbname=nothing connect_timeout=2"


async def take(c: Collector, server: Server, n: int) -> Outcome:
    """Submit snapshot number ``n`` of ``server``, as a worker does."""
    taken_at = T0 + n
    ts = datetime.fromtimestamp(taken_at, UTC).isoformat()
    buf = io.BytesIO(f"{server.srvid}\t{ts}\t{n}\n".encode())
    buf.seek(0, io.SEEK_END)
    staged = [Staged(SOURCE, buf)]
    try:
        result = SnapshotResult(server.alias, server.srvid)
        return await c.writer.submit(server, taken_at, INFO, staged, result, Ticket())
    finally:
        buf.close()


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 15) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await condition():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None


async def history(conn: Conn, srvid: int) -> list[tuple[int, datetime, datetime]]:
    """(n, ts, stored_at) of a server's stored snapshots, in the order they were stored."""
    cur = await conn.execute(
        "SELECT n, ts, stored_at FROM public.seq_history WHERE srvid = %s ORDER BY id", (srvid,)
    )
    return list(await cur.fetchall())


async def state(conn: Conn, srvid: int) -> tuple[int, datetime | None, int | None] | None:
    cur = await conn.execute(
        "SELECT snapshots, last_snapshot, server_version_num FROM pgfleet.snapshot_state"
        " WHERE srvid = %s",
        (srvid,),
    )
    row = await cur.fetchone()
    return None if row is None else (row[0], row[1], row[2])


def run(repo: str, c: Collector, test: Callable[[Conn], Awaitable[None]]) -> None:
    """Run ``test`` with the writer's replay task going and a control connection."""

    async def main() -> None:
        replay = asyncio.create_task(c.writer.replay())
        try:
            async with (
                asyncio.timeout(30),
                await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn,
            ):
                await test(conn)
        finally:
            replay.cancel()
            await asyncio.gather(replay, return_exceptions=True)
            await c.link.close()
            c.spool.close()

    asyncio.run(main())


def test_spooled_snapshots_are_stored_in_the_order_taken(repo: str, tmp_path: Path) -> None:
    """Snapshots spooled during an outage reach the repository oldest first,
    and a newer one never overtakes them, even once the repository is back."""
    a, b = setup(repo, "a", "b")
    c = collector(refused(tmp_path), tmp_path / "spool", "me")

    async def test(conn: Conn) -> None:
        await c.leases.round(conn, {a.srvid, b.srvid})
        # The repository is unreachable: both snapshots are kept.
        assert await take(c, a, 1) == Outcome.SPOOLED
        assert await take(c, a, 2) == Outcome.SPOOLED
        assert c.spool.count(a.srvid) == 2
        # It is back (and the first lease round said which leases are ours).
        c.link.dsn = repo
        c.link.retry_now()
        await c.link.connection()
        assert c.link.up
        # A server with nothing spooled is stored straight away...
        assert await take(c, b, 1) == Outcome.STORED
        # ...but one with older snapshots waiting goes behind them.
        assert await take(c, a, 3) == Outcome.SPOOLED
        assert await history(conn, a.srvid) == []
        c.writer.ready = True
        c.writer.kick.set()

        async def replayed() -> bool:
            return not len(c.spool)

        await until(replayed, "the spool to be replayed")
        rows = await history(conn, a.srvid)
        assert [n for n, _, _ in rows] == [1, 2, 3]
        assert [ts for _, ts, _ in rows] == sorted({ts for _, ts, _ in rows})
        stored_at = [at for _, _, at in rows]
        assert stored_at == sorted(set(stored_at)), "one transaction per snapshot, in order"
        assert await state(conn, a.srvid) == (3, stored_at[-1], INFO.version_num)
        assert c.stats.get("a", "spool", "spooled") == 3
        assert c.stats.get("a", "spool", "replayed") == 3
        assert c.lost == []

    run(repo, c, test)


def test_a_snapshot_taken_during_replay_waits_its_turn(repo: str, tmp_path: Path) -> None:
    """A snapshot submitted while its server's spool is being replayed is
    stored after every older one, not between them."""
    (a,) = setup(repo, "a")
    c = collector(refused(tmp_path), tmp_path / "spool", "me")

    async def test(conn: Conn) -> None:
        await c.leases.round(conn, {a.srvid})
        for n in (1, 2, 3):
            assert await take(c, a, n) == Outcome.SPOOLED
        c.link.dsn = repo
        c.link.retry_now()
        # Another store holds the repository's snapshot lock: the replay
        # starts, then waits in its first store.
        async with (
            await psycopg.AsyncConnection.connect(repo, autocommit=True) as blocker,
            blocker.transaction(),
        ):
            await blocker.execute("SELECT pgfleet.snapshot_lock()")
            c.writer.ready = True
            c.writer.kick.set()

            async def replay_waits() -> bool:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND database = (SELECT oid FROM pg_database"
                    "                  WHERE datname = current_database())"
                )
                row = await cur.fetchone()
                return bool(row and row[0])

            await until(replay_waits, "the replay to wait for the snapshot lock")
            fresh = asyncio.create_task(take(c, a, 4))
            done, _ = await asyncio.wait({fresh}, timeout=0.3)
            assert not done, "a fresh snapshot went past a replay in progress"
        assert await fresh == Outcome.SPOOLED

        async def stored_all() -> bool:
            return len(await history(conn, a.srvid)) == 4

        await until(stored_all, "four snapshots stored")
        assert [n for n, _, _ in await history(conn, a.srvid)] == [1, 2, 3, 4]
        assert not len(c.spool)
        assert c.stats.get("a", "spool", "replayed") == 4

    run(repo, c, test)


def test_lost_lease_drops_the_snapshot(repo: str, tmp_path: Path) -> None:
    """A collector whose lease expired and was taken stores nothing more of
    that server: its snapshot is dropped, counted, and the daemon told."""
    (a,) = setup(repo, "a")
    period = 1.0
    c = collector(repo, tmp_path / "spool", "me", period=period)
    other = Leases("other", period)

    async def test(conn: Conn) -> None:
        assert (await c.leases.round(conn, {a.srvid})).owned == {a.srvid}
        assert await take(c, a, 1) == Outcome.STORED
        # "me" stops renewing (stalled, cut off...); another collector takes over.
        await asyncio.sleep(period + 0.3)
        assert (await other.round(conn, {a.srvid})).owned == {a.srvid}

        assert await take(c, a, 2) == Outcome.DROPPED
        assert c.lost == [a.srvid]
        assert c.stats.get("a", "lease", "lost") == 1
        assert not len(c.spool) and c.stats.get("a", "spool", "spooled") == 0
        assert [n for n, _, _ in await history(conn, a.srvid)] == [1]
        state_row = await state(conn, a.srvid)
        assert state_row is not None and state_row[0] == 1

    run(repo, c, test)


def test_lost_lease_drops_what_was_spooled(repo: str, tmp_path: Path) -> None:
    """Snapshots spooled while cut off are dropped, not stored, if another
    collector took the server's lease meanwhile."""
    a, b = setup(repo, "a", "b")
    period = 1.0
    c = collector(refused(tmp_path), tmp_path / "spool", "me", period=period)
    other = Leases("other", period)

    async def test(conn: Conn) -> None:
        assert (await c.leases.round(conn, {a.srvid, b.srvid})).owned == {a.srvid, b.srvid}
        for n in (1, 2):
            assert await take(c, a, n) == Outcome.SPOOLED
        assert await take(c, b, 1) == Outcome.SPOOLED
        await asyncio.sleep(period + 0.3)
        # Another collector takes "a"; "me" is back in time to keep "b".
        assert (await other.round(conn, {a.srvid})).owned == {a.srvid}
        assert (await c.leases.round(conn, {a.srvid, b.srvid})).owned == {b.srvid}
        c.link.dsn = repo
        c.link.retry_now()
        c.writer.ready = True
        c.writer.kick.set()

        async def replayed() -> bool:
            return not len(c.spool)

        await until(replayed, "the spool to be replayed")
        assert c.lost == [a.srvid, a.srvid]
        assert c.stats.get("a", "lease", "lost") == 2
        assert c.stats.get("a", "spool", "replayed") == 0
        assert await history(conn, a.srvid) == []
        assert await state(conn, a.srvid) is None
        # The server whose lease is still ours is stored as usual.
        assert [n for n, _, _ in await history(conn, b.srvid)] == [1]
        assert c.stats.get("b", "spool", "replayed") == 1

    run(repo, c, test)
