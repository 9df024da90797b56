"""The initial schema against real PostgreSQL: every trigger and the important constraints.

Each test gets its own freshly migrated database through the `db` fixture (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from decimal import Decimal

import asyncpg
import pytest

from db import migrate

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

async def make_user(db, name: str | None = None, **columns) -> uuid.UUID:
    name = name or f"u{uuid.uuid4().hex[:10]}"
    values = {"username": name, "email": f"{name}@example.org", "password_hash": "argon2-hash",
              **columns}
    names = ", ".join(values)
    params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    return await db.fetchval(f"INSERT INTO users ({names}) VALUES ({params}) RETURNING id",
                             *values.values())


async def make_pod(db, seller: uuid.UUID, title: str = "Weather readings",
                   description: str | None = "Hourly temperature by city", price="1.5",
                   published: bool = True) -> uuid.UUID:
    return await db.fetchval(
        """INSERT INTO datapods (seller_id, title, description, price_sui, walrus_blob_id,
               encryption_key_hash, encryption_iv, wrapped_key, published)
           VALUES ($1, $2, $3, $4, $5, repeat('a', 64), repeat('b', 24), 'wrapped', $6) RETURNING id""",
        seller, title, description, Decimal(price), f"blob-{uuid.uuid4().hex}", published)


async def make_purchase(db, buyer: uuid.UUID, pod: uuid.UUID, status: str = "pending_payment",
                        amount="1.5") -> uuid.UUID:
    return await db.fetchval(
        """INSERT INTO purchases (buyer_id, datapod_id, payment_tx_digest, amount_sui, status)
           VALUES ($1, $2, $3, $4, $5) RETURNING id""",
        buyer, pod, f"digest-{uuid.uuid4().hex}", Decimal(amount), status)


async def review(db, purchase: uuid.UUID, rating: int) -> uuid.UUID:
    return await db.fetchval(
        """INSERT INTO reviews (purchase_id, buyer_id, datapod_id, rating)
           SELECT id, buyer_id, datapod_id, $2 FROM purchases WHERE id = $1 RETURNING id""",
        purchase, rating)


async def rating_of_pod(db, pod) -> Decimal:
    return await db.fetchval("SELECT average_rating FROM datapods WHERE id = $1", pod)


async def rating_of_user(db, user) -> Decimal:
    return await db.fetchval("SELECT average_rating FROM users WHERE id = $1", user)


async def counts(db, pod, buyer, seller) -> tuple[int, int, int]:
    return (await db.fetchval("SELECT purchase_count FROM datapods WHERE id = $1", pod),
            await db.fetchval("SELECT total_purchases FROM users WHERE id = $1", buyer),
            await db.fetchval("SELECT total_sales FROM users WHERE id = $1", seller))


def plan_nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


# --------------------------------------------------------------------------------------------
# users and authentication
# --------------------------------------------------------------------------------------------

async def test_user_needs_a_password_hash_or_a_google_id(db):
    with pytest.raises(asyncpg.CheckViolationError, match="users_credentials_check"):
        await make_user(db, "nobody", password_hash=None)
    google_user = await make_user(db, "gina", password_hash=None, google_id="1098765432",
                                  sui_address="0x" + "ab" * 32, salt="12345")
    row = await db.fetchrow("SELECT password_hash, kyc_status, total_balance, utility_status, "
                            "total_sales, total_purchases, average_rating FROM users WHERE id = $1",
                            google_user)
    assert row["password_hash"] is None
    assert (row["kyc_status"], row["total_balance"], row["utility_status"]) == ("Pending", 0, {})
    assert (row["total_sales"], row["total_purchases"], row["average_rating"]) == (0, 0, 0)
    # Password users have no sui_address until they link: several NULLs coexist.
    await make_user(db, "p1")
    await make_user(db, "p2")
    with pytest.raises(asyncpg.UniqueViolationError):
        await make_user(db, "gina2", password_hash=None, google_id="1098765432")


async def test_user_email_is_unique_case_insensitively(db):
    await make_user(db, "alice", email="Alice@Example.org")
    with pytest.raises(asyncpg.UniqueViolationError, match="users_email_lower_key"):
        await make_user(db, "alice2", email="alice@example.ORG")
    with pytest.raises(asyncpg.UniqueViolationError):
        await make_user(db, "alice", email="other@example.org")


@pytest.mark.parametrize("column,value", [
    ("kyc_status", "pending"),          # the seed's case bug: only 'Pending' is valid
    ("kyc_status", "Unknown"),
    ("mining_status", "Laptop"),
    ("total_balance", Decimal("-0.00000001")),
    ("average_rating", Decimal("5.01")),
    ("total_sales", -1),
])
async def test_user_column_checks(db, column, value):
    with pytest.raises(asyncpg.CheckViolationError):
        await make_user(db, **{column: value})


async def test_user_mining_status_accepts_the_device_types(db):
    for status in ("Mobile", "Node", None):
        user = await make_user(db, mining_status=status)
        assert await db.fetchval("SELECT mining_status FROM users WHERE id = $1", user) == status


async def test_set_updated_at_overrides_any_value(db):
    user = await make_user(db)
    await db.execute("UPDATE users SET name = 'Renamed', updated_at = '2000-01-01' WHERE id = $1", user)
    row = await db.fetchrow("SELECT updated_at, created_at FROM users WHERE id = $1", user)
    assert row["updated_at"] >= row["created_at"]
    assert row["updated_at"].year >= 2025
    await db.execute("UPDATE chain_settings SET halving_interval = 10, updated_at = '2000-01-01'")
    assert (await db.fetchval("SELECT updated_at FROM chain_settings")).year >= 2025


async def test_every_updated_at_column_has_the_trigger(db):
    tables = {r["table_name"] for r in await db.fetch(
        """SELECT table_name FROM information_schema.columns
           WHERE table_schema = 'public' AND column_name = 'updated_at'""")}
    assert {"users", "datapods", "purchases", "reviews", "ai_conversations", "kyc_submissions",
            "proposals", "cloud", "defi", "chain_settings"} <= tables
    triggered = {r["relname"] for r in await db.fetch(
        """SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
           JOIN pg_proc p ON p.oid = t.tgfoid
           WHERE p.proname = 'set_updated_at' AND NOT t.tgisinternal""")}
    assert tables == triggered


async def test_all_timestamps_are_timestamptz(db):
    naive = await db.fetch(
        """SELECT table_name, column_name FROM information_schema.columns
           WHERE table_schema = 'public' AND data_type = 'timestamp without time zone'""")
    assert naive == []


async def test_no_money_column_is_floating_point(db):
    floats = await db.fetch(
        """SELECT table_name, column_name FROM information_schema.columns
           WHERE table_schema = 'public' AND data_type IN ('double precision', 'real')""")
    assert floats == []
    reward = await db.fetchrow(
        """SELECT data_type, numeric_precision, numeric_scale FROM information_schema.columns
           WHERE table_name = 'mining_rewards' AND column_name = 'reward'""")
    assert tuple(reward) == ("numeric", 20, 8)


async def test_admin_is_a_user_and_goes_with_it(db):
    user = await make_user(db, "root")
    admin_id = await db.fetchval(
        """INSERT INTO admin (user_id, username, email, password_hash)
           VALUES ($1, 'root', 'root@example.org', 'h') RETURNING admin_id""", user)
    assert await db.fetchval("SELECT role FROM admin WHERE admin_id = $1", admin_id) == "admin"
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute("""INSERT INTO admin (user_id, username, email, password_hash)
                            VALUES ($1, 'root2', 'root2@example.org', 'h')""", user)
    await db.execute("DELETE FROM users WHERE id = $1", user)
    assert await db.fetchval("SELECT count(*) FROM admin") == 0


async def test_sessions_and_registrations_go_with_their_user(db):
    user = await make_user(db)
    await db.execute("INSERT INTO sessions (user_id, token, expires_at) VALUES ($1, $2, now() + interval '1 day')",
                     user, "0" * 64)
    await db.execute("INSERT INTO user_registrations (user_id, ip_address) VALUES ($1, '127.0.0.1')", user)
    with pytest.raises(asyncpg.CheckViolationError, match="sessions_logout_after_login"):
        await db.execute("UPDATE sessions SET logout_time = login_time - interval '1 second'")
    await db.execute("DELETE FROM users WHERE id = $1", user)
    assert await db.fetchval("SELECT count(*) FROM sessions") == 0
    assert await db.fetchval("SELECT count(*) FROM user_registrations") == 0


# --------------------------------------------------------------------------------------------
# SourceNet marketplace
# --------------------------------------------------------------------------------------------

async def test_datapod_rating_follows_insert_update_delete_of_reviews(db):
    seller, b1, b2 = await make_user(db), await make_user(db), await make_user(db)
    pod = await make_pod(db, seller)
    p1 = await make_purchase(db, b1, pod, "completed")
    p2 = await make_purchase(db, b2, pod, "completed")
    r1 = await review(db, p1, 5)
    assert await rating_of_pod(db, pod) == Decimal("5.00")
    r2 = await review(db, p2, 4)
    assert await rating_of_pod(db, pod) == Decimal("4.50")
    await db.execute("UPDATE reviews SET rating = 1 WHERE id = $1", r2)
    assert await rating_of_pod(db, pod) == Decimal("3.00")
    await db.execute("DELETE FROM reviews WHERE id = $1", r1)   # the seed used NEW on delete
    assert await rating_of_pod(db, pod) == Decimal("1.00")
    await db.execute("DELETE FROM reviews WHERE id = $1", r2)
    assert await rating_of_pod(db, pod) == Decimal("0")        # no reviews left: 0, not NULL


async def test_datapod_rating_rounds_to_two_places(db):
    seller = await make_user(db)
    pod = await make_pod(db, seller)
    for rating in (5, 4, 4):
        await review(db, await make_purchase(db, await make_user(db), pod, "completed"), rating)
    assert await rating_of_pod(db, pod) == Decimal("4.33")


async def test_seller_rating_is_the_mean_of_rated_datapods(db):
    seller, buyer = await make_user(db), await make_user(db)
    pod_a, pod_b = await make_pod(db, seller, "A"), await make_pod(db, seller, "B")
    await make_pod(db, seller, "C unrated")
    other_seller = await make_user(db)
    other_pod = await make_pod(db, other_seller, "elsewhere")
    ra = await review(db, await make_purchase(db, buyer, pod_a, "completed"), 5)
    rb = await review(db, await make_purchase(db, buyer, pod_b, "completed"), 2)
    await review(db, await make_purchase(db, buyer, other_pod, "completed"), 1)
    assert await rating_of_user(db, seller) == Decimal("3.50")     # (5 + 2) / 2, C ignored
    assert await rating_of_user(db, other_seller) == Decimal("1.00")
    await db.execute("UPDATE reviews SET rating = 4 WHERE id = $1", rb)
    assert await rating_of_user(db, seller) == Decimal("4.50")
    await db.execute("DELETE FROM reviews WHERE id = $1", rb)
    assert await rating_of_user(db, seller) == Decimal("5.00")
    await db.execute("DELETE FROM reviews WHERE id = $1", ra)
    assert await rating_of_user(db, seller) == Decimal("0")
    assert await rating_of_user(db, other_seller) == Decimal("1.00")  # untouched


async def test_seller_rating_follows_datapod_deletion(db):
    seller, buyer = await make_user(db), await make_user(db)
    pod_a, pod_b = await make_pod(db, seller, "A"), await make_pod(db, seller, "B")
    await review(db, await make_purchase(db, buyer, pod_a, "completed"), 5)
    await review(db, await make_purchase(db, buyer, pod_b, "completed"), 1)
    assert await rating_of_user(db, seller) == Decimal("3.00")
    await db.execute("DELETE FROM datapods WHERE id = $1", pod_b)
    assert await rating_of_user(db, seller) == Decimal("5.00")
    await db.execute("DELETE FROM datapods WHERE id = $1", pod_a)
    assert await rating_of_user(db, seller) == Decimal("0")


async def test_purchase_counts_count_completion_once(db):
    seller, buyer = await make_user(db), await make_user(db)
    pod = await make_pod(db, seller)
    purchase = await make_purchase(db, buyer, pod)            # pending_payment
    assert await counts(db, pod, buyer, seller) == (0, 0, 0)
    await db.execute("UPDATE purchases SET status = 'processing' WHERE id = $1", purchase)
    assert await counts(db, pod, buyer, seller) == (0, 0, 0)
    await db.execute("UPDATE purchases SET status = 'completed', completed_at = now() WHERE id = $1", purchase)
    assert await counts(db, pod, buyer, seller) == (1, 1, 1)
    await db.execute("UPDATE purchases SET status = 'completed' WHERE id = $1", purchase)  # no change
    await db.execute("UPDATE purchases SET decryption_key = 'wrapped' WHERE id = $1", purchase)
    assert await counts(db, pod, buyer, seller) == (1, 1, 1)
    await db.execute("UPDATE purchases SET status = 'refunded' WHERE id = $1", purchase)
    assert await counts(db, pod, buyer, seller) == (0, 0, 0)
    await db.execute("UPDATE purchases SET status = 'refunded' WHERE id = $1", purchase)
    assert await counts(db, pod, buyer, seller) == (0, 0, 0)


async def test_purchase_inserted_completed_counts_and_failed_does_not(db):
    seller, buyer, other = await make_user(db), await make_user(db), await make_user(db)
    pod = await make_pod(db, seller)
    await make_purchase(db, buyer, pod, "completed")
    failed = await make_purchase(db, other, pod, "processing")
    await db.execute("UPDATE purchases SET status = 'failed' WHERE id = $1", failed)
    assert await counts(db, pod, buyer, seller) == (1, 1, 1)
    assert await db.fetchval("SELECT total_purchases FROM users WHERE id = $1", other) == 0


async def test_purchase_status_and_uniqueness(db):
    seller, buyer = await make_user(db), await make_user(db)
    pod = await make_pod(db, seller)
    purchase = await make_purchase(db, buyer, pod, "failed")
    assert await db.fetchval("SELECT status FROM purchases WHERE id = $1", purchase) == "failed"
    with pytest.raises(asyncpg.CheckViolationError, match="check_status"):
        await db.execute("UPDATE purchases SET status = 'lost' WHERE id = $1", purchase)
    with pytest.raises(asyncpg.UniqueViolationError, match="unique_buyer_datapod"):
        await make_purchase(db, buyer, pod)
    digest = await db.fetchval("SELECT payment_tx_digest FROM purchases WHERE id = $1", purchase)
    other_pod = await make_pod(db, seller, "another")
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute("""INSERT INTO purchases (buyer_id, datapod_id, payment_tx_digest, amount_sui)
                            VALUES ($1, $2, $3, 1)""", buyer, other_pod, digest)


async def test_review_must_belong_to_its_purchase(db):
    seller, buyer, stranger = await make_user(db), await make_user(db), await make_user(db)
    pod = await make_pod(db, seller)
    purchase = await make_purchase(db, buyer, pod, "completed")
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="reviews_purchase_match_fkey"):
        await db.execute("INSERT INTO reviews (purchase_id, buyer_id, datapod_id, rating) VALUES ($1, $2, $3, 5)",
                         purchase, stranger, pod)
    with pytest.raises(asyncpg.CheckViolationError, match="reviews_rating_check"):
        await review(db, purchase, 6)
    with pytest.raises(asyncpg.CheckViolationError):
        await review(db, purchase, 0)
    await review(db, purchase, 3)
    with pytest.raises(asyncpg.UniqueViolationError):          # one review per purchase
        await review(db, purchase, 4)


async def test_one_escrow_per_purchase(db):
    seller, buyer = await make_user(db), await make_user(db)
    pod = await make_pod(db, seller)
    purchase = await make_purchase(db, buyer, pod)
    insert = "INSERT INTO escrow_transactions (purchase_id, seller_id, amount_sui, status) VALUES ($1, $2, 1.5, $3)"
    await db.execute(insert, purchase, seller, "holding")
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(insert, purchase, seller, "holding")
    with pytest.raises(asyncpg.CheckViolationError, match="check_escrow_status"):
        await db.execute("UPDATE escrow_transactions SET status = 'stolen'")


async def test_deleting_users_is_not_blocked_by_marketplace_history(db):
    """escrow.seller_id and download_logs.buyer_id/datapod_id have no ON DELETE (as the seed):
    the cascades through datapods and purchases must remove those rows first."""
    seller, buyer, other = await make_user(db), await make_user(db), await make_user(db)
    pod = await make_pod(db, seller)
    purchase = await make_purchase(db, buyer, pod, "completed")
    other_purchase = await make_purchase(db, other, await make_pod(db, await make_user(db)), "completed")
    for p, s in ((purchase, seller), (other_purchase, None)):
        await db.execute("INSERT INTO escrow_transactions (purchase_id, seller_id, amount_sui) VALUES ($1, $2, 1)", p, s)
        await db.execute("""INSERT INTO download_logs (purchase_id, buyer_id, datapod_id)
                            SELECT id, buyer_id, datapod_id FROM purchases WHERE id = $1""", p)
    await review(db, purchase, 4)
    await db.execute("DELETE FROM users WHERE id = $1", buyer)
    assert await db.fetchval("SELECT count(*) FROM download_logs") == 1
    assert await rating_of_pod(db, pod) == 0                       # the buyer's review went too
    await db.execute("DELETE FROM users WHERE id = $1", seller)
    assert await db.fetchval("SELECT count(*) FROM datapods WHERE id = $1", pod) == 0
    assert await db.fetchval("SELECT count(*) FROM escrow_transactions") == 1
    await db.execute("DELETE FROM users WHERE id = $1", other)
    assert await db.fetchval("SELECT count(*) FROM purchases") == 0


async def test_ai_message_roles(db):
    user = await make_user(db)
    conversation = await db.fetchval("INSERT INTO ai_conversations (user_id, title) VALUES ($1, 't') RETURNING id", user)
    for role in ("system", "user", "assistant", "tool"):
        await db.execute("INSERT INTO ai_messages (conversation_id, role, content) VALUES ($1, $2, 'x')",
                         conversation, role)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO ai_messages (conversation_id, role, content) VALUES ($1, 'robot', 'x')",
                         conversation)
    await db.execute("DELETE FROM users WHERE id = $1", user)
    assert await db.fetchval("SELECT count(*) FROM ai_messages") == 0


async def test_search_vector_covers_a_null_description(db):
    """The seed's to_tsvector(title || ' ' || description) is NULL when description is NULL."""
    seller = await make_user(db)
    pod = await make_pod(db, seller, title="Volcanic ash measurements", description=None)
    found = await db.fetch("SELECT id FROM datapods WHERE search_vector @@ plainto_tsquery('english', $1)",
                           "volcanic measurement")
    assert [r["id"] for r in found] == [pod]
    await db.execute("UPDATE datapods SET description = 'Sulphur readings' WHERE id = $1", pod)
    assert await db.fetchval(
        "SELECT count(*) FROM datapods WHERE search_vector @@ plainto_tsquery('english', 'sulphur')") == 1


async def test_full_text_search_uses_the_gin_index(db):
    seller = await make_user(db)
    await db.execute(
        """INSERT INTO datapods (seller_id, title, description, price_sui, walrus_blob_id,
               encryption_key_hash, encryption_iv, wrapped_key, published)
           SELECT $1,
                  'Dataset ' || g || ' of city sensor readings',
                  CASE WHEN g % 500 = 0 THEN 'Zeppelin telemetry from a rare flight'
                       ELSE 'Hourly temperature, humidity and traffic counts for region ' || (g % 50) END,
                  1 + g % 7, 'blob-' || g, repeat('a', 64), repeat('b', 24), 'wrapped', g % 3 <> 0
             FROM generate_series(1, 2000) AS g""", seller)
    await db.execute("ANALYZE datapods")
    query = "SELECT id FROM datapods WHERE search_vector @@ plainto_tsquery('english', $1)"
    assert len(await db.fetch(query, "zeppelin telemetry")) == 4
    plan = await db.fetchval("EXPLAIN (FORMAT JSON) " + query, "zeppelin telemetry")
    plan = json.loads(plan) if isinstance(plan, str) else plan
    nodes = list(plan_nodes(plan[0]["Plan"]))
    assert any(n["Node Type"] == "Bitmap Index Scan" and n.get("Index Name") == "idx_datapods_search"
               for n in nodes), json.dumps(plan, indent=1)
    assert not any(n["Node Type"] == "Seq Scan" for n in nodes)
    # The seed's marketplace search (published, newest first) takes the same path.
    plan = await db.fetchval(
        "EXPLAIN (FORMAT JSON) SELECT id FROM datapods WHERE published AND " + query.split("WHERE ")[1]
        + " ORDER BY created_at DESC LIMIT 20", "zeppelin")
    plan = json.loads(plan) if isinstance(plan, str) else plan
    assert any(n.get("Index Name") == "idx_datapods_search" for n in plan_nodes(plan[0]["Plan"]))


async def test_published_listing_index_is_partial(db):
    definition = await db.fetchval("SELECT pg_get_indexdef('idx_datapods_published_recent'::regclass)")
    assert "WHERE published" in definition and "created_at DESC" in definition


# --------------------------------------------------------------------------------------------
# money
# --------------------------------------------------------------------------------------------

MONEY_VIOLATIONS = [
    ("datapod price", "UPDATE datapods SET price_sui = -0.000000001"),
    ("purchase amount", "UPDATE purchases SET amount_sui = -1"),
    ("escrow amount", "INSERT INTO escrow_transactions (amount_sui) VALUES (-1)"),
    ("user balance", "UPDATE users SET total_balance = total_balance - 1"),
    ("transaction amount", "INSERT INTO transactions (transaction_hash, amount) VALUES ('h', -1)"),
    ("mining amount", "INSERT INTO mining_rewards (miner_wallet, amount, device_type, reward) VALUES ('w', -1, 'Node', 1)"),
    ("mining reward", "INSERT INTO mining_rewards (miner_wallet, amount, device_type, reward) VALUES ('w', 1, 'Node', -1)"),
    ("pool total", "INSERT INTO reward_pools (pool_name, total_tokens) VALUES ('p', -1)"),
    ("allocation", "INSERT INTO pool_allocations (user_id, pool_id, allocated_amount) SELECT id, (SELECT min(pool_id) FROM reward_pools), -1 FROM users LIMIT 1"),
    ("allocation remaining", "INSERT INTO pool_allocations (user_id, pool_id, allocated_amount, remaining_amount) SELECT id, (SELECT min(pool_id) FROM reward_pools), 1, -1 FROM users LIMIT 1"),
    ("game reward", "INSERT INTO game_rewards (player_wallet, reward_type, reward_value) VALUES ('w', 'coin', -1)"),
    ("game session earnings", "INSERT INTO game_sessions (player_wallet, session_start, rewards_earned) VALUES ('w', now(), -1)"),
    ("nft price", "INSERT INTO marketplace (seller_wallet, price) VALUES ('w', -1)"),
    ("defi zero", "INSERT INTO defi (user_id, product, amount) SELECT id, 'staking', 0 FROM users LIMIT 1"),
    ("defi negative", "INSERT INTO defi (user_id, product, amount) SELECT id, 'lending', -5 FROM users LIMIT 1"),
]


@pytest.mark.parametrize("sql", [sql for _, sql in MONEY_VIOLATIONS], ids=[n for n, _ in MONEY_VIOLATIONS])
async def test_money_cannot_be_negative(db, sql):
    seller, buyer = await make_user(db), await make_user(db)
    await make_purchase(db, buyer, await make_pod(db, seller))
    await db.execute("INSERT INTO reward_pools (pool_name, total_tokens) VALUES ('base', 10)")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(sql)


async def test_money_keeps_its_precision(db):
    seller = await make_user(db, total_balance=Decimal("12.34567891"))
    pod = await make_pod(db, seller, price="123456789.123456789")
    assert await db.fetchval("SELECT price_sui FROM datapods WHERE id = $1", pod) == Decimal("123456789.123456789")
    assert await db.fetchval("SELECT total_balance FROM users WHERE id = $1", seller) == Decimal("12.34567891")
    await db.execute("INSERT INTO defi (user_id, product, amount, apy) VALUES ($1, 'liquidity', 0.00000001, 12.5)", seller)
    assert await db.fetchval("SELECT amount FROM defi") == Decimal("0.00000001")


async def test_reward_pool_cannot_allocate_more_than_it_holds(db):
    pool = await db.fetchval(
        "INSERT INTO reward_pools (pool_name, total_tokens, allocated_tokens) VALUES ('mining', 100, 100) RETURNING pool_id")
    with pytest.raises(asyncpg.CheckViolationError, match="reward_pools_allocation_check"):
        await db.execute("UPDATE reward_pools SET allocated_tokens = 100.00000001 WHERE pool_id = $1", pool)
    with pytest.raises(asyncpg.CheckViolationError, match="reward_pools_allocation_check"):
        await db.execute("UPDATE reward_pools SET total_tokens = 99 WHERE pool_id = $1", pool)
    with pytest.raises(asyncpg.CheckViolationError, match="reward_pools_allocation_check"):
        await db.execute("UPDATE reward_pools SET allocated_tokens = -1 WHERE pool_id = $1", pool)
    with pytest.raises(asyncpg.NotNullViolationError):
        await db.execute("UPDATE reward_pools SET allocated_tokens = NULL WHERE pool_id = $1", pool)
    await db.execute("UPDATE reward_pools SET total_tokens = 150, allocated_tokens = 120 WHERE pool_id = $1", pool)
    assert await db.fetchval("SELECT allocated_tokens FROM reward_pools WHERE pool_id = $1", pool) == 120


# --------------------------------------------------------------------------------------------
# KVP chain
# --------------------------------------------------------------------------------------------

async def add_block(db, block_id: int, minutes: int, miner=None, burned: bool = False) -> asyncpg.Record:
    return await db.fetchrow(
        """INSERT INTO blocks (block_id, block_hash, previous_hash, "timestamp", miner_id, burned)
           VALUES ($1::int, 'hash' || $1::int, CASE WHEN $1::int > 1 THEN 'hash' || ($1::int - 1) END, $2, $3, $4)
           RETURNING *""",
        block_id, T0 + dt.timedelta(minutes=minutes), miner, burned)


async def test_block_stats_are_filled_on_insert(db):
    await db.execute("UPDATE chain_settings SET halving_interval = 3, max_blocks = 5, target_block_seconds = 60")
    alice, bob = await make_user(db), await make_user(db)
    minute = dt.timedelta(minutes=1)

    b1 = await add_block(db, 1, 0)                                # genesis: no miner
    assert (b1["total_blocks"], b1["active_blocks"], b1["inactive_blocks"], b1["burned_blocks"],
            b1["remaining_blocks"]) == (1, 0, 1, 0, 4)
    assert b1["last_block_time"] == T0 and b1["halving_schedule"] is None
    assert b1["next_halving_time"] == T0 + 2 * minute             # two more blocks of 60 s
    assert b1["burned_block_ids"] == [] and b1["last_burn_time"] is None

    b2 = await add_block(db, 2, 1, alice)
    assert (b2["total_blocks"], b2["active_blocks"], b2["inactive_blocks"], b2["remaining_blocks"]) == (2, 1, 1, 3)
    assert b2["next_halving_time"] == T0 + 2 * minute

    b3 = await add_block(db, 3, 2, alice, burned=True)            # a halving block, inserted burned
    assert (b3["total_blocks"], b3["active_blocks"], b3["inactive_blocks"], b3["burned_blocks"]) == (3, 1, 1, 1)
    assert b3["burned_block_ids"] == ["3"] and b3["last_burn_time"] == T0 + 2 * minute
    assert b3["halving_schedule"] == T0 + 2 * minute
    assert b3["next_halving_time"] == T0 + 5 * minute             # three blocks later

    b4 = await add_block(db, 4, 3, bob)
    assert b4["halving_schedule"] == T0 + 2 * minute              # carried forward
    assert b4["burned_block_ids"] == ["3"] and b4["last_burn_time"] == T0 + 2 * minute
    assert (b4["total_blocks"], b4["active_blocks"], b4["burned_blocks"], b4["remaining_blocks"]) == (4, 2, 1, 1)

    b5 = await add_block(db, 5, 4, bob)
    assert b5["remaining_blocks"] == 0 and b5["last_block_time"] == T0 + 4 * minute
    with pytest.raises(asyncpg.CheckViolationError, match="blocks_remaining_blocks_check"):
        await add_block(db, 6, 5, bob)                            # max_blocks reached
    assert await db.fetchval("SELECT count(*) FROM blocks") == 5


async def test_halving_at_the_default_interval(db):
    row = await db.fetchrow("SELECT halving_interval, initial_block_reward, max_blocks FROM chain_settings")
    assert tuple(row) == (1000, 50, 21000000)
    first = await add_block(db, 999, 0)
    assert first["halving_schedule"] is None and first["next_halving_time"] == T0 + dt.timedelta(minutes=1)
    halving = await add_block(db, 1000, 1)
    assert halving["halving_schedule"] == T0 + dt.timedelta(minutes=1)
    assert halving["next_halving_time"] == T0 + dt.timedelta(minutes=1, seconds=1000 * 60)
    assert halving["total_blocks"] == 2 and halving["remaining_blocks"] == 21000000 - 2


async def test_burning_an_existing_block_updates_the_tip(db):
    alice, bob = await make_user(db), await make_user(db)
    await add_block(db, 1, 0)
    await add_block(db, 2, 1, alice)
    await add_block(db, 3, 2, alice)
    await add_block(db, 4, 3, bob)
    tip = await db.fetchrow("SELECT * FROM blocks WHERE block_id = 4")
    assert (tip["active_blocks"], tip["inactive_blocks"], tip["burned_blocks"]) == (3, 1, 0)

    await db.execute("UPDATE blocks SET burned = true WHERE miner_id = $1", alice)   # burn alice's blocks
    tip = await db.fetchrow("SELECT * FROM blocks WHERE block_id = 4")
    assert (tip["total_blocks"], tip["active_blocks"], tip["inactive_blocks"], tip["burned_blocks"]) == (4, 1, 1, 2)
    assert tip["burned_block_ids"] == ["2", "3"]
    assert tip["last_burn_time"] is not None and tip["last_burn_time"] > T0
    b2 = await db.fetchrow("SELECT burned, burned_blocks FROM blocks WHERE block_id = 2")
    assert b2["burned"] and b2["burned_blocks"] == 0              # older rows keep their snapshot

    # The next block continues from the refreshed tip.
    b5 = await add_block(db, 5, 4, bob)
    assert (b5["total_blocks"], b5["active_blocks"], b5["inactive_blocks"], b5["burned_blocks"]) == (5, 2, 1, 2)
    assert b5["burned_block_ids"] == ["2", "3"]

    # Deleting a miner keeps the blocks (miner_id SET NULL): they become inactive.
    await db.execute("DELETE FROM users WHERE id = $1", bob)
    assert await db.fetchval("SELECT count(*) FROM blocks WHERE miner_id IS NULL") == 3
    tip = await db.fetchrow("SELECT * FROM blocks WHERE block_id = 5")
    assert (tip["active_blocks"], tip["inactive_blocks"], tip["burned_blocks"]) == (0, 3, 2)


async def test_chain_is_linear(db):
    await add_block(db, 1, 0)
    await add_block(db, 2, 1)
    with pytest.raises(asyncpg.UniqueViolationError, match="blocks_previous_hash_key"):  # 2nd child of 1
        await db.execute("INSERT INTO blocks (block_id, block_hash, previous_hash) VALUES (3, 'fork', 'hash1')")
    with pytest.raises(asyncpg.UniqueViolationError, match="blocks_block_hash_key"):
        await db.execute("INSERT INTO blocks (block_id, block_hash, previous_hash) VALUES (3, 'hash2', 'x')")
    await db.execute("INSERT INTO blocks (block_id, block_hash, previous_hash) VALUES (3, 'hash3', 'hash2')")


async def test_block_reward_halves_every_interval(db):
    reward = "SELECT block_reward($1)"
    assert await db.fetchval(reward, 1) == Decimal("50")
    assert await db.fetchval(reward, 999) == Decimal("50")
    assert await db.fetchval(reward, 1000) == Decimal("25")
    assert await db.fetchval(reward, 2500) == Decimal("12.5")
    assert await db.fetchval(reward, 64000) == 0
    await db.execute("UPDATE chain_settings SET halving_interval = 3, initial_block_reward = 1")
    assert [await db.fetchval(reward, h) for h in (2, 3, 6, 9)] == [
        Decimal("1"), Decimal("0.5"), Decimal("0.25"), Decimal("0.125")]
    assert await db.fetchval(reward, 3 * 26) == Decimal("0.00000001")   # 1/2^26, truncated to 8 places
    assert await db.fetchval(reward, 3 * 27) == 0


async def test_chain_settings_has_exactly_one_row(db):
    assert await db.fetchval("SELECT count(*) FROM chain_settings") == 1
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute("INSERT INTO chain_settings DEFAULT VALUES")
    with pytest.raises(asyncpg.CheckViolationError, match="chain_settings_single_row"):
        await db.execute("INSERT INTO chain_settings (id) VALUES (false)")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("UPDATE chain_settings SET halving_interval = 0")


async def test_transactions_survive_their_users(db):
    alice, bob = await make_user(db), await make_user(db)
    block = (await add_block(db, 1, 0, alice))["block_id"]
    await db.execute(
        """INSERT INTO transactions (transaction_hash, block_id, sender, receiver, amount, user_id, sender_id, receiver_id)
           VALUES ('tx1', $1, 'wa', 'wb', 2.5, $2, $2, $3)""", block, alice, bob)
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute("INSERT INTO transactions (transaction_hash, amount) VALUES ('tx1', 1)")
    await db.execute("DELETE FROM users WHERE id = ANY($1::uuid[])", [alice, bob])
    row = await db.fetchrow("SELECT * FROM transactions WHERE transaction_hash = 'tx1'")
    assert (row["user_id"], row["sender_id"], row["receiver_id"]) == (None, None, None)
    assert row["amount"] == Decimal("2.5")
    await db.execute("DELETE FROM blocks WHERE block_id = $1", block)   # a block takes its transactions
    assert await db.fetchval("SELECT count(*) FROM transactions") == 0


async def test_mining_rewards_device_type(db):
    user = await make_user(db)
    await db.execute("INSERT INTO mining_rewards (miner_wallet, amount, device_type, reward, user_id) VALUES ('w', 1, 'Mobile', 0.5, $1)", user)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO mining_rewards (miner_wallet, amount, device_type, reward) VALUES ('w', 1, 'Toaster', 1)")


async def test_defi_product_and_status(db):
    user = await make_user(db)
    await db.execute("INSERT INTO defi (user_id, product, amount) VALUES ($1, 'staking', 10)", user)
    assert await db.fetchval("SELECT status FROM defi") == "active"
    with pytest.raises(asyncpg.CheckViolationError, match="defi_product_check"):
        await db.execute("INSERT INTO defi (user_id, product, amount) VALUES ($1, 'gambling', 10)", user)
    with pytest.raises(asyncpg.CheckViolationError, match="defi_status_check"):
        await db.execute("UPDATE defi SET status = 'frozen'")
    await db.execute("DELETE FROM users WHERE id = $1", user)
    assert await db.fetchval("SELECT count(*) FROM defi") == 0


# --------------------------------------------------------------------------------------------
# games and NFTs
# --------------------------------------------------------------------------------------------

async def test_an_nft_has_at_most_one_available_listing(db):
    nft = await db.fetchval("INSERT INTO nfts (owner_wallet, metadata) VALUES ('w', $1) RETURNING nft_id", {"n": 1})
    listing = await db.fetchval(
        "INSERT INTO marketplace (nft_id, seller_wallet, price) VALUES ($1, 'w', 5) RETURNING listing_id", nft)
    with pytest.raises(asyncpg.UniqueViolationError, match="marketplace_one_available_listing"):
        await db.execute("INSERT INTO marketplace (nft_id, seller_wallet, price) VALUES ($1, 'w', 6)", nft)
    with pytest.raises(asyncpg.CheckViolationError, match="marketplace_sold_has_buyer"):
        await db.execute("UPDATE marketplace SET status = 'Sold' WHERE listing_id = $1", listing)
    await db.execute("UPDATE marketplace SET status = 'Sold', buyer_wallet = 'b' WHERE listing_id = $1", listing)
    await db.execute("INSERT INTO marketplace (nft_id, seller_wallet, price) VALUES ($1, 'b', 7)", nft)  # relist
    with pytest.raises(asyncpg.CheckViolationError, match="marketplace_status_check"):
        await db.execute("UPDATE marketplace SET status = 'Lost'")


async def test_game_session_status_and_one_active_session(db):
    game = await db.fetchval("INSERT INTO games (name, revenue_share) VALUES ('g', 0.15) RETURNING game_id")
    session = await db.fetchval(
        "INSERT INTO game_sessions (game_id, player_wallet, session_start) VALUES ($1, 'w', now()) RETURNING session_id", game)
    with pytest.raises(asyncpg.UniqueViolationError, match="game_sessions_one_active"):
        await db.execute("INSERT INTO game_sessions (game_id, player_wallet, session_start) VALUES ($1, 'w', now())", game)
    with pytest.raises(asyncpg.CheckViolationError, match="game_sessions_status_check"):
        await db.execute("UPDATE game_sessions SET status = 'Paused' WHERE session_id = $1", session)
    with pytest.raises(asyncpg.CheckViolationError, match="game_sessions_end_after_start"):
        await db.execute("UPDATE game_sessions SET session_end = session_start - interval '1 minute'")
    await db.execute("UPDATE game_sessions SET status = 'TimedOut', session_end = now() WHERE session_id = $1", session)
    await db.execute("INSERT INTO game_sessions (game_id, player_wallet, session_start) VALUES ($1, 'w', now())", game)
    with pytest.raises(asyncpg.CheckViolationError, match="games_revenue_share_check"):
        await db.execute("UPDATE games SET revenue_share = 1.5")


async def test_deleting_a_game_keeps_its_nfts(db):
    game = await db.fetchval("INSERT INTO games (name) VALUES ('g') RETURNING game_id")
    await db.execute("INSERT INTO nfts (owner_wallet, metadata, game_id) VALUES ('w', '{}', $1)", game)
    await db.execute("INSERT INTO game_rewards (game_id, player_wallet, reward_type, reward_value) VALUES ($1, 'w', 'coin', 1)", game)
    await db.execute("DELETE FROM games")
    assert await db.fetchval("SELECT game_id FROM nfts") is None
    assert await db.fetchval("SELECT count(*) FROM game_rewards") == 0


# --------------------------------------------------------------------------------------------
# DAO and KYC
# --------------------------------------------------------------------------------------------

async def test_one_vote_per_wallet_and_proposal_status(db):
    proposal = await db.fetchval(
        "INSERT INTO proposals (title, description, creator_wallet) VALUES ('t', 'd', 'w') RETURNING proposal_id")
    await db.execute("INSERT INTO votes (proposal_id, voter_wallet, vote_option) VALUES ($1, 'v1', 'Yes')", proposal)
    with pytest.raises(asyncpg.UniqueViolationError, match="votes_one_per_wallet"):
        await db.execute("INSERT INTO votes (proposal_id, voter_wallet, vote_option) VALUES ($1, 'v1', 'No')", proposal)
    with pytest.raises(asyncpg.CheckViolationError, match="votes_vote_option_check"):
        await db.execute("INSERT INTO votes (proposal_id, voter_wallet, vote_option) VALUES ($1, 'v2', 'Maybe')", proposal)
    with pytest.raises(asyncpg.CheckViolationError, match="proposals_status_check"):
        await db.execute("UPDATE proposals SET status = 'open'")
    await db.execute("UPDATE proposals SET status = 'Closed'")
    await db.execute("DELETE FROM proposals")
    assert await db.fetchval("SELECT count(*) FROM votes") == 0


async def submit_kyc(db, user, document_type, document_path="/kyc/doc.png") -> int:
    return await db.fetchval(
        "INSERT INTO kyc_submissions (user_id, document_type, document_path) VALUES ($1, $2, $3) RETURNING kyc_id",
        user, document_type, document_path)


async def kyc_state(db, user, kyc_id):
    return (await db.fetchval("SELECT status FROM kyc_submissions WHERE kyc_id = $1", kyc_id),
            await db.fetchval("SELECT kyc_status FROM users WHERE id = $1", user))


async def test_kyc_submission_passing_the_automatic_check_waits_for_an_admin(db):
    user = await make_user(db, kyc_status="Rejected")
    bystander = await make_user(db, kyc_status="Approved")
    kyc_id = await submit_kyc(db, user, "passport")
    assert await kyc_state(db, user, kyc_id) == ("Pending", "Pending")
    assert await db.fetchval("SELECT count(*) FROM kyc_approvals") == 0
    assert await db.fetchval("SELECT kyc_status FROM users WHERE id = $1", bystander) == "Approved"
    kyc_id = await submit_kyc(db, user, "ID_CARD")                # type compared case-insensitively
    assert await kyc_state(db, user, kyc_id) == ("Pending", "Pending")


@pytest.mark.parametrize("document_type,document_path,reason", [
    ("selfie", "/kyc/doc.png", "'selfie' is not accepted"),
    (None, "/kyc/doc.png", "type missing"),
    ("passport", None, "no document"),
    ("license", "   ", "no document"),
])
async def test_kyc_submission_failing_the_automatic_check_is_rejected(db, document_type, document_path, reason):
    user = await make_user(db)
    bystander = await make_user(db, kyc_status="Approved")
    kyc_id = await submit_kyc(db, user, document_type, document_path)
    assert await kyc_state(db, user, kyc_id) == ("Rejected", "Rejected")
    approval = await db.fetchrow("SELECT * FROM kyc_approvals WHERE kyc_id = $1", kyc_id)
    assert approval["admin_id"] is None and approval["user_id"] == user
    assert approval["status"] == "Rejected" and reason in approval["remarks"]
    assert await db.fetchval("SELECT kyc_status FROM users WHERE id = $1", bystander) == "Approved"


async def test_admin_kyc_decision_applies_to_that_user_only(db):
    admin_user = await make_user(db, "boss")
    admin_id = await db.fetchval(
        "INSERT INTO admin (user_id, username, email, password_hash) VALUES ($1, 'boss', 'boss@example.org', 'h') RETURNING admin_id",
        admin_user)
    user, other = await make_user(db), await make_user(db)
    kyc_id = await submit_kyc(db, user, "license")
    other_kyc = await submit_kyc(db, other, "passport")
    await db.execute(
        "INSERT INTO kyc_approvals (kyc_id, admin_id, user_id, status, remarks) VALUES ($1, $2, $3, 'Approved', 'ok')",
        kyc_id, admin_id, user)
    assert await kyc_state(db, user, kyc_id) == ("Approved", "Approved")
    assert await db.fetchval("SELECT reviewed_by FROM kyc_submissions WHERE kyc_id = $1", kyc_id) == admin_id
    assert await kyc_state(db, other, other_kyc) == ("Pending", "Pending")
    assert await db.fetchval("SELECT kyc_status FROM users WHERE id = $1", admin_user) == "Pending"
    with pytest.raises(asyncpg.CheckViolationError, match="kyc_approvals_status_check"):
        await db.execute("INSERT INTO kyc_approvals (kyc_id, admin_id, status) VALUES ($1, $2, 'Pending')",
                         other_kyc, admin_id)
    await db.execute("DELETE FROM users WHERE id = $1", user)     # a user takes their KYC history
    assert await db.fetchval("SELECT count(*) FROM kyc_submissions WHERE kyc_id = $1", kyc_id) == 0
    assert await db.fetchval("SELECT count(*) FROM kyc_approvals") == 0


# --------------------------------------------------------------------------------------------
# storage and network utilities
# --------------------------------------------------------------------------------------------

async def cloud_status(db, file_id) -> str:
    return await db.fetchval("SELECT status FROM cloud WHERE id = $1", file_id)


async def test_cloud_status_follows_its_peers_and_seeders(db):
    user = await make_user(db)
    file_id = await db.fetchval("INSERT INTO cloud (file_path, size) VALUES ('/f', 10) RETURNING id")
    other_file = await db.fetchval("INSERT INTO cloud (file_path, size) VALUES ('/g', 10) RETURNING id")
    peer = await db.fetchval("INSERT INTO peer (user_id, file_id) VALUES ($1, $2) RETURNING id", user, file_id)
    seeder = await db.fetchval("INSERT INTO seeder (user_id, file_id) VALUES ($1, $2) RETURNING id", user, file_id)
    await db.execute("UPDATE cloud SET updated_at = '2000-01-01' WHERE id = $1", file_id)
    await db.execute("UPDATE peer SET status = 'inactive' WHERE id = $1", peer)
    assert await cloud_status(db, file_id) == "active"             # the seeder still holds it
    await db.execute("UPDATE seeder SET status = 'inactive' WHERE id = $1", seeder)
    assert await cloud_status(db, file_id) == "inactive"
    assert (await db.fetchval("SELECT updated_at FROM cloud WHERE id = $1", file_id)).year >= 2025
    await db.execute("UPDATE peer SET status = 'active' WHERE id = $1", peer)
    assert await cloud_status(db, file_id) == "active"
    await db.execute("UPDATE peer SET file_id = $2 WHERE id = $1", peer, other_file)  # moves: both refreshed
    assert (await cloud_status(db, file_id), await cloud_status(db, other_file)) == ("inactive", "active")
    await db.execute("DELETE FROM peer WHERE id = $1", peer)
    assert await cloud_status(db, other_file) == "inactive"
    assert await cloud_status(db, file_id) == "inactive"
    with pytest.raises(asyncpg.CheckViolationError, match="seeder_status_check"):
        await db.execute("UPDATE seeder SET status = 'dormant'")


async def test_deleting_a_cloud_file_takes_its_swarm(db):
    user = await make_user(db)
    file_id = await db.fetchval("INSERT INTO cloud (file_path, size) VALUES ('/f', 10) RETURNING id")
    for table, column in (("peer", "file_id"), ("seeder", "file_id")):
        await db.execute(f"INSERT INTO {table} (user_id, {column}) VALUES ($1, $2)", user, file_id)
    for table in ("mirror", "tracker"):
        path = "mirror_path" if table == "mirror" else "tracker_url"
        await db.execute(f"INSERT INTO {table} (cloud_id, {path}) VALUES ($1, 'x')", file_id)
    await db.execute("DELETE FROM cloud WHERE id = $1", file_id)
    for table in ("peer", "seeder", "mirror", "tracker"):
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0, table


async def test_bandwidth_usage_totals_in_utility_status(db):
    user = await make_user(db, utility_status={"mining": {"device": "Node"}})
    other = await make_user(db)
    first = await db.fetchval(
        "INSERT INTO bandwidth (user_id, bandwidth_limit, usage) VALUES ($1, 100, 60) RETURNING id", user)
    status = await db.fetchval("SELECT utility_status FROM users WHERE id = $1", user)
    assert status["mining"] == {"device": "Node"}                  # other keys are kept
    bw = status["bandwidth"]
    assert (bw["limit"], bw["total_usage"], bw["last_usage"], bw["records"], bw["remaining"], bw["over_limit"]) == (
        100, 60, 60, 1, 40, False)
    await db.execute("INSERT INTO bandwidth (user_id, bandwidth_limit, usage) VALUES ($1, 100, 50)", user)
    bw = (await db.fetchval("SELECT utility_status FROM users WHERE id = $1", user))["bandwidth"]
    assert (bw["total_usage"], bw["last_usage"], bw["records"], bw["remaining"], bw["over_limit"]) == (110, 50, 2, 0, True)
    await db.execute("DELETE FROM bandwidth WHERE id = $1", first)
    bw = (await db.fetchval("SELECT utility_status FROM users WHERE id = $1", user))["bandwidth"]
    assert (bw["total_usage"], bw["records"], bw["over_limit"]) == (50, 1, False)
    await db.execute("DELETE FROM bandwidth")
    assert "bandwidth" not in await db.fetchval("SELECT utility_status FROM users WHERE id = $1", user)
    assert await db.fetchval("SELECT utility_status FROM users WHERE id = $1", other) == {}
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO bandwidth (user_id, bandwidth_limit, usage) VALUES ($1, 100, -1)", user)


async def test_gateway_share_count_in_utility_status(db):
    user = await make_user(db)
    await db.execute("INSERT INTO gateway (user_id, share_point, created_at) VALUES ($1, 'gw-a', now() - interval '1 hour')", user)
    gw = (await db.fetchval("SELECT utility_status FROM users WHERE id = $1", user))["gateway"]
    assert (gw["share_points"], gw["last_share_point"]) == (1, "gw-a")
    second = await db.fetchval("INSERT INTO gateway (user_id, share_point) VALUES ($1, 'gw-b') RETURNING id", user)
    gw = (await db.fetchval("SELECT utility_status FROM users WHERE id = $1", user))["gateway"]
    assert (gw["share_points"], gw["last_share_point"]) == (2, "gw-b")
    await db.execute("DELETE FROM gateway WHERE id = $1", second)
    gw = (await db.fetchval("SELECT utility_status FROM users WHERE id = $1", user))["gateway"]
    assert (gw["share_points"], gw["last_share_point"]) == (1, "gw-a")
    await db.execute("DELETE FROM gateway")
    assert await db.fetchval("SELECT utility_status FROM users WHERE id = $1", user) == {}


async def test_deleting_a_user_takes_their_utilities(db):
    user = await make_user(db)
    file_id = await db.fetchval("INSERT INTO cloud (file_path, size) VALUES ('/f', 1) RETURNING id")
    await db.execute("INSERT INTO peer (user_id, file_id) VALUES ($1, $2)", user, file_id)
    await db.execute("INSERT INTO seeder (user_id, file_id) VALUES ($1, $2)", user, file_id)
    await db.execute("INSERT INTO bandwidth (user_id, bandwidth_limit, usage) VALUES ($1, 1, 1)", user)
    await db.execute("INSERT INTO gateway (user_id, share_point) VALUES ($1, 'g')", user)
    await db.execute("INSERT INTO channel (user_id, access_point) VALUES ($1, 'c')", user)
    await db.execute("DELETE FROM users WHERE id = $1", user)
    for table in ("peer", "seeder", "bandwidth", "gateway", "channel"):
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    assert await cloud_status(db, file_id) == "inactive"          # its swarm is gone


async def test_dns_names_are_unique(db):
    await db.execute("INSERT INTO dns (domain_name, ip_address) VALUES ('node.kvp', '10.0.0.1')")
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute("INSERT INTO dns (domain_name, ip_address) VALUES ('node.kvp', '10.0.0.2')")


# --------------------------------------------------------------------------------------------
# the migration itself
# --------------------------------------------------------------------------------------------

async def test_downgrade_to_base_leaves_an_empty_schema(db_dsn):
    await asyncio.to_thread(migrate.downgrade, db_dsn, "base")
    conn = await asyncpg.connect(db_dsn)
    try:
        leftovers = await conn.fetch(
            """SELECT 'relation ' || c.relname AS object FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = 'public' AND c.relname NOT IN ('alembic_version', 'alembic_version_pkc')
               UNION ALL
               SELECT 'function ' || p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                WHERE n.nspname = 'public'
               UNION ALL
               SELECT 'type ' || t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                WHERE n.nspname = 'public' AND t.typname NOT IN ('alembic_version', '_alembic_version')
               UNION ALL
               SELECT 'extension ' || extname FROM pg_extension WHERE extname <> 'plpgsql'""")
        assert [r["object"] for r in leftovers] == []
    finally:
        await conn.close()
    await asyncio.to_thread(migrate.upgrade, db_dsn)
    conn = await asyncpg.connect(db_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM chain_settings") == 1
    finally:
        await conn.close()


def test_statement_splitter_respects_quotes_and_dollar_bodies():
    import importlib.util
    from pathlib import Path

    path = Path(migrate.MIGRATIONS_DIR) / "versions" / "0001_initial_schema.py"
    spec = importlib.util.spec_from_file_location("initial_schema", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    script = """-- a comment; with a semicolon
        SELECT 'a;b', "odd;name" FROM t;
        CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$;
        CREATE FUNCTION g() RETURNS text LANGUAGE sql AS $body$ SELECT 'it''s;' $body$;
        -- trailing comment only"""
    statements = module.split_statements(script)
    assert len(statements) == 3
    assert statements[0].endswith("""SELECT 'a;b', "odd;name" FROM t""")
    assert statements[1].endswith("$$ BEGIN RETURN 1; END $$")
    assert statements[2].endswith("$body$ SELECT 'it''s;' $body$")
