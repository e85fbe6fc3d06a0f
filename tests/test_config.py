"""The configuration file: bad values are one line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgfleet import cli
from pgfleet.config import load
from pgfleet.errors import ConfigError


@pytest.mark.parametrize(
    ("section", "key"),
    [("exporter", "port"), ("web", "port"), ("discovery.servers", "port")],
)
@pytest.mark.parametrize("port", [0, 65536, 70000])
def test_a_port_out_of_range_is_named(tmp_path: Path, section: str, key: str, port: int) -> None:
    path = tmp_path / "pgfleet.toml"
    if section == "discovery.servers":
        path.write_text(f'[[discovery.servers]]\nalias = "a"\nport = {port}\n')
        where = "discovery.servers[0].port"
    else:
        path.write_text(f"[{section}]\n{key} = {port}\n")
        where = f"{section}.{key}"
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == (
        f"invalid configuration {str(path)!r}: {where}: "
        + (f"{port} is not between 1 and 65535" if port else "must be positive")
    )


def test_the_cli_says_it_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pgfleet.toml"
    path.write_text("[exporter]\nport = 70000\n")
    assert cli.main(["-c", str(path), "server", "list"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "exporter.port: 70000 is not between 1 and 65535" in err


@pytest.mark.parametrize("mode", ["bogus", "VERIFY-FULL", "verify_full"])
def test_sslmode_is_one_libpq_knows(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "pgfleet.toml"
    path.write_text(f'[collector]\nsslmode = "{mode}"\n')
    with pytest.raises(ConfigError, match=r"collector\.sslmode: .* is not one of"):
        load(path)
