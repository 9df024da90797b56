"""The dashboard in a real Chromium (Debian's, driven by Playwright) against a real server."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from playwright.async_api import async_playwright, expect

from server.realtime import publish
from tests.helpers import server_url

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
