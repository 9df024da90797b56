"""A bounded in-process cache whose entries expire a fixed time after they were stored."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringCache(Generic[K, V]):
    """Entries live `ttl` seconds. Expired ones are dropped as new ones come in, so the cache holds
    at most what one TTL brings (and never more than `max_entries`, the oldest going first).

    Every entry lives the same TTL, so insertion order is also expiry order: a `put` moves its key
    to the end, and the expired entries are always at the front.
    """

    def __init__(self, ttl: float, max_entries: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError("ttl must be > 0 and max_entries >= 1")
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The value if it is there and fresh, else None."""
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        """Store a value for the TTL, dropping expired entries and, past the bound, the oldest."""
        now = self._clock()
        self._entries.pop(key, None)
        while self._entries:
            expires, _ = next(iter(self._entries.values()))
            if expires > now and len(self._entries) < self._max:
                break
            self._entries.popitem(last=False)
        self._entries[key] = (now + self._ttl, value)

    def pop(self, key: K) -> None:
        """Forget one key."""
        self._entries.pop(key, None)

    def pop_values(self, predicate: Callable[[V], bool]) -> None:
        """Forget every entry whose value matches."""
        for key in [key for key, (_, value) in self._entries.items() if predicate(value)]:
            del self._entries[key]
