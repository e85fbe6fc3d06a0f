"""The Starlette application: routes, login, and each page's HTML and JSON twin.

``create_app(config)`` builds it, ``serve(app, config)`` runs it with uvicorn
until cancelled: ``pgfleet web`` does both, ``pgfleet run`` may run it next to
the collector.

Whatever a request holds, the answer is a page or a readable error with its
status (400 bad range, 401/403 login and forms, 404 no such thing, 413 body
too large, 503 repository busy or too slow), never a traceback: inputs are
checked where they are parsed (:mod:`.timerange`, :func:`.page.path_int`, the
names of databases against the server's), and nothing taken from the URL
goes to SQL unchecked.

Every POST form carries the session's CSRF token.  The POSTs that ask a
monitored server for something (index advice, a plan: ``ACTIONS``) are
refused to the token (read-only) and bounded by :mod:`.runs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, urlencode

import psycopg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgfleet import asgi
from pgfleet.config import Config
from pgfleet.errors import ConfigError, PgfleetError
from pgfleet.web import render, timerange
from pgfleet.web.page import INT4_MAX, Ctx, NotFound, Page, WebState
from pgfleet.web.pools import Busy, PoolClosed
from pgfleet.web.sessions import LoginFailed, Sessions, User
from pgfleet.web.views import advice, collector, compare, database, fleet, plans, query, server

logger = logging.getLogger("pgfleet.web")

PAGES: list[Page] = [
    fleet.PAGE, server.PAGE, database.PAGE, query.PAGE, collector.PAGE,
    advice.SERVER_PAGE, advice.DATABASE_PAGE, compare.SERVER_PAGE, compare.DATABASE_PAGE,
]  # fmt: skip
# What a POST starts on a monitored server: the form's page (see views.advice).
ACTIONS: list[tuple[str, Callable[[Ctx, dict[str, str]], Awaitable[str]]]] = [
    (advice.SERVER_PAGE.path, advice.start),
    (advice.DATABASE_PAGE.path, advice.start),
    (query.PAGE.path + "/explain", plans.explain),
]
T = TypeVar("T")
COOKIE = "pgfleet_session"
# Our forms hold a few short fields: a bigger body is refused (413) unread.
MAX_BODY = 64 * 1024


def _read_secret(path: str, what: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"cannot read the web {what} file {path!r}: {e.strerror}") from None
    if not text:
        raise ConfigError(f"the web {what} file {path!r} is empty")
    return text


def uplot_dir() -> Path | None:
    """uPlot's files: vendored (committed) in our static files, unless
    $PGFLEET_UPLOT_DIR names others."""
    here = Path(__file__).resolve()
    candidates = [
        os.environ.get("PGFLEET_UPLOT_DIR", ""),
        str(here.parent / "static" / "vendor" / "uplot"),
    ]
    for c in candidates:
        if c and (Path(c) / "uPlot.iife.min.js").is_file():
            return Path(c)
    return None


def create_app(config: Config) -> Starlette:
    """The web UI over the repository of `config` (``[repository]``, ``[web]``)."""
    web = config.web
    if not config.repository.dsn:
        raise ConfigError(
            "no repository configured: pass --repository DSN, set PGFLEET_REPOSITORY, "
            "or [repository] dsn in the configuration file"
        )
    secret = (
        _read_secret(web.secret_key_file, "secret key")
        if web.secret_key_file
        else secrets.token_urlsafe(32)
    )
    token = _read_secret(web.token_file, "token") if web.token_file else (web.token or None)
    sessions = Sessions(config.repository.dsn, web, token=token)
    up = uplot_dir()
    state = WebState(config, sessions, render.templates(), up is not None)
    if up is None:
        logger.warning("uPlot not found in pgfleet/web/static/vendor/uplot: no charts")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(sessions.run_sweeper())
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await state.runs.close()
            await sessions.close()

    routes: list[BaseRoute] = [
        Route("/", lambda r: RedirectResponse("/fleet", status_code=302)),
        Route("/login", _login, methods=["GET", "POST"]),
        Route("/logout", _logout, methods=["POST"]),
        Route("/collector/reload", _reload, methods=["POST"]),
        Route("/collector/snapshot/{srvid}", _force_snapshot, methods=["POST"]),
        Route("/static/pygments.css", _pygments_css),
        Route("/favicon.ico", lambda r: Response(status_code=204)),
        Mount("/static", StaticFiles(directory=str(render.static_dir())), name="static"),
    ]
    if up is not None:
        routes.insert(-1, Mount("/vendor/uplot", StaticFiles(directory=str(up)), name="uplot"))
    for path, action in ACTIONS:
        routes.append(Route(path, _action(action), methods=["POST"]))
    for page in PAGES:
        # The JSON twin first: "NAME.json" must not be taken for a name.
        routes.append(Route(page.path + ".json", _handler(page, as_json=True)))
        routes.append(Route(page.path, _handler(page, as_json=False)))
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=secret,
                session_cookie=COOKIE,
                max_age=int(web.session_max_age),
                same_site="lax",
                https_only=web.secure_cookie,
            ),
            Middleware(BodyLimit, max_bytes=MAX_BODY),
        ],
        lifespan=lifespan,
    )
    # "/fleet/" is not "/fleet": no redirect built from the Host header.
    app.router.redirect_slashes = False
    app.state.pgfleet = state
    return app


async def serve(app: Starlette, config: Config) -> None:
    """Serve `app` on ``[web] listen:port`` until cancelled, then shut down
    cleanly (requests finish, pools close).  Signals are the caller's."""
    sock = asgi.bind(config.web.listen, config.web.port, "the web UI")
    await asgi.serve(app, sock, lifespan="on")


class BodyLimit:
    """Refuse request bodies over `max_bytes` (413), declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (
                not value.isdigit() or len(value) > 12 or int(value) > self.max_bytes
            ):
                resp = PlainTextResponse(
                    f"request body too large (at most {self.max_bytes} bytes)", status_code=413
                )
                await resp(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # Raised inside the route: Starlette answers it.
                raise HTTPException(413, f"request body too large (at most {self.max_bytes} bytes)")
            return message

        await self.app(scope, limited, send)


def _state(request: Request) -> WebState:
    st: WebState = request.app.state.pgfleet
    return st


def client_address(request: Request) -> str:
    # The peer itself: uvicorn is run without proxy headers (see pgfleet.asgi).
    return request.client.host if request.client else "unknown"


def current_user(request: Request) -> User | None:
    st = _state(request)
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return st.sessions.token_user(auth[7:].strip(), client_address(request))
    sid = request.session.get("sid")
    return st.sessions.get(sid if isinstance(sid, str) else None)


def _csrf(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(24)
    return str(token)


async def _check_csrf(request: Request) -> dict[str, str]:
    """The form's text fields (files are dropped), if its CSRF token is right."""
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    expected = request.session.get("csrf", "")
    given = form.get("csrf", "")
    if not (
        isinstance(expected, str)
        and expected
        and hmac.compare_digest(given.encode(errors="replace"), expected.encode(errors="replace"))
    ):
        raise PermissionError("the form expired: reload the page and try again")
    return form


def _safe_next(target: str | None) -> str:
    # Only paths of ours: "//host", "https://..." or "/\\host" would send
    # users away, and browsers drop tabs and newlines ("/\t/host" is "//host").
    if (
        not target
        or len(target) > 2000
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or any(c.isspace() or not c.isprintable() for c in target)
    ):
        return "/fleet"
    return target


async def _login(request: Request) -> Response:
    st = _state(request)
    error = None
    nxt = _safe_next(request.query_params.get("next"))
    status = 401
    if request.method == "POST":
        address = client_address(request)
        try:
            form = await _check_csrf(request)
            nxt = _safe_next(form.get("next"))
            if form.get("token"):
                user = await st.sessions.login_token(form["token"], address)
            else:
                user = await st.sessions.login(
                    form.get("username", ""), form.get("password", ""), address
                )
        except (LoginFailed, PermissionError) as e:
            error = str(e)
            status = 403 if isinstance(e, PermissionError) else 401
        except Busy as e:
            error, status = str(e), 503
        else:
            request.session.clear()
            request.session["sid"] = user.sid
            request.session["csrf"] = secrets.token_urlsafe(24)
            return RedirectResponse(nxt, status_code=303)
    resp = render.render(
        request, st.env, "login.html", error=error, next=nxt, csrf=_csrf(request),
        token_login=st.sessions.has_token,
        user=None,
    )  # fmt: skip
    if error:
        resp.status_code = status
        if status == 503:
            resp.headers["Retry-After"] = "5"
    return resp


async def _logout(request: Request) -> Response:
    try:
        await _check_csrf(request)
    except PermissionError as e:
        return PlainTextResponse(str(e), status_code=403)
    sid = request.session.get("sid")
    await _state(request).runs.forget(sid if isinstance(sid, str) else None)
    await _state(request).sessions.logout(sid)
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


async def _command(request: Request, name: str, *args: str) -> Response:
    user = current_user(request)
    if user is None:
        return RedirectResponse("/login", status_code=303)
    try:
        await _check_csrf(request)
        answers = await collector.command(_state(request).sessions, user, name, *args)
    except (PermissionError, PgfleetError) as e:
        message, ok = str(e), False
    else:
        ok = bool(answers) and any(a["ok"] for a in answers)
        message = "; ".join(f"{a['command']} {'OK' if a['ok'] else 'KO'} {a['data'][:200]}"
                            for a in answers) or "no collector answered"  # fmt: skip
    request.session["flash"] = {"ok": ok, "message": f"{name}: {message}"}
    return RedirectResponse("/collector", status_code=303)


async def _reload(request: Request) -> Response:
    return await _command(request, "RELOAD")


async def _force_snapshot(request: Request) -> Response:
    srvid = str(request.path_params["srvid"])
    if not (srvid.isascii() and srvid.isdigit() and len(srvid) <= 10 and int(srvid) <= INT4_MAX):
        return PlainTextResponse(f"no server {srvid[:40]!r}", status_code=404)
    return await _command(request, "FORCE_SNAPSHOT", str(int(srvid)))


async def _pygments_css(request: Request) -> Response:
    return Response(render.pygments_css(), media_type="text/css")


def _handler(page: Page, *, as_json: bool) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        st = _state(request)
        user = current_user(request)
        if user is None:
            if as_json:
                return render.JSONResponse(
                    {"error": "login required"}, status_code=401, headers=render.SECURITY_HEADERS
                )
            login = "/login?" + urlencode({"next": _here(request)})
            return RedirectResponse(login, status_code=303)
        try:
            tr = timerange.parse(request.query_params)
        except timerange.BadRange as e:
            return _error(request, st, as_json, 400, str(e), user)
        only: frozenset[str] | None
        if as_json:
            raw = request.query_params.get("_only")
            only = frozenset(p for p in raw.split(",") if p) if raw else None
        else:
            only = page.html_parts
        ctx = Ctx(request, st, user, tr, only)
        data = await _guarded(ctx, as_json, page.build(ctx))
        if isinstance(data, Response):
            return data
        if as_json:
            return render.JSONResponse(data, headers=render.SECURITY_HEADERS)
        return render.render(
            request, st.env, page.template, data=data, user=user, page=page.name,
            range=tr, ranges=list(timerange.RANGES), uplot=st.uplot, csrf=_csrf(request),
            json_url=_json_url(request), flash=request.session.pop("flash", None),
        )  # fmt: skip

    return handle


async def _guarded(ctx: Ctx, as_json: bool, work: Awaitable[T]) -> T | Response:
    """What `work` returns, or the error page (or JSON) of what it raised."""
    request, st, user = ctx.request, ctx.state, ctx.user
    try:
        return await work
    except timerange.BadRange as e:
        return _error(request, st, as_json, 400, str(e), user)
    except NotFound as e:
        return _error(request, st, as_json, 404, str(e), user)
    except PermissionError as e:
        return _error(request, st, as_json, 403, str(e), user)
    except psycopg.errors.InsufficientPrivilege as e:
        return _error(request, st, as_json, 403, _first(e), user)
    except Busy as e:
        return _error(request, st, as_json, 503, str(e), user)
    except PoolClosed:  # logged out by another request meanwhile
        return _error(request, st, as_json, 401, "logged out: log in again", user)
    except psycopg.errors.QueryCanceled as e:
        logger.warning("%s %s: %s", request.method, _here(request)[:200], _first(e))
        return _error(request, st, as_json, 503, "the repository took longer than"
                      f" [web] statement_timeout ({st.sessions.statement_timeout:g} s):"
                      " try a shorter range", user)  # fmt: skip
    except (psycopg.Error, PgfleetError) as e:
        logger.warning("%s %s: %s", request.method, _here(request)[:200], _first(e))
        return _error(request, st, as_json, 503, f"repository: {_first(e)}", user)


def _action(
    fn: Callable[[Ctx, dict[str, str]], Awaitable[str]],
) -> Callable[[Request], Awaitable[Response]]:
    """A POST form that starts something on a monitored server: logged in,
    its CSRF token right, its range (the form's ``range``, or ``from`` and
    ``to``) valid; `fn` says where to go next (a refusal goes there too, as
    a flash message)."""

    async def handle(request: Request) -> Response:
        st = _state(request)
        user = current_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        try:
            form = await _check_csrf(request)
        except PermissionError as e:
            return _error(request, st, False, 403, str(e), user)
        try:
            tr = timerange.parse(form)
        except timerange.BadRange as e:
            return _error(request, st, False, 400, str(e), user)
        ctx = Ctx(request, st, user, tr, None)
        target = await _guarded(ctx, False, fn(ctx, form))
        if isinstance(target, Response):
            return target
        return RedirectResponse(target, status_code=303)

    return handle


def _here(request: Request, suffix: str = "") -> str:
    """The path (+ `suffix`) and query string asked for, as sent.  Not
    `request.url`, which parses the Host header too (and raises on "[")."""
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if raw else quote(request.scope["path"])
    q = request.scope["query_string"].decode("latin-1")
    return path + suffix + (f"?{q}" if q else "")


def _json_url(request: Request) -> str:
    return _here(request, ".json")


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _error(
    request: Request, st: WebState, as_json: bool, status: int, message: str, user: User
) -> Response:
    headers = dict(render.SECURITY_HEADERS)
    if status == 503:
        headers["Retry-After"] = "5"
    if as_json:
        return render.JSONResponse({"error": message}, status_code=status, headers=headers)
    resp = render.render(
        request, st.env, "error.html", status=status, message=message, user=user,
        csrf=_csrf(request), page="error",
    )  # fmt: skip
    resp.status_code = status
    resp.headers.update(headers)
    return resp
