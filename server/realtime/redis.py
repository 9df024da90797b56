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


class RedisHealth:
    """Whether Redis answered lately; logs once per outage and once on recovery, not per call."""

    def __init__(self, name: str = "redis", *, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.ok = True
        self.last_error: str | None = None
        self._clock = clock
        self.since = clock()  # when `ok` last changed

    def record_ok(self) -> None:
        """Note a successful call; logs the recovery if an outage was under way."""
        if not self.ok:
            now = self._clock()
            log.info("redis_recovered", service=self.name, down_seconds=round(now - self.since, 3))
            self.ok, self.since = True, now

    def record_error(self, exc: BaseException, op: str) -> None:
        """Note a failed call; logs only the first failure of an outage."""
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


def connect_redis(url: str, **options: Any) -> aioredis.Redis:
    """A Redis client with timeouts suited to the bus: a dead Redis fails calls fast."""
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    settings: dict[str, Any] = {
        "socket_connect_timeout": 2.0,
        "socket_timeout": 5.0,
        "health_check_interval": 15,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
    }
    settings.update(options)
    return aioredis.Redis.from_url(url, **settings)


def redis_text(value: bytes | str) -> str:
    """A Redis reply as text, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else value


REDIS: web.AppKey["aioredis.Redis | None"] = web.AppKey("redis")
REDIS_HEALTH: web.AppKey[RedisHealth] = web.AppKey("redis_health", RedisHealth)
