"""PostgreSQL's backup manifests: read them, and check a backup's files against them.

``pg_basebackup`` writes ``backup_manifest``, a JSON document listing every
file of the backup with its size and checksum, the WAL range the backup
needs, and (PostgreSQL 17+, manifest version 2) the system identifier; its
last line holds the SHA-256 of everything before it.

pgfleet asks for ``--manifest-checksums=SHA256``; SHA-224/384/512 and NONE
(sizes only) are checked as well.  PostgreSQL's default, CRC-32C, is not: no
library pgfleet depends on computes it, and a pure-Python one would be
slower than the disk.  Such a manifest is still parsed (an incremental
backup needs its parent's manifest), but verifying against it is refused
with an error that says so.

Verification reads each file once, streamed, as :mod:`store` hands it back
decrypted and decompressed: a tar of any size is checked in bounded memory.
As ``pg_verifybackup`` does by default, ``backup_manifest``, ``pg_wal``,
``postgresql.auto.conf``, ``standby.signal`` and ``recovery.signal`` are not
checked (``pg_basebackup -R`` edits or adds them).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pgfleet.backup.store import CHUNK_SIZE, Readable, StorageError

__all__ = [
    "DEFAULT_IGNORE",
    "FileEntry",
    "Manifest",
    "ManifestError",
    "WalRange",
    "parse",
    "verify_dir",
    "verify_stream",
    "verify_tar",
]


class ManifestError(StorageError):
    """A manifest is unreadable, or asks for a check pgfleet cannot do; one line."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a backup: its path in the data directory, size and checksum."""

    path: str
    size: int
    algorithm: str  # "SHA256"..., "CRC32C", or "NONE"
    checksum: str | None  # lowercase hex; None when algorithm is NONE


@dataclass(frozen=True)
class WalRange:
    """WAL a backup needs to be consistent, on one timeline."""

    timeline: int
    start_lsn: str
    end_lsn: str


@dataclass(frozen=True)
class Manifest:
    version: int
    system_identifier: int | None
    files: tuple[FileEntry, ...]
    wal_ranges: tuple[WalRange, ...]
    checksum: str = ""  # the manifest's own SHA-256, as its last line says


_HASHES: dict[str, Callable[[], Any]] = {
    "SHA224": hashlib.sha224,
    "SHA256": hashlib.sha256,
    "SHA384": hashlib.sha384,
    "SHA512": hashlib.sha512,
}
_KNOWN = {*_HASHES, "CRC32C", "NONE"}

DEFAULT_IGNORE = frozenset(
    {"backup_manifest", "pg_wal", "postgresql.auto.conf", "recovery.signal", "standby.signal"}
)


def parse(data: bytes, *, name: str = "backup_manifest") -> Manifest:
    """Parse a manifest, its own checksum checked first; ManifestError naming ``name``."""

    def bad(why: str) -> ManifestError:
        return ManifestError(f"{name}: {why}")

    # As PostgreSQL: the checksum covers everything up to the last line,
    # which must end the file.
    if not data.endswith(b"\n"):
        raise bad("last line not newline-terminated (truncated?)")
    penultimate = data.rfind(b"\n", 0, len(data) - 1)
    if penultimate < 0:
        raise bad("expected at least 2 lines")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise bad(f"not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")

    version = doc.get("PostgreSQL-Backup-Manifest-Version")
    if version not in (1, 2) or isinstance(version, bool):
        raise bad(f"unsupported manifest version {version!r}")
    expected = doc.get("Manifest-Checksum")
    if not isinstance(expected, str):
        raise bad("no Manifest-Checksum")
    actual = hashlib.sha256(data[: penultimate + 1]).hexdigest()
    if expected.lower() != actual:
        raise bad(f"manifest checksum mismatch (it says {expected}, computed {actual})")

    system_identifier = doc.get("System-Identifier")
    if version >= 2:
        if not _is_int(system_identifier):
            raise bad("System-Identifier missing or not an integer")
    elif system_identifier is not None:
        raise bad("System-Identifier in a version 1 manifest")

    files = doc.get("Files")
    if not isinstance(files, list):
        raise bad("Files missing or not a list")
    entries = tuple(_file_entry(f, i, bad) for i, f in enumerate(files))
    seen: set[str] = set()
    for entry in entries:
        if entry.path in seen:
            raise bad(f"file {entry.path!r} listed twice")
        seen.add(entry.path)

    ranges = doc.get("WAL-Ranges")
    if not isinstance(ranges, list):
        raise bad("WAL-Ranges missing or not a list")
    wal = tuple(_wal_range(r, i, bad) for i, r in enumerate(ranges))
    return Manifest(version, system_identifier, entries, wal, actual)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _file_entry(item: Any, i: int, bad: Callable[[str], ManifestError]) -> FileEntry:
    if not isinstance(item, dict):
        raise bad(f"Files[{i}] is not an object")
    if "Path" in item:
        path = item["Path"]
        if not isinstance(path, str):
            raise bad(f"Files[{i}]: Path is not a string")
    elif "Encoded-Path" in item:
        # A name that is not valid UTF-8, hex-encoded; decoded the way
        # os and tarfile decode such names, so that they compare equal.
        try:
            path = os.fsdecode(bytes.fromhex(item["Encoded-Path"]))
        except (TypeError, ValueError):
            raise bad(f"Files[{i}]: bad Encoded-Path") from None
    else:
        raise bad(f"Files[{i}] has no Path")
    size = item.get("Size")
    if not isinstance(size, int) or not _is_int(size):
        raise bad(f"{path}: Size missing or not an integer")
    algorithm = item.get("Checksum-Algorithm", "NONE")
    if not isinstance(algorithm, str) or algorithm.upper() not in _KNOWN:
        raise bad(f"{path}: unknown Checksum-Algorithm {algorithm!r}")
    algorithm = algorithm.upper()
    checksum = item.get("Checksum")
    if algorithm == "NONE":
        checksum = None
    elif not isinstance(checksum, str) or not _is_hex(checksum):
        raise bad(f"{path}: Checksum missing or not hexadecimal")
    else:
        checksum = checksum.lower()
    return FileEntry(path, size, algorithm, checksum)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return bool(text)


def _wal_range(item: Any, i: int, bad: Callable[[str], ManifestError]) -> WalRange:
    if not isinstance(item, dict):
        raise bad(f"WAL-Ranges[{i}] is not an object")
    timeline, start, end = item.get("Timeline"), item.get("Start-LSN"), item.get("End-LSN")
    if (
        not isinstance(timeline, int)
        or not _is_int(timeline)
        or not isinstance(start, str)
        or not isinstance(end, str)
    ):
        raise bad(f"WAL-Ranges[{i}]: Timeline, Start-LSN or End-LSN missing or mistyped")
    return WalRange(timeline, start, end)


# -- verification -------------------------------------------------------------------


def _hasher(entry: FileEntry) -> Any:
    if entry.algorithm == "NONE":
        return None
    if entry.algorithm in _HASHES:
        return _HASHES[entry.algorithm]()
    raise ManifestError(
        f"{entry.path}: {entry.algorithm} checksums are not supported by pgfleet"
        " (take backups with --manifest-checksums=SHA256)"
    )


def verify_stream(entry: FileEntry, stream: Readable) -> str | None:
    """Read ``stream`` to its end: None if it is the file ``entry`` describes, else what differs."""
    hasher = _hasher(entry)
    size = 0
    while data := stream.read(CHUNK_SIZE):
        size += len(data)
        if hasher is not None:
            hasher.update(data)
    if size != entry.size:
        return f"{entry.path}: {size} bytes, the manifest says {entry.size}"
    if hasher is not None and hasher.hexdigest() != entry.checksum:
        return f"{entry.path}: {entry.algorithm} checksum mismatch"
    return None


def _ignored(path: str, ignore: Collection[str]) -> bool:
    return any(path == i or path.startswith(i + "/") for i in ignore)


def _expected(manifest: Manifest, prefix: str, ignore: Collection[str]) -> dict[str, FileEntry]:
    """The manifest's files that belong in one tar: tablespaces each have their own."""
    if prefix:
        files = (e for e in manifest.files if e.path.startswith(prefix))
    else:
        files = (e for e in manifest.files if not e.path.startswith("pg_tblspc/"))
    out = {e.path: e for e in files if not _ignored(e.path, ignore)}
    for entry in out.values():
        _hasher(entry)  # refuse CRC32C up front, not once per file
    return out


def verify_tar(
    stream: IO[bytes],
    manifest: Manifest,
    *,
    prefix: str = "",
    first_only: bool = False,
    ignore: Collection[str] = DEFAULT_IGNORE,
) -> list[str]:
    """Check a tar stream against the manifest; return the problems, [] if none.

    ``prefix`` maps member names to manifest paths: "" for ``base.tar``,
    ``pg_tblspc/<oid>/`` for a tablespace's ``<oid>.tar``.  Every regular file
    is checked; one the manifest lists but the tar lacks, or the reverse, is a
    problem too.  With ``first_only``, return at the first problem.  The
    stream is read to its end either way, so a stored file is authenticated
    whole.  Damage :mod:`store` detects is raised as StorageError, not listed.
    """
    expected = _expected(manifest, prefix, ignore)
    seen: set[str] = set()
    problems: list[str] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue  # directories, pg_tblspc's symbolic links
                name = member.name.removeprefix("./")
                path = prefix + name
                if _ignored(path, ignore):
                    continue
                entry = expected.get(path)
                if entry is None:
                    problems.append(f"{path}: in the backup but not in the manifest")
                else:
                    seen.add(path)
                    data = tf.extractfile(member)
                    assert data is not None  # a regular file's
                    if (problem := verify_stream(entry, data)) is not None:
                        problems.append(problem)
                if first_only and problems:
                    return problems
    except tarfile.TarError as e:
        problems.append(f"not a valid tar: {e}")
        if first_only:
            return problems
    problems += [
        f"{path}: in the manifest but not in the backup" for path in sorted(expected.keys() - seen)
    ]
    while stream.read(CHUNK_SIZE):
        pass
    return problems[:1] if first_only else problems


def verify_dir(
    datadir: Path,
    manifest: Manifest,
    *,
    first_only: bool = False,
    ignore: Collection[str] = DEFAULT_IGNORE,
) -> list[str]:
    """Check a data directory (a restored backup) against the manifest; [] if all is well.

    Files the manifest lists are checked; files it does not are not looked for.
    """
    problems: list[str] = []
    for entry in manifest.files:
        if _ignored(entry.path, ignore):
            continue
        try:
            with open(datadir / entry.path, "rb") as f:
                problem = verify_stream(entry, f)
        except FileNotFoundError:
            problem = f"{entry.path}: in the manifest but not in {datadir}"
        except OSError as e:
            problem = f"{entry.path}: cannot read: {e.strerror or e}"
        if problem is not None:
            problems.append(problem)
            if first_only:
                break
    return problems
