"""A monitored database with a workload that asks for indexes, snapshotted
through the CLI: the session's PostgreSQL 15, whose new databases have
pg_stat_statements, pg_qualstats, pg_stat_kcache and hypopg.

The table ``orders`` (100,000 rows) has a primary key on ``id`` and an index
on ``status``.  The workload, three runs each with other constants:

- ``customer = $1``: an unindexed column, a filter removing 99.95% of rows;
- ``shop = $1 AND amount > $2``: two ANDed filters on unindexed columns;
- ``doc @> $1`` (jsonb) and ``tags @> $1`` (text[]): operators only gin has;
- with index scans disabled in the session, as a planner may choose on a
  table it thinks small: ``id = $1``, ``id = $1 AND customer = $2`` (the
  primary key) and ``status = $1`` (the existing index), seen as filters.

Snapshots are taken as ``advice_monitor``: pg_monitor, and pg_read_all_data
for EXPLAIN (which checks SELECT privileges as execution would).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql

from pgfleet.cluster import Cluster
from pgfleet.repository import servers
from pgfleet.repository.servers import Server
from tests.fix_clusters import NewDatabase
from tests.fix_repository import RunCli, add_server, connect

MONITOR, PASSWORD = "advice_monitor", "adv1ce-m0nitor"
PW_VAR = "PGFLEET_PW_ADVICE"
ENV = {PW_VAR: PASSWORD}

SCHEMA = """
CREATE TABLE orders (
    id int PRIMARY KEY, customer int NOT NULL, shop int NOT NULL, amount int NOT NULL,
    status text NOT NULL, tags text[] NOT NULL, doc jsonb NOT NULL);
INSERT INTO orders
SELECT g, g % 2000, g % 500, g % 1000, (ARRAY['new', 'shipped', 'lost'])[g % 3 + 1],
       ARRAY['t' || g % 50], jsonb_build_object('k', g % 100)
  FROM generate_series(1, 100000) g;
CREATE INDEX orders_status ON orders (status);
ANALYZE orders;
"""

# (query, parameters per run); run with index scans allowed.
WORKLOAD: list[tuple[str, list[tuple[object, ...]]]] = [
    ("SELECT count(*) FROM orders WHERE customer = %s", [(42,), (43,), (44,)]),
    ("SELECT count(*) FROM orders WHERE shop = %s AND amount > %s",
     [(7, 900), (8, 800), (9, 700)]),
    ("SELECT count(*) FROM orders WHERE doc @> %s::jsonb",
     [('{"k": 5}',), ('{"k": 6}',), ('{"k": 7}',)]),
    ("SELECT count(*) FROM orders WHERE tags @> %s::text[]", [(["t5"],), (["t6"],), (["t7"],)]),
]  # fmt: skip
# Run with index scans disabled: the existing indexes' columns as filters.
WITHOUT_INDEXES: list[tuple[str, list[tuple[object, ...]]]] = [
    ("SELECT count(*) FROM orders WHERE id = %s", [(77,), (78,), (79,)]),
    ("SELECT count(*) FROM orders WHERE id = %s AND customer = %s", [(5, 5), (6, 6), (7, 7)]),
    ("SELECT count(*) FROM orders WHERE status = %s", [("lost",), ("new",), ("lost",)]),
]


@dataclass
class Shop:
    repo: str
    cluster: Cluster
    dsn: str
    dbname: str
    alias: str
    server: Server
    start: datetime
    end: datetime


def ensure_monitor(cluster: Cluster) -> None:
    """The monitoring role: pg_monitor, and SELECT on everything for EXPLAIN."""
    with cluster.connect() as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (MONITOR,)).fetchone():
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(MONITOR), sql.Literal(PASSWORD)
                )
            )
        conn.execute(sql.SQL("GRANT pg_monitor, pg_read_all_data TO {}").format(
            sql.Identifier(MONITOR)))  # fmt: skip


def run_workload(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for query, runs in WORKLOAD:
            for params in runs:
                conn.execute(query, params)
        for setting in ("enable_indexscan", "enable_bitmapscan", "enable_indexonlyscan"):
            conn.execute(f"SET {setting} = off")
        for query, runs in WITHOUT_INDEXES:
            for params in runs:
                conn.execute(query, params)


def register(run_cli: RunCli, alias: str, dsn: str) -> None:
    add_server(run_cli, alias, dsn, "--password-ref", f"env:{PW_VAR}")
    res = run_cli("server", "update", alias, "--user", MONITOR)
    assert res.rc == 0, res.err


def snapshot(run_cli: RunCli, alias: str) -> None:
    res = run_cli("snapshot", alias, env=ENV)
    assert res.rc == 0, res.out + res.err


def server_of(repo: str, alias: str) -> Server:
    with connect(repo) as conn:
        return servers.get(conn, alias)


def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def shop(
    repo: str,
    run_cli: RunCli,
    pg15: Cluster,
    new_database: NewDatabase,
    monkeypatch: pytest.MonkeyPatch,
) -> Shop:
    """The workload above between two snapshots of its database ('shop')."""
    ensure_monitor(pg15)
    # advise() connects in-process, as the web UI will.
    monkeypatch.setenv(PW_VAR, PASSWORD)
    dsn = new_database(pg15)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
    dbname = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    register(run_cli, "shop", dsn)
    snapshot(run_cli, "shop")
    start = now()
    run_workload(dsn)
    time.sleep(0.01)
    snapshot(run_cli, "shop")
    end = now()
    return Shop(repo, pg15, dsn, dbname, "shop", server_of(repo, "shop"), start, end)
