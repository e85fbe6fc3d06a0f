"""The UI in a real headless Chromium: log in, fleet -> server -> query, change
the range, charts drawn, no console error, hostile names shown as text.

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
from tests.web.fix_web import HOSTILE_COMMENT, HOSTILE_DB, Fleet, serving, web_config

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
