"""Staking, the first `defi` product: lock KVP for a lock-up, earn a per-block reward from the
`staking` reward pool, unstake to get the principal and the rest of the rewards back.

- Opening a stake debits the user's *available* balance (balance minus pending outgoing transfers,
  as a transfer submission computes it, under the same row lock) with a `stake` ledger row whose
  reference is the stake's `defi.id`; unstaking credits it back with `unstake` (same reference), so
  the stake's moves sum to -amount while it is active and to 0 once closed.
- Lock-up and rewards count sealed blocks: a stake opened at tip height H may be unstaked once the
  tip reaches H + STAKING_LOCKUP_BLOCKS; it earns STAKING_REWARD_PER_BLOCK_RATE x amount per block
  sealed after H (the rate is fixed on the stake when it is opened).
- Rewards are computed lazily: a claim (or unstake) pays rate x amount x (tip - paid_height),
  truncated to 8 decimals, drawn from the pool under its row lock, and moves paid_height to the tip.
  The ledger reference "<defi id>:<from>-<to>" is unique, so one interval is never paid twice; the
  stake's row lock makes concurrent claims and unstakes of one stake pay once.
- A dry pool pays what it has left; the rest of that interval is forfeited (`unpaid` in the reply
  and the event). A claim that would pay nothing changes nothing, so accrual goes on.
- Every change queues an event on `user:<id>` (stake_opened, stake_rewarded, stake_closed) in the
  same transaction.
"""

from __future__ import annotations

import dataclasses
import decimal
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import structlog

from db import chain as chain_queries
from db import ledger, outbox
from db import staking as queries
from server.core.errors import Conflict, InvalidPayload, NotFound
from server.core.jsonutil import iso
from server.core.money import AMOUNT_QUANTUM, money
from server.core.settings import Settings
from server.realtime.hub import user_channel

log = structlog.get_logger(__name__)

STAKE_OPENED = "stake_opened"
STAKE_REWARDED = "stake_rewarded"
STAKE_CLOSED = "stake_closed"

RATE_QUANTUM = Decimal("0.000000000001")   # defi.reward_rate is NUMERIC(20,12)
APY_QUANTUM = Decimal("0.0001")            # defi.apy is NUMERIC(9,4)
MAX_APY = Decimal("99999.9999")
SECONDS_PER_YEAR = 365 * 24 * 3600
ZERO = Decimal(0)
# Wide enough for a 12-digit amount x a 12-decimal rate x a block count, before truncating to 8 decimals.
_EXACT = decimal.Context(prec=60, rounding=decimal.ROUND_DOWN)


@dataclasses.dataclass(frozen=True, slots=True)
class StakingConfig:
    """The staking settings: pool name, lock-up in blocks, reward rate per block, block time (for APY)."""

    pool: str
    lockup_blocks: int
    rate: Decimal
    block_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> "StakingConfig":
        """Read the STAKING_* settings."""
        rate = Decimal(settings.staking_reward_per_block_rate)
        lockup = settings.staking_lockup_blocks
        if not rate.is_finite() or rate < 0 or lockup < 0:
            raise ValueError("STAKING_REWARD_PER_BLOCK_RATE and STAKING_LOCKUP_BLOCKS must not be negative")
        return cls(pool=settings.staking_pool, lockup_blocks=lockup,
                   rate=rate.quantize(RATE_QUANTUM, rounding=decimal.ROUND_DOWN),
                   block_seconds=settings.block_interval_seconds)

    def apy(self) -> Decimal:
        """The rate as a simple yearly percentage at the configured block time (shown, never paid from)."""
        blocks_per_year = Decimal(SECONDS_PER_YEAR) / Decimal(str(self.block_seconds))
        return min(_EXACT.multiply(self.rate * 100, blocks_per_year).quantize(APY_QUANTUM, decimal.ROUND_DOWN),
                   MAX_APY)


def reward_for(stake: queries.Stake, to_height: int) -> Decimal:
    """rate x amount x blocks since the last paid height, truncated to 8 decimals (0 when none)."""
    blocks = max(to_height - stake.paid_height, 0)
    exact = _EXACT.multiply(_EXACT.multiply(stake.reward_rate, stake.amount), Decimal(blocks))
    return exact.quantize(AMOUNT_QUANTUM, rounding=decimal.ROUND_DOWN)


def stake_public(stake: queries.Stake, tip: int | None = None) -> dict[str, Any]:
    """The API's view of a stake; with the tip, what it has accrued but not been paid."""
    data: dict[str, Any] = {
        "id": stake.id, "amount": money(stake.amount), "status": stake.status, "apy": f"{stake.apy:f}",
        "reward_rate": f"{stake.reward_rate.normalize():f}", "opened_height": stake.opened_height,
        "unlock_height": stake.unlock_height, "paid_height": stake.paid_height,
        "rewards_paid": money(stake.rewards_paid), "created_at": iso(stake.created_at),
        "closed_at": iso(stake.closed_at) if stake.closed_at else None,
        "request_id": str(stake.request_id) if stake.request_id else None}
    if tip is not None:
        active = stake.status == queries.ACTIVE
        data["accrued"] = money(reward_for(stake, tip) if active else ZERO)
        data["unlocked"] = active and tip >= stake.unlock_height
        data["tip_height"] = tip
    return data


# --- opening ----------------------------------------------------------------------------------

async def open_stake(conn: asyncpg.Connection, user_id: uuid.UUID, amount: Decimal, config: StakingConfig,
                     request_id: uuid.UUID | None = None) -> tuple[dict[str, Any], bool]:
    """Lock `amount` of the caller's available KVP into a new stake; (stake, created).

    A repeated `request_id` returns the stake it opened (created False) instead of opening another.
    """
    if amount <= 0:
        raise InvalidPayload("the amount must be greater than 0", field="amount")
    async with conn.transaction():
        # The user's row lock is the one a transfer submission takes: the balance and the pending
        # transfers read here cannot change until this stake is booked.
        account = await queries.lock_account(conn, user_id)
        if account is None:
            raise NotFound("no such user", field="user_id")
        if request_id is not None:
            existing = await queries.by_request(conn, user_id, request_id)
            if existing is not None:
                if existing.amount != amount:
                    raise Conflict("this request_id opened a stake of another amount", field="request_id")
                return stake_public(existing, await chain_queries.tip_height(conn)), False
        if not await queries.pool_exists(conn, config.pool):
            raise Conflict(f"staking is not open: there is no '{config.pool}' reward pool yet", field="pool")
        pending = await chain_queries.pending_outgoing(conn, account["address"]) if account["address"] else ZERO
        available = account["balance"] - pending
        if amount > available:
            raise Conflict(f"insufficient balance: {money(max(available, ZERO))} KVP available "
                           f"({money(pending)} reserved by pending transfers)", field="amount")
        tip = await chain_queries.tip_height(conn)
        stake = await queries.insert_stake(conn, user_id=user_id, amount=amount, apy=config.apy(), height=tip,
                                           unlock_height=tip + config.lockup_blocks, reward_rate=config.rate,
                                           request_id=request_id)
        balances = await ledger.apply_balance_changes(
            conn, [ledger.BalanceChange(user_id, -amount, ledger.STAKE, str(stake.id))])
        data = stake_public(stake, tip)
        await outbox.enqueue(conn, user_channel(user_id), STAKE_OPENED,
                             {"stake": data, "balance": money(balances[user_id])})
    log.info("stake_opened", user_id=str(user_id), stake_id=stake.id, amount=money(amount))
    return {**data, "balance": money(balances[user_id])}, True


# --- claiming and unstaking -------------------------------------------------------------------

async def claim(conn: asyncpg.Connection, user_id: uuid.UUID, stake_id: int, config: StakingConfig) -> dict[str, Any]:
    """Pay the stake's rewards accrued up to the tip; the stake stays open."""
    return await _settle(conn, user_id, stake_id, config, close=False)


async def unstake(conn: asyncpg.Connection, user_id: uuid.UUID, stake_id: int, config: StakingConfig) -> dict[str, Any]:
    """Close an unlocked stake: its principal back and its last rewards paid."""
    return await _settle(conn, user_id, stake_id, config, close=True)


async def _settle(conn: asyncpg.Connection, user_id: uuid.UUID, stake_id: int, config: StakingConfig, *,
                  close: bool) -> dict[str, Any]:
    async with conn.transaction():
        # The stake's row lock serialises claims and unstakes of it: the second reads the first's
        # paid_height and status, so an interval is paid once and a stake is closed once.
        stake = await queries.get_stake(conn, stake_id, user_id, lock=True)
        if stake is None:
            raise NotFound("you have no stake with that id", field="stake_id")
        if stake.status != queries.ACTIVE:
            raise Conflict("this stake is closed", field="stake_id")
        tip = await chain_queries.tip_height(conn)
        if close and tip < stake.unlock_height:
            blocks_left = stake.unlock_height - tip
            raise Conflict(f"this stake is locked until block {stake.unlock_height} ({blocks_left} more blocks)",
                           field="stake_id", unlock_height=stake.unlock_height, blocks_left=blocks_left,
                           retry_after=round(blocks_left * config.block_seconds, 3))
        due = reward_for(stake, tip)
        paid, pool_remaining, pool = ZERO, None, None
        if due > 0:
            pool = await chain_queries.lock_pool_by_name(conn, config.pool)
            if pool is not None:
                paid = max(min(due, pool.remaining), ZERO)
                pool_remaining = pool.remaining - paid
        changes = []
        if paid > 0 and pool is not None:
            await chain_queries.draw(conn, pool.id, paid)
            await queries.insert_reward_allocation(conn, user_id, pool.id, paid)
            changes.append(ledger.BalanceChange(user_id, paid, ledger.STAKING_REWARD,
                                                f"{stake.id}:{stake.paid_height + 1}-{tip}"))
        if close:
            changes.append(ledger.BalanceChange(user_id, stake.amount, ledger.UNSTAKE, str(stake.id)))
        if paid == 0 and not close:
            # Nothing to pay (no new block, a reward under 1e-8, or a dry pool): leave paid_height
            # where it is so the stake keeps accruing.
            return _settled(stake_public(stake, tip), due, paid, pool_remaining, None)
        balances = await ledger.apply_balance_changes(conn, changes)
        settled = await queries.mark_paid(conn, stake.id, tip, paid, close=close)
        result = _settled(stake_public(settled, tip), due, paid, pool_remaining,
                           balances.get(user_id))
        channel = user_channel(user_id)
        if paid > 0:
            await outbox.enqueue(conn, channel, STAKE_REWARDED, {
                "stake_id": stake.id, "from_height": stake.paid_height + 1, "to_height": tip,
                **{key: result[key] for key in ("paid", "unpaid", "pool_exhausted", "balance")}})
        if close:
            await outbox.enqueue(conn, channel, STAKE_CLOSED, {
                "stake": result["stake"], "returned": money(stake.amount), "paid": result["paid"],
                "balance": result["balance"]})
    log.info("stake_closed" if close else "stake_claimed", user_id=str(user_id), stake_id=stake.id,
             paid=money(paid), unpaid=money(due - paid))
    return result


def _settled(stake: dict[str, Any], due: Decimal, paid: Decimal, pool_remaining: Decimal | None,
             balance: Decimal | None) -> dict[str, Any]:
    # The pool is "exhausted" when it could not pay all that was due (missing, or dry).
    return {"stake": stake, "due": money(due), "paid": money(paid), "unpaid": money(due - paid),
            "pool_exhausted": due > paid,
            "pool_remaining": money(pool_remaining) if pool_remaining is not None else None,
            "balance": money(balance) if balance is not None else None}


# --- reading ----------------------------------------------------------------------------------

async def list_stakes(conn: asyncpg.Connection, user_id: uuid.UUID, before: int | None, limit: int,
                      status: str | None = None) -> dict[str, Any]:
    """The caller's stakes newest first, with accrued-but-unpaid rewards, and the next page's cursor."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        stakes = await queries.list_stakes(conn, user_id, before, limit, status)
        tip = await chain_queries.tip_height(conn)
    return {"stakes": [stake_public(stake, tip) for stake in stakes], "tip_height": tip,
            "next_before": stakes[-1].id if len(stakes) == limit else None}
