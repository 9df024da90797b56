"""Growth curves for docs/performance.md: latency with rate, memory with connections, ingest with sessions.

    .venv/bin/python bench/plots.py run              # the full sweeps, raw rows to docs/perf/data.json
    .venv/bin/python bench/plots.py run --quick      # fewer points, shorter steps: checks the code, not the figures
    .venv/bin/python bench/plots.py run --only rewards   # re-run one bench, keep the other's rows in data.json
    .venv/bin/python bench/plots.py draw             # docs/perf/*.png and the capacity table (needs no server)

`run` starts the benches as subprocesses, one at a time, and keeps every row they write:

- `bench/fanout.py --servers S --json ...` once per server (ours, bare python-socketio, Node socket.io):
  rising broadcast rates to 1,000 clients in one room (each step's delivered msgs/s, p50/p99 latency,
  server CPU), then idle connections at rising counts on one server (its RSS at each count);
- `bench/rewards.py --sessions N --json ...` once per session count, with one `report_reward` per
  report and again with `--batch` (`report_rewards`): one hub process, no balancer (`--processes N`
  passes its option through); needs DATABASE_URL, uses REDIS_URL when set.

A bench that fails is recorded with its error and the output's tail; the run goes on. Every run
record carries the load average before it, its start time and the git commit, since the machine
is shared and a figure without its load is hard to read. The quick run is for checking this
script; the figures for the docs come from a full run on a quiet machine.

`draw` reads docs/perf/data.json only and writes:

- latency.png: p50 and p99 broadcast latency against delivered msgs/s, per server;
- cpu.png: server CPU (% of one core) against delivered msgs/s, per server;
- memory.png: server RSS against idle connections, per server, with the fitted KiB per connection;
- rewards.png: accepted rewards/s and ack latency against live sessions, per way of calling;
- capacity.md: what one process holds on this machine (also printed), each row naming its runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PERF_DIR = ROOT / "docs" / "perf"
DATA_PATH = PERF_DIR / "data.json"
DPI = 150
FIGURE_WIDTH = 7.5  # inches: 1,125 px at 150 dpi, text still readable scaled down to 900 px
OUTPUT_TAIL_LINES = 200

SERVER_ORDER = ("ours", "hub", "node", "bare")
SERVER_COLORS = {"ours": "#1f77b4", "hub": "#17becf", "node": "#2ca02c", "bare": "#d62728"}


class Sweep:
    """What one `run` measures: the rate steps, idle counts and session counts, and their lengths."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.servers = ["ours", "bare", "node"]
        self.clients = 1000
        if quick:
            self.rates = [5_000, 10_000, 30_000, 60_000]
            self.step_seconds = 1.5
            self.idle_counts = [500, 1000, 2000]
            self.sessions = [50, 250]
            self.rewards_seconds = 3.0
        else:
            # Below 10k too: bare python-socketio falls over at 20k and would otherwise have two points.
            self.rates = [2_500, 5_000, 10_000, 20_000, 40_000, 60_000, 80_000, 100_000, 120_000, 150_000]
            self.step_seconds = 5.0
            self.idle_counts = [1000, 2500, 5000, 10000]
            self.sessions = [50, 100, 250, 500, 1000]
            self.rewards_seconds = 15.0
        self.processes: int | None = None  # bench/rewards.py's default: one hub process, no balancer
        self.batch_calls = [False, True]  # bench/rewards.py alone (report_reward) and with --batch
        self.timeout = 1800.0  # seconds for one bench subprocess: a hung one must not stop the sweep


# --- run: the sweeps, as subprocesses ------------------------------------------------------------


def now_iso() -> str:
    """The time now, UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_averages() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def git_state() -> dict[str, Any]:
    """The commit and whether the work tree differs from it (read-only git commands)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    try:
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(changed), "changed": changed}
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"commit": None, "error": repr(exc)}


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory and the versions of what is measured."""
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    memory_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))
    versions: dict[str, str | None] = {"python": platform.python_version()}
    from importlib import metadata
    for dist in ("python-socketio", "python-engineio", "aiohttp"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    for package in ("socket.io", "socket.io-client"):
        manifest = ROOT / "bench" / "node" / "node_modules" / package / "package.json"
        versions[f"node {package}"] = json.loads(manifest.read_text())["version"] if manifest.exists() else None
    try:
        versions["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        versions["node"] = None
    return {"cores": os.cpu_count(), "cpu_model": cpu_model, "memory_bytes": memory_kib * 1024,
            "kernel": platform.release(), "versions": versions}


def run_bench(run_id: str, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one bench, echoing its output; its record without the rows (the caller reads its JSON)."""
    record: dict[str, Any] = {"id": run_id, "argv": argv, "started": now_iso(), "load_average_before": load_averages(),
                              "git": git_state()}
    print(f"\n== {run_id} (load average {record['load_average_before'][0]:.2f}): {' '.join(argv)}", flush=True)
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    t0 = time.monotonic()
    # Its own process group: on a timeout or Ctrl-C the bench's servers and load generators go too.
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        stop_group(proc)

    timer = threading.Timer(timeout, on_timeout)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"   {line}", end="", flush=True)
            tail.append(line.rstrip("\n"))
        returncode = proc.wait()
    except BaseException:
        stop_group(proc)
        raise
    finally:
        timer.cancel()
    record.update(seconds=round(time.monotonic() - t0, 1), returncode=returncode, output=list(tail), error=None)
    if timed_out.is_set():
        record["error"] = f"timed out after {timeout:.0f} s"
    elif returncode != 0:
        record["error"] = f"exit status {returncode}: {tail[-1] if tail else 'no output'}"
    return record


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the bench's process group, SIGKILL if it is still there 10 s later."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_rows(record: dict[str, Any], path: Path) -> list[Any]:
    """The rows a bench wrote to its --json file; a missing or unreadable file becomes the record's error."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        record["error"] = record["error"] or f"no JSON result: {exc!r}"
        return []
    return data if isinstance(data, list) else [data]


def run_fanout(sweep: Sweep, workdir: Path) -> list[dict[str, Any]]:
    """bench/fanout.py once per server: rate steps, then the idle memory sweep."""
    records = []
    for server in sweep.servers:
        out = workdir / f"fanout-{server}.json"
        argv = [sys.executable, "bench/fanout.py", "--servers", server, "--clients", str(sweep.clients),
                "--rates", ",".join(map(str, sweep.rates)), "--duration", str(sweep.step_seconds),
                "--idle-clients", ",".join(map(str, sweep.idle_counts)), "--json", str(out)]
        record = run_bench(f"fanout-{server}", argv, sweep.timeout)
        record.update(bench="fanout", server=server, quick=sweep.quick, rows=read_rows(record, out))
        records.append(record)
    return records


def run_rewards(sweep: Sweep, workdir: Path) -> list[dict[str, Any]]:
    """bench/rewards.py once per session count and way of calling (one report per call, batched)."""
    records = []
    for batch, sessions in ((batch, sessions) for batch in sweep.batch_calls for sessions in sweep.sessions):
        name = f"rewards-{'batch-' if batch else ''}{sessions}"
        out = workdir / f"{name}.json"
        argv = [sys.executable, "bench/rewards.py", "--sessions", str(sessions),
                "--duration", str(sweep.rewards_seconds), "--json", str(out)]
        if sweep.processes is not None:
            argv[4:4] = ["--processes", str(sweep.processes)]
        if batch:
            argv.append("--batch")
        record = run_bench(name, argv, sweep.timeout)
        record.update(bench="rewards", sessions=sessions, redis=bool(os.environ.get("REDIS_URL")), quick=sweep.quick,
                      rows=read_rows(record, out))
        records.append(record)
    return records


def run(args: argparse.Namespace) -> None:
    """Run the sweeps and write docs/perf/data.json."""
    sweep = Sweep(args.quick)
    if args.servers:
        sweep.servers = args.servers.split(",")
    if args.sessions:
        sweep.sessions = [int(n) for n in args.sessions.split(",")]
    sweep.processes = args.processes
    benches = [args.only] if args.only else ["fanout", "rewards"]
    kept: list[dict[str, Any]] = []
    if args.only and args.data.exists():
        earlier = json.loads(args.data.read_text())
        kept = [r for r in earlier["runs"] if r.get("bench") != args.only]
        for record in kept:  # the machine may have changed since: each run keeps its own
            record.setdefault("machine", earlier["machine"])
    started, t0 = now_iso(), time.monotonic()
    if load_averages()[0] > 1.0:
        print(f"warning: load average {load_averages()[0]:.2f}: other work is running, the figures will be "
              "pessimistic and noisy", flush=True)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hub-plots-") as tmp:
        if "fanout" in benches:
            records += run_fanout(sweep, Path(tmp))
        if "rewards" in benches:
            records += run_rewards(sweep, Path(tmp))
    this_machine = machine()
    for record in records:
        record["machine"] = this_machine
    runs = kept + records
    data = {
        "schema": 1,
        "quick": any(r.get("quick") for r in runs),  # any run quick: the figures are for checking only
        "started": started,
        "seconds": round(time.monotonic() - t0, 1),
        "machine": this_machine,
        "git": git_state(),
        "sweep": vars(sweep),  # of this run; with --only, the kept runs' own argv say how they ran
        "runs": runs,
    }
    args.data.parent.mkdir(parents=True, exist_ok=True)
    args.data.write_text(json.dumps(data, indent=1) + "\n")
    failed = [r["id"] for r in records if r["error"]]
    print(f"\nwrote {args.data.relative_to(ROOT) if args.data.is_relative_to(ROOT) else args.data}: "
          f"{len(records)} runs in {data['seconds'] / 60:.1f} min"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)


# --- draw: the PNGs and the capacity table from data.json -----------------------------------------


def server_label(server: str, versions: dict[str, Any]) -> str:
    """A legend label naming the library version measured."""
    if server == "ours":
        return "ours (lean engine + fan-out manager)"
    if server == "hub":
        return "ours behind Realtime.publish"
    if server == "bare":
        version = versions.get("python-socketio")
        return f"bare python-socketio{' ' + version if version else ''}"
    if server == "node":
        version = versions.get("node socket.io")
        return f"Node socket.io{' ' + version if version else ''}"
    return server


def fanout_rows(data: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """server -> (its summary row, its run record), in legend order."""
    found = {}
    for record in data["runs"]:
        if record.get("bench") != "fanout":
            continue
        for row in record.get("rows", []):
            found[row["server"]] = (row, record)
    return {s: found[s] for s in sorted(found, key=lambda s: SERVER_ORDER.index(s) if s in SERVER_ORDER else 99)}


def reward_rows(data: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row, run record) of every rewards run that produced one, by sessions."""
    rows = [(row, record) for record in data["runs"] if record.get("bench") == "rewards"
            for row in record.get("rows", [])]
    return sorted(rows, key=lambda pair: (setup_label(pair[0]), pair[0]["sessions"]))


def setup_label(row: dict[str, Any]) -> str:
    """How many hub processes served a rewards run, and whether a balancer stood in front."""
    processes = row.get("processes", 1)
    label = f"{processes} hub process{'es' if processes > 1 else ''}"
    label += " behind HAProxy" if row.get("balancer") else ""
    return label + (", report_rewards (batched)" if row.get("batch") else ", report_reward")


def one_process(row: dict[str, Any]) -> bool:
    """A rewards run on one hub process with nothing in front: what the capacity table quotes."""
    return row.get("processes", 1) == 1 and not row.get("balancer")


def memory_fit(row: dict[str, Any]) -> tuple[float, float] | None:
    """Least-squares RSS = base + slope x connections over the idle points and the RSS before them."""
    import numpy as np

    points = row.get("idle") or []
    if not points:
        return None
    xs = [0] + [p["connections"] for p in points]
    ys = [points[0]["rss_before"]] + [p["rss_after"] for p in points]
    slope, base = np.polyfit(xs, ys, 1)
    return float(slope), float(base)


def machine_of(data: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The machine a run was measured on (runs kept from an earlier `run --only` carry their own)."""
    return record.get("machine") or data["machine"]


def machine_label(m: dict[str, Any]) -> str:
    """'2 cores (CPU model)'."""
    return f"{m['cores']} cores ({m['cpu_model']})"


def footnote(fig: Any, data: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Where the figures come from: date, commit, load, machine; a warning on quick runs."""
    loads = [r["load_average_before"][0] for r in records]
    commits = sorted({(r.get("git") or {}).get("commit") or "?" for r in records})
    dirty = any((r.get("git") or {}).get("dirty") for r in records)
    machines = sorted({machine_label(machine_of(data, r)) for r in records})
    dates = sorted(r["started"][:10] for r in records)
    text = (f"{dates[0] if dates else '?'}, commit {', '.join(c[:8] for c in commits)}{' + changes' if dirty else ''}, "
            f"{', '.join(machines)}, load average {min(loads):.2f}-{max(loads):.2f} before the runs")
    if data.get("quick"):
        text = "QUICK RUN (short steps, few points): checks the script, not figures to quote\n" + text
    fig.text(0.01, 0.005, text, fontsize=7, color="#555555", ha="left", va="bottom")


def new_figure(height: float, rows: int = 1) -> tuple[Any, Any]:
    """A figure of the common width with `rows` panels sharing their x axis."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 1, figsize=(FIGURE_WIDTH, height), sharex=rows > 1)
    return fig, axes


def save(fig: Any, name: str, out: Path) -> Path:
    """Write the figure as out/name at DPI and free it."""
    import matplotlib.pyplot as plt

    path = out / name
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def log_ticks(axis: Any, values: list[float], thousands: bool = False) -> None:
    """Ticks at 1, 2, 5 x 10^n over the values' range, labelled 20k or 200 rather than 2 x 10^4."""
    import math

    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lo, hi = min(values), max(values)
    ticks = [m * 10**e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5) if lo / 1.6 <= m * 10**e <= hi * 1.6]

    def label(value: float, _pos: Any) -> str:
        return f"{value / 1000:g}k" if thousands and value >= 1000 else f"{value:,.0f}" if value >= 1 else f"{value:g}"
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(NullFormatter())


def draw_latency(data: dict[str, Any], out: Path) -> Path | None:
    """p50 and p99 latency against delivered msgs/s; hollow markers: steps not sustained."""
    from matplotlib.lines import Line2D

    rows = fanout_rows(data)
    if not rows:
        return None
    versions = data["machine"]["versions"]
    fig, ax = new_figure(5.4)
    for server, (row, _) in rows.items():
        color = SERVER_COLORS.get(server, "black")
        steps = [s for s in row["steps"] if s["p99"] is not None]
        for key, style, width in (("p99", "-", 2.0), ("p50", "--", 1.2)):
            xs, ys = [s["rate"] for s in steps], [max(s[key], 0.1) for s in steps]
            ax.plot(xs, ys, style, color=color, linewidth=width)
            for s, x, y in zip(steps, xs, ys):
                ax.plot(x, y, "o", color=color, markersize=5 if key == "p99" else 3.5,
                        markerfacecolor=color if s["sustained"] else "white", markeredgewidth=1.2)
    ax.axhline(500, color="#888888", linestyle=":", linewidth=1)
    ax.text(0.99, 560, "sustained: p99 ≤ 500 ms and ≥ 99% delivered", fontsize=7.5, color="#555555", ha="right",
            transform=ax.get_yaxis_transform())
    ax.set_xscale("log")
    ax.set_yscale("log")
    all_steps = [s for row, _ in rows.values() for s in row["steps"] if s["p99"] is not None]
    log_ticks(ax.xaxis, [s["rate"] for s in all_steps], thousands=True)
    log_ticks(ax.yaxis, [max(s[k], 0.1) for s in all_steps for k in ("p50", "p99")] + [500])
    ax.set_xlabel("delivered messages per second (log scale)")
    ax.set_ylabel("latency, ms (log scale)")
    clients = next(iter(rows.values()))[0].get("clients", 1000)
    ax.set_title(f"Broadcast latency as the rate grows\n{clients:,} clients in one room, 200-byte events, "
                 "one server core", fontsize=11)
    servers = [Line2D([], [], color=SERVER_COLORS.get(s, "black"), linewidth=2, label=server_label(s, versions))
               for s in rows]
    key = [Line2D([], [], color="black", linestyle="-", linewidth=2, label="p99 (solid)"),
           Line2D([], [], color="black", linestyle="--", linewidth=1.2, label="p50 (dashed)"),
           Line2D([], [], color="black", marker="o", linestyle="", markerfacecolor="white",
                  label="hollow: step not sustained")]
    # Below the axes: the curves fill both upper corners (bare at low rates, the others at high ones).
    # Legends fill column by column: interleave so the servers make the first row, the key the second.
    blank = Line2D([], [], linestyle="", label=" ")
    columns = max(len(servers), len(key))
    servers += [blank] * (columns - len(servers))
    key += [blank] * (columns - len(key))
    ax.legend(handles=[h for pair in zip(servers, key) for h in pair], ncol=columns, fontsize=8,
              loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    footnote(fig, data, [record for _, record in rows.values()])
    fig.tight_layout(rect=(0, 0.05 if data.get("quick") else 0.03, 1, 1))
    return save(fig, "latency.png", out)


def draw_cpu(data: dict[str, Any], out: Path) -> Path | None:
    """Server CPU (% of one core) against delivered msgs/s."""
    rows = fanout_rows(data)
    if not rows or not any("server_cpu" in s for row, _ in rows.values() for s in row["steps"]):
        return None
    versions = data["machine"]["versions"]
    fig, ax = new_figure(4.4)
    for server, (row, _) in rows.items():
        color = SERVER_COLORS.get(server, "black")
        steps = row["steps"]
        xs, ys = [s["rate"] for s in steps], [s["server_cpu"] * 100 for s in steps]
        ax.plot(xs, ys, "-", color=color, linewidth=2, label=server_label(server, versions))
        for s, x, y in zip(steps, xs, ys):
            ax.plot(x, y, "o", color=color, markersize=5, markerfacecolor=color if s["sustained"] else "white",
                    markeredgewidth=1.2)
    ax.axhline(100, color="#888888", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    log_ticks(ax.xaxis, [s["rate"] for row, _ in rows.values() for s in row["steps"]], thousands=True)
    ax.set_ylim(0, max(110, ax.get_ylim()[1]))
    ax.set_xlabel("delivered messages per second (log scale)")
    ax.set_ylabel("server CPU, % of one core")
    ax.set_title("Server CPU as the broadcast rate grows (hollow: step not sustained)", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    ax.grid(True, which="major", alpha=0.3)
    footnote(fig, data, [record for _, record in rows.values()])
    fig.tight_layout(rect=(0, 0.05 if data.get("quick") else 0.03, 1, 1))
    return save(fig, "cpu.png", out)


def draw_memory(data: dict[str, Any], out: Path) -> Path | None:
    """Server RSS against idle connections, with the fitted slope per server."""
    rows = {s: pair for s, pair in fanout_rows(data).items() if pair[0].get("idle")}
    if not rows:
        return None
    versions = data["machine"]["versions"]
    fig, ax = new_figure(4.6)
    top = max(p["connections"] for row, _ in rows.values() for p in row["idle"])
    for server, (row, _) in rows.items():
        color = SERVER_COLORS.get(server, "black")
        points = row["idle"]
        xs = [0] + [p["connections"] for p in points]
        ys = [points[0]["rss_before"] / 2**20] + [p["rss_after"] / 2**20 for p in points]
        slope, base = memory_fit(row)
        ax.plot(xs, ys, "o", color=color, markersize=5,
                label=f"{server_label(server, versions)}: {slope / 1024:.1f} KiB per connection")
        ax.plot([0, top], [base / 2**20, (base + slope * top) / 2**20], "-", color=color, linewidth=1.5, alpha=0.8)
    ax.set_xlim(0, top * 1.04)
    ax.set_ylim(0, None)
    ax.xaxis.set_major_formatter(lambda value, _pos: f"{value:,.0f}")
    ax.set_xlabel("idle websocket connections")
    ax.set_ylabel("server RSS, MiB")
    ax.set_title("Server memory as idle connections grow\n(points: measured RSS; lines: least-squares fit, "
                 "whose slope is the legend's figure)", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    ax.grid(True, alpha=0.3)
    footnote(fig, data, [record for _, record in rows.values()])
    fig.tight_layout(rect=(0, 0.05 if data.get("quick") else 0.03, 1, 1))
    return save(fig, "memory.png", out)


def draw_rewards(data: dict[str, Any], out: Path) -> Path | None:
    """Accepted rewards/s (top) and ack latency (bottom) against live sessions."""
    pairs = reward_rows(data)
    if not pairs:
        return None
    fig, (top, bottom) = new_figure(6.0, rows=2)
    by_setup: dict[str, list[dict[str, Any]]] = {}
    for row, _ in pairs:
        by_setup.setdefault(setup_label(row), []).append(row)
    for n, (label, rows) in enumerate(by_setup.items()):
        color = ("#1f77b4", "#9467bd", "#8c564b", "#e377c2")[n % 4]
        xs = [r["sessions"] for r in rows]
        top.plot(xs, [r["accepted_per_s"] for r in rows], "o-", color=color, linewidth=2, label=label)
        bottom.plot(xs, [r["ack_p99_ms"] for r in rows], "o-", color=color, linewidth=2, label=f"p99, {label}")
        bottom.plot(xs, [r["ack_p50_ms"] for r in rows], "o--", color=color, linewidth=1.2, markersize=3.5,
                    label=f"p50, {label}")
        bad = [r for r in rows if not r.get("consistent", True)]
        if bad:
            top.plot([r["sessions"] for r in bad], [r["accepted_per_s"] for r in bad], "x", color="red",
                     markersize=10, markeredgewidth=2, label="database check failed")
    game_servers = sorted({r.get("game_servers") for r, _ in pairs if r.get("game_servers")})
    top.set_title("Reward ingest as live sessions grow\n(each session sends its next reward once the last is "
                  f"acked; {', '.join(map(str, game_servers)) or '?'} game-server connections)", fontsize=11)
    top.set_ylabel("accepted rewards/s")
    top.set_ylim(0, max(r["accepted_per_s"] for r, _ in pairs) * 1.15)
    top.yaxis.set_major_formatter(lambda value, _pos: f"{value:,.0f}")
    bottom.set_ylabel("ack latency, ms (log scale)")
    bottom.set_yscale("log")
    log_ticks(bottom.yaxis, [r[k] for r, _ in pairs for k in ("ack_p50_ms", "ack_p99_ms") if r[k] > 0])
    bottom.set_xlabel("live game sessions (log scale)")
    bottom.set_xscale("log")
    bottom.set_xticks(sorted({r["sessions"] for r, _ in pairs}))
    bottom.xaxis.set_major_formatter(lambda value, _pos: f"{value:,.0f}")
    bottom.xaxis.set_minor_formatter("")
    for ax in (top, bottom):
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best", framealpha=0.9)
    footnote(fig, data, [record for _, record in pairs])
    fig.tight_layout(rect=(0, 0.05 if data.get("quick") else 0.03, 1, 1))
    return save(fig, "rewards.png", out)


def capacity_table(data: dict[str, Any]) -> str:
    """What one process holds on this machine, as markdown; each row names the runs it comes from."""
    rows = fanout_rows(data)
    versions = data["machine"]["versions"]
    columns = [s for s in ("ours", "node", "bare") if s in rows]
    lines = ["| one process on this machine | " + " | ".join(server_label(s, versions) for s in columns)
             + " | from |", "|---" * (len(columns) + 2) + "|"]
    if rows:
        clients = next(iter(rows.values()))[0].get("clients", 1000)
        cells = []
        for s in columns:
            row = rows[s][0]
            cell = f"{row['max_sustained']:,.0f}" if row["max_sustained"] else "none sustained"
            if row["steps"] and all(step["sustained"] for step in row["steps"]):
                cell += " (every step: the ceiling is higher)"
            cells.append(cell)
        lines.append(f"| max sustained broadcast, delivered msgs/s ({clients:,} clients in one room; "
                     f"p99 ≤ 500 ms, ≥ 99% delivered) | " + " | ".join(cells) + " | "
                     + ", ".join(f"`{rows[s][1]['id']}`" for s in columns) + " |")
        cells = []
        counts: set[int] = set()
        for s in columns:
            row = rows[s][0]
            fit = memory_fit(row)
            counts.update(p["connections"] for p in row.get("idle") or [])
            cells.append(f"{fit[0] / 1024:.1f} KiB" if fit else "not measured")
        span = f"{min(counts):,}-{max(counts):,}" if counts else "no"
        lines.append(f"| memory per idle connection (slope of RSS over {span} connections) | "
                     + " | ".join(cells) + " | " + ", ".join(f"`{rows[s][1]['id']}`" for s in columns) + " |")
    pairs = ([(r, rec) for r, rec in reward_rows(data) if one_process(r)]
             or [(r, rec) for r, rec in reward_rows(data) if r.get("processes", 1) == 1])
    blanks = " | ".join("n/a" for _ in columns[1:])
    for batch in sorted({bool(r.get("batch")) for r, _ in pairs}):
        same_calls = [(r, rec) for r, rec in pairs if bool(r.get("batch")) == batch]
        consistent = [(r, rec) for r, rec in same_calls if r.get("consistent", True)]
        row, record = max(consistent or same_calls, key=lambda pair: pair[0]["accepted_per_s"])
        flag = "" if row.get("consistent", True) else " (database check FAILED)"
        tried = ", ".join(f"{r['sessions']:,}" for r, _ in same_calls)
        lines.append(f"| reward ingest, accepted rewards/s (best of {tried} sessions; {setup_label(row)}) | "
                     f"{row['accepted_per_s']:,.0f} at {row['sessions']:,} sessions, ack p99 "
                     f"{row['ack_p99_ms']:,.0f} ms{flag} | {blanks} | `{record['id']}` |")
    if not pairs:
        errors = [rec for rec in data["runs"] if rec.get("bench") == "rewards" and rec.get("error")]
        reason = f"not measured: {errors[0]['error']}" if errors else "not measured"
        lines.append(f"| reward ingest, accepted rewards/s | {reason} | {blanks} | "
                     + ", ".join(f"`{r['id']}`" for r in errors) + " |")
    lines.append("")
    lines.append("Runs:" + (" **quick run: development figures only**." if data.get("quick") else ""))
    for record in data["runs"]:
        commit = ((record.get("git") or {}).get("commit") or "?")[:8]
        dirty = " + uncommitted changes" if (record.get("git") or {}).get("dirty") else ""
        status = f", **failed: {record['error']}**" if record.get("error") else ""
        lines.append(f"- `{record['id']}`: {record['started']}, commit {commit}{dirty}, load average "
                     f"{record['load_average_before'][0]:.2f} before, {record.get('seconds', 0):.0f} s{status}")
    machines: dict[str, list[str]] = {}
    for record in data["runs"]:
        m = machine_of(data, record)
        machines.setdefault(f"{machine_label(m)}, {m['memory_bytes'] / 2**30:.0f} GiB", []).append(record["id"])
    for label, ids in machines.items():
        which = f" (`{'`, `'.join(ids)}`)" if len(machines) > 1 else ""
        lines.append(f"\nMachine{which}: {label}.")
    lines.append("Each fan-out server is pinned to one core, its load generator to the other.")
    return "\n".join(lines) + "\n"


def draw(args: argparse.Namespace) -> None:
    """Write the PNGs and capacity.md from data.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 11, "axes.labelsize": 9.5, "savefig.dpi": DPI})
    data = json.loads(args.data.read_text())
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for drawer in (draw_latency, draw_cpu, draw_memory, draw_rewards):
        path = drawer(data, out)
        if path is None:
            # A picture left from older data would no longer match data.json.
            (out / f"{drawer.__name__[5:]}.png").unlink(missing_ok=True)
            print(f"skipped {drawer.__name__[5:]}.png: no rows for it in the data", file=sys.stderr)
        else:
            print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", file=sys.stderr)
    table = capacity_table(data)
    (out / "capacity.md").write_text(table)
    print(table)


def main() -> None:
    """`run` or `draw`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the sweeps, write the raw rows to the data file")
    run_parser.add_argument("--quick", action="store_true", help="fewer points, shorter steps (checks the code)")
    run_parser.add_argument("--only", choices=("fanout", "rewards"),
                            help="run one bench; the other's runs already in the data file are kept")
    run_parser.add_argument("--servers", help="comma-separated fanout servers (default ours,bare,node)")
    run_parser.add_argument("--sessions", help="comma-separated rewards session counts")
    run_parser.add_argument("--processes", type=int,
                            help="bench/rewards.py --processes (default: its own, one hub process)")
    draw_parser = commands.add_parser("draw", help="draw the PNGs and the capacity table from the data file")
    draw_parser.add_argument("--out", type=Path, default=PERF_DIR, help="directory for the PNGs and capacity.md")
    for sub in (run_parser, draw_parser):
        sub.add_argument("--data", type=Path, default=DATA_PATH, help="the data file (default docs/perf/data.json)")
    args = parser.parse_args()
    run(args) if args.command == "run" else draw(args)


if __name__ == "__main__":
    main()
