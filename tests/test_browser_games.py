"""The Games view in a real Chromium against the real server: every game live, names instead of
wallets and ids, "you" on the leaderboard and in the feed, my sessions and earnings, the reward pool."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import expect

from server.app import create_app
from tests.helpers import register, server_url
from tests.test_browser import browser, no_csp_violations, sign_up, until_live, watch_csp  # noqa: F401 - fixtures
from tests.test_browser_app import OVERFLOW, SMALL_TARGETS
from tests.test_games import create_game, make_admin

SIZES = {"desktop": {"width": 1440, "height": 900}, "phone": {"width": 390, "height": 844}}


@pytest.fixture
async def client(settings, aiohttp_client):
    """The app with a quick leaderboard throttle, so the page sees `leaderboard_changed` at once."""
    return await aiohttp_client(create_app(settings.replace(game_leaderboard_interval=0.1)))


@pytest.fixture
async def tab(request, browser):  # noqa: F811 - the fixture imported above
    """A page at the size the test names (desktop or phone), watched for CSP reports and console 404s."""
    size = request.node.callspec.params["size"]
    context = await browser.new_context(viewport=SIZES[size], is_mobile=size == "phone", has_touch=size == "phone")
    page = await context.new_page()
    await watch_csp(page)
    page.not_found = []
    page.on("console", lambda message: page.not_found.append(message.text) if "404" in message.text else None)
    yield page
    await no_csp_violations(page)
    assert page.not_found == []
    await context.close()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def start_session(client, token: str, game_id: int) -> int:
    response = await client.post("/api/v1/game-sessions", json={"game_id": game_id}, headers=bearer(token))
    body = await response.json()
    assert response.status == 201, body
    return body["data"]["session_id"]


async def reward(client, game_token: str, session_id: int, seq: int, value: str, reward_type: str = "coin") -> None:
    response = await client.post(f"/api/v1/game-sessions/{session_id}/rewards",
                                 headers={"Authorization": f"Game {game_token}"},
                                 json={"seq": seq, "reward_type": reward_type, "value": value})
    assert response.status == 200, await response.text()


async def fits_a_phone(page) -> None:
    """At 360 px wide: no sideways scroll, and every control a 44 px target."""
    await page.set_viewport_size({"width": 360, "height": 740})
    assert await page.evaluate(OVERFLOW) <= 0
    assert await page.evaluate(SMALL_TARGETS) == []


@pytest.mark.parametrize("size", ["desktop", "phone"])
async def test_every_game_live_with_names_my_earnings_and_the_pool(client, db, tab, size):
    await db.execute("INSERT INTO reward_pools (pool_name, total_tokens) VALUES ('gaming', 1000)")
    admin = await make_admin(client, db)
    runner, runner_token = await create_game(client, admin)
    miner, miner_token = await create_game(client, admin, name="Gem Miner", revenue_share="0")
    rival = await register(client)

    base_url = server_url(client)
    me = await sign_up(tab, base_url)
    token = await tab.evaluate("localStorage.getItem('hub.token')")
    await tab.get_by_role("tab", name="Games").click()
    panel = tab.get_by_role("tabpanel", name="Games")
    cards = panel.locator("#games > li")
    await expect(cards).to_have_count(2)
    runner_card = panel.locator(f'#games [data-key="{runner["game_id"]}"]')
    miner_card = panel.locator(f'#games [data-key="{miner["game_id"]}"]')
    await expect(runner_card).to_contain_text("Block Runner")
    await expect(miner_card).to_contain_text("Gem Miner")
    await expect(runner_card).to_contain_text("Nobody has earned a reward in the last 24 hours yet.")
    await expect(panel.locator("#games-pool")).to_contain_text("1000 KVP left to pay rewards, of 1000 KVP")
    await expect(panel.locator("#games-mine-title + *")).to_contain_text("You earned 0 KVP in 0 sessions")
    await expect(panel).to_contain_text("You have not played yet.")
    await expect(panel).to_contain_text("No rewards since you opened this page.")
    for game in (runner, miner):
        await until_live(tab, "/games", f"game:{game['game_id']}")
    await expect(runner_card.locator(".watchers")).to_have_text("1 watching")

    # Sessions start (mine shows up live), then game servers report rewards: feed, boards, pool, earnings.
    mine = await start_session(client, token, runner["game_id"])
    rival_runner = await start_session(client, rival["token"], runner["game_id"])
    rival_miner = await start_session(client, rival["token"], miner["game_id"])
    session_row = panel.locator(f'.sessions [data-session="{mine}"]')
    await expect(session_row).to_contain_text("Block Runner")
    await expect(session_row).to_contain_text("playing")
    await reward(client, runner_token, mine, 1, "12.5")
    await reward(client, runner_token, rival_runner, 1, "7", "gem")
    await reward(client, miner_token, rival_miner, 1, "3")

    feed = panel.locator("#game-rewards li")
    await expect(feed).to_have_count(3)
    mine_earned = re.compile(rf"^{me} \(you\) earned 12\.5 KVP \(coin\) in Block Runner · \d")
    await expect(feed.nth(2)).to_contain_text(mine_earned)
    await expect(feed.nth(2)).to_have_class("you")
    await expect(feed.nth(1)).to_contain_text(f"{rival['user']['username']} earned 7 KVP (gem) in Block Runner · ")
    await expect(feed.nth(0)).to_contain_text(f"{rival['user']['username']} earned 3 KVP (coin) in Gem Miner · ")
    board = runner_card.locator(".leaderboard li")
    await expect(board).to_have_count(2)
    await expect(board.nth(0)).to_contain_text(f"1. {me} (you) 12.5 KVP")
    await expect(board.nth(0)).to_have_attribute("data-user", "you")
    await expect(board.nth(1)).to_contain_text(f"2. {rival['user']['username']} 7 KVP")
    await expect(board.nth(1)).to_have_attribute("data-user", "other")
    await expect(miner_card.locator(".leaderboard li")).to_contain_text(f"1. {rival['user']['username']} 3 KVP")
    # 1000 less the rewards (22.5) and Block Runner's owner share on its two (15 %: 2.925).
    await expect(panel.locator("#games-pool")).to_contain_text("974.575 KVP left")
    pools = await (await client.get("/api/v1/reward-pools")).json()
    assert [p["remaining_tokens"] for p in pools["data"]["pools"] if p["name"] == "gaming"] == ["974.57500000"]
    await expect(session_row).to_contain_text("12.5 KVP earned · 1 reward")
    await expect(panel.locator("#games-mine-title + *")).to_contain_text("You earned 12.5 KVP in 1 session (1 reward)")
    await expect(runner_card).to_contain_text("you earned 12.5 KVP")
    await expect(runner_card.locator(".session")).to_have_text(
        f"{rival['user']['username']} is playing (session {rival_runner}): 7 KVP earned so far.")
    text = await panel.inner_text()
    for raw in (rival["user"]["id"], rival["user"]["id"][:8], "user:", "kvp1"):
        assert raw not in text  # names, never ids or wallet addresses
    if size == "phone":
        await fits_a_phone(tab)

    # One game's page by its address: its leaderboard, its rewards only, my sessions of it; a reload stays.
    await runner_card.get_by_role("link", name="Block Runner").click()
    assert tab.url.endswith(f"#/games/{runner['game_id']}")
    heading = panel.get_by_role("heading", name="Block Runner", level=2)
    await expect(heading).to_be_focused()
    await expect(panel.locator("#game-rewards li")).to_have_count(2)
    await expect(panel.locator(".leaderboard li").first).to_contain_text(f"{me} (you)")
    await expect(panel.locator("#game-mine-title + *")).to_contain_text(
        "You earned 12.5 KVP in this game over 1 session")
    await expect(panel).to_contain_text("15 % on top of each reward")
    await tab.reload()
    await expect(tab.locator("#whoami")).to_have_text(me)
    await expect(heading).to_be_visible()
    await expect(tab.get_by_role("tab", name="Games")).to_have_attribute("aria-selected", "true")
    await expect(panel.locator(".leaderboard li").first).to_contain_text(f"1. {me} (you) 12.5 KVP")
    await expect(panel.locator("#games-pool")).to_contain_text("974.575 KVP left")
    await expect(panel).to_contain_text("No rewards since you opened this page.")
    await until_live(tab, "/games", f"game:{runner['game_id']}")
    await reward(client, runner_token, mine, 2, "0.5")
    await expect(panel.locator("#game-rewards li")).to_contain_text(f"{me} (you) earned 0.5 KVP (coin) · ")
    if size == "phone":
        await fits_a_phone(tab)

    # The player ends the session from the page; back to the list.
    await panel.get_by_role("button", name=f"End session {mine} of Block Runner").click()
    await expect(panel.locator(f'.sessions [data-session="{mine}"]')).to_contain_text("ended")
    await expect(panel.locator(f'.sessions [data-session="{mine}"]')).to_contain_text("13 KVP earned · 2 rewards")
    await expect(panel.locator(".session")).to_have_text(f"Your session {mine} ended with 13 KVP earned.")
    await panel.get_by_role("link", name="← All games").click()
    await expect(cards).to_have_count(2)
    await expect(panel.get_by_role("heading", name="Games", level=2)).to_be_visible()


async def test_an_unknown_game_says_so(client, browser):  # noqa: F811
    page = await browser.new_page()
    await watch_csp(page)
    try:
        await sign_up(page, server_url(client))
        await page.goto(f"{server_url(client)}/#/games/424242")
        panel = page.get_by_role("tabpanel", name="Games")
        await expect(panel.get_by_role("heading", name="No such game")).to_be_visible()
        await expect(panel).to_contain_text("There is no game number 424242.")
        await expect(panel.locator("#games-mine-title")).to_have_count(0)
        await expect(panel.get_by_role("link", name="← All games")).to_be_visible()
        await page.get_by_role("link", name="← All games").click()
        await expect(panel).to_contain_text("No games are registered yet.")
    finally:
        await no_csp_violations(page)
        await page.close()
