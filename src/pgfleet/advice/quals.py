"""Predicates into index candidates, and what covers a candidate: no I/O.

The input is what the repository keeps of pg_qualstats (a predicate per
statement, ``schema.table.column op ?``, with its counts over the range) and
what the monitored server's catalog says of the columns, operators and
indexes involved; :mod:`pgfleet.advice.indexes` reads both.  What holds:

- **Only worthwhile filters start a candidate**: the predicates ANDed on a
  table that were evaluated as filters (``eval_type`` ``f``: no index served
  them) must together remove at least ``min_filter_ratio`` of the rows they
  saw and ``min_filtered`` rows per run on average (PoWA's thresholds, per
  ANDed group as PoWA has them: 30% and 1,000).  Each row is removed by
  the first predicate it fails, so the group removed the sum of its
  predicates' ``nbfiltered`` out of the rows its first predicate saw (the
  largest ``execution_count``).  Join clauses (a column on both sides)
  start none.
- **ANDed predicates make one multi-column index.**  Predicates ANDed in a
  statement are those pg_qualstats gives one ``qualid``; the repository does
  not keep it (see docs/advice.md), so a statement's predicates on one table
  count as ANDed unless the server's live pg_qualstats says otherwise
  (`qualids`).  A predicate the statement already evaluated through an index
  (``i``) joins its group's candidate as a leading column.
- **The access method follows the operator**: the first of btree, hash,
  gin, gist, brin (then any other) whose default operator class for the
  column's type has the operator.  A group's predicates are split by method:
  btree puts equality columns first, then the most selective; hash indexes
  one column each; ``@>`` on jsonb gets a gin index of its own, never a
  btree that cannot serve it.
- **An existing index that already serves the predicates covers the
  candidate, and a covered candidate is never suggested**: a valid, not
  partial index whose leading key columns (btree, hash; any key columns for
  the other methods) are the candidate's columns and whose operator families
  have the candidate's operators; or a unique index (a primary key is one)
  all of whose columns the candidate compares with ``=``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# Preference between access methods serving the same operator: btree serves
# equality, ranges, sorts and uniqueness; brin only suits correlated data.
METHODS = ("btree", "hash", "gin", "gist", "brin")
# Methods whose index columns serve a predicate only from the left.
_LEADING = ("btree", "hash")


@dataclass(frozen=True)
class Thresholds:
    """What makes a filter predicate worth an index."""

    # The share of the rows it saw that the predicate removed.
    min_filter_ratio: float = 0.3
    # Rows it removed per run of its statement, on average.
    min_filtered: float = 1000.0


@dataclass(frozen=True)
class Predicate:
    """A predicate pg_qualstats saw in a statement, summed over the range."""

    datname: str
    queryid: int
    qualnodeid: int
    eval_type: str  # "f": a filter; "i": evaluated by an index
    qual: str  # as collected: public.orders.customer = ?
    constvalue: str | None  # an example constant (truncated, maybe redacted)
    rolname: str | None
    occurences: float  # runs of the statement that evaluated it (the extension's spelling)
    execution_count: float  # rows it was evaluated on
    nbfiltered: float  # rows it removed

    @property
    def filter_ratio(self) -> float:
        return self.nbfiltered / self.execution_count if self.execution_count else 0.0

    @property
    def filtered_per_run(self) -> float:
        return self.nbfiltered / self.occurences if self.occurences else 0.0


@dataclass(frozen=True)
class Skipped:
    """A predicate that gave no candidate, and why."""

    qual: str
    queryid: int
    eval_type: str
    reason: str


@dataclass(frozen=True)
class Target:
    """A predicate's ``column op ?``, parsed from its text; names as
    ``quote_ident`` wrote them (``q*``) and plain."""

    qschema: str
    qtable: str
    qcolumn: str
    operator: str

    @property
    def schema(self) -> str:
        return unquote(self.qschema)

    @property
    def table(self) -> str:
        return unquote(self.qtable)

    @property
    def column(self) -> str:
        return unquote(self.qcolumn)


_IDENT = r'(?:"(?:[^"]|"")*"|[^\s."]+)'
_QUAL = re.compile(rf"({_IDENT})\.({_IDENT})\.({_IDENT}) (\S+) (.+)", re.S)
_NUMERIC_SIDE = re.compile(r"\d+\.\d+")


def unquote(ident: str) -> str:
    if len(ident) >= 2 and ident[0] == ident[-1] == '"':
        return ident[1:-1].replace('""', '"')
    return ident


def parse(qual: str) -> Target | str:
    """The predicate's target, or why it cannot have an index (a string)."""
    m = _QUAL.fullmatch(qual)
    if m is None:
        if _NUMERIC_SIDE.match(qual):
            return "its table was dropped or renamed before the snapshot (no name to index)"
        return "not a column compared with a constant"
    qschema, qtable, qcolumn, operator, right = m.groups()
    if right != "?":
        return "a join clause (a column compared with another column): not indexed here"
    return Target(qschema, qtable, qcolumn, operator)


@dataclass(frozen=True)
class Method:
    """An access method whose default operator class for a column's type
    has an operator."""

    am: str
    opclass: str
    equality: bool  # the operator is the method's equality (btree's strategy 3, hash's 1)


@dataclass(frozen=True)
class Resolved:
    """A predicate with its column found in the monitored server's catalog."""

    predicate: Predicate
    target: Target
    relid: int
    attnum: int
    methods: tuple[Method, ...]  # preferred first; empty: no index serves it

    @property
    def method(self) -> Method:
        return self.methods[0]


@dataclass(frozen=True)
class ExistingIndex:
    """An index of the monitored server, as far as covering goes."""

    name: str
    relid: int
    am: str
    attnums: tuple[int, ...]  # key columns; 0 for an expression
    operators: tuple[frozenset[str], ...]  # per key column: what its operator family has
    unique: bool
    primary: bool
    valid: bool
    partial: bool
    definition: str


@dataclass
class Candidate:
    """An index that would serve some worthwhile predicates."""

    relid: int
    qschema: str
    qtable: str
    am: str
    attnums: tuple[int, ...]
    qcolumns: tuple[str, ...]
    predicates: list[Resolved] = field(default_factory=list)

    @property
    def key(self) -> tuple[int, str, tuple[int, ...]]:
        return (self.relid, self.am, self.attnums)

    @property
    def queryids(self) -> list[int]:
        return sorted({r.predicate.queryid for r in self.predicates})

    @property
    def filtered(self) -> float:
        """Rows its worthwhile predicates removed: how the candidates rank
        before hypopg has a say."""
        return sum(r.predicate.nbfiltered for r in self.predicates)

    def operators(self, attnum: int) -> frozenset[str]:
        return frozenset(r.target.operator for r in self.predicates if r.attnum == attnum)

    def equalities(self) -> set[int]:
        """The columns it compares with the method's equality operator."""
        return {r.attnum for r in self.predicates if r.method.equality}

    def ddl(self) -> str:
        am = self.am if re.fullmatch(r"[a-z_][a-z0-9_]*", self.am) else quote(self.am)
        return (
            f"CREATE INDEX ON {self.qschema}.{self.qtable} USING {am} ({', '.join(self.qcolumns)})"
        )


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def groups(
    resolved: Iterable[Resolved], qualids: Mapping[tuple[int, int], frozenset[int]]
) -> list[list[Resolved]]:
    """The statements' predicates on each table, split into the ANDed
    groups that `qualids` (``(queryid, qualnodeid)`` to the live
    pg_qualstats' qualids; none for a predicate alone) knows of."""
    by_table: dict[tuple[int, int], list[Resolved]] = {}
    for r in resolved:
        by_table.setdefault((r.predicate.queryid, r.relid), []).append(r)
    out: list[list[Resolved]] = []
    for rs in by_table.values():
        keys = [(r.predicate.queryid, r.predicate.qualnodeid) for r in rs]
        if not all(k in qualids for k in keys):
            # Unknown to the live extension (evicted, reset, or not
            # installed in that database): ANDed, as most are.
            out.append(rs)
            continue
        split: dict[int | None, list[Resolved]] = {}
        for r, k in zip(rs, keys, strict=True):
            ids = qualids[k]
            if not ids:
                out.append([r])
            for qualid in ids:
                split.setdefault(qualid, []).append(r)
        out.extend(split.values())
    return out


def candidates(groups_: Sequence[list[Resolved]], t: Thresholds) -> list[Candidate]:
    """The candidates of the groups, the same index made once (with every
    predicate it would serve), the rows their predicates removed first."""
    found: dict[tuple[int, str, tuple[int, ...]], Candidate] = {}
    for group in groups_:
        for c in _of_group(group, t):
            if c.key in found:
                _absorb(found[c.key], c)
            else:
                found[c.key] = c
    return _ranked(found.values())


def fold(cands: Sequence[Candidate]) -> list[Candidate]:
    """`cands` with each btree that is the start of another folded into the
    longer (which serves both); to be done once covered candidates are set
    aside, lest an uncovered one disappear into a covered one."""
    merged = list(cands)
    for short in sorted(merged, key=lambda c: len(c.attnums)):
        if short.am != "btree":
            continue
        longer = [
            c
            for c in merged
            if c is not short
            and c.am == "btree"
            and c.relid == short.relid
            and len(c.attnums) > len(short.attnums)
            and c.attnums[: len(short.attnums)] == short.attnums
        ]
        if longer:
            _absorb(max(longer, key=lambda c: c.filtered), short)
            merged.remove(short)
    return _ranked(merged)


def _absorb(into: Candidate, other: Candidate) -> None:
    into.predicates.extend(r for r in other.predicates if r not in into.predicates)


def _ranked(cands: Iterable[Candidate]) -> list[Candidate]:
    return sorted(cands, key=lambda c: (-c.filtered, c.ddl()))


def filtering(group: Sequence[Resolved]) -> tuple[float, float]:
    """(share of the rows seen, rows per run) the group's filters removed."""
    filters = [r.predicate for r in group if r.predicate.eval_type == "f"]
    if not filters:
        return 0.0, 0.0
    removed = sum(p.nbfiltered for p in filters)
    seen = max(p.execution_count for p in filters)
    runs = max(p.occurences for p in filters)
    return (removed / seen if seen else 0.0), (removed / runs if runs else 0.0)


def worthwhile(group: Sequence[Resolved], t: Thresholds) -> bool:
    ratio, per_run = filtering(group)
    return ratio >= t.min_filter_ratio and per_run >= t.min_filtered


def _of_group(group: list[Resolved], t: Thresholds) -> list[Candidate]:
    usable = [r for r in group if r.methods]
    if not worthwhile(group, t):
        return []
    worth = [r for r in usable if r.predicate.eval_type == "f"]
    # Predicates that went through an index lead: they were selective
    # enough for the planner already.
    led = [r for r in usable if r.predicate.eval_type == "i"]
    by_am: dict[str, list[Resolved]] = {}
    for r in [*led, *worth]:
        by_am.setdefault(r.method.am, []).append(r)
    out: list[Candidate] = []
    for am, rs in by_am.items():
        if not any(r in worth for r in rs):
            continue
        if am == "hash":
            # Single-column indexes.
            out.extend(_candidate(am, [r]) for r in rs if r in worth)
            continue
        if am == "btree":
            rs = sorted(
                rs,
                key=lambda r: (
                    not r.method.equality,
                    r not in led,
                    -r.predicate.filter_ratio,
                ),
            )
        else:
            rs = sorted(rs, key=lambda r: -r.predicate.filter_ratio)
        out.append(_candidate(am, rs))
    return out


def _candidate(am: str, rs: list[Resolved]) -> Candidate:
    attnums: list[int] = []
    qcolumns: list[str] = []
    for r in rs:
        if r.attnum not in attnums:
            attnums.append(r.attnum)
            qcolumns.append(r.target.qcolumn)
    first = rs[0]
    return Candidate(
        relid=first.relid,
        qschema=first.target.qschema,
        qtable=first.target.qtable,
        am=am,
        attnums=tuple(attnums),
        qcolumns=tuple(qcolumns),
        predicates=list(rs),
    )


def covering(c: Candidate, indexes: Iterable[ExistingIndex]) -> ExistingIndex | None:
    """An existing index that already serves the candidate's predicates
    (see the module), or None."""
    for ix in indexes:
        if ix.relid != c.relid or not ix.valid or ix.partial:
            continue
        if ix.unique and ix.attnums and 0 not in ix.attnums and set(ix.attnums) <= c.equalities():
            return ix
        k = len(c.attnums)
        if ix.am in _LEADING:
            if len(ix.attnums) < k or set(ix.attnums[:k]) != set(c.attnums):
                continue
        elif not set(c.attnums) <= set(ix.attnums):
            continue
        position = {a: i for i, a in enumerate(ix.attnums)}
        if all(c.operators(a) <= ix.operators[position[a]] for a in c.attnums):
            return ix
    return None
