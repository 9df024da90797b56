"""Escrow rules: the server's escrow wallet holds each purchase's payment until it is released to the
seller (buyer confirms, the window passes, or an administrator resolves a dispute) or refunded to
the buyer, and then pays it out by transfers it signs itself, sealed in a block like any other.

Life of an escrow (escrow_transactions.status, each change a compare-and-set, each step a row in
escrow_steps and an event on the buyer's and the seller's `user:<id>` channels):

    holding --confirm / window passed--> released --payout sealed--> (settled)
    holding --dispute--> disputed --admin--> released | refunded --payout sealed--> (settled)
    holding | paid but failed --refund--> refunded --payout sealed--> (settled)

A decision only changes the row; the purchase worker's settlement sweep (`settle_decided`) signs
the payout transfers with the escrow wallet's key and, once a block seals them, marks the escrow
settled. On Sui (SUI_RPC_URL) the payment sits at the custodial ESCROW_ADDRESS instead, and the
payout is the custodian's to make (docs/operations.md, "Escrow").
"""

from __future__ import annotations

import dataclasses
import uuid
from decimal import ROUND_DOWN, Decimal
from typing import Any, AsyncIterator

import asyncpg
import structlog
from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from db import chain as chain_queries
from db import escrow as queries
from db import outbox, system_wallets
from db.pool import POOL
from server.core import wallets
from server.core.crypto import MASTER_KEY, UnknownMasterKey, unwrap_key, wrap_key
from server.core.cursors import decode_time_cursor, encode_time_cursor
from server.core.errors import Conflict, Forbidden, InvalidPayload, NotFound
from server.core.identity import Identity
from server.core.money import AMOUNT_QUANTUM
from server.core.settings import SETTINGS, Settings
from server.realtime.hub import user_channel

log = structlog.get_logger(__name__)

ESCROW_WALLET = "escrow"
FEE_WALLET = "platform_fees"
SYSTEM_USERNAMES = {ESCROW_WALLET: "system:escrow", FEE_WALLET: "system:platform-fees"}  # ':' no sign-up allows

# Events on the buyer's and the seller's user:<id> channels.
ESCROW_RELEASED = "escrow_released"
ESCROW_REFUNDED = "escrow_refunded"
ESCROW_DISPUTED = "escrow_disputed"
ESCROW_SETTLED = "escrow_settled"
EVENTS = (ESCROW_RELEASED, ESCROW_REFUNDED, ESCROW_DISPUTED, ESCROW_SETTLED)

# Reasons a decision names (escrow_steps.reason and the events' `reason`).
BUYER_CONFIRMED = "buyer_confirmed"
WINDOW_PASSED = "release_window_passed"
SETTLE_BATCH = 50


def system_wallet_context(name: str) -> bytes:
    """What a system wallet's wrapped private key is bound to (AAD)."""
    return f"system-wallet:{name}".encode()


# --- the server's wallets ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class EscrowAccounts:
    """The escrow wallet with its signing key (kept in memory only), and the platform's fee wallet."""

    escrow: system_wallets.SystemWallet
    signer: wallets.Wallet = dataclasses.field(repr=False)
    fees: system_wallets.SystemWallet


ESCROW_ACCOUNTS: web.AppKey[EscrowAccounts] = web.AppKey("escrow_accounts", EscrowAccounts)


async def ensure_system_wallet(conn: asyncpg.Connection, master_key: bytes,
                               name: str) -> tuple[system_wallets.SystemWallet, wallets.Wallet]:
    """The named system wallet, created on first use (one creator even with many processes), and its key."""
    async with conn.transaction():
        await system_wallets.lock_names(conn)
        wallet = await system_wallets.get(conn, name)
        if wallet is None:
            fresh = wallets.Wallet.generate()
            raw = fresh.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            wallet = await system_wallets.create(
                conn, name, SYSTEM_USERNAMES[name], fresh.public_key, fresh.address,
                wrap_key(master_key, raw, system_wallet_context(name)))
            log.info("system_wallet_created", name=name, address=wallet.address)
    try:
        raw_key = unwrap_key(master_key, wallet.wrapped_private_key, system_wallet_context(name))
    except (UnknownMasterKey, InvalidTag):
        raise RuntimeError(f"the {name} wallet's key was wrapped under another MASTER_KEY: every process of a "
                           "deployment needs the same MASTER_KEY (and PREVIOUS_MASTER_KEY while rotating)") from None
    signer = wallets.Wallet(Ed25519PrivateKey.from_private_bytes(raw_key))
    if signer.public_key != wallet.public_key:
        raise RuntimeError(f"the {name} wallet's stored key does not match its public key")
    return wallet, signer


async def load_accounts(pool: asyncpg.Pool, master_key: bytes) -> EscrowAccounts:
    """The escrow and fee wallets, created if missing."""
    async with pool.acquire() as conn:
        escrow, signer = await ensure_system_wallet(conn, master_key, ESCROW_WALLET)
        fees, _ = await ensure_system_wallet(conn, master_key, FEE_WALLET)
    return EscrowAccounts(escrow, signer, fees)


async def escrow_ctx(app: web.Application) -> AsyncIterator[None]:
    """An aiohttp cleanup context: this process's handle on the escrow wallets."""
    app[ESCROW_ACCOUNTS] = await load_accounts(app[POOL], app[MASTER_KEY])
    yield


def fee_rate(settings: Settings) -> Decimal:
    """PLATFORM_FEE_RATE as a decimal fraction."""
    return Decimal(settings.platform_fee_rate)


def terms(settings: Settings, accounts: EscrowAccounts) -> dict[str, Any]:
    """What a buyer needs to pay into escrow, and the rules it follows."""
    on_sui = settings.sui_rpc_url is not None
    return {"chain": "sui" if on_sui else "kvp",
            "address": settings.escrow_address if on_sui else accounts.escrow.address,
            "platform_fee_rate": settings.platform_fee_rate, "release_seconds": settings.escrow_release_seconds,
            # A KVP payment counts once sealed in a block: the page tells the buyer how long that takes.
            "block_seconds": None if on_sui else settings.block_interval_seconds,
            "custodial": True}


# --- events and steps --------------------------------------------------------------------------------

async def _announce(conn: asyncpg.Connection, escrow: queries.Escrow, event: str, reason: str,
                    **extra: Any) -> None:
    for user_id in (escrow.buyer_id, escrow.seller_id):
        await outbox.enqueue(conn, user_channel(user_id), event, {**escrow.event(reason), **extra})


async def announce_decision(conn: asyncpg.Connection, escrow: queries.Escrow | None, reason: str,
                            actor_id: uuid.UUID | None) -> queries.Escrow | None:
    """Log and announce a release or refund that just happened."""
    if escrow is not None:
        await queries.add_step(conn, escrow, escrow.status, actor_id=actor_id, amount=escrow.amount_sui, reason=reason)
        await _announce(conn, escrow, ESCROW_RELEASED if escrow.status == queries.RELEASED else ESCROW_REFUNDED,
                        reason)
    return escrow


async def record_hold(conn: asyncpg.Connection, escrow: queries.Escrow) -> None:
    """Log that the escrow holds the payment (the purchase's own events announce it)."""
    await queries.add_step(conn, escrow, queries.STEP_HOLDING, actor_id=escrow.buyer_id,
                           tx_hash=escrow.payment_tx_digest, amount=escrow.amount_sui)


# --- decisions ---------------------------------------------------------------------------------------

async def release(conn: asyncpg.Connection, purchase_id: uuid.UUID, reason: str, *, fee_rate: Decimal,
                  actor_id: uuid.UUID | None = None) -> queries.Escrow | None:
    """holding -> released, with the platform fee at `fee_rate`; None when it was not holding."""
    return await announce_decision(conn, await queries.release(conn, purchase_id, fee_rate=fee_rate), reason,
                                   actor_id)


async def refund_unheld(conn: asyncpg.Connection, purchase_id: uuid.UUID, seller_id: uuid.UUID, amount: Decimal,
                        reason: str) -> queries.Escrow | None:
    """A payment received for a purchase that failed before its escrow opened: owed back at once."""
    owed = await queries.hold(conn, purchase_id, seller_id, amount, status=queries.REFUNDED)
    return await announce_decision(conn, owed, reason, None)


async def release_due(pool: asyncpg.Pool, window_seconds: float, fee_rate: Decimal) -> int:
    """Release the escrows of completed purchases held longer than the window; returns how many."""
    async with pool.acquire() as conn, conn.transaction():
        released = await queries.release_due(conn, window_seconds, fee_rate)
        for escrow in released:
            await announce_decision(conn, escrow, WINDOW_PASSED, None)
    return len(released)


async def _party_escrow(conn: asyncpg.Connection, identity: Identity, purchase_id: uuid.UUID,
                        *, lock: bool = False) -> queries.Escrow:
    """The escrow of a purchase the caller bought or sold (any, for an administrator)."""
    escrow = await queries.get(conn, purchase_id, lock=lock)
    if escrow is None or identity.user_id not in (escrow.buyer_id, escrow.seller_id) and not identity.is_admin:
        raise NotFound("no escrow for that purchase", field="purchase_id")
    return escrow


async def confirm_receipt(app: web.Application, identity: Identity, purchase_id: uuid.UUID) -> dict[str, Any]:
    """The buyer confirms delivery: released now (once; later calls say what it is)."""
    async with app[POOL].acquire() as conn, conn.transaction():
        escrow = await _party_escrow(conn, identity, purchase_id, lock=True)
        if escrow.buyer_id != identity.user_id:
            raise Forbidden("only the buyer confirms receipt", field="purchase_id")
        released = await queries.release(conn, purchase_id, fee_rate=fee_rate(app[SETTINGS]))
        if released is not None:
            await queries.add_step(conn, released, queries.STEP_CONFIRMED, actor_id=identity.user_id)
            await announce_decision(conn, released, BUYER_CONFIRMED, identity.user_id)
    return {"purchase_id": str(purchase_id), "released": released is not None,
            "escrow_status": (released or escrow).status}


async def open_dispute(app: web.Application, identity: Identity, purchase_id: uuid.UUID,
                       reason: str) -> dict[str, Any]:
    """The buyer disputes within the window: the auto-release freezes until an administrator decides."""
    reason = reason.strip()
    if not reason:
        raise InvalidPayload("say what is wrong with the purchase", field="reason")
    window = app[SETTINGS].escrow_release_seconds
    async with app[POOL].acquire() as conn, conn.transaction():
        escrow = await _party_escrow(conn, identity, purchase_id, lock=True)
        if escrow.buyer_id != identity.user_id:
            raise Forbidden("only the buyer opens a dispute", field="purchase_id")
        disputed = await queries.dispute(conn, purchase_id, reason, window)
        if disputed is None:
            if escrow.status == queries.HOLDING:
                raise Conflict("the escrow window has passed; the payment is being released", field="purchase_id")
            raise Conflict(f"the escrow is {escrow.status}; only a holding escrow can be disputed",
                           field="purchase_id")
        await queries.add_step(conn, disputed, queries.STEP_DISPUTED, actor_id=identity.user_id, reason=reason)
        await _announce(conn, disputed, ESCROW_DISPUTED, reason)
    log.info("escrow_disputed", purchase_id=str(purchase_id))
    return disputed.to_public()


async def escrow_view(app: web.Application, identity: Identity, purchase_id: uuid.UUID) -> dict[str, Any]:
    """A purchase's escrow and its steps, for its buyer, its seller or an administrator."""
    async with app[POOL].acquire() as conn:
        escrow = await _party_escrow(conn, identity, purchase_id)
        steps = await queries.steps(conn, purchase_id)
    return {**escrow.to_public(), "steps": [step.to_public() for step in steps]}


async def list_disputes(app: web.Application, cursor: str | None, limit: int) -> dict[str, Any]:
    """The administrators' queue: open disputes, oldest first, paged by cursor."""
    async with app[POOL].acquire() as conn:
        rows = await queries.disputes(conn, decode_time_cursor(cursor) if cursor else None, limit + 1)
    page = rows[:limit]
    return {"items": [row.to_public() for row in page],
            "next_cursor": encode_time_cursor(page[-1].disputed_at, page[-1].id)  # type: ignore[arg-type]
            if len(rows) > limit else None}


# --- settlement ------------------------------------------------------------------------------------

async def _signed_transfer(conn: asyncpg.Connection, accounts: EscrowAccounts, source: chain_queries.WalletAccount,
                           payee: chain_queries.WalletAccount, amount: Decimal,
                           nonce: int) -> chain_queries.Transaction:
    payload = accounts.signer.sign_transfer(payee.address, amount, nonce)
    tx_hash = wallets.transaction_hash(source.address, payee.address, payload["amount"], nonce)
    return await chain_queries.insert_pending(conn, tx_hash=tx_hash, sender=source, receiver=payee,
                                              amount=Decimal(payload["amount"]), nonce=nonce,
                                              signature=payload["signature"], submitted_by=source.user_id)


async def _issue_payout(conn: asyncpg.Connection, accounts: EscrowAccounts, escrow: queries.Escrow) -> bool:
    """Sign the payout transfers of a decided escrow; False while the payee has no wallet to pay."""
    payee = await chain_queries.get_user_wallet(conn, escrow.payee_id)
    if payee is None:
        return False
    # The escrow wallet's row lock serialises payouts, so nonces never collide between processes.
    source = await chain_queries.get_wallet(conn, accounts.escrow.address, lock=True)
    fees = await chain_queries.get_wallet(conn, accounts.fees.address)
    assert source is not None and fees is not None
    amount = escrow.amount_sui.quantize(AMOUNT_QUANTUM, rounding=ROUND_DOWN)
    fee = escrow.fee_amount if escrow.status == queries.RELEASED else Decimal(0)
    nonce = await chain_queries.next_nonce(conn, source.address)
    payout = await _signed_transfer(conn, accounts, source, payee, amount - fee, nonce)
    fee_tx = await _signed_transfer(conn, accounts, source, fees, fee, nonce + 1) if fee > 0 else None
    await queries.record_payout(conn, escrow.id, payout.hash, fee_tx.hash if fee_tx else None)
    log.info("escrow_payout_signed", purchase_id=str(escrow.purchase_id), status=escrow.status, tx=payout.hash)
    return True


async def _settle_one(conn: asyncpg.Connection, accounts: EscrowAccounts, escrow: queries.Escrow) -> bool:
    """Move one decided escrow on: sign its payout, or mark it settled once sealed; True when settled."""
    if escrow.settlement_tx_hash is None:
        await _issue_payout(conn, accounts, escrow)
        return False
    hashes = [h for h in (escrow.settlement_tx_hash, escrow.fee_tx_hash) if h]
    statuses = await queries.transaction_statuses(conn, hashes)
    if any(statuses.get(h) == "rejected" for h in hashes):
        # Only if the escrow wallet was drained off-chain: sign afresh rather than lose the payout.
        log.error("escrow_payout_rejected", purchase_id=str(escrow.purchase_id), txs=hashes)
        await queries.add_step(conn, escrow, queries.STEP_REISSUED, tx_hash=escrow.settlement_tx_hash)
        await queries.record_payout(conn, escrow.id, None, None)
        return False
    if not all(statuses.get(h) == "confirmed" for h in hashes):
        return False
    await queries.mark_settled(conn, escrow.id)
    await queries.add_step(conn, escrow, queries.STEP_SETTLED, tx_hash=escrow.settlement_tx_hash,
                           amount=escrow.amount_sui - escrow.fee_amount)
    await _announce(conn, escrow, ESCROW_SETTLED, escrow.status, payee_id=str(escrow.payee_id),
                    paid=escrow.amount_sui - escrow.fee_amount, fee_amount=escrow.fee_amount,
                    settlement_tx_hash=escrow.settlement_tx_hash, fee_tx_hash=escrow.fee_tx_hash)
    return True


async def _settle_custodial(conn: asyncpg.Connection, escrow: queries.Escrow) -> bool:
    # On Sui the server holds no key to the custodial address: the decision is the payout order.
    await queries.mark_settled(conn, escrow.id)
    await queries.add_step(conn, escrow, queries.STEP_SETTLED, amount=escrow.amount_sui,
                           reason="payout by the custodian of ESCROW_ADDRESS")
    await _announce(conn, escrow, ESCROW_SETTLED, escrow.status, payee_id=str(escrow.payee_id),
                    paid=escrow.amount_sui, fee_amount=Decimal(0), settlement_tx_hash=None, fee_tx_hash=None)
    return True


async def settle_decided(pool: asyncpg.Pool, accounts: EscrowAccounts, settings: Settings) -> int:
    """One pass of the settlement sweep over decided escrows; returns how many became settled."""
    settled = 0
    async with pool.acquire() as conn, conn.transaction():
        for escrow in await queries.lock_unsettled(conn, SETTLE_BATCH):
            if settings.sui_rpc_url:
                settled += await _settle_custodial(conn, escrow)
            else:
                settled += await _settle_one(conn, accounts, escrow)
    return settled


async def escrow_report(conn: asyncpg.Connection, limit: int) -> list[str]:
    """`chain verify`'s escrow check: every settled escrow nets to zero, the wallet covers what it holds."""
    escrow = await system_wallets.get(conn, ESCROW_WALLET)
    return [] if escrow is None else await queries.lifecycle_mismatches(conn, escrow.user_id, limit)
