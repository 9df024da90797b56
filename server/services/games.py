"""Earn-to-play rules: game tokens, sessions, batched reward ingest, leaderboards, idle sweeps.

Rewards are minted balance, so every one is booked exactly once: it is keyed by
`(session_id, seq)`, checked against the game's policy, and written with the session's new total,
the player's balance change and a ledger row in one transaction (with its `reward_earned` events
in the outbox). Reports are queued and booked in batches: under load one transaction books many of
them, so throughput does not stop at one transaction per reward; a single report is simply a batch
of one.

Every reward is drawn from the `gaming` reward pool (GAMING_POOL; no column links a game to a
pool), together with the game owner's revenue share on it: `reward * games.revenue_share`,
truncated to 8 decimals, paid to `games.owner_id` (none when the game has no owner). A reward the
pool cannot cover is refused (`conflict`, `reason: pool_exhausted`) and books nothing.

Every batch waits for the pool's row (and for the owner's balance), so a batch is first decided on
an unlocked read and booked in one statement outside a transaction block (db/games.py,
book_batch): those locks then last only while that statement runs, and the statement writes
nothing unless each session's total is still the one read and the pool still covers the draw
(compare-and-set). A batch for which either moved is decided again with its sessions locked, the
draw being the last statement of that transaction; one that loses the pool's race again is booked
with the pool locked from the start, so it never overdraws.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import hashlib
import secrets
import uuid
from decimal import ROUND_DOWN, Decimal, localcontext
from typing import Any, AsyncIterator, Callable, Iterable

import asyncpg
import structlog
from aiohttp import web

from db import chain as chain_queries
from db import games as queries
from db import ledger, outbox
from db.pool import POOL
from server.core.cache import ExpiringCache
from server.core.errors import (
    Conflict,
    ErrorCode,
    Forbidden,
    HubError,
    InvalidPayload,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
    error_from_exception,
)
from server.core.identity import Identity
from server.core.jsonutil import iso
from server.core.money import AMOUNT_QUANTUM
from server.core.protocol import MAX_INTEGER_ID
from server.core.settings import SETTINGS, Settings
from server.realtime.hub import publish
from server.realtime.redis import REDIS, REDIS_HEALTH

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "kvpg_"
MINUTE = 60.0
PERIODS: dict[str, float | None] = {"hour": 3600.0, "day": 86_400.0, "week": 604_800.0, "all": None}
SWEEP_BATCH = 500
# A rewarded session's last activity is recorded at most once per this share of the idle timeout.
ACTIVITY_STEP_SHARE = 0.05
GAME_STATUSES = ("pending", "active", "suspended")
DEFAULT_POLICY = {"max_reward_per_event": Decimal(100), "max_reward_per_minute": Decimal(1000),
                  "max_reward_per_session": Decimal(10_000)}

GAME_CHANNEL = "game:{game_id}"
SESSION_CHANNEL = "session:{session_id}"
SESSION_STARTED = "session_started"
SESSION_ENDED = "session_ended"
REWARD_EARNED = "reward_earned"
LEADERBOARD_CHANGED = "leaderboard_changed"

GAMING_POOL = "gaming"             # the reward pool every game reward and revenue share is drawn from
POOL_EXHAUSTED = "pool_exhausted"  # `reason` of the conflict refusing a reward the pool cannot cover
# value * share has at most 12 + 16 significant digits (NUMERIC(20,8) times a fraction with 8
# decimals): computed exactly at this precision, then truncated to 8 decimals.
SHARE_PRECISION = 40


def game_channel(game_id: int) -> str:
    """The public channel of a game."""
    return GAME_CHANNEL.format(game_id=game_id)


def session_channel(session_id: int) -> str:
    """The channel of one session (its player and spectators)."""
    return SESSION_CHANNEL.format(session_id=session_id)


# --- game tokens -------------------------------------------------------------------------------

def new_token() -> tuple[str, str]:
    """A fresh game token and the digest that is stored instead of it."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token_digest(token)


def token_digest(token: str) -> str:
    """SHA-256 of a game token, hex (the token has 256 random bits, so no salt or slow hash is needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class GameCaller:
    """A game server, authenticated by its game's token."""

    game_id: int


Caller = Identity | GameCaller


class GameTokens:
    """Checks game tokens; known ones are cached briefly (a rotated token stops within the TTL)."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self._entries: ExpiringCache[str, int] = ExpiringCache(ttl, max_entries)

    async def authenticate(self, pool: asyncpg.Pool, token: Any) -> GameCaller:
        """The game a token belongs to; Unauthorized for anything else."""
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            raise Unauthorized("the game token is invalid")
        digest = token_digest(token)
        cached = self._entries.get(digest)
        if cached is not None:
            return GameCaller(cached)
        async with pool.acquire() as conn:
            game = await queries.game_by_token_hash(conn, digest)
        if game is None:
            self._entries.pop(digest)
            raise Unauthorized("the game token is invalid")
        self._entries.put(digest, game.game_id)
        return GameCaller(game.game_id)

    def forget_game(self, game_id: int) -> None:
        """Drop a game's cached tokens at once (rotation on this node)."""
        self._entries.pop_values(lambda cached: cached == game_id)


# --- games -------------------------------------------------------------------------------------

async def register_game(conn: asyncpg.Connection, owner: Identity, *, name: str, developer_wallet: str,
                        revenue_share: Decimal, policy: dict[str, Decimal],
                        reward_types: list[str] | None) -> tuple[queries.Game, str]:
    """Register a game (an admin's is active at once, a developer's waits for an admin) with the
    default policy where `policy` is silent; the game and its token, which is shown only now."""
    token, digest = new_token()
    game = await queries.create_game(
        conn, name=name, developer_wallet=developer_wallet, revenue_share=revenue_share, owner_id=owner.user_id,
        status="active" if owner.is_admin else "pending", token_hash=digest, reward_types=reward_types,
        **{**DEFAULT_POLICY, **policy})
    log.info("game_registered", game_id=game.game_id, status=game.status)
    return game, token


async def get_game(conn: asyncpg.Connection, game_id: int) -> queries.Game:
    """One game with its policy."""
    game = await queries.get_game(conn, game_id)
    if game is None:
        raise NotFound("no such game", field="game_id")
    return game


async def list_games(conn: asyncpg.Connection, status: str | None, after_id: int, limit: int) -> list[queries.Game]:
    """Games by id after `after_id`, optionally of one status."""
    return await queries.list_games(conn, status=status, after_id=after_id, limit=limit)


async def update_game(conn: asyncpg.Connection, game_id: int, changes: dict[str, Any]) -> queries.Game:
    """Change some of a game's columns (admins: activate, suspend, policy, revenue share)."""
    game = await queries.update_game(conn, game_id, changes)
    if game is None:
        raise NotFound("no such game", field="game_id")
    return game


async def rotate_token(app: web.Application, caller: Identity, game_id: int) -> str:
    """Issue a new token for a game (its owner or an admin); the old one stops working."""
    token, digest = new_token()
    async with app[POOL].acquire() as conn, conn.transaction():
        game = await get_game(conn, game_id)
        if game.owner_id != caller.user_id and not caller.is_admin:
            raise Forbidden("only the game's owner or an admin may rotate its token")
        await queries.set_token_hash(conn, game_id, digest)
    app[GAMES].tokens.forget_game(game_id)
    return token


# --- sessions ----------------------------------------------------------------------------------

def session_ended_event(session: queries.GameSession) -> dict[str, Any]:
    """The data of `session_ended`."""
    return {"session_id": session.session_id, "game_id": session.game_id,
            "user_id": str(session.user_id) if session.user_id else None, "status": session.status,
            "rewards_earned": queries.money(session.rewards_earned), "reward_count": session.reward_count,
            "ended_at": iso(session.session_end)}


async def start_session(app: web.Application, user_id: uuid.UUID, game_id: int) -> dict[str, Any]:
    """Open the player's session of a game, or return the one already running (`resumed`)."""
    async with app[POOL].acquire() as conn:
        async with conn.transaction():
            game = await queries.get_game(conn, game_id)
            if game is None:
                raise NotFound("no such game", field="game_id")
            if game.status != "active":
                raise Conflict(f"the game is {game.status}, not active", field="game_id")
            found = await queries.player(conn, user_id)
            if found is None:
                raise Unauthorized("the account no longer exists")
            wallet, username = found
            session = await queries.start_session(conn, game_id, user_id, wallet)
        if session is None:
            running = await queries.active_session(conn, game_id, user_id)
            if running is None:  # it ended between the two statements
                raise Conflict("your previous session is closing; start again", field="game_id")
            return {**running.to_public(), "resumed": True}
    try:
        await publish(app, game_channel(game_id), SESSION_STARTED, {
            "session_id": session.session_id, "game_id": game_id, "user_id": str(user_id), "username": username,
            "player_wallet": session.player_wallet, "started_at": session.session_start.isoformat()})
    except Exception:  # noqa: BLE001 - the session exists; the announcement is best effort
        log.warning("session_started_not_published", session_id=session.session_id, exc_info=True)
    log.info("game_session_started", session_id=session.session_id, game_id=game_id)
    return {**session.to_public(), "resumed": False}


def _may_act_on(caller: Caller, session: queries.GameSession) -> bool:
    if isinstance(caller, GameCaller):
        return caller.game_id == session.game_id
    return caller.is_admin or caller.user_id == session.user_id


async def end_session(app: web.Application, caller: Caller, session_id: int) -> dict[str, Any]:
    """End a session (its player, its game's server or an admin); ending an ended one changes nothing."""
    async with app[POOL].acquire() as conn, conn.transaction():
        session = await queries.get_session(conn, session_id, lock=True)
        if session is None:
            raise NotFound("no such session", field="session_id")
        if not _may_act_on(caller, session):
            raise Forbidden("only the session's player or its game server may end it", field="session_id")
        if session.status != queries.ACTIVE:
            return session.to_public()
        ended = await queries.close_session(conn, session_id, queries.ENDED)
        assert ended is not None  # the row is locked and was active
        data = session_ended_event(ended)
        await outbox.enqueue_many(conn, [((game_channel(ended.game_id), session_channel(session_id)), SESSION_ENDED,
                                          data)])
    log.info("game_session_ended", session_id=session_id)
    return ended.to_public()


async def heartbeat(app: web.Application, caller: Caller, session_id: int) -> dict[str, Any]:
    """Keep an active session from timing out while nothing is rewarded."""
    async with app[POOL].acquire() as conn:
        session = await queries.get_session(conn, session_id)
        if session is None:
            raise NotFound("no such session", field="session_id")
        if not _may_act_on(caller, session):
            raise Forbidden("only the session's player or its game server may keep it alive", field="session_id")
        touched = await queries.touch_session(conn, session_id)
    if touched is None:
        raise Conflict(f"the session is {session.status}", field="session_id")
    return touched.to_public()


async def session_with_rewards(conn: asyncpg.Connection, session_id: int, limit: int) -> dict[str, Any]:
    """A session with its latest rewards, newest first (public, as its channel is)."""
    session = await queries.get_session(conn, session_id)
    if session is None:
        raise NotFound("no such session", field="session_id")
    rewards = await queries.session_rewards(conn, session_id, limit)
    return {**session.to_public(), "rewards": [reward_ack(r) for r in rewards]}


async def player_sessions(conn: asyncpg.Connection, user_id: uuid.UUID, game_id: int | None, before: int | None,
                          limit: int) -> dict[str, Any]:
    """A player's own sessions, newest first (one game's, or all), a page at a time, with what they
    earned per game over all their sessions; `next_before` is the following page's `before`."""
    found = await queries.user_sessions(conn, user_id, game_id, before or MAX_INTEGER_ID, limit + 1)
    page = found[:limit]
    earnings = await queries.user_earnings(conn, user_id)
    total = sum((e.rewards_earned for e in earnings), Decimal(0))
    return {"sessions": [{**session.to_public(), "game_name": name} for session, name in page],
            "next_before": page[-1][0].session_id if len(found) > limit else None,
            "earnings": [e.to_public() for e in earnings],
            "total": {"sessions": sum(e.sessions for e in earnings), "rewards_earned": queries.money(total),
                      "reward_count": sum(e.reward_count for e in earnings)}}


def activity_step(idle_seconds: float) -> float:
    """How stale a session's recorded activity may be while it reports rewards (see insert_rewards)."""
    return idle_seconds * ACTIVITY_STEP_SHARE


async def sweep_idle(pool: asyncpg.Pool, idle_seconds: float) -> int:
    """Time out sessions idle for `idle_seconds` (their events in the same transaction); how many."""
    total = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            # A rewarded session's activity is recorded up to a step late: never time it out early.
            timed_out = await queries.time_out_idle(conn, idle_seconds + activity_step(idle_seconds), SWEEP_BATCH)
            events: list[outbox.QueuedEvent] = [
                ((game_channel(session.game_id), session_channel(session.session_id)), SESSION_ENDED,
                 session_ended_event(session)) for session in timed_out]
            if events:
                await outbox.enqueue_many(conn, events)
        total += len(timed_out)
        if len(timed_out) < SWEEP_BATCH:
            if total:
                log.info("game_sessions_timed_out", count=total)
            return total


# --- reward ingest -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class RewardReport:
    """One reward reported by a game server."""

    game_id: int
    session_id: int
    seq: int
    reward_type: str
    value: Decimal


def parse_value(raw: Any, field: str = "value") -> Decimal:
    """A reward or policy amount from a payload (a decimal string or an integer), > 0, 8 decimals."""
    try:
        value = Decimal(raw if isinstance(raw, str) else str(raw))
    except ArithmeticError:
        raise InvalidPayload(f"'{field}' is not a number", field=field) from None
    if not value.is_finite() or value <= 0:
        raise InvalidPayload(f"'{field}' must be greater than 0", field=field)
    if value != value.quantize(AMOUNT_QUANTUM):
        raise InvalidPayload(f"'{field}' has more than 8 decimals", field=field)
    return value.quantize(AMOUNT_QUANTUM)


def reward_ack(stored: queries.StoredReward) -> dict[str, Any]:
    """The ack of a booked reward; a replay of the same report gets exactly this again."""
    return {"session_id": stored.session_id, "seq": stored.seq, "reward_id": stored.reward_id,
            "reward_type": stored.reward_type, "value": queries.money(stored.reward_value),
            "session_total": queries.money(stored.session_total), "created_at": stored.created_at.isoformat()}


def owner_share(value: Decimal, revenue_share: Decimal) -> Decimal:
    """The game owner's revenue share of a reward: exact product truncated to 8 decimals (never rounds up)."""
    with localcontext(prec=SHARE_PRECISION):
        return (value * revenue_share).quantize(AMOUNT_QUANTUM, rounding=ROUND_DOWN)


@dataclasses.dataclass(slots=True)
class PoolBudget:
    """What the reward pool still holds while a batch is decided (decide spends it)."""

    pool_id: int | None  # None: no pool of that name, so nothing can be paid
    name: str
    remaining: Decimal

    @classmethod
    def of(cls, pool: chain_queries.RewardPool | None, name: str) -> PoolBudget:
        """The budget of pool `name` as read (None: there is no such pool)."""
        return cls(pool.id if pool else None, name, pool.remaining if pool else Decimal(0))


class PoolRaced(Exception):
    """The pool was drawn by someone else after the batch read it (book again with the pool locked)."""


def _policy_error(error: HubError, policy: str, limit: Decimal) -> HubError:
    error.extra.update(policy=policy, limit=queries.money(limit))
    return error


# Per report: refused, a replay of a stored reward, or the key of a reward accepted now.
Outcome = HubError | queries.StoredReward | tuple[int, int]
Acks = dict[tuple[int, int], dict[str, Any]]  # the ack of each reward accepted now, by (session_id, seq)


def decide(batch: list[RewardReport], sessions: dict[int, queries.SessionForReward], facts: queries.BatchFacts,
           budget: PoolBudget,
           ) -> tuple[list[Outcome], dict[tuple[int, int], queries.NewReward]]:
    """Apply the policy and the pool's budget to a batch in order: per report an error, a stored
    reward (replay) or the key of a reward accepted now; and the accepted rewards to write."""
    totals = {sid: s.rewards_earned for sid, s in sessions.items()}
    window = {sid: facts.windows.get(sid, (Decimal(0), facts.now))[0] for sid in sessions}
    accepted: dict[tuple[int, int], queries.NewReward] = {}
    outcomes: list[Outcome] = []
    for report in batch:
        outcomes.append(_decide_one(report, sessions, facts, totals, window, accepted, budget))
    return outcomes, accepted


def _decide_one(report: RewardReport, sessions: dict[int, queries.SessionForReward], facts: queries.BatchFacts,
                totals: dict[int, Decimal], window: dict[int, Decimal],
                accepted: dict[tuple[int, int], queries.NewReward],
                budget: PoolBudget) -> Outcome:
    session = sessions.get(report.session_id)
    if session is None:
        return NotFound("no such session", field="session_id")
    if session.game_id != report.game_id:
        return Forbidden("the session belongs to another game", field="session_id")
    key = (report.session_id, report.seq)
    earlier = facts.existing.get(key) or accepted.get(key)
    if earlier is not None:
        value = earlier.reward_value if isinstance(earlier, queries.StoredReward) else earlier.value
        if earlier.reward_type != report.reward_type or value != report.value:
            return Conflict(f"seq {report.seq} was already reported with another reward", field="seq")
        return earlier if isinstance(earlier, queries.StoredReward) else key
    if session.status != queries.ACTIVE:
        return Conflict(f"the session is {session.status}", field="session_id")
    if session.game_status != "active":
        return Forbidden(f"the game is {session.game_status}, not active", field="session_id")
    if session.reward_types and report.reward_type not in session.reward_types:
        return _policy_error(InvalidPayload(f"this game does not reward '{report.reward_type}'",
                                            field="reward_type"), "reward_types", Decimal(0))
    if report.value > session.max_reward_per_event:
        return _policy_error(InvalidPayload(
            f"the reward exceeds the game's maximum per event ({queries.money(session.max_reward_per_event)})",
            field="value"), "max_reward_per_event", session.max_reward_per_event)
    total = totals[report.session_id] + report.value
    if total > session.max_reward_per_session:
        return _policy_error(Conflict(
            f"the session would exceed the game's maximum per session "
            f"({queries.money(session.max_reward_per_session)}); start a new session", field="value"),
            "max_reward_per_session", session.max_reward_per_session)
    in_window = window[report.session_id] + report.value
    if in_window > session.max_reward_per_minute:
        oldest = facts.windows.get(report.session_id, (Decimal(0), None))[1] or facts.now
        retry_after = max(0.1, MINUTE - (facts.now - oldest).total_seconds())
        return _policy_error(RateLimited(
            f"the session would exceed the game's maximum per minute "
            f"({queries.money(session.max_reward_per_minute)})", retry_after=retry_after),
            "max_reward_per_minute", session.max_reward_per_minute)
    share = owner_share(report.value, session.revenue_share) if session.owner_id is not None else Decimal(0)
    if budget.pool_id is None or report.value + share > budget.remaining:
        return Conflict(
            f"the '{budget.name}' reward pool cannot cover this reward ({queries.money(report.value + share)} "
            f"with the owner's share, {queries.money(budget.remaining)} left)",
            field="value", reason=POOL_EXHAUSTED, pool=budget.name, remaining=queries.money(budget.remaining))
    budget.remaining -= report.value + share
    totals[report.session_id] = total
    window[report.session_id] = in_window
    accepted[key] = queries.NewReward(
        reward_id=facts.reward_ids[len(accepted)], game_id=session.game_id, player_wallet=session.player_wallet,
        reward_type=report.reward_type, value=report.value, session_id=session.session_id, seq=report.seq,
        session_total=total, pool_id=budget.pool_id, owner_share=share, created_at=facts.stamp(session.session_id))
    return key


def reward_event(session: queries.SessionForReward, ack: dict[str, Any]) -> dict[str, Any]:
    """The data of `reward_earned`: the reward's ack and who earned it in which game."""
    return {**ack, "game_id": session.game_id, "user_id": str(session.user_id),
            "username": session.username, "player_wallet": session.player_wallet}


async def book_rewards(conn: asyncpg.Connection, batch: list[RewardReport], pool_name: str = GAMING_POOL,
                       activity_step: float = 0.0) -> tuple[list[dict[str, Any] | HubError], int]:
    """Book a batch of reports at once, drawing them from the reward pool: per report its ack or its
    error, and how many rewards were new (the rest were replays or refused).

    First decided on an unlocked read and booked in one statement (two round trips); when something
    it relied on moved meanwhile, or inside a caller's transaction (where a failed statement would
    end it), decided again with its sessions locked, then, if the pool raced, with the pool locked.
    """
    if not conn.is_in_transaction():
        booked = await _book_in_one_statement(conn, batch, pool_name, activity_step)
        if booked is not None:
            return booked
    try:
        return await _book(conn, batch, pool_name, activity_step, lock_pool=False)
    except PoolRaced:
        return await _book(conn, batch, pool_name, activity_step, lock_pool=True)


def _writes(sessions: dict[int, queries.SessionForReward], accepted: dict[tuple[int, int], queries.NewReward],
            ) -> tuple[list[ledger.BalanceChange], list[outbox.QueuedEvent], ledger.PoolDraw, Acks]:
    """What booking the accepted rewards writes besides them (balance changes, events, the pool draw),
    and their acks (each made once: the event carries it too)."""
    changes: list[ledger.BalanceChange] = []
    events: list[outbox.QueuedEvent] = []
    acks: Acks = {}
    for key, new in accepted.items():
        session = sessions[new.session_id]
        ack = acks[key] = reward_ack(new.stored())
        changes.append(ledger.BalanceChange(session.user_id, new.value, ledger.GAME_REWARD, str(new.reward_id)))
        if new.owner_share > 0 and session.owner_id is not None:
            changes.append(ledger.BalanceChange(session.owner_id, new.owner_share, ledger.REVENUE_SHARE,
                                                str(new.reward_id)))
        events.append(((game_channel(session.game_id), session_channel(session.session_id)), REWARD_EARNED,
                       reward_event(session, ack)))
    drawn = sum((r.value + r.owner_share for r in accepted.values()), Decimal(0))
    return changes, events, ledger.PoolDraw(next(iter(accepted.values())).pool_id, drawn), acks


def _results(outcomes: list[Outcome], acks: Acks) -> tuple[list[dict[str, Any] | HubError], int]:
    results: list[dict[str, Any] | HubError] = []
    for outcome in outcomes:
        if isinstance(outcome, HubError):
            results.append(outcome)
        elif isinstance(outcome, queries.StoredReward):
            results.append(reward_ack(outcome))
        else:
            results.append(acks[outcome])
    return results, len(acks)


async def _book_in_one_statement(conn: asyncpg.Connection, batch: list[RewardReport], pool_name: str,
                                 activity_step: float) -> tuple[list[dict[str, Any] | HubError], int] | None:
    sessions, facts = await queries.read_batch(conn, ((r.session_id, r.seq) for r in batch), pool_name)
    outcomes, accepted = decide(batch, sessions, facts, PoolBudget.of(facts.pool, pool_name))
    acks: Acks = {}
    if accepted:
        new_rewards = list(accepted.values())
        seen = {session_id: sessions[session_id].rewards_earned for session_id in {r.session_id for r in new_rewards}}
        changes, events, draw, acks = _writes(sessions, accepted)
        moved = await queries.book_batch(conn, new_rewards, seen, events, changes, draw, activity_step)
        if moved is not None:
            log.debug("reward_batch_read_again", reason=moved, size=len(batch))
            return None
    return _results(outcomes, acks)


async def _book(conn: asyncpg.Connection, batch: list[RewardReport], pool_name: str, activity_step: float, *,
                lock_pool: bool) -> tuple[list[dict[str, Any] | HubError], int]:
    async with conn.transaction():
        sessions, facts = await queries.lock_batch(conn, ((r.session_id, r.seq) for r in batch), pool_name)
        # Sessions first, then the pool, then the users (the ledger): the same order as every batch.
        pool = await queries.reward_pool(conn, pool_name, lock=True) if lock_pool else facts.pool
        outcomes, accepted = decide(batch, sessions, facts, PoolBudget.of(pool, pool_name))
        acks: Acks = {}
        if accepted:
            changes, events, draw, acks = _writes(sessions, accepted)
            await queries.insert_rewards(conn, list(accepted.values()), events, activity_step)
            # Last, in the ledger's statement: every batch waits for the pool's row, which is then
            # held only until the commit. The draw fails when a concurrent batch spent what this
            # one counted on; never with the pool locked, when it cannot have moved.
            try:
                await ledger.apply_balance_changes(conn, changes, draw=draw)
            except ledger.PoolShort:
                raise PoolRaced(pool_name) from None
    return _results(outcomes, acks)


async def report_reward(app: web.Application, caller: GameCaller, session_id: int,
                        payload: dict[str, Any]) -> dict[str, Any]:
    """Queue a game server's reward report for booking and wait for its ack."""
    return await app[GAMES].ingest.submit(_report(caller, session_id, payload))


def _report(caller: GameCaller, session_id: int, payload: dict[str, Any]) -> RewardReport:
    return RewardReport(game_id=caller.game_id, session_id=session_id, seq=payload["seq"],
                        reward_type=payload["reward_type"], value=parse_value(payload["value"]))


async def report_rewards(app: web.Application, caller: GameCaller,
                         payloads: list[dict[str, Any]]) -> list[dict[str, Any] | HubError]:
    """Queue a game server's batch of reward reports together; each one's ack or error, in order.

    Each report is decided exactly as `report_reward` decides it alone (a refused one does not hold
    back the others); they share one trip through the queue, so a game server reporting for many
    sessions pays the per-call costs once."""
    reports: list[RewardReport | HubError] = []
    for payload in payloads:
        try:
            reports.append(_report(caller, payload["session_id"], payload))
        except HubError as exc:
            reports.append(exc)
    return await app[GAMES].ingest.submit_many(reports)


async def _result_or_error(future: asyncio.Future) -> dict[str, Any] | HubError:
    try:
        return await future
    except HubError as exc:
        return exc


@dataclasses.dataclass(slots=True)
class _Pending:
    report: RewardReport
    future: asyncio.Future


def _refuse_stopping(pendings: Iterable[_Pending]) -> None:
    """Answer reports that will not be booked because the server is stopping."""
    for pending in pendings:
        if not pending.future.done():
            pending.future.set_exception(Unavailable("the server is stopping; retry"))


class RewardIngest:
    """Reward reports queued by session and booked by a few workers, each taking whatever has piled up
    for the sessions no other worker is booking."""

    def __init__(self, pool: asyncpg.Pool, *, batch_max: int, queue_max: int, activity_step: float = 0.0,
                 on_booked: Callable[[set[int]], None] | None = None) -> None:
        self.pool = pool
        self.activity_step = activity_step
        self.batch_max = batch_max
        self.queue_max = queue_max
        self.on_booked = on_booked
        # A batch never takes a report of a session that a batch being booked holds. When two batches
        # booking at once shared a session (a game server with several of its reports in flight), the
        # later one found the session moved since its read, was refused whole and booked again with
        # its sessions locked; under load those retries slowed every batch, so more sessions had
        # reports in flight together, until acks took seconds (bench/rewards.py --rate 6500).
        self._queued: dict[int, collections.deque[_Pending]] = {}  # each session's reports, in order
        self._ready: collections.deque[int] = collections.deque()  # queued sessions not being booked
        self._booking: set[int] = set()
        self._size = 0
        self._changed = asyncio.Event()  # a session became ready
        self.batches = 0
        self.booked = 0  # new rewards, not replays

    async def submit(self, report: RewardReport) -> dict[str, Any]:
        """Queue a report and wait for its ack; raises its HubError when refused."""
        result = (await self.submit_many([report]))[0]
        if isinstance(result, HubError):
            raise result
        return result

    async def submit_many(self, reports: list[RewardReport | HubError]) -> list[dict[str, Any] | HubError]:
        """Queue reports together (errors pass through in place); each one's ack or HubError, in order."""
        if self._size + len(reports) > self.queue_max:
            busy = RateLimited("the server is busy booking rewards; retry shortly", retry_after=0.5)
            return [busy if isinstance(r, RewardReport) else r for r in reports]
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future | HubError] = []
        for report in reports:
            if isinstance(report, HubError):
                waits.append(report)
                continue
            future = loop.create_future()
            self._enqueue(_Pending(report, future))
            waits.append(future)
        try:
            return [wait if isinstance(wait, HubError) else await _result_or_error(wait) for wait in waits]
        except asyncio.CancelledError:
            # The caller went away: its reports are still booked, but nobody reads their outcomes.
            for wait in waits:
                if isinstance(wait, asyncio.Future):
                    wait.cancel()
            raise

    async def run_worker(self) -> None:
        """Book batches until cancelled."""
        while True:
            # No waiting for company: whatever queued while the last batch was written goes now.
            while not (batch := self._take()):
                self._changed.clear()
                await self._changed.wait()
            try:
                await self._process(batch)
            except asyncio.CancelledError:
                _refuse_stopping(batch)
                raise
            finally:
                self._release({pending.report.session_id for pending in batch})

    def _enqueue(self, pending: _Pending) -> None:
        session_id = pending.report.session_id
        queued = self._queued.get(session_id)
        if queued is None:
            queued = self._queued[session_id] = collections.deque()
            if session_id not in self._booking:
                self._ready.append(session_id)
                self._changed.set()
        queued.append(pending)
        self._size += 1

    def _take(self) -> list[_Pending]:
        """The next batch: the reports of the sessions ready longest, at most `batch_max`; a session
        whose reports do not all fit keeps the rest for after this batch."""
        batch: list[_Pending] = []
        while self._ready and len(batch) < self.batch_max:
            session_id = self._ready.popleft()
            queued = self._queued[session_id]
            batch.extend(queued.popleft() for _ in range(min(len(queued), self.batch_max - len(batch))))
            if not queued:
                del self._queued[session_id]
            self._booking.add(session_id)
        self._size -= len(batch)
        return batch

    def _release(self, sessions: set[int]) -> None:
        """A batch of `sessions` is over: those with reports queued meanwhile are ready again."""
        self._booking -= sessions
        for session_id in sessions:
            if session_id in self._queued:
                self._ready.append(session_id)
                self._changed.set()

    async def _process(self, batch: list[_Pending]) -> None:
        try:
            async with self.pool.acquire() as conn:
                results, new = await book_rewards(conn, [p.report for p in batch],
                                                  activity_step=self.activity_step)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad report must not fail its neighbours
            if len(batch) > 1:
                log.warning("reward_batch_failed_retrying_one_by_one", size=len(batch), error=type(exc).__name__)
                for pending in batch:
                    await self._process([pending])
                return
            error = error_from_exception(exc)
            if error.code is ErrorCode.INTERNAL_ERROR:
                log.exception("reward_booking_failed")
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        self.batches += 1
        self.booked += new
        games = {p.report.game_id for p, r in zip(batch, results) if not isinstance(r, HubError)} if new else set()
        for pending, result in zip(batch, results):
            if pending.future.done():  # the caller went away
                continue
            if isinstance(result, HubError):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)
        if games and self.on_booked is not None:
            self.on_booked(games)

    def fail_pending(self) -> None:
        """Refuse what is still queued (shutdown)."""
        for queued in self._queued.values():
            _refuse_stopping(queued)
        self._queued.clear()
        self._ready.clear()
        self._size = 0


# --- pool allocations --------------------------------------------------------------------------

def _allocation_page(found: list[chain_queries.Allocation], limit: int) -> dict[str, Any]:
    page = found[:limit]
    return {"items": [allocation.to_public() for allocation in page],
            "next": page[-1].id if len(found) > limit else None}


async def user_allocations(conn: asyncpg.Connection, user_id: uuid.UUID, before: int | None,
                           limit: int) -> dict[str, Any]:
    """A page of a user's pool allocations, newest first; `next` is the following page's `before`."""
    found = await queries.user_allocations(conn, user_id, before or MAX_INTEGER_ID, limit + 1)
    return _allocation_page(found, limit)


async def pool_allocations(conn: asyncpg.Connection, pool_id: int, before: int | None, limit: int) -> dict[str, Any]:
    """A page of a reward pool's allocations, newest first, with the pool."""
    pool = await chain_queries.get_pool(conn, pool_id)
    if pool is None:
        raise NotFound("no such reward pool", field="pool_id")
    found = await queries.pool_allocations(conn, pool_id, before or MAX_INTEGER_ID, limit + 1)
    return {"pool": pool.to_public(), **_allocation_page(found, limit)}


# --- leaderboards ------------------------------------------------------------------------------

def period_start(period: str, now: dt.datetime | None = None) -> dt.datetime | None:
    """Where a leaderboard period starts (None: all time)."""
    seconds = PERIODS[period]
    if seconds is None:
        return None
    return (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(seconds=seconds)


async def leaderboard(conn: asyncpg.Connection, game_id: int, period: str, limit: int) -> dict[str, Any]:
    """A game's top players over a period."""
    entries = await queries.leaderboard(conn, game_id, period_start(period), limit)
    return {"game_id": game_id, "period": period,
            "entries": [{"rank": rank, "user_id": str(e.user_id), "username": e.username, "total": queries.money(e.total)}
                        for rank, e in enumerate(entries, start=1)]}


async def game_leaderboard(conn: asyncpg.Connection, game_id: int, period: str, limit: int) -> dict[str, Any]:
    """A registered game's top players over a period."""
    await get_game(conn, game_id)
    return await leaderboard(conn, game_id, period, limit)


class Leaderboards:
    """Publishes `leaderboard_changed` for games that got rewards, at most once per interval.

    With Redis, a short-lived key makes that at most once per interval across all processes; a
    process that loses the race keeps the game marked and tries again next round.
    """

    def __init__(self, app: web.Application, *, interval: float, period: str, size: int) -> None:
        self.app = app
        self.interval = interval
        self.period = period
        self.size = size
        self.dirty: set[int] = set()
        self._last: dict[int, list] = {}

    def mark(self, game_ids: Iterable[int]) -> None:
        """Note that these games' standings may have changed."""
        self.dirty.update(game_ids)

    async def run(self) -> None:
        """Flush every interval until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def flush(self) -> None:
        """Publish the leaderboards of the marked games this process may publish now."""
        for game_id in list(self.dirty):
            if not await self._claim(game_id):
                continue
            self.dirty.discard(game_id)
            async with self.app[POOL].acquire() as conn:
                board = await leaderboard(conn, game_id, self.period, self.size)
            if board["entries"] == self._last.get(game_id):
                continue
            self._last[game_id] = board["entries"]
            await publish(self.app, game_channel(game_id), LEADERBOARD_CHANGED, board)

    async def _claim(self, game_id: int) -> bool:
        redis = self.app[REDIS]
        if redis is None:
            return True
        key = f"{self.app[SETTINGS].redis_prefix}game_leaderboard:{game_id}"
        try:
            return bool(await redis.set(key, "1", nx=True, px=max(1, int(self.interval * 1000))))
        except Exception:  # noqa: BLE001 - without Redis, publishing fails anyway; try next round
            return False


# --- wiring ------------------------------------------------------------------------------------

class GameService:
    """What the /games handlers use: token checks, the reward queue, the leaderboards."""

    def __init__(self, app: web.Application, settings: Settings) -> None:
        self.tokens = GameTokens(settings.session_cache_ttl)
        self.leaderboards = Leaderboards(app, interval=settings.game_leaderboard_interval,
                                         period=settings.game_leaderboard_period, size=settings.game_leaderboard_size)
        self.ingest = RewardIngest(app[POOL], batch_max=settings.game_reward_batch_max,
                                   queue_max=settings.game_reward_queue_max,
                                   activity_step=activity_step(settings.game_session_idle_seconds),
                                   on_booked=self.leaderboards.mark)


GAMES: web.AppKey[GameService] = web.AppKey("games", GameService)


async def games_ctx(app: web.Application) -> AsyncIterator[None]:
    """The reward workers, the leaderboard publisher and the idle-session sweeper."""
    settings = app[SETTINGS]
    service = app[GAMES] = GameService(app, settings)
    health = app[REDIS_HEALTH]
    idle = settings.game_session_idle_seconds
    sweep_every = min(max(idle / 4, 0.05), 30.0)

    async def sweeper() -> None:
        while True:
            await asyncio.sleep(sweep_every)
            await sweep_idle(app[POOL], idle)

    tasks = [asyncio.create_task(health.run_with_backoff(service.ingest.run_worker, f"reward_worker_{n}"))
             for n in range(settings.game_reward_workers)]
    tasks.append(asyncio.create_task(health.run_with_backoff(service.leaderboards.run, "game_leaderboards")))
    tasks.append(asyncio.create_task(health.run_with_backoff(sweeper, "game_session_sweeper")))
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    service.ingest.fail_pending()
