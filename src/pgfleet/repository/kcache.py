"""pg_stat_kcache as the web UI reads it: CPU time and physical I/O, from the OS.

pg_stat_kcache measures each statement with ``getrusage()``: what the kernel
charged the backend for.  Units, at every level (server, database, query):

- ``cpu_user``, ``cpu_system``: CPU time in user and in kernel (system) mode.
  Totals are **seconds**; series are **seconds per second**, the CPU cores
  the statements kept busy on average over each bucket.
- ``reads``, ``writes``: bytes the kernel read from and wrote to storage
  for the backends (a read served by the page cache is no read here, unlike
  pg_stat_statements' ``shared_blks_read``).  Totals are **bytes**; series
  are **bytes per second**.
- ``cpu``: ``cpu_user + cpu_system``.

Planning and execution are summed (pg_stat_kcache counts planning apart,
and only with ``pg_stat_statements.track_planning``).  As for
pg_stat_statements everywhere else in the UI, a server's and a database's
figures sum every statement: with ``pg_stat_kcache.track = all``, nested
statements are counted inside their caller and on their own.

What is read where: what concerns a server or its databases (series,
totals, the ranking of databases) the per-snapshot rollup
(``pg_stat_kcache_rollup``, one row per database and snapshot), what
concerns statements (a query's series and totals, the top queries) the
statements' points (``pg_stat_kcache_series``) and window totals
(``pg_stat_kcache_sums``), as ``reads`` does for pg_stat_statements.  A
server's or a database's totals sum every statement all the same: the
rollup holds those sums per snapshot (:func:`reads.rollup_sums`), a few rows
per snapshot instead of every statement's windows (~5 ms instead of ~600
over a day of 2,000 statements).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pgfleet.repository import reads
from pgfleet.repository.reads import Buckets, Conn, Row

MODULE = "pg_stat_kcache"
# What every function returns, in this order.
METRICS = ("cpu_user", "cpu_system", "cpu", "reads", "writes")
UNITS = {"cpu_user": "s", "cpu_system": "s", "cpu": "s", "reads": "B", "writes": "B"}

# Each metric, as the pg_stat_kcache columns it sums (planning and execution).
_COLUMNS = {
    "cpu_user": ("plan_user_time", "exec_user_time"),
    "cpu_system": ("plan_system_time", "exec_system_time"),
    "reads": ("plan_reads", "exec_reads"),
    "writes": ("plan_writes", "exec_writes"),
}


def _sum(columns: tuple[str, ...]) -> str:
    # The history stores a zero delta as NULL: over rows that exist, a
    # total is 0, not unknown.  NULL only when there is no row at all.
    return "sum(" + " + ".join(f"coalesce({c}, 0)" for c in columns) + ")"


_EXPRS = {
    **{m: _sum(cols) for m, cols in _COLUMNS.items()},
    "cpu": _sum(_COLUMNS["cpu_user"] + _COLUMNS["cpu_system"]),
}

# Rankings of queries and databases: a name to one of the metrics above.
SORTS = {"cpu": "cpu", "cpu_user": "cpu_user", "cpu_system": "cpu_system",
         "reads": "reads", "writes": "writes"}  # fmt: skip


async def available(conn: Conn, srvid: int) -> bool:
    """Whether the repository holds pg_stat_kcache figures of the server:
    the UI hides kcache's charts of a server without the extension."""
    rows = await reads.fetch(
        conn,
        "SELECT EXISTS (SELECT FROM pgfleet.pg_stat_kcache_last WHERE srvid = %(srvid)s) AS x",
        {"srvid": srvid},
    )
    return bool(rows and rows[0]["x"])


def _where(datname: str | None, queryid: int | None) -> dict[str, Any] | None:
    where: dict[str, Any] = {}
    if datname is not None:
        where["datname"] = datname
    if queryid is not None:
        where["queryid"] = queryid
    return where or None


async def series(
    conn: Conn,
    srvid: int,
    b: Buckets,
    *,
    datname: str | None = None,
    queryid: int | None = None,
) -> dict[str, list[float | None]]:
    """Per bucket of `b`: CPU seconds per second and bytes per second (see
    the module), of the server, one database, or one query (in every
    database, or in `datname`).  Every metric of METRICS is a key; a bucket
    without a snapshot holds None."""
    empty: dict[str, list[float | None]] = {m: [None] * b.count for m in METRICS}
    if queryid is None:
        columns = [c for cols in _COLUMNS.values() for c in cols]
        by = await reads.rollup_series(conn, MODULE, srvid, b, columns, where=_where(datname, None))
        raw = by.get(None)
        if raw is None:
            return empty
        out = {m: _add(*(raw[c] for c in cols)) for m, cols in _COLUMNS.items()}
        out["cpu"] = _add(out["cpu_user"], out["cpu_system"])
        return {m: out[m] for m in METRICS}
    got = await reads.series(conn, MODULE, srvid, b, _EXPRS, where=_where(datname, queryid))
    values = got.get(None)
    return {m: values[m] for m in METRICS} if values else empty


def _add(*lines: list[float | None]) -> list[float | None]:
    """Point by point sums, None where every line is None."""
    out: list[float | None] = []
    for points in zip(*lines, strict=True):
        known = [p for p in points if p is not None]
        out.append(sum(known) if known else None)
    return out


async def totals(
    conn: Conn,
    srvid: int,
    start: datetime,
    end: datetime,
    *,
    datname: str | None = None,
    queryid: int | None = None,
) -> dict[str, float | None]:
    """Over the range: CPU seconds and bytes (see the module) of the server,
    one database or one query; every metric None when nothing was collected.

    A server's and a database's from the rollup, a query's from its window
    totals (see the module)."""
    if queryid is None:
        rows = await reads.rollup_sums(
            conn, MODULE, srvid, start, end, [], _EXPRS, where=_where(datname, None)
        )
    else:
        rows = await reads.sums(
            conn, MODULE, srvid, start, end, [], _EXPRS, where=_where(datname, queryid)
        )
    row = rows[0] if rows else {}
    return {m: _float(row.get(m)) for m in METRICS}


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


async def databases(
    conn: Conn, srvid: int, start: datetime, end: datetime, *, sort: str = "cpu"
) -> list[Row]:
    """Per database, over the range: ``datname`` and METRICS (seconds and
    bytes), the largest `sort` (a key of SORTS) first; the databases where
    nothing was measured are left out.  From the rollup (see the module)."""
    rows = await reads.rollup_sums(
        conn, MODULE, srvid, start, end, ["datname"], _EXPRS, order=SORTS.get(sort, "cpu")
    )
    return [r for r in rows if any(r[m] for m in METRICS)]


async def top_queries(
    conn: Conn,
    srvid: int,
    start: datetime,
    end: datetime,
    *,
    datname: str | None = None,
    sort: str = "cpu",
    limit: int = 50,
    text_chars: int = 160,
    own: bool = False,
) -> list[Row]:
    """The statements that took the most CPU (or I/O: `sort`, a key of
    SORTS) over the range, per database and queryid: ``datname``,
    ``queryid``, METRICS (seconds and bytes), and the start of the text
    (``query``, ``query_truncated``; None when pg_stat_statements did not
    keep it).  pgfleet's own statements are left out unless `own`, as in
    ``reads.top_queries``."""
    rows = await reads.sums(
        conn,
        MODULE,
        srvid,
        start,
        end,
        ["datname", "queryid"],
        _EXPRS,
        where=_where(datname, None),
        order=SORTS.get(sort, "cpu"),
        limit=limit,
        # The statements pg_stat_statements knows as ours: kcache's keys are
        # pg_stat_statements'.
        condition=None if own else reads.not_own_statements(),
    )
    rows = [r for r in rows if any(r[m] for m in METRICS)]
    texts = await reads.statement_texts(conn, srvid, [r["queryid"] for r in rows], text_chars)
    for r in rows:
        t = texts.get((r["datname"], r["queryid"]))
        r["query"] = t["query"] if t else None
        r["query_truncated"] = bool(t and t["query_truncated"])
    return rows
