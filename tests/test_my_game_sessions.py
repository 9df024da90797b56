"""A player's own sessions and earnings (`GET /api/v1/me/game-sessions`), and the player's name in the
game channel's events, over the real app."""

from __future__ import annotations

import pytest

from tests.helpers import register, server_url, wait_until
from tests.test_games import (  # noqa: F401 - fixtures
    bearer,
    client,
    create_game,
    game_server,
    gaming_pool,
    make_admin,
    player,
    received,
    reward,
    start,
)

pytestmark = pytest.mark.usefixtures("chain_verified")


async def mine(app_client, user: dict, query: str = "") -> dict:
    response = await app_client.get(f"/api/v1/me/game-sessions{query}", headers=bearer(user["token"]))
    body = await response.json()
    assert response.status == 200, body
    return body["data"]


async def test_a_player_sees_their_own_sessions_and_earnings_per_game(client, db, sockets):  # noqa: F811
    admin = await make_admin(client, db)
    runner, runner_token = await create_game(client, admin)
    miner, miner_token = await create_game(client, admin, name="Gem Miner")
    alice, alice_sock = await player(client, sockets)
    bob, bob_sock = await player(client, sockets)
    assert await mine(client, alice) == {"sessions": [], "next_before": None, "earnings": [],
                                         "total": {"sessions": 0, "rewards_earned": "0.00000000", "reward_count": 0}}

    runner_server = await game_server(client, sockets, runner_token)
    miner_server = await game_server(client, sockets, miner_token)
    first = await start(alice_sock, runner["game_id"])
    assert (await reward(runner_server, first, 1, "12.5"))["ok"]
    assert (await alice_sock.call("/games", "end_session", {"session_id": first}))["ok"]
    second = await start(alice_sock, runner["game_id"])
    assert (await reward(runner_server, second, 1, "2"))["ok"]
    third = await start(alice_sock, miner["game_id"])
    assert (await reward(miner_server, third, 1, "0.25"))["ok"]
    assert (await reward(miner_server, third, 2, "0.5"))["ok"]
    others = await start(bob_sock, runner["game_id"])  # bob's never shows in alice's list
    assert (await reward(runner_server, others, 1, "40"))["ok"]

    data = await mine(client, alice)
    assert [s["session_id"] for s in data["sessions"]] == [third, second, first]
    assert [s["game_name"] for s in data["sessions"]] == ["Gem Miner", "Block Runner", "Block Runner"]
    assert [s["status"] for s in data["sessions"]] == ["Active", "Active", "Ended"]
    assert [s["rewards_earned"] for s in data["sessions"]] == ["0.75000000", "2.00000000", "12.50000000"]
    assert data["sessions"][0]["user_id"] == alice["user"]["id"] and data["next_before"] is None
    assert data["earnings"] == [
        {"game_id": miner["game_id"], "name": "Gem Miner", "sessions": 1, "rewards_earned": "0.75000000",
         "reward_count": 2, "last_played_at": data["earnings"][0]["last_played_at"]},
        {"game_id": runner["game_id"], "name": "Block Runner", "sessions": 2, "rewards_earned": "14.50000000",
         "reward_count": 2, "last_played_at": data["earnings"][1]["last_played_at"]}]
    assert data["total"] == {"sessions": 3, "rewards_earned": "15.25000000", "reward_count": 4}

    # A page at a time, and one game's sessions; the earnings and total always cover everything.
    page = await mine(client, alice, "?limit=2")
    assert [s["session_id"] for s in page["sessions"]] == [third, second] and page["next_before"] == second
    rest = await mine(client, alice, f"?limit=2&before={page['next_before']}")
    assert [s["session_id"] for s in rest["sessions"]] == [first] and rest["next_before"] is None
    assert rest["total"] == data["total"]
    one_game = await mine(client, alice, f"?game_id={runner['game_id']}")
    assert [s["session_id"] for s in one_game["sessions"]] == [second, first]
    assert (await mine(client, bob))["total"]["rewards_earned"] == "40.00000000"


async def test_my_sessions_need_a_sign_in_and_valid_parameters(client):  # noqa: F811
    assert (await client.get("/api/v1/me/game-sessions")).status == 401
    user = await register(client)
    for query in ("?limit=0", "?limit=101", "?before=x", "?game_id=0"):
        response = await client.get(f"/api/v1/me/game-sessions{query}", headers=bearer(user["token"]))
        assert response.status == 400, query
    assert (await mine(client, user, "?game_id=999"))["sessions"] == []


async def test_the_game_channel_names_the_player(client, db, sockets):  # noqa: F811
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin)
    spectator = sockets()
    await spectator.connect(server_url(client), "/games")
    assert (await spectator.call("/games", "subscribe", {"channel": f"game:{game['game_id']}"}))["ok"]
    alice, alice_sock = await player(client, sockets)
    session_id = await start(alice_sock, game["game_id"])
    server = await game_server(client, sockets, token)
    assert (await reward(server, session_id, 1, "3"))["ok"]
    await wait_until(lambda: received(spectator, "reward_earned") and received(spectator, "session_started"))
    name = alice["user"]["username"]
    assert received(spectator, "session_started")[0]["data"]["username"] == name
    earned = received(spectator, "reward_earned")[0]["data"]
    assert earned["username"] == name and earned["user_id"] == alice["user"]["id"]
