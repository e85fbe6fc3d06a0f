"""The WAL receiver: slot names, segments into the store, and coming back after the server."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pgfleet.backup.catalog import Catalog
from pgfleet.backup.store import Codec, Compression, open_read
from pgfleet.backup.wal import ReceiverState, WalReceiver, archive_completed, slot_name
from pgfleet.errors import ClusterError
from pgfleet.repository.servers import Server
from tests.backup.helpers import (
    KEY,
    collector_config,
    receiving,
    start_cluster,
    switch_wal,
    wait_for,
)

SEGMENT = 16 << 20


def test_slot_names() -> None:
    assert slot_name("db1") == "pgfleet_db1"
    assert slot_name("db_2") == "pgfleet_db_2"
    odd = [slot_name(a) for a in ("DB1", "db1.example", "db1-example", "db1@x:5432", "x" * 80)]
    assert all(s.startswith("pgfleet_") and len(s) <= 63 for s in odd)
    assert all(s.replace("_", "").isalnum() and s == s.lower() for s in odd)
    # Two aliases that read the same once cleaned never share a slot.
    assert slot_name("db1.example") != slot_name("db1-example") != slot_name("db1_example")
    assert len(set(odd)) == len(odd)


def test_archive_completed(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path, "srv")
    catalog.create()
    incoming = catalog.incoming_dir
    names = ["000000010000000000000001", "000000010000000000000002", "00000002.history"]
    for i, name in enumerate(names):
        (incoming / name).write_bytes(bytes([i]) * (SEGMENT if len(name) == 24 else 40))
    (incoming / "000000010000000000000003.partial").write_bytes(b"\0" * 100)
    (incoming / "stray.txt").write_text("not ours")
    codec = Codec(Compression.LZ4, key=KEY)
    assert archive_completed(catalog, codec) == sorted(names)
    # Stored, compressed and encrypted; the newest complete segment stays
    # for pg_receivewal to resume after, as does the segment in progress.
    assert sorted(p.name for p in incoming.iterdir()) == [
        "000000010000000000000002",
        "000000010000000000000003.partial",
        "stray.txt",
    ]
    for i, name in enumerate(names):
        stored = catalog.wal_file(name)
        assert stored is not None and stored.name == name + codec.suffix
        with open_read(stored, KEY) as r:
            assert r.read() == bytes([i]) * (SEGMENT if len(name) == 24 else 40)
    # Again: nothing new; once a newer one is complete, the kept one goes.
    assert archive_completed(catalog, codec) == []
    (incoming / "000000010000000000000003.partial").rename(incoming / "000000010000000000000003")
    assert archive_completed(catalog, codec) == ["000000010000000000000003"]
    assert "000000010000000000000002" not in {p.name for p in incoming.iterdir()}
    assert catalog.wal_segments() == [f"00000001000000000000000{i}" for i in (1, 2, 3)]


def test_backoff_doubles_with_jitter(tmp_path: Path) -> None:
    receiver = WalReceiver(
        Catalog(tmp_path, "srv"),
        server_entry_stub(),
        collector_config(),
        Codec(),
        backoff_min=1.0,
        backoff_max=8.0,
    )
    for failures, (low, high) in {1: (0.5, 1), 2: (1, 2), 3: (2, 4), 4: (4, 8), 9: (4, 8)}.items():
        receiver._failures = failures
        delays = [receiver._backoff() for _ in range(50)]
        assert all(low <= d <= high for d in delays), (failures, delays)
        assert len(set(delays)) > 1  # jitter


def server_entry_stub() -> Server:
    """A server nobody listens for."""
    return Server(srvid=1, alias="srv", host="127.0.0.1", port=1)


def test_unreachable_server_is_retried(tmp_path: Path) -> None:
    """A server that is not there: the receiver waits, retries, says why, and stops when told."""
    receiver = WalReceiver(
        Catalog(tmp_path, "srv"),
        server_entry_stub(),
        collector_config(),
        Codec(),
        backoff_min=0.05,
        backoff_max=0.1,
    )

    async def main() -> None:
        task = asyncio.create_task(receiver.run())
        while receiver.status().failures < 3:
            await asyncio.sleep(0.02)
        status = receiver.status()
        assert status.state in (ReceiverState.WAITING, ReceiverState.STARTING)
        assert status.last_error and "cannot connect" in status.last_error
        receiver.stop()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert receiver.status().state is ReceiverState.STOPPED


def test_receiver_survives_a_server_restart(clusters_dir: Path, tmp_path: Path) -> None:
    server = start_cluster("18", clusters_dir / "bk-wal")
    try:
        catalog = Catalog(tmp_path / "store", "srv")
        codec = Codec(Compression.ZSTD)
        with receiving(server, catalog, codec, "srv") as thread:
            status = thread.receiver.status()
            assert status.slot == "pgfleet_srv" and status.pid is not None
            assert server.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'pgfleet_srv'"
            ) == [(True,)]
            server.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) i")
            first = switch_wal(server, catalog)
            # The lag is measured: nothing left to receive once it caught up.
            wait_for(lambda: thread.receiver.status().lag_bytes == 0, 30, "no lag")

            server.restart()
            wait_for(lambda: thread.receiver.status().restarts >= 1, 60, "a restart")
            thread.wait_state(ReceiverState.STREAMING, 60)
            status = thread.receiver.status()
            # Why it stopped: pg_receivewal's exit, or a retry that found the server down.
            assert status.last_error and (
                "pg_receivewal exited" in status.last_error or "cannot connect" in status.last_error
            )
            server.execute("INSERT INTO t SELECT generate_series(1001, 2000)")
            second = switch_wal(server, catalog)
            assert second > first
        # Nothing missing in between: every segment from the first on is stored.
        segments = catalog.wal_segments()
        start = segments.index(first)
        numbers = [int(s[16:], 16) for s in segments[start:]]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        assert thread.receiver.status().state is ReceiverState.STOPPED
    finally:
        try:
            server.destroy()
        except ClusterError:
            server.kill()


def test_second_receiver_waits(clusters_dir: Path, tmp_path: Path) -> None:
    """One receiver per server: a second one keeps retrying while the first holds the lock."""
    catalog = Catalog(tmp_path / "store", "srv")
    with catalog.exclusive("receiver"):
        receiver = WalReceiver(
            catalog, server_entry_stub(), collector_config(), Codec(), backoff_min=0.05
        )

        async def main() -> None:
            task = asyncio.create_task(receiver.run())
            while receiver.status().failures < 1:
                await asyncio.sleep(0.02)
            receiver.stop()
            await asyncio.wait_for(task, 10)

        asyncio.run(main())
    assert "locked by another process" in (receiver.status().last_error or "")


def test_status_as_json(tmp_path: Path) -> None:
    receiver = WalReceiver(
        Catalog(tmp_path, "srv"), server_entry_stub(), collector_config(), Codec()
    )
    doc = receiver.status().as_json()
    assert doc["state"] == "stopped" and doc["slot"] == "pgfleet_srv"
    assert doc["restarts"] == 0 and doc["lag_bytes"] is None
