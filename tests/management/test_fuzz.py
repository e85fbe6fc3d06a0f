"""Hostile frames at a running daemon's management socket: answered, never fatal.

More than 20,000 generated frames, each on a connection of its own (a bad
frame closes its connection), a few connections at a time: random bytes,
valid requests mutated (bytes flipped, inserted, cut; the length field lying
either way; unknown compression or encryption types; wrong keys), and
documents built to hurt a parser (bad JSON, nesting thousands deep, numbers
of thousands of digits, invalid UTF-8, lone surrogates, decompression bombs).
Some connections send a valid ping first, so that a bad frame also arrives
mid-session.

Every connection must end with the daemon closing it, everything it sent
being whole frames with an ``Outcome``; afterwards the daemon is alive, its
log has no traceback, its memory (VmRSS) grew by a bounded amount, and a
plain ``ping`` answers in under 100 ms.  The generator is seeded
(``PGFLEET_FUZZ_SEED``): a failure replays.
"""

from __future__ import annotations

import asyncio
import bz2
import gzip
import json
import os
import random
import struct
import time
from pathlib import Path
from typing import Any

import lz4.frame
import zstandard

from pgfleet.management import frame
from pgfleet.management.document import request
from tests.fix_daemon import DaemonFactory
from tests.management.helpers import Mgmt, start_daemon

SEED = int(os.environ.get("PGFLEET_FUZZ_SEED", "20261207"))
FRAMES = 20_000
PARALLEL = 8
# What the daemon's resident memory may grow by over the whole run (bytes).
RSS_GROWTH = 40 * 2**20

COMMANDS = [
    "ping", "status", "reload", "shutdown", "conf ls", "conf get", "conf set", "snapshot",
    "server ls", "server add", "server rm", "clear prometheus",
]  # fmt: skip
NASTY: list[Any] = [
    "", " ", "\x00", "\ud800", "\u202e", "é" * 50, "a" * 5000, "../../etc/passwd", -1, 0,
    2**63, -(2**63) - 1, 1e308, True, None, [], {}, [[[]]], {"": {}}, "9" * 100,
]  # fmt: skip


def _raw(compression: int, encryption: int, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return frame.HEADER.pack(compression, encryption, n & 0xFFFFFFFF) + body


def _bombs() -> list[bytes]:
    """Small on the wire, far over the 1 MiB limit once inflated (one of each codec)."""
    doc = b'{"Header":{"Command":"ping"},"Request":{"x":"' + b"0" * (8 * 2**20) + b'"}}'
    return [
        _raw(frame.Compression.GZIP, 0, gzip.compress(doc, 9)),
        _raw(frame.Compression.ZSTD, 0, zstandard.ZstdCompressor(level=19).compress(doc)),
        _raw(frame.Compression.LZ4, 0, bytes(lz4.frame.compress(doc))),
        _raw(frame.Compression.BZIP2, 0, bz2.compress(doc, 9)),
    ]


class Generator:
    def __init__(self, seed: int, key: bytes) -> None:
        self.rng = random.Random(seed)
        self.key = key
        self.wrong_key = bytes(32)
        self.bombs = _bombs()

    def value(self, depth: int = 0) -> Any:
        r = self.rng.random()
        if depth < 3 and r < 0.2:
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 3))]
        if depth < 3 and r < 0.35:
            return {str(self.value(3))[:20]: self.value(depth + 1) for _ in range(3)}
        return self.rng.choice([*NASTY, self.rng.randint(-(2**70), 2**70), self.rng.random()])

    def valid(self) -> bytes:
        rng = self.rng
        args = {
            rng.choice(["Server", "ConfigKey", "ConfigValue", "Details", "Settings", "Purge",
                        "X"]): self.value()
            for _ in range(rng.randint(0, 2))
        }  # fmt: skip
        # Commands that would change the daemon are sent with arguments they refuse.
        command = rng.choice(COMMANDS)
        if command in ("shutdown", "reload", "clear prometheus", "conf set", "server add",
                       "server rm", "snapshot"):  # fmt: skip
            args["Bogus"] = 1
        doc = request(command, args)
        c = rng.choice(list(frame.Compression))
        e = rng.choice(list(frame.Encryption))
        try:
            return frame.encode(doc, c, e, self.key)
        except Exception:
            return frame.encode(request("ping"), c, e, self.key)

    def document_text(self) -> bytes:
        rng = self.rng
        n = rng.randint(1, 20_000)
        return rng.choice(
            [
                b"[" * n + b"]" * rng.randint(0, n),
                b'{"Header":' * n + b"{}" + b"}" * n,
                b'{"Header":{"Command":"ping","Timestamp":' + b"9" * n + b"}}",
                b'{"Header":{"Command":"ping"},"Request":{"x":1e' + b"9" * 20 + b"}}",
                b'{"Header":{"Command":"ping"},"Request":{"x":-' + b"1" * 5000 + b"}}",
                b'{"Header":{"Command":"\xff\xfe"}}',
                b'{"Header":{"Command":"ping\\ud800"}}',
                b'{"Header":{"Command":"ping"}',
                b'{"Header":{"Command":"ping"}}garbage',
                b'{"Header":{"Command":"ping","Compression":true,"Output":2}}',
                b'{"Header":{"Command":' + json.dumps(self.value()).encode() + b"}}",
                b'{"Header":[],"Request":' + json.dumps(self.value()).encode() + b"}",
                b"NaN",
                b"\xef\xbb\xbf{}",
                b"\x00" * rng.randint(1, 64),
                json.dumps(self.value()).encode(),
                bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))),
            ]
        )

    def mutated(self) -> bytes:
        rng = self.rng
        data = bytearray(self.valid())
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(data) + 1)
            if op < 0.3 and data:
                data[min(i, len(data) - 1)] ^= 1 << rng.randrange(8)
            elif op < 0.45:
                data[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
            elif op < 0.6:
                del data[i : i + rng.randint(1, 8)]
            elif op < 0.75 and len(data) >= 6:
                # The length lying, both ways.
                (n,) = struct.unpack("!I", data[2:6])
                n = max(0, n + rng.choice([-1, 1]) * rng.randint(1, 64))
                data[2:6] = struct.pack("!I", n)
            elif op < 0.85 and len(data) >= 2:
                data[rng.randrange(2)] = rng.getrandbits(8)
            else:
                data = data[: rng.randrange(len(data) + 1)]
        return bytes(data)

    def frame(self) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.35:
            return self.mutated()
        if r < 0.6:
            body = self.document_text()
            return _raw(0, 0, body)
        if r < 0.7:
            c = rng.choice(list(frame.Compression)[1:])
            return _raw(c, 0, bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200))))
        if r < 0.78:
            # Encrypted with a key the daemon does not have, or garbage sealed.
            good = frame.encode(request("ping"), rng.choice(list(frame.Compression)), 1,
                                self.wrong_key)  # fmt: skip
            return good if rng.random() < 0.5 else _raw(0, 1, good[6:][: rng.randint(0, 40)])
        if r < 0.86:
            # Lengths far over the limit, or a short body behind a long length.
            n = rng.choice([2**20 + 1, 2**31, 2**32 - 1, rng.randint(2**20, 2**32 - 1)])
            return _raw(0, 0, b"{}", n)
        if r < 0.88:
            return rng.choice(self.bombs)
        if r < 0.94:
            return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        return _raw(rng.getrandbits(8), rng.getrandbits(8), self.document_text())


def _frames(data: bytes, key: bytes | None) -> list[dict[str, Any]]:
    """Every frame in what the daemon sent: whole frames, each a document."""
    out = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 6, f"a partial frame header: {data[pos:]!r}"
        c, e, n = frame.HEADER.unpack(data[pos : pos + 6])
        body = data[pos + 6 : pos + 6 + n]
        assert len(body) == n, "a partial frame"
        out.append(frame.decode(c, e, body, key=key, max_size=2**24))
        pos += 6 + n
    return out


async def _one(m: Mgmt, data: bytes, ping_first: bool) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(m.socket))
    try:
        if ping_first:
            writer.write(frame.encode(request("ping")))
        writer.write(data)
        writer.write_eof()
        async with asyncio.timeout(15):
            answer = await reader.read()  # to the end: the daemon must close
    finally:
        writer.close()
    docs = _frames(answer, m.key)
    for doc in docs:
        assert isinstance(doc.get("Outcome", {}).get("Status"), bool), doc
    if ping_first:
        assert docs and docs[0]["Outcome"]["Status"] is True, (data[:80], docs)
    return docs


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _fuzz(m: Mgmt, gen: Generator, count: int) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait((i, gen.frame()))

    async def worker() -> None:
        while not queue.empty():
            i, data = queue.get_nowait()
            try:
                docs = await _one(m, data, ping_first=i % 5 == 0)
            except Exception as e:
                raise AssertionError(f"frame {i} (seed {SEED}): {data[:120]!r}: {e!r}") from e
            last = docs[-1]["Outcome"] if docs else {"Status": "none"}
            key = str(last.get("Error", last["Status"]))
            outcomes[key] = outcomes.get(key, 0) + 1

    await asyncio.gather(*(worker() for _ in range(PARALLEL)))
    return outcomes


def test_hostile_frames_never_hurt_the_daemon(
    repo: str, daemon: DaemonFactory, tmp_path: Path, sockdir: Path
) -> None:
    m = start_daemon(daemon, repo, tmp_path, sockdir, max_connections=64)
    gen = Generator(SEED, m.key)
    began = time.monotonic()
    asyncio.run(_fuzz(m, gen, 1000))  # warm-up: imports, codecs, buffers
    before = rss(m.d.pid)
    outcomes = asyncio.run(_fuzz(m, gen, FRAMES))
    after = rss(m.d.pid)
    seconds = time.monotonic() - began
    print(f"fuzz: {FRAMES + 1000} frames in {seconds:.1f} s, outcomes {outcomes}, "
          f"rss {before >> 20} -> {after >> 20} MB")  # fmt: skip

    assert m.d.alive()
    assert after - before < RSS_GROWTH, (before, after)
    # Every kind of refusal was met, and some frames were fine.
    for code in ("1", "2", "3", "4", "5", "6", "7", "8"):
        assert outcomes.get(code, 0) > 0, (code, outcomes)
    assert sum(outcomes.values()) == FRAMES

    async def ping() -> float:
        t = time.perf_counter()
        reader, writer = await asyncio.open_unix_connection(str(m.socket))
        writer.write(frame.encode(request("ping")))
        c, e, n = frame.HEADER.unpack(await reader.readexactly(6))
        doc = frame.decode(c, e, await reader.readexactly(n), key=None, max_size=2**20)
        elapsed = time.perf_counter() - t
        writer.close()
        assert doc["Outcome"]["Status"] is True
        return elapsed

    assert asyncio.run(ping()) < 0.1
    metrics = m.metrics()
    assert 'pgfleet_management_errors_total{code="internal"}' not in metrics
    assert metrics['pgfleet_management_errors_total{code="bad_json"}'] > 0
    text = m.d.text()
    assert "Traceback" not in text, text[text.index("Traceback") - 500 :][:3000]
    assert m.d.stop() == 0
