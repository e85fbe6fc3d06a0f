"""Extensions installed in one database of three, as PoWA users install them.

The issue's requirement: per-database extension sources (pg_qualstats, and any
source whose extension lives in some databases only) run where the extension is
installed and nowhere else, and a database without it is not an error.

The monitored server is Debian's PostgreSQL 15 with pg_stat_statements,
pg_qualstats, pg_stat_kcache and pg_wait_sampling preloaded, and three
databases (``postgres``, ``app``, and ``reports``, whose real name holds quotes,
a backslash and a tab), the four extensions created in ``app`` only: the
session's ``pg15`` cannot serve, as it has them in every database.  Both ``app`` and ``reports`` run queries with ``WHERE`` predicates,
so that pg_qualstats, whose hooks are cluster-wide, samples predicates of a
database without the extension too.  Snapshots are taken with ``pgfleet
snapshot``, as a ``pg_monitor`` role.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgfleet.cluster import Cluster
from tests.fix_clusters import PG15_PRELOAD, _teardown, start_pg15
from tests.fix_repository import CliResult, RunCli, add_server, scalar, scalar_int

APP = "app"  # the only database holding the extensions
# Another database, its name as hostile as a name gets: quotes, a backslash,
# a space, a tab.
OTHER = "re\"ports '\\x\t2"
DATABASES = ("postgres", APP, OTHER)
EXTENSION_SOURCES = tuple(PG15_PRELOAD)  # each source is named after its extension
CLUSTER_WIDE = ("pg_stat_statements", "pg_stat_kcache", "pg_wait_sampling")
MONITOR, PASSWORD = "monitor", "m0nitor"
ENV = {"PGFLEET_PW_PLACED": PASSWORD}

# Run in app and in reports alike, each with a table of its own named orders.
_WORKLOAD = (
    "SELECT count(*) FROM orders WHERE status = 'shipped'",
    "SELECT count(*) FROM orders WHERE id < 50 AND status <> 'lost'",
    # pg_wait_sampling samples every 10 ms: give it a wait to see.
    "SELECT pg_catalog.pg_sleep(0.2)",
)


@pytest.fixture(scope="module")
def placed(clusters_dir: Path) -> Iterator[Cluster]:
    """PostgreSQL 15, the four preloaded extensions created in ``app`` only."""
    cluster = start_pg15(clusters_dir / "placement", PG15_PRELOAD)
    cluster.execute(f"CREATE ROLE {MONITOR} LOGIN PASSWORD '{PASSWORD}' IN ROLE pg_monitor")
    for dbname in DATABASES:
        if dbname != "postgres":
            cluster.create_database(dbname)
        with cluster.connect(dbname) as conn:
            conn.execute("CREATE TABLE orders (id int PRIMARY KEY, status text NOT NULL)")
            conn.execute(
                "INSERT INTO orders SELECT g, (ARRAY['new', 'shipped', 'lost'])[g % 3 + 1]"
                " FROM generate_series(1, 300) g"
            )
    for ext in PG15_PRELOAD:
        cluster.create_extension(ext, APP)
    yield cluster
    _teardown(cluster)


def _workload(cluster: Cluster) -> None:
    """The same predicates in ``app`` (extensions) and ``reports`` (none)."""
    for dbname in (APP, OTHER):
        with cluster.connect(dbname) as conn:
            for _ in range(3):
                for query in _WORKLOAD:
                    conn.execute(query)


def _snapshots(
    repo: str, run_cli: RunCli, cluster: Cluster, dbname: str, *cli_args: str
) -> tuple[int, CliResult, dict[str, Any]]:
    """Register ``placed`` with ``dbname`` as its database; snapshot it, run the
    workload, snapshot it again: its srvid, and the second snapshot's output."""
    add_server(run_cli, "placed", cluster.dsn(dbname), "--password-ref", "env:PGFLEET_PW_PLACED")
    assert run_cli("server", "update", "placed", "--user", MONITOR).rc == 0
    srvid = scalar_int(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = 'placed'")
    first = run_cli(*cli_args, "snapshot", "placed", "--json", env=ENV)
    assert first.rc == 0, first.out + first.err
    _workload(cluster)
    res = run_cli(*cli_args, "snapshot", "placed", "--json", env=ENV)
    result: dict[str, Any] = json.loads(res.out) if res.out else {}
    return srvid, res, result


def _datnames(repo: str, table: str, srvid: int) -> list[str]:
    """The databases ``pgfleet.<table>`` has rows of for ``srvid``."""
    value = scalar(
        repo,
        f"SELECT coalesce(array_agg(DISTINCT datname ORDER BY datname), '{{}}')"
        f" FROM pgfleet.{table} WHERE srvid = %s",
        (srvid,),
    )
    assert isinstance(value, list), (table, value)
    return value


def _datnames_of_query(repo: str, srvid: int, like: str) -> list[str]:
    """The databases in which the monitor role ran a statement matching ``like``."""
    value = scalar(
        repo,
        "SELECT coalesce(array_agg(DISTINCT datname ORDER BY datname), '{}')"
        " FROM pgfleet.pg_stat_statements_once"
        " WHERE srvid = %s AND rolname = %s AND query LIKE %s",
        (srvid, MONITOR, like),
    )
    assert isinstance(value, list), value
    return value


def _no_errors(repo: str, srvid: int, res: CliResult, result: dict[str, Any]) -> None:
    """The snapshot succeeded and no source failed in any database."""
    assert res.rc == 0, res.out + res.err
    assert res.err == ""
    assert result["errors"] == {} and result["failures"] == []
    assert (
        scalar_int(repo, "SELECT count(*) FROM pgfleet.snapshot_errors WHERE srvid = %s", (srvid,))
        == 0
    )


def _qualstats_only_in_app(repo: str, srvid: int) -> None:
    """No pg_qualstats row is attributed to a database without the extension."""
    for table in ("pg_qualstats_last", "pg_qualstats_once", "pg_qualstats_current"):
        assert set(_datnames(repo, table, srvid)) <= {APP}, table


def _reports_quals_were_sampled(cluster: Cluster) -> None:
    """pg_qualstats' hooks are cluster-wide: ``reports``' predicates are in its
    memory too (seen from ``app``), so leaving them out is the source's doing."""
    rows = cluster.execute(
        "SELECT count(*) FROM pg_qualstats() q JOIN pg_database d ON d.oid = q.dbid"
        " WHERE d.datname = %s",
        (OTHER,),
        dbname=APP,
    )
    assert rows[0][0] > 0


@pytest.mark.parametrize("budget", [1, 2])
def test_extensions_in_the_main_database_only(
    repo: str, run_cli: RunCli, placed: Cluster, tmp_path: Path, budget: int
) -> None:
    """Registered with ``app`` (the database holding the extensions) as its
    database, the server is snapshotted without an error: pg_qualstats runs in
    ``app`` and is left out of ``postgres`` and ``reports`` silently, the
    cluster-wide extension sources read every database's statements, and no
    predicate is attributed to a database without the extension.  With one
    connection (the databases visited one after the other, the main connection
    closed meanwhile) as with two (visits alongside the main connection)."""
    config = tmp_path / "pgfleet.toml"
    config.write_text(f"[collector]\nmax_connections_per_server = {budget}\n")
    srvid, res, result = _snapshots(repo, run_cli, placed, APP, "-c", str(config))
    _no_errors(repo, srvid, res, result)
    assert set(EXTENSION_SOURCES) <= set(result["stored"]), result["skipped"]
    assert not set(EXTENSION_SOURCES) & set(result["skipped"])

    # pg_qualstats: app's predicates, resolved in app's catalog, counted.
    assert _datnames(repo, "pg_qualstats_last", srvid) == [APP]
    quals = scalar(
        repo,
        "SELECT array_agg(DISTINCT qual ORDER BY qual) FROM pgfleet.pg_qualstats_once"
        " WHERE srvid = %s",
        (srvid,),
    )
    assert isinstance(quals, list)
    assert {"public.orders.status = ?", "public.orders.id < ?"} <= set(quals)
    assert (
        scalar_int(
            repo,
            "SELECT coalesce(sum(execution_count), 0)::int FROM pgfleet.pg_qualstats_current"
            " WHERE srvid = %s AND datname = %s",
            (srvid, APP),
        )
        > 0
    )
    _reports_quals_were_sampled(placed)
    _qualstats_only_in_app(repo, srvid)
    # Nowhere else means not even tried: the server's own pg_stat_statements
    # (read by the second snapshot) has the monitor role's pg_qualstats query
    # in app only.
    assert _datnames_of_query(repo, srvid, "%pg_qualstats()%") == [APP]

    # The cluster-wide sources see every database's statements from app.
    for table in ("pg_stat_statements_last", "pg_stat_kcache_last"):
        assert {APP, OTHER} <= set(_datnames(repo, table, srvid)), table
    assert (
        scalar_int(
            repo,
            "SELECT count(*) FROM pgfleet.pg_wait_sampling_last"
            " WHERE srvid = %s AND event = 'PgSleep'",
            (srvid,),
        )
        > 0
    )


def test_main_database_without_the_extensions_is_not_an_error(
    repo: str, run_cli: RunCli, placed: Cluster
) -> None:
    """Registered with ``postgres`` (no extension there), the snapshot still
    succeeds with no error in any database, each extension source is stored or
    skipped with its extension named, and no predicate is attributed to a
    database without pg_qualstats.  (The two tests below: the same data as
    when the server is registered with ``app``.)"""
    srvid, res, result = _snapshots(repo, run_cli, placed, "postgres")
    _no_errors(repo, srvid, res, result)
    for module in EXTENSION_SOURCES:
        if module not in result["stored"]:
            why = result["skipped"].get(module, "")
            assert f"extension {module} " in why, (module, result["skipped"])
    _qualstats_only_in_app(repo, srvid)


def test_per_database_source_runs_beyond_the_main_database(
    repo: str, run_cli: RunCli, placed: Cluster
) -> None:
    """Registered with ``postgres``, pg_qualstats is still read in ``app``,
    where it is installed, and only there."""
    srvid, res, result = _snapshots(repo, run_cli, placed, "postgres")
    _no_errors(repo, srvid, res, result)
    assert "pg_qualstats" in result["stored"], result["skipped"]
    assert _datnames(repo, "pg_qualstats_last", srvid) == [APP]
    _qualstats_only_in_app(repo, srvid)


def test_cluster_wide_source_runs_where_its_extension_is(
    repo: str, run_cli: RunCli, placed: Cluster
) -> None:
    """Registered with ``postgres``, pg_stat_statements, pg_stat_kcache and
    pg_wait_sampling are read once, through ``app`` where they are installed:
    their data is the whole server's, whichever database they are read in."""
    srvid, res, result = _snapshots(repo, run_cli, placed, "postgres")
    _no_errors(repo, srvid, res, result)
    assert set(CLUSTER_WIDE) <= set(result["stored"]), result["skipped"]
    for table in ("pg_stat_statements_last", "pg_stat_kcache_last"):
        assert {APP, OTHER} <= set(_datnames(repo, table, srvid)), table
    assert (
        scalar_int(
            repo, "SELECT count(*) FROM pgfleet.pg_wait_sampling_last WHERE srvid = %s", (srvid,)
        )
        > 0
    )
