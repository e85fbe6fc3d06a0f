"""Latest: real snapshots in, monotonic counters, caps and units out."""

from __future__ import annotations

import dataclasses
import io
import math
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgfleet.cluster import Cluster
from pgfleet.collector.exporter import custom
from pgfleet.collector.exporter import latest as latest_module
from pgfleet.collector.exporter.latest import Latest, copy_text, copy_time
from pgfleet.collector.exporter.views import View
from pgfleet.datasources import builtin
from pgfleet.snapshot.model import ExportedColumn, RegisteredSource, ServerInfo, Staged
from tests.collector.exporter import registry, snapshot
from tests.fix_clusters import NewCluster, NewDatabase
from tests.fix_repository import one_row

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def _db(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def _wait_for(dsn: str, query: str, ok: Callable[[Any], bool], timeout: float = 20) -> Any:
    """Poll ``query`` until its value is ``ok``: backends flush statistics lazily."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(query).fetchone()
            value = row[0] if row else None
            if ok(value):
                return value
            assert time.monotonic() < deadline, f"{query!r} still gives {value!r}"
            time.sleep(0.1)


def _queryid(dsn: str, marker: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            """SELECT queryid FROM pg_stat_statements
                WHERE query LIKE %s AND toplevel
                  AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())""",
            (f"%{marker}%",),
        ).fetchone()
    assert row is not None, f"no statement like {marker!r}"
    return str(row[0])


def _samples(latest: Latest, name: str, **labels: str) -> list[Any]:
    body = generate_latest(registry(latest)).decode()
    return [
        s
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def test_copy_text_format() -> None:
    assert copy_text(b"plain") == "plain"
    assert copy_text(b"\\N") == ""
    assert copy_text(b"a\\tb\\nc\\\\d\\re") == "a\tb\nc\\d\re"
    assert copy_text(b"\\101\\x42\\q") == "ABq"
    assert copy_text("é".encode()) == "é"
    utc = datetime(2026, 11, 21, 22, 45, 1, 500000, tzinfo=UTC).timestamp()
    assert copy_time(b"2026-11-21 23:45:01.5+01") == utc
    assert copy_time(b"2026-11-22 04:15:01.5+05:30") == utc
    assert math.isnan(copy_time(b"\\N"))
    assert math.isnan(copy_time(b"infinity"))


def test_spools_are_left_as_the_writer_expects(pg18: Cluster, new_database: NewDatabase) -> None:
    # snapshot() itself checks each spool is whole and positioned at its end.
    latest = Latest()
    snapshot(latest, "s", new_database(pg18))
    (srv,) = latest.servers()
    assert srv.alias == "s" and srv.version_num == pg18.version_num and not srv.in_recovery


def test_statement_reset_does_not_go_backwards(
    monitored: Cluster, new_database: NewDatabase
) -> None:
    dsn = new_database(monitored)
    dbname = _db(dsn)
    latest = Latest(max_statements=100_000)
    reg = registry(latest)

    def run(n: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for _ in range(n):
                conn.execute("SELECT pg_sleep(0.001) AS exporter_reset_marker")

    run(10)
    labels = {
        "server": "s",
        "dbname": dbname,
        "user": "postgres",
        "queryid": _queryid(dsn, "exporter_reset_marker"),
    }
    snapshot(latest, "s", dsn)
    assert reg.get_sample_value("pgfleet_statement_calls_total", labels) == 10
    exec1 = reg.get_sample_value("pgfleet_statement_exec_seconds_total", labels)
    assert exec1 is not None and exec1 >= 0.01

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
    run(3)
    snapshot(latest, "s", dsn)
    # 10 before the reset, 3 after: the counter went on from 10.
    assert reg.get_sample_value("pgfleet_statement_calls_total", labels) == 13
    exec2 = reg.get_sample_value("pgfleet_statement_exec_seconds_total", labels)
    assert exec2 is not None and exec2 >= exec1 + 0.003

    run(2)
    snapshot(latest, "s", dsn)
    assert reg.get_sample_value("pgfleet_statement_calls_total", labels) == 15
    exec3 = reg.get_sample_value("pgfleet_statement_exec_seconds_total", labels)
    assert exec3 is not None and exec3 >= exec2 + 0.002


def test_failed_source_is_dropped_then_resumes_where_it_was(
    pg18: Cluster, new_database: NewDatabase
) -> None:
    dsn = new_database(pg18)
    latest = Latest(max_statements=100_000)
    reg = registry(latest)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(4):
            conn.execute("SELECT 1 AS exporter_failed_marker")
    labels = {
        "server": "s",
        "dbname": _db(dsn),
        "user": "postgres",
        "queryid": _queryid(dsn, "exporter_failed_marker"),
    }
    snapshot(latest, "s", dsn)
    assert reg.get_sample_value("pgfleet_statement_calls_total", labels) == 4

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
        conn.execute("SELECT 1 AS exporter_failed_marker")
    snapshot(latest, "s", dsn, without={"pg_stat_statements"})
    # No stale numbers passed off as fresh ones...
    assert not _samples(latest, "pgfleet_statement_calls_total")
    assert not _samples(latest, "pgfleet_statement_info")
    assert reg.get_sample_value(
        "pgfleet_database_xact_commit_total", {"server": "s", "dbname": _db(dsn)}
    )

    # ...and the counter state survived the gap and the reset within it.
    snapshot(latest, "s", dsn)
    assert reg.get_sample_value("pgfleet_statement_calls_total", labels) == 5


def test_counter_going_backwards_without_epoch(pg18: Cluster, new_database: NewDatabase) -> None:
    """pg_stat_reset() zeroes a database's table counters, which have no epoch column."""
    dsn = new_database(pg18)
    dbname = _db(dsn)
    # Uncapped: the session's cluster holds other tests' busier tables.
    latest = Latest(max_tables=100_000)
    reg = registry(latest)
    labels = {"server": "s", "dbname": dbname, "schema": "public", "table": "t"}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
        for _ in range(5):
            conn.execute("SELECT count(*) FROM t")
    seq_scan = "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 't'"
    _wait_for(dsn, seq_scan, lambda v: v == 5)
    snapshot(latest, "s", dsn)
    assert reg.get_sample_value("pgfleet_table_seq_scans_total", labels) == 5

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_reset()")
        for _ in range(2):
            conn.execute("SELECT count(*) FROM t")
    _wait_for(dsn, seq_scan, lambda v: v == 2)
    snapshot(latest, "s", dsn)
    assert reg.get_sample_value("pgfleet_table_seq_scans_total", labels) == 7

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM t")
    _wait_for(dsn, seq_scan, lambda v: v == 3)
    snapshot(latest, "s", dsn)
    assert reg.get_sample_value("pgfleet_table_seq_scans_total", labels) == 8


def test_units_are_seconds_and_bytes(pg18: Cluster, new_database: NewDatabase) -> None:
    dsn = new_database(pg18)
    dbname = _db(dsn)
    latest = Latest(max_statements=100_000, max_tables=100_000)
    reg = registry(latest)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # No autovacuum: its maps would grow the table behind our back.
        conn.execute("CREATE TABLE big (id int, pad text) WITH (autovacuum_enabled = off)")
        conn.execute("INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g")
        # The size reported is relpages, which ANALYZE sets to the heap's pages.
        conn.execute("ANALYZE big")
        conn.execute("SELECT pg_sleep(0.05) AS exporter_units_marker")
        # A sort too big for work_mem spills to a temporary file.
        conn.execute("SET work_mem = '64kB'")
        conn.execute(
            "SELECT count(*) FROM (SELECT g FROM generate_series(1, 100000) g ORDER BY g DESC) s"
        )
    temp = f"SELECT temp_bytes FROM pg_stat_database WHERE datname = '{dbname}'"
    _wait_for(dsn, temp, lambda v: v and v > 0)
    qid = _queryid(dsn, "exporter_units_marker")
    snapshot(latest, "s", dsn)

    with psycopg.connect(dsn, autocommit=True) as conn:
        exec_ms, plan_ms = one_row(
            conn,
            "SELECT total_exec_time, total_plan_time FROM pg_stat_statements WHERE queryid = %s",
            (int(qid),),
        )
        (size,) = one_row(conn, "SELECT pg_relation_size('big')")
        (temp_bytes,) = one_row(conn, temp)
    stmt = {"server": "s", "dbname": dbname, "user": "postgres", "queryid": qid}
    exec_s = reg.get_sample_value("pgfleet_statement_exec_seconds_total", stmt)
    assert exec_s == pytest.approx(exec_ms / 1000)
    assert exec_s is not None and exec_s >= 0.05
    assert reg.get_sample_value("pgfleet_statement_plan_seconds_total", stmt) == pytest.approx(
        plan_ms / 1000
    )
    table = {"server": "s", "dbname": dbname, "schema": "public", "table": "big"}
    assert reg.get_sample_value("pgfleet_table_size_bytes", table) == size
    db = {"server": "s", "dbname": dbname}
    assert reg.get_sample_value("pgfleet_database_temp_bytes_total", db) == temp_bytes
    # Milliseconds in pg_stat_database too (0 unless track_io_timing, but present).
    assert reg.get_sample_value("pgfleet_database_session_seconds_total", db) is not None
    info = _samples(latest, "pgfleet_statement_info", queryid=qid)
    assert [s.labels["query"] for s in info] == ["SELECT pg_sleep($1) AS exporter_units_marker"]


def test_caps_rank_by_activity_and_apply_at_once(new_cluster: NewCluster) -> None:
    mon = new_cluster("caps", shared_preload_libraries=["pg_stat_statements"])
    mon.create_extension("pg_stat_statements")
    dsn = mon.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(4):
            conn.execute(f"CREATE TABLE t{i} (id int PRIMARY KEY)")
            conn.execute(f"INSERT INTO t{i} SELECT generate_series(1, {10 ** (i + 1)})")
            conn.execute(f"SELECT count(*) FROM t{i} WHERE id > {i}")
        for i in range(8):
            conn.execute(f"SELECT {i} AS exporter_caps_{i}")
        conn.execute("SELECT pg_sleep(0.3) AS exporter_caps_slowest")
    _wait_for(dsn, "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 't3'", lambda v: v)

    latest = Latest(max_statements=5, max_tables=2)
    snapshot(latest, "a", dsn)
    snapshot(latest, "b", dsn)
    for server in ("a", "b"):
        assert len(_samples(latest, "pgfleet_statement_calls_total", server=server)) == 5
        assert len(_samples(latest, "pgfleet_statement_info", server=server)) == 5
        tables = _samples(latest, "pgfleet_table_seq_scans_total", server=server)
        # The most active by tuples read and written: 10,000 and 1,000 rows.
        assert sorted(s.labels["table"] for s in tables) == ["t2", "t3"]
        assert len(_samples(latest, "pgfleet_index_scans_total", server=server)) == 2
        assert len(_samples(latest, "pgfleet_index_size_bytes", server=server)) == 2
    # The slowest statement ranks first by cumulative time.
    info = _samples(latest, "pgfleet_statement_info", server="a")
    assert any("exporter_caps_slowest" in s.labels["query"] for s in info)

    latest.configure(max_statements=3, max_tables=1)
    assert len(_samples(latest, "pgfleet_statement_calls_total", server="a")) == 3
    (table,) = _samples(latest, "pgfleet_table_size_bytes", server="a")
    assert table.labels["table"] == "t3"
    latest.configure(max_statements=10, max_tables=10)
    snapshot(latest, "a", dsn)
    assert len(_samples(latest, "pgfleet_statement_calls_total", server="a")) == 10
    assert len(_samples(latest, "pgfleet_table_size_bytes", server="a")) == 4


def test_forgotten_server_is_gone(pg18: Cluster, new_database: NewDatabase) -> None:
    dsn = new_database(pg18)
    latest = Latest()
    snapshot(latest, "stays", dsn)
    snapshot(latest, "leaves", dsn)
    body = generate_latest(registry(latest)).decode()
    assert 'server="leaves"' in body and 'server="stays"' in body
    latest.forget("leaves")
    body = generate_latest(registry(latest)).decode()
    assert 'server="leaves"' not in body
    assert 'server="stays"' in body
    latest.forget("never-seen")  # not an error


def test_odd_names_survive_the_text_format(pg18: Cluster, new_database: NewDatabase) -> None:
    dsn = new_database(pg18)
    alias = 'we"ird\nal\\ias {server="x"}'
    table = 'odd "table"\nname\\x'
    column = 'col "q"\t\\n'
    quoted_column = '"' + column.replace('"', '""') + '"'
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier(table)))
        conn.execute(f"SELECT 'it''s \"quoted\"\\', E'two\\nlines' AS {quoted_column}")
    latest = Latest(max_statements=100_000, max_tables=100_000)
    snapshot(latest, alias, dsn)
    body = generate_latest(registry(latest)).decode()
    families = list(text_string_to_metric_families(body))
    servers = {s.labels["server"] for f in families for s in f.samples}
    assert servers == {alias}
    tables = {s.labels["table"] for f in families for s in f.samples if "table" in s.labels}
    assert table in tables
    queries = [
        s.labels["query"] for f in families if f.name == "pgfleet_statement_info" for s in f.samples
    ]
    # Whitespace collapses to one space; quotes and backslashes stay.
    assert f"SELECT $1, $2 AS {quoted_column}".replace("\t", " ") in queries
    res = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body.encode(), capture_output=True, timeout=60
    )
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


# -- Made-up spools: when the work is done, and what the top keeps ---------------

INFO = ServerInfo(180000, False, frozenset(), ("db",))


def spool(module: str, rows: list[dict[str, str]]) -> Staged:
    """``module``'s rows as fetch() leaves them: COPY text, unnamed columns NULL."""
    ds = builtin()[module]
    data = b"".join(
        b"\t".join(
            [b"1", b"2026-12-01 00:00:00+00"] + [r.get(c.name, "\\N").encode() for c in ds.columns]
        )
        + b"\n"
        for r in rows
    )
    buf = io.BytesIO(data)
    buf.seek(0, io.SEEK_END)
    source = RegisteredSource(ds.module, ds.src_function, ds.cleanup, False, ds.priority)
    return Staged(source, buf)


def table(name: str, **values: int) -> dict[str, str]:
    return {"datname": "db", "schemaname": "public", "relname": name} | {
        k: str(v) for k, v in values.items()
    }


def test_snapshots_are_parsed_when_a_scrape_asks() -> None:
    latest = Latest()
    generations = []
    for n in (1, 2, 3):
        latest.update("s", float(n), INFO, [spool("pg_stat_user_tables", [table("t", seq_scan=n)])])
        generations.append(latest.generations()["s"])
    assert len(set(generations)) == 3
    stats = latest.get_stats()
    assert stats["updates"] == 3 and stats["skipped"] == 2 and "parsed" not in stats
    assert stats["pending_bytes"] > 0

    labels = {"server": "s", "dbname": "db", "schema": "public", "table": "t"}
    assert registry(latest).get_sample_value("pgfleet_table_seq_scans_total", labels) == 3
    stats = latest.get_stats()
    assert stats["parsed"] == 1 and stats["pending_bytes"] == 0
    # Looking changes nothing: the renderer has nothing new to render.
    assert latest.generations()["s"] == generations[-1]
    assert registry(latest).get_sample_value("pgfleet_table_seq_scans_total", labels) == 3
    assert latest.get_stats()["parsed"] == 1


def test_pending_snapshots_are_bounded() -> None:
    latest = Latest(max_pending=0)
    latest.update("s", 1.0, INFO, [spool("pg_stat_user_tables", [table("t", seq_scan=1)])])
    stats = latest.get_stats()
    assert stats["parsed"] == 1 and stats["pending_bytes"] == 0


def test_forget_drops_a_pending_snapshot() -> None:
    latest = Latest()
    latest.update("s", 1.0, INFO, [spool("pg_stat_user_tables", [table("t", seq_scan=1)])])
    latest.forget("s")
    assert latest.generations() == {} and latest.servers() == []
    assert latest.get_stats()["pending_bytes"] == 0


def test_the_top_keeps_the_most_active_and_ties_go_to_the_later_row() -> None:
    latest = Latest(max_statements=2, max_tables=2)
    tables = [table(f"t{i}", seq_scan=1, seq_tup_read=0) for i in range(5)]
    statements = [
        # Nested statements, busier than the top-level ones, are left out; a
        # NULL plan time counts 0.
        {
            "datname": "db",
            "rolname": "u",
            "queryid": str(i),
            "toplevel": "t" if i in (3, 7, 20) else "f",
            "total_exec_time": str(1000 - i),
            "total_plan_time": "\\N" if i == 7 else "1",
            "query": f"SELECT {i}",
        }
        for i in range(30)
    ]
    latest.update(
        "s",
        1.0,
        INFO,
        [spool("pg_stat_user_tables", tables), spool("pg_stat_statements", statements)],
    )
    body = generate_latest(registry(latest)).decode()
    shown = [
        (s.name, s.labels.get("table") or s.labels["queryid"])
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
        if s.name in ("pgfleet_table_seq_scans_total", "pgfleet_statement_info")
    ]
    assert shown == [
        ("pgfleet_table_seq_scans_total", "t4"),
        ("pgfleet_table_seq_scans_total", "t3"),
        ("pgfleet_statement_info", "3"),
        ("pgfleet_statement_info", "7"),
    ]


# Values few enough to tie often; NULLs count 0, and so does a zero of either sign.
_RANK_VALUES = ["0", "-0", "-1", "1", "Infinity", "2.5", "2.50", "1e3", "1000"]
_RANK_VALUES += ["123456789012", "1e300", "\\N"]
# Names and texts as COPY writes them: escaped tabs, newlines and backslashes,
# a trailing backslash, non-ASCII and invalid UTF-8.
_HOSTILE = ["a\\tb", "x\\ny\\r", "\\\\", "q\\\\", "é\\x80", "\\N", "", " ", "\\011"]


def _made_up_rows(module: str, rnd: random.Random, count: int) -> list[dict[str, str]]:
    ds = builtin()[module]
    rows = []
    for n in range(count):
        row = {c.name: rnd.choice(_RANK_VALUES) for c in ds.columns}
        for c in ds.columns:
            if c.kind == "key":
                row[c.name] = f"{rnd.choice(_HOSTILE)}{n}"
        row["toplevel"] = rnd.choice("ttf")
        row["query"] = rnd.choice(_HOSTILE) * rnd.randrange(1, 50)
        rows.append(row)
    return rows


def _copy_lines(module: str, rows: list[dict[str, str]]) -> list[bytes]:
    """``rows`` as the lines of their spool, read as a scrape reads them."""
    return latest_module._lines(latest_module._read(spool(module, rows)))


def _reference_top(view: View, rows: list[dict[str, str]], cap: int) -> list[int]:
    """The rows a capped view keeps, by the rules written down plainly."""

    def rank(row: dict[str, str]) -> float:
        # Added in order (sum() compensates, on Python 3.12 and later).
        total = 0.0
        for c in view.rank:
            if row[c] != "\\N":
                total += float(row[c])
        return total

    order = sorted(range(len(rows)), key=lambda n: (rank(rows[n]), n), reverse=True)
    if view.where is not None:
        column, value, equal = view.where
        order = [n for n in order if (rows[n][column] == value) is equal]
    return order[:cap]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(
    "module", ["pg_stat_statements", "pg_stat_user_tables", "pg_stat_user_indexes"]
)
def test_the_top_matches_a_plain_sort(module: str, seed: int) -> None:
    """Ties, NULLs, the filter and hostile text: the top is what sorting every row gives."""
    rnd = random.Random(seed)
    rows = _made_up_rows(module, rnd, rnd.choice([0, 1, 7, 60, 400]))
    lines = _copy_lines(module, rows)
    (cv,) = (cv for cv in latest_module._sources()[module] if cv.view.cap is not None)
    for cap in (0, 1, 3, 20, len(rows), len(rows) + 5):
        got = latest_module._top(cv, lines, cap)
        assert got == [lines[n].split(b"\t") for n in _reference_top(cv.view, rows, cap)]


def test_the_top_survives_nan_ranks() -> None:
    """NaN compares false both ways: some order, but cap rows, each once, that pass the filter."""
    rnd = random.Random(1)
    rows = _made_up_rows("pg_stat_statements", rnd, 200)
    for row in rows[::3]:
        row["total_exec_time"] = "NaN"
    lines = _copy_lines("pg_stat_statements", rows)
    (cv,) = latest_module._sources()["pg_stat_statements"]
    got = latest_module._top(cv, lines, 20)
    assert len(got) == 20 and len({tuple(f) for f in got}) == 20
    assert all(f[4] == b"t" for f in got)


# -- A server down: its series go, its counters' state stays ------------------------


def test_a_failed_snapshot_drops_the_server_and_keeps_its_counters() -> None:
    latest = Latest()
    labels = {"server": "s", "dbname": "db", "schema": "public", "table": "t"}
    latest.update("s", 1.0, INFO, [spool("pg_stat_user_tables", [table("t", seq_scan=5)])])
    latest.update("k", 1.0, INFO, [spool("pg_stat_user_tables", [table("t", seq_scan=1)])])
    assert registry(latest).get_sample_value("pgfleet_table_seq_scans_total", labels) == 5
    latest.down("s")
    assert set(latest.generations()) == {"k"}
    assert [v.alias for v in latest.servers()] == ["k"]
    assert 'server="s"' not in generate_latest(registry(latest)).decode()
    latest.down("never-seen")  # not an error
    # Back, its statistics reset meanwhile: the counter goes on from 5.
    latest.update("s", 2.0, INFO, [spool("pg_stat_user_tables", [table("t", seq_scan=2)])])
    assert registry(latest).get_sample_value("pgfleet_table_seq_scans_total", labels) == 7


def test_a_failed_snapshot_drops_the_one_pending() -> None:
    latest = Latest()
    latest.update("s", 1.0, INFO, [spool("pg_stat_user_tables", [table("t", seq_scan=1)])])
    assert latest.get_stats()["pending_bytes"] > 0
    latest.down("s")
    assert latest.generations() == {} and latest.get_stats()["pending_bytes"] == 0


def test_a_vacuums_phase_is_read_at_every_snapshot() -> None:
    """The statement text is kept from the entry's first snapshot; a vacuum's phase moves."""
    latest = Latest()

    def vacuum(phase: str) -> dict[str, str]:
        return {
            "datname": "db",
            "schemaname": "public",
            "relname": "t",
            "phase": phase,
            "heap_blks_total": "10",
        }

    for n, phase in enumerate(("scanning heap", "vacuuming indexes"), 1):
        latest.update("s", float(n), INFO, [spool("pg_stat_progress_vacuum", [vacuum(phase)])])
        info = _samples(latest, "pgfleet_vacuum_info", table="t")
        assert [s.labels["phase"] for s in info] == [phase]


# -- Users' sources: declared columns, names checked ----------------------------------


def user_source(module: str, *exports: tuple[str, int, str, str]) -> RegisteredSource:
    """A user's source exporting (column, position, kind, type) columns."""
    return RegisteredSource(
        module,
        f"public.{module}_src",
        None,
        True,
        10,
        tuple(ExportedColumn(c, p, k, t, "") for c, p, k, t in exports),
    )


def user_spool(source: RegisteredSource, rows: list[str]) -> Staged:
    """Rows as fetch() leaves them (srvid, then the source's columns, tab-separated)."""
    buf = io.BytesIO("".join(f"1\t{row}\n" for row in rows).encode())
    buf.seek(0, io.SEEK_END)
    return Staged(source, buf)


QUEUE = (
    ("queue", 2, "label", "text"),
    ("depth", 3, "gauge", "integer"),
    ("processed", 4, "counter", "bigint"),
    ("paused", 5, "gauge", "boolean"),
    ("last_run", 6, "gauge", "timestamp with time zone"),
)
TS = "2026-12-01 00:00:00+00"


def test_user_source_families() -> None:
    latest = Latest()
    src = user_source("my_queue", *QUEUE)
    latest.update(
        "s",
        1.0,
        INFO,
        [
            spool("pg_stat_user_tables", [table("t", seq_scan=1)]),
            user_spool(
                src,
                [
                    f"{TS}\tmail\t3\t100\tf\t{TS}",
                    f"{TS}\tsms\t0\t7\tt\t\\N",
                    # Rows sharing their labels are summed.
                    f"{TS}\tmail\t1\t1\tf\t{TS}",
                    # What does not parse is no sample; a short row is no row.
                    f"{TS}\tweird\tmany\tlots\tmaybe\tyesterday",
                    f"{TS}\tshort",
                ],
            ),
        ],
    )
    reg = registry(latest)

    def value(name: str, queue: str) -> float | None:
        return reg.get_sample_value(
            f"pgfleet_custom_my_queue_{name}", {"server": "s", "queue": queue}
        )

    assert value("depth", "mail") == 4
    assert value("processed_total", "mail") == 101
    assert value("paused", "sms") == 1
    assert value("last_run", "mail") == 2 * datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    assert value("last_run", "sms") is None
    assert value("depth", "weird") is None and value("processed_total", "weird") is None
    assert value("depth", "short") is None
    body = generate_latest(reg)
    res = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    # Counters see through a reset, as the built-in sources' do.
    latest.update("s", 2.0, INFO, [user_spool(src, [f"{TS}\tmail\t0\t5\tf\t{TS}"])])
    assert value("processed_total", "mail") == 106
    assert value("processed_total", "sms") is None  # gone from the source


@pytest.mark.parametrize(
    "exports",
    [
        (("queue", 2, "label", "text"), ("Depth", 3, "gauge", "integer")),
        (("queue", 2, "label", "text"), ("de pth", 3, "gauge", "integer")),
        (("queue", 2, "label", "text"), ('x"} 1\nevil{a="', 3, "gauge", "integer")),
        (("server", 2, "label", "text"), ("depth", 3, "gauge", "integer")),
        (("__name__", 2, "label", "text"), ("depth", 3, "gauge", "integer")),
        (("queue", 2, "label", "text"), ("depth_total", 3, "gauge", "integer")),
        (("queue", 2, "label", "text"), ("depth", 3, "gauge", "text")),
        (("queue", 2, "label", "text"), ("depth", 3, "histogram", "integer")),
        (("queue", 2, "label", "text"), ("depth", 0, "gauge", "integer")),
        (("queue", 2, "label", "text"), ("depth", 3, "gauge", "integer"),
         ("depth", 4, "counter", "bigint")),
        (("queue", 2, "label", "text"),),
    ],
)  # fmt: skip
def test_user_source_names_are_checked(exports: tuple[tuple[str, int, str, str], ...]) -> None:
    """Whatever the repository says, the exporter writes nothing a user's names would break."""
    latest = Latest()
    src = user_source("my_queue", *exports)
    latest.update("s", 1.0, INFO, [user_spool(src, [f"{TS}\tmail\t3\t100"])])
    body = generate_latest(registry(latest)).decode()
    assert "pgfleet_custom" not in body


def test_user_source_bad_module_name_and_collisions() -> None:
    latest = Latest()
    evil = user_source('evil"', ("depth", 3, "gauge", "integer"))
    # pgfleet_custom_a_b_c twice: the first module by name keeps it.
    a = user_source("a", ("b_c", 2, "gauge", "integer"))
    a_b = user_source("a_b", ("c", 2, "gauge", "integer"), ("d", 3, "gauge", "integer"))
    # A built-in source's rows with a declaration: the declaration is ignored.
    builtin_rows = spool("pg_stat_database", [{"datname": "db", "xact_commit": "1"}])
    builtin_rows.source = dataclasses.replace(builtin_rows.source, exports=a.exports)
    latest.update(
        "s", 1.0, INFO, [user_spool(s, [f"{TS}\t1\t2"]) for s in (evil, a_b, a)] + [builtin_rows]
    )
    reg = registry(latest)
    assert reg.get_sample_value("pgfleet_custom_a_b_c", {"server": "s"}) == 1
    assert reg.get_sample_value("pgfleet_custom_a_b_d", {"server": "s"}) is None
    assert reg.get_sample_value(
        "pgfleet_database_xact_commit_total", {"server": "s", "dbname": "db"}
    )
    body = generate_latest(reg).decode()
    assert "evil" not in body and "custom_pg_stat_database" not in body


def test_user_source_entries_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(custom, "MAX_ENTRIES", 3)
    latest = Latest()
    src = user_source("my_queue", *QUEUE[:3])
    rows = [f"{TS}\tq{i}\t{i}\t{i}" for i in range(10)]
    latest.update("s", 1.0, INFO, [user_spool(src, rows)])
    depths = _samples(latest, "pgfleet_custom_my_queue_depth")
    assert sorted(s.labels["queue"] for s in depths) == ["q0", "q1", "q2"]


def test_user_source_failing_drops_its_series_alone() -> None:
    latest = Latest()
    src = user_source("my_queue", *QUEUE[:3])
    latest.update(
        "s",
        1.0,
        INFO,
        [
            spool("pg_stat_user_tables", [table("t", seq_scan=1)]),
            user_spool(src, [f"{TS}\tq\t1\t9"]),
        ],
    )
    assert _samples(latest, "pgfleet_custom_my_queue_processed_total")
    # Its query failed on the server this time: no spool of it.
    latest.update("s", 2.0, INFO, [spool("pg_stat_user_tables", [table("t", seq_scan=2)])])
    assert not _samples(latest, "pgfleet_custom_my_queue_processed_total")
    assert _samples(latest, "pgfleet_table_seq_scans_total")
    # Back after a reset: goes on from 9.
    latest.update("s", 3.0, INFO, [user_spool(src, [f"{TS}\tq\t1\t2"])])
    (s,) = _samples(latest, "pgfleet_custom_my_queue_processed_total")
    assert s.value == 11
