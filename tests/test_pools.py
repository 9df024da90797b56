"""Pools fund what they promise: game rewards and the owner's revenue share are drawn from the
`gaming` pool, exactly and never past what it holds (also when batches race), a dry pool refuses
with `pool_exhausted` and books nothing, and pool allocations are listed for users and admins."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import asyncpg
import pytest

from db import games as game_queries
from db import users as user_queries
from db.pool import init_connection
from server.core.protocol import MAX_INTEGER_ID
from server.services import games
from server.services.chain import allocate, verify_chain
from tests.helpers import register, wait_until
from tests.test_games import bearer, create_game, make_admin

pytestmark = pytest.mark.usefixtures("chain_verified")

UNLIMITED = {"max_reward_per_event": "1000", "max_reward_per_minute": "100000", "max_reward_per_session": "100000"}


async def gaming_pool(db, total: Decimal | int | str) -> int:
    return await db.fetchval("INSERT INTO reward_pools (pool_name, total_tokens) VALUES ($1, $2) RETURNING pool_id",
                             games.GAMING_POOL, Decimal(total))


async def pool_state(db, pool_id: int) -> tuple[Decimal, Decimal]:
    row = await db.fetchrow("SELECT total_tokens, allocated_tokens FROM reward_pools WHERE pool_id = $1", pool_id)
    return row["total_tokens"], row["allocated_tokens"]


async def rest_session(client, game_id: int) -> tuple[dict, int]:
    """A new player with a running session of the game."""
    player = await register(client)
    started = await client.post("/api/v1/game-sessions", json={"game_id": game_id}, headers=bearer(player["token"]))
    assert started.status == 201, await started.text()
    return player, (await started.json())["data"]["session_id"]


async def report(client, token: str, session_id: int, seq: int, value: str):
    return await client.post(f"/api/v1/game-sessions/{session_id}/rewards", headers={"Authorization": f"Game {token}"},
                             json={"seq": seq, "reward_type": "coin", "value": value})


async def balance(db, user: dict) -> Decimal:
    return await db.fetchval("SELECT total_balance FROM users WHERE id = $1", uuid.UUID(user["user"]["id"]))


async def everything(db) -> dict:
    """What a reward writes anywhere, to compare before and after a refusal."""
    return dict(await db.fetchrow(
        """SELECT (SELECT count(*) FROM game_rewards) AS rewards, (SELECT count(*) FROM balance_ledger) AS ledger,
                  (SELECT sum(total_balance) FROM users) AS balances,
                  (SELECT sum(allocated_tokens) FROM reward_pools) AS drawn,
                  (SELECT sum(rewards_earned) FROM game_sessions) AS earned,
                  (SELECT sum(reward_count) FROM game_sessions) AS reward_count"""))


async def test_rewards_draw_the_pool_and_pay_the_owner_a_truncated_share(client, db):
    pool_id = await gaming_pool(db, 1000)
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin, revenue_share="0.33333333", policy=UNLIMITED)
    player, session_id = await rest_session(client, game["game_id"])
    # value -> the owner's share: value * 0.33333333 truncated to 8 decimals (never rounded up).
    expected = {"10": Decimal("3.33333330"), "0.00000007": Decimal("0.00000002"), "3.3": Decimal("1.09999998"),
                "0.00000002": Decimal(0)}
    reward_ids = {}
    for seq, value in enumerate(expected):
        response = await report(client, token, session_id, seq, value)
        assert response.status == 200, await response.text()
        reward_ids[value] = (await response.json())["data"]["reward_id"]
    paid = sum(Decimal(value) for value in expected)
    shares = sum(expected.values())
    assert await balance(db, player) == paid
    assert await balance(db, admin) == shares
    rows = await db.fetch("SELECT reference, delta FROM balance_ledger WHERE reason = 'revenue_share' AND user_id = $1",
                          uuid.UUID(admin["user"]["id"]))
    assert {row["reference"]: row["delta"] for row in rows} == {
        str(reward_ids[value]): share for value, share in expected.items() if share > 0}
    stored = await db.fetch("SELECT reward_id, pool_id, owner_share FROM game_rewards")
    assert {row["reward_id"]: (row["pool_id"], row["owner_share"]) for row in stored} == {
        reward_ids[value]: (pool_id, share) for value, share in expected.items()}
    # The pool paid exactly the rewards and the shares, and a replay draws nothing more.
    assert await pool_state(db, pool_id) == (Decimal(1000), paid + shares)
    assert (await report(client, token, session_id, 0, "10")).status == 200
    assert await pool_state(db, pool_id) == (Decimal(1000), paid + shares)
    listed = await (await client.get("/api/v1/reward-pools")).json()
    gaming = next(pool for pool in listed["data"]["pools"] if pool["id"] == pool_id)
    assert Decimal(gaming["remaining_tokens"]) == 1000 - paid - shares


async def test_an_ownerless_game_pays_no_share(client, db):
    pool_id = await gaming_pool(db, 100)
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin, revenue_share="0.5", policy=UNLIMITED)
    await db.execute("UPDATE games SET owner_id = NULL WHERE game_id = $1", game["game_id"])
    player, session_id = await rest_session(client, game["game_id"])
    assert (await report(client, token, session_id, 1, "8")).status == 200
    assert await balance(db, player) == 8 and await balance(db, admin) == 0
    assert await pool_state(db, pool_id) == (Decimal(100), Decimal(8))


async def test_a_dry_pool_refuses_with_pool_exhausted_and_books_nothing(client, db):
    pool_id = await gaming_pool(db, 10)
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin, revenue_share="0.5", policy=UNLIMITED)
    player, session_id = await rest_session(client, game["game_id"])
    assert (await report(client, token, session_id, 1, "6")).status == 200  # 6 + 3 drawn, 1 left
    before = await everything(db)
    refused = await report(client, token, session_id, 2, "2")  # 2 + 1 > 1
    body = await refused.json()
    assert refused.status == 409, body
    assert body["error"]["code"] == "conflict" and body["error"]["reason"] == games.POOL_EXHAUSTED
    assert body["error"]["field"] == "value" and body["error"]["remaining"] == "1.00000000"
    assert body["error"]["pool"] == "gaming"
    assert await everything(db) == before
    # What still fits is paid; the refused seq was never booked, so it may be reported again.
    assert (await report(client, token, session_id, 3, "0.5")).status == 200  # 0.75 of the 1 left
    assert await pool_state(db, pool_id) == (Decimal(10), Decimal("9.75"))
    assert (await report(client, token, session_id, 2, "0.1")).status == 200
    assert await pool_state(db, pool_id) == (Decimal(10), Decimal("9.9"))
    assert await balance(db, player) == Decimal("6.6") and await balance(db, admin) == Decimal("3.3")


async def test_without_a_gaming_pool_every_reward_is_refused(client, db):
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin, policy=UNLIMITED)
    player, session_id = await rest_session(client, game["game_id"])
    before = await everything(db)
    refused = await report(client, token, session_id, 1, "1")
    assert refused.status == 409 and (await refused.json())["error"]["reason"] == games.POOL_EXHAUSTED
    assert await everything(db) == before


async def _players(db, game_id: int, count: int) -> list[int]:
    sessions = []
    for i in range(count):
        user = await user_queries.create_user(db, username=f"p{i}", email=f"p{i}@example.org", password_hash="x")
        session = await game_queries.start_session(db, game_id, user.id, f"user:{user.id}")
        sessions.append(session.session_id)
    return sessions


async def _game(db, revenue_share: str) -> tuple[int, uuid.UUID]:
    owner = await user_queries.create_user(db, username="owner", email="owner@example.org", password_hash="x")
    game = await game_queries.create_game(
        db, name="g", developer_wallet="dev", revenue_share=Decimal(revenue_share), owner_id=owner.id,
        status="active", token_hash="1" * 64, max_reward_per_event=Decimal(100),
        max_reward_per_minute=Decimal(100_000), max_reward_per_session=Decimal(100_000), reward_types=None)
    return game.game_id, owner.id


async def test_concurrent_batches_never_overdraw_the_pool(db, db_dsn):
    pool_id = await gaming_pool(db, 50)
    game_id, owner_id = await _game(db, "0.1")
    sessions = await _players(db, game_id, 6)
    # Six batches of ten 1-KVP rewards (1.1 drawn each with the share) race for 50 tokens.
    batches = [[games.RewardReport(game_id=game_id, session_id=session_id, seq=seq, reward_type="coin", value=Decimal(1))
                for seq in range(10)] for session_id in sessions]
    conns = await asyncpg.create_pool(db_dsn, min_size=6, max_size=6, init=init_connection)
    try:
        async def book(batch):
            async with conns.acquire() as conn:
                return await games.book_rewards(conn, batch)
        outcomes = await asyncio.gather(*(book(batch) for batch in batches))
    finally:
        await conns.close()
    booked = sum(new for _, new in outcomes)
    refusals = [result for results, _ in outcomes for result in results if isinstance(result, Exception)]
    assert booked == 45 and len(refusals) == 15  # 45 * 1.1 = 49.5; the next would need 50.6
    assert all(error.extra["reason"] == games.POOL_EXHAUSTED for error in refusals)
    total, drawn = await pool_state(db, pool_id)
    assert drawn == Decimal("49.5") <= total
    assert await db.fetchval("SELECT total_balance FROM users WHERE id = $1", owner_id) == Decimal("4.5")
    assert await db.fetchval("SELECT sum(reward_value) FROM game_rewards") == 45


@pytest.mark.parametrize("in_transaction", [False, True], ids=["one_statement", "locked"])
async def test_a_batch_that_loses_the_race_for_the_pool_is_decided_again(db, db_dsn, monkeypatch, in_transaction):
    reads = []
    real = game_queries.read_batch, game_queries.lock_batch, game_queries.reward_pool

    async def read_batch(conn, keys, pool_name):
        reads.append("read")
        return await real[0](conn, keys, pool_name)

    async def lock_batch(conn, keys, pool_name):
        reads.append("sessions locked")
        return await real[1](conn, keys, pool_name)

    async def reward_pool(conn, name, *, lock=False):
        reads.append("pool locked" if lock else "pool")
        return await real[2](conn, name, lock=lock)

    monkeypatch.setattr(game_queries, "read_batch", read_batch)
    monkeypatch.setattr(game_queries, "lock_batch", lock_batch)
    monkeypatch.setattr(game_queries, "reward_pool", reward_pool)
    pool_id = await gaming_pool(db, 10)
    game_id, owner_id = await _game(db, "0")
    [session_id] = await _players(db, game_id, 1)
    grantee = await user_queries.create_user(db, username="grantee", email="g@example.org", password_hash="x")
    other = await asyncpg.connect(db_dsn)
    booker = await asyncpg.connect(db_dsn)
    try:
        await init_connection(other)
        await init_connection(booker)
        # A grant takes 8 of the 10 and holds the pool row until it commits.
        granting = other.transaction()
        await granting.start()
        await allocate(other, pool_id, grantee.id, Decimal(8))
        report = games.RewardReport(game_id=game_id, session_id=session_id, seq=1, reward_type="coin",
                                    value=Decimal(5))

        async def book():
            if not in_transaction:
                return await games.book_rewards(booker, [report])
            async with booker.transaction():
                return await games.book_rewards(booker, [report])

        task = asyncio.create_task(book())
        # The batch read 10 left and waits on the pool row for its compare-and-set.
        booker_pid = booker.get_server_pid()
        await wait_until(lambda: db.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                                             booker_pid), timeout=5)
        await granting.commit()
        results, new = await asyncio.wait_for(task, 5)
    finally:
        await other.close()
        await booker.close()
    assert new == 0 and results[0].extra["reason"] == games.POOL_EXHAUSTED
    assert results[0].extra["remaining"] == "2.00000000"
    if in_transaction:
        # Decided with its sessions locked, lost the compare-and-set, decided again with the pool locked.
        assert reads == ["sessions locked", "sessions locked", "pool locked"]
    else:
        # Decided on an unlocked read, lost the compare-and-set, decided again with its sessions locked
        # (which reads the pool anew).
        assert reads == ["read", "sessions locked"]
    assert await pool_state(db, pool_id) == (Decimal(10), Decimal(8))
    assert await db.fetchval("SELECT count(*) FROM game_rewards") == 0
    assert await db.fetchval("SELECT count(*) FROM balance_ledger") == 1  # the grant's


async def test_an_owner_gone_between_the_read_and_the_booking_writes_nothing_then_books_without_the_share(
        db, db_dsn, monkeypatch):
    pool_id = await gaming_pool(db, 100)
    game_id, owner_id = await _game(db, "0.1")
    [session_id] = await _players(db, game_id, 1)
    real_read_batch = game_queries.read_batch
    reads = []

    async def read_then_delete_the_owner(conn, keys, pool_name):
        read = await real_read_batch(conn, keys, pool_name)
        reads.append(read)
        await db.execute("DELETE FROM users WHERE id = $1", owner_id)  # games.owner_id becomes NULL
        return read

    monkeypatch.setattr(game_queries, "read_batch", read_then_delete_the_owner)
    booker = await asyncpg.connect(db_dsn)
    try:
        await init_connection(booker)
        [ack], new = await games.book_rewards(booker, [games.RewardReport(
            game_id=game_id, session_id=session_id, seq=1, reward_type="coin", value=Decimal(10))])
    finally:
        await booker.close()
    # Decided with the owner's share, refused by the statement (nothing half-written), then decided
    # again with the sessions locked, where the game has no owner any more.
    [(sessions, _)] = reads
    assert sessions[session_id].owner_id == owner_id
    assert new == 1 and ack["value"] == "10.00000000"
    assert await pool_state(db, pool_id) == (Decimal(100), Decimal(10))
    assert await db.fetchval("SELECT owner_share FROM game_rewards") == 0
    assert [tuple(r) for r in await db.fetch("SELECT reason, delta FROM balance_ledger")] == [
        ("game_reward", Decimal(10))]
    assert [tuple(r) for r in await db.fetch("SELECT channel, also_channels, type FROM event_outbox")] == [
        (games.game_channel(game_id), [games.session_channel(session_id)], games.REWARD_EARNED)]


@pytest.mark.parametrize("meanwhile", ["booked", "ended"])
async def test_a_session_that_moved_between_the_read_and_the_booking_is_decided_again_locked(
        db, db_dsn, monkeypatch, meanwhile):
    pool_id = await gaming_pool(db, 100)
    game_id, _ = await _game(db, "0")
    first, second = await _players(db, game_id, 2)
    real_read_batch, real_lock_batch = game_queries.read_batch, game_queries.lock_batch
    reads = []

    async def read_then_move_the_second_session(conn, keys, pool_name):
        read = await real_read_batch(conn, keys, pool_name)
        if conn is db:  # the move's own booking
            return read
        reads.append("read")
        if meanwhile == "booked":  # another process books a reward for it (its total moves)
            [ack], _ = await games.book_rewards(db, [games.RewardReport(
                game_id=game_id, session_id=second, seq=1, reward_type="coin", value=Decimal(7))])
            assert ack["session_total"] == "7.00000000"
        else:
            await db.execute("UPDATE game_sessions SET status = 'Ended' WHERE session_id = $1", second)
        return read

    async def lock_batch(conn, keys, pool_name):
        reads.append("sessions locked")
        return await real_lock_batch(conn, keys, pool_name)

    monkeypatch.setattr(game_queries, "read_batch", read_then_move_the_second_session)
    monkeypatch.setattr(game_queries, "lock_batch", lock_batch)
    booker = await asyncpg.connect(db_dsn)
    try:
        await init_connection(booker)
        results, new = await games.book_rewards(booker, [
            games.RewardReport(game_id=game_id, session_id=first, seq=1, reward_type="coin", value=Decimal(3)),
            games.RewardReport(game_id=game_id, session_id=second, seq=2, reward_type="coin", value=Decimal(5))])
    finally:
        await booker.close()
    # Refused whole by the one statement (the other session's reward is not written either), then
    # decided again with both sessions locked, on what the move left.
    assert reads == ["read", "sessions locked"]
    assert results[0]["session_total"] == "3.00000000"
    rewards = {tuple(r) for r in await db.fetch("SELECT session_id, seq, session_total FROM game_rewards")}
    if meanwhile == "booked":
        assert new == 2 and results[1]["session_total"] == "12.00000000"
        assert rewards == {(first, 1, Decimal(3)), (second, 1, Decimal(7)), (second, 2, Decimal(12))}
        assert await pool_state(db, pool_id) == (Decimal(100), Decimal(15))
    else:
        assert new == 1 and isinstance(results[1], games.Conflict) and results[1].field == "session_id"
        assert rewards == {(first, 1, Decimal(3))}
        assert await pool_state(db, pool_id) == (Decimal(100), Decimal(3))
    assert await db.fetchval("SELECT sum(delta) FROM balance_ledger") == (15 if meanwhile == "booked" else 3)


async def test_allocations_are_listed_for_their_user_and_for_admins(client, db):
    admin = await make_admin(client, db)
    alice, bob = await register(client), await register(client)
    pool_id = await gaming_pool(db, 1000)
    other_pool = await db.fetchval("INSERT INTO reward_pools (pool_name, total_tokens) VALUES ('grants', 100) "
                                   "RETURNING pool_id")
    granted = []
    for user, pool, amount in [(alice, pool_id, "1"), (bob, pool_id, "2"), (alice, other_pool, "3"),
                               (alice, pool_id, "4"), (bob, other_pool, "5"), (alice, pool_id, "6")]:
        response = await client.post(f"/api/v1/admin/reward-pools/{pool}/allocations", headers=bearer(admin["token"]),
                                     json={"user_id": user["user"]["id"], "amount": amount})
        assert response.status == 201, await response.text()
        granted.append((user["user"]["id"], pool, (await response.json())["data"]["id"]))
    alice_ids = [aid for uid, _, aid in reversed(granted) if uid == alice["user"]["id"]]

    # A user pages through their own allocations, newest first, and sees nobody else's.
    seen, before = [], None
    while True:
        query = "?limit=3" + (f"&before={before}" if before else "")
        page = await (await client.get(f"/api/v1/me/pool-allocations{query}", headers=bearer(alice["token"]))).json()
        seen += page["data"]["items"]
        before = page["data"]["next"]
        if before is None:
            break
    assert [item["id"] for item in seen] == alice_ids
    assert {item["user_id"] for item in seen} == {alice["user"]["id"]}
    assert [item["allocated_amount"] for item in seen] == ["6.00000000", "4.00000000", "3.00000000", "1.00000000"]
    assert (await client.get("/api/v1/me/pool-allocations")).status == 401
    bad = await client.get("/api/v1/me/pool-allocations?limit=0", headers=bearer(alice["token"]))
    assert bad.status == 400

    # Admins list a pool's allocations, everyone's; others are refused.
    url = f"/api/v1/admin/reward-pools/{pool_id}/allocations"
    assert (await client.get(url, headers=bearer(alice["token"]))).status == 403
    assert (await client.get(url)).status == 401
    first = await (await client.get(url + "?limit=2", headers=bearer(admin["token"]))).json()
    gaming_ids = [aid for _, pool, aid in reversed(granted) if pool == pool_id]
    assert [item["id"] for item in first["data"]["items"]] == gaming_ids[:2]
    assert first["data"]["pool"]["id"] == pool_id and first["data"]["pool"]["allocated_tokens"] == "13.00000000"
    rest = await (await client.get(url + f"?limit=2&before={first['data']['next']}",
                                   headers=bearer(admin["token"]))).json()
    assert [item["id"] for item in rest["data"]["items"]] == gaming_ids[2:] and rest["data"]["next"] is None
    missing = await client.get("/api/v1/admin/reward-pools/999999/allocations", headers=bearer(admin["token"]))
    assert missing.status == 404


async def test_chain_verify_checks_game_draws_against_the_pool(client, db, chain_verified):
    pool_id = await gaming_pool(db, 100)
    admin = await make_admin(client, db)
    game, token = await create_game(client, admin, revenue_share="0.25", policy=UNLIMITED)
    _, session_id = await rest_session(client, game["game_id"])
    assert (await report(client, token, session_id, 1, "4")).status == 200
    assert (await verify_chain(db)).ok
    # A share booked off the record: the pool paid 5 but its game rewards say 6.
    await db.execute("UPDATE game_rewards SET owner_share = owner_share + 1")
    chain_verified["skip"] = True
    problems = (await verify_chain(db)).ledger_problems
    assert list(problems) == [f"reward pool {pool_id} (gaming): allocated_tokens 5.00000000 but its allocations, mining "
                        "rewards, game rewards and revenue shares total 6.00000000"]


async def test_allocation_lists_use_their_indexes(db):
    pool_id = await gaming_pool(db, 10)
    user = await user_queries.create_user(db, username="u", email="u@example.org", password_hash="x")
    await db.execute("ANALYZE")
    for sql, args, index in [(game_queries.USER_ALLOCATIONS, (user.id, MAX_INTEGER_ID, 21),
                              "idx_pool_allocations_user_order"),
                             (game_queries.POOL_ALLOCATIONS, (pool_id, MAX_INTEGER_ID, 21),
                              "idx_pool_allocations_pool_order")]:
        async with db.transaction():
            await db.execute("SET LOCAL enable_seqscan = off")
            plan = "\n".join(row[0] for row in await db.fetch(f"EXPLAIN {sql}", *args))
        # The index serves filter and order: no sort step.
        assert index in plan and "Sort" not in plan, plan
