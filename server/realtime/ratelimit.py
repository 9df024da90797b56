"""Rate limits: a token bucket per connection or client."""

from __future__ import annotations

import time
from typing import Callable


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
