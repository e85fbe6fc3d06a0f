"""The configuration file: bad values are one line naming the file and the key."""

from __future__ import annotations

import re
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


# -- [management]


def test_management_defaults_and_port_zero(tmp_path: Path) -> None:
    path = tmp_path / "pgfleet.toml"
    path.write_text("[management]\nport = 0\n")
    cfg = load(path)
    m = cfg.management
    assert (m.port, m.host, m.unix_socket_dir, m.require_tls) == (0, "127.0.0.1", "", False)
    assert (m.max_connections, m.timeout, m.max_frame_size) == (16, 10.0, 2**20)
    path.write_text(
        '[management]\nport = 7000\nadmins_file = "/etc/pgfleet/admins"\n'
        'tls_cert_file = "c.pem"\ntls_key_file = "k.pem"\nrequire_tls = true\n'
    )
    m = load(path).management
    assert (m.port, m.admins_file, m.require_tls) == (7000, "/etc/pgfleet/admins", True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port = -1", "management.port: must be positive"),
        ("port = 65536", "management.port: 65536 is not between 0 and 65535"),
        ("port = true", "management.port: expected int"),
        ("max_connections = 0", "management.max_connections: must be positive"),
        ("timeout = 0", "management.timeout: must be positive"),
        ("max_frame_size = 10", "management.max_frame_size: 10 is not between 1024 and 268435456"),
        ("require_tls = 1", "management.require_tls: expected bool"),
        ("socket = '/run'", "management.socket: unknown key"),
        (
            'tls_cert_file = "c.pem"',
            "management.tls_key_file: TLS needs both tls_cert_file and tls_key_file",
        ),
        (
            'tls_key_file = "k.pem"',
            "management.tls_cert_file: TLS needs both tls_cert_file and tls_key_file",
        ),
        ("require_tls = true", "management.require_tls: needs tls_cert_file and tls_key_file"),
        ('tls_ca_file = "ca.pem"', "management.tls_ca_file: needs tls_cert_file and tls_key_file"),
        (
            "port = 7000",
            "management.admins_file: remote management (port) needs the file of its users",
        ),
        ('host = ""\nport = 7000\nadmins_file = "a"', "management.host: must not be empty"),
    ],
)
def test_management_settings_are_checked(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "pgfleet.toml"
    path.write_text(f"[management]\n{text}\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == f"invalid configuration {str(path)!r}: {message}"


def test_one_setting_changed_is_checked_as_the_file(tmp_path: Path) -> None:
    """What 'pgfleet ctl conf set' goes through."""
    from pgfleet import config

    cfg = config.Config()
    assert config.with_setting(cfg, "collector.max_in_flight", "3").collector.max_in_flight == 3
    assert config.with_setting(cfg, "logging.level", "debug").logging.level == "debug"
    assert config.with_setting(cfg, "logging.level", '"warning"').logging.level == "warning"
    changed = config.with_setting(cfg, "discovery.providers", '["static", "file_sd"]')
    assert changed.discovery.providers == ("static", "file_sd")
    assert config.with_setting(cfg, "management.require_tls", "false").management == cfg.management
    assert config.setting(changed, "discovery.providers") == ("static", "file_sd")
    assert "management.encryption_key_file" in config.settings(cfg)
    assert "discovery.servers" not in config.settings(cfg)
    for key, value, message in (
        ("collector.max_in_flight", "0", "collector.max_in_flight: must be positive"),
        ("collector.max_in_flight", "many", "collector.max_in_flight: expected int"),
        ("logging.level", "loud", "logging.level: 'loud' is not one of"),
        ("management.require_tls", "true", "management.require_tls: needs tls_cert_file"),
        ("exporter.port", "0", "exporter.port: must be positive"),
    ):
        with pytest.raises(ConfigError, match=re.escape(f"configuration 'conf set': {message}")):
            config.with_setting(cfg, key, value)
    for key in ("nope", "collector.nope", "discovery.servers", "source.x", ""):
        with pytest.raises(ConfigError, match=r"^unknown setting"):
            config.with_setting(cfg, key, "1")
