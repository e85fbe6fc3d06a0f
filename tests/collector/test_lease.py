"""Leases in-process, against a real repository: sharing, expiry, the fence.

Two :class:`Leases` with different owner names stand for two collectors;
each call is what the daemon's fleet loop or writer sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg

from pgfleet.collector.lease import Leases, RoundResult
from pgfleet.repository import servers

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
        await asyncio.sleep(period + 0.3)
        r = await other.round(b, fleet)
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
            await asyncio.sleep(period + 0.3)
            # ...so the other collector's round, which sees it expired, waits.
            taking = asyncio.create_task(other.round(b, {srvid}))
            done, _ = await asyncio.wait({taking}, timeout=1.0)
            assert not done, "the lease moved under a store in progress"
        r = await taking
        assert r.owned == {srvid}
        assert not await held(slow, a, srvid)

    run(repo, test)
