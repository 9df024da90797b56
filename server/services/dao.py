"""DAO rules: proposals with a deadline, one signed vote per wallet, live tallies, results.

A vote is signed by the voter's wallet key over canonical bytes (`vote_message`, documented in
docs/protocol.md "DAO"). A vote and its `tally_changed` event are written in one transaction
(the outbox), under the proposal's row lock, so tallies are announced in vote order and a vote
cannot slip in after the proposal closed. A proposal past its deadline is closed by the deadline
sweeper (every `DAO_SWEEP_INTERVAL` seconds, any process: the row lock makes it once), by the
first read or vote that notices it, or by an administrator; that announces `proposal_closed`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any, AsyncIterator

import asyncpg
from aiohttp import web

from db import chain as chain_queries
from db import dao as queries
from db import outbox
from db.pool import POOL
from db.pool import now as database_now
from server.core import wallets
from server.core.errors import Conflict, InvalidPayload, NotFound
from server.core.settings import SETTINGS
from server.realtime.redis import REDIS_HEALTH
from server.services.chain import check_own_signature, own_wallet

VOTE_DOMAIN = "KVP-VOTE-V1"
CHOICES = ("Yes", "No", "Abstain")
OPEN, CLOSED = "Open", "Closed"
PASSED, REJECTED = "Passed", "Rejected"
MIN_DURATION = dt.timedelta(seconds=60)
MAX_DURATION = dt.timedelta(days=365)
CLOSE_BATCH = 100

PROPOSAL_CHANNEL = "dao:{proposal_id}"
TALLY_CHANGED = "tally_changed"
PROPOSAL_CLOSED = "proposal_closed"


def proposal_channel(proposal_id: int) -> str:
    """The channel of a proposal's live tally and closing."""
    return PROPOSAL_CHANNEL.format(proposal_id=proposal_id)


def vote_message(proposal_id: int, choice: str, voter: str) -> bytes:
    """The exact bytes a voter signs: three fields after a domain tag, newline-separated, UTF-8."""
    if choice not in CHOICES:
        raise ValueError(f"the choice must be one of {', '.join(CHOICES)}")
    return "\n".join((VOTE_DOMAIN, str(int(proposal_id)), choice, voter)).encode()


def sign_vote(wallet: wallets.Wallet, proposal_id: int, choice: str) -> dict[str, Any]:
    """A ready-to-submit vote payload signed by a wallet (clients and tests)."""
    signature = wallet.private_key.sign(vote_message(proposal_id, choice, wallet.address)).hex()
    return {"proposal_id": proposal_id, "voter": wallet.address, "choice": choice, "signature": signature}


def result_of(tally: queries.Tally) -> str:
    """A closed proposal's result: passed when Yes outnumbers No (abstentions do not count)."""
    return PASSED if tally.yes > tally.no else REJECTED


def tally_event(proposal_id: int, tally: queries.Tally) -> dict[str, Any]:
    """`tally_changed` data."""
    return {"proposal_id": proposal_id, **tally.to_public()}


def _deadline(payload: dict[str, Any], now: dt.datetime) -> dt.datetime:
    has_deadline, has_duration = "deadline" in payload, "duration_seconds" in payload
    if has_deadline == has_duration:
        raise InvalidPayload("give exactly one of 'deadline' and 'duration_seconds'", field="deadline")
    if has_duration:
        deadline = now + dt.timedelta(seconds=payload["duration_seconds"])
    else:
        try:
            deadline = dt.datetime.fromisoformat(payload["deadline"])
        except ValueError:
            raise InvalidPayload("'deadline' must be an ISO 8601 date and time", field="deadline") from None
        if deadline.tzinfo is None:
            raise InvalidPayload("'deadline' needs a UTC offset (e.g. 2026-12-01T12:00:00+00:00)",
                                 field="deadline")
    if not now + MIN_DURATION <= deadline <= now + MAX_DURATION:
        raise InvalidPayload("the deadline must be between 60 seconds and 365 days from now", field="deadline")
    return deadline


async def create_proposal(conn: asyncpg.Connection, user_id: uuid.UUID, payload: dict[str, Any]) -> queries.Proposal:
    """Open a proposal by a signed-in user with a registered wallet."""
    title, description = payload["title"].strip(), payload["description"].strip()
    if not title:
        raise InvalidPayload("the title must not be blank", field="title")
    if not description:
        raise InvalidPayload("the description must not be blank", field="description")
    wallet = await own_wallet(conn, user_id)
    deadline = _deadline(payload, await database_now(conn))
    return await queries.insert_proposal(conn, title=title, description=description, creator_wallet=wallet.address,
                                         creator_id=user_id, deadline=deadline)


async def _close_locked(conn: asyncpg.Connection, proposal_id: int) -> None:
    """Close a proposal whose row the caller locked, and queue `proposal_closed`."""
    tally = await queries.tally(conn, proposal_id)
    result = result_of(tally)
    closed_at = await queries.close(conn, proposal_id, result)
    if closed_at is not None:
        await outbox.enqueue(conn, proposal_channel(proposal_id), PROPOSAL_CLOSED,
                             {**tally_event(proposal_id, tally), "result": result, "closed_at": closed_at.isoformat()})


async def close_proposal(conn: asyncpg.Connection, proposal_id: int) -> queries.Proposal:
    """Close a proposal now, whatever its deadline (administrators); closing a closed one is a no-op."""
    async with conn.transaction():
        locked = await queries.lock_proposal(conn, proposal_id)
        if locked is None:
            raise NotFound("no such proposal", field="proposal_id")
        if locked.status == OPEN:
            await _close_locked(conn, proposal_id)
    return await queries.get_proposal(conn, proposal_id)  # type: ignore[return-value]


async def close_if_expired(conn: asyncpg.Connection, proposal_id: int) -> bool:
    """Close the proposal when it is open past its deadline; whether this call closed it."""
    async with conn.transaction():
        locked = await queries.lock_proposal(conn, proposal_id)
        if locked is None or locked.status != OPEN or not locked.expired:
            return False
        await _close_locked(conn, proposal_id)
        return True


async def close_expired(conn: asyncpg.Connection, limit: int = CLOSE_BATCH) -> list[int]:
    """Close open proposals past their deadline (at most `limit`); the ids this call closed."""
    closed = []
    for proposal_id in await queries.expired_open(conn, limit):
        if await close_if_expired(conn, proposal_id):
            closed.append(proposal_id)
    return closed


async def dao_ctx(app: web.Application) -> AsyncIterator[None]:
    """Close proposals whose deadline passed, so watchers get `proposal_closed` without a read."""
    interval = app[SETTINGS].dao_sweep_interval

    async def sweep() -> None:
        while True:
            async with app[POOL].acquire() as conn:
                await close_expired(conn)
            await asyncio.sleep(interval)

    task = asyncio.create_task(app[REDIS_HEALTH].run_with_backoff(sweep, "dao_deadline_sweeper"))
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def get_proposal(conn: asyncpg.Connection, proposal_id: int) -> queries.Proposal:
    """A proposal with its tally, closed first when its deadline has passed."""
    proposal = await queries.get_proposal(conn, proposal_id)
    if proposal is None:
        raise NotFound("no such proposal", field="proposal_id")
    if proposal.status == OPEN and proposal.deadline <= await database_now(conn):
        await close_if_expired(conn, proposal_id)
        proposal = await queries.get_proposal(conn, proposal_id)
    return proposal  # type: ignore[return-value]


async def proposal_view(conn: asyncpg.Connection, proposal_id: int, with_votes: bool = False) -> dict[str, Any]:
    """A proposal's public view with its tally (closed first when past its deadline), optionally with every
    signed vote."""
    data = (await get_proposal(conn, proposal_id)).to_public()
    if with_votes:
        data["votes"] = [vote.to_public() for vote in await queries.list_votes(conn, proposal_id)]
    return data


async def list_proposals(conn: asyncpg.Connection, status: str | None, before_id: int | None,
                         limit: int) -> list[queries.Proposal]:
    """Proposals newest first; expired open ones are closed before the read."""
    await close_expired(conn)
    return await queries.list_proposals(conn, status, before_id, limit)


async def cast_vote(conn: asyncpg.Connection, user_id: uuid.UUID, payload: dict[str, Any]) -> dict[str, Any]:
    """Verify and record a signed vote with its `tally_changed` event; any refusal writes no vote."""
    proposal_id, voter, choice = payload["proposal_id"], payload["voter"], payload["choice"]
    signature = payload["signature"].lower()
    message = vote_message(proposal_id, choice, voter)
    expired = False
    async with conn.transaction():
        # The proposal's row lock orders the votes (and their tallies) and excludes closing meanwhile.
        locked = await queries.lock_proposal(conn, proposal_id)
        if locked is None:
            raise NotFound("no such proposal", field="proposal_id")
        wallet = await chain_queries.get_wallet(conn, voter)
        check_own_signature(wallet, user_id, message, signature, role="voter", action="vote with")
        if locked.status != OPEN:
            raise Conflict("the proposal is closed", field="proposal_id")
        if locked.expired:
            await _close_locked(conn, proposal_id)  # committed: the refusal below comes after it
            expired = True
        else:
            vote = await queries.insert_vote(conn, proposal_id=proposal_id, voter_wallet=voter, voter_id=user_id,
                                             choice=choice, signature=signature)
            if vote is None:
                raise Conflict("this wallet has already voted on the proposal", field="voter")
            tally = await queries.tally(conn, proposal_id)
            await outbox.enqueue(conn, proposal_channel(proposal_id), TALLY_CHANGED, tally_event(proposal_id, tally))
    if expired:
        raise Conflict("the proposal is closed: its deadline has passed", field="proposal_id")
    return {**vote.to_public(), "tally": tally.to_public()}
