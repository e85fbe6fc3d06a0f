"""Base backups on a real server: every codec round trip, refusals, and dying half-way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgfleet.backup import restore
from pgfleet.backup.base import BackupError, BaseBackup
from pgfleet.backup.catalog import Catalog, Kind, State
from pgfleet.backup.manifest import verify_dir
from pgfleet.backup.store import Codec, Compression
from pgfleet.backup.tools import find_program, replication_target
from pgfleet.backup.verify import read_manifest, verify
from pgfleet.cluster import Cluster
from pgfleet.errors import ClusterError
from tests.backup.helpers import (
    BACKUP_PASSWORD,
    KEY,
    collector_config,
    hand_over,
    server_entry,
    start_cluster,
)


@pytest.fixture(scope="module")
def server(clusters_dir: Path) -> Iterator[Cluster]:
    """A small PostgreSQL 18 with a table, backed up as the password-protected role 'backup'."""
    cluster = start_cluster("18", clusters_dir / "bk-base")
    cluster.execute("CREATE TABLE t AS SELECT i, md5(i::text) AS v FROM generate_series(1, 2000) i")
    yield cluster
    try:
        cluster.destroy()
    except ClusterError:
        cluster.kill()


# The round trips that go on to restore (the PITR tests restore others).
RESTORED = {(Compression.NONE, False), (Compression.LZ4, True)}


def backup(cluster: Cluster, catalog: Catalog, codec: Codec, **kw: object) -> BaseBackup:
    return BaseBackup(catalog, server_entry(cluster, "srv"), collector_config(), codec, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
@pytest.mark.parametrize("compression", list(Compression))
def test_round_trip(
    server: Cluster, tmp_path: Path, compression: Compression, encrypted: bool
) -> None:
    """Backed up, verified, restored: every file of the data directory as the manifest says."""
    catalog = Catalog(tmp_path / "store", "srv")
    codec = Codec(compression, key=KEY if encrypted else None)
    info = backup(server, catalog, codec, label="round trip").run()
    assert info.state is State.VALID and info.kind is Kind.FULL
    assert info.files == (f"base.tar{codec.suffix}", f"backup_manifest{codec.suffix}")
    assert info.compression is compression and info.encrypted is encrypted
    assert info.start_lsn and info.end_lsn and info.timeline == 1
    assert info.start_wal and info.end_wal and info.start_wal <= info.end_wal
    assert info.pg_version and info.pg_version // 10000 == 18
    assert info.system_identifier and info.label == "round trip"
    assert info.raw_bytes > info.stored_bytes or compression is Compression.NONE
    assert catalog.get("latest").id == info.id

    result = verify(catalog, info.id, KEY if encrypted else None)
    assert result.ok, result.problems
    if (compression, encrypted) not in RESTORED:
        return  # verify decoded it all already; restores are slow on this disk

    target = tmp_path / "restored"
    restore.restore(catalog, info, target, key=KEY if encrypted else None, restore_command=None)
    manifest = read_manifest(catalog, info, KEY if encrypted else None)
    assert verify_dir(target, manifest) == []
    assert (target / "recovery.signal").exists()
    assert (target / "backup_label").read_text().startswith("START WAL LOCATION")


def test_password_goes_to_the_environment(server: Cluster) -> None:
    target = replication_target(
        server_entry(server, "srv"), collector_config(), application_name="pgfleet test"
    )
    assert BACKUP_PASSWORD not in " ".join(target.args())
    assert "password=" not in target.conninfo
    assert target.env["PGPASSWORD"] == BACKUP_PASSWORD
    assert "require_auth=" in target.conninfo


def test_refusals(server: Cluster, tmp_path: Path, clusters_dir: Path) -> None:
    catalog = Catalog(tmp_path / "store", "srv")
    codec = Codec()
    # Incremental: PostgreSQL 17+ with summarize_wal, and a backup to go against.
    with pytest.raises(BackupError, match="need summarize_wal = on"):
        backup(server, catalog, codec, incremental=True).run()
    server.execute("ALTER SYSTEM SET summarize_wal = on")
    server.execute("SELECT pg_reload_conf()")
    try:
        with pytest.raises(BackupError, match="take a full backup first"):
            backup(server, catalog, codec, incremental=True).run()
    finally:
        server.execute("ALTER SYSTEM RESET summarize_wal")
        server.execute("SELECT pg_reload_conf()")
    # A role that may not replicate.
    server.execute("ALTER ROLE backup NOREPLICATION")
    try:
        with pytest.raises(BackupError, match="'backup' may not replicate"):
            backup(server, catalog, codec).run()
    finally:
        server.execute("ALTER ROLE backup REPLICATION")
    # Tablespaces.
    location = clusters_dir / "bk-tablespace"
    location.mkdir()
    hand_over(location)
    server.execute(f"CREATE TABLESPACE extra LOCATION '{location}'")
    try:
        with pytest.raises(BackupError, match=r"has tablespaces \(extra\)"):
            backup(server, catalog, codec).run()
    finally:
        server.execute("DROP TABLESPACE extra")
    # A wrong password: the child program is told no.
    os.environ["PGFLEET_PW_BACKUP_TESTS"] = "wrong"
    try:
        entry = server_entry(server, "srv")
        os.environ["PGFLEET_PW_BACKUP_TESTS"] = "wrong"
        with pytest.raises(BackupError, match="password authentication failed"):
            BaseBackup(catalog, entry, collector_config(), codec).run()
    finally:
        os.environ["PGFLEET_PW_BACKUP_TESTS"] = BACKUP_PASSWORD
    assert catalog.list() == []  # nothing was begun


def test_find_program_prefers_the_lowest_suitable() -> None:
    p = find_program("pg_basebackup", 15)
    assert p.major >= 16  # Debian's 15 cannot refuse cleartext passwords: passed over
    assert find_program("pg_combinebackup", 15, minimum=17, connects=False).major >= 17


def _wait_for_bytes(catalog: Catalog, minimum: int = 1, timeout: float = 30.0) -> None:
    """Until a backup's temporary base.tar holds ``minimum`` bytes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in catalog.backups_dir.glob("*/.tmp-base.tar*"):
            try:
                if d.stat().st_size >= minimum:
                    return
            except FileNotFoundError:
                pass
        time.sleep(0.02)
    raise AssertionError("the backup never started writing")


def test_pg_basebackup_killed(server: Cluster, tmp_path: Path) -> None:
    """pg_basebackup dies mid-backup: the backup is INVALID, its files gone."""
    catalog = Catalog(tmp_path / "store", "srv")
    job = backup(server, catalog, Codec(), max_rate="32k")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            job.run()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    _wait_for_bytes(catalog)
    proc = job._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGKILL)
    t.join(60)
    assert len(errors) == 1 and isinstance(errors[0], BackupError), errors
    assert "pg_basebackup failed" in str(errors[0])
    [info] = catalog.list()
    assert info.state is State.INVALID and "pg_basebackup failed" in (info.error or "")
    assert sorted(p.name for p in catalog.backup_dir(info.id).iterdir()) == ["backup.json"]
    # Nothing looks valid; restoring it is refused.
    with pytest.raises(restore.RestoreError, match="is invalid"):
        restore.choose(catalog, info.id)


def test_taker_killed(server: Cluster, tmp_path: Path) -> None:
    """The process taking a backup dies: IN_PROGRESS, never VALID; cleanup() settles it."""
    store = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from pgfleet.backup.base import BaseBackup
        from pgfleet.backup.catalog import Catalog
        from pgfleet.backup.store import Codec
        from pgfleet.repository.servers import Server
        from pgfleet.config import CollectorConfig
        os.environ["PGFLEET_PW_X"] = {BACKUP_PASSWORD!r}
        server = Server(srvid=1, alias="srv", host={server.host!r}, port={server.port},
                        username="backup", password_ref="env:PGFLEET_PW_X")
        BaseBackup(Catalog(Path({str(store)!r}), "srv"), server, CollectorConfig(), Codec(),
                   max_rate="32k").run()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    catalog = Catalog(store, "srv")
    try:
        _wait_for_bytes(catalog)
    finally:
        proc.kill()
        proc.wait()
    [info] = catalog.list()
    assert info.state is State.IN_PROGRESS
    leftovers = list(catalog.backup_dir(info.id).glob(".tmp-*"))
    assert leftovers
    with pytest.raises(restore.RestoreError, match="in_progress"):
        restore.choose(catalog, info.id)
    done = catalog.cleanup(grace=0)
    assert any("interrupted backup marked invalid" in line for line in done), done
    [info] = catalog.list()
    assert info.state is State.INVALID
    assert sorted(p.name for p in catalog.backup_dir(info.id).iterdir()) == ["backup.json"]
