"""Fast Socket.IO broadcasts: encode a packet once, write the same websocket frame to every recipient.

python-socketio's `AsyncManager.emit` encodes a broadcast once but then creates one asyncio task per
recipient; each task puts the packet on python-engineio's per-socket queue, whose writer task wakes
up, encodes the packet again and writes it. The managers here deliver in one synchronous loop:

- the Socket.IO packet, the Engine.IO packet and the websocket frame (text, plus one binary frame per
  attachment) are encoded once per broadcast and the same bytes object goes to every recipient;
- a recipient with an open websocket on `server.engine.LeanEngineServer` gets the frame through the
  server's `FrameWriter`, the same path every other packet to that socket takes, so per-socket
  order holds; the frames of every broadcast made in one loop iteration go out in one write per
  socket;
- polling clients, sockets in the middle of an upgrade and sockets of a plain engineio server get a
  shared Engine.IO packet put on their queue directly, without a task;
- emits with a callback take the library's path (every recipient needs its own ack id).

Each connection's backlog is bounded: the Engine.IO queue length by `max_queued_packets`, the
frames a websocket holds back while its client is not reading by `max_queued_bytes`. A connection
past either bound is evicted: it gets one last event, `send_queue_overflowed` {"reason":
"slow_consumer", "reconnect": true}, and is closed. On a websocket the event takes the place of the
backlog, which is dropped, so it follows only whole frames; then come a close frame, 1013 (try again
later) with the reason "slow consumer", and the TCP close once the client has read them (an abort if
it reads nothing for `close_grace` seconds). A polling client gets the event after its queue, then
Engine.IO CLOSE. socket.io clients reconnect on their own, then recover what they missed from the
channel history.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import weakref
from typing import Any, AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
import socketio
import structlog
from aiohttp import WSCloseCode
from engineio import packet as eio_packet
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from socketio import packet as sio_packet

from server.core import jsonutil
from server.core.aio import Batcher, wait_event
from server.realtime.engine import (
    DEFAULT_CLOSE_GRACE_SECONDS,
    SLOW_CONSUMER_REASON,
    FrameWriter,
    Link,
    close_frame,
    packet_frame,
)
from server.realtime.history import JsonWire
from server.realtime.redis import UNAVAILABLE_ERRORS, RedisHealth, connect_redis

log = structlog.get_logger(__name__)

SEND_QUEUE_OVERFLOWED_EVENT = "send_queue_overflowed"
SEND_QUEUE_OVERFLOWED_DATA = {"reason": "slow_consumer", "reconnect": True}

DEFAULT_MAX_QUEUED_PACKETS = 1000
DEFAULT_MAX_QUEUED_BYTES = 1024 * 1024

OverflowHook = Callable[[str], None]


class _Broadcast:
    """One broadcast, encoded once: the websocket bytes and, lazily, Engine.IO packets for queues."""

    __slots__ = ("sio_encoded", "frame", "size", "_shared")

    def __init__(self, sio_encoded: str | list) -> None:
        self.sio_encoded = sio_encoded if isinstance(sio_encoded, list) else [sio_encoded]
        # Engine.IO over websocket: text is "4" + the Socket.IO packet; each binary attachment is
        # its own binary frame with the raw bytes (no "4", no base64).
        frames = [packet_frame(eio_packet.Packet(eio_packet.MESSAGE, part))
                  for part in self.sio_encoded]
        self.frame = frames[0] if len(frames) == 1 else b"".join(frames)
        self.size = len(self.frame)
        self._shared: dict[bool, list[eio_packet.Packet]] = {}

    def packets(self, upgraded: bool, binary: bool) -> list[eio_packet.Packet]:
        """Engine.IO packets to queue; shared by sockets of one transport kind.

        engineio's Packet caches its first encoding whatever the b64 flag, so a binary packet
        encoded for a websocket (raw) must not be reused for a polling client (base64) or the
        other way round; text packets encode the same both ways.
        """
        key = upgraded or not binary
        shared = self._shared.get(key)
        if shared is None:
            shared = self._shared[key] = [eio_packet.Packet(eio_packet.MESSAGE, p)
                                          for p in self.sio_encoded]
        return shared


class _Sids(dict):
    """A namespace's pending sids with the list methods python-socketio calls on them, in O(1)."""

    __slots__ = ()

    def append(self, sid: str) -> None:
        self[sid] = None

    def remove(self, sid: str) -> None:
        del self[sid]


class _PendingSids(dict):
    """python-socketio's `pending_connect` / `pending_disconnect`: it keeps a list per namespace and
    tests `sid in` it on every event and room change, so a reconnect storm of N clients cost O(N)
    per event; a list assigned here becomes a `_Sids`."""

    __slots__ = ()

    def __setitem__(self, namespace: str, sids: Any) -> None:
        super().__setitem__(namespace, _Sids.fromkeys(sids))


class FanoutMixin(socketio.AsyncManager):
    """The fast emit path; placed before `AsyncManager` in the MRO of both managers.

    It subclasses `AsyncManager` so that in `RedisFanoutManager(AsyncRedisManager, FanoutMixin)`
    C3 puts it between `AsyncPubSubManager` and `AsyncManager`: the pub/sub `emit` still publishes,
    and its `_handle_emit` (local delivery and messages from other nodes) lands here.
    """

    def _setup_fanout(self, max_queued_packets: int, max_queued_bytes: int,
                      on_overflow: OverflowHook | None, close_grace: float) -> None:
        if max_queued_packets < 1 or max_queued_bytes < 1:
            raise ValueError("max_queued_packets and max_queued_bytes must be positive")
        self.max_queued_packets = max_queued_packets
        self.max_queued_bytes = max_queued_bytes
        self.on_overflow = on_overflow
        self.close_grace = close_grace
        self._frames: FrameWriter | None = None
        self._evicted: weakref.WeakSet = weakref.WeakSet()
        self._background: set[asyncio.Task] = set()
        # (event, room prefix): after that event to such a room, its members on this node are
        # disconnected, and `on_final_event` hears of it.
        self.final_event: tuple[str, str] | None = None
        self.on_final_event: Callable[[str, str], None] | None = None
        self.pending_connect = _PendingSids()
        self.pending_disconnect = _PendingSids()
        # (namespace, sid) -> its rooms, in the order entered: python-socketio finds a client's
        # rooms by testing every room of the namespace (and copies them on disconnect), O(rooms).
        self._rooms_of: dict[tuple[str, str], dict[Any, None]] = {}

    def basic_enter_room(self, sid: str, namespace: str, room: Any, eio_sid: str | None = None) -> None:
        """Enter a room, indexed by client."""
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        self._rooms_of.setdefault((namespace, sid), {})[room] = None

    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        """Leave a room, indexed by client."""
        super().basic_leave_room(sid, namespace, room)
        rooms = self._rooms_of.get((namespace, sid))
        if rooms is not None:
            rooms.pop(room, None)
            if not rooms:
                del self._rooms_of[(namespace, sid)]

    def get_rooms(self, sid: str, namespace: str) -> list[Any]:
        """The rooms a client is in (its sid room included, as python-socketio has it)."""
        return [room for room in self._rooms_of.get((namespace, sid), ()) if room is not None]

    def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        """BaseManager.basic_disconnect, leaving the client's indexed rooms instead of scanning all."""
        for room in list(self._rooms_of.get((namespace, sid), ())):
            self.basic_leave_room(sid, namespace, room)
        self.callbacks.pop(sid, None)
        for pending in (self.pending_connect, self.pending_disconnect):
            sids = pending.get(namespace)
            if sids is not None and sid in sids:
                sids.remove(sid)
                if not sids:
                    del pending[namespace]

    def set_server(self, server: Any) -> None:
        """Attach to the server; on a `LeanEngineServer`, share its frame writer and bound it."""
        super().set_server(server)
        frames = getattr(server.eio, "frames", None)
        if isinstance(frames, FrameWriter):
            frames.max_unsent_bytes = self.max_queued_bytes
            frames.on_backlog = self._on_backlog
            self._frames = frames

    async def emit(self, event: str, data: Any, namespace: str, room: Any = None,
                   skip_sid: Any = None, callback: Any = None, to: Any = None, **kwargs: Any) -> None:
        """Emit to a sid, a room or the namespace; without a callback, through the fast path."""
        if callback is not None:
            # Every recipient needs its own ack id, so every packet differs: the library's path.
            return await super().emit(event, data, namespace, room=room, skip_sid=skip_sid,
                                      callback=callback, to=to, **kwargs)
        self.emit_here(event, data, namespace, to or room, skip_sid)

    def emit_here(self, event: str, data: Any, namespace: str, room: Any, skip_sid: Any = None) -> None:
        """Emit to this node's clients only, at once: `emit` with `ignore_queue` and no callback,
        without the coroutines python-socketio's server and managers stack on every emit."""
        if namespace not in self.rooms:
            return
        if isinstance(data, tuple):
            data = list(data)
        elif data is not None:
            data = [data]
        else:
            data = []
        self.broadcast(event, data, namespace, room, skip_sid)
        final = self.final_event
        if final is not None and event == final[0] and isinstance(room, str) and room.startswith(final[1]):
            # Here, where every node's copy of the emit arrives, so each node closes its own members.
            self._disconnect_members(namespace, room)

    def _disconnect_members(self, namespace: str, room: str) -> None:
        """Disconnect this node's members of a room, behind the event just written to them."""
        for sid, _ in list(self.get_participants(namespace, room)):
            self._track(self.server.disconnect(sid, namespace=namespace, ignore_queue=True))
        if self.on_final_event is not None:
            self.on_final_event(namespace, room)

    def broadcast(self, event: str, args: list, namespace: str, room: Any, skip_sid: Any) -> int:
        """Deliver an event (args as a list) to the local participants; returns how many got it."""
        # A stored event's wire object holds no bytes: python-socketio's walk for attachments is
        # skipped (it cost as much as the encoding of a delta).
        binary = False if len(args) == 1 and type(args[0]) is JsonWire else None
        if isinstance(room, str) and not self.rooms.get(namespace, {}).get(room):
            return 0  # most session channels have no watcher on this node: nothing to encode
        pkt = self.server.packet_class(sio_packet.EVENT, namespace=namespace, data=[event] + args, binary=binary)
        encoded = _Broadcast(pkt.encode())
        return self._deliver(encoded, pkt.packet_type == sio_packet.BINARY_EVENT, namespace, room,
                             skip_sid)

    def _deliver(self, encoded: _Broadcast, binary: bool, namespace: str, room: Any,
                 skip_sid: Any) -> int:
        skip = skip_sid if isinstance(skip_sid, (list, tuple, set, frozenset)) else (skip_sid,)
        sockets = self.server.eio.sockets
        frames = self._frames
        frame, size = encoded.frame, encoded.size
        delivered = 0
        for sid, eio_sid in self.get_participants(namespace, room):
            if sid in skip:
                continue
            sock = sockets.get(eio_sid)
            if sock is None or sock.closing or sock.closed:
                continue
            link = getattr(sock, "link", None)
            if link is not None:
                if not link.transport.is_closing():
                    link.namespace = namespace
                    frames.write(link, frame)
                    delivered += 1
                continue
            if sock in self._evicted:
                continue
            queue = sock.queue
            backlog = queue.qsize()
            if backlog >= self.max_queued_packets or backlog * size > self.max_queued_bytes:
                self._overflow(sock, None, namespace)
                continue
            for p in encoded.packets(sock.upgraded or sock.upgrading, binary):
                queue.put_nowait(p)
            delivered += 1
        return delivered

    def _on_backlog(self, link: Link) -> None:
        self._overflow(link.sock, link, link.namespace)

    def _overflow(self, sock: Any, link: Link | None, namespace: str) -> None:
        """Send the final event past the bound, close the connection, let the client reconnect."""
        if sock in self._evicted:
            return
        self._evicted.add(sock)
        pkt = self.server.packet_class(sio_packet.EVENT, namespace=namespace,
                                       data=[SEND_QUEUE_OVERFLOWED_EVENT, SEND_QUEUE_OVERFLOWED_DATA])
        final = _Broadcast(pkt.encode())
        log.warning("send_queue_overflowed", sid=self.sid_from_eio_sid(sock.sid, namespace),
                    namespace=namespace, queued_packets=sock.queue.qsize(),
                    unsent_bytes=link.unsent_bytes if link else None)
        if self.on_overflow is not None:
            try:
                self.on_overflow(namespace)
            except Exception:  # noqa: BLE001 - a metrics hook must not break delivery
                log.exception("overflow_hook_failed")
        if link is not None:
            # In place of the backlog, behind only whole frames the transport already holds.
            self._frames.close(link, final.frame + close_frame(WSCloseCode.TRY_AGAIN_LATER, SLOW_CONSUMER_REASON),
                               drop_unsent=True, grace=self.close_grace)
            self._track(sock.close(wait=False, abort=True, reason=SLOW_CONSUMER_REASON))
        else:
            # Polling: engineio refuses polls of a closed socket, so the event and an Engine.IO
            # CLOSE (the client reconnects on it) wait for the next poll, and the socket is closed
            # after the grace period whether or not the client came for them.
            for p in final.packets(False, False):
                sock.queue.put_nowait(p)
            sock.queue.put_nowait(eio_packet.Packet(eio_packet.CLOSE))
            asyncio.get_running_loop().call_later(self.close_grace, self._close_later, sock)

    def _close_later(self, sock: Any) -> None:
        self._track(sock.close(wait=False, abort=True, reason=SLOW_CONSUMER_REASON))

    def _track(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class FanoutManager(FanoutMixin):
    """Single-node client manager with the fast broadcast path and bounded per-connection buffering."""

    def __init__(self, *, max_queued_packets: int = DEFAULT_MAX_QUEUED_PACKETS,
                 max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
                 on_overflow: OverflowHook | None = None,
                 close_grace: float = DEFAULT_CLOSE_GRACE_SECONDS, compression: bool = False) -> None:
        super().__init__()
        self._setup_fanout(max_queued_packets, max_queued_bytes, on_overflow, close_grace)


# How soon the pub/sub listener tries again after losing Redis: python-socketio's own listener
# backs off up to 60 s, during which a node silently gets no other node's events.
LISTENER_RETRY_SECONDS = 0.5


class RedisFanoutManager(socketio.AsyncRedisManager, FanoutMixin):
    """Redis client manager (multi-node) whose local deliveries take the fast broadcast path.

    The pub/sub listener is ours: it resubscribes within `LISTENER_RETRY_SECONDS` of Redis
    answering again, exposes whether it is subscribed (`listening`, for readiness), and calls
    `on_resubscribed` after a reconnect so the node can tell its clients they may have missed
    events. Publishing fails fast and logs once per outage instead of once per emit.
    """

    def __init__(self, url: str, *, channel: str = "socketio",
                 max_queued_packets: int = DEFAULT_MAX_QUEUED_PACKETS,
                 max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
                 on_overflow: OverflowHook | None = None,
                 close_grace: float = DEFAULT_CLOSE_GRACE_SECONDS,
                 **publisher_options: Any) -> None:
        super().__init__(url, channel=channel)
        self._setup_fanout(max_queued_packets, max_queued_bytes, on_overflow, close_grace)
        # Subscribed with `channel` and never published to: the number of its subscribers (0 or 1)
        # tells a history append how many of `channel`'s subscribers are other nodes.
        self.node_channel = f"{channel}:node:{self.host_id}"
        self._listening = asyncio.Event()
        self.on_resubscribed: Callable[[], Awaitable[None]] | None = None
        self.publish_health = RedisHealth("redis_pubsub")
        self._publisher = connect_redis(url, **publisher_options)
        # Write-behind: this node's clients already have the emit, so the caller need not wait for
        # the other nodes' copy. Queued messages go out in order, a batch as one PUBLISH of a JSON
        # array (`_listen` unpacks it): one command and one reply per batch, not per message.
        self._outgoing: Batcher[bytes] = Batcher(self._publish_batch, name="pubsub.publish")
        # A connection of its own that blocks reading (no socket timeout; keepalive finds dead peers)
        # and never retries: redis-py would reconnect and resubscribe silently, hiding the hole.
        self._listener = aioredis.Redis.from_url(url, socket_connect_timeout=2.0, socket_keepalive=True,
                                                 retry=Retry(NoBackoff(), 0))

    @property
    def peer_channels(self) -> tuple[str, str]:
        """The channel every node listens on and this node's own (see `RedisHistory`)."""
        return self.channel, self.node_channel

    @property
    def listening(self) -> bool:
        """The listener is subscribed: this node hears the other nodes' events."""
        return self._listening.is_set()

    async def wait_listening(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the listener to subscribe; returns whether it did."""
        return await wait_event(self._listening, timeout)

    async def emit(self, event: str, data: Any, namespace: str | None = None, room: Any = None,
                   skip_sid: Any = None, callback: Any = None, to: Any = None, **kwargs: Any) -> None:
        """Emit here and to the other nodes; a stored event's wire object without the binary walk."""
        if callback is not None or kwargs.get("ignore_queue") or type(data) is not JsonWire:
            return await super().emit(event, data, namespace=namespace, room=room, skip_sid=skip_sid,
                                      callback=callback, to=to, **kwargs)
        # AsyncPubSubManager.emit for data known to hold no bytes (it walks every emit's data).
        namespace, room = namespace or "/", to or room
        self.emit_here(event, data, namespace, room, skip_sid)
        await self._publish({"method": "emit", "event": event, "data": [data], "binary": False, "namespace": namespace,
                             "room": room, "skip_sid": skip_sid, "callback": None, "host_id": self.host_id})

    async def _publish(self, data: Any) -> None:
        # Encoded now, not when the batch leaves: the caller may reuse `data` after the emit.
        await self._outgoing.send(jsonutil.dumpb(data))

    @property
    def _own_batch_prefix(self) -> bytes:
        # A batch opens with its publisher's id, an item python-socketio's loop ignores (it has no
        # "method"), so the listener drops this node's own batches unread: none of their messages
        # is for this node, and decoding them cost as much as delivering an event.
        return b'[{"host_id":' + jsonutil.dumpb(self.host_id) + b"},"

    async def _publish_batch(self, messages: list[bytes]) -> list[None]:
        try:
            await self._publisher.publish(self.channel, self._own_batch_prefix + b",".join(messages) + b"]")
        except UNAVAILABLE_ERRORS as exc:
            # This node's clients already got the emit; other nodes learn of the hole from
            # positions and from their own listener's reconnect.
            self.publish_health.record_error(exc, "pubsub.publish")
        except Exception:
            log.exception("pubsub_publish_failed", messages=len(messages))
        else:
            self.publish_health.record_ok()
        return [None] * len(messages)

    async def flush(self) -> None:
        """Wait until every message queued for the other nodes has been published (or failed)."""
        await self._outgoing.flush()

    async def _listen(self) -> AsyncIterator[Any]:
        # python-socketio's loop takes decoded messages as dicts; a batch holds several, in order.
        channel = self.channel.encode()
        own_batch = self._own_batch_prefix
        async for message in self._redis_listen_with_retries():
            if message["channel"] != channel or message["type"] != "message" or "data" not in message:
                continue
            if message["data"].startswith(own_batch):
                continue
            try:
                decoded = jsonutil.loads(message["data"])
            except ValueError:
                log.warning("pubsub_message_undecodable", size=len(message["data"]))
                continue
            for item in decoded if isinstance(decoded, list) else (decoded,):
                yield item

    async def _redis_listen_with_retries(self) -> AsyncIterator[Any]:
        reconnecting = False
        while True:
            pubsub = self._listener.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel, self.node_channel)  # one command: both or neither
                self._listening.set()
                if reconnecting:
                    log.info("pubsub_listener_resubscribed")
                    if self.on_resubscribed is not None:
                        self._track(self.on_resubscribed())
                reconnecting = False
                async for message in pubsub.listen():
                    yield message
            except Exception as exc:  # noqa: BLE001 - whatever ended it, resubscribe soon
                if self.listening:
                    log.warning("pubsub_listener_down", error=f"{type(exc).__name__}: {exc}")
                self._listening.clear()
                reconnecting = True
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(LISTENER_RETRY_SECONDS * random.uniform(0.5, 1.0))

    async def close(self) -> None:
        """Stop the listener and close the publishing and listening connections."""
        listener_task = getattr(self, "thread", None)  # python-socketio's name for the listener task
        if listener_task is not None:
            listener_task.cancel()
            await asyncio.gather(listener_task, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.flush()
        await self._publisher.aclose()
        await self._listener.aclose()


def create_client_manager(redis_url: str | None, *,
                          max_queued_packets: int = DEFAULT_MAX_QUEUED_PACKETS,
                          max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
                          on_overflow: OverflowHook | None = None,
                          channel: str = "socketio", **publisher_options: Any) -> socketio.AsyncManager:
    """The fast client manager: Redis-backed when `redis_url` is set, single-node otherwise.

    `publisher_options` go to `connect_redis` for the connection that publishes to other nodes.
    """
    if redis_url:
        return RedisFanoutManager(redis_url, channel=channel, max_queued_packets=max_queued_packets,
                                  max_queued_bytes=max_queued_bytes, on_overflow=on_overflow,
                                  **publisher_options)
    return FanoutManager(max_queued_packets=max_queued_packets, max_queued_bytes=max_queued_bytes,
                         on_overflow=on_overflow)


__all__ = ["SEND_QUEUE_OVERFLOWED_EVENT", "SEND_QUEUE_OVERFLOWED_DATA", "FanoutManager",
           "RedisFanoutManager", "create_client_manager"]
