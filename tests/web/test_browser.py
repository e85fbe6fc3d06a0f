"""The UI in a real headless Chromium: log in, fleet -> server -> query, change
the range, charts drawn, no console error, hostile names shown as text; the
period comparison, a generic plan, pg_stat_kcache's charts and index advice.

Screenshots go to test-artifacts/web/.  Needs Debian's chromium (installed by
``make venv`` as root) and Playwright for Python; never downloads a browser.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pgfleet.web.render import tilde_encode
from tests.advice.fix_advice import Shop
from tests.web.fix_web import (
    HOSTILE_BACKUP,
    HOSTILE_COMMENT,
    HOSTILE_DB,
    Fleet,
    record_backups,
    serving,
    web_config,
    web_roles,
)

if TYPE_CHECKING:  # imported when the tests run, if it is installed (see `browser`)
    from playwright.sync_api import Browser, Page

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: run `make venv` as root"
)


@pytest.fixture
def browser() -> Iterator[Browser]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _charts_drawn(page: Page) -> int:
    # Not wait_for_function: it evaluates a string, which our CSP forbids.
    page.wait_for_selector("body[data-charts-drawn]", state="attached", timeout=20000)
    return int(page.get_attribute("body", "data-charts-drawn") or 0)


def _series_drawn(page: Page, selector: str) -> bool:
    """Whether the chart's canvas has pixels of its first series' colour (#2f6fdf)."""
    canvas = page.query_selector(f"{selector} canvas")
    assert canvas is not None, f"no canvas in {selector}"
    return bool(
        canvas.evaluate(
            """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                      for (let i = 0; i < d.length; i += 4)
                        if (Math.abs(d[i] - 47) < 12 && Math.abs(d[i + 1] - 111) < 12
                            && Math.abs(d[i + 2] - 223) < 12 && d[i + 3] > 200) return true;
                      return false; }"""
        )
    )


def _colour_drawn(page: Page, selector: str, rgb: tuple[int, int, int]) -> bool:
    """Whether the chart's canvas has opaque pixels of colour ``rgb`` (give or take a little)."""
    canvas = page.query_selector(f"{selector} canvas")
    assert canvas is not None, f"no canvas in {selector}"
    return bool(
        canvas.evaluate(
            """(c, rgb) => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                      for (let i = 0; i < d.length; i += 4)
                        if (Math.abs(d[i] - rgb[0]) < 12 && Math.abs(d[i + 1] - rgb[1]) < 12
                            && Math.abs(d[i + 2] - rgb[2]) < 12 && d[i + 3] > 200) return true;
                      return false; }""",
            list(rgb),
        )
    )


def _snapshot_span(fleet: Fleet) -> str:
    """A range around the fixture's snapshots, taken a second apart."""
    from tests.fix_repository import connect, one_row

    with connect(fleet.repo) as conn:
        lo, hi = one_row(
            conn,
            "SELECT extract(epoch FROM min(ts))::int - 5, extract(epoch FROM max(ts))::int + 5"
            " FROM pgfleet.pg_stat_statements_rollup WHERE srvid = %s",
            (fleet.srvid,),
        )
    return f"from={lo}&to={hi}"


def test_walk_the_ui(fleet: Fleet, browser: Browser) -> None:
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    problems: list[str] = []
    with serving(web_config(fleet.repo)) as base:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))

        # Log in as a pgfleet_read role; land on the fleet.
        page.goto(f"{base}/server/{fleet.srvid}")
        assert "/login" in page.url
        page.fill("input[name=username]", fleet.reader[0])
        page.fill("input[name=password]", fleet.reader[1])
        page.click("form[action='/login'] button")
        page.wait_for_url(f"**/server/{fleet.srvid}")
        page.goto(f"{base}/fleet")
        assert _charts_drawn(page) >= 1  # sparklines
        page.screenshot(path=str(ARTIFACTS / "fleet.png"), full_page=True)

        # Fleet -> server, then zoomed on the snapshots (a second apart).
        page.click("table#fleet a:text('mon')")
        page.wait_for_url(f"**/server/{fleet.srvid}?*")
        assert _charts_drawn(page) >= 6
        page.goto(f"{base}/server/{fleet.srvid}?{_snapshot_span(fleet)}")
        assert _charts_drawn(page) >= 6
        for chart in ("load", "rows", "blocks", "xacts", "sessions"):
            assert _series_drawn(page, f"[data-chart={chart}]"), chart
        assert HOSTILE_DB in page.inner_text("main")  # shown, as text
        page.screenshot(path=str(ARTIFACTS / "server.png"), full_page=True)

        # Another range, from the picker.
        page.click("form.range a:text('last 6h')")
        page.wait_for_url("**range=6h")
        assert _charts_drawn(page) >= 6
        assert page.inner_text("form.range a.current") == "last 6h"
        page.goto(f"{base}/server/{fleet.srvid}?{_snapshot_span(fleet)}")

        # Server -> query (over the snapshots' span).
        page.click("td.query a:has-text('FROM work WHERE id <')")
        page.wait_for_url(f"**/server/{fleet.srvid}/query/**")
        assert _charts_drawn(page) >= 1
        assert _series_drawn(page, "[data-chart=calls]")
        assert page.inner_text("#query-text").strip()
        page.screenshot(path=str(ARTIFACTS / "query.png"), full_page=True)

        # The hostile query text and database name, as text.
        from tests.web.test_app import hostile_query

        queryid, datname = hostile_query(fleet)
        page.goto(f"{base}/server/{fleet.srvid}/query/{queryid}?db={datname}")
        assert HOSTILE_COMMENT in page.inner_text("#query-text")
        page.goto(f"{base}/server/{fleet.srvid}/database/{tilde_encode(HOSTILE_DB)}")
        assert HOSTILE_DB in page.inner_text("h1")
        _charts_drawn(page)
        page.screenshot(path=str(ARTIFACTS / "hostile_database.png"), full_page=True)
        assert page.evaluate("window.__pwned") is None

        page.goto(f"{base}/collector")
        page.screenshot(path=str(ARTIFACTS / "collector.png"), full_page=True)
        assert "Snapshot now" not in page.inner_text("main")  # not an admin

    assert problems == []


def _watch(page: Page) -> list[str]:
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems


def _log_in(page: Page, base: str, user: tuple[str, str], then: str) -> None:
    page.goto(f"{base}{then}")
    page.fill("input[name=username]", user[0])
    page.fill("input[name=password]", user[1])
    page.click("form[action='/login'] button")
    page.wait_for_url(f"**{then.split('?')[0]}*")


def test_compare_periods_and_plans(fleet: Fleet, browser: Browser) -> None:
    """From the server page to the period comparison, and a generic plan
    asked for on a query page (PostgreSQL 18)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with serving(web_config(fleet.repo)) as base:
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        problems = _watch(page)
        span = _snapshot_span(fleet)
        _log_in(page, base, fleet.reader, f"/server/{fleet.srvid}?{span}")

        # Server -> compare: the snapshots' span against the minute before.
        page.click("#tools a:text('Compare periods')")
        page.wait_for_url(f"**/server/{fleet.srvid}/compare?*")
        rows = page.query_selector_all("#compare-statements tbody tr[data-kind]")
        assert rows and {r.get_attribute("data-kind") for r in rows} == {"new"}
        assert "FROM work WHERE id <" in page.inner_text("#compare-statements")
        page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
        # The form: A as the same period a day before.
        page.select_option("select[name=against]", "1d")
        page.click("#compare-form button")
        page.wait_for_url("**against=1d*")
        assert page.input_value("select[name=against]") == "1d"

        # A query -> its generic plan.
        page.goto(f"{base}/server/{fleet.srvid}?{span}")
        page.click("td.query a:has-text('FROM work WHERE id <')")
        page.wait_for_url(f"**/server/{fleet.srvid}/query/**")
        page.click("#explain-form button")
        page.wait_for_selector("#plan-text", timeout=30000)
        assert "work" in page.inner_text("#plan-text")
        assert "cost=" in page.inner_text("#plan-text")
        page.screenshot(path=str(ARTIFACTS / "query_plan.png"), full_page=True)
        assert page.evaluate("window.__pwned") is None
    assert problems == []


def test_kcache_and_index_advice(shop: Shop, browser: Browser) -> None:
    """pg_stat_kcache's charts and tables, then index advice asked for on a
    database of PostgreSQL 15 (pg_qualstats, hypopg): the page follows the
    run until the suggestions show."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    reader, _ = web_roles(shop.repo, shop.cluster.port)
    span = f"from={shop.start.timestamp() - 5:.0f}&to={shop.end.timestamp() + 5:.0f}"
    srv = f"/server/{shop.server.srvid}"
    with serving(web_config(shop.repo)) as base:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        problems = _watch(page)
        _log_in(page, base, reader, f"{srv}?{span}")
        assert _charts_drawn(page) >= 6
        assert page.query_selector("[data-chart=cpu] canvas") is not None
        assert page.query_selector("[data-chart=os_io]") is not None  # reads may be none
        assert page.query_selector_all("#kcache-queries tbody tr td.query")
        page.screenshot(path=str(ARTIFACTS / "server_kcache.png"), full_page=True)

        page.goto(f"{base}{srv}/database/{tilde_encode(shop.dbname)}?{span}")
        assert _charts_drawn(page) >= 6
        assert page.query_selector("[data-chart=cpu] canvas") is not None
        page.click("#tools a:text('Index advice')")
        page.wait_for_url("**/advice?*")
        assert page.query_selector("#advice-none") is not None  # nothing ran on load
        page.click("#advice-form button")
        # The page polls its JSON twin, and reloads once the run is over.
        page.wait_for_selector("#advice-done", timeout=120000)
        suggested = page.inner_text(".status-suggested code.ddl")
        assert suggested.startswith("CREATE INDEX ON public.orders USING btree")
        covered = [e.inner_text() for e in page.query_selector_all(".status-covered")]
        assert any("orders_status" in c for c in covered)
        assert all("Covered by" in c for c in covered)
        assert "gin" in page.inner_text(".status-unverified")
        page.screenshot(path=str(ARTIFACTS / "advice.png"), full_page=True)

        # A statement it helps -> its page: CPU figures, and no plan before 16.
        page.click(".status-suggested table.queries td.query a")
        page.wait_for_url(f"**{srv}/query/**")
        assert "Over the range: CPU" in page.inner_text("#kcache-totals")
        assert "PostgreSQL 16 or later" in page.inner_text("#plan-unavailable")
        page.screenshot(path=str(ARTIFACTS / "query_kcache.png"), full_page=True)
    assert problems == []


# The marks' colours in pgfleet.js (BACKUP_COLORS).
VALID, INVALID, IN_PROGRESS = (0, 166, 81), (200, 16, 46), (240, 165, 0)


def test_server_page_backups(fleet: Fleet, browser: Browser) -> None:
    """The server page's backups: the table, newest first, hostile texts as
    text; each backup marked on the charts from its start to its end,
    coloured by state."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    span = _snapshot_span(fleet)
    with serving(web_config(fleet.repo)) as base:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        problems = _watch(page)
        _log_in(page, base, fleet.reader, f"/server/{fleet.srvid}?{span}")
        assert _charts_drawn(page) >= 6
        assert "No backups recorded for this server." in page.inner_text("#backups")
        assert page.get_attribute("body", "data-backups-marked") == "0"
        assert not _colour_drawn(page, "[data-chart=load]", VALID)

        made = record_backups(fleet)
        page.goto(f"{base}/server/{fleet.srvid}?{span}")
        assert _charts_drawn(page) >= 6
        rows = page.query_selector_all("#backups tbody tr")
        assert [r.inner_text().split()[0] for r in rows] == [b.id for b in reversed(made)]
        text = page.inner_text("#backups")
        assert text.count(HOSTILE_BACKUP) == 2  # the label and the error, as text
        assert "in_progress" in text and "running" in text and "incremental" in text
        assert page.get_attribute("body", "data-backups-marked") == "3"
        for chart in ("load", "xacts"):
            for colour in (VALID, INVALID, IN_PROGRESS):
                assert _colour_drawn(page, f"[data-chart={chart}]", colour), (chart, colour)
        page.screenshot(path=str(ARTIFACTS / "server_backups.png"), full_page=True)
        # Close-ups: a chart's marks, and the table.
        page.locator("[data-chart=load]").screenshot(path=str(ARTIFACTS / "backups_chart.png"))
        page.locator("#backups").screenshot(path=str(ARTIFACTS / "backups_table.png"))
        assert page.evaluate("window.__pwned") is None

        # A range without them: nothing marked, the table still lists them all.
        page.goto(f"{base}/server/{fleet.srvid}?from=1700000000&to=1700003600")
        _charts_drawn(page)
        assert page.get_attribute("body", "data-backups-marked") == "0"
        assert len(page.query_selector_all("#backups tbody tr.backup")) == 3
    assert problems == []
