"""Socket.IO namespaces: authenticated connect, schema-validated commands, one error path."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
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
    Forbidden,
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
from server.core.protocol import RESERVED_EVENTS, error_envelope, ok
from server.core.settings import SETTINGS
from server.edge.schemas import COUNT, compile_schema, obj, string, validate
from server.realtime.engine import SocketServer
from server.realtime.history import EPOCH_PATTERN
from server.realtime.hub import (
    REALTIME,
    SIGNED_OUT_EVENT,
    TOKEN_EXPIRING_EVENT,
    ChannelRule,
    room_name,
    session_room,
)
from server.realtime.ratelimit import TokenBucket
from server.services.auth import AUTH, EXPIRED

log = structlog.get_logger(__name__)

CONNECT_EVENTS = frozenset({"connect", "disconnect"})  # what python-socketio itself triggers


@dataclasses.dataclass(frozen=True, slots=True)
class CommandSpec:
    """What the dispatcher checks before a command handler runs."""

    validator: Any
    user_required: bool
    checks_session: bool = True  # re-check a signed-in socket's session before the handler runs


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


def command(schema: dict[str, Any] | None = None, *, user: bool = True, checks_session: bool = True) -> Callable:
    """Mark an `on_<event>` method as a client command with its payload schema.

    The handler is `async def on_x(self, ctx, payload) -> data`; it runs only after the payload
    matched the schema and, when `user` is true, the connection is signed in. A signed-in
    connection's session is checked again first (a logout elsewhere stops it), unless
    `checks_session` is false (re-authentication, which checks its own new token).
    """
    validator = compile_schema(schema if schema is not None else {"type": ["object", "null"]})

    def decorate(handler: Callable[..., Awaitable[Any]]):
        handler.__hub_command__ = CommandSpec(validator=validator, user_required=user,  # type: ignore[attr-defined]
                                              checks_session=checks_session)
        return handler

    return decorate


def refusal(error: HubError) -> socketio.exceptions.ConnectionRefusedError:
    """A connect refusal the client sees as `connect_error` {message, data: {code, message}}."""
    # Socket.IO's convention: the first argument becomes err.message, the second err.data.
    return socketio.exceptions.ConnectionRefusedError(error.message, error.to_error())


class HubSocketServer(SocketServer):
    """The Socket.IO server whose event dispatch refuses reserved names before any namespace sees them."""

    async def _handle_event_internal(self, server: Any, sid: str, eio_sid: str, data: list, namespace: str,
                                     id: int | None) -> None:
        # python-socketio hands a client's event named "connect" to the same trigger as its own
        # connect, so the name must be refused here, where the two paths still differ. (A name that
        # is not text never gets here: the engine closes the connection on such a packet.)
        if data[0] in RESERVED_EVENTS:
            log.info("reserved_event_refused", namespace=namespace, sid=sid, name=data[0])
            if id is not None:
                error = InvalidPayload(f"'{data[0]}' is a reserved event name", field="event")
                await self._send_ack(eio_sid, namespace, id, error_envelope(error))
            return
        result = await server._trigger_event(data[0], namespace, sid, *data[1:])
        if result is not self.not_handled and id is not None:
            await self._send_ack(eio_sid, namespace, id, result)

    async def _send_ack(self, eio_sid: str, namespace: str, id: int, envelope: Any) -> None:
        # python-socketio walks every ack looking for bytes to send as attachments: a third of the
        # CPU of a subscribe that replays history. An ack here is a JSON envelope (docs/protocol.md),
        # and jsonutil writes any bytes in it as hex text, so there is nothing to walk for.
        packet = self.packet_class(socketio.packet.ACK, namespace=namespace, id=id,
                                   data=[] if envelope is None else [envelope], binary=False)
        await self.eio.send(eio_sid, packet.encode())


CATCH_UP_LIMIT = 100
SUBSCRIBE_SCHEMA = obj({"channel": string(max_length=200), "since": {"type": ["string", "null"], "maxLength": 41},
                        "epoch": {"type": ["string", "null"], "pattern": f"^{EPOCH_PATTERN}$"},
                        "since_height": COUNT},
                       required=("channel",))
UNSUBSCRIBE_SCHEMA = obj({"channel": string(max_length=200)}, required=("channel",))
REFRESH_TOKEN_SCHEMA = obj({"token": string(20, 4096)}, required=("token",))


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat()


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
        self._timer_tasks: set[asyncio.Task] = set()  # expiry notices under way (kept from the GC)

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
        session = {"identity": identity, "token": token, "channels": set(),
                   "bucket": TokenBucket(settings.event_rate, settings.event_burst)}
        await self.save_session(sid, session)
        if identity is not None:
            # Logout or revocation reaches the socket through this room, on whichever node it is.
            await self.enter_room(sid, session_room(identity.session_id))
            self._schedule_expiry(sid, session, identity)
        self.app[METRICS].connections.labels(self.name).inc()
        log.info("socket_connected", namespace=self.name, sid=sid,
                 user_id=str(identity.user_id) if identity else None)

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        """Leave presence everywhere and count the disconnect."""
        session = await self.get_session(sid)
        for timer in session.pop("timers", ()):
            timer.cancel()
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
                log.exception("command_failed", namespace=self.name, command=event)
            return error_envelope(error)
        finally:
            metrics = self.app[METRICS]
            known = outcome != "not_found" or hasattr(self, f"on_{event}")
            label = event if known else "unknown"
            metrics.event_in(self.name, label, outcome).inc()
            metrics.handler_time(self.name, label).observe(time.perf_counter() - started)
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
        if spec.user_required and identity is None:
            raise Unauthorized("sign in to use this event")
        if identity is not None and spec.checks_session:
            # The live session (cached a few seconds), not the one from connect time: a socket whose
            # session ended elsewhere must not subscribe to private channels in the meantime.
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
        if not await self._enter_channel(ctx.sid, session, channel):
            return await self._subscribe_ack(ctx, rule, access, payload, session)
        try:
            return await self._subscribe_ack(ctx, rule, access, payload, session)
        except BaseException:
            # A subscribe that failed (Redis unavailable...) leaves no membership behind: the
            # client was told it is not subscribed and must not get live events with holes.
            session["channels"].discard(channel)
            await self.leave_room(ctx.sid, room_name(channel))
            raise

    async def join_owned(self, sid: str, channel: str) -> None:
        """Join a channel the caller was just found to own (by the service, in the same call): the
        room only, with no second check and no history, which nothing has been published to yet."""
        await self._enter_channel(sid, await self.get_session(sid), channel)

    async def _enter_channel(self, sid: str, session: dict, channel: str) -> bool:
        """Add the channel to the connection's set and join its room; False if it was already in."""
        subscribed: set[str] = session["channels"]
        if channel in subscribed:
            return False
        limit = self.app[REALTIME].limits.max_channels_per_connection
        if len(subscribed) >= limit:
            raise Conflict(f"at most {limit} channels per connection; unsubscribe from one first", field="channel")
        subscribed.add(channel)
        await self.enter_room(sid, room_name(channel))
        return True

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
               "events": replay.wire, "has_more": replay.has_more,
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

    @command(REFRESH_TOKEN_SCHEMA, user=False, checks_session=False)
    async def on_refresh_token(self, ctx: Ctx, payload: dict) -> dict:
        """Re-authenticate in place with a new access token of the same user; the socket stays connected."""
        if ctx.identity is None:
            raise Unauthorized("this connection is not signed in; connect again with a token")
        identity = await self.app[AUTH].authenticate(self.app[POOL], payload["token"])
        if identity.user_id != ctx.identity.user_id:
            raise Forbidden("the token belongs to another account", field="token")
        session = await self.get_session(ctx.sid)
        if identity.session_id != ctx.identity.session_id:
            await self.leave_room(ctx.sid, session_room(ctx.identity.session_id))
            await self.enter_room(ctx.sid, session_room(identity.session_id))
        session["identity"], session["token"] = identity, payload["token"]
        self._schedule_expiry(ctx.sid, session, identity)
        return {"expires_at": _iso(identity.expires_at)}

    def _schedule_expiry(self, sid: str, session: dict, identity: Identity) -> None:
        """Warn the socket before its token ends and end it at expiry, unless it re-authenticates first."""
        for timer in session.pop("timers", ()):
            timer.cancel()
        if identity.expires_at is None:
            return
        loop = asyncio.get_running_loop()
        remaining = identity.expires_at - time.time()
        notice = min(self.app[SETTINGS].token_expiry_notice, remaining / 2)
        session["timers"] = (
            loop.call_later(max(0.0, remaining - notice), self._spawn, lambda: self._warn_expiring(sid, identity)),
            loop.call_later(max(0.0, remaining), self._spawn, lambda: self._end_expired(sid)))

    def _spawn(self, make: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.ensure_future(make())
        self._timer_tasks.add(task)
        task.add_done_callback(self._timer_tasks.discard)

    async def _warn_expiring(self, sid: str, identity: Identity) -> None:
        expires_at = identity.expires_at or time.time()
        await self.notify(sid, TOKEN_EXPIRING_EVENT, {"expires_at": _iso(expires_at),
                                                       "expires_in": round(max(0.0, expires_at - time.time()), 3)})

    async def _end_expired(self, sid: str) -> None:
        log.info("socket_token_expired", namespace=self.name, sid=sid)
        await self.notify(sid, SIGNED_OUT_EVENT, {"reason": EXPIRED})
        await self.disconnect(sid)

    async def notify(self, sid: str, event: str, data: dict[str, Any]) -> None:
        """Send one event to one of this node's connections (never through Redis: it is here)."""
        await self.emit(event, data, to=sid, ignore_queue=True)

    @command(user=False)
    async def on_whoami(self, ctx: Ctx, payload: Any) -> dict:
        """The connection's identity (null when anonymous)."""
        if ctx.identity is None:
            return {"user_id": None, "is_admin": False}
        return {"user_id": str(ctx.identity.user_id), "is_admin": ctx.identity.is_admin}
