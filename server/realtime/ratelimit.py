"""Rate limits: a token bucket per connection or client; attempt counters per account or address."""

from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

from server.core.cache import ExpiringCache
from server.realtime.redis import BusUnavailable, RedisHealth


class TokenBucket:
    """Rate limit: `burst` tokens, refilled at `rate` per second."""

    __slots__ = ("rate", "burst", "_tokens", "_stamp", "_clock")

    def __init__(self, rate: float, burst: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def try_take(self, n: int = 1) -> float:
        """Take `n` tokens: 0.0 when allowed, else the seconds until they will be there (retry_after)."""
        if n < 1 or n > self.burst:
            raise ValueError("n must be between 1 and burst (more could never be allowed)")
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= n:
            self._tokens -= n
            return 0.0
        return (n - self._tokens) / self.rate


# INCR the window's counter; the first hit starts the window. Returns {count, ms left in the window}.
_HIT_LUA = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return {count, ttl}
"""


class AttemptLimiter:
    """At most `limit` attempts per key in a fixed window of `window` seconds, counted in Redis when
    there is one (every node counts together) and in this process otherwise or while Redis is down.

    Keys are digested: the counters name no account or address in Redis.
    """

    def __init__(self, name: str, limit: int, window: float, *, redis: Any = None, prefix: str = "",
                 health: RedisHealth | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.name, self.limit, self.window = name, limit, window
        self._redis = redis
        self._prefix = f"{prefix}attempts:{name}:"
        self._health = health or RedisHealth(f"attempts:{name}")
        self._hit = redis.register_script(_HIT_LUA) if redis is not None else None
        self._clock = clock
        self._local: ExpiringCache[str, list[float]] = ExpiringCache(window, 100_000, clock=clock)

    @staticmethod
    def _digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    async def hit(self, key: str) -> float:
        """Count an attempt: 0.0 while within the limit, else the seconds until the window ends."""
        digest = self._digest(key)
        if self._hit is not None:
            try:
                count, ttl_ms = await self._health.call(
                    "attempt_hit", lambda: self._hit(keys=[self._prefix + digest], args=[int(self.window * 1000)]))
                return 0.0 if count <= self.limit else max(ttl_ms, 1) / 1000
            except BusUnavailable:
                pass  # counted here until Redis is back: a limit per node beats none
        now = self._clock()
        window = self._local.get(digest)
        if window is None:
            window = [0, now + self.window]
            self._local.put(digest, window)
        window[0] += 1
        return 0.0 if window[0] <= self.limit else max(window[1] - now, 0.001)

    async def peek(self, key: str) -> float:
        """Like `hit` without counting: whether the key is over its limit now."""
        digest = self._digest(key)
        if self._redis is not None:
            try:
                count, ttl_ms = await self._health.call("attempt_peek", lambda: self._peek_redis(digest))
                return 0.0 if count < self.limit else max(ttl_ms, 1) / 1000
            except BusUnavailable:
                pass
        window = self._local.get(digest)
        if window is None or window[0] < self.limit:
            return 0.0
        return max(window[1] - self._clock(), 0.001)

    async def _peek_redis(self, digest: str) -> tuple[int, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            count, ttl = await pipe.get(self._prefix + digest).pttl(self._prefix + digest).execute()
        return int(count or 0), int(ttl)

    async def reset(self, key: str) -> None:
        """Forget a key's attempts (a successful sign-in clears its failures)."""
        digest = self._digest(key)
        self._local.pop(digest)
        if self._redis is not None:
            try:
                await self._health.call("attempt_reset", lambda: self._redis.delete(self._prefix + digest))
            except BusUnavailable:
                pass
