"""Regression guard for the broadcast hot path: ratios measured in one run, never absolute times.

Our fan-out and bare python-socketio serve the same Node socket.io-client connections and the same
broadcasts (bench/fanout.py's servers and load generator, briefly); the guard compares the least server
CPU each spends per delivered message in three runs. Below 5x (the issue's bar) the guard fails.

600 clients at 15 broadcasts/s, 4 s a run: 5.96-6.42x here (stop 31). The guard used to run 300 clients
at 30/s for 3 s, where ours spent about 20 ticks of CPU (10 ms each) a run: the ratio came out at
exactly 5.00x three times in a row and failed at 4.7-4.8x in a quiet hour, with no change to the
code it guards. A room twice as large costs bare python-socketio more per delivery (37 to 46 us)
and ours the same (7-8 us), and a longer window makes a tick a smaller part of the figure;
bench/fanout.py's full run measured 10x at 1,000 clients.
"""

from __future__ import annotations

import asyncio

import pytest
import socketio

from bench.fanout import LoadGen, cpu_seconds, ensure_node_modules, free_port, start_server, wait_port

pytestmark = pytest.mark.serial  # a CPU ratio: `make test` runs it after the parallel pass, alone

CLIENTS = 600
RATE = 15  # broadcasts/s: 9,000 deliveries/s, within what bare python-socketio sustains here
SECONDS = 4.0
SIZE = 200
ROUNDS = 3  # two gave 4.8x once in a CI run, after the parallel pass, for code measured at 5.5-5.7x


async def cpu_per_delivery(kind: str) -> tuple[float, int]:
    """Server CPU seconds per delivered message, and how many were delivered."""
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
        before = cpu_seconds(server.pid)
        await control.call("start", {"rate": RATE, "duration": SECONDS, "size": SIZE}, namespace="/control",
                           timeout=120)
        expected = round(RATE * SECONDS) * CLIENTS
        for _ in range(100):
            report = await gen.report()
            if report["count"] >= expected:
                break
            await asyncio.sleep(0.1)
        used = cpu_seconds(server.pid) - before
        return used / max(report["count"], 1), report["count"]
    finally:
        if control.connected:
            await control.disconnect()
        if gen is not None:
            await gen.exit()
        server.stop()


async def test_fanout_spends_a_fifth_or_less_of_bare_python_socketios_cpu_per_delivery():
    ensure_node_modules()
    expected = round(RATE * SECONDS) * CLIENTS
    runs: dict[str, list[float]] = {"ours": [], "bare": []}
    # Each ROUNDS times, alternating, and the least CPU of each: one 3 s window on a busy machine varied
    # the ratio from 5.3x to 7.5x for the same code.
    for kind in ("ours", "bare") * ROUNDS:
        used, delivered = await cpu_per_delivery(kind)
        assert delivered == expected, (kind, delivered, expected)
        runs[kind].append(used)
    ours, bare = min(runs["ours"]), min(runs["bare"])
    assert bare > 5 * ours, f"ours {ours * 1e6:.1f} us per delivery, bare {bare * 1e6:.1f} us ({bare / ours:.1f}x)"
