"""What the backup tests share: servers to back up, a WAL receiver in a thread, restored clusters.

Not a fixture plugin: the tests import what they use.  Clusters run as the
``pgfleet`` OS user when the tests run as root; so must what reads the backups
for them (restore_command), hence :func:`server_side_pgfleet` and :func:`hand_over`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgfleet.backup.catalog import Catalog, segment_name
from pgfleet.backup.store import Codec
from pgfleet.backup.wal import ReceiverState, WalReceiver
from pgfleet.cluster import DEFAULT_OS_USER, Cluster
from pgfleet.config import CollectorConfig
from pgfleet.repository import servers
from pgfleet.repository.servers import Server

KEY = bytes(range(32))
# pg_hba lines put before the Cluster's own: the "backup" role proves its
# password for replication too, so that PGPASSWORD is what lets it in.
HBA_BACKUP_ROLE = (
    "host replication backup 127.0.0.1/32 scram-sha-256\n"
    "host all backup 127.0.0.1/32 scram-sha-256\n"
)
BACKUP_PASSWORD = "s3cret-backup-pw"
PASSWORD_ENV = "PGFLEET_PW_BACKUP_TESTS"


def start_cluster(kind: str, datadir: Path, **settings: Any) -> Cluster:
    """A started private cluster: ``"18"`` embedded, ``"15"`` Debian's (skipped if absent)."""
    if kind == "15":
        if not Path("/usr/lib/postgresql/15/bin/postgres").exists():
            pytest.skip("PostgreSQL 15 is not installed (/usr/lib/postgresql/15/bin)")
        cluster = Cluster.debian(15, datadir, settings=settings, name=datadir.name)
    else:
        cluster = Cluster.embedded(datadir, settings=settings, name=datadir.name)
    cluster.init()
    hba = datadir / "pg_hba.conf"
    text = hba.read_text()
    hba.write_text(text.replace("local   all", HBA_BACKUP_ROLE + "local   all", 1))
    cluster.start()
    cluster.execute(f"CREATE ROLE backup LOGIN REPLICATION PASSWORD '{BACKUP_PASSWORD}'")
    cluster.execute("GRANT pg_monitor TO backup")
    return cluster


def server_entry(cluster: Cluster, alias: str, *, srvid: int = 1) -> Server:
    """The registry entry of ``cluster``: role ``backup``, its password in the environment."""
    os.environ[PASSWORD_ENV] = BACKUP_PASSWORD
    return Server(
        srvid=srvid,
        alias=alias,
        host=cluster.host,
        port=cluster.port,
        username="backup",
        password_ref=f"env:{PASSWORD_ENV}",
    )


def collector_config() -> CollectorConfig:
    return CollectorConfig(password_env_prefix="PGFLEET_PW_")


def register(repo: str, cluster: Cluster, alias: str) -> None:
    """Register ``cluster`` in the repository ``repo`` as ``alias`` (role backup)."""
    os.environ[PASSWORD_ENV] = BACKUP_PASSWORD
    with psycopg.connect(repo, autocommit=True) as conn:
        servers.add(
            conn,
            alias,
            host=cluster.host,
            port=cluster.port,
            username="backup",
            password_ref=f"env:{PASSWORD_ENV}",
        )


class ReceiverThread:
    """A WalReceiver on its own event loop in a thread, for synchronous tests."""

    def __init__(self, receiver: WalReceiver) -> None:
        self.receiver = receiver
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="wal receiver", daemon=True)

    def _run(self) -> None:
        self._loop.run_until_complete(self.receiver.run())

    def __enter__(self) -> ReceiverThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.receiver.stop)
            self._thread.join(30)
        assert not self._thread.is_alive(), "the WAL receiver did not stop"
        self._loop.close()

    def wait_state(self, state: ReceiverState, timeout: float = 30.0) -> None:
        wait_for(lambda: self.receiver.status().state is state, timeout, f"receiver {state.name}")


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_backup_streaming(cluster: Cluster, timeout: float = 30.0) -> None:
    """Until ``cluster`` is sending a base backup its files (past the starting checkpoint).

    The server's word, rather than a guess of how long starting takes: a test
    that breaks a backup "half-way" breaks it there.
    """

    def streaming() -> bool:
        found = cluster.execute(
            "SELECT count(*) FROM pg_stat_progress_basebackup"
            " WHERE phase = 'streaming database files' AND backup_streamed > 0"
        )
        return bool(found[0][0])

    wait_for(streaming, timeout, f"a base backup of {cluster.name} streaming its files")


def switch_wal(cluster: Cluster, catalog: Catalog, timeout: float = 30.0) -> str:
    """End the current WAL segment and wait until the receiver has stored it; its name."""
    with cluster.connect() as conn:
        row = conn.execute(
            "SELECT pg_walfile_name(pg_current_wal_lsn()), pg_switch_wal()"
        ).fetchone()
    assert row is not None
    name: str = row[0]
    wait_for(lambda: catalog.wal_file(name) is not None, timeout, f"WAL segment {name} stored")
    return name


def segment_of(cluster: Cluster, timeline: int = 1) -> str:
    row = cluster.execute("SELECT pg_current_wal_lsn()::text")[0]
    return segment_name(timeline, row[0])


@contextlib.contextmanager
def receiving(
    cluster: Cluster, catalog: Catalog, codec: Codec, alias: str
) -> Iterator[ReceiverThread]:
    receiver = WalReceiver(
        catalog,
        server_entry(cluster, alias),
        collector_config(),
        codec,
        backoff_min=0.2,
        backoff_max=1.0,
        poll_interval=0.1,
        lag_interval=0.5,
        status_interval=1,
    )
    with ReceiverThread(receiver) as thread:
        thread.wait_state(ReceiverState.STREAMING)
        yield thread


# -- restored clusters, run as the server's OS user


def _run_as_server_user(cmd: list[str]) -> bool:
    try:
        p = subprocess.run(
            cmd,
            capture_output=True,
            timeout=60,
            user=DEFAULT_OS_USER if os.geteuid() == 0 else None,
            group=DEFAULT_OS_USER if os.geteuid() == 0 else None,
            extra_groups=[] if os.geteuid() == 0 else None,
            cwd="/",
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


_command: str | None = None


def server_side_pgfleet() -> str:
    """A shell command that runs this pgfleet as the servers' OS user (their restore_command).

    As root, the venv's interpreter may live where that user cannot go
    (pyenv under /root): then a system Python of the same version, given
    our packages' directories.
    """
    global _command
    if _command is not None:
        return _command
    import cryptography
    import lz4
    import psycopg as pg
    import zstandard

    import pgfleet

    roots = {
        str(Path(m.__file__ or "").resolve().parent.parent)
        for m in (pgfleet, zstandard, cryptography, lz4, pg)
    }
    path = "PYTHONPATH=" + os.pathsep.join(sorted(roots))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        cmd = ["env", path, exe, "-m", "pgfleet.cli"]
        if _run_as_server_user([*cmd, "--version"]):
            _command = shlex.join(cmd)
            return _command
    pytest.skip(f"no Python {version} the {DEFAULT_OS_USER!r} OS user may run pgfleet with")


def hand_over(*paths: Path) -> None:
    """Give ``paths`` (recursively) to the servers' OS user, as a restore for it would be."""
    if os.geteuid() != 0:
        return
    import pwd

    pw = pwd.getpwnam(DEFAULT_OS_USER)
    for path in paths:
        os.chown(path, pw.pw_uid, pw.pw_gid)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def start_restored(origin: Cluster, datadir: Path, name: str) -> Cluster:
    """Start a restored data directory with ``origin``'s programs; wait until it is promoted."""
    hand_over(datadir)
    restored = Cluster(origin._bin_dir, datadir, name=name)
    try:
        restored.start(timeout=120)
        wait_for(
            lambda: not restored.execute("SELECT pg_is_in_recovery()")[0][0],
            60,
            f"{name} promoted",
        )
    except BaseException:
        print(restored.log_tail(40))
        raise
    return restored


def rows(cluster: Cluster, table: str = "t", dbname: str = "postgres") -> list[int]:
    return [r[0] for r in cluster.execute(f"SELECT i FROM {table} ORDER BY i", dbname=dbname)]


def server_time_after_commit(cluster: Cluster) -> Any:
    """The server's clock once everything committed so far is in; later commits come after it."""
    t = cluster.execute("SELECT clock_timestamp()")[0][0]
    time.sleep(0.05)
    return t
