"""The DAO view (#/dao) in a real Chromium against the real server: open a proposal from the page,
vote with a signature made in the browser, see the tally move live elsewhere, the countdown, deep
links, the refusals, and the phone layout."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import expect

from tests.helpers import server_url
from tests.test_browser import browser, no_csp_violations, sign_up, until_live, watch_csp  # noqa: F401 - fixtures
from tests.test_browser_app import OVERFLOW, SMALL_TARGETS, sign_in
from tests.test_chain import account, admin_token, call

DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}

# Visible links of a view shorter than 44 px: its links are standalone targets (titles, back, actions).
SMALL_LINKS = """(panel) => [...document.querySelectorAll(`${panel} a`)].filter((node) => node.offsetParent !== null)
  .map((node) => [node.textContent.trim(), node.getBoundingClientRect().height]).filter(([, height]) => height < 44)"""


@pytest.fixture
async def contexts(browser):  # noqa: F811 - the fixture imported above
    """New browser profiles (own storage, so own users), each page checked for CSP violations at the end."""
    made = []

    async def new(viewport=DESKTOP, **options):
        context = await browser.new_context(viewport=viewport, **options)
        made.append(context)
        page = await context.new_page()
        await watch_csp(page)
        return page

    yield new
    for context in made:
        for page in context.pages:
            await no_csp_violations(page)
        await context.close()


async def test_open_a_proposal_vote_in_the_page_and_watch_the_tally_live(client, db, contexts):
    base_url = server_url(client)
    author = await contexts()
    await sign_up(author, base_url)
    await author.get_by_role("tab", name="DAO").click()
    await expect(author.locator("#tab-dao .dao-empty")).to_contain_text("No proposals yet")

    await author.get_by_role("link", name="New proposal").click()
    await expect(author.get_by_role("heading", name="New proposal")).to_be_focused()
    assert author.url.endswith("#/dao/new")
    form = author.locator("#dao-new-form")
    await form.get_by_role("button", name="Open the proposal").click()
    await expect(form.get_by_role("alert")).to_contain_text("check the fields")
    await expect(form.locator("#dao-error-title")).to_have_text("Give the proposal a title.")
    await expect(form.get_by_label("Title")).to_have_attribute("aria-invalid", "true")
    await form.get_by_label("Title").fill("Fund a block explorer")
    await form.get_by_label("Description").fill("Pay 1000 KVP for an explorer.\nPaid in two parts.")
    await form.get_by_label("Deadline").fill("2020-01-01T10:00")
    await form.get_by_role("button", name="Open the proposal").click()
    await expect(form.locator("#dao-error-deadline")).to_contain_text("at least a minute from now")
    await expect(form.locator("#dao-error-title")).to_be_empty()
    await form.get_by_label("Deadline").fill(await author.evaluate(
        "(() => { const d = new Date(Date.now() + 2 * 3600e3); d.setSeconds(0, 0);"
        " return new Date(d - d.getTimezoneOffset() * 60e3).toISOString().slice(0, 16); })()"))
    await form.get_by_role("button", name="Open the proposal").click()

    await expect(author).to_have_url(re.compile(r"#/dao/\d+$"))
    proposal_id = int(author.url.rsplit("/", 1)[1])
    page = author.locator(".dao-detail")
    await expect(page.get_by_role("heading", name="Fund a block explorer")).to_be_visible()
    await expect(page.locator(".dao-description")).to_have_text("Pay 1000 KVP for an explorer.\nPaid in two parts.")
    timer = page.get_by_role("timer")
    await expect(timer).to_have_text(re.compile(r"closes in (1\sh\s59\smin|2\sh\s0\smin)\s\d+\ss"))
    first = await timer.text_content()
    await expect(timer).not_to_have_text(first)  # it ticks
    assert await page.locator("time[datetime]").count() == 1
    await expect(page.locator(".dao-total")).to_have_text("0 votes cast")
    stored = await db.fetchrow("SELECT title, deadline FROM proposals WHERE proposal_id = $1", proposal_id)
    assert stored["title"] == "Fund a block explorer"

    # Another member follows the proposal through a deep link, which survives a reload.
    watcher = await contexts()
    await sign_up(watcher, base_url)
    await watcher.goto(f"{base_url}/#/dao/{proposal_id}")
    await watcher.reload()
    other = watcher.locator(".dao-detail")
    await expect(other.get_by_role("heading", name="Fund a block explorer")).to_be_visible()
    await expect(watcher.get_by_role("tab", name="DAO")).to_have_attribute("aria-selected", "true")
    await until_live(watcher, "/chain", f"dao:{proposal_id}")

    # The author votes: the page makes the key, registers the wallet and signs the vote.
    await page.get_by_role("button", name="Vote Yes").click()
    await expect(page.get_by_role("status").filter(has_text="signed and counted")).to_be_visible()
    await expect(page.locator(".dao-voted")).to_contain_text("You voted Yes")
    await expect(page.get_by_role("button", name="Vote No")).to_have_count(0)
    yes_count = other.locator('.dao-bar-row[data-choice="yes"] .dao-bar-count')
    await expect(yes_count).to_contain_text("1 (100%)", timeout=10_000)
    await expect(other.locator(".dao-total")).to_have_text("1 vote cast")
    vote = await db.fetchrow("SELECT vote_option, voter_wallet FROM votes WHERE proposal_id = $1", proposal_id)
    assert vote["vote_option"] == "Yes"

    # The watcher votes No from the list's link; the author's open page follows.
    await watcher.get_by_role("link", name="← All proposals").click()
    row = watcher.locator(f'#proposals [data-key="{proposal_id}"]')
    await expect(row).to_contain_text("Yes 1 · No 0 · Abstain 0")
    await row.get_by_role("link", name="Fund a block explorer").click()
    await other.get_by_role("button", name="Vote No").click()
    await expect(other.locator(".dao-voted")).to_contain_text("You voted No")
    no_count = page.locator('.dao-bar-row[data-choice="no"] .dao-bar-count')
    await expect(no_count).to_contain_text("1 (50%)", timeout=10_000)
    await expect(page.locator(".dao-votes summary")).to_have_text("Signed votes (2)", timeout=10_000)

    # An administrator closes it: both pages show the result without a reload.
    admin = await admin_token(client, db)
    status, body = await call(client, "POST", f"/api/v1/admin/proposals/{proposal_id}/close", admin)
    assert status == 200, body
    await expect(page.locator(".dao-result")).to_contain_text("Rejected", timeout=10_000)
    await expect(other.locator(".dao-badge")).to_have_text("Closed · Rejected")
    await expect(page.get_by_role("timer")).to_have_count(0)


async def test_a_vote_from_a_browser_without_the_key_is_refused_clearly(client, db, contexts):
    base_url = server_url(client)
    member = await account(client)  # a wallet registered from Python: its key is not in any browser
    status, body = await call(client, "POST", "/api/v1/proposals", member.token, json={
        "title": "Lower the fee", "description": "From 2% to 1%.", "duration_seconds": 3600})
    assert status == 201, body
    proposal_id = body["data"]["id"]
    tab = await contexts()
    await sign_in(tab, base_url, member.username, "correct horse battery")
    await tab.goto(f"{base_url}/#/dao/{proposal_id}")
    detail = tab.locator(".dao-detail")
    await expect(detail.get_by_role("heading", name="Lower the fee")).to_be_visible()
    await expect(detail).to_contain_text("opened by you")
    await detail.get_by_role("button", name="Vote Abstain").click()
    await expect(detail.get_by_role("alert")).to_contain_text("this browser cannot sign it")
    await expect(detail.get_by_role("alert")).to_contain_text("restore it from your backup file")
    assert await db.fetchval("SELECT count(*) FROM votes") == 0

    # A deep link to a proposal that does not exist says so.
    await tab.goto(f"{base_url}/#/dao/999999")
    await expect(tab.locator(".dao-detail").get_by_role("alert")).to_have_text("There is no proposal #999999.")


@pytest.mark.parametrize("width", [360, 390])
async def test_the_dao_view_fits_a_phone(client, contexts, width):
    base_url = server_url(client)
    member = await account(client)
    status, body = await call(client, "POST", "/api/v1/proposals", member.token, json={
        "title": "A rather long proposal title that has to wrap on a small phone screen " * 2,
        "description": "kvp1" + "ab" * 60, "duration_seconds": 86400 * 3})
    assert status == 201, body
    proposal_id = body["data"]["id"]
    phone = await contexts({"width": width, "height": PHONE["height"]}, is_mobile=True, has_touch=True)
    await sign_up(phone, base_url)
    await phone.get_by_role("tab", name="DAO").click()
    await expect(phone.locator(f'#proposals [data-key="{proposal_id}"]')).to_contain_text("closes in 2 d")
    assert await phone.evaluate(OVERFLOW) <= 0
    assert await phone.evaluate(SMALL_TARGETS) == []
    assert await phone.evaluate(SMALL_LINKS, "#tab-dao") == []
    await phone.locator(f'#proposals [data-key="{proposal_id}"] a').click()
    await expect(phone.get_by_role("timer")).to_contain_text("closes in")
    await phone.locator(".dao-votes summary").click()
    assert await phone.evaluate(OVERFLOW) <= 0
    assert await phone.evaluate(SMALL_TARGETS) == []
    assert await phone.evaluate(SMALL_LINKS, "#tab-dao") == []
    await phone.goto(f"{base_url}/#/dao/new")
    await expect(phone.get_by_role("heading", name="New proposal")).to_be_visible()
    assert await phone.evaluate(OVERFLOW) <= 0
    assert await phone.evaluate(SMALL_TARGETS) == []
