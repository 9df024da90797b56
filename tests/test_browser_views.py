"""Every view of the page at once (issue 17): axe-core scans, and a purchase by each demo user from a fresh browser."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from playwright.async_api import expect

from server.app import create_app
from server.core.crypto import MASTER_KEY
from server.services.demo import DEMO_PASSWORD, load_if_empty
from tests.helpers import server_url
from tests.test_browser import browser, no_csp_violations, watch_csp  # noqa: F401 - fixtures
from tests.test_browser_app import OVERFLOW, VIEWS, open_buy_dialog, sign_in

AXE = Path(__file__).parent / "node" / "node_modules" / "axe-core" / "axe.min.js"
# What the scans fail on: axe's two worst impact levels (WCAG 2.1 A and AA rules, contrast included).
BLOCKING = ("serious", "critical")
RUN_AXE = """async () => {
  const rules = { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"] };
  const result = await axe.run(document, { runOnly: rules });
  return result.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help,
    nodes: v.nodes.slice(0, 3).map((n) => n.target.join(" ")) }));
}"""
DESKTOP, PHONE = (1440, 900), (390, 844)
LOADING = re.compile(r"^Loading")


class ApiRequests:
    """The page's REST requests still in flight (the socket's transport is not one of them)."""

    def __init__(self, page) -> None:
        self.pending: set = set()
        page.on("request", lambda request: self.pending.add(request) if "/api/" in request.url else None)
        page.on("requestfinished", lambda request: self.pending.discard(request))
        page.on("requestfailed", lambda request: self.pending.discard(request))

    async def settle(self, quiet: float = 0.3, timeout: float = 15.0) -> None:
        """Return once no REST request has been in flight for `quiet` seconds (a view's loads
        may start one another), failing after `timeout`."""
        give_up = time.monotonic() + timeout
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < quiet:
            assert time.monotonic() < give_up, f"still loading: {[r.url for r in self.pending]}"
            await asyncio.sleep(0.05)
            if self.pending:
                idle_since = time.monotonic()


async def view_loaded(panel, requests: ApiRequests) -> None:
    """Wait until a view has fetched what it shows: its requests answered, no "Loading…" hint left.
    (`wait_for_load_state("networkidle")` returns at once after a tab click: it only follows
    navigations, so a scan would see the view before its data.)"""
    await requests.settle()
    await expect(panel.get_by_text(LOADING)).to_have_count(0)


async def axe_violations(page) -> list[dict]:
    """The serious and critical violations axe-core finds in the page as it is now."""
    if not await page.evaluate("typeof axe !== 'undefined'"):
        await page.add_script_tag(path=str(AXE))
    return [v for v in await page.evaluate(RUN_AXE) if v["impact"] in BLOCKING]


@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
async def test_every_view_passes_an_axe_scan(client, db, settings, browser, size):  # noqa: F811
    assert AXE.exists(), f"{AXE} is missing: `make test` installs tests/node"
    assert await load_if_empty(db, settings, client.app[MASTER_KEY]) is True
    # axe is injected as an inline script, which the page's CSP refuses: only this scan's context bypasses it.
    context = await browser.new_context(bypass_csp=True, viewport={"width": size[0], "height": size[1]})
    page = await context.new_page()
    requests = ApiRequests(page)
    try:
        base_url = server_url(client)
        await page.goto(base_url)  # signed out: the marketplace and the sign-in form
        await expect(page.locator("#datapods li").first).to_be_visible()
        found = {"signed out": await axe_violations(page)}
        await page.locator("#datapods li a").first.click()
        await expect(page.locator("#datapod-sample tbody tr").first).to_be_visible()
        found["DataPod page, signed out"] = await axe_violations(page)

        await sign_in(page, base_url, "alice", DEMO_PASSWORD)
        for view in VIEWS:
            await page.get_by_role("tab", name=view).click()
            panel = page.get_by_role("tabpanel", name=view)
            await expect(panel).to_be_visible()
            await view_loaded(panel, requests)
            found[view] = await axe_violations(page)
        assert {view: violations for view, violations in found.items() if violations} == {}
    finally:
        await context.close()


@pytest.mark.parametrize("buyer,seller_pod,size", [("alice", "Hourly road traffic counts", DESKTOP),
                                                   ("bob", "Token prices and volumes", PHONE),
                                                   ("carol", "Regional crop yields", PHONE)])
async def test_each_demo_user_buys_from_a_fresh_browser(aiohttp_client, db, settings, browser,  # noqa: F811
                                                       buyer, seller_pod, size):
    fast_chain = settings.replace(block_producer=True, block_interval_seconds=0.5, pow_difficulty=4,
                                  purchase_poll_interval=0.1)
    client = await aiohttp_client(create_app(fast_chain))
    assert await load_if_empty(db, fast_chain, client.app[MASTER_KEY]) is True
    # A browser that never saw this user, at desktop or phone size.
    context = await browser.new_context(accept_downloads=True, viewport={"width": size[0], "height": size[1]})
    page = await context.new_page()
    await watch_csp(page)
    failed = []  # a normal session requests nothing that is not there
    page.on("response", lambda response: failed.append(f"{response.status} {response.url}")
            if response.status == 404 else None)
    try:
        await sign_in(page, server_url(client), buyer, DEMO_PASSWORD)
        await page.get_by_role("button", name="Use the demo wallet").click()
        await expect(page.locator("#wallet-message")).to_have_text(
            "Demo wallet ready: this browser can pay from it now.", timeout=15_000)
        dialog = await open_buy_dialog(page, seller_pod)
        await dialog.get_by_role("button", name="Pay").click()
        await expect(page.get_by_role("tabpanel", name="Purchases")).to_be_visible()
        row = page.locator("#purchases li", has_text=seller_pod)
        await expect(row).to_have_attribute("data-status", "completed", timeout=20_000)
        async with page.expect_download() as info:
            await row.get_by_role("button", name="Download").click()
        assert (await (await info.value).path()).stat().st_size > 0
        assert await db.fetchval(
            "SELECT count(*) FROM purchases p JOIN users u ON u.id = p.buyer_id JOIN datapods d ON d.id = p.datapod_id "
            "WHERE u.username = $1 AND d.title = $2 AND p.status = 'completed'", buyer, seller_pod) == 1
        assert await page.evaluate(OVERFLOW) <= 0
        assert failed == []
        await no_csp_violations(page)
    finally:
        await context.close()
