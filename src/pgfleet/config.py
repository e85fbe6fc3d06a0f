"""pgfleet's configuration: frozen value objects, validated once.

The file is TOML.  Unknown keys and wrong types are rejected with an error
naming the file and the key path, e.g.
``invalid configuration 'pgfleet.toml': collector.statement_timeout: expected a number``
or ``... discovery.servers[2].port: expected int``.

Every number must be positive (or zero, when its ``range`` starts at 0); a
key with a fixed set of values lists them in its field's metadata
(``choices``), a number with bounds gives them as ``range`` (inclusive), and
any other value is rejected.  Rules between keys of a section (a TLS key with
its certificate...) are checked after it is built (:func:`check`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar, get_args, get_origin, get_type_hints

from pgfleet.errors import ConfigError

ENV_REPOSITORY = "PGFLEET_REPOSITORY"
ENV_CONFIG = "PGFLEET_CONFIG"
# A configuration file larger than this is refused (say, -c /dev/zero).
MAX_FILE_BYTES = 2**20

PORT = {"range": (1, 65535)}
SSLMODES = ("", "disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class RepositoryConfig:
    # libpq connection string or URI of the repository database.
    dsn: str = ""


@dataclass(frozen=True)
class CollectorConfig:
    # Seconds to wait for a monitored server to accept a connection.
    connect_timeout: float = 5.0
    # Seconds a source query may run on a monitored server before the server
    # cancels it (statement_timeout, so the cancel happens server-side).
    statement_timeout: float = 10.0
    application_name: str = "pgfleet collector"
    # The daemon (``pgfleet collector``) only:
    # servers being snapshotted at the same time, at most.
    max_in_flight: int = 10
    # This collector's name in the repository, which owns its leases; by
    # default "HOST-XXXXXX", made once and kept in the spool directory so
    # that a restarted collector finds its servers (and spooled snapshots)
    # still its own.  Needs a restart.
    name: str = ""
    # Seconds a lease on a server lasts unless renewed (every third of it);
    # a dead collector's servers move to the others within two periods.
    # Needs a restart.
    lease_period: float = 30.0
    # The LISTEN/NOTIFY channel commands arrive on.  Needs a restart.
    command_channel: str = "pgfleet_collector"
    # On SIGTERM, seconds the whole stop may take: the snapshots in flight get
    # most of it (what they fetched is spooled), giving back leases the rest.
    shutdown_timeout: float = 30.0
    # Seconds the repository side of one snapshot may take before it is
    # abandoned (and the snapshot spooled, to be stored later, in order).
    store_timeout: float = 60.0
    # Cap of the exponential backoff between attempts to reach a server that
    # failed (never more than its frequency either).
    retry_max: float = 300.0
    # Connections to one monitored server open at once, at most: the main
    # one (kept between snapshots) and one per database visited in turn
    # (closed after the visit).  A server with few free connection slots is
    # visited with one.
    max_connections_per_server: int = 2
    # libpq sslmode for every monitored server ("" = libpq's default, or the
    # server's own options); "verify-full" is the production choice.
    sslmode: str = field(default="", metadata={"choices": SSLMODES})
    # A server's password reference "env:NAME" may only name variables with
    # this prefix (the collector's other variables hold its own secrets).
    password_env_prefix: str = "PGFLEET_PW_"
    # Directories "file:/path" password references may point into (none by
    # default: file references are refused until a directory is given).
    password_dirs: tuple[str, ...] = ()
    # Seconds between two purges of a server's old data at most, whatever its
    # coalesce (purges also run every 10 aggregates).
    purge_interval: float = 86400.0
    # Local mode: also snapshot the repository's own instance (srvid 0,
    # 'local') at its frequency ('pgfleet server update local --frequency'),
    # through the same sources as remote servers.  Of collectors sharing a
    # repository, one at a time does it (the one whose session holds an
    # advisory lock; another takes over when it stops).
    local: bool = False


@dataclass(frozen=True)
class StaticServer:
    """A server listed in the configuration file ([[discovery.servers]])."""

    alias: str
    host: str = ""
    port: int = field(default=5432, metadata=PORT)
    user: str = ""
    dbname: str = "postgres"
    password_ref: str = ""
    options: str = ""
    frequency: int = 300
    coalesce: int = 100


PROVIDERS = ("repository", "static", "file_sd")


@dataclass(frozen=True)
class DiscoveryConfig:
    # Where the fleet comes from, any of: "repository" (the servers
    # registered with 'pgfleet server add'), "static" (discovery.servers
    # below) and "file_sd" (Prometheus file_sd files).  Servers from the last
    # two are registered in the repository under their alias.
    providers: tuple[str, ...] = field(default=("repository",), metadata={"choices": PROVIDERS})
    # file_sd files (JSON or YAML), glob patterns allowed; re-read on change.
    files: tuple[str, ...] = ()
    # Seconds between two looks at the providers for changes.
    refresh: float = 10.0
    servers: tuple[StaticServer, ...] = ()


@dataclass(frozen=True)
class SpoolConfig:
    # Where snapshots wait while the repository is unreachable; by default
    # $STATE_DIRECTORY/spool (systemd) or ~/.local/state/pgfleet/spool.
    # Needs a restart.
    directory: str = ""
    # Megabytes of spooled snapshots kept at most; past it the oldest go.
    max_size: float = 1024.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = field(
        default="info", metadata={"choices": ("trace", "debug", "info", "warning", "error")}
    )
    # "keyvalue" (logfmt) or "json", one object per line.
    format: str = field(default="keyvalue", metadata={"choices": ("keyvalue", "json")})


@dataclass(frozen=True)
class ExporterConfig:
    """The collector's Prometheus endpoint (see docs/metrics.md)."""

    # Serve /metrics and the / overview while collecting.
    enabled: bool = True
    # Loopback by default: the numbers say what the fleet runs; open it on
    # purpose.  Needs a restart.
    listen: str = "127.0.0.1"
    port: int = field(default=9630, metadata=PORT)
    # Per server, the statements and the tables exposed (the most active
    # ones, see docs/metrics.md): Prometheus pays for every series.
    max_statements: int = 20
    max_tables: int = 20


@dataclass(frozen=True)
class WebConfig:
    """``pgfleet web``: the UI and its JSON (see docs/web.md)."""

    # ``pgfleet run`` serves the UI next to the collector when true
    # (``pgfleet web`` serves it regardless).
    enabled: bool = False
    listen: str = "127.0.0.1"
    port: int = field(default=8080, metadata=PORT)
    # File holding the key that signs session cookies.  Without one a random
    # key is made at each start, and everyone logs in again after a restart.
    secret_key_file: str = ""
    # A token that logs in (read-only, as the repository role of
    # [repository] dsn) without a role of one's own; token_file is the
    # better place for it.
    token: str = ""
    token_file: str = ""
    # Seconds a login lasts.
    session_max_age: float = 43200.0
    # Send the session cookie over HTTPS only: set it behind a TLS proxy.
    secure_cookie: bool = False
    # Repository connections of one login's pool, at most.
    pool_size: int = 2
    # Repository connections of the whole UI (every login and the token's
    # pool), at most: a login past it waits for an idle pool to close.
    max_connections: int = 20
    # Seconds a login's pool stays open without a request.
    pool_idle: float = 600.0
    # Seconds a UI query may run before the repository cancels it.
    statement_timeout: float = 30.0
    # Failed logins allowed per client address, and per user name, in a
    # minute; past it every login from there (or as that user) is refused
    # until the minute is over.
    login_attempts: int = 10


@dataclass(frozen=True)
class ManagementConfig:
    """``pgfleet ctl``'s way into the daemon (see docs/management.md)."""

    # Directory of the local socket (pgfleet.sock): "" is the spool directory,
    # which the collector creates 0700 and locks for itself.  Only the
    # daemon's OS user and root may talk there.  Needs a restart.
    unix_socket_dir: str = ""
    # Remote management (SCRAM-SHA-256, TLS when a certificate is given):
    # the address and port to listen on; port 0, the default, is none.
    # Both need a restart.
    host: str = "127.0.0.1"
    port: int = field(default=0, metadata={"range": (0, 65535)})
    # PEM files: the server's certificate and key (TLS is offered when both
    # are set), and the CA that client certificates must chain to (none
    # asked for when empty).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    # Refuse remote clients that do not start TLS.
    require_tls: bool = False
    # The remote users and their SCRAM verifiers ('pgfleet user add'); read
    # at each login, so that a change applies without a reload.
    admins_file: str = ""
    # Management connections open at once, at most (local and remote);
    # one more is answered TOO_MANY_CONNECTIONS and closed.
    max_connections: int = 16
    # Seconds a connection may stay silent (and the whole login may take).
    timeout: float = 10.0
    # Bytes of one frame's document at most, as sent (compressed,
    # encrypted) and once decompressed.
    max_frame_size: int = field(default=2**20, metadata={"range": (1024, 2**28)})
    # The AES-256-GCM key for frames a client encrypts (32 bytes, raw or hex);
    # without it, encrypted frames are refused.
    encryption_key_file: str = ""


BACKUP_COMPRESSIONS = ("none", "gzip", "lz4", "zstd", "bzip2")
BACKUP_ENCRYPTIONS = ("none", "aes-256-gcm")


@dataclass(frozen=True)
class BackupServer:
    """One server's backup settings ([[backup.servers]]); "" keeps [backup]'s."""

    alias: str
    # Listing a server turns its backups on, whatever [backup] enabled says;
    # enabled = false turns them off.
    enabled: bool = True
    schedule: str = ""
    retention: str = ""
    compression: str = field(default="", metadata={"choices": ("", *BACKUP_COMPRESSIONS)})
    max_rate: str = ""


@dataclass(frozen=True)
class ServerBackupSettings:
    """What applies to one server once [[backup.servers]] overrides [backup]."""

    alias: str
    enabled: bool
    schedule: str
    retention: str
    compression: str
    max_rate: str


@dataclass(frozen=True)
class BackupConfig:
    """Base backups and WAL streaming (see docs/backup.md)."""

    # Where every server's backups and WAL go (a directory per server).
    # 'pgfleet backup create SERVER' needs nothing else.
    directory: str = ""
    # The collector backs up (on schedule) and streams the WAL of every
    # server when true; of those listed in [[backup.servers]] only when false.
    enabled: bool = False
    # Stream each enabled server's WAL into the store (pg_receivewal, through
    # a replication slot): point-in-time recovery between backups.
    wal_streaming: bool = True
    # An interval ("1d", "6h") or a five-field cron line ("30 2 * * *");
    # "" is on demand only.
    schedule: str = "1d"
    # pgmoneta's: days[,weeks[,months[,years]]], "-" for none ("7", "7,4,12,-").
    retention: str = "7"
    compression: str = field(default="zstd", metadata={"choices": BACKUP_COMPRESSIONS})
    # 0 is the compression's own default level.
    compression_level: int = field(default=0, metadata={"range": (0, 22)})
    # pg_basebackup's --max-rate: what the server sends a base backup at most
    # per second, "500k", "20M" (a bare number is kB/s; 32k to 1024M); ""
    # is no limit.  'pgfleet backup create --max-rate' overrides it.
    max_rate: str = ""
    encryption: str = field(default="none", metadata={"choices": BACKUP_ENCRYPTIONS})
    # The AES-256-GCM key (32 bytes, raw or hex); restore needs it too.
    encryption_key_file: str = ""
    # Where pg_basebackup, pg_receivewal and pg_combinebackup are; by default
    # the lowest PostgreSQL at or above the server's found in the usual places.
    bin_dir: str = ""
    servers: tuple[BackupServer, ...] = ()

    def for_server(self, alias: str) -> ServerBackupSettings:
        """The settings of ``alias``, its [[backup.servers]] entry over [backup]'s."""
        entry = next((s for s in self.servers if s.alias == alias), None)
        if entry is None:
            return ServerBackupSettings(
                alias, self.enabled, self.schedule, self.retention, self.compression, self.max_rate
            )
        return ServerBackupSettings(
            alias,
            entry.enabled,
            entry.schedule or self.schedule,
            entry.retention or self.retention,
            entry.compression or self.compression,
            entry.max_rate or self.max_rate,
        )


@dataclass(frozen=True)
class Config:
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    web: WebConfig = field(default_factory=WebConfig)
    exporter: ExporterConfig = field(default_factory=ExporterConfig)
    management: ManagementConfig = field(default_factory=ManagementConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    source: str = "<defaults>"  # where it was read from, for messages


# The settings 'conf ls/get/set' know: every key of every section but the
# static servers (a list of tables, not one value).
SECTIONS: dict[str, tuple[str, ...]] = {
    name: tuple(f.name for f in dataclasses.fields(hint) if f.name != "servers")
    for name, hint in get_type_hints(Config).items()
    if name != "source"
}

T = TypeVar("T")


def _build(cls: type[T], data: Any, path: str, origin: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(
            f"invalid configuration {origin!r}: {path or 'top level'}: expected a table"
        )
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"invalid configuration {origin!r}: {where}: unknown key")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            where = f"{path}.{name}" if path else name
            raise ConfigError(f"invalid configuration {origin!r}: {where}: required")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        where = f"{path}.{name}" if path else name
        bounds = fields[name].metadata.get("range")
        zero = bounds is not None and bounds[0] <= 0
        kwargs[name] = _value(hints[name], value, where, origin, zero=zero)
        if bounds and not bounds[0] <= kwargs[name] <= bounds[1]:
            raise ConfigError(
                f"invalid configuration {origin!r}: {where}: {kwargs[name]!r} is not between "
                f"{bounds[0]} and {bounds[1]}"
            )
        choices = fields[name].metadata.get("choices")
        if choices:
            for v in kwargs[name] if isinstance(kwargs[name], tuple) else (kwargs[name],):
                if v not in choices:
                    raise ConfigError(
                        f"invalid configuration {origin!r}: {where}: {v!r} is not one of "
                        + ", ".join(map(repr, choices))
                    )
    return cls(**kwargs)


def _value(hint: Any, value: Any, where: str, origin: str, *, zero: bool = False) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, origin)  # type: ignore[arg-type]
    if get_origin(hint) is tuple:
        # tuple[X, ...]: a TOML array (of tables, for a dataclass X).
        item = get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"invalid configuration {origin!r}: {where}: expected an array")
        return tuple(_value(item, v, f"{where}[{i}]", origin) for i, v in enumerate(value))
    return _check(hint, value, where, origin, zero=zero)


def _check(hint: Any, value: Any, where: str, origin: str, *, zero: bool = False) -> Any:
    allowed = get_args(hint) if get_origin(hint) in (types.UnionType,) else (hint,)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # bool is an int to Python, never to a user.
    ok = any(
        isinstance(value, t) and not (isinstance(value, bool) and t is not bool)
        for t in allowed
        if isinstance(t, type)
    )
    if not ok:
        names = " or ".join("a number" if t is float else t.__name__ for t in allowed)
        raise ConfigError(f"invalid configuration {origin!r}: {where}: expected {names}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"invalid configuration {origin!r}: {where}: must be a finite number")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and not (value > 0 or (zero and value == 0)):
        raise ConfigError(f"invalid configuration {origin!r}: {where}: must be positive")
    return value


def check(cfg: Config, origin: str) -> None:
    """The rules between keys, once every key is valid on its own."""
    m = cfg.management

    def bad(key: str, message: str) -> NoReturn:
        raise ConfigError(f"invalid configuration {origin!r}: management.{key}: {message}")

    if bool(m.tls_cert_file) != bool(m.tls_key_file):
        bad(
            "tls_key_file" if m.tls_cert_file else "tls_cert_file",
            "TLS needs both tls_cert_file and tls_key_file",
        )
    if m.require_tls and not m.tls_cert_file:
        bad("require_tls", "needs tls_cert_file and tls_key_file")
    if m.tls_ca_file and not m.tls_cert_file:
        bad("tls_ca_file", "needs tls_cert_file and tls_key_file")
    if m.port and not m.admins_file:
        bad("admins_file", "remote management (port) needs the file of its users")
    if not m.host:
        bad("host", "must not be empty")
    for key in ("unix_socket_dir", "tls_cert_file", "tls_key_file", "tls_ca_file",
                "admins_file", "encryption_key_file"):  # fmt: skip
        if "\x00" in getattr(m, key):
            bad(key, "a file name cannot hold a NUL character")
    check_backup(cfg.backup, origin)


def check_backup(b: BackupConfig, origin: str) -> None:
    """[backup]'s rules: schedules, retentions and rates parse, encryption has its key."""
    if b == BackupConfig():
        return  # valid, and every command is spared loading the backup modules
    from pgfleet.backup import retention, schedule
    from pgfleet.backup.base import parse_max_rate

    def bad(key: str, message: str) -> NoReturn:
        raise ConfigError(f"invalid configuration {origin!r}: backup.{key}: {message}")

    for key in ("directory", "encryption_key_file", "bin_dir"):
        if "\x00" in getattr(b, key):
            bad(key, "a file name cannot hold a NUL character")
    if b.encryption != "none" and not b.encryption_key_file:
        bad("encryption_key_file", f"encryption {b.encryption!r} needs the key's file")
    if (b.enabled or any(s.enabled for s in b.servers)) and not b.directory:
        bad("directory", "backups are enabled but have nowhere to go")

    def check_schedule(key: str, text: str) -> None:
        try:
            schedule.parse(text)
        except ValueError as e:
            bad(key, str(e))

    def check_retention(key: str, text: str) -> None:
        try:
            retention.parse(text)
        except ConfigError as e:
            # "invalid retention '...': why": the key path says the first part.
            bad(key, str(e).partition(": ")[2] or str(e))

    def check_max_rate(key: str, text: str) -> None:
        try:
            parse_max_rate(text)
        except ValueError as e:
            bad(key, str(e))

    if b.schedule:
        check_schedule("schedule", b.schedule)
    check_retention("retention", b.retention)
    if b.max_rate:
        check_max_rate("max_rate", b.max_rate)
    seen: set[str] = set()
    for i, s in enumerate(b.servers):
        if not s.alias or "/" in s.alias or s.alias.startswith(".") or "\x00" in s.alias:
            bad(f"servers[{i}].alias", f"{s.alias!r} cannot name a server")
        if s.alias in seen:
            bad(f"servers[{i}].alias", f"{s.alias!r} is listed twice")
        seen.add(s.alias)
        if s.schedule:
            check_schedule(f"servers[{i}].schedule", s.schedule)
        if s.retention:
            check_retention(f"servers[{i}].retention", s.retention)
        if s.max_rate:
            check_max_rate(f"servers[{i}].max_rate", s.max_rate)


def setting(cfg: Config, dotted: str) -> Any:
    """The value of ``section.key``; ConfigError if there is no such setting."""
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or key not in SECTIONS[section]:
        raise ConfigError(f"unknown setting {dotted[:100]!r} (see 'conf ls')")
    return getattr(getattr(cfg, section), key)


def settings(cfg: Config) -> dict[str, Any]:
    """Every setting that ``conf set`` may name, ``section.key``, with its value."""
    return {f"{s}.{k}": getattr(getattr(cfg, s), k) for s, keys in SECTIONS.items() for k in keys}


def with_setting(cfg: Config, dotted: str, text: str) -> Config:
    """``cfg`` with one setting changed, checked as the file's would be.

    ``text`` is read as a TOML value (``5``, ``true``, ``["a", "b"]``,
    ``"quoted"``), and as a plain string when it is none.
    """
    setting(cfg, dotted)
    section, _, key = dotted.partition(".")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):
        value = text
    current = getattr(cfg, section)
    # The section as the file would give it, rebuilt whole: a key's check
    # may depend on its neighbours'.
    data = dataclasses.asdict(current)
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    data[key] = value
    origin = "conf set"
    new = dataclasses.replace(cfg, **{section: _build(type(current), data, section, origin)})
    check(new, origin)
    return new


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the configuration file (``$PGFLEET_CONFIG`` when no path is given).

    Without any file, the defaults apply; ``$PGFLEET_REPOSITORY`` overrides
    the repository DSN either way.
    """
    if path is None:
        path = os.environ.get(ENV_CONFIG) or None
    data: dict[str, Any] = {}
    origin = "<defaults>"
    if path is not None:
        origin = str(path)
        try:
            with Path(path).open("rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
            if len(raw) > MAX_FILE_BYTES:
                raise ConfigError(
                    f"invalid configuration {origin!r}: larger than {MAX_FILE_BYTES // 2**20} MB"
                )
            data = tomllib.loads(raw.decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"invalid configuration {origin!r}: file not found") from None
        except OSError as e:
            raise ConfigError(f"invalid configuration {origin!r}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"invalid configuration {origin!r}: not UTF-8 (byte {e.start})"
            ) from None
        except ValueError as e:
            # TOMLDecodeError, or a number too long for int() (4300 digits).
            reason = " ".join(str(e).split())
            raise ConfigError(f"invalid configuration {origin!r}: {reason[:300]}") from None
        except RecursionError:
            raise ConfigError(f"invalid configuration {origin!r}: nested too deeply") from None
    cfg = _build(Config, data, "", origin)
    check(cfg, origin)
    cfg = dataclasses.replace(cfg, source=origin)
    env_dsn = os.environ.get(ENV_REPOSITORY)
    if env_dsn:
        cfg = dataclasses.replace(cfg, repository=RepositoryConfig(dsn=env_dsn))
    return cfg
