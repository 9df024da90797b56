"""asyncio helpers that background loops share."""

from __future__ import annotations

import asyncio


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
