"""The pages of issue 18 over HTTP (in-process), with their JSON twins:
pg_stat_kcache on the server, database and query pages, index advice (run
on a POST, one at a time, never by a page load), generic plans, period
comparison; who may run what, CSRF, hostile ranges.

On PostgreSQL 15 (``shop``: pg_qualstats, hypopg, pg_stat_kcache) and on
PostgreSQL 18 (``fleet``: none of them, but EXPLAIN (GENERIC_PLAN)).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx
import pytest
from starlette.applications import Starlette

from pgfleet.web import runs, timerange
from pgfleet.web.app import create_app
from pgfleet.web.render import tilde_encode
from pgfleet.web.views import advice
from tests.advice.fix_advice import Shop
from tests.fix_repository import connect, scalar_int
from tests.web.fix_web import TOKEN, Fleet, web_config, web_roles
from tests.web.test_app import login

T = TypeVar("T")
BEARER = {"Authorization": f"Bearer {TOKEN}"}


Go = Callable[[httpx.AsyncClient, Starlette], Awaitable[T]]


def serve(repo: str, fn: Go[T], **web: object) -> T:
    """`fn(client, app)` with the app (its lifespan running) and a client of it."""

    async def main() -> T:
        app = create_app(web_config(repo, **web))
        async with app.router.lifespan_context(app), client_of(app) as client:
            return await fn(client, app)

    return asyncio.run(main())


def client_of(app: Starlette) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def csrf_of(html: str) -> str:
    return html.split('name="csrf" value="')[1].split('"')[0]


def span(start: datetime, end: datetime) -> dict[str, str]:
    return {"from": f"{start.timestamp() - 5:.0f}", "to": f"{end.timestamp() + 5:.0f}"}


async def finished(c: httpx.AsyncClient, path: str, timeout: float = 180) -> dict[str, Any]:
    """The page's run once it is over (its JSON twin polled, as the page does)."""
    deadline = time.monotonic() + timeout
    while True:
        data = (await c.get(f"{path}.json")).json()
        run = data["run"]
        assert run is not None, data
        if run["state"] != "running":
            return dict(run)
        assert time.monotonic() < deadline, run
        await asyncio.sleep(0.3)


def shop_query(shop: Shop, text: str) -> int:
    return scalar_int(
        shop.repo,
        "SELECT queryid FROM pgfleet.pg_stat_statements_once"
        " WHERE srvid = %s AND datname = %s AND query = %s",
        (shop.server.srvid, shop.dbname, text),
    )


# -- Period comparison, and what it refuses


def test_timerange_against() -> None:
    b = timerange.parse({"from": "1700000000", "to": "1700003600"})
    a, how = timerange.parse_against({}, b)
    assert how == "previous" and a.end == b.start and a.seconds == b.seconds
    a, how = timerange.parse_against({"against": "7d"}, b)
    assert how == "7d" and b.start - a.start == timedelta(days=7)
    a, how = timerange.parse_against({"a_from": "2023-11-01T00:00"}, b)
    assert how == "custom" and a.start == datetime(2023, 11, 1, tzinfo=UTC)
    assert a.seconds == b.seconds
    for bad, says in [
        ({"against": "yesterday"}, "invalid against"),
        ({"against": "custom"}, "needs a_from"),
        ({"a_from": "x" * 100}, "invalid a_from"),
        ({"a_from": "1e300"}, "invalid a_from"),
        ({"a_from": "1700000000", "a_to": "1600000000"}, "ends before it starts"),
        ({"a_from": "2199-12-31T23:00", "a_to": "2200-01-01T01:00"}, "invalid a_to"),
    ]:
        with pytest.raises(timerange.BadRange, match=says):
            timerange.parse_against(bad, b)
    early = timerange.parse({"from": "0", "to": "3600"})
    with pytest.raises(timerange.BadRange, match="before 1970"):
        timerange.parse_against({"against": "1d"}, early)


def test_compare_pages(fleet: Fleet) -> None:
    with connect(fleet.repo) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM min(ts))::bigint, extract(epoch FROM max(ts))::bigint"
            " FROM pgfleet.pg_stat_statements_rollup WHERE srvid = %s",
            (fleet.srvid,),
        ).fetchone()
    assert row is not None
    lo, hi = row[0] - 5, row[1] + 5

    async def go(c: httpx.AsyncClient, app: Starlette) -> None:
        srv = f"/server/{fleet.srvid}"
        # B holds the snapshots, A (the minute before) nothing: every statement is new.
        data = (await c.get(f"{srv}/compare.json?from={lo}&to={hi}", headers=BEARER)).json()
        assert data["against"] == "previous" and data["a"]["seconds"] == data["b"]["seconds"]
        statements = data["statements"]
        assert statements and {s["kind"] for s in statements} == {"new"}
        assert all(s["regressed"] and s["a"] is None for s in statements)
        extra = [s["extra_time"] for s in statements]
        assert extra == sorted(extra, reverse=True)
        work = next(s for s in statements if "FROM work WHERE id <" in (s["query"] or ""))
        assert work["b"]["calls"] > 0 and work["b"]["mean_time"] > 0
        assert data["totals"]["b"]["statements"] >= len(statements)
        # The other way round: every statement is gone.
        swapped = (
            await c.get(
                f"{srv}/compare.json?from={hi}&to={hi + 120}&against=custom&a_from={lo}&a_to={hi}",
                headers=BEARER,
            )
        ).json()
        assert swapped["against"] == "custom" and swapped["statements"]
        assert {s["kind"] for s in swapped["statements"]} == {"gone"}
        assert not any(s["regressed"] for s in swapped["statements"])

        # One database, and the HTML (the token may read it: repository only).
        db = f"{srv}/database/{tilde_encode(work['datname'])}/compare"
        one = (await c.get(f"{db}.json?from={lo}&to={hi}", headers=BEARER)).json()
        assert one["statements"] and {s["datname"] for s in one["statements"]} == {work["datname"]}
        page = await c.get(f"{db}?from={lo}&to={hi}", headers=BEARER)
        assert page.status_code == 200
        assert 'id="compare-statements"' in page.text and "FROM work WHERE id &lt;" in page.text
        assert 'name="a_from"' in page.text and 'value="previous" selected' in page.text

        # Hostile ranges: a 400 saying what is wrong, never a 500.
        for query, says in [
            ("against=yesterday", "invalid against"),
            ("against=custom", "needs a_from"),
            ("a_from=%00%ff", "invalid a_from"),
            ("a_from=" + "9" * 300, "invalid a_from"),
            ("a_from=1700000000&a_to=1600000000", "ends before it starts"),
            ("from=1700003600&to=1700000000", "ends before it starts"),
            ("a_from=<svg%20onload=x()>", "invalid a_from"),
        ]:
            r = await c.get(f"{srv}/compare.json?{query}", headers=BEARER)
            assert r.status_code == 400 and says in r.json()["error"], (query, r.text)
            html = await c.get(f"{srv}/compare?{query}", headers=BEARER)
            assert html.status_code == 400 and says in html.text, query
            assert "<svg onload" not in html.text
        r = await c.get(f"{srv}/database/nope/compare.json", headers=BEARER)
        assert r.status_code == 404

    serve(fleet.repo, go)


# -- pg_stat_kcache


def test_kcache_is_shown_only_where_collected(fleet: Fleet) -> None:
    async def go(c: httpx.AsyncClient, app: Starlette) -> None:
        srv = f"/server/{fleet.srvid}"
        data = (await c.get(f"{srv}.json", headers=BEARER)).json()
        assert data["kcache"] == {"available": False, "note": data["kcache"]["note"]}
        assert "pg_stat_kcache" in data["kcache"]["note"]
        assert not {"cpu", "os_io"} & {ch["id"] for ch in data["charts"]}
        html = (await c.get(srv, headers=BEARER)).text
        assert 'id="kcache-missing"' in html and 'id="kcache-queries"' not in html

    serve(fleet.repo, go)


def test_kcache_on_server_database_and_query_pages(shop: Shop) -> None:
    srvid = shop.server.srvid
    queryid = shop_query(shop, "SELECT count(*) FROM orders WHERE customer = $1")
    q = span(shop.start, shop.end)
    qs = f"from={q['from']}&to={q['to']}"

    async def go(c: httpx.AsyncClient, app: Starlette) -> None:
        srv = f"/server/{srvid}"
        data = (await c.get(f"{srv}.json?{qs}", headers=BEARER)).json()
        k = data["kcache"]
        assert k["available"] and k["sort"] == "cpu"
        assert k["totals"]["cpu"] > 0 and k["totals"]["cpu_user"] > 0
        assert k["top_queries"] and all(r["cpu"] is not None for r in k["top_queries"])
        cpus = [r["cpu"] for r in k["top_queries"]]
        assert cpus == sorted(cpus, reverse=True)
        charts = {ch["id"]: ch for ch in data["charts"]}
        assert [s["label"] for s in charts["cpu"]["series"]] == ["user", "system"]
        assert charts["cpu"]["series"][0]["unit"] == "cores"
        assert any(v for v in charts["cpu"]["series"][0]["values"])
        assert [s["unit"] for s in charts["os_io"]["series"]] == ["B/s", "B/s"]
        # Sorted by reads, as asked; only the part asked for.
        by_reads = (await c.get(f"{srv}.json?{qs}&ksort=reads&_only=kcache", headers=BEARER)).json()
        assert set(by_reads) >= {"kcache"} and "charts" not in by_reads
        assert by_reads["kcache"]["sort"] == "reads"
        html = (await c.get(f"{srv}?{qs}", headers=BEARER)).text
        assert 'id="kcache-queries"' in html and "Top queries by CPU" in html
        assert "ksort=cpu_user#kcache" in html

        db = f"{srv}/database/{tilde_encode(shop.dbname)}"
        data = (await c.get(f"{db}.json?{qs}", headers=BEARER)).json()
        assert data["kcache"]["available"] and data["kcache"]["totals"]["cpu"] > 0
        assert data["kcache"]["totals"]["cpu"] <= k["totals"]["cpu"]
        assert {"cpu", "os_io"} <= {ch["id"] for ch in data["charts"]}
        assert 'id="kcache-queries"' in (await c.get(f"{db}?{qs}", headers=BEARER)).text

        one = f"{srv}/query/{queryid}"
        data = (await c.get(f"{one}.json?{qs}&db={shop.dbname}", headers=BEARER)).json()
        assert data["kcache"]["available"] and data["kcache"]["totals"]["cpu"] is not None
        assert "top_queries" not in data["kcache"]
        assert {"cpu", "os_io"} <= {ch["id"] for ch in data["charts"]}
        html = (await c.get(f"{one}?{qs}&db={shop.dbname}", headers=BEARER)).text
        assert 'id="kcache-totals"' in html and "Over the range: CPU" in html

    serve(shop.repo, go)


# -- Index advice


def test_index_advice_on_a_post_only(shop: Shop) -> None:
    reader, _ = web_roles(shop.repo, shop.cluster.port)
    srvid = shop.server.srvid
    db = f"/server/{srvid}/database/{tilde_encode(shop.dbname)}/advice"
    q = span(shop.start, shop.end)

    async def go(c: httpx.AsyncClient, app: Starlette) -> None:
        await login(c, *reader)
        page = await c.get(f"{db}?from={q['from']}&to={q['to']}")
        assert page.status_code == 200
        assert "Suggest indexes for this range" in page.text and 'id="advice-none"' in page.text
        data = (await c.get(f"{db}.json")).json()
        assert data["run"] is None and data["can_run"] and data["database"] == shop.dbname

        r = await c.post(db, data={"csrf": csrf_of(page.text), **q})
        assert r.status_code == 303
        assert r.headers["location"] == f"{db}?{timerange.parse(q).query()}"
        run = await finished(c, db)
        assert run["state"] == "done", run
        result = run["result"]
        assert result["reason"] is None and [d["datname"] for d in result["databases"]] == [
            shop.dbname
        ]
        found = result["databases"][0]
        assert found["hypopg"] and found["reason"] is None
        by = {(tuple(ix["columns"]), ix["status"]): ix for ix in found["indexes"]}
        customer = by[(("customer",), "suggested")]
        assert customer["ddl"] == "CREATE INDEX ON public.orders USING btree (customer)"
        assert customer["best_gain"] > 0.5
        assert any(qq["uses_index"] and qq["gain"] > 0.5 for qq in customer["queries"])
        assert "orders_status" in by[(("status",), "covered")]["covered_by"]
        gin = by[(("doc",), "unverified")]
        assert gin["access_method"] == "gin" and "hypopg" in gin["reason"]

        html = (await c.get(db)).text
        assert 'id="advice-done"' in html and 'data-state="done"' in html
        assert "CREATE INDEX ON public.orders USING btree (customer)" in html
        assert "Covered by <code>" in html and "orders_status" in html
        assert '<h3 class="advice-table">public.orders</h3>' in html
        # A page load never starts one: the server's page has no run of its own.
        srv_page = (await c.get(f"/server/{srvid}/advice.json")).json()
        assert srv_page["run"] is None

        # Without hypopg: unverified, and the page says why.
        shop.cluster.execute("DROP EXTENSION hypopg", dbname=shop.dbname)
        try:
            page = await c.get(db)
            r = await c.post(db, data={"csrf": csrf_of(page.text), **q})
            assert r.status_code == 303
            run = await finished(c, db)
        finally:
            shop.cluster.execute("CREATE EXTENSION hypopg", dbname=shop.dbname)
        found = run["result"]["databases"][0]
        assert not found["hypopg"] and "hypopg" in found["reason"]
        assert {ix["status"] for ix in found["indexes"]} <= {"unverified", "covered"}
        html = (await c.get(db)).text
        assert 'class="warning db-reason"' in html and "hypopg" in html

    serve(shop.repo, go)


def test_index_advice_without_pg_qualstats_says_so(fleet: Fleet) -> None:
    srv = f"/server/{fleet.srvid}/advice"

    async def go(c: httpx.AsyncClient, app: Starlette) -> None:
        await login(c, *fleet.reader)
        page = await c.get(f"{srv}?range=1h")
        r = await c.post(srv, data={"csrf": csrf_of(page.text), "range": "1h"})
        assert r.status_code == 303 and r.headers["location"] == f"{srv}?range=1h"
        run = await finished(c, srv)
        assert run["state"] == "done" and run["result"]["databases"] == []
        assert "pg_qualstats" in run["result"]["reason"]
        html = (await c.get(srv)).text
        assert 'id="advice-reason"' in html and "pg_qualstats" in html

    serve(fleet.repo, go)


def test_who_may_ask_for_advice(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The token reads, never runs; a POST needs the form's CSRF token; one
    run at a time per user and per server, a logout cancels its runs."""
    release = asyncio.Event()
    started: list[tuple[int, str | None]] = []

    async def slow(*args: Any) -> dict[str, Any]:
        started.append((args[2], args[3]))
        await release.wait()
        return {"reason": "slow", "databases": [], "left_out": []}

    monkeypatch.setattr(advice, "_advise", slow)
    srv = f"/server/{fleet.srvid}/advice"

    async def go(c: httpx.AsyncClient, app: Starlette) -> None:
        # The token: reads the page, may not run it, whether logged in with it or not.
        page = await c.get(srv, headers=BEARER)
        assert page.status_code == 200 and 'id="advice-refused"' in page.text
        assert "Suggest indexes" not in page.text
        assert (await c.get(f"{srv}.json", headers=BEARER)).json()["can_run"] is False
        r = await c.post(srv, data={"range": "1h"}, headers=BEARER)
        assert r.status_code == 403
        login_page = await c.get("/login")
        await c.post("/login", data={"csrf": csrf_of(login_page.text), "token": TOKEN})
        page = await c.get(srv)
        r = await c.post(srv, data={"csrf": csrf_of(page.text), "range": "1h"})
        assert r.status_code == 403 and "log in with a role" in r.text
        await c.post("/logout", data={"csrf": csrf_of(page.text)})
        assert not started

        # A role: the CSRF token is checked, a bad range refused.
        await login(c, *fleet.reader)
        page = await c.get(srv)
        csrf = csrf_of(page.text)
        assert (await c.post(srv, data={"csrf": "nope", "range": "1h"})).status_code == 403
        r = await c.post(srv, data={"csrf": csrf, "range": "2y"})
        assert r.status_code == 400 and "invalid range" in r.text
        r = await c.post("/server/999999/advice", data={"csrf": csrf, "range": "1h"})
        assert r.status_code == 404
        assert not started

        r = await c.post(srv, data={"csrf": csrf, "range": "1h"})
        assert r.status_code == 303
        await asyncio.sleep(0.05)
        assert started == [(fleet.srvid, None)]
        data = (await c.get(f"{srv}.json")).json()
        assert data["run"]["state"] == "running"
        assert 'data-state="running"' in (await c.get(srv)).text
        # A second one while it runs: refused, and told so.
        r = await c.post(srv, data={"csrf": csrf, "range": "6h"})
        assert r.status_code == 303
        html = (await c.get(srv)).text
        assert 'id="flash"' in html and "one index advice at a time per user" in html
        assert len(started) == 1
        # Another user on the same server: one at a time per server.
        async with client_of(app) as other:
            await login(other, *fleet.admin)
            page = await other.get(srv)
            r = await other.post(srv, data={"csrf": csrf_of(page.text), "range": "1h"})
            assert r.status_code == 303
            assert "one at a time per server" in (await other.get(srv)).text
        assert len(started) == 1

        release.set()
        run = await finished(c, srv)
        assert run["state"] == "done" and run["result"]["reason"] == "slow"
        # Logging out cancels what runs.
        release.clear()
        r = await c.post(srv, data={"csrf": csrf, "range": "1h"})
        await asyncio.sleep(0.05)
        assert len(started) == 2
        st = app.state.pgfleet
        assert st.runs.get_stats()["running"] == 1
        await c.post("/logout", data={"csrf": csrf})
        assert st.runs.get_stats()["running"] == 0

    serve(fleet.repo, go)


def test_runs_are_throttled_and_bounded() -> None:
    async def go() -> None:
        store = runs.Runs(runs.Limits(per_window={runs.ADVICE: 2}, max_running=2, per_session=1))

        async def work() -> dict[str, Any]:
            return {"ok": True}

        def start(user: str, srvid: int, sid: str = "s") -> runs.Run:
            return store.start(runs.ADVICE, (srvid, None), sid=sid, username=user,
                               address="192.0.2.1", params={}, work=work(), server=srvid)  # fmt: skip

        first = await store.wait(start("alice", 1))
        assert first.state == "done" and first.result == {"ok": True}
        await store.wait(start("bob", 2, sid="t"))
        with pytest.raises(runs.Refused, match="at most 2 index advice runs per 10 minutes"):
            start("carol", 3)  # the same address
        # A session keeps its last results only.
        assert store.latest("s", runs.ADVICE, (1, None)) is first
        assert store.get_stats()["refused"] == 1

        blocked = asyncio.Event()

        async def slow() -> dict[str, Any]:
            await blocked.wait()
            return {}

        store = runs.Runs(runs.Limits(max_running=1))
        r = store.start(runs.PLAN, (1, 2, None), sid="s", username="a", address="192.0.2.1",
                        params={}, work=slow())  # fmt: skip
        with pytest.raises(runs.Refused, match="at most 1"):
            store.start(runs.PLAN, (1, 3, None), sid="t", username="b", address="192.0.2.2",
                        params={}, work=slow())  # fmt: skip
        await store.close()
        assert r.state == "failed" and r.error is not None and "cancelled" in r.error

    asyncio.run(go())


# -- Plans


def test_plans_on_the_query_page(fleet: Fleet) -> None:
    with connect(fleet.repo) as conn:
        row = conn.execute(
            "SELECT queryid, datname FROM pgfleet.pg_stat_statements_once"
            " WHERE srvid = %s AND query LIKE 'SELECT count(*), pg_sleep%%FROM work WHERE id <%%'",
            (fleet.srvid,),
        ).fetchone()
    assert row is not None
    queryid, datname = int(row[0]), str(row[1])
    page_path = f"/server/{fleet.srvid}/query/{queryid}"

    async def go(c: httpx.AsyncClient, app: Starlette) -> None:
        # The token sees the query page, without the button.
        data = (await c.get(f"{page_path}.json?db={datname}", headers=BEARER)).json()
        assert data["plan"]["possible"] and not data["plan"]["can_run"]
        assert 'id="plan-refused"' in (await c.get(page_path, headers=BEARER)).text

        await login(c, *fleet.reader)
        page = await c.get(f"{page_path}?db={datname}&range=6h")
        assert "Explain (generic plan)" in page.text
        data = (await c.get(f"{page_path}.json?db={datname}")).json()
        assert data["plan"]["can_run"] and data["plan"]["run"] is None
        assert data["plan"]["databases"] == [datname]
        r = await c.post(
            f"{page_path}/explain", data={"csrf": csrf_of(page.text), "db": datname, "range": "6h"}
        )
        assert r.status_code == 303
        assert r.headers["location"] == f"{page_path}?db={datname}&range=6h#plan"
        data = (await c.get(f"{page_path}.json?db={datname}&_only=plan")).json()
        run = data["plan"]["run"]
        assert run["state"] == "done", run
        plan = run["result"]
        assert plan["ok"] and plan["format"] == "text" and plan["reason"] is None
        assert "work" in plan["plan"] and "cost=" in plan["plan"]
        assert plan["query"].startswith("SELECT count(*), pg_sleep")
        html = (await c.get(f"{page_path}?db={datname}")).text
        assert 'id="plan-text"' in html and "cost=" in html

        # What is refused: no CSRF token, a database it never ran in, the token.
        r = await c.post(f"{page_path}/explain", data={"db": datname})
        assert r.status_code == 403
        r = await c.post(
            f"{page_path}/explain", data={"csrf": csrf_of(page.text), "db": "<b>nope</b>"}
        )
        assert r.status_code == 404 and "<b>nope" not in r.text
        r = await c.post(f"/server/{fleet.srvid}/query/1x/explain", data={"csrf": "x"})
        assert r.status_code in (403, 404)

    serve(fleet.repo, go)


def test_plans_need_postgresql_16(shop: Shop) -> None:
    reader, _ = web_roles(shop.repo, shop.cluster.port)
    queryid = shop_query(shop, "SELECT count(*) FROM orders WHERE customer = $1")
    page_path = f"/server/{shop.server.srvid}/query/{queryid}"

    async def go(c: httpx.AsyncClient, app: Starlette) -> None:
        await login(c, *reader)
        page = await c.get(page_path)
        assert "Explain (generic plan)" not in page.text
        assert 'id="plan-unavailable"' in page.text and "PostgreSQL 16 or later" in page.text
        data = (await c.get(f"{page_path}.json?_only=plan")).json()
        assert not data["plan"]["possible"] and "15." in data["plan"]["reason"]
        # Posted all the same: told why, nothing run.
        r = await c.post(f"{page_path}/explain", data={"csrf": csrf_of(page.text)})
        assert r.status_code == 303
        assert "PostgreSQL 16 or later" in (await c.get(page_path)).text

    serve(shop.repo, go)


def test_links_to_the_new_pages(fleet: Fleet) -> None:
    async def go(c: httpx.AsyncClient, app: Starlette) -> None:
        srv = f"/server/{fleet.srvid}"
        html = (await c.get(f"{srv}?range=6h", headers=BEARER)).text
        assert f'href="{srv}/compare?range=6h"' in html and f'href="{srv}/advice?range=6h"' in html
        names = (await c.get(f"{srv}.json?_only=databases", headers=BEARER)).json()["databases"]
        db = f"{srv}/database/{tilde_encode(names[0]['datname'])}"
        html = (await c.get(f"{db}?range=1h", headers=BEARER)).text
        assert f'href="{db}/compare?range=1h"' in html and f'href="{db}/advice?range=1h"' in html

    serve(fleet.repo, go)
