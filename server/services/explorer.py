"""The chain explorer: blocks by height or hash, a block's transactions and rewards, an address's
balance, transfers and ledger, search, the halving schedule and burn totals. Read-only.

Lists are keyset pages: the answer's `next` is the key to pass back (`before` for newest-first
lists, `after` for a block's contents in block order), null on the last page.
"""

from __future__ import annotations

import decimal
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from db import chain as chain_queries
from db import explorer as queries
from server.core import wallets
from server.core.errors import InvalidPayload, NotFound
from server.core.jsonutil import iso
from server.core.money import AMOUNT_QUANTUM, money
from server.core.protocol import MAX_INTEGER_ID
from server.services.chain import summarise_wallet

BLOCK_HASH_LENGTH = 64
HEIGHT_DIGITS = 10
# block_reward() pays 0 from the 64th halving on; no schedule has more eras to show.
MAX_ERAS = 64
DEFAULT_ERAS = 10
# Enough digits for initial_block_reward / 2^63 exactly, so truncating to 8 decimals matches SQL's trunc().
_EXACT = decimal.Context(prec=120)


def _page(items: list, limit: int, key: Any) -> tuple[list, Any]:
    """The first `limit` of `limit + 1` fetched items and the next page's key (None on the last page)."""
    page = items[:limit]
    return page, (key(page[-1]) if len(items) > limit else None)


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


# --- blocks -----------------------------------------------------------------------------------

async def resolve_block(conn: asyncpg.Connection, ref: int | str) -> int:
    """The height of a block named by its height (an int or decimal digits) or its hash; NotFound otherwise."""
    if isinstance(ref, int) or (ref.isascii() and ref.isdigit() and len(ref) <= HEIGHT_DIGITS):
        height = int(ref)
        if height <= MAX_INTEGER_ID and await queries.block_hash_at(conn, height) is not None:
            return height
        raise NotFound("no block at that height", field="block")
    height = await queries.block_height_by_hash(conn, ref.lower()) if _is_hex(ref.lower(), BLOCK_HASH_LENGTH) else None
    if height is None:
        raise NotFound("no block has that hash", field="block")
    return height


async def get_block(conn: asyncpg.Connection, ref: int | str) -> dict[str, Any]:
    """A block by height or hash: the `<Block>`."""
    block = await chain_queries.get_block(conn, await resolve_block(conn, ref))
    if block is None:  # it existed a moment ago: heights are never deleted, but be exact
        raise NotFound("no block at that height", field="block")
    return block.to_public()


async def block_transactions(conn: asyncpg.Connection, ref: int | str, after: int | None, limit: int
                             ) -> dict[str, Any]:
    """A page of a block's transactions in block order."""
    height = await resolve_block(conn, ref)
    found = await queries.block_transactions(conn, height, after or 0, limit + 1)
    page, next_key = _page(found, limit, lambda item: item[0])
    return {"height": height, "items": [tx.to_public() for _, tx in page], "next": next_key}


async def block_mining_rewards(conn: asyncpg.Connection, ref: int | str, after: int | None, limit: int
                               ) -> dict[str, Any]:
    """A page of the rewards paid for a block (one per miner), oldest first."""
    height = await resolve_block(conn, ref)
    found = await queries.block_mining_rewards(conn, height, after or 0, limit + 1)
    page, next_key = _page(found, limit, lambda reward: reward.id)
    return {"height": height, "items": [reward.to_public() for reward in page], "next": next_key}


async def latest_transactions(conn: asyncpg.Connection, before: int | None, limit: int) -> dict[str, Any]:
    """A page of the chain's transfers, every status, newest first (the explorer's first paint)."""
    found = await queries.latest_transactions(conn, before or queries.MAX_INTEGER_KEY, limit + 1)
    page, next_key = _page(found, limit, lambda tx: tx.id)
    return {"items": [tx.to_public() for tx in page], "next": next_key}


async def latest_mining_rewards(conn: asyncpg.Connection, before: int | None, limit: int) -> dict[str, Any]:
    """A page of every miner's rewards, newest first."""
    found = await queries.latest_mining_rewards(conn, before or queries.MAX_INTEGER_KEY, limit + 1)
    page, next_key = _page(found, limit, lambda reward: reward.id)
    return {"items": [reward.to_public() for reward in page], "next": next_key}


# --- addresses --------------------------------------------------------------------------------

async def _address(conn: asyncpg.Connection, address: str) -> chain_queries.WalletAccount:
    address = address.lower()
    wallet = await chain_queries.get_wallet(conn, address) if wallets.ADDRESS_RE.match(address) else None
    if wallet is None:
        raise NotFound("no wallet has that address", field="address")
    return wallet


async def get_address(conn: asyncpg.Connection, address: str) -> dict[str, Any]:
    """An address's owner, balance, reserved (pending) amount and next free nonce."""
    wallet = await _address(conn, address)
    return {**await summarise_wallet(conn, wallet), "user_id": str(wallet.user_id)}


async def address_transactions(conn: asyncpg.Connection, address: str, before: int | None, limit: int
                               ) -> dict[str, Any]:
    """A page of an address's transfers, sent and received, newest first (every status)."""
    wallet = await _address(conn, address)
    found = await queries.address_transactions(conn, wallet.address, before or queries.MAX_INTEGER_KEY, limit + 1)
    page, next_key = _page(found, limit, lambda item: item[0])
    return {"address": wallet.address,
            "items": [{**tx.to_public(), "direction": direction} for _, direction, tx in page], "next": next_key}


async def address_ledger(conn: asyncpg.Connection, address: str, before: int | None, limit: int) -> dict[str, Any]:
    """A page of the balance_ledger rows of the address's owner, newest first."""
    wallet = await _address(conn, address)
    found = await queries.user_ledger(conn, wallet.user_id, before or queries.MAX_BIGINT_KEY, limit + 1)
    page, next_key = _page(found, limit, lambda row: row.id)
    return {"address": wallet.address, "balance": money(wallet.balance),
            "items": [row.to_public() for row in page], "next": next_key}


async def user_mining_rewards(conn: asyncpg.Connection, *, user_id: uuid.UUID | None = None,
                              address: str | None = None, before: int | None, limit: int) -> dict[str, Any]:
    """A page of a miner's rewards newest first, with their count and total; the miner by id or address."""
    if address is not None:
        user_id = (await _address(conn, address)).user_id
    elif user_id is None or not await queries.user_exists(conn, user_id):
        raise NotFound("no such user", field="user_id")
    found = await queries.user_mining_rewards(conn, user_id, before or queries.MAX_INTEGER_KEY, limit + 1)
    page, next_key = _page(found, limit, lambda reward: reward.id)
    count, total = await queries.user_mining_total(conn, user_id)
    return {"user_id": str(user_id), "reward_count": count, "total_rewards": money(total),
            "items": [reward.to_public() for reward in page], "next": next_key}


# --- search -----------------------------------------------------------------------------------

async def search(conn: asyncpg.Connection, query: str) -> dict[str, Any]:
    """What a height, block hash, transaction hash or address names, and where to read it."""
    text = query.strip().lower()
    if _is_hex(text, BLOCK_HASH_LENGTH):
        height = await queries.block_height_by_hash(conn, text)
        if height is not None:
            return {"query": query, "kind": "block", "height": height, "hash": text,
                    "path": f"/api/v1/chain/blocks/{height}"}
        tx = await queries.transaction_location(conn, text)
        if tx is not None:
            return {"query": query, "kind": "transaction", "hash": text, "status": tx["status"],
                    "height": tx["height"], "path": f"/api/v1/transactions/{text}"}
        raise NotFound("no block or transaction has that hash", field="q")
    if text.isascii() and text.isdigit():
        if len(text) > HEIGHT_DIGITS or int(text) > MAX_INTEGER_ID:
            raise InvalidPayload(f"a height is at most {MAX_INTEGER_ID}", field="q")
        block_hash = await queries.block_hash_at(conn, int(text))
        if block_hash is None:
            raise NotFound("no block at that height", field="q")
        return {"query": query, "kind": "block", "height": int(text), "hash": block_hash,
                "path": f"/api/v1/chain/blocks/{int(text)}"}
    if wallets.ADDRESS_RE.match(text):
        wallet = await chain_queries.get_wallet(conn, text)
        if wallet is None:
            raise NotFound("no wallet has that address", field="q")
        return {"query": query, "kind": "address", "address": text, "user_id": str(wallet.user_id),
                "path": f"/api/v1/chain/addresses/{text}"}
    raise InvalidPayload("search for a block height, a 64-hex block or transaction hash, or a kvp1 address",
                         field="q")


# --- halving and burns ------------------------------------------------------------------------

def era_reward(initial: Decimal, era: int) -> Decimal:
    """The reward of era `era` as block_reward() computes it: initial / 2^era truncated to 8 decimals."""
    if era >= MAX_ERAS:
        return Decimal(0)
    return _EXACT.divide(initial, Decimal(2) ** era).quantize(AMOUNT_QUANTUM, rounding=decimal.ROUND_DOWN)


async def halving_schedule(conn: asyncpg.Connection, eras: int) -> dict[str, Any]:
    """The reward schedule: the current era and reward, the next halving, and the first `eras` eras."""
    row = await queries.chain_economics(conn)
    initial, interval, height = row["initial_block_reward"], row["halving_interval"], row["height"]
    # "Current" is the next block to be sealed. Heights start at 1, and block `k * interval` opens
    # era k, as the SQL block_reward() computes it.
    next_height = height + 1
    era = next_height // interval
    next_halving = (era + 1) * interval
    schedule = []
    for k in range(eras):
        start, end = max(1, k * interval), min((k + 1) * interval - 1, MAX_INTEGER_ID)
        if start > MAX_INTEGER_ID:
            break
        if start <= end:  # era 0 has no blocks when every block halves (interval 1)
            schedule.append({"era": k, "from_height": start, "to_height": end, "reward": money(era_reward(initial, k))})
    return {"initial_block_reward": money(initial), "halving_interval": interval,
            "target_block_seconds": row["target_block_seconds"], "max_blocks": row["max_blocks"],
            "current_height": height, "current_era": era, "current_reward": money(row["next_block_reward"]),
            "next_halving_height": next_halving if next_halving <= MAX_INTEGER_ID else None,
            "next_reward": money(era_reward(initial, era + 1)),
            "blocks_until_halving": next_halving - height, "eras": schedule}


async def burns(conn: asyncpg.Connection, before: int | None, limit: int) -> dict[str, Any]:
    """Burn totals and a page of the burned blocks, newest first."""
    # A burn moves no balance: the schema records it as `blocks.burned` only, so the totals are the
    # burned blocks and the rewards that were paid for them (`mining_rewards`).
    totals = await queries.burn_totals(conn)
    found = await queries.burned_blocks(conn, before or queries.MAX_INTEGER_KEY, limit + 1)
    page, next_key = _page(found, limit, lambda block: block.height)
    return {"burned_blocks": totals.blocks, "burned_rewards": money(totals.rewards),
            "last_burn_time": iso(totals.last_burn_time),
            "items": [block.to_public() for block in page], "next": next_key}
