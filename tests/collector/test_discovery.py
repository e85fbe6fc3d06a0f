"""file_sd parsing and watching, static servers (the sync is in test_daemon)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pgfleet.collector.discovery import FileWatch, Target, from_static, parse_file_sd, split_target
from pgfleet.config import StaticServer
from pgfleet.errors import ConfigError


def test_targets() -> None:
    assert split_target("db1") == ("db1", 5432)
    assert split_target("db1.example:5433") == ("db1.example", 5433)
    assert split_target("[::1]:6432") == ("::1", 6432)
    for bad in ("db:x", ":5432", "[::1", "[::1]5432", "db:70000"):
        with pytest.raises(ValueError):
            split_target(bad)


def test_json_and_yaml(tmp_path: Path) -> None:
    j = tmp_path / "a.json"
    j.write_text(
        json.dumps(
            [
                {
                    "targets": ["h1:5433", "h2"],
                    "labels": {"dbname": "app", "frequency": "60", "env": "prod"},
                },
                {
                    "targets": ["h3"],
                    "labels": {"alias": "three", "user": "mon", "password_ref": "env:PW"},
                },
            ]
        )
    )
    got = parse_file_sd(j)
    assert [t.alias for t in got] == ["h1:5433", "h2:5432", "three"]
    assert got[0] == Target("h1:5433", "h1", 5433, dbname="app", frequency=60, provider="file_sd")
    assert got[2].username == "mon" and got[2].password_ref == "env:PW"
    y = tmp_path / "b.yaml"
    y.write_text("- targets: ['h4:5434']\n  labels:\n    alias: four\n    coalesce: 10\n")
    assert parse_file_sd(y) == [Target("four", "h4", 5434, coalesce=10, provider="file_sd")]
    (tmp_path / "empty.yml").write_text("")
    assert parse_file_sd(tmp_path / "empty.yml") == []


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"targets": []}', "expected a list of target groups"),
        ("[1]", "group 0: expected an object with targets and labels"),
        ('[{"targets": "h1"}]', "group 0: targets: expected a list of strings"),
        (
            '[{"targets": ["h1", "h2"], "labels": {"alias": "x"}}]',
            "group 0: label alias needs exactly one target, not 2",
        ),
        (
            '[{"targets": ["h1"], "labels": {"frequency": "often"}}]',
            "group 0: label frequency: expected a number, not 'often'",
        ),
        ('[{"targets": ["h1:0"]}]', "group 0: invalid target 'h1:0': bad port '0'"),
        (
            '[{"targets": ["h1"], "labels": {"password_ref": "hunter2"}}]',
            "group 0: target 'h1': invalid password reference",
        ),
        (
            '[{"targets": ["h1"], "labels": {"options": "password=x"}}]',
            "may not contain a password",
        ),
        ("[{", "invalid file_sd file"),
    ],
)
def test_invalid_files_are_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as exc:
        parse_file_sd(path)
    text = str(exc.value)
    assert text.startswith(f"invalid file_sd file {str(path)!r}: ")
    assert message in text
    assert "\n" not in text


def test_watch_keeps_the_last_good_targets(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('[{"targets": ["h1"]}]')
    watch = FileWatch((str(tmp_path / "*.json"),))
    targets, changed = watch.poll()
    assert [t.alias for t in targets] == ["h1:5432"] and changed
    assert watch.poll() == (targets, False)
    path.write_text("[{broken")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert watch.poll()[0] == targets
    path.write_text('[{"targets": ["h2"]}]')
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert [t.alias for t in watch.poll()[0]] == ["h2:5432"]
    path.unlink()
    assert watch.poll() == ([], True)


def test_static_servers_are_validated() -> None:
    ok = from_static((StaticServer("s1", host="h", port=5433),), "cfg.toml")
    assert ok == [Target("s1", "h", 5433)]
    with pytest.raises(ConfigError) as exc:
        from_static((StaticServer("bad alias", host="h"),), "cfg.toml")
    assert str(exc.value).startswith(
        "invalid configuration 'cfg.toml': discovery.servers[0]: invalid alias"
    )
