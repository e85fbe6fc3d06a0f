"""The ``backup ...`` management commands: arguments, answers, refusals, error codes.

First the handlers alone, against a target that records what it was asked
(every argument check happens before the daemon sees anything); then a real
``pgfleet collector`` backing up a real server, asked over its local socket
and remotely (SCRAM over TLS).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgfleet.backup.catalog import Catalog, State
from pgfleet.cluster import Cluster
from pgfleet.errors import ClusterError
from pgfleet.management import handlers
from pgfleet.management.document import ErrorCode, ManagementError
from pgfleet.management.handlers import Caller
from tests.backup.helpers import BACKUP_PASSWORD, PASSWORD_ENV, register, start_cluster
from tests.fix_clusters import NewDatabase
from tests.fix_daemon import DaemonFactory, wait_until
from tests.fix_repository import new_repository
from tests.management.helpers import USER, Mgmt, start_daemon
from tests.management.helpers import call as management_call

LOCAL = Caller(local=True, user="uid 0")
REMOTE = Caller(local=False, user=USER)
ID = "20261207T043840Z"


# -- The handlers alone


class Recorder:
    """A Target whose backup commands say what they were called with."""

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("backup_"):
            raise AttributeError(name)

        async def call(*args: Any) -> dict[str, Any]:
            return {"Called": name, "Args": list(args)}

        return call


def run(command: str, args: dict[str, Any], who: Caller = LOCAL) -> dict[str, Any]:
    outcome = asyncio.run(handlers.dispatch(Recorder(), command, args, who))
    assert outcome.after is None
    return outcome.result


def refused(command: str, args: dict[str, Any]) -> ManagementError:
    with pytest.raises(ManagementError) as e:
        run(command, args)
    return e.value


def test_arguments_reach_the_target_checked() -> None:
    assert run("backup status", {}) == {"Called": "backup_status", "Args": [None]}
    assert run("backup status", {"Server": "db1"})["Args"] == ["db1"]
    assert run("backup create", {"Server": "db1"})["Args"] == ["db1", False]
    assert run("backup create", {"Server": "db1", "Incremental": True})["Args"] == ["db1", True]
    assert run("backup ls", {"Server": "db1"})["Args"] == ["db1"]
    for backup in (ID, "latest", "oldest", "newest"):
        assert run("backup info", {"Server": "db1", "Backup": backup})["Args"] == ["db1", backup]
    assert run("backup verify", {"Server": "7", "Backup": ID})["Args"] == ["7", ID]
    assert run("backup retain", {"Server": "db1"}, REMOTE)["Args"] == ["db1"]
    assert run("backup delete", {"Server": "db1", "Backup": ID})["Args"] == ["db1", ID, False]
    assert run("backup delete", {"Server": "db1", "Backup": ID, "Force": True})["Args"][2] is True


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("backup create", {}, "argument 'Server' is missing"),
        ("backup create", {"Server": ""}, "must be a non-empty string"),
        ("backup create", {"Server": "db1", "Incremental": 1}, "'Incremental' must be true or"),
        ("backup create", {"Server": "db1", "Backup": ID}, "unknown argument 'Backup'"),
        ("backup ls", {"Server": 1}, "argument 'Server' must be a string"),
        ("backup info", {"Server": "db1"}, "argument 'Backup' is missing"),
        ("backup info", {"Server": "db1", "Backup": "../../etc"}, "must be a backup ID"),
        ("backup info", {"Server": "db1", "Backup": "20261207"}, "must be a backup ID"),
        ("backup verify", {"Server": "db1", "Backup": "LATEST"}, "must be a backup ID"),
        ("backup delete", {"Server": "db1", "Backup": ID, "Force": "yes"}, "true or false"),
        ("backup delete", {"Server": "db1", "Backup": f"{ID}\n"}, "must be a backup ID"),
        ("backup status", {"Server": None}, "argument 'Server' must be a string"),
        ("backup retain", {"Server": "db1", "Purge": True}, "unknown argument 'Purge'"),
    ],
)
def test_bad_arguments(command: str, args: dict[str, Any], message: str) -> None:
    e = refused(command, args)
    assert e.code is ErrorCode.BAD_ARGUMENTS and message in e.message, e.message


def test_unknown_backup_command_lists_them() -> None:
    e = refused("backup restore", {"Server": "db1"})
    assert e.code is ErrorCode.UNKNOWN_COMMAND
    for name in ("backup create", "backup ls", "backup info", "backup verify", "backup retain",
                 "backup delete", "backup status"):  # fmt: skip
        assert name in e.message


# -- A real collector


@pytest.fixture(scope="module")
def server(clusters_dir: Path) -> Iterator[Cluster]:
    cluster = start_cluster("18", clusters_dir / "bk-commands")
    yield cluster
    try:
        cluster.destroy()
    except ClusterError:
        cluster.kill()


@pytest.fixture
def repo(repo_cluster: Cluster, new_database: NewDatabase, server: Cluster) -> str:
    dsn = new_repository(repo_cluster, new_database)
    register(dsn, server, "db1")
    return dsn


def start(daemon: DaemonFactory, repo: str, workdir: Path, sockdir: Path, **backup: Any) -> Mgmt:
    """A collector with its socket, TLS port and admins (in ``workdir``), [backup] ``backup``."""
    return start_daemon(
        daemon,
        repo,
        workdir,
        sockdir,
        env={PASSWORD_ENV: BACKUP_PASSWORD},
        sections={"backup": backup},
    )


def call(m: Mgmt, command: str, args: dict[str, Any] | None = None, *, remote: bool = False
         ) -> dict[str, Any]:  # fmt: skip
    return asyncio.run(management_call(m, command, args, remote=remote))


def error(m: Mgmt, command: str, args: dict[str, Any], *, remote: bool = False
          ) -> ManagementError:  # fmt: skip
    with pytest.raises(ManagementError) as e:
        call(m, command, args, remote=remote)
    return e.value


def test_backup_commands(repo: str, daemon: DaemonFactory, tmp_path: Path, sockdir: Path) -> None:
    # Not enabled: no receiver nor schedule, but backups on demand all the same.
    directory = tmp_path / "backups"
    m = start(daemon, repo, tmp_path, sockdir, directory=str(directory), schedule="",
              wal_streaming=False)  # fmt: skip
    wait_until(lambda: call(m, "backup status")["Servers"], 30, "db1 held")
    catalog = Catalog(directory, "db1")

    status = call(m, "backup status")
    assert status["Directory"] == str(directory) and status["MaxConcurrent"] == 2
    assert (status["Running"], status["Queued"], status["Verifications"]) == (0, 0, [])
    (s,) = status["Servers"]
    assert s["server"] == "db1" and s["enabled"] is False and s["schedule"] is None
    assert s["next_backup"] is None and s["job"] is None and s["receiver"] is None
    assert s["wal_streaming"] is False and s["compression"] == "zstd"

    # create: one at a time per server; the job's progress in status.
    for remote in (False, True):
        got = call(m, "backup create", {"Server": "db1"}, remote=remote)
        assert got["Server"] == "db1" and got["Started"] is True, got
        assert got["Job"]["trigger"] == "manual" and got["Job"]["kind"] == "full"
        again = call(m, "backup create", {"Server": "db1"}, remote=remote)
        assert again["Started"] is False
        wait_until(lambda: call(m, "backup status")["Servers"][0]["job"] is None, 60, "the job")
    backups = [b for b in catalog.list() if b.state is State.VALID]
    assert len(backups) == 2
    first, second = backups
    s = call(m, "backup status", {"Server": "db1"})["Servers"][0]
    assert s["backups"]["valid"] == 2 and s["latest"]["id"] == second.id
    assert s["last_result"]["outcome"] == "valid"

    # ls and info, locally and remotely.
    for remote in (False, True):
        listed = call(m, "backup ls", {"Server": "db1"}, remote=remote)
        assert [b["id"] for b in listed["Backups"]] == [first.id, second.id]
        assert listed["Backups"][0]["state"] == "valid" and listed["Backups"][0]["raw_bytes"] > 0
        got = call(m, "backup info", {"Server": "db1", "Backup": "latest"}, remote=remote)
        assert got["Backup"]["id"] == second.id and got["Verify"] is None
        assert got["Backup"]["start_lsn"] and got["Backup"]["end_wal"]
        assert call(m, "backup info", {"Server": "db1", "Backup": first.id})["Backup"]["id"] == (
            first.id
        )
    # By srvid too.
    srvid = str(s["srvid"])
    assert len(call(m, "backup ls", {"Server": srvid})["Backups"]) == 2

    # verify: started at once, the verdict in info and status.
    got = call(m, "backup verify", {"Server": "db1", "Backup": first.id}, remote=True)
    assert got["Started"] is True and got["Backup"] == first.id

    def verdict() -> Any:
        v = call(m, "backup info", {"Server": "db1", "Backup": first.id})["Verify"]
        return v if v["state"] not in ("queued", "running") else None

    v = wait_until(verdict, 60, "the verification")
    assert v["state"] == "intact" and v["problem"] is None and v["files_checked"] >= 2
    assert call(m, "backup status")["Verifications"][0]["state"] == "intact"

    # A damaged backup is reported so, naming the problem.
    stored = catalog.backup_dir(second.id) / next(f for f in second.files if "base.tar" in f)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    call(m, "backup verify", {"Server": "db1", "Backup": second.id})

    def damaged() -> Any:
        v = call(m, "backup info", {"Server": "db1", "Backup": second.id})["Verify"]
        return v if v["state"] not in ("queued", "running") else None

    v = wait_until(damaged, 60, "the second verification")
    assert v["state"] == "damaged" and "base.tar.zst" in v["problem"], v

    # Refusals, with their codes; the connection stays usable.
    for remote in (False, True):
        for command, args, code, words in (
            ("backup ls", {"Server": "nope"}, ErrorCode.NOT_FOUND, "no backups of server 'nope'"),
            ("backup create", {"Server": "nope"}, ErrorCode.NOT_FOUND, "in the fleet"),
            ("backup info", {"Server": "db1", "Backup": "19991231T000000Z"},
             ErrorCode.NOT_FOUND, "has no backup 19991231T000000Z"),
            ("backup info", {"Server": "db1", "Backup": "bad"}, ErrorCode.BAD_ARGUMENTS,
             "backup ID"),
            ("backup delete", {"Server": "db1", "Backup": "19991231T000000Z"},
             ErrorCode.NOT_FOUND, "has no backup"),
            ("backup retain", {"Server": "../etc"}, ErrorCode.NOT_FOUND, "in the fleet"),
            ("backup ls", {"Server": "../etc"}, ErrorCode.BAD_ARGUMENTS, "cannot name"),
        ):  # fmt: skip
            e = error(m, command, args, remote=remote)
            assert e.code is code and words in e.message, (command, e.code, e.message)

    # delete: the damaged one goes; the only valid one left is refused without Force.
    got = call(m, "backup delete", {"Server": "db1", "Backup": second.id})
    assert got == {"Server": "db1", "Backup": second.id, "Deleted": True}
    assert [b.id for b in catalog.list()] == [first.id]
    e = error(m, "backup delete", {"Server": "db1", "Backup": "latest"})
    assert e.code is ErrorCode.NOT_ALLOWED and "only valid backup" in e.message
    assert [b.id for b in catalog.list()] == [first.id]

    # retain: the policy's verdict (7 days: both kept), WAL none needs removed.
    got = call(m, "backup retain", {"Server": "db1"}, remote=True)
    assert got["Server"] == "db1" and got["Retention"] == "7,-,-,-"
    assert got["Kept"] == [first.id] and got["Deleted"] == []
    assert isinstance(got["WalRemoved"], int)

    # With Force, the last one too.
    got = call(m, "backup delete", {"Server": "db1", "Backup": first.id, "Force": True})
    assert got["Deleted"] is True and catalog.list() == []
    assert m.d.find("backup deleted", server="db1", backup=first.id, forced=True)
    assert m.d.stop() == 0
    text = m.d.text()
    assert "Traceback" not in text and BACKUP_PASSWORD not in text


def test_without_a_backup_directory(
    repo: str, daemon: DaemonFactory, tmp_path: Path, sockdir: Path
) -> None:
    m = start(daemon, repo, tmp_path, sockdir)
    status = call(m, "backup status")
    assert status["Directory"] is None and status["Servers"] == []
    for command, args in (
        ("backup create", {"Server": "db1"}),
        ("backup ls", {"Server": "db1"}),
        ("backup retain", {"Server": "db1"}),
        ("backup info", {"Server": "db1", "Backup": "latest"}),
    ):
        e = error(m, command, args)
        assert e.code is ErrorCode.NOT_ALLOWED and "no backup directory" in e.message
    # The directory needs a restart: said so, not applied.
    got = call(m, "conf set", {"ConfigKey": "backup.directory", "ConfigValue": str(tmp_path)})
    assert got["Restart"] is True
    assert call(m, "backup status")["Directory"] is None
    assert m.d.stop() == 0
