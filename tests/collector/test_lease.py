"""Leases in-process, against a real repository: sharing, expiry, the fence,
terms and their handover, and what a repository outage changes.

Two :class:`Leases` with different owner names stand for two collectors;
each call is what the daemon's fleet loop or writer sends.  A live
collector runs a round every third of its period: :func:`alive` does so for
the one that stays up while the other stops renewing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg

from pgfleet.collector.lease import Leases, RoundResult
from pgfleet.repository import servers
from pgfleet.repository.leases import Fence

T = TypeVar("T")

Conn = psycopg.AsyncConnection[Any]


def add_servers(repo: str, *aliases: str) -> set[int]:
    """Register servers nobody will connect to (leases only need their srvids)."""
    with psycopg.connect(repo, autocommit=True) as conn:
        return {servers.add(conn, alias, host="mon.invalid").srvid for alias in aliases}


def run(repo: str, test: Callable[[Conn, Conn], Awaitable[T]]) -> T:
    """Run ``test`` with one repository connection per collector, bounded in time."""

    async def main() -> T:
        async with (
            asyncio.timeout(30),
            await psycopg.AsyncConnection.connect(repo, autocommit=True) as a,
            await psycopg.AsyncConnection.connect(repo, autocommit=True) as b,
        ):
            return await test(a, b)

    return asyncio.run(main())


async def held(leases: Leases, conn: Conn, srvid: int) -> bool:
    """The fence as the writer asks it: inside a transaction."""
    async with conn.transaction():
        return await leases.held(conn, srvid)


def shape(r: RoundResult) -> tuple[set[int], int, int]:
    """What a round says: the leases held, the fair share, the live collectors."""
    return set(r.owned), r.share, r.collectors


async def owners(conn: Conn) -> dict[int, str]:
    cur = await conn.execute("SELECT srvid, owner FROM pgfleet.collector_leases")
    return {srvid: owner for srvid, owner in await cur.fetchall()}


async def alive(leases: Leases, conn: Conn, fleet: set[int], seconds: float) -> RoundResult:
    """Be a live collector for ``seconds``: a round every third of the period."""
    deadline = time.monotonic() + seconds
    while True:
        r = await leases.round(conn, fleet)
        left = deadline - time.monotonic()
        if left <= 0:
            return r
        await asyncio.sleep(min(leases.period / 3, left))


async def fence(leases: Leases, conn: Conn, srvid: int, term: int | None, taken: float) -> Fence:
    """The fence as the writer asks it, in a transaction of its own (committed)."""
    async with conn.transaction():
        return await leases.fence(conn, srvid, term, taken)


async def repository_now(conn: Conn) -> float:
    cur = await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
    row = await cur.fetchone()
    assert row is not None
    return float(row[0])


def test_two_collectors_share_the_fleet_fairly(repo: str) -> None:
    """A second collector gets its share once the first gives back its excess."""
    fleet = add_servers(repo, "s1", "s2", "s3", "s4", "s5")
    first, second = Leases("first", 60), Leases("second", 60)

    async def test(a: Conn, b: Conn) -> None:
        # Alone, the first collector takes the whole fleet.
        r = await first.round(a, fleet)
        assert shape(r) == (fleet, 5, 1)
        # The second one joins: its share is half, rounded up, but nothing is free.
        r = await second.round(b, fleet)
        assert shape(r) == (set(), 3, 2)
        # The first keeps what it holds until it gives back what is above its
        # share (as the daemon does once those servers' snapshots stopped)...
        r = await first.round(a, fleet)
        assert shape(r) == (fleet, 3, 2)
        excess = set(sorted(r.owned)[r.share :])
        await first.release(a, excess)
        # ...and the second takes them at its next round.
        r = await second.round(b, fleet)
        assert r.owned == excess
        # Stable from then on: each renews its own, none is taken twice.
        for _ in range(2):
            mine = (await first.round(a, fleet)).owned
            theirs = (await second.round(b, fleet)).owned
            assert mine == fleet - excess and theirs == excess
        assert await owners(a) == {
            **{s: "first" for s in fleet - excess},
            **{s: "second" for s in excess},
        }
        # Leaving cleanly hands everything over at once.
        await first.leave(a, set())
        r = await second.round(b, fleet)
        assert shape(r) == (fleet, 5, 1)

    run(repo, test)


def test_an_abandoned_lease_expires_and_moves(repo: str) -> None:
    """A collector that stops renewing loses its servers after one period."""
    fleet = add_servers(repo, "s1", "s2")
    period = 1.0
    gone, other = Leases("gone", period), Leases("other", period)

    async def test(a: Conn, b: Conn) -> None:
        assert (await gone.round(a, fleet)).owned == fleet
        # Within the period the leases are still taken.
        assert not (await other.round(b, fleet)).owned
        # "gone" stops renewing; once the period is over, the leases are free.
        r = await alive(other, b, fleet, period + 0.3)
        assert r.owned == fleet and r.collectors == 1
        for srvid in fleet:
            assert await held(other, b, srvid)
            assert not await held(gone, a, srvid)
        # Back, "gone" gets nothing: the new owner renewed them.
        r = await gone.round(a, fleet)
        assert not r.owned and r.collectors == 2
        assert set((await owners(a)).values()) == {"other"}

    run(repo, test)


def test_held_only_for_the_owner(repo: str) -> None:
    """held() is true for one's own lease only: not another's, not a free one."""
    mine, free = sorted(add_servers(repo, "mine", "free"))
    me, other = Leases("me", 60), Leases("other", 60)

    async def test(a: Conn, b: Conn) -> None:
        # A round that sees only "mine" takes only it.
        assert (await me.round(a, {mine})).owned == {mine}
        assert await held(me, a, mine)
        assert not await held(other, b, mine)
        assert not await held(me, a, free)
        assert not await held(other, b, free)
        # Released, it is nobody's.
        await me.release(a, {mine})
        assert not await held(me, a, mine)

    run(repo, test)


def test_a_store_under_the_fence_holds_off_the_next_owner(repo: str) -> None:
    """A lease expiring during a store moves only once that store is over."""
    (srvid,) = add_servers(repo, "s1")
    period = 1.0
    slow, other = Leases("slow", period), Leases("other", period)

    async def test(a: Conn, b: Conn) -> None:
        assert (await slow.round(a, {srvid})).owned == {srvid}
        await b.execute("SET lock_timeout = '20s'")
        async with a.transaction():
            # The writer's transaction: the fence holds the lease row...
            assert await slow.held(a, srvid)
            await alive(other, b, set(), period - 0.2)
            await asyncio.sleep(0.5)
            # ...so the other collector's round, which sees it expired, waits.
            taking = asyncio.create_task(other.round(b, {srvid}))
            done, _ = await asyncio.wait({taking}, timeout=1.0)
            assert not done, "the lease moved under a store in progress"
        r = await taking
        assert r.owned == {srvid}
        assert not await held(slow, a, srvid)

    run(repo, test)


def test_a_repository_outage_moves_no_lease(repo: str) -> None:
    """No collector heard of for a period: the repository was out of everyone's
    reach, not one collector out of its.  The first one back takes nobody's
    leases while the others have their grace to come back; one that does not
    come back loses them after it."""
    fleet = add_servers(repo, "s1", "s2", "s3", "s4")
    period = 1.0
    # Links that retry every 0.5 s at most: a grace of 2 s.
    first, second = Leases("first", period, reconnect=0.5), Leases("second", period, reconnect=0.5)
    assert first.grace == 2.0

    async def test(a: Conn, b: Conn) -> None:
        await first.round(a, fleet)
        await second.round(b, fleet)
        excess = set(sorted((await first.round(a, fleet)).owned)[2:])
        await first.release(a, excess)
        assert len((await second.round(b, fleet)).owned) == 2
        held = await owners(a)
        terms = {**first.terms, **second.terms}
        # The repository is out of reach of both for three periods.
        await asyncio.sleep(3 * period)
        # "first" is back first: its own leases renewed, the other's left alone.
        r = await first.round(a, fleet)
        assert r.owned == {s for s, o in held.items() if o == "first"}
        assert r.collectors == 2, "the other one counts as alive through its grace"
        await asyncio.sleep(0.5)
        assert (await first.round(a, fleet)).owned == r.owned
        # "second" is back within its grace: it has all it had, same terms.
        r2 = await second.round(b, fleet)
        assert r2.owned == {s for s, o in held.items() if o == "second"}
        assert {**first.terms, **second.terms} == terms
        assert await owners(a) == held
        # Then "second" dies: after one period without it, "first" takes over.
        r = await alive(first, a, fleet, period + 0.5)
        assert r.owned == fleet and r.collectors == 1

    run(repo, test)


def test_a_collector_that_dies_during_the_outage_loses_its_leases_after_the_grace(
    repo: str,
) -> None:
    fleet = add_servers(repo, "s1", "s2")
    period = 1.0
    first, dead = Leases("first", period, reconnect=0.5), Leases("dead", period, reconnect=0.5)

    async def test(a: Conn, b: Conn) -> None:
        await dead.round(b, fleet)
        assert not (await first.round(a, fleet)).owned
        await asyncio.sleep(2 * period)
        t0 = time.monotonic()
        assert not (await first.round(a, fleet)).owned
        # "dead" never comes back: its grace (2 s), then its leases expire.
        while (await first.round(a, fleet)).owned != fleet:
            assert time.monotonic() - t0 < first.grace + period, "never taken"
            await asyncio.sleep(period / 3)
        assert time.monotonic() - t0 >= first.grace - 0.1

    run(repo, test)


def test_terms_and_the_handover(repo: str) -> None:
    """A takeover ends the old owner's term.  What it took under that term
    before the takeover may still go in until the new owner stores anything;
    the new owner waits for it (for one period, or until the old owner says
    it is done); what it took after the takeover never goes in."""
    (srvid,) = add_servers(repo, "s1")
    period = 1.0
    old, new = Leases("old", period), Leases("new", period)

    async def test(a: Conn, b: Conn) -> None:
        await old.round(a, {srvid})
        t1 = old.term(srvid)
        assert t1 is not None
        # The fence of the current term: the term, or no term (a snapshot
        # spooled before terms existed).
        for term in (t1, None):
            assert await fence(old, a, srvid, term, await repository_now(a)) is Fence.OK
        before = await repository_now(a)
        # "old" is cut off; "new", alive, takes the lease once it expired.
        r = await alive(new, b, {srvid}, period + 0.4)
        assert r.owned == {srvid}
        t2 = new.term(srvid)
        assert t2 is not None and t2 > t1
        after = await repository_now(a)
        # The new owner waits while the old one may store what it took.
        assert await fence(new, b, srvid, t2, after) is Fence.WAIT
        assert await fence(old, a, srvid, t1, after) is Fence.LOST
        assert await fence(old, a, srvid, None, before) is Fence.LOST
        assert await fence(old, a, srvid, t1, before) is Fence.HANDOVER
        assert await fence(old, a, srvid, t1, before) is Fence.HANDOVER
        assert await fence(new, b, srvid, t2, after) is Fence.WAIT
        # The old one is done: the new one goes on at once, and from its first
        # store on, nothing older goes in.
        await old.drained(a, srvid, t1)
        assert await fence(new, b, srvid, t2, after) is Fence.OK
        assert await fence(old, a, srvid, t1, before) is Fence.LOST

    run(repo, test)


def test_the_handover_window(repo: str) -> None:
    """An old owner that does not come back holds the new one up for a period
    at most; one that comes back with snapshots to store keeps the window
    open with its rounds."""
    s1, s2 = sorted(add_servers(repo, "s1", "s2"))
    period = 1.0
    old, new = Leases("old", period), Leases("new", period)

    async def test(a: Conn, b: Conn) -> None:
        await old.round(a, {s1, s2})
        t1 = {s: old.term(s) for s in (s1, s2)}
        before = await repository_now(a)
        assert (await alive(new, b, {s1, s2}, period + 0.4)).owned == {s1, s2}
        # The old owner comes back with a snapshot of s1 in its spool only.
        old.pending = lambda: {s1}
        await old.round(a, {s1, s2})
        now = await repository_now(b)
        # s2: nothing of the old owner's to wait for.
        assert await fence(new, b, s2, new.term(s2), now) is Fence.OK
        assert await fence(old, a, s2, t1[s2], before) is Fence.LOST
        # s1: the new owner waits while the old one renews its window...
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2 * period:
            await old.round(a, {s1, s2})
            await new.round(b, {s1, s2})
            assert await fence(new, b, s1, new.term(s1), now) is Fence.WAIT
            await asyncio.sleep(period / 3)
        # ...and goes on a period after the old one went quiet.
        await alive(new, b, {s1, s2}, period + 0.2)
        assert await fence(new, b, s1, new.term(s1), now) is Fence.OK
        assert await fence(old, a, s1, t1[s1], before) is Fence.LOST

    run(repo, test)
