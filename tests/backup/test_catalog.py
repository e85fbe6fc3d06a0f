"""The catalog: a backup's life, crash leftovers, locks, WAL names."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pgfleet.backup.catalog import (
    BackupInfo,
    Catalog,
    Kind,
    NotFound,
    State,
    format_lsn,
    parse_lsn,
    segment_name,
)
from pgfleet.backup.store import Codec, StorageError, copy_in, open_write
from pgfleet.cluster import Cluster

T0 = datetime(2026, 3, 1, 2, 0, 0, tzinfo=UTC)


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "backups", "db1")


def take(
    cat: Catalog, when: datetime = T0, kind: str = Kind.FULL, parent: str | None = None
) -> BackupInfo:
    """A whole backup: begin, two stored files, finish."""
    info = cat.begin(kind, parent, "test", started=when)
    d = cat.backup_dir(info.id)
    for name in ("base.tar.zst", "backup_manifest.zst"):
        info = info.with_file(copy_in(io.BytesIO(name.encode() * 1000), d / name, Codec()))
    info = dataclasses.replace(
        info, start_lsn="0/2000028", timeline=1, start_wal="000000010000000000000002"
    )
    return cat.finish(info)


def test_life_of_a_backup(cat: Catalog) -> None:
    assert cat.list() == [] and not cat.root.exists()  # reading creates nothing
    info = cat.begin("full", label="nightly", started=T0, compression="lz4", encrypted=True)
    assert info.id == "20260301T020000Z" and info.state is State.IN_PROGRESS
    assert (info.kind, info.label, info.compression, info.encrypted) == (
        "full",
        "nightly",
        "lz4",
        True,
    )
    d = cat.backup_dir(info.id)
    assert sorted(os.listdir(d)) == ["backup.json"]
    assert cat.get(info.id) == info
    for p in (cat.root, cat.backups_dir, cat.wal_dir, cat.incoming_dir, d):
        assert p.stat().st_mode & 0o777 == 0o700
    with pytest.raises(NotFound, match="server 'db1' has no valid backup"):
        cat.get("latest")

    with pytest.raises(StorageError, match="has no files"):
        cat.finish(info)
    stored = copy_in(io.BytesIO(b"x" * 100_000), d / "base.tar.zst", Codec())
    info = info.with_file(stored)
    assert info.files == ("base.tar.zst",) and info.raw_bytes == 100_000
    assert info.checksums == {"base.tar.zst": stored.sha256}
    info = cat.update(dataclasses.replace(info, start_lsn="0/2000028", timeline=1))
    assert cat.get(info.id).start_lsn == "0/2000028"
    with pytest.raises(StorageError, match=r"no .*pg_wal.tar.zst"):
        cat.finish(info.with_file(dataclasses.replace(stored, path=d / "pg_wal.tar.zst")))

    done = cat.finish(dataclasses.replace(info, end_lsn="0/2000100"))
    assert done.state is State.VALID and done.finished is not None and done.duration is not None
    assert cat.get("latest") == cat.get("oldest") == cat.get(info.id) == done
    assert cat.list() == [done]
    with pytest.raises(StorageError, match="is valid, not in progress"):
        cat.finish(done)
    with pytest.raises(StorageError, match="is valid, not in progress"):
        cat.update(done)


def test_json_round_trip(cat: Catalog) -> None:
    info = take(cat)
    raw = json.loads((cat.backup_dir(info.id) / "backup.json").read_text())
    assert (
        raw["format"] == 1
        and raw["state"] == "valid"
        and raw["started"] == "2026-03-01T02:00:00+00:00"
    )
    assert BackupInfo.from_json(info.to_json()) == info
    # Fields a newer pgfleet adds are ignored, not fatal.
    raw["shiny_new_field"] = 1
    assert BackupInfo.from_dict(raw) == info


def test_ids_are_unique_and_increasing(cat: Catalog) -> None:
    a = cat.begin(started=T0)
    b = cat.begin(started=T0)  # same second
    c = cat.begin(started=T0 - timedelta(days=1))  # the clock went back
    assert [a.id, b.id, c.id] == ["20260301T020000Z", "20260301T020001Z", "20260301T020002Z"]
    assert [x.id for x in cat.list()] == [a.id, b.id, c.id]


def test_incremental_needs_a_valid_parent(cat: Catalog) -> None:
    with pytest.raises(StorageError, match="an incremental backup needs a parent"):
        cat.begin("incremental")
    with pytest.raises(StorageError, match="a full backup has no parent"):
        cat.begin("full", parent="20260301T020000Z")
    with pytest.raises(NotFound, match="server 'db1' has no backup 20260301T020000Z"):
        cat.begin("incremental", parent="20260301T020000Z")
    running = cat.begin(started=T0)
    with pytest.raises(StorageError, match="is in_progress: cannot be a parent"):
        cat.begin("incremental", parent=running.id)
    cat.fail(running.id, "no")
    full = take(cat, T0 + timedelta(hours=1))
    inc = cat.begin("incremental", parent="latest", started=T0 + timedelta(hours=2))
    assert inc.parent == full.id and inc.kind is Kind.INCREMENTAL
    with pytest.raises(StorageError, match="bogus"):
        cat.begin("bogus")


def test_fail(cat: Catalog) -> None:
    info = cat.begin(started=T0)
    d = cat.backup_dir(info.id)
    with open_write(d / "base.tar.zst", Codec()) as w:
        w.write(b"partial")
    failed = cat.fail(
        info,
        'pg_basebackup: error: connection to server at "h" failed:\n FATAL: password=s3cret host=h',
    )
    assert failed.state is State.INVALID and failed.files == ()
    assert (
        failed.error
        == 'pg_basebackup: error: connection to server at "h" failed: FATAL: password=*** host=h'
    )
    assert os.listdir(d) == ["backup.json"]  # a full disk gets its space back
    assert "s3cret" not in (d / "backup.json").read_text()
    assert cat.get(info.id) == failed
    # A valid backup found bad keeps its files, for whoever looks into it.
    good = take(cat, T0 + timedelta(hours=1))
    bad = cat.fail(good.id, "verify: base/1/1259: SHA256 checksum mismatch; postgresql://u:pw@h/db")
    assert bad.state is State.INVALID and bad.files == good.files
    assert bad.error == "verify: base/1/1259: SHA256 checksum mismatch; postgresql://u:***@h/db"
    assert sorted(os.listdir(cat.backup_dir(good.id))) == ["backup.json", *sorted(good.files)]
    with pytest.raises(NotFound):
        cat.fail("20200101T000000Z", "x")


def test_get_and_ids(cat: Catalog) -> None:
    take(cat)
    for bad in ("../../etc", "20260301T020000", "latest/..", ""):
        with pytest.raises(StorageError, match="is not a backup ID") as info:
            cat.get(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(NotFound, match=r"^server 'db1' has no backup 20260301T020001Z$"):
        cat.get("20260301T020001Z")
    for bad_name in ("", ".", "..", "a/b", ".hidden"):
        with pytest.raises(StorageError, match="cannot name a server's backup directory"):
            Catalog(cat.directory, bad_name)


def test_unreadable_metadata_is_listed_invalid(cat: Catalog) -> None:
    a = take(cat)
    b = take(cat, T0 + timedelta(days=1))
    c = take(cat, T0 + timedelta(days=2))
    (cat.backup_dir(a.id) / "backup.json").write_text("{not json")
    (cat.backup_dir(b.id) / "backup.json").write_text(json.dumps({"format": 1, "state": "weird"}))
    (cat.backup_dir(c.id) / "backup.json").write_text(c.to_json().decode().replace("db1", "db2"))
    listed = cat.list()
    assert [x.state for x in listed] == [State.INVALID] * 3
    assert [x.id for x in listed] == [a.id, b.id, c.id]
    assert all(x.error and "unreadable" in x.error and "\n" not in x.error for x in listed)
    assert listed[0].started == a.started
    with pytest.raises(NotFound):
        cat.get("latest")
    cat.delete(a.id)  # and they can be deleted
    assert [x.id for x in cat.list()] == [b.id, c.id]


def test_delete(cat: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    full = take(cat)
    inc = take(cat, T0 + timedelta(days=1), kind="incremental", parent=full.id)
    with pytest.raises(
        StorageError,
        match=f"backup {full.id} of server 'db1' is the parent of {inc.id}: delete those first",
    ):
        cat.delete(full.id)
    running = cat.begin(started=T0 + timedelta(days=2))
    with pytest.raises(StorageError, match="is in progress"):
        cat.delete(running.id)

    # A crash in the middle of a deletion: DELETING, never VALID again.
    real = os.unlink

    def unlink_then_die(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        if str(path).endswith("backup_manifest.zst"):
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(os, "unlink", unlink_then_die)
    with pytest.raises(
        StorageError, match=f"cannot remove the files of .*{inc.id}: Input/output error"
    ):
        cat.delete(inc.id)
    monkeypatch.undo()
    assert cat.get(inc.id).state is State.DELETING
    assert [b.id for b in cat.list() if b.state is State.VALID] == [full.id]
    assert cat.get("latest").id == full.id
    assert cat.cleanup() == [f"{inc.id}: interrupted deletion finished"]
    assert not cat.backup_dir(inc.id).exists()
    cat.delete(full.id)
    assert [b.id for b in cat.list()] == [running.id]
    with pytest.raises(NotFound):
        cat.delete(full.id)


def test_delete_force(cat: Catalog) -> None:
    full = take(cat)
    take(cat, T0 + timedelta(days=1), kind="incremental", parent=full.id)
    cat.delete(full.id, force=True)
    assert [b.kind for b in cat.list()] == ["incremental"]


# -- crashes, across processes --------------------------------------------------------

_TAKER = """
import io, sys, time
from datetime import datetime, UTC
from pathlib import Path
from pgfleet.backup.catalog import Catalog
from pgfleet.backup.store import Codec, open_write, copy_in
cat = Catalog(Path(sys.argv[1]), "db1")
info = cat.begin("full", started=datetime(2026, 3, 5, tzinfo=UTC))
d = cat.backup_dir(info.id)
copy_in(io.BytesIO(b"done" * 1000), d / "base.tar.zst", Codec())
with open_write(d / "pg_wal.tar.zst", Codec()) as w, open_write(cat.wal_dir / "000000010000000000000003.zst", Codec()) as s:
    w.write(b"half" * 100000)
    s.write(b"segment")
    print(info.id, flush=True)
    time.sleep(60)
"""


@pytest.fixture
def taker(cat: Catalog) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Another process in the middle of a backup and of a WAL segment."""
    child = subprocess.Popen(
        [sys.executable, "-c", _TAKER, str(cat.directory)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    backup_id = child.stdout.readline().strip()
    assert backup_id, "the child died"
    yield child, backup_id
    child.kill()
    child.wait()


def test_cleanup_leaves_a_live_backup_alone(
    cat: Catalog, taker: tuple[subprocess.Popen[str], str]
) -> None:
    _, backup_id = taker
    assert cat.get(backup_id).state is State.IN_PROGRESS
    assert cat.cleanup(grace=0) == []
    assert cat.get(backup_id).state is State.IN_PROGRESS
    assert len(os.listdir(cat.backup_dir(backup_id))) == 3  # backup.json, base.tar.zst, a temporary
    with pytest.raises(StorageError, match="is in progress"):
        cat.delete(backup_id)
    with pytest.raises(StorageError, match="is being taken by another process"):
        cat.fail(backup_id, "not mine")


def test_cleanup_after_a_kill(cat: Catalog, taker: tuple[subprocess.Popen[str], str]) -> None:
    child, backup_id = taker
    child.send_signal(signal.SIGKILL)
    child.wait()
    # What the killed process left: a backup that does not look valid.
    assert cat.get(backup_id).state is State.IN_PROGRESS
    with pytest.raises(NotFound):
        cat.get("latest")
    assert any(n.startswith(".tmp-") for n in os.listdir(cat.wal_dir))
    assert cat.cleanup(grace=3600) == [
        f"{backup_id}: interrupted backup marked invalid, its files removed"
    ]
    info = cat.get(backup_id)
    assert (
        info.state is State.INVALID
        and info.error == "interrupted: the process taking it ended before it finished"
    )
    assert os.listdir(cat.backup_dir(backup_id)) == ["backup.json"]
    # The WAL temporary is young: kept until the grace period is over.
    (tmp,) = [n for n in os.listdir(cat.wal_dir) if n.startswith(".tmp-")]
    assert cat.cleanup(grace=0) == [f"wal/{tmp}: removed (an interrupted write)"]
    assert sorted(os.listdir(cat.wal_dir)) == ["incoming"]
    assert cat.cleanup(grace=0) == []


def test_cleanup_leaves_a_backup_of_this_process_alone(cat: Catalog) -> None:
    """Another Catalog object of the same process: flock tells them apart too."""
    mine = cat.begin(started=T0)
    with open_write(cat.backup_dir(mine.id) / "base.tar", Codec()) as w:
        w.write(b"x")
        other = Catalog(cat.directory, "db1")
        assert other.cleanup(grace=0) == []
    assert other.get(mine.id).state is State.IN_PROGRESS
    cat.finish(mine.with_file(copy_in(io.BytesIO(b"x"), cat.backup_dir(mine.id) / "b", Codec())))


def test_cleanup_of_other_leftovers(cat: Catalog) -> None:
    take(cat)
    cat.create()
    # begin() killed before its rename; a deletion killed before its last rmdir
    (cat.backups_dir / ".tmp-20260301T030000Z-abcd1234").mkdir()
    (cat.backups_dir / ".tmp-20260301T030000Z-abcd1234" / "backup.json").write_text("{}")
    (cat.backups_dir / "20260301T040000Z").mkdir()
    # a directory without metadata but with files is a human's business: listed, not removed
    (cat.backups_dir / "20260301T050000Z").mkdir()
    (cat.backups_dir / "20260301T050000Z" / "base.tar").write_text("?")
    old = time.time() - 7200
    stale = cat.backup_dir("20260301T020000Z") / ".tmp-base.tar.zst-0000"
    stale.write_text("x")
    os.utime(stale, (old, old))
    assert sorted(cat.cleanup()) == [
        ".tmp-20260301T030000Z-abcd1234: removed (a backup interrupted while starting)",
        "20260301T040000Z: interrupted deletion finished",
        "backups/20260301T020000Z/.tmp-base.tar.zst-0000: removed (an interrupted write)",
    ]
    assert [(b.id, b.state) for b in cat.list()] == [
        ("20260301T020000Z", State.VALID),
        ("20260301T050000Z", State.INVALID),
    ]
    assert cat.list()[1].error == "no backup.json (deletion interrupted?)"


# -- locks ---------------------------------------------------------------------------


def test_catalog_lock(cat: Catalog) -> None:
    other = Catalog(cat.directory, "db1")
    other.LOCK_TIMEOUT = 0.1
    busy = rf"server 'db1': its backup catalog is locked by another process \(pid {os.getpid()}\)"
    with cat.lock(), cat.lock():  # re-entrant
        with pytest.raises(StorageError, match=busy), other.lock(timeout=0.1):
            pass
        with pytest.raises(StorageError, match=busy):
            other.begin()
    with other.lock(timeout=0.1):
        pass


def test_exclusive(cat: Catalog) -> None:
    other = Catalog(cat.directory, "db1")
    busy = r"server 'db1': its receiver is locked by another process \(pid \d+\)"
    with cat.exclusive("receiver"):
        with pytest.raises(StorageError, match=busy), other.exclusive("receiver"):
            pass
        with other.exclusive("scheduler"):
            pass
    with other.exclusive("receiver"):
        pass


# -- WAL -------------------------------------------------------------------------------


def test_wal_segments(cat: Catalog) -> None:
    assert cat.wal_segments() == []
    cat.create()
    for name in (
        "000000010000000000000003.zst",
        "000000010000000000000002.zst.aes",
        "000000020000000000000001",
        "00000002.history.zst",
        ".tmp-000000010000000000000004.zst-abcd",
        "000000010000000000000005.partial",
    ):
        (cat.wal_dir / name).write_bytes(b"")
    assert cat.wal_segments() == [
        "000000010000000000000002",
        "000000010000000000000003",
        "000000020000000000000001",
    ]
    assert (
        cat.wal_file("000000010000000000000002") == cat.wal_dir / "000000010000000000000002.zst.aes"
    )
    assert cat.wal_file("000000020000000000000001") == cat.wal_dir / "000000020000000000000001"
    assert cat.wal_file("00000002.history") == cat.wal_dir / "00000002.history.zst"
    assert cat.wal_file("000000010000000000000009") is None
    with pytest.raises(StorageError, match="is not a WAL segment"):
        cat.wal_file("../../x")


def test_lsns_and_segment_names() -> None:
    assert parse_lsn("0/2000028") == 0x2000028
    assert parse_lsn("16/B374D848") == 0x16B374D848
    assert format_lsn(0x16B374D848) == "16/B374D848"
    # As pg_walfile_name() says.
    assert segment_name(1, "0/2000028") == "000000010000000000000002"
    assert segment_name(1, "16/B374D848") == "0000000100000016000000B3"
    assert segment_name(3, "16/B374D848", 64 << 20) == "00000003000000160000002C"
    assert segment_name(1, 0xFFFFFFFF) == "0000000100000000000000FF"
    for bad in ("", "0", "x/1", "1/2/3", "123456789/0"):
        with pytest.raises(ValueError):
            parse_lsn(bad)


def test_real_segment_names(pg18: Cluster) -> None:
    """Against the server's own pg_walfile_name()."""
    for lsn in ("0/0", "0/2000028", "16/B374D848", "FF/FFFFFFFF", "1/0"):
        (name,) = pg18.execute("SELECT pg_walfile_name(%s::pg_lsn)", (lsn,))[0]
        # pg_walfile_name() names the segment of the byte before a boundary: skip those.
        if parse_lsn(lsn) % (16 << 20):
            assert segment_name(1, lsn) == name, lsn
