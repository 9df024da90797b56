"""User mining's /chain commands and REST routes (server/services/mining.py): device type, sessions,
Node shares, Mobile heartbeats, and the caller's own mining (rewards, totals, session).

The /chain namespace is the chain's: handlers/__init__.py composes it from ChainCommands
(handlers/chain.py), DaoCommands (handlers/dao.py) and MiningCommands (here). Everything here is the
caller's own: there is no way to read another user's session or rewards through these commands.
"""

from __future__ import annotations

from aiohttp import web

from db.mining import DEVICE_TYPES
from db.pool import POOL
from server.core.identity import Identity
from server.core.settings import SETTINGS
from server.edge.namespace import Ctx, command
from server.edge.rest import endpoint, int_query, ok_response
from server.edge.schemas import DEFAULT_PAGE, MAX_INTEGER_ID, MAX_PAGE, PAGE_LIMIT, obj, string
from server.realtime.hub import USER_CHANNEL, ChannelRule, own_user
from server.services import mining as service

routes = web.RouteTableDef()

DEVICE_TYPE = {"type": "string", "enum": list(DEVICE_TYPES)}
CHALLENGE = string(64, 64, pattern="^[0-9a-fA-F]{64}$")
NONCE = {"type": "integer", "minimum": 0, "maximum": service.MAX_NONCE}
BEFORE = {"type": "integer", "minimum": 1, "maximum": MAX_INTEGER_ID}
DEVICE_SCHEMA = obj({"device_type": DEVICE_TYPE}, required=("device_type",))
START_SCHEMA = obj({"device_type": DEVICE_TYPE})
SHARE_SCHEMA = obj({"challenge": CHALLENGE, "nonce": NONCE}, required=("challenge", "nonce"))
STATUS_SCHEMA = obj({"before": BEFORE, "limit": PAGE_LIMIT})


def optional(schema: dict) -> dict:
    """A socket payload schema that also accepts no payload at all (null)."""
    return {**schema, "type": ["object", "null"]}


def _config(app: web.Application) -> service.MiningConfig:
    return service.MiningConfig.from_settings(app[SETTINGS])


class MiningCommands:
    """User mining on /chain; the miner's own feed is their `user:{user_id}` channel."""

    app: web.Application
    channels = (ChannelRule(USER_CHANNEL, own_user),)
    events = (service.MINING_STARTED, service.MINING_STOPPED, service.MINING_REWARD_RECEIVED)

    @command(DEVICE_SCHEMA)
    async def on_set_mining_device(self, ctx: Ctx, payload: dict) -> dict:
        """Set the caller's device type (Mobile or Node)."""
        async with self.app[POOL].acquire() as conn:
            return await service.set_device(conn, ctx.user_id, payload["device_type"])

    @command(optional(START_SCHEMA))
    async def on_start_mining(self, ctx: Ctx, payload: dict | None) -> dict:
        """Open the caller's mining session; a Node is acked with its challenge and difficulty."""
        async with self.app[POOL].acquire() as conn:
            return await service.start(conn, ctx.user_id, (payload or {}).get("device_type"), _config(self.app))

    @command(optional(obj({})))
    async def on_stop_mining(self, ctx: Ctx, payload: dict) -> dict:
        """Close the caller's mining session."""
        async with self.app[POOL].acquire() as conn:
            return await service.stop(conn, ctx.user_id, _config(self.app))

    @command(SHARE_SCHEMA)
    async def on_submit_share(self, ctx: Ctx, payload: dict) -> dict:
        """Submit a Node proof-of-work share for the session's current challenge."""
        async with self.app[POOL].acquire() as conn:
            return await service.submit_share(conn, ctx.user_id, payload["challenge"], payload["nonce"],
                                              _config(self.app))

    @command(optional(obj({})))
    async def on_mining_heartbeat(self, ctx: Ctx, payload: dict) -> dict:
        """Keep the caller's session alive (a Mobile one is credited its seconds)."""
        async with self.app[POOL].acquire() as conn:
            return await service.heartbeat(conn, ctx.user_id, _config(self.app))

    @command(optional(STATUS_SCHEMA))
    async def on_get_my_mining(self, ctx: Ctx, payload: dict | None) -> dict:
        """The caller's device type, session, totals and a page of rewards."""
        payload = payload or {}
        async with self.app[POOL].acquire() as conn:
            return await service.my_mining(conn, ctx.user_id, _config(self.app), payload.get("before"),
                                           payload.get("limit") or DEFAULT_PAGE)


# --- REST -------------------------------------------------------------------------------------

@routes.put("/api/v1/me/mining/device")
@endpoint(body=DEVICE_SCHEMA, auth="user")
async def handle_set_device(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Set the caller's device type."""
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.set_device(conn, identity.user_id, body["device_type"]))


@routes.post("/api/v1/me/mining/start")
@endpoint(body=START_SCHEMA, auth="user")
async def handle_start(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Open the caller's mining session."""
    async with request.app[POOL].acquire() as conn:
        data = await service.start(conn, identity.user_id, body.get("device_type"), _config(request.app))
    return ok_response(data, status=201)


@routes.post("/api/v1/me/mining/stop")
@endpoint(auth="user")
async def handle_stop(request: web.Request, identity: Identity) -> web.Response:
    """Close the caller's mining session."""
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.stop(conn, identity.user_id, _config(request.app)))


@routes.post("/api/v1/me/mining/shares")
@endpoint(body=SHARE_SCHEMA, auth="user")
async def handle_share(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Submit a Node share."""
    async with request.app[POOL].acquire() as conn:
        data = await service.submit_share(conn, identity.user_id, body["challenge"], body["nonce"],
                                          _config(request.app))
    return ok_response(data, status=201)


@routes.post("/api/v1/me/mining/heartbeat")
@endpoint(auth="user")
async def handle_heartbeat(request: web.Request, identity: Identity) -> web.Response:
    """Keep the caller's session alive."""
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.heartbeat(conn, identity.user_id, _config(request.app)))


@routes.get("/api/v1/me/mining")
@endpoint(auth="user", query=STATUS_SCHEMA)
async def handle_my_mining(request: web.Request, identity: Identity) -> web.Response:
    """The caller's mining: device type, session, totals, rewards newest first (cursor `before`)."""
    before = int_query(request, "before", minimum=1)
    limit = int_query(request, "limit", minimum=1, maximum=MAX_PAGE) or DEFAULT_PAGE
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.my_mining(conn, identity.user_id, _config(request.app), before, limit))
