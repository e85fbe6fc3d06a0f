"""Users' sources in the exporter: their declared columns, checked, parsed and made families.

A user's source says in the repository which of its columns the exporter
shows (``pgfleet.export_source``, migration 0014): labels, counters and
gauges, exported as ``pgfleet_custom_<module>_<column>`` with the label
``server``.  The collector reads that declaration with the registry
(:class:`~pgfleet.snapshot.model.ExportedColumn`) and does not take it on
trust: whoever may write the repository's registry, or a repository of an
older or newer pgfleet, could otherwise make the exporter write an invalid
exposition, one family under two types, a label ``server`` naming another
server, or one family per row.  So, whatever the repository says:

- module and column names are ``[a-z][a-z0-9_]*`` (40 and 63 characters at
  most), a value column does not end like another type's samples
  (``_total``, ``_created``...), a label is not one Prometheus or pgfleet
  sets (``server``, ``instance``, ``job``, ``le``, ``quantile``);
- a counter or gauge is of a numeric type or boolean, or a timestamp with
  time zone for a gauge (Unix time); a field that does not parse is no
  sample, not an error;
- a source declaring anything else is not exported (logged once), nor is
  one whose families would collide with another's (``a`` + ``b_c`` and
  ``a_b`` + ``c``): the first module by name keeps its families;
- at most :data:`MAX_ENTRIES` entries (distinct label values) per source
  and server are exported, the first the source returned; rows sharing their
  labels are summed, so that no series shows twice.

The family prefix ``pgfleet_custom_`` is no built-in family's, so a user's
source can never take one of those.  Users' families are rendered whole by
prometheus_client at each scrape after the server's snapshot (rendered.py
keeps and reuses only the built-in ones' lines): they are meant to be small.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from pgfleet.collector.exporter.views import Parse
from pgfleet.log import EventLogger
from pgfleet.snapshot.model import RegisteredSource

if TYPE_CHECKING:
    from pgfleet.collector.exporter.latest import Row

log = EventLogger("exporter")

PREFIX = "pgfleet_custom_"
# Entries exported per user source and server, at most.
MAX_ENTRIES = 1000

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
# Suffixes of the samples of counters, histograms, summaries and info
# families: a gauge named so would be read as one of theirs.
_TYPE_SUFFIXES = ("_total", "_created", "_count", "_sum", "_bucket", "_info")
# Labels set by pgfleet (server) or Prometheus (instance, job, and the
# buckets' and quantiles').
RESERVED_LABELS = frozenset({"server", "instance", "job", "le", "quantile"})
_NUMBERS = frozenset({"smallint", "integer", "bigint", "real", "double precision", "numeric"})
_MAX_HELP = 300


@dataclass(frozen=True)
class Value:
    """One counter or gauge column of a user's source."""

    family: str  # in full, without _total
    counter: bool
    help: str
    position: int
    parse: Parse  # as views.Series': num, bool or time

    @property
    def sample(self) -> str:
        return self.family + "_total" if self.counter else self.family


@dataclass(frozen=True)
class CustomView:
    """A user's source as the exporter shows it: counters first, then gauges."""

    module: str
    labels: tuple[str, ...]
    label_positions: tuple[int, ...]
    values: tuple[Value, ...]
    ncounters: int
    # Fields a row must have: the highest position used, plus one.
    width: int


def _why_not(src: RegisteredSource) -> str | None:
    """What makes ``src``'s declaration unusable, or None."""
    if not _NAME.match(src.module) or len(src.module) > 40:
        return "its module name is not [a-z][a-z0-9_]* of 40 characters at most"
    for e in src.exports:
        if not _NAME.match(e.column) or len(e.column) > 63:
            return f"column {e.column!r}: not [a-z][a-z0-9_]* of 63 characters at most"
        if not 1 <= e.position < 1600:
            return f"column {e.column!r}: position {e.position} is not a source column's"
        if e.kind == "label":
            if e.column in RESERVED_LABELS:
                return f"column {e.column!r}: a label Prometheus or pgfleet sets itself"
        elif e.kind in ("counter", "gauge"):
            if e.column.endswith(_TYPE_SUFFIXES):
                return f"column {e.column!r}: a {e.kind} cannot end in {', '.join(_TYPE_SUFFIXES)}"
            if _parser(e.type, e.kind) is None:
                return f"column {e.column!r}: a {e.kind} cannot be of type {e.type!r}"
        else:
            return f"column {e.column!r}: unknown kind {e.kind!r}"
    if len({e.column for e in src.exports}) != len(src.exports):
        return "a column is declared twice"
    if not any(e.kind != "label" for e in src.exports):
        return "no counter nor gauge"
    return None


def _parser(type_: str, kind: str) -> Parse | None:
    if type_ in _NUMBERS:
        return "num"
    if type_ == "boolean":
        return "bool"
    if type_ == "timestamp with time zone" and kind == "gauge":
        return "time"
    return None


def _help(text: str, module: str, column: str) -> str:
    text = " ".join(text.split())[:_MAX_HELP]
    return text or f"Column {column} of source {module}."


def _view(src: RegisteredSource) -> CustomView:
    labels = [e for e in src.exports if e.kind == "label"]
    values = sorted(
        (e for e in src.exports if e.kind != "label"), key=lambda e: (e.kind != "counter",)
    )
    out = []
    for e in values:
        parse = _parser(e.type, e.kind)
        assert parse is not None  # checked by _why_not
        family = f"{PREFIX}{src.module}_{e.column}"
        out.append(
            Value(
                family, e.kind == "counter", _help(e.help, src.module, e.column), e.position, parse
            )
        )
    return CustomView(
        module=src.module,
        labels=tuple(e.column for e in labels),
        label_positions=tuple(e.position for e in labels),
        values=tuple(out),
        ncounters=sum(1 for e in values if e.kind == "counter"),
        width=max(e.position for e in src.exports) + 1,
    )


@functools.lru_cache(maxsize=16)
def views(sources: tuple[RegisteredSource, ...]) -> dict[str, CustomView]:
    """The users' sources among ``sources`` that export something, by module.

    Cached: the daemon hands every snapshot the same sources, read from the
    repository every discovery round, so each declaration is checked (and a
    bad one said) once per change.
    """
    out: dict[str, CustomView] = {}
    names: dict[str, str] = {}  # sample and family names taken -> module
    for src in sorted(sources, key=lambda s: s.module):
        if not src.added_manually or not src.exports:
            continue
        why = _why_not(src)
        if why is not None:
            log.warning("user source not exported", source=src.module, reason=why)
            continue
        cv = _view(src)
        taken = {n for v in cv.values for n in (v.family, v.sample)}
        clash = sorted(n for n in taken if n in names)
        if clash:
            log.warning(
                "user source not exported",
                source=src.module,
                reason=f"{clash[0]} is source {names[clash[0]]}'s already",
            )
            continue
        names |= dict.fromkeys(taken, src.module)
        out[src.module] = cv
    return out


def _unit(family: str) -> str:
    for unit in ("seconds", "bytes"):
        if family.endswith("_" + unit):
            return unit
    return ""


def families(
    servers: Iterable[tuple[str, Sequence[tuple[CustomView, Sequence[Row]]]]],
) -> Iterator[Metric]:
    """The users' families of ``(alias, [(view, rows)])``.

    One family per value column, whatever the servers; a server whose
    declaration of a family differs (a declaration changed between two
    servers' snapshots) has its samples of it left out until its next one.
    """
    fams: dict[str, tuple[Metric, tuple[str, ...]]] = {}
    for alias, custom in servers:
        for cv, rows in custom:
            names = ("server", *cv.labels)
            targets: list[Metric | None] = []
            for v in cv.values:
                got = fams.get(v.family)
                if got is None:
                    cls = CounterMetricFamily if v.counter else GaugeMetricFamily
                    new: Metric = cls(v.family, v.help, labels=names, unit=_unit(v.family))
                    fams[v.family] = (new, names)
                    targets.append(new)
                elif got[1] == names and got[0].type == ("counter" if v.counter else "gauge"):
                    targets.append(got[0])
                else:
                    targets.append(None)
            for row in rows:
                labels = dict(zip(names, (alias, *row.labels), strict=True))
                for target, v, x in zip(targets, cv.values, row.values, strict=True):
                    if target is not None and x == x:
                        target.samples.append(Sample(v.sample, labels, x))
    for fam, _ in fams.values():
        if fam.samples:
            yield fam
