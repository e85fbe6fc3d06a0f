"""The web UI under attack: each test replays one against a real app over a real
repository and shows it fails safely.

- No way in without the password: not through the web process's own
  credentials (PGPASSFILE, PGPASSWORD, a service file), not as a role the
  repository trusts, and a right password of a role without grants is told
  what a wrong one is told, as slowly.
- Trying passwords in bulk stops after ``login_attempts`` per address and per
  user name: the rest never reach the repository.
- No server starved: each login's pool and the UI as a whole keep to their
  bounds under concurrent requests, a request past them waits a bounded time
  and gets a 503, every UI query has a statement_timeout, idle pools close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgfleet.cluster import Cluster
from pgfleet.web.app import create_app
from pgfleet.web.sessions import (
    APPLICATION_NAME,
    FAILED_LOGIN_SECONDS,
    LOGIN_FAILED,
    Sessions,
    User,
)
from pgfleet.web.throttle import LoginThrottle, Throttled
from tests.fix_repository import connect, scalar_int
from tests.web.fix_web import TOKEN, web_config

NOWHERE = "/dev/null/none"


class Web:
    """The real app (lifespan running) and in-process clients, one per address."""

    def __init__(self, app: Any, stack: contextlib.AsyncExitStack) -> None:
        self.app = app
        self.sessions: Sessions = app.state.pgfleet.sessions
        self._stack = stack

    async def client(self, address: str = "192.0.2.1") -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, client=(address, 40000))
        return await self._stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://testserver")
        )


@contextlib.asynccontextmanager
async def serving(repo: str, **web: Any) -> AsyncIterator[Web]:
    app = create_app(web_config(repo, **web))
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        yield Web(app, stack)


async def login(client: httpx.AsyncClient, user: str, password: str) -> httpx.Response:
    page = await client.get("/login")
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    return await client.post(
        "/login", data={"csrf": csrf, "username": user, "password": password, "next": "/fleet"}
    )


def refused(r: httpx.Response) -> bool:
    return r.status_code == 401 and LOGIN_FAILED in r.text


def _suffix(repo: str) -> str:
    """Roles are the cluster's: named after the test's repository database."""
    return str(conninfo_to_dict(repo)["dbname"]).split("_")[0]


def make_role(repo: str, name: str, *, grant: str | None = "pgfleet_read") -> tuple[str, str]:
    role, password = f"sec_{name}_{_suffix(repo)}", f"pw-{name}-Secret!"
    with connect(repo) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        if grant:
            conn.execute(f"GRANT {grant} TO {role}")
    return role, password


def ui_backends(repo: str) -> dict[str, int]:
    """The UI's connections to `repo`, per role (pg_stat_activity)."""
    with connect(repo) as conn:
        rows = conn.execute(
            "SELECT usename, count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database() GROUP BY 1",
            (APPLICATION_NAME,),
        ).fetchall()
    return {str(u): int(n) for u, n in rows}


def auth_failures(cluster: Cluster, since: int, user_prefix: str) -> int:
    """Failed password checks the server logged for roles named `user_prefix`... since
    the log had `since` bytes: the attempts that reached it."""
    with cluster.log_file.open("rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    pattern = rf'password authentication failed for user "{re.escape(user_prefix)}'
    return len(re.findall(pattern, text))


def log_size(cluster: Cluster) -> int:
    return cluster.log_file.stat().st_size


@contextlib.contextmanager
def hba_line(cluster: Cluster, repo: str, line: str) -> Iterator[None]:
    """`line` first in the cluster's pg_hba.conf (reloaded) for the duration."""
    hba = cluster.datadir / "pg_hba.conf"
    saved = hba.read_text()
    hba.write_text(f"{line}\n{saved}")  # rewritten in place: its owner stays
    try:
        with connect(repo) as conn:
            conn.execute("SELECT pg_reload_conf()")
        yield
    finally:
        hba.write_text(saved)
        with connect(repo) as conn:
            conn.execute("SELECT pg_reload_conf()")


def role_dsn(repo: str, role: str, **extra: str) -> str:
    p = conninfo_to_dict(repo)
    return make_conninfo(host=p["host"], port=p["port"], dbname=p["dbname"], user=role, **extra)


# -- No way in without the password


def test_no_login_with_the_web_process_credentials(
    repo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty or wrong password never falls back on a ~/.pgpass entry,
    PGPASSWORD or a service file of the web process."""
    role, password = make_role(repo, "pgpass")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:{role}:{password}\n")
    passfile.chmod(0o600)
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[sec]\nuser={role}\npassword={password}\n")

    def libpq_alone_gets_in() -> None:
        # The attack's premise: left to itself, libpq logs in as the role without
        # being given a password.
        with psycopg.connect(role_dsn(repo, role)) as conn:
            assert conn.info.user == role

    async def go() -> None:
        async with serving(repo) as web:
            c = await web.client()
            answers = []
            monkeypatch.setenv("PGPASSFILE", str(passfile))
            libpq_alone_gets_in()
            answers += [await login(c, role, ""), await login(c, role, "wrong")]
            monkeypatch.setenv("PGPASSWORD", password)
            libpq_alone_gets_in()
            answers += [await login(c, role, ""), await login(c, role, "wrong")]
            monkeypatch.delenv("PGPASSWORD")
            monkeypatch.delenv("PGPASSFILE")
            monkeypatch.setenv("PGSERVICEFILE", str(services))
            monkeypatch.setenv("PGSERVICE", "sec")
            libpq_alone_gets_in()
            answers += [await login(c, role, ""), await login(c, role, "wrong")]
            assert all(refused(r) for r in answers), [r.status_code for r in answers]
            assert len({r.text for r in answers}) == 1  # word for word the same
            assert (await c.get("/fleet.json")).status_code == 401
            # The right password still works with all of them set.
            assert (await login(c, role, password)).status_code == 303
            assert (await c.get("/fleet.json")).status_code == 200

    asyncio.run(go())


def test_no_login_as_a_role_the_repository_trusts(
    repo: str, pg18: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever the password, a role pg_hba trusts cannot log in: the server
    never asks for the password, so nothing proves it."""
    role, password = make_role(repo, "trusted", grant="pgfleet_admin")
    caplog.set_level(logging.INFO, logger="pgfleet.web")

    async def go() -> None:
        async with serving(repo) as web:
            c = await web.client()
            # postgres is trusted on 127.0.0.1 by the test clusters' pg_hba.conf:
            # libpq gets in with any password at all.
            with psycopg.connect(role_dsn(repo, "postgres", password="anything")) as conn:
                assert conn.info.user == "postgres"
            assert refused(await login(c, "postgres", "anything"))
            with hba_line(pg18, repo, f"host all {role} 127.0.0.1/32 trust"):
                deadline = time.monotonic() + 10
                while True:  # the reload takes effect shortly
                    try:
                        psycopg.connect(role_dsn(repo, role, passfile=NOWHERE)).close()
                        break
                    except psycopg.OperationalError:
                        assert time.monotonic() < deadline, "pg_hba.conf was not reloaded"
                        time.sleep(0.1)
                assert refused(await login(c, role, "wrong"))
                assert refused(await login(c, role, password))  # even the right one
            # SCRAM again: the right password is proven and logs in.
            assert (await login(c, role, password)).status_code == 303

    asyncio.run(go())
    reasons = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(reasons) == 3
    assert all('authentication method requirement "scram-sha-256" failed' in m for m in reasons)
    assert not any(password in m or "anything" in m for m in caplog.messages)


def test_a_role_without_grants_is_told_what_a_wrong_password_is(
    repo: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No oracle: a right password of a role that may not read the repository,
    a wrong one, an unknown role and an empty password get the same answer,
    word for word, in the same time."""
    reader, _ = make_role(repo, "reader")
    nobody, nobody_pw = make_role(repo, "nobody", grant=None)
    with connect(repo) as conn:
        conn.execute("REVOKE ALL ON SCHEMA pgfleet FROM PUBLIC")
    caplog.set_level(logging.INFO, logger="pgfleet.web")
    cases = {
        "no grant, right password": (nobody, nobody_pw),
        "wrong password": (reader, "wrong"),
        "unknown role": (f"{reader}_x", "wrong"),
        "empty password": (reader, ""),
    }

    async def go() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {k: [] for k in cases}
        async with serving(repo, login_attempts=100) as web:
            c = await web.client()
            texts = set()
            for _ in range(3):
                for what, (user, password) in cases.items():
                    t = time.perf_counter()
                    r = await login(c, user, password)
                    times[what].append(time.perf_counter() - t)
                    assert refused(r), what
                    texts.add(r.text)
            assert len(texts) == 1
        return times

    times = asyncio.run(go())
    medians = {k: statistics.median(v) for k, v in times.items()}
    assert min(min(v) for v in times.values()) >= FAILED_LOGIN_SECONDS
    assert max(medians.values()) - min(medians.values()) < 0.15, medians
    # The log knows why.
    assert any("may not read the repository" in m and nobody in m for m in caplog.messages)
    assert any("empty password" in m for m in caplog.messages)
    assert not any(nobody_pw in m for m in caplog.messages)


# -- Trying passwords in bulk


def test_failed_logins_are_limited_per_address(repo: str, pg18: Cluster) -> None:
    """300 wrong passwords at once from one address (the attack seen: 300 in
    1.4 s): `login_attempts` reach the repository, the rest are refused
    unread, the same way; then even a right password from there is refused,
    from elsewhere it works."""
    reader, password = make_role(repo, "addr")
    prefix = f"sec_burst_{_suffix(repo)}_"
    start = log_size(pg18)

    async def go() -> None:
        async with serving(repo, login_attempts=5) as web:
            attacker = await web.client("203.0.113.7")
            page = await attacker.get("/login")
            csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
            t = time.perf_counter()
            burst = await asyncio.gather(*(
                attacker.post("/login", data={"csrf": csrf, "username": f"{prefix}{i}",
                                              "password": f"guess{i}"})
                for i in range(300)
            ))  # fmt: skip
            elapsed = time.perf_counter() - t
            assert all(refused(r) for r in burst)
            assert len({r.text for r in burst}) == 1
            assert elapsed < 10
            assert auth_failures(pg18, start, prefix) == 5
            assert web.sessions.throttle.stats["throttled"] == 295
            assert refused(await login(attacker, reader, password))
            # Bearer tokens from there too.
            h = {"Authorization": f"Bearer {TOKEN}"}
            assert (await attacker.get("/fleet.json", headers=h)).status_code == 401
            other = await web.client("198.51.100.20")
            assert (await login(other, reader, password)).status_code == 303
            assert (await other.get("/fleet.json", headers=h)).status_code == 200

    asyncio.run(go())


def test_failed_logins_are_limited_per_user_name(repo: str, pg18: Cluster) -> None:
    """300 wrong passwords for one role from 300 addresses: `login_attempts`
    reach the repository; that role is refused for the minute, others are not."""
    victim, password = make_role(repo, "victim")
    other, other_pw = make_role(repo, "bystander")
    start = log_size(pg18)

    async def go() -> None:
        async with serving(repo, login_attempts=5) as web:
            clients = [await web.client(f"10.1.{i // 250}.{i % 250 + 1}") for i in range(300)]
            burst = await asyncio.gather(*(
                login(c, victim, f"guess{i}") for i, c in enumerate(clients)
            ))  # fmt: skip
            assert all(refused(r) for r in burst)
            assert auth_failures(pg18, start, victim) == 5
            assert refused(await login(await web.client("10.9.9.9"), victim, password))
            assert (await login(clients[0], other, other_pw)).status_code == 303

    asyncio.run(go())


def test_an_ipv6_client_is_its_network() -> None:
    th = LoginThrottle(2)
    th.begin("2001:db8:1:2::1", None)
    th.begin("2001:db8:1:2:ffff::9", None)
    with pytest.raises(Throttled):
        th.begin("2001:db8:1:2:abcd::1", None)
    th.begin("2001:db8:1:3::1", None)  # another /64
    th.begin("::ffff:192.0.2.1", None)
    th.begin("192.0.2.1", None)
    with pytest.raises(Throttled):
        th.begin("192.0.2.1", None)


def test_the_throttle_forgets_after_its_window() -> None:
    th = LoginThrottle(2, window=0.3)
    for _ in range(2):
        th.begin("a", "u")
    with pytest.raises(Throttled):
        th.begin("a", "v")
    with pytest.raises(Throttled):
        th.begin("b", "u")
    ok = th.begin("b", "v")
    th.succeeded(ok)  # a success is no failure
    th.begin("b", "v")
    time.sleep(0.35)
    th.begin("a", "u")
    th.prune()
    assert len(th) == 2  # address a, user u: the rest aged out


# -- No server starved


def test_pools_and_the_cap_hold_under_concurrent_requests(repo: str) -> None:
    """Four users and the token, ten requests each at once, all blocked on a
    locked table: at most pool_size connections per role, max_connections in
    all; every request is served once the lock goes."""
    users = [make_role(repo, f"busy{i}") for i in range(4)]

    async def go() -> None:
        async with serving(repo, pool_size=2, max_connections=5, statement_timeout=10) as web:
            clients = []
            for i, (user, password) in enumerate(users):
                c = await web.client(f"192.0.2.{i + 1}")
                assert (await login(c, user, password)).status_code == 303
                clients.append(c)
            token = await web.client("192.0.2.99")
            token.headers["Authorization"] = f"Bearer {TOKEN}"
            clients.append(token)
            assert sum(ui_backends(repo).values()) == 4  # each login's connection, kept

            seen: list[dict[str, int]] = []
            with psycopg.connect(repo) as locker:
                locker.execute("LOCK TABLE pgfleet.servers IN ACCESS EXCLUSIVE MODE")
                requests = asyncio.gather(
                    *(c.get("/fleet.json") for c in clients for _ in range(10))
                )
                t = time.monotonic()
                while time.monotonic() - t < 2:
                    await asyncio.sleep(0.05)
                    seen.append(await asyncio.to_thread(ui_backends, repo))
                locker.rollback()
            answers = await requests
            assert [r.status_code for r in answers] == [200] * 50
            assert max(sum(s.values()) for s in seen) == 5  # the cap, reached, held
            assert max(n for s in seen for n in s.values()) <= 2  # each pool's bound
            assert web.sessions.slots.used <= 5

    asyncio.run(go())


def test_past_the_cap_a_login_and_a_request_wait_then_get_503(repo: str) -> None:
    """Every connection allowed in use: a login and a page wait (as long as
    statement_timeout) and get a 503 that says why; none opens one more."""
    reader, password = make_role(repo, "late")

    async def go() -> None:
        async with serving(repo, pool_size=2, max_connections=2, statement_timeout=1) as web:
            s = web.sessions
            token_user = s.token_user(TOKEN, "127.0.0.1")
            assert token_user is not None
            async with s.connection(token_user), s.connection(token_user):  # two requests
                c = await web.client()
                t = time.perf_counter()
                r = await login(c, reader, password)
                assert r.status_code == 503 and "max_connections" in r.text
                assert r.headers["retry-after"]
                assert 0.9 < time.perf_counter() - t < 5
                r = await c.get("/fleet.json", headers={"Authorization": f"Bearer {TOKEN}"})
                assert r.status_code == 503 and "pool_size" in r.json()["error"]
                assert sum(ui_backends(repo).values()) == 2
            # Idle now: the login takes one of the token's idle connections' place.
            assert (await login(c, reader, password)).status_code == 303
            assert s.slots.stats["evicted"] == 1
            assert (await c.get("/fleet.json")).status_code == 200
            assert sum(ui_backends(repo).values()) <= 2

    asyncio.run(go())


def test_statement_timeout_cancels_a_ui_query(repo: str) -> None:
    """A UI query waiting on a locked table is cancelled after statement_timeout:
    the page says so (503), and no UI query is left waiting in the repository."""
    reader, password = make_role(repo, "slow")

    async def go() -> None:
        async with serving(repo, statement_timeout=1) as web:
            c = await web.client()
            assert (await login(c, reader, password)).status_code == 303
            with psycopg.connect(repo) as locker:
                locker.execute("LOCK TABLE pgfleet.servers IN ACCESS EXCLUSIVE MODE")
                for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):  # login, token
                    t = time.perf_counter()
                    r = await c.get("/fleet.json", headers=headers)
                    assert r.status_code == 503, r.text
                    assert "statement_timeout (1 s)" in r.json()["error"]
                    assert time.perf_counter() - t < 5
                    waiting = scalar_int(
                        repo,
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                        " AND datname = current_database() AND wait_event_type = 'Lock'",
                        (APPLICATION_NAME,),
                    )
                    assert waiting == 0
                locker.rollback()
            assert (await c.get("/fleet.json")).status_code == 200

    asyncio.run(go())


def test_a_request_given_up_gives_its_connections_back(repo: str) -> None:
    """Clients that hang up mid-query (a page stuck on a lock) leave no query
    running in the repository and no slot taken."""

    async def go() -> None:
        async with serving(repo, pool_size=2, max_connections=2, statement_timeout=30) as web:
            c = await web.client()
            c.headers["Authorization"] = f"Bearer {TOKEN}"
            assert (await c.get("/fleet.json")).status_code == 200
            with psycopg.connect(repo) as locker:
                locker.execute("LOCK TABLE pgfleet.servers IN ACCESS EXCLUSIVE MODE")
                tasks = [asyncio.create_task(c.get("/fleet.json")) for _ in range(5)]
                await asyncio.sleep(0.5)
                assert web.sessions.slots.used == 2
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                waiting = await asyncio.to_thread(
                    scalar_int,
                    repo,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                    " AND datname = current_database() AND state = 'active'",
                    (APPLICATION_NAME,),
                )
                assert waiting == 0  # cancelled in the repository too
                locker.rollback()
            pool = web.sessions.slots
            assert pool.used == pool.snapshot()["idle"] <= 2  # every slot back, or idle
            assert (await c.get("/fleet.json")).status_code == 200

    asyncio.run(go())


def test_logging_out_while_requests_wait(repo: str) -> None:
    """A request waiting on the pool of a session that logs out meanwhile is told
    so (401), the one reading finishes, and their connections close."""
    reader, password = make_role(repo, "leaving")

    async def go() -> None:
        async with serving(repo, pool_size=1) as web:
            c = await web.client()
            assert (await login(c, reader, password)).status_code == 303
            with psycopg.connect(repo) as locker:
                locker.execute("LOCK TABLE pgfleet.servers IN ACCESS EXCLUSIVE MODE")
                reading = asyncio.create_task(c.get("/fleet.json?_only=servers"))
                await asyncio.sleep(0.3)
                waiting = asyncio.create_task(c.get("/fleet.json?_only=servers"))
                await asyncio.sleep(0.3)
                page = await c.get("/login")  # the session's token, read from no table
                csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
                assert (await c.post("/logout", data={"csrf": csrf})).status_code == 303
                r = await waiting
                assert r.status_code == 401 and "logged out" in r.json()["error"]
                locker.rollback()
            assert (await reading).status_code == 200
            assert web.sessions.slots.used == 0
            assert await asyncio.to_thread(ui_backends, repo) == {}

    asyncio.run(go())


def test_idle_pools_are_closed(repo: str) -> None:
    reader, password = make_role(repo, "idle")

    async def go() -> None:
        async with serving(repo, pool_idle=1) as web:
            c = await web.client()
            assert (await login(c, reader, password)).status_code == 303
            assert (await c.get("/fleet.json")).status_code == 200
            assert ui_backends(repo).get(reader, 0) >= 1
            deadline = time.monotonic() + 5
            while ui_backends(repo) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert ui_backends(repo) == {}  # closed by the sweeper
            assert (await c.get("/fleet.json")).status_code == 200  # and reopened

    asyncio.run(go())


def test_every_ui_connection_has_the_statement_timeout(repo: str) -> None:
    reader, password = make_role(repo, "setting")

    async def go() -> None:
        async with serving(repo, statement_timeout=7) as web:
            c = await web.client()
            assert (await login(c, reader, password)).status_code == 303
            s = web.sessions
            user = next(iter(s._users.values()))
            token_user = s.token_user(TOKEN, "127.0.0.1")
            for u in (user, token_user):
                assert isinstance(u, User)
                async with s.connection(u) as conn:
                    cur = await conn.execute("SHOW statement_timeout")
                    assert await cur.fetchone() == ("7s",)

    asyncio.run(go())
