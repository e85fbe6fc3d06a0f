"""Backup manifests: parsing (real ones from pg_basebackup too), verifying tars and directories."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pgfleet.backup import manifest
from pgfleet.backup.manifest import (
    FileEntry,
    ManifestError,
    parse,
    verify_dir,
    verify_stream,
    verify_tar,
)
from pgfleet.backup.store import Codec, Compression, StorageError, copy_in, open_read, open_write
from pgfleet.cluster import Cluster
from tests.fix_clusters import NewCluster

KEY = bytes(range(32))


def make_manifest(files: dict[str, bytes], *, version: int = 2, algorithm: str = "SHA256") -> bytes:
    """A manifest laid out as PostgreSQL writes it, its checksum right."""
    lines = [f'{{ "PostgreSQL-Backup-Manifest-Version": {version},']
    if version >= 2:
        lines.append('"System-Identifier": 7412345678901234567,')
    lines.append('"Files": [')
    entries = []
    for path, data in files.items():
        e: dict[str, Any] = {
            "Path": path,
            "Size": len(data),
            "Last-Modified": "2026-12-01 10:00:00 GMT",
        }
        if algorithm != "NONE":
            e["Checksum-Algorithm"] = algorithm
            e["Checksum"] = (
                hashlib.new(algorithm.lower(), data).hexdigest()
                if algorithm != "CRC32C"
                else "0badcafe"
            )
        entries.append(json.dumps(e))
    lines.append(",\n".join(entries))
    lines.append("],")
    lines.append('"WAL-Ranges": [')
    lines.append('{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }')
    lines.append("],")
    body = "\n".join(lines) + "\n"
    checksum = hashlib.sha256(body.encode()).hexdigest()
    return (body + f'"Manifest-Checksum": "{checksum}"}}\n').encode()


FILES = {
    "backup_label": b"START WAL LOCATION: 0/2000028\n",
    "global/pg_control": bytes(range(256)) * 32,
    "base/1/1259": b"\1" * 20000,
    "base/1/1259_fsm": b"",
    "pg_tblspc/16385/PG_18_202406281/5/16386": b"tablespace data",
}


def make_tar(
    files: dict[str, bytes], *, skip: str = "", extra: dict[str, bytes] | None = None
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for d in ("global", "base", "base/1", "pg_wal"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for path, data in {**files, **(extra or {})}.items():
            if path == skip or path.startswith("pg_tblspc/"):
                continue
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("pg_tblspc/16385")
        link.type = tarfile.SYMTYPE
        link.linkname = "/somewhere"
        tf.addfile(link)
    return buf.getvalue()


# -- parsing -------------------------------------------------------------------------


def test_parse_version_2() -> None:
    m = parse(make_manifest(FILES))
    assert m.version == 2 and m.system_identifier == 7412345678901234567
    assert [f.path for f in m.files] == list(FILES)
    assert m.files[1] == FileEntry(
        "global/pg_control", 8192, "SHA256", hashlib.sha256(FILES["global/pg_control"]).hexdigest()
    )
    assert m.wal_ranges == (manifest.WalRange(1, "0/2000028", "0/2000100"),)
    assert len(m.checksum) == 64


@pytest.mark.parametrize("algorithm", ["SHA224", "SHA384", "SHA512", "NONE"])
def test_parse_other_algorithms(algorithm: str) -> None:
    m = parse(make_manifest(FILES, version=1, algorithm=algorithm))
    assert m.version == 1 and m.system_identifier is None
    assert {f.algorithm for f in m.files} == {algorithm}
    assert verify_tar(io.BytesIO(make_tar(FILES)), m) == []
    if algorithm == "NONE":
        assert all(f.checksum is None for f in m.files)


def test_encoded_path() -> None:
    data = make_manifest({"base/1/x": b"abc"}).replace(
        b'"Path": "base/1/x"', b'"Encoded-Path": "626173652f312fff"'
    )
    # The checksum no longer matches: recompute it as PostgreSQL would have.
    body = data[: data.rindex(b'"Manifest-Checksum"')]
    data = body + b'"Manifest-Checksum": "%s"}\n' % hashlib.sha256(body).hexdigest().encode()
    (entry,) = parse(data).files
    assert entry.path == os.fsdecode(b"base/1/\xff")


def damaged(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data
    return data.replace(old, new, 1)


GOOD = make_manifest(FILES)


@pytest.mark.parametrize(
    "data, message",
    [
        (damaged(GOOD, b'"Size": 20000', b'"Size": 20001'), "manifest checksum mismatch"),
        (GOOD[:-1], "last line not newline-terminated"),
        (GOOD[: len(GOOD) // 2] + b"\n", "not valid JSON"),
        (b"[]\n\n", "not a JSON object"),
        (b"{}\n", "expected at least 2 lines"),
        (damaged(GOOD, b'Version": 2', b'Version": 3'), "unsupported manifest version 3"),
        (damaged(GOOD, b'"Manifest-Checksum"', b'"Manifest-Chucksum"'), "no Manifest-Checksum"),
    ],
)
def test_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse(data, name="/backups/db1/x/backup_manifest.zst")
    text = str(info.value)
    assert text.startswith("/backups/db1/x/backup_manifest.zst: ") and message in text
    assert "\n" not in text


def resealed(data: bytes) -> bytes:
    body = data[: data.rindex(b'"Manifest-Checksum"')]
    return body + b'"Manifest-Checksum": "%s"}\n' % hashlib.sha256(body).hexdigest().encode()


@pytest.mark.parametrize(
    "old, new, message",
    [
        (b'"Size": 20000', b'"Size": "20000"', "base/1/1259: Size missing or not an integer"),
        (b'"Size": 20000', b'"Size": -1', "base/1/1259: Size missing or not an integer"),
        (
            b'"Checksum-Algorithm": "SHA256"',
            b'"Checksum-Algorithm": "MD5"',
            "unknown Checksum-Algorithm 'MD5'",
        ),
        (b'"Checksum": "', b'"Checksum": "zz', "Checksum missing or not hexadecimal"),
        (b'"Path": "base/1/1259"', b'"Path": "base/1/1259_fsm"', "listed twice"),
        (b'"Path": "base/1/1259"', b'"Pith": "base/1/1259"', "Files[2] has no Path"),
        (
            b'"System-Identifier": 7412345678901234567',
            b'"System-Identifier": "x"',
            "System-Identifier",
        ),
        (b'"Timeline": 1', b'"Timeline": "1"', "WAL-Ranges[0]"),
    ],
)
def test_parse_bad_fields(old: bytes, new: bytes, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse(resealed(damaged(GOOD, old, new)))
    assert message in str(info.value)


# -- verifying -------------------------------------------------------------------------


def test_verify_stream() -> None:
    entry = parse(GOOD).files[2]
    assert verify_stream(entry, io.BytesIO(FILES["base/1/1259"])) is None
    assert verify_stream(entry, io.BytesIO(FILES["base/1/1259"][:-1])) == (
        "base/1/1259: 19999 bytes, the manifest says 20000"
    )
    bad = b"\2" + FILES["base/1/1259"][1:]
    assert verify_stream(entry, io.BytesIO(bad)) == "base/1/1259: SHA256 checksum mismatch"


def test_verify_tar_finds_each_kind_of_problem() -> None:
    m = parse(GOOD)
    assert verify_tar(io.BytesIO(make_tar(FILES)), m) == []
    bad = dict(FILES, **{"base/1/1259": b"\1" * 19999 + b"\2"})
    problems = verify_tar(
        io.BytesIO(
            make_tar(
                bad,
                skip="backup_label",
                extra={"base/1/new": b"x", "pg_wal/000000010000000000000002": b"w"},
            )
        ),
        m,
    )
    assert problems == [
        "base/1/1259: SHA256 checksum mismatch",
        "base/1/new: in the backup but not in the manifest",
        "backup_label: in the manifest but not in the backup",
    ]
    tar = make_tar(bad, skip="backup_label", extra={"base/1/new": b"x"})
    assert verify_tar(io.BytesIO(tar), m, first_only=True) == [
        "base/1/1259: SHA256 checksum mismatch"
    ]
    assert verify_tar(io.BytesIO(b"not a tar" * 100), m, first_only=True)[0].startswith(
        "not a valid tar"
    )


def test_verify_tar_of_a_tablespace() -> None:
    m = parse(GOOD)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("PG_18_202406281/5/16386")
        info.size = len(b"tablespace data")
        tf.addfile(info, io.BytesIO(b"tablespace data"))
    assert verify_tar(io.BytesIO(buf.getvalue()), m, prefix="pg_tblspc/16385/") == []
    empty = io.BytesIO()
    tarfile.open(fileobj=empty, mode="w").close()
    assert verify_tar(io.BytesIO(empty.getvalue()), m, prefix="pg_tblspc/16385/") == [
        "pg_tblspc/16385/PG_18_202406281/5/16386: in the manifest but not in the backup"
    ]


def test_crc32c_is_parsed_but_not_verified() -> None:
    m = parse(make_manifest(FILES, algorithm="CRC32C"))
    assert m.files[0].algorithm == "CRC32C"
    with pytest.raises(
        ManifestError,
        match=r"CRC32C checksums are not supported by pgfleet \(take backups with --manifest-checksums=SHA256\)",
    ):
        verify_tar(io.BytesIO(make_tar(FILES)), m)


def test_verify_tar_reads_a_stored_file_to_its_end(tmp_path: Path) -> None:
    """Damage after the tar's end-of-archive blocks (in its padding) is still found."""
    path = tmp_path / "base.tar.aes"
    tar = make_tar(FILES)
    with open_write(path, Codec(Compression.NONE, key=KEY), chunk_size=512) as w:
        w.write(tar)
    with open_read(path, KEY) as r:
        assert verify_tar(r, parse(GOOD)) == []
    last = len(tar) // 512 - 1  # a chunk of nothing but padding
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=f"chunk {last} at offset"), open_read(path, KEY) as r:
        verify_tar(r, parse(GOOD))


# -- real manifests ------------------------------------------------------------------


@dataclass
class RealBackup:
    cluster: Cluster
    directory: Path
    manifest: manifest.Manifest


def pg_basebackup(cluster: Cluster, target: Path, *extra: str) -> None:
    """``pg_basebackup -Ft`` of ``cluster`` into ``target``, as we are, over TCP."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    cmd = [
        str(cluster.bin_dir / "pg_basebackup"),
        "-D", str(target), "-Ft", "-X", "stream", "--checkpoint=fast", "--no-sync",
        "--manifest-checksums=SHA256",
        "-h", cluster.host, "-p", str(cluster.port), "-U", "postgres", *extra,
    ]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module", params=["pg18", "pg15"])
def real(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealBackup]:
    """A real ``pg_basebackup -Ft --manifest-checksums=SHA256`` of each server version."""
    cluster: Cluster = request.getfixturevalue(request.param)
    # Nothing is created on these shared clusters: their catalogs are files enough.
    target = tmp_path_factory.mktemp(f"basebackup-{request.param}")
    pg_basebackup(cluster, target)
    data = (target / "backup_manifest").read_bytes()
    yield RealBackup(cluster, target, parse(data, name=str(target / "backup_manifest")))
    shutil.rmtree(target, ignore_errors=True)


def test_real_manifest(real: RealBackup) -> None:
    m = real.manifest
    (sysid,) = real.cluster.execute("SELECT system_identifier FROM pg_control_system()")[0]
    if real.cluster.version_num >= 170000:
        assert m.version == 2 and m.system_identifier == sysid
    else:
        assert m.version == 1 and m.system_identifier is None
    paths = {f.path for f in m.files}
    assert {"backup_label", "global/pg_control", "PG_VERSION"} <= paths
    assert {f.algorithm for f in m.files} == {"SHA256"}
    assert len(m.files) > 500  # every relation file of every database
    assert [r.timeline for r in m.wal_ranges] == [1]
    assert sorted(os.listdir(real.directory)) == ["backup_manifest", "base.tar", "pg_wal.tar"]


def test_real_tar_verifies_plain_and_stored(real: RealBackup, tmp_path: Path) -> None:
    base = real.directory / "base.tar"
    with open(base, "rb") as f:
        assert verify_tar(f, real.manifest) == []
    stored = tmp_path / "base.tar.zst.aes"
    with open(base, "rb") as f:
        copy_in(f, stored, Codec(key=KEY))
    with open_read(stored, KEY) as r:
        assert verify_tar(r, real.manifest) == []


def test_real_tar_with_a_flipped_byte(real: RealBackup, tmp_path: Path) -> None:
    """A byte flipped inside a file's data: verify names that file (and only it)."""
    base = real.directory / "base.tar"
    with tarfile.open(base) as tf:
        member = next(m for m in tf if m.isfile() and m.name.startswith("base/") and m.size >= 8192)
    damaged_tar = tmp_path / "base.tar"
    data = bytearray(base.read_bytes())
    data[member.offset_data + 4000] ^= 0x01
    damaged_tar.write_bytes(bytes(data))
    with open(damaged_tar, "rb") as f:
        assert verify_tar(f, real.manifest) == [f"{member.name}: SHA256 checksum mismatch"]
    stored = tmp_path / "base.tar.lz4"
    with open(damaged_tar, "rb") as f:
        copy_in(f, stored, Codec("lz4"))  # type: ignore[arg-type]
    with open_read(stored, None) as r:
        assert verify_tar(r, real.manifest, first_only=True) == [
            f"{member.name}: SHA256 checksum mismatch"
        ]


def test_real_data_directory(real: RealBackup, tmp_path: Path) -> None:
    datadir = tmp_path / "data"
    datadir.mkdir()
    with tarfile.open(real.directory / "base.tar") as tf:
        tf.extractall(datadir, filter="tar")
    assert verify_dir(datadir, real.manifest) == []
    victim = datadir / "global" / "pg_control"
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    (datadir / "PG_VERSION").unlink()
    assert sorted(verify_dir(datadir, real.manifest)) == [
        "PG_VERSION: in the manifest but not in " + str(datadir),
        "global/pg_control: SHA256 checksum mismatch",
    ]
    assert len(verify_dir(datadir, real.manifest, first_only=True)) == 1


def test_real_tablespace(new_cluster: NewCluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A tablespace comes in its own <oid>.tar, checked with prefix pg_tblspc/<oid>/."""
    cluster = new_cluster("manifest-ts")
    location = cluster.datadir.parent / f"{cluster.datadir.name}-ts"
    location.mkdir(mode=0o700)
    if cluster.os_user is not None:
        shutil.chown(location, cluster.os_user, cluster.os_user)
    cluster.execute(f"CREATE TABLESPACE ts LOCATION '{location}'")
    cluster.execute("CREATE TABLE in_ts TABLESPACE ts AS SELECT g FROM generate_series(1, 10000) g")
    (oid,) = cluster.execute("SELECT oid FROM pg_tablespace WHERE spcname = 'ts'")[0]
    target = tmp_path_factory.mktemp("basebackup-ts")
    pg_basebackup(cluster, target)
    m = parse((target / "backup_manifest").read_bytes())
    assert any(f.path.startswith(f"pg_tblspc/{oid}/") for f in m.files)
    with open(target / "base.tar", "rb") as f:
        assert verify_tar(f, m) == []
    with open(target / f"{oid}.tar", "rb") as f:
        assert verify_tar(f, m, prefix=f"pg_tblspc/{oid}/") == []
    with open(target / f"{oid}.tar", "rb") as f:
        # The wrong prefix: every file is unknown, every expected one missing.
        problems = verify_tar(f, m, prefix="pg_tblspc/1/")
    assert problems and all("in the backup but not in the manifest" in p for p in problems)
