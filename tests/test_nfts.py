"""NFTs and the NFT marketplace against real PostgreSQL and real sockets: minting with validated
metadata, listing by the owner only, buying with balance moves and a ledger, the double-purchase
race, insufficient balance, cancelling, and `market:nfts` events."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg
import pytest

from tests.helpers import register, server_url
from tests.test_chain import account, admin_token, call, funded_pool, grant

METADATA = {"name": "Golden Sword", "description": "Forged in block 7.", "image": "https://example.org/sword.png",
            "attributes": [{"trait_type": "power", "value": 9}, {"trait_type": "rare", "value": True}]}


async def mint(client, user, **overrides) -> dict:
    status, body = await call(client, "POST", "/api/v1/nfts", user.token, json={"metadata": METADATA, **overrides})
    assert status == 201, body
    return body["data"]


async def list_nft(client, user, nft_id: int, price: str) -> tuple[int, dict]:
    return await call(client, "POST", "/api/v1/nft-listings", user.token, json={"nft_id": nft_id, "price": price})


async def listed(client, user, price: str = "40") -> dict:
    """A fresh NFT of `user`, listed at `price`; the listing."""
    nft = await mint(client, user)
    status, body = await list_nft(client, user, nft["id"], price)
    assert status == 201, body
    return body["data"]


async def buy(client, user, listing_id: int) -> tuple[int, dict]:
    return await call(client, "POST", f"/api/v1/nft-listings/{listing_id}/buy", user.token)


async def fund(client, db, *grants) -> None:
    """Give each (account, amount) that much KVP from a reward pool."""
    admin = await admin_token(client, db)
    pool = await funded_pool(client, admin, total="100000")
    for user, amount in grants:
        status, body = await grant(client, admin, pool, user, amount)
        assert status == 201, body


async def balance(db, user) -> Decimal:
    return await db.fetchval("SELECT total_balance FROM users WHERE id = $1", user.id)


async def market_state(db) -> tuple:
    """Everything a refused NFT operation must leave untouched."""
    # The outbox relay deletes what it publishes, so count what was ever queued (the id sequence).
    return (await db.fetch("SELECT nft_id, owner_wallet FROM nfts ORDER BY nft_id"),
            await db.fetch("SELECT listing_id, status, buyer_wallet FROM marketplace ORDER BY listing_id"),
            await db.fetch("SELECT id, total_balance FROM users ORDER BY id"),
            await db.fetchval("SELECT count(*) FROM balance_ledger"),
            await db.fetchval("SELECT last_value FROM event_outbox_id_seq"))


async def test_minting_validates_metadata_and_a_refusal_writes_nothing(client, db):
    no_wallet = await register(client)
    status, body = await call(client, "POST", "/api/v1/nfts", no_wallet["token"], json={"metadata": METADATA})
    assert (status, body["error"]["field"]) == (403, "wallet")
    alice = await account(client)
    before = await market_state(db)
    bad = [
        ({"metadata": {"description": "no name"}}, 400, "metadata.name"),
        ({"metadata": {"name": "   "}}, 400, "metadata.name"),
        ({"metadata": {"name": "x" * 101}}, 400, "metadata.name"),
        ({"metadata": {"name": "n", "owner": "me"}}, 400, "metadata.owner"),
        ({"metadata": {"name": "n", "image": "javascript:alert(1)"}}, 400, "metadata.image"),
        ({"metadata": {"name": "n", "attributes": [{"trait_type": "t"}]}}, 400, "metadata.attributes.0.value"),
        ({"metadata": {"name": "n", "attributes": [{"trait_type": "t", "value": 1}] * 51}}, 400,
         "metadata.attributes"),
        ({"metadata": "not an object"}, 400, "metadata"),
        ({"metadata": METADATA, "game_id": 0}, 400, "game_id"),
        ({"metadata": METADATA, "game_id": 424242}, 404, "game_id"),
        # Every field within its bounds, together above the 8 KiB total.
        ({"metadata": {"name": "n", "description": "d" * 2000,
                       "attributes": [{"trait_type": f"t{i}", "value": "v" * 200} for i in range(40)]}},
         413, "metadata"),
    ]
    for payload, expected, field in bad:
        status, body = await call(client, "POST", "/api/v1/nfts", alice.token, json=payload)
        assert (status, body["error"]["field"]) == (expected, field), payload
    assert (await call(client, "POST", "/api/v1/nfts", json={"metadata": METADATA}))[0] == 401
    assert await market_state(db) == before

    game = await db.fetchval("INSERT INTO games (name) VALUES ('Block Runner') RETURNING game_id")
    nft = await mint(client, alice, metadata={**METADATA, "name": "  Golden Sword  "}, game_id=game)
    assert (nft["owner_wallet"], nft["metadata"], nft["game_id"]) == (alice.address, METADATA, game)
    assert await db.fetchval("SELECT minted_by FROM nfts WHERE nft_id = $1", nft["id"]) == alice.id
    status, body = await call(client, "GET", f"/api/v1/nfts/{nft['id']}")
    assert status == 200 and body["data"]["listing"] is None and body["data"]["owner_wallet"] == alice.address
    second = await mint(client, alice)
    status, body = await call(client, "GET", f"/api/v1/nfts?owner={alice.address}&limit=1")
    assert [n["id"] for n in body["data"]["nfts"]] == [second["id"]] and body["data"]["next_before_id"] == second["id"]
    status, body = await call(client, "GET", f"/api/v1/nfts?owner={alice.address}&before_id={second['id']}")
    assert [n["id"] for n in body["data"]["nfts"]] == [nft["id"]] and body["data"]["next_before_id"] is None
    bob = await account(client)
    status, body = await call(client, "GET", f"/api/v1/nfts?owner={bob.address}")
    assert status == 200 and body["data"]["nfts"] == []
    status, body = await call(client, "GET", "/api/v1/nfts?owner=alice")
    assert (status, body["error"]["field"]) == (400, "owner")
    assert (await call(client, "GET", "/api/v1/nfts/99999"))[0] == 404
    # The database refuses non-object metadata from any writer.
    with pytest.raises(asyncpg.CheckViolationError, match="nfts_metadata_object_check"):
        await db.execute("INSERT INTO nfts (owner_wallet, metadata) VALUES ('w', '[1]')")


async def test_only_the_owner_lists_and_only_once(client, db):
    alice, bob = await account(client), await account(client)
    nft = await mint(client, alice)
    before = await market_state(db)
    for user, price, expected, field in [
        (bob, "10", 403, "nft_id"),                  # not the owner
        (alice, "0", 400, "price"),
        (alice, "-1", 400, "price"),
        (alice, "1.123456789", 400, "price"),        # more than 8 decimals
        (alice, "1000000000.00000001", 400, "price"),  # above the maximum
        (alice, 10, 400, "price"),                   # money is a string, never a JSON number
    ]:
        status, body = await list_nft(client, user, nft["id"], price)
        assert (status, body["error"]["field"]) == (expected, field), (price, body)
    status, body = await list_nft(client, alice, 999999, "10")
    assert (status, body["error"]["field"]) == (404, "nft_id")
    assert await market_state(db) == before

    status, body = await list_nft(client, alice, nft["id"], "12.5")
    assert status == 201, body
    listing = body["data"]
    assert (listing["nft_id"], listing["seller_wallet"], listing["price"], listing["status"], listing["buyer_wallet"]) \
        == (nft["id"], alice.address, "12.50000000", "Available", None)
    assert listing["nft"]["metadata"] == METADATA
    status, body = await list_nft(client, alice, nft["id"], "13")
    assert (status, body["error"]["code"], body["error"]["field"]) == (409, "conflict", "nft_id")
    status, body = await call(client, "GET", f"/api/v1/nft-listings?seller={alice.address}")
    assert [item["id"] for item in body["data"]["listings"]] == [listing["id"]]
    status, body = await call(client, "GET", f"/api/v1/nft-listings?seller={bob.address}")
    assert body["data"]["listings"] == []
    status, body = await call(client, "GET", f"/api/v1/nfts/{nft['id']}")
    assert body["data"]["listing"]["id"] == listing["id"]


async def test_buying_moves_balances_and_ownership_and_announces_the_sale(client, db, sockets):
    alice, bob = await account(client), await account(client)
    await fund(client, db, (bob, "100"))
    watcher = sockets()
    await watcher.connect(server_url(client), "/marketplace")
    assert (await watcher.call("/marketplace", "subscribe", {"channel": "market:nfts"}))["ok"]

    listing = await listed(client, alice, "40.25")
    announced = await watcher.wait_for("nft_listed")
    assert announced["channel"] == "market:nfts" and announced["data"]["id"] == listing["id"]

    status, body = await buy(client, bob, listing["id"])
    assert status == 200, body
    sold = body["data"]
    assert (sold["status"], sold["buyer_wallet"], sold["seller_wallet"], sold["nft"]["owner_wallet"],
            sold["buyer_balance"]) == ("Sold", bob.address, alice.address, bob.address, "59.75000000")
    assert (await balance(db, alice), await balance(db, bob)) == (Decimal("40.25"), Decimal("59.75"))
    ledger = await db.fetch("SELECT user_id, delta, balance_after, reason, reference FROM balance_ledger "
                            "WHERE reason LIKE 'nft_%' ORDER BY entry_id")
    assert [tuple(row) for row in ledger] == [
        (bob.id, Decimal("-40.25"), Decimal("59.75"), "nft_purchase", str(listing["id"])),
        (alice.id, Decimal("40.25"), Decimal("40.25"), "nft_sale", str(listing["id"]))]
    assert await db.fetchval("SELECT owner_wallet FROM nfts WHERE nft_id = $1", listing["nft_id"]) == bob.address

    event = await watcher.wait_for("nft_sold")
    assert event["channel"] == "market:nfts"
    assert (event["data"]["id"], event["data"]["nft_id"], event["data"]["price"], event["data"]["buyer_wallet"],
            event["data"]["seller_wallet"]) == (listing["id"], listing["nft_id"], "40.25000000", bob.address,
                                                alice.address)

    status, body = await call(client, "GET", "/api/v1/nft-listings")
    assert body["data"]["listings"] == []
    state = await market_state(db)
    status, body = await buy(client, bob, listing["id"])                     # already sold
    assert (status, body["error"]["field"]) == (409, "listing_id")
    status, body = await list_nft(client, alice, listing["nft_id"], "50")   # no longer hers
    assert (status, body["error"]["field"]) == (403, "nft_id")
    assert await market_state(db) == state

    # The new owner relists it, and cannot buy their own listing.
    status, body = await list_nft(client, bob, listing["nft_id"], "50")
    assert status == 201, body
    relisted = body["data"]
    no_wallet = await register(client)
    state = await market_state(db)
    status, body = await buy(client, bob, relisted["id"])
    assert (status, body["error"]["code"], body["error"]["field"]) == (403, "forbidden", "listing_id")
    status, body = await call(client, "POST", f"/api/v1/nft-listings/{relisted['id']}/buy", no_wallet["token"])
    assert (status, body["error"]["field"]) == (403, "wallet")
    assert (await call(client, "POST", f"/api/v1/nft-listings/{relisted['id']}/buy"))[0] == 401
    status, body = await buy(client, alice, 999999)
    assert (status, body["error"]["field"]) == (404, "listing_id")
    assert await market_state(db) == state


async def test_two_buyers_racing_for_one_listing_one_wins_and_money_moves_once(client, db):
    alice, bob, carol, dave = [await account(client) for _ in range(4)]
    await fund(client, db, (bob, "50"), (carol, "50"), (dave, "50"))
    listing = await listed(client, alice, "30")
    results = await asyncio.gather(*(buy(client, user, listing["id"]) for user in (bob, carol, dave)))
    assert sorted(status for status, _ in results) == [200, 409, 409], results
    for status, body in results:
        if status == 409:
            assert body["error"]["field"] == "listing_id" and "no longer available" in body["error"]["message"]
    winner = next(user for user, (status, _) in zip((bob, carol, dave), results) if status == 200)
    assert await balance(db, alice) == Decimal("30")
    assert [await balance(db, user) for user in (bob, carol, dave)] == \
        [Decimal("20") if user is winner else Decimal("50") for user in (bob, carol, dave)]
    assert await db.fetchval("SELECT count(*) FROM balance_ledger WHERE reason LIKE 'nft_%'") == 2
    assert await db.fetchval("SELECT owner_wallet FROM nfts WHERE nft_id = $1", listing["nft_id"]) == winner.address
    row = await db.fetchrow("SELECT status, buyer_wallet FROM marketplace WHERE listing_id = $1", listing["id"])
    assert tuple(row) == ("Sold", winner.address)
    assert await db.fetchval("SELECT count(*) FROM event_outbox WHERE type = 'nft_sold'") <= 1

    # One buyer clicking twice at once pays once too.
    second = await listed(client, alice, "5")
    results = await asyncio.gather(buy(client, dave, second["id"]), buy(client, dave, second["id"]))
    assert sorted(status for status, _ in results) == [200, 409]
    assert await balance(db, dave) == (Decimal("45") if winner is not dave else Decimal("15"))


async def test_insufficient_balance_is_refused_and_writes_nothing(client, db):
    alice, bob = await account(client), await account(client)
    await fund(client, db, (bob, "30"))
    listing = await listed(client, alice, "25")
    # A transfer waiting to be sealed reserves 10 of bob's 30, leaving 20 for the purchase.
    transfer = bob.wallet.sign_transfer(alice.address, "10", 0)
    assert (await call(client, "POST", "/api/v1/transactions", bob.token, json=transfer))[0] == 201
    before = await market_state(db)
    status, body = await buy(client, bob, listing["id"])
    assert (status, body["error"]["code"], body["error"]["field"]) == (409, "conflict", "price")
    assert "20.00000000 KVP available" in body["error"]["message"]
    assert await market_state(db) == before
    status, body = await call(client, "GET", f"/api/v1/nfts/{listing['nft_id']}")
    assert (body["data"]["owner_wallet"], body["data"]["listing"]["status"]) == (alice.address, "Available")


async def test_cancelled_listings_cannot_be_bought(client, db, sockets):
    alice, bob = await account(client), await account(client)
    await fund(client, db, (bob, "100"))
    watcher = sockets()
    await watcher.connect(server_url(client), "/marketplace")
    assert (await watcher.call("/marketplace", "subscribe", {"channel": "market:nfts"}))["ok"]
    listing = await listed(client, alice, "10")
    state = await market_state(db)
    status, body = await call(client, "POST", f"/api/v1/nft-listings/{listing['id']}/cancel", bob.token)
    assert (status, body["error"]["field"]) == (403, "listing_id")
    assert await market_state(db) == state

    status, body = await call(client, "POST", f"/api/v1/nft-listings/{listing['id']}/cancel", alice.token)
    assert status == 200 and body["data"]["status"] == "Cancelled"
    event = await watcher.wait_for("nft_listing_cancelled")
    assert (event["channel"], event["data"]["id"], event["data"]["status"]) == \
        ("market:nfts", listing["id"], "Cancelled")

    state = await market_state(db)
    status, body = await buy(client, bob, listing["id"])
    assert (status, body["error"]["field"]) == (409, "listing_id")
    assert "Cancelled" in body["error"]["message"]
    status, body = await call(client, "POST", f"/api/v1/nft-listings/{listing['id']}/cancel", alice.token)
    assert (status, body["error"]["field"]) == (409, "listing_id")
    assert await market_state(db) == state
    assert await balance(db, bob) == Decimal("100")
    status, body = await call(client, "GET", "/api/v1/nft-listings")
    assert body["data"]["listings"] == []
    status, body = await list_nft(client, alice, listing["nft_id"], "11")   # relisting is allowed
    assert status == 201 and body["data"]["id"] != listing["id"]


async def test_minting_is_rate_limited_per_user(client, db, monkeypatch):
    from server.services import nfts as service

    monkeypatch.setattr(service, "MINTS_PER_MINUTE", 2)
    alice, bob = await account(client), await account(client)
    await mint(client, alice)
    await mint(client, alice)
    status, body = await call(client, "POST", "/api/v1/nfts", alice.token, json={"metadata": METADATA})
    assert (status, body["error"]["code"]) == (429, "rate_limited")
    assert 0 < body["error"]["retry_after"] <= 60
    await mint(client, bob)                                                  # another user is not limited
    assert await db.fetchval("SELECT count(*) FROM nfts") == 3
