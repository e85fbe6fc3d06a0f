"""How much of the repository each server and source takes, and how fast it grows.

``pgfleet repo size`` and the web UI's server page.  Nothing here reads the
history itself: the bytes come from the catalog (``pg_total_relation_size``:
heap, TOAST and indexes, one index lookup in pg_class per day partition) and
the points from ``pgfleet.history_usage``, which aggregation fills (migration
0012) with one row per server, source and day.  ``pgfleet_read`` may run it.

The rules (docs/repository.md, "How big is it"):

- **history bytes** of a server and source: for each day partition
  ``pgfleet.<m>_history_YYYYMMDD``, its size times the server's share of the
  points written into it (``history_usage`` rows of that source and day);
- **shared bytes** of a source, not split between servers: its other tables
  (``<m>_keys``, ``_windows``, ``_last``, ``_current``, ``_once``,
  ``_rollup``), its old history (``<m>_history_v1`` and its partitions) while
  it exists, and any day partition no server has points in;
- **bytes per point**: history bytes over points, over the days among the last
  7 (today, UTC, and the 6 before) that have a partition; over every day that
  has one when none of those does;
- **points per second**: the points of the last 24 hours of history -- each
  ``history_usage`` row's points times the share of its ``first_ts ..
  last_ts`` after ``now() - 24 h`` (all of them or none when the two are
  equal) -- over ``W1 - W0`` plus the server's frequency (n snapshots cover n
  intervals), where W0 is the later of ``now() - 24 h`` and the earliest
  ``first_ts`` and W1 the latest ``last_ts``.  Nothing since W0: 0;
- **per week**: bytes per point x points per second x 7 days.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import groupby
from typing import Any

import psycopg
from psycopg.rows import tuple_row

WEEK = 7 * 86400

# One row per (server, source) with history: see the module's docstring for
# the rules.  %(srvid)s NULL: every server.
_PER_SOURCE = """
WITH days AS (
    -- Per source and day: every server's points, and the day partition's
    -- size, found by its name through pg_class's index (once per day,
    -- however many servers share it).
    SELECT h.module, h.day, sum(h.points) AS points,
           (SELECT pg_total_relation_size(c.oid)
              FROM pg_class c
             WHERE c.relnamespace = 'pgfleet'::regnamespace AND c.relispartition
               AND c.relname
                   = (h.module || '_history_' || to_char(h.day::timestamp, 'YYYYMMDD'))::name
           ) AS bytes
      FROM pgfleet.history_usage h
     WHERE %(srvid)s::integer IS NULL
        OR (h.module, h.day) IN (SELECT module, day FROM pgfleet.history_usage
                                  WHERE srvid = %(srvid)s::integer)
     GROUP BY h.module, h.day
),
per AS (
    SELECT u.srvid, u.module, u.rows, u.points, u.first_ts, u.last_ts,
           d.bytes IS NOT NULL AS stored,
           u.day >= (now() AT TIME ZONE 'UTC')::date - 6 AS recent,
           coalesce(d.bytes::float8 * u.points / nullif(d.points, 0), 0) AS bytes,
           -- The points of the last 24 hours, spread evenly over first_ts .. last_ts.
           CASE WHEN u.last_ts > u.first_ts
                THEN u.points
                     * greatest(date_part('epoch', u.last_ts
                                          - greatest(u.first_ts, now() - interval '1 day')), 0)
                     / date_part('epoch', u.last_ts - u.first_ts)
                WHEN u.first_ts >= now() - interval '1 day' THEN u.points
                ELSE 0 END AS recent_points
      FROM pgfleet.history_usage u JOIN days d USING (module, day)
     WHERE (%(srvid)s::integer IS NULL OR u.srvid = %(srvid)s::integer)
       AND u.module IN (SELECT module FROM pgfleet.metric_sources)
),
agg AS (
    SELECT srvid, module, sum(bytes) AS bytes, sum(points) AS points, sum(rows) AS rows,
           coalesce(sum(bytes) FILTER (WHERE recent AND stored)
                    / nullif(sum(points) FILTER (WHERE recent AND stored), 0),
                    sum(bytes) FILTER (WHERE stored)
                    / nullif(sum(points) FILTER (WHERE stored), 0)) AS bytes_per_point,
           sum(recent_points) AS recent_points,
           -- W1 - W0: from the later of 24 hours ago and the first window's
           -- start to the last window's end.
           greatest(date_part('epoch', max(last_ts)
                                        - greatest(now() - interval '1 day', min(first_ts))), 0)
               AS span
      FROM per
     GROUP BY srvid, module
)
SELECT a.srvid, sv.alias, a.module AS source,
       round(a.bytes)::bigint AS history_bytes, a.rows::bigint AS rows,
       a.points::bigint AS points, a.bytes_per_point::float8 AS bytes_per_point,
       (a.recent_points / greatest(a.span + coalesce(sv.frequency, 0), 1))::float8
           AS points_per_second,
       round(coalesce(a.bytes_per_point, 0) * a.recent_points
             / greatest(a.span + coalesce(sv.frequency, 0), 1) * %(week)s)::bigint AS week_bytes
  FROM agg a LEFT JOIN pgfleet.servers sv USING (srvid)
"""

_SERVER_TOTAL = f"""
SELECT coalesce(sum(history_bytes), 0)::bigint AS history_bytes,
       coalesce(sum(points), 0)::bigint AS points,
       coalesce(sum(week_bytes), 0)::bigint AS week_bytes
  FROM ({_PER_SOURCE}) x
"""

_SHARED = """
WITH named AS (
    SELECT DISTINCT module || '_history_' || to_char(day::timestamp, 'YYYYMMDD') AS relname
      FROM pgfleet.history_usage WHERE points > 0
)
SELECT m.module AS source,
       (SELECT coalesce(sum(pg_total_relation_size(r)), 0)
          FROM unnest(ARRAY['_keys', '_windows', '_last', '_current', '_once', '_rollup'])
               AS t(suffix)
          CROSS JOIN LATERAL to_regclass('pgfleet.' || quote_ident(m.module || t.suffix)) AS r
         WHERE r IS NOT NULL)::bigint AS tables_bytes,
       (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)
          FROM pg_class c
          JOIN (SELECT to_regclass('pgfleet.' || quote_ident(m.module || '_history_v1')) AS v1) o
            ON c.oid = o.v1 OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = o.v1)
       )::bigint AS old_history_bytes,
       (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = to_regclass('pgfleet.' || quote_ident(m.module || '_history'))
           AND c.relname NOT IN (SELECT relname FROM named))::bigint AS unattributed_bytes
  FROM pgfleet.metric_sources m
 ORDER BY m.module
"""


@dataclass(frozen=True)
class SourceUsage:
    """One server's history of one source."""

    srvid: int
    alias: str | None  # None: the server was removed, its data kept
    source: str
    history_bytes: int
    rows: int
    points: int
    bytes_per_point: float | None  # None: no partition holds its points any more
    points_per_second: float
    week_bytes: int


@dataclass(frozen=True)
class SharedUsage:
    """What a source stores that is not split between servers."""

    source: str
    tables_bytes: int  # _keys, _windows, _last, _current, _once, _rollup
    old_history_bytes: int  # _history_v1, until converted
    unattributed_bytes: int  # day partitions no server has points in

    @property
    def bytes(self) -> int:
        return self.tables_bytes + self.old_history_bytes + self.unattributed_bytes


@dataclass(frozen=True)
class ServerUsage:
    srvid: int
    alias: str | None
    sources: list[SourceUsage]

    @property
    def history_bytes(self) -> int:
        return sum(s.history_bytes for s in self.sources)

    @property
    def points(self) -> int:
        return sum(s.points for s in self.sources)

    @property
    def week_bytes(self) -> int:
        return sum(s.week_bytes for s in self.sources)


@dataclass(frozen=True)
class RepositorySize:
    database_bytes: int
    history: list[SourceUsage]
    shared: list[SharedUsage] = field(default_factory=list)

    @property
    def history_bytes(self) -> int:
        return sum(s.history_bytes for s in self.history)

    @property
    def shared_bytes(self) -> int:
        return sum(s.bytes for s in self.shared)

    @property
    def rest_bytes(self) -> int:
        """The rest of the database: pgfleet's other tables, the catalogs, free space."""
        return self.database_bytes - self.history_bytes - self.shared_bytes

    @property
    def week_bytes(self) -> int:
        return sum(s.week_bytes for s in self.history)

    def servers(self) -> Iterator[ServerUsage]:
        for (srvid, alias), rows in groupby(self.history, key=lambda s: (s.srvid, s.alias)):
            yield ServerUsage(srvid, alias, list(rows))

    def as_json(self, *, whole: bool = True) -> dict[str, Any]:
        """``whole``: also the repository-wide figures (not when one server was asked)."""
        out: dict[str, Any] = {
            "database_bytes": self.database_bytes,
            "servers": [
                {
                    "srvid": s.srvid,
                    "alias": s.alias,
                    "history_bytes": s.history_bytes,
                    "points": s.points,
                    "week_bytes": s.week_bytes,
                    "sources": [
                        {k: v for k, v in asdict(u).items() if k not in ("srvid", "alias")}
                        for u in s.sources
                    ],
                }
                for s in self.servers()
            ],
        }
        if whole:
            out["shared"] = [{**asdict(s), "bytes": s.bytes} for s in self.shared]
            out.update(
                history_bytes=self.history_bytes,
                shared_bytes=self.shared_bytes,
                rest_bytes=self.rest_bytes,
                week_bytes=self.week_bytes,
            )
        return out


def repository_size(conn: psycopg.Connection[Any], srvid: int | None = None) -> RepositorySize:
    """Every server's history per source (or only ``srvid``'s), what each source
    shares between servers (every server only) and the database's size."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            _PER_SOURCE + " ORDER BY sv.alias NULLS LAST, a.srvid, a.module",
            {"srvid": srvid, "week": WEEK},
        )
        history = [SourceUsage(*r) for r in cur.fetchall()]
        shared: list[SharedUsage] = []
        if srvid is None:
            cur.execute(_SHARED)
            shared = [SharedUsage(*r) for r in cur.fetchall()]
        cur.execute("SELECT pg_database_size(current_database())")
        row = cur.fetchone()
    return RepositorySize(int(row[0]) if row else 0, history, shared)


async def server_summary(conn: psycopg.AsyncConnection[Any], srvid: int) -> dict[str, int]:
    """A server's history bytes, points and projected bytes per week, in one query."""
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(_SERVER_TOTAL, {"srvid": srvid, "week": WEEK})
        row = await cur.fetchone()
    values = row or (0, 0, 0)
    return dict(zip(("history_bytes", "points", "week_bytes"), map(int, values), strict=True))


def human_bytes(n: float | None) -> str:
    """1234567 -> '1.2 MB' (powers of 1024, as the web UI shows them)."""
    if n is None:
        return ""
    x = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(x) < 1024 or unit == "TB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return ""
