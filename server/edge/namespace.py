"""Socket.IO namespaces: authenticated connect, schema-validated commands, one error path."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Awaitable, Callable

import socketio
import structlog
from aiohttp import web

from db.pool import POOL
from server.core import jsonutil
from server.core.errors import (
    Conflict,
    ErrorCode,
    HubError,
    InvalidPayload,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    error_from_exception,
)
from server.core.identity import Identity
from server.core.metrics import METRICS
from server.core.protocol import error_envelope, ok
from server.core.settings import SETTINGS
from server.edge.schemas import compile_schema, obj, string, validate
from server.realtime.history import EPOCH_PATTERN
from server.realtime.hub import REALTIME, ChannelRule, room_name
from server.realtime.ratelimit import TokenBucket
from server.services.auth import AUTH

log = structlog.get_logger(__name__)

CONNECT_EVENTS = frozenset({"connect", "disconnect"})


@dataclasses.dataclass(frozen=True, slots=True)
class CommandSpec:
    """What the dispatcher checks before a command handler runs."""

    validator: Any
    user_required: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Ctx:
    """Who sent a command, on which connection."""

    sid: str
    identity: Identity | None

    @property
    def user_id(self):
        """The signed-in user's id (commands that require a user always have one)."""
        assert self.identity is not None
        return self.identity.user_id


def command(schema: dict[str, Any] | None = None, *, user: bool = True) -> Callable:
    """Mark an `on_<event>` method as a client command with its payload schema.

    The handler is `async def on_x(self, ctx, payload) -> data`; it runs only after the payload
    matched the schema and, when `user` is true, the connection is signed in.
    """
    validator = compile_schema(schema if schema is not None else {"type": ["object", "null"]})

    def decorate(handler: Callable[..., Awaitable[Any]]):
        handler.__hub_command__ = CommandSpec(validator=validator, user_required=user)  # type: ignore[attr-defined]
        return handler

    return decorate


def refusal(error: HubError) -> socketio.exceptions.ConnectionRefusedError:
    """A connect refusal the client sees as `connect_error` {message, data: {code, message}}."""
    # Socket.IO's convention: the first argument becomes err.message, the second err.data.
    return socketio.exceptions.ConnectionRefusedError(error.message, error.to_error())


CATCH_UP_LIMIT = 100
SUBSCRIBE_SCHEMA = obj({"channel": string(max_length=200), "since": {"type": ["string", "null"], "maxLength": 41},
                        "epoch": {"type": ["string", "null"], "pattern": f"^{EPOCH_PATTERN}$"},
                        "since_height": {"type": "integer", "minimum": 0}},
                       required=("channel",))
UNSUBSCRIBE_SCHEMA = obj({"channel": string(max_length=200)}, required=("channel",))


def _user_id(ctx: Ctx) -> str | None:
    return str(ctx.identity.user_id) if ctx.identity else None


class HubNamespace(socketio.AsyncNamespace):
    """Base of every namespace. Subclasses set `name`, `allow_anonymous` and `channels`, and add commands."""

    name: str = "/"
    allow_anonymous: bool = True
    channels: tuple[ChannelRule, ...] = ()

    def __init__(self, app: web.Application) -> None:
        super().__init__(self.name)
        self.app = app

    async def on_connect(self, sid: str, environ: dict, auth: Any = None) -> None:
        """Authenticate from the `auth` payload ({"token": ...}); refuse bad tokens clearly."""
        token = auth.get("token") if isinstance(auth, dict) else None
        identity: Identity | None = None
        if token is not None or not self.allow_anonymous:
            try:
                identity = await self.app[AUTH].authenticate(self.app[POOL], token)
            except HubError as exc:
                raise refusal(exc) from None
            except Exception as exc:  # noqa: BLE001 - a broken backend must refuse, not crash
                log.warning("connect_failed", namespace=self.name, error=type(exc).__name__)
                raise refusal(error_from_exception(exc)) from None
        if identity is not None:
            try:
                self.app[REALTIME].add_user_connection(str(identity.user_id), self.name)
            except HubError as exc:
                raise refusal(exc) from None
        settings = self.app[SETTINGS]
        await self.save_session(sid, {
            "identity": identity, "token": token, "channels": set(),
            "bucket": TokenBucket(settings.event_rate, settings.event_burst)})
        self.app[METRICS].connections.labels(self.name).inc()
        log.info("socket_connected", namespace=self.name, sid=sid,
                 user_id=str(identity.user_id) if identity else None)

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        """Leave presence everywhere and count the disconnect."""
        session = await self.get_session(sid)
        identity: Identity | None = session.get("identity")
        realtime = self.app[REALTIME]
        user_id = str(identity.user_id) if identity else None
        for channel in session.get("presence", ()):
            await realtime.leave_presence(self.name, channel, sid, user_id)
        if user_id is not None:
            realtime.remove_user_connection(user_id, self.name)
        self.app[METRICS].connections.labels(self.name).dec()
        log.info("socket_disconnected", namespace=self.name, sid=sid, reason=str(reason))

    async def trigger_event(self, event: str, *args: Any) -> Any:
        """Dispatch a client event: size check, auth, validation, handler, envelope."""
        if event in CONNECT_EVENTS:
            return await super().trigger_event(event, *args)
        sid = args[0]
        payload = args[1] if len(args) > 1 else None
        started = time.perf_counter()
        outcome = "ok"
        structlog.contextvars.bind_contextvars(sid=sid)
        try:
            return ok(await self._dispatch(event, sid, payload, len(args) > 2))
        except Exception as exc:  # noqa: BLE001 - every failure becomes an envelope
            error = error_from_exception(exc)
            outcome = error.code.value
            if error.code is ErrorCode.INTERNAL_ERROR:
                log.exception("command_failed", namespace=self.name, event=event)
            return error_envelope(error)
        finally:
            metrics = self.app[METRICS]
            known = outcome != "not_found" or hasattr(self, f"on_{event}")
            label = event if known else "unknown"
            metrics.events_in.labels(self.name, label, outcome).inc()
            metrics.handler_seconds.labels(self.name, label).observe(time.perf_counter() - started)
            structlog.contextvars.unbind_contextvars("sid")

    async def _dispatch(self, event: str, sid: str, payload: Any, extra_args: bool) -> Any:
        session = await self.get_session(sid)
        # Before anything else, so floods of unknown or invalid events are limited too.
        retry_after = session["bucket"].try_take()
        if retry_after:
            self.app[METRICS].rate_limited.labels(self.name).inc()
            raise RateLimited("too many events, slow down", retry_after=retry_after)
        handler = getattr(self, f"on_{event}", None)
        spec: CommandSpec | None = getattr(handler, "__hub_command__", None)
        if handler is None or spec is None:
            raise NotFound(f"unknown event '{event}' on {self.name}")
        limit = self.app[SETTINGS].max_payload_bytes
        if payload is not None and len(jsonutil.dumpb(payload)) > limit:
            raise PayloadTooLarge(f"the payload exceeds {limit} bytes")
        identity: Identity | None = session.get("identity")
        if spec.user_required:
            if identity is None:
                raise Unauthorized("sign in to use this event")
            # Re-check the session (cached briefly) so a logout stops an open socket too.
            identity = await self.app[AUTH].authenticate(self.app[POOL], session.get("token"))
        if extra_args:
            raise NotFound(f"'{event}' takes one payload argument")
        payload = validate(spec.validator, payload)
        return await handler(Ctx(sid=sid, identity=identity), payload)

    @command(SUBSCRIBE_SCHEMA, user=False)
    async def on_subscribe(self, ctx: Ctx, payload: dict) -> dict:
        """Join a channel: room first, then the history after `since`; live events follow."""
        channel = payload["channel"]
        realtime = self.app[REALTIME]
        rule, access = await realtime.authorise(self.app, ctx.identity, channel, self.name)
        since_height = payload.get("since_height")
        if since_height is not None and rule.catch_up is None:
            raise InvalidPayload(f"'{channel}' has no catch-up by height", field="since_height")
        session = await self.get_session(ctx.sid)
        subscribed: set[str] = session["channels"]
        if channel in subscribed:
            return await self._subscribe_ack(ctx, rule, access, payload, session)
        if len(subscribed) >= realtime.limits.max_channels_per_connection:
            raise Conflict(f"at most {realtime.limits.max_channels_per_connection} channels per "
                           "connection; unsubscribe from one first", field="channel")
        subscribed.add(channel)
        await self.enter_room(ctx.sid, room_name(channel))
        try:
            return await self._subscribe_ack(ctx, rule, access, payload, session)
        except BaseException:
            # A subscribe that failed (Redis unavailable...) leaves no membership behind: the
            # client was told it is not subscribed and must not get live events with holes.
            subscribed.discard(channel)
            await self.leave_room(ctx.sid, room_name(channel))
            raise

    async def _subscribe_ack(self, ctx: Ctx, rule: ChannelRule, access: Any, payload: dict, session: dict) -> dict:
        channel = payload["channel"]
        realtime = self.app[REALTIME]
        replay = await realtime.replay(channel, payload.get("since"), payload.get("epoch"))
        presence = None
        if rule.presence:
            watched: set[str] = session.setdefault("presence", set())
            if channel not in watched:
                presence = await realtime.join_presence(self.name, channel, ctx.sid, _user_id(ctx))
                watched.add(channel)
            else:
                presence = await realtime.presence_count(channel)
        ack = {"channel": channel, "latest_id": replay.latest_id, "latest_offset": replay.latest_offset,
               "epoch": replay.epoch, "history_gap": replay.gap,
               "events": [event.to_wire() for event in replay.events], "has_more": replay.has_more,
               "presence": presence}
        since_height = payload.get("since_height")
        if since_height is not None:
            # Read after joining the room, like the replay: a record may come twice, never not at all.
            ack["catch_up"] = await rule.catch_up(access, since_height, CATCH_UP_LIMIT)
        return ack

    @command(UNSUBSCRIBE_SCHEMA, user=False)
    async def on_unsubscribe(self, ctx: Ctx, payload: dict) -> dict:
        """Leave a channel; unknown or unjoined channels are not an error."""
        channel = payload["channel"]
        session = await self.get_session(ctx.sid)
        session["channels"].discard(channel)
        await self.leave_room(ctx.sid, room_name(channel))
        if channel in session.get("presence", ()):
            session["presence"].discard(channel)
            await self.app[REALTIME].leave_presence(self.name, channel, ctx.sid, _user_id(ctx))
        return {"channel": channel}

    @command(user=False)
    async def on_whoami(self, ctx: Ctx, payload: Any) -> dict:
        """The connection's identity (null when anonymous)."""
        if ctx.identity is None:
            return {"user_id": None, "is_admin": False}
        return {"user_id": str(ctx.identity.user_id), "is_admin": ctx.identity.is_admin}
