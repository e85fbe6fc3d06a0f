"""file_sd parsing and watching, static servers (the sync is in test_daemon)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from pgfleet.collector.discovery import (
    MAX_FILE_BYTES,
    MAX_TARGETS,
    Discovery,
    FileWatch,
    Target,
    from_static,
    parse_file_sd,
    split_target,
)
from pgfleet.config import DiscoveryConfig, StaticServer
from pgfleet.errors import ConfigError


def test_targets() -> None:
    assert split_target("db1") == ("db1", 5432)
    assert split_target("db1.example:5433") == ("db1.example", 5433)
    assert split_target("[::1]:6432") == ("::1", 6432)
    for bad in ("db:x", ":5432", "[::1", "[::1]5432", "db:70000", "db:\u00b2", "db:1_0"):
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
    assert got[0] == Target(
        "h1:5433", "h1", 5433, dbname="app", frequency=60, provider="file_sd", origin=str(j)
    )
    assert got[2].username == "mon" and got[2].password_ref == "env:PW"
    y = tmp_path / "b.yaml"
    y.write_text("- targets: ['h4:5434']\n  labels:\n    alias: four\n    coalesce: 10\n")
    assert parse_file_sd(y) == [
        Target("four", "h4", 5434, coalesce=10, provider="file_sd", origin=str(y))
    ]
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
        # What the repository's constraints refuse is refused here, so that
        # one target cannot fail the registration of the others.
        ('[{"targets": ["h1"], "labels": {"alias": "db1\\n"}}]', "invalid alias 'db1\\n'"),
        ('[{"targets": ["h1"], "labels": {"dbname": "a\\u0000"}}]', "contains a NUL"),
        ('[{"targets": ["h1"], "labels": {"user": "\\ud800"}}]', "lone surrogate"),
        (
            '[{"targets": ["h1"], "labels": {"frequency": "99999999999"}}]',
            "label frequency: expected a number, not '99999999999'",
        ),
        ('[{"targets": ["h1"], "labels": {"coalesce": "2147483648"}}]', "invalid coalesce"),
        ('[{"targets": ["h1"], "labels": {"frequency": "\u00b2"}}]', "expected a number"),
        ('[{"targets": ["h1:\u00b2"]}]', "bad port"),
        (
            '[{"targets": ["h1"], "labels": {"options": "application_name=\'x password=y\'"}}]',
            "may not contain a password",
        ),
        pytest.param("[" * 100_000, "nested too deeply", id="deep"),
        ('[{"targets": ["h"]}]\udcff', "not UTF-8"),
    ],
)
def test_invalid_files_are_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "t.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
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
    assert ok == [Target("s1", "h", 5433, origin="cfg.toml")]
    with pytest.raises(ConfigError) as exc:
        from_static((StaticServer("bad alias", host="h"),), "cfg.toml")
    assert str(exc.value).startswith(
        "invalid configuration 'cfg.toml': discovery.servers[0]: invalid alias"
    )


def test_files_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"targets": [f"h{i}" for i in range(MAX_TARGETS + 1)]}]))
    with pytest.raises(ConfigError, match=f"more than {MAX_TARGETS} targets"):
        parse_file_sd(path)
    with path.open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ConfigError, match="larger than 16 MB"):
        parse_file_sd(path)


def test_duplicate_aliases_are_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('[{"targets": ["h1"], "labels": {"alias": "x"}}]')
    b.write_text('[{"targets": ["h2"], "labels": {"alias": "x"}}]')
    d = Discovery(DiscoveryConfig(providers=("file_sd",), files=(str(tmp_path / "*.json"),)))
    with caplog.at_level(logging.WARNING, logger="pgfleet"):
        for _ in range(3):
            assert [(t.alias, t.host) for t in d.targets()] == [("x", "h1")]
    said = [r for r in caplog.records if r.getMessage() == "duplicate alias, first one kept"]
    assert len(said) == 1
