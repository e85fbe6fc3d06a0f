"""Fixtures for a fresh pgfleet repository and for running the CLI in-process."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from pgfleet import cli
from pgfleet.repository import schema


@dataclass
class CliResult:
    rc: int
    out: str
    err: str


def new_repository(cluster: Any, new_database: Callable[[Any], str]) -> str:
    """DSN of a freshly initialised repository database on ``cluster``."""
    dsn = new_database(cluster)
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.upgrade(conn)
    return dsn


@pytest.fixture
def repo(pg18, new_database) -> str:
    """DSN of a freshly initialised repository database on PostgreSQL 18."""
    return new_repository(pg18, new_database)


@pytest.fixture
def run_cli(repo) -> Callable[..., CliResult]:
    """Run ``pgfleet ARGS`` in-process against ``repo``; capture its output."""

    def run(*args: str, env: dict[str, str] | None = None) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        saved = dict(os.environ)
        os.environ["PGFLEET_REPOSITORY"] = repo
        os.environ.update(env or {})
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = cli.main(list(args))
                except SystemExit as e:  # argparse errors
                    rc = int(e.code or 0)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return CliResult(rc, out.getvalue(), err.getvalue())

    return run


@contextlib.contextmanager
def connect(dsn: str) -> Iterator[psycopg.Connection[tuple]]:  # type: ignore[type-arg]
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


def scalar(dsn: str, query: str, params: tuple = ()) -> object:  # type: ignore[type-arg]
    with connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        return row[0] if row else None


def add_server(run_cli, alias: str, dsn: str, *extra: str) -> None:
    """Register the server behind a libpq ``dsn`` under ``alias``."""
    p = psycopg.conninfo.conninfo_to_dict(dsn)
    args = [
        "server",
        "add",
        alias,
        "--host",
        str(p["host"]),
        "--port",
        str(p["port"]),
        "--user",
        str(p.get("user", "postgres")),
        "--dbname",
        str(p.get("dbname", "postgres")),
        *extra,
    ]
    res = run_cli(*args)
    assert res.rc == 0, res.err
