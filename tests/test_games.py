"""Earn-to-play over real sockets and REST: sessions, rewards booked once, the policy, game tokens,
the ledger, concurrency, idle timeouts and the live game channel."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import asyncpg
import pytest

from db import games as game_queries
from db import users as user_queries
from db.pool import POOL, init_connection
from server.app import create_app
from server.core.settings import SETTINGS
from server.realtime.hub import REALTIME
from server.services import games
from server.services.games import GAMES
from server.services.games import GAMING_POOL as GAMES_POOL
from tests.helpers import SocketClient, register, server_url, wait_until

POLICY = {"max_reward_per_event": "50", "max_reward_per_minute": "200", "max_reward_per_session": "500"}
GAMING_POOL_TOKENS = 1_000_000

# Rewards mint money from the gaming pool: after each test, balances, ledger and pools reconcile.
pytestmark = pytest.mark.usefixtures("chain_verified")


@pytest.fixture(autouse=True)
async def gaming_pool(db):
    """A well-funded `gaming` pool: these tests are about sessions and policy (tests/test_pools.py
    drains pools)."""
    await db.execute("INSERT INTO reward_pools (pool_name, total_tokens) VALUES ($1, $2)",
                     GAMES_POOL, GAMING_POOL_TOKENS)


@pytest.fixture
async def client(settings, aiohttp_client):
    """The app with a fast leaderboard throttle, so tests see `leaderboard_changed` quickly."""
    return await aiohttp_client(create_app(settings.replace(game_leaderboard_interval=0.1)))


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def make_admin(client, db) -> dict:
    admin = await register(client)
    user_id = uuid.UUID(admin["user"]["id"])
    await user_queries.upsert_admin(db, user_id, username=admin["user"]["username"],
                                    email=admin["user"]["email"], password_hash="x")
    return admin


async def create_game(client, admin: dict, **overrides) -> tuple[dict, str]:
    body = {"name": "Block Runner", "developer_wallet": "kvp1" + "ab" * 20, "revenue_share": "0.15",
            "policy": POLICY, **overrides}
    response = await client.post("/api/v1/games", json=body, headers=bearer(admin["token"]))
    data = await response.json()
    assert response.status == 201, data
    return data["data"]["game"], data["data"]["game_token"]


async def player(client, sockets, user: dict | None = None) -> tuple[dict, SocketClient]:
    user = user or await register(client)
    sock = sockets()
    await sock.connect(server_url(client), "/games", token=user["token"])
    return user, sock


async def game_server(client, sockets, game_token: str) -> SocketClient:
    sock = sockets()
    await sock.sio.connect(server_url(client), namespaces=["/games"], transports=["websocket"],
                           auth={"game_token": game_token}, wait_timeout=5)
    return sock


async def start(sock: SocketClient, game_id: int) -> int:
    ack = await sock.call("/games", "start_session", {"game_id": game_id})
    assert ack["ok"] is True, ack
    return ack["data"]["session_id"]


async def reward(server: SocketClient, session_id: int, seq: int, value="10", reward_type="coin") -> dict:
    return await server.call("/games", "report_reward", {"session_id": session_id, "seq": seq,
                                                         "reward_type": reward_type, "value": value})


def received(sock: SocketClient, event_type: str) -> list[dict]:
    return [data for _, name, data in sock.events if name == event_type]


async def written(db, session_id: int) -> dict:
    """Everything a reward writes, to compare before and after."""
    row = await db.fetchrow(
        """SELECT (SELECT count(*) FROM game_rewards WHERE session_id = $1) AS rewards,
                  (SELECT rewards_earned FROM game_sessions WHERE session_id = $1) AS earned,
                  (SELECT u.total_balance FROM users u JOIN game_sessions s ON s.user_id = u.id
                   WHERE s.session_id = $1) AS balance,
                  (SELECT count(*) FROM balance_ledger) AS ledger""",
        session_id)
    return dict(row)


async def test_session_start_report_and_end_over_sockets(client, db, sockets):
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin)
    alice, sock = await player(client, sockets)
    session_id = await start(sock, game["game_id"])
    again = await sock.call("/games", "start_session", {"game_id": game["game_id"]})
    assert again["data"]["session_id"] == session_id and again["data"]["resumed"] is True
    server = await game_server(client, sockets, token)
    first = await reward(server, session_id, 1, "12.5")
    second = await reward(server, session_id, 2, 7)
    assert first["ok"] and second["ok"], (first, second)
    assert first["data"]["session_total"] == "12.50000000" and first["data"]["value"] == "12.50000000"
    assert second["data"]["session_total"] == "19.50000000" and second["data"]["seq"] == 2
    ended = await sock.call("/games", "end_session", {"session_id": session_id})
    assert ended["data"]["status"] == "Ended" and ended["data"]["rewards_earned"] == "19.50000000"
    assert ended["data"]["reward_count"] == 2
    late = await reward(server, session_id, 3)
    assert late["error"]["code"] == "conflict" and "Ended" in late["error"]["message"]
    user_id = uuid.UUID(alice["user"]["id"])
    assert await db.fetchval("SELECT total_balance FROM users WHERE id = $1", user_id) == Decimal("19.5")
    rows = await db.fetch("SELECT seq, reward_value, player_wallet FROM game_rewards WHERE session_id = $1 ORDER BY seq",
                          session_id)
    assert [(r["seq"], r["reward_value"]) for r in rows] == [(1, Decimal("12.5")), (2, Decimal(7))]
    assert rows[0]["player_wallet"] == f"user:{user_id}"
    # The REST view and a new session after the end.
    view = await (await client.get(f"/api/v1/game-sessions/{session_id}")).json()
    assert view["data"]["status"] == "Ended" and [r["seq"] for r in view["data"]["rewards"]] == [2, 1]
    assert await start(sock, game["game_id"]) != session_id


async def test_replayed_seq_is_idempotent(client, db, sockets):
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin)
    alice, sock = await player(client, sockets)
    session_id = await start(sock, game["game_id"])
    server = await game_server(client, sockets, token)
    first = await reward(server, session_id, 7, "10")
    before = await written(db, session_id)
    assert await reward(server, session_id, 7, "10") == first
    assert await reward(server, session_id, 7, "10.00000000") == first
    rest = await client.post(f"/api/v1/game-sessions/{session_id}/rewards", headers={"Authorization": f"Game {token}"},
                             json={"seq": 7, "reward_type": "coin", "value": "10"})
    assert (await rest.json()) == first
    changed = await reward(server, session_id, 7, "11")
    assert changed["error"]["code"] == "conflict" and changed["error"]["field"] == "seq"
    assert await written(db, session_id) == before
    # One ledger row for the reward, one for the owner's revenue share on it.
    assert before["rewards"] == 1 and before["balance"] == Decimal(10) and before["ledger"] == 2
    # One reward, one event: replays publish nothing.
    await asyncio.sleep(0.3)
    history = await client.app[REALTIME].replay(f"session:{session_id}", "0-0")
    assert [e.type for e in history.events] == ["reward_earned"]


def coin(session_id: int, seq: int, value: str) -> dict:
    return {"session_id": session_id, "seq": seq, "reward_type": "coin", "value": value}


async def test_a_batch_of_reports_is_decided_report_by_report_and_replays_whole(client, db, sockets):
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin)
    other_game, _ = await create_game(client, admin, name="Other")
    alice = await start((await player(client, sockets))[1], game["game_id"])
    bob = await start((await player(client, sockets))[1], game["game_id"])
    foreign = await start((await player(client, sockets))[1], other_game["game_id"])
    server = await game_server(client, sockets, token)
    first = await reward(server, alice, 1, "10")
    reports = [coin(alice, 2, "2.5"), coin(bob, 1, "4"),
               coin(alice, 1, "10"),  # a replay of the report above
               coin(bob, 2, "0"), coin(bob, 3, "60"),  # not a reward; over the game's 50 per event
               coin(foreign, 1, "1"), coin(987_654, 1, "1"),  # another game's session; no session
               coin(alice, 2, "3"),  # the same seq as the first of this batch, another value
               coin(bob, 4, "1")]
    ack = await server.call("/games", "report_rewards", {"rewards": reports})
    assert ack["ok"], ack
    results = ack["data"]["results"]
    assert [r["ok"] for r in results] == [True, True, True, False, False, False, False, False, True]
    assert [r["data"]["session_total"] for r in results if r["ok"]] == [
        "12.50000000", "4.00000000", first["data"]["session_total"], "5.00000000"]
    assert results[2] == first
    assert [(r["error"]["code"], r["error"]["field"]) for r in results if not r["ok"]] == [
        ("invalid_payload", "value"), ("invalid_payload", "value"), ("forbidden", "session_id"),
        ("not_found", "session_id"), ("conflict", "seq")]
    assert results[4]["error"]["policy"] == "max_reward_per_event"
    booked = [(r["session_id"], r["seq"], r["reward_value"]) for r in await db.fetch(
        "SELECT session_id, seq, reward_value FROM game_rewards ORDER BY reward_id")]
    assert booked == [(alice, 1, Decimal(10)), (alice, 2, Decimal("2.5")), (bob, 1, Decimal(4)), (bob, 4, Decimal(1))]
    before = (await written(db, alice), await written(db, bob))
    # The same batch again, over REST: every report answers as it did, and nothing more is written.
    rest = await client.post("/api/v1/game-rewards", json={"rewards": reports},
                             headers={"Authorization": f"Game {token}"})
    assert rest.status == 200
    assert (await rest.json())["data"]["results"] == results
    assert (await written(db, alice), await written(db, bob)) == before
    await asyncio.sleep(0.3)
    history = await client.app[REALTIME].replay(f"game:{game['game_id']}", "0-0")
    assert [e.data["seq"] for e in history.events if e.type == "reward_earned"] == [1, 2, 1, 4]


async def test_a_batch_is_for_game_servers_within_their_budget_and_its_size(settings, aiohttp_client, db, sockets):
    client = await aiohttp_client(create_app(settings.replace(game_server_event_rate=1.0,
                                                              game_server_event_burst=10)))
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin)
    alice, sock = await player(client, sockets)
    session_id = await start(sock, game["game_id"])
    own = await sock.call("/games", "report_rewards", {"rewards": [coin(session_id, 1, "1")]})
    assert own["error"]["code"] == "forbidden"
    as_player = await client.post("/api/v1/game-rewards", json={"rewards": [coin(session_id, 1, "1")]},
                                  headers=bearer(alice["token"]))
    assert as_player.status == 403
    server = await game_server(client, sockets, token)
    for payload, field in (({"rewards": []}, "rewards"), ({"rewards": [coin(session_id, 1, "1")] * 201}, "rewards"),
                           ({"rewards": [{**coin(session_id, 1, "1"), "extra": 1}]}, "rewards.0.extra")):
        refused = await server.call("/games", "report_rewards", payload)
        assert refused["error"]["code"] == "invalid_payload" and refused["error"]["field"] == field, refused
    # The connection's budget (10 events, 1 a second) counts reports, not calls; the refused calls
    # above spent one each.
    over_burst = await server.call("/games", "report_rewards", {"rewards": [coin(session_id, seq, "1")
                                                                           for seq in range(11)]})
    assert over_burst["error"]["code"] == "invalid_payload" and "at most 10" in over_burst["error"]["message"]
    limited = await server.call("/games", "report_rewards", {"rewards": [coin(session_id, seq, "1")
                                                                        for seq in range(8)]})
    assert limited["error"]["code"] == "rate_limited" and limited["error"]["retry_after"] > 0
    assert await db.fetchval("SELECT count(*) FROM game_rewards") == 0


async def test_a_batch_the_booking_queue_cannot_hold_is_refused_whole(settings, aiohttp_client, db, sockets):
    client = await aiohttp_client(create_app(settings.replace(game_reward_queue_max=5)))
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin)
    session_id = await start((await player(client, sockets))[1], game["game_id"])
    server = await game_server(client, sockets, token)
    too_many = [coin(session_id, seq, "1") for seq in range(1, 7)] + [coin(session_id, 7, "0")]
    results = (await server.call("/games", "report_rewards", {"rewards": too_many}))["data"]["results"]
    assert [r["error"]["code"] for r in results] == ["rate_limited"] * 6 + ["invalid_payload"]
    assert all(r["error"]["retry_after"] > 0 for r in results[:6])
    assert await db.fetchval("SELECT count(*) FROM game_rewards") == 0
    fits = (await server.call("/games", "report_rewards", {"rewards": too_many[:5]}))["data"]["results"]
    assert [r["data"]["seq"] for r in fits] == [1, 2, 3, 4, 5]
    assert await db.fetchval("SELECT count(*) FROM game_rewards") == 5


async def test_over_policy_reward_is_refused_and_nothing_is_written(client, db, sockets):
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin, reward_types=["coin", "gem"])
    _, sock = await player(client, sockets)
    session_id = await start(sock, game["game_id"])
    server = await game_server(client, sockets, token)
    before = await written(db, session_id)
    per_event = await reward(server, session_id, 1, "50.00000001")
    assert per_event["error"]["code"] == "invalid_payload" and per_event["error"]["field"] == "value"
    assert per_event["error"]["policy"] == "max_reward_per_event" and per_event["error"]["limit"] == "50.00000000"
    wrong_type = await reward(server, session_id, 1, "1", reward_type="xp")
    assert wrong_type["error"]["field"] == "reward_type"
    bad_value = await reward(server, session_id, 1, "0")
    assert bad_value["error"]["code"] == "invalid_payload"
    assert await written(db, session_id) == before
    # 4 x 50 fills the minute; the 5th is refused with a retry hint and changes nothing.
    for seq in range(1, 5):
        assert (await reward(server, session_id, seq, "50"))["ok"]
    filled = await written(db, session_id)
    per_minute = await reward(server, session_id, 5, "1")
    assert per_minute["error"]["code"] == "rate_limited" and per_minute["error"]["policy"] == "max_reward_per_minute"
    assert 0 < per_minute["error"]["retry_after"] <= 60
    assert await written(db, session_id) == filled
    # The session cap (500): age the rewards past the minute window, then fill up to 500.
    age = "UPDATE game_rewards SET created_at = created_at - interval '2 minutes' WHERE session_id = $1"
    await db.execute(age, session_id)
    for seq in range(5, 11):
        if seq == 9:
            await db.execute(age, session_id)
        assert (await reward(server, session_id, seq, "50"))["ok"]
    await db.execute(age, session_id)
    at_cap = await written(db, session_id)
    assert at_cap["earned"] == Decimal(500)
    over = await reward(server, session_id, 11, "0.5")
    assert over["error"]["code"] == "conflict" and over["error"]["policy"] == "max_reward_per_session"
    assert await written(db, session_id) == at_cap


async def window(conn, session_id: int, reports: int = 5) -> dict:
    """The minute window a reward batch of `reports` reports of this session would be decided on
    (by default enough to reach POLICY's limit per minute, so it reads the oldest reward's time)."""
    return (await game_queries.lock_batch(conn, [(session_id, 0)] * reports, GAMES_POOL))[1].windows


async def test_the_minute_window_is_exact_and_a_late_starting_batch_books_at_the_sessions_latest_time(
        client, db, db_dsn, sockets):
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin)
    _, sock = await player(client, sockets)
    session_id = await start(sock, game["game_id"])
    server = await game_server(client, sockets, token)
    for seq, value in ((1, "10"), (2, "20"), (3, "30")):
        assert (await reward(server, session_id, seq, value))["ok"]
    # Seq 1 and 2 leave the window: only seq 3 is in it, and its time is the oldest.
    await db.execute("UPDATE game_rewards SET created_at = created_at - interval '2 minutes' "
                     "WHERE session_id = $1 AND seq < 3", session_id)
    third = await db.fetchval("SELECT created_at FROM game_rewards WHERE session_id = $1 AND seq = 3", session_id)
    assert await window(db, session_id) == {session_id: (Decimal(30), third)}
    # Three reports of at most 50 cannot take 30 past 200 a minute: the oldest's time is not read.
    assert await window(db, session_id, reports=3) == {session_id: (Decimal(30), None)}
    # A batch whose transaction began before seq 4 was booked books after it: its reward is not
    # stamped earlier than seq 4, so the window still counts both.
    late = await asyncpg.connect(db_dsn)
    await init_connection(late)
    batch = late.transaction()
    await batch.start()
    try:
        began = await late.fetchval("SELECT now()")
        assert (await reward(server, session_id, 4, "4"))["ok"]
        fourth = await db.fetchval("SELECT created_at FROM game_rewards WHERE session_id = $1 AND seq = 4",
                                   session_id)
        assert began < fourth
        [ack], new = await games.book_rewards(late, [games.RewardReport(
            game_id=game["game_id"], session_id=session_id, seq=5, reward_type="coin", value=Decimal(5))])
        assert new == 1 and ack["session_total"] == "69.00000000"
        assert await late.fetchval("SELECT created_at FROM game_rewards WHERE session_id = $1 AND seq = 5",
                                   session_id) == fourth
        assert await window(late, session_id) == {session_id: (Decimal(39), third)}
    finally:
        await batch.rollback()
        await late.close()
    assert await window(db, session_id) == {session_id: (Decimal(34), third)}
    assert await window(db, session_id + 1000) == {}


async def test_a_batch_that_waited_for_its_session_sees_what_the_lock_holder_booked(client, db, db_dsn, sockets):
    admin = await make_admin(client, db)
    game, _ = await create_game(client, admin)
    _, sock = await player(client, sockets)
    session_id = await start(sock, game["game_id"])
    report = games.RewardReport(game_id=game["game_id"], session_id=session_id, seq=1, reward_type="coin",
                                value=Decimal(7))
    holder, waiter = await asyncpg.connect(db_dsn), await asyncpg.connect(db_dsn)
    try:
        for conn in (holder, waiter):
            await init_connection(conn)
        # The holder books seq 1 and keeps the session locked; the same report, sent again,
        # waits for the lock in a statement whose snapshot cannot show seq 1.
        booking = holder.transaction()
        await booking.start()
        [first], new = await games.book_rewards(holder, [report])
        assert new == 1
        replay = asyncio.create_task(games.book_rewards(waiter, [report]))
        await wait_until(lambda: db.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                                             waiter.get_server_pid()), timeout=5)
        await booking.commit()
        [again], new = await asyncio.wait_for(replay, 5)
    finally:
        await holder.close()
        await waiter.close()
    # A replay, acked as the first booking was, not a second reward nor a unique-key failure.
    assert new == 0 and again == first
    assert await db.fetchval("SELECT count(*) FROM game_rewards WHERE session_id = $1", session_id) == 1
    assert await window(db, session_id) == {session_id: (Decimal(7), await db.fetchval(
        "SELECT created_at FROM game_rewards WHERE session_id = $1", session_id))}


async def test_forged_or_foreign_game_tokens_are_refused(client, db, sockets):
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin)
    other_game, other_token = await create_game(client, admin, name="Other")
    _, sock = await player(client, sockets)
    session_id = await start(sock, game["game_id"])
    forged = sockets()
    with pytest.raises(Exception):
        await forged.sio.connect(server_url(client), namespaces=["/games"], transports=["websocket"],
                                 auth={"game_token": token[:-4] + "AAAA"}, wait_timeout=5)
    assert forged.connect_errors and forged.connect_errors[-1]["data"]["code"] == "unauthorized"
    url = f"/api/v1/game-sessions/{session_id}/rewards"
    body = {"seq": 1, "reward_type": "coin", "value": "5"}
    response = await client.post(url, json=body, headers={"Authorization": f"Game {token}x"})
    assert response.status == 401 and (await response.json())["error"]["code"] == "unauthorized"
    other = await game_server(client, sockets, other_token)
    foreign = await reward(other, session_id, 1)
    assert foreign["error"]["code"] == "forbidden"
    # A rotated token stops working; the new one works.
    rotated = await client.post(f"/api/v1/games/{game['game_id']}/token", headers=bearer(admin["token"]))
    new_token = (await rotated.json())["data"]["game_token"]
    assert (await client.post(url, json=body, headers={"Authorization": f"Game {token}"})).status == 401
    ok = await client.post(url, json=body, headers={"Authorization": f"Game {new_token}"})
    assert ok.status == 200 and (await ok.json())["data"]["session_total"] == "5.00000000"
    assert await db.fetchval("SELECT count(*) FROM game_rewards") == 1
    assert await db.fetchval("SELECT token_hash FROM games WHERE game_id = $1", other_game["game_id"]) != other_token


async def test_a_user_cannot_report_rewards_or_end_another_players_session(client, db, sockets):
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin)
    alice, alice_sock = await player(client, sockets)
    bob, bob_sock = await player(client, sockets)
    session_id = await start(alice_sock, game["game_id"])
    own = await reward(alice_sock, session_id, 1)
    assert own["error"]["code"] == "forbidden"
    assert (await reward(bob_sock, session_id, 1))["error"]["code"] == "forbidden"
    ended = await bob_sock.call("/games", "end_session", {"session_id": session_id})
    assert ended["error"]["code"] == "forbidden"
    anonymous = sockets()
    await anonymous.connect(server_url(client), "/games")
    assert (await anonymous.call("/games", "end_session", {"session_id": session_id}))["error"]["code"] == "unauthorized"
    assert (await anonymous.call("/games", "start_session", {"game_id": game["game_id"]}))["error"]["code"] == "unauthorized"
    rest = await client.post(f"/api/v1/game-sessions/{session_id}/rewards", headers=bearer(alice["token"]),
                             json={"seq": 1, "reward_type": "coin", "value": "5"})
    assert rest.status == 403
    rest_end = await client.post(f"/api/v1/game-sessions/{session_id}/end", headers=bearer(bob["token"]))
    assert rest_end.status == 403
    assert await db.fetchval("SELECT count(*) FROM game_rewards") == 0
    assert await db.fetchval("SELECT status FROM game_sessions WHERE session_id = $1", session_id) == "Active"
    # The game's server may end it.
    server = await game_server(client, sockets, token)
    assert (await server.call("/games", "end_session", {"session_id": session_id}))["data"]["status"] == "Ended"


async def test_concurrent_reports_stay_consistent_and_balance_equals_the_ledger(client, db, sockets):
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin, policy={
        "max_reward_per_event": "100", "max_reward_per_minute": "100000", "max_reward_per_session": "100000"})
    alice, sock = await player(client, sockets)
    session_id = await start(sock, game["game_id"])
    servers = [await game_server(client, sockets, token) for _ in range(3)]
    values = {seq: Decimal(seq % 7 + 1) / 4 for seq in range(1, 151)}
    # Every seq is sent by two connections at once, so replays race with first reports.
    calls = [reward(servers[(seq + k) % 3], session_id, seq, str(values[seq])) for seq in values for k in (0, 1)]
    acks = await asyncio.gather(*calls)
    assert all(a["ok"] for a in acks), [a for a in acks if not a["ok"]][:3]
    by_seq: dict[int, dict] = {}
    for ack in acks:
        assert by_seq.setdefault(ack["data"]["seq"], ack["data"]) == ack["data"]
    expected = sum(values.values())
    user_id = uuid.UUID(alice["user"]["id"])
    state = await written(db, session_id)
    assert state["rewards"] == 150 and state["earned"] == expected and state["balance"] == expected
    assert await db.fetchval("SELECT coalesce(sum(delta), 0) FROM balance_ledger WHERE user_id = $1", user_id) == expected
    assert await db.fetchval("SELECT reward_count FROM game_sessions WHERE session_id = $1", session_id) == 150
    # Running totals are a strict chain: each reward's total is the previous total plus its value.
    rows = await db.fetch("SELECT reward_value, session_total FROM game_rewards WHERE session_id = $1 "
                          "ORDER BY session_total", session_id)
    running = Decimal(0)
    for row in rows:
        running += row["reward_value"]
        assert row["session_total"] == running
    ledger = await db.fetch("SELECT delta, balance_after FROM balance_ledger WHERE user_id = $1 ORDER BY entry_id",
                            user_id)
    running = Decimal(0)
    for entry in ledger:
        running += entry["delta"]
        assert entry["balance_after"] == running
    ingest = client.app[GAMES].ingest
    assert ingest.booked == 150 and ingest.batches < 300  # replays book nothing; reports were batched


async def test_batches_booking_at_once_never_share_a_session(client, db, sockets, monkeypatch):
    """A game server with several reports of a session in flight: a batch that booked beside another
    batch holding the same session found it moved, was refused whole and booked again locked, and
    under load those retries snowballed (seconds of ack latency at 6,500 rewards/s)."""
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin, policy={
        "max_reward_per_event": "100", "max_reward_per_minute": "100000", "max_reward_per_session": "100000"})
    sessions = [await start((await player(client, sockets))[1], game["game_id"]) for _ in range(6)]
    early, late = sessions[:3], sessions[3:]
    servers = [await game_server(client, sockets, token) for _ in range(3)]
    booking: list[set[int]] = []  # the sessions of each batch being booked now
    overlaps: list[set[int]] = []
    alongside: list[set[int]] = []  # sessions booked while another batch was
    book_rewards = games.book_rewards

    async def booked_in_view(conn, batch, *args, **kwargs):
        mine = {report.session_id for report in batch}
        overlaps.extend(mine & other for other in booking if mine & other)
        if booking:
            alongside.append(mine)
        booking.append(mine)
        try:
            await asyncio.sleep(0.25)  # the first batch is still booking when the second wave comes
            return await book_rewards(conn, batch, *args, **kwargs)
        finally:
            booking.remove(mine)

    def send(wave: list[tuple[int, int]]) -> list[asyncio.Task]:
        return [asyncio.create_task(reward(servers[n % 3], session_id, seq, "0.5"))
                for n, (session_id, seq) in enumerate(wave)]

    monkeypatch.setattr(games, "book_rewards", booked_in_view)
    first = send([(session_id, seq) for seq in (1, 2, 3) for session_id in early])
    await wait_until(lambda: booking)
    second = send([(session_id, seq) for seq in (4, 5, 6) for session_id in early]
                  + [(session_id, seq) for seq in (1, 2, 3) for session_id in late])
    acks = await asyncio.gather(*first, *second)
    assert all(a["ok"] for a in acks), [a for a in acks if not a["ok"]][:3]
    assert overlaps == []
    # The sessions no batch held were booked alongside the first batch, not after it.
    assert set(late) <= set().union(*alongside)
    for session_id, rewards in [(s, 6) for s in early] + [(s, 3) for s in late]:
        state = await written(db, session_id)
        assert state["rewards"] == rewards and state["earned"] == state["balance"] == Decimal("0.5") * rewards


async def test_idle_sessions_time_out(aiohttp_client, settings, db, sockets):
    client = await aiohttp_client(create_app(settings.replace(game_session_idle_seconds=1.0)))
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin)
    _, sock = await player(client, sockets)
    _, sock2 = await player(client, sockets)
    idle_id = await start(sock, game["game_id"])
    kept_id = await start(sock2, game["game_id"])

    async def heartbeats() -> None:
        while True:
            assert (await sock2.call("/games", "heartbeat_session", {"session_id": kept_id}))["ok"]
            await asyncio.sleep(0.15)

    beating = asyncio.create_task(heartbeats())
    try:
        # With `since`: on a loaded machine the session may time out before this subscribe.
        watch = await sock.call("/games", "subscribe", {"channel": f"session:{idle_id}", "since": "0-0"})
        assert watch["ok"] and watch["data"]["presence"] == 1
        replayed = [e for e in watch["data"]["events"] if e["type"] == "session_ended"]
        server = await game_server(client, sockets, token)
        await wait_until(lambda: replayed or received(sock, "session_ended"), timeout=10)
        event = (replayed or received(sock, "session_ended"))[0]
        assert event["data"]["session_id"] == idle_id and event["data"]["status"] == "TimedOut"
        statuses = dict(await db.fetch("SELECT session_id, status FROM game_sessions"))
        assert statuses == {idle_id: "TimedOut", kept_id: "Active"}
    finally:
        beating.cancel()
    late = await reward(server, idle_id, 1)
    assert late["error"]["code"] == "conflict"


async def test_a_spectator_sees_rewards_and_leaderboard_changes(client, db, sockets):
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin)
    spectator = sockets()
    await spectator.connect(server_url(client), "/games")
    channel = f"game:{game['game_id']}"
    sub = await spectator.call("/games", "subscribe", {"channel": channel})
    assert sub["ok"] and sub["data"]["presence"] == 1
    alice, alice_sock = await player(client, sockets)
    bob, bob_sock = await player(client, sockets)
    alice_session, bob_session = await start(alice_sock, game["game_id"]), await start(bob_sock, game["game_id"])
    session_sub = await spectator.call("/games", "subscribe", {"channel": f"session:{bob_session}"})
    assert session_sub["ok"]
    server = await game_server(client, sockets, token)
    for seq in range(1, 4):
        assert (await reward(server, alice_session, seq, "5"))["ok"]
    assert (await reward(server, bob_session, 1, "40"))["ok"]

    def on(channel_name: str) -> list[dict]:
        return [e["data"] for e in received(spectator, "reward_earned") if e["channel"] == channel_name]

    # The relay publishes the session channel's copy after the game channel's, so wait for both.
    await wait_until(lambda: len(on(channel)) == 4 and len(on(f"session:{bob_session}")) >= 1)
    earned = on(channel)
    assert [e["session_total"] for e in earned if e["session_id"] == alice_session] == [
        "5.00000000", "10.00000000", "15.00000000"]
    assert earned[-1]["user_id"] == bob["user"]["id"] and earned[-1]["value"] == "40.00000000"
    assert [e["seq"] for e in on(f"session:{bob_session}")] == [1]

    def final_board():
        boards = [e["data"] for e in received(spectator, "leaderboard_changed")]
        return boards and [(x["username"], x["total"]) for x in boards[-1]["entries"]] == [
            (bob["user"]["username"], "40.00000000"), (alice["user"]["username"], "15.00000000")]

    await wait_until(final_board)
    board = received(spectator, "leaderboard_changed")[-1]
    assert board["channel"] == channel and board["data"]["period"] == "day"
    assert board["data"]["entries"][0]["rank"] == 1
    # A burst is throttled: far fewer leaderboard events than rewards.
    assert len(received(spectator, "leaderboard_changed")) < 4
    rest = await (await client.get(f"/api/v1/games/{game['game_id']}/leaderboard?period=all")).json()
    assert [x["total"] for x in rest["data"]["entries"]] == ["40.00000000", "15.00000000"]


async def test_a_period_leaderboard_counts_the_rewards_in_the_period_and_skips_sessions_ended_before_it(
        client, db, sockets):
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin)
    server = await game_server(client, sockets, token)
    (alice, alice_sock), (bob, bob_sock), (_, carol_sock) = [await player(client, sockets) for _ in range(3)]
    alice_session, bob_old, carol_session = [await start(sock, game["game_id"])
                                             for sock in (alice_sock, bob_sock, carol_sock)]
    for seq, value in ((1, "10"), (2, "20"), (3, "30")):
        assert (await reward(server, alice_session, seq, value))["ok"]
    assert (await reward(server, bob_old, 1, "40"))["ok"]
    assert (await bob_sock.call("/games", "end_session", {"session_id": bob_old}))["ok"]
    assert (await reward(server, carol_session, 1, "7"))["ok"]
    # Two hours back: alice's first two rewards, carol's only one and bob's whole first session.
    await db.execute("""UPDATE game_rewards SET created_at = created_at - interval '2 hours'
                        WHERE seq < 3 AND session_id = $1 OR session_id IN ($2, $3)""",
                     alice_session, bob_old, carol_session)
    await db.execute("""UPDATE game_sessions SET session_start = session_start - interval '2 hours',
                                                 session_end = session_end - interval '2 hours'
                        WHERE session_id = $1""", bob_old)
    bob_new = await start(bob_sock, game["game_id"])
    assert (await reward(server, bob_new, 1, "5"))["ok"]

    async def board(since) -> list[tuple[str, Decimal]]:
        return [(e.username, e.total) for e in await game_queries.leaderboard(db, game["game_id"], since, 10)]

    hour_ago = await db.fetchval("SELECT now() - interval '1 hour'")
    assert await board(hour_ago) == [(alice["user"]["username"], Decimal(30)), (bob["user"]["username"], Decimal(5))]
    assert [total for _, total in await board(None)] == [Decimal(60), Decimal(45), Decimal(7)]


async def test_developer_games_wait_for_an_admin_and_rest_sessions_work(client, db, sockets):
    admin = await make_admin(client, db)
    developer = await register(client)
    game, token = await create_game(client, developer)
    assert game["status"] == "pending" and game["owner_id"] == developer["user"]["id"]
    assert game["policy"]["max_reward_per_session"] == "500.00000000" and game["revenue_share"] == "0.15"
    assert await db.fetchval("SELECT token_hash FROM games WHERE game_id = $1", game["game_id"]) != token
    player_user = await register(client)
    start_rest = await client.post("/api/v1/game-sessions", json={"game_id": game["game_id"]},
                                   headers=bearer(player_user["token"]))
    assert start_rest.status == 409
    activate = await client.patch(f"/api/v1/games/{game['game_id']}", json={"status": "active"},
                                  headers=bearer(developer["token"]))
    assert activate.status == 403
    activate = await client.patch(f"/api/v1/games/{game['game_id']}", json={"status": "active"},
                                  headers=bearer(admin["token"]))
    assert activate.status == 200 and (await activate.json())["data"]["status"] == "active"
    listed = await (await client.get("/api/v1/games?status=active")).json()
    assert [g["game_id"] for g in listed["data"]["games"]] == [game["game_id"]]
    started = await client.post("/api/v1/game-sessions", json={"game_id": game["game_id"]},
                                headers=bearer(player_user["token"]))
    assert started.status == 201
    session_id = (await started.json())["data"]["session_id"]
    game_auth = {"Authorization": f"Game {token}"}
    ack = await client.post(f"/api/v1/game-sessions/{session_id}/rewards", headers=game_auth,
                            json={"seq": 0, "reward_type": "coin", "value": 3})
    assert (await ack.json())["data"]["session_total"] == "3.00000000"
    beat = await client.post(f"/api/v1/game-sessions/{session_id}/heartbeat", headers=bearer(player_user["token"]))
    assert beat.status == 200
    end = await client.post(f"/api/v1/game-sessions/{session_id}/end", headers=game_auth)
    assert (await end.json())["data"]["status"] == "Ended"
    missing = await client.get("/api/v1/games/999999")
    assert missing.status == 404



async def test_rewards_record_activity_once_per_step_and_the_sweep_allows_for_it(client, db, sockets):
    # Reward batches write last_activity_at (an indexed column) at most once per step, so most of
    # their updates stay HOT; the idle sweep adds the step, so no rewarded session ends early.
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin)
    _, sock = await player(client, sockets)
    session_id = await start(sock, game["game_id"])
    server = await game_server(client, sockets, token)
    step = client.app[GAMES].ingest.activity_step
    assert step == games.activity_step(client.app[SETTINGS].game_session_idle_seconds) > 0

    async def seen_seconds_ago(seconds: float) -> None:
        await db.execute("UPDATE game_sessions SET last_activity_at = now() - make_interval(secs => $2) "
                         "WHERE session_id = $1", session_id, seconds)

    async def recorded_age() -> float:
        return await db.fetchval("SELECT extract(epoch FROM now() - last_activity_at)::float8 FROM game_sessions "
                                 "WHERE session_id = $1", session_id)

    await seen_seconds_ago(step / 2)
    assert (await reward(server, session_id, 1))["ok"]
    assert step / 2 - 1 < await recorded_age() <= step / 2 + 1  # within the step: left as it was
    await seen_seconds_ago(step + 5)
    assert (await reward(server, session_id, 2))["ok"]
    assert await recorded_age() < 2  # older than the step: now
    assert await db.fetchval("SELECT reward_count FROM game_sessions WHERE session_id = $1", session_id) == 2

    idle = 10.0
    await seen_seconds_ago(idle + games.activity_step(idle) / 2)  # idle by its record, maybe not in fact
    assert await games.sweep_idle(client.app[POOL], idle) == 0
    await seen_seconds_ago(idle + games.activity_step(idle) + 1)
    assert await games.sweep_idle(client.app[POOL], idle) == 1
    assert await db.fetchval("SELECT status FROM game_sessions WHERE session_id = $1", session_id) == "TimedOut"
