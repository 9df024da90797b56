"""server.aio: background loops' waits must never swallow their cancellation."""

from __future__ import annotations

import asyncio

import pytest

from server.core.aio import wait_event


async def test_wait_event_reports_set_and_timeout():
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 10) is True


@pytest.mark.parametrize("turns", range(6))
async def test_a_cancellation_racing_the_wake_up_is_never_swallowed(turns):
    # Python 3.11's wait_for returns the result instead when the event fires in the same turns as
    # the cancel (gh-86296); a relay loop doing that would keep running after shutdown.
    event = asyncio.Event()
    task = asyncio.create_task(wait_event(event, 10))
    await asyncio.sleep(0)
    event.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    if task.cancel():
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        assert task.result() is True
