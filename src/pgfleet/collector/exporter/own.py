"""The collector's own registry (health, backups), rendered family by family from kept lines.

prometheus_client's OpenMetrics encoder escapes every sample's name one
character at a time, in Python: the collector's few hundred samples (its
histograms above all) cost some 10 ms a scrape, more than the whole fleet
of a server once rendered (measured: a tenth of the daemon's CPU).  Yet from
one scrape to the next the families hold the same samples, only their
values change.

So each family is built afresh by its collector, as ever (a server that left
is gone from the next scrape), but a family whose samples are the ones of
the last scrape -- same names, same labels in the same order, same help,
type and unit -- is not given to prometheus_client again: its text is what
prometheus_client wrote for it, each sample line up to its value, then the
value formatted by prometheus_client's own ``floatToGoString``.  A family
seen for the first time (or changed) is rendered by prometheus_client alone,
each sample's value set to its index, which tells each line's sample, in
whatever order and among whatever comment lines the format puts them.

As in :mod:`.rendered`, nothing of the format is written here: a format
whose lines are not their prefix then their value (:func:`.rendered.exact`),
and a family whose samples carry a timestamp, an exemplar or a native
histogram, are rendered whole by prometheus_client each time.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pgfleet.collector.exporter.rendered import UNUSED, Encoder, exact, value_line

# What makes two scrapes' families the same, but their values:
# (name, help, type, unit, per sample its name and labels).
_Key = tuple[str, str, str, str, tuple[tuple[str, tuple[tuple[str, str], ...]], ...]]
# A family's text: per sample line, the text before its value (comment lines
# included) and the sample's index; then the text after the last value.
_Template = tuple[tuple[tuple[bytes, int], ...], bytes]


# Samples rendered between two returns to the event loop (~5 ms of work).
STEP = 2000


class _Just:
    """A collector of one family."""

    def __init__(self, metric: Metric | None) -> None:
        self.metric = metric

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self.metric is not None:
            yield self.metric


@dataclass
class _Format:
    encoder: Encoder
    used: float
    exact: bool
    # What the encoder writes after the last family (OpenMetrics' "# EOF").
    trailer: bytes
    # The families of the last scrape: a family not in the next one is dropped.
    templates: dict[_Key, _Template | None] = field(default_factory=dict)


class Own:
    """A registry's text in each format scraped, its families' lines kept between scrapes."""

    def __init__(self, registry: Collector) -> None:
        self.registry = registry
        self._formats: dict[str, _Format] = {}

    def render(self, content_type: str, encoder: Encoder) -> bytes:
        """The registry's text in ``content_type``, as ``encoder`` writes it."""
        out: list[bytes] = []
        for _ in self._families(content_type, encoder, out):
            pass
        return b"".join(out)

    async def render_async(self, content_type: str, encoder: Encoder, *, step: int = STEP) -> bytes:
        """:meth:`render`, letting the event loop run every `step` samples.

        A collector of 1,000 servers has some 40,000 samples of its own (a
        histogram per server and stage): rendered at once they held the loop
        for most of a second at every scrape, and snapshots started seconds
        late (bench/fleet.py: lag p99 3.4 s scraped, 5 ms not).  The families
        are built one by one as they are rendered, from copies of the state
        (see health.py), so the workers may run between two of them."""
        out: list[bytes] = []
        done = 0
        for n in self._families(content_type, encoder, out):
            done += n
            if done >= step:
                done = 0
                await asyncio.sleep(0)
        return b"".join(out)

    def _families(self, content_type: str, encoder: Encoder, out: list[bytes]) -> Iterator[int]:
        """Append the registry's text to `out`, yielding each family's number
        of samples as it comes from its collector."""
        now = time.monotonic()
        for ct in [ct for ct, f in self._formats.items() if now - f.used > UNUSED]:
            del self._formats[ct]
        fmt = self._formats.get(content_type)
        if fmt is None:
            fmt = _Format(encoder, now, exact(encoder), encoder(_Just(None)))
            self._formats[content_type] = fmt
        fmt.used = now
        if not fmt.exact:
            out.append(encoder(self.registry))
            return
        templates: dict[_Key, _Template | None] = {}
        # Many values repeat (bucket counts, zeros): each is formatted once.
        # Keyed so that 0.0 and -0.0, equal as floats, are told apart.
        memo: dict[float | str, bytes] = {}
        for metric in self.registry.collect():
            samples = metric.samples
            yield len(samples)
            if any(s.timestamp is not None or s.exemplar or s.native_histogram for s in samples):
                out.append(_whole(fmt, metric))
                continue
            key: _Key = (
                metric.name,
                metric.documentation,
                metric.type,
                metric.unit,
                tuple([(s.name, tuple(s.labels.items())) for s in samples]),
            )
            if key in templates:  # the same family twice: leave it to prometheus_client
                out.append(_whole(fmt, metric))
                continue
            template = fmt.templates[key] if key in fmt.templates else _template(fmt, metric)
            templates[key] = template
            if template is None:
                out.append(_whole(fmt, metric))
                continue
            lines, tail = template
            # Hot loop: one line per sample of the collector's own families.
            for text, i in lines:
                v = samples[i].value
                vkey = v if v else repr(v)
                line = memo.get(vkey)
                if line is None:
                    line = memo[vkey] = value_line(v)
                out.append(text + line)
            out.append(tail)
        fmt.templates = templates
        out.append(fmt.trailer)


def _whole(fmt: _Format, metric: Metric) -> bytes:
    """``metric`` rendered alone by prometheus_client, without the format's trailer."""
    text = fmt.encoder(_Just(metric))
    return text[: len(text) - len(fmt.trailer)] if text.endswith(fmt.trailer) else text


def _template(fmt: _Format, metric: Metric) -> _Template | None:
    """What prometheus_client writes of ``metric`` but its values; None if not so cut."""
    probe = copy.copy(metric)
    probe.samples = [s._replace(value=float(i)) for i, s in enumerate(metric.samples)]
    text = _whole(fmt, probe)
    which = {floatToGoString(float(i)).encode(): i for i in range(len(probe.samples))}  # type: ignore[no-untyped-call]
    lines: list[tuple[bytes, int]] = []
    pending: list[bytes] = []  # comment lines before the next sample
    seen: set[int] = set()
    # A line never holds a newline (label values and help escape theirs).
    for line in text.splitlines(keepends=True):
        if line.startswith(b"#"):
            pending.append(line)
            continue
        if not line.endswith(b"\n"):
            return None
        prefix, space, value = line[:-1].rpartition(b" ")
        i = which.get(value)
        if not space or i is None or i in seen:
            return None
        seen.add(i)
        lines.append((b"".join(pending) + prefix + space, i))
        pending = []
    if len(seen) != len(which):
        return None
    return tuple(lines), b"".join(pending)
