"""The demo data set: a few sellers and buyers, real small datasets encrypted as uploads are,
a reward pool, a game and an open proposal. Loaded once (skipped when the demo users exist)."""

from __future__ import annotations

import csv
import hashlib
import io
import random
import uuid
from decimal import Decimal

import asyncpg
import structlog
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from db import chain as chain_queries
from db import demo as demo_queries
from db import kyc as kyc_queries
from db import marketplace as datapod_queries
from db import users as user_queries
from server.adapters.blobs import BlobStore, create_blob_store
from server.core.settings import Settings
from server.core.wallets import Wallet
from server.services.datasets import CSV, seal_chunks, upload_dir

log = structlog.get_logger(__name__)

DEMO_PASSWORD = "demo-password"
DEMO_USERS = (
    ("alice", "Alice Data", "seller"),
    ("bob", "Bob Research", "seller"),
    ("carol", "Carol Buyer", "buyer"),
)


def demo_wallet(username: str) -> Wallet:
    """A demo user's wallet: its key derived from the name, so as public as DEMO_PASSWORD (demo only)."""
    seed = hashlib.sha256(f"sourcenet-demo-wallet:{username}".encode()).digest()
    return Wallet(Ed25519PrivateKey.from_private_bytes(seed))


def _csv(header: list[str], rows: list[list]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def demo_datasets() -> list[dict]:
    """Deterministic small datasets (same bytes every time, so their blob ids are stable)."""
    rng = random.Random(20261122)
    weather = [[f"2026-10-{day:02d}", city, round(rng.uniform(-5, 30), 1), rng.randint(20, 95)]
               for day in range(1, 31) for city in ("Jakarta", "Berlin", "Lagos", "Lima")]
    prices = [[f"2026-11-{day:02d}", sym, f"{rng.uniform(0.5, 4.0):.4f}", rng.randint(10_000, 900_000)]
              for day in range(1, 21) for sym in ("SUI", "WAL", "KVP")]
    traffic = [[f"{hour:02d}:00", road, rng.randint(100, 5000), round(rng.uniform(10, 90), 1)]
               for hour in range(24) for road in ("A1", "B7", "Ring")]
    crops = [[region, crop, rng.randint(500, 9000), round(rng.uniform(1.2, 7.5), 2)]
             for region in ("North", "South", "East", "West") for crop in ("rice", "maize", "cassava", "soy")]
    return [
        {"seller": "alice", "title": "Daily city weather, October 2026", "category": "climate",
         "description": "Daily temperature and humidity for four cities, one row per city and day.",
         "price": Decimal("1.5"), "header": ["date", "city", "temp_c", "humidity_pct"], "rows": weather},
        {"seller": "alice", "title": "Token prices and volumes", "category": "finance",
         "description": "Daily closing price and traded volume for SUI, WAL and KVP tokens.",
         "price": Decimal("3.25"), "header": ["date", "symbol", "close", "volume"], "rows": prices},
        {"seller": "bob", "title": "Hourly road traffic counts", "category": "transport",
         "description": "Vehicles per hour and average speed on three roads over one day.",
         "price": Decimal("0.75"), "header": ["hour", "road", "vehicles", "avg_speed_kmh"], "rows": traffic},
        {"seller": "bob", "title": "Regional crop yields", "category": "agriculture",
         "description": "Harvested hectares and yield per hectare by region and crop.",
         "price": Decimal("2"), "header": ["region", "crop", "hectares", "yield_t_per_ha"], "rows": crops},
    ]


async def load_if_empty(conn: asyncpg.Connection, settings: Settings, master_key: bytes,
                        blobs: BlobStore | None = None) -> bool:
    """Load the demo set unless its users exist; returns whether anything was loaded."""
    if await user_queries.username_taken(conn, DEMO_USERS[0][0]):
        return False
    own_store = blobs is None
    store = create_blob_store(settings) if blobs is None else blobs
    try:
        await _load(conn, settings, master_key, store)
    finally:
        if own_store:
            await store.close()
    log.info("demo_data_loaded", users=len(DEMO_USERS), datapods=len(demo_datasets()))
    return True


async def _load(conn: asyncpg.Connection, settings: Settings, master_key: bytes, blobs: BlobStore) -> None:
    password_hash = PasswordHasher().hash(DEMO_PASSWORD)
    async with conn.transaction():
        users = {}
        for username, name, role in DEMO_USERS:
            users[username] = await user_queries.create_user(
                conn, username=username, email=f"{username}@demo.sourcenet.local",
                password_hash=password_hash, name=name)
            if role == "seller":  # publishing for sale needs an Approved KYC
                await kyc_queries.set_user_status(conn, users[username].id, kyc_queries.APPROVED)
            # Every demo user's wallet, so each can pay (and be paid) from any browser: the page imports
            # its key from static/demo-wallets/<username>.json (encrypted with DEMO_PASSWORD).
            wallet = demo_wallet(username)
            await chain_queries.set_wallet(conn, users[username].id, wallet.public_key, wallet.address)
        for dataset in demo_datasets():
            pod_id = uuid.uuid5(uuid.NAMESPACE_URL, f"sourcenet-demo:{dataset['title']}")
            # Sealed exactly as seller uploads are (server/services/datasets.py): same profile, same encryption.
            sealed = await seal_chunks([_csv(dataset["header"], dataset["rows"])], fmt=CSV, pod_id=pod_id,
                                       blobs=blobs, master_key=master_key, tmp_dir=upload_dir(settings.data_dir))
            await datapod_queries.insert_datapod(
                conn, sealed, seller_id=users[dataset["seller"]].id, title=dataset["title"],
                description=dataset["description"], category=dataset["category"], price_sui=dataset["price"],
                tags=[], published=True)
        await demo_queries.insert_reward_pools(conn)
        # No token is stored: its owner alice gets one with POST /api/v1/games/{id}/token.
        await demo_queries.insert_game(conn, name="Block Runner", owner_id=users["alice"].id,
                                       developer_wallet="kvp1demo" + hashlib.sha256(b"block-runner").hexdigest()[:32])
        await demo_queries.insert_open_proposal(
            conn, title="Lower the marketplace fee to 1%",
            description="Reduce the platform fee on DataPod sales from 2% to 1% for one quarter.",
            creator_wallet=demo_wallet("alice").address)
