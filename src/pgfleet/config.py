"""pgfleet's configuration: frozen value objects, validated once.

The file is TOML.  Unknown keys and wrong types are rejected with an error
naming the file and the key path, e.g.
``invalid configuration 'pgfleet.toml': collector.statement_timeout: expected a number``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from pgfleet.errors import ConfigError

ENV_REPOSITORY = "PGFLEET_REPOSITORY"
ENV_CONFIG = "PGFLEET_CONFIG"


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


@dataclass(frozen=True)
class Config:
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    source: str = "<defaults>"  # where it was read from, for messages


T = TypeVar("T")


def _build(cls: type[T], data: Any, path: str, origin: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(
            f"invalid configuration {origin!r}: {path or 'top level'}: expected a table"
        )
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"invalid configuration {origin!r}: {where}: unknown key")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        where = f"{path}.{name}" if path else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, where, origin)  # type: ignore[arg-type]
        else:
            kwargs[name] = _check(hint, value, where, origin)
    return cls(**kwargs)


def _check(hint: Any, value: Any, where: str, origin: str) -> Any:
    allowed = get_args(hint) if get_origin(hint) in (types.UnionType,) else (hint,)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not any(isinstance(value, t) for t in allowed if isinstance(t, type)):
        names = " or ".join("a number" if t is float else t.__name__ for t in allowed)
        raise ConfigError(f"invalid configuration {origin!r}: {where}: expected {names}")
    if isinstance(value, float) and value <= 0:
        raise ConfigError(f"invalid configuration {origin!r}: {where}: must be positive")
    return value


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
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"invalid configuration {origin!r}: file not found") from None
        except OSError as e:
            raise ConfigError(f"invalid configuration {origin!r}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"invalid configuration {origin!r}: {e}") from None
    cfg = _build(Config, data, "", origin)
    cfg = dataclasses.replace(cfg, source=origin)
    env_dsn = os.environ.get(ENV_REPOSITORY)
    if env_dsn:
        cfg = dataclasses.replace(cfg, repository=RepositoryConfig(dsn=env_dsn))
    return cfg
