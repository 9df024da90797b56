"""The dashboard in a real Chromium (Debian's, driven by Playwright) against a real server."""

from __future__ import annotations

import os
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from playwright.async_api import async_playwright, expect

from server.app import create_app
from server.context import BLOBS, MASTER_KEY, POOL
from server.realtime import publish
from tests.helpers import server_url
from tests.llm_server import llm_server  # noqa: F401 - a fixture

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


@pytest.fixture
async def page(request):
    """A fresh browser page; a screenshot lands in test-artifacts/ when the test fails."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page()
        yield page
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
        await browser.close()


async def sign_up(page, base_url: str) -> str:
    username = f"u{uuid.uuid4().hex[:10]}"
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
    await page.wait_for_function(f"window.hub.subscriptions.get({key!r})?.joined === true")


async def test_sign_up_then_live_marketplace_and_chain_with_recovery(client, page):
    base_url = server_url(client)
    await sign_up(page, base_url)
    await expect(page.locator("#connection")).to_have_text("connected")
    await until_live(page, "/marketplace", "market")

    pod_id = str(uuid.uuid4())
    await publish(client.app, "market", "datapod_published", {
        "id": pod_id, "title": "Live weather feed", "category": "climate", "price_sui": "1.5"})
    await expect(page.locator(f'#datapods [data-key="{pod_id}"]')).to_contain_text("Live weather feed")

    await page.click("nav >> text=Chain")
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

    # What the page paid is what the server verified: one confirmed transfer, buyer to seller.
    paid = await db.fetchrow("SELECT t.sender, t.receiver, t.amount, t.status FROM purchases p "
                             "JOIN transactions t ON t.transaction_hash = p.payment_tx_digest WHERE p.buyer_id = $1",
                             buyer_id)
    assert dict(paid) == {"sender": wallet, "receiver": seller.address, "amount": Decimal("1.5"),
                          "status": "confirmed"}
    assert await db.fetchval("SELECT total_balance FROM users WHERE id = $1", buyer_id) == Decimal("8.5")


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
        shown = await answer.locator(".text").text_content()

        await page.reload()
        async with client.app[POOL].acquire() as conn:
            still = await conn.fetchval("SELECT status FROM ai_messages WHERE id = $1", message_id)
        assert still == "streaming", "the reload came after the answer had ended"
        await page.click("nav >> text=Assistant")
        answer = page.locator(f"#m-{message_id}")
        await expect(answer).to_have_attribute("data-status", "complete", timeout=30_000)
        async with client.app[POOL].acquire() as conn:
            saved = await conn.fetchrow("SELECT content, status FROM ai_messages WHERE id = $1", message_id)
        final = await answer.locator(".text").text_content()
        assert saved["status"] == "complete"
        assert final == saved["content"]                 # nothing lost, nothing doubled
        assert final.startswith(shown) and len(final) > len(shown)
        await expect(page.locator("#messages .message.user")).to_have_count(1)
        await expect(page.locator("#messages .message.assistant")).to_have_count(1)
    finally:
        await server.close()


async def test_games_tab_shows_rewards_and_the_leaderboard_live(client, db, sockets, page):
    from tests.test_games import create_game, game_server, make_admin, player, reward, start

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
    await expect(page.locator("#leaderboard li").first).to_contain_text(gamer["user"]["username"], timeout=10_000)


async def test_dao_tab_shows_live_tallies(client, page):
    from tests.test_chain import account
    from tests.test_dao import proposal, rest_vote, vote_body

    alice = await account(client)
    proposal_id = (await proposal(client, alice, title="Fund the explorer"))["id"]
    await sign_up(page, server_url(client))
    await page.click("nav >> text=DAO")
    row = page.locator(f'#proposals [data-key="{proposal_id}"]')
    await expect(row).to_contain_text("Fund the explorer")
    await expect(row).to_contain_text("yes 0")
    await until_live(page, "/chain", f"dao:{proposal_id}")
    assert (await rest_vote(client, alice, proposal_id, vote_body(alice.wallet, proposal_id, "Yes")))[0] == 201
    await expect(row).to_contain_text("yes 1", timeout=10_000)
