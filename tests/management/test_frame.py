"""Management frames: every codec both ways, bounded decoding, hostile input."""

from __future__ import annotations

import asyncio
import base64
import bz2
import json
import os
import random
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import lz4.frame
import pytest
import zstandard

from pgfleet.management import frame
from pgfleet.management.document import ErrorCode, ManagementError
from pgfleet.management.frame import HEADER, Compression, Encryption, Frame

KEY = bytes(range(32))
MB = 1 << 20
DOC: dict[str, Any] = {
    "Header": {"Command": "status", "Compression": 0, "Encryption": 0},
    "Request": {"details": True, "names": ["db1", "db2"] * 50, "é": "ünïcödé ✓", "n": -3.5},
}
COMBOS = [(c, e) for c in Compression for e in Encryption]


def split(data: bytes) -> tuple[int, int, bytes]:
    c, e, length = HEADER.unpack(data[: HEADER.size])
    payload = data[HEADER.size :]
    assert length == len(payload)
    return c, e, payload


def code_of(fn: Callable[[], Any]) -> ErrorCode:
    with pytest.raises(ManagementError) as info:
        fn()
    assert "\n" not in info.value.message
    return info.value.code


def stream(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


# -- round trips ----------------------------------------------------------------


@pytest.mark.parametrize(("compression", "encryption"), COMBOS)
def test_encode_decode_round_trip(compression: Compression, encryption: Encryption) -> None:
    data = frame.encode(DOC, compression, encryption, KEY)
    c, e, payload = split(data)
    assert (c, e) == (compression, encryption)
    if compression == Compression.NONE and encryption == Encryption.NONE:
        # Compact UTF-8 JSON, nothing else.
        assert payload == json.dumps(DOC, ensure_ascii=False, separators=(",", ":")).encode()
    if encryption == Encryption.AES_256_GCM:
        assert b"status" not in payload
    assert frame.decode(c, e, payload, key=KEY, max_size=MB) == DOC


def test_every_combination_over_a_real_socket() -> None:
    """The client picks the types; the server answers in kind."""

    async def main() -> list[Frame]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while (got := await frame.read_frame(reader, max_size=MB, key=KEY)) is not None:
                await frame.write_frame(
                    writer, {"echo": got.document}, got.compression, got.encryption, KEY
                )
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        answers = []
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for c, e in COMBOS:
            await frame.write_frame(writer, DOC, c, e, KEY)
            got = await frame.read_frame(reader, max_size=MB, key=KEY)
            assert got is not None
            answers.append(got)
        writer.close()
        server.close()
        await server.wait_closed()
        return answers

    answers = asyncio.run(main())
    assert [(a.compression, a.encryption) for a in answers] == COMBOS
    assert all(a.document == {"echo": DOC} for a in answers)


def test_encode_handles_what_results_hold() -> None:
    doc = {"when": datetime(2026, 1, 2, 3, 4, 5), "path": Path("/x"), "s": {2, 1}, "lone": "\ud800"}
    c, e, payload = split(frame.encode(doc))
    back = frame.decode(c, e, payload, key=None, max_size=MB)
    assert back == {"when": "2026-01-02T03:04:05", "path": "/x", "s": [1, 2], "lone": "\ud800"}
    assert code_of(lambda: frame.encode({"x": float("nan")})) == ErrorCode.BAD_DOCUMENT
    assert code_of(lambda: frame.encode({"x": object()})) == ErrorCode.BAD_DOCUMENT


# -- encryption ---------------------------------------------------------------------


def test_wrong_key_and_tampering_are_refused() -> None:
    c, e, payload = split(frame.encode(DOC, Compression.GZIP, Encryption.AES_256_GCM, KEY))
    other = bytes(32)
    assert code_of(lambda: frame.decode(c, e, payload, key=other, max_size=MB)) == (
        ErrorCode.BAD_ENCRYPTION
    )
    for i in (0, 12, len(payload) // 2, len(payload) - 1):  # nonce, body, tag
        bad = bytearray(payload)
        bad[i] ^= 0x01
        with pytest.raises(ManagementError) as info:
            frame.decode(c, e, bytes(bad), key=KEY, max_size=MB)
        assert info.value.code == ErrorCode.BAD_ENCRYPTION
    assert code_of(lambda: frame.decode(c, e, payload[:20], key=KEY, max_size=MB)) == (
        ErrorCode.BAD_ENCRYPTION
    )


def test_type_bytes_are_authenticated() -> None:
    """Changing the compression byte in transit is tampering, not a codec error."""
    _, e, payload = split(frame.encode(DOC, Compression.GZIP, Encryption.AES_256_GCM, KEY))
    for other in (Compression.NONE, Compression.ZSTD, Compression.LZ4, Compression.BZIP2):
        with pytest.raises(ManagementError) as info:
            frame.decode(other, e, payload, key=KEY, max_size=MB)
        assert info.value.code == ErrorCode.BAD_ENCRYPTION
        assert "authenticate" in info.value.message


def test_encryption_types_and_keys() -> None:
    c, _, payload = split(frame.encode(DOC))
    # pgmoneta's AES-192/128-GCM are named, not "unknown".
    with pytest.raises(ManagementError) as info:
        frame.decode(c, 2, payload, key=KEY, max_size=MB)
    assert info.value.code == ErrorCode.BAD_ENCRYPTION and "AES-192-GCM" in info.value.message
    assert code_of(lambda: frame.decode(c, 3, payload, key=KEY, max_size=MB)) == (
        ErrorCode.BAD_ENCRYPTION
    )
    assert code_of(lambda: frame.decode(c, 200, payload, key=KEY, max_size=MB)) == (
        ErrorCode.BAD_ENCRYPTION
    )
    with pytest.raises(ManagementError) as info:
        frame.decode(c, 1, payload, key=None, max_size=MB)
    assert "no encryption key" in info.value.message
    assert code_of(lambda: frame.encode(DOC, 0, 1, None)) == ErrorCode.BAD_ENCRYPTION
    assert code_of(lambda: frame.encode(DOC, 0, 1, b"short")) == ErrorCode.BAD_ENCRYPTION


def test_unknown_compression() -> None:
    _, e, payload = split(frame.encode(DOC))
    assert code_of(lambda: frame.decode(5, e, payload, key=None, max_size=MB)) == (
        ErrorCode.BAD_COMPRESSION
    )
    assert code_of(lambda: frame.encode(DOC, 255)) == ErrorCode.BAD_COMPRESSION


@pytest.mark.parametrize("compression", [c for c in Compression if c != Compression.NONE])
def test_corrupt_and_truncated_compressed_data(compression: Compression) -> None:
    c, e, payload = split(frame.encode(DOC, compression))
    for bad in (payload[: len(payload) // 2], payload[:-1], b"", b"not compressed at all"):
        with pytest.raises(ManagementError) as info:
            frame.decode(c, e, bad, key=None, max_size=MB)
        assert info.value.code == ErrorCode.BAD_COMPRESSION
    flipped = bytearray(payload)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(ManagementError) as info:
        frame.decode(c, e, bytes(flipped), key=None, max_size=MB)
    # Corruption surfaces as the codec's error, or as what it then decodes to.
    assert info.value.code in (ErrorCode.BAD_COMPRESSION, ErrorCode.BAD_JSON)


# -- decompression bombs ---------------------------------------------------------------


def _bomb(compression: Compression, megabytes: int = 100) -> bytes:
    zeros = bytes(MB)
    if compression == Compression.GZIP:
        gz = zlib.compressobj(9, zlib.DEFLATED, 31)
        return b"".join(gz.compress(zeros) for _ in range(megabytes)) + gz.flush()
    if compression == Compression.BZIP2:
        bz = bz2.BZ2Compressor(9)
        return b"".join(bz.compress(zeros) for _ in range(megabytes)) + bz.flush()
    if compression == Compression.ZSTD:
        zs = zstandard.ZstdCompressor(level=3).compressobj()
        return b"".join(zs.compress(zeros) for _ in range(megabytes)) + zs.flush()
    lz = lz4.frame.LZ4FrameCompressor()
    head = bytes(lz.begin())
    body = b"".join(lz.compress(zeros) for _ in range(megabytes))
    return head + body + bytes(lz.flush())


@pytest.mark.parametrize("compression", [c for c in Compression if c != Compression.NONE])
def test_decompression_bomb_stops_at_the_limit(compression: Compression) -> None:
    bomb = _bomb(compression)
    assert len(bomb) < MB  # it passes the frame size check: only decompression can stop it
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ManagementError) as info:
            frame.decode(compression, 0, bomb, key=None, max_size=MB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert time.monotonic() - started < 2.0
    assert peak < 8 * MB, f"{peak} bytes allocated for a {MB}-byte limit"


def test_zstd_frame_declaring_a_huge_content_is_refused_from_its_header() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(50 * MB))  # content size in the header
    assert zstandard.get_frame_parameters(bomb).content_size == 50 * MB
    assert code_of(lambda: frame.decode(2, 0, bomb, key=None, max_size=MB)) == (
        ErrorCode.FRAME_TOO_LARGE
    )


@pytest.mark.parametrize("compression", list(Compression))
def test_limit_is_exact(compression: Compression) -> None:
    def sized(n: int) -> bytes:
        text = json.dumps({"x": "a" * (n - 8)}, separators=(",", ":")).encode()
        assert len(text) == n
        return frame.encode(json.loads(text), compression)

    c, e, payload = split(sized(4096))
    assert frame.decode(c, e, payload, key=None, max_size=4096)["x"] == "a" * 4088
    c, e, payload = split(sized(4097))
    assert code_of(lambda: frame.decode(c, e, payload, key=None, max_size=4096)) == (
        ErrorCode.FRAME_TOO_LARGE
    )


def test_multi_member_streams_are_read_whole() -> None:
    part = b'{"a":'
    rest = b'"b"}'
    for kind, pack in (
        (Compression.GZIP, lambda b: zlib.compress(b, wbits=31)),
        (Compression.BZIP2, bz2.compress),
        (Compression.LZ4, lz4.frame.compress),
        (Compression.ZSTD, zstandard.ZstdCompressor().compress),
    ):
        assert frame.decode(kind, 0, pack(part) + pack(rest), key=None, max_size=MB) == {"a": "b"}


# -- JSON ---------------------------------------------------------------------------


def _decode_plain(payload: bytes) -> dict[str, Any]:
    return frame.decode(0, 0, payload, key=None, max_size=10 * MB)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", ErrorCode.BAD_JSON),
        (b"\xff\xfe{}", ErrorCode.BAD_JSON),
        (b'{"a": "\xed\xa0\x80"}', ErrorCode.BAD_JSON),  # an encoded surrogate: not UTF-8
        (b'{"a": 1', ErrorCode.BAD_JSON),
        (b'{"a": NaN}', ErrorCode.BAD_JSON),
        (b'{"a": -Infinity}', ErrorCode.BAD_JSON),
        (b'{"a": 1e999999}', ErrorCode.BAD_JSON),
        (b'{"a": 9223372036854775808}', ErrorCode.BAD_JSON),
        (b'{"a": -9223372036854775809}', ErrorCode.BAD_JSON),
        (b'{"a": ' + b"9" * 5000 + b"}", ErrorCode.BAD_JSON),
        (b'{"a": ' + b"9" * 500_000 + b"}", ErrorCode.BAD_JSON),
        (b'{"a": 0.' + b"1" * 500_000 + b"}", ErrorCode.BAD_JSON),
        (b"[" * 100_000 + b"]" * 100_000, ErrorCode.BAD_JSON),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, ErrorCode.BAD_JSON),
        (b"[" * 33 + b"]" * 33, ErrorCode.BAD_JSON),
        (b"[1, 2]", ErrorCode.BAD_DOCUMENT),
        (b'"a string"', ErrorCode.BAD_DOCUMENT),
    ],
)
def test_bad_json(payload: bytes, expected: ErrorCode) -> None:
    started = time.monotonic()
    assert code_of(lambda: _decode_plain(payload)) == expected
    assert time.monotonic() - started < 1.0


def test_json_limits_accept_what_is_within() -> None:
    deep: Any = 1
    for _ in range(frame.MAX_DEPTH - 1):
        deep = [deep]
    ok = {"max": 2**63 - 1, "min": -(2**63), "f": 1.5e308, "deep": deep}
    c, e, payload = split(frame.encode(ok))
    assert frame.decode(c, e, payload, key=None, max_size=MB) == ok
    deeper = {"deep": [deep]}
    c, e, payload = split(frame.encode(deeper))
    assert code_of(lambda: frame.decode(c, e, payload, key=None, max_size=MB)) == (
        ErrorCode.BAD_JSON
    )


# -- streams ----------------------------------------------------------------------------


def test_read_frame_end_of_stream_and_truncation() -> None:
    whole = frame.encode(DOC, Compression.LZ4)

    async def read(data: bytes) -> Frame | None:
        return await frame.read_frame(stream(data), max_size=MB, key=None)

    assert asyncio.run(read(b"")) is None
    got = asyncio.run(read(whole))
    assert got == Frame(Compression.LZ4, 0, DOC)
    for cut in (1, 5):
        with pytest.raises(ManagementError) as info:
            asyncio.run(read(whole[:cut]))
        assert info.value.code == ErrorCode.BAD_FRAME and "header" in info.value.message
    with pytest.raises(ManagementError) as info:
        asyncio.run(read(whole[:-1]))
    assert info.value.code == ErrorCode.BAD_FRAME
    assert f"{len(whole) - 7} of {len(whole) - 6} bytes" in info.value.message


def test_oversized_length_is_refused_before_the_body() -> None:
    """No body is waited for, let alone allocated: only the header was sent."""

    async def main() -> ManagementError:
        reader = stream(HEADER.pack(0, 0, 0xFFFFFFFF), eof=False)
        with pytest.raises(ManagementError) as info:
            await asyncio.wait_for(frame.read_frame(reader, max_size=MB, key=None), 1.0)
        return info.value

    error = asyncio.run(main())
    assert error.code == ErrorCode.FRAME_TOO_LARGE and "4294967295" in error.message


def test_unknown_types_are_refused_before_the_body() -> None:
    async def main(c: int, e: int) -> ManagementError:
        reader = stream(HEADER.pack(c, e, 100), eof=False)
        with pytest.raises(ManagementError) as info:
            await asyncio.wait_for(frame.read_frame(reader, max_size=MB, key=None), 1.0)
        return info.value

    assert asyncio.run(main(9, 0)).code == ErrorCode.BAD_COMPRESSION
    assert asyncio.run(main(0, 1)).code == ErrorCode.BAD_ENCRYPTION  # no key configured


def test_lying_lengths() -> None:
    body = json.dumps(DOC).encode()

    async def read(data: bytes) -> Frame | None:
        return await frame.read_frame(stream(data), max_size=MB, key=None)

    # Shorter than the document: the JSON is cut.
    with pytest.raises(ManagementError) as info:
        asyncio.run(read(HEADER.pack(0, 0, len(body) - 10) + body))
    assert info.value.code == ErrorCode.BAD_JSON
    # Longer: the stream ends first.
    with pytest.raises(ManagementError) as info:
        asyncio.run(read(HEADER.pack(0, 0, len(body) + 10) + body))
    assert info.value.code == ErrorCode.BAD_FRAME


def test_random_and_mutated_frames_only_raise_management_errors() -> None:
    """A small in-process fuzz (the daemon-level one is part of the end-to-end tests)."""
    rng = random.Random(15)
    seeds = [frame.encode(DOC, c, e, KEY) for c, e in COMBOS]
    frames: list[bytes] = []
    for i in range(3000):
        if i % 3 == 0:
            frames.append(rng.randbytes(rng.randint(0, 64)))
            continue
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.randint(0, 3)
            pos = rng.randrange(len(data))
            if op == 0:
                data[pos] = rng.randrange(256)
            elif op == 1:
                del data[pos : pos + rng.randint(1, 16)]
            elif op == 2:
                data[pos:pos] = rng.randbytes(rng.randint(1, 16))
            elif len(data) >= HEADER.size:
                struct.pack_into("!I", data, 2, rng.choice([0, 1, len(data), 2**32 - 1]))
            if not data:
                break
        frames.append(bytes(data))

    async def main() -> set[ErrorCode]:
        seen: set[ErrorCode] = set()
        for data in frames:
            try:
                await frame.read_frame(stream(data), max_size=MB, key=KEY)
            except ManagementError as e:
                seen.add(e.code)
        return seen

    assert {ErrorCode.BAD_FRAME, ErrorCode.BAD_ENCRYPTION} <= asyncio.run(main())


# -- key files ----------------------------------------------------------------------------


def _key_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "key"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_load_key_formats(tmp_path: Path) -> None:
    key = os.urandom(32)
    assert frame.load_key(_key_file(tmp_path, key)) == key
    assert frame.load_key(_key_file(tmp_path, key.hex().encode() + b"\n")) == key
    assert frame.load_key(_key_file(tmp_path, b"  " + base64.b64encode(key) + b"\r\n")) == key
    new = tmp_path / "new.key"
    frame.write_key(new)
    assert new.stat().st_mode & 0o777 == 0o600 and len(frame.load_key(new)) == 32
    with pytest.raises(FileExistsError):
        frame.write_key(new)


@pytest.mark.parametrize(
    "content", [b"", b"short", os.urandom(31), os.urandom(33), b"zz" * 32, b"A" * 100]
)
def test_load_key_refuses_bad_content(tmp_path: Path, content: bytes) -> None:
    path = _key_file(tmp_path, content)
    with pytest.raises(ManagementError) as info:
        frame.load_key(path)
    assert info.value.code == ErrorCode.BAD_ENCRYPTION
    assert info.value.message.startswith(f"encryption key file {path}: expected 32 raw bytes")


def test_load_key_refuses_a_file_others_can_read(tmp_path: Path) -> None:
    path = _key_file(tmp_path, os.urandom(32), 0o644)
    with pytest.raises(ManagementError) as info:
        frame.load_key(path)
    assert info.value.message == (
        f"encryption key file {path}: mode 0644 gives access to group or others (chmod 0600)"
    )
    with pytest.raises(ManagementError) as info:
        frame.load_key(tmp_path / "missing")
    assert "No such file" in info.value.message
