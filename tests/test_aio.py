"""server.aio: background loops' waits must never swallow their cancellation; shared runs are never
older than their call."""

from __future__ import annotations

import asyncio

import pytest

from server.core.aio import SharedRuns, wait_event


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


async def test_equal_calls_share_a_run_that_starts_after_each_of_them():
    state = {"value": 0}
    started: list[int] = []
    release = asyncio.Event()

    async def read(key: str) -> tuple[str, int]:
        started.append(state["value"])
        await release.wait()
        return key, state["value"]

    shared = SharedRuns(read, name="test")
    first = [asyncio.create_task(shared.call("a")) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert shared.runs == 1
    # Made while the first run is out: they must not get its result, which was read before them.
    state["value"] = 1
    second = [asyncio.create_task(shared.call("a")) for _ in range(3)]
    other = asyncio.create_task(shared.call("b"))
    await asyncio.sleep(0.01)
    assert shared.runs == 2  # "b" runs at once; the second "a" run waits for the first
    release.set()
    assert [await t for t in first] == [("a", 1)] * 3
    assert [await t for t in second] == [("a", 1)] * 3
    assert await other == ("b", 1)
    assert shared.runs == 3 and started == [0, 1, 1]


async def test_a_caller_giving_up_does_not_cancel_the_shared_run_and_failures_reach_every_caller():
    release = asyncio.Event()

    async def read(key: str) -> str:
        await release.wait()
        raise ConnectionError(key)

    shared = SharedRuns(read, name="test")
    impatient = asyncio.create_task(shared.call("a"))
    patient = asyncio.create_task(shared.call("a"))
    await asyncio.sleep(0.01)
    impatient.cancel()
    await asyncio.sleep(0.01)
    release.set()
    with pytest.raises(ConnectionError):
        await patient
    assert impatient.cancelled() and shared.runs == 1
