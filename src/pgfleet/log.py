"""Structured log lines: ``key=value`` (logfmt) by default, JSON on request.

Every line is one event: a short message and its fields.  Lines about a
server carry ``server=ALIAS``; get a :class:`EventLogger` bound to it with
``log.bind(server=alias)``.  A ``trace`` level below ``debug`` logs each
observed value.

Passwords and connection strings are never passed to a logger on purpose;
a last filter still masks ``password=...`` and ``user:password@`` in
whatever reaches the output, should an error message carry one.

Fields carry what others sent us (a server's error, a notification's
payload, a file_sd label): one event is always one line of printable text.
Control characters (C0, DEL, C1), line and paragraph separators, bidi
overrides and lone surrogates are escaped (``\x1b``, ``\u2028``), in keys
too; JSON lines are valid JSON (no NaN, no raw separators).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

ROOT = "pgfleet"

_SECRETS = (
    (re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I), r"\1***"),
    (re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@", re.I), r"\1***@"),
)


def redact(text: str) -> str:
    for pattern, repl in _SECRETS:
        text = pattern.sub(repl, text)
    return text


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    if not isinstance(fields, Mapping):
        return {}
    # An unknown value is left out rather than shown empty; a field named
    # like a password is masked whole.
    return {
        str(k): "***" if "password" in str(k).lower() else v
        for k, v in fields.items()
        if v is not None
    }


def _timestamp(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


_BARE = re.compile(r"[A-Za-z0-9_.:/@+,-]+")
_KEY = re.compile(r"[A-Za-z0-9_.:/@+-]+")
# What never reaches the output raw: C0 and C1 controls, DEL, line and
# paragraph separators, bidi embeddings, overrides and isolates (which can
# make a line read as another), and lone surrogates (not encodable).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    return _SHORT.get(c) or _hex(c)


def escape(text: str) -> str:
    """``text`` with every unsafe character as a backslash escape."""
    return _UNSAFE.sub(_escape_char, text)


def _logfmt(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "nan"
    text = redact(value if isinstance(value, str) else str(value))
    if text and _BARE.fullmatch(text):
        return text
    return '"' + escape(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def _logfmt_key(key: str) -> str:
    """A key as logfmt wants it: no quotes there, so anything else is escaped."""
    if _KEY.fullmatch(key):
        return key
    return "".join(c if _KEY.fullmatch(c) else _hex(c) for c in key) or "_"


def _hex(c: str) -> str:
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info msg="snapshot stored" server=db1 ms=12``."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={_timestamp(record)}",
            f"level={record.levelname.lower()}",
            f"msg={_logfmt(record.getMessage())}",
        ]
        parts.extend(f"{_logfmt_key(k)}={_logfmt(v)}" for k, v in _fields(record).items())
        if record.exc_info:
            parts.append(f"exc={_logfmt(self.formatException(record.exc_info))}")
        # Secrets are masked value by value (see _logfmt): on the whole line,
        # "password=x" could swallow the quote that ends its value.
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the same keys as the key=value lines."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "msg": redact(record.getMessage()),
        }
        for k, v in _fields(record).items():
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)  # NaN and Infinity are no JSON
            elif not isinstance(v, int | float | bool | str):
                v = str(v)
            # Masked value by value: on the whole line, "password=x" could
            # swallow the quote that ends its string.
            obj[k] = redact(v) if isinstance(v, str) else v
        if record.exc_info:
            obj["exc"] = redact(self.formatException(record.exc_info))
        # json.dumps escapes C0 controls; the others (only ever inside
        # strings) become \u escapes too.
        return escape_json(json.dumps(obj, ensure_ascii=False))


def escape_json(text: str) -> str:
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def setup(level: str = "info", fmt: str = "keyvalue", stream: IO[str] | None = None) -> None:
    """(Re)configure pgfleet's loggers; safe to call again on reload."""
    root = logging.getLogger(ROOT)
    for h in list(root.handlers):
        if getattr(h, "_pgfleet", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._pgfleet = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    root.propagate = False
    # psycopg logs its own warnings (e.g. a query not cancelled in time):
    # let them through our format too.
    pg = logging.getLogger("psycopg")
    pg.handlers = [handler]
    pg.setLevel(logging.WARNING)
    pg.propagate = False


class EventLogger:
    """A logger whose calls take fields as keywords: ``log.info("stored", ms=12)``."""

    def __init__(self, name: str, **bound: Any) -> None:
        self._logger = logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")
        self._bound = bound

    def bind(self, **fields: Any) -> EventLogger:
        child = EventLogger.__new__(EventLogger)
        child._logger = self._logger
        child._bound = {**self._bound, **fields}
        return child

    def enabled(self, level: int) -> bool:
        return self._logger.isEnabledFor(level)

    def _log(self, level: int, msg: str, fields: dict[str, Any], exc: bool = False) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, msg, exc_info=exc, extra={"fields": {**self._bound, **fields}})

    def trace(self, msg: str, **fields: Any) -> None:
        self._log(TRACE, msg, fields)

    def debug(self, msg: str, **fields: Any) -> None:
        self._log(logging.DEBUG, msg, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._log(logging.INFO, msg, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._log(logging.WARNING, msg, fields)

    def error(self, msg: str, **fields: Any) -> None:
        self._log(logging.ERROR, msg, fields)

    def exception(self, msg: str, **fields: Any) -> None:
        """An unexpected error: logged with its traceback, for a bug report."""
        self._log(logging.ERROR, msg, fields, exc=True)
