"""The balance ledger: the one place that moves `users.total_balance`, booking one `balance_ledger`
row per change in the same statement.

Every flow (sealed transfers, mining rewards, pool grants, faucet, game rewards, NFT sales...) calls
`apply_balance_changes`; nothing else may `UPDATE users SET total_balance` (tests/test_ledger.py
checks the source tree for it). The caller owns the transaction. `(reason, reference)` is unique,
so a change is booked at most once; the CHECKs keep every balance and every `balance_after` >= 0.
"""

from __future__ import annotations

import dataclasses
import uuid
from decimal import Decimal
from typing import Sequence

import asyncpg

# --- reasons: what moved a balance (balance_ledger.reason) -------------------------------------
TRANSFER_OUT = "transfer_out"        # reference: transaction hash (sealed transfer, sender's side)
TRANSFER_IN = "transfer_in"          # reference: transaction hash (receiver's side)
MINING_REWARD = "mining_reward"      # reference: "<block height>:<user_id>" (one per miner per block)
POOL_GRANT = "pool_grant"            # reference: pool_allocations.id (an admin's grant from a reward pool)
FAUCET = "demo_faucet"               # reference: "<user_id>:<UTC date>" (one claim a day)
GAME_REWARD = "game_reward"          # reference: game_rewards.reward_id
NFT_PURCHASE = "nft_purchase"        # reference: nft listing id (buyer's side)
NFT_SALE = "nft_sale"                # reference: nft listing id (seller's side)
OPENING_BALANCE = "opening_balance"  # reference: "migration-0014:<user_id>" (balances older than the ledger)
REVENUE_SHARE = "revenue_share"      # reference: game_rewards.reward_id (the game owner's share of a reward)
STAKE = "stake"                      # reference: defi.id (KVP locked into a stake)
UNSTAKE = "unstake"                  # reference: defi.id (a closed stake's principal back)
STAKING_REWARD = "staking_reward"    # reference: "<defi.id>:<first height>-<last height>" (drawn from the staking pool)
ACCOUNT_CLOSED_BURN = "account_closed"  # reference: "<user_id>" (a deleted account's remaining balance, burned)

# Reasons that create money (drawn from a reward pool, minted by the demo faucet, or booked by
# migration 0014); every other reason moves money between users, so the rows of one reference sum to 0
# (burns are the documented exception, below).
MINTING_REASONS = (MINING_REWARD, POOL_GRANT, FAUCET, GAME_REWARD, OPENING_BALANCE, REVENUE_SHARE, STAKING_REWARD)
# Reasons that destroy money on purpose: a deleted account's balance goes to nobody (issue 18), so
# its row is the only one of its reference and is left out of the zero-sum check too.
BURN_REASONS = (ACCOUNT_CLOSED_BURN,)

# How a balance change locks its users rows. NO KEY UPDATE, not UPDATE: a balance is no key, and
# FOR UPDATE would also block the KEY SHARE lock that every insert of a row referencing the user
# takes (a purchase, an escrow row, a session). A transaction holding one user's balance lock while
# it inserts such a row for another then deadlocked with a sealer locking both (seen in
# bench/purchases.py). Balance writers still exclude each other, as UPDATE ... SET total_balance does.
BALANCE_LOCK = " FOR NO KEY UPDATE"


class UnknownAccount(LookupError):
    """A balance change names a user that does not exist."""


class PoolShort(Exception):
    """The reward pool a set of changes was to be drawn from no longer holds the amount."""


@dataclasses.dataclass(frozen=True, slots=True)
class PoolDraw:
    """An amount the changes take from a reward pool, by compare-and-set on the pool's row."""

    pool_id: int
    amount: Decimal


@dataclasses.dataclass(frozen=True, slots=True)
class BalanceChange:
    """One change of one user's balance, and why."""

    user_id: uuid.UUID
    delta: Decimal
    reason: str
    reference: str


def pool_draw(pool: int, amount: int, *, when: str = "true") -> str:
    """A statement taking $`amount` from reward pool $`pool` by compare-and-set on the pool's row,
    when `when` holds; it returns a row only if it drew."""
    return f"""UPDATE reward_pools SET allocated_tokens = allocated_tokens + ${amount}
                WHERE pool_id = ${pool} AND total_tokens - allocated_tokens >= ${amount} AND ({when})
               RETURNING 1"""


def balance_changes(param: int, *, after: str) -> str:
    """CTEs moving balances by the changes in the JSON parameter $`param` (a list of BalanceChange)
    and booking their ledger rows, once the CTE `after` returned a row (if it returns none, nothing
    moves); `moved (id, total_balance)` holds each user moved.

    For a statement that moves balances with its own writes in one round trip: users are locked in
    id order (no deadlock between concurrent callers) and moved by their net delta, and the rows
    are inserted with the running balance, so a debit booked before the credit that covers it
    fails the balance_after CHECK. WITH ORDINALITY ... ORDER BY n: entry ids follow the order of
    the changes, so each user's rows chain; every part of the statement sees the balances from
    before it, so a row's balance_after is the new balance less the user's later changes. `changes`
    reads `after` (an InitPlan run before the users are scanned), so what `after` locks is locked
    first: a reward pool before the users, the order every pool grant takes.

    One JSON parameter, not an array per field: asyncpg spends more on each array element (a type
    check per element and a binary encoding) than orjson spends on the whole list.
    """
    return f"""changes AS (
                SELECT * FROM ROWS FROM (json_to_recordset(${param}::json)
                                         AS (user_id uuid, delta numeric, reason text, reference text))
                       WITH ORDINALITY AS c(user_id, delta, reason, reference, n)
                 WHERE EXISTS (SELECT FROM {after})),
            net AS (SELECT user_id, sum(delta) AS delta FROM changes GROUP BY user_id),
            locked AS (SELECT id FROM users WHERE id IN (SELECT user_id FROM net) ORDER BY id{BALANCE_LOCK}),
            moved AS (
                UPDATE users u SET total_balance = u.total_balance + net.delta
                  FROM net JOIN locked ON locked.id = net.user_id
                 WHERE u.id = net.user_id
             RETURNING u.id, u.total_balance),
            booked AS (
                INSERT INTO balance_ledger (user_id, delta, balance_after, reason, reference)
                SELECT c.user_id, c.delta,
                       m.total_balance - sum(c.delta) OVER (PARTITION BY c.user_id ORDER BY c.n DESC)
                                       + c.delta,
                       c.reason, c.reference
                  FROM changes c JOIN moved m ON m.id = c.user_id
                 ORDER BY c.n)"""


async def apply_balance_changes(conn: asyncpg.Connection, changes: Sequence[BalanceChange], *,
                                draw: PoolDraw | None = None) -> dict[uuid.UUID, Decimal]:
    """Move balances and book each change, in order; returns each touched user's balance after.

    One statement whatever the batch size (see `balance_changes`). Raises CheckViolationError (a
    balance would go negative), UniqueViolationError ((reason, reference) booked before) or
    UnknownAccount (the caller's transaction must then roll back).

    With `draw`, the same statement first takes the amount from the pool and moves nothing when the
    pool no longer holds it (PoolShort). Every batch of game rewards waits for that pool's row, so
    its lock is held from this statement to the commit, not across a round trip of its own.
    """
    changes = [change for change in changes if change.delta != 0]
    if not changes and draw is None:
        return {}
    row = await conn.fetchrow(
        f"""WITH drawn AS ({pool_draw(2, 3) if draw is not None else "SELECT 1"}),
            {balance_changes(1, after="drawn")}
            SELECT EXISTS (SELECT FROM drawn) AS drawn, array_agg(id) AS ids, array_agg(total_balance) AS balances
              FROM moved""",
        changes, *((draw.pool_id, draw.amount) if draw is not None else ()))
    if not row["drawn"]:
        assert draw is not None
        raise PoolShort(f"reward pool {draw.pool_id} no longer holds {draw.amount}")
    after = dict(zip(row["ids"] or (), row["balances"] or ()))
    missing = {change.user_id for change in changes} - set(after)
    if missing:
        raise UnknownAccount(f"no such user: {', '.join(sorted(map(str, missing)))}")
    return after


# --- verification ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Mismatch:
    """A user whose ledger disagrees: what was expected and what is stored."""

    user_id: uuid.UUID
    check: str          # "balance" (total_balance vs sum of deltas) or "chain" (a row's balance_after)
    expected: Decimal
    actual: Decimal
    entry_id: int | None = None

    def describe(self) -> str:
        """One line for reports."""
        if self.check == "balance":
            return (f"user {self.user_id}: balance {self.actual} but its ledger sums to {self.expected}")
        return (f"user {self.user_id}: ledger entry {self.entry_id} says balance_after {self.actual}, "
                f"previous balance_after plus delta is {self.expected}")


async def balance_mismatches(conn: asyncpg.Connection, limit: int) -> list[Mismatch]:
    """The first users whose balance differs from the sum of their ledger deltas."""
    rows = await conn.fetch(
        """SELECT u.id, u.total_balance, coalesce(l.total, 0) AS total
             FROM users u LEFT JOIN (SELECT user_id, sum(delta) AS total FROM balance_ledger GROUP BY user_id) l
                  ON l.user_id = u.id
            WHERE u.total_balance <> coalesce(l.total, 0)
            ORDER BY u.id LIMIT $1""", limit)
    return [Mismatch(row["id"], "balance", row["total"], row["total_balance"]) for row in rows]


async def chain_mismatches(conn: asyncpg.Connection, limit: int) -> list[Mismatch]:
    """The first ledger rows whose balance_after is not the previous row's plus its delta (per user,
    in entry_id order; the first row starts from 0).

    An opening_balance row must equal the sum of the user's deltas up to it; the rows before it were
    booked while some moves were off the ledger (before migration 0014), so only the sum covers them.
    """
    rows = await conn.fetch(
        """WITH walk AS (
               SELECT entry_id, user_id, reason, delta, balance_after,
                      coalesce(lag(balance_after) OVER w, 0) + delta AS chained,
                      sum(delta) OVER w AS running,
                      max(entry_id) FILTER (WHERE reason = $2) OVER (PARTITION BY user_id) AS opened_at
                 FROM balance_ledger
               WINDOW w AS (PARTITION BY user_id ORDER BY entry_id))
           SELECT entry_id, user_id, balance_after,
                  CASE WHEN reason = $2 THEN running ELSE chained END AS expected
             FROM walk
            WHERE CASE WHEN reason = $2 THEN balance_after <> running
                       WHEN entry_id < coalesce(opened_at, 0) THEN false
                       ELSE balance_after <> chained END
            ORDER BY entry_id LIMIT $1""", limit, OPENING_BALANCE)
    return [Mismatch(row["user_id"], "chain", row["expected"], row["balance_after"], row["entry_id"])
            for row in rows]


async def unbalanced_moves(conn: asyncpg.Connection, limit: int) -> list[str]:
    """References whose moving rows (all but MINTING_REASONS and BURN_REASONS) do not sum to what they should: money
    made or lost. That is 0, except for an active stake (a `stake` row whose reference is an active
    staking defi.id): its principal is locked, not lost, so its moves sum to -amount until unstaked."""
    rows = await conn.fetch(
        """WITH moves AS (
               SELECT reference, sum(delta) AS total, string_agg(DISTINCT reason, ', ') AS reasons,
                      bool_or(reason = $3) AS staked, min(entry_id) AS first_entry
                 FROM balance_ledger WHERE reason <> ALL($2::text[])
                GROUP BY reference)
           SELECT m.reference, m.total, m.reasons, coalesce(-d.amount, 0) AS expected
             FROM moves m
             LEFT JOIN defi d ON m.staked AND d.product = 'staking' AND d.status = 'active'
                              AND d.id::text = m.reference
            WHERE m.total <> coalesce(-d.amount, 0)
            ORDER BY m.first_entry LIMIT $1""", limit, list(MINTING_REASONS + BURN_REASONS), STAKE)
    return [f"reference {row['reference']} ({row['reasons']}): its moves sum to {row['total']}, "
            f"not {row['expected']}" for row in rows]


@dataclasses.dataclass(frozen=True, slots=True)
class PoolMismatch:
    """A reward pool whose allocated tokens differ from what its records show was drawn."""

    pool_id: int
    name: str | None
    allocated: Decimal
    recorded: Decimal

    def describe(self) -> str:
        """One line for reports."""
        return (f"reward pool {self.pool_id} ({self.name}): allocated_tokens {self.allocated} but its "
                f"allocations, mining rewards, game rewards and revenue shares total {self.recorded}")


async def pool_mismatches(conn: asyncpg.Connection, limit: int) -> list[PoolMismatch]:
    """Pools whose allocated_tokens differ from what was drawn from them: their pool_allocations,
    mining_rewards, and game_rewards with the owner's revenue share on each (migration 0016)."""
    rows = await conn.fetch(
        """SELECT p.pool_id, p.pool_name, p.allocated_tokens,
                  coalesce((SELECT sum(a.allocated_amount) FROM pool_allocations a WHERE a.pool_id = p.pool_id), 0)
                + coalesce((SELECT sum(r.amount) FROM mining_rewards r WHERE r.pool_id = p.pool_id), 0)
                + coalesce((SELECT sum(g.reward_value + g.owner_share) FROM game_rewards g
                             WHERE g.pool_id = p.pool_id), 0) AS recorded
             FROM reward_pools p ORDER BY p.pool_id""")
    return [PoolMismatch(row["pool_id"], row["pool_name"], row["allocated_tokens"], row["recorded"])
            for row in rows if row["allocated_tokens"] != row["recorded"]][:limit]

