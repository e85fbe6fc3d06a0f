"""Rendering per server and laying out per family gives what prometheus_client
would have said of the whole fleet at once, in both formats."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from pgfleet.collector.exporter.latest import Latest
from pgfleet.collector.exporter.rendered import Rendered, split
from pgfleet.demo.cluster import Cluster
from tests.collector.exporter import registry, snapshot
from tests.fix_clusters import NewDatabase

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class Awkward:
    """Families prometheus_client renders with the edge cases of the format."""

    def describe(self) -> list[object]:
        return []

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("size_bytes", "Size.", labels=["server"], unit="bytes")
        g.add_metric(["a"], 1)
        yield g
        yield GaugeMetricFamily("empty", "No samples.", labels=["server"])
        c = CounterMetricFamily("odd", "Help\nwith a newline.", labels=["server", "q"])
        c.add_metric(["a", 'x\n# HELP fake 1\n"'], 2)
        yield c


def test_split_cuts_at_families_only() -> None:
    for encode, eof in ((generate_latest, b""), (openmetrics, b"# EOF\n")):
        reg = CollectorRegistry()
        reg.register(Awkward())
        text = encode(reg)
        parts = split(text)
        assert [name for name, _, _ in parts] == [
            b"size_bytes",
            b"empty",
            b"odd_total" if not eof else b"odd",
        ]
        assert b"".join(h + s for _, h, s in parts) + eof == text


def samples(text: bytes) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    return {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }


def test_laid_out_like_one_render_of_the_fleet(
    pg18: Cluster, pg15: Cluster, new_database: NewDatabase
) -> None:
    latest = Latest(max_statements=5, max_tables=5)
    snapshot(latest, "one", new_database(pg18))
    snapshot(latest, "two", pg15.dsn())
    snapshot(latest, "three", new_database(pg18))
    rendered = Rendered(latest)
    for accept in ("", OPENMETRICS):
        encoder, content_type = choose_encoder(accept)
        whole = encoder(registry(latest))
        pieces = b"".join(asyncio.run(rendered.pieces(content_type, encoder)))
        if accept:
            pieces += b"# EOF\n"
        # The same samples, and each family's samples together after one header.
        assert samples(pieces) == samples(whole)
        assert len(pieces) == len(whole)
        helps = [line for line in pieces.splitlines() if line.startswith(b"# HELP ")]
        assert len(helps) == len(set(helps))

    # A new snapshot of one server re-renders that one alone, in the background.
    view = {v.alias: v for v in latest.servers()}
    snapshot(latest, "two", pg15.dsn(), taken_at=time.time() + 60)
    assert asyncio.run(rendered.warm()) == 2  # both formats in use
    assert asyncio.run(rendered.warm()) == 0
    assert {v.alias for v in latest.servers() if v is view[v.alias]} == {"one", "three"}
    # A forgotten server leaves the next scrape.
    latest.forget("three")
    encoder, content_type = choose_encoder("")
    text = b"".join(asyncio.run(rendered.pieces(content_type, encoder))).decode()
    assert 'server="three"' not in text and 'server="one"' in text
