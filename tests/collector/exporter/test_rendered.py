"""Rendering per server and laying out per family gives what prometheus_client
would have said of the whole fleet at once, in both formats."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from array import array
from collections.abc import Callable, Iterator

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from pgfleet.cluster import Cluster
from pgfleet.collector.exporter.custom import CustomView, Value
from pgfleet.collector.exporter.fleet import families
from pgfleet.collector.exporter.latest import Latest, Row, ServerView
from pgfleet.collector.exporter.rendered import Rendered, split
from pgfleet.collector.exporter.views import VIEWS
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

    # A new snapshot of one server re-renders that one alone, at the next
    # scrape in each format, and nothing is rendered until one comes.
    renders = rendered.get_stats()["renders"]
    snapshot(latest, "two", pg15.dsn(), taken_at=time.time() + 60)
    assert rendered.get_stats()["renders"] == renders
    for accept in ("", OPENMETRICS):
        encoder, content_type = choose_encoder(accept)
        asyncio.run(rendered.pieces(content_type, encoder))
        asyncio.run(rendered.pieces(content_type, encoder))
    assert rendered.get_stats()["renders"] == renders + 2
    # A forgotten server leaves the next scrape.
    latest.forget("three")
    encoder, content_type = choose_encoder("")
    text = b"".join(asyncio.run(rendered.pieces(content_type, encoder))).decode()
    assert 'server="three"' not in text and 'server="one"' in text


# -- Lines kept per series: what prometheus_client says, byte for byte ----------


class Views:
    """Views made up here, as Latest gives them to Rendered."""

    def __init__(self) -> None:
        self.views: dict[str, tuple[int, ServerView]] = {}
        self.generation = 0

    def put(self, view: ServerView) -> None:
        self.generation += 1
        self.views[view.alias] = (self.generation, view)

    def generations(self) -> dict[str, int]:
        return {alias: self.views[alias][0] for alias in sorted(self.views)}

    def view(self, alias: str) -> tuple[int, ServerView] | None:
        return self.views.get(alias)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        return families([v for _, v in (self.views[a] for a in sorted(self.views))])


AWKWARD_VALUES = (0.0, -0.0, 1.0, 0.1, 1234567.0, 12345678.0, 1e21, 3e-7, math.inf, math.nan)


def made_up(alias: str, seed: int, *, entries: int = 4) -> ServerView:
    """A view with an entry or more in every view, awkward values and labels."""
    rnd = random.Random(seed)
    names = ("a", 'we"ird\\n', "é \\\\ x", "line\nbreak", "")
    rows = []
    for v in VIEWS:
        out = []
        for e in range(entries if v.labels else 1):
            # The same entries from one seed to the next, but their values and
            # (now and then) their info text.
            labels = tuple(names[(e + i) % len(names)] + str(e) for i in range(len(v.labels)))
            n = len(v.series)
            values = array("d", (rnd.choice(AWKWARD_VALUES) * rnd.choice((1, 7)) for _ in range(n)))
            info = f'SELECT "{e}" \\ ${seed // 4}' if v.info is not None and e % 3 else None
            out.append(Row(labels, values, None, None, info, 0.0))
        rows.append(out)
    return ServerView(alias, 0.0, 180000 + seed, bool(seed % 2), tuple(rows))


def whole(encoder: Callable[[Collector], bytes], views: Views) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(views)
    return encoder(registry)


def test_kept_lines_say_what_prometheus_client_says() -> None:
    views = Views()
    rendered = Rendered(views)
    for accept in ("", OPENMETRICS):
        encoder, content_type = choose_encoder(accept)
        eof = b"# EOF\n" if accept else b""
        for seed in range(12):
            # One server: the pieces are the whole render, byte for byte.  Its
            # entries come, go and come back; values and infos change.
            views.put(made_up('s"1\\', seed, entries=2 + seed % 3))
            pieces = b"".join(asyncio.run(rendered.pieces(content_type, encoder)))
            assert pieces + eof == whole(encoder, views)
    assert rendered.get_stats()["renders"] == 24
    # Each series' line was made once per format, or again when its info
    # text changed: far fewer than the series laid out.  Besides, the lines
    # of series NULL at the last render are made again when they show.
    series = sum(
        len(r) * (len(v.series) + 1)
        for v, r in zip(VIEWS, made_up("", 0, entries=4).rows, strict=True)
    )
    stats = rendered.get_stats()
    assert stats["series"] - stats["mended"] < 2 * 2 * series
    assert 0 < stats["mended"] < 24 * series / 5  # about a tenth of the values are NaN
    # Made from templates, not rendered by prometheus_client one by one.
    assert rendered.get_stats()["templated"] == rendered.get_stats()["series"]

    # Several servers: the same samples, each family together.
    for seed in range(3):
        views.put(made_up(f"s{seed}", seed + 100))
    for accept in ("", OPENMETRICS):
        encoder, content_type = choose_encoder(accept)
        pieces = b"".join(asyncio.run(rendered.pieces(content_type, encoder)))
        text = whole(encoder, views)
        assert samples(pieces + (b"# EOF\n" if accept else b"")) == samples(text)
        assert len(pieces) + (6 if accept else 0) == len(text)


def test_an_encoder_writing_otherwise_gets_whole_renders() -> None:
    def terse(registry: Collector) -> bytes:
        # Integers without their ".0": not floatToGoString's way.
        return generate_latest(registry).replace(b".0\n", b"\n")

    views = Views()
    rendered = Rendered(views)
    for seed in range(3):
        views.put(made_up("s", seed))
        pieces = b"".join(asyncio.run(rendered.pieces("terse", terse)))
        assert pieces == whole(terse, views)
    assert rendered.get_stats().get("series", 0) == 0


def test_an_encoder_escaping_otherwise_gets_new_series_rendered() -> None:
    def quirky(registry: Collector) -> bytes:
        # A backslash in a label value written otherwise than the templates assume.
        return generate_latest(registry).replace(b"\\\\", b"\\x5c")

    views = Views()
    rendered = Rendered(views)
    for seed in range(4):
        views.put(made_up("s", seed, entries=2 + seed % 3))
        pieces = b"".join(asyncio.run(rendered.pieces("quirky", quirky)))
        assert pieces == whole(quirky, views)
    assert rendered.get_stats()["series"] > 0
    assert rendered.get_stats().get("templated", 0) == 0


def test_nothing_rendered_until_a_scrape_and_unchanged_servers_not_again() -> None:
    views = Views()
    rendered = Rendered(views)
    encoder, content_type = choose_encoder("")
    for i in range(5):
        views.put(made_up(f"s{i}", i))
    asyncio.run(rendered.pieces(content_type, encoder))
    assert rendered.get_stats()["renders"] == 5
    views.put(made_up("s2", 50))
    views.put(made_up("s2", 51))  # two snapshots, one render
    asyncio.run(rendered.pieces(content_type, encoder))
    assert rendered.get_stats()["renders"] == 6
    del views.views["s3"]  # left the fleet
    text = b"".join(asyncio.run(rendered.pieces(content_type, encoder)))
    assert rendered.get_stats()["renders"] == 6
    assert b'server="s3"' not in text and b'server="s4"' in text


def test_rendered_ahead_of_the_scrape_once_per_scrape_at_most() -> None:
    views = Views()
    rendered = Rendered(views)
    encoder, content_type = choose_encoder(OPENMETRICS)

    async def until(what: str, count: int) -> None:
        for _ in range(500):
            if rendered.get_stats().get(what, 0) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{what}: {rendered.get_stats()}")

    async def scrape() -> bytes:
        text = b"".join(await rendered.pieces(content_type, encoder)) + b"# EOF\n"
        expected = whole(encoder, views)
        assert samples(text) == samples(expected) and len(text) == len(expected)
        return text

    async def run() -> None:
        ahead = asyncio.create_task(rendered.ahead(period=0.005, rest=0.0))
        try:
            for i in range(3):
                views.put(made_up(f"s{i}", i))
            await asyncio.sleep(0.05)
            # No format scraped yet: nothing is rendered for nobody.
            assert rendered.get_stats() == {}
            await scrape()
            assert rendered.get_stats()["renders"] == 3
            # A server's new snapshot is rendered before the scrape asks...
            views.put(made_up("s0", 10))
            await until("ahead", 1)
            await scrape()  # ... and the scrape renders nothing.
            assert rendered.get_stats()["renders"] == 4
            # One changing twice between scrapes is rendered once ahead, then
            # left to the scrape while it changes faster than it is scraped.
            views.put(made_up("s1", 11))
            await until("ahead", 2)
            views.put(made_up("s1", 12))
            await asyncio.sleep(0.05)
            assert rendered.get_stats()["ahead"] == 2
            await scrape()
            assert rendered.get_stats()["renders"] == 6
            views.put(made_up("s1", 13))
            views.put(made_up("s2", 14))
            await until("ahead", 3)  # s2
            await asyncio.sleep(0.05)
            assert rendered.get_stats()["ahead"] == 3
            await scrape()  # s1
            assert rendered.get_stats()["renders"] == 8
            # Back to once between scrapes: rendered ahead again.
            await scrape()
            views.put(made_up("s1", 15))
            await until("ahead", 4)
        finally:
            ahead.cancel()

    asyncio.run(run())


def with_users(view: ServerView, seed: int) -> ServerView:
    """``view`` with two users' sources, one of them with awkward label values."""
    queue = CustomView(
        "my_queue",
        ("queue",),
        (2,),
        (
            Value("pgfleet_custom_my_queue_processed", True, "Jobs.", 4, "num"),
            Value("pgfleet_custom_my_queue_depth", False, "Waiting\nnow.", 3, "num"),
        ),
        1,
        5,
    )
    disk = CustomView(
        "disk", (), (), (Value("pgfleet_custom_disk_free_bytes", False, "Free.", 2, "num"),), 0, 3
    )
    rnd = random.Random(seed)
    rows = [
        Row((name,), array("d", (rnd.choice(AWKWARD_VALUES), float(seed))), None, None, None, 0.0)
        for name in ("mail", 'we"ird\\n', "line\nbreak")[: 1 + seed % 3]
    ]
    disk_rows = [Row((), array("d", (float(seed),)), None, None, None, 0.0)]
    return dataclasses.replace(view, custom=((queue, rows), (disk, disk_rows)))


def test_users_sources_rendered_as_prometheus_client_would() -> None:
    views = Views()
    rendered = Rendered(views)
    for accept in ("", OPENMETRICS):
        encoder, content_type = choose_encoder(accept)
        eof = b"# EOF\n" if accept else b""
        for seed in range(6):
            views.put(with_users(made_up("s1", seed), seed))
            pieces = b"".join(asyncio.run(rendered.pieces(content_type, encoder)))
            assert pieces + eof == whole(encoder, views)
        # Several servers, one without users' sources: each family together.
        views.put(with_users(made_up("s2", 7), 7))
        views.put(made_up("s3", 8))
        pieces = b"".join(asyncio.run(rendered.pieces(content_type, encoder)))
        text = whole(encoder, views)
        assert samples(pieces + eof) == samples(text)
        assert len(pieces) + len(eof) == len(text)
        del views.views["s2"], views.views["s3"]
