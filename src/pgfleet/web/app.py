"""The Starlette application: routes, login, and each page's HTML and JSON twin.

``create_app(config)`` builds it, ``serve(app, config)`` runs it with uvicorn
until cancelled: ``pgfleet web`` does both, ``pgfleet run`` may run it next to
the collector.
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
from typing import Any
from urllib.parse import urlencode

import psycopg
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from pgfleet import asgi
from pgfleet.config import Config
from pgfleet.errors import ConfigError, PgfleetError
from pgfleet.web import render, timerange
from pgfleet.web.page import Ctx, NotFound, Page, WebState
from pgfleet.web.sessions import LoginFailed, Sessions, User
from pgfleet.web.views import collector, database, fleet, query, server

logger = logging.getLogger("pgfleet.web")

PAGES: list[Page] = [fleet.PAGE, server.PAGE, database.PAGE, query.PAGE, collector.PAGE]
COOKIE = "pgfleet_session"


def _read_secret(path: str, what: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"cannot read the web {what} file {path!r}: {e.strerror}") from None
    if not text:
        raise ConfigError(f"the web {what} file {path!r} is empty")
    return text


def uplot_dir() -> Path | None:
    """uPlot's dist directory: copied into our static files, or in node_modules."""
    candidates = [os.environ.get("PGFLEET_UPLOT_DIR", "")]
    here = Path(__file__).resolve()
    candidates.append(str(here.parent / "static" / "vendor" / "uplot"))
    candidates += [str(p / "node_modules" / "uplot" / "dist") for p in here.parents]
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
    sessions = Sessions(config.repository.dsn, max_age=web.session_max_age, token=token)
    up = uplot_dir()
    state = WebState(config, sessions, render.templates(), up is not None)
    if up is None:
        logger.warning("uPlot not found (run 'make venv', which runs npm ci): no charts")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(sessions.run_sweeper())
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await sessions.close()

    routes: list[BaseRoute] = [
        Route("/", lambda r: RedirectResponse("/fleet", status_code=302)),
        Route("/login", _login, methods=["GET", "POST"]),
        Route("/logout", _logout, methods=["POST"]),
        Route("/collector/reload", _reload, methods=["POST"]),
        Route("/collector/snapshot/{srvid:int}", _force_snapshot, methods=["POST"]),
        Route("/static/pygments.css", _pygments_css),
        Route("/favicon.ico", lambda r: Response(status_code=204)),
        Mount("/static", StaticFiles(directory=str(render.static_dir())), name="static"),
    ]
    if up is not None:
        routes.insert(-1, Mount("/vendor/uplot", StaticFiles(directory=str(up)), name="uplot"))
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
            )
        ],
        lifespan=lifespan,
    )
    app.state.pgfleet = state
    return app


async def serve(app: Starlette, config: Config) -> None:
    """Serve `app` on ``[web] listen:port`` until cancelled, then shut down
    cleanly (requests finish, pools close).  Signals are the caller's."""
    sock = asgi.bind(config.web.listen, config.web.port, "the web UI")
    await asgi.serve(app, sock, lifespan="on")


def _state(request: Request) -> WebState:
    st: WebState = request.app.state.pgfleet
    return st


def current_user(request: Request) -> User | None:
    st = _state(request)
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return st.sessions.token_user() if st.sessions.check_token(auth[7:].strip()) else None
    return st.sessions.get(request.session.get("sid"))


def _csrf(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(24)
    return str(token)


async def _check_csrf(request: Request) -> dict[str, Any]:
    form = dict(await request.form())
    expected = request.session.get("csrf", "")
    if not expected or not hmac.compare_digest(str(form.get("csrf", "")), str(expected)):
        raise PermissionError("the form expired: reload the page and try again")
    return form


def _safe_next(target: str | None) -> str:
    # Only paths of ours: "//host" or "https://..." would send users away.
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/fleet"
    return target


async def _login(request: Request) -> Response:
    st = _state(request)
    error = None
    nxt = _safe_next(request.query_params.get("next"))
    if request.method == "POST":
        try:
            form = await _check_csrf(request)
            nxt = _safe_next(str(form.get("next") or ""))
            if form.get("token"):
                user = st.sessions.login_token(str(form["token"]))
            else:
                user = await st.sessions.login(
                    str(form.get("username", "")), str(form.get("password", ""))
                )
        except (LoginFailed, PermissionError) as e:
            error = str(e)
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
        resp.status_code = 401
    return resp


async def _logout(request: Request) -> Response:
    try:
        await _check_csrf(request)
    except PermissionError as e:
        return PlainTextResponse(str(e), status_code=403)
    await _state(request).sessions.logout(request.session.get("sid"))
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


async def _command(request: Request, name: str, *args: str) -> Response:
    user = current_user(request)
    if user is None:
        return RedirectResponse("/login", status_code=303)
    try:
        await _check_csrf(request)
        answers = await asyncio.to_thread(collector.command, user, name, *args)
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
    return await _command(request, "FORCE_SNAPSHOT", str(request.path_params["srvid"]))


async def _pygments_css(request: Request) -> Response:
    return Response(render.pygments_css(), media_type="text/css")


def _handler(page: Page, *, as_json: bool) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        st = _state(request)
        user = current_user(request)
        if user is None:
            if as_json:
                return render.JSONResponse({"error": "login required"}, status_code=401)
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
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
        try:
            data = await page.build(ctx)
        except NotFound as e:
            return _error(request, st, as_json, 404, str(e), user)
        except psycopg.errors.InsufficientPrivilege as e:
            return _error(request, st, as_json, 403, _first(e), user)
        except (psycopg.Error, PgfleetError) as e:
            logger.warning("%s %s: %s", request.method, request.url.path, _first(e))
            return _error(request, st, as_json, 503, f"repository: {_first(e)}", user)
        if as_json:
            return render.JSONResponse(data, headers=render.SECURITY_HEADERS)
        return render.render(
            request, st.env, page.template, data=data, user=user, page=page.name,
            range=tr, ranges=list(timerange.RANGES), uplot=st.uplot, csrf=_csrf(request),
            json_url=_json_url(request), flash=request.session.pop("flash", None),
        )  # fmt: skip

    return handle


def _json_url(request: Request) -> str:
    q = request.url.query
    return request.url.path + ".json" + (f"?{q}" if q else "")


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _error(
    request: Request, st: WebState, as_json: bool, status: int, message: str, user: User
) -> Response:
    if as_json:
        return render.JSONResponse({"error": message}, status_code=status)
    resp = render.render(
        request, st.env, "error.html", status=status, message=message, user=user,
        csrf=_csrf(request), page="error",
    )  # fmt: skip
    resp.status_code = status
    return resp
