"""Fixtures for a fresh pgfleet repository and for running the CLI in-process."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import psycopg
import pytest
from psycopg.abc import Params
from psycopg.rows import TupleRow

from pgfleet import cli
from pgfleet.cluster import Cluster
from pgfleet.repository import schema
from tests.fix_clusters import NewDatabase


@dataclass
class CliResult:
    rc: int
    out: str
    err: str


class RunCli(Protocol):
    """``run_cli(*args, env=None)``: the result of ``pgfleet ARGS`` (see the fixture)."""

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> CliResult: ...


def new_repository(cluster: Cluster, new_database: NewDatabase) -> str:
    """DSN of a freshly initialised repository database on ``cluster``."""
    dsn = new_database(cluster)
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.upgrade(conn)
    return dsn


@pytest.fixture
def repo(pg18: Cluster, new_database: NewDatabase) -> str:
    """DSN of a freshly initialised repository database on PostgreSQL 18."""
    return new_repository(pg18, new_database)


@pytest.fixture
def run_cli(repo: str) -> RunCli:
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
def connect(dsn: str) -> Iterator[psycopg.Connection[TupleRow]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


def one_row(
    conn: psycopg.Connection[TupleRow], query: str, params: Params | None = None
) -> TupleRow:
    """The first row of ``query``, which the test expects to return one."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, f"no row from {query!r}"
    return row


def scalar(dsn: str, query: str, params: tuple[object, ...] = ()) -> object:
    with connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()
        return row[0] if row else None


def scalar_int(dsn: str, query: str, params: tuple[object, ...] = ()) -> int:
    """``scalar()`` of a query returning an integer, such as a ``count(*)``."""
    value = scalar(dsn, query, params)
    assert isinstance(value, int), (query, value)
    return value


def add_server(run_cli: RunCli, alias: str, dsn: str, *extra: str) -> None:
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
