"""Stored files: every codec both ways, bounded memory, tampering, crashes."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import signal
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pgfleet.backup import store
from pgfleet.backup.store import (
    Codec,
    Compression,
    StorageError,
    atomic_write_bytes,
    copy_in,
    copy_out,
    is_abandoned,
    load_key,
    open_read,
    open_write,
    read_header,
    strip_suffix,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
MB = 1 << 20
COMBOS = [(c, k) for c in Compression for k in (None, KEY)]


def combo_id(combo: tuple[Compression, bytes | None]) -> str:
    return f"{combo[0]}{'+aes' if combo[1] else ''}"


@pytest.fixture(scope="module")
def payload() -> bytes:
    """5 MB of random bytes, then 3 MB that compress well: several chunks either way."""
    rnd = random.Random(16)
    text = b"".join(b"row %d: %s\n" % (i, b"pgfleet" * rnd.randrange(1, 9)) for i in range(120_000))
    return rnd.randbytes(5 * MB) + text[: 3 * MB]


def write(path: Path, data: bytes, codec: Codec, **kw: int) -> store.StoredFile:
    with open_write(path, codec, **kw) as w:
        # Uneven writes, as a pipe would give them.
        pos = 0
        sizes = [1, 7, 65536, 3 * MB, 100_000]
        i = 0
        while pos < len(data):
            n = sizes[i % len(sizes)]
            w.write(data[pos : pos + n])
            pos += n
            i += 1
    return store.StoredFile(w.path, w.raw_bytes, w.stored_bytes, w.sha256)


def read_all(path: Path, key: bytes | None, size: int = 12_345) -> bytes:
    out = bytearray()
    with open_read(path, key) as r:
        while data := r.read(size):
            assert len(data) == size or not r.read(1)  # full reads until the very end
            out += data
    return bytes(out)


# -- round trips ------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_round_trip(
    tmp_path: Path, payload: bytes, combo: tuple[Compression, bytes | None]
) -> None:
    compression, key = combo
    codec = Codec(compression, key=key)
    path = tmp_path / f"base.tar{codec.suffix}"
    stored = write(path, payload, codec)
    assert stored.raw_bytes == len(payload)
    assert stored.sha256 == hashlib.sha256(payload).hexdigest()
    assert stored.stored_bytes == path.stat().st_size
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary left
    if compression is not Compression.NONE:
        assert stored.stored_bytes < len(payload) - 2 * MB  # the text part shrank
    header = read_header(path)
    assert (header.compression, header.encrypted) == (compression, key is not None)
    with open_read(path, key) as r:
        assert r.read() == payload
        assert r.raw_bytes == len(payload)
    assert read_all(path, key) == payload


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_empty_file(tmp_path: Path, combo: tuple[Compression, bytes | None]) -> None:
    codec = Codec(combo[0], key=combo[1])
    path = tmp_path / f"empty{codec.suffix}"
    with open_write(path, codec) as w:
        pass
    assert w.raw_bytes == 0 and w.sha256 == hashlib.sha256(b"").hexdigest()
    with open_read(path, combo[1]) as r:
        assert r.read(10) == b""


def test_tar_streamed_through(tmp_path: Path, payload: bytes) -> None:
    """tarfile's stream modes both ways, as base backups and restores use them."""
    path = tmp_path / "base.tar.zst.aes"
    members = {"global/pg_control": payload[:8192], "base/1/1259": payload, "empty": b""}
    with open_write(path, Codec(key=KEY)) as w, tarfile.open(fileobj=w, mode="w|") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    seen = {}
    with open_read(path, KEY) as r, tarfile.open(fileobj=r, mode="r|") as tf:
        for m in tf:
            f = tf.extractfile(m)
            assert f is not None
            seen[m.name] = f.read()
    assert seen == members


def test_copy_in_and_out(tmp_path: Path, payload: bytes) -> None:
    stored = copy_in(io.BytesIO(payload), tmp_path / "seg.lz4.aes", Codec(Compression.LZ4, key=KEY))
    assert stored.path == tmp_path / "seg.lz4.aes"
    assert stored.raw_bytes == len(payload) and stored.stored_bytes == stored.path.stat().st_size
    out = io.BytesIO()
    assert copy_out(stored.path, out, KEY) == len(payload)
    assert out.getvalue() == payload


def test_levels_and_suffixes() -> None:
    assert Codec().suffix == ".zst" and Codec().effective_level == 3
    assert Codec(Compression.NONE).suffix == ""
    assert Codec(Compression.NONE, key=KEY).suffix == ".aes"
    assert Codec(Compression.GZIP, key=KEY).suffix == ".gz.aes"
    assert Codec(Compression.BZIP2).suffix == ".bz2"
    assert Codec("lz4").compression is Compression.LZ4  # type: ignore[arg-type]
    assert KEY.hex() not in repr(Codec(key=KEY)) and str(KEY) not in repr(Codec(key=KEY))
    cases: list[tuple[Callable[[], object], str]] = [
        (
            lambda: Codec(Compression.GZIP, level=10),
            "gzip compression level 10 is out of range 0..9",
        ),
        (
            lambda: Codec(Compression.BZIP2, level=0),
            "bzip2 compression level 0 is out of range 1..9",
        ),
        (lambda: Codec(key=b"short"), "an encryption key must be 32 bytes, not 5"),
        (lambda: Codec("xz"), "unknown compression 'xz'"),  # type: ignore[arg-type]
    ]
    for bad, message in cases:
        with pytest.raises(StorageError, match=message):
            bad()
    assert strip_suffix("000000010000000000000002.zst.aes") == "000000010000000000000002"
    assert strip_suffix("base.tar.gz") == "base.tar" and strip_suffix("base.tar") == "base.tar"


@pytest.mark.parametrize("compression", list(Compression))
def test_levels_are_used(tmp_path: Path, compression: Compression) -> None:
    data = b"".join(b"%d," % i for i in range(100_000))
    sizes = []
    for level in (min(store._LEVELS[compression]), max(store._LEVELS[compression])):
        level = max(level, 1) if compression is Compression.ZSTD else level
        with open_write(tmp_path / f"f{level}", Codec(compression, level)) as w:
            w.write(data)
        sizes.append(w.stored_bytes)
        with open_read(tmp_path / f"f{level}", None) as r:
            assert r.read() == data
    if compression is not Compression.NONE:
        assert sizes[1] != sizes[0]  # bzip2's bigger blocks are not always smaller
    if compression in (Compression.GZIP, Compression.ZSTD, Compression.LZ4):
        assert sizes[1] < sizes[0]


# -- bounded memory ------------------------------------------------------------------


def blocks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    rnd = random.Random(3)
    for i in range(total // size):
        # Half random, half zeros: both the compressor and the cipher work.
        yield rnd.randbytes(size // 2) + bytes(size // 2) if i % 2 else bytes(size)


def test_memory_bounded_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "big.zst.aes"
    total = 50 * MB
    tracemalloc.start()
    try:
        with open_write(path, Codec(key=KEY)) as w:
            for block in blocks(total):
                w.write(block)
        _, peak_write = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        n = 0
        with open_read(path, KEY) as r:
            while data := r.read(256 * 1024):
                n += len(data)
        _, peak_read = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert w.raw_bytes == n == total
    assert peak_write < 6 * MB, peak_write
    assert peak_read < 6 * MB, peak_read


def test_a_thousandfold_file_reads_in_bounded_memory(tmp_path: Path) -> None:
    """200 MB of zeros compress to a few KB, one chunk: decompression is bounded anyway."""
    path = tmp_path / "zeros.zst"
    zeros = bytes(MB)
    with open_write(path, Codec()) as w:
        for _ in range(200):
            w.write(zeros)
    assert w.stored_bytes < 64 * 1024
    for compression in (Compression.GZIP, Compression.LZ4, Compression.BZIP2):
        with open_write(tmp_path / f"zeros{compression.suffix}", Codec(compression)) as w:
            for _ in range(50):
                w.write(zeros)
    tracemalloc.start()
    try:
        for p in sorted(tmp_path.iterdir()):
            with open_read(p, None) as r:
                while r.read(MB):
                    pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * MB, peak


def test_one_huge_write_is_cut_up(tmp_path: Path) -> None:
    data = random.Random(5).randbytes(20 * MB)
    path = tmp_path / "one.aes"
    with open_write(path, Codec(Compression.NONE, key=KEY), chunk_size=MB) as w:
        w.write(data)
    # header, then 20 chunks of 1 MiB, each with its length and tag
    assert w.stored_bytes == 60 + 20 * (4 + MB + 16)
    with open_read(path, KEY) as r:
        assert r.read() == data


# -- tampering -------------------------------------------------------------------

CHUNK = 4096
N_CHUNKS = 10
HEADER = 60  # encrypted
RECORD = 4 + CHUNK + 16


@pytest.fixture
def sealed(tmp_path: Path) -> tuple[Path, bytes]:
    """An encrypted, uncompressed file of exactly 10 chunks, whose layout is known."""
    data = random.Random(7).randbytes(CHUNK * N_CHUNKS)
    path = tmp_path / "f.aes"
    with open_write(path, Codec(Compression.NONE, key=KEY), chunk_size=CHUNK) as w:
        w.write(data)
    assert path.stat().st_size == HEADER + N_CHUNKS * RECORD
    return path, data


def chunk_at(i: int) -> int:
    """Offset of chunk i's length field."""
    return HEADER + i * RECORD


def edit(path: Path, fn: Callable[[bytearray], bytearray | bytes]) -> None:
    path.write_bytes(bytes(fn(bytearray(path.read_bytes()))))


def flip(offset: int) -> Callable[[bytearray], bytearray]:
    def do(b: bytearray) -> bytearray:
        b[offset] ^= 0x20
        return b

    return do


def read_tampered(path: Path, data: bytes, key: bytes | None = KEY) -> str:
    """Read in small pieces: whatever comes before the error must be the true data."""
    got = bytearray()
    with pytest.raises(StorageError) as info, open_read(path, key) as r:
        while piece := r.read(1000):
            got += piece
    assert data.startswith(got)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize(
    "what, tamper, expect",
    [
        ("magic", flip(0), "not a pgfleet backup file"),
        ("version", flip(4), "unsupported format version"),
        ("compression byte", lambda b: b[:5] + b"\x02" + b[6:], "wrong key or corrupted header"),
        ("chunk size", flip(10), "wrong key or corrupted header"),
        ("salt", flip(20), "wrong key or corrupted header"),
        ("key check", flip(HEADER - 1), "wrong key or corrupted header"),
        ("ciphertext of chunk 2", flip(chunk_at(2) + 4 + 100), "chunk 2 at offset"),
        ("tag of chunk 4", flip(chunk_at(5) - 1), "chunk 4 at offset"),
        ("length of chunk 3", flip(chunk_at(3) + 3), "chunk 3 at offset"),
        ("last chunk", flip(chunk_at(9) + 50), "chunk 9 at offset"),
        ("truncated at a boundary", lambda b: b[: chunk_at(9)], "chunk 8 at offset"),
        ("truncated in a chunk", lambda b: b[: chunk_at(6) + 100], "chunk 6 at offset"),
        ("truncated in a length", lambda b: b[: chunk_at(6) + 2], "chunk 6 at offset"),
        ("truncated to the header", lambda b: b[:HEADER], "truncated after the header"),
        ("truncated header", lambda b: b[:30], "truncated header"),
        ("chunk appended", lambda b: b + b[chunk_at(9) :], "chunk 9 at offset"),
        ("garbage appended", lambda b: b + b"\0\0\0\0", "chunk 10 at offset"),
        ("chunks swapped", lambda b: b[: chunk_at(1)] + b[chunk_at(2) : chunk_at(3)]
         + b[chunk_at(1) : chunk_at(2)] + b[chunk_at(3) :], "chunk 1 at offset"),
        ("chunk dropped", lambda b: b[: chunk_at(4)] + b[chunk_at(5) :], "chunk 4 at offset"),
    ],
)  # fmt: skip
def test_tampering_is_caught_and_named(
    sealed: tuple[Path, bytes], what: str, tamper: Callable[[bytearray], bytes], expect: str
) -> None:
    path, data = sealed
    edit(path, tamper)
    message = read_tampered(path, data)
    assert expect in message, (what, message)


def test_no_byte_of_a_bad_chunk_is_returned(sealed: tuple[Path, bytes]) -> None:
    path, data = sealed
    edit(path, flip(chunk_at(3) + 4 + CHUNK - 1))  # the last byte of chunk 3's ciphertext
    got = bytearray()
    with pytest.raises(StorageError, match="chunk 3 at offset"), open_read(path, KEY) as r:
        while piece := r.read(1):
            got += piece
    assert bytes(got) == data[: 3 * CHUNK]


def test_a_chunk_from_another_file_is_refused(tmp_path: Path, sealed: tuple[Path, bytes]) -> None:
    path, data = sealed
    other = tmp_path / "other.aes"
    with open_write(other, Codec(Compression.NONE, key=KEY), chunk_size=CHUNK) as w:
        w.write(data)
    theirs = other.read_bytes()
    edit(path, lambda b: b[: chunk_at(2)] + theirs[chunk_at(2) : chunk_at(3)] + b[chunk_at(3) :])
    assert "chunk 2 at offset" in read_tampered(path, data)


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.ZSTD, Compression.GZIP])
def test_unencrypted_damage_is_caught_and_named(tmp_path: Path, compression: Compression) -> None:
    data = random.Random(9).randbytes(CHUNK * N_CHUNKS)
    path = tmp_path / "plain"
    with open_write(path, Codec(compression), chunk_size=CHUNK) as w:
        w.write(data)
    record = 4 + CHUNK + 4
    edit(path, flip(12 + 3 * record + 4 + 10))  # in chunk 3
    assert "chunk 3 at offset" in read_tampered(path, data, None)
    # The header too: it seeds every chunk's CRC.
    with open_write(path, Codec(compression), chunk_size=CHUNK) as w:
        w.write(data)
    edit(path, lambda b: b[:5] + bytes([b[5] ^ 1]) + b[6:])
    with pytest.raises(StorageError), open_read(path, None) as r:
        r.read()
    with open_write(path, Codec(compression), chunk_size=CHUNK) as w:
        w.write(data)
    edit(path, lambda b: b[: 12 + 9 * record])
    assert "chunk 8 at offset" in read_tampered(path, data, None)


def test_keys(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "f.zst.aes"
    write(path, payload[:MB], Codec(key=KEY))
    with (
        pytest.raises(StorageError, match="wrong key or corrupted header"),
        open_read(path, OTHER_KEY),
    ):
        pass
    with pytest.raises(StorageError, match="encrypted and no key was given"), open_read(path, None):
        pass
    with pytest.raises(StorageError, match="must be 32 bytes"), open_read(path, b"x"):
        pass
    # An unencrypted file reads with or without a key.
    plain = tmp_path / "f.zst"
    write(plain, b"abc", Codec())
    with open_read(plain, KEY) as r:
        assert r.read() == b"abc"
    with (
        pytest.raises(StorageError, match="not a pgfleet backup file"),
        open_read(Path(__file__), None),
    ):
        pass
    with (
        pytest.raises(StorageError, match=r"cannot read .*nothing"),
        open_read(tmp_path / "nothing", None),
    ):
        pass


def test_load_key(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_text(KEY.hex() + "\n")
    f.chmod(0o600)
    assert load_key(f) == KEY
    f.chmod(0o640)
    with pytest.raises(StorageError, match=r"mode 0640 gives access to group or others"):
        load_key(f)
    f.chmod(0o600)
    f.write_text("too short")
    with pytest.raises(StorageError, match="expected 32 raw bytes"):
        load_key(f)


# -- crashes ---------------------------------------------------------------------


class Boom(Exception):
    pass


def test_exception_in_the_block_leaves_nothing(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "base.tar.zst"
    with pytest.raises(Boom), open_write(path, Codec()) as w:
        w.write(payload)
        raise Boom
    assert os.listdir(tmp_path) == []
    # Over an existing file: the old one stays, whole.
    path.write_bytes(b"old")
    with pytest.raises(Boom), open_write(path, Codec()) as w:
        w.write(payload)
        raise Boom
    assert os.listdir(tmp_path) == [path.name] and path.read_bytes() == b"old"
    with pytest.raises(ValueError):
        w.write(b"more")


def test_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload: bytes) -> None:
    real_write = store._write_all
    budget = [2 * MB]

    def write(fd: int, data: bytes) -> None:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget[0] -= len(data)
        real_write(fd, data)

    monkeypatch.setattr(store, "_write_all", write)
    path = tmp_path / "base.tar"
    with pytest.raises(StorageError) as info, open_write(path, Codec(Compression.NONE)) as w:
        w.write(payload)
    assert str(info.value) == f"cannot write {path}: No space left on device"
    assert os.listdir(tmp_path) == []


def test_missing_directory(tmp_path: Path) -> None:
    with (
        pytest.raises(StorageError, match=r"cannot write .*/nowhere/f: No such file"),
        open_write(tmp_path / "nowhere" / "f", Codec()),
    ):
        pass


def test_atomic_write_bytes(tmp_path: Path) -> None:
    path = tmp_path / "backup.json"
    atomic_write_bytes(path, b"{}")
    atomic_write_bytes(path, b'{"a": 1}')
    assert path.read_bytes() == b'{"a": 1}' and os.listdir(tmp_path) == ["backup.json"]
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(StorageError, match="cannot write"):
        atomic_write_bytes(tmp_path / "no" / "x", b"")


_WRITER = """
import sys, time
from pathlib import Path
from pgfleet.backup.store import Codec, open_write
with open_write(Path(sys.argv[1]), Codec(key=bytes(32))) as w:
    w.write(b"x" * 3_000_000)
    print("ready", flush=True)
    time.sleep(60)
"""


def test_killed_writer_leaves_only_an_abandoned_temporary(tmp_path: Path) -> None:
    path = tmp_path / "000000010000000000000001.zst.aes"
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        (tmp,) = tmp_path.iterdir()
        assert tmp.name.startswith(f".tmp-{path.name}-")
        assert not is_abandoned(tmp)  # its writer is alive
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not path.exists()
    assert is_abandoned(tmp)


def test_a_writer_in_this_process_is_alive(tmp_path: Path) -> None:
    with open_write(tmp_path / "f", Codec()) as w:
        w.write(b"abc")
        (tmp,) = tmp_path.iterdir()
        assert not is_abandoned(tmp)
    assert not is_abandoned(tmp)  # gone: nothing to remove
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_header_layout(tmp_path: Path) -> None:
    """The documented header, byte for byte."""
    with open_write(tmp_path / "f", Codec(Compression.LZ4, key=KEY)) as w:
        w.write(b"x")
    raw = (tmp_path / "f").read_bytes()
    assert struct.unpack("!4sBBBBI", raw[:12]) == (b"PGFB", 1, 3, 1, 0, MB)
    with open_write(tmp_path / "g", Codec(Compression.NONE)) as w:
        w.write(b"hello")
    raw = (tmp_path / "g").read_bytes()
    assert raw[:12] == struct.pack("!4sBBBBI", b"PGFB", 1, 0, 0, 0, MB)
    assert raw[12:16] == struct.pack("!I", 9) and raw[16:21] == b"hello" and len(raw) == 25


def test_throughput_is_reasonable(tmp_path: Path) -> None:
    """Not a benchmark: a guard against a per-byte Python loop sneaking in."""
    data = random.Random(1).randbytes(32 * MB)
    start = time.perf_counter()
    with open_write(tmp_path / "f.zst.aes", Codec(key=KEY)) as w:
        w.write(data)
    with open_read(tmp_path / "f.zst.aes", KEY) as r:
        while r.read(MB):
            pass
    assert time.perf_counter() - start < 10
