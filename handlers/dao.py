"""The DAO's /chain commands and REST routes: proposals, signed votes, results.

The /chain namespace is the chain's: handlers/__init__.py composes it from ChainCommands
(handlers/chain.py) and DaoCommands (here).
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from db.pool import POOL
from server.core.errors import InvalidPayload
from server.core.identity import Identity
from server.edge.namespace import Ctx, command
from server.edge.rest import endpoint, int_query, ok_response, path_int
from server.edge.schemas import (
    DEFAULT_PAGE,
    INTEGER_ID,
    KVP_ADDRESS,
    KVP_SIGNATURE,
    MAX_INTEGER_ID,
    MAX_PAGE,
    PAGE_LIMIT,
    obj,
    string,
)
from server.realtime.hub import ChannelRule
from server.services import dao as service

routes = web.RouteTableDef()

CREATE_SCHEMA = obj({
    "title": string(1, 200), "description": string(1, 5000), "deadline": string(1, 64),
    "duration_seconds": {"type": "integer", "minimum": 60, "maximum": 365 * 86400},
}, required=("title", "description"))
_VOTE_FIELDS = {
    "voter": KVP_ADDRESS,
    "choice": {"type": "string", "enum": list(service.CHOICES)},
    "signature": KVP_SIGNATURE,
}
VOTE_BODY_SCHEMA = obj(_VOTE_FIELDS, required=("voter", "choice", "signature"))
VOTE_SCHEMA = obj({"proposal_id": INTEGER_ID, **_VOTE_FIELDS},
                  required=("proposal_id", "voter", "choice", "signature"))
LIST_QUERY = obj({"status": {"enum": [service.OPEN, service.CLOSED]}, "before_id": INTEGER_ID, "limit": PAGE_LIMIT})
PROPOSAL_PATH = {"proposal_id": INTEGER_ID}
GET_SCHEMA = obj({"proposal_id": INTEGER_ID, "votes": {"type": "boolean"}}, required=("proposal_id",))


async def create(app: web.Application, user_id: uuid.UUID, payload: dict) -> dict[str, Any]:
    """Open a proposal (the caller needs a registered wallet)."""
    async with app[POOL].acquire() as conn:
        return (await service.create_proposal(conn, user_id, payload)).to_public()


async def vote(app: web.Application, user_id: uuid.UUID, payload: dict) -> dict[str, Any]:
    """Cast a signed vote; the tally is announced on `dao:{proposal_id}` once it commits."""
    async with app[POOL].acquire() as conn:
        return await service.cast_vote(conn, user_id, payload)


async def get(app: web.Application, proposal_id: int, with_votes: bool = False) -> dict[str, Any]:
    """A proposal with its tally (closed first when past its deadline), optionally with every signed vote."""
    async with app[POOL].acquire() as conn:
        return await service.proposal_view(conn, proposal_id, with_votes)


class DaoCommands:
    """The DAO's commands and live tallies on /chain (anyone may watch a proposal)."""

    app: web.Application
    channels = (ChannelRule(service.PROPOSAL_CHANNEL),)
    events = (service.TALLY_CHANGED, service.PROPOSAL_CLOSED)

    @command(CREATE_SCHEMA)
    async def on_create_proposal(self, ctx: Ctx, payload: dict) -> dict:
        """Open a DAO proposal (the caller needs a registered wallet); acked with the proposal."""
        return await create(self.app, ctx.user_id, payload)

    @command(VOTE_SCHEMA)
    async def on_cast_vote(self, ctx: Ctx, payload: dict) -> dict:
        """Cast a vote signed by the caller's wallet key; acked with the vote and the new tally."""
        return await vote(self.app, ctx.user_id, payload)

    @command(GET_SCHEMA, user=False)
    async def on_get_proposal(self, ctx: Ctx, payload: dict) -> dict:
        """A proposal with its tally (and result once closed); `votes: true` adds the signed votes."""
        return await get(self.app, payload["proposal_id"], payload.get("votes", False))


def _proposal_id(request: web.Request) -> int:
    return path_int(request, "proposal_id", "no such proposal")


@routes.get("/api/v1/proposals")
@endpoint(query=LIST_QUERY)
async def handle_list(request: web.Request) -> web.Response:
    """Proposals newest first (`status=Open|Closed`, `before_id`, `limit` up to 100, default 20)."""
    status = request.query.get("status") or None
    if status not in (None, service.OPEN, service.CLOSED):
        raise InvalidPayload("'status' must be Open or Closed", field="status")
    before = int_query(request, "before_id", minimum=1, maximum=MAX_INTEGER_ID)
    limit = int_query(request, "limit", minimum=1, maximum=MAX_PAGE) or DEFAULT_PAGE
    async with request.app[POOL].acquire() as conn:
        proposals = await service.list_proposals(conn, status, before, limit)
    next_before = proposals[-1].id if len(proposals) == limit and proposals[-1].id > 1 else None
    return ok_response({"proposals": [p.to_public() for p in proposals], "next_before_id": next_before})


@routes.post("/api/v1/proposals")
@endpoint(body=CREATE_SCHEMA, auth="user")
async def handle_create(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Open a proposal (the REST twin of `create_proposal`)."""
    return ok_response(await create(request.app, identity.user_id, body), status=201)


@routes.get("/api/v1/proposals/{proposal_id}")
@endpoint(path=PROPOSAL_PATH, query=obj({"votes": {"type": "boolean"}}))
async def handle_get(request: web.Request) -> web.Response:
    """A proposal with its tally; `?votes=true` adds every signed vote."""
    with_votes = request.query.get("votes", "").lower() in ("1", "true")
    return ok_response(await get(request.app, _proposal_id(request), with_votes))


@routes.post("/api/v1/proposals/{proposal_id}/votes")
@endpoint(body=VOTE_BODY_SCHEMA, auth="user", path=PROPOSAL_PATH)
async def handle_vote(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Cast a signed vote (the REST twin of `cast_vote`)."""
    payload = {**body, "proposal_id": _proposal_id(request)}
    return ok_response(await vote(request.app, identity.user_id, payload), status=201)


@routes.post("/api/v1/admin/proposals/{proposal_id}/close")
@endpoint(auth="admin", path=PROPOSAL_PATH)
async def handle_close(request: web.Request, identity: Identity) -> web.Response:
    """Close a proposal now, before or after its deadline; announces `proposal_closed`."""
    async with request.app[POOL].acquire() as conn:
        proposal = await service.close_proposal(conn, _proposal_id(request))
    return ok_response(proposal.to_public())
