"""Hostile input at every parser pgfleet owns: a value or pgfleet's own error, nothing else.

Each parser gets at least 10,000 generated inputs, half random, half valid
inputs mutated (characters inserted, deleted, duplicated; values swapped
for troublesome ones: huge, negative, non-finite, other scripts' digits,
control characters, NUL, bidi overrides, lone surrogates).  The outcome must
be a parsed value or the project's own error (``ConfigError``,
``PgfleetError``, the CLI's exit with one ``pgfleet: error:`` line): a
traceback, any other exception, or a hang is a failure, reported with the
input that caused it.

- the configuration loader (TOML text, and the static servers in it, as the
  daemon reads them);
- file_sd files, JSON and YAML (``discovery.parse_file_sd``); what they
  accept is then registered in a real repository, where no target may fail
  the statement that registers the others;
- command-channel payloads: ``commands.parse``, then the daemon's own
  handling of notifications (in-process, against a real repository), as
  garbage from anyone and as requests of a pgfleet_admin member;
- command lines (``cli.main`` in-process, with no repository reachable).

The generators are seeded (``PGFLEET_FUZZ_SEED`` to try another seed): a
failure replays.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import random
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from pgfleet import cli, config, log
from pgfleet.collector import commands
from pgfleet.collector.daemon import Daemon
from pgfleet.collector.discovery import Target, from_static, parse_file_sd
from pgfleet.collector.spool import Spool
from pgfleet.errors import ConfigError
from pgfleet.repository import servers

SEED = int(os.environ.get("PGFLEET_FUZZ_SEED", "20261202"))
CASES = 10_000

# Troublesome values, for mutations and generated fields.
NASTY = [
    "", " ", "0", "-1", "1", "65535", "65536", "2147483647", "2147483648",
    "99999999999999999999999", "9" * 5000, "1e999", "-1e999", "nan", "inf", "-0", "0x10",
    "1_000", "\u0663", "\u00b2", "\uff11", "true", "false", "null", "[]", "{}", '"', "'", "\\",
    "\x00", "\x1b[31m", "\r\n", "\n", "\t", "\u2028", "\u202e", "\ufeff", "\ud800", "\udfff",
    "\u0130", "\u017f", "%s", "%(x)s", "{}", "${HOME}", "$(id)", "`id`", ";", "--", "-",
    "=", "==", ":", "::", "[::1]", "[", "]", "@", "#", "password=x", "env:", "file:",
    "env:PGFLEET_PW_X", "file:/etc/shadow", "postgresql://u:p@h/db", "local", "a" * 300,
    "\u00e9" * 70, "é\u0301", "../../etc/passwd", "/dev/zero", "*", "?", "~",
]  # fmt: skip
ALPHABET = string.printable + "\x00\x01\x1b\x7f\x85\u2028\u202e\u00e9\u4e2d\ud800\U0001f600"


def rand_text(rng: random.Random, n: int = 40) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, n)))


def mutate(rng: random.Random, text: str, rounds: int = 3) -> str:
    """``text`` with a few random edits."""
    for _ in range(rng.randint(1, rounds)):
        i = rng.randint(0, len(text))
        j = rng.randint(i, min(len(text), i + 12))
        op = rng.random()
        if op < 0.3:
            text = text[:i] + rng.choice(NASTY) + text[i:]
        elif op < 0.5:
            text = text[:i] + text[j:]
        elif op < 0.65:
            text = text[:i] + text[i:j] * rng.randint(2, 4) + text[j:]
        elif op < 0.85:
            text = text[:i] + rng.choice(NASTY) + text[j:]
        else:
            text = text[:i] + rand_text(rng, 6) + text[i:]
    return text


def rand_value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON-like value."""
    r = rng.random()
    if depth < 3 and r < 0.15:
        return [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if depth < 3 and r < 0.25:
        return {rand_text(rng, 8): rand_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return rng.choice(
        [
            rng.choice(NASTY),
            rand_text(rng),
            rng.randint(-(2**70), 2**70),
            rng.random() * 10.0 ** rng.randint(-5, 300),
            rng.choice([True, False, None, float("nan")]),
            rng.randint(0, 70000),
        ]
    )


def one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "\r" not in message


# -- The configuration loader

VALID_CONFIGS = [
    "",
    '[repository]\ndsn = "host=repo.example dbname=pgfleet user=pgfleet"\n',
    "[collector]\nmax_in_flight = 10\nlease_period = 30\ncommand_channel = "
    '"pgfleet_collector"\nshutdown_timeout = 30\nstore_timeout = 60\nretry_max = 300\n'
    'sslmode = "verify-full"\npassword_dirs = ["/etc/pgfleet/pw"]\n',
    '[discovery]\nproviders = ["repository", "static", "file_sd"]\n'
    'files = ["/etc/pgfleet/targets/*.json"]\nrefresh = 10\n\n'
    '[[discovery.servers]]\nalias = "db1"\nhost = "db1.example"\nport = 5433\nuser = "mon"\n'
    'password_ref = "env:PGFLEET_PW_DB1"\nfrequency = 60\ncoalesce = 10\n'
    'options = "sslmode=require"\n',
    '[spool]\ndirectory = ""\nmax_size = 1024\n[logging]\nlevel = "debug"\nformat = "json"\n',
    '[exporter]\nenabled = true\nlisten = "127.0.0.1"\nport = 9630\nmax_statements = 20\n'
    '[web]\nenabled = false\nport = 8080\ntoken = "x"\nsession_max_age = 43200.0\n',
]
SECTIONS = {
    "repository": ["dsn"],
    "collector": [
        "connect_timeout", "statement_timeout", "max_in_flight", "lease_period",
        "command_channel", "shutdown_timeout", "sslmode", "password_dirs", "name",
    ],
    "discovery": ["providers", "files", "refresh"],
    "spool": ["directory", "max_size"],
    "logging": ["level", "format"],
    "exporter": ["enabled", "listen", "port", "max_tables"],
    "web": ["enabled", "port", "pool_size", "session_max_age"],
}  # fmt: skip
STATIC_KEYS = ["alias", "host", "port", "user", "dbname", "password_ref", "options", "frequency"]


def toml_value(rng: random.Random, depth: int = 0) -> str:
    r = rng.random()
    if r < 0.3:
        return json.dumps(rng.choice([*NASTY, rand_text(rng)]), ensure_ascii=rng.random() < 0.5)
    if r < 0.55:
        return str(rng.choice([0, -1, 1, 5432, 65536, 2**31, 2**63 - 1, rng.randint(-9, 10**6)]))
    if r < 0.7:
        return rng.choice(["1.5", "-0.0", "1e308", "inf", "-inf", "nan", "0.000001", "1e-320"])
    if r < 0.8:
        return rng.choice(["true", "false", "1979-05-27T07:32:00Z", "07:32:00", "1979-05-27"])
    if depth < 2:
        return "[" + ", ".join(toml_value(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"
    return '""'


def random_config(rng: random.Random) -> str:
    lines = []
    for section in rng.sample(sorted(SECTIONS), rng.randint(0, len(SECTIONS))):
        lines.append(f"[{section}]")
        for key in rng.sample(SECTIONS[section], rng.randint(0, len(SECTIONS[section]))):
            lines.append(f"{key} = {toml_value(rng)}")
    for _ in range(rng.randint(0, 2)):
        lines.append("[[discovery.servers]]")
        for key in rng.sample(STATIC_KEYS, rng.randint(0, len(STATIC_KEYS))):
            lines.append(f"{key} = {toml_value(rng)}")
    return "\n".join(lines) + "\n"


def config_cases(rng: random.Random) -> Iterator[bytes]:
    for i in range(CASES):
        kind = i % 4
        if kind == 0:
            text = rand_text(rng, 200)
        elif kind == 1:
            text = mutate(rng, rng.choice(VALID_CONFIGS), 4)
        elif kind == 2:
            text = random_config(rng)
        else:
            text = mutate(rng, random_config(rng), 2)
        data = text.encode("utf-8", "surrogatepass")
        if rng.random() < 0.03:
            data = data[: rng.randint(0, len(data))] + bytes([rng.randint(0x80, 0xFF)])
        yield data
    yield b"a = " + b"[" * 100_000
    yield b"[collector]\nmax_in_flight = " + b"9" * 100_000


def test_config_loader(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    path = tmp_path / "pgfleet.toml"
    outcomes: dict[str, int] = {}
    t0 = time.monotonic()
    for data in config_cases(rng):
        path.write_bytes(data)
        try:
            cfg = config.load(path)
            # As the daemon reads it: the static servers checked like 'server add'.
            from_static(cfg.discovery.servers, cfg.source)
            outcomes["parsed"] = outcomes.get("parsed", 0) + 1
        except ConfigError as e:
            assert one_line(str(e)), (data, str(e))
            assert str(e).startswith(f"invalid configuration {str(path)!r}: "), (data, str(e))
            outcomes["refused"] = outcomes.get("refused", 0) + 1
        except Exception as e:
            pytest.fail(f"config.load crashed on {data[:1500]!r}: {e!r}")
    print(f"config: {outcomes} in {time.monotonic() - t0:.1f} s")
    assert sum(outcomes.values()) >= CASES
    assert outcomes.get("parsed", 0) > CASES // 20, "the generator hardly makes valid files"


# -- file_sd files

VALID_GROUPS: list[Any] = [
    [
        {"targets": ["h1:5433", "h2"], "labels": {"dbname": "app", "frequency": "60"}},
        {"targets": ["h3"], "labels": {"alias": "three", "user": "mon", "password_ref": "env:PW"}},
    ],
    [{"targets": ["[::1]:6432"], "labels": {"alias": "v6", "coalesce": 10, "options": "x=1"}}],
    [{"targets": ["db.example"], "labels": {"options": "sslmode=require", "team": "x"}}],
]
LABELS = ["alias", "dbname", "user", "password_ref", "options", "frequency", "coalesce", "env"]
LABEL_VALUES: dict[str, list[Any]] = {
    "alias": [f"db-{i}" for i in range(300)] + ["local", "x.y:z@w"],
    "dbname": ["app", "postgres", "\u00e9t\u00e9", "a b"],
    "user": ["mon", "pg_monitor", "\u00e9"],
    "password_ref": ["env:PGFLEET_PW_A", "file:/etc/pgfleet/pw/a", "env:X\n"],
    "options": ["sslmode=require", "application_name='a b'", "connect_timeout=3"],
    "frequency": ["60", "1", " 5 ", "2147483647"],
    "coalesce": ["10", 100, "1"],
}


def random_groups(rng: random.Random) -> Any:
    if rng.random() < 0.1:
        return rand_value(rng)
    groups: list[Any] = []
    for _ in range(rng.randint(0, 3)):
        targets = [
            rng.choice(
                [
                    rand_text(rng, 12),
                    f"{rng.choice(NASTY)}:{rng.choice(NASTY)}",
                    f"h{rng.randint(0, 9)}:{rng.randint(-5, 70000)}",
                    f"h{rng.randint(0, 999)}:{rng.randint(1, 65535)}",
                    f"h{rng.randint(0, 999)}",
                    f"[{rand_text(rng, 6)}]:{rng.randint(0, 9)}",
                    "db.example",
                ]
            )
            for _ in range(rng.randint(0, 3))
        ]
        labels = {
            k: rng.choice(
                [
                    rng.choice(NASTY),
                    rand_text(rng, 10),
                    rng.randint(-9, 2**40),
                    *([rng.choice(LABEL_VALUES.get(k, ["x"]))] * 3),
                ]
            )
            for k in rng.sample(LABELS, rng.randint(0, len(LABELS)))
        }
        group: dict[str, Any] = {"targets": targets, "labels": labels}
        if rng.random() < 0.2:
            group[rng.choice(["targets", "labels"])] = rand_value(rng)
        groups.append(group)
    return groups


def dump(rng: random.Random, data: Any, yaml_file: bool) -> str:
    if yaml_file:
        try:
            return yaml.safe_dump(data, allow_unicode=rng.random() < 0.5)
        except yaml.YAMLError:
            return str(data)
    try:
        return json.dumps(data, ensure_ascii=rng.random() < 0.5)
    except (ValueError, TypeError):
        return str(data)


def file_sd_cases(rng: random.Random) -> Iterator[tuple[str, bytes]]:
    for i in range(CASES):
        yaml_file = i % 2 == 1
        kind = i // 2 % 4
        if kind == 0:
            text = rand_text(rng, 120)
        elif kind == 1:
            text = mutate(rng, dump(rng, rng.choice(VALID_GROUPS), yaml_file), 4)
        elif kind == 2:
            text = dump(rng, random_groups(rng), yaml_file)
        else:
            text = mutate(rng, dump(rng, random_groups(rng), yaml_file), 2)
        data = text.encode("utf-8", "surrogatepass")
        if rng.random() < 0.03:
            data += bytes([rng.randint(0x80, 0xFF)])
        yield (".yml" if yaml_file else ".json"), data
    # Deep nesting, a YAML alias bomb, too many targets.
    yield ".json", b"[" * 100_000
    yield ".yml", b"- " * 50_000 + b"x"
    bomb = "a: &a ['h:1', 'h:2', 'h:3', 'h:4', 'h:5', 'h:6', 'h:7', 'h:8', 'h:9', 'h:10']\n"
    bomb += "g: &g {targets: *a}\n" + "groups: [" + ", ".join(["*g"] * 2000) + "]\n"
    yield ".yml", bomb.encode()
    yield ".json", json.dumps([{"targets": [f"h{i}" for i in range(20_000)]}]).encode()


def test_file_sd(tmp_path: Path, repo: str) -> None:
    rng = random.Random(SEED + 1)
    outcomes: dict[str, int] = {}
    accepted: dict[str, Target] = {}
    t0 = time.monotonic()
    for n, (suffix, data) in enumerate(file_sd_cases(rng)):
        path = tmp_path / f"t{n % 7}{suffix}"
        path.write_bytes(data)
        t1 = time.monotonic()
        try:
            targets = parse_file_sd(path)
            outcomes["parsed"] = outcomes.get("parsed", 0) + 1
            for t in targets:
                accepted.setdefault(t.alias, t)
        except ConfigError as e:
            assert one_line(str(e)), (data, str(e))
            assert str(e).startswith(f"invalid file_sd file {str(path)!r}: "), (data, str(e))
            outcomes["refused"] = outcomes.get("refused", 0) + 1
        except Exception as e:
            pytest.fail(f"parse_file_sd crashed on {suffix} {data[:1500]!r}: {e!r}")
        assert time.monotonic() - t1 < 2, f"parse_file_sd took long on {data[:300]!r}"
    print(f"file_sd: {outcomes}, {len(accepted)} distinct targets, {time.monotonic() - t0:.1f} s")
    assert sum(outcomes.values()) >= CASES
    assert len(accepted) > 100, "the generator hardly makes valid targets"

    # Whatever a file may hold, what parse_file_sd accepted registers: no
    # target can fail the statement that registers all of them.
    async def register() -> list[servers.Collision]:
        async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn:
            return await servers.upsert_discovered(
                conn, [dataclasses.asdict(t) for t in accepted.values()]
            )

    collisions = asyncio.run(register())
    assert [c.alias for c in collisions] in ([], ["local"])


# -- Command-channel payloads

VALID_PAYLOADS = [
    "RELOAD fz_answers",
    "WORKERS_STATUS fz_answers",
    "WORKERS_STATUS fz_answers 12",
    "FORCE_SNAPSHOT fz_answers 1",
    "FORCE_SNAPSHOT - 3",
    "reload -",
]


def payload_cases(rng: random.Random, n: int = CASES) -> Iterator[str]:
    for i in range(n):
        kind = i % 3
        if kind == 0:
            yield rand_text(rng, 60)
        elif kind == 1:
            yield mutate(rng, rng.choice(VALID_PAYLOADS), 3)
        else:
            words = [
                rng.choice([*commands.COMMANDS, rand_text(rng, 8), rng.choice(NASTY)]),
                rng.choice(["fz_answers", "-", "pgfleet_collector", rand_text(rng, 8), "a" * 64]),
                *(rng.choice([*NASTY, "1", "42"]) for _ in range(rng.randint(0, 3))),
            ]
            yield rng.choice([" ", "  ", "\t", "\u2003"]).join(words)
    yield "x " * 4000
    yield "\u00e9\u00e8 " * 1000


def test_command_payloads_parse() -> None:
    rng = random.Random(SEED + 2)
    outcomes: dict[str, int] = {}
    for payload in payload_cases(rng):
        try:
            req = commands.parse(payload)
            # A parsed request is usable as it is.
            assert req.command in commands.COMMANDS
            assert req.channel is None or req.channel.isidentifier()
            req.srvid()
            outcomes["parsed"] = outcomes.get("parsed", 0) + 1
        except commands.BadRequest as e:
            assert one_line(e.reason) and len(e.reason) < 300, (payload, e.reason)
            assert e.channel is None or e.channel.isidentifier()
            outcomes["refused"] = outcomes.get("refused", 0) + 1
        except Exception as e:
            pytest.fail(f"commands.parse crashed on {payload!r}: {e!r}")
    print(f"payloads: {outcomes}")
    assert outcomes.get("parsed", 0) > CASES // 20


@contextlib.contextmanager
def captured_log() -> Iterator[io.StringIO]:
    """pgfleet's log, as JSON lines in a buffer; the loggers restored afterwards.

    A reload sets the log up again, on sys.stderr: that is the buffer too.
    """
    out = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("pgfleet", "psycopg")]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    try:
        with contextlib.redirect_stderr(out):
            log.setup("debug", "json")
            yield out
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            lg.handlers, lg.level, lg.propagate = handlers, level, propagate


def test_command_notifications_handled(repo: str, tmp_path: Path) -> None:
    """The daemon's handling: garbage from anyone, and requests of an admin (superuser)."""
    rng = random.Random(SEED + 3)
    garbage = list(payload_cases(rng, CASES))
    requests = list(payload_cases(rng, 1000))

    cfg_path = tmp_path / "pgfleet.toml"
    cfg_path.write_text('[logging]\nlevel = "debug"\nformat = "json"\n')

    inserted = 0

    async def run() -> Daemon:
        nonlocal inserted
        d = Daemon(config.load(cfg_path), config_path=str(cfg_path), dsn=repo)
        d.spool = Spool(tmp_path / "spool", 2**20)
        d.spool.open()
        d.prepare()
        async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn:
            cur = await conn.execute("SELECT statement_timestamp() - interval '1 second'")
            row = await cur.fetchone()
            assert row is not None
            d.requests.since = row[0]
            # Requests: rows of collector_command() (NUL is the one thing
            # no text column takes: the function is never called with it).
            for payload in requests:
                p = payload.replace("\x00", "").encode("utf-8", "replace").decode()
                if p and len(p.encode()) < commands.PAYLOAD_LIMIT:
                    await conn.execute(
                        "SELECT pgfleet.collector_command(%s, 'pgfleet_collector')", (p,)
                    )
                    inserted += 1
        for i, payload in enumerate(garbage):
            d._received(psycopg.Notify("pgfleet_collector", payload, rng.randint(1, 400)))
            if i % 200 == 199:
                await d._serve_requests()
                await d._answer_unmatched(budget=3600)
        d._rows_due = True
        while d._rows_due or len(d.inbox):
            await d._serve_requests()
            await d._answer_unmatched(budget=3600)
        await d.control.close()
        await d.writer_link.close()
        d.spool.close()
        return d

    t0 = time.monotonic()
    with captured_log() as out:
        d = asyncio.run(run())
    lines = out.getvalue().splitlines()
    events = [json.loads(line) for line in lines]  # every line is valid JSON
    crashes = [e for e in events if "exc" in e]
    assert not crashes, crashes[:3]
    stats = {k: n for (_, src, k), n in d.stats.counters().items() if src == "commands"}
    print(f"notifications: {stats} in {time.monotonic() - t0:.1f} s")
    assert stats["received"] == len(garbage)
    handled = sum(stats.get(k, 0) for k in ("malformed", "refused", "ignored"))
    served = sum(stats.get(k.lower(), 0) for k in commands.COMMANDS)
    # Each notification and each request was answered, refused, ignored or
    # dropped, and counted as such.
    assert handled + served + stats.get("dropped", 0) == len(garbage) + inserted
    assert served > 20, "the admin's valid requests were not served"


# -- The command line


def cli_options(parser: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (sub)command path and its parser."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from cli_options(sub, (*path, name))


def argv_cases(rng: random.Random, tmp_path: Path) -> Iterator[list[str]]:
    parsers = list(cli_options(cli.build_parser()))
    configs = []
    for i in range(20):
        p = tmp_path / f"fz{i}.toml"
        p.write_bytes(mutate(rng, rng.choice(VALID_CONFIGS), 2).encode("utf-8", "surrogatepass"))
        configs.append(str(p))
    values = [
        *NASTY,
        *configs,
        "/nonexistent.toml",
        str(tmp_path),
        "host=/nonexistent-fuzz port=1",
        "postgresql:///x?host=/nonexistent-fuzz",
        "postgresql://%zz",
        "host='unterminated",
        "=x",
        "dbname=x sslmode=bogus",
        "1d",
        "12h",
        "30m",
        "3600",
        "-5d",
        "1e400d",
        "0.0001s",
    ]
    for _ in range(CASES):
        path, parser = rng.choice(parsers)
        argv = list(path)
        opts = [
            a
            for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)
        ]
        for _ in range(rng.randint(0, 4)):
            if opts and rng.random() < 0.7:
                action = rng.choice(opts)
                argv.append(rng.choice(action.option_strings))
                if action.nargs != 0:
                    argv.append(rng.choice([*values, rand_text(rng, 12)]))
            else:
                argv.append(rng.choice([*values, rand_text(rng, 12), "--" + rand_text(rng, 5)]))
        if rng.random() < 0.3:
            argv = [rng.choice(["-c", "--repository"]), rng.choice(values), *argv]
        if rng.random() < 0.2:
            rng.shuffle(argv)
        if rng.random() < 0.1:
            argv = [mutate(rng, a, 1) if rng.random() < 0.3 else a for a in argv]
        yield argv


# Commands that serve until stopped, or start clusters: parsed, not run (but
# without a repository, which fails at once).
_LONG_RUNNING = {"web", "demo", "collector", "run"}


def test_command_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(SEED + 4)
    for var in ("PGFLEET_REPOSITORY", "PGFLEET_CONFIG", "PGSERVICEFILE", "PGPASSFILE"):
        monkeypatch.delenv(var, raising=False)
    # Whatever DSN the generator makes, nothing is reachable, and fast.
    monkeypatch.setenv("PGHOST", "/nonexistent-pgfleet-fuzz")
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "1")
    monkeypatch.chdir(tmp_path)
    outcomes: dict[str, int] = {}
    t0 = time.monotonic()
    for argv in argv_cases(rng, tmp_path):
        argv = [_unreachable(a) for a in argv]
        if _would_serve(argv):
            outcomes["parsed only"] = outcomes.get("parsed only", 0) + 1
            continue
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = cli.main(argv)
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else 1 if e.code else 0
        except Exception as e:
            pytest.fail(f"pgfleet {argv!r} crashed: {e!r}\n{err.getvalue()}")
        text = err.getvalue()
        if rc:
            lines = text.splitlines()
            assert len(lines) == 1 and lines[0].startswith("pgfleet: error: "), (argv, text)
            assert "Traceback" not in text, (argv, text)
        outcomes[f"rc {rc}"] = outcomes.get(f"rc {rc}", 0) + 1
    print(f"command lines: {outcomes} in {time.monotonic() - t0:.1f} s")
    assert sum(outcomes.values()) >= CASES


def _unreachable(arg: str) -> str:
    """A DSN the generator made valid, pointed nowhere (no name resolution, no server)."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(arg)
    except (psycopg.Error, ValueError, TypeError):
        return arg
    if not params:
        return arg
    return psycopg.conninfo.make_conninfo(
        arg, host="/nonexistent-pgfleet-fuzz", hostaddr="", service="", connect_timeout="1"
    )


def _would_serve(argv: list[str]) -> bool:
    """Whether ``pgfleet ARGV`` would serve (or start clusters) rather than fail at once."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            args = cli._parser().parse_args(argv)
    except SystemExit:
        return False
    command: str = args.command
    if command not in _LONG_RUNNING:
        return False
    # Without a repository, the collector fails at once: worth running.
    return command in ("web", "demo") or bool(args.repository or getattr(args, "config", None))


def test_fuzz_helpers_are_deterministic() -> None:
    """Same seed, same cases: a failure replays."""
    assert list(payload_cases(random.Random(7), 50)) == list(payload_cases(random.Random(7), 50))
