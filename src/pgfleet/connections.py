"""Connections to the repository and to monitored servers.

Monitored-server connections are autocommit, carry an ``application_name``
naming pgfleet, a ``connect_timeout`` and a server-side ``statement_timeout``
(so a runaway source query is cancelled *on the server*, not just abandoned),
and a ``search_path`` pinned to ``pg_catalog, pg_temp``: whoever may create
objects in a schema of the monitored server (``public`` before PostgreSQL 15,
or a database owner who sets the database's search_path) must not get code run
as our monitoring role.  A startup option outranks the database's and the
role's settings.

A server entry is data anyone with write access to the registry (or to a
file_sd file) controls, and its host may not be a PostgreSQL at all.  So:

- a password reference names only what the collector's configuration lets
  server passwords live in: ``env:`` variables with ``password_env_prefix``
  (never the collector's own ``PGFLEET_REPOSITORY`` or ``PGFLEET_CONFIG``),
  ``file:`` paths that resolve, symlinks and ``..`` followed, inside one of
  ``password_dirs`` (none by default: refused);
- libpq never answers a cleartext or MD5 password request
  (``require_auth=!password,!md5``) unless the server's own options set
  ``require_auth``: a fake server gets at most a SCRAM exchange, which does
  not give it the password;
- ``[collector] sslmode`` applies unless the server's options set one.

Errors become one readable line that names the server (and the password
reference), never a password or the full connection string.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgfleet.config import ENV_CONFIG, ENV_REPOSITORY, CollectorConfig
from pgfleet.errors import ConfigError, RepositoryError, ServerError
from pgfleet.repository.servers import Server


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        # libpq prefixes with 'connection to server at "h" (ip), port p failed:'
        if line:
            return line
    return type(e).__name__


# Libpq keeps answering a server's request for the password in clear or MD5
# unless told otherwise; require_auth (libpq 16) tells it.
REFUSE_WEAK_AUTH = "!password,!md5"

# The collector's own variables: never a server's password, whatever the prefix.
_OWN_VARIABLES = frozenset({ENV_REPOSITORY, ENV_CONFIG})
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def resolve_password(ref: str | None, cfg: CollectorConfig, *, server: str = "") -> str | None:
    """The password ``ref`` points to, if ``cfg`` lets server passwords live there.

    ``env:NAME``: NAME must start with ``cfg.password_env_prefix``.
    ``file:/path``: the path, resolved (symlinks and ``..`` followed), must
    lie in one of ``cfg.password_dirs``; with none configured, refused.
    Raise ConfigError naming ``server`` and the reference, never the value.
    """
    if ref is None:
        return None
    where = f"server {server!r}: " if server else ""
    kind, _, target = ref.partition(":")

    def refused(why: str) -> ConfigError:
        # One line, whatever the reference holds.
        why = why.replace("\r", "\\r").replace("\n", "\\n")
        return ConfigError(f"{where}password reference {ref!r}: {why}")

    if kind == "env":
        prefix = cfg.password_env_prefix
        if (
            target in _OWN_VARIABLES
            or not target.startswith(prefix)
            or target == prefix
            or not _ENV_NAME.fullmatch(target)
        ):
            raise refused(
                f"only variables named {prefix}... may hold server passwords "
                "([collector] password_env_prefix)"
            )
        value = os.environ.get(target)
        if value is None:
            raise refused(f"environment variable {target} is not set")
        return value
    if kind == "file":
        return _read_password_file(target, cfg, refused)
    raise refused("use env:VARIABLE or file:/path")


def _read_password_file(
    target: str, cfg: CollectorConfig, refused: Callable[[str], ConfigError]
) -> str:
    if not cfg.password_dirs:
        raise refused(
            "file references are refused until [collector] password_dirs names a directory"
        )
    if not os.path.isabs(target):
        raise refused("the path must be absolute")
    # Where it really is, symlinks and '..' followed, before anything is read:
    # a reference outside the directories learns nothing about the file.
    try:
        real = Path(target).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        real = None
    allowed = [Path(d).resolve() for d in cfg.password_dirs]
    if real is None or not any(real.is_relative_to(d) for d in allowed):
        raise refused(
            "not in a directory of [collector] password_dirs ("
            + ", ".join(str(d) for d in allowed)
            + ")"
        )
    try:
        # The resolved path, and no symlink swapped in since at its end.
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise refused(f"cannot read {target}: {reason}") from None


def server_conninfo(server: Server, cfg: CollectorConfig, *, dbname: str | None = None) -> str:
    try:
        params: dict[str, Any] = conninfo_to_dict(server.options) if server.options else {}
    except psycopg.ProgrammingError as e:
        raise ConfigError(
            f"server {server.alias!r}: invalid connection options: {first_line(e)}"
        ) from None
    if server.host:
        params["host"] = server.host
    params["port"] = server.port
    if server.username:
        params["user"] = server.username
    params["dbname"] = dbname or server.dbname
    params["application_name"] = cfg.application_name
    params["connect_timeout"] = max(1, round(cfg.connect_timeout))
    ms = round(cfg.statement_timeout * 1000)
    params["options"] = (
        f"-c statement_timeout={ms} -c lock_timeout={ms} -c search_path=pg_catalog,pg_temp "
        + params.get("options", "")
    )
    if "require_auth" not in params:
        if pq.version() < 160000:
            raise ConfigError(
                f"server {server.alias!r}: libpq {pq.version() // 10000} cannot refuse a "
                "cleartext password request (require_auth needs libpq 16 or later)"
            )
        params["require_auth"] = REFUSE_WEAK_AUTH
    if cfg.sslmode and "sslmode" not in params:
        params["sslmode"] = cfg.sslmode
    password = resolve_password(server.password_ref, cfg, server=server.alias)
    if password is not None:
        params["password"] = password
    return make_conninfo(**params)


async def connect_server(
    server: Server, cfg: CollectorConfig, *, dbname: str | None = None
) -> psycopg.AsyncConnection[Any]:
    try:
        return await psycopg.AsyncConnection.connect(
            server_conninfo(server, cfg, dbname=dbname), autocommit=True
        )
    except psycopg.OperationalError as e:
        raise ServerError(
            f"server {server.alias!r}: cannot connect: {_connect_reason(e)}"
        ) from None


def _connect_reason(e: psycopg.OperationalError) -> str:
    # libpq: 'connection failed: connection to server at "127.0.0.1", port 1
    # failed: Connection refused ...'.  Keep the reason after the last
    # "failed:", which never holds the password.
    text = " ".join(str(e).split())
    marker = "failed: "
    idx = text.rfind(marker)
    reason = text[idx + len(marker) :] if idx >= 0 else text
    where = ""
    if "connection to server at" in text:
        start = text.find("connection to server at")
        end = text.find(" failed", start)
        where = text[start + len("connection to server at ") : end] + ": " if end > 0 else ""
    # 'authentication method requirement "!password,!md5" failed: server
    # requested a cleartext password': say who refused what.
    refused = re.search(r'authentication method requirement "([^"]*)" failed', text)
    if refused:
        reason = f"{reason}, refused by require_auth={refused[1]}"
    return f"{where}{reason}".strip()


def _encodable_dsn(dsn: str) -> None:
    # libpq takes bytes: a DSN with lone surrogates (from a command line or
    # an environment in another encoding) cannot even be parsed.
    try:
        dsn.encode()
    except UnicodeEncodeError:
        raise ConfigError("invalid repository DSN: it is not valid UTF-8 text") from None


def connect_repository(dsn: str) -> psycopg.Connection[Any]:
    if not dsn:
        raise ConfigError(
            "no repository configured: pass --repository DSN, set PGFLEET_REPOSITORY, "
            "or [repository] dsn in the configuration file"
        )
    _encodable_dsn(dsn)
    try:
        return psycopg.connect(dsn, autocommit=True, application_name="pgfleet")
    except psycopg.ProgrammingError as e:
        raise ConfigError(f"invalid repository DSN: {first_line(e)}") from None
    except psycopg.OperationalError as e:
        raise RepositoryError(f"cannot connect to the repository: {_connect_reason(e)}") from None


async def connect_repository_async(dsn: str) -> psycopg.AsyncConnection[Any]:
    if not dsn:
        raise ConfigError("no repository configured")
    _encodable_dsn(dsn)
    try:
        return await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name="pgfleet"
        )
    except psycopg.ProgrammingError as e:
        raise ConfigError(f"invalid repository DSN: {first_line(e)}") from None
    except psycopg.OperationalError as e:
        raise RepositoryError(f"cannot connect to the repository: {_connect_reason(e)}") from None
