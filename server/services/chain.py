"""KVP chain rules: signed transfers, sealing blocks (balances, rewards, events), verification, pools.

Balances live in `users.total_balance` and move only through db/ledger.py, which books a
`balance_ledger` row per change. A submitted transfer reserves its amount (pending transactions count
against the sender's balance), and sealing moves the balances (transfer_out, transfer_in,
mining_reward rows) in the same database transaction that appends the block, records the reward and
queues the events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from db import chain as queries
from db import ledger, outbox
from db import mining as mining_queries
from db.pool import POOL
from server.core import wallets
from server.core.errors import Conflict, Forbidden, InvalidPayload, NotFound, RateLimited
from server.core.money import money
from server.realtime.hub import publish
from server.services import escrow, mining

log = structlog.get_logger(__name__)

BLOCKS_CHANNEL = "chain:blocks"
TRANSACTIONS_CHANNEL = "chain:transactions"
MINING_CHANNEL = "chain:mining"

BLOCK_ADDED = "block_added"
BLOCKS_BURNED = "blocks_burned"
TRANSACTION_PENDING = "transaction_pending"
TRANSACTION_CONFIRMED = "transaction_confirmed"
TRANSACTION_REJECTED = "transaction_rejected"
MINING_REWARDED = "mining_rewarded"
HALVING_SCHEDULED = "halving_scheduled"

BLOCK_VERSION = 1
ZERO = Decimal(0)
FAUCET_REASON = ledger.FAUCET
VERIFY_REPORT_LIMIT = 10   # mismatches listed by verify_chain


# --- wallets and transfers --------------------------------------------------------------------

async def register_wallet(conn: asyncpg.Connection, user_id: uuid.UUID, public_key: str) -> dict[str, Any]:
    """Register the user's Ed25519 public key (once); returns the wallet."""
    public_key = public_key.lower()
    try:
        wallets.parse_public_key(public_key)
    except ValueError as exc:
        raise InvalidPayload(str(exc), field="public_key") from None
    address = wallets.address_of(public_key)
    try:
        stored = await queries.set_wallet(conn, user_id, public_key, address)
    except asyncpg.UniqueViolationError:
        raise Conflict("that key is registered to another account", field="public_key") from None
    if stored is None:
        raise Conflict("your account already has another wallet key; it cannot be changed", field="public_key")
    return {"address": address, "public_key": public_key}


async def wallet_summary(conn: asyncpg.Connection, address: str) -> dict[str, Any]:
    """Balance, reserved amount and next free nonce of a wallet."""
    wallet = await queries.get_wallet(conn, address)
    if wallet is None:
        raise NotFound("no wallet has that address", field="address")
    return await summarise_wallet(conn, wallet)


async def summarise_wallet(conn: asyncpg.Connection, wallet: queries.WalletAccount) -> dict[str, Any]:
    """A wallet's address, key, balance, reserved (pending) amount, what is free and its next nonce."""
    pending = await queries.pending_outgoing(conn, wallet.address)
    return {"address": wallet.address, "public_key": wallet.public_key, "balance": money(wallet.balance),
            "pending_outgoing": money(pending), "available": money(wallet.balance - pending),
            "next_nonce": await queries.next_nonce(conn, wallet.address)}


async def own_wallet(conn: asyncpg.Connection, user_id: uuid.UUID) -> queries.WalletAccount:
    """The caller's registered wallet; Forbidden until they register one (mint, vote, propose...)."""
    wallet = await queries.get_user_wallet(conn, user_id)
    if wallet is None:
        raise Forbidden("register a wallet key first (PUT /api/v1/me/wallet)", field="wallet")
    return wallet


async def own_wallet_address(conn: asyncpg.Connection, user_id: uuid.UUID) -> dict[str, Any]:
    """The user's own wallet address, or None before they register one."""
    wallet = await queries.get_user_wallet(conn, user_id)
    return {"user_id": str(user_id), "address": wallet.address if wallet else None}


async def wallet_of_user(conn: asyncpg.Connection, user_id: uuid.UUID) -> dict[str, Any]:
    """A user's wallet address (public, as on every transaction), e.g. the seller's to pay."""
    wallet = await queries.get_user_wallet(conn, user_id)
    if wallet is None:
        raise NotFound("this user has not registered a wallet yet, so they cannot be paid", field="user_id")
    return {"user_id": str(user_id), "address": wallet.address}


async def claim_faucet(conn: asyncpg.Connection, user_id: uuid.UUID, amount: Decimal,
                       now: dt.datetime | None = None) -> dict[str, Any]:
    """Credit demo funds to the caller's wallet, at most once per user per UTC day."""
    now = now or dt.datetime.now(dt.timezone.utc)
    async with conn.transaction():
        wallet = await queries.get_user_wallet(conn, user_id)
        if wallet is None:
            raise Conflict("register a wallet first (PUT /api/v1/me/wallet)", field="wallet")
        try:
            # (reason, reference) is unique: the day's second claim, even a concurrent one, fails
            # here and the transaction takes its credit back.
            balances = await ledger.apply_balance_changes(conn, [ledger.BalanceChange(
                user_id, amount, FAUCET_REASON, f"{user_id}:{now.date().isoformat()}")])
        except asyncpg.UniqueViolationError:
            tomorrow = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
            raise RateLimited("the demo faucet pays once a day; try again tomorrow (UTC)",
                              retry_after=(tomorrow - now).total_seconds()) from None
    log.info("faucet_paid", user_id=str(user_id), amount=money(amount))
    return {"address": wallet.address, "credited": money(amount), "balance": money(balances[user_id])}


def check_own_signature(wallet: queries.WalletAccount | None, user_id: uuid.UUID, message: bytes, signature: str, *,
                        role: str, action: str) -> None:
    """The wallet exists, is the caller's and signed `message`; else the error naming `role` (sender, voter)."""
    if wallet is None:
        raise NotFound(f"no wallet is registered with the {role} address", field=role)
    if wallet.user_id != user_id:
        raise Forbidden(f"you can only {action} your own wallet", field=role)
    if not wallets.verify_signature(wallet.public_key, message, signature):
        raise InvalidPayload(f"the signature does not verify against the {role}'s registered key",
                             field="signature")


async def submit_transaction(app: web.Application, user_id: uuid.UUID, payload: dict) -> queries.Transaction:
    """Verify and record a signed transfer, then announce it (not critical: the block confirms it)."""
    async with app[POOL].acquire() as conn:
        tx = await record_transfer(conn, user_id, payload)
    try:
        await publish(app, TRANSACTIONS_CHANNEL, TRANSACTION_PENDING, pending_event(tx))
    except Exception:  # noqa: BLE001 - the transaction is recorded; the feed is best effort
        log.warning("transaction_pending_not_published", hash=tx.hash, exc_info=True)
    return tx


async def record_transfer(conn: asyncpg.Connection, user_id: uuid.UUID, payload: dict) -> queries.Transaction:
    """Verify a signed transfer and record it as pending; any refusal writes nothing."""
    sender, receiver, nonce = payload["sender"], payload["receiver"], payload["nonce"]
    signature = payload["signature"].lower()
    try:
        amount_text = wallets.canonical_amount(payload["amount"])
    except wallets.AmountError as exc:
        raise InvalidPayload(str(exc), field="amount") from None
    if sender == receiver:
        raise InvalidPayload("the receiver must differ from the sender", field="receiver")
    amount = Decimal(amount_text)
    message = wallets.transaction_message(sender, receiver, amount_text, nonce)
    tx_hash = wallets.transaction_hash(sender, receiver, amount_text, nonce)
    async with conn.transaction():
        # The sender's row lock serialises its submissions, so two transfers cannot both spend
        # the same balance (the second sees the first as pending).
        wallet = await queries.get_wallet(conn, sender, lock=True)
        check_own_signature(wallet, user_id, message, signature, role="sender", action="send from")
        duplicate = await queries.transaction_exists(conn, tx_hash, sender, nonce)
        if duplicate == "hash":
            raise Conflict(f"transaction {tx_hash} was already submitted", field="signature")
        if duplicate is not None:
            raise Conflict(f"nonce {nonce} was already used by this wallet", field="nonce")
        target = await queries.get_wallet(conn, receiver)
        if target is None:
            raise NotFound("no wallet is registered with the receiver address", field="receiver")
        available = wallet.balance - await queries.pending_outgoing(conn, sender)
        if amount > available:
            raise Conflict(f"insufficient balance: {money(max(available, ZERO))} KVP available", field="amount")
        return await queries.insert_pending(conn, tx_hash=tx_hash, sender=wallet, receiver=target, amount=amount,
                                            nonce=nonce, signature=signature, submitted_by=user_id)


def pending_event(tx: queries.Transaction) -> dict[str, Any]:
    """`transaction_pending` data."""
    return {"hash": tx.hash, "sender": tx.sender, "receiver": tx.receiver, "amount": money(tx.amount),
            "nonce": tx.nonce}


async def get_transaction(conn: asyncpg.Connection, tx_hash: str) -> queries.Transaction:
    """A transaction by hash (any case), with its status and block height once sealed."""
    tx = await queries.get_transaction(conn, tx_hash.lower())
    if tx is None:
        raise NotFound("no transaction has that hash", field="hash")
    return tx


# --- reading blocks ---------------------------------------------------------------------------

async def blocks_since(conn: asyncpg.Connection, since_height: int, limit: int) -> dict[str, Any]:
    """The blocks after a height (oldest first, at most `limit`), and the chain's tip."""
    blocks = await queries.blocks_after(conn, since_height, limit + 1)
    latest = await queries.tip_height(conn)
    return {"blocks": [block.to_public() for block in blocks[:limit]], "has_more": len(blocks) > limit,
            "latest_height": latest}


async def blocks_before(conn: asyncpg.Connection, before_height: int | None, limit: int) -> dict[str, Any]:
    """A page of blocks newest first, below `before_height` when given, with the cursor of the next page."""
    blocks = await queries.list_blocks(conn, before_height, limit)
    latest = await queries.tip_height(conn)
    next_before = blocks[-1].height if len(blocks) == limit and blocks[-1].height > 1 else None
    return {"blocks": [block.to_public() for block in blocks], "latest_height": latest,
            "next_before_height": next_before}


async def block_with_transactions(conn: asyncpg.Connection, height: int) -> dict[str, Any]:
    """One block by height, with its transactions in block order."""
    block = await queries.get_block(conn, height)
    if block is None:
        raise NotFound("no block at that height", field="height")
    txs = (await queries.block_transactions(conn, [height]))[height]
    by_hash = {tx.hash: tx.to_public() for tx in txs}
    return {**block.to_public(), "transaction_details": [by_hash[h] for h in block.tx_hashes if h in by_hash]}


# --- sealing ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class SealConfig:
    """What the producer needs to seal a block."""

    difficulty: int = 8
    miner_username: str | None = None
    mining_pool: str = "mining"
    max_transactions: int = 500
    producer: str = ""
    mobile_second_weight: Decimal = Decimal("0.1")   # MINING_MOBILE_SECOND_WEIGHT (a Node share weighs 1)


@dataclasses.dataclass(frozen=True, slots=True)
class Sealed:
    """A sealed block and what went into it."""

    block: queries.Block
    confirmed: list[queries.Transaction]
    rejected: list[tuple[queries.Transaction, str]]
    reward: Decimal


async def seal_block(conn: asyncpg.Connection, config: SealConfig) -> Sealed:
    """Seal the pending transactions into the next block, in one database transaction."""
    async with conn.transaction():
        chain = await queries.lock_chain_settings(conn)   # one sealer at a time, even without the lock
        last = await queries.tip(conn)
        height = (last["height"] if last else 0) + 1
        previous_hash = last["hash"] if last else None
        now = dt.datetime.now(dt.timezone.utc)
        if last is not None and now <= last["timestamp"]:
            now = last["timestamp"] + dt.timedelta(microseconds=1)   # block times never go back
        pending = await queries.lock_pending(conn, config.max_transactions)
        miner = await queries.get_miner(conn, config.miner_username) if config.miner_username else None
        if config.miner_username and miner is None:
            log.warning("miner_not_found", username=config.miner_username)

        # The reward: the schedule's (after halving), capped by the pool, split among the users who
        # mined since the last paying block; without them the configured miner takes it all, as before
        # user mining. Truncation leaves the remainder in the pool (it is never drawn).
        payouts: list[mining.Payout] = []
        pool = await queries.lock_pool_by_name(conn, config.mining_pool)
        if pool is None:
            if miner is not None:
                log.warning("mining_pool_missing", pool=config.mining_pool)
        else:
            available = max(min(await queries.scheduled_reward(conn, height), pool.remaining), ZERO)
            payouts = await mining.block_payouts(conn, available, config.mobile_second_weight)
            if not payouts and miner is not None and available > 0:
                payouts = [mining.Payout(miner.user_id, miner.account, miner.device_type, available, 0, 0, ZERO)]

        accounts: dict[uuid.UUID, str] = {}
        for tx in pending:
            if tx.sender_id is not None:
                accounts[tx.sender_id] = tx.sender  # type: ignore[assignment]
            if tx.receiver_id is not None:
                accounts[tx.receiver_id] = tx.receiver  # type: ignore[assignment]
        for payout in payouts:
            accounts[payout.user_id] = payout.account
        before = await queries.lock_balances(conn, sorted(accounts))
        after = dict(before)

        confirmed: list[queries.Transaction] = []
        rejected: list[tuple[queries.Transaction, str]] = []
        for tx in pending:
            if tx.sender_id not in after or tx.receiver_id not in after:
                rejected.append((tx, "the sender's or receiver's account no longer exists"))
            elif after[tx.sender_id] < tx.amount:
                # Reserved at submission, so this only happens when the balance was spent off-chain.
                rejected.append((tx, "insufficient balance when sealed"))
            else:
                after[tx.sender_id] -= tx.amount
                after[tx.receiver_id] += tx.amount
                confirmed.append(tx)

        payouts = [payout for payout in payouts if payout.user_id in after]   # a miner deleted meanwhile
        for payout in payouts:
            after[payout.user_id] += payout.amount
        reward = sum((payout.amount for payout in payouts), ZERO)
        # The header names the miner with the largest part (the configured one when nobody mined);
        # data["rewards"] lists every miner's part, and each miner's balance after is in state_hash.
        top = max(payouts, key=lambda payout: payout.amount, default=None)
        miner_account = top.account if top else (miner.account if miner else "")
        miner_id = top.user_id if top else (miner.user_id if miner else None)

        touched = {tx.sender_id for tx in confirmed} | {tx.receiver_id for tx in confirmed}
        touched |= {payout.user_id for payout in payouts}
        balances = {accounts[uid]: {"before": money(before[uid]), "after": money(after[uid])}
                    for uid in sorted(touched, key=str)}  # type: ignore[arg-type]
        header = wallets.BlockHeader(
            height=height, previous_hash=previous_hash, timestamp=now, miner=miner_account,
            reward=money(reward), difficulty=config.difficulty,
            state_hash=wallets.state_hash({account: b["after"] for account, b in balances.items()}),
            tx_hashes=tuple(tx.hash for tx in confirmed))
        nonce, block_hash = await asyncio.to_thread(wallets.mine, header)

        # In sealing order, so each row's balance_after is the running balance computed above.
        changes = [change for tx in confirmed for change in (
            ledger.BalanceChange(tx.sender_id, -tx.amount, ledger.TRANSFER_OUT, tx.hash),  # type: ignore[arg-type]
            ledger.BalanceChange(tx.receiver_id, tx.amount, ledger.TRANSFER_IN, tx.hash))]  # type: ignore[arg-type]
        changes += [ledger.BalanceChange(payout.user_id, payout.amount, ledger.MINING_REWARD,
                                         mining_reference(height, payout.user_id)) for payout in payouts]
        moved = await ledger.apply_balance_changes(conn, changes)
        assert all(moved[uid] == after[uid] for uid in moved), "balances moved while locked"
        data = {"version": BLOCK_VERSION, "difficulty": config.difficulty, "miner": header.miner,
                "reward": header.reward, "state_hash": header.state_hash, "balances": balances,
                "rewards": {payout.account: money(payout.amount) for payout in payouts},
                "rejected": [tx.hash for tx, _ in rejected], "producer": config.producer}
        await queries.insert_block(conn, height=height, block_hash=block_hash, previous_hash=previous_hash,
                                   timestamp=now, nonce=nonce, data=data, tx_hashes=list(header.tx_hashes),
                                   miner_id=miner_id)
        if confirmed:
            await queries.confirm(conn, [tx.id for tx in confirmed], height, now)
        for tx, reason in rejected:
            await queries.reject(conn, tx.id, reason)
        pool_remaining = None
        if payouts and pool is not None:
            drawn = await queries.draw(conn, pool.id, reward)
            pool_remaining = drawn.remaining if drawn else None
            await mining_queries.insert_rewards(conn, height, pool.id, [payout.row() for payout in payouts])
        block = await queries.get_block(conn, height)
        assert block is not None
        await _enqueue_sealed(conn, block, confirmed, rejected, payouts, pool, pool_remaining,
                              chain["halving_interval"])
        await mining.enqueue_payouts(conn, height, block.hash, payouts, moved)
    log.info("block_sealed", height=height, txs=len(confirmed), rejected=len(rejected), reward=str(reward))
    return Sealed(block, confirmed, rejected, reward)


def mining_reference(height: int, user_id: uuid.UUID) -> str:
    """The ledger reference of a miner's reward for a block, unique per miner per block."""
    return f"{height}:{user_id}"


async def _enqueue_sealed(conn: asyncpg.Connection, block: queries.Block, confirmed: list[queries.Transaction],
                          rejected: list[tuple[queries.Transaction, str]], payouts: list[mining.Payout],
                          pool: queries.RewardPool | None, pool_remaining: Decimal | None,
                          halving_interval: int) -> None:
    # Lossless events: queued in the sealing transaction, published by the relay after commit.
    public = block.to_public()
    await outbox.enqueue(conn, BLOCKS_CHANNEL, BLOCK_ADDED, {
        key: public[key] for key in ("height", "hash", "previous_hash", "timestamp", "tx_count", "miner",
                                     "miner_id", "reward", "difficulty", "total_blocks", "burned_blocks",
                                     "next_halving_time")})
    for tx in confirmed:
        await outbox.enqueue(conn, TRANSACTIONS_CHANNEL, TRANSACTION_CONFIRMED, {
            "hash": tx.hash, "height": block.height, "block_hash": block.hash, "sender": tx.sender,
            "receiver": tx.receiver, "amount": money(tx.amount)})
    for tx, reason in rejected:
        await outbox.enqueue(conn, TRANSACTIONS_CHANNEL, TRANSACTION_REJECTED, {
            "hash": tx.hash, "sender": tx.sender, "reason": reason})
    for payout in payouts:   # one per miner paid by the block
        await outbox.enqueue(conn, MINING_CHANNEL, MINING_REWARDED, {
            "height": block.height, "block_hash": block.hash, "miner": payout.account,
            "miner_id": str(payout.user_id), "reward": money(payout.amount), "device_type": payout.device_type,
            "shares": payout.shares, "mobile_seconds": payout.mobile_seconds,
            "pool_id": pool.id if pool else None,
            "pool_remaining": money(pool_remaining) if pool_remaining is not None else None})
    if block.height == 1 or block.height % halving_interval == 0:
        next_height = (block.height // halving_interval + 1) * halving_interval
        await outbox.enqueue(conn, MINING_CHANNEL, HALVING_SCHEDULED, {
            "height": block.height, "halved": block.height % halving_interval == 0,
            "reward": money(await queries.scheduled_reward(conn, block.height)),
            "next_halving_height": next_height,
            "next_reward": money(await queries.scheduled_reward(conn, next_height)),
            "next_halving_time": public["next_halving_time"], "halving_interval": halving_interval})


async def burn_blocks_of(conn: asyncpg.Connection, miner_id: uuid.UUID) -> dict[str, Any]:
    """Burn a miner's blocks (the plan: a removed miner's blocks are burned); queues `blocks_burned`."""
    async with conn.transaction():
        burned = await queries.burn_miner_blocks(conn, miner_id)
        latest = await queries.get_block(conn, await queries.tip_height(conn))
        result = {"miner_id": str(miner_id), "block_ids": burned,
                  "burned_blocks": latest.burned_blocks if latest else 0,
                  "burned_block_ids": [int(i) for i in latest.burned_block_ids] if latest else [],
                  "last_burn_time": latest.to_public()["last_burn_time"] if latest else None}
        if burned:
            await outbox.enqueue(conn, BLOCKS_CHANNEL, BLOCKS_BURNED, result)
    return result


# --- verification -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of a verification: ok, or the first broken block and the first ledger mismatches."""

    ok: bool
    blocks: int
    problem: str | None = None
    height: int | None = None
    ledger_problems: tuple[str, ...] = ()

    @property
    def problems(self) -> list[str]:
        """Every problem found, the chain's first."""
        return ([self.problem] if self.problem else []) + list(self.ledger_problems)


async def verify_chain(conn: asyncpg.Connection, batch: int = 500) -> VerifyReport:
    """Walk the chain from genesis (the first broken link, altered record or block balance mismatch),
    then check every balance against its ledger and every reward pool against its draws."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        checked, problem, height = await _walk_blocks(conn, batch)
        ledger_problems = await ledger_report(conn, VERIFY_REPORT_LIMIT)
    return VerifyReport(problem is None and not ledger_problems, checked, problem, height, tuple(ledger_problems))


async def _walk_blocks(conn: asyncpg.Connection, batch: int) -> tuple[int, str | None, int | None]:
    previous: queries.Block | None = None
    checked = 0
    while True:
        blocks = await queries.blocks_after(conn, previous.height if previous else 0, batch)
        if not blocks:
            return checked, None, None
        heights = [block.height for block in blocks]
        txs = await queries.block_transactions(conn, heights)
        rewards = await queries.mining_rewards_by_block(conn, heights)
        for block in blocks:
            problem = check_block(block, previous, txs[block.height], rewards.get(block.height, []))
            if problem is not None:
                return checked, f"block {block.height}: {problem}", block.height
            previous = block
            checked += 1


async def ledger_report(conn: asyncpg.Connection, limit: int) -> list[str]:
    """The first users whose balance is not the sum of their ledger rows, ledger rows that do not
    chain, moves that do not net to 0, reward pools whose allocated tokens differ from their draws, and
    escrows whose money does not add up."""
    found = [m.describe() for m in await ledger.balance_mismatches(conn, limit)]
    found += [m.describe() for m in await ledger.chain_mismatches(conn, limit)]
    found += await ledger.unbalanced_moves(conn, limit)
    found += [m.describe() for m in await ledger.pool_mismatches(conn, limit)]
    found += await escrow.escrow_report(conn, limit)
    return found


def check_block(block: queries.Block, previous: queries.Block | None, txs: list[queries.Transaction],
                rewards: list[Decimal]) -> str | None:
    """The first thing wrong with a block given its predecessor, or None."""
    expected = previous.height + 1 if previous else 1
    if block.height != expected:
        return f"height gap: expected {expected}"
    if block.previous_hash != (previous.hash if previous else None):
        return "broken link: previous_hash does not match the hash of the block before it"
    if previous is not None and block.timestamp < previous.timestamp:
        return "timestamp earlier than the block before it"
    data = block.data if isinstance(block.data, dict) else {}
    if data.get("version") != BLOCK_VERSION:
        return "not a sealed KVP block (no header data)"
    by_hash = {tx.hash: tx for tx in txs}
    if sorted(by_hash) != sorted(block.tx_hashes) or len(txs) != len(block.tx_hashes):
        return "its transaction list disagrees with the transactions table"
    flows: dict[str, Decimal] = {}
    for tx_hash in block.tx_hashes:
        tx = by_hash[tx_hash]
        if tx.nonce is None or tx.sender is None or tx.receiver is None or tx.public_key is None:
            return f"transaction {tx_hash} lacks its signed fields"
        try:
            recomputed = wallets.transaction_hash(tx.sender, tx.receiver, tx.amount, tx.nonce)
        except wallets.AmountError:
            recomputed = ""
        if recomputed != tx_hash:
            return f"transaction {tx_hash} was altered (its hash does not match its fields)"
        if wallets.address_of(tx.public_key) != tx.sender or not wallets.verify_signature(
                tx.public_key, wallets.transaction_message(tx.sender, tx.receiver, tx.amount, tx.nonce),
                tx.signature or ""):
            return f"transaction {tx_hash} is not signed by its sender"
        if tx.status != "confirmed":
            return f"transaction {tx_hash} is in the block but marked {tx.status}"
        flows[tx.sender] = flows.get(tx.sender, ZERO) - tx.amount
        flows[tx.receiver] = flows.get(tx.receiver, ZERO) + tx.amount
    try:
        reward = Decimal(data["reward"])
        balances = {account: (Decimal(b["before"]), Decimal(b["after"])) for account, b in data["balances"].items()}
        header = wallets.BlockHeader(
            height=block.height, previous_hash=block.previous_hash, timestamp=block.timestamp,
            miner=data["miner"], reward=data["reward"], difficulty=int(data["difficulty"]),
            state_hash=data["state_hash"], tx_hashes=tuple(block.tx_hashes))
    except (KeyError, TypeError, ValueError, ArithmeticError):
        return "its header data is malformed"
    if block.nonce is None or header.hash_with(block.nonce) != block.hash:
        return "block_hash does not match its contents"
    if not wallets.meets_difficulty(block.hash, header.difficulty):
        return f"proof of work below difficulty {header.difficulty}"
    if wallets.state_hash({account: b["after"] for account, b in data["balances"].items()}) != header.state_hash:
        return "its balance record was altered (state_hash mismatch)"
    try:
        # Blocks since user mining list every miner's part; older ones paid the header's miner alone.
        parts = ({account: Decimal(amount) for account, amount in data["rewards"].items()} if "rewards" in data
                 else ({header.miner: reward} if reward > 0 else {}))
    except (AttributeError, TypeError, ValueError, ArithmeticError):
        return "its reward split is malformed"
    if sum(parts.values(), ZERO) != reward:
        return f"its reward split sums to {sum(parts.values(), ZERO)}, not the block's reward {reward}"
    for account, amount in parts.items():
        flows[account] = flows.get(account, ZERO) + amount
    for account in sorted(set(flows) | set(balances)):
        flow = flows.get(account, ZERO)
        before, after = balances.get(account, (None, None))
        if before is None or after is None or before + flow != after:
            return f"balance mismatch for {account}: recorded {before} -> {after}, transfers and reward move {flow}"
    if sorted(amount for amount in rewards if amount != 0) != sorted(a for a in parts.values() if a != 0):
        return f"mining reward record {[str(r) for r in rewards]} differs from the block's reward split {reward}"
    return None


# --- reward pools -----------------------------------------------------------------------------

async def list_pools(conn: asyncpg.Connection) -> list[queries.RewardPool]:
    """Every reward pool, by id."""
    return await queries.list_pools(conn)


async def create_pool(conn: asyncpg.Connection, name: str, total_tokens: Decimal) -> queries.RewardPool:
    """A new reward pool (names are unique: a taken one is a conflict)."""
    return await queries.create_pool(conn, name, total_tokens)


async def adjust_pool(conn: asyncpg.Connection, pool_id: int, delta: Decimal) -> queries.RewardPool:
    """Add tokens to a pool, or remove unallocated ones with a negative delta."""
    pool = await queries.add_tokens(conn, pool_id, delta)
    if pool is None:
        raise NotFound("no such reward pool", field="pool_id")
    return pool


async def allocate(conn: asyncpg.Connection, pool_id: int, user_id: uuid.UUID, amount: Decimal) -> queries.Allocation:
    """Grant pool tokens to a user: drawn from the pool and credited in one transaction."""
    async with conn.transaction():
        try:
            pool = await queries.draw(conn, pool_id, amount)
        except asyncpg.CheckViolationError:
            # reward_pools_allocation_check: concurrent grants serialise on the pool row, and the
            # one that would pass total_tokens fails here, in the database.
            raise Conflict(f"the pool has fewer than {money(amount)} tokens left", field="amount") from None
        if pool is None:
            raise NotFound("no such reward pool", field="pool_id")
        if await queries.lock_balances(conn, [user_id]) == {}:
            raise NotFound("no such user", field="user_id")
        allocation = await queries.insert_allocation(conn, user_id, pool_id, amount)
        await ledger.apply_balance_changes(
            conn, [ledger.BalanceChange(user_id, amount, ledger.POOL_GRANT, str(allocation.id))])
        return allocation
