"""User mining: a user picks a device type and mines in a session; each sealed block's reward is split
among the users whose work it pays (docs/protocol.md "Mining" has the rules for clients).

- **Node** sessions submit proof-of-work shares. A share is a nonce for the session's challenge,
  `sha256("kvp-share|<tip hash>|<session id>")` (hex; the tip hash is "" on an empty chain), whose
  hash `sha256("<challenge>:<nonce>")` starts with MINING_SHARE_DIFFICULTY zero bits. The server
  recomputes and checks every share. Refused: a challenge that is not the current tip's (stale; the
  previous tip's challenge is still accepted for MINING_STALE_GRACE_SECONDS after a block, so a
  share in flight when a block lands is not lost), a hash below the difficulty, the same hash twice
  (unique `share_hash`), more than MINING_SHARES_PER_MINUTE shares in the last 60 s of a session.
- **Mobile** sessions send heartbeats. A heartbeat credits the whole seconds since the previous
  one when that gap is at most MINING_SESSION_TIMEOUT seconds (a longer gap counts nothing: the
  device was not shown to be alive), up to MOBILE_MINING_SECONDS_PER_DAY per user per UTC day
  (counted on the heartbeat's day).
- **One session at a time**: a user has at most one open session (a partial unique index). Starting
  while one is open and alive (a heartbeat or share within MINING_SESSION_TIMEOUT) is refused; an
  open session that went quiet is closed as `expired` first.
- **The split** (`split_reward`): a block pays the reward the schedule sets for its height (after
  halving), capped by what the `mining` pool holds. Each miner's weight is
  `shares + MINING_MOBILE_SECOND_WEIGHT x mobile_seconds` over their unpaid work since the last block
  that paid; their amount is `trunc(reward x weight / total weight, 8)`. The truncation remainder is
  never drawn: it stays in the pool. With no user work, the configured MINER_USERNAME gets the whole
  reward as before; with neither, nothing is drawn. A miner's row carries the device type with the
  larger part of their weight (Node on a tie).
- Every change queues its event on the miner's `user:<id>` channel in the same transaction:
  `mining_started`, `mining_stopped`, and `mining_reward_received` per block.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import hashlib
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import structlog

from db import mining as queries
from db import outbox
from server.core.errors import Conflict, InvalidPayload, NotFound, RateLimited
from server.core.jsonutil import iso
from server.core.money import AMOUNT_QUANTUM, money
from server.core.settings import Settings
from server.realtime.hub import user_channel

log = structlog.get_logger(__name__)

MINING_STARTED = "mining_started"
MINING_STOPPED = "mining_stopped"
MINING_REWARD_RECEIVED = "mining_reward_received"

# `reason` of a refusal, next to its protocol code, so a client can tell the refusals apart.
SESSION_OPEN = "session_open"                # conflict: a live session is already open
NO_SESSION = "no_session"                    # conflict: start mining first
WRONG_DEVICE = "wrong_device"                # conflict: a share from a Mobile session, a device change mid-session
STALE_SHARE = "stale_share"                  # conflict: the challenge is not the current tip's
DUPLICATE_SHARE = "duplicate_share"          # conflict: this share was accepted before
LOW_DIFFICULTY = "insufficient_difficulty"   # invalid_payload: the hash lacks the leading zero bits
SHARE_RATE = "share_rate"                    # rate_limited: over MINING_SHARES_PER_MINUTE for the session

CHALLENGE_DOMAIN = "kvp-share"
RATE_WINDOW = dt.timedelta(seconds=60)
MAX_NONCE = 2**63 - 1                        # mining_shares.nonce is BIGINT
MAX_REWARD_KEY = 2**31 - 1                   # mining_rewards.reward_id is INTEGER
ZERO = Decimal(0)
_EXACT = decimal.Context(prec=60, rounding=decimal.ROUND_DOWN)


@dataclasses.dataclass(frozen=True, slots=True)
class MiningConfig:
    """The MINING_* settings."""

    share_difficulty: int = 12
    shares_per_minute: int = 120
    session_timeout: int = 60
    stale_grace: float = 5.0
    mobile_seconds_per_day: int = 14_400
    mobile_second_weight: Decimal = Decimal("0.1")

    @classmethod
    def from_settings(cls, settings: Settings) -> "MiningConfig":
        """Read the mining settings."""
        return cls(share_difficulty=settings.mining_share_difficulty,
                   shares_per_minute=settings.mining_shares_per_minute,
                   session_timeout=settings.mining_session_timeout_seconds,
                   stale_grace=settings.mining_stale_grace_seconds,
                   mobile_seconds_per_day=settings.mobile_mining_seconds_per_day,
                   mobile_second_weight=Decimal(settings.mining_mobile_second_weight))


def _now(now: dt.datetime | None) -> dt.datetime:
    return now or dt.datetime.now(dt.timezone.utc)


# --- proof of work ----------------------------------------------------------------------------

def challenge_for(tip_hash: str | None, session_id: int) -> str:
    """The share challenge of a session on a tip: a new block or a new session changes it."""
    return hashlib.sha256(f"{CHALLENGE_DOMAIN}|{tip_hash or ''}|{session_id}".encode()).hexdigest()


def share_hash(challenge: str, nonce: int) -> str:
    """The hash a share is judged by."""
    return hashlib.sha256(f"{challenge}:{nonce}".encode()).hexdigest()


def meets(digest: str, difficulty: int) -> bool:
    """Whether a hex digest starts with `difficulty` zero bits."""
    return difficulty <= 0 or int(digest, 16) >> (256 - difficulty) == 0


def solve(challenge: str, difficulty: int, start: int = 0) -> tuple[int, str]:
    """The first nonce from `start` whose share meets the difficulty (clients, tests and the bench)."""
    nonce = start
    while True:
        digest = share_hash(challenge, nonce)
        if meets(digest, difficulty):
            return nonce, digest
        nonce += 1


# --- views ------------------------------------------------------------------------------------

def _alive(session: queries.Session, config: MiningConfig, now: dt.datetime) -> bool:
    return (now - session.last_heartbeat_at).total_seconds() <= config.session_timeout


def session_public(session: queries.Session | None, config: MiningConfig, now: dt.datetime) -> dict[str, Any] | None:
    """The API's view of a session (`alive`: it still counts)."""
    if session is None:
        return None
    return {"id": session.id, "device_type": session.device_type, "started_at": iso(session.started_at),
            "last_heartbeat_at": iso(session.last_heartbeat_at), "ended_at": iso(session.ended_at),
            "end_reason": session.end_reason, "shares": session.shares, "active_seconds": session.active_seconds,
            "unpaid_shares": session.unpaid_shares, "unpaid_seconds": session.unpaid_seconds,
            "alive": session.ended_at is None and _alive(session, config, now)}


async def _work_view(conn: asyncpg.Connection, session: queries.Session, config: MiningConfig,
                     now: dt.datetime) -> dict[str, Any]:
    data: dict[str, Any] = {"session": session_public(session, config, now)}
    if session.device_type == queries.NODE and session.ended_at is None:
        tip = await queries.chain_tip(conn)
        data.update(challenge=challenge_for(tip.hash, session.id), difficulty=config.share_difficulty,
                    tip_height=tip.height)
    return data


# --- device and sessions ----------------------------------------------------------------------

async def set_device(conn: asyncpg.Connection, user_id: uuid.UUID, device_type: str) -> dict[str, Any]:
    """Set the caller's device type (Mobile or Node); refused while a session of the other type is open."""
    async with conn.transaction():
        session = await queries.open_session(conn, user_id, lock=True)
        if session is not None and session.device_type != device_type:
            raise Conflict(f"stop your {session.device_type} mining session before changing the device type",
                           field="device_type", reason=WRONG_DEVICE)
        if not await queries.set_device(conn, user_id, device_type):
            raise NotFound("no such user", field="user_id")
    return {"device_type": device_type}


async def start(conn: asyncpg.Connection, user_id: uuid.UUID, device_type: str | None, config: MiningConfig,
                now: dt.datetime | None = None) -> dict[str, Any]:
    """Open the caller's mining session (setting the device type when given); a Node gets its challenge."""
    now = _now(now)
    async with conn.transaction():
        if device_type is not None:
            await queries.set_device(conn, user_id, device_type)
        else:
            device_type = await queries.get_device(conn, user_id)
            if device_type is None:
                raise InvalidPayload("set a device type first (Mobile or Node)", field="device_type")
        current = await queries.open_session(conn, user_id, lock=True)
        if current is not None:
            if _alive(current, config, now):
                raise Conflict("you already have a mining session open; stop it first", field="session",
                               reason=SESSION_OPEN, session_id=current.id)
            ended = await queries.end_session(conn, current.id, queries.EXPIRED, now)
            await outbox.enqueue(conn, user_channel(user_id), MINING_STOPPED,
                                 {"session": session_public(ended, config, now)})
        try:
            async with conn.transaction():
                session = await queries.insert_session(conn, user_id, device_type, now)
        except asyncpg.UniqueViolationError:
            # A concurrent start won the partial unique index mining_sessions_one_open.
            raise Conflict("you already have a mining session open; stop it first", field="session",
                           reason=SESSION_OPEN) from None
        data = await _work_view(conn, session, config, now)
        await outbox.enqueue(conn, user_channel(user_id), MINING_STARTED, {"session": data["session"]})
    log.info("mining_started", user_id=str(user_id), session_id=session.id, device_type=device_type)
    return data


async def _own_session(conn: asyncpg.Connection, user_id: uuid.UUID) -> queries.Session:
    session = await queries.open_session(conn, user_id, lock=True)
    if session is None:
        raise Conflict("you have no mining session open; start mining first", field="session", reason=NO_SESSION)
    return session


async def stop(conn: asyncpg.Connection, user_id: uuid.UUID, config: MiningConfig,
               now: dt.datetime | None = None) -> dict[str, Any]:
    """Close the caller's session; its unpaid work is still paid by the next block."""
    now = _now(now)
    async with conn.transaction():
        session = await queries.end_session(conn, (await _own_session(conn, user_id)).id, queries.STOPPED, now)
        data = {"session": session_public(session, config, now)}
        await outbox.enqueue(conn, user_channel(user_id), MINING_STOPPED, data)
    return data


async def heartbeat(conn: asyncpg.Connection, user_id: uuid.UUID, config: MiningConfig,
                    now: dt.datetime | None = None) -> dict[str, Any]:
    """Keep the caller's session alive; a Mobile one is credited the seconds since its last heartbeat."""
    now = _now(now)
    async with conn.transaction():
        session = await _own_session(conn, user_id)
        if session.device_type != queries.MOBILE:
            session = await queries.touch_session(conn, session.id, now)
            return {**await _work_view(conn, session, config, now), "credited_seconds": 0}
        elapsed = max((now - session.last_heartbeat_at).total_seconds(), 0.0)
        today = now.date()
        used = await queries.day_seconds(conn, user_id, today)
        if elapsed > config.session_timeout:
            credited, mark = 0, now
        else:
            # Whole seconds only; the fraction carries over to the next heartbeat through the mark.
            whole = int(elapsed)
            credited = min(whole, max(config.mobile_seconds_per_day - used, 0))
            mark = session.last_heartbeat_at + dt.timedelta(seconds=whole)
        session = await queries.credit_seconds(conn, session.id, credited, mark)
        if credited:
            used = await queries.add_day_seconds(conn, user_id, today, credited)
    return {"session": session_public(session, config, now), "credited_seconds": credited,
            "today_seconds": used, "daily_cap_seconds": config.mobile_seconds_per_day,
            "capped": used >= config.mobile_seconds_per_day}


async def submit_share(conn: asyncpg.Connection, user_id: uuid.UUID, challenge: str, nonce: int,
                       config: MiningConfig, now: dt.datetime | None = None) -> dict[str, Any]:
    """Verify a Node share and count it for the next block; any refusal records nothing."""
    now = _now(now)
    challenge = challenge.lower()
    async with conn.transaction():
        # The session's row lock serialises its shares: the rate count cannot be raced past.
        session = await _own_session(conn, user_id)
        if session.device_type != queries.NODE:
            raise Conflict("shares come from Node sessions; a Mobile session sends heartbeats", field="session",
                           reason=WRONG_DEVICE)
        count, oldest = await queries.recent_shares(conn, session.id, now - RATE_WINDOW)
        if count >= config.shares_per_minute:
            retry = (oldest + RATE_WINDOW - now).total_seconds() if oldest else RATE_WINDOW.total_seconds()
            limited = RateLimited(f"at most {config.shares_per_minute} shares a minute per session",
                                  retry_after=max(retry, 0.001))
            limited.extra["reason"] = SHARE_RATE
            raise limited
        tip = await queries.chain_tip(conn)
        current = challenge_for(tip.hash, session.id)
        accepted = {current}
        if tip.timestamp is not None and (now - tip.timestamp).total_seconds() <= config.stale_grace:
            accepted.add(challenge_for(tip.previous_hash, session.id))
        if challenge not in accepted:
            raise Conflict("stale share: that challenge is not the current tip's", field="challenge",
                           reason=STALE_SHARE, challenge=current, tip_height=tip.height)
        digest = share_hash(challenge, nonce)
        if not meets(digest, config.share_difficulty):
            raise InvalidPayload(f"the share's hash does not start with {config.share_difficulty} zero bits",
                                 field="nonce", reason=LOW_DIFFICULTY, difficulty=config.share_difficulty)
        counted = await queries.insert_share(conn, session, height=tip.height, challenge=challenge, nonce=nonce,
                                             share_hash=digest, difficulty=config.share_difficulty, now=now)
        if counted is None:
            raise Conflict("duplicate share: it was accepted before", field="nonce", reason=DUPLICATE_SHARE)
        session = counted
    return {"hash": digest, "session": session_public(session, config, now), "challenge": current,
            "difficulty": config.share_difficulty, "tip_height": tip.height}


# --- the reward split (called by chain.seal_block inside the sealing transaction) ---------------

@dataclasses.dataclass(frozen=True, slots=True)
class Payout:
    """One miner's part of a block's reward."""

    user_id: uuid.UUID
    account: str
    device_type: str
    amount: Decimal
    shares: int
    mobile_seconds: int
    weight: Decimal

    def row(self) -> queries.RewardRow:
        """Its mining_rewards row."""
        return queries.RewardRow(self.user_id, self.account, self.device_type, self.amount, self.shares,
                                 self.mobile_seconds)


def split_reward(reward: Decimal, work: list[queries.Work], mobile_second_weight: Decimal) -> list[Payout]:
    """`trunc(reward x weight / total, 8)` per miner (weight = shares + mobile weight x seconds); the sum
    never passes `reward`. Miners whose part truncates to 0 get no row."""
    weights = [Decimal(w.shares) + _EXACT.multiply(mobile_second_weight, Decimal(w.mobile_seconds)) for w in work]
    total = sum(weights, ZERO)
    if total <= 0 or reward <= 0:
        return []
    payouts = []
    for item, weight in zip(work, weights):
        amount = _EXACT.divide(_EXACT.multiply(reward, weight), total).quantize(AMOUNT_QUANTUM, decimal.ROUND_DOWN)
        if amount > 0:
            mobile = _EXACT.multiply(mobile_second_weight, Decimal(item.mobile_seconds))
            device = queries.MOBILE if mobile > item.shares else queries.NODE
            payouts.append(Payout(item.user_id, item.account, device, amount, item.shares, item.mobile_seconds,
                                  weight))
    assert sum((p.amount for p in payouts), ZERO) <= reward
    return payouts


async def block_payouts(conn: asyncpg.Connection, reward: Decimal, mobile_second_weight: Decimal) -> list[Payout]:
    """Take every user's unpaid work and split `reward` by it (nothing is taken when there is no reward)."""
    if reward <= 0:
        return []
    return split_reward(reward, await queries.take_unpaid_work(conn), mobile_second_weight)


async def enqueue_payouts(conn: asyncpg.Connection, height: int, block_hash: str, payouts: list[Payout],
                          balances: dict[uuid.UUID, Decimal]) -> None:
    """`mining_reward_received` on each paid miner's channel, in the sealing transaction."""
    for payout in payouts:
        await outbox.enqueue(conn, user_channel(payout.user_id), MINING_REWARD_RECEIVED, {
            "height": height, "block_hash": block_hash, "amount": money(payout.amount),
            "device_type": payout.device_type, "shares": payout.shares, "mobile_seconds": payout.mobile_seconds,
            "weight": f"{payout.weight.normalize():f}",
            "balance": money(balances[payout.user_id]) if payout.user_id in balances else None})


# --- the miner's own view ---------------------------------------------------------------------

def reward_public(reward: queries.UserReward) -> dict[str, Any]:
    """The API's view of one of the caller's rewards."""
    return {"id": reward.id, "height": reward.height, "amount": money(reward.amount),
            "device_type": reward.device_type, "shares": reward.shares, "mobile_seconds": reward.mobile_seconds,
            "pool_id": reward.pool_id, "created_at": iso(reward.created_at)}


async def my_mining(conn: asyncpg.Connection, user_id: uuid.UUID, config: MiningConfig, before: int | None,
                    limit: int, now: dt.datetime | None = None) -> dict[str, Any]:
    """The caller's device type, open session (with its challenge), today's Mobile seconds, totals and a
    page of rewards newest first (cursor: `before`, a reward id)."""
    now = _now(now)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        device = await queries.get_device(conn, user_id)
        session = await queries.open_session(conn, user_id)
        rewards = await queries.user_rewards(conn, user_id, before or MAX_REWARD_KEY, limit + 1)
        totals = await queries.user_totals(conn, user_id)
        today = await queries.day_seconds(conn, user_id, now.date())
        work = await _work_view(conn, session, config, now) if session else {"session": None}
    page = rewards[:limit]
    return {"device_type": device, **work, "today_seconds": today,
            "daily_cap_seconds": config.mobile_seconds_per_day,
            "totals": {"rewards": totals["rewards"], "amount": money(totals["amount"]),
                       "shares": totals["shares"], "mobile_seconds": totals["mobile_seconds"]},
            "rewards": [reward_public(r) for r in page],
            "next_before": page[-1].id if len(rewards) > limit else None}
