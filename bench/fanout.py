"""Broadcast fan-out: our client manager (alone and behind the realtime layer's publish) vs bare
python-socketio vs Node socket.io 4.8, in one run.

    .venv/bin/python bench/fanout.py                       # the full run (about 5 minutes)
    .venv/bin/python bench/fanout.py --quick               # a smoke run (about a minute)
    .venv/bin/python bench/fanout.py --servers ours,node --rates 50000,90000 --duration 5

Workload: N official `socket.io-client` connections (Node, websocket transport) in one room; the
server broadcasts 200-byte JSON events to that room at rising rates (delivered msgs/s = broadcasts/s
x N). Each event carries the time it was *scheduled*, so a server that falls behind shows it as
latency instead of silently sending later. Figures, per server:

- max sustained delivered msgs/s: the highest rate step where at least 99% of the expected events
  arrived within the step plus a 2 s drain and p99 latency stayed under 500 ms (the steps stop at
  the first failure, whose achieved rate is printed as "overload");
- p50/p99 latency and server CPU (% of one core) at the 10k msgs/s step;
- peak delivered msgs/s: the best achieved rate of any step, sustained or not (a server that sustains
  no step still has one);
- server RSS per idle connection: (RSS with --idle-clients connected - RSS before) / clients.
  `--idle-clients 1000,2500,5000` connects more clients to the same server at each count and
  prints a figure per count (the table takes the largest).

`--json PATH` writes a row per server: the summary above, the rate steps (`steps`), the idle
memory points (`idle`) and the load average before the server's run (bench/plots.py reads it).

CPU split on the 2-core machine: the server under test is pinned to core 0 (`taskset -c 0`), the
Node load generator and this driver to core 1, so the server never competes with its clients and
every server gets the same single core (Python and Node both run their event loop on one thread).
`--loadgens N` splits the clients over N load-generator processes (with `--loadgen-cpu ''` they may
use both cores); latency percentiles come from their merged 0.1 ms histograms.

The Node packages (socket.io, socket.io-client) come from bench/node/package-lock.json, installed
with `npm ci --prefix bench/node` when bench/node/node_modules is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "bench" / "node"
ROOM = "bench"
SERVERS = ("ours", "hub", "bare", "node")
DEFAULT_RATES = (10_000, 20_000, 40_000, 60_000, 80_000, 90_000, 100_000, 120_000, 150_000)
QUICK_RATES = (10_000, 30_000, 60_000, 90_000)
SUSTAINED_SHARE = 0.99
SUSTAINED_P99_MS = 500.0
DRAIN_SECONDS = 2.0


# --- the Python servers under test (run as `bench/fanout.py serve ...` in a subprocess) -------------


def payload(seq: int, ts: float, size: int) -> dict[str, Any]:
    """An event of `size` JSON bytes, like the Node server's."""
    from server.core import jsonutil

    base = len(jsonutil.dumpb({"seq": seq, "ts": ts, "pad": ""}))
    return {"seq": seq, "ts": ts, "pad": "x" * max(0, size - base)}


def serve(kind: str, port: int) -> None:
    """Run a Python Socket.IO server: `ours` (fan-out manager), `hub` (ours behind the realtime
    layer's publish: history and envelope) or `bare` (python-socketio's default manager)."""
    import socketio
    from aiohttp import web

    from server.core import jsonutil
    from server.realtime.engine import SocketServer
    from server.realtime.fanout import create_client_manager

    if kind in ("ours", "hub"):
        server_class, manager = SocketServer, create_client_manager(None)
    else:
        server_class, manager = socketio.AsyncServer, None
    sio = server_class(async_mode="aiohttp", client_manager=manager, json=jsonutil,
                       logger=False, engineio_logger=False)
    room = ROOM
    if kind == "hub":
        # The whole publish path domain code uses: history append, event envelope, room delivery.
        from server.realtime.history import MemoryHistory
        from server.realtime.hub import ChannelRule, Realtime, RealtimeLimits, room_name
        from server.realtime.presence import MemoryPresence

        realtime = Realtime(sio, MemoryHistory(1000, 3600), MemoryPresence(), RealtimeLimits())
        realtime.register("/", [ChannelRule(ROOM)])
        room = room_name(ROOM)

        async def emit(data: dict[str, Any]) -> None:
            await realtime.publish(ROOM, "tick", data)
    else:
        async def emit(data: dict[str, Any]) -> None:
            await sio.emit("tick", data, room=ROOM)

    @sio.on("connect")
    async def connect(sid, environ, auth=None):
        await sio.enter_room(sid, room)

    @sio.on("start", namespace="/control")
    async def start(sid, options):
        rate, duration, size = options["rate"], options["duration"], options["size"]
        loop = asyncio.get_running_loop()
        total, interval = round(rate * duration), 1.0 / rate
        t0_loop, t0_wall = loop.time(), time.time()
        for seq in range(total):
            delay = t0_loop + seq * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await emit(payload(seq, (t0_wall + seq * interval) * 1000, size))
        return {"sent": total}

    app = web.Application()
    sio.attach(app, socketio_path="socket.io")
    print(json.dumps({"ready": port}), flush=True)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --- the driver ---------------------------------------------------------------------------------


def ensure_node_modules() -> None:
    """Install the pinned Node packages when they are missing."""
    if (NODE_DIR / "node_modules" / "socket.io-client").is_dir():
        return
    if shutil.which("npm") is None:
        sys.exit("npm is required for the load generator (Node 18+)")
    subprocess.run(["npm", "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if cpu and shutil.which("taskset") else argv


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process."""
    return sum(cpu_split(pid))


def rss_bytes(pid: int) -> int:
    """Resident set size of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Proc:
    """A child process speaking JSON lines on stdout (and stdin)."""

    def __init__(self, argv: list[str], cwd: Path = ROOT) -> None:
        self.popen = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, bufsize=1)

    @property
    def pid(self) -> int:
        return self.popen.pid

    async def line(self, timeout: float) -> dict[str, Any]:
        assert self.popen.stdout is not None
        raw = await asyncio.wait_for(asyncio.to_thread(self.popen.stdout.readline), timeout)
        if not raw:
            raise RuntimeError(f"{self.popen.args} exited with {self.popen.wait()}")
        message = json.loads(raw)
        if "error" in message:
            raise RuntimeError(message["error"])
        return message

    async def ask(self, command: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(command) + "\n")
        self.popen.stdin.flush()
        return await self.line(timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_server(kind: str, port: int, cpu: str | None) -> Proc:
    if kind == "node":
        argv = ["node", str(NODE_DIR / "server.js"), str(port)]
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "serve", "--kind", kind,
                "--port", str(port)]
    return Proc(pinned(cpu, argv))


async def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


class LoadGen:
    """Node load-generator processes sharing the clients; their reports are merged into one."""

    def __init__(self, procs: list[Proc]) -> None:
        self.procs = procs

    @classmethod
    async def start(cls, port: int, clients: int, cpu: str | None, processes: int = 1) -> LoadGen:
        shares = [clients // processes + (i < clients % processes) for i in range(processes)]
        procs = [Proc(pinned(cpu, ["node", str(NODE_DIR / "loadgen.js"), f"http://127.0.0.1:{port}",
                                   str(share), "100"])) for share in shares]
        gen = cls(procs)
        try:
            for proc, share in zip(procs, shares):
                ready = await proc.line(timeout=120 + share / 20)
                assert ready["ready"] == share, ready
        except BaseException:
            gen.stop()
            raise
        return gen

    async def reset(self) -> None:
        await asyncio.gather(*(p.ask({"cmd": "reset"}) for p in self.procs))

    async def report(self) -> dict[str, Any]:
        """count, p50/p99/max (ms) over every process's events, disconnects, CPU (sum of cores)."""
        reports = await asyncio.gather(*(p.ask({"cmd": "report"}) for p in self.procs))
        hist: dict[int, int] = {}
        for report in reports:
            for bucket, n in report["hist"].items():
                hist[int(bucket)] = hist.get(int(bucket), 0) + n
        count = sum(r["count"] for r in reports)
        return {"count": count, "p50": percentile(hist, count, 0.5),
                "p99": percentile(hist, count, 0.99),
                "max": max(hist) / 10 if hist else None,
                "disconnects": sum(r["disconnects"] for r in reports),
                "cpu": sum(r["cpu"] for r in reports)}

    async def exit(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.gather(*(p.ask({"cmd": "exit"}, timeout=10) for p in self.procs))
        self.stop()

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def percentile(hist: dict[int, int], count: int, share: float) -> float | None:
    """The latency (ms, 0.1 ms buckets) below which `share` of the events arrived."""
    if count == 0:
        return None
    rank = min(count - 1, int(share * count))
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen > rank:
            return bucket / 10
    return max(hist) / 10


async def run_step(ctl: Any, gen: LoadGen, server: Proc, clients: int, target: int, duration: float,
                   size: int) -> dict[str, Any]:
    """One rate step: broadcast for `duration` seconds, then drain and collect the figures."""
    rate = target / clients
    expected = round(rate * duration) * clients
    await gen.reset()
    cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
    await ctl.call("start", {"rate": rate, "duration": duration, "size": size}, namespace="/control",
                   timeout=duration * 20 + 60)
    emitted = time.monotonic() - t0
    report = await gen.report()
    deadline = time.monotonic() + DRAIN_SECONDS
    while report["count"] < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        report = await gen.report()
    elapsed = time.monotonic() - t0
    server_cpu = (cpu_seconds(server.pid) - cpu0) / elapsed
    share = report["count"] / expected
    p99 = report["p99"] if report["p99"] is not None else float("inf")
    return {
        "target": target, "expected": expected, "delivered": report["count"],
        "rate": report["count"] / max(duration, emitted), "p50": report["p50"], "p99": report["p99"],
        "server_cpu": server_cpu, "loadgen_cpu": report["cpu"], "emit_seconds": emitted,
        "disconnects": report["disconnects"],
        "sustained": share >= SUSTAINED_SHARE and p99 <= SUSTAINED_P99_MS,
    }


async def throughput(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Rising rate steps against one server until it stops keeping up."""
    import socketio

    port = free_port()
    server = start_server(kind, port, args.server_cpu)
    gen = None
    ctl = socketio.AsyncClient(reconnection=False)
    try:
        await wait_port(port)
        gen = await LoadGen.start(port, args.clients, args.loadgen_cpu, args.loadgens)
        await ctl.connect(f"http://127.0.0.1:{port}", namespaces=["/control"],
                          transports=["websocket"], wait_timeout=10)
        await run_step(ctl, gen, server, args.clients, args.rates[0], 1.0, args.size)  # warm-up
        steps = []
        for target in args.rates:
            step = await run_step(ctl, gen, server, args.clients, target, args.duration, args.size)
            steps.append(step)
            print(f"  {kind:<5} {target:>8,} msgs/s target: {step['rate']:>9,.0f} delivered/s "
                  f"({step['delivered']:,}/{step['expected']:,}) p50 {fmt_ms(step['p50'])} "
                  f"p99 {fmt_ms(step['p99'])} server CPU {step['server_cpu']:.0%} "
                  f"loadgen CPU {step['loadgen_cpu']:.0%}"
                  f"{'' if step['sustained'] else '  <- not sustained'}", flush=True)
            if not step["sustained"]:
                break
        return {"steps": steps}
    finally:
        if ctl.connected:
            await ctl.disconnect()
        if gen is not None:
            await gen.exit()
        server.stop()


async def idle_memory(kind: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Server RSS with each of `--idle-clients` counts of idle connections, one server for all:
    each count adds a load generator for the connections it lacks."""
    port = free_port()
    server = start_server(kind, port, args.server_cpu)
    gens: list[LoadGen] = []
    points: list[dict[str, Any]] = []
    try:
        await wait_port(port)
        await asyncio.sleep(1)
        before = rss_bytes(server.pid)
        connected = 0
        for count in args.idle_counts:
            try:
                gens.append(await LoadGen.start(port, count - connected, args.loadgen_cpu, args.loadgens))
            except Exception as exc:  # a server that cannot hold more: keep the counts it held
                print(f"  {kind:<5} idle: {count:,} connections failed: {exc!r}", flush=True)
                break
            connected = count
            await asyncio.sleep(3)
            after = rss_bytes(server.pid)
            per = (after - before) / count
            print(f"  {kind:<5} idle: {count:,} connections, RSS {before / 2**20:.0f} -> "
                  f"{after / 2**20:.0f} MiB, {per / 1024:.1f} KiB per connection", flush=True)
            points.append({"connections": count, "rss_before": before, "rss_after": after, "per_conn": per})
        return points
    finally:
        for gen in gens:
            await gen.exit()
        server.stop()


def fmt_ms(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.1f} ms"


def summarise(kind: str, result: dict[str, Any], clients: int) -> dict[str, Any]:
    steps = result["steps"]
    sustained = [s for s in steps if s["sustained"]]
    at10k = next((s for s in steps if s["target"] == 10_000), steps[0] if steps else None)
    overload = next((s for s in steps if not s["sustained"]), None)
    return {
        "server": kind,
        "max_sustained": max((s["rate"] for s in sustained), default=0.0),
        "overload_rate": overload["rate"] if overload else None,
        "peak": max((s["rate"] for s in steps), default=0.0),
        "p50_10k": at10k["p50"] if at10k else None,
        "p99_10k": at10k["p99"] if at10k else None,
        "cpu_10k": at10k["server_cpu"] if at10k else None,
        "rss_per_conn": result["idle"][-1]["per_conn"] if result.get("idle") else None,
        # For bench/plots.py; the table above does not print these.
        "clients": clients,
        "load_average": result.get("load_average"),
        "steps": steps,
        "idle": result.get("idle", []),
    }


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "n/a"
    return f"{a / b:.2f}x"


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print()
    print(f"fan-out, {args.clients:,} clients in one room, {args.size}-byte events, "
          f"{args.duration:g} s steps; idle memory at {args.idle_clients:,} connections")
    header = (f"{'server':<7}{'max sustained':>15}{'peak':>10}{'overload':>11}{'p50 @10k':>11}{'p99 @10k':>11}"
              f"{'CPU @10k':>10}{'RSS/idle conn':>15}")
    print(header)
    print("-" * len(header))
    for r in rows:
        overload = f"{r['overload_rate']:,.0f}" if r["overload_rate"] else "-"
        rss = f"{r['rss_per_conn'] / 1024:.1f} KiB" if r["rss_per_conn"] else "n/a"
        cpu = f"{r['cpu_10k']:.0%}" if r["cpu_10k"] is not None else "n/a"
        print(f"{r['server']:<7}{r['max_sustained']:>15,.0f}{r['peak']:>10,.0f}{overload:>11}{fmt_ms(r['p50_10k']):>11}"
              f"{fmt_ms(r['p99_10k']):>11}{cpu:>10}{rss:>15}")
    ours = next((r for r in rows if r["server"] == "ours"), None)
    if ours is None:
        return
    for peer in (r for r in rows if r["server"] != "ours"):
        print(f"ours vs {peer['server']}: sustained throughput "
              f"{ratio(ours['max_sustained'], peer['max_sustained'])}"
              f", peak delivered {ratio(ours['peak'], peer['peak'])}"
              f", p99 @10k {ratio(ours['p99_10k'], peer['p99_10k'])}"
              f", CPU @10k {ratio(ours['cpu_10k'], peer['cpu_10k'])}"
              f", RSS/conn {ratio(ours['rss_per_conn'], peer['rss_per_conn'])}"
              "  (throughput: higher is better; the others: lower is better)")


def load_average() -> float:
    """The 1-minute load average: other work on the machine skews every figure."""
    return float(Path("/proc/loadavg").read_text().split()[0])


async def main(args: argparse.Namespace) -> None:
    ensure_node_modules()
    if load_average() > 1.0:
        print(f"warning: load average {load_average():.2f} before the run: other processes are "
              "using the CPUs, the figures will be pessimistic and noisy", flush=True)
    rows = []
    for kind in args.servers:
        load = load_average()
        print(f"{kind}: throughput, {args.clients:,} clients (load average {load:.2f})", flush=True)
        result = await throughput(kind, args)
        result["load_average"] = load
        if args.idle_counts:
            result["idle"] = await idle_memory(kind, args)
        rows.append(summarise(kind, result, args.clients))
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def parse_args(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["serve"]:
        parser = argparse.ArgumentParser(prog="fanout.py serve")
        parser.add_argument("serve")
        parser.add_argument("--kind", choices=("ours", "hub", "bare"), required=True)
        parser.add_argument("--port", type=int, required=True)
        return parser.parse_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="comma-separated subset of ours,hub,bare,node (default: all four)")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rates", default=None,
                        help="comma-separated delivered msgs/s targets (default: 10k..150k)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per step (default 5)")
    parser.add_argument("--size", type=int, default=200, help="event JSON bytes")
    parser.add_argument("--idle-clients", default=None,
                        help="connections for the idle memory figure (default 5000; 0 skips it); "
                             "comma-separated counts measure each, e.g. 1000,2500,5000,10000")
    parser.add_argument("--server-cpu", default="0", help="core(s) for the server ('' = no pinning)")
    parser.add_argument("--loadgen-cpu", default="1", help="core(s) for the load generator")
    parser.add_argument("--loadgens", type=int, default=1,
                        help="load-generator processes sharing the clients (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="short steps, fewer rates, 1,000 idle connections")
    parser.add_argument("--json", help="also write the rows (summary, rate steps, idle memory points) to this file")
    args = parser.parse_args(argv)
    args.servers = [s for s in args.servers.split(",") if s]
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    rates = args.rates.split(",") if args.rates else (QUICK_RATES if args.quick else DEFAULT_RATES)
    args.rates = [int(float(r)) for r in rates]
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    if args.idle_clients is None:
        args.idle_clients = "1000" if args.quick else "5000"
    args.idle_counts = sorted({int(float(n)) for n in args.idle_clients.split(",") if n and float(n) > 0})
    args.idle_clients = max(args.idle_counts, default=0)  # the table's header names the largest
    return args


if __name__ == "__main__":
    parsed = parse_args(sys.argv[1:])
    if getattr(parsed, "serve", None):
        serve(parsed.kind, parsed.port)
    else:
        asyncio.run(main(parsed))
