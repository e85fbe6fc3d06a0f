"""The management commands: their arguments, their answers, and who may run them.

Each command is a name (``Header.Command``), arguments (the ``Request``
object) and a ``Response`` object; docs/management.md shows every one.  The
daemon side is a :class:`Target`, so that this module knows the protocol and
nothing of how the collector works, and the daemon knows nothing of the
protocol.

Invariants:

- Arguments are checked here, before the target sees them: a missing,
  unknown or wrongly typed argument is ``BAD_ARGUMENTS`` and nothing runs.
- A command refused where it was asked from (``reload`` over the network,
  as in pgmoneta) is ``NOT_ALLOWED`` and nothing runs.
- What must happen after the answer (``shutdown``) is returned, not done:
  the server writes the answer first.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from pgfleet.management.document import ErrorCode, ManagementError
from pgfleet.repository.servers import EDITABLE, Server

# Argument names, pgmoneta's where it has one (management.h).
DETAILS = "Details"
SERVER = "Server"
CONFIG_KEY = "ConfigKey"
CONFIG_VALUE = "ConfigValue"
SETTINGS = "Settings"
PURGE = "Purge"
BACKUP = "Backup"
INCREMENTAL = "Incremental"
FORCE = "Force"

# A backup's ID (its start, UTC), or the newest/oldest valid one.
_BACKUP_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z|latest|newest|oldest")


class Target(Protocol):
    """What the commands need of the daemon (see collector/daemon.py)."""

    async def status(self, details: bool) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...

    def shutdown(self) -> None:
        """Begin a clean stop (called once the answer is sent)."""

    def conf_files(self) -> dict[str, Any]: ...

    def conf_get(self, key: str | None) -> dict[str, Any]: ...

    async def conf_set(self, key: str, value: str) -> dict[str, Any]: ...

    async def snapshot(self, server: str) -> dict[str, Any]: ...

    async def server_ls(self) -> dict[str, Any]: ...

    async def server_add(self, alias: str, settings: dict[str, Any]) -> dict[str, Any]: ...

    async def server_rm(self, alias: str, purge: bool) -> dict[str, Any]: ...

    def clear_prometheus(self) -> dict[str, Any]: ...

    async def backup_status(self, server: str | None) -> dict[str, Any]: ...

    async def backup_create(self, server: str, incremental: bool) -> dict[str, Any]: ...

    async def backup_ls(self, server: str) -> dict[str, Any]: ...

    async def backup_info(self, server: str, backup: str) -> dict[str, Any]: ...

    async def backup_verify(self, server: str, backup: str) -> dict[str, Any]:
        """Start reading the backup back; the verdict comes in status and info."""

    async def backup_retain(self, server: str) -> dict[str, Any]: ...

    async def backup_delete(self, server: str, backup: str, force: bool) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Caller:
    """Who asks: over the local socket (``user`` is ``uid N``) or a remote login."""

    local: bool
    user: str


@dataclass(frozen=True)
class Outcome:
    """A command's ``Response``, and what to do once it is written."""

    result: dict[str, Any]
    after: Callable[[], None] | None = None


Handler = Callable[[Target, dict[str, Any], Caller], Awaitable[Outcome]]


def _args(
    args: dict[str, Any], required: dict[str, type], optional: dict[str, type] | None = None
) -> dict[str, Any]:
    """``args`` checked: the required keys present, no other key, each of its type."""
    optional = optional or {}
    unknown = sorted(set(args) - set(required) - set(optional))
    if unknown:
        raise ManagementError(ErrorCode.BAD_ARGUMENTS, f"unknown argument {unknown[0][:64]!r}")
    for name in required:
        if name not in args:
            raise ManagementError(ErrorCode.BAD_ARGUMENTS, f"argument {name!r} is missing")
    for name, value in args.items():
        kind = required.get(name) or optional[name]
        # bool is an int to Python, never to an administrator.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ManagementError(
                ErrorCode.BAD_ARGUMENTS,
                f"argument {name!r} must be {_TYPE_NAMES.get(kind, kind.__name__)}",
            )
        if isinstance(value, str) and (not value or "\x00" in value):
            raise ManagementError(
                ErrorCode.BAD_ARGUMENTS, f"argument {name!r} must be a non-empty string, no NUL"
            )
    return args


_TYPE_NAMES = {str: "a string", bool: "true or false", dict: "an object", int: "an integer"}


async def _ping(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    _args(args, {})
    return Outcome({})


async def _status(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    details = _args(args, {}, {DETAILS: bool}).get(DETAILS, False)
    return Outcome(await t.status(details))


async def _reload(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    _args(args, {})
    if not who.local:
        # As in pgmoneta: a remote administrator cannot make the daemon read
        # files on its host.
        raise ManagementError(ErrorCode.NOT_ALLOWED, "reload is only allowed over the local socket")
    return Outcome(await t.reload())


async def _shutdown(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    _args(args, {})
    return Outcome({}, after=t.shutdown)


async def _conf_ls(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    _args(args, {})
    return Outcome(t.conf_files())


async def _conf_get(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    key = _args(args, {}, {CONFIG_KEY: str}).get(CONFIG_KEY)
    return Outcome(t.conf_get(key))


async def _conf_set(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    a = _args(args, {CONFIG_KEY: str, CONFIG_VALUE: str})
    return Outcome(await t.conf_set(a[CONFIG_KEY], a[CONFIG_VALUE]))


async def _snapshot(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    a = _args(args, {SERVER: str})
    return Outcome(await t.snapshot(a[SERVER]))


async def _server_ls(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    _args(args, {})
    return Outcome(await t.server_ls())


# ``server add``'s settings as JSON: pgfleet.servers' columns, retention in seconds.
_SERVER_SETTINGS: dict[str, type] = {
    "host": str,
    "port": int,
    "username": str,
    "dbname": str,
    "password_ref": str,
    "options": str,
    "frequency": int,
    "coalesce": int,
    "retention": int,
    "enabled": bool,
}
assert set(_SERVER_SETTINGS) == set(EDITABLE)


async def _server_add(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    a = _args(args, {SERVER: str}, {SETTINGS: dict})
    settings = dict(a.get(SETTINGS, {}))
    unknown = sorted(set(settings) - set(_SERVER_SETTINGS))
    if unknown:
        raise ManagementError(
            ErrorCode.BAD_ARGUMENTS,
            f"unknown server setting {str(unknown[0])[:64]!r}: use " + ", ".join(_SERVER_SETTINGS),
        )
    _args(settings, {}, _SERVER_SETTINGS)
    if "retention" in settings:
        seconds = settings["retention"]
        if not 0 < seconds <= 100 * 365 * 86400:
            raise ManagementError(
                ErrorCode.BAD_ARGUMENTS, "setting 'retention' must be 1 second to 100 years"
            )
        settings["retention"] = timedelta(seconds=seconds)
    return Outcome(await t.server_add(a[SERVER], settings))


async def _server_rm(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    a = _args(args, {SERVER: str}, {PURGE: bool})
    return Outcome(await t.server_rm(a[SERVER], a.get(PURGE, False)))


async def _clear(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    _args(args, {})
    return Outcome(t.clear_prometheus())


def _backup_id(args: dict[str, Any]) -> str:
    value: str = args[BACKUP]
    if not _BACKUP_ID.fullmatch(value):
        raise ManagementError(
            ErrorCode.BAD_ARGUMENTS,
            f"argument {BACKUP!r} must be a backup ID (YYYYMMDDTHHMMSSZ), latest or oldest, "
            f"not {value[:64]!r}",
        )
    return value


async def _backup_status(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    a = _args(args, {}, {SERVER: str})
    return Outcome(await t.backup_status(a.get(SERVER)))


async def _backup_create(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    a = _args(args, {SERVER: str}, {INCREMENTAL: bool})
    return Outcome(await t.backup_create(a[SERVER], a.get(INCREMENTAL, False)))


async def _backup_ls(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    a = _args(args, {SERVER: str})
    return Outcome(await t.backup_ls(a[SERVER]))


async def _backup_info(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    a = _args(args, {SERVER: str, BACKUP: str})
    return Outcome(await t.backup_info(a[SERVER], _backup_id(a)))


async def _backup_verify(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    a = _args(args, {SERVER: str, BACKUP: str})
    return Outcome(await t.backup_verify(a[SERVER], _backup_id(a)))


async def _backup_retain(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    a = _args(args, {SERVER: str})
    return Outcome(await t.backup_retain(a[SERVER]))


async def _backup_delete(t: Target, args: dict[str, Any], who: Caller) -> Outcome:
    a = _args(args, {SERVER: str, BACKUP: str}, {FORCE: bool})
    return Outcome(await t.backup_delete(a[SERVER], _backup_id(a), a.get(FORCE, False)))


COMMANDS: dict[str, Handler] = {
    "ping": _ping,
    "status": _status,
    "reload": _reload,
    "shutdown": _shutdown,
    "conf ls": _conf_ls,
    "conf get": _conf_get,
    "conf set": _conf_set,
    "snapshot": _snapshot,
    "server ls": _server_ls,
    "server add": _server_add,
    "server rm": _server_rm,
    "clear prometheus": _clear,
    "backup status": _backup_status,
    "backup create": _backup_create,
    "backup ls": _backup_ls,
    "backup info": _backup_info,
    "backup verify": _backup_verify,
    "backup retain": _backup_retain,
    "backup delete": _backup_delete,
}


async def dispatch(target: Target, command: str, args: dict[str, Any], who: Caller) -> Outcome:
    """Run ``command``; a refusal or failure is a :class:`ManagementError`."""
    handler = COMMANDS.get(command)
    if handler is None:
        raise ManagementError(
            ErrorCode.UNKNOWN_COMMAND,
            f"unknown command {command[:64]!r}: use one of " + ", ".join(COMMANDS),
        )
    return await handler(target, args, who)


def server_fields(s: Server) -> dict[str, Any]:
    """A registered server as JSON: what ``server ls`` and ``pgfleet server list`` show."""
    return {
        "srvid": s.srvid,
        "alias": s.alias,
        "host": s.host,
        "port": s.port,
        "username": s.username,
        "dbname": s.dbname,
        "password_ref": s.password_ref,
        "options": s.options,
        "frequency": s.frequency,
        "coalesce": s.coalesce,
        "retention_seconds": int(s.retention.total_seconds()),
        "enabled": s.enabled,
    }
