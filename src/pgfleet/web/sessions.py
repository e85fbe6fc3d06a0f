"""Who is logged in, and the repository connections each one reads through.

A user logs in with a repository role and its password: the login *is* a
connection to the repository as that role, so PostgreSQL checks the password
(pg_hba, SCRAM...) and its grants decide what the user may see.  The UI then
reads through a small pool of connections of that role, kept while the
session lives: nothing is read with more rights than the user has, and
``pgfleet_admin`` commands are sent from the user's own connection, so the
collector sees who asked.  The password stays in this process's memory only
(to reopen the pool after idling), never in the cookie, which holds a random
session id, signed.

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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from pgfleet.errors import PgfleetError
from pgfleet.repository import reads

logger = logging.getLogger("pgfleet.web")

APPLICATION_NAME = "pgfleet web"
# A user's pool is closed after this long without a request (and reopened on
# the next one): idle browsers don't hold repository connections.
POOL_IDLE = 600.0


class LoginFailed(PgfleetError):
    """Wrong credentials, or a role that may not read the repository."""


@dataclass
class User:
    sid: str
    username: str
    is_admin: bool
    conninfo: str | None  # None: a token session, on the app's pool
    expires: float
    last_used: float = field(default_factory=time.monotonic)
    pool: AsyncConnectionPool[Any] | None = None


class Sessions:
    def __init__(self, dsn: str, *, max_age: float, token: str | None) -> None:
        self.dsn = dsn
        self.max_age = max_age
        self._token = token
        self._users: dict[str, User] = {}
        self._app_pool: AsyncConnectionPool[Any] | None = None
        self._lock = asyncio.Lock()
        self.stats: dict[str, int] = {"logins": 0, "login_failures": 0, "pools_opened": 0}

    # -- Logging in and out

    async def login(self, username: str, password: str) -> User:
        conninfo = make_conninfo(
            self.dsn, user=username, password=password, application_name=APPLICATION_NAME
        )
        try:
            conn = await psycopg.AsyncConnection.connect(
                conninfo, autocommit=True, connect_timeout=10
            )
        except psycopg.Error as e:
            self.stats["login_failures"] += 1
            # The reason goes to the log, not to whoever is trying passwords.
            logger.info("login of %r refused: %s", username, str(e).strip().splitlines()[-1:])
            raise LoginFailed("invalid user name or password") from None
        async with conn:
            info = await reads.user_info(conn)
        if not info["can_read"]:
            self.stats["login_failures"] += 1
            raise LoginFailed(
                f"role {username!r} may not read the repository:"
                " an administrator can GRANT pgfleet_read TO it"
            )
        return self._add(User(secrets.token_urlsafe(24), str(info["username"]),
                              bool(info["is_admin"]), conninfo, self._expiry()))  # fmt: skip

    @property
    def has_token(self) -> bool:
        return bool(self._token)

    def check_token(self, token: str) -> bool:
        return bool(self._token) and hmac.compare_digest(
            token.encode(), (self._token or "").encode()
        )

    def login_token(self, token: str) -> User:
        if not self.check_token(token):
            self.stats["login_failures"] += 1
            raise LoginFailed("invalid token")
        return self._add(User(secrets.token_urlsafe(24), "token", False, None, self._expiry()))

    def token_user(self) -> User:
        """A user for one request authenticated by an Authorization header."""
        return User("", "token", False, None, self._expiry())

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
            self._users.pop(user.sid, None)
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
        pool = await self._pool(user)
        async with pool.connection() as conn:
            yield conn

    async def _pool(self, user: User) -> AsyncConnectionPool[Any]:
        if user.conninfo is None:
            if self._app_pool is None:
                async with self._lock:
                    if self._app_pool is None:
                        self._app_pool = await self._open(self.dsn, configure=_read_only)
            return self._app_pool
        if user.pool is None:
            async with self._lock:
                if user.pool is None:
                    user.pool = await self._open(user.conninfo)
        return user.pool

    async def _open(self, conninfo: str, configure: Any = None) -> AsyncConnectionPool[Any]:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            make_conninfo(conninfo, application_name=APPLICATION_NAME),
            min_size=1,
            max_size=4,
            kwargs={"autocommit": True},
            configure=configure,
            open=False,
            name="pgfleet-web",
        )
        await pool.open(wait=True, timeout=15)
        self.stats["pools_opened"] += 1
        return pool

    async def sweep(self) -> None:
        """Forget expired sessions, close the pools of idle ones."""
        now = time.monotonic()
        for user in list(self._users.values()):
            if user.expires < now:
                self._users.pop(user.sid, None)
            elif user.pool is None or now - user.last_used < POOL_IDLE:
                continue
            if user.pool is not None:
                pool, user.pool = user.pool, None
                await pool.close()

    async def run_sweeper(self, period: float = 60.0) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await self.sweep()
            except Exception:  # never let housekeeping kill the app
                logger.exception("session sweep failed")

    async def close(self) -> None:
        for user in list(self._users.values()):
            if user.pool is not None:
                await user.pool.close()
        self._users.clear()
        if self._app_pool is not None:
            await self._app_pool.close()
            self._app_pool = None


async def _read_only(conn: psycopg.AsyncConnection[Any]) -> None:
    """Token sessions read as pgfleet_read when the app's role may become it."""
    try:
        await conn.execute("SET ROLE pgfleet_read")
    except psycopg.Error as e:
        logger.warning(
            "token sessions read as the repository role itself: cannot SET ROLE pgfleet_read (%s)",
            str(e).strip().splitlines()[0],
        )
