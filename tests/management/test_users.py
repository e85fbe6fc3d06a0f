"""The admins file: SCRAM verifiers only, private, atomic, errors naming file and line."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from scramp import ScramMechanism

from pgfleet.errors import ConfigError
from pgfleet.management import users

PASSWORD = "correct horse battery staple"


def test_add_edit_delete_list(tmp_path: Path) -> None:
    path = tmp_path / "admins"
    users.add(path, "admin", PASSWORD)
    users.add(path, "bob", "hunter2")
    assert users.names(path) == ["admin", "bob"]
    before = users.load(path)["bob"].verifier
    users.edit(path, "bob", "hunter3")
    after = users.load(path)["bob"].verifier
    assert before != after
    users.delete(path, "admin")
    assert users.names(path) == ["bob"]
    # No temporary file left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admins"]


def test_file_is_private_and_holds_no_password(tmp_path: Path) -> None:
    path = tmp_path / "admins"
    old = os.umask(0o022)  # what a careless shell has: the file must be 0600 anyway
    try:
        users.add(path, "admin", PASSWORD)
        users.edit(path, "admin", PASSWORD + "!")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert PASSWORD not in text
    assert PASSWORD.encode() not in base64.b64decode(text.split("$")[1].split(":")[1])
    assert text.startswith("admin:SCRAM-SHA-256$4096:")


def test_verifier_is_postgresqls_and_matches_scramp(tmp_path: Path) -> None:
    path = tmp_path / "admins"
    users.add(path, "admin", PASSWORD)
    user = users.load(path)["admin"]
    salt, stored, server, iterations = user.auth_info()
    assert iterations == 4096 and len(salt) == 16
    again = ScramMechanism("SCRAM-SHA-256").make_auth_info(
        PASSWORD, iteration_count=iterations, salt=salt
    )
    assert again == (salt, stored, server, iterations)


def test_comments_and_blank_lines_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "admins"
    path.write_text("# pgfleet admins\n\n")
    path.chmod(0o600)
    users.add(path, "admin", PASSWORD)
    users.add(path, "bob", PASSWORD)
    users.delete(path, "admin")
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# pgfleet admins", ""] and lines[2].startswith("bob:")


def test_add_edit_delete_errors(tmp_path: Path) -> None:
    path = tmp_path / "admins"
    users.add(path, "admin", PASSWORD)
    with pytest.raises(ConfigError, match="user 'admin' already exists"):
        users.add(path, "admin", PASSWORD)
    with pytest.raises(ConfigError, match="no user 'nobody'"):
        users.edit(path, "nobody", PASSWORD)
    with pytest.raises(ConfigError, match="no user 'nobody'"):
        users.delete(path, "nobody")
    with pytest.raises(ConfigError, match="password cannot be empty"):
        users.add(path, "carol", "")
    for bad in ("", "a:b", "a b", "tab\there", "#x", "x" * 64, "bell\x07"):
        with pytest.raises(ConfigError, match="invalid user name"):
            users.add(path, bad, PASSWORD)
    with pytest.raises(ConfigError, match="no such file"):
        users.names(tmp_path / "missing")


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("admin", "expected name:verifier"),
        ("admin:plaintext", "not a SCRAM-SHA-256"),
        ("bad name:SCRAM-SHA-256$4096:AAAA$AAAA:AAAA", "cannot contain"),
        ("admin:SCRAM-SHA-256$100:{salt}${key}:{key}", "iterations"),
        ("admin:SCRAM-SHA-256$4096:AAAA${key}:{key}", "salt"),
        ("admin:SCRAM-SHA-256$4096:{salt}$AAAA:{key}", "32 bytes"),
        (
            "admin:SCRAM-SHA-256$4096:{salt}${key}:{key}\nadmin:SCRAM-SHA-256$4096:{salt}${key}:{key}",
            "already defined on line 3",
        ),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    salt = base64.b64encode(bytes(16)).decode()
    key = base64.b64encode(bytes(32)).decode()
    path = tmp_path / "admins"
    path.write_text("# header\n\n" + line.format(salt=salt, key=key) + "\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        users.load(path)
    message = str(info.value)
    assert message.startswith(f"invalid admins file '{path}', line ")
    assert why in message and "\n" not in message
    expected_line = 4 if "already defined" in why else 3
    assert f"line {expected_line}:" in message


def test_a_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "admins"
    users.add(path, "admin", PASSWORD)
    path.chmod(0o640)
    with pytest.raises(ConfigError) as info:
        users.load(path)
    assert str(info.value) == (
        f"invalid admins file '{path}': mode 0640 gives access to group or others (chmod 0600)"
    )
