"""Point-in-time recovery end to end, and the restores that must be refused."""

from __future__ import annotations

import io
import shlex
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from pgfleet.backup import restore
from pgfleet.backup.base import BaseBackup
from pgfleet.backup.catalog import BackupInfo, Catalog, Kind, NotFound
from pgfleet.backup.store import Codec, Compression, StorageError
from pgfleet.backup.verify import verify
from pgfleet.cluster import Cluster
from pgfleet.errors import ClusterError
from tests.backup.helpers import (
    BACKUP_PASSWORD,
    KEY,
    collector_config,
    hand_over,
    receiving,
    rows,
    server_entry,
    server_side_pgfleet,
    server_time_after_commit,
    start_cluster,
    start_restored,
    switch_wal,
)
from tests.fix_clusters import NewCluster


@dataclass(frozen=True)
class Case:
    version: str
    compression: Compression
    encrypted: bool
    incremental: bool

    def __str__(self) -> str:
        aes = "+aes" if self.encrypted else ""
        return (
            f"pg{self.version}-{self.compression}{aes}{'-incremental' if self.incremental else ''}"
        )


CASES = [
    Case("18", Compression.ZSTD, True, True),
    Case("15", Compression.GZIP, False, False),
]


def _destroy(cluster: Cluster) -> None:
    try:
        cluster.destroy()
    except ClusterError:
        cluster.kill()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_point_in_time_recovery(case: Case, clusters_dir: Path, tmp_path: Path) -> None:
    """Rows, backup, rows, the time, rows: restored to that time, exactly the rows of then.

    On 18 the backup restored is an incremental one on top of a full one,
    combined by pg_combinebackup; and restored to 'latest', every row.
    """
    name = f"bk-pitr-{case}"
    settings = {"summarize_wal": "on"} if case.incremental else {}
    server = start_cluster(case.version, clusters_dir / name, **settings)
    made: list[Cluster] = [server]
    try:
        _pitr(case, server, clusters_dir, made)
    finally:
        for c in reversed(made):
            _destroy(c)


def _pitr(case: Case, server: Cluster, clusters_dir: Path, made: list[Cluster]) -> None:
    store = clusters_dir / f"store-{case}"
    catalog = Catalog(store, "srv")
    key = KEY if case.encrypted else None
    codec = Codec(case.compression, key=key)
    entry = server_entry(server, "srv")

    def backup(incremental: bool = False) -> BackupInfo:
        return BaseBackup(catalog, entry, collector_config(), codec, incremental=incremental).run()

    def insert(first: int, last: int) -> None:
        server.execute("INSERT INTO t SELECT generate_series(%s::int, %s::int)", (first, last))

    server.execute("CREATE TABLE t (i int PRIMARY KEY)")
    with receiving(server, catalog, codec, "srv") as receiver:
        insert(1, 10)
        full = backup()
        insert(11, 20)
        if case.incremental:
            info = backup(incremental=True)
            assert info.kind is Kind.INCREMENTAL and info.parent == full.id
            insert(21, 25)
        then = server_time_after_commit(server)
        insert(100, 110)
        switch_wal(server, catalog)
        status = receiver.receiver.status()
        assert status.segments_stored >= 1 and status.restarts == 0
    expected_then = [*range(1, 21), *(range(21, 26) if case.incremental else [])]

    key_file = None
    if key is not None:
        key_file = clusters_dir / f"key-{case}"
        key_file.write_bytes(KEY)
        key_file.chmod(0o600)
        hand_over(key_file)
    hand_over(store)  # restore_command runs as the server's OS user
    command = restore.wal_get_command(
        catalog,
        key_file=str(key_file) if key_file else None,
        program=shlex.split(server_side_pgfleet()),
    )

    # To that time: the newest backup that ended before it.
    chosen = restore.choose(catalog, "latest", target_time=then)
    assert chosen.kind is (Kind.INCREMENTAL if case.incremental else Kind.FULL)
    target = clusters_dir / f"{server.name}-then"
    result = restore.restore(
        catalog, chosen, target, key=key, restore_command=command, target_time=then
    )
    assert len(result.chain) == (2 if case.incremental else 1)
    restored = start_restored(server, target, f"{server.name}-then")
    made.append(restored)
    assert rows(restored) == expected_then
    # Its rows after the backup came from the WAL store, through wal-get.
    assert "restored log file" in restored.log_file.read_text()
    restored.stop()

    # Everything: the latest backup, and every WAL segment after it.
    target = clusters_dir / f"{server.name}-latest"
    restore.restore(catalog, catalog.get("latest"), target, key=key, restore_command=command)
    restored = start_restored(server, target, f"{server.name}-latest")
    made.append(restored)
    assert rows(restored) == [*expected_then, *range(100, 111)]


# -- refusals and damage


@pytest.fixture(scope="module")
def stored(clusters_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalog]:
    """A server's store with two backups: one plain (zstd), one encrypted."""
    server = start_cluster("18", clusters_dir / "bk-faults")
    try:
        server.execute("CREATE TABLE t AS SELECT generate_series(1, 100) AS i")
        catalog = Catalog(tmp_path_factory.mktemp("faults"), "srv")
        entry = server_entry(server, "srv")
        for codec in (Codec(Compression.ZSTD), Codec(Compression.LZ4, key=KEY)):
            BaseBackup(catalog, entry, collector_config(), codec).run()
    finally:
        _destroy(server)
    yield catalog


def test_refuses_a_directory_that_is_not_empty(stored: Catalog, tmp_path: Path) -> None:
    plain = stored.list()[0]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious").write_text("keep me")
    with pytest.raises(restore.RestoreError, match="is not empty: refusing to restore over it"):
        restore.restore(stored, plain, tmp_path / "data", key=None, restore_command=None)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["precious"]
    (tmp_path / "file").write_text("")
    with pytest.raises(restore.RestoreError, match="exists and is not a directory"):
        restore.restore(stored, plain, tmp_path / "file", key=None, restore_command=None)


def test_wrong_key(stored: Catalog, tmp_path: Path) -> None:
    encrypted = stored.list()[1]
    assert encrypted.encrypted
    with pytest.raises(restore.RestoreError, match="wrong key or corrupted header"):
        restore.restore(stored, encrypted, tmp_path / "data", key=bytes(32), restore_command=None)
    assert not (tmp_path / "data").exists()  # made by the restore, removed with it
    with pytest.raises(restore.RestoreError, match="encrypted and no key was given"):
        restore.restore(stored, encrypted, tmp_path / "data", key=None, restore_command=None)
    result = verify(stored, encrypted.id, bytes(32))
    assert not result.ok and "wrong key" in result.problems[0]
    assert verify(stored, encrypted.id, KEY).ok


@pytest.mark.parametrize("which", [0, 1], ids=["zstd", "lz4+aes"])
def test_flipped_byte(stored: Catalog, tmp_path: Path, which: int) -> None:
    """One byte changed in a stored tar: verify names the file, restore refuses and cleans up."""
    info = stored.list()[which]
    key = KEY if info.encrypted else None
    path = stored.backup_dir(info.id) / info.files[0]
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x10
    path.write_bytes(bytes(damaged))
    try:
        result = verify(stored, info.id, key)
        assert not result.ok
        assert info.files[0] in result.problems[0] and "chunk" in result.problems[0]
        (tmp_path / "data").mkdir()
        with pytest.raises(restore.RestoreError, match=info.files[0]):
            restore.restore(stored, info, tmp_path / "data", key=key, restore_command=None)
        assert list((tmp_path / "data").iterdir()) == []  # as it was found
    finally:
        path.write_bytes(original)
    assert verify(stored, info.id, key).ok


def test_choose(stored: Catalog) -> None:
    first, second = stored.list()
    assert restore.choose(stored, "latest").id == second.id
    assert second.finished is not None and first.finished is not None
    assert restore.choose(stored, "latest", target_time=second.finished).id == second.id
    assert restore.choose(stored, "latest", target_time=first.finished).id == first.id
    with pytest.raises(NotFound, match="no valid backup that ended before"):
        restore.choose(stored, "latest", target_time=first.started)
    with pytest.raises(restore.RestoreError, match="started after"):
        restore.choose(stored, second.id, target_time=first.started)
    assert second.end_lsn is not None
    assert restore.choose(stored, "latest", target_lsn=second.end_lsn).id == second.id


def test_archive(stored: Catalog, tmp_path: Path) -> None:
    """A tar.zst of the data directory, ready to extract and start."""
    info = stored.list()[0]
    archive = tmp_path / "srv.tar.zst"
    restore.restore_archive(
        stored, info, archive, key=None, restore_command="true", target_lsn=info.end_lsn
    )
    with archive.open("rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f).read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = set(tar.getnames())
        conf = tar.extractfile("postgresql.auto.conf")
        assert conf is not None
        text = conf.read().decode()
    assert {"PG_VERSION", "backup_label", "recovery.signal", "global/pg_control"} <= names
    assert "restore_command = 'true'" in text
    assert f"recovery_target_lsn = '{info.end_lsn}'" in text
    assert "recovery_target_action = 'promote'" in text
    with pytest.raises(restore.RestoreError, match="exists: refusing to overwrite"):
        restore.restore_archive(stored, info, archive, key=None, restore_command=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["srv.tar.zst"]


def test_wal_get(stored: Catalog, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no WAL file 000000010000000000000042"):
        restore.wal_get(stored, "000000010000000000000042", tmp_path / "x", None)
    with pytest.raises(StorageError, match="not a WAL segment"):
        restore.wal_get(stored, "../../etc/passwd", tmp_path / "x", None)
    stored.create()
    (stored.incoming_dir / "000000010000000000000043.partial").write_bytes(b"partial")
    try:
        restore.wal_get(stored, "000000010000000000000043", tmp_path / "x", None)
        assert (tmp_path / "x").read_bytes() == b"partial"
    finally:
        (stored.incoming_dir / "000000010000000000000043.partial").unlink()


def test_incremental_restore_needs_its_chain(new_cluster: NewCluster, tmp_path: Path) -> None:
    server = new_cluster("bk-chain", settings={"summarize_wal": "on"})
    server.execute(f"CREATE ROLE backup LOGIN REPLICATION PASSWORD '{BACKUP_PASSWORD}'")
    catalog = Catalog(tmp_path / "store", "srv")
    entry = server_entry(server, "srv")
    full = BaseBackup(catalog, entry, collector_config(), Codec()).run()
    incremental = BaseBackup(catalog, entry, collector_config(), Codec(), incremental=True).run()
    assert incremental.parent == full.id
    with pytest.raises(StorageError, match="is the parent of"):
        catalog.delete(full.id)
    catalog.delete(full.id, force=True)
    with pytest.raises(restore.RestoreError, match=f"needs {full.id}, which is gone"):
        restore.restore(catalog, incremental, tmp_path / "data", key=None, restore_command=None)
    assert not (tmp_path / "data").exists()
