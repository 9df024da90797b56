"""Redis connections and health: fast-failing clients, one log line per outage, retry with backoff."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Awaitable, Callable, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
import structlog
from aiohttp import web

from server.core.errors import Unavailable
from server.core.settings import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")


class BusUnavailable(Unavailable):
    """Redis, which holds history and presence, is not answering (maps to unavailable)."""

    def __init__(self, message: str = "the event bus is unavailable, retry shortly") -> None:
        super().__init__(message)


# Errors that mean "Redis is not there right now", as opposed to a bug in a command.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,  # includes BusyLoadingError (Redis loading after a restart)
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica during failover
    OSError,  # includes builtin TimeoutError
)


class PoolExhausted(redis_errors.ConnectionError):
    """Every pooled connection stayed busy for REDIS_POOL_TIMEOUT: this node is saturated, Redis is up."""


class WaitingConnectionPool(aioredis.BlockingConnectionPool):
    """A bounded pool whose callers wait for a free connection; a wait that times out is PoolExhausted.

    redis-py's BlockingConnectionPool reports that timeout as a plain ConnectionError, the same
    type as "Redis refused the connection"; telling them apart keeps a reconnect storm from being
    logged and reported (readiness, metrics) as a Redis outage.
    """

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        """A free connection, waiting up to the pool's timeout for one (PoolExhausted after it)."""
        try:
            return await super().get_connection(*args, **kwargs)
        except redis_errors.ConnectionError as exc:
            # Only the wait raises from a TimeoutError; a failed connect raises redis' own TimeoutError.
            if isinstance(exc.__cause__, TimeoutError):
                raise PoolExhausted(f"no Redis connection free within {self.timeout} s "
                                    f"({self.max_connections} in use)") from exc
            raise


class RedisHealth:
    """Whether Redis answered lately; logs once per outage and once on recovery, not per call."""

    def __init__(self, name: str = "redis", *, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.ok = True
        self.last_error: str | None = None
        self._clock = clock
        self.since = clock()  # when `ok` last changed
        self.saturated = False  # a pool wait timed out since the last successful call

    def record_ok(self) -> None:
        """Note a successful call; logs the recovery if an outage was under way."""
        self.saturated = False
        if not self.ok:
            now = self._clock()
            log.info("redis_recovered", service=self.name, down_seconds=round(now - self.since, 3))
            self.ok, self.since = True, now

    def record_error(self, exc: BaseException, op: str) -> None:
        """Note a failed call; logs only the first failure of an outage (or of a saturation)."""
        if isinstance(exc, PoolExhausted):
            # Redis answers, this node just has more concurrent calls than connections: not an outage.
            if not self.saturated:
                log.warning("redis_pool_exhausted", service=self.name, op=op, error=str(exc))
                self.saturated = True
            return
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.ok:
            log.warning("redis_unavailable", service=self.name, op=op, error=self.last_error)
            self.ok, self.since = False, self._clock()

    def snapshot(self) -> dict[str, Any]:
        """State for /readyz and /metrics."""
        return {"ok": self.ok, "last_error": self.last_error, "since": self.since}

    async def call(self, op: str, factory: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation; a connection failure becomes BusUnavailable."""
        try:
            result = await factory()
        except UNAVAILABLE_ERRORS as exc:
            self.record_error(exc, op)
            raise BusUnavailable() from exc
        self.record_ok()
        return result

    async def ping(self, redis: aioredis.Redis) -> bool:
        """Probe Redis now (readiness checks); returns the resulting `ok`."""
        try:
            await self.call("ping", redis.ping)
        except BusUnavailable:
            pass
        return self.ok

    async def run_with_backoff(self, factory: Callable[[], Awaitable[Any]], name: str, *,
                               initial: float = 0.1, maximum: float = 5.0) -> None:
        """Keep a long-running coroutine alive: restart it with backoff whenever it fails.

        Returns when the coroutine returns; cancellation ends it. No failure is silent: Redis
        outages go through `record_error` (logged once), any other error is logged each time.
        """
        delay = initial
        while True:
            started = time.monotonic()
            try:
                await factory()
                return
            except BusUnavailable:
                pass  # already recorded and logged by `call`
            except UNAVAILABLE_ERRORS as exc:
                self.record_error(exc, name)
            except Exception:
                log.exception("background_task_failed", task=name)
            if time.monotonic() - started > maximum:
                delay = initial  # it ran fine for a while: this is a new failure, not the same one
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: nodes do not stampede
            delay = min(delay * 2, maximum)


_DEFAULTS = Settings()


def connect_redis(url: str, *, pool_size: int = _DEFAULTS.redis_pool_size,
                  pool_timeout: float = _DEFAULTS.redis_pool_timeout, **options: Any) -> aioredis.Redis:
    """A Redis client with timeouts suited to the bus: a dead Redis fails calls fast.

    Its pool holds at most `pool_size` connections; a call that finds them all busy waits up to
    `pool_timeout` seconds for one (REDIS_POOL_SIZE, REDIS_POOL_TIMEOUT), then raises PoolExhausted.
    """
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    settings: dict[str, Any] = {
        "socket_connect_timeout": 2.0,
        "socket_timeout": 5.0,
        "health_check_interval": 15,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
    }
    settings.update(options)
    pool = WaitingConnectionPool.from_url(url, max_connections=pool_size, timeout=pool_timeout, **settings)
    return aioredis.Redis.from_pool(pool)


def redis_text(value: bytes | str) -> str:
    """A Redis reply as text, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else value


REDIS: web.AppKey["aioredis.Redis | None"] = web.AppKey("redis")
REDIS_HEALTH: web.AppKey[RedisHealth] = web.AppKey("redis_health", RedisHealth)
