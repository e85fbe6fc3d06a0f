"""``pgfleet repo size``: the repository's bytes per server and source, and their growth.

Points are put straight into a source's ``_current`` table and aggregated, so
the figures the rules give (docs/repository.md, "How big is it") are known.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pgfleet.repository import usage
from tests.fix_repository import RunCli, connect, scalar_int

SOURCE = "pg_stat_database"

# Every point of a test within one UTC hour, hence one day partition (at
# whatever time the test runs), and less than 24 hours ago.
BASE = "date_trunc('hour', now() - interval '2 hours', 'UTC')"


def _register(run_cli: RunCli, alias: str) -> int:
    res = run_cli("server", "add", alias, "--host", f"{alias}.invalid", "--frequency", "60")
    assert res.rc == 0, res.err
    out = run_cli("server", "list", "--json")
    return int(next(s["srvid"] for s in json.loads(out.out) if s["alias"] == alias))


def _window(repo: str, srvid: int, databases: int, *, start: str = BASE) -> None:
    """One aggregation window of 5 snapshots a minute apart, every database
    changing at each: 5 points per database, one history row per database."""
    with connect(repo) as conn:
        conn.execute(
            f"""INSERT INTO pgfleet.{SOURCE}_current (srvid, ts, datname, xact_commit, blks_hit)
                SELECT %s, {start} + k * interval '1 minute', 'db' || d, k * d + 1, k * 1000 + d
                  FROM generate_series(0, 4) k, generate_series(1, %s) d""",
            (srvid, databases),
        )
        conn.execute("SELECT pgfleet.metric_aggregate(%s, %s)", (SOURCE, srvid))


def _size(run_cli: RunCli, *args: str) -> dict[str, Any]:
    res = run_cli("repo", "size", "--json", *args)
    assert res.rc == 0, res.err
    data: dict[str, Any] = json.loads(res.out)
    return data


def _source(data: dict[str, Any], alias: str) -> dict[str, Any]:
    srv = next(s for s in data["servers"] if s["alias"] == alias)
    found: dict[str, Any] = next(u for u in srv["sources"] if u["source"] == SOURCE)
    return found


def _partition_bytes(repo: str, day: str | None = None) -> int:
    """The size of the source's day partitions: all, or that of the day of ``day`` (SQL)."""
    one_day = (
        f"AND c.relname = '{SOURCE}_history_' || to_char((({day}) AT TIME ZONE 'UTC')::date, 'YYYYMMDD')"
        if day
        else ""
    )
    return scalar_int(
        repo,
        f"""SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
              FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'pgfleet.{SOURCE}_history'::regclass {one_day}""",
    )


def test_bytes_split_by_points_and_projected(repo: str, run_cli: RunCli) -> None:
    big, small = _register(run_cli, "big"), _register(run_cli, "small")
    _window(repo, big, 200)
    _window(repo, small, 10)

    data = _size(run_cli)
    b, s = _source(data, "big"), _source(data, "small")
    assert (b["points"], b["rows"]) == (1000, 200)
    assert (s["points"], s["rows"]) == (50, 10)
    # One day partition, split by points: 20 to 1.
    part = _partition_bytes(repo)
    assert part > 0
    assert b["history_bytes"] + s["history_bytes"] == pytest.approx(part, abs=1)
    assert b["history_bytes"] == pytest.approx(20 * s["history_bytes"], abs=20)
    assert b["bytes_per_point"] == pytest.approx(s["bytes_per_point"])
    assert b["bytes_per_point"] == pytest.approx(part / 1050)
    # 1000 points over 4 minutes plus one snapshot interval (60 s).
    assert b["points_per_second"] == pytest.approx(1000 / 300)
    assert s["points_per_second"] == pytest.approx(50 / 300)
    assert b["week_bytes"] == pytest.approx(part / 1050 * 1000 / 300 * 7 * 86400, abs=1)

    # Totals add up: per server, over the servers, and to the database's size.
    for srv in data["servers"]:
        assert srv["history_bytes"] == sum(u["history_bytes"] for u in srv["sources"])
        assert srv["points"] == sum(u["points"] for u in srv["sources"])
        assert srv["week_bytes"] == sum(u["week_bytes"] for u in srv["sources"])
    assert data["history_bytes"] == sum(srv["history_bytes"] for srv in data["servers"])
    assert data["week_bytes"] == sum(srv["week_bytes"] for srv in data["servers"])
    assert data["shared_bytes"] == sum(x["bytes"] for x in data["shared"])
    assert data["database_bytes"] == (
        data["history_bytes"] + data["shared_bytes"] + data["rest_bytes"]
    )
    assert data["rest_bytes"] > 0
    shared = next(x for x in data["shared"] if x["source"] == SOURCE)
    # _keys and _windows have rows; every history partition has an owner.
    assert shared["tables_bytes"] > 0 and shared["unattributed_bytes"] == 0
    assert shared["old_history_bytes"] == 0

    # One server: only its figures, the same ones.
    one = _size(run_cli, "--server", "small")
    assert [srv["alias"] for srv in one["servers"]] == ["small"]
    assert _source(one, "small") == s
    assert "shared" not in one and one["database_bytes"] > 0

    # The table: a line per source, a total per server, the repository's size.
    res = run_cli("repo", "size")
    assert res.rc == 0, res.err
    lines = res.out.splitlines()
    assert lines[0].split() == [
        "server",
        "source",
        "history",
        "points",
        "bytes/point",
        "per",
        "week",
    ]
    big_line = next(x for x in lines if x.startswith("big ") and SOURCE in x).split()
    assert big_line[2:4] == usage.human_bytes(b["history_bytes"]).split()
    assert big_line[4] == "1000"
    assert any(x.split()[:2] == ["small", "total"] for x in lines)
    assert lines[-1].startswith(f"repository: {usage.human_bytes(data['database_bytes'])} (")
    assert "per week at the current rate" in lines[-1]


def test_projection_follows_recent_days(repo: str, run_cli: RunCli) -> None:
    """A day 20 days ago counts in the bytes, not in the bytes per point, and
    the rate is now over the last 24 hours rather than since the first point."""
    srvid = _register(run_cli, "a")
    _window(repo, srvid, 20)
    before = _source(_size(run_cli), "a")
    assert before["points_per_second"] == pytest.approx(100 / 300)
    old = "date_trunc('day', now() - interval '20 days', 'UTC')"
    _window(repo, srvid, 100, start=old)
    after = _source(_size(run_cli), "a")
    assert after["points"] == before["points"] + 500
    assert after["history_bytes"] == pytest.approx(_partition_bytes(repo), abs=1)
    assert _partition_bytes(repo, old) > 0
    assert after["history_bytes"] == pytest.approx(
        _partition_bytes(repo, old) + _partition_bytes(repo, BASE), abs=1
    )
    assert after["bytes_per_point"] == pytest.approx(before["bytes_per_point"])
    # The same 100 points, from 24 hours ago to the last one (4 minutes after
    # BASE), plus a snapshot interval.
    span = (
        scalar_int(
            repo, f"SELECT extract(epoch FROM {BASE} + interval '4 minutes' - now())::bigint"
        )
        + 86400
        + 60
    )
    assert after["points_per_second"] == pytest.approx(100 / span, rel=1e-3)
    assert after["week_bytes"] < before["week_bytes"] / 50


def test_read_as_pgfleet_read(repo: str, run_cli: RunCli) -> None:
    """What the web UI's readers may read is enough."""
    srvid = _register(run_cli, "r")
    _window(repo, srvid, 5)
    with connect(repo) as conn:
        conn.execute("SET ROLE pgfleet_read")
        size = usage.repository_size(conn)
        assert [(u.alias, u.points) for u in size.history] == [("r", 25)]
        assert size.database_bytes > size.history_bytes > 0 and size.shared_bytes > 0


def test_no_history_and_unknown_server(repo: str, run_cli: RunCli) -> None:
    _register(run_cli, "quiet")
    res = run_cli("repo", "size", "--server", "quiet")
    assert res.rc == 0, res.err
    assert res.out.startswith("no history yet")
    assert _size(run_cli, "--server", "quiet")["servers"] == []

    res = run_cli("repo", "size", "--server", "nope")
    assert res.rc == 1
    assert res.err == "pgfleet: error: no server named 'nope' (see 'pgfleet server list')\n"
    assert res.out == ""


def test_shared_bytes(repo: str, run_cli: RunCli) -> None:
    """A day partition nobody wrote points in, and history not yet converted
    (<m>_history_v1), are the source's, not a server's."""
    srvid = _register(run_cli, "a")
    _window(repo, srvid, 10)
    with connect(repo) as conn:
        conn.execute(
            "SELECT pgfleet.metric_partition(%s, (now() AT TIME ZONE 'UTC')::date - 3)", (SOURCE,)
        )
        conn.execute("""
            CREATE TABLE pgfleet.settings_history_v1 (srvid integer, ts_start timestamptz, v text)
                PARTITION BY RANGE (ts_start);
            CREATE TABLE pgfleet.settings_v1_20200101 PARTITION OF pgfleet.settings_history_v1
                FOR VALUES FROM ('2020-01-01 00:00+00') TO ('2020-01-02 00:00+00');
            INSERT INTO pgfleet.settings_history_v1 VALUES (1, '2020-01-01 12:00+00', repeat('x', 5000));
        """)
    data = _size(run_cli)
    shared = {x["source"]: x for x in data["shared"]}
    empty_day = _partition_bytes(repo, "now() - interval '3 days'")
    assert empty_day > 0 and shared[SOURCE]["unattributed_bytes"] == empty_day
    assert _source(data, "a")["history_bytes"] == pytest.approx(_partition_bytes(repo, BASE), abs=1)
    assert shared["settings"]["old_history_bytes"] == scalar_int(
        repo, "SELECT pg_total_relation_size('pgfleet.settings_v1_20200101')"
    )
    assert shared["settings"]["old_history_bytes"] > 0
    assert data["database_bytes"] == (
        data["history_bytes"] + data["shared_bytes"] + data["rest_bytes"]
    )
