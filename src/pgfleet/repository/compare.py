"""Two time ranges of a server (or of one of its databases) side by side,
per statement, the biggest regressions first.

What a regression is, here:

- Each range's figures are pg_stat_statements' sums over the range, per
  database and queryid (every role and nesting level together).
- Ranges may differ in length, so the ranking compares paces: a
  statement's **extra time** is the execution time it took in B minus the
  time it took in A scaled to B's length
  (``time_B - time_A * seconds_B / seconds_A``): how much more time B
  spent on it than it would have at A's pace.  Statements are ranked by
  extra time, largest first: the top ones cost the most more, whether each
  call got slower or there were more calls.  A negative extra time is an
  improvement; those come last.
- ``kind`` says why:

  - ``new``: no call in A; ``gone``: no call in B;
  - ``slower`` / ``faster``: both ranges have at least `min_calls` calls
    and the time per call moved by at least `threshold` (20%: 1.2 times
    slower, or faster); with fewer calls, a mean is noise and no
    statement is called slower or faster;
  - ``more_calls`` / ``fewer_calls``: otherwise, calls per second moved
    by `threshold`;
  - ``steady``: none of the above.

  ``regressed`` is true when the extra time is positive and the kind is
  ``new``, ``slower`` or ``more_calls``.

Reads happen in two passes, as ``reads.sums`` ranks: calls and time of
every statement of both ranges (:func:`per_statement`), then every column of
the `limit` winners only (``<m>_sums`` decodes only the columns read).  Everything comes back as
plain dicts and lists (times are datetimes) for the page and its JSON twin.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from psycopg import sql

from pgfleet.repository import reads
from pgfleet.repository.reads import Conn, Row, StatementKey

Range = tuple[datetime, datetime]
Key = StatementKey

# A pass over every statement reads only these.
_RANK_EXPRS = {"calls": "sum(calls)", "total_time": "sum(total_exec_time)"}

# Every column shown per range; times in milliseconds, WAL in bytes,
# blocks as pg_stat_statements counts them (block_size each, 8 kB usually).
_EXPRS = {
    "calls": "sum(calls)",
    "total_time": "sum(total_exec_time)",
    "rows": "sum(rows)",
    "shared_blks_hit": "sum(shared_blks_hit)",
    "shared_blks_read": "sum(shared_blks_read)",
    "temp_blks": "sum(coalesce(temp_blks_read, 0) + coalesce(temp_blks_written, 0))"
    " FILTER (WHERE temp_blks_read IS NOT NULL OR temp_blks_written IS NOT NULL)",
    "wal_bytes": "sum(wal_bytes)",
}
# The per-range figures of a statement, as returned.
FIGURES = ("calls", "total_time", "mean_time", "rows", "rows_per_call",
           "shared_blks_hit", "shared_blks_read", "temp_blks", "wal_bytes")  # fmt: skip

KINDS = ("new", "gone", "slower", "faster", "more_calls", "fewer_calls", "steady")


async def compare(
    conn: Conn,
    srvid: int,
    a: Range,
    b: Range,
    *,
    datname: str | None = None,
    limit: int = 50,
    min_calls: int = 10,
    threshold: float = 0.2,
    text_chars: int = 160,
    own: bool = False,
    first: tuple[Mapping[Key, Row], Mapping[Key, Row]] | None = None,
) -> dict[str, Any]:
    """Statements of `srvid` (or of its database `datname`) in range `a`
    against range `b`, the biggest regressions first (see the module).

    `first`: :func:`per_statement` of `a` and of `b` with the same `datname`
    and `own`, when the caller read them already: they are the longest
    reads, and the web page runs them at once, on two connections.

    Returns ``{"a": RANGE, "b": RANGE, "datname", "min_calls",
    "threshold", "totals": {"a": TOTALS, "b": TOTALS}, "regressed": N,
    "statements": [STATEMENT...]}`` where RANGE is ``{"from", "to",
    "seconds"}``, TOTALS ``{"calls", "total_time", "statements"}`` over
    every statement of the range, and each STATEMENT (at most `limit`)::

        {"datname", "queryid", "query", "query_truncated",
         "a": FIGURES, "b": FIGURES,   # None for a range it did not run in
         "extra_time": ms, "mean_time_change": fraction or None,
         "calls_change": fraction or None, "kind": one of KINDS,
         "regressed": bool}

    FIGURES: ``calls``, ``total_time`` (ms), ``mean_time`` (ms per call),
    ``rows``, ``rows_per_call``, ``shared_blks_hit``, ``shared_blks_read``,
    ``temp_blks`` (read and written), ``wal_bytes``.  ``mean_time_change``
    is ``mean_B / mean_A - 1`` (when both ranges have `min_calls` calls),
    ``calls_change`` the same for calls per second.  pgfleet's own
    statements are left out unless `own`.
    """
    sa, sb = _seconds(a), _seconds(b)
    where = {"datname": datname} if datname is not None else None
    if first is None:
        first = (
            await per_statement(conn, srvid, a, datname=datname, own=own),
            await per_statement(conn, srvid, b, datname=datname, own=own),
        )
    ra, rb = first
    scale = sb / sa
    ranked = sorted(
        ((_time(rb.get(k)) - _time(ra.get(k)) * scale, k) for k in ra.keys() | rb.keys()),
        key=lambda x: (-x[0], str(x[1][0]), x[1][1]),
    )[: max(limit, 0)]
    keys = [k for _, k in ranked]
    details = [await _details(conn, srvid, r, keys, where) for r in (a, b)]
    texts = await reads.statement_texts(conn, srvid, [k[1] for k in keys], text_chars)
    statements = []
    for extra, key in ranked:
        fa, fb = details[0].get(key), details[1].get(key)
        kind, mean_change, calls_change = _kind(fa, fb, sa, sb, min_calls, threshold)
        t = texts.get(key)
        statements.append({
            "datname": key[0],
            "queryid": key[1],
            "query": t["query"] if t else None,
            "query_truncated": bool(t and t["query_truncated"]),
            "a": fa,
            "b": fb,
            "extra_time": extra,
            "mean_time_change": mean_change,
            "calls_change": calls_change,
            "kind": kind,
            "regressed": extra > 0 and kind in ("new", "slower", "more_calls"),
        })  # fmt: skip
    return {
        "a": {"from": a[0], "to": a[1], "seconds": sa},
        "b": {"from": b[0], "to": b[1], "seconds": sb},
        "datname": datname,
        "min_calls": min_calls,
        "threshold": threshold,
        "totals": {"a": _totals(ra), "b": _totals(rb)},
        "regressed": sum(1 for s in statements if s["regressed"]),
        "statements": statements,
    }


async def per_statement(
    conn: Conn, srvid: int, r: Range, *, datname: str | None = None, own: bool = False
) -> dict[Key, Row]:
    """Calls and time (``calls``, ``total_time``) of every statement of
    `srvid` (or of `datname`) that was called in `r`, by (datname, queryid):
    what :func:`compare` ranks on.  pgfleet's own are left out unless `own`."""
    rows = await reads.sums(
        conn, "pg_stat_statements", srvid, r[0], r[1], ["datname", "queryid"], _RANK_EXPRS,
        where={"datname": datname} if datname is not None else None,
        condition=None if own else reads.not_own_statements(),
    )  # fmt: skip
    return {(row["datname"], row["queryid"]): row for row in rows if row["calls"]}


def _seconds(r: Range) -> float:
    seconds = (r[1] - r[0]).total_seconds()
    if seconds <= 0:
        raise ValueError(f"empty time range: {r[0].isoformat()} to {r[1].isoformat()}")
    return seconds


def _time(row: Row | None) -> float:
    return float(row["total_time"] or 0.0) if row else 0.0


def _totals(rows: Mapping[Key, Row]) -> dict[str, float | int]:
    return {
        "calls": sum(float(r["calls"] or 0) for r in rows.values()),
        "total_time": sum(_time(r) for r in rows.values()),
        "statements": len(rows),
    }


async def _details(
    conn: Conn, srvid: int, r: Range, keys: list[Key], where: dict[str, Any] | None
) -> dict[Key, dict[str, Any]]:
    """Every figure of the statements `keys` over `r`."""
    if not keys:
        return {}
    # Only the winners' entries reach <m>_sums' decoding; a queryid of
    # another database comes back too and is dropped below.
    only = sql.SQL("queryid = ANY({})").format(sql.Literal(sorted({k[1] for k in keys})))
    rows = await reads.sums(
        conn, "pg_stat_statements", srvid, r[0], r[1], ["datname", "queryid"], _EXPRS,
        where=where, condition=only,
    )  # fmt: skip
    wanted = set(keys)
    out = {}
    for row in rows:
        key = (row["datname"], row["queryid"])
        if key in wanted and row["calls"]:
            out[key] = _figures(row)
    return out


def _figures(row: Row) -> dict[str, Any]:
    calls = float(row["calls"])
    f = {k: (None if row[k] is None else float(row[k])) for k in _EXPRS}
    f["mean_time"] = (f["total_time"] or 0.0) / calls
    f["rows_per_call"] = None if f["rows"] is None else f["rows"] / calls
    return {k: f[k] for k in FIGURES}


def _kind(
    fa: Mapping[str, Any] | None,
    fb: Mapping[str, Any] | None,
    sa: float,
    sb: float,
    min_calls: int,
    threshold: float,
) -> tuple[str, float | None, float | None]:
    """(kind, mean_time_change, calls_change): see the module."""
    if fa is None and fb is None:
        return "steady", None, None
    if fa is None:
        return "new", None, None
    if fb is None:
        return "gone", None, None
    calls_change = (fb["calls"] / sb) / (fa["calls"] / sa) - 1
    mean_change = None
    if fa["calls"] >= min_calls and fb["calls"] >= min_calls and fa["mean_time"] > 0:
        mean_change = fb["mean_time"] / fa["mean_time"] - 1
        if mean_change >= threshold:
            return "slower", mean_change, calls_change
        # "threshold times faster", symmetric to slower: 1.2x less time.
        if mean_change <= 1 / (1 + threshold) - 1:
            return "faster", mean_change, calls_change
    if calls_change >= threshold:
        return "more_calls", mean_change, calls_change
    if calls_change <= 1 / (1 + threshold) - 1:
        return "fewer_calls", mean_change, calls_change
    return "steady", mean_change, calls_change
