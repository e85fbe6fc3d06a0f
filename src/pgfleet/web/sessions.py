"""Who is logged in, and the repository connections each one reads through.

A user logs in with a repository role and a password, and must prove the
password: the login is a connection to the repository as that role, which
libpq completes only if the server asked for SCRAM and the password passed
it (``require_auth=scram-sha-256``).  So:

- nothing but the password typed can stand in for it: every libpq parameter
  saying who connects or how it proves it is given explicitly
  (:func:`login_conninfo`), so the web process's ~/.pgpass or PGPASSFILE,
  PGPASSWORD, a service file, its client certificate never apply;
- a role the repository trusts (``trust``, ``peer``, ``cert``... in pg_hba)
  cannot log in at all, whatever password is typed;
- an empty password is refused before connecting.

Every refusal looks the same from outside: one message, one status, and
never sooner than ``FAILED_LOGIN_SECONDS`` after the attempt began, whether
the password was wrong, the role may not read the repository (checked only
once the password is proven), or too many logins failed lately from the
address or for the name (:mod:`.throttle`).  The log says which, never with
the password.

Then the role's grants decide what the user sees: the UI reads through a
small pool of connections of that role (:mod:`.pools`, under the UI's cap on
repository connections), and ``pgfleet_admin`` commands go from the user's
own connection, so the collector sees who asked.  The password stays in this
process's memory (to reopen connections after idling), never in the cookie,
which holds a random session id, signed.

Or a user logs in with the configured token: read-only, through the app's
own pool (``[repository] dsn``), which switches to ``pgfleet_read`` when it
may.

A restart forgets every session: users log in again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgfleet.config import WebConfig
from pgfleet.errors import PgfleetError
from pgfleet.repository import reads
from pgfleet.web.pools import Busy, Pool, Slots
from pgfleet.web.throttle import LoginThrottle, Throttled

logger = logging.getLogger("pgfleet.web")

T = TypeVar("T")

APPLICATION_NAME = "pgfleet web"
# What every refused login is told, whatever the reason.
LOGIN_FAILED = "invalid user name or password"
TOKEN_FAILED = "invalid token"
# A refused login answers no sooner than this after it began: a wrong
# password, a right one of a role without grants, and a throttled attempt
# take as long.
FAILED_LOGIN_SECONDS = 0.5
# PostgreSQL truncates longer role names: "x" * 63 + "a" and + "b" would be
# one role under two names, each with its own failure count.
MAX_USERNAME_BYTES = 63
# Longer passwords would make libpq's SCRAM hashing (in the event loop) slow.
MAX_PASSWORD_BYTES = 1024
# require_auth and sslcertmode came with libpq 16.
SCRAM_ONLY = pq.version() >= 160000

# A path below a file that is no directory: it can never exist.
_NOWHERE = "/dev/null/pgfleet-web-none"
# What in the repository's dsn is the app's own credentials, not where the
# repository is: never carried over to a login.
_CREDENTIALS = frozenset({
    "user", "password", "passfile", "sslcert", "sslkey", "sslpassword", "sslcertmode",
    "require_auth", "krbsrvname", "gsslib", "gssdelegation", "oauth_issuer",
    "oauth_client_id", "oauth_client_secret", "oauth_scope", "application_name", "options",
})  # fmt: skip


class LoginFailed(PgfleetError):
    """A refused login; the message is the same whatever the reason."""


@dataclass
class User:
    sid: str
    username: str
    is_admin: bool
    conninfo: str | None  # None: a token session, on the app's pool
    expires: float
    last_used: float = field(default_factory=time.monotonic)
    pool: Pool | None = None


def statement_options(dsn: str, statement_timeout: float) -> str:
    """The dsn's ``options`` plus the UI's statement_timeout and a pinned search_path.

    The UI's reads name pgfleet's objects with their schema; the path is
    pinned so that nothing a repository user may create in another schema
    (public) is ever called in their place.
    """
    options = str(conninfo_to_dict(dsn).get("options") or "")
    ms = int(statement_timeout * 1000)
    if ms > 0:
        options = f"{options} -c statement_timeout={ms}".strip()
    return f"{options} -c search_path=pg_catalog,pg_temp".strip()


def login_conninfo(dsn: str, username: str, password: str, *, statement_timeout: float) -> str:
    """The conninfo logging `username` in to the repository of `dsn` with
    `password` and nothing else: every credential parameter is explicit, so
    libpq takes none from the environment, a service or a password file."""
    params = {k: v for k, v in conninfo_to_dict(dsn).items() if k not in _CREDENTIALS}
    params.update(
        user=username,
        password=password,
        passfile=_NOWHERE,
        require_auth="scram-sha-256",
        sslcertmode="disable",
        sslcert=_NOWHERE,
        sslkey=_NOWHERE,
        sslpassword="",
        application_name=APPLICATION_NAME,
        options=statement_options(dsn, statement_timeout),
    )
    return make_conninfo("", **params)


def _unfit(username: str, password: str) -> str | None:
    """Why this login is refused before connecting, if it is."""
    if not SCRAM_ONLY:
        return f"libpq {pq.version()} cannot require SCRAM (16 or later can): no role logins"
    if not username:
        return "no user name"
    if not password:
        return "empty password"
    if "\x00" in username or "\x00" in password:
        return "NUL in the user name or password"
    try:
        if len(username.encode()) > MAX_USERNAME_BYTES:
            return f"user name longer than {MAX_USERNAME_BYTES} bytes"
        if len(password.encode()) > MAX_PASSWORD_BYTES:
            return f"password longer than {MAX_PASSWORD_BYTES} bytes"
    except UnicodeEncodeError:
        return "user name or password not UTF-8"
    return None


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


class Sessions:
    def __init__(self, dsn: str, web: WebConfig, *, token: str | None) -> None:
        self.dsn = dsn
        self.max_age = web.session_max_age
        self.pool_size = web.pool_size
        self.pool_idle = web.pool_idle
        self.statement_timeout = web.statement_timeout
        self.failed_login_seconds = FAILED_LOGIN_SECONDS
        self._token = token
        self._users: dict[str, User] = {}
        self._app_pool: Pool | None = None
        # A request waits for a connection as long as a query may run, at most.
        self.slots = Slots(web.max_connections, wait=web.statement_timeout or 30.0)
        self.throttle = LoginThrottle(web.login_attempts)
        self.stats: Counter[str] = Counter()
        if not SCRAM_ONLY:
            logger.error(
                "libpq %s cannot require SCRAM authentication (16 or later can):"
                " logins with a role are refused, only the token logs in",
                pq.version(),
            )

    def get_stats(self) -> dict[str, int]:
        return {
            **self.stats,
            **{f"login_{k}": v for k, v in self.throttle.stats.items()},
            **{f"connections_{k}": v for k, v in self.slots.snapshot().items()},
            "sessions": len(self._users),
        }

    # -- Logging in and out

    async def login(self, username: str, password: str, address: str) -> User:
        """Log `username` in with `password`, from the client at `address`.

        `LoginFailed` (always the same message) if refused, `Busy` if every
        repository connection allowed stayed in use.
        """
        started = time.monotonic()
        try:
            return await self._login(username, password, address)
        except LoginFailed:
            # How long a refusal took says nothing of why.
            await asyncio.sleep(started + self.failed_login_seconds - time.monotonic())
            raise

    async def _login(self, username: str, password: str, address: str) -> User:
        who = f"login of {username[:80]!r} from {address}"
        try:
            attempt = self.throttle.begin(address, username)
        except Throttled as e:
            self.stats["login_failures"] += 1
            logger.info("%s refused without trying: %s", who, e)
            raise LoginFailed(LOGIN_FAILED) from None
        if why := _unfit(username, password):
            self._refuse(who, why)
        conninfo = login_conninfo(
            self.dsn, username, password, statement_timeout=self.statement_timeout
        )
        try:
            conn = await self.slots.connect(conninfo, self.slots.deadline())
        except Busy:
            self.throttle.cancel(attempt)  # nothing was tried
            raise
        except psycopg.Error as e:
            self._refuse(who, _last_line(e))
        try:
            info = await reads.user_info(conn)
        except psycopg.Error as e:
            await self.slots.close(conn)
            self._refuse(who, f"cannot tell what the role may read: {_last_line(e)}")
        except BaseException:
            await self.slots.close(conn)
            raise
        if not info["can_read"]:
            await self.slots.close(conn)
            self._refuse(
                who, "the role may not read the repository: an administrator can"
                f" GRANT pgfleet_read TO {info['username']}"
            )  # fmt: skip
        self.throttle.succeeded(attempt)
        user = User(secrets.token_urlsafe(24), str(info["username"]), bool(info["is_admin"]),
                    conninfo, self._expiry())  # fmt: skip
        # The login's connection is the first of the user's pool.
        user.pool = self._user_pool(user)
        user.pool.adopt(conn)
        logger.info("%s: logged in%s", who, " (admin)" if user.is_admin else "")
        return self._add(user)

    def _refuse(self, who: str, why: str) -> NoReturn:
        self.stats["login_failures"] += 1
        logger.warning("%s refused: %s", who, why)
        raise LoginFailed(LOGIN_FAILED) from None

    @property
    def has_token(self) -> bool:
        return bool(self._token)

    def check_token(self, token: str) -> bool:
        return bool(self._token) and hmac.compare_digest(
            token.encode(errors="replace"), (self._token or "").encode()
        )

    async def login_token(self, token: str, address: str) -> User:
        started = time.monotonic()
        try:
            return self._add(self._token_user(token, address, "token login"))
        except LoginFailed:
            await asyncio.sleep(started + self.failed_login_seconds - time.monotonic())
            raise

    def token_user(self, token: str, address: str) -> User | None:
        """A user for one request sending ``Authorization: Bearer TOKEN``."""
        try:
            return self._token_user(token, address, "bearer token")
        except LoginFailed:
            return None

    def _token_user(self, token: str, address: str, what: str) -> User:
        try:
            attempt = self.throttle.begin(address, None)
        except Throttled as e:
            self.stats["login_failures"] += 1
            logger.info("%s from %s refused without trying: %s", what, address, e)
            raise LoginFailed(TOKEN_FAILED) from None
        if not self.check_token(token):
            self.stats["login_failures"] += 1
            logger.warning("%s from %s refused: wrong token", what, address)
            raise LoginFailed(TOKEN_FAILED)
        self.throttle.succeeded(attempt)
        return User(secrets.token_urlsafe(24), "token", False, None, self._expiry())

    def _expiry(self) -> float:
        return time.monotonic() + self.max_age

    def _add(self, user: User) -> User:
        self.stats["logins"] += 1
        self._users[user.sid] = user
        return user

    def get(self, sid: str | None) -> User | None:
        user = self._users.get(sid or "")
        if user is None:
            return None
        if user.expires < time.monotonic():
            self._users.pop(user.sid, None)  # its pool goes at the next sweep
            return None
        user.last_used = time.monotonic()
        return user

    async def logout(self, sid: str | None) -> None:
        user = self._users.pop(sid or "", None)
        if user and user.pool:
            await user.pool.close()

    # -- Connections

    @contextlib.asynccontextmanager
    async def connection(self, user: User) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with self._pool(user).connection() as conn:
            yield conn

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` (opening one repository connection) in a thread, under the cap."""
        return await self.slots.run_blocking(fn, *args)

    def _pool(self, user: User) -> Pool:
        if user.conninfo is None:
            if self._app_pool is None or self._app_pool.closed:
                self._app_pool = Pool(
                    self.slots,
                    make_conninfo(
                        self.dsn,
                        application_name=APPLICATION_NAME,
                        options=statement_options(self.dsn, self.statement_timeout),
                    ),
                    size=self.pool_size,
                    name="token",
                    configure=_read_only,
                )
            return self._app_pool
        if user.pool is None or user.pool.closed:
            user.pool = self._user_pool(user)
        return user.pool

    def _user_pool(self, user: User) -> Pool:
        assert user.conninfo is not None
        return Pool(self.slots, user.conninfo, size=self.pool_size, name=user.username)

    async def sweep(self) -> None:
        """Forget expired sessions; close connections idle for pool_idle, and
        the pools no session uses any more."""
        now = time.monotonic()
        for user in list(self._users.values()):
            if user.expires < now:
                self._users.pop(user.sid, None)
        live = {u.pool for u in self._users.values()} | {self._app_pool}
        for pool in list(self.slots.pools):
            if pool not in live:
                await pool.close()
            else:
                await pool.close_idle(self.pool_idle)
        self.throttle.prune()

    async def run_sweeper(self, period: float | None = None) -> None:
        if period is None:
            period = min(60.0, max(0.5, self.pool_idle / 2))
        while True:
            await asyncio.sleep(period)
            try:
                await self.sweep()
            except Exception:  # never let housekeeping kill the app
                logger.exception("session sweep failed")

    async def close(self) -> None:
        self._users.clear()
        self._app_pool = None
        for pool in list(self.slots.pools):
            await pool.close()


async def _read_only(conn: psycopg.AsyncConnection[Any]) -> None:
    """Token sessions read as pgfleet_read when the app's role may become it."""
    try:
        await conn.execute("SET ROLE pgfleet_read")
    except psycopg.Error as e:
        logger.warning(
            "token sessions read as the repository role itself: cannot SET ROLE pgfleet_read (%s)",
            str(e).strip().splitlines()[0],
        )
