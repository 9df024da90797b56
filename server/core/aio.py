"""asyncio helpers that background loops share."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Generic, TypeVar

Item = TypeVar("Item")
Key = TypeVar("Key")
Result = TypeVar("Result")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` seconds pass; True when it was set.

    `asyncio.timeout` rather than `asyncio.wait_for`: on Python 3.11, `wait_for` can swallow a
    cancellation that lands as its timeout fires (gh-86296), and a background loop that swallows
    its cancellation keeps its pooled connection and hangs the shutdown.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


class Batcher(Generic[Item]):
    """Sends items in batches: every item queued while the previous batch was out goes in the next.

    An item waits at most one batch's round trip before it is sent, and a burst of N items costs
    about N / `max_batch` round trips instead of N. Batches go out one at a time, in queue order,
    so two items for the same key keep their order. `run` returns one result per item (an
    exception instance fails that item alone); if `run` raises, every item of the batch fails.
    """

    def __init__(self, run: Callable[[list[Item]], Awaitable[list[Any]]], *, name: str,
                 max_batch: int = 1000, max_pending: int = 50_000) -> None:
        self._run = run
        self.name = name
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.batches = 0
        self._pending: list[tuple[Item, asyncio.Future | None]] = []
        self._sender: asyncio.Task | None = None
        self._room = asyncio.Event()

    def submit(self, item: Item) -> asyncio.Future:
        """Queue an item; the future gets its result."""
        future = asyncio.get_running_loop().create_future()
        self._queue(item, future)
        return future

    async def send(self, item: Item) -> None:
        """Queue an item whose result nobody needs; waits only while `max_pending` are queued."""
        while len(self._pending) >= self.max_pending:
            self._room.clear()
            await self._room.wait()
        self._queue(item, None)

    async def flush(self) -> None:
        """Wait until everything queued so far has been sent (or has failed)."""
        while self._sender is not None:
            await asyncio.shield(self._sender)

    def _queue(self, item: Item, future: asyncio.Future | None) -> None:
        self._pending.append((item, future))
        if self._sender is None:
            # Created, not yet run: every item queued in this loop iteration joins the first batch.
            self._sender = asyncio.create_task(self._send_all(), name=f"batcher:{self.name}")

    async def _send_all(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:self.max_batch]
                del self._pending[:self.max_batch]
                self._room.set()
                await self._send(batch)
        finally:
            self._sender = None
            for _, future in self._pending:  # cancelled (shutdown): nothing will send these
                if future is not None and not future.done():
                    future.cancel()
            self._pending.clear()

    async def _send(self, batch: list[tuple[Item, asyncio.Future | None]]) -> None:
        self.batches += 1
        try:
            results = await self._run([item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
            results = [exc] * len(batch)
        for result, (_, future) in zip(results, batch):
            if future is None or future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


class SharedRuns(Generic[Key, Result]):
    """Equal calls share one run: a call made while an equal run is out waits for the next run.

    The run a caller gets always starts after the call was made, so its result is never older than
    the call (a subscriber that joined a room and then reads history misses nothing between the
    two). A thousand clients reconnecting to one channel with the same position cost one read.
    """

    def __init__(self, run: Callable[[Key], Awaitable[Result]], *, name: str) -> None:
        self._run = run
        self.name = name
        self.runs = 0
        self._running: dict[Key, asyncio.Task] = {}
        self._next: dict[Key, asyncio.Task] = {}

    async def call(self, key: Key) -> Result:
        """The result of a run of `key` that starts after this call."""
        task = self._next.get(key)
        if task is None:
            task = asyncio.create_task(self._start(key, self._running.get(key)), name=f"shared:{self.name}")
            self._next[key] = task
        # Shielded: one caller giving up does not cancel the run the others wait for.
        return await asyncio.shield(task)

    async def _start(self, key: Key, previous: asyncio.Task | None) -> Result:
        if previous is not None:
            await asyncio.wait([previous])
        task = self._next.pop(key)
        self._running[key] = task
        self.runs += 1
        try:
            return await self._run(key)
        finally:
            if self._running.get(key) is task:
                del self._running[key]
