"""The fleet's statistics as Prometheus metric families.

:class:`FleetCollector` turns what :class:`~pgfleet.collector.exporter.latest.Latest`
holds -- the latest snapshot of each server -- into ``pgfleet_*`` families,
afresh on every scrape: no query runs at scrape time, and a server that left
the fleet is absent from the next scrape.  Every sample carries the label
``server`` (the server's alias; ``instance`` and ``job`` belong to the
Prometheus target, which is the collector).

Which datasource column becomes which family is declared in
:data:`~pgfleet.collector.exporter.views.VIEWS`, which ``Latest`` reads too,
to know which columns to parse.  Counters are ``_total`` and never go backwards (see
``latest.py``), times are converted from PostgreSQL's milliseconds to
seconds.  The list of families, with their meaning, is docs/metrics.md.
Users' sources that declare exported columns come last (see :mod:`.custom`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from pgfleet.collector.exporter import custom
from pgfleet.collector.exporter.views import PREFIX, VIEWS, View

if TYPE_CHECKING:
    from pgfleet.collector.exporter.latest import Latest, ServerView

# Families built from ServerInfo rather than from a source.
_SERVER_FAMILIES: tuple[tuple[str, str, Callable[[ServerView], float]], ...] = (
    ("server_version_num", "The server's server_version_num.", lambda s: s.version_num),
    ("server_in_recovery", "1 if the server is a standby (in recovery).", lambda s: s.in_recovery),
)


def _unit(family: str) -> str:
    for unit in ("seconds", "bytes"):
        if family.endswith("_" + unit):
            return unit
    return ""


@dataclass(frozen=True)
class _Family:
    name: str
    counter: bool
    help: str
    labels: tuple[str, ...]

    def new(self) -> Metric:
        cls = CounterMetricFamily if self.counter else GaugeMetricFamily
        return cls(PREFIX + self.name, self.help, labels=self.labels, unit=_unit(self.name))


@dataclass(frozen=True)
class _Plan:
    """What one view produces: its families, and per value where it goes."""

    families: tuple[_Family, ...]
    # Per Series, in value order: (family index, sample name, constant labels).
    targets: tuple[tuple[int, str, dict[str, str] | None], ...]
    labels: tuple[str, ...]
    info: _Family | None


def _plan(view: View) -> _Plan:
    labels = ("server", *view.label_names)
    families: dict[str, _Family] = {}
    targets = []
    for i, s in enumerate(view.series):
        counter = i < len(view.counters)
        name = view.family(s)
        if name not in families:
            families[name] = _Family(name, counter, s.help, labels + tuple(n for n, _ in s.labels))
        sample = PREFIX + name + ("_total" if counter else "")
        targets.append((list(families).index(name), sample, dict(s.labels) or None))
    info = None
    if view.info is not None:
        name, help, _, label, _ = view.info
        info = _Family(name, False, help, (*labels, label))
    return _Plan(tuple(families.values()), tuple(targets), labels, info)


PLANS: tuple[_Plan, ...] = tuple(_plan(v) for v in VIEWS)


def family_labels() -> dict[str, tuple[str, ...]]:
    """Every family FleetCollector may export, as named in the text format, with its labels."""
    out: dict[str, tuple[str, ...]] = {PREFIX + n: ("server",) for n, _, _ in _SERVER_FAMILIES}
    for plan in PLANS:
        for f in plan.families:
            out[PREFIX + f.name + ("_total" if f.counter else "")] = f.labels
        if plan.info is not None:
            out[PREFIX + plan.info.name] = plan.info.labels
    return out


def family_names() -> list[str]:
    return list(family_labels())


class FleetCollector:
    """A prometheus_client collector of every server's latest statistics.

    ``collect()`` reads only what ``Latest.servers()`` returns, which no one
    mutates afterwards: it may run in another thread than the updates.
    """

    def __init__(self, latest: Latest) -> None:
        self.latest = latest

    def describe(self) -> list[Metric]:
        # The families depend on what the fleet holds: none to declare, and
        # registering must not run a collection.
        return []

    def collect(self) -> Iterator[Metric]:
        return families(self.latest.servers())


def families(servers: list[ServerView]) -> Iterator[Metric]:
    """The families of these servers' views (those with samples), in a fixed order."""
    for name, help, value in _SERVER_FAMILIES:
        fam = GaugeMetricFamily(PREFIX + name, help, labels=("server",))
        for srv in servers:
            fam.add_metric((srv.alias,), float(value(srv)))
        if fam.samples:
            yield fam
    for vi, plan in enumerate(PLANS):
        yield from _view(vi, plan, servers)
    yield from custom_families(servers)


def custom_families(servers: list[ServerView]) -> Iterator[Metric]:
    """The families of the users' sources of these servers' views."""
    return custom.families((srv.alias, srv.custom) for srv in servers if srv.custom)


def _view(vi: int, plan: _Plan, servers: list[ServerView]) -> Iterator[Metric]:
    fams = [f.new() for f in plan.families]
    appends = [f.samples.append for f in fams]
    info = plan.info.new() if plan.info is not None else None
    names = plan.labels
    targets = plan.targets
    # Hot loop: one sample per series per scrape, at some 10^5 series.
    # One labels dict per entry is shared by its samples: prometheus_client
    # only reads them.
    for srv in servers:
        alias = (srv.alias,)
        for row in srv.rows[vi]:
            labels = dict(zip(names, alias + row.labels, strict=True))
            for (fi, sample, const), v in zip(targets, row.values, strict=True):
                if v == v:  # NaN: NULL in the source, no sample
                    appends[fi](Sample(sample, labels | const if const else labels, v))
            if info is not None and row.info is not None:
                assert plan.info is not None
                info.samples.append(
                    Sample(info.name, labels | {plan.info.labels[-1]: row.info}, 1.0)
                )
    for fam in fams:
        if fam.samples:
            yield fam
    if info is not None and info.samples:
        yield info
