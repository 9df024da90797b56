"""Queries of the DAO: proposals, signed votes, tallies.

Each function takes the connection first; the caller owns the transaction. The rules (signature,
deadline, one vote per wallet, results) live in server/services/dao.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import asyncpg

from server.core.jsonutil import iso


@dataclasses.dataclass(frozen=True, slots=True)
class Tally:
    """Votes of a proposal by choice."""

    yes: int
    no: int
    abstain: int

    def to_public(self) -> dict[str, int]:
        """The API's view."""
        return {"yes": self.yes, "no": self.no, "abstain": self.abstain}


@dataclasses.dataclass(frozen=True, slots=True)
class Proposal:
    """A proposal with its current tally."""

    id: int
    title: str
    description: str
    creator_wallet: str
    creator_id: uuid.UUID | None
    status: str
    deadline: dt.datetime
    result: str | None
    created_at: dt.datetime
    closed_at: dt.datetime | None
    tally: Tally

    def to_public(self) -> dict[str, Any]:
        """The API's view."""
        return {"id": self.id, "title": self.title, "description": self.description,
                "creator_wallet": self.creator_wallet,
                "creator_id": str(self.creator_id) if self.creator_id else None, "status": self.status,
                "deadline": iso(self.deadline), "result": self.result, "tally": self.tally.to_public(),
                "created_at": iso(self.created_at), "closed_at": iso(self.closed_at)}


@dataclasses.dataclass(frozen=True, slots=True)
class LockedProposal:
    """What a vote or a close checks under the proposal's row lock."""

    id: int
    status: str
    expired: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Vote:
    """One wallet's signed vote on a proposal."""

    id: int
    proposal_id: int
    voter_wallet: str
    voter_id: uuid.UUID | None
    choice: str
    signature: str
    timestamp: dt.datetime

    def to_public(self) -> dict[str, Any]:
        """The API's view."""
        return {"id": self.id, "proposal_id": self.proposal_id, "voter": self.voter_wallet,
                "voter_id": str(self.voter_id) if self.voter_id else None, "choice": self.choice,
                "signature": self.signature, "timestamp": iso(self.timestamp)}


_PROPOSAL_COLUMNS = """p.proposal_id AS id, p.title, p.description, p.creator_wallet, p.creator_id, p.status,
    p.deadline, p.result, p.created_at, p.closed_at, t.yes, t.no, t.abstain"""
_TALLY_JOIN = """CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE v.vote_option = 'Yes') AS yes,
           count(*) FILTER (WHERE v.vote_option = 'No') AS no,
           count(*) FILTER (WHERE v.vote_option = 'Abstain') AS abstain
      FROM votes v WHERE v.proposal_id = p.proposal_id) t"""
_VOTE_COLUMNS = """vote_id AS id, proposal_id, voter_wallet, voter_id, vote_option AS choice, signature,
    "timestamp\""""


def _proposal(row: asyncpg.Record) -> Proposal:
    values = dict(row)
    tally = Tally(values.pop("yes"), values.pop("no"), values.pop("abstain"))
    return Proposal(**values, tally=tally)


async def insert_proposal(conn: asyncpg.Connection, *, title: str, description: str, creator_wallet: str,
                          creator_id: uuid.UUID, deadline: dt.datetime) -> Proposal:
    """Open a new proposal."""
    proposal_id = await conn.fetchval(
        """INSERT INTO proposals (title, description, creator_wallet, creator_id, deadline, status)
           VALUES ($1, $2, $3, $4, $5, 'Open') RETURNING proposal_id""",
        title, description, creator_wallet, creator_id, deadline)
    return await get_proposal(conn, proposal_id)  # type: ignore[return-value]


async def get_proposal(conn: asyncpg.Connection, proposal_id: int) -> Proposal | None:
    """A proposal by id, with its tally."""
    row = await conn.fetchrow(
        f"SELECT {_PROPOSAL_COLUMNS} FROM proposals p {_TALLY_JOIN} WHERE p.proposal_id = $1", proposal_id)
    return _proposal(row) if row else None


async def list_proposals(conn: asyncpg.Connection, status: str | None, before_id: int | None,
                         limit: int) -> list[Proposal]:
    """Proposals newest first, optionally of one status and below an id."""
    rows = await conn.fetch(
        f"""SELECT {_PROPOSAL_COLUMNS} FROM proposals p {_TALLY_JOIN}
             WHERE ($1::text IS NULL OR p.status = $1) AND ($2::int IS NULL OR p.proposal_id < $2)
             ORDER BY p.proposal_id DESC LIMIT $3""", status, before_id, limit)
    return [_proposal(row) for row in rows]


async def lock_proposal(conn: asyncpg.Connection, proposal_id: int) -> LockedProposal | None:
    """A proposal's status, locked until the transaction ends; `expired` when its deadline has passed."""
    row = await conn.fetchrow(
        """SELECT proposal_id AS id, status, deadline <= now() AS expired
             FROM proposals WHERE proposal_id = $1 FOR UPDATE""", proposal_id)
    return LockedProposal(**dict(row)) if row else None


async def expired_open(conn: asyncpg.Connection, limit: int) -> list[int]:
    """Ids of open proposals whose deadline has passed, oldest deadline first."""
    rows = await conn.fetch(
        """SELECT proposal_id FROM proposals WHERE status = 'Open' AND deadline <= now()
            ORDER BY deadline LIMIT $1""", limit)
    return [row["proposal_id"] for row in rows]


async def insert_vote(conn: asyncpg.Connection, *, proposal_id: int, voter_wallet: str, voter_id: uuid.UUID,
                      choice: str, signature: str) -> Vote | None:
    """Record a vote; None when this wallet already voted on the proposal (votes_one_per_wallet)."""
    row = await conn.fetchrow(
        f"""INSERT INTO votes (proposal_id, voter_wallet, voter_id, vote_option, signature)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT ON CONSTRAINT votes_one_per_wallet DO NOTHING
            RETURNING {_VOTE_COLUMNS}""", proposal_id, voter_wallet, voter_id, choice, signature)
    return Vote(**dict(row)) if row else None


async def list_votes(conn: asyncpg.Connection, proposal_id: int) -> list[Vote]:
    """Every vote of a proposal, in the order cast."""
    rows = await conn.fetch(f"SELECT {_VOTE_COLUMNS} FROM votes WHERE proposal_id = $1 ORDER BY vote_id",
                            proposal_id)
    return [Vote(**dict(row)) for row in rows]


async def tally(conn: asyncpg.Connection, proposal_id: int) -> Tally:
    """The proposal's votes counted by choice."""
    row = await conn.fetchrow(
        """SELECT count(*) FILTER (WHERE vote_option = 'Yes') AS yes,
                  count(*) FILTER (WHERE vote_option = 'No') AS no,
                  count(*) FILTER (WHERE vote_option = 'Abstain') AS abstain
             FROM votes WHERE proposal_id = $1""", proposal_id)
    return Tally(row["yes"], row["no"], row["abstain"])


async def close(conn: asyncpg.Connection, proposal_id: int, result: str) -> dt.datetime | None:
    """Close an open proposal with its result; returns the closing time (None when it was not open)."""
    return await conn.fetchval(
        """UPDATE proposals SET status = 'Closed', result = $2, closed_at = now()
            WHERE proposal_id = $1 AND status = 'Open' RETURNING closed_at""", proposal_id, result)

