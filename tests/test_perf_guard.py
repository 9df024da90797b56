"""Regression guard for the broadcast hot path: ratios measured in one run, never absolute times.

Our fan-out and bare python-socketio serve the same Node socket.io-client connections and the same
broadcasts (bench/fanout.py's servers and load generator, briefly); the guard compares the least
user-mode CPU each server spends per delivered message in three runs. Below 5x (the issue's bar)
the guard fails.

User CPU, not user + system: the system share is the kernel's socket writes, which grow with
whatever else the machine does, and it is most of ours. A CI run read ours at 20.6 us per delivery
and bare at 101.4 (4.9x) where a quiet machine reads 6.4-7.5 and 76-79; those figures fit a system
share about three times the quiet one for both (quiet: ours 2.8-5.0 us, bare 6.9-7.2). The user
share is the Python each server runs per delivery, which this guard is about: ours 2.5-3.6 us,
bare 69-72 us here (stop 41).

600 clients at 15 broadcasts/s, 4 s a run. At 300 clients for 3 s ours spent about 20 ticks of CPU
(10 ms each) a run and the ratio read exactly 5.00x; a room twice as large costs bare
python-socketio more per delivery and ours the same, and a longer window makes a tick a smaller
part of the figure.
"""

from __future__ import annotations

import asyncio

import pytest
import socketio

from bench.fanout import LoadGen, cpu_split, ensure_node_modules, free_port, start_server, wait_port

pytestmark = pytest.mark.serial  # a CPU ratio: `make test` runs it after the parallel pass, alone

CLIENTS = 600
RATE = 15  # broadcasts/s: 9,000 deliveries/s, within what bare python-socketio sustains here
SECONDS = 4.0
SIZE = 200
ROUNDS = 3  # two gave 4.8x once in a CI run, after the parallel pass, for code measured at 5.5-5.7x


async def cpu_per_delivery(kind: str) -> tuple[float, float, int]:
    """Server user and system CPU seconds per delivered message, and how many were delivered."""
    port = free_port()
    server = start_server(kind, port, None)
    gen = None
    control = socketio.AsyncClient(reconnection=False)
    try:
        await wait_port(port)
        gen = await LoadGen.start(port, CLIENTS, None)
        await control.connect(f"http://127.0.0.1:{port}", namespaces=["/control"], transports=["websocket"],
                              wait_timeout=10)
        await control.call("start", {"rate": RATE, "duration": 0.5, "size": SIZE}, namespace="/control",
                           timeout=60)  # warm-up
        await asyncio.sleep(0.5)
        await gen.reset()
        before = cpu_split(server.pid)
        await control.call("start", {"rate": RATE, "duration": SECONDS, "size": SIZE}, namespace="/control",
                           timeout=120)
        expected = round(RATE * SECONDS) * CLIENTS
        for _ in range(100):
            report = await gen.report()
            if report["count"] >= expected:
                break
            await asyncio.sleep(0.1)
        after, delivered = cpu_split(server.pid), max(report["count"], 1)
        return (after[0] - before[0]) / delivered, (after[1] - before[1]) / delivered, report["count"]
    finally:
        if control.connected:
            await control.disconnect()
        if gen is not None:
            await gen.exit()
        server.stop()


async def test_fanout_spends_a_fifth_or_less_of_bare_python_socketios_cpu_per_delivery():
    ensure_node_modules()
    expected = round(RATE * SECONDS) * CLIENTS
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "bare": []}
    # Each ROUNDS times, alternating, and the least CPU of each: one 3 s window on a busy machine varied
    # the ratio from 5.3x to 7.5x for the same code.
    for kind in ("ours", "bare") * ROUNDS:
        user, system, delivered = await cpu_per_delivery(kind)
        assert delivered == expected, (kind, delivered, expected)
        runs[kind].append((user, system))
    ours, bare = min(runs["ours"]), min(runs["bare"])
    assert bare[0] > 5 * ours[0], (f"user CPU per delivery: ours {ours[0] * 1e6:.1f} us, bare {bare[0] * 1e6:.1f} us "
                                   f"({bare[0] / max(ours[0], 1e-9):.1f}x); system: ours {ours[1] * 1e6:.1f} us, "
                                   f"bare {bare[1] * 1e6:.1f} us")
