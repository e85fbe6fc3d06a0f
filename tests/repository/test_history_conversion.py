"""Migration 0012 converts the history in place, in batches, and keeps every point.

A repository at schema version 11 is filled with a week of history written by
the version 11 code itself (rows in ``<m>_current``, then
``pgfleet.metric_aggregate``): windows of 1 to 100 snapshots, some crossing
midnight UTC, entries that change only sometimes, NULLs, tombstones, hostile
text, floats that only survive an exact round trip, a snapshot aggregated
after the window it belongs to, and a user's source of less common types that
gained a column half-way.  Every series and per-key sums over a few ranges are
recorded, then compared after the migration (nothing converted yet), half-way
through the conversion, and once it is done.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgfleet.cluster import Cluster
from pgfleet.repository import schema
from tests.fix_clusters import NewDatabase
from tests.fix_repository import RunCli, connect

OLD_VERSION = 11

# Not on a day boundary, so that the windows' edges fall anywhere.
T0 = datetime(2024, 3, 4, 19, 32, 30, tzinfo=UTC)
STEP = timedelta(minutes=5)
WEEK = 7 * 24 * 12  # snapshots, one every 5 minutes
# Snapshots per aggregation window, in turn: one snapshot, 5 (the new form
# keeps no totals up to 5 points) and 6, 100 (several of them cross midnight).
WINDOW_SIZES = (5, 100, 1, 6, 37, 5, 100, 12, 2, 64)
# The last snapshots stay in <m>_current, never aggregated.
LEFT_IN_CURRENT = 3

# Text a settings value may hold: the separators of the compact form (',' ';'),
# its escapes ('%', '%2C', '%00'...) and what a careless quoting trips on.
HOSTILE = (
    ",",
    ";",
    "%",
    "%2C",
    "%25",
    "%3B",
    "%00",
    "",
    "back\\slash\\",
    'quote\'s "dq"',
    "new\nline",
    "ünïcødé 🐘",
    ",;%,;",
    "a,b;c%d",
    "x;",
    ";;",
    "%%",
    "NULL",
    "{}",
    " ",
    "\t",
)

# A user's source (create_metric_source) with the types the built-in ones do
# not have: the compact form writes each as text and casts it back.
EXOTIC_SETUP = """
CREATE TABLE public.exotic_src_tmp (
    srvid integer NOT NULL, ts timestamptz NOT NULL, k text, "Odd, key" integer,
    c_int integer, c_real real, g_interval interval, g_json jsonb, g_arr text[],
    g_inet inet, g_uuid uuid, g_ts timestamp, g_date date, g_num numeric(12, 3),
    g_bytea bytea, "g; odd," text);
CREATE FUNCTION public.exotic_src(_srvid integer) RETURNS SETOF public.exotic_src_tmp
LANGUAGE sql AS $$ SELECT * FROM public.exotic_src_tmp WHERE srvid = _srvid $$;
SELECT pgfleet.create_metric_source(
    'exotic', 'public.exotic_src', '{k,"Odd, key"}', '{c_int,c_real}', '{}',
    '{g_interval,g_json,g_arr,g_inet,g_uuid,g_ts,g_date,g_num,g_bytea,"g; odd,"}', '{}');
"""
# The source gains a counter half-way: the points written before have none.
# Version 11 cannot change <m>_series' result type in place: it goes first.
EXOTIC_GAINS_A_COLUMN = """
ALTER TABLE public.exotic_src_tmp ADD COLUMN c_late bigint;
DROP FUNCTION pgfleet.exotic_series(integer, timestamptz, timestamptz);
SELECT pgfleet.create_metric_source(
    'exotic', 'public.exotic_src', '{k,"Odd, key"}', '{c_int,c_real,c_late}', '{}',
    '{g_interval,g_json,g_arr,g_inet,g_uuid,g_ts,g_date,g_num,g_bytea,"g; odd,"}', '{}');
"""


@dataclass(frozen=True)
class Fill:
    """How to make a source's rows for snapshot ``s`` (0-based) of entry ``e``.

    SQL expressions over ``s``, ``e`` and the parameters ``%(srvid)s`` and
    ``%(t0)s`` (the first snapshot's time).
    """

    entries: int
    keys: dict[str, str]
    values: dict[str, str]
    # When an entry changed (unchanged entries have no row).
    changed: str
    # A tombstone: the entry vanished, a row of NULLs.
    vanished: str = "false"
    # Columns the source gains half-way through the week.
    late: dict[str, str] = field(default_factory=dict)


FILLS: dict[str, Fill] = {
    "pg_stat_statements": Fill(
        entries=16,
        keys={
            "datname": "(ARRAY['app', 'odd,db;%%', 'postgres', 'ünï €'])[e %% 4 + 1]",
            "rolname": "'role_' || e %% 3",
            "toplevel": "e %% 2 = 0",
            # Near both ends of bigint.
            "queryid": "e * 576460752303423487 * CASE WHEN e %% 2 = 0 THEN -1 ELSE 1 END",
        },
        values={
            "calls": "nullif((s * e + %(srvid)s) %% 5, 0)",
            "rows": "s::bigint * 1000003 + e",
            "shared_blks_hit": "1099511627776 + s * e",
            # 2^53 + 1: more than a double holds exactly.
            "shared_blks_read": "CASE WHEN s %% 50 = 0 THEN 9007199254740993 END",
            "wal_bytes": "CASE e %% 3 WHEN 0 THEN (s * e)::numeric / 1000"
            " WHEN 1 THEN 123456789012345678901234567890.125 + s END",
            "total_exec_time": "s * 0.1::float8 + e * 0.7::float8 / 3",
            "total_plan_time": "CASE e %% 4 WHEN 0 THEN 1e-300::float8"
            " WHEN 1 THEN 0.1::float8 + 0.2::float8 - 0.3::float8"
            " WHEN 2 THEN 1e300::float8 * (s %% 3 + 1) END",
            # Subnormal and smallest normal doubles.
            "blk_read_time": "CASE s %% 3 WHEN 0 THEN 5e-324::float8"
            " WHEN 1 THEN 2.2250738585072014e-308::float8 END",
            # The largest double, once, in an entry with no other large value.
            "blk_write_time": "CASE WHEN e = 3 AND s = 1000 THEN 1.7976931348623157e308::float8"
            " WHEN e = 3 THEN s * 1e-3::float8 END",
            # The last column: set at some points only.
            "jit_generation_time": "CASE WHEN s %% 7 = 0 THEN s / 7.0::float8 END",
        },
        # Most change every 1 to 5 snapshots, the last ones rarely.
        changed="(s + e + %(srvid)s) %% CASE WHEN e > 12 THEN 97 ELSE 1 + e %% 5 END = 0",
    ),
    "pg_stat_database": Fill(
        entries=4,
        keys={"datname": "(ARRAY['postgres', 'app', 'odd,name;%%', 'ünï'])[e]"},
        values={
            "xact_commit": "nullif((s * 17 + e) %% 1000, 0)",
            "xact_rollback": "CASE WHEN s %% 10 = e THEN 1 END",
            "blks_read": "s::bigint * s * 1000",
            "tup_returned": "100000000000003 * e",
            "blk_read_time": "s * 0.3::float8 / 7",
            "session_time": "1e300::float8 / (e + 1)",
            "idle_in_transaction_time": "CASE WHEN s %% 2 = 0 THEN 0.1::float8 * s END",
            "numbackends": "(s / 10 + e) %% 50",
        },
        changed="e = 1 OR (s + e) %% CASE WHEN e = 4 THEN 41 ELSE e + 1 END = 0",
    ),
    "pg_stat_user_tables": Fill(
        entries=12,
        keys={
            "datname": "'app'",
            "schemaname": "CASE WHEN e %% 2 = 0 THEN 'public' ELSE 'odd ;,schema' END",
            "relname": "'t' || e",
        },
        values={
            "seq_scan": "nullif(s %% 3, 0)",
            "n_tup_ins": "s * e",
            "heap_blks_hit": "CASE WHEN e %% 2 = 0 THEN s * 1000 END",
            "n_live_tup": "(s / 20) * e",
            "n_dead_tup": "CASE WHEN s %% 5 <> 0 THEN s %% 17 END",
            "last_autovacuum": "CASE e %% 4 WHEN 0 THEN %(t0)s + s * interval '1.000001 s'"
            " WHEN 1 THEN 'infinity'::timestamptz"
            " WHEN 2 THEN '1999-12-31 23:59:59.999999+05:30'::timestamptz END",
            "last_autoanalyze": "CASE e %% 3 WHEN 0 THEN '-infinity'::timestamptz"
            " WHEN 1 THEN '0044-03-15 12:00:00.000001+00 BC'::timestamptz END",
            "size": "8192 * (s + e)",
        },
        changed="(s * 3 + e) %% CASE WHEN e > 9 THEN 53 ELSE 1 + e %% 4 END = 0",
        vanished="e = 11 AND s %% 50 = 25",
    ),
    "settings": Fill(
        entries=13,
        keys={"name": "CASE WHEN e = 13 THEN 'odd,key;%%' ELSE 'guc_' || e END"},
        values={
            "setting": "(%(hostile)s::text[])[(s / 7 + e) %% %(nhostile)s + 1]",
            "unit": "CASE e %% 3 WHEN 0 THEN '' WHEN 1 THEN 'ms' END",
            "source": "CASE WHEN s %% 2 = 0 THEN 'configuration file' ELSE ';' END",
            "pending_restart": "CASE WHEN e %% 3 <> 0 THEN s %% 2 = 0 END",
        },
        changed="e = 1 OR (s + e) %% 10 = 0",
    ),
    # No keys: one entry per server.
    "pg_stat_wal": Fill(
        entries=1,
        keys={},
        values={
            "wal_records": "s * 7",
            "wal_bytes": "s * 1.5",
            "wal_write_time": "CASE WHEN s %% 4 <> 0 THEN s / 3.0::float8 END",
        },
        changed="s %% 3 <> 1",
    ),
    "exotic": Fill(
        entries=3,
        keys={"k": "'k' || e", '"Odd, key"': "e * 1000"},
        values={
            "c_int": "nullif(s %% 4, 0)",
            "c_real": "CASE WHEN s %% 3 = 0 THEN 0.1::real * s END",
            # Mixed signs: postgres style marks each, whatever IntervalStyle reads it.
            "g_interval": "(ARRAY['-1 day +02:00:00', '1 mon -3 days', '-00:00:01.5',"
            " '1 year 2 mons 3 days 04:05:06.789', '-1 year -2 mons'])[s %% 5 + 1]::interval",
            "g_json": "jsonb_build_object('a,b', s, 'c;d', ARRAY[1, 2], 'e%%', 'x,y;z')",
            "g_arr": "ARRAY['a,b', 'c;d', NULL, '', '%%2C', e'q\"\\\\']",
            "g_inet": "('192.168.0.' || s %% 250 || '/24')::inet",
            "g_uuid": "md5(s::text)::uuid",
            "g_ts": "'2024-03-04 23:00:00.123456'::timestamp + s * interval '1 min'",
            "g_date": "'2024-03-04'::date + s",
            "g_num": "CASE WHEN e <> 2 THEN s * 1.5 END",
            "g_bytea": "decode(md5(s::text), 'hex') || '\\x2c3b25'::bytea",
            '"g; odd,"': "(ARRAY[',', ';', '%%', '', 'x'])[s %% 5 + 1]",
        },
        late={"c_late": "s * 3"},
        changed="(s + e) %% CASE WHEN e = 3 THEN 29 ELSE 2 END = 0",
    ),
}
MODULES = tuple(FILLS)


def _ts(s: int, srvid: int) -> datetime:
    # Each server's snapshots at its own odd offset: times are kept to the
    # microsecond.
    return T0 + s * STEP + timedelta(seconds=srvid, microseconds=123457 * srvid)


def _insert(m: str, late: bool) -> sql.Composed:
    f = FILLS[m]
    values = {**f.values, **(f.late if late else {})}
    # Column names as SQL writes them: some are quoted identifiers already.
    cols = [sql.SQL(c) if c.startswith('"') else sql.Identifier(c) for c in [*f.keys, *values]]
    # The first snapshot of an entry knows nothing of before it: NULLs.
    exprs = [f"CASE WHEN s > 0 AND NOT ({f.vanished}) THEN {v} END" for v in values.values()]
    return sql.SQL(
        "INSERT INTO {} (srvid, ts, {}) SELECT %(srvid)s, %(t0)s + s * %(step)s, {}"
        " FROM generate_series(%(a)s::integer, %(b)s::integer) s,"
        " generate_series(1, {}) e WHERE s = 0 OR ({})"
    ).format(
        sql.Identifier("pgfleet", f"{m}_current"),
        sql.SQL(", ").join(cols),
        sql.SQL(", ".join([*f.keys.values(), *exprs])),
        sql.Literal(f.entries),
        sql.SQL(f.changed),
    )


def _windows(srvid: int, total: int) -> Iterator[tuple[int, int]]:
    """The snapshot ranges aggregated together, the servers out of step."""
    start, i = 0, srvid
    while start < total:
        size = WINDOW_SIZES[i % len(WINDOW_SIZES)]
        yield start, min(start + size, total) - 1
        start += size
        i += 1


def fill(conn: psycopg.Connection[Any], srvid: int, snapshots: int, late_window: bool) -> None:
    """History as version 11 wrote it: a window's rows, then its aggregation."""
    params: dict[str, object] = {
        "srvid": srvid,
        "t0": _ts(0, srvid),
        "step": STEP,
        "hostile": list(HOSTILE),
        "nhostile": len(HOSTILE),
    }

    def gained() -> bool:
        return (
            conn.execute(
                "SELECT 1 FROM pg_attribute WHERE attrelid = 'public.exotic_src_tmp'::regclass"
                " AND attname = 'c_late'"
            ).fetchone()
            is not None
        )

    inserts = {m: _insert(m, gained()) for m in MODULES}
    aggregated = snapshots - LEFT_IN_CURRENT
    windows = list(_windows(srvid, aggregated))
    # Half-way, the second server has a snapshot from the middle of a window
    # that arrived after it was aggregated (a collector's spool drained
    # late): it goes with the next window.
    half = len(windows) // 2
    late = next(i for i in range(half, len(windows)) if windows[i - 1][1] - windows[i - 1][0] >= 5)
    for i, (a, b) in enumerate(windows):
        if a >= snapshots // 2 and not gained():
            conn.execute(EXOTIC_GAINS_A_COLUMN)
            inserts = {m: _insert(m, True) for m in MODULES}
        if late_window and i == late:
            # Between the previous window's third and fourth snapshots.
            before = windows[i - 1][0] + 2
            params_late = {**params, "t0": _ts(0, srvid) + STEP / 2, "a": before, "b": before}
            for m in MODULES:
                conn.execute(inserts[m], params_late)
        for m in MODULES:
            conn.execute(inserts[m], {**params, "a": a, "b": b})
            conn.execute("SELECT pgfleet.metric_aggregate(%s, %s)", (m, srvid))
    for m in MODULES:
        conn.execute(inserts[m], {**params, "a": aggregated, "b": snapshots - 1})


def old_repository(
    pg18: Cluster, new_database: NewDatabase, monkeypatch: pytest.MonkeyPatch, snapshots: int
) -> tuple[str, list[int]]:
    """A repository at schema version 11 with two servers' history; its dsn and srvids."""
    dsn = new_database(pg18)
    every = schema.migrations
    with monkeypatch.context() as mp, connect(dsn) as conn:
        mp.setattr(schema, "migrations", lambda: [m for m in every() if m.version <= OLD_VERSION])
        schema.upgrade(conn)
        assert schema.current_version(conn) == OLD_VERSION
        conn.execute(EXOTIC_SETUP)
        srvids = [
            int(r[0])
            for r in conn.execute(
                "INSERT INTO pgfleet.servers (alias, host, port)"
                " VALUES ('one', 'h1', 5432), ('two', 'h2', 5433) RETURNING srvid"
            )
        ]
        for i, srvid in enumerate(srvids):
            fill(conn, srvid, snapshots, late_window=i == 1)
    return dsn, srvids


def _reader(dsn: str) -> psycopg.Connection[Any]:
    # The readers decode text: a session's DateStyle, IntervalStyle and
    # TimeZone must not change what they read.  Floats are printed exactly
    # (extra_float_digits 1), so equal text is equal values.
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("SET DateStyle = 'SQL, DMY'")
    conn.execute("SET IntervalStyle = sql_standard")
    conn.execute("SET TimeZone = 'Asia/Kolkata'")
    conn.execute("SET extra_float_digits = 1")
    return conn


def _writer(dsn: str) -> psycopg.Connection[Any]:
    # The conversion pins the settings its text depends on: a session that
    # prints floats to 15 digits, dates the German way, bytea escaped and
    # times in a zone half an hour off converts to exactly the same values.
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("SET DateStyle = 'German, DMY'")
    conn.execute("SET IntervalStyle = sql_standard")
    conn.execute("SET TimeZone = 'America/St_Johns'")
    conn.execute("SET extra_float_digits = 0")
    conn.execute("SET bytea_output = escape")
    return conn


Range = tuple[datetime | str, datetime | str]
Series = dict[tuple[str, int, str], list[str]]
Sums = dict[tuple[str, int, str], dict[tuple[Any, ...], tuple[Any, ...]]]


def series(
    conn: psycopg.Connection[Any], srvids: Sequence[int], ranges: dict[str, Range]
) -> Series:
    """Every point of every source and server in each range, each row as its text."""
    got: Series = {}
    for m in MODULES:
        query = sql.SQL("SELECT s::text FROM {}(%s, %s, %s) s").format(
            sql.Identifier("pgfleet", f"{m}_series")
        )
        for srvid in srvids:
            for name, (lo, hi) in ranges.items():
                got[m, srvid, name] = sorted(r[0] for r in conn.execute(query, (srvid, lo, hi)))
    return got


def _counters(conn: psycopg.Connection[Any], m: str) -> list[tuple[str, str]]:
    """A source's counters and their types."""
    return [
        (str(r[0]), str(r[1]))
        for r in conn.execute(
            "SELECT a.attname, format_type(a.atttypid, NULL)"
            " FROM pgfleet.metric_sources s, unnest(s.counters) WITH ORDINALITY c(name, n)"
            " JOIN pg_attribute a ON a.attname = c.name"
            " WHERE s.module = %s AND a.attrelid = to_regclass('pgfleet.' || quote_ident(%s))"
            " ORDER BY c.n",
            (m, f"{m}_current"),
        )
    ]


def sums(
    conn: psycopg.Connection[Any],
    srvids: Sequence[int],
    ranges: dict[str, Range],
    counters_of: dict[str, list[tuple[str, str]]],
) -> Sums:
    """Per source, server and range: each key's sum of each counter."""
    got: Sums = {}
    for m in MODULES:
        counters = counters_of[m]
        if not counters:
            continue
        keys = [sql.SQL(k) if k.startswith('"') else sql.Identifier(k) for k in FILLS[m].keys]
        query = sql.SQL("SELECT {} FROM {}(%s, %s, %s) GROUP BY {}").format(
            sql.SQL(", ").join(
                [*keys, *(sql.SQL("sum({})").format(sql.Identifier(c)) for c, _ in counters)]
            ),
            sql.Identifier("pgfleet", f"{m}_sums"),
            sql.SQL(", ").join(keys) if keys else sql.SQL("()"),
        )
        n = len(keys)
        for srvid in srvids:
            for name, (lo, hi) in ranges.items():
                got[m, srvid, name] = {
                    tuple(r[:n]): tuple(r[n:]) for r in conn.execute(query, (srvid, lo, hi))
                }
    return got


def assert_same_series(before: Series, after: Series, when: str) -> None:
    assert before.keys() == after.keys()
    for what, rows in before.items():
        if rows != after[what]:
            lost = list((Counter(rows) - Counter(after[what])).elements())
            made = list((Counter(after[what]) - Counter(rows)).elements())
            pytest.fail(
                f"{when}: series {what} differ ({len(rows)} rows before, "
                f"{len(after[what])} after): lost {lost[:5]}, made {made[:5]}"
            )


# How far a floating point sum may move: it depends on the order of its
# terms, and the old and the new form add the same points in other orders
# (window totals, chunks of 10, single points), so only the last bits may
# differ.  The window totals of a real column are sums of reals (7 digits).
# Integers (summed as numeric) and numerics: not at all.
REL_TOL = {"double precision": 1e-9, "real": 1e-5}


def assert_same_sums(before: Sums, after: Sums, types: dict[str, list[str]], when: str) -> None:
    assert before.keys() == after.keys()
    for what, per_key in before.items():
        assert per_key.keys() == after[what].keys(), f"{when}: keys of {what}"
        tolerances = [REL_TOL.get(t) for t in types[what[0]]]
        for key, values in per_key.items():
            other = after[what][key]
            same = [
                math.isclose(a, b, rel_tol=tol)
                if tol and a is not None and b is not None
                else a == b
                for a, b, tol in zip(values, other, tolerances, strict=True)
            ]
            assert all(same), f"{when}: sums of {what} for {key}: {values} before, {other} after"


def _count(conn: psycopg.Connection[Any], table: str, srvid: int | None = None) -> int:
    row = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {} WHERE %(srvid)s::integer IS NULL OR srvid = %(srvid)s"
        ).format(sql.Identifier("pgfleet", table)),
        {"srvid": srvid},
    ).fetchone()
    assert row is not None
    return int(row[0])


def _points(conn: psycopg.Connection[Any], table: str, old: bool = False) -> int:
    """Points held by a history table, of the old form (an array of points)
    or the new (a bit per point)."""
    column = "cardinality(points)" if old else "length(replace(at::text, '0', ''))"
    row = conn.execute(
        sql.SQL("SELECT coalesce(sum({}), 0) FROM {}").format(
            sql.SQL(column), sql.Identifier("pgfleet", table)
        )
    ).fetchone()
    assert row is not None
    return int(row[0])


def _old_relations(conn: psycopg.Connection[Any], m: str) -> list[str]:
    """The old history's tables and partitions still there."""
    return [
        str(r[0])
        for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'pgfleet'::regnamespace"
            " AND (relname = %s OR relname LIKE %s) ORDER BY 1",
            (f"{m}_history_v1", f"{m}\\_v1\\_%"),
        )
    ]


def test_conversion_keeps_every_point(
    pg18: Cluster, new_database: NewDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The readers return the same before, during and after the conversion."""
    dsn, srvids = old_repository(pg18, new_database, monkeypatch, WEEK)
    one = srvids[0]
    start = next(a for a, b in _windows(one, WEEK) if b - a == 99)
    ranges: dict[str, Range] = {
        "week": ("-infinity", "infinity"),
        # Cutting windows on both sides, between snapshots and at one.
        "cut": (_ts(301, one) + timedelta(seconds=7), _ts(1703, one)),
        # Inside one window of 100 snapshots of the first server.
        "inside": (_ts(start + 10, one), _ts(start + 60, one) + timedelta(microseconds=1)),
    }

    with _reader(dsn) as reader:
        for m in (m for m in MODULES if FILLS[m].entries > 1):
            # Rows of one aggregation (they overlap in time) on either side of
            # midnight UTC, in two day partitions.
            row = reader.execute(
                sql.SQL(
                    "SELECT count(*) FROM {0} a JOIN {0} b ON a.srvid = b.srvid"
                    " AND a.ts_start < b.ts_start AND a.ts_end >= b.ts_start"
                    " AND (a.ts_start AT TIME ZONE 'UTC')::date"
                    " < (b.ts_start AT TIME ZONE 'UTC')::date"
                ).format(sql.Identifier("pgfleet", f"{m}_history"))
            ).fetchone()
            assert row is not None and row[0] > 0, m
        # The late snapshot: two rows of one entry (two aggregations) overlap.
        row = reader.execute(
            "SELECT count(*) FROM pgfleet.pg_stat_database_history a"
            " JOIN pgfleet.pg_stat_database_history b USING (srvid, datname)"
            " WHERE a.ts_start < b.ts_start AND a.ts_end > b.ts_start AND srvid = %s",
            (srvids[1],),
        ).fetchone()
        assert row is not None and row[0] > 0
        old_points = {m: _points(reader, f"{m}_history", old=True) for m in MODULES}
        old_rows = {m: _count(reader, f"{m}_history") for m in MODULES}
        before = series(reader, srvids, ranges)
        counters = {m: _counters(reader, m) for m in MODULES}
        types = {m: [t for _, t in c] for m, c in counters.items()}
        before_sums = sums(reader, srvids, ranges, counters)
    for m in MODULES:
        for s in srvids:
            assert before[m, s, "week"] and before[m, s, "inside"], (m, s)
        # The history's points and the rows still waiting in <m>_current.
        assert sum(len(before[m, s, "week"]) for s in srvids) > old_points[m]
    assert all(before_sums.values())

    with _writer(dsn) as writer:
        applied = schema.upgrade(writer)
        assert [mig.version for mig in applied] == list(
            range(OLD_VERSION + 1, schema.latest_version() + 1)
        )
        # Renamed, not moved: nothing converted yet.
        assert set(MODULES) <= set(schema.unconverted(writer))
        for m in MODULES:
            assert _count(writer, f"{m}_history_v1") == old_rows[m]
            assert _count(writer, f"{m}_history") == 0
    with _reader(dsn) as reader:
        assert_same_series(before, series(reader, srvids, ranges), "after the migration")
        after_sums = sums(reader, srvids, ranges, counters)
        assert_same_sums(before_sums, after_sums, types, "after the migration")

    # Half-way: the oldest rows moved batch by batch, each batch its own
    # transaction; the newest still in the old form.
    converted = 0
    with _writer(dsn) as writer:
        for m in MODULES:
            batches = 0
            while _count(writer, f"{m}_history_v1") > old_rows[m] // 2:
                row = writer.execute("SELECT pgfleet.metric_convert(%s, 50)", (m,)).fetchone()
                assert row is not None and row[0] > 0
                converted += row[0]
                batches += 1
            assert batches > 1, m
            assert (
                _points(writer, f"{m}_history") + _points(writer, f"{m}_history_v1", old=True)
                == old_points[m]
            )
        # The collector goes on meanwhile: what waited in <m>_current
        # becomes a window of the new form.
        waiting = {m: _count(writer, f"{m}_current", one) for m in MODULES}
        for m in MODULES:
            assert waiting[m] > 0, m
            writer.execute("SELECT pgfleet.metric_aggregate(%s, %s)", (m, one))
            assert _count(writer, f"{m}_current", one) == 0
    with _reader(dsn) as reader:
        assert_same_series(before, series(reader, srvids, ranges), "half-way")
        after_sums = sums(reader, srvids, ranges, counters)
        assert_same_sums(before_sums, after_sums, types, "half-way")

    batches_of: Counter[str] = Counter()
    rows_of: Counter[str] = Counter()
    with _writer(dsn) as writer, connect(dsn) as other:
        left = {m: _count(other, f"{m}_history_v1") for m in MODULES}

        def progress(module: str, n: int) -> None:
            # Committed when reported: another session sees it at once.
            left[module] -= n
            assert _count(other, f"{module}_history_v1") == left[module]
            batches_of[module] += 1
            rows_of[module] += n

        rest = sum(left.values())
        assert schema.convert(writer, batch=50, progress=progress) == rest
        converted += rest
        assert converted == sum(old_rows.values())
        assert schema.unconverted(writer) == []
        for m in MODULES:
            # Many short transactions, not one long one.
            assert batches_of[m] > 1, m
            assert _old_relations(writer, m) == []
            assert _count(writer, f"{m}_history") > 0, m
            # Every point of the old history, and those aggregated since.
            assert _points(writer, f"{m}_history") == old_points[m] + waiting[m], m
            # What 'repo size' splits the partitions by: the rows and points
            # of each server and day.
            usage = sql.SQL(
                "SELECT srvid, (ts_start AT TIME ZONE 'UTC')::date, count(*),"
                " sum(length(replace(at::text, '0', ''))) FROM {} GROUP BY 1, 2"
            ).format(sql.Identifier("pgfleet", f"{m}_history"))
            assert sorted(writer.execute(usage).fetchall()) == sorted(
                writer.execute(
                    "SELECT srvid, day, rows, points FROM pgfleet.history_usage WHERE module = %s",
                    (m,),
                ).fetchall()
            ), m
        # A second run has nothing left to do.
        assert schema.convert(writer, batch=50, progress=progress) == 0
        assert sum(rows_of.values()) == rest
    with _reader(dsn) as reader:
        assert_same_series(before, series(reader, srvids, ranges), "after the conversion")
        after_sums = sums(reader, srvids, ranges, counters)
        assert_same_sums(before_sums, after_sums, types, "after the conversion")


def test_repo_upgrade_converts(
    pg18: Cluster, new_database: NewDatabase, monkeypatch: pytest.MonkeyPatch, run_cli: RunCli
) -> None:
    """`pgfleet repo upgrade` migrates, then converts; run again, it converts nothing."""
    dsn, srvids = old_repository(pg18, new_database, monkeypatch, 2 * 24 * 12)
    env = {"PGFLEET_REPOSITORY": dsn}
    whole: dict[str, Range] = {"all": ("-infinity", "infinity")}
    with _reader(dsn) as conn:
        rows = sum(_count(conn, f"{m}_history") for m in MODULES)
        before = series(conn, srvids, whole)
    assert rows > 0

    res = run_cli("repo", "upgrade", env=env)
    assert res.rc == 0, res.err
    assert f"repository at schema version {schema.latest_version()}" in res.out
    assert f"converted {rows} history rows" in res.out, res.out
    with _reader(dsn) as conn:
        assert schema.unconverted(conn) == []
        assert_same_series(before, series(conn, srvids, whole), "after repo upgrade")

    res = run_cli("repo", "upgrade", env=env)
    assert res.rc == 0, res.err
    assert "already at schema version" in res.out
    assert "converted" not in res.out, res.out
