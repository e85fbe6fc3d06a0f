"""wire.notifications(): the daemon's command channel without psycopg's
ten wake-ups a second, and without losing what came in before it listened."""

from __future__ import annotations

import asyncio

import psycopg

from pgfleet.cluster import Cluster
from pgfleet.snapshot import wire
from tests.fix_clusters import NewDatabase


def test_notifications_received_before_and_after_the_wait(
    pg18: Cluster, new_database: NewDatabase
) -> None:
    dsn = new_database(pg18)

    async def main() -> list[str]:
        listener = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with listener, await psycopg.AsyncConnection.connect(dsn, autocommit=True) as other:
            await listener.execute("LISTEN pgfleet_test")
            await other.execute("NOTIFY pgfleet_test, 'before'")
            # Received while a query runs: it waits in psycopg's backlog.
            await listener.execute("SELECT 1")
            got: list[str] = []

            async def read() -> None:
                async for n in wire.notifications(listener):
                    got.append(n.payload)
                    if len(got) == 2:
                        return

            reader = asyncio.create_task(read())
            await asyncio.sleep(0.2)
            await other.execute("NOTIFY pgfleet_test, 'after'")
            await asyncio.wait_for(reader, 10)
            # The connection is usable again once the reader is done.
            await listener.execute("SELECT 1")
            return got

    assert asyncio.run(main()) == ["before", "after"]
