"""Presence: who watches each channel, in memory on one node or in Redis across nodes."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Protocol, runtime_checkable

import redis.asyncio as aioredis
import structlog

from server.core import jsonutil
from server.realtime.redis import BusUnavailable, RedisHealth

log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Member:
    """One connection watching a channel, on one server process (node)."""

    node_id: str
    connection_id: str
    user_id: str | None = None


@runtime_checkable
class PresenceTracker(Protocol):
    """Who watches each channel; counts are distinct connections."""

    async def join(self, channel: str, member: Member) -> int:
        """Add a member; returns the channel's count."""
        ...

    async def leave(self, channel: str, member: Member) -> int:
        """Remove a member; returns the channel's count."""
        ...

    async def leave_all(self, node_id: str, connection_id: str) -> dict[str, int]:
        """Remove a connection from every channel (on disconnect); returns channel -> count."""
        ...

    async def count(self, channel: str) -> int:
        """Number of connections watching the channel."""
        ...

    async def members(self, channel: str) -> list[Member]:
        """The channel's members."""
        ...

    async def heartbeat(self, node_id: str) -> int:
        """Keep a node's members alive; returns how many were refreshed."""
        ...


class MemoryPresence:
    """Single-node presence: the process is the only node, so it needs no expiry."""

    def __init__(self) -> None:
        self._channels: dict[str, dict[tuple[str, str], Member]] = {}
        self._by_connection: dict[tuple[str, str], set[str]] = {}

    async def join(self, channel: str, member: Member) -> int:
        """Add a member; returns the channel's count."""
        conn = (member.node_id, member.connection_id)
        self._channels.setdefault(channel, {})[conn] = member
        self._by_connection.setdefault(conn, set()).add(channel)
        return len(self._channels[channel])

    async def leave(self, channel: str, member: Member) -> int:
        """Remove a member; returns the channel's count."""
        conn = (member.node_id, member.connection_id)
        channels = self._by_connection.get(conn)
        if channels is not None:
            channels.discard(channel)
            if not channels:
                del self._by_connection[conn]
        watchers = self._channels.get(channel)
        if watchers is None:
            return 0
        watchers.pop(conn, None)
        if not watchers:
            del self._channels[channel]
            return 0
        return len(watchers)

    async def leave_all(self, node_id: str, connection_id: str) -> dict[str, int]:
        """Remove a connection from every channel (on disconnect); returns channel -> count."""
        channels = sorted(self._by_connection.get((node_id, connection_id), ()))
        member = Member(node_id, connection_id)
        return {channel: await self.leave(channel, member) for channel in channels}

    async def count(self, channel: str) -> int:
        """Number of connections watching the channel."""
        return len(self._channels.get(channel, ()))

    async def members(self, channel: str) -> list[Member]:
        """The channel's members."""
        return list(self._channels.get(channel, {}).values())

    async def heartbeat(self, node_id: str) -> int:
        """Nothing expires in one process; returns how many members the node has."""
        return sum(1 for conn in self._by_connection if conn[0] == node_id)


# Times come from Redis (TIME), so nodes with skewed clocks agree on who expired.
_NOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_JOIN_LUA = _NOW_LUA + """
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[1], ARGV[3]) end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""

_LEAVE_LUA = _NOW_LUA + """
for i = 1, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""

_COUNT_LUA = _NOW_LUA + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[1] == 'members' then return redis.call('ZRANGE', KEYS[1], 0, -1) end
return redis.call('ZCARD', KEYS[1])
"""

_HEARTBEAT_LUA = _NOW_LUA + """
local expires = now + tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], expires, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return #KEYS
"""


class RedisPresence:
    """Presence shared by all nodes: a sorted set per channel scored by each member's expiry.

    A node's members live while it calls `heartbeat` (every ttl/3 or so); a crashed node's
    members expire after the TTL and are removed whenever the channel is read. The node keeps a
    local list of its own members to refresh: they are its own connections, so that list dies
    with the process, as it should. Joins are listed locally before Redis is written, so the
    first heartbeat after a Redis outage (or a Redis restart that lost data) restores them.
    """

    _HEARTBEAT_BATCH = 256

    def __init__(self, redis: aioredis.Redis, prefix: str, ttl_seconds: float, *,
                 health: RedisHealth | None = None) -> None:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be > 0")
        self.redis = redis
        self.prefix = prefix
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.health = health or RedisHealth()
        # node_id -> {(channel, connection_id): encoded member}
        self._local: dict[str, dict[tuple[str, str], str]] = {}
        self._join = redis.register_script(_JOIN_LUA)
        self._leave = redis.register_script(_LEAVE_LUA)
        self._count = redis.register_script(_COUNT_LUA)
        self._heartbeat = redis.register_script(_HEARTBEAT_LUA)

    def key(self, channel: str) -> str:
        """Redis key of a channel's presence set."""
        return f"{self.prefix}presence:{channel}"

    @staticmethod
    def _encode(member: Member) -> str:
        return jsonutil.dumps([member.node_id, member.connection_id, member.user_id])

    async def join(self, channel: str, member: Member) -> int:
        """Add a member; returns the channel's count."""
        encoded = self._encode(member)
        local = self._local.setdefault(member.node_id, {})
        # The same connection joining again (another user id) replaces itself: count connections.
        replaced = local.get((channel, member.connection_id))
        local[(channel, member.connection_id)] = encoded
        stale = replaced if replaced is not None and replaced != encoded else ""
        args = [self.ttl_ms, encoded, stale]
        return int(await self.health.call(
            "presence.join", lambda: self._join(keys=[self.key(channel)], args=args)))

    async def leave(self, channel: str, member: Member) -> int:
        """Remove a member; returns the channel's count."""
        local = self._local.get(member.node_id, {})
        known = local.pop((channel, member.connection_id), None)
        if not local:
            self._local.pop(member.node_id, None)
        encoded = {self._encode(member)} | ({known} if known else set())
        return int(await self.health.call(
            "presence.leave", lambda: self._leave(keys=[self.key(channel)], args=sorted(encoded))))

    async def leave_all(self, node_id: str, connection_id: str) -> dict[str, int]:
        """Remove a connection from every channel (on disconnect); returns channel -> count."""
        local = self._local.get(node_id, {})
        channels = sorted(ch for ch, conn in local if conn == connection_id)
        member = Member(node_id, connection_id)
        return {channel: await self.leave(channel, member) for channel in channels}

    async def count(self, channel: str) -> int:
        """Number of connections watching the channel (expired members removed first)."""
        return int(await self.health.call(
            "presence.count", lambda: self._count(keys=[self.key(channel)], args=["count"])))

    async def members(self, channel: str) -> list[Member]:
        """The channel's live members."""
        raw = await self.health.call(
            "presence.members", lambda: self._count(keys=[self.key(channel)], args=["members"]))
        return [Member(*jsonutil.loads(item)) for item in raw]

    async def heartbeat(self, node_id: str) -> int:
        """Push the expiry of every member of this node to now + ttl; returns how many."""
        snapshot = list(self._local.get(node_id, {}).items())
        for start in range(0, len(snapshot), self._HEARTBEAT_BATCH):
            batch = snapshot[start:start + self._HEARTBEAT_BATCH]
            keys = [self.key(channel) for (channel, _), _ in batch]
            args = [self.ttl_ms, *(encoded for _, encoded in batch)]
            await self.health.call(
                "presence.heartbeat", lambda: self._heartbeat(keys=keys, args=args))
        # A leave that ran while the heartbeat was in flight may have been undone by it: redo it.
        current = self._local.get(node_id, {})
        undone = [(channel, encoded) for (channel, conn), encoded in snapshot
                  if current.get((channel, conn)) != encoded]
        for channel, encoded in undone:
            await self.health.call(
                "presence.leave", lambda: self._leave(keys=[self.key(channel)], args=[encoded]))
        return len(snapshot)


async def heartbeat_loop(presence: PresenceTracker, node_id: str, interval: float) -> None:
    """Refresh a node's presence every `interval` seconds until cancelled; errors never end it."""
    while True:
        try:
            await presence.heartbeat(node_id)
        except BusUnavailable:
            pass  # logged once per outage by RedisHealth; the next beat retries
        except Exception:
            log.exception("presence_heartbeat_failed", node_id=node_id)
        await asyncio.sleep(interval)
