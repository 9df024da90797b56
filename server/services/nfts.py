"""NFT rules: minting by a wallet owner, listing, buying with KVP balance, cancelling.

An NFT is owned by a KVP wallet address (users.wallet_address); only a signed-in user with a
registered wallet mints, lists, buys or cancels, and only for their own wallet. A purchase is one
transaction: the buyer's balance is debited and the seller's credited (each with its
`balance_ledger` row, booked once per listing), the NFT moves to the buyer's wallet and the
listing becomes 'Sold' with its buyer. Listing, buying and cancelling take the NFT's row lock
first, so they run one at a time per NFT (two buyers: the second sees the listing sold), and
the listing's status change is a compare-and-set as well. Every change is announced on
`market:nfts` through the outbox, in the transaction that makes it.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from db import chain as chain_queries
from db import ledger, outbox
from db import nfts as queries
from server.core import jsonutil, wallets
from server.core.errors import Conflict, Forbidden, InvalidPayload, NotFound, PayloadTooLarge, RateLimited
from server.core.money import amount_text
from server.services.chain import own_wallet

CHANNEL = "market:nfts"
NFT_MINTED = "nft_minted"
NFT_LISTED = "nft_listed"
NFT_SOLD = "nft_sold"
NFT_LISTING_CANCELLED = "nft_listing_cancelled"
PURCHASE_REASON = ledger.NFT_PURCHASE
SALE_REASON = ledger.NFT_SALE
MAX_METADATA_BYTES = 8192
MAX_PRICE = Decimal("1000000000")
MINTS_PER_MINUTE = 30


def clean_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Schema-valid metadata with its name trimmed; refuses a blank name and oversized metadata."""
    name = metadata["name"].strip()
    if not name:
        raise InvalidPayload("the name must not be blank", field="metadata.name")
    cleaned = {**metadata, "name": name}
    if len(jsonutil.dumpb(cleaned)) > MAX_METADATA_BYTES:
        raise PayloadTooLarge(f"metadata may be at most {MAX_METADATA_BYTES} bytes of JSON", field="metadata")
    return cleaned


def parse_price(raw: str) -> Decimal:
    """A listing price: more than 0, at most 8 decimals and at most MAX_PRICE KVP."""
    try:
        price = Decimal(wallets.canonical_amount(raw))
    except wallets.AmountError as exc:
        raise InvalidPayload(str(exc).replace("amount", "price"), field="price") from None
    if price > MAX_PRICE:
        raise InvalidPayload(f"the price may be at most {amount_text(MAX_PRICE)} KVP", field="price")
    return price


async def mint(conn: asyncpg.Connection, user_id: uuid.UUID, payload: dict[str, Any]) -> queries.Nft:
    """Mint an NFT owned by the caller's wallet; any refusal writes nothing."""
    metadata = clean_metadata(payload["metadata"])
    game_id = payload.get("game_id")
    async with conn.transaction():
        wallet = await own_wallet(conn, user_id)
        if game_id is not None and not await queries.game_exists(conn, game_id):
            raise NotFound("no such game", field="game_id")
        # Serialises one user's mints across processes, so two cannot both pass the rate check.
        await queries.lock_minter(conn, user_id)
        count, oldest_age = await queries.mints_in_last_minute(conn, user_id)
        if count >= MINTS_PER_MINUTE:
            raise RateLimited(f"at most {MINTS_PER_MINUTE} mints per minute", retry_after=max(0.1, 60.0 - oldest_age))
        nft = await queries.insert_nft(conn, owner_wallet=wallet.address, metadata=metadata, game_id=game_id,
                                       minted_by=user_id)
        await outbox.enqueue(conn, CHANNEL, NFT_MINTED, nft.to_public())
    return nft


async def get_nft(conn: asyncpg.Connection, nft_id: int) -> dict[str, Any]:
    """An NFT with its open listing (null when it is not for sale)."""
    nft = await queries.get_nft(conn, nft_id)
    if nft is None:
        raise NotFound("no such NFT", field="nft_id")
    listing = await queries.available_listing_of(conn, nft_id)
    return {**nft.to_public(), "listing": listing.to_public() if listing else None}


async def list_nfts(conn: asyncpg.Connection, owner_wallet: str | None, before_id: int | None,
                    limit: int) -> list[queries.Nft]:
    """NFTs newest first, optionally of one owner wallet and below an id."""
    return await queries.list_nfts(conn, owner_wallet, before_id, limit)


async def list_listings(conn: asyncpg.Connection, seller_wallet: str | None, before_id: int | None,
                        limit: int) -> list[queries.Listing]:
    """Available listings newest first, optionally of one seller wallet and below an id."""
    return await queries.list_available(conn, seller_wallet, before_id, limit)


async def create_listing(conn: asyncpg.Connection, user_id: uuid.UUID, nft_id: int, raw_price: str) -> queries.Listing:
    """List the caller's NFT for sale; one available listing per NFT."""
    price = parse_price(raw_price)
    async with conn.transaction():
        nft = await queries.get_nft(conn, nft_id, lock=True)
        if nft is None:
            raise NotFound("no such NFT", field="nft_id")
        wallet = await own_wallet(conn, user_id)
        if nft.owner_wallet != wallet.address:
            raise Forbidden("only the NFT's owner may list it", field="nft_id")
        listing_id = await queries.insert_listing(conn, nft_id, wallet.address, price)
        if listing_id is None:
            raise Conflict("the NFT is already listed; cancel that listing first", field="nft_id")
        listing = await queries.get_listing(conn, listing_id)
        await outbox.enqueue(conn, CHANNEL, NFT_LISTED, listing.to_public())  # type: ignore[union-attr]
    return listing  # type: ignore[return-value]


async def _lock_listing(conn: asyncpg.Connection, listing_id: int) -> queries.Listing:
    """The listing under its NFT's row lock (taken first, as listing does, so the two cannot deadlock)."""
    listing = await queries.get_listing(conn, listing_id)
    if listing is None:
        raise NotFound("no such listing", field="listing_id")
    await queries.get_nft(conn, listing.nft_id, lock=True)
    return await queries.get_listing(conn, listing_id, lock=True)  # type: ignore[return-value]


def _still_available(listing: queries.Listing) -> None:
    if listing.status != queries.AVAILABLE:
        raise Conflict(f"the listing is no longer available (it is {listing.status})", field="listing_id")


async def buy(conn: asyncpg.Connection, user_id: uuid.UUID, listing_id: int) -> tuple[queries.Listing, Decimal]:
    """Buy an available listing with the caller's balance; the sold listing and the buyer's balance after.

    Any refusal (sold or cancelled meanwhile, own listing, insufficient balance) writes nothing.
    """
    async with conn.transaction():
        listing = await _lock_listing(conn, listing_id)
        buyer = await own_wallet(conn, user_id)
        _still_available(listing)
        if listing.seller_wallet == buyer.address:
            raise Forbidden("you cannot buy your own listing", field="listing_id")
        seller = await chain_queries.get_wallet(conn, listing.seller_wallet)
        if seller is None:
            raise Conflict("the seller's account no longer exists", field="listing_id")
        price = listing.price
        balances = await chain_queries.lock_balances(conn, sorted({buyer.user_id, seller.user_id}))
        # Transfers waiting to be sealed are reserved from the balance (as the chain does).
        available = balances[buyer.user_id] - await chain_queries.pending_outgoing(conn, buyer.address)
        if price > available:
            raise Conflict(f"insufficient balance: {amount_text(max(available, Decimal(0)))} KVP available, "
                           f"the price is {amount_text(price)} KVP", field="price")
        if not await queries.transfer_nft(conn, listing.nft_id, listing.seller_wallet, buyer.address):
            raise Conflict("the seller no longer owns this NFT", field="listing_id")
        if not await queries.close_listing(conn, listing_id, queries.SOLD, buyer.address):
            raise Conflict("the listing is no longer available", field="listing_id")
        buyer_balance = balances[buyer.user_id]
        if price > 0:
            # UNIQUE (reason, reference) books each side of a listing's sale once, whatever happens above.
            moved = await ledger.apply_balance_changes(conn, [
                ledger.BalanceChange(buyer.user_id, -price, PURCHASE_REASON, str(listing_id)),
                ledger.BalanceChange(seller.user_id, price, SALE_REASON, str(listing_id))])
            buyer_balance = moved[buyer.user_id]
        sold = await queries.get_listing(conn, listing_id)
        await outbox.enqueue(conn, CHANNEL, NFT_SOLD, sold.to_public())  # type: ignore[union-attr]
    return sold, buyer_balance  # type: ignore[return-value]


async def cancel(conn: asyncpg.Connection, user_id: uuid.UUID, listing_id: int) -> queries.Listing:
    """Withdraw the caller's available listing."""
    async with conn.transaction():
        listing = await _lock_listing(conn, listing_id)
        wallet = await own_wallet(conn, user_id)
        if listing.seller_wallet != wallet.address:
            raise Forbidden("only the seller may cancel a listing", field="listing_id")
        _still_available(listing)
        if not await queries.close_listing(conn, listing_id, queries.CANCELLED):
            raise Conflict("the listing is no longer available", field="listing_id")
        cancelled = await queries.get_listing(conn, listing_id)
        await outbox.enqueue(conn, CHANNEL, NFT_LISTING_CANCELLED, cancelled.to_public())  # type: ignore[union-attr]
    return cancelled  # type: ignore[return-value]
