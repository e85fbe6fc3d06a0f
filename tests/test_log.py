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
