"""The collector daemon runs the backups: a real ``pgfleet collector`` and a real server.

The daemon streams the WAL of the server it holds, takes its scheduled base
backups, exports them on /metrics and answers ``pgfleet ctl backup ...``;
stopped (SIGTERM) or killed mid-backup, it never leaves a backup that looks
valid; a full backup disk fails a backup cleanly and deletes nothing valid.

A backup is slowed down on purpose through ``[backup] bin_dir``: a
``pg_basebackup`` there runs the real one with ``-r RATE`` while a file says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgfleet import config
from pgfleet.backup import schedule
from pgfleet.backup.catalog import BackupInfo, Catalog, State
from pgfleet.backup.service import BackupService, ServerBackups, next_due
from pgfleet.backup.verify import verify
from pgfleet.cluster import Cluster
from pgfleet.collector.stats import Stats
from pgfleet.errors import ClusterError
from pgfleet.management.client import Client, Unreachable
from pgfleet.management.document import ManagementError
from pgfleet.repository.servers import Server
from tests.backup.helpers import BACKUP_PASSWORD, PASSWORD_ENV, register, start_cluster, switch_wal
from tests.fix_clusters import NewDatabase
from tests.fix_daemon import DaemonFactory, DaemonProcess, wait_until
from tests.fix_repository import new_repository

ALIAS = "db1"
PROMTOOL = shutil.which("promtool")


@pytest.fixture(scope="module")
def server(clusters_dir: Path) -> Iterator[Cluster]:
    """A small PostgreSQL 18 backed up as the password-protected role 'backup'."""
    cluster = start_cluster("18", clusters_dir / "bk-service")
    cluster.execute("CREATE TABLE t AS SELECT i, md5(i::text) AS v FROM generate_series(1, 5000) i")
    yield cluster
    try:
        cluster.destroy()
    except ClusterError:
        cluster.kill()


@pytest.fixture
def repo(repo_cluster: Cluster, new_database: NewDatabase, server: Cluster) -> str:
    """A fresh repository with the server registered as 'db1'."""
    dsn = new_repository(repo_cluster, new_database)
    register(dsn, server, ALIAS)
    return dsn


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for the management socket (sun_path holds 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pgf-"))
    yield path / "run"
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class SlowBin:
    """``[backup] bin_dir`` whose pg_basebackup is throttled while ``rate`` holds a rate."""

    directory: Path

    def slow(self, rate: str = "1M") -> None:
        (self.directory / "rate").write_text(rate)

    def fast(self) -> None:
        (self.directory / "rate").unlink(missing_ok=True)


@pytest.fixture
def slow_bin(tmp_path: Path, server: Cluster) -> SlowBin:
    d = tmp_path / "bin"
    d.mkdir()
    real = server.bin_dir
    script = d / "pg_basebackup"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = --version ] && exec "{real}/pg_basebackup" "$@"\n'
        f'RATE=$(cat "{d}/rate" 2>/dev/null)\n'
        f'[ -n "$RATE" ] && exec "{real}/pg_basebackup" "$@" -r "$RATE"\n'
        f'exec "{real}/pg_basebackup" "$@"\n'
    )
    script.chmod(0o755)
    for name in ("pg_receivewal", "pg_combinebackup"):
        (d / name).symlink_to(real / name)
    return SlowBin(d)


@dataclass
class Running:
    d: DaemonProcess
    socket: Path
    directory: Path

    @property
    def catalog(self) -> Catalog:
        return Catalog(self.directory, ALIAS)

    def call(self, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            async with await Client.local(self.socket, timeout=10) as c:
                return await c.call(command, args)

        return asyncio.run(go())

    def status(self) -> dict[str, Any]:
        servers = self.call("backup status")["Servers"]
        assert [s["server"] for s in servers] == [ALIAS], servers
        found: dict[str, Any] = servers[0]
        return found

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """``pgfleet_backup_*`` samples: name -> sorted labels -> value."""
        with urllib.request.urlopen(self.d.exporter_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("pgfleet_backup_"):
                    out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out

    def backup_text(self) -> str:
        """The ``pgfleet_backup_*`` lines of /metrics (HELP and TYPE included)."""
        with urllib.request.urlopen(self.d.exporter_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        keep = []
        for line in text.splitlines():
            # "# HELP name ...", "# TYPE name ...", "name{labels} value"
            name = line.split(" ")[2] if line.startswith("#") else line
            if name.startswith("pgfleet_backup_"):
                keep.append(line + "\n")
        return "".join(keep)

    def backups(self) -> list[BackupInfo]:
        return self.catalog.list()


def start(
    daemon: DaemonFactory,
    repo: str,
    sockdir: Path,
    directory: Path,
    *,
    name: str = "d",
    **backup: Any,
) -> Running:
    settings: dict[str, Any] = {"directory": str(directory), "enabled": True, **backup}
    d = daemon(
        repo,
        name=name,
        env={PASSWORD_ENV: BACKUP_PASSWORD},
        backup=settings,
        management={"unix_socket_dir": str(sockdir)},
    )
    r = Running(d, sockdir / "pgfleet.sock", directory)
    wait_until(lambda: _answers(r), 30, "the management socket")
    wait_until(lambda: r.call("backup status")["Servers"], 30, "db1 held by the collector")
    return r


def _answers(r: Running) -> bool:
    assert r.d.alive(), r.d.text()[-3000:]
    if not r.socket.exists():
        return False
    try:
        return r.call("ping") == {}
    except Unreachable:
        return False


def switch(server: Cluster, catalog: Catalog) -> str:
    """Write something, end the WAL segment, wait until it is stored; its name.

    (A segment with nothing of importance written since the last switch is
    not switched.)
    """
    server.execute("INSERT INTO t VALUES (0, 'switch')")
    return switch_wal(server, catalog, timeout=60)


def one(samples: dict[tuple[tuple[str, str], ...], float], **labels: str) -> float:
    key = tuple(sorted({"server": ALIAS, **labels}.items()))
    assert key in samples, (key, samples)
    return samples[key]


def valid(r: Running) -> list[BackupInfo]:
    return [b for b in r.backups() if b.state is State.VALID]


def copied(repo: str) -> list[tuple[str, str]]:
    """The repository's copy of the server's catalog (for the web UI): (id, state)."""
    with psycopg.connect(repo, autocommit=True) as conn:
        return [
            (str(r[0]), str(r[1]))
            for r in conn.execute(
                "SELECT backup_id, state FROM pgfleet.backups JOIN pgfleet.servers"
                " USING (srvid) WHERE alias = %s ORDER BY backup_id",
                (ALIAS,),
            )
        ]


# -- What the daemon runs


def test_receiver_schedule_metrics_and_commands(
    repo: str,
    daemon: DaemonFactory,
    server: Cluster,
    tmp_path: Path,
    sockdir: Path,
    slow_bin: SlowBin,
) -> None:
    r = start(daemon, repo, sockdir, tmp_path / "backups", schedule="1d", bin_dir=str(
        slow_bin.directory))  # fmt: skip

    # The receiver streams: a segment switched is soon in the WAL store.
    wait_until(
        lambda: (r.status()["receiver"] or {}).get("state") == "streaming", 30, "the receiver"
    )
    segment = switch(server, r.catalog)
    assert r.catalog.wal_file(segment) is not None
    assert server.execute(
        "SELECT active FROM pg_replication_slots WHERE slot_name = 'pgfleet_db1'"
    ) == [(True,)]

    # No valid backup: the scheduled one is due at once, and the next a day after its start.
    wait_until(lambda: valid(r), 60, "the first scheduled backup")
    first = valid(r)[0]
    assert first.label == "pgfleet db1 schedule"
    wait_until(lambda: r.status()["job"] is None, 30, "the job to end")
    status = r.status()
    assert status["enabled"] is True and status["schedule"] == "1d"
    assert status["backups"]["valid"] == 1 and status["latest"]["id"] == first.id
    assert datetime.fromisoformat(status["next_backup"]) == first.started + timedelta(days=1)
    assert status["last_result"]["outcome"] == "valid"
    assert status["last_retention"]["error"] is None  # retention ran after it
    assert r.d.find("backup taken", backup=first.id, trigger="schedule")

    # /metrics, once the receiver measured its lag (every 10 s).
    def lag_measured() -> Any:
        return r.metrics().get("pgfleet_backup_wal_lag_bytes")

    wait_until(lag_measured, 30, "the receiver's lag on /metrics")
    m = r.metrics()
    assert one(m["pgfleet_backup_backups"], state="valid") == 1
    assert one(m["pgfleet_backup_backups"], state="in_progress") == 0
    assert 0 < one(m["pgfleet_backup_stored_bytes"]) < one(m["pgfleet_backup_raw_bytes"])
    assert one(m["pgfleet_backup_latest_raw_bytes"]) == first.raw_bytes
    assert first.finished is not None
    assert one(m["pgfleet_backup_last_success_timestamp_seconds"]) == pytest.approx(
        first.finished.timestamp()
    )
    assert abs(one(m["pgfleet_backup_last_success_timestamp_seconds"]) - time.time()) < 300
    assert one(m["pgfleet_backup_interval_seconds"]) == 86400
    assert one(m["pgfleet_backup_next_timestamp_seconds"]) == pytest.approx(
        first.started.timestamp() + 86400
    )
    assert one(m["pgfleet_backup_running"]) == 0
    assert one(m["pgfleet_backup_wal_receiver_up"]) == 1
    assert one(m["pgfleet_backup_wal_receiver_state"]) == 2
    assert 0 <= one(m["pgfleet_backup_wal_lag_bytes"]) < 2 * 16 << 20
    assert one(m["pgfleet_backup_wal_segments_stored_total"]) >= 1
    assert one(m["pgfleet_backup_wal_segments"]) >= 1
    assert one(m["pgfleet_backup_runs_total"], outcome="valid") == 1
    assert one(m["pgfleet_backup_runs_total"], outcome="failed") == 0
    assert one(m["pgfleet_backup_retention_runs_total"], outcome="ok") >= 1
    assert m["pgfleet_backup_queued"] == {(): 0.0}
    text = r.backup_text()
    assert "# TYPE pgfleet_backup_runs_total counter" in text, text[:2000]
    if PROMTOOL is not None:  # the families pass promtool's lint
        res = subprocess.run([PROMTOOL, "check", "metrics"], input=text,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert (res.returncode, res.stdout + res.stderr) == (0, ""), res.stdout + res.stderr

    # pgfleet ctl backup ...: on demand, listed, verified, retained.
    got = r.call("backup create", {"Server": ALIAS})
    assert got["Started"] is True and got["Job"]["trigger"] == "manual"
    assert r.call("backup create", {"Server": ALIAS})["Started"] is False  # one at a time
    wait_until(lambda: len(valid(r)) == 2, 60, "the manual backup")
    second = valid(r)[1]
    listed = r.call("backup ls", {"Server": ALIAS})["Backups"]
    assert [b["id"] for b in listed] == [first.id, second.id]
    assert listed[1]["label"] == "pgfleet db1 manual" and listed[1]["duration_seconds"] >= 0
    got = r.call("backup verify", {"Server": ALIAS, "Backup": "latest"})
    assert got["Backup"] == second.id and got["Started"] is True

    def verified() -> Any:
        v = r.call("backup info", {"Server": ALIAS, "Backup": second.id})["Verify"]
        return v if v and v["state"] not in ("queued", "running") else None

    assert wait_until(verified, 60, "the verification")["state"] == "intact"
    got = r.call("backup retain", {"Server": ALIAS})
    assert got["Retention"] == "7,-,-,-" and got["Kept"] == [first.id, second.id]
    assert got["Deleted"] == []
    m = r.metrics()
    assert one(m["pgfleet_backup_verifications_total"], outcome="intact") == 1
    assert one(m["pgfleet_backup_runs_total"], outcome="valid") == 2

    assert r.d.stop() == 0
    assert r.d.find("wal receiver stopped", server=ALIAS)
    # The slot stays (the server keeps the WAL for the receiver's return), unused.
    assert server.execute(
        "SELECT active FROM pg_replication_slots WHERE slot_name = 'pgfleet_db1'"
    ) == [(False,)]


def test_stopped_or_killed_mid_backup(
    repo: str,
    daemon: DaemonFactory,
    tmp_path: Path,
    sockdir: Path,
    slow_bin: SlowBin,
) -> None:
    slow_bin.slow("1M")
    r = start(daemon, repo, sockdir, tmp_path / "backups", schedule="1d", wal_streaming=False,
              bin_dir=str(slow_bin.directory))  # fmt: skip

    def in_progress() -> list[BackupInfo]:
        return [b for b in r.backups() if b.state is State.IN_PROGRESS]

    # SIGTERM: the backup is cancelled, INVALID, its files gone, before the exit.
    wait_until(in_progress, 30, "a backup in progress")
    assert r.status()["job"]["state"] == "running"
    assert one(r.metrics()["pgfleet_backup_running"]) == 1
    stopped = in_progress()[0]
    time.sleep(1)  # well into pg_basebackup's stream
    assert r.d.stop() == 0
    after = r.catalog.get(stopped.id)
    assert after.state is State.INVALID and "cancelled" in (after.error or "")
    assert sorted(p.name for p in r.catalog.backup_dir(stopped.id).iterdir()) == ["backup.json"]
    assert r.d.find("backups cancelled: the collector stops")
    assert r.d.find("backup cancelled", backup=stopped.id)
    assert copied(repo) == [(stopped.id, "invalid")]  # the copy says so before the exit

    # SIGKILL: the backup stays IN_PROGRESS (never VALID)...
    r.d.start()
    wait_until(lambda: _answers(r), 30, "the management socket")
    wait_until(in_progress, 30, "another backup in progress")
    killed = in_progress()[0]
    time.sleep(1)
    r.d.kill()
    assert r.catalog.get(killed.id).state is State.IN_PROGRESS
    # (pg_basebackup, orphaned, dies at its next write into the closed pipe.)

    # ...until the restart's cleanup marks it INVALID, its files removed; then a
    # backup is taken, and retention deletes the invalid ones older than it.
    slow_bin.fast()
    r.d.start()
    wait_until(lambda: valid(r), 60, "a valid backup after the restart")
    assert r.d.find(
        "backup catalog cleaned up",
        server=ALIAS,
        what=f"{killed.id}: interrupted backup marked invalid, its files removed",
    )
    wait_until(lambda: r.status()["job"] is None, 30, "the job to end")
    assert [b.state for b in r.backups()] == [State.VALID]
    assert r.d.find("retention applied", deleted=f"{stopped.id},{killed.id}")
    assert r.d.stop() == 0


def test_catalog_copied_into_the_repository(
    repo: str,
    repo_cluster: Cluster,
    daemon: DaemonFactory,
    tmp_path: Path,
    sockdir: Path,
    slow_bin: SlowBin,
) -> None:
    """The web UI's backups: the daemon copies the catalog into the repository,
    a backup as it runs and once taken, a deletion; a backup taken while the
    repository is down is copied once it is back."""
    slow_bin.slow("10M")
    r = start(daemon, repo, sockdir, tmp_path / "backups", schedule="", wal_streaming=False,
              bin_dir=str(slow_bin.directory))  # fmt: skip
    assert r.call("backup create", {"Server": ALIAS})["Started"] is True
    wait_until(lambda: [s for _, s in copied(repo)] == ["in_progress"], 30, "a running backup")
    wait_until(lambda: valid(r), 60, "the backup")
    first = valid(r)[0]
    wait_until(lambda: copied(repo) == [(first.id, "valid")], 30, "the backup copied")
    with psycopg.connect(repo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT kind, started, finished, start_lsn::text, end_lsn::text, timeline,"
            " start_wal, end_wal, raw_bytes, stored_bytes, error FROM pgfleet.backups"
        ).fetchone()
    assert row == (str(first.kind), first.started, first.finished, first.start_lsn,
                   first.end_lsn, first.timeline, first.start_wal, first.end_wal,
                   first.raw_bytes, first.stored_bytes, None)  # fmt: skip

    # The repository down: backups go on, the copy waits for it.
    slow_bin.fast()
    repo_cluster.stop()
    try:
        assert r.call("backup create", {"Server": ALIAS})["Started"] is True
        wait_until(lambda: len(valid(r)) == 2, 60, "a backup while the repository is down")
        wait_until(
            lambda: r.d.find("backup lists not copied to the repository: tried again later"),
            30,
            "the copy's failure said",
        )
        assert r.status()["last_result"]["outcome"] == "valid"
    finally:
        repo_cluster.start()
    second = valid(r)[1]
    wait_until(lambda: copied(repo) == [(first.id, "valid"), (second.id, "valid")], 90,
               "the copy once the repository is back")  # fmt: skip
    assert r.d.find("backup lists copied to the repository again")

    # Deleted: gone from the copy too.
    assert r.call("backup delete", {"Server": ALIAS, "Backup": first.id})["Deleted"] is True
    wait_until(lambda: copied(repo) == [(second.id, "valid")], 30, "the deletion copied")
    assert r.d.stop() == 0


def test_reload(
    repo: str, daemon: DaemonFactory, tmp_path: Path, sockdir: Path, server: Cluster
) -> None:
    r = start(daemon, repo, sockdir, tmp_path / "backups", schedule="")
    wait_until(lambda: r.status()["receiver"], 30, "the receiver")
    assert r.status()["next_backup"] is None  # on demand only

    # SIGHUP: no more streaming, a schedule, lz4; the directory waits for a restart.
    r.d.sections["backup"].update(
        wal_streaming=False, schedule="6h", compression="lz4", directory=str(tmp_path / "other")
    )
    r.d.write_config()
    r.d.signal(signal.SIGHUP)
    wait_until(lambda: r.status()["receiver"] is None, 30, "the receiver to stop")
    assert r.d.find("settings changed that need a restart: old values kept",
                    settings="backup.directory")  # fmt: skip
    status = r.status()
    assert (status["schedule"], status["compression"]) == ("6h", "lz4")
    # No valid backup: the new schedule's first is due at once, written as now said.
    wait_until(lambda: valid(r), 60, "the first scheduled backup")
    assert valid(r)[0].compression == "lz4"
    assert all(f.endswith(".lz4") for f in valid(r)[0].files)
    assert not (tmp_path / "other").exists()

    # A key file that cannot be read fails the reload: nothing changes.
    r.d.sections["backup"].update(
        encryption="aes-256-gcm", encryption_key_file=str(tmp_path / "no-key")
    )
    r.d.write_config()
    r.d.signal(signal.SIGHUP)
    wait_until(lambda: r.d.find("reload failed, configuration unchanged"), 30, "the refusal")
    assert r.status()["encrypted"] is False

    # conf set applies at once too: streaming again.
    got = r.call("conf set", {"ConfigKey": "backup.wal_streaming", "ConfigValue": "true"})
    assert got["NewValue"] is True and got["Restart"] is False
    wait_until(
        lambda: (r.status()["receiver"] or {}).get("state") == "streaming", 30, "the receiver"
    )
    assert r.d.stop() == 0


def test_receiver_follows_the_lease(
    repo: str, daemon: DaemonFactory, tmp_path: Path, sockdir: Path, server: Cluster
) -> None:
    """Two collectors share the fleet: only the one holding db1 streams and backs it up."""
    other_dir = Path(tempfile.mkdtemp(prefix="pgf-")) / "run"
    try:
        a = start(daemon, repo, sockdir, tmp_path / "backups", name="a", schedule="")
        wait_until(lambda: a.status()["receiver"], 30, "a's receiver")
        b = daemon(
            repo,
            name="b",
            env={PASSWORD_ENV: BACKUP_PASSWORD},
            backup={"directory": str(tmp_path / "backups"), "enabled": True, "schedule": ""},
            management={"unix_socket_dir": str(other_dir)},
        )
        rb = Running(b, other_dir / "pgfleet.sock", tmp_path / "backups")
        wait_until(lambda: _answers(rb), 30, "b's management socket")
        time.sleep(3)  # a lease period and more: b took nothing from a
        assert rb.call("backup status")["Servers"] == []
        e = _refusal(rb, "backup create", {"Server": ALIAS})
        assert "another collector holds it" in e

        # a stops: b takes the lease, and with it the receiver.
        assert a.d.stop() == 0
        wait_until(lambda: rb.call("backup status")["Servers"], 30, "b to hold db1")
        wait_until(
            lambda: (rb.status()["receiver"] or {}).get("state") == "streaming", 60, "b's receiver"
        )
        switch(server, rb.catalog)
        assert b.stop() == 0
    finally:
        shutil.rmtree(other_dir.parent, ignore_errors=True)


def _refusal(r: Running, command: str, args: dict[str, Any]) -> str:
    with pytest.raises(ManagementError) as e:
        r.call(command, args)
    return e.value.message


# -- A full backup disk


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {p.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_backup_disk(
    repo: str, daemon: DaemonFactory, server: Cluster, tmp_path: Path, sockdir: Path
) -> None:
    with tmpfs(tmp_path / "small", "64m") as disk:
        # On demand only, no WAL streaming: the test says when something is written.
        r = start(daemon, repo, sockdir, disk / "backups", schedule="", wal_streaming=False)
        r.call("backup create", {"Server": ALIAS})
        wait_until(lambda: valid(r), 60, "a first backup")
        wait_until(lambda: r.status()["job"] is None, 30, "the job to end")
        first = valid(r)[0]

        # Fill the disk but for 256 kB: the next backup cannot fit.
        st = os.statvfs(disk)
        filler = disk / "filler"
        with filler.open("wb") as f:
            f.truncate(0)
            left = st.f_bavail * st.f_frsize - 256 * 1024
            chunk = b"\xff" * 2**20
            while left > 0:
                f.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
        r.call("backup create", {"Server": ALIAS})
        wait_until(lambda: r.status()["last_result"]["backup"] != first.id, 60, "the 2nd backup")
        wait_until(lambda: r.status()["job"] is None, 30, "the job to end")
        result = r.status()["last_result"]
        assert result["outcome"] == "failed"
        assert "No space left on device" in result["error"], result
        failed = [b for b in r.backups() if b.state is State.INVALID]
        assert len(failed) == 1 and "No space left on device" in (failed[0].error or "")
        # Its partial files went; nothing valid was deleted, and it reads back whole.
        assert sorted(p.name for p in r.catalog.backup_dir(failed[0].id).iterdir()) == [
            "backup.json"
        ]
        assert [b.id for b in valid(r)] == [first.id]
        assert verify(r.catalog, first.id, None).ok
        assert one(r.metrics()["pgfleet_backup_runs_total"], outcome="failed") == 1
        assert r.d.find("backup failed", server=ALIAS)

        # Space again: backups work again.
        filler.unlink()
        r.call("backup create", {"Server": ALIAS})
        wait_until(lambda: len(valid(r)) == 2, 60, "a backup once there is room")
        assert r.d.stop() == 0


# -- Schedules, read as the daemon reads them


def test_next_due() -> None:
    started = datetime(2026, 12, 7, 4, 31, 12, tzinfo=UTC)
    assert next_due(schedule.parse("6h"), started) == started + timedelta(hours=6)
    # A cron line is the collector's local time: the next 02:30 there, after the start.
    due = next_due(schedule.parse("30 2 * * *"), started)
    local = due.astimezone()
    assert (local.hour, local.minute, local.second) == (2, 30, 0)
    assert started < due <= started + timedelta(days=1, hours=1)


# -- What a backup is asked to do, without running it


def test_backups_get_the_configured_max_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[backup] max_rate and its overrides reach pg_basebackup's job; a reload, the next one."""

    def backup_config(**settings: Any) -> config.Config:
        return config.Config(
            backup=config.BackupConfig(directory=str(tmp_path), wal_streaming=False, **settings)
        )

    cfg = backup_config(
        max_rate="20M",
        servers=(config.BackupServer("db1"), config.BackupServer("db2", max_rate="1M")),
    )
    service = BackupService(cfg, Stats())
    service.setup = service.prepare(cfg)

    def spawn(coro: Any, name: str) -> Any:
        coro.close()  # never run: only the job's settings are looked at

    monkeypatch.setattr(service, "spawn", spawn)
    db1 = ServerBackups(service, Server(1, "db1"))
    db2 = ServerBackups(service, Server(2, "db2"))
    service.servers = {1: db1, 2: db2}

    def rates() -> tuple[str | None, ...]:
        jobs = [srv.create(trigger="manual") for srv in (db1, db2)]
        db1.job = db2.job = None
        return tuple(job.base.max_rate for job in jobs)

    assert rates() == ("20M", "1M")
    # Reloaded: the next backups take the new limits; none is no limit.
    service.configure(service.prepare(backup_config(servers=(config.BackupServer("db1"),))))
    assert rates() == (None, None)
    new = backup_config(max_rate="500k", servers=(config.BackupServer("db2", max_rate="64k"),))
    service.configure(service.prepare(new))
    assert rates() == ("500k", "64k")
