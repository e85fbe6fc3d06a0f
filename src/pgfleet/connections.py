"""Connections to the repository and to monitored servers.

Monitored-server connections are autocommit, carry an ``application_name``
naming pgfleet, a ``connect_timeout`` and a server-side ``statement_timeout``
(so a runaway source query is cancelled *on the server*, not just abandoned),
and a ``search_path`` pinned to ``pg_catalog, pg_temp``: whoever may create
objects in a schema of the monitored server (``public`` before PostgreSQL 15,
or a database owner who sets the database's search_path) must not get code run
as our monitoring role.  A startup option outranks the database's and the
role's settings.
Errors become one readable line that names the server but never its password
or full connection string.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgfleet.config import CollectorConfig
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


def resolve_password(ref: str | None) -> str | None:
    if ref is None:
        return None
    kind, _, target = ref.partition(":")
    if kind == "env":
        value = os.environ.get(target)
        if value is None:
            raise ConfigError(
                f"password reference {ref!r}: environment variable {target} is not set"
            )
        return value
    if kind == "file":
        try:
            return Path(target).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(
                f"password reference {ref!r}: cannot read {target}: {e.strerror}"
            ) from None
    raise ConfigError(f"invalid password reference {ref!r}: use env:VARIABLE or file:/path")


def server_conninfo(server: Server, cfg: CollectorConfig, *, dbname: str | None = None) -> str:
    params: dict[str, Any] = conninfo_to_dict(server.options) if server.options else {}
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
    password = resolve_password(server.password_ref)
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
    return f"{where}{reason}".strip()


def connect_repository(dsn: str) -> psycopg.Connection[Any]:
    if not dsn:
        raise ConfigError(
            "no repository configured: pass --repository DSN, set PGFLEET_REPOSITORY, "
            "or [repository] dsn in the configuration file"
        )
    try:
        return psycopg.connect(dsn, autocommit=True, application_name="pgfleet")
    except psycopg.ProgrammingError as e:
        raise ConfigError(f"invalid repository DSN: {first_line(e)}") from None
    except psycopg.OperationalError as e:
        raise RepositoryError(f"cannot connect to the repository: {_connect_reason(e)}") from None


async def connect_repository_async(dsn: str) -> psycopg.AsyncConnection[Any]:
    if not dsn:
        raise ConfigError("no repository configured")
    try:
        return await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name="pgfleet"
        )
    except psycopg.OperationalError as e:
        raise RepositoryError(f"cannot connect to the repository: {_connect_reason(e)}") from None
