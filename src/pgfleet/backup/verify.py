"""Check a stored backup without restoring it: every byte read back and compared.

For each stored file of the backup: its chunks are authenticated (or their
CRCs checked) and decompressed by :mod:`store`, and the SHA-256 of what comes
out is compared with the one recorded when it was written (catalog's
``checksums``), which catches a whole file swapped for another one sealed
with the same key.  The manifest is parsed (its own checksum checked), and
every file of ``base.tar`` is compared with it: size and SHA-256.  The first
problem is reported, naming the stored file, the chunk, or the file of the
data directory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

from pgfleet.backup import manifest as manifests
from pgfleet.backup.catalog import BackupInfo, Catalog, State
from pgfleet.backup.store import CHUNK_SIZE, FileReader, StorageError, open_read, strip_suffix

__all__ = ["HashingReader", "VerifyResult", "stored_file", "verify"]

BASE_TAR = "base.tar"
MANIFEST = "backup_manifest"
# What verify_tar skips: the WAL (not in the manifest) and the manifest itself.
IGNORE = frozenset({MANIFEST, "pg_wal"})


@dataclass(frozen=True)
class VerifyResult:
    backup: BackupInfo
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


class HashingReader:
    """A stored file's reader that hashes what goes through it (for tarfile and friends)."""

    def __init__(self, reader: FileReader) -> None:
        self._reader = reader
        self.hash = hashlib.sha256()

    def read(self, size: int = -1, /) -> bytes:
        data = self._reader.read(size)
        self.hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK_SIZE):
            pass


def stored_file(catalog: Catalog, info: BackupInfo, name: str) -> Path:
    """The stored file of a backup whose name, suffix aside, is ``name``."""
    for f in info.files:
        if strip_suffix(f) == name:
            return catalog.backup_dir(info.id) / f
    raise StorageError(f"backup {info.id} of server {catalog.server!r} has no {name}")


def read_manifest(catalog: Catalog, info: BackupInfo, key: bytes | None) -> manifests.Manifest:
    path = stored_file(catalog, info, MANIFEST)
    with open_read(path, key) as r:
        hashing = HashingReader(r)
        data = hashing.read()
    _check_sha(info, path, hashing)
    return manifests.parse(data, name=str(path))


def _check_sha(info: BackupInfo, path: Path, hashing: HashingReader) -> None:
    expected = info.checksums.get(path.name)
    if expected is not None and hashing.hash.hexdigest() != expected:
        raise StorageError(
            f"{path}: its content is not what was stored (SHA-256 differs from backup.json)"
        )


def verify(catalog: Catalog, backup_id: str, key: bytes | None) -> VerifyResult:
    """Check one backup (an ID, ``latest`` or ``oldest``); problems listed, the first one first.

    Raises only for a backup that does not exist.
    """
    info = catalog.get(backup_id)
    if info.state is not State.VALID:
        why = f": {info.error}" if info.error else ""
        return VerifyResult(info, [f"backup {info.id} is {info.state}{why}"])
    checked = 0
    try:
        manifest = read_manifest(catalog, info, key)
        checked += 1
        path = stored_file(catalog, info, BASE_TAR)
        with open_read(path, key) as r:
            hashing = HashingReader(r)
            problems = manifests.verify_tar(
                cast(IO[bytes], hashing), manifest, first_only=True, ignore=IGNORE
            )
            hashing.drain()
        checked += 1
        if problems:
            return VerifyResult(info, [f"{path.name}: {problems[0]}"], checked)
        _check_sha(info, path, hashing)
        for name in info.files:
            if strip_suffix(name) in (BASE_TAR, MANIFEST):
                continue
            # Whatever else a backup holds (none yet): read back whole.
            with open_read(catalog.backup_dir(info.id) / name, key) as r:
                hashing = HashingReader(r)
                hashing.drain()
            _check_sha(info, catalog.backup_dir(info.id) / name, hashing)
            checked += 1
    except StorageError as e:
        return VerifyResult(info, [str(e)], checked)
    return VerifyResult(info, [], checked)
