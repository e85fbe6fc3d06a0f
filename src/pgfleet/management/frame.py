"""The management protocol's frames: a 6-byte header, then a JSON document.

Every message, both ways, is::

    compression  uint8    a Compression value
    encryption   uint8    an Encryption value
    length       uint32   network byte order: the payload's length as sent
    payload      length bytes

and the payload is the document as compact UTF-8 JSON, compressed, then
encrypted.  The numbering is pgmoneta's (management.h), so the two can be
compared byte for byte.

Invariants:

- Nothing a peer sends can make us allocate much more than ``max_size``: a
  length over it is refused before the body is read, and decompression is
  streamed with an output bound, so a bomb stops at ``max_size`` (plus one
  decoder step, a few MB at most).
- Every failure is a :class:`ManagementError` with the code that says why;
  no codec's own exception (zlib.error, RuntimeError, RecursionError...) escapes.
- AES-256-GCM authenticates the two type bytes too: a frame whose
  compression byte was changed in transit fails like a tampered payload,
  rather than being decompressed with the wrong codec.

Compressing before encrypting leaks the compressed length, as in TLS (CRIME):
harmless for management documents, which do not mix a secret with text an
attacker chooses, but a reason not to put secrets in them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bz2
import json
import math
import os
import secrets
import stat
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as dtime
from decimal import Decimal
from enum import IntEnum
from pathlib import PurePath
from typing import Any

import lz4.frame
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pgfleet.management.document import ErrorCode, ManagementError


class Compression(IntEnum):
    """pgmoneta's MANAGEMENT_COMPRESSION_* numbers."""

    NONE = 0
    GZIP = 1
    ZSTD = 2
    LZ4 = 3
    BZIP2 = 4


class Encryption(IntEnum):
    """pgmoneta's MANAGEMENT_ENCRYPTION_* numbers; pgfleet implements AES-256-GCM only.

    pgmoneta also numbers AES-192-GCM (2) and AES-128-GCM (3): pgfleet refuses
    them by name rather than as unknown, and never sends them.
    """

    NONE = 0
    AES_256_GCM = 1


_PGMONETA_ONLY_ENCRYPTIONS = {2: "AES-192-GCM", 3: "AES-128-GCM"}

HEADER = struct.Struct("!BBI")

# A management document is a few objects deep; 32 leaves room for any answer
# pgfleet sends while keeping a hostile [[[[...]]]] from reaching the C
# parser's recursion limit.
MAX_DEPTH = 32
# JSON numbers must fit what the other side (pgmoneta's C, a Go or JS client)
# can hold: a signed 64-bit integer, a finite double.
MAX_INT = 2**63 - 1
MIN_INT = -(2**63)
# Longer digit strings are refused before int() sees them: no quadratic
# conversion, no ValueError from Python's own digit limit.
_MAX_NUMBER_TEXT = 64

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
# Key files are a few dozen bytes; read no more than this of a wrong file.
_MAX_KEY_FILE = 4096

# zstd's decoder allocates its window (up to 2 GB by the format): allow what
# zstd's levels 1-19 use (8 MB) or the frame limit, whichever is larger.
_ZSTD_MIN_WINDOW = 8 << 20
# Feed zstd this much input at a time: its decompressobj has no output
# bound, and 64 bytes of RLE blocks expand to ~2.7 MB at most.
_ZSTD_STEP = 64


@dataclass(frozen=True)
class Frame:
    """One decoded message: its type bytes and its document."""

    compression: int
    encryption: int
    document: dict[str, Any]


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read a 32-byte AES key: raw bytes, 64 hex digits or base64 (whitespace ignored).

    Like PostgreSQL with its TLS key file, refuse a file that group or others
    can read or write: whoever reads the key reads the management traffic.
    """
    name = os.fspath(path)

    def bad(why: str) -> ManagementError:
        return ManagementError(ErrorCode.BAD_ENCRYPTION, f"encryption key file {name}: {why}")

    try:
        with open(name, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise bad("not a regular file")
            if st.st_mode & 0o077:
                raise bad(
                    f"mode {stat.S_IMODE(st.st_mode):04o} gives access to group or others "
                    "(chmod 0600)"
                )
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise bad(e.strerror or str(e)) from None
    if len(data) == KEY_SIZE:
        return data
    text = b"".join(data.split())
    if len(text) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) == KEY_SIZE:
        return key
    raise bad(
        f"expected {KEY_SIZE} raw bytes, {2 * KEY_SIZE} hex digits or base64 of {KEY_SIZE} bytes"
    )


def write_key(path: str | os.PathLike[str]) -> None:
    """Create a new random key file (hex, mode 0600); refuse to overwrite one."""
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_SIZE) + "\n")


# -- JSON ---------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    # What a command result may hold besides JSON's own types.
    if isinstance(value, datetime | date | dtime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value) if value.is_finite() else str(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(document: dict[str, Any]) -> bytes:
    """A document as compact UTF-8 JSON; ManagementError(BAD_DOCUMENT) if it can't be."""
    try:
        text = json.dumps(
            document,
            ensure_ascii=False,
            allow_nan=False,
            separators=(",", ":"),
            default=_json_default,
        )
    except (TypeError, ValueError, RecursionError) as e:
        raise ManagementError(ErrorCode.BAD_DOCUMENT, f"cannot encode as JSON: {e}") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (a peer may send "\ud800"): escaped, it is valid JSON.
        return json.dumps(
            document, allow_nan=False, separators=(",", ":"), default=_json_default
        ).encode("ascii")


class _NumberError(ValueError):
    pass


def _parse_int(text: str) -> int:
    if len(text) > _MAX_NUMBER_TEXT:
        raise _NumberError(f"integer of {len(text)} digits")
    value = int(text)
    if not MIN_INT <= value <= MAX_INT:
        raise _NumberError(f"integer {text} out of the signed 64-bit range")
    return value


def _parse_float(text: str) -> float:
    if len(text) > _MAX_NUMBER_TEXT:
        raise _NumberError(f"number of {len(text)} characters")
    value = float(text)
    if not math.isfinite(value):
        raise _NumberError(f"number {text} out of range")
    return value


def _parse_constant(text: str) -> Any:
    raise _NumberError(f"{text} is not JSON")


def _depth_ok(value: Any) -> bool:
    # Iterative: the point is not to recurse on what a peer sent.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def loads(data: bytes) -> dict[str, Any]:
    """Parse a document: UTF-8, JSON, bounded depth and numbers, an object at the top."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManagementError(
            ErrorCode.BAD_JSON, f"invalid UTF-8 at byte {e.start} of the document"
        ) from None
    try:
        value = json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
        )
    except _NumberError as e:
        raise ManagementError(ErrorCode.BAD_JSON, f"invalid JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise ManagementError(
            ErrorCode.BAD_JSON, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except RecursionError:
        raise ManagementError(
            ErrorCode.BAD_JSON, f"invalid JSON: nested deeper than {MAX_DEPTH}"
        ) from None
    except ValueError as e:  # anything else the decoder raises on odd input
        raise ManagementError(ErrorCode.BAD_JSON, f"invalid JSON: {e}") from None
    # Very deep nesting stops at the C parser's recursion limit above; the
    # rest is walked, unless too few brackets to be deep (most documents).
    if (text.count("[") + text.count("{") > MAX_DEPTH) and not _depth_ok(value):
        raise ManagementError(ErrorCode.BAD_JSON, f"invalid JSON: nested deeper than {MAX_DEPTH}")
    if not isinstance(value, dict):
        raise ManagementError(ErrorCode.BAD_DOCUMENT, "the document is not a JSON object")
    return value


# -- compression --------------------------------------------------------------


def _compress(kind: int, data: bytes) -> bytes:
    if kind == Compression.NONE:
        return data
    if kind == Compression.GZIP:
        # mtime 0: the same document gives the same bytes.
        c = zlib.compressobj(6, zlib.DEFLATED, 31)
        return c.compress(data) + c.flush()
    if kind == Compression.ZSTD:
        return zstandard.ZstdCompressor(level=3).compress(data)
    if kind == Compression.LZ4:
        return bytes(lz4.frame.compress(data))
    if kind == Compression.BZIP2:
        return bz2.compress(data, 9)
    raise ManagementError(ErrorCode.BAD_COMPRESSION, f"unknown compression type {kind}")


def _too_large(max_size: int) -> ManagementError:
    return ManagementError(
        ErrorCode.FRAME_TOO_LARGE, f"the document decompresses to more than {max_size} bytes"
    )


def _truncated(kind: str) -> ManagementError:
    return ManagementError(ErrorCode.BAD_COMPRESSION, f"{kind} data is truncated")


def _inflate_members(
    data: bytes, max_size: int, kind: str, new: Callable[[], Any], *, zlib_style: bool
) -> bytes:
    """Decompress concatenated gzip/bzip2/lz4 members with an output bound.

    The three decompressors share a shape: ``decompress(data, max_length)``,
    ``eof`` and ``unused_data``; they differ in how unread input is kept
    (zlib hands it back in ``unconsumed_tail``, the others keep it inside).
    """
    if not data:
        raise _truncated(kind)
    out = bytearray()
    d = new()
    pending = data
    while True:
        out += d.decompress(pending, max_size + 1 - len(out))
        if len(out) > max_size:
            raise _too_large(max_size)
        if d.eof:
            rest = d.unused_data
            if not rest:
                return bytes(out)
            d, pending = new(), rest
            continue
        if zlib_style:
            pending = d.unconsumed_tail
            if not pending:
                raise _truncated(kind)
        else:
            if d.needs_input:
                raise _truncated(kind)
            pending = b""


def _unzstd(data: bytes, max_size: int) -> bytes:
    window = max(_ZSTD_MIN_WINDOW, 1 << max(0, max_size - 1).bit_length())
    dctx = zstandard.ZstdDecompressor(max_window_size=window)
    out = bytearray()
    pos = 0
    if not data:
        raise _truncated("zstd")
    while pos < len(data):
        # Check the frame header before the decoder sizes anything from it.
        params = zstandard.get_frame_parameters(data[pos : pos + 18])
        if params.content_size != zstandard.CONTENTSIZE_UNKNOWN and (
            params.content_size > max_size - len(out)
        ):
            raise _too_large(max_size)
        if params.window_size > window:
            raise ManagementError(
                ErrorCode.FRAME_TOO_LARGE,
                f"the zstd frame needs a {params.window_size}-byte window, over {window}",
            )
        d = dctx.decompressobj()
        while not d.eof:
            if pos >= len(data):
                raise _truncated("zstd")
            chunk = data[pos : pos + _ZSTD_STEP]
            pos += len(chunk)
            out += d.decompress(chunk)
            if len(out) > max_size:
                raise _too_large(max_size)
        pos -= len(d.unused_data)
    return bytes(out)


def _decompress(kind: int, data: bytes, max_size: int) -> bytes:
    try:
        if kind == Compression.NONE:
            return data
        if kind == Compression.GZIP:
            # 31: the gzip wrapper, as the type says, not raw zlib.
            return _inflate_members(
                data, max_size, "gzip", lambda: zlib.decompressobj(31), zlib_style=True
            )
        if kind == Compression.ZSTD:
            return _unzstd(data, max_size)
        if kind == Compression.LZ4:
            return _inflate_members(
                data, max_size, "lz4", lz4.frame.LZ4FrameDecompressor, zlib_style=False
            )
        if kind == Compression.BZIP2:
            return _inflate_members(data, max_size, "bzip2", bz2.BZ2Decompressor, zlib_style=False)
    except ManagementError:
        raise
    except (zlib.error, zstandard.ZstdError, OSError, RuntimeError, ValueError, EOFError) as e:
        # zlib.error, ZstdError, OSError (bz2), RuntimeError (lz4): corrupt data.
        name = Compression(kind).name.lower()
        raise ManagementError(ErrorCode.BAD_COMPRESSION, f"corrupt {name} data: {e}") from None
    raise ManagementError(ErrorCode.BAD_COMPRESSION, f"unknown compression type {kind}")


# -- encryption ---------------------------------------------------------------


def _check_encryption(kind: int, key: bytes | None) -> bytes | None:
    """The key to use for ``kind`` (None for no encryption), or why not."""
    if kind == Encryption.NONE:
        return None
    if kind in _PGMONETA_ONLY_ENCRYPTIONS:
        raise ManagementError(
            ErrorCode.BAD_ENCRYPTION,
            f"encryption type {kind} ({_PGMONETA_ONLY_ENCRYPTIONS[kind]}) is not supported: "
            f"use {int(Encryption.AES_256_GCM)} (AES-256-GCM)",
        )
    if kind != Encryption.AES_256_GCM:
        raise ManagementError(ErrorCode.BAD_ENCRYPTION, f"unknown encryption type {kind}")
    if key is None:
        raise ManagementError(
            ErrorCode.BAD_ENCRYPTION, "AES-256-GCM requested but no encryption key is configured"
        )
    if len(key) != KEY_SIZE:
        raise ManagementError(ErrorCode.BAD_ENCRYPTION, f"the key is not {KEY_SIZE} bytes")
    return key


def _check_compression(kind: int) -> None:
    try:
        Compression(kind)
    except ValueError:
        raise ManagementError(
            ErrorCode.BAD_COMPRESSION, f"unknown compression type {kind}"
        ) from None


def check_types(compression: int, encryption: int, key: bytes | None) -> None:
    """Refuse unknown types or a missing key from the header alone, before any body."""
    _check_compression(compression)
    _check_encryption(encryption, key)


def encode(
    document: dict[str, Any],
    compression: int = 0,
    encryption: int = 0,
    key: bytes | None = None,
) -> bytes:
    """A whole frame, header included: JSON, then compressed, then encrypted."""
    _check_compression(compression)
    aes_key = _check_encryption(encryption, key)
    payload = _compress(compression, dumps(document))
    if aes_key is not None:
        # A random 96-bit nonce per frame: collisions become likely only
        # after ~2**32 frames under one key, far beyond a management port.
        nonce = os.urandom(NONCE_SIZE)
        payload = nonce + AESGCM(aes_key).encrypt(nonce, payload, bytes((compression, encryption)))
    if len(payload) > 0xFFFFFFFF:
        raise ManagementError(ErrorCode.FRAME_TOO_LARGE, "the document is over 4 GB")
    return HEADER.pack(compression, encryption, len(payload)) + payload


def decode(
    compression: int,
    encryption: int,
    payload: bytes,
    *,
    key: bytes | None,
    max_size: int,
) -> dict[str, Any]:
    """Reverse :func:`encode` for a frame's payload; the document is at most ``max_size``."""
    _check_compression(compression)
    aes_key = _check_encryption(encryption, key)
    if len(payload) > max_size:
        raise ManagementError(
            ErrorCode.FRAME_TOO_LARGE, f"the frame is {len(payload)} bytes, over {max_size}"
        )
    if aes_key is not None:
        if len(payload) < NONCE_SIZE + TAG_SIZE:
            raise ManagementError(
                ErrorCode.BAD_ENCRYPTION, "the encrypted payload is shorter than nonce and tag"
            )
        try:
            payload = AESGCM(aes_key).decrypt(
                payload[:NONCE_SIZE], payload[NONCE_SIZE:], bytes((compression, encryption))
            )
        except InvalidTag:
            raise ManagementError(
                ErrorCode.BAD_ENCRYPTION,
                "the frame does not authenticate (wrong key, or altered in transit)",
            ) from None
    return loads(_decompress(compression, payload, max_size))


# -- streams ------------------------------------------------------------------


async def read_frame(
    reader: asyncio.StreamReader, *, max_size: int, key: bytes | None
) -> Frame | None:
    """Read one frame; None on a clean end of stream before its first byte."""
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ManagementError(
            ErrorCode.BAD_FRAME, f"truncated frame header: {len(e.partial)} of {HEADER.size} bytes"
        ) from None
    compression, encryption, length = HEADER.unpack(head)
    # Refuse from the header alone: no body is read, no buffer of `length` made.
    if length > max_size:
        raise ManagementError(
            ErrorCode.FRAME_TOO_LARGE, f"the frame announces {length} bytes, over {max_size}"
        )
    check_types(compression, encryption, key)
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise ManagementError(
            ErrorCode.BAD_FRAME, f"truncated frame: {len(e.partial)} of {length} bytes"
        ) from None
    document = decode(compression, encryption, payload, key=key, max_size=max_size)
    return Frame(compression, encryption, document)


async def write_frame(
    writer: asyncio.StreamWriter,
    document: dict[str, Any],
    compression: int = 0,
    encryption: int = 0,
    key: bytes | None = None,
) -> None:
    """Encode and send one frame, waiting until the transport takes it."""
    writer.write(encode(document, compression, encryption, key))
    await writer.drain()
