"""Turning view data into HTML and JSON, and names into URL segments.

Nothing a monitored server returns (aliases, database names, query texts) is
trusted: templates are autoescaped, JSON goes out as ``application/json`` only
(never inlined into a page), and the scripts put data into the page with
``textContent``, never as markup.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PostgresLexer
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from pgfleet.repository.usage import human_bytes
from pgfleet.snapshot.model import STATEMENT_MARKER

# -- Names in URLs.  Database names may hold anything, "/" and "." included:
# like Datasette, encode every byte outside [A-Za-z0-9_-] as ~XX, so a segment
# never holds "/" or "." and "NAME.json" is unambiguous.

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def tilde_encode(name: str) -> str:
    return "".join(chr(b) if b in _SAFE else f"~{b:02X}" for b in name.encode())


def tilde_decode(segment: str) -> str:
    out = bytearray()
    i = 0
    raw = segment.encode()
    while i < len(raw):
        if raw[i : i + 1] == b"~" and i + 2 < len(raw) + 0 and _is_hex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode(errors="replace")


def _is_hex(b: bytes) -> bool:
    return len(b) == 2 and all(c in b"0123456789ABCDEFabcdef" for c in b)


# -- JSON


def _default(o: Any) -> Any:
    if isinstance(o, dt.datetime):
        return o.isoformat()
    if isinstance(o, dt.timedelta):
        return o.total_seconds()
    if isinstance(o, decimal.Decimal):
        return float(o)
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _clean(o: Any) -> Any:
    # NaN and infinities are not JSON.
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_clean(v) for v in o]
    return o


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(
            _clean(content), default=_default, ensure_ascii=False, separators=(",", ":")
        ).encode()


# -- Templates


def _number(v: Any, digits: int = 1) -> str:
    """1234567 -> '1.2M'; None -> ''."""
    if v is None:
        return ""
    x = float(v)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}f}{unit}"
    return f"{x:.{digits}f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def _bytes(v: Any) -> str:
    return human_bytes(None if v is None else float(v))


def _ms(v: Any) -> str:
    if v is None:
        return ""
    x = float(v)
    if x >= 3_600_000:
        return f"{x / 3_600_000:.1f} h"
    if x >= 60_000:
        return f"{x / 60_000:.1f} min"
    if x >= 1000:
        return f"{x / 1000:.2f} s"
    return f"{x:.2f} ms"


def _age(seconds: Any) -> str:
    if seconds is None:
        return "never"
    s = float(seconds)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s / n:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def _when(t: Any) -> str:
    if not isinstance(t, dt.datetime):
        return "" if t is None else str(t)
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _version(num: Any) -> str:
    if not num:
        return ""
    n = int(num)
    return f"{n // 10000}.{n % 10000}" if n >= 100000 else f"{n // 10000}.{n // 100 % 100}"


def _seconds(v: Any) -> str:
    """CPU seconds: 0.0123 -> '12.3 ms', 5400 -> '1.5 h'."""
    if v is None:
        return ""
    return _ms(float(v) * 1000)


def _duration(seconds: Any) -> str:
    """A span: 90 -> '1.5 min', 604800 -> '7 d'."""
    if seconds is None:
        return ""
    s = float(seconds)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s / n:.1f}".removesuffix(".0") + f" {unit}"
    return f"{s:.0f} s"


def _percent(v: Any, digits: int = 0) -> str:
    """A fraction as a signed percentage: 0.25 -> '+25%'; None -> ''."""
    if v is None:
        return ""
    return f"{float(v) * 100:+.{digits}f}%"


def _by_table(indexes: Any) -> list[dict[str, Any]]:
    """Index advice's candidates per table, in their order (suggested first)."""
    tables: dict[tuple[str, str], dict[str, Any]] = {}
    for ix in indexes or []:
        key = (str(ix.get("schema")), str(ix.get("table")))
        t = tables.setdefault(key, {"schema": key[0], "table": key[1], "indexes": []})
        t["indexes"].append(ix)
    return list(tables.values())


_FORMATTER = HtmlFormatter(nowrap=True)


def _sql(text: Any) -> Markup:
    """SQL highlighted; Pygments escapes the text itself."""
    return Markup(highlight(str(text or ""), PostgresLexer(), _FORMATTER))


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pgfleet.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        number=_number, bytes=_bytes, ms=_ms, age=_age, when=_when, pgversion=_version,
        sql=_sql, tilde=tilde_encode, seconds=_seconds, percent=_percent, by_table=_by_table,
        duration=_duration,
    )  # fmt: skip
    # Named where the top queries say what they hide.
    env.globals["statement_marker"] = STATEMENT_MARKER
    return env


def pygments_css() -> str:
    return str(_FORMATTER.get_style_defs(".sql"))  # type: ignore[no-untyped-call]


def render(request: Request, env: jinja2.Environment, name: str, **context: Any) -> HTMLResponse:
    html = env.get_template(name).render(request=request, **context)
    return HTMLResponse(html, headers=SECURITY_HEADERS)


# Scripts from our own origin only, no inline script: even markup that got
# into a page could not run.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self';"
    " style-src 'self' 'unsafe-inline'; img-src 'self' data:; object-src 'none';"
    " frame-ancestors 'none'; base-uri 'none';"
    " form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def static_dir() -> Any:
    return resources.files("pgfleet.web").joinpath("static")
