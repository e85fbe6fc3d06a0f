"""The charts a server page and a database page share (a database's are the
server's, filtered)."""

from __future__ import annotations

from typing import Any

from pgfleet.repository import reads
from pgfleet.web.page import Ctx, add, chart, concurrently, line, values

_PGSS = ["calls", "total_exec_time", "rows", "shared_blks_hit", "shared_blks_read",
         "temp_blks_read", "temp_blks_written", "wal_bytes"]  # fmt: skip


async def charts(
    ctx: Ctx, srvid: int, b: reads.Buckets, datname: str | None = None
) -> list[dict[str, Any]]:
    where = {"datname": datname} if datname is not None else None
    n = b.count
    pgss, db, sessions = await concurrently(
        ctx.read(reads.rollup_series, "pg_stat_statements", srvid, b, _PGSS, where=where),
        ctx.read(
            reads.series, "pg_stat_database", srvid, b,
            {"commits": "sum(xact_commit)", "rollbacks": "sum(xact_rollback)",
             "temp_bytes": "sum(temp_bytes)", "deadlocks": "sum(deadlocks)"},
            where=where,
        ),
        ctx.read(
            reads.rollup_series, "pg_stat_activity", srvid, b, ["count"],
            group="state", where=where, gauge=True,
        ),
    )  # fmt: skip
    p = pgss.get(None, {})

    def pv(col: str) -> list[float | None]:
        return list(p.get(col, [None] * n))

    out = [
        chart("load", "Queries and time spent", [
            line("queries/s", pv("calls"), "/s"),
            line("time spent", pv("total_exec_time"), "ms/s"),
        ], note="pg_stat_statements; time spent per second: busy sessions on average, x 1000"),
        chart("rows", "Rows", [line("rows/s", pv("rows"), "/s")]),
        chart("blocks", "Shared blocks", [
            line("hit/s", pv("shared_blks_hit"), "/s"),
            line("read/s", pv("shared_blks_read"), "/s"),
        ]),
        chart("temp", "Temporary files", [
            line("temp blocks read/s", pv("temp_blks_read"), "/s"),
            line("temp blocks written/s", pv("temp_blks_written"), "/s"),
            line("temp bytes/s (pg_stat_database)", values(db, None, "temp_bytes", n), "B/s"),
        ]),
        chart("xacts", "Transactions", [
            line("commits/s", values(db, None, "commits", n), "/s"),
            line("rollbacks/s", values(db, None, "rollbacks", n), "/s"),
            line("deadlocks/s", values(db, None, "deadlocks", n), "/s"),
        ]),
        chart("sessions", "Sessions by state", [
            line(str(state or "(background)"), values(sessions, state, "count", n), "", fill=False)
            for state in sorted(sessions, key=lambda s: (s is None, s or ""))
        ], note="pg_stat_activity, sampled at each snapshot"),
    ]  # fmt: skip
    if datname is None:
        out.append(chart("wal_pgss", "WAL by statements", [
            line("WAL bytes/s", pv("wal_bytes"), "B/s"),
        ]))  # fmt: skip
    return out


async def server_charts(ctx: Ctx, srvid: int, b: reads.Buckets) -> list[dict[str, Any]]:
    n = b.count
    results: list[Any] = await concurrently(
        charts(ctx, srvid, b),
        ctx.read(reads.series, "pg_stat_wal", srvid, b,
                 {"bytes": "sum(wal_bytes)", "records": "sum(wal_records)", "fpi": "sum(wal_fpi)"}),
        ctx.read(reads.series, "pg_stat_bgwriter", srvid, b, {
            "checkpoints": "coalesce(sum(checkpoints_timed), 0)"
                           " + coalesce(sum(checkpoints_req), 0)",
            "buffers_checkpoint": "sum(buffers_checkpoint)",
            "buffers_clean": "sum(buffers_clean)",
            "buffers_backend": "sum(buffers_backend)",
        }),
        ctx.read(reads.rollup_series, "pg_stat_io", srvid, b,
                 ["reads", "writes", "extends", "hits", "evictions", "fsyncs"]),
        ctx.read(reads.rollup_series, "pg_wait_sampling", srvid, b, ["count"], group="event_type"),
        ctx.read(reads.rollup_series, "pg_stat_activity", srvid, b, ["count"],
                 group="wait_event_type", where={"state": "active"}, gauge=True),
        ctx.read(reads.gauge_series, "replication", srvid, b, ["application_name", "client_addr"],
                 ["replay_lag_bytes"]),
        ctx.read(reads.gauge_series, "wal_receiver", srvid, b, [], ["replay_lag_bytes"]),
    )  # fmt: skip
    common, wal, bgw, io, waits, active, repl, recv = results
    out = list(common)
    out.insert(5, chart("wal", "WAL", [
        line("bytes/s", values(wal, None, "bytes", n), "B/s"),
        line("full-page images/s", values(wal, None, "fpi", n), "/s"),
    ]))  # fmt: skip
    out = [c for c in out if c["id"] != "wal_pgss"]
    if waits:
        out.append(chart("waits", "Wait events (pg_wait_sampling)", [
            line(str(t or "CPU"), values(waits, t, "count", n), "/s")
            for t in sorted(waits, key=lambda s: s or "")
        ], note="samples per second by wait event type"))  # fmt: skip
    else:
        out.append(chart("waits", "Active sessions by wait event type", [
            line(str(t or "CPU"), values(active, t, "count", n), "", fill=False)
            for t in sorted(active, key=lambda s: s or "")
        ], note="pg_stat_activity, sampled at each snapshot"))  # fmt: skip
    out.append(chart("checkpoints", "Checkpoints and bgwriter", [
        line("checkpoints/s", values(bgw, None, "checkpoints", n), "/s"),
        line("buffers written by checkpoints/s", values(bgw, None, "buffers_checkpoint", n), "/s"),
        line("buffers written by bgwriter/s", values(bgw, None, "buffers_clean", n), "/s"),
        line("buffers written by backends/s", values(bgw, None, "buffers_backend", n), "/s"),
    ]))  # fmt: skip
    io1 = io.get(None, {})
    out.append(chart("io", "I/O (pg_stat_io)", [
        line(f"{k}/s", list(io1.get(k, [None] * n)), "/s")
        for k in ("reads", "writes", "extends", "hits", "evictions", "fsyncs")
    ]))  # fmt: skip
    lag = [
        line(f"{k[0] or '?'} ({k[1] or 'local'})", d["replay_lag_bytes"], "B", fill=False)
        for k, d in sorted(repl.items(), key=lambda kv: str(kv[0]))
    ]
    if recv:
        lag.append(line("this standby", values(recv, (), "replay_lag_bytes", n), "B", fill=False))
    out.append(chart("replication", "Replication lag (replay)", lag))
    return out


def total(series: list[list[float | None]]) -> list[float | None]:
    return add(*series) if series else []
