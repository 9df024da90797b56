"""Realtime delivery: channel rules, `publish`, subscribe with replay, presence, waiting readers.

Namespaces only declare which channels exist and who may join them (`ChannelRule`); this module
does the rest for every namespace and for the REST fallback (long-poll and Server-Sent Events).

Ordering contract with clients: on `subscribe` the connection joins the room *before* the
history is read, so an event published in between reaches it twice (live and in the replay)
rather than never; clients drop duplicates by id (ids grow per channel).

Faults: a client either gets every event of a channel or can tell it missed some. Stored events
carry positions (offset + epoch, see history.py). When Redis is down, an event still reaches the
publishing node's clients, unstored; once Redis is back the channel is reset (new epoch) and every
node's watchers get a `history_gap` notice. When a node's pub/sub listener resubscribes after
losing Redis, it sends the notice to its own watchers of every channel, since other nodes' events
may have passed it by. A notice means: resubscribe from your position (the ack carries what you
missed, or `history_gap: true`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import re
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import socketio
import structlog
from aiohttp import web

from server.core.aio import wait_event
from server.core.errors import Forbidden, NotFound, RateLimited, Unauthorized
from server.core.identity import Identity
from server.core.protocol import MAX_INTEGER_ID
from server.realtime.fanout import FanoutMixin
from server.realtime.history import Event, EventBus, HistoryStore, ReplayResult, check_channel
from server.realtime.presence import Member, PresenceTracker
from server.realtime.redis import BusUnavailable

log = structlog.get_logger(__name__)

PRESENCE_CHANGED_EVENT = "presence_changed"
HISTORY_GAP_EVENT = "history_gap"  # notice: resubscribe from your position
GAP_UNSTORED = "unstored_events"  # events published while Redis was down reached only one node
GAP_RECONNECTED = "bus_reconnected"  # this node's listener was cut off from other nodes' events
SERVER_SHUTDOWN_EVENT = "server_shutdown"  # {reconnect: true}: this process is stopping
SIGNED_OUT_EVENT = "signed_out"  # {reason}: the sign-in session ended; the server disconnects right behind it
TOKEN_EXPIRING_EVENT = "token_expiring"  # {expires_at, expires_in}: send `refresh_token` before then
FIRST_ID = "0-0"  # older than any event id
NAMESPACES_CACHE_SIZE = 10_000  # channels whose namespaces a Realtime remembers
ROOM_PREFIX = "ch:"  # keeps channel rooms apart from python-socketio's per-sid rooms
SESSION_ROOM_PREFIX = "session:"  # a sign-in session's sockets; no channel, so no client can join
_PARAM_RE = re.compile(r"\{([a-z_]+)\}")
_NAME = r"[A-Za-z0-9_.@\-]{1,100}"
_INTEGER_ID = r"[1-9][0-9]{0,9}"  # no sign, no leading zero: one spelling per id; range checked in match
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # lowercase, as events are published
# Every channel parameter's shape, by name: `dao:abc` or a UUID in capitals would be a room no event
# ever reaches, so such channels are refused instead of silently watched.
CHANNEL_PARAMS = {"user_id": _UUID, "datapod_id": _UUID, "conversation_id": _UUID, "game_id": _INTEGER_ID,
                  "session_id": _INTEGER_ID, "proposal_id": _INTEGER_ID, "category": _NAME}


def session_room(session_id: int) -> str:
    """The room holding one sign-in session's sockets in every namespace."""
    return f"{SESSION_ROOM_PREFIX}{session_id}"


def room_name(channel: str) -> str:
    """The Socket.IO room that carries a channel's live events."""
    return ROOM_PREFIX + channel


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelAccess:
    """What an authoriser sees: who asks for which channel, and the pattern's parameters."""

    app: Any
    identity: Identity | None
    channel: str
    params: dict[str, str]


Authoriser = Callable[[ChannelAccess], Awaitable[bool]]
# Catch-up from the source of truth for channels whose history outlives the stream (blocks):
# (access, since_height, limit) -> extra ack data.
CatchUp = Callable[[ChannelAccess, int, int], Awaitable[dict[str, Any]]]


async def anyone(access: ChannelAccess) -> bool:
    """Public channels: anyone may watch, signed in or not."""
    return True


async def signed_in(access: ChannelAccess) -> bool:
    """Any signed-in user."""
    return access.identity is not None


USER_CHANNEL = "user:{user_id}"


def user_channel(user_id: uuid.UUID | str) -> str:
    """A user's private channel (`own_user` lets only that user watch it)."""
    return USER_CHANNEL.format(user_id=user_id)


async def own_user(access: ChannelAccess) -> bool:
    """`user:{user_id}` channels: only that user."""
    return access.identity is not None and str(access.identity.user_id) == access.params.get("user_id")


@dataclasses.dataclass(frozen=True)
class ChannelRule:
    """A family of channels, e.g. "datapod:{datapod_id}", and who may join them."""

    pattern: str
    authorise: Authoriser = anyone
    presence: bool = False
    catch_up: CatchUp | None = None
    regex: re.Pattern = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        literal_parts = _PARAM_RE.split(self.pattern)
        unknown = set(literal_parts[1::2]) - CHANNEL_PARAMS.keys()
        if unknown:
            raise ValueError(f"declare the shape of {sorted(unknown)} in CHANNEL_PARAMS")
        regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{CHANNEL_PARAMS[part]})"
                        for i, part in enumerate(literal_parts))
        object.__setattr__(self, "regex", re.compile(regex))

    def match(self, channel: str) -> dict[str, str] | None:
        """The pattern's parameters when the channel belongs to this family, else None."""
        found = self.regex.fullmatch(channel)
        if found is None:
            return None
        params = found.groupdict()
        if any(CHANNEL_PARAMS[name] == _INTEGER_ID and int(value) > MAX_INTEGER_ID for name, value in params.items()):
            return None
        return params


@dataclasses.dataclass(frozen=True, slots=True)
class RealtimeLimits:
    """Abuse limits of the realtime layer (from Settings)."""

    max_channels_per_connection: int = 100
    max_connections_per_user: int = 16
    replay_limit: int = 1000
    max_waiting_readers: int = 2000


class Realtime:
    """The delivery engine shared by every namespace and the REST fallback."""

    def __init__(self, sio: socketio.AsyncServer, history: HistoryStore, presence: PresenceTracker,
                 limits: RealtimeLimits, *, node_id: str | None = None,
                 on_published: Callable[[Event], None] | None = None) -> None:
        self.sio = sio
        self.presence = presence
        self.limits = limits
        self.node_id = node_id or uuid.uuid4().hex
        self.bus = EventBus(history, self._deliver)
        self._rules: list[tuple[str, ChannelRule]] = []
        # channel -> namespaces_for(channel): every publish asks, and matching runs every rule's regex.
        self._namespaces: dict[str, tuple[str, ...]] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._user_connections: collections.Counter[tuple[str, str]] = collections.Counter()
        self._on_published = on_published
        self._readers = 0
        # Called on every node, once per namespace, as a session's end reaches it (cache purges).
        self.on_session_ended: Callable[[int], None] | None = None
        manager = sio.manager
        if isinstance(manager, FanoutMixin):
            manager.final_event = (SIGNED_OUT_EVENT, SESSION_ROOM_PREFIX)
            manager.on_final_event = self._session_room_closed

    # --- channel rules ------------------------------------------------------------------------

    def register(self, namespace: str, rules: Iterable[ChannelRule]) -> None:
        """Declare the channels a namespace serves."""
        self._rules.extend((namespace, rule) for rule in rules)
        self._namespaces.clear()

    def _match(self, channel: str, namespace: str | None) -> tuple[ChannelRule, dict[str, str]]:
        check_channel(channel)
        for owner, rule in self._rules:
            if namespace is not None and owner != namespace:
                continue
            params = rule.match(channel)
            if params is not None:
                return rule, params
        where = f" on {namespace}" if namespace else ""
        raise NotFound(f"no channel '{channel}'{where}", field="channel")

    async def authorise(self, app: Any, identity: Identity | None, channel: str,
                        namespace: str | None = None) -> tuple[ChannelRule, ChannelAccess]:
        """The channel's rule if this identity may watch it; NotFound or Forbidden otherwise."""
        rule, params = self._match(channel, namespace)
        access = ChannelAccess(app, identity, channel, params)
        if not await rule.authorise(access):
            if identity is None:
                raise Unauthorized(f"sign in to watch '{channel}'", field="channel")
            raise Forbidden(f"you may not watch '{channel}'", field="channel")
        return rule, access

    def namespaces_for(self, channel: str) -> tuple[str, ...]:
        """Every namespace where the channel can be watched (its events go to each)."""
        found = self._namespaces.get(channel)
        if found is None:
            if len(self._namespaces) >= NAMESPACES_CACHE_SIZE:
                self._namespaces.clear()  # channels come and go (one per conversation): stay bounded
            found = self._namespaces[channel] = tuple(sorted(
                {owner for owner, rule in self._rules if rule.match(channel) is not None}))
        return found

    # --- sessions -----------------------------------------------------------------------------

    async def end_sessions(self, session_ids: Iterable[int], reason: str) -> None:
        """Close these sessions' sockets on every node; each hears `signed_out` with the reason first."""
        for session_id in session_ids:
            for namespace in list(self.sio.namespace_handlers):
                try:
                    await self.sio.emit(SIGNED_OUT_EVENT, {"reason": reason}, room=session_room(session_id),
                                        namespace=namespace)
                except Exception:  # noqa: BLE001 - the session is over in the database either way
                    log.exception("session_end_not_sent", session_id=session_id, namespace=namespace)

    def _session_room_closed(self, namespace: str, room: str) -> None:
        if self.on_session_ended is not None:
            self.on_session_ended(int(room[len(SESSION_ROOM_PREFIX):]))

    # --- publishing ---------------------------------------------------------------------------

    async def publish(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        """Append to the channel's history, then deliver to its room in every namespace."""
        return await self.bus.publish(channel, type, data)

    async def publish_many(self, events: list[tuple[str, str, dict[str, Any]]]) -> list[Event]:
        """Publish (channel, type, data) events in order with one history round trip (the outbox relay)."""
        return await self.bus.publish_many(events)

    async def _deliver(self, event: Event) -> None:
        # An unstored event (Redis down) stays on this node: other nodes learn of it as a gap. A
        # stored one stays here too when no other node listened as it was stored.
        await self._emit(event.channel, event.type, event.to_wire(),
                         local_only=event.id is None or not event.peers_listen)
        waiter = self._waiters.pop(event.channel, None)
        if waiter is not None:
            waiter.set()
        if self._on_published is not None:
            self._on_published(event)

    async def _emit(self, channel: str, type: str, wire: dict[str, Any], *, local_only: bool = False) -> None:
        manager = self.sio.manager  # a FanoutMixin (server/realtime/fanout.py)
        room = room_name(channel)
        for namespace in self.namespaces_for(channel):
            if local_only:
                manager.emit_here(type, wire, namespace, room)
            else:
                await manager.emit(type, wire, namespace=namespace, room=room)

    async def _notice(self, channel: str, type: str, data: dict[str, Any], *, local_only: bool = False) -> None:
        # A live view, not history: not stored, so it has no id and no position.
        wire = {"id": None, "channel": channel, "type": type, "data": data, "ts": time.time(),
                "offset": None, "epoch": None}
        await self._emit(channel, type, wire, local_only=local_only)

    async def replay(self, channel: str, since: str | None, epoch: str | None = None) -> ReplayResult:
        """What the channel's history holds after `since` in `epoch` (bounded by the replay limit)."""
        return await self.bus.replay(channel, since, self.limits.replay_limit, epoch)

    # --- faults -------------------------------------------------------------------------------

    def local_channels(self) -> set[str]:
        """Channels that have watchers connected to this node."""
        return {room[len(ROOM_PREFIX):] for rooms in self.sio.manager.rooms.values()
                for room, members in rooms.items()
                if isinstance(room, str) and room.startswith(ROOM_PREFIX) and members}

    async def reset_unstored(self) -> int:
        """Reset channels that got unstored events and tell every node's watchers; returns how many."""
        if not self.bus.unstored_channels:
            return 0
        try:
            channels = await self.bus.reset_unstored()
        except BusUnavailable:
            return 0  # still down: the next round retries
        for channel in channels:
            await self._notice(channel, HISTORY_GAP_EVENT, {"reason": GAP_UNSTORED})
        log.info("unstored_channels_reset", channels=len(channels))
        return len(channels)

    async def watch_unstored(self, interval: float = 1.0) -> None:
        """Reset channels with unstored events as soon as Redis answers again (until cancelled)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reset_unstored()
            except Exception:
                log.exception("reset_unstored_failed")

    async def resync(self) -> None:
        """After this node's pub/sub listener resubscribed: make every hole it may hide visible."""
        await self.reset_unstored()
        channels = self.local_channels()
        for channel in channels:
            await self._notice(channel, HISTORY_GAP_EVENT, {"reason": GAP_RECONNECTED}, local_only=True)
        log.info("listener_resync_notified", channels=len(channels))

    async def wait_after(self, channel: str, since: str | None, timeout: float,
                         poll_interval: float | None, epoch: str | None = None) -> ReplayResult:
        """Long-poll: events after `since`, waiting up to `timeout` seconds for the first one.

        `since` None means the reader saw the channel empty, so everything in it is new to it.
        Events published on this node wake the reader at once; events published by other nodes
        are found by re-reading the history every `poll_interval` seconds (None: single node).
        """
        deadline = time.monotonic() + timeout
        async with self._reader_slot():
            while True:
                # Registered before reading, so an event published during the read still wakes us.
                waiter = self._waiters.setdefault(channel, asyncio.Event())
                if since is None:
                    everything = await self.bus.replay(channel, FIRST_ID, self.limits.replay_limit)
                    result = dataclasses.replace(everything, gap=False)
                else:
                    result = await self.replay(channel, since, epoch)
                remaining = deadline - time.monotonic()
                if result.events or result.gap or remaining <= 0:
                    return result
                wait = remaining if poll_interval is None else min(remaining, poll_interval)
                await wait_event(waiter, wait)

    @contextlib.asynccontextmanager
    async def _reader_slot(self) -> AsyncIterator[None]:
        if self._readers >= self.limits.max_waiting_readers:
            raise RateLimited("too many clients are waiting for events on this server; retry shortly",
                              retry_after=1.0)
        self._readers += 1
        try:
            yield
        finally:
            self._readers -= 1

    # --- presence -----------------------------------------------------------------------------

    async def join_presence(self, namespace: str, channel: str, sid: str, user_id: str | None) -> int | None:
        """Count a connection as watching; tells the room. None when presence is unavailable."""
        try:
            count = await self.presence.join(channel, Member(self.node_id, self._member_id(namespace, sid), user_id))
        except BusUnavailable:
            return None
        await self._announce(channel, count, user_id, "joined")
        return count

    async def leave_presence(self, namespace: str, channel: str, sid: str, user_id: str | None) -> None:
        """Stop counting a connection as watching; tells the room."""
        try:
            count = await self.presence.leave(channel, Member(self.node_id, self._member_id(namespace, sid), user_id))
        except BusUnavailable:
            return
        await self._announce(channel, count, user_id, "left")

    async def presence_count(self, channel: str) -> int | None:
        """How many connections watch the channel across all nodes; None when unavailable."""
        try:
            return await self.presence.count(channel)
        except BusUnavailable:
            return None

    @staticmethod
    def _member_id(namespace: str, sid: str) -> str:
        return f"{namespace}#{sid}"

    async def _announce(self, channel: str, count: int, user_id: str | None, action: str) -> None:
        await self._notice(channel, PRESENCE_CHANGED_EVENT, {"count": count, "action": action, "user_id": user_id})

    # --- per-user connection limit ------------------------------------------------------------

    def add_user_connection(self, user_id: str, namespace: str) -> None:
        """Count a signed-in connection; RateLimited past the per-user limit (on this node)."""
        key = (user_id, namespace)
        if self._user_connections[key] >= self.limits.max_connections_per_user:
            raise RateLimited(f"at most {self.limits.max_connections_per_user} connections per user "
                              f"on {namespace}; close another tab or retry later", retry_after=5.0)
        self._user_connections[key] += 1

    def remove_user_connection(self, user_id: str, namespace: str) -> None:
        """Forget a signed-in connection."""
        key = (user_id, namespace)
        self._user_connections[key] -= 1
        if self._user_connections[key] <= 0:
            del self._user_connections[key]


REALTIME: web.AppKey[Realtime] = web.AppKey("realtime", Realtime)


async def publish(app: Any, channel: str, type: str, data: dict[str, Any]) -> Event:
    """The one way domain code emits an event (after its transaction has committed)."""
    return await app[REALTIME].publish(channel, type, data)


async def publish_many(app: Any, events: list[tuple[str, str, dict[str, Any]]]) -> list[Event]:
    """Publish (channel, type, data) events in order with one history round trip; BusUnavailable when
    history cannot be written (nothing is delivered then)."""
    return await app[REALTIME].publish_many(events)
