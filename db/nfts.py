"""Queries of NFTs and their marketplace listings (`nfts`, `marketplace`).

Each function takes the connection first; the caller owns the transaction. The rules (who may
mint, list, buy or cancel, and how money moves) live in server/services/nfts.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from server.core.jsonutil import iso
from server.core.money import amount_text

AVAILABLE, SOLD, CANCELLED = "Available", "Sold", "Cancelled"



@dataclasses.dataclass(frozen=True, slots=True)
class Nft:
    """An NFT and the wallet that owns it."""

    id: int
    owner_wallet: str
    metadata: dict[str, Any]
    game_id: int | None
    created_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The API's view."""
        return {"id": self.id, "owner_wallet": self.owner_wallet, "metadata": self.metadata,
                "game_id": self.game_id, "created_at": iso(self.created_at)}


@dataclasses.dataclass(frozen=True, slots=True)
class Listing:
    """A marketplace listing of an NFT, with the NFT as it is now."""

    id: int
    nft_id: int
    seller_wallet: str
    buyer_wallet: str | None
    price: Decimal
    status: str
    created_at: dt.datetime
    nft: Nft

    def to_public(self) -> dict[str, Any]:
        """The API's view."""
        return {"id": self.id, "nft_id": self.nft_id, "seller_wallet": self.seller_wallet,
                "buyer_wallet": self.buyer_wallet, "price": amount_text(self.price), "status": self.status,
                "created_at": iso(self.created_at), "nft": self.nft.to_public()}


_NFT_COLUMNS = "n.nft_id AS id, n.owner_wallet, n.metadata, n.game_id, n.created_at"
_LISTING_SELECT = """SELECT m.listing_id, m.nft_id, m.seller_wallet, m.buyer_wallet, m.price, m.status,
           m.created_at AS listed_at, n.owner_wallet, n.metadata, n.game_id, n.created_at
      FROM marketplace m JOIN nfts n ON n.nft_id = m.nft_id"""


def _listing(row: asyncpg.Record) -> Listing:
    nft = Nft(id=row["nft_id"], owner_wallet=row["owner_wallet"], metadata=row["metadata"], game_id=row["game_id"],
              created_at=row["created_at"])
    return Listing(id=row["listing_id"], nft_id=row["nft_id"], seller_wallet=row["seller_wallet"],
                   buyer_wallet=row["buyer_wallet"], price=row["price"], status=row["status"],
                   created_at=row["listed_at"], nft=nft)


# --- NFTs -------------------------------------------------------------------------------------

async def insert_nft(conn: asyncpg.Connection, *, owner_wallet: str, metadata: dict[str, Any], game_id: int | None,
                     minted_by: uuid.UUID) -> Nft:
    """Mint an NFT owned by a wallet."""
    row = await conn.fetchrow(
        f"""INSERT INTO nfts AS n (owner_wallet, metadata, game_id, minted_by) VALUES ($1, $2, $3, $4)
            RETURNING {_NFT_COLUMNS}""", owner_wallet, metadata, game_id, minted_by)
    return Nft(**dict(row))


async def lock_minter(conn: asyncpg.Connection, user_id: uuid.UUID) -> None:
    """Hold the user's mint lock until the transaction ends."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 7342))", str(user_id))


async def mints_in_last_minute(conn: asyncpg.Connection, user_id: uuid.UUID) -> tuple[int, float]:
    """How many NFTs the user minted in the last 60 s, and the seconds since the oldest of them."""
    row = await conn.fetchrow(
        """SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS age
             FROM nfts WHERE minted_by = $1 AND created_at > now() - interval '60 seconds'""", user_id)
    return row["n"], row["age"]


async def game_exists(conn: asyncpg.Connection, game_id: int) -> bool:
    """Whether a game with this id is registered."""
    return await conn.fetchval("SELECT EXISTS (SELECT 1 FROM games WHERE game_id = $1)", game_id)


async def get_nft(conn: asyncpg.Connection, nft_id: int, *, lock: bool = False) -> Nft | None:
    """An NFT by id (its row locked until the transaction ends when `lock`)."""
    row = await conn.fetchrow(
        f"SELECT {_NFT_COLUMNS} FROM nfts n WHERE n.nft_id = $1 {'FOR UPDATE' if lock else ''}", nft_id)
    return Nft(**dict(row)) if row else None


async def list_nfts(conn: asyncpg.Connection, owner_wallet: str | None, before_id: int | None,
                    limit: int) -> list[Nft]:
    """NFTs newest first, optionally of one owner and below an id."""
    rows = await conn.fetch(
        f"""SELECT {_NFT_COLUMNS} FROM nfts n
             WHERE ($1::text IS NULL OR n.owner_wallet = $1) AND ($2::int IS NULL OR n.nft_id < $2)
             ORDER BY n.nft_id DESC LIMIT $3""", owner_wallet, before_id, limit)
    return [Nft(**dict(row)) for row in rows]


async def transfer_nft(conn: asyncpg.Connection, nft_id: int, from_wallet: str, to_wallet: str) -> bool:
    """Move an NFT to another wallet if `from_wallet` still owns it; whether it moved."""
    status = await conn.execute(
        "UPDATE nfts SET owner_wallet = $3 WHERE nft_id = $1 AND owner_wallet = $2", nft_id, from_wallet, to_wallet)
    return status == "UPDATE 1"


# --- listings ---------------------------------------------------------------------------------

async def insert_listing(conn: asyncpg.Connection, nft_id: int, seller_wallet: str, price: Decimal) -> int | None:
    """Open a listing; None when the NFT already has an available one (marketplace_one_available_listing)."""
    return await conn.fetchval(
        """INSERT INTO marketplace (nft_id, seller_wallet, price, status) VALUES ($1, $2, $3, 'Available')
           ON CONFLICT (nft_id) WHERE status = 'Available' DO NOTHING RETURNING listing_id""",
        nft_id, seller_wallet, price)


async def get_listing(conn: asyncpg.Connection, listing_id: int, *, lock: bool = False) -> Listing | None:
    """A listing with its NFT (the listing row locked until the transaction ends when `lock`)."""
    row = await conn.fetchrow(
        f"{_LISTING_SELECT} WHERE m.listing_id = $1 {'FOR UPDATE OF m' if lock else ''}", listing_id)
    return _listing(row) if row else None


async def available_listing_of(conn: asyncpg.Connection, nft_id: int) -> Listing | None:
    """The NFT's open listing, if any."""
    row = await conn.fetchrow(f"{_LISTING_SELECT} WHERE m.nft_id = $1 AND m.status = 'Available'", nft_id)
    return _listing(row) if row else None


async def list_available(conn: asyncpg.Connection, seller_wallet: str | None, before_id: int | None,
                         limit: int) -> list[Listing]:
    """Available listings newest first, optionally of one seller and below an id."""
    rows = await conn.fetch(
        f"""{_LISTING_SELECT}
             WHERE m.status = 'Available' AND ($1::text IS NULL OR m.seller_wallet = $1)
               AND ($2::int IS NULL OR m.listing_id < $2)
             ORDER BY m.listing_id DESC LIMIT $3""", seller_wallet, before_id, limit)
    return [_listing(row) for row in rows]


async def close_listing(conn: asyncpg.Connection, listing_id: int, status: str, buyer_wallet: str | None = None) -> bool:
    """Mark an available listing Sold (with its buyer) or Cancelled; False when it was no longer available."""
    result = await conn.execute(
        """UPDATE marketplace SET status = $2, buyer_wallet = $3
            WHERE listing_id = $1 AND status = 'Available'""", listing_id, status, buyer_wallet)
    return result == "UPDATE 1"
