"""Namespace /games and the games' REST routes: registered games, play sessions, rewards, leaderboards,
and the reward pool allocation lists (a user's own, a pool's for admins).

Two kinds of callers: players sign in with their user token (`auth: {token}`) and start, keep
alive and end their own sessions; a game server connects with its game's token
(`auth: {game_token}`, REST `Authorization: Game <token>`) and reports rewards for its game's
sessions. Only game servers report rewards. Anyone may watch `game:{game_id}` and
`session:{session_id}` (spectating is public; both count watchers).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import structlog
from aiohttp import web

from db.pool import POOL
from server.core.errors import Forbidden, HubError, InvalidPayload, RateLimited, Unauthorized
from server.core.identity import Identity
from server.core.money import AMOUNT_QUANTUM
from server.core.protocol import error_envelope, ok
from server.core.settings import SETTINGS
from server.edge.namespace import Ctx, HubNamespace, command, refusal
from server.edge.rest import current_identity, endpoint, int_query, ok_response, path_int, read_json
from server.edge.schemas import (
    COUNT,
    DEFAULT_PAGE,
    INTEGER_ID,
    KVP_AMOUNT,
    MAX_INTEGER_ID,
    MAX_PAGE,
    PAGE_LIMIT,
    compile_schema,
    obj,
    string,
    validate,
)
from server.realtime.hub import USER_CHANNEL, ChannelRule, own_user
from server.realtime.ratelimit import TokenBucket
from server.services import games as service
from server.services.auth import AUTH
from server.services.games import GAMES

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

AMOUNT = {"oneOf": [KVP_AMOUNT, {"type": "integer", "minimum": 0, "maximum": 999_999_999_999}]}
SHARE = {"oneOf": [{"type": "string", "pattern": "^(0(\\.[0-9]{1,8})?|1(\\.0{1,8})?)$"},
                   {"type": "number", "minimum": 0, "maximum": 1}]}
REWARD_TYPE = string(1, 50, pattern="^[A-Za-z0-9_.:-]+$")
WALLET = string(4, 100, pattern="^[A-Za-z0-9_.:-]+$")
POLICY = obj({"max_reward_per_event": AMOUNT, "max_reward_per_minute": AMOUNT, "max_reward_per_session": AMOUNT})
REWARD_TYPES = {"type": ["array", "null"], "items": REWARD_TYPE, "maxItems": 50, "uniqueItems": True}
CREATE_GAME_SCHEMA = obj({"name": string(1, 100), "developer_wallet": WALLET, "revenue_share": SHARE,
                          "policy": POLICY, "reward_types": REWARD_TYPES},
                         required=("name", "developer_wallet", "revenue_share"))
UPDATE_GAME_SCHEMA = obj({"name": string(1, 100), "developer_wallet": WALLET, "revenue_share": SHARE,
                          "policy": POLICY, "reward_types": REWARD_TYPES,
                          "status": {"enum": list(service.GAME_STATUSES)}})
START_SCHEMA = obj({"game_id": INTEGER_ID}, required=("game_id",))
SESSION_SCHEMA = obj({"session_id": INTEGER_ID}, required=("session_id",))
REWARD_FIELDS = {"seq": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}, "reward_type": REWARD_TYPE,
                 "value": AMOUNT}
REPORT_SCHEMA = obj({"session_id": INTEGER_ID, **REWARD_FIELDS},
                    required=("session_id", "seq", "reward_type", "value"))
MAX_REPORTS_PER_CALL = 200
REPORTS_SCHEMA = obj({"rewards": {"type": "array", "minItems": 1, "maxItems": MAX_REPORTS_PER_CALL,
                                  "items": REPORT_SCHEMA}}, required=("rewards",))
REPORTS_VALIDATOR = compile_schema(REPORTS_SCHEMA)
REST_REPORT_SCHEMA = obj(REWARD_FIELDS, required=("seq", "reward_type", "value"))
REST_REPORT_VALIDATOR = compile_schema(REST_REPORT_SCHEMA)
GAME_PATH = {"game_id": INTEGER_ID}
SESSION_PATH = {"session_id": INTEGER_ID}
QUERY_COUNT = {"type": "integer", "minimum": 0, "maximum": MAX_INTEGER_ID}
QUERY_LIMIT = {"type": "integer", "minimum": 0, "maximum": MAX_PAGE}  # 0 reads as 1
GAMES_QUERY = obj({"status": {"enum": list(service.GAME_STATUSES)}, "after": QUERY_COUNT, "limit": QUERY_LIMIT})
LEADERBOARD_QUERY = obj({"period": {"enum": list(service.PERIODS)}, "limit": QUERY_LIMIT})
ALLOCATIONS_QUERY = obj({"before": INTEGER_ID, "limit": PAGE_LIMIT})
MY_SESSIONS_QUERY = obj({"game_id": INTEGER_ID, "before": INTEGER_ID, "limit": PAGE_LIMIT})
POOL_PATH = {"pool_id": COUNT}
GAME_CALLER_DOC = "\n\nCalled by the session's player (`Authorization: Bearer <token>`) or its game server " \
                  "(`Authorization: Game <game token>`)."


class GamesNamespace(HubNamespace):
    """Earn-to-play sessions, rewards and leaderboards (anyone may watch)."""

    name = "/games"
    allow_anonymous = True
    channels = (
        ChannelRule(service.GAME_CHANNEL, presence=True),
        ChannelRule(service.SESSION_CHANNEL, presence=True),
        ChannelRule(USER_CHANNEL, own_user),
    )
    events = (service.SESSION_STARTED, service.SESSION_ENDED, service.REWARD_EARNED, service.LEADERBOARD_CHANGED)

    async def on_connect(self, sid: str, environ: dict, auth: Any = None) -> None:
        """Players connect with `{token}`; a game server with `{game_token}` (never both)."""
        game_token = auth.get("game_token") if isinstance(auth, dict) else None
        if game_token is None:
            return await super().on_connect(sid, environ, auth)
        if auth.get("token") is not None:
            raise refusal(Unauthorized("connect either as a player (token) or as a game server (game_token)"))
        try:
            caller = await self.app[GAMES].tokens.authenticate(self.app[POOL], game_token)
        except HubError as exc:
            raise refusal(exc) from None
        await super().on_connect(sid, environ, None)
        session = await self.get_session(sid)
        settings = self.app[SETTINGS]
        session["game_token"] = game_token
        # One game server speaks for many players, so it gets a larger budget than a browser.
        session["bucket"] = TokenBucket(settings.game_server_event_rate, settings.game_server_event_burst)
        log.info("game_server_connected", sid=sid, game_id=caller.game_id)

    async def _caller(self, ctx: Ctx) -> service.Caller:
        """The game server or the (re-checked) player behind a connection."""
        session = await self.get_session(ctx.sid)
        if session.get("game_token") is not None:
            return await self.app[GAMES].tokens.authenticate(self.app[POOL], session["game_token"])
        if ctx.identity is None:
            raise Unauthorized("sign in as the player, or connect as the game server")
        # Commands open to game servers skip the dispatcher's session check; do it for players.
        return await self.app[AUTH].authenticate(self.app[POOL], session.get("token"))

    async def _game_server(self, ctx: Ctx) -> service.GameCaller:
        caller = await self._caller(ctx)
        if not isinstance(caller, service.GameCaller):
            raise Forbidden("only the game's server reports rewards (connect with its game_token)")
        return caller

    @command(START_SCHEMA)
    async def on_start_session(self, ctx: Ctx, payload: dict) -> dict:
        """Start the caller's session of a game (or get the running one back, `resumed: true`)."""
        return await service.start_session(self.app, ctx.user_id, payload["game_id"])

    @command(REPORT_SCHEMA, user=False)
    async def on_report_reward(self, ctx: Ctx, payload: dict) -> dict:
        """A game server reports a reward; acked with the session's running total (replays: same ack)."""
        caller = await self._game_server(ctx)
        return await service.report_reward(self.app, caller, payload["session_id"], payload)

    @command(REPORTS_SCHEMA, user=False)
    async def on_report_rewards(self, ctx: Ctx, payload: dict) -> dict:
        """A game server reports many rewards in one call; acked with each report's own result, in order."""
        reports = payload["rewards"]
        caller = await self._game_server(ctx)
        bucket: TokenBucket = (await self.get_session(ctx.sid))["bucket"]
        # The dispatcher took one event from the bucket; a batch spends one per report.
        if len(reports) > bucket.burst:
            raise InvalidPayload(f"at most {bucket.burst} reports per call on this server", field="rewards")
        retry_after = bucket.try_take(len(reports) - 1) if len(reports) > 1 else 0.0
        if retry_after:
            raise RateLimited("too many reports, slow down", retry_after=retry_after)
        return await _each_result(self.app, caller, reports)

    @command(SESSION_SCHEMA, user=False)
    async def on_heartbeat_session(self, ctx: Ctx, payload: dict) -> dict:
        """Keep a session from timing out (its player or its game server)."""
        return await service.heartbeat(self.app, await self._caller(ctx), payload["session_id"])

    @command(SESSION_SCHEMA, user=False)
    async def on_end_session(self, ctx: Ctx, payload: dict) -> dict:
        """End a session (its player or its game server)."""
        return await service.end_session(self.app, await self._caller(ctx), payload["session_id"])


# --- REST: games -------------------------------------------------------------------------------

# Not edge.rest.int_query, which answers differently: this refuses signs, spaces and non-ASCII
# digits too, and its one error message names the whole range ("between 0 and ...").
def _int_param(raw: str | None, name: str, *, default: int, maximum: int = MAX_INTEGER_ID) -> int:
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or int(raw) > maximum:
        raise InvalidPayload(f"'{name}' must be an integer between 0 and {maximum}", field=name)
    return int(raw)


def _path_id(request: web.Request, name: str, what: str) -> int:
    return path_int(request, name, f"no such {what}")


def _share(raw: Any) -> Decimal:
    share = Decimal(raw if isinstance(raw, str) else str(raw))
    if not 0 <= share <= 1 or share != share.quantize(AMOUNT_QUANTUM):
        raise InvalidPayload("'revenue_share' is a fraction between 0 and 1 with at most 8 decimals",
                             field="revenue_share")
    return share


def _policy(body: dict) -> dict[str, Decimal]:
    return {name: service.parse_value(raw, name) for name, raw in (body.get("policy") or {}).items()}


@routes.post("/api/v1/games")
@endpoint(body=CREATE_GAME_SCHEMA, auth="user")
async def handle_create_game(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Register a game; its token is in this answer only. A developer's game waits for an admin."""
    policy = _policy(body)
    async with request.app[POOL].acquire() as conn:
        game, token = await service.register_game(
            conn, identity, name=body["name"], developer_wallet=body["developer_wallet"],
            revenue_share=_share(body["revenue_share"]), policy=policy, reward_types=body.get("reward_types"))
    return ok_response({"game": game.to_public(), "game_token": token}, status=201)


@routes.get("/api/v1/games")
@endpoint(query=GAMES_QUERY)
async def handle_list_games(request: web.Request) -> web.Response:
    """Games by id (`status`, `after` and `limit` up to 100 optional)."""
    status = request.query.get("status") or None
    if status not in (None, *service.GAME_STATUSES):
        raise InvalidPayload("'status' is pending, active or suspended", field="status")
    limit = max(1, _int_param(request.query.get("limit"), "limit", default=20, maximum=MAX_PAGE))
    after = _int_param(request.query.get("after"), "after", default=0)
    async with request.app[POOL].acquire() as conn:
        games = await service.list_games(conn, status, after, limit)
    return ok_response({"games": [game.to_public() for game in games],
                        "next_after": games[-1].game_id if len(games) == limit else None})


@routes.get("/api/v1/games/{game_id}")
@endpoint(path=GAME_PATH)
async def handle_get_game(request: web.Request) -> web.Response:
    """One game with its policy."""
    async with request.app[POOL].acquire() as conn:
        game = await service.get_game(conn, _path_id(request, "game_id", "game"))
    return ok_response(game.to_public())


@routes.patch("/api/v1/games/{game_id}")
@endpoint(body=UPDATE_GAME_SCHEMA, auth="admin", path=GAME_PATH)
async def handle_update_game(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Change a game (admins: activate, suspend, policy, revenue share)."""
    changes: dict[str, Any] = {name: body[name] for name in ("name", "developer_wallet", "status", "reward_types")
                               if name in body}
    if "revenue_share" in body:
        changes["revenue_share"] = _share(body["revenue_share"])
    changes.update(_policy(body))
    async with request.app[POOL].acquire() as conn:
        game = await service.update_game(conn, _path_id(request, "game_id", "game"), changes)
    return ok_response(game.to_public())


@routes.post("/api/v1/games/{game_id}/token")
@endpoint(auth="user", path=GAME_PATH)
async def handle_rotate_token(request: web.Request, identity: Identity) -> web.Response:
    """Issue a new game token (its owner or an admin); the old one stops working."""
    game_id = _path_id(request, "game_id", "game")
    token = await service.rotate_token(request.app, identity, game_id)
    return ok_response({"game_id": game_id, "game_token": token}, status=201)


@routes.get("/api/v1/games/{game_id}/leaderboard")
@endpoint(path=GAME_PATH, query=LEADERBOARD_QUERY)
async def handle_leaderboard(request: web.Request) -> web.Response:
    """Top players by rewards over `period` (hour, day, week, all; default the live one)."""
    period = request.query.get("period") or request.app[SETTINGS].game_leaderboard_period
    if period not in service.PERIODS:
        raise InvalidPayload("'period' is hour, day, week or all", field="period")
    limit = max(1, _int_param(request.query.get("limit"), "limit", default=10, maximum=MAX_PAGE))
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.game_leaderboard(conn, _path_id(request, "game_id", "game"), period, limit))


# --- REST: sessions ----------------------------------------------------------------------------

async def rest_caller(request: web.Request) -> service.Caller:
    """`Authorization: Game <game token>` for game servers, `Bearer <token>` for players."""
    header = request.headers.get("Authorization", "")
    if header[:5].lower() == "game ":
        return await request.app[GAMES].tokens.authenticate(request.app[POOL], header[5:].strip())
    return await current_identity(request)


@routes.post("/api/v1/game-sessions")
@endpoint(body=START_SCHEMA, auth="user")
async def handle_start_session(request: web.Request, identity: Identity, body: dict) -> web.Response:
    """Start the caller's session (201), or return the running one (200, `resumed: true`)."""
    session = await service.start_session(request.app, identity.user_id, body["game_id"])
    return ok_response(session, status=200 if session["resumed"] else 201)


@routes.get("/api/v1/game-sessions/{session_id}")
@endpoint(path=SESSION_PATH, query=obj({"rewards": QUERY_LIMIT}))
async def handle_get_session(request: web.Request) -> web.Response:
    """A session with its latest rewards (public, as its channel is)."""
    session_id = _path_id(request, "session_id", "session")
    limit = max(1, _int_param(request.query.get("rewards"), "rewards", default=20, maximum=MAX_PAGE))
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.session_with_rewards(conn, session_id, limit))


@routes.get("/api/v1/me/game-sessions")
@endpoint(auth="user", query=MY_SESSIONS_QUERY)
async def handle_my_sessions(request: web.Request, identity: Identity) -> web.Response:
    """The caller's own sessions, newest first (?game_id, ?before, ?limit), and their earnings per game."""
    game_id = int_query(request, "game_id", minimum=1)
    before = int_query(request, "before", minimum=1)
    limit = int_query(request, "limit", minimum=1, maximum=MAX_PAGE) or DEFAULT_PAGE
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.player_sessions(conn, identity.user_id, game_id, before, limit))


@routes.post("/api/v1/game-sessions/{session_id}/rewards")
@endpoint(path=SESSION_PATH, json_body=REST_REPORT_SCHEMA)
async def handle_report_reward(request: web.Request) -> web.Response:
    """A game server reports a reward (the REST twin of `report_reward`)."""
    caller = await _rest_game_server(request)
    # Validated after the caller is known, so a stranger learns nothing from validation errors.
    body = validate(REST_REPORT_VALIDATOR, await read_json(request))
    session_id = _path_id(request, "session_id", "session")
    return ok_response(await service.report_reward(request.app, caller, session_id, body))


@routes.post("/api/v1/game-rewards")
@endpoint(json_body=REPORTS_SCHEMA)
async def handle_report_rewards(request: web.Request) -> web.Response:
    """A game server reports many rewards in one request (the REST twin of `report_rewards`)."""
    caller = await _rest_game_server(request)
    body = validate(REPORTS_VALIDATOR, await read_json(request))
    return ok_response(await _each_result(request.app, caller, body["rewards"]))


async def _rest_game_server(request: web.Request) -> service.GameCaller:
    caller = await rest_caller(request)
    if not isinstance(caller, service.GameCaller):
        raise Forbidden("only the game's server reports rewards (Authorization: Game <token>)")
    return caller


async def _each_result(app: web.Application, caller: service.GameCaller, reports: list[dict]) -> dict[str, Any]:
    """A batch's outcomes as one envelope per report, in order: each succeeds or fails on its own."""
    results = await service.report_rewards(app, caller, reports)
    return {"results": [error_envelope(r) if isinstance(r, HubError) else ok(r) for r in results]}


@routes.post("/api/v1/game-sessions/{session_id}/heartbeat")
@endpoint(path=SESSION_PATH)
async def handle_heartbeat(request: web.Request) -> web.Response:
    """Keep a session from timing out (its player or its game server)."""
    caller = await rest_caller(request)
    return ok_response(await service.heartbeat(request.app, caller, _path_id(request, "session_id", "session")))


@routes.post("/api/v1/game-sessions/{session_id}/end")
@endpoint(path=SESSION_PATH)
async def handle_end_session(request: web.Request) -> web.Response:
    """End a session (its player or its game server)."""
    caller = await rest_caller(request)
    return ok_response(await service.end_session(request.app, caller, _path_id(request, "session_id", "session")))



# --- REST: pool allocations --------------------------------------------------------------------

def _page(request: web.Request) -> tuple[int | None, int]:
    return (int_query(request, "before", minimum=1),
            int_query(request, "limit", minimum=1, maximum=MAX_PAGE) or DEFAULT_PAGE)


@routes.get("/api/v1/me/pool-allocations")
@endpoint(auth="user", query=ALLOCATIONS_QUERY)
async def handle_my_allocations(request: web.Request, identity: Identity) -> web.Response:
    """A page of the caller's reward pool allocations, newest first (?before, ?limit; `next` pages on)."""
    before, limit = _page(request)
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.user_allocations(conn, identity.user_id, before, limit))


@routes.get("/api/v1/admin/reward-pools/{pool_id}/allocations")
@endpoint(auth="admin", path=POOL_PATH, query=ALLOCATIONS_QUERY)
async def handle_pool_allocations(request: web.Request, identity: Identity) -> web.Response:
    """A page of a reward pool's allocations, newest first, with the pool (admins; ?before, ?limit)."""
    pool_id = path_int(request, "pool_id", "no such reward pool", minimum=0)
    before, limit = _page(request)
    async with request.app[POOL].acquire() as conn:
        return ok_response(await service.pool_allocations(conn, pool_id, before, limit))
