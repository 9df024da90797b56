"""Channel history and the event bus: monotonic ids, capped history, replay with gap detection.

Independent of aiohttp and Socket.IO: delivery is a callback, so the bus is testable alone.

Ids are Redis stream ids "<ms>-<seq>" in both modes. They compare numerically as (ms, seq), never
as strings ("9-0" > "10-0" as strings): use `parse_id` / `compare_ids`.

Gap rule (`read_after`): a replay from `since` is complete when the history still holds every
event that came after `since`. Each retained history knows the id of the event just before its
oldest retained one (the newest trimmed event), or that its oldest event opened the history. So:

- nothing retained (never published, expired after its TTL, memory lost on restart): gap, because
  nothing after `since` can be vouched for; the client reloads over REST (at worst needlessly);
- the oldest retained event opened the history: gap iff `since` is older than it (then `since`
  comes from an earlier life of the channel, expired or lost, and what followed it is unknown);
- otherwise: gap iff `since` is older than the newest trimmed event. A client that saw exactly
  the newest trimmed event missed nothing, so it gets no gap; this is exact even with
  approximate (`MAXLEN ~`) trimming, because the boundary is read from the stream, never
  derived from the cap.

`since` equal to the latest id or newer than anything retained: no events, no gap.
Events retained after `since` are returned even when `gap` is true.

Positions (after Centrifugo's offset + epoch): each stored event also carries its channel's
`offset`, which grows by exactly 1 per event, and the channel's `epoch`, which changes whenever
the history that vouches for those offsets is lost (Redis restarted empty, the channel expired
after its TTL, a memory history's process restarted, or `reset`). A client that sees an offset
jump or an epoch change knows it missed events, which stream ids alone cannot show. A replay
asked for with an `epoch` that is no longer the channel's is a gap.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from collections import deque
from typing import Any, Awaitable, Callable, Protocol, runtime_checkable

import orjson
import redis.asyncio as aioredis
import structlog

from server.core import jsonutil
from server.core.aio import Batcher, SharedRuns
from server.core.errors import InvalidPayload
from server.realtime.redis import BusUnavailable, RedisHealth, redis_text

log = structlog.get_logger(__name__)

IdKey = tuple[int, int]
ENCODED_KEYS_CACHE_SIZE = 10_000  # channels whose Redis keys a RedisHistory keeps encoded

_MAX_PART = 2**64 - 1  # Redis stream id parts are unsigned 64-bit
_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")  # [0-9], not \d: no other Unicode digits
_CHANNEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,199}")
_TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
EPOCH_PATTERN = "[A-Za-z0-9]{1,32}"
_EPOCH_RE = re.compile(EPOCH_PATTERN)


class InvalidArgument(InvalidPayload, ValueError):
    """A malformed channel, event type, `since` offset or limit (maps to invalid_payload)."""


# --- ids -------------------------------------------------------------------------------------


def parse_id(value: object, *, field: str = "since") -> IdKey:
    """Parse a stream id "<ms>-<seq>" into a comparable (ms, seq); anything else is InvalidArgument."""
    if not isinstance(value, str):
        raise InvalidArgument("must be a stream id like '1700000000000-0'", field=field)
    match = _ID_RE.fullmatch(value)
    if match is None:
        raise InvalidArgument("must be a stream id like '1700000000000-0'", field=field)
    ms, seq = int(match.group(1)), int(match.group(2))
    if ms > _MAX_PART or seq > _MAX_PART:
        raise InvalidArgument("stream id out of range", field=field)
    return ms, seq


def format_id(key: IdKey) -> str:
    """The stream id text of a parsed (ms, seq)."""
    return f"{key[0]}-{key[1]}"


def compare_ids(a: str, b: str) -> int:
    """-1, 0 or 1 as stream id `a` is older than, equal to or newer than `b`."""
    ka, kb = parse_id(a, field="id"), parse_id(b, field="id")
    return (ka > kb) - (ka < kb)


def _next_key(key: IdKey) -> IdKey | None:
    """The smallest id after `key`, None past the largest possible id."""
    ms, seq = key
    if seq < _MAX_PART:
        return ms, seq + 1
    return (ms + 1, 0) if ms < _MAX_PART else None


def _gap(since: IdKey, first: IdKey | None, before_first: IdKey | None) -> bool:
    """The gap rule of the module docstring, on parsed ids."""
    if first is None:
        return True
    if before_first is None:
        return since < first
    return since < before_first


def new_epoch() -> str:
    """A fresh channel epoch: random, so a history recreated anywhere never repeats one."""
    return secrets.token_hex(6)


def check_epoch(epoch: object) -> str | None:
    """Return `epoch` (None allowed) if it looks like an epoch, else raise InvalidArgument."""
    if epoch is not None and (not isinstance(epoch, str) or _EPOCH_RE.fullmatch(epoch) is None):
        raise InvalidArgument("epoch must be 1-32 letters or digits, as the server sent it", field="epoch")
    return epoch


def check_channel(channel: object) -> str:
    """Return `channel` if it is a valid channel name, else raise InvalidArgument."""
    if not isinstance(channel, str) or _CHANNEL_RE.fullmatch(channel) is None:
        raise InvalidArgument("channel must be 1-200 characters of letters, digits and _.:@-",
                              field="channel")
    return channel


def _check_type(type: object) -> str:
    if not isinstance(type, str) or _TYPE_RE.fullmatch(type) is None:
        raise InvalidArgument("event type must be snake_case", field="type")
    return type


def _check_limit(limit: object) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InvalidArgument("limit must be a positive integer", field="limit")
    return limit


# --- events and history ----------------------------------------------------------------------


class JsonWire(dict):
    """A stored event's wire object: its data was decoded from JSON, so it holds no bytes and
    Socket.IO need not walk it looking for binary attachments (fanout.py skips that walk)."""

    __slots__ = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One server event as it is stored, replayed and sent.

    `id`, `offset` and `epoch` are None for an event that could not be stored (Redis down): it
    reached only the publishing node's clients and has no position.
    """

    id: str | None
    channel: str
    type: str
    data: dict[str, Any]
    ts: float
    offset: int | None = None
    epoch: str | None = None
    # Whether another node listened for events when this one was stored: if none did, its copy for
    # other nodes is not sent. Not part of the event, so not compared.
    peers_listen: bool = dataclasses.field(default=True, compare=False)

    def to_wire(self) -> JsonWire:
        """The protocol's server event object."""
        # Every Event is built from JSON-decoded data (`_normalise` or a read from Redis).
        return JsonWire(id=self.id, channel=self.channel, type=self.type, data=self.data, ts=self.ts,
                        offset=self.offset, epoch=self.epoch)


def wire_array(events: list[Event]) -> orjson.Fragment:
    """The events' wire objects as one JSON array, encoded now and embedded as is wherever it is sent."""
    return orjson.Fragment(jsonutil.dumpb([event.to_wire() for event in events]))


NO_EVENTS = wire_array([])


@dataclasses.dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a channel's history holds after an offset, and whether something was lost before it.
    `wire` is `events` as sent: a read shared by a reconnect storm's subscribers is encoded once."""

    events: list[Event]
    wire: orjson.Fragment = dataclasses.field(compare=False, repr=False)  # derived from `events`
    latest_id: str | None
    gap: bool
    epoch: str | None = None
    latest_offset: int | None = None

    @property
    def has_more(self) -> bool:
        """True when `limit` cut the replay short: ask again from the last returned id."""
        return bool(self.events) and self.events[-1].id != self.latest_id


@runtime_checkable
class HistoryStore(Protocol):
    """Per-channel capped history that assigns each event its monotonic id."""

    async def append(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        """Store an event and return it with its id."""
        ...

    async def read_after(self, channel: str, since: str | None, limit: int = 1000,
                         epoch: str | None = None) -> ReplayResult:
        """Events after `since` (oldest first, at most `limit`), the latest position and the gap flag."""
        ...

    async def reset(self, channel: str) -> None:
        """Forget the channel's history, so its next event opens a new epoch."""
        ...

    async def latest_id(self, channel: str) -> str | None:
        """Id of the newest retained event of the channel, None when there is none."""
        ...

    async def append_many(self, events: list[tuple[str, str, dict[str, Any]]]) -> list[Event]:
        """Store (channel, type, data) events in order, in one round trip where the store allows."""
        ...


def _normalise(data: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """JSON bytes and the dict as a reader will see it (Decimal -> str), the same in both modes."""
    if not isinstance(data, dict):
        raise InvalidArgument("event data must be an object", field="data")
    raw = jsonutil.dumpb(data)
    return raw, jsonutil.loads(raw)


class _MemoryChannel:
    __slots__ = ("entries", "before_first", "touched", "epoch", "offset")

    def __init__(self, cap: int, touched: float) -> None:
        self.entries: deque[tuple[IdKey, Event]] = deque(maxlen=cap)
        self.before_first: IdKey | None = None
        self.touched = touched
        # A channel (re)created in memory has nothing to vouch for earlier offsets: a new epoch.
        self.epoch = new_epoch()
        self.offset = 0


def _epoch_gap(asked: str | None, current: str | None) -> bool:
    """A replay asked for in another epoch cannot vouch for the offsets the client holds."""
    return asked is not None and asked != current


class MemoryHistory:
    """Single-node history: a ring buffer per channel; channels idle longer than ttl are dropped."""

    def __init__(self, cap: int, ttl_seconds: float, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if cap < 1 or ttl_seconds <= 0:
            raise ValueError("cap must be >= 1 and ttl_seconds > 0")
        self.cap = cap
        self.ttl = float(ttl_seconds)
        self._clock = clock
        self._monotonic = monotonic
        self._channels: dict[str, _MemoryChannel] = {}
        # One sequence for the whole store, so a channel dropped and recreated never reuses ids.
        self._last: IdKey = (0, 0)
        self._next_sweep = monotonic() + self.ttl

    def _live(self, channel: str, now: float) -> _MemoryChannel | None:
        state = self._channels.get(channel)
        if state is not None and now - state.touched >= self.ttl:
            del self._channels[channel]
            return None
        return state

    def _sweep(self, now: float) -> None:
        # Amortised over appends so channels nobody reads again do not stay in memory forever.
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(self.ttl, 60.0)
        for name in [n for n, s in self._channels.items() if now - s.touched >= self.ttl]:
            del self._channels[name]

    def _new_key(self, now: float) -> IdKey:
        ms = int(now * 1000)
        last_ms, last_seq = self._last
        # The clock may go backwards (NTP step): stay on the last ms and count up instead.
        self._last = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        return self._last

    async def append(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        """Store an event and return it with its id and position."""
        _, payload = _normalise(data)
        now, mono = self._clock(), self._monotonic()
        self._sweep(mono)
        state = self._live(channel, mono)
        if state is None:
            state = self._channels[channel] = _MemoryChannel(self.cap, mono)
        key = self._new_key(now)
        state.offset += 1
        event = Event(format_id(key), channel, type, payload, now, state.offset, state.epoch)
        if len(state.entries) == self.cap:
            state.before_first = state.entries[0][0]
        state.entries.append((key, event))
        state.touched = mono
        return event

    async def append_many(self, events: list[tuple[str, str, dict[str, Any]]]) -> list[Event]:
        """Store (channel, type, data) events in order."""
        return [await self.append(channel, type, data) for channel, type, data in events]

    async def read_after(self, channel: str, since: str | None, limit: int = 1000,
                         epoch: str | None = None) -> ReplayResult:
        """Events after `since` (oldest first, at most `limit`), the latest position and the gap flag."""
        _check_limit(limit)
        key = None if since is None else parse_id(since)
        state = self._live(channel, self._monotonic())
        if state is None:
            return ReplayResult([], NO_EVENTS, None, key is not None and _gap(key, None, None))
        latest = state.entries[-1][1]
        if key is None:
            return ReplayResult([], NO_EVENTS, latest.id, False, state.epoch, state.offset)
        newer: list[Event] = []
        for entry_key, event in reversed(state.entries):
            if entry_key <= key:
                break
            newer.append(event)
        newer.reverse()
        gap = _gap(key, state.entries[0][0], state.before_first) or _epoch_gap(epoch, state.epoch)
        newer = newer[:limit]
        return ReplayResult(newer, wire_array(newer), latest.id, gap, state.epoch, state.offset)

    async def reset(self, channel: str) -> None:
        """Forget the channel's history, so its next event opens a new epoch."""
        self._channels.pop(channel, None)

    async def latest_id(self, channel: str) -> str | None:
        """Id of the newest retained event of the channel, None when there is none."""
        state = self._live(channel, self._monotonic())
        return state.entries[-1][1].id if state else None


# --- Redis history ---------------------------------------------------------------------------

# Each entry records the id before it ("p"), so after trimming the oldest retained entry still
# tells which event was the newest one dropped: that makes the gap check exact. A meta hash beside
# the stream holds the channel's position: the last offset ("o"), the epoch ("e") and the last id
# ("l"; reading it from the stream with XREVRANGE was the costliest command of an append, and a
# channel with one event per batch, such as a game session's, paid it for every event). Atomic, so
# two nodes appending at once cannot interleave between reading the position and the XADD, and
# offsets follow stream order exactly.
_APPEND_LUA = """
-- A batch: KEYS holds (stream, position) per event; ARGV the trim mode, cap, ttl, an epoch for
-- channels that start a new one, the pub/sub channel every node listens on and this node's own
-- ('' for both: count every node as listening), then per event its type, a newline and its data
-- (one argument, not two: the client checks and encodes every argument in Python). One script call
-- per batch, and each channel's position is read and written once per batch: Redis spends more on
-- every call than on the appends themselves.
local trim, cap, ttl, new_epoch, shared, own = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
-- How many other nodes listen, counted here, atomically with the appends: a node that subscribes
-- later reads these events from history, so their copy for other nodes is needed only if it is > 0.
-- A node subscribes to both channels in one command and loses both with its connection.
local peers = 1
if shared ~= '' then
  peers = redis.call('PUBSUB', 'NUMSUB', shared)[2] - redis.call('PUBSUB', 'NUMSUB', own)[2]
end
local channels, order, out = {}, {}, {}
for i = 1, #KEYS / 2 do
  local stream = KEYS[2 * i - 1]
  local state = channels[stream]
  if not state then
    local position = KEYS[2 * i]
    local meta = redis.call('HMGET', position, 'o', 'e', 'l')
    local offset, epoch, prev = tonumber(meta[1]) or 0, meta[2], meta[3]
    if offset == 0 or not epoch then
      -- A new sequence of offsets: whatever the stream still holds belongs to a lost epoch.
      redis.call('DEL', stream)
      epoch, prev = new_epoch, ''
    elseif not prev then
      -- A position written before it kept the last id ("l"): the stream's newest entry has it.
      local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
      prev = last[1] and last[1][1] or ''
    end
    state = {position = position, offset = offset, epoch = epoch, prev = prev}
    channels[stream] = state
    order[#order + 1] = stream
  end
  state.offset = state.offset + 1
  local event = ARGV[i + 6]
  local newline = string.find(event, '\\n', 1, true)  -- types have none: the first one ends it
  local type, data = string.sub(event, 1, newline - 1), string.sub(event, newline + 1)
  local id
  if trim == '~' then
    id = redis.call('XADD', stream, 'MAXLEN', '~', cap, '*', 't', type, 'd', data, 'p', state.prev, 'o', state.offset)
  else
    id = redis.call('XADD', stream, 'MAXLEN', cap, '*', 't', type, 'd', data, 'p', state.prev, 'o', state.offset)
  end
  state.prev = id
  out[i] = {id, state.offset, state.epoch, peers}
end
for _, stream in ipairs(order) do
  local state = channels[stream]
  redis.call('HSET', state.position, 'o', state.offset, 'e', state.epoch, 'l', state.prev)
  redis.call('PEXPIRE', stream, ttl)
  redis.call('PEXPIRE', state.position, ttl)
end
return out
"""

# One atomic snapshot: oldest id, the id before it, newest id, entries from ARGV[1] on, and the
# channel's epoch and last offset. Only ids of the oldest and newest entries leave Redis, not data.
_READ_LUA = """
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if not first[1] then return {} end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = ''
local fields = first[1][2]
for i = 1, #fields, 2 do
  if fields[i] == 'p' then prev = fields[i + 1] end
end
local items = {}
if ARGV[1] ~= '' then
  items = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
end
local meta = redis.call('HMGET', KEYS[2], 'e', 'o')
return {first[1][1], prev, last[1][1], items, meta[1] or '', meta[2] or '0'}
"""


@dataclasses.dataclass(frozen=True, slots=True)
class _Window:
    """A decoded read of a channel's stream: the oldest id, the id before it, the newest id, the
    events from the requested start, the epoch and the last offset. Shared by equal reads: read only."""

    first: str
    before: str
    latest: str
    events: list[Event]
    wire: orjson.Fragment
    epoch: str | None
    latest_offset: int


class RedisHistory:
    """History in one Redis Stream per channel: ids from Redis, monotonic across all nodes."""

    def __init__(self, redis: aioredis.Redis, prefix: str, cap: int, ttl_seconds: float, *,
                 health: RedisHealth | None = None, approximate: bool = True,
                 peer_channels: tuple[str, str] | None = None) -> None:
        """`peer_channels`: the pub/sub channel every node listens on and this node's own
        (`RedisFanoutManager.peer_channels`), so each stored event tells whether another node listens."""
        if cap < 1 or ttl_seconds <= 0:
            raise ValueError("cap must be >= 1 and ttl_seconds > 0")
        self.redis = redis
        self.peer_channels = peer_channels or ("", "")
        self.prefix = prefix
        self.cap = cap
        self.ttl = ttl_seconds
        self.health = health or RedisHealth()
        # `MAXLEN ~` trims whole radix nodes (cheap) and may keep up to ~100 extra entries.
        self._trim = "~" if approximate else "="
        self._append = redis.register_script(_APPEND_LUA)
        self._encoded_keys: dict[str, tuple[bytes, bytes]] = {}
        self._read = redis.register_script(_READ_LUA)
        # Concurrent publishes share round trips and script calls: one per batch, not one each.
        self._appends: Batcher[tuple[str, str, bytes]] = Batcher(self._append_batch, name="history.append",
                                                                 max_batch=500)
        # A reconnect storm replays the same position of a channel to thousands of clients at once.
        self._windows: SharedRuns[tuple[str, IdKey | None, int], _Window | None] = SharedRuns(
            self._window, name="history.read")

    def key(self, channel: str) -> str:
        """Redis key of a channel's stream."""
        return f"{self.prefix}stream:{channel}"

    def _append_keys(self, channel: str) -> tuple[bytes, bytes]:
        """The channel's stream and position keys, encoded (remembered: the client checks and
        encodes every argument of a command in Python, and a str costs it more than bytes)."""
        keys = self._encoded_keys.get(channel)
        if keys is None:
            if len(self._encoded_keys) >= ENCODED_KEYS_CACHE_SIZE:
                self._encoded_keys.clear()  # channels come and go (one per conversation): stay bounded
            keys = self._encoded_keys[channel] = (self.key(channel).encode(), self.meta_key(channel).encode())
        return keys

    def meta_key(self, channel: str) -> str:
        """Redis key of a channel's position (last offset and epoch)."""
        return f"{self.prefix}position:{channel}"

    async def _append_batch(self, events: list[tuple[str, str, bytes]]) -> list[Any]:
        """Store a batch of (channel, type, raw data) with one script call; one reply per event."""
        keys: list[bytes] = []
        args: list[Any] = [self._trim, self.cap, max(1, int(self.ttl * 1000)), new_epoch(), *self.peer_channels]
        for channel, type, raw in events:
            keys += self._append_keys(channel)
            args.append(b"%s\n%s" % (type.encode(), raw))
        return await self.health.call("history.append", lambda: self._append(keys=keys, args=args))

    async def _appended(self, events: list[tuple[str, str, bytes]]) -> list[Any]:
        """Replies for events appended through the batcher, in order; raises the first failure."""
        futures = [self._appends.submit(event) for event in events]
        replies: list[Any] = []
        failure: BaseException | None = None
        for future in futures:  # every future is awaited, so no failure goes unretrieved
            try:
                replies.append(await future)
            except Exception as exc:  # noqa: BLE001 - the first one is raised below
                failure = failure or exc
        if failure is not None:
            raise failure
        return replies

    async def append(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        """Store an event and return it with its id and position; BusUnavailable if Redis is down."""
        raw, payload = _normalise(data)
        [reply] = await self._appended([(channel, type, raw)])
        return self._stored(channel, type, payload, reply)

    async def append_many(self, events: list[tuple[str, str, dict[str, Any]]]) -> list[Event]:
        """Store (channel, type, data) events in order, batched with any concurrent appends.

        Not atomic: if Redis fails midway, some events may be stored; callers retry the batch,
        so delivery is at least once.
        """
        # The outbox relay publishes one event to several channels with the same data object:
        # encoded and decoded once.
        normalised: dict[int, tuple[bytes, dict[str, Any]]] = {}
        prepared = []
        for channel, type, data in events:
            if id(data) not in normalised:
                normalised[id(data)] = _normalise(data)
            prepared.append((channel, type, *normalised[id(data)]))
        replies = await self._appended([(channel, type, raw) for channel, type, raw, _ in prepared])
        return [self._stored(channel, type, payload, reply)
                for reply, (channel, type, _, payload) in zip(replies, prepared)]

    @staticmethod
    def _stored(channel: str, type: str, payload: dict[str, Any], reply: list[Any]) -> Event:
        entry_id = redis_text(reply[0])
        return Event(entry_id, channel, type, payload, parse_id(entry_id, field="id")[0] / 1000,
                     int(reply[1]), redis_text(reply[2]), reply[3] > 0)

    async def _snapshot(self, channel: str, start: IdKey | None, limit: int) -> list[Any]:
        args = ["" if start is None else format_id(start), limit]
        return await self.health.call(
            "history.read", lambda: self._read(keys=[self.key(channel), self.meta_key(channel)], args=args))

    async def read_after(self, channel: str, since: str | None, limit: int = 1000,
                         epoch: str | None = None) -> ReplayResult:
        """Events after `since` (oldest first, at most `limit`), the latest position and the gap flag."""
        _check_limit(limit)
        key = None if since is None else parse_id(since)
        start = None if key is None else _next_key(key)
        window = await self._windows.call((channel, start, limit))
        if window is None:
            return ReplayResult([], NO_EVENTS, None, key is not None and _gap(key, None, None))
        if key is None:
            return ReplayResult([], NO_EVENTS, window.latest, False, window.epoch, window.latest_offset)
        before_key = parse_id(window.before, field="id") if window.before else None
        gap = _gap(key, parse_id(window.first, field="id"), before_key) or _epoch_gap(epoch, window.epoch)
        return ReplayResult(window.events, window.wire, window.latest, gap, window.epoch, window.latest_offset)

    async def _window(self, request: tuple[str, IdKey | None, int]) -> _Window | None:
        """One snapshot of a channel's stream from `start`, decoded (shared by equal reads)."""
        channel, start, limit = request
        reply = await self._snapshot(channel, start, limit)
        if not reply:
            return None
        epoch = redis_text(reply[4]) or None
        events = [self._event(channel, item, epoch) for item in reply[3]] if start is not None else []
        return _Window(redis_text(reply[0]), redis_text(reply[1]), redis_text(reply[2]), events,
                       wire_array(events), epoch, int(reply[5]))

    async def reset(self, channel: str) -> None:
        """Forget the channel's history, so its next event opens a new epoch."""
        await self.health.call("history.reset", lambda: self.redis.delete(self.key(channel), self.meta_key(channel)))

    async def latest_id(self, channel: str) -> str | None:
        """Id of the newest retained event of the channel, None when there is none."""
        reply = await self._snapshot(channel, None, 1)
        return redis_text(reply[2]) if reply else None

    @staticmethod
    def _event(channel: str, item: list[Any], epoch: str | None) -> Event:
        entry_id, flat = redis_text(item[0]), item[1]
        fields = {redis_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
        offset = fields.get("o")
        return Event(entry_id, channel, redis_text(fields["t"]), jsonutil.loads(fields["d"]),
                     parse_id(entry_id, field="id")[0] / 1000, int(offset) if offset is not None else None, epoch)


# --- the bus ---------------------------------------------------------------------------------


class EventBus:
    """Publishes events (history first, then delivery) and replays a channel's history."""

    def __init__(self, history: HistoryStore, deliver: Callable[[Event], Awaitable[None]]) -> None:
        self.history = history
        self._deliver = deliver
        # Channels that got events no history holds (published while Redis was down): their
        # watchers on other nodes have a hole no offset shows until the channel is reset.
        self.unstored_channels: set[str] = set()

    async def publish(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        """The one way domain code emits an event: append to history, then deliver to the room.

        When history cannot be written (BusUnavailable), the event still reaches this node's own
        clients, unstored (no id, no position), and the channel is remembered for `reset_unstored`.
        A delivery failure is logged, not raised: the event is already in history, clients recover
        it on reconnect, and a retry by the caller would duplicate it under a new id.
        """
        check_channel(channel)
        _check_type(type)
        try:
            event = await self.history.append(channel, type, data)
        except BusUnavailable:
            event = Event(None, channel, type, _normalise(data)[1], time.time())
            self.unstored_channels.add(channel)
        await self._deliver_logged(event)
        return event

    async def publish_many(self, events: list[tuple[str, str, dict[str, Any]]]) -> list[Event]:
        """Publish (channel, type, data) events in order: history in one round trip, then delivery.

        Raises BusUnavailable when history cannot be written: the caller (the outbox relay) keeps
        the events and retries, so they reach every node once Redis is back.
        """
        for channel, type, _ in events:
            check_channel(channel)
            _check_type(type)
        stored = await self.history.append_many(events)
        for event in stored:
            await self._deliver_logged(event)
        return stored

    async def _deliver_logged(self, event: Event) -> None:
        try:
            await self._deliver(event)
        except Exception:
            log.exception("bus_deliver_failed", channel=event.channel, type=event.type, id=event.id)

    async def reset_unstored(self) -> list[str]:
        """Reset the history of channels that got unstored events, so every watcher sees a new epoch.

        Returns the channels reset; raises BusUnavailable (the rest stay remembered) if Redis is
        still down.
        """
        done: list[str] = []
        for channel in sorted(self.unstored_channels):
            await self.history.reset(channel)
            self.unstored_channels.discard(channel)
            done.append(channel)
        return done

    async def replay(self, channel: str, since: str | None, limit: int = 1000,
                     epoch: str | None = None) -> ReplayResult:
        """What a subscriber missed after `since` (in `epoch`); InvalidArgument if malformed."""
        check_channel(channel)
        return await self.history.read_after(channel, since, limit, epoch)

    async def latest_id(self, channel: str) -> str | None:
        """Id of the channel's newest event, None when it has none."""
        check_channel(channel)
        return await self.history.latest_id(channel)
