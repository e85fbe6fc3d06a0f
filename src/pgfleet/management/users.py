"""The admins file: who may use the remote management port, as SCRAM verifiers.

pgmoneta keeps its administrators in an admins file managed by
``pgmoneta-admin user add|edit|del|ls``; pgfleet does the same with
``pgfleet user``, but stores what PostgreSQL stores in ``pg_authid``, never a
password, even encrypted::

    # comments and blank lines are kept
    admin:SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>

(base64 throughout).  The server needs no more to run SCRAM-SHA-256; the
password cannot be recovered from it, only guessed offline, which is why the
file is private.

Invariants:

- The file is written whole and atomically (temporary file, fsync, rename,
  fsync of the directory) with mode 0600: a crash leaves the old file or the
  new one, and never a moment when others can read it.
- A file that group or others can access is refused on load, as PostgreSQL
  refuses such a key file: its verifiers allow offline password guessing.
- Every line is checked on load; an error names the file and the line.
- User names are 1-63 characters (PostgreSQL's NAMEDATALEN - 1) without ':',
  whitespace or control characters, and do not start with '#'.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scramp import ScramMechanism

from pgfleet.errors import ConfigError

MECHANISM = "SCRAM-SHA-256"
# PostgreSQL's defaults (scram_iterations, SCRAM_DEFAULT_SALT_LEN).
DEFAULT_ITERATIONS = 4096
SALT_SIZE = 16
# scramp's bounds: below 4096 it refuses to run, above 10 million is a DoS.
MIN_ITERATIONS = 4096
MAX_ITERATIONS = 10_000_000
_MIN_SALT = 12
_KEY_SIZE = 32
MAX_NAME_LENGTH = 63

_B64 = r"[A-Za-z0-9+/]+={0,2}"
_VERIFIER = re.compile(
    rf"SCRAM-SHA-256\$(?P<iterations>[0-9]{{1,9}}):(?P<salt>{_B64})"
    rf"\$(?P<stored>{_B64}):(?P<server>{_B64})"
)


@dataclass(frozen=True)
class User:
    """An administrator: a name and a PostgreSQL-format SCRAM-SHA-256 verifier."""

    name: str
    verifier: str

    def auth_info(self) -> tuple[bytes, bytes, bytes, int]:
        """``(salt, stored_key, server_key, iterations)``: what scramp's auth_fn returns."""
        return parse_verifier(self.verifier)

    @property
    def iterations(self) -> int:
        return self.auth_info()[3]


def check_name(name: str) -> str | None:
    """Why ``name`` is not a valid user name, or None."""
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        return f"a user name has 1 to {MAX_NAME_LENGTH} characters"
    if name.startswith("#"):
        return "a user name cannot start with '#'"
    if ":" in name or any(c.isspace() or not c.isprintable() for c in name):
        return "a user name cannot contain ':', whitespace or control characters"
    return None


def parse_verifier(verifier: str) -> tuple[bytes, bytes, bytes, int]:
    """Split a verifier into ``(salt, stored_key, server_key, iterations)``; ValueError if bad."""
    m = _VERIFIER.fullmatch(verifier)
    if m is None:
        raise ValueError("not a SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> verifier")
    iterations = int(m["iterations"])
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be {MIN_ITERATIONS} to {MAX_ITERATIONS}")
    try:
        salt, stored, server = (
            base64.b64decode(m[k], validate=True) for k in ("salt", "stored", "server")
        )
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64 in the verifier") from None
    if len(salt) < _MIN_SALT:
        raise ValueError(f"the salt must be at least {_MIN_SALT} bytes")
    if len(stored) != _KEY_SIZE or len(server) != _KEY_SIZE:
        raise ValueError(f"StoredKey and ServerKey must be {_KEY_SIZE} bytes")
    return salt, stored, server, iterations


def make_verifier(password: str, iterations: int = DEFAULT_ITERATIONS) -> str:
    """A new verifier for ``password`` with a fresh random salt."""
    salt, stored, server, i = ScramMechanism(MECHANISM).make_auth_info(
        password, iteration_count=iterations, salt=secrets.token_bytes(SALT_SIZE)
    )

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode("ascii")

    return f"{MECHANISM}${i}:{b64(salt)}${b64(stored)}:{b64(server)}"


def _error(path: str | os.PathLike[str], why: str, line: int | None = None) -> ConfigError:
    where = f", line {line}" if line is not None else ""
    # A path may hold what no terminal prints (NUL, a lone surrogate): escaped.
    raw = os.fsdecode(path)
    name = "".join(c if c.isprintable() else repr(c)[1:-1] for c in raw)
    return ConfigError(f"invalid admins file '{name}'{where}: {why}")


def _read(path: str | os.PathLike[str], *, missing_ok: bool) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            st = os.fstat(f.fileno())
            if st.st_mode & 0o077:
                raise _error(
                    path,
                    f"mode {stat.S_IMODE(st.st_mode):04o} gives access to group or others "
                    "(chmod 0600)",
                )
            return f.read().splitlines()
    except FileNotFoundError:
        if missing_ok:
            return []
        raise _error(path, "no such file (create it with `pgfleet user add`)") from None
    except UnicodeDecodeError:
        raise _error(path, "not UTF-8 text") from None
    except OSError as e:
        raise _error(path, e.strerror or str(e)) from None
    except ValueError:
        # open() refuses a NUL or a lone surrogate (UnicodeEncodeError) in the path.
        raise _error(path, "not a usable file name") from None


def _parse(path: str | os.PathLike[str], lines: list[str]) -> dict[str, tuple[int, User]]:
    """Users by name, with the index of their line."""
    users: dict[str, tuple[int, User]] = {}
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, verifier = line.partition(":")
        if not sep:
            raise _error(path, "expected name:verifier", i + 1)
        why = check_name(name)
        if why is not None:
            raise _error(path, why, i + 1)
        try:
            parse_verifier(verifier)
        except ValueError as e:
            raise _error(path, f"user {name!r}: {e}", i + 1) from None
        if name in users:
            raise _error(
                path, f"user {name!r} is already defined on line {users[name][0] + 1}", i + 1
            )
        users[name] = (i, User(name, verifier))
    return users


def load(path: str | os.PathLike[str]) -> dict[str, User]:
    """The users of an admins file, by name; ConfigError naming file and line if bad."""
    return {name: user for name, (_, user) in _parse(path, _read(path, missing_ok=False)).items()}


def names(path: str | os.PathLike[str]) -> list[str]:
    """The user names in the file, sorted."""
    return sorted(load(path))


def _write(path: str | os.PathLike[str], lines: list[str]) -> None:
    target = Path(path)
    directory = target.parent
    # mkstemp creates the file 0600: no window where others can read it.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(f"{line}\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself must survive a crash too.
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _check_password(password: str) -> None:
    if not password:
        raise ConfigError("the password cannot be empty")


def add(
    path: str | os.PathLike[str], name: str, password: str, *, iterations: int = DEFAULT_ITERATIONS
) -> None:
    """Add a user; the file is created if missing.  Error if the user exists."""
    why = check_name(name)
    if why is not None:
        raise ConfigError(f"invalid user name {name!r}: {why}")
    _check_password(password)
    lines = _read(path, missing_ok=True)
    if name in _parse(path, lines):
        raise ConfigError(f"user {name!r} already exists in '{os.fspath(path)}'")
    _write(path, [*lines, f"{name}:{make_verifier(password, iterations)}"])


def edit(
    path: str | os.PathLike[str], name: str, password: str, *, iterations: int = DEFAULT_ITERATIONS
) -> None:
    """Give an existing user a new password (and salt)."""
    _check_password(password)
    lines = _read(path, missing_ok=False)
    users = _parse(path, lines)
    if name not in users:
        raise ConfigError(f"no user {name!r} in '{os.fspath(path)}'")
    lines[users[name][0]] = f"{name}:{make_verifier(password, iterations)}"
    _write(path, lines)


def delete(path: str | os.PathLike[str], name: str) -> None:
    """Remove a user; comments and other lines are kept."""
    lines = _read(path, missing_ok=False)
    users = _parse(path, lines)
    if name not in users:
        raise ConfigError(f"no user {name!r} in '{os.fspath(path)}'")
    del lines[users[name][0]]
    _write(path, lines)
