"""Hostile input: over 10,000 generated bad requests against the real app and a
real repository, and not one traceback.

Each request starts from a valid one (a page, its query string, the login
form, the forms that start index advice and plans) and is mutated by a
seeded generator: overlong values, control characters and NUL, invalid
UTF-8 percent-escapes, huge and negative numbers, reversed ranges, nested
brackets, markup, repeated and missing parameters, broken bodies and
content types, tampered cookies.  Requests go straight to the ASGI app
(no HTTP client normalises them on the way), with raw query strings and
paths as uvicorn would pass them.

Every page is fuzzed: the fleet, a server, a database (the hostile name's
too), a query, the collector, index advice and period comparison of a
server and of a database, with their JSON twins, and the parts of them
(``_only=``) such as pg_stat_kcache's (figures put in the repository for
the fuzz: the monitored PostgreSQL 18 has no pg_stat_kcache).  So is every
POST: login, logout, the collector's, and those that start work on the
monitored server (index advice, a generic plan), posted by a logged-in role
with its CSRF token so that they go as deep as a real one.

Every answer must be one a client can read (2xx/3xx, or 400/401/403/404/
405/413/422 with a message), never a 500 or a 503 (hostile input is no
reason for the repository to fail); no redirect leaves the site; markup sent
in never comes back as markup; and a normal page is served afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import pytest

from pgfleet.repository import kcache, reads
from pgfleet.web.app import create_app
from pgfleet.web.render import tilde_encode
from pgfleet.web.timerange import RANGES
from tests.fix_repository import connect
from tests.web.fix_web import HOSTILE_DB, TOKEN, Fleet, web_config
from tests.web.fix_web import fleet as fleet  # the fixture, for this module

REQUESTS = 10_500
SEED = 20261231
CONCURRENCY = 8
# Markup the generator slips in: it must never come back unescaped.
MARKER = "<svg onload=fuzz()>"
ALLOWED = {200, 204, 302, 303, 304, 400, 401, 403, 404, 405, 413, 422}

Headers = list[tuple[bytes, bytes]]


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    crash: str | None = None


async def call(
    app: Any,
    method: str,
    raw_path: bytes,
    query: bytes = b"",
    headers: Headers | None = None,
    body: bytes = b"",
    client: str = "127.0.0.1",
) -> Answer:
    """One request straight to the ASGI app, as uvicorn would pass it."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path.decode("ascii")),  # what uvicorn does
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": (client, 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if chunks:
            return chunks.pop(0)
        await asyncio.sleep(3600)  # the client stays until answered
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    crash = None
    try:
        await app(scope, receive, send)
    except Exception:
        crash = traceback.format_exc()
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    status = start["status"] if start else 0
    hdrs = {k.lower(): v for k, v in (start or {}).get("headers", [])}
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Answer(status, hdrs, data, crash)


def cookie_of(answer: Answer) -> bytes:
    value = answer.headers[b"set-cookie"].split(b";")[0]
    return value


def csrf_of(body: bytes) -> str:
    return body.decode().split('name="csrf" value="')[1].split('"')[0]


async def login(app: Any, user: str, password: str) -> Headers:
    """The cookie header of a new session of `user`."""
    page = await call(app, "GET", b"/login")
    form = f"csrf={csrf_of(page.body)}&username={quote(user)}&password={quote(password)}"
    r = await call(app, "POST", b"/login", headers=[(b"cookie", cookie_of(page)), (
        b"content-type", b"application/x-www-form-urlencoded")], body=form.encode())  # fmt: skip
    assert r.status == 303, r.body
    return [(b"cookie", cookie_of(r))]


# -- The generator


CONTROL = [chr(c) for c in range(32)] + ["\x7f", "\u2028", "\u202e", "\ufeff"]
BAD_ESCAPES = ["%ff", "%fe%ff", "%c3%28", "%ed%a0%80", "%e2%82", "%", "%g1", "%%", "%00",
               "%0d%0aSet-Cookie:%20x=1", "%2e%2e%2f", "%5c", "%c0%af", "%f4%90%80%80"]  # fmt: skip
NUMBERS = ["9" * 30, "9" * 400, "1e309", "-1e309", "nan", "inf", "-inf", "-0", "0x10", "1_000",
           "\u0661\u0662", "+5", "-1", "-9223372036854775809", "9223372036854775808",
           "2147483648", "0", "1e-400", "1.5", " 1", "1 ", "٣"]  # fmt: skip
SHAPES = ["[" * 50 + "]" * 50, "{" * 30, "}}", "{{7*7}}", "{%", "${x}", "'; DROP TABLE x;--",
          '"', "\\", "../../etc/passwd", "~", "~ZZ", "~0", "~2F", "~2E~2E", "~00", "//evil.example",
          "https://evil.example/", "/\\evil.example", "/\t/evil.example", "javascript:alert(1)",
          "é", "\ufffd", "😀" * 10, "e\u0301" * 20, MARKER, ",,,", "a,b,,c", "*", "\x00"]  # fmt: skip


class Mutator:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def text(self, s: str) -> str:
        """A hostile variant of `s`."""
        r = self.rng
        kind = r.randrange(9)
        if kind == 0:
            return s * r.randint(2, 200) + "x" * r.choice([0, 1000, 10_000])
        if kind == 1:
            i = r.randint(0, len(s))
            return s[:i] + "".join(r.choices(CONTROL, k=r.randint(1, 4))) + s[i:]
        if kind == 2:
            return r.choice(NUMBERS)
        if kind == 3:
            return r.choice(SHAPES)
        if kind == 4:
            return s[: r.randint(0, len(s))]
        if kind == 5:
            return "".join(chr(r.choice([r.randint(1, 0x7F), r.randint(0x80, 0xD7FF)]))
                           for _ in range(r.randint(1, 40)))  # fmt: skip
        if kind == 6:
            return s + r.choice(SHAPES) + r.choice(NUMBERS)
        if kind == 7:
            return "-" + s if r.random() < 0.5 else s[::-1]
        return ""

    def encode(self, s: str) -> bytes:
        """`s` percent-encoded, sometimes with raw or broken escapes mixed in."""
        r = self.rng
        out = quote(s, safe="", errors="surrogatepass").encode()
        if r.random() < 0.2:
            i = r.randint(0, len(out))
            out = out[:i] + r.choice(BAD_ESCAPES).encode() + out[i:]
        if r.random() < 0.05:
            out += bytes(r.randint(0, 255) for _ in range(r.randint(1, 8)))  # raw bytes
        return out

    def query(self, params: list[tuple[str, str]]) -> bytes:
        r = self.rng
        params = list(params)
        for _ in range(r.randint(0, 3)):
            op = r.randrange(5)
            if op == 0 and params:  # mutate a value
                i = r.randrange(len(params))
                params[i] = (params[i][0], self.text(params[i][1]))
            elif op == 1 and params:  # mutate a key
                i = r.randrange(len(params))
                params[i] = (self.text(params[i][0]), params[i][1])
            elif op == 2 and params:  # repeat one
                params.append(r.choice(params))
            elif op == 3 and params:  # drop one
                params.pop(r.randrange(len(params)))
            else:  # one of ours, anything
                params.append((r.choice(["range", "from", "to", "sort", "_only", "db", "next",
                                         "against", "a_from", "a_to", "ksort", "own"]),
                               self.text(r.choice(["1h", "1700000000", "calls", "charts",
                                                   "previous", "custom", "cpu", "1"]))))  # fmt: skip
        parts = [self.encode(k) + b"=" + self.encode(v) for k, v in params]
        if r.random() < 0.1:
            parts.append(r.choice([b"", b"=", b"&&", b"a", b";x=1", b"=%ff"]))
        return b"&".join(parts)


@dataclass
class Target:
    """What the generator builds requests from: the fleet's real names."""

    srvid: int
    datnames: list[str]
    queryid: int
    query_db: str
    paths: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)  # the POSTs that start runs

    def __post_init__(self) -> None:
        s = f"/server/{self.srvid}"
        db = f"{s}/database/{tilde_encode(self.datnames[0])}"
        hostile = f"{s}/database/{tilde_encode(HOSTILE_DB)}"
        pages = ["/fleet", s, db, hostile, f"{s}/query/{self.queryid}", "/collector",
                 f"{s}/advice", f"{db}/advice", f"{hostile}/advice",
                 f"{s}/compare", f"{db}/compare", f"{hostile}/compare"]  # fmt: skip
        self.paths = pages + [p + ".json" for p in pages]
        self.actions = [f"{s}/advice", f"{db}/advice", f"{s}/query/{self.queryid}/explain"]


def range_params(rng: random.Random, prefix: str = "") -> list[tuple[str, str]]:
    """A valid range: a preset, or `prefix`from and `prefix`to (seconds or ISO 8601)."""
    if not prefix and rng.random() < 0.5:
        return [("range", rng.choice(list(RANGES)))]
    now = int(time.time()) - (rng.randint(0, 86400 * 7) if prefix else 0)
    start = now - rng.randint(60, 86400 * 7)
    if rng.random() < 0.5:
        return [(f"{prefix}from", str(start)), (f"{prefix}to", str(now))]
    iso = "%Y-%m-%dT%H:%M:%S"
    return [(f"{prefix}from", time.strftime(iso, time.gmtime(start))),
            (f"{prefix}to", time.strftime(iso, time.gmtime(now)))]  # fmt: skip


def page_params(rng: random.Random, t: Target) -> list[tuple[str, str]]:
    params = range_params(rng)
    if rng.random() < 0.5:
        params.append(("sort", rng.choice(list(reads.QUERY_SORTS))))
    if rng.random() < 0.3:
        params.append(("ksort", rng.choice(list(kcache.SORTS))))
    if rng.random() < 0.2:
        params.append(("own", "1"))
    if rng.random() < 0.3:  # what compare pages read; the others ignore it
        against = rng.choice(["previous", "1d", "7d", "custom"])
        params.append(("against", against))
        if against == "custom":
            params += range_params(rng, "a_")[: rng.choice([1, 2])]
    if rng.random() < 0.5:
        parts = ["charts", "markers", "top_queries", "databases", "servers", "tables",
                 "kcache", "run", "plan", "statements", "totals"]  # fmt: skip
        params.append(("_only", ",".join(rng.sample(parts, rng.randint(1, 3)))))
    if rng.random() < 0.3:
        params.append(("db", t.query_db))
    return params


def path_variant(rng: random.Random, m: Mutator, t: Target) -> bytes:
    path = rng.choice(t.paths)
    segments = path.split("/")
    kind = rng.randrange(4)
    if kind == 0:  # a segment replaced
        i = rng.randrange(1, len(segments))
        segments[i] = m.text(segments[i])
    elif kind == 1:  # a segment added
        segments.insert(rng.randrange(1, len(segments) + 1), m.text(rng.choice(segments)))
    elif kind == 2:  # elsewhere
        segments = ["", rng.choice(["static", "vendor", "login", "logout", "collector", "x"]),
                    m.text("pgfleet.css")]  # fmt: skip
    raw = b"/".join(m.encode(seg) if seg else b"" for seg in segments)
    if rng.random() < 0.1:
        raw += rng.choice([b".json", b".json.json", b"/", b"//", b"/.", b"%2F..%2F"])
    return on_the_wire(raw)


def on_the_wire(raw: bytes) -> bytes:
    """A path as uvicorn can receive it: printable ASCII, no "?" or "#"."""
    return bytes(b if 0x21 <= b < 0x7F and b not in b"?#" else ord("_") for b in raw) or b"/"


@dataclass
class Creds:
    token: Headers
    admin: Headers  # a session cookie
    admin_csrf: str
    anon: Headers  # a session cookie, not logged in
    anon_csrf: str
    # A reader's session that no generated request logs out: the POSTs that
    # start runs go deep all along the fuzz.
    actor: Headers
    actor_csrf: str


def auth_headers(rng: random.Random, m: Mutator, c: Creds) -> Headers:
    k = rng.random()
    if k < 0.6:
        return list(c.token)
    if k < 0.75:
        return list(c.admin)
    if k < 0.85:
        return [(b"authorization", b"Bearer " + m.encode(m.text(TOKEN)))]
    if k < 0.95:
        cookie = c.admin[0][1]
        i = rng.randrange(len(cookie))
        return [(b"cookie", cookie[:i] + m.encode(m.text("x"))[:20] + cookie[i + 1 :])]
    return []


def form_request(
    rng: random.Random, m: Mutator, c: Creds, fleet: Fleet
) -> tuple[str, bytes, Headers, bytes]:
    admin = rng.random() < 0.3
    cookie, csrf = (c.admin, c.admin_csrf) if admin else (c.anon, c.anon_csrf)
    path = rng.choice([b"/login", b"/login", b"/login", b"/logout", b"/collector/reload",
                       on_the_wire(b"/collector/snapshot/" + m.encode(m.text(str(fleet.srvid))))
                       ])  # fmt: skip
    user, password = rng.choice([fleet.reader, fleet.admin, ("postgres", "x"), ("nobody", "pw")])
    fields = [("csrf", csrf), ("username", user), ("password", password), ("next", "/fleet")]
    if rng.random() < 0.2:
        fields = [("csrf", csrf), ("token", TOKEN), ("next", "/fleet")]
    body = m.query(fields)
    ctype = rng.choice([b"application/x-www-form-urlencoded"] * 6 + [
        b"multipart/form-data; boundary=xyz", b"multipart/form-data", b"application/json",
        b"text/plain", b"application/x-www-form-urlencoded; charset=latin-1", b"\x00",
    ])  # fmt: skip
    if ctype.startswith(b"multipart") and rng.random() < 0.5:
        body = (b'--xyz\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n' + csrf.encode()
                + b'\r\n--xyz\r\nContent-Disposition: form-data; name="username"; filename="a"\r\n'
                + b"\r\n" + m.encode(m.text(user)) + b"\r\n--xyz" + rng.choice([b"--\r\n", b""]))  # fmt: skip
    headers = [*cookie, (b"content-type", ctype)]
    if rng.random() < 0.05:
        headers.append((b"content-length", rng.choice([b"-1", b"abc", b"99999999999", b"0"])))
    if rng.random() < 0.02:
        body = b"a=" + b"x" * 100_000
    return "POST", path, headers, body


def action_request(
    rng: random.Random, m: Mutator, c: Creds, t: Target
) -> tuple[str, bytes, Headers, bytes]:
    """A POST of the forms that start index advice or a plan: its path (the
    server, database or queryid in it hostile at times), its fields (CSRF
    token, range, the plan's database), its session."""
    path = rng.choice(t.actions)
    raw = path.encode()
    if rng.random() < 0.3:
        segments = path.split("/")
        # The srvid, the database or the queryid: what the handlers parse.
        i = rng.choice([2, 4]) if len(segments) > 4 else 2
        segments[i] = m.text(segments[i])
        raw = on_the_wire(b"/".join(m.encode(seg) if seg else b"" for seg in segments))
    fields = [("csrf", c.actor_csrf), *range_params(rng)]
    if path.endswith("/explain") and rng.random() < 0.7:
        fields.append(("db", rng.choice([t.query_db, t.query_db, HOSTILE_DB, "postgres"])))
    body = m.query(fields)
    k = rng.random()
    if k < 0.75:
        headers = list(c.actor)
    elif k < 0.85:
        headers = list(c.token)  # read-only: refused
    elif k < 0.92:
        headers = list(c.anon)
    else:
        cookie = c.actor[0][1]
        i = rng.randrange(len(cookie))
        headers = [(b"cookie", cookie[:i] + m.encode(m.text("x"))[:20] + cookie[i + 1 :])]
    ctype = rng.choice([b"application/x-www-form-urlencoded"] * 8 + [
        b"multipart/form-data; boundary=xyz", b"application/json", b"text/plain"])  # fmt: skip
    return "POST", raw, [*headers, (b"content-type", ctype)], body


def kcache_figures(repo: str, srvid: int, datname: str, queryid: int) -> None:
    """pg_stat_kcache figures of the fleet's server, as snapshots would have
    stored them, so that the kcache parts read something: a few minutes of
    a statement's CPU time and I/O, and the rollup made from them."""
    with connect(repo) as conn:
        conn.execute(
            """INSERT INTO pgfleet.pg_stat_kcache_current
                      (srvid, ts, datname, rolname, toplevel, queryid, exec_user_time,
                       exec_system_time, exec_reads, exec_writes)
               SELECT %(srvid)s, now() - i * interval '1 minute', %(datname)s, 'app', true,
                      %(queryid)s, 0.5 * i, 0.1 * i, 8192 * i, 4096 * i
                 FROM generate_series(1, 5) i""",
            {"srvid": srvid, "datname": datname, "queryid": queryid},
        )
        conn.execute(
            """INSERT INTO pgfleet.pg_stat_kcache_last (srvid, ts, datname, rolname, toplevel,
                                                      queryid)
               VALUES (%s, now(), %s, 'app', true, %s)""",
            (srvid, datname, queryid),
        )
        conn.execute("SELECT pgfleet.metric_rollup_rebuild('pg_stat_kcache')")


def check(req: tuple[Any, ...], a: Answer) -> str | None:
    """What is wrong with this answer, if anything."""
    if a.crash:
        return f"crash:\n{a.crash}"
    if a.status not in ALLOWED:
        return f"status {a.status}: {a.body[:300]!r}"
    if a.status >= 400 and not a.body.strip():
        return f"status {a.status} without a message"
    if a.status in (301, 302, 303, 307, 308):
        loc = a.headers.get(b"location", b"")
        if not loc.startswith(b"/") or loc.startswith(b"//") or b"\\" in loc:
            return f"redirect away: {loc!r}"
    if b"html" in a.headers.get(b"content-type", b"") and MARKER.encode() in a.body:
        return "markup sent in came back as markup"
    return None


def test_thousands_of_hostile_requests_and_no_traceback(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    with connect(fleet.repo) as conn:
        row = conn.execute(
            "SELECT queryid, datname FROM pgfleet.pg_stat_statements_once WHERE srvid = %s"
            " AND query LIKE '%%FROM work WHERE%%' LIMIT 1",
            (fleet.srvid,),
        ).fetchone()
    assert row is not None
    target = Target(fleet.srvid, [str(row[1])], int(row[0]), str(row[1]))
    kcache_figures(fleet.repo, fleet.srvid, target.query_db, target.queryid)
    caplog.set_level(logging.WARNING)

    async def go() -> tuple[Counter[int], list[str], float]:
        app = create_app(web_config(fleet.repo, pool_size=4, login_attempts=10))
        async with app.router.lifespan_context(app):
            # Refusals are not slowed down here: this is about parsers, not timing.
            app.state.pgfleet.sessions.failed_login_seconds = 0
            anon = await call(app, "GET", b"/login")
            anon_cookie = [(b"cookie", cookie_of(anon))]
            admin = await login(app, *fleet.admin)
            page = await call(app, "GET", b"/collector", headers=admin)
            actor = await login(app, *fleet.reader)
            form = await call(app, "GET", f"/server/{fleet.srvid}/advice".encode(), b"", actor)
            assert b"Suggest indexes" in form.body, form.body[:300]
            creds = Creds([(b"authorization", f"Bearer {TOKEN}".encode())], admin,
                          csrf_of(page.body), anon_cookie, csrf_of(anon.body), actor,
                          csrf_of(form.body))  # fmt: skip

            rng = random.Random(SEED)
            m = Mutator(rng)
            requests: list[tuple[str, bytes, bytes, Headers, bytes, str]] = []
            for i in range(REQUESTS):
                address = f"10.{i % 200}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
                k = rng.random()
                if k < 0.45:  # a page's query string
                    path = rng.choice(target.paths).encode()
                    q = m.query(page_params(rng, target))
                    requests.append(("GET", path, q, auth_headers(rng, m, creds), b"", address))
                elif k < 0.7:  # a path
                    q = m.query(page_params(rng, target)) if rng.random() < 0.3 else b""
                    requests.append(("GET", path_variant(rng, m, target), q,
                                     auth_headers(rng, m, creds), b"", address))  # fmt: skip
                elif k < 0.85:  # a form
                    method, path, headers, body = form_request(rng, m, creds, fleet)
                    requests.append((method, path, b"", headers, body, address))
                elif k < 0.95:  # a form that starts a run
                    method, path, headers, body = action_request(rng, m, creds, target)
                    requests.append((method, path, b"", headers, body, address))
                else:  # a method, a login page's next=
                    method = rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "GET"])
                    q = m.query([("next", m.text("/fleet?range=1h"))])
                    requests.append((method, rng.choice([b"/login", *(p.encode()
                                     for p in target.paths)]), q, list(creds.token), b"",
                                     address))  # fmt: skip

            statuses: Counter[int] = Counter()
            problems: list[str] = []
            gate = asyncio.Semaphore(CONCURRENCY)

            async def one(req: tuple[str, bytes, bytes, Headers, bytes, str]) -> None:
                method, path, q, headers, body, address = req
                async with gate:
                    a = await call(app, method, path, q, headers, body, address)
                statuses[a.status] += 1
                if (why := check(req, a)) is not None:
                    problems.append(f"{method} {path[:200]!r}?{q[:300]!r} body={body[:200]!r}"
                                    f" headers={headers!r}: {why}")  # fmt: skip

            t = time.perf_counter()
            await asyncio.gather(*(one(req) for req in requests))
            elapsed = time.perf_counter() - t

            # The runs the forms started went as deep as real ones, and
            # none failed for what a request held.
            st = app.state.pgfleet
            deadline = time.monotonic() + 120
            while st.runs.get_stats()["running"] and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            stats = st.runs.get_stats()
            assert stats["running"] == 0, stats
            assert stats.get("started_advice", 0) >= 1 and stats.get("started_plan", 0) >= 1, stats
            assert not stats.get("failed_advice") and not stats.get("failed_plan"), stats

            # Still serving, as usual.
            h = list(creds.token)
            a = await call(app, "GET", f"/server/{fleet.srvid}.json".encode(), b"range=1h", h)
            assert a.status == 200 and b'"charts"' in a.body
            a = await call(app, "GET", f"/server/{fleet.srvid}.json".encode(),
                           b"range=1h&_only=kcache", h)  # fmt: skip
            assert a.status == 200 and b'"available":true' in a.body.replace(b" ", b""), a.body
            a = await call(app, "GET", f"/server/{fleet.srvid}/compare.json".encode(),
                           b"range=1h&against=previous", h)  # fmt: skip
            assert a.status == 200 and b'"statements"' in a.body
            # A role's session, the actor's: the fuzz may well have logged the
            # admin out, and a new login as the reader may be throttled a
            # while (the forms tried its name with wrong passwords).
            a = await call(app, "GET", b"/fleet", b"", creds.actor)
            assert a.status == 200 and b"mon" in a.body
        return statuses, problems, elapsed

    statuses, problems, elapsed = asyncio.run(go())
    print(f"{REQUESTS} hostile requests in {elapsed:.1f} s: {dict(sorted(statuses.items()))}")
    kinds: dict[str, str] = {}  # one example of each kind of problem
    for p in problems:
        kinds.setdefault(p.rsplit(": ", 1)[-1].strip().splitlines()[-1][:120], p)
    assert not problems, f"{len(problems)} problems, {len(kinds)} kinds:\n" + "\n\n".join(
        kinds.values()
    )
    assert sum(statuses.values()) == REQUESTS
    # Enough of them went deep: pages built, and refused for what they held.
    assert statuses[200] > 1000 and statuses[400] > 300 and statuses[404] > 300
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors[:5]]
