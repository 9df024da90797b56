"""The demo game player against the real app: rewards booked as the real path books them, turns
and ended sessions, the live game channel, the game's policy, the on/off switches, one player
across processes, and the demo game's token."""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal

import pytest
from playwright.async_api import expect

from server.app import create_app
from server.core.secrets import load_or_create_secret
from server.services import games
from server.services.demo import DEMO_USERS, load_if_empty
from server.services.demo_game import DEMO_GAME_PLAYER, demo_token
from server.services.games import GAMES
from tests.helpers import server_url, wait_until
from tests.test_browser import browser, page, sign_up  # noqa: F401 - browser and page are fixtures
from tests.test_games import bearer, received

FAST = {"demo_data_on_first_start": True, "demo_game_interval": 0.05, "game_leaderboard_interval": 0.1}


async def demo_game_id(db) -> int:
    return await db.fetchval("SELECT game_id FROM games WHERE name = 'Block Runner'")


async def preload(db, settings, **policy: str) -> int:
    """Load the demo data before the app starts (as an earlier start did) and set the game's policy."""
    master_key = load_or_create_secret(settings.data_dir, "master_key", settings.master_key)
    assert await load_if_empty(db, settings, master_key) is True
    game_id = await demo_game_id(db)
    for column, value in policy.items():
        await db.execute(f"UPDATE games SET {column} = $2 WHERE game_id = $1", game_id, Decimal(value))
    return game_id


async def count(db, sql: str, *args) -> int:
    return await db.fetchval(sql, *args)


async def test_the_demo_plays_in_turns_and_books_rewards_as_the_real_path_does(aiohttp_client, settings, db, sockets):
    client = await aiohttp_client(create_app(settings.replace(**FAST)))
    game_id = await demo_game_id(db)
    spectator = sockets()
    await spectator.connect(server_url(client), "/games")
    channel = f"game:{game_id}"
    assert (await spectator.call("/games", "subscribe", {"channel": channel}))["ok"]

    def seen(event_type: str) -> list[dict]:
        return [e for e in received(spectator, event_type) if e["channel"] == channel]

    await wait_until(lambda: len(seen("session_ended")) >= 4 and seen("reward_earned") and seen("leaderboard_changed"))
    player = client.app[DEMO_GAME_PLAYER]
    assert player.leading and player.rewards > 0
    await client.close()  # the player stops with the app: nothing is written after this
    rewards = await count(db, "SELECT count(*) FROM game_rewards")
    await asyncio.sleep(0.3)
    assert await count(db, "SELECT count(*) FROM game_rewards") == rewards
    # A report committed as the app stopped may have lost its ack: at most that one is unacked.
    assert player.rewards <= rewards <= player.rewards + 1

    # Every reward has its ledger row, and each balance is the sum of its ledger rows.
    assert await count(db, """
        SELECT count(*) FROM game_rewards r JOIN game_sessions s ON s.session_id = r.session_id
        LEFT JOIN balance_ledger l ON l.reason = 'game_reward' AND l.reference = r.reward_id::text
                                  AND l.user_id = s.user_id AND l.delta = r.reward_value
        WHERE l.entry_id IS NULL""") == 0
    balances = await db.fetch(
        """SELECT u.username, u.total_balance,
                  (SELECT coalesce(sum(delta), 0) FROM balance_ledger WHERE user_id = u.id) AS ledger,
                  (SELECT coalesce(sum(r.reward_value), 0) FROM game_rewards r
                   JOIN game_sessions s ON s.session_id = r.session_id WHERE s.user_id = u.id)
                + (SELECT coalesce(sum(r.owner_share), 0) FROM game_rewards r
                   JOIN games g ON g.game_id = r.game_id WHERE g.owner_id = u.id) AS rewarded
           FROM users u WHERE u.username = ANY($1::text[])""", [name for name, _, _ in DEMO_USERS])
    assert len(balances) == 3 and sum(row["rewarded"] for row in balances) > 0
    for row in balances:
        assert row["total_balance"] == row["ledger"] == row["rewarded"], dict(row)

    # Turns: alice, bob, carol, alice...; sessions end after 4 to 8 rewards numbered 1, 2, 3...
    sessions = await db.fetch(
        """SELECT s.session_id, u.username, s.status, s.reward_count, s.rewards_earned,
                  array(SELECT seq FROM game_rewards WHERE session_id = s.session_id ORDER BY seq) AS seqs
           FROM game_sessions s JOIN users u ON u.id = s.user_id ORDER BY s.session_id""")
    names = [name for name, _, _ in DEMO_USERS]
    assert [s["username"] for s in sessions] == [names[i % 3] for i in range(len(sessions))]
    ended = [s for s in sessions if s["status"] == "Ended"]
    assert len(ended) >= 4 and all(s["status"] in ("Ended", "Active") for s in sessions)
    for session in ended:
        assert 4 <= session["reward_count"] <= 8 and session["seqs"] == list(range(1, session["reward_count"] + 1))
    # The channel got the normal events of those sessions.
    assert {e["data"]["session_id"] for e in seen("session_ended")} <= {s["session_id"] for s in ended}
    board = seen("leaderboard_changed")[-1]["data"]
    assert board["game_id"] == game_id and {e["username"] for e in board["entries"]} <= set(names)


async def test_the_demo_stays_inside_the_per_minute_cap_and_keeps_the_session_alive(aiohttp_client, settings, db):
    game_id = await preload(db, settings, max_reward_per_event="0.1", max_reward_per_minute="0.2")
    client = await aiohttp_client(create_app(settings.replace(**FAST)))
    player = client.app[DEMO_GAME_PLAYER]

    async def capped_then_alive():
        row = await db.fetchrow(
            """SELECT s.rewards_earned, s.last_activity_at > max(r.created_at) AS touched_since
               FROM game_sessions s JOIN game_rewards r ON r.session_id = s.session_id
               WHERE s.game_id = $1 GROUP BY s.session_id""", game_id)
        return row is not None and row["rewards_earned"] == Decimal("0.2") and row["touched_since"]

    await wait_until(capped_then_alive)  # heartbeats keep the capped session from timing out
    await asyncio.sleep(0.3)
    rows = await db.fetch("SELECT reward_value FROM game_rewards")
    assert [r["reward_value"] for r in rows] == [Decimal("0.1"), Decimal("0.1")]
    assert await count(db, "SELECT count(*) FROM game_sessions") == 1
    assert player.refused == 0  # it waited for room instead of reporting into the cap


async def test_the_demo_ends_a_session_at_its_cap_and_starts_the_next(aiohttp_client, settings, db):
    game_id = await preload(db, settings, max_reward_per_event="1", max_reward_per_session="0.5")
    client = await aiohttp_client(create_app(settings.replace(**FAST)))
    await wait_until(lambda: _ended_at_least(db, 4))
    ended = await db.fetch("SELECT rewards_earned FROM game_sessions WHERE game_id = $1 AND status = 'Ended'", game_id)
    assert all(row["rewards_earned"] == Decimal("0.5") for row in ended)
    assert client.app[DEMO_GAME_PLAYER].refused == 0


async def _ended_at_least(db, n: int) -> bool:
    return await count(db, "SELECT count(*) FROM game_sessions WHERE status = 'Ended'") >= n


@pytest.mark.parametrize("changes", [{"demo_data_on_first_start": False}, {"demo_game_interval": 0}])
async def test_the_demo_is_off_without_demo_data_or_with_interval_zero(aiohttp_client, settings, db, changes):
    await preload(db, settings)
    client = await aiohttp_client(create_app(settings.replace(**{**FAST, **changes})))
    await asyncio.sleep(0.5)
    assert DEMO_GAME_PLAYER not in client.app
    assert await count(db, "SELECT count(*) FROM game_sessions") == 0
    assert await count(db, "SELECT count(*) FROM games WHERE token_hash IS NOT NULL") == 0


async def test_one_process_plays_and_another_takes_over(aiohttp_client, settings, db):
    first = await aiohttp_client(create_app(settings.replace(**FAST)))
    second = await aiohttp_client(create_app(settings.replace(**FAST)))
    players = [first.app[DEMO_GAME_PLAYER], second.app[DEMO_GAME_PLAYER]]
    await wait_until(lambda: sum(p.rewards for p in players) >= 10)
    await asyncio.sleep(0.3)
    leader, standby = (0, 1) if players[0].leading else (1, 0)
    assert players[leader].leading and not players[standby].leading
    assert players[standby].rewards == 0 and [first, second][standby].app[GAMES].ingest.booked == 0
    clients = [first, second]
    await clients[leader].close()
    booked = await count(db, "SELECT count(*) FROM game_rewards")
    assert players[leader].rewards <= booked <= players[leader].rewards + 1  # the last ack may be lost
    await wait_until(lambda: players[standby].leading and players[standby].rewards >= 3)
    assert await count(db, "SELECT count(*) FROM game_rewards") >= booked + 3
    # The new leader resumed the round: no two sessions of one player were ever active at once.
    assert await count(db, "SELECT count(*) FROM game_sessions WHERE status = 'Active'") <= 1


async def test_the_demo_game_token_is_derived_and_an_owner_rotation_wins(aiohttp_client, settings, db):
    client = await aiohttp_client(create_app(settings.replace(**FAST)))
    player = client.app[DEMO_GAME_PLAYER]
    await wait_until(lambda: player.rewards >= 2)
    game_id = await demo_game_id(db)
    master_key = load_or_create_secret(settings.data_dir, "master_key", settings.master_key)
    token = demo_token(master_key, game_id)
    assert await db.fetchval("SELECT token_hash FROM games WHERE game_id = $1", game_id) == games.token_digest(token)
    # Alice takes her game over: the demo stops reporting and never overwrites her token.
    login = await (await client.post("/api/v1/auth/login", json={"login": "alice", "password": "demo-password"})).json()
    response = await client.post(f"/api/v1/games/{game_id}/token", headers=bearer(login["data"]["token"]))
    assert response.status == 201
    alice_token = (await response.json())["data"]["game_token"]
    await asyncio.sleep(0.3)
    before = await count(db, "SELECT count(*) FROM game_rewards")
    await asyncio.sleep(0.5)
    assert await count(db, "SELECT count(*) FROM game_rewards") == before
    assert await db.fetchval("SELECT token_hash FROM games WHERE game_id = $1", game_id) == games.token_digest(alice_token)
    assert player.leading  # still leading, waiting: the loop goes on


async def test_the_games_tab_shows_the_demo_playing(aiohttp_client, settings, db, page):
    client = await aiohttp_client(create_app(settings.replace(**{**FAST, "demo_game_interval": 0.2})))
    game_id = await demo_game_id(db)
    await sign_up(page, server_url(client))
    await page.click("nav >> text=Games")
    row = page.locator(f'#games [data-key="{game_id}"]')
    await expect(row).to_contain_text("Block Runner")
    await expect(row.locator(".session")).to_contain_text("playing", timeout=10_000)
    await expect(page.locator("#game-rewards li").first).to_contain_text("earned", timeout=10_000)
    await expect(row.locator(".leaderboard li").first).to_contain_text(re.compile("alice|bob|carol"), timeout=10_000)
