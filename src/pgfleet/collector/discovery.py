"""Which servers make up the fleet: the providers, and their sync.

- ``repository``: the servers registered with ``pgfleet server add``.
- ``static``: ``[[discovery.servers]]`` tables of the configuration file.
- ``file_sd``: files in Prometheus' file_sd format, JSON or YAML, so that
  inventory tooling can drive the fleet::

      [{"targets": ["db1.example:5432"],
        "labels": {"alias": "db1", "dbname": "app", "user": "pgfleet",
                   "password_ref": "env:DB1_PASSWORD", "frequency": "60"}}]

  A target is ``host[:port]`` (``[v6addr]:port``).  Labels pgfleet knows:
  alias (default ``host:port``; only for a group with one target), dbname,
  user, password_ref, options, frequency, coalesce; others are ignored, as
  inventories carry labels for other tools too.

Snapshots need a srvid, so servers of the last two are registered (and kept
up to date) in ``pgfleet.servers`` under their alias, marked with their
provider and where it found them (``origin``: the configuration file, the
file_sd file).  A provider only ever writes its own rows: a target whose
alias is that of a server added by hand, of ``local`` or of the other
provider's changes nothing and is not collected.  That collision is logged
as an error once (again if it ends and comes back) and counted
(``discovery``/``collision``; ``discovery``/``collisions`` is how many there
are now).  A server that leaves its provider is no longer collected; its
row and data stay until ``pgfleet server remove [--purge]``.  The rows are
written by :mod:`pgfleet.repository.servers`, the registry's one writer.

Files are polled (mtime, size, inode) every ``refresh`` seconds: no inotify,
and a file replaced by a rename, as configuration management does, is seen
like any other change.  A file that does not parse keeps its previous
targets, with an error in the log, as Prometheus does.  Files are input
from other tools, read as hostile: at most :data:`MAX_FILE_BYTES` and
:data:`MAX_TARGETS` targets each, and every value checked as ``pgfleet
server add`` checks it, so that no target can fail the registration of the
others.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml

from pgfleet.collector.stats import Stats
from pgfleet.config import DiscoveryConfig, StaticServer
from pgfleet.errors import ConfigError
from pgfleet.log import EventLogger
from pgfleet.repository import servers
from pgfleet.repository.servers import Collision, Server, validate

log = EventLogger("discovery")

# A file_sd file larger than this, or with more targets, is refused whole.
MAX_FILE_BYTES = 16 * 2**20
MAX_TARGETS = 10_000

_NUMBER_RE = re.compile(r"[0-9]+")

# Labels of a file_sd group that map to server settings.
_LABELS = {
    "alias": "alias",
    "dbname": "dbname",
    "user": "username",
    "password_ref": "password_ref",
    "options": "options",
    "frequency": "frequency",
    "coalesce": "coalesce",
}
_INT_LABELS = ("frequency", "coalesce")


@dataclass(frozen=True)
class Target:
    """A server as a static or file_sd provider describes it."""

    alias: str
    host: str
    port: int = 5432
    username: str = ""
    dbname: str = "postgres"
    password_ref: str | None = None
    options: str = ""
    frequency: int = 300
    coalesce: int = 100
    provider: str = "static"
    # Where the provider found it: the configuration file, the file_sd file.
    origin: str = ""

    def checked(self, where: str) -> Target:
        """This target, validated like 'pgfleet server add' does; ConfigError naming ``where``."""
        try:
            values = validate(
                {
                    "alias": self.alias,
                    "host": self.host,
                    "port": self.port,
                    "username": self.username,
                    "dbname": self.dbname,
                    "frequency": self.frequency,
                    "coalesce": self.coalesce,
                    "password_ref": self.password_ref,
                    "options": self.options,
                }
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        return dataclasses.replace(self, options=values["options"])


def from_static(servers: tuple[StaticServer, ...], origin: str) -> list[Target]:
    out = []
    for i, s in enumerate(servers):
        t = Target(
            alias=s.alias,
            host=s.host,
            port=s.port,
            username=s.user,
            dbname=s.dbname,
            password_ref=s.password_ref or None,
            options=s.options,
            frequency=s.frequency,
            coalesce=s.coalesce,
            provider="static",
            origin=origin,
        )
        out.append(t.checked(f"invalid configuration {origin!r}: discovery.servers[{i}]"))
    return out


def split_target(target: str) -> tuple[str, int]:
    """'host', 'host:5433' or '[::1]:5433' -> (host, port)."""
    t = target.strip()
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid target {target!r}")
        port_text = rest[1:]
    elif t.count(":") == 1:
        host, port_text = t.split(":")
    else:
        host, port_text = t, ""
    if not host:
        raise ValueError(f"invalid target {target!r}: no host")
    if not port_text:
        return host, 5432
    if not _NUMBER_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid target {target!r}: bad port {port_text!r}")
    return host, int(port_text)


def parse_file_sd(path: Path) -> list[Target]:
    """Read one file_sd file; ConfigError naming the file and the faulty group."""
    where = f"invalid file_sd file {str(path)!r}"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{where}: {e.strerror or e}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_FILE_BYTES // 2**20} MB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 (byte {e.start})") from None
    try:
        if path.suffix.lower() in (".yml", ".yaml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text) if text.strip() else None
    except (ValueError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())[:300]
        raise ConfigError(f"{where}: {reason}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    if data is None:
        return []
    if not isinstance(data, list):
        raise ConfigError(f"{where}: expected a list of target groups")
    # A file name need not be UTF-8; the repository's text must.
    origin = os.fsencode(path).decode("utf-8", "replace")
    out: list[Target] = []
    for i, group in enumerate(data):
        gwhere = f"{where}: group {i}"
        if not isinstance(group, dict):
            raise ConfigError(f"{gwhere}: expected an object with targets and labels")
        targets = group.get("targets")
        labels = group.get("labels") or {}
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ConfigError(f"{gwhere}: targets: expected a list of strings")
        if len(out) + len(targets) > MAX_TARGETS:
            raise ConfigError(f"{where}: more than {MAX_TARGETS} targets")
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int) for k, v in labels.items()
        ):
            raise ConfigError(f"{gwhere}: labels: expected an object of strings")
        settings: dict[str, Any] = {}
        for label, key in _LABELS.items():
            if label not in labels:
                continue
            value = str(labels[label])
            if label in _INT_LABELS:
                if not _NUMBER_RE.fullmatch(value.strip()) or len(value.strip()) > 10:
                    raise ConfigError(
                        f"{gwhere}: label {label}: expected a number, not {value[:70]!r}"
                    )
                settings[key] = int(value)
            else:
                settings[key] = value
        if "alias" in settings and len(targets) != 1:
            raise ConfigError(f"{gwhere}: label alias needs exactly one target, not {len(targets)}")
        for target in targets:
            try:
                host, port = split_target(target)
            except ValueError as e:
                raise ConfigError(f"{gwhere}: {e}") from None
            alias = settings.get("alias") or f"{host}:{port}"
            settings["password_ref"] = settings.get("password_ref") or None
            t = Target(
                **{**settings, "alias": alias},
                host=host,
                port=port,
                provider="file_sd",
                origin=origin,
            )
            out.append(t.checked(f"{gwhere}: target {target[:100]!r}"))
    return out


class FileWatch:
    """The targets of the file_sd files, re-read when a file changes."""

    def __init__(self, patterns: tuple[str, ...] = ()) -> None:
        self.patterns = patterns
        self._seen: dict[str, tuple[int, int, int]] = {}
        self._targets: dict[str, list[Target]] = {}

    def poll(self) -> tuple[list[Target], bool]:
        """Every target of every file, and whether anything changed since last time."""
        paths: set[str] = set()
        for pattern in self.patterns:
            matches = glob.glob(os.path.expanduser(pattern))
            # Said once, not at every poll.
            missing = not matches and not glob.has_magic(pattern)
            if missing and self._seen.get(pattern) != (0, 0, 0):
                log.error("file_sd file not found", file=pattern)
                self._seen[pattern] = (0, 0, 0)
            paths.update(matches)
        changed = False
        for gone in set(self._targets) - paths:
            del self._targets[gone]
            self._seen.pop(gone, None)
            changed = True
        for p in sorted(paths):
            try:
                st = os.stat(p)
            except OSError:
                continue
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._seen.get(p) == stamp:
                continue
            self._seen[p] = stamp
            try:
                targets = parse_file_sd(Path(p))
            except ConfigError as e:
                log.error("file_sd file ignored, its previous targets kept", file=p, error=str(e))
                continue
            log.info("file_sd file read", file=p, targets=len(targets))
            self._targets[p] = targets
            changed = True
        return [t for p in sorted(self._targets) for t in self._targets[p]], changed


class Discovery:
    """The fleet as the configured providers say, with srvids from the repository."""

    def __init__(
        self, cfg: DiscoveryConfig, origin: str = "<config>", stats: Stats | None = None
    ) -> None:
        self.cfg = cfg
        self.stats = stats or Stats()
        self._files = FileWatch(cfg.files)
        self._static = from_static(cfg.servers, origin)
        self._synced: list[Target] | None = None
        # Targets whose alias is another's, as last logged, by alias.
        self.collisions: dict[str, Collision] = {}
        self._duplicates: set[str] = set()  # aliases said to be given twice

    def configure(self, cfg: DiscoveryConfig, origin: str) -> None:
        """Take a reloaded configuration (raises ConfigError before changing anything)."""
        static = from_static(cfg.servers, origin)
        self.cfg = cfg
        self._static = static
        if cfg.files != self._files.patterns:
            self._files = FileWatch(cfg.files)
        self._synced = None

    def targets(self) -> list[Target]:
        """The static and file_sd targets, first of each alias winning."""
        found: list[Target] = []
        if "static" in self.cfg.providers:
            found += self._static
        if "file_sd" in self.cfg.providers:
            found += self._files.poll()[0]
        seen: dict[str, Target] = {}
        duplicates = set()
        for t in found:
            if t.alias in seen:
                first = seen[t.alias]
                if dataclasses.replace(first, origin=t.origin) != t:
                    duplicates.add(t.alias)
                    if t.alias not in self._duplicates:
                        log.warning(
                            "duplicate alias, first one kept",
                            server=t.alias,
                            kept=first.origin,
                            ignored=t.origin,
                        )
                continue
            seen[t.alias] = t
        self._duplicates = duplicates
        return list(seen.values())

    async def refresh(self, conn: psycopg.AsyncConnection[Any]) -> dict[int, Server]:
        """Sync provider targets into the repository; return the fleet by srvid."""
        targets = self.targets()
        if targets != self._synced:
            await self._sync(conn, targets)
            self._synced = targets
        elif self.collisions:
            # Every refresh looks again at the aliases taken: the other row
            # may have gone, and ours can be registered then.
            await self._sync(conn, [t for t in targets if t.alias in self.collisions])
        found = await servers.fetch_enabled(
            conn,
            [(t.alias, t.provider) for t in targets],
            registered="repository" in self.cfg.providers,
        )
        return {s.srvid: s for s in found}

    async def _sync(self, conn: psycopg.AsyncConnection[Any], targets: list[Target]) -> None:
        collisions = await servers.upsert_discovered(conn, [dataclasses.asdict(t) for t in targets])
        by_alias = {t.alias: t for t in targets}
        now = {c.alias: c for c in collisions}
        for alias, c in sorted(now.items()):
            if self.collisions.get(alias) == c:
                continue  # said already
            self.stats.count("", "discovery", "collision")
            log.error(
                "discovered server ignored: its alias is taken, the server left unchanged",
                server=alias,
                provider=c.provider,
                origin=by_alias[alias].origin,
                owner=c.owner,
                owner_origin=c.origin,
            )
        for alias in sorted(self.collisions.keys() - now.keys()):
            log.info("alias collision over", server=alias)
        self.collisions = now
        self.stats.gauge("", "discovery", "collisions", len(now))
        if targets:
            log.debug("discovered servers registered", servers=len(targets) - len(now))
