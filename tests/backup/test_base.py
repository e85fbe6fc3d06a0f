"""Base backups on a real server: every codec round trip, refusals, and dying half-way."""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgfleet.backup import base, restore
from pgfleet.backup.base import BackupError, BaseBackup, parse_max_rate
from pgfleet.backup.catalog import Catalog, Kind, NotFound, State
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
    rows,
    server_entry,
    server_side_pgfleet,
    start_cluster,
    start_restored,
    wait_backup_streaming,
)

NO_TABLESPACES = (
    "pgfleet backs up only servers whose data is all in pg_default and pg_global "
    "(tablespaces are not supported yet)"
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
    server: Cluster, tmp_path: Path, clusters_dir: Path, compression: Compression, encrypted: bool
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
    # No WAL store named: no recovery.signal, which PostgreSQL refuses without
    # a restore_command; the backup's own WAL makes it consistent.
    assert not (target / "recovery.signal").exists()
    assert (target / "backup_label").read_text().startswith("START WAL LOCATION")
    if not encrypted:
        moved = clusters_dir / f"restored-{compression.value}"
        target.rename(moved)
        restored = start_restored(server, moved, moved.name)
        try:
            assert restored.execute("SELECT count(*) FROM pg_class")[0][0] > 0
        finally:
            restored.destroy()


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
        with pytest.raises(BackupError) as raised:
            backup(server, catalog, codec).run()
    finally:
        server.execute("DROP TABLESPACE extra")
    assert str(raised.value) == f"server 'srv': has tablespaces (extra): {NO_TABLESPACES}"
    # A transfer rate pg_basebackup would refuse, refused before anything begins.
    for rate in ("fast", "10G", "1k", "5 MB"):
        with pytest.raises(BackupError, match=f"server 'srv': max_rate: .*{rate!r}"):
            backup(server, catalog, codec, max_rate=rate).run()
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


def test_tablespace_made_after_the_check(
    server: Cluster, tmp_path: Path, clusters_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tablespace the check did not see (made in between): pg_basebackup's refusal, one line."""
    catalog = Catalog(tmp_path / "store", "srv")
    facts = base.server_facts
    monkeypatch.setattr(
        base, "server_facts", lambda conn: dataclasses.replace(facts(conn), tablespaces=())
    )
    location = clusters_dir / "bk-tablespace-late"
    location.mkdir()
    hand_over(location)
    server.execute(f"CREATE TABLESPACE late LOCATION '{location}'")
    try:
        with pytest.raises(BackupError) as raised:
            backup(server, catalog, Codec()).run()
    finally:
        server.execute("DROP TABLESPACE late")
    message = str(raised.value)
    assert message.startswith("server 'srv': pg_basebackup failed: can only write single")
    assert message.endswith(f"(the server has tablespaces: {NO_TABLESPACES})")
    assert "\n" not in message
    [info] = catalog.list()
    assert info.state is State.INVALID and info.error == message
    assert sorted(p.name for p in catalog.backup_dir(info.id).iterdir()) == ["backup.json"]


def test_parse_max_rate() -> None:
    assert parse_max_rate("32") == parse_max_rate("32k") == parse_max_rate(" 32 k ") == 32
    assert parse_max_rate("20M") == 20 * 1024
    assert parse_max_rate("1.5M") == 1536
    assert parse_max_rate("1024M") == 1024 * 1024
    for bad in ("", "k", "-5", "10m", "10MB", "10G", "31", "1025M"):
        with pytest.raises(ValueError, match="transfer rate"):
            parse_max_rate(bad)


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


def _in_background(job: BaseBackup) -> tuple[threading.Thread, list[BaseException]]:
    """``job.run()`` started in a thread; what it raises goes to the list."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            job.run()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, name="base backup")
    t.start()
    return t, errors


def test_pg_basebackup_killed(server: Cluster, tmp_path: Path) -> None:
    """pg_basebackup dies mid-backup: the backup is INVALID, its files gone."""
    catalog = Catalog(tmp_path / "store", "srv")
    job = backup(server, catalog, Codec(), max_rate="32k")
    t, errors = _in_background(job)
    _wait_for_bytes(catalog)
    proc = job._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGKILL)
    t.join(60)
    assert len(errors) == 1 and isinstance(errors[0], BackupError), errors
    assert "pg_basebackup failed" in str(errors[0])
    # The server is fine, and the error does not say otherwise.
    assert "connection to the server was lost" not in str(errors[0])
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


@pytest.mark.parametrize("how", ["restart", "crash"])
def test_server_restarted_during_a_backup(
    how: str, clusters_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server restarts (fast) or crashes (immediate stop, start) under a backup.

    That backup fails in one line saying why, INVALID, nothing of it left; the
    next one, once the server is back, is whole, and restores to a server
    holding the rows of before and after.
    """
    # The restore at the end runs it as the server's OS user: skip before the work.
    program = shlex.split(server_side_pgfleet())
    name = f"bk-{how}"
    server = start_cluster("18", clusters_dir / name)
    made = [server]
    try:
        server.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i")
        store = clusters_dir / f"{name}-store"  # where the server's OS user may read
        catalog = Catalog(store, "srv")
        # At 1 MB/s the ~25 MB of a new cluster take 20 s or more, a restart a second.
        # Uncompressed: what is stored grows with what came, a MiB at a time.
        job = backup(server, catalog, Codec(Compression.NONE), max_rate="1M")
        t, errors = _in_background(job)
        wait_backup_streaming(server)
        # And some of it stored: what the server sent first may still sit in
        # its buffers (an immediate stop loses it), out of pg_basebackup's sight.
        _wait_for_bytes(catalog, 1 << 20)
        partial = list(catalog.backups_dir.glob("*/.tmp-*"))
        assert partial
        if how == "restart":
            server.restart()
        else:
            server.stop(mode="immediate")
            server.start()
        t.join(60)
        if t.is_alive():
            job.cancel()
            t.join(30)
            pytest.fail("the backup went on after its server went away")

        assert len(errors) == 1 and isinstance(errors[0], BackupError), errors
        message = str(errors[0])
        assert "\n" not in message
        assert message.startswith(
            "server 'srv': pg_basebackup failed: the connection to the server was lost "
            "(was the server shut down, restarted or crashed during the backup?): "
        ), message
        # ... and only that line: nothing else (psycopg's warnings) to wade through.
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        [failed] = catalog.list()
        assert failed.state is State.INVALID and failed.error == message
        assert sorted(p.name for p in catalog.backup_dir(failed.id).iterdir()) == ["backup.json"]
        assert not any(p.exists() for p in partial)
        with pytest.raises(NotFound):
            catalog.get("latest")
        with pytest.raises(restore.RestoreError, match="is invalid"):
            restore.choose(catalog, failed.id)

        # The server is back: the next backup is whole.
        server.execute("INSERT INTO t SELECT generate_series(1001, 2000)")
        info = backup(server, catalog, Codec()).run()
        assert info.state is State.VALID and catalog.get("latest").id == info.id
        result = verify(catalog, info.id, None)
        assert result.ok, result.problems

        hand_over(store)  # restore_command runs as the server's OS user
        target = clusters_dir / f"{name}-restored"
        command = restore.wal_get_command(catalog, program=program)
        restore.restore(catalog, info, target, key=None, restore_command=command)
        restored = start_restored(server, target, f"{name}-restored")
        made.append(restored)
        assert rows(restored) == list(range(1, 2001))
    finally:
        for cluster in reversed(made):
            try:
                cluster.destroy()
            except ClusterError:
                cluster.kill()


def test_idle_session_timeout_keeps_the_slot(clusters_dir: Path) -> None:
    """A server whose idle_session_timeout is shorter than the backup: the
    session holding the temporary slot (idle throughout) is not ended, and
    the slot keeps the backup's WAL to the end."""
    server = start_cluster("18", clusters_dir / "bk-idle")
    try:
        server.execute("ALTER SYSTEM SET idle_session_timeout = '200ms'")
        server.execute("SELECT pg_reload_conf()")
        catalog = Catalog(clusters_dir / "bk-idle-store", "srv")
        job = backup(server, catalog, Codec(Compression.NONE), max_rate="4M")
        t, errors = _in_background(job)
        try:
            wait_backup_streaming(server)
        except AssertionError:
            t.join(10)
            raise AssertionError(f"no backup streaming; the backup raised {errors}") from None
        time.sleep(1.0)  # five times the timeout
        held = server.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgfleet_backup_%'"
        )
        t.join(120)
        assert not t.is_alive() and errors == []
        assert held[0][0] == 1
        assert catalog.get("latest").state is State.VALID
    finally:
        server.destroy()
