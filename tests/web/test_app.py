"""The web app over HTTP (in-process): login, the JSON twins, errors, escaping."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx
import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgfleet.repository import reads
from pgfleet.snapshot.model import MARKED
from pgfleet.web.app import create_app
from pgfleet.web.render import tilde_decode, tilde_encode
from tests.fix_repository import RunCli
from tests.web.fix_web import (
    HOSTILE_BACKUP,
    HOSTILE_COMMENT,
    HOSTILE_DB,
    TOKEN,
    Fleet,
    record_backups,
    web_config,
)

T = TypeVar("T")


def run(fleet: Fleet, fn: Callable[[httpx.AsyncClient], Awaitable[T]], **web: object) -> T:
    async def main() -> T:
        app = create_app(web_config(fleet.repo, **web))
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
        ):
            return await fn(client)

    return asyncio.run(main())


async def login(client: httpx.AsyncClient, user: str, password: str) -> httpx.Response:
    page = await client.get("/login")
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    return await client.post(
        "/login", data={"csrf": csrf, "username": user, "password": password, "next": "/fleet"}
    )


def test_tilde_encoding_roundtrips() -> None:
    for name in ["app", "a.json", "a/b", "~x y", HOSTILE_DB, "é"]:
        enc = tilde_encode(name)
        assert "/" not in enc and "." not in enc
        assert tilde_decode(enc) == name


def test_login_required_and_checked_by_postgres(fleet: Fleet) -> None:
    async def go(c: httpx.AsyncClient) -> None:
        r = await c.get("/fleet")
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
        r = await c.get("/fleet.json")
        assert r.status_code == 401
        r = await login(c, fleet.reader[0], "wrong")
        assert r.status_code == 401 and "invalid user name or password" in r.text
        r = await login(c, fleet.reader[0], fleet.reader[1])
        assert r.status_code == 303 and r.headers["location"] == "/fleet"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie
        r = await c.get("/fleet.json")
        assert r.status_code == 200
        assert [s["alias"] for s in r.json()["servers"]] == ["mon"]
        # A POST without the form's token is refused.
        r = await c.post("/logout", data={"csrf": "nope"})
        assert r.status_code == 403

    run(fleet, go)


def test_a_role_without_grants_cannot_log_in(fleet: Fleet) -> None:
    # Told what a wrong password is told (the log says why: see tests/security).
    from tests.fix_repository import connect

    with connect(fleet.repo) as conn:
        conn.execute("DROP ROLE IF EXISTS web_nobody")
        conn.execute("CREATE ROLE web_nobody LOGIN PASSWORD 'x'")
        conn.execute("REVOKE ALL ON SCHEMA pgfleet FROM PUBLIC")

    async def go(c: httpx.AsyncClient) -> None:
        r = await login(c, "web_nobody", "x")
        assert r.status_code == 401 and "invalid user name or password" in r.text
        assert "GRANT" not in r.text

    run(fleet, go)


def test_every_page_has_a_json_twin(fleet: Fleet) -> None:
    async def go(c: httpx.AsyncClient) -> None:
        h = {"Authorization": f"Bearer {TOKEN}"}
        srv = f"/server/{fleet.srvid}"
        fleet_json = (await c.get("/fleet.json", headers=h)).json()
        assert fleet_json["servers"][0]["server_version_num"] >= 180000
        assert str(fleet.srvid) in fleet_json["load"]

        data = (await c.get(f"{srv}.json?range=1h", headers=h)).json()
        charts = {ch["id"]: ch for ch in data["charts"]}
        assert {
            "load",
            "rows",
            "blocks",
            "temp",
            "wal",
            "xacts",
            "sessions",
            "waits",
            "checkpoints",
            "io",
            "replication",
        } <= set(charts)
        assert len(data["x"]) == len(charts["load"]["series"][0]["values"]) <= 300
        assert any(v for v in charts["load"]["series"][0]["values"])  # queries/s drew
        assert any(v for v in charts["xacts"]["series"][0]["values"])
        top = data["top_queries"]
        assert top and top[0]["calls"] > 0
        work = next(q for q in top if q["query"] and "FROM work WHERE" in q["query"])
        assert {d["datname"] for d in data["databases"]} >= {work["datname"]}
        # Sorted as asked, server-side.
        by_calls = (
            await c.get(f"{srv}.json?range=1h&sort=calls&_only=top_queries", headers=h)
        ).json()
        calls = [q["calls"] for q in by_calls["top_queries"]]
        assert calls == sorted(calls, reverse=True) and "charts" not in by_calls

        db = (await c.get(f"{srv}/database/{tilde_encode(work['datname'])}.json", headers=h)).json()
        assert {"tables", "indexes"} <= {ch["id"] for ch in db["charts"]}
        assert [t["relname"] for t in db["tables"]] == ["work"]

        q = (
            await c.get(f"{srv}/query/{work['queryid']}.json?db={work['datname']}", headers=h)
        ).json()
        assert "FROM work WHERE id <" in q["query"]
        calls_chart = next(ch for ch in q["charts"] if ch["id"] == "calls")
        assert sum(v or 0 for v in calls_chart["series"][0]["values"]) > 0

        col = (await c.get("/collector.json", headers=h)).json()
        assert col["can_command"] is False and not col["live"]["available"]
        assert any(s["alias"] == "mon" and s["snapshots"] == 4 for s in col["servers"])

        # A custom range, and errors.
        r = await c.get(f"{srv}.json?from=1700000000&to=1700003600&_only=charts", headers=h)
        assert r.status_code == 200 and r.json()["range"]["preset"] is None
        assert (await c.get(f"{srv}.json?range=2y", headers=h)).status_code == 400
        assert (await c.get("/server/999999.json", headers=h)).status_code == 404
        assert (await c.get(f"{srv}/database/nope.json", headers=h)).status_code == 404
        assert (await c.get(f"{srv}/query/12.json", headers=h)).status_code == 404
        assert (
            await c.get("/fleet.json", headers={"Authorization": "Bearer x"})
        ).status_code == 401

    run(fleet, go)


def test_what_servers_return_renders_as_text(fleet: Fleet) -> None:
    async def go(c: httpx.AsyncClient) -> None:
        await login(c, fleet.reader[0], fleet.reader[1])
        srv = f"/server/{fleet.srvid}"
        page = (await c.get(f"{srv}?range=1h")).text
        assert HOSTILE_DB not in page  # only escaped
        assert "&lt;img src=x onerror=&#34;window.__pwned=1&#34;&gt;db" in page
        queryid, datname = hostile_query(fleet)
        html = (await c.get(f"{srv}/query/{queryid}?db={datname}")).text
        assert HOSTILE_COMMENT not in html and "<script>window.__pwned" not in html
        assert "&lt;/script&gt;" in html
        r = await c.get(f"{srv}/database/{tilde_encode(HOSTILE_DB)}")
        assert r.status_code == 200 and "<img src=x" not in r.text
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert json.loads((await c.get(f"{srv}.json?_only=databases")).text)

    run(fleet, go)


def hostile_query(fleet: Fleet) -> tuple[int, str]:
    from tests.fix_repository import connect

    with connect(fleet.repo) as conn:
        row = conn.execute(
            "SELECT queryid, datname FROM pgfleet.pg_stat_statements_once"
            " WHERE srvid = %s AND query LIKE '%%__pwned=2%%'",
            (fleet.srvid,),
        ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def test_login_never_redirects_elsewhere(fleet: Fleet) -> None:
    async def go(c: httpx.AsyncClient) -> None:
        for target in ["//evil.example/", "https://evil.example/", "/\\evil"]:
            page = await c.get("/login")
            csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
            r = await c.post("/login", data={"csrf": csrf, "token": TOKEN, "next": target})
            assert r.status_code == 303 and r.headers["location"] == "/fleet", target

    run(fleet, go)


def test_collector_commands_need_an_admin(fleet: Fleet) -> None:
    async def go(c: httpx.AsyncClient) -> None:
        await login(c, fleet.admin[0], fleet.admin[1])
        data = (await c.get("/collector.json")).json()
        assert data["can_command"] is True
        # No daemon runs here: the command channel says so, the page still shows
        # what the repository knows.
        assert not data["live"]["available"] and "no collector" in data["live"]["reason"]
        page = (await c.get("/collector")).text
        assert "Snapshot now" in page
        csrf = page.split('name="csrf" value="')[1].split('"')[0]
        r = await c.post("/collector/reload", data={"csrf": csrf})
        assert r.status_code == 303
        assert "RELOAD: no collector is running" in (await c.get("/collector")).text

    run(fleet, go)


def test_server_page_says_what_its_history_costs(fleet: Fleet) -> None:
    from tests.fix_repository import connect

    async def page(c: httpx.AsyncClient) -> tuple[dict[str, int], str]:
        await login(c, fleet.reader[0], fleet.reader[1])  # pgfleet_read may read it
        srv = f"/server/{fleet.srvid}"
        data = (await c.get(f"{srv}.json?_only=repository")).json()
        return data["repository"], (await c.get(srv)).text

    usage, html = run(fleet, page)
    assert usage == {"history_bytes": 0, "points": 0, "week_bytes": 0}
    assert "Repository: no history for this server yet." in html
    with connect(fleet.repo) as conn:
        conn.execute(
            "SELECT pgfleet.metric_aggregate(module, %s) FROM pgfleet.metric_sources",
            (fleet.srvid,),
        )
        points = conn.execute(
            "SELECT sum(points) FROM pgfleet.history_usage WHERE srvid = %s", (fleet.srvid,)
        ).fetchone()
    usage, html = run(fleet, page)
    assert points and usage["points"] == points[0] > 0
    assert usage["history_bytes"] > 0 and usage["week_bytes"] > 0
    assert " of history for this server, ~" in html and "per week at the current rate" in html


def test_server_page_lists_backups(fleet: Fleet) -> None:
    """The repository's copy of the server's backup catalog, newest first, in
    the page and its JSON twin; what the catalog held shows as text."""

    async def page(c: httpx.AsyncClient) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
        await login(c, fleet.reader[0], fleet.reader[1])  # pgfleet_read may read them
        srv = f"/server/{fleet.srvid}"
        only = (await c.get(f"{srv}.json?_only=backups")).json()["backups"]
        return only, (await c.get(f"{srv}.json")).json(), (await c.get(srv)).text

    listed, full, html = run(fleet, page)
    assert listed == [] and full["backups"] == []
    assert "No backups recorded for this server." in html

    made = record_backups(fleet)
    listed, full, html = run(fleet, page)
    assert full["backups"] == listed
    assert [b["id"] for b in listed] == [b.id for b in reversed(made)]
    assert [b["state"] for b in listed] == ["in_progress", "invalid", "valid"]
    running, failed, valid = listed
    assert running["finished"] is None and running["duration_seconds"] is None
    assert running["label"] == HOSTILE_BACKUP
    assert failed["kind"] == "incremental" and HOSTILE_BACKUP in failed["error"]
    assert valid["duration_seconds"] == 3.0 and valid["raw_bytes"] == 31_457_280
    assert (valid["start_lsn"], valid["end_lsn"], valid["timeline"]) == ("0/2000028",
                                                                       "0/2000138", 1)  # fmt: skip
    assert valid["start_wal"] == valid["end_wal"] == "000000010000000000000002"

    assert "No backups recorded" not in html
    table = html.split('id="backups"')[1].split("</table>")[0]
    assert table.count('<tr class="backup backup-') == 3
    assert table.index(made[2].id) < table.index(made[1].id) < table.index(made[0].id)
    assert "30.0 MB" in table and "4.0 MB" in table and "3 s" in table and "running" in table
    assert "0/2000028 … 0/2000138 (timeline 1)" in table
    assert HOSTILE_BACKUP not in html  # only escaped
    assert table.count("&lt;img src=x onerror=&#34;window.__pwned=3&#34;&gt;") == 2


def test_own_statements_are_hidden_unless_asked_for(fleet: Fleet) -> None:
    """pgfleet's own statements (marked: see snapshot.model.mark()) are left
    out of the top queries, in HTML and JSON, until ``?own=1``."""

    async def go(c: httpx.AsyncClient) -> None:
        h = {"Authorization": f"Bearer {TOKEN}"}
        srv = f"/server/{fleet.srvid}"
        hidden = (await c.get(f"{srv}.json?_only=top_queries", headers=h)).json()
        shown = (await c.get(f"{srv}.json?_only=top_queries&own=1", headers=h)).json()
        assert hidden["own"] is False and shown["own"] is True
        assert hidden["top_queries"] and not any(q["own"] for q in hidden["top_queries"])
        assert not any(re.match(MARKED, q["query"] or "") for q in hidden["top_queries"])
        assert any("FROM work WHERE" in (q["query"] or "") for q in hidden["top_queries"])
        ours = [q for q in shown["top_queries"] if q["own"]]
        assert ours and all(re.match(MARKED, q["query"]) for q in ours)
        # Ours take room in the 50 shown: fewer of the server's own come in.
        keys = {(q["datname"], q["queryid"]) for q in shown["top_queries"] if not q["own"]}
        assert keys < {(q["datname"], q["queryid"]) for q in hidden["top_queries"]}

        # The page says what it hides, and its links keep the choice.
        page = (await c.get(f"{srv}?range=1h&sort=calls", headers=h)).text
        assert f'href="{srv}?range=1h&amp;sort=calls&amp;own=1">show pgfleet\'s own' in page
        assert f'href="{srv}?range=1h&amp;sort=mean"' in page
        page = (await c.get(f"{srv}?range=1h&sort=calls&own=1", headers=h)).text
        assert f'href="{srv}?range=1h&amp;sort=calls">hide pgfleet\'s own' in page
        assert f'href="{srv}?range=1h&amp;sort=mean&amp;own=1"' in page
        assert "/* pgfleet */" in page

        work = next(q for q in hidden["top_queries"] if "FROM work WHERE" in q["query"])
        db = f"{srv}/database/{tilde_encode(work['datname'])}"
        hidden = (await c.get(f"{db}.json?_only=top_queries", headers=h)).json()
        shown = (await c.get(f"{db}.json?_only=top_queries&own=1", headers=h)).json()
        assert not any(q["own"] for q in hidden["top_queries"])
        assert any(q["own"] for q in shown["top_queries"])
        page = (await c.get(f"{db}?range=6h&own=1", headers=h)).text
        assert f'href="{db}?range=6h&amp;sort=total_time">hide pgfleet\'s own' in page

    run(fleet, go)


def test_own_statements_leave_the_ranking_before_its_limit(fleet: Fleet) -> None:
    """`limit` rows of the server's statements, however many of ours outrank them."""

    async def ranks() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        end = datetime.now(UTC)
        start = end - timedelta(hours=1)
        async with await psycopg.AsyncConnection.connect(fleet.repo, autocommit=True) as conn:
            every = await reads.top_queries(conn, fleet.srvid, start, end, limit=1000, own=True)
            theirs = [r for r in every if not r["own"]]
            first_ours = next(i for i, r in enumerate(every) if r["own"])
            # Some of ours rank among the server's statements, which the
            # LIMIT would cut if they were left out after it.
            assert first_ours < len(theirs) - 1
            top = await reads.top_queries(conn, fleet.srvid, start, end, limit=len(theirs) - 1)
        return theirs, top

    theirs, top = asyncio.run(ranks())
    assert [(r["datname"], r["queryid"]) for r in top] == [
        (r["datname"], r["queryid"]) for r in theirs[:-1]
    ]


def test_local_snapshots_are_marked_too(fleet: Fleet, run_cli: RunCli) -> None:
    """In local mode the repository is the server: its snapshots' statements
    (and the UI's reads) are marked, and its page (srvid 0) hides them."""
    # The third reads the counters of the second's statements, which read the first's.
    for _ in range(3):
        res = run_cli("snapshot", "--local")
        assert res.rc == 0, res.err

    async def texts() -> list[str]:
        end = datetime.now(UTC)
        async with await psycopg.AsyncConnection.connect(fleet.repo, autocommit=True) as conn:
            every = await reads.top_queries(
                conn, 0, end - timedelta(hours=1), end, limit=10_000, own=True, text_chars=1000
            )
        return [r["query"] for r in every if r["own"]]

    ours = asyncio.run(texts())
    assert any("pgfleet.take_snapshot(" in t for t in ours), ours

    async def go(c: httpx.AsyncClient) -> None:
        h = {"Authorization": f"Bearer {TOKEN}"}
        repo_db = tilde_encode(str(conninfo_to_dict(fleet.repo)["dbname"]))
        for path in ("/server/0.json", f"/server/0/database/{repo_db}.json"):
            data = (await c.get(f"{path}?_only=top_queries", headers=h)).json()
            assert data["top_queries"], path
            assert not any(re.match(MARKED, q["query"] or "") for q in data["top_queries"])
        assert (await c.get("/server/0", headers=h)).status_code == 200

    run(fleet, go)
