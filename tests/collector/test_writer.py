"""The daemon's writer in-process, against a real repository: order, lost
leases and their handover, a repository refusing snapshots, stores given up
on, skewed clocks, purges.

The real Writer, Spool, Leases, RepositoryLink and Stats, as the daemon
wires them; no monitored server: each snapshot is one row of a small user
source (``seq``), written in COPY text format by hand, whose snapshot
function appends it to a history table.  The history's serial id is the
order the repository stored the snapshots in; ``n`` is the order they were
taken in.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
from tests.fix_clusters import NewCluster, NewDatabase
from tests.fix_repository import new_repository

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


def collector(
    dsn: str, spool_dir: Path, owner: str, *, period: float = 60, **writer: Any
) -> Collector:
    spool = Spool(spool_dir, 10 * 2**20)
    spool.open()
    link = RepositoryLink(dsn, "writer", application_name="test", statement_timeout=10)
    leases, stats = Leases(owner, period), Stats()
    lost: list[int] = []
    settings: dict[str, Any] = {"store_timeout": 10, **writer}
    w = Writer(link, spool, leases, stats, on_lease_lost=lost.append, **settings)
    return Collector(w, link, spool, leases, stats, lost)


def refused(tmp_path: Path) -> str:
    """A repository DSN that refuses at once: a socket directory with no server."""
    return f"host={tmp_path} port=1 dbname=nothing connect_timeout=2"


async def take(c: Collector, server: Server, n: int, *, skew: float = 0.0) -> Outcome:
    """Submit snapshot number ``n`` of ``server``, as a worker does; ``skew``:
    how far ahead the server's clock is (its rows' timestamps)."""
    taken_at = T0 + n
    ts = datetime.fromtimestamp(taken_at + skew, UTC).isoformat()
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


def run(
    repo: str, c: Collector, test: Callable[[Conn], Awaitable[None]], *others: Collector
) -> None:
    """Run ``test`` with the writers' replay tasks going and a control connection."""

    async def main() -> None:
        every = (c, *others)
        replays = [asyncio.create_task(x.writer.replay()) for x in every]
        try:
            async with (
                asyncio.timeout(60),
                await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn,
            ):
                await test(conn)
        finally:
            for t in replays:
                t.cancel()
            await asyncio.gather(*replays, return_exceptions=True)
            for x in every:
                await x.link.close()
                x.spool.close()

    asyncio.run(main())


@contextlib.asynccontextmanager
async def alive(repo: str, c: Collector, fleet: set[int]) -> AsyncIterator[None]:
    """``c``'s lease rounds every third of its period, as its daemon's fleet loop runs them."""

    async def rounds() -> None:
        async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn:
            while True:
                await c.leases.round(conn, fleet)
                c.writer.ready = True
                c.writer.kick.set()
                await asyncio.sleep(c.leases.period / 3)

    task = asyncio.create_task(rounds())
    await asyncio.sleep(0.1)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def replayed(c: Collector) -> bool:
    return not len(c.spool)


def dbname(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


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
    """A collector whose lease expired and was taken stores nothing it took
    since: its snapshot is dropped, counted, and the daemon told."""
    (a,) = setup(repo, "a")
    period = 1.0
    c = collector(repo, tmp_path / "spool", "me", period=period)
    other = collector(repo, tmp_path / "other", "other", period=period)

    async def test(conn: Conn) -> None:
        assert (await c.leases.round(conn, {a.srvid})).owned == {a.srvid}
        assert await take(c, a, 1) == Outcome.STORED
        # "me" stops renewing (stalled, cut off...); another collector,
        # alive, takes over.
        async with alive(repo, other, {a.srvid}):
            await asyncio.sleep(period + 0.5)
            assert other.leases.term(a.srvid) is not None

            assert await take(c, a, 2) == Outcome.DROPPED
        assert c.lost == [a.srvid]
        assert c.stats.get("a", "lease", "lost") == 1
        assert not len(c.spool) and c.stats.get("a", "spool", "spooled") == 0
        assert [n for n, _, _ in await history(conn, a.srvid)] == [1]
        state_row = await state(conn, a.srvid)
        assert state_row is not None and state_row[0] == 1

    run(repo, c, test, other)


def test_a_taken_over_server_gets_what_was_taken_before_the_takeover(
    repo: str, tmp_path: Path
) -> None:
    """A collector cut off alone loses its lease to another.  What it spooled
    before the takeover is still stored when it is back, and before anything
    of the new owner's, who keeps its own snapshots meanwhile; what it took
    after the takeover is dropped: the new owner has those moments."""
    a, b = setup(repo, "a", "b")
    period = 1.0
    me = collector(refused(tmp_path), tmp_path / "spool", "me", period=period)
    other = collector(repo, tmp_path / "other", "other", period=period)

    async def test(conn: Conn) -> None:
        assert (await me.leases.round(conn, {a.srvid})).owned == {a.srvid}
        for n in (1, 2):
            assert await take(me, a, n) == Outcome.SPOOLED
        async with alive(repo, other, {a.srvid, b.srvid}):

            async def taken() -> bool:
                return other.leases.term(a.srvid) is not None

            await until(taken, "the other collector to take the lease")
            # Still cut off, "me" takes one more: after the takeover.
            assert await take(me, a, 3) == Outcome.SPOOLED
            # The new owner keeps its own for now: "me" may still come back.
            assert await take(other, a, 4) == Outcome.SPOOLED
            assert other.stats.get("a", "lease", "waited") == 1
            assert await take(other, b, 1) == Outcome.STORED
            assert await take(other, a, 5) == Outcome.SPOOLED
            # "me" is back.
            me.link.dsn = repo
            me.link.retry_now()
            async with alive(repo, me, {a.srvid, b.srvid}):
                await until(lambda: replayed(me), "the old owner's spool to be replayed")
                await until(lambda: replayed(other), "the new owner's spool to be replayed")
            assert await take(other, a, 6) == Outcome.STORED
        assert [n for n, _, _ in await history(conn, a.srvid)] == [1, 2, 4, 5, 6]
        assert me.stats.get("a", "lease", "handover") == 2
        assert me.stats.get("a", "lease", "lost") == 1
        assert me.lost == [a.srvid]
        assert other.stats.get("a", "spool", "replayed") == 2
        assert other.lost == []

    run(repo, me, test, other)


def test_a_read_only_repository_keeps_every_snapshot(repo: str, tmp_path: Path) -> None:
    """Read-only (the database's default, a standby...), the repository
    refuses every store: each snapshot is kept, the repository asked again
    after a growing pause, not at every snapshot, and once it is writable
    again, every snapshot is stored, in order."""
    a, b = setup(repo, "a", "b")
    c = collector(repo, tmp_path / "spool", "me")
    db = dbname(repo)

    async def test(conn: Conn) -> None:
        await c.leases.round(conn, {a.srvid, b.srvid})
        c.writer.ready = True
        assert await take(c, a, 1) == Outcome.STORED
        await conn.execute(f"ALTER DATABASE {db} SET default_transaction_read_only = on")
        # The writer's session was writable when it began: make it a new one.
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'test (writer)'"
        )
        outcomes = []
        for n in range(2, 14):
            outcomes.append(await take(c, a, n))
            outcomes.append(await take(c, b, n))
            await asyncio.sleep(0.25)
        assert set(outcomes) == {Outcome.SPOOLED}
        assert c.spool.count(a.srvid) == 12 and c.spool.count(b.srvid) == 12
        # Asked a handful of times in 3 s (1, 2 s... apart), not 24.
        asked = c.stats.get("a", "repository", "kept") + c.stats.get("b", "repository", "kept")
        assert 1 <= asked <= 4, asked
        assert c.stats.get("", "spool", "dropped") == 0
        assert [n for n, _, _ in await history(conn, a.srvid)] == [1]
        await conn.execute(f"ALTER DATABASE {db} RESET default_transaction_read_only")
        await until(lambda: replayed(c), "the spool to be replayed", timeout=20)
        for srv, first in ((a, 1), (b, 2)):
            rows = await history(conn, srv.srvid)
            assert [n for n, _, _ in rows] == list(range(first, 14))
            stored_at = [at for _, _, at in rows]
            assert stored_at == sorted(set(stored_at))
        assert c.stats.get("", "spool", "dropped") == 0
        assert c.lost == []

    run(repo, c, test)


def test_refused_rows_drop_their_snapshot_alone(repo: str, tmp_path: Path) -> None:
    """A snapshot whose rows the repository refuses for good (a constraint)
    is dropped and counted, fresh or spooled; the others are stored, in order."""
    (a,) = setup(repo, "a")
    with psycopg.connect(repo, autocommit=True) as conn:
        conn.execute(
            """CREATE FUNCTION public.no_13() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                   IF NEW.n % 13 = 0 THEN
                       RAISE EXCEPTION 'no 13' USING ERRCODE = 'check_violation';
                   END IF;
                   RETURN NULL;
               END $$;
               CREATE CONSTRAINT TRIGGER no_13 AFTER INSERT ON public.seq_history
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.no_13()"""
        )
    c = collector(refused(tmp_path), tmp_path / "spool", "me")

    async def test(conn: Conn) -> None:
        await c.leases.round(conn, {a.srvid})
        for n in (12, 13, 14):
            assert await take(c, a, n) == Outcome.SPOOLED
        c.link.dsn = repo
        c.link.retry_now()
        c.writer.ready = True
        c.writer.kick.set()
        await until(lambda: replayed(c), "the spool to be replayed")
        assert await take(c, a, 26) == Outcome.DROPPED
        assert await take(c, a, 27) == Outcome.STORED
        assert [n for n, _, _ in await history(conn, a.srvid)] == [12, 14, 27]
        assert c.stats.get("", "spool", "dropped") == 1
        assert c.stats.get("a", "repository", "refused") == 2

    run(repo, c, test)


def test_a_store_given_up_on_that_committed_is_not_stored_again(
    new_cluster: NewCluster, new_database: NewDatabase, tmp_path: Path
) -> None:
    """The collector stops waiting for a store whose COMMIT the repository
    carries out anyway (here: it waits for a synchronous standby that is not
    there, and commits locally when the wait is cancelled).  The snapshot is
    spooled, as it may not have gone in; replayed, it is recognised by its
    key and not stored twice."""
    cluster = new_cluster("sync_commit", settings={"synchronous_commit": "on"})
    repo = new_repository(cluster, new_database)
    (a,) = setup(repo, "a")
    c = collector(repo, tmp_path / "spool", "me", store_timeout=0.5, client_margin=1.0)

    async def test(conn: Conn) -> None:
        await conn.execute("SET synchronous_commit = local")
        await c.leases.round(conn, {a.srvid})
        c.writer.ready = True
        assert await take(c, a, 1) == Outcome.STORED
        await conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        await conn.execute("SELECT pg_reload_conf()")
        await asyncio.sleep(0.3)
        try:
            assert await take(c, a, 2) == Outcome.SPOOLED
        finally:
            await conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
            await conn.execute("SELECT pg_reload_conf()")
        await until(lambda: replayed(c), "the spool to be replayed", timeout=20)
        assert [n for n, _, _ in await history(conn, a.srvid)] == [1, 2]
        assert c.stats.get("a", "spool", "duplicate") == 1
        assert c.stats.get("a", "spool", "replayed") == 0
        assert await take(c, a, 3) == Outcome.STORED
        assert [n for n, _, _ in await history(conn, a.srvid)] == [1, 2, 3]

    run(repo, c, test)


def test_a_skewed_server_clock_is_brought_to_the_repository(repo: str, tmp_path: Path) -> None:
    """A server whose clock is two hours behind: its rows are stored at the
    repository's time (retention would purge them at once otherwise); one
    within a minute is stored as it came."""
    (a,) = setup(repo, "a")
    c = collector(repo, tmp_path / "spool", "me")

    async def test(conn: Conn) -> None:
        await c.leases.round(conn, {a.srvid})
        assert await take(c, a, 1, skew=-7200) == Outcome.STORED
        assert await take(c, a, 2, skew=30) == Outcome.STORED
        rows = await history(conn, a.srvid)
        assert abs(rows[0][1].timestamp() - (T0 + 1)) < 5
        assert abs(rows[1][1].timestamp() - (T0 + 2 + 30)) < 0.001
        assert c.stats.get("a", "clock", "clamped") == 1
        assert 7190 < c.stats.gauges()[("a", "clock", "clamp_seconds")] < 7210

    run(repo, c, test)


def test_purges_come_on_time(repo: str, tmp_path: Path) -> None:
    """A server whose aggregates are far apart is purged every purge_interval."""
    (a,) = setup(repo, "a")
    with psycopg.connect(repo, autocommit=True) as conn:
        conn.execute(
            """CREATE TABLE public.seq_purges (srvid integer, at timestamptz);
               CREATE FUNCTION public.seq_purge(_srvid integer) RETURNS void LANGUAGE sql AS $$
                   INSERT INTO public.seq_purges VALUES (_srvid, now());
               $$;
               INSERT INTO pgfleet.functions (module, operation, function_name)
               VALUES ('seq', 'purge', 'public.seq_purge')"""
        )
    c = collector(repo, tmp_path / "spool", "me", purge_interval=0.3)

    async def test(conn: Conn) -> None:
        await c.leases.round(conn, {a.srvid})
        for n in range(1, 5):
            assert await take(c, a, n) == Outcome.STORED
            await asyncio.sleep(0.4)
        stored_at = [at for _, _, at in await history(conn, a.srvid)]
        cur = await conn.execute("SELECT at FROM public.seq_purges")
        purged = {r[0] for r in await cur.fetchall()}
        assert set(stored_at[1:]) <= purged
        cur = await conn.execute(
            "SELECT last_purge = last_snapshot FROM pgfleet.snapshot_state WHERE srvid = %s",
            (a.srvid,),
        )
        assert await cur.fetchone() == (True,)

    run(repo, c, test)
