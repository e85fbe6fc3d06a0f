"""What the web UI reads from the repository: every query it runs is here.

Everything is computed in SQL and comes back small: series are cut into a
fixed number of buckets whatever the range (a rate is ``sum(delta)`` over the
bucket's seconds), rankings are sums over the range read from window totals
(``<module>_sums``), whole-server charts come from per-snapshot rollups
(``<module>_rollup``), and so do sums over the range of a whole server or of
the keys a rollup keeps (:func:`rollup_sums`): see migration 0004.

Functions take an async connection (with any row factory) and return plain
Python values; the views turn them into JSON and HTML.  Column names are
ours, never a user's: they are composed as identifiers all the same.  The
modules reading the repository beside this one (compare, kcache, advice)
run their own queries through :func:`fetch`, and leave pgfleet's own
statements out with :func:`not_own_statements`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgfleet.snapshot.model import MARKED, mark

Row = dict[str, Any]
Conn = psycopg.AsyncConnection[Any]


@dataclass(frozen=True)
class Buckets:
    """A time range cut into `count` buckets of `width` seconds."""

    start: datetime
    end: datetime
    width: float
    count: int

    @classmethod
    def over(
        cls, start: datetime, end: datetime, points: int = 300, min_width: float = 1.0
    ) -> Buckets:
        span = max((end - start).total_seconds(), 1.0)
        width = max(span / points, min_width)
        return cls(start, end, width, max(1, math.ceil(span / width)))

    def x(self) -> list[float]:
        """Each bucket's start, in seconds since the epoch."""
        t0 = self.start.timestamp()
        return [round(t0 + i * self.width, 3) for i in range(self.count)]

    def params(self) -> dict[str, Any]:
        return {"from": self.start, "to": self.end, "width": self.width}


def _bucket(col: str = "ts") -> sql.Composable:
    return sql.SQL("floor(extract(epoch FROM {} - %(from)s) / %(width)s)::int").format(
        sql.Identifier(col)
    )


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier("pgfleet", name)


async def fetch(
    conn: Conn, query: sql.SQL | sql.Composed | str, params: Mapping[str, Any]
) -> list[Row]:
    """Run one of pgfleet's own reads of the repository and return its rows.

    What every read of the UI gets, so that the modules beside this one
    (compare, kcache, advice) read as it does:

    - the statement is marked as pgfleet's own (``snapshot.model.mark()``),
      as the snapshots' statements are: the repository may monitor itself
      (srvid 0), and its page then hides the UI's reading as it hides our
      collection elsewhere;
    - rows are dicts keyed by column name, whatever `conn`'s row factory;
    - ``numeric`` values (what ``sum()`` of a bigint is) come back as
      floats, which charts and JSON want; other types as psycopg gives them.

    `query` must be ours (composed with ``psycopg.sql`` where it names
    anything); values go in `params`, never into its text.
    """
    text = mark(query if isinstance(query, str) else query.as_string(conn))
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(text, params)
        rows = await cur.fetchall()
    for r in rows:
        for k, v in r.items():
            if isinstance(v, Decimal):
                r[k] = float(v)
    return rows


def _filters(
    where: Mapping[str, Any] | None, alias: str = ""
) -> tuple[sql.Composable, dict[str, Any]]:
    """``AND col = %(w_col)s ...`` for equality filters; None matches NULL."""
    parts: list[sql.Composable] = []
    params: dict[str, Any] = {}
    for i, (col, value) in enumerate((where or {}).items()):
        ident = sql.Identifier(alias, col) if alias else sql.Identifier(col)
        if value is None:
            parts.append(sql.SQL(" AND {} IS NULL").format(ident))
        else:
            parts.append(sql.SQL(" AND {} = {}").format(ident, sql.Placeholder(f"w{i}")))
            params[f"w{i}"] = value
    return sql.Composed(parts), params


# -- Fleet and servers


_SERVERS = """
SELECT s.srvid, s.alias, s.host, s.port, s.dbname, s.frequency, s.enabled,
       extract(epoch FROM s.retention)::bigint AS retention_seconds,
       st.snapshots, st.last_snapshot, st.last_error, st.server_version_num, st.in_recovery,
       extract(epoch FROM now() - st.last_snapshot) AS snapshot_age,
       (SELECT count(*) FROM pgfleet.snapshot_errors e
         WHERE e.srvid = s.srvid AND e.ts > now() - interval '1 day') AS errors_1d,
       (SELECT e.message FROM pgfleet.snapshot_errors e
         WHERE e.srvid = s.srvid ORDER BY e.ts DESC LIMIT 1) AS last_error_message
  FROM pgfleet.servers s
  LEFT JOIN pgfleet.snapshot_state st USING (srvid)
"""


async def servers(conn: Conn) -> list[Row]:
    """Every server with its collection state, local (srvid 0) only if it was snapshotted."""
    return await fetch(
        conn, _SERVERS + " WHERE s.srvid > 0 OR st.snapshots > 0 ORDER BY s.alias", {}
    )


async def server(conn: Conn, srvid: int) -> Row | None:
    rows = await fetch(conn, _SERVERS + " WHERE s.srvid = %(srvid)s", {"srvid": srvid})
    return rows[0] if rows else None


async def errors(conn: Conn, srvid: int, limit: int = 20) -> list[Row]:
    return await fetch(
        conn,
        "SELECT ts, source, message FROM pgfleet.snapshot_errors"
        " WHERE srvid = %(srvid)s ORDER BY ts DESC LIMIT %(limit)s",
        {"srvid": srvid, "limit": limit},
    )


async def snapshot_state(conn: Conn) -> list[Row]:
    """The repository's side of the collector: what each server's last snapshot was."""
    return await fetch(
        conn,
        """SELECT s.srvid, s.alias, s.enabled, s.frequency, st.snapshots, st.last_snapshot,
                  st.last_aggregate, st.last_purge, st.last_error,
                  extract(epoch FROM now() - st.last_snapshot) AS snapshot_age
             FROM pgfleet.servers s LEFT JOIN pgfleet.snapshot_state st USING (srvid)
            ORDER BY s.alias""",
        {},
    )


async def fleet_load(conn: Conn, b: Buckets) -> dict[int, dict[str, list[float | None]]]:
    """Queries/s and time spent (ms/s) of every server, bucketed."""
    rows = await fetch(
        conn,
        sql.SQL(
            """SELECT srvid, {b} AS b, sum(calls) AS calls, sum(total_exec_time) AS time
                 FROM pgfleet.pg_stat_statements_rollup
                WHERE ts > %(from)s AND ts <= %(to)s
                GROUP BY 1, 2"""
        ).format(b=_bucket()),
        b.params(),
    )
    out: dict[int, dict[str, list[float | None]]] = {}
    for r in rows:
        d = out.setdefault(r["srvid"], {"calls": [None] * b.count, "time": [None] * b.count})
        i = min(max(r["b"], 0), b.count - 1)
        for k in ("calls", "time"):
            if r[k] is not None:
                d[k][i] = (d[k][i] or 0.0) + float(r[k]) / b.width
    return out


# -- Generic bucketed series


async def rollup_series(
    conn: Conn,
    module: str,
    srvid: int,
    b: Buckets,
    columns: Sequence[str],
    *,
    group: str | None = None,
    where: Mapping[str, Any] | None = None,
    gauge: bool = False,
) -> dict[str | None, dict[str, list[float | None]]]:
    """Per bucket (and value of `group`), columns of ``<module>_rollup``.

    Counters become rates per second.  With `gauge`, each bucket holds the
    average over the snapshots in it of the sums the rollup kept.
    """
    cond, params = _filters(where)
    g = sql.SQL(", {}").format(sql.Identifier(group)) if group else sql.SQL("")
    aggs = sql.SQL(", ").join(
        (
            sql.SQL(
                "sum({c}) / nullif(count(DISTINCT ts) FILTER (WHERE {c} IS NOT NULL), 0) AS {c}"
            )
            if gauge
            else sql.SQL("sum({c}) AS {c}")
        ).format(c=sql.Identifier(c))
        for c in columns
    )
    query = sql.SQL(
        """SELECT {b} AS b {g}, {aggs} FROM {t}
            WHERE srvid = %(srvid)s AND ts > %(from)s AND ts <= %(to)s {cond}
            GROUP BY 1 {g}"""
    ).format(b=_bucket(), g=g, aggs=aggs, t=_ident(f"{module}_rollup"), cond=cond)
    rows = await fetch(conn, query, {**b.params(), **params, "srvid": srvid})
    return _assemble(rows, b, columns, group, rate=not gauge)


async def series(
    conn: Conn,
    module: str,
    srvid: int,
    b: Buckets,
    exprs: Mapping[str, str],
    *,
    where: Mapping[str, Any] | None = None,
    group: str | None = None,
    rate: bool = True,
) -> dict[str | None, dict[str, list[float | None]]]:
    """Per bucket, aggregates over ``<module>_series``: `exprs` maps a name to
    an SQL aggregate of our own (e.g. ``sum(calls)``), never to user input."""
    cond, params = _filters(where)
    g = sql.SQL(", {}").format(sql.Identifier(group)) if group else sql.SQL("")
    aggs = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(sql.SQL(e), sql.Identifier(n)) for n, e in exprs.items()
    )
    query = sql.SQL(
        """SELECT {b} AS b {g}, {aggs}
             FROM {f}(%(srvid)s, %(from)s, %(to)s)
            WHERE ts > %(from)s {cond}
            GROUP BY 1 {g}"""
    ).format(b=_bucket(), g=g, aggs=aggs, f=_ident(f"{module}_series"), cond=cond)
    rows = await fetch(conn, query, {**b.params(), **params, "srvid": srvid})
    return _assemble(rows, b, list(exprs), group, rate=rate)


def _assemble(
    rows: list[Row], b: Buckets, columns: Sequence[str], group: str | None, *, rate: bool
) -> dict[str | None, dict[str, list[float | None]]]:
    out: dict[str | None, dict[str, list[float | None]]] = {}
    for r in rows:
        key = None if group is None else r[group]
        d = out.setdefault(key, {c: [None] * b.count for c in columns})
        i = min(max(r["b"], 0), b.count - 1)
        for c in columns:
            v = r[c]
            if v is None:
                continue
            v = float(v) / b.width if rate else float(v)
            d[c][i] = v if d[c][i] is None else (d[c][i] or 0.0) + v
    return out


async def gauge_series(
    conn: Conn,
    module: str,
    srvid: int,
    b: Buckets,
    keys: Sequence[str],
    columns: Sequence[str],
) -> dict[tuple[Any, ...], dict[str, list[float | None]]]:
    """Gauges per entry, per bucket: the last value in the bucket, the value
    before the range carried in (gauges are only stored when they change)."""
    keycols = sql.SQL(", ").join(sql.Identifier(k) for k in keys) if keys else sql.SQL("")
    kc = sql.SQL("{}, ").format(keycols) if keys else sql.SQL("")
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    f = _ident(f"{module}_series")
    query = sql.SQL(
        """(SELECT DISTINCT ON ({dk}) -1 AS b, {kc} {cols}
              FROM {f}(%(srvid)s, %(from)s - interval '1 day', %(from)s)
             ORDER BY {dk}, ts DESC)
           UNION ALL
           (SELECT DISTINCT ON ({b}, {dk}) {b} AS b, {kc} {cols}
              FROM {f}(%(srvid)s, %(from)s, %(to)s)
             WHERE ts > %(from)s
             ORDER BY {b}, {dk}, ts DESC)"""
    ).format(
        dk=keycols if keys else sql.SQL("1"),
        kc=kc,
        cols=cols,
        f=f,
        b=_bucket(),
    )
    rows = await fetch(conn, query, {**b.params(), "srvid": srvid})
    out: dict[tuple[Any, ...], dict[str, list[float | None]]] = {}
    changed: dict[tuple[Any, ...], set[int]] = {}
    seed: dict[tuple[Any, ...], Row] = {}
    for r in rows:
        key = tuple(r[k] for k in keys)
        if r["b"] < 0:
            seed[key] = r
            continue
        d = out.setdefault(key, {c: [None] * b.count for c in columns})
        i = min(r["b"], b.count - 1)
        changed.setdefault(key, set()).add(i)
        for c in columns:
            d[c][i] = None if r[c] is None else float(r[c])
    for key in seed:
        out.setdefault(key, {c: [None] * b.count for c in columns})
    # Carry each value forward to the next change; a tombstone (all NULL)
    # ends the entry.
    for key, d in out.items():
        s0 = seed.get(key)
        marks = changed.get(key, set())
        for c in columns:
            vals = d[c]
            last = None if s0 is None or s0[c] is None else float(s0[c])
            for i in range(b.count):
                if i in marks:
                    last = vals[i]
                else:
                    vals[i] = last
    return {k: d for k, d in out.items() if any(v is not None for vs in d.values() for v in vs)}


# -- Rankings over a range (window totals)


async def sums(
    conn: Conn,
    module: str,
    srvid: int,
    start: datetime,
    end: datetime,
    group: Sequence[str],
    exprs: Mapping[str, str],
    *,
    where: Mapping[str, Any] | None = None,
    order: str | None = None,
    limit: int | None = None,
    condition: sql.Composable | None = None,
) -> list[Row]:
    """Aggregates over ``<module>_sums`` per `group`: `exprs` are ours.

    `condition`: one of ours (its parameters among ``%(srvid)s``,
    ``%(from)s`` and ``%(to)s``) on ``<module>_sums``'s columns: only the
    entries it holds for are ranked and summed.

    A ranking (`order` and `limit`) decodes as little as it can.
    ``<m>_sums`` decodes just the columns a query reads, from window totals
    for the windows inside the range, but point by point for the windows a
    range's edges cut: those were most of a week's ranking (2,000 entries
    of a 100-point window, 270 of 410 ms).  So a ranking reads, in turn:

    - the `order` expression alone over every entry: when it is a sum of
      counters, on bounds from window totals, then exactly for only the
      entries that could win (see :func:`_bounded`); otherwise exactly;
    - every expression for the winners only.

    One pass reading ten columns of 2,000 statements took ~4x as long as
    the last two.
    """
    cond, params = _range_filters(where, srvid, start, end)
    if condition is not None:
        # In every pass: it may leave out some of a winner's entries (a
        # condition on a column not grouped by), which the last pass must
        # not sum either.
        cond = sql.Composed([cond, sql.SQL(" AND ("), condition, sql.SQL(")")])
    if not (group and order and limit):
        return await fetch(
            conn, _sums_query(_window_sums(module), group, exprs, cond, order, limit), params
        )
    chosen = await _bounded(conn, module, group, order, exprs[order], limit, cond, params)
    if chosen is None:
        winners = await fetch(
            conn,
            _sums_query(_window_sums(module), group, {order: exprs[order]}, cond, order, limit),
            params,
        )
        chosen = {tuple(r[c] for c in group) for r in winners}
    if not chosen:
        return []
    query = _sums_query(
        _window_sums(module), group, exprs, _narrow(cond, group, chosen, params), order, None
    )
    rows = await fetch(conn, query, params)
    # The filters keep every combination of the chosen entries' values.
    return [r for r in rows if tuple(r[c] for c in group) in chosen][:limit]


def _range_filters(
    where: Mapping[str, Any] | None, srvid: int, start: datetime, end: datetime
) -> tuple[sql.Composable, dict[str, Any]]:
    """`where`'s filters, and the parameters of a ranking over the range."""
    cond, params = _filters(where)
    params.update(srvid=srvid, **{"from": start, "to": end})
    return cond, params


def _narrow(
    cond: sql.Composable, group: Sequence[str], keys: set[tuple[Any, ...]], params: dict[str, Any]
) -> sql.Composed:
    """`cond` and each group column among the values it takes in `keys`
    (their parameters set in `params`): the columns are ``<m>_keys``', so
    the filter reaches the keys before any history is decoded."""
    parts: list[sql.Composable] = [cond]
    for i, col in enumerate(group):
        values = {k[i] for k in keys}
        params[f"g{i}"] = [v for v in values if v is not None]
        parts.append(
            sql.SQL(" AND ({c} = ANY({p}){n})").format(
                c=sql.Identifier(col),
                p=sql.Placeholder(f"g{i}"),
                n=sql.SQL(" OR {} IS NULL").format(sql.Identifier(col))
                if None in values
                else sql.SQL(""),
            )
        )
    return sql.Composed(parts)


# An expression whose value over a range is the sum of its values over the
# range's parts, and never less over more snapshots: sums (perhaps coalesced
# to 0) of columns or of sums of columns (perhaps coalesced to 0), which
# _bounded() checks are counters or deltas (never negative).  Spaces
# removed before matching.
_COLUMN = r"(?:coalesce\(\w+,0\)|\w+)"
_SUM = rf"(?:sum\({_COLUMN}(?:\+{_COLUMN})*\)|coalesce\(sum\({_COLUMN}(?:\+{_COLUMN})*\),0\))"
_ADDITIVE = re.compile(rf"{_SUM}(?:\+{_SUM})*")


def _summed_columns(expr: str) -> set[str] | None:
    """The columns `expr` sums, or None unless it is a sum as above."""
    text = re.sub(r"\s+", "", expr)
    if not _ADDITIVE.fullmatch(text):
        return None
    return set(re.findall(r"\w+", text)) - {"sum", "coalesce", "0"}


async def _bounded(
    conn: Conn,
    module: str,
    group: Sequence[str],
    order: str,
    expr: str,
    limit: int,
    cond: sql.Composable,
    params: dict[str, Any],
) -> set[tuple[Any, ...]] | None:
    """The entries (values of `group`) with the `limit` largest `expr`
    over the range, most of it read from window totals; None when the
    bounds below do not apply (then rank every entry).

    A window the range's start or end cuts is read whole: an entry's value
    over the range is at least its value over the windows inside the range
    (L), and at most L plus its whole cut windows' (U), since `expr` sums
    counters, which are never negative.  With T the `limit`-th largest L,
    `limit` entries are worth at least T, so an entry with U < T cannot
    win.  Only the others' cut windows are decoded, and added to their L.
    """
    columns = _summed_columns(expr)
    if columns is None:
        return None
    rows = await fetch(
        conn,
        sql.SQL(
            "SELECT m.summed, w.ts_start, w.ts_last"
            " FROM (SELECT counters || deltas AS summed FROM pgfleet.metric_sources"
            " WHERE module = %(module)s) m"
            " LEFT JOIN LATERAL (SELECT ts_start, ts[cardinality(ts)] AS ts_last FROM {}"
            " WHERE srvid = %(srvid)s"
            " AND ((ts_start < %(from)s AND ts[cardinality(ts)] >= %(from)s)"
            " OR (ts_start <= %(to)s AND ts[cardinality(ts)] > %(to)s))) w ON true"
        ).format(_ident(f"{module}_windows")),
        {**params, "module": module},
    )
    if not rows or not columns <= set(rows[0]["summed"] or ()):
        return None
    cuts = [(r["ts_start"], r["ts_last"]) for r in rows if r["ts_start"] is not None]
    start, end = params["from"], params["to"]
    inner_from = max([last for first, last in cuts if first < start], default=None)
    inner_to = min([first for first, last in cuts if last > end], default=None)
    inner_from = start if inner_from is None else inner_from + _TICK
    inner_to = end if inner_to is None else inner_to - _TICK
    if not cuts or inner_from > inner_to:
        # Nothing cut (one exact pass is as cheap), or no window inside
        # the range: no L worth anything.
        return None
    cut = sum((last - first).total_seconds() for first, last in cuts)
    if cut > MOST_CUT * (inner_to - inner_from).total_seconds():
        return None

    def key(r: Row) -> tuple[Any, ...]:
        return tuple(r[c] for c in group)

    async def values(lo: datetime, hi: datetime, among: sql.Composable = cond) -> list[Row]:
        query = _sums_query(
            _window_sums(module, "b_from", "b_to"), group, {order: expr}, among, None, None
        )
        return await fetch(conn, query, {**params, "b_from": lo, "b_to": hi})

    low = {key(r): float(r[order] or 0) for r in await values(inner_from, inner_to)}
    high = dict(low)
    for first, last in cuts:
        for r in await values(first, last):
            high[key(r)] = high.get(key(r), 0.0) + float(r[order] or 0)
    lows = sorted(low.values(), reverse=True)
    if len(lows) < limit or lows[limit - 1] <= 0:
        return None
    # Sums in another order may differ in their last bits.
    floor = lows[limit - 1] * (1 - 1e-9)
    kept = {k for k, v in high.items() if v >= floor}
    # The exact values of those: L, plus the cut windows' points in the
    # range, decoded for the kept entries only.
    exact = {k: low.get(k, 0.0) for k in kept}
    narrowed = _narrow(cond, group, kept, params)
    edges = [(start, inner_from - _TICK)] if inner_from > start else []
    edges += [(inner_to + _TICK, end)] if inner_to < end else []
    for lo, hi in edges:
        for r in await values(lo, hi, narrowed):
            if key(r) in exact:
                exact[key(r)] += float(r[order] or 0)
    return set(sorted(exact, key=lambda k: -exact[k])[:limit])


# Bounds are worth reading when the cut windows are short beside the rest of
# the range: over a week, cut windows of 8 hours left ~8% of 2,000
# statements to decode; over a day (cut 8 hours, 16 inside) ~40%, and
# reading the bounds then cost more than they saved.
MOST_CUT = 0.25

# The next instant after a timestamp: timestamptz counts microseconds.
_TICK = timedelta(microseconds=1)


def _window_sums(module: str, lo: str = "from", hi: str = "to") -> sql.Composed:
    """``<module>_sums`` over the range (from parameters `lo` to `hi`), as
    a FROM item."""
    return sql.SQL("{}(%(srvid)s, {}, {})").format(
        _ident(f"{module}_sums"), sql.Placeholder(lo), sql.Placeholder(hi)
    )


def _sums_query(
    source: sql.Composable,
    group: Sequence[str],
    exprs: Mapping[str, str],
    cond: sql.Composable,
    order: str | None,
    limit: int | None,
) -> sql.Composed:
    gcols = sql.SQL(", ").join(sql.Identifier(c) for c in group)
    aggs = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(sql.SQL(e), sql.Identifier(n)) for n, e in exprs.items()
    )
    query = sql.SQL("SELECT {g}{sep}{aggs} FROM {source} WHERE true {cond}").format(
        g=gcols,
        sep=sql.SQL(", ") if group else sql.SQL(""),
        aggs=aggs,
        source=source,
        cond=cond,
    )
    if group:
        query += sql.SQL(" GROUP BY {}").format(gcols)
    if order:
        query += sql.SQL(" ORDER BY {} DESC NULLS LAST").format(sql.Identifier(order))
    if limit:
        query += sql.SQL(" LIMIT {}").format(sql.Literal(limit))
    return query


async def rollup_sums(
    conn: Conn,
    module: str,
    srvid: int,
    start: datetime,
    end: datetime,
    group: Sequence[str],
    exprs: Mapping[str, str],
    *,
    where: Mapping[str, Any] | None = None,
    order: str | None = None,
    limit: int | None = None,
) -> list[Row]:
    """What :func:`sums` gives, read from ``<module>_rollup`` instead: for a
    whole server, or per keys the rollup keeps (`group` and `where` among
    them), a few rows per snapshot rather than every entry's windows.

    The same range as :func:`sums` (the snapshots at `start` and at `end`
    both count), and the same figures when `exprs` (ours) are sums of the
    rollup's counter and delta columns, or expressions of such sums: the
    rollup holds, per snapshot, each column summed over the entries written
    then (NULL for zero, as the history does), so a sum over it is the sum
    over the entries, in another order (floats may differ in the last bits).
    Not for anything else: a ``count(*)``, or a gauge, is the rollup's own.

    Only within the server's retention: the rollup drops each snapshot as
    it goes out of retention, the history whole aggregation windows once
    they are all out, so a range reaching back past the retention may find
    a few snapshots fewer here than :func:`sums` does.
    """
    cond, params = _range_filters(where, srvid, start, end)
    bounds = sql.SQL(" AND srvid = %(srvid)s AND ts >= %(from)s AND ts <= %(to)s")
    query = _sums_query(
        _ident(f"{module}_rollup"), group, exprs, sql.Composed([bounds, cond]), order, limit
    )
    return await fetch(conn, query, params)


# What "top queries" can be sorted by, as SQL over the sums of a statement.
QUERY_SORTS = {
    "total_time": "total_time",
    "calls": "calls",
    "mean": "mean_time",
    "io": "io_blocks",
    "wal": "wal_bytes",
}

_QUERY_EXPRS = {
    "calls": "sum(calls)",
    "total_time": "sum(total_exec_time)",
    "mean_time": "sum(total_exec_time) / nullif(sum(calls), 0)",
    "rows": "sum(rows)",
    "shared_blks_hit": "sum(shared_blks_hit)",
    "shared_blks_read": "sum(shared_blks_read)",
    "io_blocks": "coalesce(sum(shared_blks_read), 0) + coalesce(sum(shared_blks_written), 0)"
    " + coalesce(sum(temp_blks_read), 0) + coalesce(sum(temp_blks_written), 0)",
    "temp_blks": "coalesce(sum(temp_blks_read), 0) + coalesce(sum(temp_blks_written), 0)",
    "wal_bytes": "sum(wal_bytes)",
    "plan_time": "sum(total_plan_time)",
}


# The statements pgfleet itself ran on the server (their text is marked: see
# snapshot.model.mark()): by queryid, whatever the database and the role
# (the same queryid elsewhere is the same statement, on the same catalogs),
# found once per query (an InitPlan), and left out inside <m>_sums, before
# any window is decoded.  The mark is at the start: left() decompresses no
# more of a long text than that.
_NOT_OWN = sql.SQL(
    "queryid <> ALL (ARRAY(SELECT o.queryid FROM pgfleet.pg_stat_statements_once o"
    " WHERE o.srvid = %(srvid)s AND left(o.query, 64) ~ {}))"
).format(sql.Literal(MARKED))


def not_own_statements() -> sql.Composable:
    """A `condition` for :func:`sums` that leaves out pgfleet's own statements.

    For any source whose entries carry pg_stat_statements' ``queryid``
    (pg_stat_statements itself, pg_stat_kcache, pg_qualstats,
    pg_wait_sampling): an entry is kept unless pg_stat_statements stored its
    queryid, on the same server, with a text marked as pgfleet's (MARKED),
    in any database and for any role.  Guarantees:

    - its only parameter is ``%(srvid)s``, which :func:`sums` passes;
    - our statements are found once per query, and left out before any
      window is decoded: the ranking's cost does not grow with them;
    - texts stored before pgfleet marked its statements carry no marker:
      those statements stay in;
    - an entry without a queryid (NULL) is left out too, once any statement
      of ours is known (NULL compares to nothing).
    """
    return _NOT_OWN


StatementKey = tuple[str | None, int]  # (datname, queryid)

# One text per database and queryid: pg_stat_statements_once keeps one per
# role and nesting level too.  The top-level one wins, then the earliest
# seen: every read picks the same.
_STATEMENT_TEXTS = """
SELECT DISTINCT ON (o.datname, o.queryid) o.datname, o.queryid,
       left(regexp_replace(o.query, '[[:space:]]+', ' ', 'g'), %(chars)s) AS query,
       length(o.query) > %(chars)s AS query_truncated
  FROM pgfleet.pg_stat_statements_once o
 WHERE o.srvid = %(srvid)s AND o.queryid = ANY (%(ids)s)
 ORDER BY o.datname, o.queryid, o.toplevel DESC, o.first_seen
"""


async def statement_texts(
    conn: Conn, srvid: int, queryids: Iterable[int], chars: int = 160
) -> dict[StatementKey, Row]:
    """The start of each statement's text, per (datname, queryid), as the
    UI's lists show it.

    Every (datname, queryid) pg_stat_statements kept a text for, among
    `queryids`, maps to ``{"datname", "queryid", "query",
    "query_truncated", "own"}``: ``query`` is the first `chars` characters
    of the text, every run of whitespace made one space; ``query_truncated``
    whether the text was longer; ``own`` whether it is one of pgfleet's
    statements (marked: see MARKED).  A statement without a stored text has
    no entry: callers show None.
    """
    ids = sorted(set(queryids))
    if not ids:
        return {}
    rows = await fetch(conn, _STATEMENT_TEXTS, {"srvid": srvid, "ids": ids, "chars": chars})
    for r in rows:
        r["own"] = bool(r["query"] and re.match(MARKED, r["query"]))
    return {(r["datname"], r["queryid"]): r for r in rows}


async def top_queries(
    conn: Conn,
    srvid: int,
    start: datetime,
    end: datetime,
    *,
    sort: str = "total_time",
    datname: str | None = None,
    limit: int = 50,
    text_chars: int = 160,
    own: bool = False,
) -> list[Row]:
    """The statements of a server (or one database) that did the most, per
    database and queryid, with the start of their text.

    pgfleet's own statements (a text marked as ours: see MARKED) are
    left out unless `own`, before the ranking: up to `limit` of the
    server's others come back.  Texts stored before pgfleet marked its
    statements have no marker: those stay in.  With `own`, each row's
    ``own`` says whether it is one of ours.
    """
    where = {"datname": datname} if datname is not None else None
    rows = await sums(
        conn,
        "pg_stat_statements",
        srvid,
        start,
        end,
        ["datname", "queryid"],
        _QUERY_EXPRS,
        where=where,
        order=QUERY_SORTS.get(sort, "total_time"),
        limit=limit,
        condition=None if own else not_own_statements(),
    )
    rows = [r for r in rows if r["calls"] or r["total_time"]]
    texts = await statement_texts(conn, srvid, [r["queryid"] for r in rows], text_chars)
    for r in rows:
        t = texts.get((r["datname"], r["queryid"]))
        r["query"] = t["query"] if t else None
        r["query_truncated"] = bool(t and t["query_truncated"])
        r["own"] = bool(t and t["own"])
    return rows


async def databases(conn: Conn, srvid: int, start: datetime, end: datetime) -> list[Row]:
    span = max((end - start).total_seconds(), 1.0)
    return await sums(
        conn,
        "pg_stat_database",
        srvid,
        start,
        end,
        ["datname"],
        {
            "xact_per_s": "(coalesce(sum(xact_commit), 0) + coalesce(sum(xact_rollback), 0))"
            f" / {span}",
            "rollbacks": "sum(xact_rollback)",
            "blks_read": "sum(blks_read)",
            "hit_ratio": "100.0 * sum(blks_hit) / nullif(coalesce(sum(blks_hit), 0)"
            " + coalesce(sum(blks_read), 0), 0)",
            "tup_returned": "sum(tup_returned)",
            "tup_written": "coalesce(sum(tup_inserted), 0) + coalesce(sum(tup_updated), 0)"
            " + coalesce(sum(tup_deleted), 0)",
            "temp_bytes": "sum(temp_bytes)",
            "deadlocks": "sum(deadlocks)",
        },
        order="xact_per_s",
    )


async def wait_events(
    conn: Conn, srvid: int, b: Buckets, *, queryid: int | None = None, limit: int = 20
) -> list[Row]:
    """Wait event samples over the range (pg_wait_sampling), or for one query.

    Both count the snapshots at the range's start and end, as :func:`sums`
    and :func:`rollup_sums` do (a series' bucket does not count the one at
    its start: its delta is the time before)."""
    if queryid is not None:
        return await sums(
            conn,
            "pg_wait_sampling",
            srvid,
            b.start,
            b.end,
            ["event_type", "event"],
            {"samples": "sum(count)"},
            where={"queryid": queryid},
            order="samples",
            limit=limit,
        )
    return await fetch(
        conn,
        """SELECT event_type, event, sum(count) AS samples
             FROM pgfleet.pg_wait_sampling_rollup
            WHERE srvid = %(srvid)s AND ts >= %(from)s AND ts <= %(to)s
            GROUP BY 1, 2 HAVING sum(count) > 0 ORDER BY 3 DESC LIMIT %(limit)s""",
        {**b.params(), "srvid": srvid, "limit": limit},
    )


async def sessions_waiting(conn: Conn, srvid: int, b: Buckets, datname: str | None) -> list[Row]:
    """Sampled sessions by state and wait event type (pg_stat_activity), averaged."""
    cond = " AND datname = %(datname)s" if datname is not None else ""
    return await fetch(
        conn,
        f"""SELECT state, wait_event_type,
                   sum(count)::float8 / nullif(count(DISTINCT ts), 0) AS sessions
              FROM pgfleet.pg_stat_activity_rollup
             WHERE srvid = %(srvid)s AND ts > %(from)s AND ts <= %(to)s {cond}
             GROUP BY 1, 2 ORDER BY 3 DESC NULLS LAST""",
        {**b.params(), "srvid": srvid, "datname": datname},
    )


async def settings_changes(conn: Conn, srvid: int, start: datetime, end: datetime) -> list[Row]:
    """Settings whose value changed in the range, with the previous value."""
    return await fetch(
        conn,
        """SELECT ts, name, setting, unit, previous FROM (
               SELECT ts, name, setting, unit,
                      lag(setting) OVER w AS previous, row_number() OVER w AS n
                 FROM pgfleet.settings_series(%(srvid)s, '-infinity', %(to)s)
               WINDOW w AS (PARTITION BY name ORDER BY ts)) s
            WHERE n > 1 AND ts >= %(from)s AND setting IS DISTINCT FROM previous
            ORDER BY ts""",
        {"srvid": srvid, "from": start, "to": end},
    )


async def database_names(conn: Conn, srvid: int) -> list[str]:
    rows = await fetch(
        conn,
        "SELECT datname FROM pgfleet.pg_stat_database_last WHERE srvid = %(srvid)s"
        " AND datname IS NOT NULL ORDER BY 1",
        {"srvid": srvid},
    )
    return [r["datname"] for r in rows]


async def tables(
    conn: Conn, srvid: int, datname: str, start: datetime, end: datetime, limit: int = 50
) -> list[Row]:
    rows = await sums(
        conn,
        "pg_stat_user_tables",
        srvid,
        start,
        end,
        ["schemaname", "relname"],
        {
            "seq_scan": "sum(seq_scan)",
            "seq_tup_read": "sum(seq_tup_read)",
            "idx_scan": "sum(idx_scan)",
            "tup_written": "coalesce(sum(n_tup_ins), 0) + coalesce(sum(n_tup_upd), 0)"
            " + coalesce(sum(n_tup_del), 0)",
            "blks_read": "coalesce(sum(heap_blks_read), 0) + coalesce(sum(idx_blks_read), 0)",
            "blks_hit": "coalesce(sum(heap_blks_hit), 0) + coalesce(sum(idx_blks_hit), 0)",
            "vacuums": "coalesce(sum(vacuum_count), 0) + coalesce(sum(autovacuum_count), 0)",
        },
        where={"datname": datname},
        order="seq_tup_read",
        limit=limit,
    )
    sizes = await fetch(
        conn,
        """SELECT schemaname, relname, size, n_live_tup, n_dead_tup
             FROM pgfleet.pg_stat_user_tables_last
            WHERE srvid = %(srvid)s AND datname = %(datname)s""",
        {"srvid": srvid, "datname": datname},
    )
    by = {(s["schemaname"], s["relname"]): s for s in sizes}
    for r in rows:
        s = by.get((r["schemaname"], r["relname"]), {})
        r.update(size=s.get("size"), n_live_tup=s.get("n_live_tup"), n_dead_tup=s.get("n_dead_tup"))
    return rows


async def indexes(
    conn: Conn, srvid: int, datname: str, start: datetime, end: datetime, limit: int = 50
) -> list[Row]:
    rows = await sums(
        conn,
        "pg_stat_user_indexes",
        srvid,
        start,
        end,
        ["schemaname", "relname", "indexrelname"],
        {
            "idx_scan": "sum(idx_scan)",
            "idx_tup_read": "sum(idx_tup_read)",
            "idx_blks_read": "sum(idx_blks_read)",
            "idx_blks_hit": "sum(idx_blks_hit)",
        },
        where={"datname": datname},
        order="idx_scan",
        limit=limit,
    )
    sizes = await fetch(
        conn,
        """SELECT schemaname, relname, indexrelname, size
             FROM pgfleet.pg_stat_user_indexes_last
            WHERE srvid = %(srvid)s AND datname = %(datname)s""",
        {"srvid": srvid, "datname": datname},
    )
    by = {(s["schemaname"], s["relname"], s["indexrelname"]): s["size"] for s in sizes}
    for r in rows:
        r["size"] = by.get((r["schemaname"], r["relname"], r["indexrelname"]))
    return rows


# -- One query


async def query_info(conn: Conn, srvid: int, queryid: int) -> list[Row]:
    """Every (database, role, toplevel) a queryid was seen with, and its full text."""
    return await fetch(
        conn,
        """SELECT datname, rolname, toplevel, query, first_seen
             FROM pgfleet.pg_stat_statements_once
            WHERE srvid = %(srvid)s AND queryid = %(queryid)s
            ORDER BY first_seen""",
        {"srvid": srvid, "queryid": queryid},
    )


async def qualstats(
    conn: Conn, srvid: int, queryid: int, start: datetime, end: datetime, limit: int = 30
) -> list[Row]:
    rows = await sums(
        conn,
        "pg_qualstats",
        srvid,
        start,
        end,
        ["datname", "qualnodeid", "eval_type"],
        {
            "occurences": "sum(occurences)",
            "execution_count": "sum(execution_count)",
            "nbfiltered": "sum(nbfiltered)",
        },
        where={"queryid": queryid},
        order="execution_count",
        limit=limit,
    )
    if rows:
        texts = await fetch(
            conn,
            """SELECT DISTINCT ON (qualnodeid) qualnodeid, qual, constvalue
                 FROM pgfleet.pg_qualstats_once
                WHERE srvid = %(srvid)s AND queryid = %(queryid)s""",
            {"srvid": srvid, "queryid": queryid},
        )
        by = {t["qualnodeid"]: t for t in texts}
        for r in rows:
            t = by.get(r["qualnodeid"], {})
            r["qual"] = t.get("qual")
            r["constvalue"] = t.get("constvalue")
    return rows


async def modules(conn: Conn) -> set[str]:
    """The metric sources this repository has storage for."""
    rows = await fetch(conn, "SELECT module FROM pgfleet.metric_sources", {})
    return {r["module"] for r in rows}


async def user_info(conn: Conn) -> Row:
    """Who this connection is and what it may do in the UI."""
    rows = await fetch(
        conn,
        """SELECT current_user AS username,
                  has_schema_privilege('pgfleet', 'USAGE')
                  AND has_table_privilege('pgfleet.servers', 'SELECT') AS can_read,
                  (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                  OR (to_regrole('pgfleet_admin') IS NOT NULL
                      AND pg_has_role(current_user, 'pgfleet_admin', 'MEMBER')) AS is_admin""",
        {},
    )
    return rows[0]


def since(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


# -- Collectors (migration 0003)


async def collectors(conn: Conn) -> list[Row]:
    """The collector daemons that renewed their leases lately, and what they hold."""
    return await fetch(
        conn,
        """SELECT c.name, c.host, c.pid, c.started_at, c.heartbeat, c.expires_at,
                  c.expires_at > now() AS alive,
                  (SELECT count(*) FROM pgfleet.collector_leases l WHERE l.owner = c.name) AS leases
             FROM pgfleet.collectors c ORDER BY c.name""",
        {},
    )


async def leases(conn: Conn) -> dict[int, str]:
    rows = await fetch(
        conn,
        "SELECT srvid, owner FROM pgfleet.collector_leases WHERE expires_at > now()",
        {},
    )
    return {r["srvid"]: r["owner"] for r in rows}
