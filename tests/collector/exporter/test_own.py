"""The collector's own registry, its families' lines kept between scrapes, says
what prometheus_client says of it, byte for byte, in both formats."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Iterator

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from pgfleet.collector.exporter.own import Own

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
VALUES = (0.0, -0.0, 1.0, 0.1, 7, 1234567.0, 12345678.0, 1e21, 3e-7, math.inf, math.nan)
NAMES = ("a", 'we"ird\\n', "é \\\\ x", "line\nbreak", "")


class Changing:
    """Families of every shape the collector's own use, and a few more; their values
    change at every collect, their samples now and then."""

    def __init__(self) -> None:
        self.round = 0

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        r = self.round
        rnd = random.Random(r)  # the same values for the same round
        self.round += 1
        servers = NAMES[: 2 + r % 4]  # come and go
        up = GaugeMetricFamily("up", "Up.\nOr not.", labels=["server"])
        for s in servers:
            up.add_metric([s], rnd.choice(VALUES))
        yield up
        yield GaugeMetricFamily("empty", "No samples.", labels=["server"])
        yield GaugeMetricFamily("spool_bytes", "Size.", value=rnd.random(), unit="bytes")
        errors = CounterMetricFamily("errors", "Errors.", labels=["server", "kind"])
        for s in servers:
            errors.add_metric([s, 'k"'], rnd.randrange(3))
        yield errors
        # _created samples: text 0.0.4 moves them to a family of their own.
        made = CounterMetricFamily("made", "Made.", labels=["server"])
        for s in servers:
            made.add_metric([s], rnd.randrange(3), created=1e9 + rnd.randrange(2))
        yield made
        hist = HistogramMetricFamily("duration_seconds", "Time.", labels=["server"])
        for s in servers:
            buckets = [("0.1", rnd.randrange(3)), ("1.0", 3), ("+Inf", 4 + rnd.randrange(2))]
            hist.add_metric([s], buckets, rnd.random())
        yield hist
        gh = GaugeHistogramMetricFamily("queue", "Queue.", labels=["q"])
        gh.add_metric(["x"], [("1.0", rnd.randrange(3)), ("+Inf", 3)], rnd.random())
        yield gh
        info = InfoMetricFamily("build", "Build.")
        info.add_metric([], {"version": f"1.{r % 2}", "collector": 'c"\\'})
        yield info
        # A timestamp: rendered whole by prometheus_client each time.
        stamped = GaugeMetricFamily("stamped", "Stamped.", labels=["server"])
        stamped.add_metric(["a"], rnd.random(), timestamp=1e9 + r)
        yield stamped


def test_kept_lines_say_what_prometheus_client_says() -> None:
    changing = Changing()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(changing)
    own = Own(registry)
    for accept in ("", OPENMETRICS):
        encoder, content_type = choose_encoder(accept)
        for _ in range(12):
            got = own.render(content_type, encoder)
            changing.round -= 1  # the same collect again
            assert got == encoder(registry)


def test_an_encoder_writing_otherwise_gets_whole_renders() -> None:
    def terse(registry: Collector) -> bytes:
        # Integers without their ".0": not floatToGoString's way.
        return generate_latest(registry).replace(b".0\n", b"\n")

    changing = Changing()
    own = Own(changing)
    for _ in range(3):
        got = own.render("terse", terse)
        changing.round -= 1
        assert got == terse(changing)


def test_only_changed_families_go_to_prometheus_client() -> None:
    encoder, content_type = choose_encoder(OPENMETRICS)
    given: list[bytes] = []

    def counting(registry: Collector) -> bytes:
        text = encoder(registry)
        given.append(text)
        return text

    changing = Changing()
    own = Own(changing)
    own.render(content_type, counting)
    given.clear()
    changing.round = 4  # other values, the same samples
    own.render(content_type, counting)
    assert [text.split(b" ")[2] for text in given] == [b"stamped"]
    given.clear()
    own.render(content_type, counting)  # another server shows, another version
    changed = {b"up", b"errors", b"made", b"duration_seconds", b"build", b"stamped"}
    assert {text.split(b" ")[2] for text in given} == changed


def test_rendered_with_breaks_for_the_event_loop() -> None:
    """render_async() says the same, and lets other tasks run between
    families (a fleet's own families held the loop for most of a second)."""

    async def scrape(own: Own, changing: Changing, step: int) -> tuple[bytes, bytes, int]:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        start = ticks
        got = await own.render_async(OPENMETRICS, encoder, step=step)
        during = ticks - start
        done = True
        await task
        changing.round -= 1
        return got, encoder(changing), during

    encoder, _ = choose_encoder(OPENMETRICS)
    changing = Changing()
    own = Own(changing)
    for _ in range(3):
        got, expected, during = asyncio.run(scrape(own, changing, step=1))
        assert got == expected
        assert during >= 5  # a break per family with samples, at step 1
    got, expected, during = asyncio.run(scrape(own, changing, step=10**6))
    assert got == expected and during == 0
