"""The on-disk spool: order, bound, crash leftovers, one collector per directory."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pgfleet.collector.spool import Spool
from pgfleet.errors import ConfigError
from pgfleet.snapshot.model import Failure, FailureKind, RegisteredSource, ServerInfo, Staged


def staged(*rows: bytes) -> list[Staged]:
    out = []
    for i, data in enumerate(rows):
        buf = io.BytesIO()
        buf.write(data)
        src = RegisteredSource(f"src{i}", f"pgfleet.src{i}_src", None, False, 10)
        out.append(Staged(src, buf))
    return out


INFO = ServerInfo(180000, False, frozenset({"pg_stat_statements"}), ("postgres", "app"))


def test_round_trip_in_order_across_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10**6)
    spool.open()
    boom = Failure("src9", FailureKind.TIMEOUT, "boom")
    a1, _ = spool.put(1, "a", 100.0, INFO, staged(b"1\tx\n", b""), [boom])
    spool.put(2, "b", 101.0, None, staged(b"2\ty\n"), [])
    a2, _ = spool.put(1, "a", 102.0, INFO, staged(b"1\tz\n"), [])
    assert spool.has(1) and spool.count(1) == 2 and spool.servers() == {1, 2}
    spool.close()

    again = Spool(tmp_path, 10**6)
    again.open()
    assert [(e.seq, e.srvid) for e in again.entries()] == [(1, 1), (2, 2), (3, 1)]
    snap = again.read(next(again.entries()))
    assert snap.alias == "a" and snap.taken_at == 100.0 and snap.info == INFO
    assert snap.failures == [boom]
    assert [st.source.module for st in snap.staged] == ["src0", "src1"]
    # As fetch() leaves them: positioned at their end, read from 0 by store().
    assert [st.spool.tell() for st in snap.staged] == [4, 0]
    snap.staged[0].spool.seek(0)
    assert snap.staged[0].spool.read() == b"1\tx\n"
    snap.close()
    again.remove(snap.entry)
    # Sequence numbers keep growing after a restart.
    e, _ = again.put(3, "c", 103.0, None, [], [])
    assert e.seq == 4
    assert not (tmp_path / a1.path.name).exists() and a2.path.exists()


def test_full_spool_drops_the_oldest_and_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 2000)
    spool.open()
    big = b"x" * 600
    total = 0
    for i in range(6):
        _, dropped = spool.put(1 + i % 2, "s", float(i), None, staged(big), [])
        total += dropped
    assert total == spool.dropped >= 3
    assert spool.bytes <= 2000
    kept = [e.seq for e in spool.entries()]
    assert kept == sorted(kept) and kept[-1] == 6  # the newest stay
    # An entry being stored is never dropped under it.
    oldest = next(spool.entries())
    spool.busy(oldest, True)
    spool.put(1, "s", 9.0, None, staged(big), [])
    assert oldest in spool


def test_leftovers_and_lock(tmp_path: Path) -> None:
    (tmp_path / ".tmp-0000000000000009-1.snap").write_bytes(b"half")
    (tmp_path / "0000000000000003-7.snap").write_bytes(b'{"truncated": true')
    spool = Spool(tmp_path, 10**6)
    spool.open()
    assert not (tmp_path / ".tmp-0000000000000009-1.snap").exists()
    entry = next(spool.entries())
    with pytest.raises(Exception, match="unreadable"):
        spool.read(entry)
    with pytest.raises(ConfigError, match="in use by another collector"):
        Spool(tmp_path, 10**6).open()
    name = spool.collector_name()
    assert name == spool.collector_name()
    spool.close()
    other = Spool(tmp_path, 10**6)
    other.open()  # the lock went with the first one
    assert other.collector_name() == name
    other.close()
