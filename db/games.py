"""Queries on games, game sessions and game rewards (their balances and ledger rows: db/ledger.py).

Each function takes the connection first so the caller owns the transaction. The reward
functions work on whole batches (arrays through `unnest`) so one transaction books many rewards.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any, Iterable, Sequence

import asyncpg

from db import ledger, outbox
from db.chain import Allocation, RewardPool
from server.core.jsonutil import iso
from server.core.money import money

ACTIVE = "Active"
ENDED = "Ended"
TIMED_OUT = "TimedOut"


@dataclasses.dataclass(frozen=True, slots=True)
class Game:
    """A registered game with its reward policy (never its token)."""

    game_id: int
    name: str | None
    developer_wallet: str | None
    revenue_share: Decimal | None
    status: str
    owner_id: uuid.UUID | None
    max_reward_per_event: Decimal
    max_reward_per_minute: Decimal
    max_reward_per_session: Decimal
    reward_types: list[str] | None
    created_at: dt.datetime
    updated_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The game as the API shows it."""
        return {"game_id": self.game_id, "name": self.name, "developer_wallet": self.developer_wallet,
                "revenue_share": None if self.revenue_share is None else f"{self.revenue_share.normalize():f}",
                "status": self.status, "owner_id": str(self.owner_id) if self.owner_id else None,
                "policy": {"max_reward_per_event": money(self.max_reward_per_event),
                           "max_reward_per_minute": money(self.max_reward_per_minute),
                           "max_reward_per_session": money(self.max_reward_per_session),
                           "reward_types": self.reward_types},
                "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat()}


@dataclasses.dataclass(frozen=True, slots=True)
class GameSession:
    """One player's play session of one game."""

    session_id: int
    game_id: int
    user_id: uuid.UUID | None
    player_wallet: str
    status: str
    session_start: dt.datetime
    session_end: dt.datetime | None
    rewards_earned: Decimal
    reward_count: int
    last_activity_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The session as the API shows it."""
        return {"session_id": self.session_id, "game_id": self.game_id,
                "user_id": str(self.user_id) if self.user_id else None, "player_wallet": self.player_wallet,
                "status": self.status, "started_at": self.session_start.isoformat(),
                "ended_at": iso(self.session_end),
                "rewards_earned": money(self.rewards_earned), "reward_count": self.reward_count,
                "last_activity_at": self.last_activity_at.isoformat()}


@dataclasses.dataclass(frozen=True, slots=True)
class SessionForReward:
    """A session locked for booking rewards, with its game's status and policy."""

    session_id: int
    game_id: int
    user_id: uuid.UUID
    player_wallet: str
    status: str
    rewards_earned: Decimal
    reward_count: int
    game_status: str
    max_reward_per_event: Decimal
    max_reward_per_minute: Decimal
    max_reward_per_session: Decimal
    reward_types: list[str] | None
    revenue_share: Decimal
    owner_id: uuid.UUID | None
    username: str | None  # the player's name, for the events (None once the account is deleted)


@dataclasses.dataclass(frozen=True, slots=True)
class StoredReward:
    """A booked reward: what an ack (first or replayed) is made of."""

    reward_id: int
    session_id: int
    seq: int
    reward_type: str
    reward_value: Decimal
    session_total: Decimal
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class NewReward:
    """A reward accepted by the policy, about to be written (its id reserved, its time set)."""

    reward_id: int
    game_id: int
    player_wallet: str
    reward_type: str
    value: Decimal
    session_id: int
    seq: int
    session_total: Decimal
    pool_id: int
    owner_share: Decimal
    created_at: dt.datetime

    def stored(self) -> StoredReward:
        """The reward as it reads once written."""
        return StoredReward(self.reward_id, self.session_id, self.seq, self.reward_type, self.value,
                            self.session_total, self.created_at)


@dataclasses.dataclass(frozen=True, slots=True)
class LeaderboardEntry:
    """One row of a game's leaderboard."""

    user_id: uuid.UUID
    username: str
    total: Decimal


_GAME_COLUMNS = """game_id, name, developer_wallet, revenue_share, status, owner_id, max_reward_per_event,
    max_reward_per_minute, max_reward_per_session, reward_types, created_at, updated_at"""
_SESSION_COLUMNS = """session_id, game_id, user_id, player_wallet, status, session_start, session_end,
    rewards_earned, reward_count, last_activity_at"""
_REWARD_COLUMNS = "reward_id, session_id, seq, reward_type, reward_value, session_total, created_at"


def _prefixed(columns: str, alias: str) -> str:
    return ", ".join(f"{alias}.{column.strip()}" for column in columns.split(","))


# Columns an update may change (the API validates the values, this guards the SQL).
UPDATABLE = ("name", "developer_wallet", "revenue_share", "status", "max_reward_per_event",
             "max_reward_per_minute", "max_reward_per_session", "reward_types")


def _game(row: asyncpg.Record | None) -> Game | None:
    return None if row is None else Game(**dict(row))


def _session(row: asyncpg.Record | None) -> GameSession | None:
    return None if row is None else GameSession(**dict(row))


# --- games -------------------------------------------------------------------------------------

async def create_game(conn: asyncpg.Connection, *, name: str, developer_wallet: str, revenue_share: Decimal,
                      owner_id: uuid.UUID | None, status: str, token_hash: str, max_reward_per_event: Decimal,
                      max_reward_per_minute: Decimal, max_reward_per_session: Decimal,
                      reward_types: list[str] | None) -> Game:
    """Register a game."""
    return _game(await conn.fetchrow(
        f"""INSERT INTO games (name, developer_wallet, revenue_share, owner_id, status, token_hash,
                               max_reward_per_event, max_reward_per_minute, max_reward_per_session, reward_types)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {_GAME_COLUMNS}""",
        name, developer_wallet, revenue_share, owner_id, status, token_hash, max_reward_per_event,
        max_reward_per_minute, max_reward_per_session, reward_types))  # type: ignore[return-value]


async def get_game(conn: asyncpg.Connection, game_id: int) -> Game | None:
    """A game by id."""
    return _game(await conn.fetchrow(f"SELECT {_GAME_COLUMNS} FROM games WHERE game_id = $1", game_id))


async def list_games(conn: asyncpg.Connection, *, status: str | None, after_id: int, limit: int) -> list[Game]:
    """Games by id after `after_id`, optionally of one status."""
    rows = await conn.fetch(
        f"""SELECT {_GAME_COLUMNS} FROM games WHERE game_id > $1 AND ($2::text IS NULL OR status = $2)
            ORDER BY game_id LIMIT $3""", after_id, status, limit)
    return [Game(**dict(row)) for row in rows]


async def update_game(conn: asyncpg.Connection, game_id: int, changes: dict[str, Any]) -> Game | None:
    """Change some of a game's columns (names from UPDATABLE only)."""
    if not changes:
        return await get_game(conn, game_id)
    names = list(changes)
    unknown = set(names) - set(UPDATABLE)
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(names, start=2))
    return _game(await conn.fetchrow(
        f"UPDATE games SET {assignments} WHERE game_id = $1 RETURNING {_GAME_COLUMNS}",
        game_id, *(changes[name] for name in names)))


async def set_token_hash(conn: asyncpg.Connection, game_id: int, token_hash: str) -> bool:
    """Replace a game's token (the old one stops working); whether the game exists."""
    return await conn.fetchval(
        "UPDATE games SET token_hash = $2 WHERE game_id = $1 RETURNING true", game_id, token_hash) or False


async def game_by_token_hash(conn: asyncpg.Connection, token_hash: str) -> Game | None:
    """The game whose token has this SHA-256."""
    return _game(await conn.fetchrow(f"SELECT {_GAME_COLUMNS} FROM games WHERE token_hash = $1", token_hash))


# --- sessions ----------------------------------------------------------------------------------

async def player(conn: asyncpg.Connection, user_id: uuid.UUID) -> tuple[str, str] | None:
    """The wallet a user plays under (their KVP wallet, else their Sui address, else `user:<id>`) and
    their username; None for no such user."""
    row = await conn.fetchrow(
        """SELECT coalesce(wallet_address, sui_address, 'user:' || id::text) AS wallet, username
           FROM users WHERE id = $1""", user_id)
    return None if row is None else (row["wallet"], row["username"])


async def start_session(conn: asyncpg.Connection, game_id: int, user_id: uuid.UUID,
                        wallet: str) -> GameSession | None:
    """Open a session; None when the player already has an active one for this game."""
    return _session(await conn.fetchrow(
        f"""INSERT INTO game_sessions (game_id, user_id, player_wallet, session_start, status)
            VALUES ($1, $2, $3, now(), 'Active') ON CONFLICT DO NOTHING RETURNING {_SESSION_COLUMNS}""",
        game_id, user_id, wallet))


async def active_session(conn: asyncpg.Connection, game_id: int, user_id: uuid.UUID) -> GameSession | None:
    """The player's active session of a game, if any."""
    return _session(await conn.fetchrow(
        f"SELECT {_SESSION_COLUMNS} FROM game_sessions WHERE game_id = $1 AND user_id = $2 AND status = 'Active'",
        game_id, user_id))


async def get_session(conn: asyncpg.Connection, session_id: int, *, lock: bool = False) -> GameSession | None:
    """A session by id (locked until the transaction ends when `lock`)."""
    suffix = " FOR UPDATE" if lock else ""
    return _session(await conn.fetchrow(
        f"SELECT {_SESSION_COLUMNS} FROM game_sessions WHERE session_id = $1{suffix}", session_id))


async def touch_session(conn: asyncpg.Connection, session_id: int) -> GameSession | None:
    """Mark an active session as alive now; None when it is not active."""
    return _session(await conn.fetchrow(
        f"""UPDATE game_sessions SET last_activity_at = now() WHERE session_id = $1 AND status = 'Active'
            RETURNING {_SESSION_COLUMNS}""", session_id))


async def close_session(conn: asyncpg.Connection, session_id: int, status: str) -> GameSession | None:
    """End an active session with `status` (Ended or TimedOut); None when it was not active."""
    return _session(await conn.fetchrow(
        f"""UPDATE game_sessions SET status = $2, session_end = greatest(now(), session_start)
            WHERE session_id = $1 AND status = 'Active' RETURNING {_SESSION_COLUMNS}""", session_id, status))


async def time_out_idle(conn: asyncpg.Connection, idle_seconds: float, limit: int) -> list[GameSession]:
    """Time out up to `limit` active sessions idle for `idle_seconds`; skips rows being rewarded now."""
    rows = await conn.fetch(
        f"""WITH idle AS (
                SELECT session_id FROM game_sessions
                WHERE status = 'Active' AND last_activity_at < now() - make_interval(secs => $1)
                ORDER BY last_activity_at LIMIT $2 FOR UPDATE SKIP LOCKED)
            UPDATE game_sessions s SET status = 'TimedOut', session_end = greatest(now(), s.session_start)
            FROM idle WHERE s.session_id = idle.session_id RETURNING {_prefixed(_SESSION_COLUMNS, "s")}""",
        float(idle_seconds), limit)
    return [GameSession(**dict(row)) for row in rows]


async def session_rewards(conn: asyncpg.Connection, session_id: int, limit: int) -> list[StoredReward]:
    """A session's latest rewards, newest first."""
    rows = await conn.fetch(
        f"SELECT {_REWARD_COLUMNS} FROM game_rewards WHERE session_id = $1 ORDER BY seq DESC LIMIT $2",
        session_id, limit)
    return [StoredReward(**dict(row)) for row in rows]


@dataclasses.dataclass(frozen=True, slots=True)
class GameEarnings:
    """What one player earned in one game, over all their sessions of it."""

    game_id: int
    name: str | None
    sessions: int
    rewards_earned: Decimal
    reward_count: int
    last_played_at: dt.datetime

    def to_public(self) -> dict[str, Any]:
        return {"game_id": self.game_id, "name": self.name, "sessions": self.sessions,
                "rewards_earned": money(self.rewards_earned), "reward_count": self.reward_count,
                "last_played_at": self.last_played_at.isoformat()}


async def user_sessions(conn: asyncpg.Connection, user_id: uuid.UUID, game_id: int | None, before: int,
                        limit: int) -> list[tuple[GameSession, str | None]]:
    """A player's sessions (of one game, or all) with id below `before`, newest first, with each game's name."""
    rows = await conn.fetch(
        f"""SELECT {_prefixed(_SESSION_COLUMNS, "s")}, g.name AS game_name
            FROM game_sessions s JOIN games g ON g.game_id = s.game_id
            WHERE s.user_id = $1 AND s.session_id < $2 AND ($3::int IS NULL OR s.game_id = $3)
            ORDER BY s.session_id DESC LIMIT $4""", user_id, before, game_id, limit)
    found = []
    for row in rows:
        values = dict(row)
        name = values.pop("game_name")
        found.append((GameSession(**values), name))
    return found


async def user_earnings(conn: asyncpg.Connection, user_id: uuid.UUID) -> list[GameEarnings]:
    """A player's sessions and earnings per game, the most recently played game first."""
    rows = await conn.fetch(
        """SELECT s.game_id, g.name, count(*)::int AS sessions, sum(s.rewards_earned) AS rewards_earned,
                  sum(s.reward_count)::int AS reward_count, max(s.session_start) AS last_played_at
           FROM game_sessions s JOIN games g ON g.game_id = s.game_id
           WHERE s.user_id = $1 GROUP BY s.game_id, g.name ORDER BY last_played_at DESC, s.game_id""", user_id)
    return [GameEarnings(**dict(row)) for row in rows]


# --- reward batches ----------------------------------------------------------------------------


_SESSIONS = """SELECT s.session_id, s.game_id, s.user_id, s.player_wallet, s.status, s.rewards_earned,
           s.reward_count, g.status AS game_status, g.max_reward_per_event, g.max_reward_per_minute,
           g.max_reward_per_session, g.reward_types, g.revenue_share, g.owner_id, u.username
    FROM game_sessions s JOIN games g ON g.game_id = s.game_id LEFT JOIN users u ON u.id = s.user_id
    WHERE s.session_id = ANY($1::int[]) ORDER BY s.session_id"""


# A batch's sessions come back as their own fields and each game's policy once: a policy per session
# row (most batches are one game's sessions) was half of what the read cost PostgreSQL, most of
# it sending the same numerics and reward types again for every session.
_SESSION_ROWS = """ARRAY(SELECT ROW(b.session_id, b.game_id, b.user_id, b.player_wallet, b.status, b.rewards_earned,
                                   b.reward_count, b.username) FROM batch b)"""
_GAME_POLICIES = """ARRAY(SELECT ROW(g.game_id, g.status, g.max_reward_per_event, g.max_reward_per_minute,
                                    g.max_reward_per_session, g.reward_types, g.revenue_share, g.owner_id)
                          FROM games g WHERE g.game_id IN (SELECT game_id FROM batch))"""


def _sessions(row: asyncpg.Record) -> dict[int, SessionForReward]:
    """The sessions of a batch statement's row, each with its game's policy."""
    policies = {values[0]: values[1:] for values in row["games"]}
    return {values[0]: SessionForReward(*values[:7], *policies[values[1]], values[7]) for values in row["sessions"]}


def _batch_statement(sessions: str, *, with_sessions: bool, commit_without_flush: bool = False) -> str:
    """What a batch is decided on, for the sessions `sessions` selects; `with_sessions`: also those
    sessions' rows (with their games' policies) and ids reserved for the batch's new rewards.

    A minute window costs three index probes instead of summing the session's last minute of
    rewards (at 3,500 rewards/s that read 7,000 rows a batch): a session's `created_at` never goes
    back (BatchFacts.stamp), so its rewards before the window are a prefix of them in booking order,
    and the window's sum is the latest running total less the total at the last reward before the
    window. Ties (one batch's rewards share a time) go to the higher total, the later reward:
    totals only grow, and (session_id, created_at, session_total) is indexed in that order.

    The time of the oldest reward in the window only tells a refused report when to retry, so it
    is read only for a session that the batch's reports could take past its limit per minute (each
    at most the limit per event): that probe cost as much as the other two together.
    """
    near_limit = ("""latest.session_total - coalesce(before.session_total, 0)
                     + b.max_reward_per_event * (SELECT count(*) FROM unnest($2::int[]) AS k(session_id)
                                                 WHERE k.session_id = b.session_id) > b.max_reward_per_minute"""
                  if with_sessions else "true")
    # Reserving the batch's reward ids logs the sequence every 32 values, which gives the read a
    # transaction id and made its commit wait for a WAL flush: a quarter of a backend waited on it
    # at 7,000 rewards/s. Alone in its transaction, the read may commit without the flush: a
    # reward using these ids is booked later, and its commit flushes the WAL up to and past this one.
    flush = "set_config('synchronous_commit', 'off', true)" if commit_without_flush else "NULL"
    return f"""WITH batch AS ({sessions})
        SELECT now() AS now, {flush} AS commit_without_flush,
               {_SESSION_ROWS if with_sessions else "NULL"} AS sessions,
               {_GAME_POLICIES if with_sessions else "NULL"} AS games,
               ARRAY(SELECT ROW({_prefixed(_REWARD_COLUMNS, "r")})
                     FROM unnest($2::int[], $3::bigint[]) AS k(session_id, seq)
                     -- LIMIT 1 (the key is unique) keeps this an index probe per key: as a join, it
                     -- was planned as a hash join over the whole table while the table was young.
                     JOIN LATERAL (SELECT * FROM game_rewards r WHERE r.session_id = k.session_id AND r.seq = k.seq
                                   LIMIT 1) r ON true) AS existing,
               ARRAY(SELECT ROW(b.session_id, latest.session_total, latest.created_at,
                                latest.session_total - coalesce(before.session_total, 0), first_in.created_at)
                     FROM batch b
                     LEFT JOIN LATERAL (
                         SELECT session_total, created_at FROM game_rewards r WHERE r.session_id = b.session_id
                         ORDER BY r.created_at DESC, r.session_total DESC LIMIT 1) latest ON true
                     LEFT JOIN LATERAL (
                         SELECT session_total FROM game_rewards r WHERE r.session_id = b.session_id
                            AND r.created_at <= now() - interval '60 seconds'
                         ORDER BY r.created_at DESC, r.session_total DESC LIMIT 1) before ON true
                     LEFT JOIN LATERAL (
                         SELECT created_at FROM game_rewards r WHERE r.session_id = b.session_id
                            AND r.created_at > now() - interval '60 seconds' AND {near_limit}
                          ORDER BY r.created_at LIMIT 1) first_in ON true) AS totals,
               (SELECT ROW(pool_id, pool_name, total_tokens, allocated_tokens, created_at)
                  FROM reward_pools WHERE pool_name = $4) AS pool,
               {"ARRAY(SELECT nextval(pg_get_serial_sequence('game_rewards', 'reward_id')) FROM generate_series(1, $5))"
                if with_sessions else "NULL"} AS reward_ids"""


_READ_BATCH = _batch_statement(_SESSIONS, with_sessions=True, commit_without_flush=True)
_LOCK_AND_READ_BATCH = _batch_statement(_SESSIONS + " FOR UPDATE OF s", with_sessions=True)
_READ_FACTS = _batch_statement("SELECT DISTINCT unnest($1::int[]) AS session_id", with_sessions=False)


@dataclasses.dataclass(frozen=True, slots=True)
class BatchFacts:
    """What a reward batch is decided on, read with its sessions (locked or not)."""

    now: dt.datetime  # the transaction's clock
    existing: dict[tuple[int, int], StoredReward]  # rewards already booked under the batch's keys
    # Per session with rewards: the sum of its last 60 s of them, and the oldest's time if the batch
    # could reach the limit per minute (None otherwise, and when none is that recent).
    windows: dict[int, tuple[Decimal, dt.datetime | None]]
    latest: dict[int, dt.datetime]  # per session with rewards: the time of its latest
    pool: RewardPool | None  # the pool the batch draws from, as it stood (not locked)
    reward_ids: list[int]  # ids reserved for the batch's new rewards, one per report (unused ones are gaps)

    def stamp(self, session_id: int) -> dt.datetime:
        """The time of a session's new rewards: never before its latest, so its times follow its
        booking order (the windows rely on it), even for a batch that began before another but
        waited for the session's lock and books after it."""
        latest = self.latest.get(session_id)
        return self.now if latest is None or latest < self.now else latest


def _facts(row: asyncpg.Record, reward_ids: list[int]) -> tuple[BatchFacts, dict[int, Decimal]]:
    """The facts in a batch statement's row, and each session's latest running total in its snapshot."""
    existing = {(r[1], r[2]): StoredReward(*r) for r in row["existing"]}
    windows = {session_id: (total, oldest) for session_id, _, _, total, oldest in row["totals"] if total is not None}
    latest = {session_id: at for session_id, _, at, _, _ in row["totals"] if at is not None}
    totals = {session_id: total or Decimal(0) for session_id, total, _, _, _ in row["totals"]}
    pool = RewardPool(*row["pool"]) if row["pool"] else None
    return BatchFacts(row["now"], existing, windows, latest, pool, reward_ids), totals


async def _batch_row(conn: asyncpg.Connection, statement: str, keys: Iterable[tuple[int, int]],
                     pool_name: str) -> tuple[asyncpg.Record, list[int], list[int]]:
    """Run a batch statement for these (session_id, seq) keys: its row, and the keys' session ids and seqs."""
    keys = list(keys)
    session_ids, seqs = [k[0] for k in keys], [k[1] for k in keys]
    row = await conn.fetchrow(statement, sorted(set(session_ids)), session_ids, seqs, pool_name, len(keys))
    return row, session_ids, seqs


async def read_batch(conn: asyncpg.Connection, keys: Iterable[tuple[int, int]],
                     pool_name: str) -> tuple[dict[int, SessionForReward], BatchFacts]:
    """The sessions of these (session_id, seq) keys and what the batch is decided on, unlocked:
    book_batch checks that nothing it relied on moved. Outside a transaction block only (its commit
    skips the WAL flush, which would also apply to the caller's transaction)."""
    if conn.is_in_transaction():
        raise RuntimeError("read_batch commits on its own; lock_batch is for a transaction")
    row, _, _ = await _batch_row(conn, _READ_BATCH, keys, pool_name)
    return _sessions(row), _facts(row, row["reward_ids"])[0]


async def lock_batch(conn: asyncpg.Connection, keys: Iterable[tuple[int, int]],
                     pool_name: str) -> tuple[dict[int, SessionForReward], BatchFacts]:
    """Lock the sessions of these (session_id, seq) keys (in id order, so concurrent batches cannot
    deadlock) with their policies, and read what the batch is decided on: one statement, usually.

    The facts come from the statement's snapshot, taken before it waited for any session's lock:
    if that lock's holder booked rewards meanwhile, the snapshot misses them. Its latest running
    total of that session then falls short of the locked row's, and the facts are read again by a
    statement of their own, which sees what the holder committed.
    """
    row, session_ids, seqs = await _batch_row(conn, _LOCK_AND_READ_BATCH, keys, pool_name)
    sessions = _sessions(row)
    facts, seen = _facts(row, row["reward_ids"])
    if any(seen[session_id] != session.rewards_earned for session_id, session in sessions.items()):
        facts, _ = _facts(await conn.fetchrow(_READ_FACTS, list(sessions), session_ids, seqs, pool_name),
                          facts.reward_ids)
    return sessions, facts


# The new rewards travel as one JSON parameter ($1, a list of NewReward), not as an array per
# field: asyncpg spent more on each array element (a type check and a binary encoding apiece) than
# orjson spends on the whole batch, 4-5 us per reward of the hub's CPU.
_NEW_REWARDS = """new AS (
    SELECT * FROM json_to_recordset($1::json)
        AS v(reward_id int, game_id int, player_wallet text, reward_type text, value numeric, session_id int,
             seq bigint, session_total numeric, pool_id int, owner_share numeric, created_at timestamptz))"""
# last_activity_at is indexed (the idle sweep): writing it makes the update non-HOT, a new entry in
# each of the table's indexes per reward batch. Recording it at most once per step keeps most
# updates HOT; the sweep allows for the step (sweep_idle), so no session times out early.
_SESSION_TOTALS = """totals AS (
    UPDATE game_sessions s SET rewards_earned = v.total, reward_count = s.reward_count + v.n,
           last_activity_at = CASE WHEN s.last_activity_at < now() - make_interval(secs => ${step})
                                   THEN now() ELSE s.last_activity_at END
      FROM (SELECT session_id, max(session_total) AS total, count(*) AS n FROM new GROUP BY session_id) v
     WHERE s.session_id = v.session_id
    RETURNING 1)"""
_INSERT_REWARDS = """inserted AS (
    INSERT INTO game_rewards (reward_id, game_id, player_wallet, reward_type, reward_value, session_id, seq,
                              session_total, pool_id, owner_share, created_at)
    SELECT * FROM new
    RETURNING 1)"""


async def insert_rewards(conn: asyncpg.Connection, rewards: list[NewReward],
                         events: Sequence[outbox.QueuedEvent], activity_step: float = 0.0) -> None:
    """Write accepted rewards, their sessions' new totals (the latest running total, the count of
    new rewards, the activity time at most once per `activity_step` seconds) and their
    queued events, in one statement, inside the caller's transaction."""
    await conn.execute(
        f"""WITH {_NEW_REWARDS}, {_SESSION_TOTALS.format(step=2)}, {_INSERT_REWARDS},
                 queued AS ({outbox.queue_events(3)})
            SELECT pg_notify($4, '')""",
        rewards, float(activity_step), outbox.event_rows(events), outbox.NOTIFY_CHANNEL)


# The draw's condition reads the other writes, so PostgreSQL runs them first: the pool's row, which
# every batch waits for, is then locked for the draw and the ledger only, not for inserting the
# rewards and their events.
_AFTER_THE_WRITES = """(SELECT count(*) FROM claimed WHERE unchanged) = (SELECT count(*) FROM seen)
    AND (SELECT count(*) FROM totals) + (SELECT count(*) FROM inserted) + (SELECT count(*) FROM queued) > 0"""

# Why book_batch wrote nothing (hub_abort's reason, from migration 0028).
SESSIONS_MOVED = "sessions_moved"
POOL_SHORT = "pool_short"
UNKNOWN_ACCOUNT = "unknown_account"


async def book_batch(conn: asyncpg.Connection, rewards: list[NewReward], seen: dict[int, Decimal],
                     events: Sequence[outbox.QueuedEvent], changes: Sequence[ledger.BalanceChange],
                     draw: ledger.PoolDraw, activity_step: float = 0.0) -> str | None:
    """Book a batch decided on an unlocked read (read_batch) in one statement: its rewards, their
    sessions' totals, their events, the pool draw and the balance changes. Returns None when booked,
    or why nothing was written: a session's total is no longer the one `seen` (or it ended), the
    pool no longer covers `draw`, or an account of `changes` is gone.

    Outside a transaction block the statement is its own transaction, so the locks every batch
    waits for (the reward pool's row, the game owner's balance) last only as long as it runs, and
    a batch takes two round trips instead of a transaction's five. Sessions are locked first (in
    id order), then the pool, then the users, as in a locked batch.
    """
    users = len({change.user_id for change in changes})
    try:
        await conn.execute(
            f"""WITH {_NEW_REWARDS},
                seen AS (SELECT key::int AS session_id, value::numeric AS total FROM json_each_text($2::json)),
                -- Checked in the select list, not the WHERE: there, status = 'Active' let the planner
                -- lock the sessions through the partial idle index, reading every dead entry that
                -- reward updates leave in it (6,000 a batch after 15 s at 7,000 rewards/s) instead of
                -- one key probe per session. A row locked after a wait is projected again from its
                -- latest version, as a WHERE would be checked again.
                claimed AS (
                    SELECT s.session_id, s.rewards_earned = seen.total AND s.status = '{ACTIVE}' AS unchanged
                      FROM game_sessions s JOIN seen ON seen.session_id = s.session_id
                     ORDER BY s.session_id FOR UPDATE OF s),
                {_SESSION_TOTALS.format(step=6)},
                {_INSERT_REWARDS},
                queued AS ({outbox.queue_events(7)} RETURNING 1),
                drawn AS ({ledger.pool_draw(3, 4, when=_AFTER_THE_WRITES)}),
                {ledger.balance_changes(5, after="drawn")}
            SELECT CASE WHEN (SELECT count(*) FROM claimed WHERE unchanged) <> (SELECT count(*) FROM seen)
                        THEN hub_abort($8)
                        WHEN NOT EXISTS (SELECT FROM drawn) THEN hub_abort($9)
                        WHEN (SELECT count(*) FROM moved) <> $10 THEN hub_abort($11) END,
                   pg_notify($12, '')""",
            rewards, seen, draw.pool_id, draw.amount, list(changes), float(activity_step), outbox.event_rows(events),
            SESSIONS_MOVED, POOL_SHORT, users, UNKNOWN_ACCOUNT, outbox.NOTIFY_CHANNEL)
    except asyncpg.RaiseError as exc:
        if exc.message in (SESSIONS_MOVED, POOL_SHORT, UNKNOWN_ACCOUNT):
            return exc.message
        raise
    return None


# --- leaderboards ------------------------------------------------------------------------------

async def leaderboard(conn: asyncpg.Connection, game_id: int, since: dt.datetime | None,
                      limit: int) -> list[LeaderboardEntry]:
    """The players with the most rewards in a game since `since` (all time when None)."""
    if since is None:
        rows = await conn.fetch(
            """SELECT s.user_id, u.username, sum(s.rewards_earned) AS total
               FROM game_sessions s JOIN users u ON u.id = s.user_id
               WHERE s.game_id = $1 GROUP BY s.user_id, u.username HAVING sum(s.rewards_earned) > 0
               ORDER BY total DESC, u.username LIMIT $2""", game_id, limit)
    else:
        # Per session not ended before `since`, its running total less the one at its last reward
        # before `since` (its times follow its booking order: BatchFacts.stamp): an index probe per
        # session, where summing the period's rewards read every one of them, every refresh.
        rows = await conn.fetch(
            """SELECT s.user_id, u.username, sum(s.rewards_earned - coalesce(before.session_total, 0)) AS total
               FROM game_sessions s JOIN users u ON u.id = s.user_id
               LEFT JOIN LATERAL (
                   SELECT r.session_total FROM game_rewards r WHERE r.session_id = s.session_id AND r.created_at < $2
                   ORDER BY r.created_at DESC, r.session_total DESC LIMIT 1) before ON true
               WHERE s.game_id = $1 AND (s.session_end IS NULL OR s.session_end >= $2)
               GROUP BY s.user_id, u.username HAVING sum(s.rewards_earned - coalesce(before.session_total, 0)) > 0
               ORDER BY total DESC, u.username LIMIT $3""", game_id, since, limit)
    return [LeaderboardEntry(**dict(row)) for row in rows]


# --- the reward pool -------------------------------------------------------------------------

async def reward_pool(conn: asyncpg.Connection, name: str, *, lock: bool = False) -> RewardPool | None:
    """A reward pool by name (locked until the transaction ends when `lock`)."""
    suffix = " FOR UPDATE" if lock else ""
    row = await conn.fetchrow(
        f"""SELECT pool_id AS id, pool_name AS name, total_tokens, allocated_tokens, created_at
              FROM reward_pools WHERE pool_name = $1{suffix}""", name)
    return RewardPool(**dict(row)) if row else None


# --- pool allocations --------------------------------------------------------------------------

_ALLOCATION_COLUMNS = """id, user_id, pool_id, allocated_amount, remaining_amount, total_reward, reward_amount,
    "timestamp\""""
# Keyset pages newest first, each served by its index in order (tests/test_pools.py checks the plans).
USER_ALLOCATIONS = f"""SELECT {_ALLOCATION_COLUMNS} FROM pool_allocations WHERE user_id = $1 AND id < $2
    ORDER BY id DESC LIMIT $3"""
POOL_ALLOCATIONS = f"""SELECT {_ALLOCATION_COLUMNS} FROM pool_allocations WHERE pool_id = $1 AND id < $2
    ORDER BY id DESC LIMIT $3"""


async def user_allocations(conn: asyncpg.Connection, user_id: uuid.UUID, before: int, limit: int) -> list[Allocation]:
    """A user's pool allocations with ids below `before`, newest first (idx_pool_allocations_user_order)."""
    return [Allocation(**dict(row)) for row in await conn.fetch(USER_ALLOCATIONS, user_id, before, limit)]


async def pool_allocations(conn: asyncpg.Connection, pool_id: int, before: int, limit: int) -> list[Allocation]:
    """A pool's allocations with ids below `before`, newest first (idx_pool_allocations_pool_order)."""
    return [Allocation(**dict(row)) for row in await conn.fetch(POOL_ALLOCATIONS, pool_id, before, limit)]
