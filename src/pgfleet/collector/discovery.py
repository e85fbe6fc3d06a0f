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
provider.  A server that leaves its provider is no longer collected; its
row and data stay until ``pgfleet server remove [--purge]``.  The rows are
written by :mod:`pgfleet.repository.servers`, the registry's one writer.

Files are polled (mtime, size, inode) every ``refresh`` seconds: no inotify,
and a file replaced by a rename, as configuration management does, is seen
like any other change.  A file that does not parse keeps its previous
targets, with an error in the log, as Prometheus does.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml

from pgfleet.config import DiscoveryConfig, StaticServer
from pgfleet.errors import ConfigError
from pgfleet.log import EventLogger
from pgfleet.repository import servers
from pgfleet.repository.servers import Server, validate

log = EventLogger("discovery")

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

    def checked(self, where: str) -> Target:
        """This target, validated like 'pgfleet server add' does; ConfigError naming ``where``."""
        try:
            values = validate(
                {
                    "alias": self.alias,
                    "port": self.port,
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
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid target {target!r}: bad port {port_text!r}")
    return host, int(port_text)


def parse_file_sd(path: Path) -> list[Target]:
    """Read one file_sd file; ConfigError naming the file and the faulty group."""
    where = f"invalid file_sd file {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{where}: {e.strerror}") from None
    try:
        if path.suffix.lower() in (".yml", ".yaml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text) if text.strip() else None
    except (ValueError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())
        raise ConfigError(f"{where}: {reason}") from None
    if data is None:
        return []
    if not isinstance(data, list):
        raise ConfigError(f"{where}: expected a list of target groups")
    out: list[Target] = []
    for i, group in enumerate(data):
        gwhere = f"{where}: group {i}"
        if not isinstance(group, dict):
            raise ConfigError(f"{gwhere}: expected an object with targets and labels")
        targets = group.get("targets")
        labels = group.get("labels") or {}
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ConfigError(f"{gwhere}: targets: expected a list of strings")
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
                if not value.strip().isdigit():
                    raise ConfigError(f"{gwhere}: label {label}: expected a number, not {value!r}")
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
            )
            out.append(t.checked(f"{gwhere}: target {target!r}"))
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

    def __init__(self, cfg: DiscoveryConfig, origin: str = "<config>") -> None:
        self.cfg = cfg
        self._files = FileWatch(cfg.files)
        self._static = from_static(cfg.servers, origin)
        self._synced: list[Target] | None = None

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
        for t in found:
            if t.alias in seen:
                if seen[t.alias] != t:
                    log.warning("duplicate alias, first one kept", server=t.alias)
                continue
            seen[t.alias] = t
        return list(seen.values())

    async def refresh(self, conn: psycopg.AsyncConnection[Any]) -> dict[int, Server]:
        """Sync provider targets into the repository; return the fleet by srvid."""
        targets = self.targets()
        if targets != self._synced:
            await self._sync(conn, targets)
            self._synced = targets
        found = await servers.fetch_enabled(
            conn,
            [t.alias for t in targets],
            registered="repository" in self.cfg.providers,
        )
        return {s.srvid: s for s in found}

    async def _sync(self, conn: psycopg.AsyncConnection[Any], targets: list[Target]) -> None:
        if not targets:
            return
        await servers.upsert_discovered(conn, [dataclasses.asdict(t) for t in targets])
        log.debug("discovered servers registered", servers=len(targets))
