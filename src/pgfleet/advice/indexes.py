"""Index advice: from the predicates pg_qualstats collected over a time
range to indexes that would help, verified with hypopg.

1. the repository gives the predicates of the range (``pg_qualstats_sums``,
   texts from ``pg_qualstats_once``; pgfleet's own statements and the
   system catalogs left out) and the statements they belong to
   (``pg_stat_statements_sums`` and ``_once``): :func:`workload`, a few
   quick reads, the only ones of the repository;

then per database of the server, in turn (one connection at a time, each
closed after its database):

2. on the monitored database, in one READ ONLY transaction (see
   :mod:`pgfleet.advice.explain`): each predicate's column and the access
   methods whose default operator class has its operator (``pg_amop``,
   ``pg_opclass``), the tables' indexes, and, when pg_qualstats is there,
   which predicates it saw ANDed (``qualid``);
3. :mod:`pgfleet.advice.quals` makes the candidates and sets aside those an
   existing index covers: those are reported as ``covered``, never
   suggested;
4. with hypopg, each statement's estimated cost is read once as it is, then
   with each candidate as a hypothetical index (made, explained against, and
   dropped in turn, ``hypopg_reset()`` at the end): a candidate some
   statement would use for at least ``min_gain`` less cost is
   ``suggested``; one none would use is ``no_gain``.  Without hypopg, or for
   a method hypopg cannot simulate (gin, gist), it is ``unverified``.

Bounded: at most `max_candidates` candidates and `max_statements` statements
per database (those that took the most time), `max_explains` EXPLAINs and
`deadline` seconds in all per database, each statement cancelled after
`statement_timeout` seconds by the server itself.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgfleet.advice import catalog, quals
from pgfleet.advice.explain import (
    ExplainSession,
    NotExplainable,
    index_names,
    reason_of,
    total_cost,
)
from pgfleet.advice.quals import Candidate, Predicate, Resolved, Skipped, Thresholds
from pgfleet.config import CollectorConfig
from pgfleet.connections import connect_server
from pgfleet.errors import PgfleetError
from pgfleet.repository import reads
from pgfleet.repository.reads import Conn
from pgfleet.repository.servers import Server

SUGGESTED, UNVERIFIED, NO_GAIN, COVERED = "suggested", "unverified", "no_gain", "covered"
# How candidates are listed: the answers first.
_STATUS_ORDER = {SUGGESTED: 0, UNVERIFIED: 1, NO_GAIN: 2, COVERED: 3}
# A statement's cost as the session sees it: (cost, indexes the plan uses, error).
_Cost = Callable[[int], Awaitable[tuple[float | None, set[str], str | None]]]


@dataclass(frozen=True)
class Limits:
    """What index advice may take of a monitored server, and what it keeps."""

    thresholds: Thresholds = dataclasses.field(default_factory=Thresholds)
    max_databases: int = 10
    max_candidates: int = 20
    # Statements explained per database: those that took the most time.
    max_statements: int = 20
    max_explains: int = 200
    # A statement's estimated cost must drop by this share for a suggestion.
    min_gain: float = 0.1
    # Seconds, on the monitored server (statement_timeout and lock_timeout).
    statement_timeout: float = 2.0
    # Seconds for one database's verification in all.
    deadline: float = 60.0
    # EXPLAIN as this role (SET LOCAL ROLE), lower than the monitoring role.
    role: str | None = None


@dataclass(frozen=True)
class QueryGain:
    """A statement a candidate was tried on."""

    queryid: int
    query: str | None  # the normalized text; None if pg_stat_statements did not keep it
    calls: float | None  # in the range
    total_time: float | None  # ms, in the range
    cost_before: float | None  # the planner's estimate, in its units
    cost_after: float | None  # with the hypothetical index
    uses_index: bool  # the plan with it uses it
    gain: float | None  # (before - after) / before: 0.9 is a 90% cheaper plan
    error: str | None  # why there are no costs


@dataclass(frozen=True)
class Suggestion:
    """One candidate index and what became of it (``status``)."""

    status: str  # suggested, unverified, no_gain or covered
    reason: str | None
    schema: str
    table: str
    columns: tuple[str, ...]
    access_method: str
    ddl: str  # CREATE INDEX ON ... (no name, no CONCURRENTLY: add what you use)
    covered_by: str | None  # the existing index's definition, when covered
    predicates: tuple[Predicate, ...]
    queries: tuple[QueryGain, ...]

    @property
    def best_gain(self) -> float | None:
        gains = [q.gain for q in self.queries if q.gain is not None and q.uses_index]
        return max(gains) if gains else None

    @property
    def estimated_saving(self) -> float | None:
        """Milliseconds the range would have spent less, were time
        proportional to cost: a ranking, not a promise."""
        parts = [
            q.total_time * q.gain
            for q in self.queries
            if q.gain is not None and q.uses_index and q.total_time is not None
        ]
        return sum(parts) if parts else None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["best_gain"] = self.best_gain
        out["estimated_saving"] = self.estimated_saving
        return out


@dataclass(frozen=True)
class DatabaseAdvice:
    datname: str
    # Why the advice is partial or empty (an extension missing, the server
    # out of reach...); None when everything could be done.
    reason: str | None
    hypopg: bool
    server_version_num: int | None
    explains: int
    indexes: tuple[Suggestion, ...]  # suggested first, then unverified, no_gain, covered
    skipped: tuple[Skipped, ...]

    @property
    def suggested(self) -> list[Suggestion]:
        return [s for s in self.indexes if s.status == SUGGESTED]

    def to_dict(self) -> dict[str, Any]:
        return {
            "datname": self.datname,
            "reason": self.reason,
            "hypopg": self.hypopg,
            "server_version_num": self.server_version_num,
            "explains": self.explains,
            "indexes": [s.to_dict() for s in self.indexes],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
        }


@dataclass(frozen=True)
class IndexAdvice:
    srvid: int
    alias: str
    start: datetime
    end: datetime
    # Why there is no advice at all (no predicate collected...), or None.
    reason: str | None
    databases: tuple[DatabaseAdvice, ...]
    # Databases with predicates beyond `max_databases`, not visited.
    left_out: tuple[str, ...] = ()

    def database(self, datname: str) -> DatabaseAdvice | None:
        return next((d for d in self.databases if d.datname == datname), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "srvid": self.srvid,
            "alias": self.alias,
            "from": self.start,
            "to": self.end,
            "reason": self.reason,
            "databases": [d.to_dict() for d in self.databases],
            "left_out": list(self.left_out),
        }


@dataclass(frozen=True)
class Statement:
    """A statement of the range, as the repository has it."""

    queryid: int
    query: str | None
    rolname: str | None
    calls: float | None
    total_time: float | None


@dataclass(frozen=True)
class Workload:
    """What the repository says of a range: the predicates per database,
    and the statements they belong to."""

    predicates: Mapping[str, list[Predicate]]
    statements: Mapping[str, Mapping[int, Statement]]


async def workload(
    repo: Conn, srvid: int, start: datetime, end: datetime, *, datname: str | None = None
) -> Workload:
    """The repository's part of the advice: a few quick reads, after which
    the repository connection is not needed any more (the web UI gives it
    back to its pool before the monitored server is asked)."""
    preds = await _predicates(repo, srvid, start, end, datname)
    statements = await _statements(repo, srvid, start, end, preds) if preds else {}
    return Workload(preds, statements)


async def advise(
    repo: Conn,
    server: Server,
    cfg: CollectorConfig,
    start: datetime,
    end: datetime,
    *,
    datname: str | None = None,
    limits: Limits = Limits(),
) -> IndexAdvice:
    """Index advice for `server` over ``start..end``, for every database
    with predicates (at most `max_databases`, those whose predicates
    removed the most rows) or for `datname` only: :func:`workload`, then
    :func:`advise_workload`.  Never raises for what a user could meet (a
    server out of reach, an extension missing): the result says why
    (``reason``, at the top or per database)."""
    w = await workload(repo, server.srvid, start, end, datname=datname)
    return await advise_workload(server, cfg, start, end, w, datname=datname, limits=limits)


async def advise_workload(
    server: Server,
    cfg: CollectorConfig,
    start: datetime,
    end: datetime,
    w: Workload,
    *,
    datname: str | None = None,
    limits: Limits = Limits(),
) -> IndexAdvice:
    """The monitored server's part of :func:`advise`, on a Workload read
    before: its databases in turn, one connection at a time."""

    def result(
        reason: str | None, dbs: Sequence[DatabaseAdvice] = (), left_out: Sequence[str] = ()
    ) -> IndexAdvice:
        return IndexAdvice(
            server.srvid, server.alias, start, end, reason, tuple(dbs), tuple(left_out)
        )

    preds = w.predicates
    if not preds:
        where = f"database {datname!r} of " if datname else ""
        why = await _why_no_predicates(server, cfg, datname or server.dbname)
        return result(
            f"pg_qualstats collected no predicate of {where}server {server.alias!r} "
            f"in this range: {why}"
        )
    ranked = sorted(preds, key=lambda d: -sum(p.nbfiltered for p in preds[d]))
    dbs = []
    for d in ranked[: limits.max_databases]:
        dbs.append(await _database(server, cfg, d, preds[d], w.statements.get(d, {}), limits))
    return result(None, dbs, ranked[limits.max_databases :])


# -- The repository


_PREDICATE_TEXTS = """
SELECT DISTINCT ON (datname, queryid, qualnodeid, eval_type)
       datname, queryid, qualnodeid, eval_type, rolname, qual, constvalue
  FROM pgfleet.pg_qualstats_once
 WHERE srvid = %(srvid)s AND (%(datname)s::text IS NULL OR datname = %(datname)s)
 ORDER BY datname, queryid, qualnodeid, eval_type, first_seen
"""


async def _predicates(
    repo: Conn, srvid: int, start: datetime, end: datetime, datname: str | None
) -> dict[str, list[Predicate]]:
    """The range's predicates per database, every role summed."""
    where = {"datname": datname} if datname is not None else None
    rows = await reads.sums(
        repo, "pg_qualstats", srvid, start, end,
        ["datname", "queryid", "qualnodeid", "eval_type"],
        {"occurences": "sum(occurences)", "execution_count": "sum(execution_count)",
         "nbfiltered": "sum(nbfiltered)"},
        where=where, condition=reads.not_own_statements(),
    )  # fmt: skip
    if not rows:
        return {}
    texts = await reads.fetch(repo, _PREDICATE_TEXTS, {"srvid": srvid, "datname": datname})
    by = {(t["datname"], t["queryid"], t["qualnodeid"], t["eval_type"]): t for t in texts}
    out: dict[str, list[Predicate]] = {}
    for r in rows:
        t = by.get((r["datname"], r["queryid"], r["qualnodeid"], r["eval_type"]))
        # Evaluated on no row: nothing to learn (pg_qualstats counts plans
        # that never ran, such as EXPLAIN's, ours included).
        if t is None or not r["occurences"] or not r["execution_count"]:
            continue
        out.setdefault(r["datname"], []).append(
            Predicate(
                datname=r["datname"],
                queryid=r["queryid"],
                qualnodeid=r["qualnodeid"],
                eval_type=r["eval_type"],
                qual=t["qual"],
                constvalue=t["constvalue"],
                rolname=t["rolname"],
                occurences=float(r["occurences"] or 0),
                execution_count=float(r["execution_count"] or 0),
                nbfiltered=float(r["nbfiltered"] or 0),
            )
        )
    return out


_STATEMENT_TEXTS = """
SELECT DISTINCT ON (datname, queryid) datname, queryid, rolname, query
  FROM pgfleet.pg_stat_statements_once
 WHERE srvid = %(srvid)s AND queryid = ANY (%(ids)s)
 ORDER BY datname, queryid, toplevel DESC, first_seen
"""


async def _statements(
    repo: Conn,
    srvid: int,
    start: datetime,
    end: datetime,
    preds: Mapping[str, list[Predicate]],
) -> dict[str, dict[int, Statement]]:
    """The statements the predicates belong to, per database: their full
    texts, and their calls and time over the range."""
    ids = sorted({p.queryid for ps in preds.values() for p in ps})
    figures = await reads.sums(
        repo, "pg_stat_statements", srvid, start, end, ["datname", "queryid"],
        {"calls": "sum(calls)", "total_time": "sum(total_exec_time)"},
        condition=sql.SQL("queryid = ANY({})").format(sql.Literal(ids)),
    )  # fmt: skip
    by = {(f["datname"], f["queryid"]): f for f in figures}
    texts = await reads.fetch(repo, _STATEMENT_TEXTS, {"srvid": srvid, "ids": ids})
    out: dict[str, dict[int, Statement]] = {}
    for t in texts:
        if t["datname"] not in preds:
            continue
        f = by.get((t["datname"], t["queryid"]), {})
        out.setdefault(t["datname"], {})[t["queryid"]] = Statement(
            queryid=t["queryid"],
            query=t["query"],
            rolname=t["rolname"],
            calls=_float(f.get("calls")),
            total_time=_float(f.get("total_time")),
        )
    return out


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


# -- The monitored server


async def _why_no_predicates(server: Server, cfg: CollectorConfig, datname: str) -> str:
    """What the server says of pg_qualstats (and hypopg), for a range
    without predicates."""
    try:
        conn = await connect_server(server, cfg, dbname=datname)
    except PgfleetError as e:
        return f"is pg_qualstats installed? The server cannot be asked: {e}"
    try:
        async with conn, ExplainSession(conn, timeout=cfg.statement_timeout) as s:
            ext = await catalog.extensions(s)
    except psycopg.Error as e:
        return f"is pg_qualstats installed? The server cannot be asked: {reason_of(e)}"
    why = ext.why_not("pg_qualstats", datname)
    if why is None:
        if "pg_qualstats" not in ext.preload:
            why = "pg_qualstats is installed but not in shared_preload_libraries"
        else:
            why = (
                "pg_qualstats is installed and sampled no predicate in the range "
                "(pg_qualstats.sample_rate samples 1/max_connections of the queries by default)"
            )
    hypopg = ext.why_not("hypopg", datname)
    if hypopg:
        why += f"; and {hypopg}: candidates could not be verified either"
    return why


async def _database(
    server: Server,
    cfg: CollectorConfig,
    datname: str,
    preds: Sequence[Predicate],
    statements: Mapping[int, Statement],
    limits: Limits,
) -> DatabaseAdvice:
    """One database's advice; its reason when the server cannot give it."""
    try:
        conn = await connect_server(server, cfg, dbname=datname)
    except PgfleetError as e:
        return DatabaseAdvice(datname, str(e), False, None, 0, (), ())
    try:
        async with conn:
            s = ExplainSession(conn, timeout=limits.statement_timeout, role=limits.role)
            async with s:
                return await _advise_database(s, datname, preds, statements, limits)
    except (psycopg.Error, PgfleetError) as e:
        reason = reason_of(e) if isinstance(e, psycopg.Error) else str(e)
        return DatabaseAdvice(
            datname, f"server {server.alias!r}, database {datname!r}: {reason}",
            False, None, 0, (), (),
        )  # fmt: skip


async def _advise_database(
    s: ExplainSession,
    datname: str,
    preds: Sequence[Predicate],
    statements: Mapping[int, Statement],
    limits: Limits,
) -> DatabaseAdvice:
    ext = await catalog.extensions(s)
    resolved, skipped = await catalog.resolve(s, preds)
    qualids = await catalog.live_qualids(s, ext, preds)
    groups = quals.groups(resolved, qualids)
    cands = quals.candidates(groups, limits.thresholds)[: limits.max_candidates]
    for g in groups:
        if not quals.worthwhile(g, limits.thresholds):
            why = _weak(g, limits)
            skipped += [Skipped(r.predicate.qual, r.predicate.queryid, "f", why)
                        for r in g if r.methods and r.predicate.eval_type == "f"]  # fmt: skip
    existing = await catalog.indexes(s, sorted({c.relid for c in cands}))
    hypopg_missing = ext.why_not("hypopg", datname)
    reason = None
    outcomes: list[Suggestion] = []
    open_ = []
    for c in cands:
        ix = quals.covering(c, existing)
        if ix is None:
            open_.append(c)
            continue
        why = (
            f"the unique index {ix.name} finds at most one row"
            if ix.unique and set(ix.attnums) <= c.equalities()
            else f"the index {ix.name} serves these predicates"
        )
        outcomes.append(_suggestion(c, COVERED, why, ix.definition, ()))
    open_ = quals.fold(open_)
    if hypopg_missing and open_:
        reason = f"{hypopg_missing}: the candidates are not verified"
        outcomes += [_suggestion(c, UNVERIFIED, reason, None, _untried(c, statements))
                     for c in open_]  # fmt: skip
    elif open_:
        await s.switch_role()
        outcomes += await _verify(s, ext.schemas["hypopg"], open_, statements, limits)
    outcomes.sort(key=lambda o: (_STATUS_ORDER[o.status], -(o.estimated_saving or 0.0), o.ddl))
    return DatabaseAdvice(
        datname=datname,
        reason=reason,
        hypopg=hypopg_missing is None,
        server_version_num=s.server_version,
        explains=s.explains,
        indexes=tuple(outcomes),
        skipped=tuple(skipped),
    )


def _weak(group: Sequence[Resolved], limits: Limits) -> str:
    ratio, per_run = quals.filtering(group)
    t = limits.thresholds
    return (
        f"with the predicates ANDed with it on this table, removes {ratio:.0%} of the rows "
        f"seen, {per_run:.0f} per run (a candidate needs {t.min_filter_ratio:.0%} "
        f"and {t.min_filtered:.0f})"
    )


def _suggestion(
    c: Candidate,
    status: str,
    reason: str | None,
    covered_by: str | None,
    queries: Sequence[QueryGain],
) -> Suggestion:
    return Suggestion(
        status=status,
        reason=reason,
        schema=quals.unquote(c.qschema),
        table=quals.unquote(c.qtable),
        columns=tuple(quals.unquote(q) for q in c.qcolumns),
        access_method=c.am,
        ddl=c.ddl(),
        covered_by=covered_by,
        predicates=tuple(r.predicate for r in c.predicates),
        queries=tuple(queries),
    )


def _untried(
    c: Candidate,
    statements: Mapping[int, Statement],
    before: Mapping[int, float | str] | None = None,
) -> list[QueryGain]:
    """The candidate's statements, with their cost as they are if known."""
    out = []
    for q in c.queryids:
        b = (before or {}).get(q)
        cost, error = (b, None) if isinstance(b, float) else (None, b)
        out.append(_gain(q, statements.get(q), cost, None, False, error))
    return out


def _gain(
    queryid: int,
    st: Statement | None,
    before: float | None,
    after: float | None,
    uses: bool,
    error: str | None,
) -> QueryGain:
    gain = None
    if before is not None and after is not None and before > 0:
        gain = (before - after) / before if uses else 0.0
    return QueryGain(
        queryid=queryid,
        query=st.query if st else None,
        calls=st.calls if st else None,
        total_time=st.total_time if st else None,
        cost_before=before,
        cost_after=after,
        uses_index=uses,
        gain=gain,
        error=error,
    )


# -- hypopg


async def _verify(
    s: ExplainSession,
    hypopg: str,
    cands: Sequence[Candidate],
    statements: Mapping[int, Statement],
    limits: Limits,
) -> list[Suggestion]:
    """Each candidate tried as a hypothetical index against its statements."""
    deadline = time.monotonic() + limits.deadline
    wanted = {q for c in cands for q in c.queryids}
    ranked = sorted(
        wanted,
        key=lambda q: -(statements[q].total_time or 0.0) if q in statements else 0.0,
    )
    chosen = set(ranked[: limits.max_statements])
    before: dict[int, float | str] = {}

    def budget_spent() -> bool:
        return s.explains >= limits.max_explains or time.monotonic() > deadline

    async def cost(queryid: int) -> tuple[float | None, set[str], str | None]:
        st = statements.get(queryid)
        if st is None or st.query is None:
            return None, set(), "pg_stat_statements did not keep this statement's text"
        try:
            plan = await s.explain(st.query, rolname=st.rolname)
        except NotExplainable as e:
            return None, set(), str(e)
        c = total_cost(plan)
        return c, index_names(plan), None if c is not None else "EXPLAIN gave no cost"

    # Every statement's cost as it is, before any hypothetical index exists.
    for q in ranked:
        if q not in chosen:
            before[q] = (
                f"not explained: only the {limits.max_statements} statements"
                " that took the most time are"
            )
        elif budget_spent():
            before[q] = "not explained: the time or EXPLAIN budget was spent"
        else:
            c, _, error = await cost(q)
            before[q] = c if c is not None else (error or "no cost")
    out: list[Suggestion] = []
    try:
        for cand in cands:
            if budget_spent():
                why = "not verified: the time or EXPLAIN budget was spent"
                out.append(
                    _suggestion(cand, UNVERIFIED, why, None, _untried(cand, statements, before))
                )
                continue
            out.append(await _try(s, hypopg, cand, statements, before, cost, limits))
    finally:
        if not s.conn.broken:
            await s.fetch(sql.SQL("SELECT {}.hypopg_reset()").format(sql.SQL(hypopg)))
    return out


async def _try(
    s: ExplainSession,
    hypopg: str,
    cand: Candidate,
    statements: Mapping[int, Statement],
    before: Mapping[int, float | str],
    cost: _Cost,
    limits: Limits,
) -> Suggestion:
    try:
        async with s.savepoint():
            rows = await s.fetch(
                sql.SQL("SELECT indexrelid, indexname FROM {}.hypopg_create_index(%s)").format(
                    sql.SQL(hypopg)
                ),
                (cand.ddl(),),
            )
    except psycopg.Error as e:
        why = f"hypopg cannot simulate it: {reason_of(e)}"
        return _suggestion(cand, UNVERIFIED, why, None, _untried(cand, statements, before))
    oid, name = rows[0]["indexrelid"], rows[0]["indexname"]
    gains = []
    try:
        for q in cand.queryids:
            b = before.get(q)
            if not isinstance(b, float):
                gains.append(_gain(q, statements.get(q), None, None, False, b))
                continue
            after, used, error = await cost(q)
            gains.append(_gain(q, statements.get(q), b, after, name in used, error))
    finally:
        await s.fetch(sql.SQL("SELECT {}.hypopg_drop_index(%s)").format(sql.SQL(hypopg)), (oid,))
    helped = [g for g in gains if g.uses_index and (g.gain or 0.0) >= limits.min_gain]
    if helped:
        return _suggestion(cand, SUGGESTED, None, None, gains)
    tried = [g for g in gains if g.cost_after is not None]
    if not tried:
        why = "not verified: none of its statements could be explained"
        return _suggestion(cand, UNVERIFIED, why, None, gains)
    if any(g.uses_index for g in tried):
        why = f"the planner would use it, but no statement's cost drops by {limits.min_gain:.0%}"
    else:
        why = "the planner would not use it for these statements"
    return _suggestion(cand, NO_GAIN, why, None, gains)
