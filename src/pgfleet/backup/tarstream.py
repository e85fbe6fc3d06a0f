"""A tar archive read as it goes by, in pieces of any size: no file, no seek, no thread.

pg_basebackup's output is watched with it while it is being stored (every
file hashed, ``backup_manifest`` kept), and a stored archive is unpacked with
it at restore, each file hashed as it is written.  The tar it reads is what
PostgreSQL writes (ustar headers) and what GNU and pax tar write for long
names; every header's checksum is checked, so a damaged header is an error
rather than a shifted, garbled rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Digests", "Member", "Sink", "TarError", "TarReader"]

BLOCK = 512
_KINDS = {"0": "file", "7": "file", "5": "dir", "2": "symlink", "1": "hardlink"}
_NO_CONTENT = frozenset("123456")


class TarError(ValueError):
    """The bytes are not a well-formed tar archive."""


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    kind: str  # "file", "dir", "symlink", "hardlink", "other"
    mode: int
    linkname: str = ""


class Sink(Protocol):
    def write(self, data: memoryview) -> None: ...
    def close(self) -> None: ...


# Called at each member's header: where its content goes (None: nowhere).
Opener = Callable[[Member], Sink | None]


class TarReader:
    """Feed it bytes; it calls ``opener`` for each member and writes the content to its sink."""

    def __init__(self, opener: Opener) -> None:
        self._opener = opener
        self._header = bytearray()
        self._remaining = 0  # content bytes of the current member still to come
        self._padding = 0
        self._sink: Sink | None = None
        self._special: bytearray | None = None  # the content of a GNU 'L' or pax 'x' entry
        self._special_kind = ""
        self._long_name: str | None = None
        self._zero_blocks = 0
        self.ended = False
        self.members = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        i, n = 0, len(view)
        while i < n:
            if self.ended:
                return  # the zero padding after the end marker
            if self._remaining:
                take = min(self._remaining, n - i)
                piece = view[i : i + take]
                if self._special is not None:
                    self._special += piece
                elif self._sink is not None:
                    self._sink.write(piece)
                i += take
                self._remaining -= take
                if not self._remaining:
                    self._end_member()
                continue
            if self._padding:
                take = min(self._padding, n - i)
                i += take
                self._padding -= take
                continue
            take = min(BLOCK - len(self._header), n - i)
            self._header += view[i : i + take]
            i += take
            if len(self._header) == BLOCK:
                block = bytes(self._header)
                self._header.clear()
                self._on_header(block)

    def close(self) -> None:
        """The archive is over: complain if it was cut short."""
        if self._remaining or self._header or self._special is not None:
            raise TarError("the archive ends in the middle of a member")
        if not self.ended:
            raise TarError("the archive has no end marker (cut short?)")

    def _on_header(self, block: bytes) -> None:
        if block == bytes(BLOCK):
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                self.ended = True
            return
        if self._zero_blocks:
            raise TarError("a member follows an empty block")
        stored = _number(block[148:156])
        actual = sum(block[:148]) + 8 * 32 + sum(block[156:])
        if stored != actual:
            raise TarError(f"damaged tar header after {self.members} members")
        name = _text(block[0:100])
        if block[257:263] == b"ustar\0" and block[345]:
            name = _text(block[345:500]) + "/" + name
        size = _number(block[124:136])
        flag = chr(block[156]) if block[156] else "0"
        mode = _number(block[100:108]) & 0o7777
        linkname = _text(block[157:257])
        if flag in "Lxg":
            # Metadata for the next member (g: for all of them, ignored).
            self._special = bytearray()
            self._special_kind = flag
        else:
            if self._long_name is not None:
                name, self._long_name = self._long_name, None
            kind = _KINDS.get(flag, "other")
            if flag in _NO_CONTENT:
                # As Python's tarfile: links, devices, directories and FIFOs
                # have no content, whatever their size field says.
                size = 0
            member = Member(name.rstrip("/") if kind == "dir" else name, size, kind, mode,
                            linkname)  # fmt: skip
            self.members += 1
            self._sink = self._opener(member)
        self._remaining = size
        self._padding = -size % BLOCK
        if not self._remaining:
            self._end_member()

    def _end_member(self) -> None:
        if self._special is not None:
            data, kind = bytes(self._special), self._special_kind
            self._special = None
            if kind == "L":
                self._long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif kind == "x":
                path = _pax_path(data)
                if path is not None:
                    self._long_name = path
            return
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.close()


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    if field[0] & 0x80:
        # GNU base-256, for sizes past 8 GB.
        value = field[0] & 0x7F
        for b in field[1:]:
            value = value << 8 | b
        return value
    text = field.split(b"\0", 1)[0].strip(b" \0")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarError(f"bad number {field!r} in a tar header") from None


def _pax_path(data: bytes) -> str | None:
    path = None
    i = 0
    while i < len(data):
        space = data.find(b" ", i)
        if space < 0:
            break
        try:
            length = int(data[i:space])
        except ValueError:
            raise TarError("bad pax header") from None
        record = data[space + 1 : i + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        i += length
    return path


class _Hasher:
    def __init__(self, member: Member, files: dict[str, tuple[int, str]],
                 keep: bytearray | None) -> None:  # fmt: skip
        self._member = member
        self._files = files
        self._hash = hashlib.sha256()
        self._size = 0
        self._keep = keep

    def write(self, data: memoryview) -> None:
        self._hash.update(data)
        self._size += len(data)
        if self._keep is not None:
            self._keep += data

    def close(self) -> None:
        self._files[self._member.name] = (self._size, self._hash.hexdigest())


class Digests:
    """Every regular file's size and SHA-256 of a tar stream, and a few files' bytes."""

    def __init__(self, keep: tuple[str, ...] = ("backup_manifest",)) -> None:
        self.files: dict[str, tuple[int, str]] = {}
        self.kept: dict[str, bytearray] = {}
        self._keep = keep
        self.reader = TarReader(self._open)

    def _open(self, member: Member) -> Sink | None:
        if member.kind != "file":
            return None
        keep = None
        if member.name in self._keep:
            keep = self.kept.setdefault(member.name, bytearray())
        return _Hasher(member, self.files, keep)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.reader.feed(data)

    def close(self) -> None:
        self.reader.close()
