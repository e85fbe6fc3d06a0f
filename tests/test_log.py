"""Structured log lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from pgfleet import log


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """setup() changes process-wide loggers: put them back as they were."""
    saved: dict[str, tuple[list[logging.Handler], int, bool]] = {}
    for name in ("pgfleet", "psycopg"):
        lg = logging.getLogger(name)
        saved[name] = (list(lg.handlers), lg.level, lg.propagate)
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers, lg.level, lg.propagate = handlers, level, propagate


def capture(fmt: str, level: str = "info") -> io.StringIO:
    out = io.StringIO()
    log.setup(level, fmt, stream=out)
    return out


def test_keyvalue_lines() -> None:
    out = capture("keyvalue")
    lg = log.EventLogger("test").bind(server="db1")
    lg.info("snapshot stored", rows=12, ms=3.25, error='said "no"\nthen', lag=None)
    lg.debug("hidden")
    line = out.getvalue().strip()
    assert "\n" not in line
    assert ' level=info msg="snapshot stored" server=db1 rows=12 ms=3.25 ' in line
    assert 'error="said \\"no\\"\\nthen"' in line
    assert "lag=" not in line and "hidden" not in line


def test_json_lines_and_trace_level() -> None:
    out = capture("json", "trace")
    lg = log.EventLogger("test", server="db2")
    lg.trace("value", source="pg_stat_database", row="1\t2")
    event = json.loads(out.getvalue())
    assert event["level"] == "trace" and event["server"] == "db2" and event["row"] == "1\t2"
    assert logging.getLogger("pgfleet").isEnabledFor(log.TRACE)
    capture("keyvalue", "debug")
    assert not logging.getLogger("pgfleet").isEnabledFor(log.TRACE)


def test_secrets_are_masked_whatever_the_message() -> None:
    out = capture("keyvalue")
    lg = log.EventLogger("test")
    lg.error("oops", dsn="host=h password=s3cr3t user=u", uri="postgresql://u:pa55@h/db")
    text = out.getvalue()
    assert "s3cr3t" not in text and "pa55" not in text
    assert "password=***" in text and "postgresql://u:***@h/db" in text


HOSTILE = 'a\rb\x1b[2J\x00\x7f\x85\u2028\u202e\ud800 "q" \\ end'


def test_control_characters_are_escaped_in_values_and_keys() -> None:
    out = capture("keyvalue")
    lg = log.EventLogger("test")
    lg.warning("bad\x1b]0;title\x07", **{"k\x1be y": HOSTILE, "ok": "plain"})
    line = out.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    body = line[:-1]
    # Nothing a terminal acts upon, nothing that ends or reorders a line.
    assert all(c.isprintable() and c not in "\u202e" for c in body), repr(body)
    assert ' msg="bad\\x1b]0;title\\x07" ' in body
    assert (
        ' k\\x1be\\x20y="a\\rb\\x1b[2J\\x00\\x7f\\x85\\u2028\\u202e\\ud800 \\"q\\" \\\\ end"'
        in body
    )
    assert body.endswith(" ok=plain")


def test_json_lines_stay_valid_json() -> None:
    out = capture("json")
    lg = log.EventLogger("test")
    lg.warning(
        "bad\x1b",
        **{"k\x1bey": HOSTILE, "nan": float("nan"), "inf": float("inf"), "dsn": "password=x y"},
    )
    line = out.getvalue()
    assert line.count("\n") == 1 and all(c.isprintable() for c in line[:-1]), repr(line)
    event = json.loads(line)
    assert event["msg"] == "bad\x1b" and event["k\x1bey"] == HOSTILE
    assert event["nan"] == "nan" and event["inf"] == "inf"
    assert event["dsn"] == "password=*** y"


def test_masking_a_secret_keeps_the_line_parseable() -> None:
    # "password=x" inside a quoted value: the mask must not eat the quote.
    out = capture("json")
    lg = log.EventLogger("test")
    lg.warning("m", payload="RELOAD  password=x", error="then", password="s3cr3t")
    event = json.loads(out.getvalue())
    assert event["payload"] == "RELOAD  password=***" and event["error"] == "then"
    assert event["password"] == "***"
    out = capture("keyvalue")
    lg.warning("m", payload="RELOAD  password=x", error="then", password="s3cr3t")
    line = out.getvalue().strip()
    assert 'payload="RELOAD  password=***" error=then password="***"' in line
    assert "s3cr3t" not in line
