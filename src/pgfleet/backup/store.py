"""Stored files: streamed, compressed, encrypted, written atomically.

Every file pgfleet stores (a base backup's tar, a manifest, a WAL segment) is::

    header   "PGFB"  magic
             u8      format version (1)
             u8      compression: 0 none, 1 gzip, 2 zstd, 3 lz4, 4 bzip2 (pgmoneta's numbers)
             u8      encryption: 0 none, 1 AES-256-GCM
             u8      flags (0)
             u32     chunk size: the most compressed bytes one chunk holds
             -- encrypted files only --
             32 B    salt: the file's own key is HKDF-SHA256(key, salt)
             16 B    key check: HMAC-SHA256 of the header so far, with a key derived alongside
    chunks   u32     length of the body
             body    encrypted: AES-256-GCM of the chunk (ciphertext and tag)
                     otherwise: the chunk, then its CRC-32
    (integers big-endian)

The chunks hold the compressed stream, cut every ``chunk size`` bytes.  Each
chunk is sealed with its index and a flag saying whether it is the last one:
the GCM nonce is the index, and the associated data is the whole header, the
index and the flag.  So a chunk changed, moved, dropped, or added after the
last, and a file cut short even at a chunk boundary, all fail the check of
one chunk, which the error names; a header changed in any byte fails the key
check, as a wrong key does.  Every file has its own key (random salt), so
nonces never repeat under one key however many files there are.

Unencrypted files get the same framing with a CRC-32 instead of the tag (seeded
with the header's CRC, over index, flag and chunk): that catches a damaged
disk, not an attacker, and names the chunk too.

What this does not stop: someone who can write the backup directory replacing
a whole file by another pgfleet file sealed with the same key (say, the same
file of an older backup).  The SHA-256 of the raw bytes recorded in the
backup's metadata and the manifest's checksums are there for that.

Reading authenticates a chunk before passing on any of its bytes, and
decompresses with a bounded output, so neither a tampered file nor a
legitimate one that compresses a thousandfold (zero pages) is ever held in
memory.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import fcntl
import gzip
import hashlib
import hmac
import io
import os
import secrets
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, Protocol, cast

import lz4.frame
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pgfleet.errors import PgfleetError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_LEVEL",
    "KEY_SIZE",
    "SUFFIXES",
    "Codec",
    "Compression",
    "FileHeader",
    "FileReader",
    "FileWriter",
    "Readable",
    "StorageError",
    "StoredFile",
    "atomic_write_bytes",
    "copy_in",
    "copy_out",
    "fsync_dir",
    "is_abandoned",
    "load_key",
    "open_read",
    "open_write",
    "read_header",
    "strip_suffix",
]


class StorageError(PgfleetError):
    """A stored file cannot be written or read back as it was written; one line naming it."""


class Compression(StrEnum):
    """How a stored file is compressed."""

    NONE = "none"
    GZIP = "gzip"
    LZ4 = "lz4"
    ZSTD = "zstd"
    BZIP2 = "bzip2"

    @property
    def suffix(self) -> str:
        """The file name suffix, "" for none."""
        return _SUFFIX[self]


_SUFFIX = {
    Compression.NONE: "",
    Compression.GZIP: ".gz",
    Compression.LZ4: ".lz4",
    Compression.ZSTD: ".zst",
    Compression.BZIP2: ".bz2",
}
ENCRYPTED_SUFFIX = ".aes"
# Every suffix a stored file may have, longest first (for strip_suffix).
SUFFIXES = sorted(
    {c + e for c in _SUFFIX.values() for e in ("", ENCRYPTED_SUFFIX)}, key=len, reverse=True
)

# The header numbers them as pgmoneta does (and as pgfleet.management.frame).
_COMPRESSION_ID = {
    Compression.NONE: 0,
    Compression.GZIP: 1,
    Compression.ZSTD: 2,
    Compression.LZ4: 3,
    Compression.BZIP2: 4,
}
_COMPRESSION_BY_ID = {v: k for k, v in _COMPRESSION_ID.items()}

DEFAULT_LEVEL = {
    Compression.NONE: 0,
    Compression.GZIP: 6,
    Compression.LZ4: 0,  # lz4's fast mode; 3..16 are its high-compression levels
    Compression.ZSTD: 3,
    Compression.BZIP2: 9,
}
_LEVELS = {
    Compression.NONE: range(0, 1),
    Compression.GZIP: range(0, 10),
    Compression.LZ4: range(0, 17),
    Compression.ZSTD: range(-7, 23),  # zstd's fast negative levels exist; -7 is plenty
    Compression.BZIP2: range(1, 10),
}

KEY_SIZE = 32
CHUNK_SIZE = 1 << 20
# A chunk size read from a header is believed up to this: more is corruption.
_MAX_CHUNK_SIZE = 16 << 20

_MAGIC = b"PGFB"
_VERSION = 1
_ENC_NONE = 0
_ENC_AES_256_GCM = 1
_FIXED = struct.Struct("!4sBBBBI")
_SALT_SIZE = 32
_CHECK_SIZE = 16
_TAG_SIZE = 16
_CRC_SIZE = 4
_LENGTH = struct.Struct("!I")
_INDEX = struct.Struct("!QB")
_CRC = struct.Struct("!I")
_HKDF_INFO = b"pgfleet backup file v1"


def _nonce(index: int) -> bytes:
    # The file's key is its own: the index alone is a unique nonce.
    return index.to_bytes(12, "big")


@dataclass(frozen=True)
class Codec:
    """How to store a file: a compression, its level, and an AES-256 key or none.

    The key is left out of ``repr()``: a Codec can be logged.
    """

    compression: Compression = Compression.ZSTD
    level: int | None = None
    key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        try:
            compression = Compression(self.compression)
        except ValueError:
            choices = ", ".join(c.value for c in Compression)
            raise StorageError(
                f"unknown compression {self.compression!r} (one of {choices})"
            ) from None
        object.__setattr__(self, "compression", compression)
        if self.level is not None and self.level not in _LEVELS[compression]:
            r = _LEVELS[compression]
            raise StorageError(
                f"{compression} compression level {self.level} is out of range"
                f" {r.start}..{r.stop - 1}"
            )
        if self.key is not None and len(self.key) != KEY_SIZE:
            raise StorageError(f"an encryption key must be {KEY_SIZE} bytes, not {len(self.key)}")

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    @property
    def effective_level(self) -> int:
        return DEFAULT_LEVEL[self.compression] if self.level is None else self.level

    @property
    def suffix(self) -> str:
        """``.zst``, ``.zst.aes``, ``.aes``, "" for neither compressed nor encrypted."""
        return self.compression.suffix + (ENCRYPTED_SUFFIX if self.encrypted else "")


def strip_suffix(name: str) -> str:
    """A stored file's name without its compression and encryption suffix."""
    for suffix in SUFFIXES:
        if suffix and name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class Readable(Protocol):
    """What reading a stream needs: open_read()'s reader, any binary file, a tar member."""

    def read(self, size: int, /) -> bytes: ...


@dataclass(frozen=True)
class StoredFile:
    """A file as written: where, its sizes raw and stored, the SHA-256 of its raw bytes."""

    path: Path
    raw_bytes: int
    stored_bytes: int
    sha256: str


@dataclass(frozen=True)
class FileHeader:
    """What a stored file's header says about it."""

    compression: Compression
    encrypted: bool
    chunk_size: int
    size: int  # bytes, the header's own


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read a 32-byte key file: raw, 64 hex digits or base64; refuse one group or others can read.

    The rules are pgfleet.management's (``pgfleet ctl``'s key files).
    """
    from pgfleet.management.document import ManagementError
    from pgfleet.management.frame import load_key as _load

    try:
        return _load(path)
    except ManagementError as e:
        raise StorageError(e.message) from None


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that the names created or removed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a small file whole or not at all: temp name, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write {path}: {_why(e)}") from None


def _write_all(fd: int, data: ReadableBuffer) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _why(e: OSError) -> str:
    return e.strerror or str(e)


# -- writing ----------------------------------------------------------------------


class _Compressor(Protocol):
    def compress(self, data: memoryview, /) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: ReadableBuffer, /) -> bytes:
        return bytes(data)

    def flush(self) -> bytes:
        return b""


class _Lz4:
    """lz4.frame's compressor with the frame header emitted on the first call."""

    def __init__(self, level: int) -> None:
        self._c = lz4.frame.LZ4FrameCompressor(compression_level=level, content_checksum=True)
        self._head: bytes | None = self._c.begin()

    def compress(self, data: ReadableBuffer, /) -> bytes:
        out: bytes = self._c.compress(data)
        if self._head is not None:
            out, self._head = self._head + out, None
        return out

    def flush(self) -> bytes:
        out: bytes = self._c.flush()
        if self._head is not None:
            out, self._head = self._head + out, None
        return out


def _compressor(codec: Codec) -> _Compressor:
    level = codec.effective_level
    match codec.compression:
        case Compression.NONE:
            return _Identity()
        case Compression.ZSTD:
            return zstandard.ZstdCompressor(
                level=level, threads=0, write_checksum=True
            ).compressobj()
        case Compression.LZ4:
            return _Lz4(level)
        case Compression.GZIP:
            # wbits 31: a gzip member, as the gzip tool writes (no name, no time).
            return zlib.compressobj(level, zlib.DEFLATED, 31)
        case Compression.BZIP2:
            return bz2.BZ2Compressor(level)
    raise AssertionError(codec.compression)  # pragma: no cover


def _derive(key: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """The file's data key and key-check key."""
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=_HKDF_INFO).derive(key)
    return okm[:32], okm[32:]


class FileWriter(io.BufferedIOBase, BinaryIO):
    """The writable end of :func:`open_write`; sizes and SHA-256 readable at any time.

    A BinaryIO for the type checker, but only what a stream has: no seek, no read.
    """

    def __init__(self, fd: int, path: Path, codec: Codec, chunk_size: int) -> None:
        super().__init__()
        self.path = path
        self.raw_bytes = 0
        self.stored_bytes = 0
        self._fd = fd
        self._codec = codec
        self._chunk_size = chunk_size
        self._hash = hashlib.sha256()
        self._compressor = _compressor(codec)
        self._pending = bytearray()
        self._index = 0
        self._finished = False
        self._aead: AESGCM | None = None
        header = _FIXED.pack(
            _MAGIC,
            _VERSION,
            _COMPRESSION_ID[codec.compression],
            _ENC_AES_256_GCM if codec.key else _ENC_NONE,
            0,
            chunk_size,
        )
        if codec.key is not None:
            salt = secrets.token_bytes(_SALT_SIZE)
            data_key, check_key = _derive(codec.key, salt)
            header += salt
            header += hmac.digest(check_key, header, "sha256")[:_CHECK_SIZE]
            self._aead = AESGCM(data_key)
        self._header = header
        self._crc_seed = zlib.crc32(header)
        self._emit(header)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the raw bytes written so far."""
        return self._hash.hexdigest()

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def mode(self) -> str:
        return "wb"

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer, /) -> int:
        if self._finished:
            raise ValueError(f"write to {self.path} after it was closed")
        view = memoryview(data).cast("B")
        size = len(view)
        # Slices, so that a caller's one huge write still goes through the
        # compressor and out to disk a chunk at a time.
        for start in range(0, size, CHUNK_SIZE):
            piece = view[start : start + CHUNK_SIZE]
            self._hash.update(piece)
            self._pending += self._compressor.compress(piece)
            self._drain(final=False)
        self.raw_bytes += size
        return size

    def close(self) -> None:
        """End the stream (compressor trailer, last chunk, fsync); the rename is open_write's."""
        if not self._finished and not self.closed:
            self._pending += self._compressor.flush()
            self._drain(final=True)
            self._finished = True
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise StorageError(f"cannot write {self.path}: {_why(e)}") from None
        super().close()

    def _abort(self) -> None:
        self._finished = True
        super().close()

    def _drain(self, final: bool) -> None:
        # A chunk goes out only once more is known to follow: the last one
        # must be sealed as last.  A file always has at least one chunk.
        size = self._chunk_size
        while len(self._pending) > size:
            self._seal(bytes(self._pending[:size]), last=False)
            del self._pending[:size]
        if final:
            self._seal(bytes(self._pending), last=True)
            self._pending.clear()

    def _seal(self, chunk: bytes, last: bool) -> None:
        index = _INDEX.pack(self._index, last)
        if self._aead is not None:
            body = self._aead.encrypt(_nonce(self._index), chunk, self._header + index)
            record = _LENGTH.pack(len(body)) + body
        else:
            crc = zlib.crc32(chunk, zlib.crc32(index, self._crc_seed))
            record = _LENGTH.pack(len(chunk) + _CRC_SIZE) + chunk + _CRC.pack(crc)
        self._index += 1
        self._emit(record)

    def _emit(self, data: bytes) -> None:
        try:
            _write_all(self._fd, data)
        except OSError as e:
            raise StorageError(f"cannot write {self.path}: {_why(e)}") from None
        self.stored_bytes += len(data)


@contextlib.contextmanager
def open_write(path: Path, codec: Codec, *, chunk_size: int = CHUNK_SIZE) -> Iterator[FileWriter]:
    """Write ``path`` (its name carrying ``codec.suffix``), whole or not at all.

    The bytes go to ``.tmp-<name>-<random>`` in the same directory, flocked
    while written (so Catalog.cleanup() knows it is alive); when the block
    ends the stream is finished and fsynced, renamed to ``path`` (replacing
    any file there) and the directory fsynced.  When the block raises, the
    temporary file is removed and nothing appears at ``path``.  Sizes and
    SHA-256 stay readable on the writer after the block.
    """
    if not 1 <= chunk_size <= _MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size {chunk_size} is out of range")
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {_why(e)}") from None
    writer = None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        writer = FileWriter(fd, path, codec, chunk_size)
        yield writer
        writer.close()
        try:
            os.rename(tmp, path)
            fsync_dir(path.parent)
        except OSError as e:
            raise StorageError(f"cannot write {path}: {_why(e)}") from None
    except BaseException:
        if writer is not None:
            writer._abort()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)


def copy_in(src: BinaryIO, dest: Path, codec: Codec) -> StoredFile:
    """Store everything ``src`` reads as ``dest`` (with ``codec.suffix`` in its name)."""
    with open_write(dest, codec) as w:
        shutil.copyfileobj(src, w, CHUNK_SIZE)
    return StoredFile(w.path, w.raw_bytes, w.stored_bytes, w.sha256)


# -- reading ----------------------------------------------------------------------


def read_header(path: Path) -> FileHeader:
    """What a stored file's header says (compression, encryption), without a key."""
    try:
        with open(path, "rb") as f:
            return _parse_header(f, path)[0]
    except OSError as e:
        raise StorageError(f"cannot read {path}: {_why(e)}") from None


def _parse_header(f: BinaryIO, path: Path) -> tuple[FileHeader, bytes]:
    fixed = f.read(_FIXED.size)
    if len(fixed) < 4 or fixed[:4] != _MAGIC:
        raise StorageError(f"{path}: not a pgfleet backup file (no PGFB header)")
    if len(fixed) < _FIXED.size:
        raise StorageError(f"{path}: truncated header ({len(fixed)} bytes)")
    _, version, comp_id, enc_id, flags, chunk_size = _FIXED.unpack(fixed)
    if version != _VERSION:
        raise StorageError(f"{path}: unsupported format version {version} (this pgfleet reads 1)")
    if comp_id not in _COMPRESSION_BY_ID or enc_id not in (_ENC_NONE, _ENC_AES_256_GCM):
        raise StorageError(f"{path}: corrupted header (compression {comp_id}, encryption {enc_id})")
    if flags != 0 or not 1 <= chunk_size <= _MAX_CHUNK_SIZE:
        raise StorageError(f"{path}: corrupted header (flags {flags}, chunk size {chunk_size})")
    header = fixed
    if enc_id == _ENC_AES_256_GCM:
        rest = f.read(_SALT_SIZE + _CHECK_SIZE)
        if len(rest) < _SALT_SIZE + _CHECK_SIZE:
            raise StorageError(f"{path}: truncated header ({len(fixed) + len(rest)} bytes)")
        header += rest
    info = FileHeader(
        compression=_COMPRESSION_BY_ID[comp_id],
        encrypted=enc_id == _ENC_AES_256_GCM,
        chunk_size=chunk_size,
        size=len(header),
    )
    return info, header


class _Chunks(io.RawIOBase):
    """A stored file's chunks, checked one by one: the compressed stream, authenticated."""

    def __init__(self, f: BinaryIO, path: Path, key: bytes | None) -> None:
        super().__init__()
        self._f = f
        self._path = path
        self.header, self._header = _parse_header(f, path)
        self._aead: AESGCM | None = None
        if self.header.encrypted:
            if key is None:
                raise StorageError(f"{path}: the file is encrypted and no key was given")
            salt = self._header[_FIXED.size : _FIXED.size + _SALT_SIZE]
            data_key, check_key = _derive(key, salt)
            expected = hmac.digest(check_key, self._header[:-_CHECK_SIZE], "sha256")
            if not hmac.compare_digest(expected[:_CHECK_SIZE], self._header[-_CHECK_SIZE:]):
                raise StorageError(f"{path}: wrong key or corrupted header")
            self._aead = AESGCM(data_key)
            self._overhead = _TAG_SIZE
        else:
            self._overhead = _CRC_SIZE
        self._crc_seed = zlib.crc32(self._header)
        self._index = 0
        self._offset = len(self._header)  # of the chunk about to be read
        self._data = memoryview(b"")
        self._done = False
        self._next_length = self._read_length()
        if self._next_length is None:
            raise StorageError(f"{path}: truncated after the header (no chunk)")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        while not self._data:
            if self._done:
                return 0
            self._data = memoryview(self._next_chunk())
        out = memoryview(buffer).cast("B")
        n = min(len(out), len(self._data))
        out[:n] = self._data[:n]
        self._data = self._data[n:]
        return n

    def at_end(self) -> bool:
        """True once every chunk, the last one included, was read and checked."""
        return self._done and not self._data

    def _read_length(self) -> int | None:
        """The next chunk's length, or None at the very end of the file."""
        raw = self._read(_LENGTH.size)
        if not raw:
            return None
        if len(raw) < _LENGTH.size:
            raise self._bad(self._index, self._offset, "truncated")
        length: int = _LENGTH.unpack(raw)[0]
        if not self._overhead <= length <= self.header.chunk_size + self._overhead:
            raise self._bad(self._index, self._offset, f"impossible length {length}")
        return length

    def _next_chunk(self) -> bytes:
        index, offset, length = self._index, self._offset, self._next_length
        assert length is not None
        body = self._read(length)
        if len(body) < length:
            raise self._bad(index, offset, "truncated")
        self._index += 1
        self._offset += _LENGTH.size + length
        # Whether this chunk is the last one is known by looking for the
        # next: the seal says which it should be.
        self._next_length = self._read_length()
        last = self._next_length is None
        aad = _INDEX.pack(index, last)
        if self._aead is not None:
            try:
                chunk = self._aead.decrypt(_nonce(index), body, self._header + aad)
            except InvalidTag:
                raise self._bad(
                    index, offset, "fails authentication (corrupted, truncated or tampered with)"
                ) from None
        else:
            chunk = body[:-_CRC_SIZE]
            (crc,) = _CRC.unpack(body[-_CRC_SIZE:])
            if zlib.crc32(chunk, zlib.crc32(aad, self._crc_seed)) != crc:
                raise self._bad(index, offset, "checksum mismatch (corrupted or truncated)")
        self._done = last
        return chunk

    def _read(self, n: int) -> bytes:
        try:
            return self._f.read(n)
        except OSError as e:
            raise StorageError(f"cannot read {self._path}: {_why(e)}") from None

    def _bad(self, index: int, offset: int, why: str) -> StorageError:
        return StorageError(f"{self._path}: chunk {index} at offset {offset}: {why}")


class _Decompressing(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _decompressor(compression: Compression, chunks: _Chunks) -> _Decompressing:
    match compression:
        case Compression.NONE:
            return chunks
        case Compression.ZSTD:
            return zstandard.ZstdDecompressor().stream_reader(
                cast("IO[bytes]", chunks),
                read_size=CHUNK_SIZE,
                read_across_frames=True,
                closefd=False,
            )
        case Compression.LZ4:
            return lz4.frame.LZ4FrameFile(chunks, "rb")  # type: ignore[no-any-return]
        case Compression.GZIP:
            return gzip.GzipFile(fileobj=chunks, mode="rb")
        case Compression.BZIP2:
            return bz2.BZ2File(chunks, "rb")
    raise AssertionError(compression)  # pragma: no cover


# What the decompressors raise on data they cannot make sense of.
_CODEC_ERRORS = (zstandard.ZstdError, zlib.error, OSError, EOFError, RuntimeError, ValueError)


class FileReader(io.BufferedIOBase, BinaryIO):
    """The readable end of :func:`open_read`: ``read(n)`` returns n bytes unless at the end.

    A BinaryIO for the type checker, but only what a stream has: no seek, no write.
    """

    def __init__(self, path: Path, chunks: _Chunks) -> None:
        super().__init__()
        self.path = path
        self.header = chunks.header
        self.raw_bytes = 0  # read so far
        self._chunks = chunks
        self._stream = _decompressor(chunks.header.compression, chunks)
        self._eof = False

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def mode(self) -> str:
        return "rb"

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> bytes:
        if size is None or size < 0:
            parts = []
            while part := self.read(CHUNK_SIZE):
                parts.append(part)
            return b"".join(parts)
        first = self._read1(size)
        if len(first) == size or not first:
            return first
        out = bytearray(first)
        while len(out) < size and (part := self._read1(size - len(out))):
            out += part
        return bytes(out)

    def read1(self, size: int = -1, /) -> bytes:
        return self._read1(CHUNK_SIZE if size < 0 else size)

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        out = memoryview(buffer).cast("B")
        data = self.read(len(out))
        out[: len(data)] = data
        return len(data)

    def _read1(self, size: int) -> bytes:
        if self._eof or size == 0:
            return b""
        try:
            data = self._stream.read(size)
        except StorageError:
            raise
        except _CODEC_ERRORS as e:
            where = f"chunk {max(self._chunks._index - 1, 0)}"
            raise StorageError(
                f"{self.path}: {where}: cannot decompress ({self.header.compression}): {e}"
            ) from None
        if data:
            self.raw_bytes += len(data)
            return data
        self._eof = True
        # The compressed stream ended: so must the chunks, the last one
        # checked as last (nothing cut, nothing appended).
        if self._chunks.read(1):
            raise StorageError(f"{self.path}: data after the end of the compressed stream")
        if not self._chunks.at_end():  # pragma: no cover - read(1) == b"" implies it
            raise StorageError(f"{self.path}: truncated")
        return b""


@contextlib.contextmanager
def open_read(path: Path, key: bytes | None) -> Iterator[FileReader]:
    """Read back a stored file's raw bytes, however it was compressed and encrypted.

    The header says how; ``key`` is needed only if the file is encrypted (an
    unencrypted file is read even when a key is given).  Errors are
    StorageError naming the file and, for damage, the chunk.
    """
    path = Path(path)
    if key is not None and len(key) != KEY_SIZE:
        raise StorageError(f"an encryption key must be {KEY_SIZE} bytes, not {len(key)}")
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the caller's block
    except OSError as e:
        raise StorageError(f"cannot read {path}: {_why(e)}") from None
    with f:
        reader = FileReader(path, _Chunks(f, path, key))
        with reader:
            yield reader


def copy_out(src: Path, dest: BinaryIO, key: bytes | None) -> int:
    """Write a stored file's raw bytes to ``dest``; return how many."""
    with open_read(src, key) as r:
        while data := r.read(CHUNK_SIZE):
            dest.write(data)
        return r.raw_bytes


def _is_locked(fd: int) -> bool:
    """Whether another open file description holds an flock on this file (it is alive)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def is_abandoned(path: Path) -> bool:
    """Whether a temporary file is no longer being written (no writer holds its flock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        return not _is_locked(fd)
    finally:
        os.close(fd)
