"""The dashboard in a real Chromium (Debian's, driven by Playwright) against a real server."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from playwright.async_api import async_playwright, expect

from db.pool import POOL
from server.adapters.blobs import BLOBS
from server.app import create_app
from server.core.crypto import MASTER_KEY
from server.edge.security_headers import CONTENT_SECURITY_POLICY
from server.realtime.hub import REALTIME, publish
from server.services.escrow import ESCROW_ACCOUNTS
from tests.helpers import register, register_seller, server_url, wait_until
from tests.llm_server import llm_server  # noqa: F401 - a fixture

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


@pytest.fixture
async def browser():
    """Debian's Chromium, driven by Playwright."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        await browser.close()


async def _screenshot_on_failure(request, page, name: str) -> None:
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


# Collects every CSP violation the page reports, from before its first script runs.
RECORD_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.cspViolations.push(`${e.effectiveDirective} ${e.blockedURI}`));
"""


async def watch_csp(page) -> None:
    """Record the page's CSP reports: events in the page, and Chromium's console errors across reloads."""
    page.csp_console = []
    page.on("console", lambda message: page.csp_console.append(message.text)
            if "Content Security Policy" in message.text else None)
    await page.add_init_script(RECORD_VIOLATIONS)


async def no_csp_violations(page) -> None:
    """Every page of every test runs under the policy (every flow the tests drive) and breaks none of it."""
    if page.is_closed():
        return
    assert page.csp_console == []
    assert await page.evaluate("window.cspViolations ?? []") == []


@pytest.fixture
async def page(request, browser):
    """A fresh browser page; a screenshot lands in test-artifacts/ when the test fails."""
    page = await browser.new_page()
    await watch_csp(page)
    yield page
    await _screenshot_on_failure(request, page, request.node.name)
    await no_csp_violations(page)


@pytest.fixture
async def two_tabs(request, browser):
    """Two pages of one browser profile (shared storage): two tabs of one user."""
    context = await browser.new_context()
    tabs = (await context.new_page(), await context.new_page())
    for tab in tabs:
        await watch_csp(tab)
    yield tabs
    for number, tab in enumerate(tabs):
        await _screenshot_on_failure(request, tab, f"{request.node.name}-tab{number}")
    for tab in tabs:
        await no_csp_violations(tab)
    await context.close()


@pytest.fixture
async def second_page(request, browser):
    """A page in a browser context of its own (its own storage, so another signed-in user)."""
    context = await browser.new_context()
    page = await context.new_page()
    await watch_csp(page)
    yield page
    await _screenshot_on_failure(request, page, f"{request.node.name}-second")
    await no_csp_violations(page)
    await context.close()


async def sign_up(page, base_url: str, *, open_page: bool = True) -> str:
    username = f"u{uuid.uuid4().hex[:10]}"
    if open_page:
        await page.goto(base_url)
    await page.click("text=New here? Register")
    form = page.locator("#register-form")
    await form.locator("[name=username]").fill(username)
    await form.locator("[name=email]").fill(f"{username}@example.org")
    await form.locator("[name=password]").fill("correct horse battery")
    await form.locator("button").click()
    await expect(page.locator("#whoami")).to_have_text(username)
    return username


async def until_live(page, namespace: str, channel: str) -> None:
    """Wait until the page's subscription is acked: from then on nothing published is missed."""
    key = f"{namespace} {channel}"

    # Polled from here: page.wait_for_function re-checks with an in-page eval, which the page's CSP
    # refuses (a violation) whenever its first check fails.
    async def joined() -> bool:
        return await page.evaluate("(key) => window.hub?.subscriptions.get(key)?.joined === true", key)
    await wait_until(joined, timeout=10, interval=0.05)


async def test_sign_up_then_live_marketplace_and_chain_with_recovery(client, page):
    base_url = server_url(client)
    await sign_up(page, base_url)
    await expect(page.locator("#connection")).to_have_text("connected")
    await until_live(page, "/marketplace", "market")

    pod_id = str(uuid.uuid4())
    await publish(client.app, "market", "datapod_published", {
        "id": pod_id, "title": "Live weather feed", "category": "climate", "price_sui": "1.5"})
    await expect(page.locator(f'#datapods [data-key="{pod_id}"]')).to_contain_text("Live weather feed")

    await page.click("nav >> text=Explorer")
    await until_live(page, "/chain", "chain:blocks")
    await publish(client.app, "chain:blocks", "block_added", {"height": 1, "hash": "ab" * 32, "tx_count": 2})
    await expect(page.locator('#blocks [data-key="1"]')).to_contain_text("#1")

    # Drop the transport; events published meanwhile come back through the replay.
    await page.evaluate("window.hub.manager.engine.close()")
    for height in (2, 3):
        await publish(client.app, "chain:blocks", "block_added", {"height": height, "hash": "cd" * 32})
    await expect(page.locator("#connection")).to_have_text("recovered", timeout=10_000)
    await expect(page.locator('#blocks [data-key="3"]')).to_be_visible()
    assert await page.locator("#blocks li").count() == 3


async def test_the_page_sees_a_hole_in_the_offsets_and_fills_it(client, page):
    await sign_up(page, server_url(client))
    await page.click("nav >> text=Explorer")
    await until_live(page, "/chain", "chain:blocks")
    await publish(client.app, "chain:blocks", "block_added", {"height": 1, "hash": "ab" * 32})
    await expect(page.locator('#blocks [data-key="1"]')).to_be_visible()
    # Stored but never delivered live, as when a node's pub/sub link drops an event: the page
    # notices only from the next event's offset, and must fetch the missing one.
    history = client.app[REALTIME].bus.history
    await history.append("chain:blocks", "block_added", {"height": 2, "hash": "cd" * 32})
    await publish(client.app, "chain:blocks", "block_added", {"height": 3, "hash": "ef" * 32})
    await expect(page.locator('#blocks [data-key="2"]')).to_be_visible()
    await expect(page.locator('#blocks [data-key="3"]')).to_be_visible()
    # A hole with no later event: the server's history_gap notice makes the page resubscribe.
    await history.append("chain:blocks", "block_added", {"height": 4, "hash": "aa" * 32})
    await client.app[REALTIME].resync()
    await expect(page.locator('#blocks [data-key="4"]')).to_be_visible()
    assert await page.locator("#blocks li").count() == 4


async def test_market_list_misses_nothing_published_while_it_loads(client, page):
    # Hold the list's REST read until an event has been published: the page must already be
    # subscribed (it subscribes first), and the event must land in the list once it is read.
    requested, release = asyncio.Event(), asyncio.Event()

    async def hold(route):
        requested.set()
        await release.wait()
        await route.continue_()

    await page.route(re.compile(r"/api/v1/datapods\?"), hold)
    await sign_up(page, server_url(client))
    await asyncio.wait_for(requested.wait(), 10)
    await until_live(page, "/marketplace", "market")
    pod_id = str(uuid.uuid4())
    await publish(client.app, "market", "datapod_published", {
        "id": pod_id, "title": "Published during the read", "category": "climate", "price_sui": "2"})
    release.set()
    await expect(page.locator(f'#datapods [data-key="{pod_id}"]')).to_contain_text(
        "Published during the read")


async def test_live_feeds_keep_the_newest_hundred(client, page):
    await sign_up(page, server_url(client))
    await page.click("nav >> text=Explorer")
    await until_live(page, "/chain", "chain:blocks")
    for height in range(1, 106):
        await publish(client.app, "chain:blocks", "block_added", {"height": height, "hash": "ef" * 32})
    await expect(page.locator('#blocks [data-key="105"]')).to_be_visible()
    assert await page.locator("#blocks li").count() == 100
    # The oldest went: the list holds blocks 6 to 105, newest first.
    assert await page.locator("#blocks li").first.get_attribute("data-key") == "105"
    assert await page.locator("#blocks li").last.get_attribute("data-key") == "6"


async def test_wrong_password_shows_the_error(client, page):
    await page.goto(server_url(client))
    await page.fill("#login-form [name=login]", "nobody")
    await page.fill("#login-form [name=password]", "wrong password")
    await page.click("#login-form button")
    await expect(page.locator("#sign-in-error")).to_have_text("wrong username or password")


async def test_assistant_answers_in_the_page_and_the_answer_survives_a_reload(client, page):
    await sign_up(page, server_url(client))
    await page.click("nav >> text=Assistant")
    await page.fill("#chat-form textarea", "Any weather data?")
    await page.click("#chat-form button[type=submit]")
    # No OPENAI_BASE_URL in the tests' settings: the retrieval-only assistant streams the answer.
    answer = page.locator("#messages .message.assistant").last
    await expect(answer).to_contain_text("Retrieval-only", timeout=15_000)
    await expect(answer).to_have_attribute("data-status", "complete", timeout=15_000)
    text = await answer.locator(".text").inner_text()
    await page.reload()
    await page.click("nav >> text=Assistant")
    await expect(page.locator("#messages .message.user")).to_contain_text("Any weather data?")
    assert await page.locator("#messages .message.assistant .text").last.inner_text() == text


async def test_a_first_buy_while_the_wallet_still_loads_keeps_the_key_it_made(client, db, page):
    from tests.test_chain import account
    from tests.test_purchases import make_pod

    seller = await account(client)
    pod_id = await make_pod(db, client.app[BLOBS], client.app[MASTER_KEY], seller.id, title="Race weather")
    signed_up: dict[str, str] = {}
    held = asyncio.Event()

    # The page's first read of the account's wallet is held until the Buy below has registered one
    # (the race a fast click hits at sign-in), or 3 s when the page rightly waits for that read first.
    async def hold_first_wallet_read(route):
        if route.request.method != "GET" or held.is_set():
            await route.continue_()
            return
        held.set()
        for _ in range(60):
            if signed_up and await db.fetchval(
                    "SELECT wallet_address IS NOT NULL FROM users WHERE username = $1", signed_up["username"]):
                break
            await asyncio.sleep(0.05)
        await route.continue_()

    await page.route("**/api/v1/me/wallet", hold_first_wallet_read)
    signed_up["username"] = await sign_up(page, server_url(client))
    await asyncio.wait_for(held.wait(), 10)
    card = page.locator(f'#datapods [data-key="{pod_id}"]')
    await card.get_by_role("button", name="Buy Race weather").click()
    await expect(card.locator(".error")).to_contain_text("Insufficient funds", timeout=10_000)

    # The key made for that Buy is still this browser's: it can take demo funds and pay.
    await page.click("nav >> text=Purchases")
    await expect(page.locator("#wallet-key-state")).to_have_text("This browser holds your wallet key: it can pay.")
    await page.get_by_role("button", name="Get demo funds").click()
    await expect(page.locator("#wallet-message")).to_have_text("Received 10.00000000 demo KVP.")


async def test_buy_a_datapod_follow_its_progress_and_download_the_dataset(aiohttp_client, settings, db, page):
    from tests.test_chain import account
    from tests.test_purchases import DATASET, make_pod

    # The real chain: a block producer seals the signed payment, the purchase job verifies it.
    client = await aiohttp_client(create_app(settings.replace(
        block_producer=True, block_interval_seconds=0.5, pow_difficulty=4, purchase_poll_interval=0.1)))
    seller = await account(client)
    pod_id = await make_pod(db, client.app[BLOBS], client.app[MASTER_KEY], seller.id, title="Browser weather")
    username = await sign_up(page, server_url(client))
    buyer_id = await db.fetchval("SELECT id FROM users WHERE username = $1", username)
    card = page.locator(f'#datapods [data-key="{pod_id}"]')
    await expect(card).to_contain_text("Browser weather")

    # A new wallet holds nothing: the payment is refused and the page says why.
    await card.get_by_role("button", name="Buy Browser weather").click()
    await expect(card.locator(".error")).to_contain_text("Insufficient funds", timeout=10_000)
    assert await db.fetchval("SELECT count(*) FROM purchases") == 0

    await page.click("nav >> text=Purchases")
    wallet = await db.fetchval("SELECT wallet_address FROM users WHERE id = $1", buyer_id)
    await expect(page.locator("#wallet-address")).to_have_text(wallet)
    await page.get_by_role("button", name="Get demo funds").click()
    await expect(page.locator("#wallet-message")).to_have_text("Received 10.00000000 demo KVP.")
    await expect(page.locator("#wallet-balance")).to_have_text("10.00000000")

    await until_live(page, "/purchases", f"user:{buyer_id}")
    await page.click("nav >> text=Marketplace")
    await card.get_by_role("button", name="Buy Browser weather").click()
    # Nothing is spent before the buyer confirms the amount, the currency and the escrow.
    dialog = page.get_by_role("dialog", name="Confirm your purchase")
    await expect(dialog).to_contain_text("Pay 1.50000000 KVP")
    await expect(dialog).to_contain_text("escrow")
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE sender = $1", wallet) == 0
    # Every text a purchase row showed, kept as it appears: the waiting step may last less than a poll.
    await page.evaluate("""() => {
        window.rowTexts = [];
        new MutationObserver(() => window.rowTexts.push(document.querySelector("#purchases")?.textContent ?? ""))
            .observe(document.querySelector("#purchases"), {subtree: true, childList: true, characterData: true});
    }""")
    await dialog.get_by_role("button", name="Pay").click()
    row = page.locator("#purchases li").first
    await expect(row).to_contain_text("Browser weather", timeout=10_000)
    await expect(row).to_have_attribute("data-status", "completed", timeout=20_000)
    await expect(row.locator("progress")).to_have_attribute("value", "100")
    await expect(row).to_contain_text("100%")
    steps = (await row.get_attribute("data-steps")).split()
    assert steps == ["payment_pending", "payment_verifying", "payment_verified", "key_wrapping", "escrow_holding",
                     "completed"], steps

    async with page.expect_download() as info:
        await row.get_by_role("button", name="Download").click()
    download = await info.value
    assert download.suggested_filename == "Browser-weather.csv"
    assert Path(await download.path()).read_bytes() == DATASET

    await expect(row.locator(".wait")).to_have_count(0)
    # While the payment waited for its block the row said so, with the chain's block interval.
    assert any("sealed in a block (the chain seals one every 0.5 s)" in text
               for text in await page.evaluate("window.rowTexts"))
    payment_hash = await db.fetchval("SELECT payment_tx_digest FROM purchases WHERE buyer_id = $1", buyer_id)
    await expect(row.get_by_role("link", name=f"{payment_hash[:12]}…")).to_have_attribute(
        "href", f"#/chain/tx/{payment_hash}")
    # The pod is the buyer's now: "Owned · Download" on its card instead of a second Buy.
    await page.click("nav >> text=Marketplace")
    await expect(card.locator(".owned")).to_have_text("Owned")
    await expect(card.get_by_role("button", name="Buy Browser weather")).to_have_count(0)
    await expect(card.get_by_role("button", name="Download Browser weather")).to_be_visible()
    await page.click("nav >> text=Purchases")

    # What the page paid is what the server verified: one confirmed transfer, buyer to the escrow wallet.
    paid = await db.fetchrow("SELECT t.sender, t.receiver, t.amount, t.status FROM purchases p "
                             "JOIN transactions t ON t.transaction_hash = p.payment_tx_digest WHERE p.buyer_id = $1",
                             buyer_id)
    assert dict(paid) == {"sender": wallet, "receiver": client.app[ESCROW_ACCOUNTS].escrow.address,
                          "amount": Decimal("1.5"),
                          "status": "confirmed"}
    assert await db.fetchval("SELECT total_balance FROM users WHERE id = $1", buyer_id) == Decimal("8.5")

    # The escrow is shown with the buyer's actions; confirming receipt releases it to the seller.
    await expect(row.locator(".escrow")).to_contain_text("held in escrow")
    await row.get_by_role("button", name="Confirm receipt").click()
    await expect(row.locator(".escrow")).to_have_attribute("data-escrow-status", "released", timeout=10_000)
    assert await db.fetchval("SELECT status FROM escrow_transactions") == "released"


async def test_assistant_answer_survives_a_reload_mid_stream(aiohttp_client, settings, page,
                                                             llm_server):  # noqa: F811
    from tests.test_assistant import slow_model

    # The real model behind a proxy that paces its stream, so the reload lands mid-answer.
    proxy, server = await slow_model(llm_server, delay=0.08)
    try:
        client = await aiohttp_client(create_app(settings.replace(
            openai_base_url=str(server.make_url("/v1")), ai_model="stories260K", ai_max_output_tokens=300,
            ai_context_tokens=1500, ai_max_tool_rounds=0)))
        await sign_up(page, server_url(client))
        await page.click("nav >> text=Assistant")
        await page.fill("#chat-form textarea", "Once upon a time there was a dog.")
        await page.click("#chat-form button[type=submit]")
        answer = page.locator("#messages .message.assistant").last
        await expect(answer.locator(".text")).not_to_be_empty(timeout=20_000)
        message_id = uuid.UUID((await answer.get_attribute("id")).removeprefix("m-"))
        # The answer shows as rendered markdown; its source text is what the stream delivered.
        shown = await answer.locator(".text").evaluate("node => node.markdownSource")

        await page.reload()
        async with client.app[POOL].acquire() as conn:
            still = await conn.fetchval("SELECT status FROM ai_messages WHERE id = $1", message_id)
        assert still == "streaming", "the reload came after the answer had ended"
        await page.click("nav >> text=Assistant")
        answer = page.locator(f"#m-{message_id}")
        await expect(answer).to_have_attribute("data-status", "complete", timeout=30_000)
        async with client.app[POOL].acquire() as conn:
            saved = await conn.fetchrow("SELECT content, status FROM ai_messages WHERE id = $1", message_id)
        final = await answer.locator(".text").evaluate("node => node.markdownSource")
        assert saved["status"] == "complete"
        assert final == saved["content"]                 # nothing lost, nothing doubled
        assert final.startswith(shown) and len(final) > len(shown)
        await expect(page.locator("#messages .message.user")).to_have_count(1)
        await expect(page.locator("#messages .message.assistant")).to_have_count(1)
    finally:
        await server.close()


async def test_games_tab_shows_rewards_and_the_leaderboard_live(client, db, sockets, page):
    from tests.test_games import create_game, game_server, make_admin, player, reward, start

    await db.execute("INSERT INTO reward_pools (pool_name, total_tokens) VALUES ('gaming', 1000)")  # rewards draw on it
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin)
    await sign_up(page, server_url(client))
    await page.click("nav >> text=Games")
    await expect(page.locator(f'#games [data-key="{game["game_id"]}"]')).to_contain_text("Block Runner")
    await until_live(page, "/games", f"game:{game['game_id']}")
    gamer, sock = await player(client, sockets)
    session_id = await start(sock, game["game_id"])
    server = await game_server(client, sockets, token)
    assert (await reward(server, session_id, 1, "12.5"))["ok"] is True
    await expect(page.locator("#game-rewards li")).to_contain_text("12.5", timeout=10_000)
    board = page.locator(f'#games [data-key="{game["game_id"]}"] .leaderboard li')
    await expect(board.first).to_contain_text(gamer["user"]["username"], timeout=10_000)


async def test_dao_tab_shows_live_tallies(client, page):
    from tests.test_chain import account
    from tests.test_dao import proposal, rest_vote, vote_body

    alice = await account(client)
    proposal_id = (await proposal(client, alice, title="Fund the explorer"))["id"]
    await sign_up(page, server_url(client))
    await page.click("nav >> text=DAO")
    row = page.locator(f'#proposals [data-key="{proposal_id}"]')
    await expect(row).to_contain_text("Fund the explorer")
    await expect(row).to_contain_text("Yes 0")
    await until_live(page, "/chain", f"dao:{proposal_id}")
    assert (await rest_vote(client, alice, proposal_id, vote_body(alice.wallet, proposal_id, "Yes")))[0] == 201
    await expect(row).to_contain_text("Yes 1", timeout=10_000)


# --- the DataPod page -----------------------------------------------------------------------------

async def published_pod(client) -> tuple[dict, dict]:
    """A verified seller and their uploaded, published DataPod (the CSV test dataset: schema and sample)."""
    from tests.test_marketplace import auth, upload

    seller = await register_seller(client)
    pod = await upload(client, seller)
    response = await client.post(f"/api/v1/datapods/{pod['id']}/publish", headers=auth(seller))
    assert response.status == 200, await response.text()
    return seller, pod


async def bought(client, db, buyer: dict, seller: dict, pod: dict) -> str:
    """A completed purchase of the pod by the buyer, through the real API and purchase job."""
    from tests.test_purchases import buy

    return await buy(client, db, buyer, uuid.UUID(buyer["user"]["id"]), uuid.UUID(seller["user"]["id"]),
                     uuid.UUID(pod["id"]))


async def review(client, buyer: dict, purchase_id: str, rating: int, comment: str) -> dict:
    response = await client.post(f"/api/v1/purchases/{purchase_id}/review", json={"rating": rating, "comment": comment},
                                 headers={"Authorization": f"Bearer {buyer['token']}"})
    body = await response.json()
    assert response.status == 201, body
    return body["data"]


async def test_datapod_page_shows_the_dataset_and_counts_viewers_live(client, page, second_page):
    seller, pod = await published_pod(client)
    base_url = server_url(client)
    await sign_up(page, base_url)
    card = page.locator(f'#datapods [data-key="{pod["id"]}"]')
    # The Buy button comes with the signed-in list.
    await expect(card.get_by_role("button", name="Buy City weather")).to_be_visible()
    await card.get_by_role("link", name="City weather").click()

    view = page.locator("#datapod-view")
    await expect(view.get_by_role("heading", name="City weather", level=2)).to_be_visible()
    assert page.url.endswith(f"#/datapods/{pod['id']}")
    await expect(page.locator("#market-list")).to_be_hidden()
    await expect(page.locator("#datapod-description")).to_have_text("Daily weather for two cities")
    await expect(page.locator("#datapod-category")).to_have_text("climate")
    await expect(page.locator("#datapod-price")).to_have_text("1.5 SUI")
    await expect(page.locator("#datapod-seller")).to_have_text(f"{seller['user']['username']} · no seller rating yet")
    await expect(page.locator("#datapod-size")).to_have_text(re.compile(r"^\d+(\.\d)? (bytes|kB)$"))
    await expect(page.locator("#datapod-licence")).to_contain_text("may not resell")
    await expect(page.locator("#datapod-rating")).to_have_text("No reviews yet")
    await expect(page.locator("#datapod-sold")).to_have_text("0")
    await expect(page.locator("#datapod-rows")).to_have_text("25 rows, 5 columns (csv)")
    schema = page.locator("#datapod-schema tbody tr")
    await expect(schema).to_have_count(5)
    await expect(schema.nth(2)).to_have_text("temp_cnumber1")
    await expect(page.locator("#datapod-sample thead th")).to_have_text(["date", "city", "temp_c", "rainy", "note"])
    sample = page.locator("#datapod-sample tbody tr")
    await expect(sample).to_have_count(10)
    await expect(sample.first.locator("td")).to_have_text(["2026-10-01", "Lima", "1.5", "true", "a, b"])
    await expect(page.locator("#datapod-viewers")).to_have_text("1 viewing")

    # A second user opens the same page by its address: both count two viewers.
    await sign_up(second_page, base_url)
    await second_page.goto(f"{base_url}/#datapod/{pod['id']}")
    await expect(second_page.get_by_role("heading", name="City weather", level=2)).to_be_visible()
    await expect(second_page.locator("#datapod-viewers")).to_have_text("2 viewing")
    await expect(page.locator("#datapod-viewers")).to_have_text("2 viewing")

    # Going back leaves the channel: the other page drops to one viewer.
    await page.get_by_role("button", name="← Back to the marketplace").click()
    await expect(page.locator("#market-list")).to_be_visible()
    await expect(view).to_be_hidden()
    await expect(second_page.locator("#datapod-viewers")).to_have_text("1 viewing")

    # A reload on the detail route reopens the same DataPod (and still counts one viewer).
    await second_page.reload()
    await expect(second_page.get_by_role("heading", name="City weather", level=2)).to_be_visible()
    await expect(second_page.locator("#datapod-sample tbody tr")).to_have_count(10)
    await expect(second_page.locator("#datapod-viewers")).to_have_text("1 viewing")
    await until_live(second_page, "/marketplace", f"datapod:{pod['id']}")


async def test_signing_in_keeps_the_cards_on_screen_so_a_click_in_flight_lands(client, page):
    _, pod = await published_pod(client)
    base_url = server_url(client)
    await page.goto(base_url)
    card = page.locator(f'#datapods [data-key="{pod["id"]}"]')
    await expect(card.get_by_role("link", name="City weather")).to_be_visible()
    await expect(card.get_by_role("button")).to_have_count(0)  # a visitor gets no Buy
    await page.evaluate("(key) => { window.signedOutCard = document.querySelector(`#datapods [data-key='${key}']`); }",
                        pod["id"])
    await sign_up(page, base_url, open_page=False)
    # The signed-in list is the same card with a Buy box: a press on its link before the list came
    # back and the release after it still make a click.
    await expect(card.get_by_role("button", name="Buy City weather")).to_be_visible()
    assert await page.evaluate(
        "(key) => document.querySelector(`#datapods [data-key='${key}']`) === window.signedOutCard", pod["id"])
    # The list reloads (here, the search submitted again) between the press and the release.
    await card.get_by_role("link", name="City weather").hover()
    await page.mouse.down()
    async with (page.expect_response(lambda response: "/api/v1/datapods?" in response.url),
                page.expect_response(lambda response: "/api/v1/datapods/facets?" in response.url)):
        await page.evaluate("() => document.querySelector('#market-search').requestSubmit()")
    await page.evaluate("() => new Promise((resolve) => setTimeout(resolve, 200))")
    await page.mouse.up()
    await expect(page.locator("#datapod-view").get_by_role("heading", name="City weather", level=2)).to_be_visible()
    assert page.url.endswith(f"#/datapods/{pod['id']}")


async def test_datapod_page_suggests_more_like_this(client, page):
    from tests.test_marketplace import auth, upload

    seller, pod = await published_pod(client)
    other = await upload(client, seller, title="Monthly city weather")
    response = await client.post(f"/api/v1/datapods/{other['id']}/publish", headers=auth(seller))
    assert response.status == 200, await response.text()
    base_url = server_url(client)
    await sign_up(page, base_url)
    await page.goto(f"{base_url}/#datapod/{pod['id']}")
    similar = page.locator("#similar li")
    await expect(similar).to_have_count(1)
    await similar.get_by_role("link", name="Monthly city weather").click()
    await expect(page.get_by_role("heading", name="Monthly city weather", level=2)).to_be_visible()
    assert page.url.endswith(f"#/datapods/{other['id']}")
    await expect(page.locator("#similar li").first).to_contain_text("City weather")


async def test_sales_and_reviews_arrive_live_on_an_open_datapod_page(aiohttp_client, fast, db, page):
    client = await aiohttp_client(create_app(fast))
    seller, pod = await published_pod(client)
    base_url = server_url(client)
    await sign_up(page, base_url)
    await page.goto(f"{base_url}/#datapod/{pod['id']}")
    await expect(page.locator("#datapod-rating")).to_have_text("No reviews yet")
    await until_live(page, "/marketplace", f"datapod:{pod['id']}")

    first, second = await register(client), await register(client)
    purchase = await bought(client, db, first, seller, pod)
    await expect(page.locator("#datapod-sold")).to_have_text("1", timeout=10_000)
    await review(client, first, purchase, 4, "clean data")
    await expect(page.locator("#datapod-rating")).to_have_text("4.00 / 5 from 1 review", timeout=10_000)
    reviews = page.locator("#reviews li")
    await expect(reviews).to_have_count(1)
    await expect(reviews.first).to_contain_text(first["user"]["username"])
    await expect(reviews.first).to_contain_text("clean data")
    await expect(reviews.first.get_by_role("img", name="4 out of 5")).to_be_visible()

    purchase = await bought(client, db, second, seller, pod)
    await review(client, second, purchase, 1, "mostly empty")
    await expect(page.locator("#datapod-rating")).to_have_text("2.50 / 5 from 2 reviews", timeout=10_000)
    await expect(page.locator("#datapod-sold")).to_have_text("2")
    await expect(reviews).to_have_count(2)
    await expect(reviews.first).to_contain_text("mostly empty")   # the newest on top
    await expect(reviews.nth(1)).to_contain_text("clean data")

    # The seller's new price shows without a reload too.
    from tests.test_marketplace import auth
    response = await client.patch(f"/api/v1/datapods/{pod['id']}", json={"price_sui": "2.25"}, headers=auth(seller))
    assert response.status == 200
    await expect(page.locator("#datapod-price")).to_have_text("2.25 SUI", timeout=10_000)


async def signed_in_buyer(page, base_url: str, db) -> dict:
    """Sign up in the page; the account as the API helpers take it (token and id)."""
    username = await sign_up(page, base_url)
    return {"token": await page.evaluate("localStorage.getItem('hub.token')"),
            "user": {"id": str(await db.fetchval("SELECT id FROM users WHERE username = $1", username))}}


async def test_a_buyer_reviews_from_the_page_and_sees_the_servers_refusal(aiohttp_client, fast, db, page,
                                                                          second_page):
    client = await aiohttp_client(create_app(fast))
    seller, pod = await published_pod(client)
    base_url = server_url(client)
    buyer = await signed_in_buyer(page, base_url, db)
    await page.goto(f"{base_url}/#datapod/{pod['id']}")
    form = page.locator("#review-form")
    await expect(page.locator("#datapod-rating")).to_have_text("No reviews yet")
    await expect(form).to_be_hidden()  # no purchase, no form

    purchase = await bought(client, db, buyer, seller, pod)
    await expect(form).to_be_visible(timeout=10_000)  # the purchase completed while the page was open
    await form.get_by_label("Rating").select_option("5")
    await form.get_by_label("Comment").fill("exactly what I needed")
    await form.get_by_role("button", name="Post review").click()
    await expect(page.locator("#review-status")).to_have_text("Thank you: your review is posted.")
    await expect(form).to_be_hidden()
    await expect(page.locator("#reviews li").first).to_contain_text("exactly what I needed")
    await expect(page.locator("#datapod-rating")).to_have_text("5.00 / 5 from 1 review", timeout=10_000)
    assert await db.fetchval("SELECT rating FROM reviews WHERE purchase_id = $1", uuid.UUID(purchase)) == 5
    await page.reload()
    await expect(page.locator("#review-status")).to_have_text("You reviewed this DataPod.")
    await expect(form).to_be_hidden()

    # Another buyer's form is open, but their review was posted elsewhere meanwhile: the server refuses.
    other = await signed_in_buyer(second_page, base_url, db)
    purchase = await bought(client, db, other, seller, pod)
    await second_page.goto(f"{base_url}/#datapod/{pod['id']}")
    other_form = second_page.locator("#review-form")
    await expect(other_form).to_be_visible()
    await review(client, other, purchase, 2, "posted from another tab")
    await other_form.get_by_role("button", name="Post review").click()
    await expect(second_page.locator("#review-error")).to_have_text(
        "Your review was not posted: this purchase is already reviewed")
    assert await db.fetchval("SELECT count(*) FROM reviews WHERE purchase_id = $1", uuid.UUID(purchase)) == 1
    await expect(second_page.locator("#datapod-rating")).to_have_text("3.50 / 5 from 2 reviews", timeout=10_000)


async def test_datapod_reviews_come_in_pages_with_more(client, db, page):
    seller, pod = await published_pod(client)
    pod_id = uuid.UUID(pod["id"])
    # Twelve past reviews, one a minute (a review needs a completed purchase of its own buyer).
    for i in range(12):
        buyer_id = uuid.UUID((await register(client))["user"]["id"])
        purchase_id = await db.fetchval(
            """INSERT INTO purchases (buyer_id, datapod_id, payment_tx_digest, amount_sui, status)
               VALUES ($1, $2, $3, 1.5, 'completed') RETURNING id""", buyer_id, pod_id, f"digest-{i}")
        await db.execute("""INSERT INTO reviews (purchase_id, buyer_id, datapod_id, rating, comment, created_at)
                            VALUES ($1, $2, $3, $4, $5, now() - make_interval(mins => $6))""",
                         purchase_id, buyer_id, pod_id, 1 + i % 5, f"review {i}", 12 - i)
    base_url = server_url(client)
    await sign_up(page, base_url)
    await page.goto(f"{base_url}/#datapod/{pod['id']}")
    await expect(page.locator("#datapod-rating")).to_have_text("2.75 / 5 from 12 reviews")
    comments = page.locator("#reviews li .comment")
    await expect(comments).to_have_text([f"review {i}" for i in range(11, 1, -1)])  # the newest ten
    more = page.get_by_role("button", name="More reviews")
    await more.click()
    await expect(comments).to_have_text([f"review {i}" for i in range(11, -1, -1)])
    await expect(more).to_be_hidden()


# --- page hardening and sessions -------------------------------------------------------------------

SHORT_TOKEN_TTL = 4  # seconds: the page must refresh twice or more within one test


async def test_responses_carry_the_security_headers(client):
    for path in ("/", "/app.js", "/api/v1/me", "/no/such/page"):
        response = await client.get(path)
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        assert response.headers["Referrer-Policy"] == "no-referrer", path
    page = await client.get("/")
    assert page.content_type == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert policy == CONTENT_SECURITY_POLICY
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["script-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert directives["object-src"] == "'none'"


async def test_the_page_works_under_its_csp_with_no_violation(client, page):
    await sign_up(page, server_url(client))
    await expect(page.locator("#connection")).to_have_text("connected")
    await until_live(page, "/marketplace", "market")
    for tab in ("Purchases", "Seller studio", "Assistant", "Explorer", "Games", "DAO", "NFTs", "KYC", "Account",
                "Marketplace"):
        await page.click(f"nav >> text={tab}")
    await until_live(page, "/chain", "chain:blocks")
    await publish(client.app, "chain:blocks", "block_added", {"height": 1, "hash": "ab" * 32})
    await page.click("nav >> text=Explorer")
    await expect(page.locator('#blocks [data-key="1"]')).to_be_visible()  # the canvas chart drew too
    await page.click("nav >> text=Purchases")
    await page.get_by_role("button", name="Create wallet").click()  # WebCrypto and IndexedDB
    await expect(page.locator("#wallet-message")).to_have_text("Wallet ready.")
    await no_csp_violations(page)

    # The policy is enforced, not just sent: an injected inline script does not run, and is reported.
    ran = await page.evaluate("""() => {
        const script = document.createElement("script");
        script.textContent = "window.inlineRan = true";
        document.head.append(script);
        return window.inlineRan === true;
    }""")
    assert ran is False
    await page.wait_for_function("window.cspViolations.length > 0")
    assert await page.evaluate("window.cspViolations") == ["script-src-elem inline"]
    for _ in range(50):  # the console message trails the event a little
        if page.csp_console:
            break
        await asyncio.sleep(0.1)
    assert any("inline script" in text for text in page.csp_console), page.csp_console
    await page.evaluate("window.cspViolations.length = 0")  # the one expected: the fixture checks for others
    page.csp_console.clear()


def count_refreshes(page, answers: list[int]) -> None:
    """Record the status of every refresh the page makes."""
    page.on("response", lambda response: answers.append(response.status)
            if response.url.endswith("/api/v1/auth/refresh") else None)


SOCKET_IDS = "[...window.hub.sockets].filter(([, s]) => s.connected).map(([ns, s]) => `${ns} ${s.id}`).sort()"
# A user-only command straight on the socket (no retry in hub.call): it works only while the
# server holds a valid token for this very connection.
RAW_SOCKET_COMMAND = """window.hub.socket("/assistant").timeout(5000)
    .emitWithAck("list_conversations", {}).then((ack) => ack.ok ? "ok" : ack.error.code)"""


async def stays_signed_in(page, username: str) -> None:
    """Signed in, the connection live, and the socket's own authentication still good."""
    await expect(page.locator("#whoami")).to_have_text(username)
    await expect(page.locator("#sign-in")).to_be_hidden()
    await expect(page.locator("#connection")).to_have_text(re.compile("connected|recovered"))
    assert await page.evaluate(RAW_SOCKET_COMMAND) == "ok"


async def test_the_page_refreshes_silently_and_its_sockets_stay_live(aiohttp_client, settings, page):
    client = await aiohttp_client(create_app(settings.replace(access_token_ttl=SHORT_TOKEN_TTL)))
    refreshes: list[int] = []
    count_refreshes(page, refreshes)
    username = await sign_up(page, server_url(client))
    await page.click("nav >> text=Explorer")
    await until_live(page, "/chain", "chain:blocks")
    first_token = await page.evaluate("localStorage.getItem('hub.token')")
    sockets = await page.evaluate(SOCKET_IDS)
    assert "/assistant" in " ".join(sockets)

    await page.wait_for_timeout(SHORT_TOKEN_TTL * 2500)  # the first token is long expired
    assert len(refreshes) >= 2 and set(refreshes) == {200}, refreshes
    assert await page.evaluate("localStorage.getItem('hub.token')") != first_token
    await stays_signed_in(page, username)
    assert await page.evaluate(SOCKET_IDS) == sockets  # re-authenticated in place, never reconnected
    await publish(client.app, "chain:blocks", "block_added", {"height": 7, "hash": "ab" * 32})
    await expect(page.locator('#blocks [data-key="7"]')).to_be_visible()


async def test_token_expiring_alone_keeps_a_socket_signed_in(aiohttp_client, settings, page):
    # The page's own timers stand still (as in a throttled background tab): only the server's
    # token_expiring notice can make it refresh and re-authenticate its sockets in time.
    client = await aiohttp_client(create_app(settings.replace(access_token_ttl=SHORT_TOKEN_TTL)))
    refreshes: list[int] = []
    count_refreshes(page, refreshes)
    await page.clock.install()
    username = await sign_up(page, server_url(client))
    await expect(page.locator("#connection")).to_have_text("connected")
    sockets = await page.evaluate(SOCKET_IDS)
    await page.clock.pause_at(dt.datetime.now() + dt.timedelta(milliseconds=200))
    await page.wait_for_timeout(SHORT_TOKEN_TTL * 2500)
    assert len(refreshes) >= 2 and set(refreshes) == {200}, refreshes
    await stays_signed_in(page, username)
    assert await page.evaluate(SOCKET_IDS) == sockets


async def test_a_401_gets_one_refresh_and_one_retry(client, page):
    refreshes: list[int] = []
    count_refreshes(page, refreshes)
    await sign_up(page, server_url(client))
    me_calls: list[int] = []
    page.on("response", lambda response: me_calls.append(response.status)
            if response.url.endswith("/api/v1/me") else None)
    # The token is spoilt and the call sent in one task: a view's read still in flight cannot get a
    # 401 and refresh the token in between (wait_for_load_state("networkidle") did not wait for
    # them: the page's first load had reached that state already, and under load one did).
    username = await page.evaluate("""async () => {
        const { api } = await import('/hub.js');
        localStorage.setItem('hub.token', 'an.expired.token');
        return (await api('GET', '/api/v1/me')).username;
    }""")
    assert username == await page.locator("#whoami").text_content()
    assert me_calls == [401, 200]
    assert refreshes == [200]
    assert await page.evaluate("localStorage.getItem('hub.token')") != "an.expired.token"


async def test_tabs_share_the_sign_in_and_refresh_it_one_at_a_time(aiohttp_client, settings, two_tabs):
    client = await aiohttp_client(create_app(settings.replace(access_token_ttl=SHORT_TOKEN_TTL)))
    page, other = two_tabs
    refreshes: list[int] = []
    count_refreshes(page, refreshes)
    count_refreshes(other, refreshes)
    username = await sign_up(page, server_url(client))
    await other.goto(server_url(client))
    await expect(other.locator("#whoami")).to_have_text(username)  # signed in by the first tab
    # Both tabs hold the same refresh token and time their refresh alike: were both to spend it,
    # the server would see a reuse and revoke the sign-in everywhere.
    await page.wait_for_timeout(SHORT_TOKEN_TTL * 2500)
    assert len(refreshes) >= 2 and set(refreshes) == {200}, refreshes
    await stays_signed_in(page, username)
    await stays_signed_in(other, username)


SIGNED_OUT_ELSEWHERE = "You were signed out: this account signed out in another tab or window."


async def shows_signed_out(page, notice: str) -> None:
    """The sign-in form with a notice, no error, and no socket left to reconnect."""
    await expect(page.locator("#sign-in")).to_be_visible()
    await expect(page.locator("#whoami")).to_be_empty()
    await expect(page.get_by_role("tab", name="Purchases")).to_be_hidden()  # signed out: the marketplace only
    await expect(page.locator("#sign-in-notice")).to_have_text(notice)
    await expect(page.locator("#sign-in-error")).to_be_empty()
    await expect(page.locator("#connection")).to_have_text("signed out")
    await page.wait_for_timeout(1000)
    assert await page.evaluate("window.hub.sockets.size") == 0
    assert await page.evaluate("localStorage.getItem('hub.token')") is None


async def test_signing_out_in_one_tab_signs_out_the_other(client, two_tabs):
    page, other = two_tabs
    username = await sign_up(page, server_url(client))
    await other.goto(server_url(client))
    await expect(other.locator("#whoami")).to_have_text(username)
    await until_live(other, "/marketplace", "market")
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.locator("#sign-in")).to_be_visible()
    await shows_signed_out(other, SIGNED_OUT_ELSEWHERE)


async def test_a_logout_elsewhere_ends_the_page_through_its_sockets(client, page):
    # The same session ended from outside the browser: no storage event, only the server's
    # signed_out reaches the page.
    await sign_up(page, server_url(client))
    await until_live(page, "/marketplace", "market")
    token = await page.evaluate("localStorage.getItem('hub.token')")
    response = await client.post("/api/v1/auth/logout", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200, await response.text()
    await shows_signed_out(page, SIGNED_OUT_ELSEWHERE)


async def test_an_administrators_revocation_signs_the_page_out(client, db, page):
    from tests.test_games import make_admin

    admin = await make_admin(client, db)
    username = await sign_up(page, server_url(client))
    await until_live(page, "/marketplace", "market")
    user_id = await db.fetchval("SELECT id FROM users WHERE username = $1", username)
    response = await client.post(f"/api/v1/admin/users/{user_id}/sessions/revoke",
                                 headers={"Authorization": f"Bearer {admin['token']}"})
    assert response.status == 200, await response.text()
    await shows_signed_out(page, "You were signed out: this session was ended. Sign in again.")
