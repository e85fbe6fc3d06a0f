"""``pgfleet backup ...`` end to end, the [backup] section, and schedules."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from pgfleet import config
from pgfleet.backup import schedule
from pgfleet.backup.cli import max_rate_for
from pgfleet.cluster import Cluster
from pgfleet.errors import ClusterError, ConfigError
from tests.backup.helpers import KEY, register, start_cluster
from tests.fix_repository import RunCli, connect

# -- the [backup] section


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "pgfleet.toml"
    path.write_text(text)
    return config.load(path)


def test_backup_section_and_overrides(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        [backup]
        directory = "/var/lib/pgfleet/backups"
        compression = "lz4"
        encryption = "aes-256-gcm"
        encryption_key_file = "/etc/pgfleet/backup.key"
        retention = "7,4,12,-"
        schedule = "30 2 * * *"
        max_rate = "20M"

        [[backup.servers]]
        alias = "db1"
        schedule = "6h"
        compression = "zstd"
        max_rate = "500k"

        [[backup.servers]]
        alias = "db2"
        enabled = false
        """,
    )
    b = cfg.backup
    assert not b.enabled and b.wal_streaming and b.bin_dir == ""
    db1, db2, db3 = b.for_server("db1"), b.for_server("db2"), b.for_server("db3")
    assert (db1.enabled, db1.schedule, db1.retention, db1.compression, db1.max_rate) == (
        True, "6h", "7,4,12,-", "zstd", "500k",
    )  # fmt: skip
    assert not db2.enabled and db2.schedule == "30 2 * * *" and db2.compression == "lz4"
    assert db2.max_rate == db3.max_rate == "20M"
    assert not db3.enabled  # [backup] enabled = false: listed servers only
    assert "backup.schedule" in config.settings(cfg)
    assert config.settings(cfg)["backup.max_rate"] == "20M"
    assert "backup.servers" not in config.settings(cfg)
    everyone = load(tmp_path, '[backup]\ndirectory = "/b"\nenabled = true\n').backup
    assert everyone.for_server("any").enabled and everyone.for_server("any").schedule == "1d"
    assert everyone.max_rate == everyone.for_server("any").max_rate == ""  # no limit


def test_create_max_rate(tmp_path: Path) -> None:
    """``backup create``'s limit: --max-rate over the configuration's, "" for none."""
    cfg = load(
        tmp_path,
        '[backup]\ndirectory = "/b"\nmax_rate = "20M"\n'
        '[[backup.servers]]\nalias = "db1"\nmax_rate = "1M"\n',
    )
    assert max_rate_for(cfg, "db2", None) == "20M"
    assert max_rate_for(cfg, "db1", None) == "1M"
    assert max_rate_for(cfg, "db1", "64k") == max_rate_for(cfg, "db2", "64k") == "64k"
    assert max_rate_for(cfg, "db1", "") is None  # given empty: none, whatever configured
    assert max_rate_for(config.Config(), "db1", None) is None  # nothing configured: none


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('schedule = "61 * * * *"', "backup.schedule: invalid minute '61'"),
        ('schedule = "* * *"', "backup.schedule: invalid schedule"),
        ('schedule = "0 0 31 2 *"', "backup.schedule: schedule '0 0 31 2 *' never comes"),
        ('schedule = "30s"', "shorter than a minute"),
        ('retention = "x"', "backup.retention: days must be set"),
        ('retention = "7,5,12"', "backup.retention: at most 4 weeks"),
        ('compression = "xz"', "backup.compression: 'xz' is not one of"),
        ('encryption = "aes-256-gcm"', "backup.encryption_key_file: encryption 'aes-256-gcm'"),
        ("enabled = true", "backup.directory: backups are enabled but have nowhere to go"),
        ("compression_level = 30", "backup.compression_level: 30 is not between 0 and 22"),
        ('max_rate = "fast"', "backup.max_rate: invalid transfer rate 'fast': kB/s, or with"),
        ('max_rate = "20G"', "backup.max_rate: invalid transfer rate '20G'"),
        ('max_rate = "16k"', "backup.max_rate: transfer rate '16k' is out of range (32k to"),
        ('max_rate = "2048M"', "backup.max_rate: transfer rate '2048M' is out of range"),
        ("max_rate = 500", "backup.max_rate: expected str"),
        ('\n[[backup.servers]]\nalias = "a"\nmax_rate = "0"', "servers[0].max_rate: transfer"),
        ('\n[[backup.servers]]\nalias = "a"\n[[backup.servers]]\nalias = "a"', "listed twice"),
        ('\n[[backup.servers]]\nalias = "a"\nretention = "-"', "servers[0].retention: days"),
        ('\n[[backup.servers]]\nalias = "../a"\nenabled = false', "cannot name a server"),
        ('\n[[backup.servers]]\nalias = "a"\nhost = "x"', "servers[0].host: unknown key"),
    ],
)
def test_backup_section_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"invalid configuration .*: ") as e:
        directory = "" if "nowhere" in message else 'directory = "/b"\n'
        load(tmp_path, f"[backup]\n{directory}{text}\n")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_conf_set_checks_backup_settings() -> None:
    cfg = config.Config()
    assert config.with_setting(cfg, "backup.schedule", "@daily").backup.schedule == "@daily"
    with pytest.raises(ConfigError, match=r"backup\.schedule: invalid"):
        config.with_setting(cfg, "backup.schedule", "every day")
    assert config.with_setting(cfg, "backup.max_rate", "100M").backup.max_rate == "100M"
    assert config.with_setting(cfg, "backup.max_rate", '"500"').backup.max_rate == "500"
    with pytest.raises(ConfigError) as e:
        config.with_setting(cfg, "backup.max_rate", "1G")
    assert str(e.value) == (
        "invalid configuration 'conf set': backup.max_rate: invalid transfer rate '1G': "
        "kB/s, or with a k or M suffix (e.g. 500k, 20M)"
    )
    with pytest.raises(ConfigError, match=r"backup\.max_rate: transfer rate '8' is out of range"):
        config.with_setting(cfg, "backup.max_rate", '"8"')


# -- schedules


def test_intervals() -> None:
    s = schedule.parse("6h")
    assert s.interval == timedelta(hours=6)
    t = datetime(2026, 12, 7, 4, 31)
    assert s.next_after(t) == t + timedelta(hours=6)
    assert schedule.parse("1d").interval == timedelta(days=1)
    assert schedule.parse(" 2 w ").interval == timedelta(weeks=2)


@pytest.mark.parametrize(
    ("line", "after", "expected"),
    [
        ("30 2 * * *", "2026-12-07 04:00", "2026-12-08 02:30"),
        ("30 2 * * *", "2026-12-07 02:29", "2026-12-07 02:30"),
        ("30 2 * * *", "2026-12-07 02:30", "2026-12-08 02:30"),
        ("*/15 * * * *", "2026-12-07 04:31", "2026-12-07 04:45"),
        ("0 0 * * 1-5", "2026-12-11 12:00", "2026-12-14 00:00"),  # Friday -> Monday
        ("0 0 13 * 5", "2026-12-07 00:00", "2026-12-11 00:00"),  # the 13th or a Friday
        ("0 12 * jan,jul mon", "2026-12-07 00:00", "2027-01-04 12:00"),
        ("0 0 29 2 *", "2026-03-01 00:00", "2028-02-29 00:00"),
        ("@weekly", "2026-12-07 04:00", "2026-12-13 00:00"),  # Sunday
        ("@monthly", "2026-12-07 04:00", "2027-01-01 00:00"),
        ("5/20 * * * 7", "2026-12-13 10:50", "2026-12-13 11:05"),
    ],
)
def test_cron(line: str, after: str, expected: str) -> None:
    s = schedule.parse(line)
    assert s.next_after(datetime.fromisoformat(after)) == datetime.fromisoformat(expected)


# -- the commands


@pytest.fixture
def backed_up(repo: str, clusters_dir: Path, tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    """A server registered as db1, and a configuration file backing it up encrypted."""
    cluster = start_cluster("18", clusters_dir / f"bk-cli-{tmp_path.name}")
    cluster.execute("CREATE TABLE t AS SELECT generate_series(1, 100) AS i")
    register(repo, cluster, "db1")
    key = tmp_path / "backup.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    path = tmp_path / "pgfleet.toml"
    path.write_text(
        f"""
        [backup]
        directory = "{tmp_path / "backups"}"
        compression = "lz4"
        encryption = "aes-256-gcm"
        encryption_key_file = "{key}"
        retention = "1"
        max_rate = "1024M"
        """
    )
    yield cluster, path
    try:
        cluster.destroy()
    except ClusterError:
        cluster.kill()


def copied(repo: str) -> list[tuple[str, str]]:
    """The repository's copy of db1's catalog (for the web UI): (id, state)."""
    with connect(repo) as conn:
        return [
            (str(r[0]), str(r[1]))
            for r in conn.execute(
                "SELECT backup_id, state FROM pgfleet.backups JOIN pgfleet.servers"
                " USING (srvid) WHERE alias = 'db1' ORDER BY backup_id"
            )
        ]


def test_commands(
    run_cli: RunCli, repo: str, backed_up: tuple[Cluster, Path], tmp_path: Path
) -> None:
    c = str(backed_up[1])
    res = run_cli("-c", c, "backup", "create", "db1", "--label", "first")
    assert res.rc == 0, res.err
    assert "of server 'db1': full," in res.out and "stored" in res.out
    res = run_cli("backup", "create", "db1", "--json", "-c", c)
    assert res.rc == 0, res.err
    second = json.loads(res.out)
    assert second["state"] == "valid" and second["encrypted"] and second["compression"] == "lz4"
    assert second["duration_seconds"] >= 0

    res = run_cli("-c", c, "backup", "ls", "db1", "--json")
    listed = json.loads(res.out)
    assert [b["state"] for b in listed] == ["valid", "valid"] and listed[0]["label"] == "first"
    # Copied into the repository as they were taken, for the web UI.
    assert copied(repo) == [(b["id"], "valid") for b in listed]
    res = run_cli("-c", c, "backup", "ls", "db1")
    assert res.rc == 0 and second["id"] in res.out and second["start_wal"] in res.out
    res = run_cli("-c", c, "backup", "info", "db1")
    assert res.rc == 0 and second["id"] in res.out and "timeline           1" in res.out
    res = run_cli("-c", c, "backup", "verify", "db1", listed[0]["id"])
    assert res.rc == 0 and "is intact" in res.out, res.err

    # Restores: refused over a non-empty directory; into an archive.
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    res = run_cli("-c", c, "backup", "restore", "db1", "latest", str(busy))
    assert res.rc == 1 and res.err.count("\n") == 1
    assert "is not empty: refusing to restore over it" in res.err
    res = run_cli("-c", c, "backup", "restore", "db1", "latest", str(busy), "--archive", "x")
    assert res.rc == 1 and "not both" in res.err
    archive = tmp_path / "db1.tar.zst"
    res = run_cli("-c", c, "backup", "restore", "db1", "latest", "--archive", str(archive))
    assert res.rc == 0 and archive.stat().st_size > 0, res.err
    res = run_cli("-c", c, "backup", "restore", "db1", "latest", str(tmp_path / "d"),
                  "--target-time", "yesterday")  # fmt: skip
    assert res.rc == 2 and "invalid time yesterday: use ISO 8601" in res.err
    data = tmp_path / "data"
    res = run_cli("-c", c, "backup", "restore", "db1", listed[0]["id"], str(data),
                  "--pgfleet-command", "/opt/pgfleet/bin/pgfleet")  # fmt: skip
    assert res.rc == 0, res.err
    conf = (data / "postgresql.auto.conf").read_text()
    assert (
        f"restore_command = '/opt/pgfleet/bin/pgfleet backup wal-get --directory "
        f"{tmp_path / 'backups'} --key-file {tmp_path / 'backup.key'} db1 %f %p'"
    ) in conf

    # WAL: a file the store has not.
    res = run_cli("-c", c, "backup", "wal-get", "db1", "000000010000000000000099", "x")
    assert res.rc == 1 and "no WAL file 000000010000000000000099" in res.err

    # Deleting: not the only valid backup, unless forced.
    res = run_cli("-c", c, "backup", "delete", "db1", listed[0]["id"])
    assert res.rc == 0 and "deleted" in res.out and res.err == ""
    assert copied(repo) == [(listed[1]["id"], "valid")]
    res = run_cli("-c", c, "backup", "delete", "db1", "latest")
    assert res.rc == 1 and "the only valid backup" in res.err
    res = run_cli("-c", c, "backup", "retain", "db1")
    assert res.rc == 0 and "kept 1 backups, deleted none" in res.out, res.out
    res = run_cli("-c", c, "backup", "expunge", "db1")
    assert res.rc == 0 and "WAL files before" in res.out

    # A wrong key, and damage, each one line.
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(bytes(32))
    wrong.chmod(0o600)
    res = run_cli("-c", c, "backup", "verify", "db1", "--key-file", str(wrong))
    assert res.rc == 1 and "wrong key" in res.err and res.err.count("\n") == 1

    # A repository that cannot take the copy: the deletion is done all the same.
    down = {"PGFLEET_REPOSITORY": "host=127.0.0.1 port=1 dbname=pgfleet"}
    res = run_cli("-c", c, "backup", "delete", "db1", "latest", "--force", env=down)
    assert res.rc == 0 and "deleted" in res.out, res.err
    assert res.err.startswith("pgfleet: warning: the repository's list of the backups of")
    assert res.err.count("\n") == 1
    assert run_cli("-c", c, "backup", "ls", "db1", "--json").out.strip() == "[]"
    assert copied(repo) == [(listed[1]["id"], "valid")]  # as it was: the collector's to fix


def test_command_errors(run_cli: RunCli, tmp_path: Path) -> None:
    res = run_cli("backup", "ls", "db1")
    assert res.rc == 1 and "no backup directory: set [backup] directory" in res.err
    res = run_cli("backup", "--directory", str(tmp_path), "ls", "../db1")
    assert res.rc == 2 and "invalid alias '../db1'" in res.err
    res = run_cli("backup", "--directory", str(tmp_path), "ls", "db1")
    assert res.rc == 0 and "has no backups" in res.out
    res = run_cli("backup", "--directory", str(tmp_path), "info", "db1")
    assert res.rc == 1 and "has no valid backup" in res.err
    res = run_cli("backup", "--directory", str(tmp_path), "create", "nosuch")
    assert res.rc == 1 and "nosuch" in res.err
    res = run_cli("backup", "--directory", str(tmp_path), "restore", "db1", "latest", "d",
                  "--target-lsn", "nope")  # fmt: skip
    assert res.rc == 1 and "invalid LSN 'nope'" in res.err
