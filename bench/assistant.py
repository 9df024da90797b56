"""Assistant streaming: what the hub adds to a model's token stream, in latency, CPU and database writes.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/assistant.py
    .venv/bin/python bench/assistant.py --conversations 200 --tokens 100 --interval-ms 20 --messages 1
    .venv/bin/python bench/assistant.py --conversations 50 --profile /tmp/hub.prof   # cProfile the window

Workload: a scripted OpenAI-compatible upstream (`bench/assistant.py upstream`, its own process on
loopback) answers `POST /v1/chat/completions` with `stream: true` as Server-Sent Events in OpenAI's
chunk format (a role chunk, `--tokens` content chunks one every `--interval-ms` after
`--first-token-ms`, the finish chunk, the usage chunk, `data: [DONE]`), and records the wall-clock
time (`time.time()`) just before it writes each token chunk. Non-streamed requests (the automatic
title job) get a short completion. Token i's text is " w<i>", so a client can tell which upstream
tokens a delta holds even if the hub merges deltas.

One real hub process (`python -m server serve` on a fresh database, Redis when REDIS_URL is set,
OPENAI_BASE_URL at the upstream, the per-user rate limit and quota raised) serves `--conversations`
users, registered over REST, each with one Socket.IO connection on `/assistant` and one
conversation. In the measured window every client sends `--messages` messages one after the other
(`send_message`, the starts spread over `--ramp` seconds) and records the receive time of each
`message_delta` until `message_completed`. Figures:

- added first-token latency: from the client's send of the message to its receipt of the delta
  carrying token 0, less the model's own time to that token (the upstream's send of token 0 minus
  its receipt of the request) (p50/p99), target p99 < 15 ms. It includes the hub's admission and
  its request to the model, printed apart (the send to the upstream's receipt): counted from the
  upstream's send of token 0 only, it hid a wait of seconds for a connection to the model;
- added inter-token delay: for consecutive tokens, client inter-arrival minus upstream inter-send
  (p99), target < 5 ms; the added latency of every token (receive - send) is printed beside it,
  and how long `message_completed` came after an answer's last delta;
- server CPU per token: the hub process's user+system CPU over the window (/proc/<pid>/stat) over
  the tokens delivered, target < 50 us; the window includes each answer's start, saves, final
  state and title job, so it is the whole cost of streaming, per token;
- database writes per answer: rows inserted/updated/deleted (pg_stat_database of the bench
  database) and commits (xact_commit, which also counts read-only statements) over the window,
  divided by answers, with the tables written most.

`--warmup N`: each conversation first sends N messages, not measured. A hub that has run a while
answers from warm connections: asyncpg prepares each statement once per pooled connection, so
without a warm-up most answers of a small run pay a few extra round trips. The title jobs then run
before the window too, so the window holds later messages of conversations, as a steady state does.

The clients run in this process and timestamps include their own event-loop delays, so the
latency figures are upper bounds; on a small shared machine read them with the load beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
from aiohttp import web  # noqa: E402

from bench.cluster import delete_keys  # noqa: E402
from bench.fanout import Proc, cpu_seconds, free_port  # noqa: E402
from bench.lean_socket import LeanSocket  # noqa: E402
from bench.rewards import admin, start_server, stop_server, wait_ready, with_database  # noqa: E402

TARGET_FIRST_TOKEN_P99_MS = 15.0
TARGET_INTER_TOKEN_P99_MS = 5.0
TARGET_CPU_PER_TOKEN_US = 50.0
PASSWORD = "bench-assistant-1"
TOKEN_RE = re.compile(r"w(\d+)")
KEY_PREFIX = "bench "
EVENT_PREFIX = "42/assistant,"
ANSWER_EVENTS = ('["message_delta"', '["message_completed"', '["message_failed"')

# --- the scripted upstream (run as `bench/assistant.py upstream ...` in a subprocess) -------------------


def _chunk(created: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
    """One SSE event holding a chat.completion.chunk exactly as OpenAI writes it."""
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": created, "model": "bench",
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], "usage": None}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def serve_upstream(port: int, tokens: int, interval: float, first_token: float) -> None:
    """An OpenAI-compatible endpoint streaming `tokens` tokens per answer at a fixed rate."""
    sent: dict[str, list[float]] = {}
    asked: dict[str, float] = {}  # when each streamed request arrived
    titles = 0

    async def completions(request: web.Request) -> web.StreamResponse:
        nonlocal titles
        body = await request.json()
        created = int(time.time())
        key = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        if not body.get("stream"):
            titles += 1
            return web.json_response({
                "id": "chatcmpl-bench-title", "object": "chat.completion", "created": created, "model": "bench",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Bench conversation"},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43}})
        asked[key] = time.time()
        times = sent.setdefault(key, [])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await response.write(_chunk(created, {"role": "assistant", "content": ""}))
        for i in range(tokens):
            delay = start + first_token + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            payload = _chunk(created, {"content": f" w{i}"})
            times.append(time.time())
            await response.write(payload)
        await response.write(_chunk(created, {}, "stop"))
        usage = {"prompt_tokens": 200, "completion_tokens": tokens, "total_tokens": 200 + tokens}
        await response.write(b"data: " + json.dumps({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": created, "model": "bench",
            "system_fingerprint": None, "choices": [], "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "bench", "object": "model"}]})

    async def report(request: web.Request) -> web.Response:
        return web.json_response({"sent": sent, "asked": asked, "titles": titles})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/bench/report", report)
    print(json.dumps({"ready": port}), flush=True)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --- the driver -------------------------------------------------------------------------------------------


class Answer:
    """One answer as a client saw it: its raw frames, stamped on receipt, decoded after the run."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.sent_at = 0.0  # when the client sent the message
        self.frames: list[tuple[float, str]] = []
        self.deltas: list[tuple[float, int, str]] = []  # (receive time, seq, text), from `decode`
        self.completed: dict[str, Any] | None = None
        self.completed_at = 0.0  # when the final event arrived
        self.done = asyncio.Event()

    def decode(self) -> None:
        """The deltas and the final event from the frames."""
        for at, frame in self.frames:
            type, wire = json.loads(frame[len(EVENT_PREFIX):])
            if type == "message_delta":
                self.deltas.append((at, wire["data"]["seq"], wire["data"]["text"]))
            elif type in ("message_completed", "message_failed"):
                self.completed = {"type": type, **wire["data"]}
                self.completed_at = at


class Conversation(LeanSocket):
    """A signed-in user's connection on /assistant and its conversation; each answer event frame is
    stamped on receipt and kept (decoded after the run)."""

    def __init__(self, n: int, token: str) -> None:
        super().__init__("/assistant")
        self.n = n
        self.token = token
        self.conversation_id = ""
        self.current: Answer | None = None
        self.errors: list[str] = []

    async def start(self, http: aiohttp.ClientSession, url: str) -> None:
        """Connect and create the conversation."""
        await self.open(http, url, {"token": self.token})
        ack = await self.call("create_conversation", {})  # untitled: the first answer runs the title job
        if not ack.get("ok"):
            raise SystemExit(f"create_conversation failed: {ack}")
        self.conversation_id = ack["data"]["conversation"]["id"]

    def on_event(self, frame: str) -> None:
        answer = self.current
        if answer is not None and frame.startswith(ANSWER_EVENTS, len(EVENT_PREFIX)):
            answer.frames.append((time.time(), frame))
            if not frame.startswith('["message_delta"', len(EVENT_PREFIX)):
                answer.done.set()

    async def ask(self, m: int, timeout: float) -> Answer | None:
        key = f"{KEY_PREFIX}{self.n}.{m}"
        answer = self.current = Answer(key)
        answer.sent_at = time.time()
        ack = await self.call("send_message", {"conversation_id": self.conversation_id, "content": key,
                                               "client_msg_id": uuid.uuid4().hex})
        if not ack.get("ok"):
            self.errors.append(ack.get("error", {}).get("code", "?"))
            return None
        try:
            await asyncio.wait_for(answer.done.wait(), timeout)
        except asyncio.TimeoutError:
            self.errors.append("timeout")
        return answer


async def sign_up(http: aiohttp.ClientSession, url: str, n: int) -> str:
    """Register a user over REST; its access token."""
    name = f"bench{n}_{uuid.uuid4().hex[:6]}"
    async with http.post(url + "/api/v1/auth/register", json={
            "username": name, "email": f"{name}@bench.invalid", "password": PASSWORD}) as response:
        envelope = await response.json(content_type=None)
    if not envelope.get("ok"):
        raise SystemExit(f"register failed: {envelope}")
    return envelope["data"]["token"]


async def db_counters(dsn: str, name: str) -> dict[str, Any]:
    """This database's commit and row-write counters, and rows written per table."""
    conn = await asyncpg.connect(dsn)
    try:
        db_row = await conn.fetchrow(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database WHERE datname = $1",
            name)
        tables = {r["relname"]: r["writes"] for r in await conn.fetch(
            "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del AS writes FROM pg_stat_user_tables")}
    finally:
        await conn.close()
    return {**dict(db_row), "tables": tables}


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of values; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def judge(value: float, target: float) -> str:
    """'met' or 'MISSED' against an upper-bound target."""
    return "met" if value < target else "MISSED"


def analyse(answers: list[Answer], sent: dict[str, list[float]], asked: dict[str, float],
            tokens: int) -> dict[str, Any]:
    """Added latencies from the client's send and receive times and the upstream's receive and send times."""
    first, before_model, per_token, inter = [], [], [], []
    broken = 0
    for answer in answers:
        upstream = sent.get(answer.key, [])
        received: dict[int, float] = {}
        seqs = [seq for _, seq, _ in answer.deltas]
        for at, _seq, text in answer.deltas:
            for index in TOKEN_RE.findall(text):
                received.setdefault(int(index), at)
        complete = (answer.completed is not None and answer.completed.get("status") == "complete"
                    and len(received) == tokens == len(upstream) and seqs == list(range(1, len(seqs) + 1)))
        if not complete:
            broken += 1
            continue
        # From the user's send to token 0, less the model's own time to it: the hub's admission and
        # request (before_model) and the token's way back.
        model_first_token = upstream[0] - asked[answer.key]
        first.append((received[0] - answer.sent_at - model_first_token) * 1000)
        before_model.append((asked[answer.key] - answer.sent_at) * 1000)
        for i in range(tokens):
            per_token.append((received[i] - upstream[i]) * 1000)
            if i:
                inter.append(((received[i] - received[i - 1]) - (upstream[i] - upstream[i - 1])) * 1000)
    return {"first": first, "before_model": before_model, "per_token": per_token, "inter": inter,
            "broken": broken}


async def run(args: argparse.Namespace, admin_dsn: str) -> None:
    name = f"hub_bench_assistant_{uuid.uuid4().hex[:8]}"
    dsn = with_database(admin_dsn, name)
    await admin(admin_dsn, f'CREATE DATABASE "{name}"')
    upstream_port, port = free_port(), free_port()
    upstream = Proc([sys.executable, str(Path(__file__).resolve()), "upstream", "--port", str(upstream_port),
                     "--tokens", str(args.tokens), "--interval-ms", str(args.interval_ms),
                     "--first-token-ms", str(args.first_token_ms)])
    url = f"http://127.0.0.1:{port}"
    prefix = f"bench-assistant-{uuid.uuid4().hex[:8]}:"
    # start_server (bench/rewards.py) builds the hub's environment from ours.
    os.environ.update({
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1", "OPENAI_API_KEY": "sk-bench", "AI_MODEL": "bench",
        "AI_MESSAGES_PER_MINUTE": "100000", "AI_DAILY_TOKEN_QUOTA": "1000000000",
        "SIGNIN_ATTEMPTS_PER_ADDRESS": "1000000", "ACCESS_TOKEN_TTL": "86400", "EVENT_RATE": "100000",
        "MAX_CONNECTIONS_PER_USER": "100000", "REDIS_PREFIX": prefix})
    conversations: list[Conversation] = []
    with tempfile.TemporaryDirectory(prefix="hub-bench-assistant-") as tmp:
        process = start_server(dsn, port, Path(tmp), Path(tmp) / "server.log", args.profile,
                               profile_window=True)
        try:
            await upstream.line(30)
            await wait_ready(url, process)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                gate = asyncio.Semaphore(args.signup_concurrency)

                async def signed_up(n: int) -> str:
                    async with gate:
                        return await sign_up(http, url, n)
                tokens = await asyncio.gather(*(signed_up(n) for n in range(args.conversations)))
                conversations = [Conversation(n, token) for n, token in enumerate(tokens)]
                gate = asyncio.Semaphore(20)

                async def opened(c: Conversation) -> None:
                    async with gate:
                        await c.start(http, url)
                await asyncio.gather(*(opened(c) for c in conversations))
                for m in range(args.warmup):
                    await asyncio.gather(*(c.ask(-1 - m, 60) for c in conversations))
                warmup_errors = sum(len(c.errors) for c in conversations)
                for c in conversations:
                    c.errors.clear()  # the window's errors are printed apart
                await asyncio.sleep(1.0)  # the connects' own work settles before the window
                before = await db_counters(dsn, name)
                if args.profile:
                    process.send_signal(signal.SIGUSR1)
                cpu0, t0 = cpu_seconds(process.pid), time.monotonic()
                others0 = cpu_seconds(upstream.pid), time.process_time()

                async def converse(c: Conversation) -> list[Answer]:
                    await asyncio.sleep(args.ramp * c.n / max(1, args.conversations))
                    done = []
                    for m in range(args.messages):
                        answer = await c.ask(m, args.tokens * args.interval_ms / 1000 * 5 + 60)
                        if answer is not None:
                            done.append(answer)
                    return done
                results = await asyncio.gather(*(converse(c) for c in conversations))
                answers = [a for batch in results for a in batch]
                # The title jobs (one per conversation, after its first answer) belong to the cost.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    async with http.get(f"http://127.0.0.1:{upstream_port}/bench/report") as response:
                        report = await response.json()
                    if report["titles"] >= len(conversations):
                        break
                    await asyncio.sleep(0.2)
                await asyncio.sleep(0.5)
                elapsed, cpu = time.monotonic() - t0, cpu_seconds(process.pid) - cpu0
                if args.profile:
                    process.send_signal(signal.SIGUSR2)
                upstream_cpu, driver_cpu = cpu_seconds(upstream.pid) - others0[0], time.process_time() - others0[1]
                await asyncio.sleep(1.5)  # PostgreSQL flushes its per-table statistics about once a second
                after = await db_counters(dsn, name)
                async with http.get(f"http://127.0.0.1:{upstream_port}/bench/report") as response:
                    report = await response.json()
                for c in conversations:
                    await c.close()
        finally:
            stop_server(process, timeout=30)
            upstream.stop()
            await admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            if os.environ.get("REDIS_URL"):  # the histories would keep a day: 400 MB after an afternoon of runs
                await delete_keys(os.environ["REDIS_URL"], prefix)
    for answer in answers:
        answer.decode()
    result = analyse(answers, report["sent"], report["asked"], args.tokens)
    delivered = sum(len(TOKEN_RE.findall(text)) for a in answers for _, _, text in a.deltas)
    deltas = sum(len(a.deltas) for a in answers)
    errors: dict[str, int] = {}
    for c in conversations:
        for e in c.errors:
            errors[e] = errors.get(e, 0) + 1
    n_answers = len(answers)
    load = os.getloadavg()
    print(f"conversations: {args.conversations}, messages each: {args.messages} (after {args.warmup} unmeasured, "
          f"{warmup_errors} of them failed), "
          f"tokens per answer: {args.tokens} "
          f"every {args.interval_ms:g} ms (first after {args.first_token_ms:g} ms), redis: "
          f"{'yes' if os.environ.get('REDIS_URL') else 'no'}, cpus: {os.cpu_count()}, "
          f"load: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"answers: {n_answers} ({result['broken']} incomplete or out of order), tokens delivered: {delivered} "
          f"in {deltas} deltas, window {elapsed:.1f} s, errors: {errors or 'none'}")
    first_p99, inter_p99 = percentile(result["first"], 0.99), percentile(result["inter"], 0.99)
    cpu_us = cpu / max(1, delivered) * 1e6
    print(f"added first-token latency ms: p50 {percentile(result['first'], 0.5):.2f}, p99 {first_p99:.2f}, "
          f"max {max(result['first'], default=float('nan')):.2f}  "
          f"(target p99 < {TARGET_FIRST_TOKEN_P99_MS:g}: {judge(first_p99, TARGET_FIRST_TOKEN_P99_MS)})")
    print(f"  of which before the model was asked (the send to the upstream's receipt of the request) ms: "
          f"p50 {percentile(result['before_model'], 0.5):.2f}, p99 {percentile(result['before_model'], 0.99):.2f}, "
          f"max {max(result['before_model'], default=float('nan')):.2f}")
    lags = [(a.completed_at - a.deltas[-1][0]) * 1000 for a in answers if a.deltas and a.completed]
    print(f"message_completed after the last delta ms: p50 {percentile(lags, 0.5):.2f}, "
          f"p99 {percentile(lags, 0.99):.2f}, max {max(lags, default=float('nan')):.2f}")
    print(f"added inter-token delay ms: p50 {percentile(result['inter'], 0.5):.2f}, p99 {inter_p99:.2f}  "
          f"(target p99 < {TARGET_INTER_TOKEN_P99_MS:g}: {judge(inter_p99, TARGET_INTER_TOKEN_P99_MS)})")
    print(f"added latency per token ms (receive - send): p50 {percentile(result['per_token'], 0.5):.2f}, "
          f"p99 {percentile(result['per_token'], 0.99):.2f}, max {max(result['per_token'], default=float('nan')):.2f}")
    print(f"server CPU: {cpu:.2f} s over {elapsed:.1f} s ({cpu / elapsed * 100:.0f}% of a core), "
          f"{cpu_us:.1f} us per token  (target < {TARGET_CPU_PER_TOKEN_US:g}: "
          f"{judge(cpu_us, TARGET_CPU_PER_TOKEN_US)})")
    print(f"the other processes over the window: upstream {upstream_cpu:.2f} s CPU, this driver (the clients) "
          f"{driver_cpu:.2f} s CPU")
    if n_answers:
        rows = sum(after[k] - before[k] for k in ("tup_inserted", "tup_updated", "tup_deleted"))
        commits = after["xact_commit"] - before["xact_commit"]
        tables = sorted(((after["tables"].get(t, 0) - before["tables"].get(t, 0), t) for t in after["tables"]),
                        reverse=True)
        top = ", ".join(f"{t} {w / n_answers:.1f}" for w, t in tables[:6] if w)
        print(f"database writes per answer: {rows / n_answers:.1f} rows inserted/updated/deleted, "
              f"{commits / n_answers:.1f} commits (read-only statements included); by table: {top}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["upstream"]:
        parser = argparse.ArgumentParser(prog="assistant.py upstream")
        parser.add_argument("upstream")
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--tokens", type=int, required=True)
        parser.add_argument("--interval-ms", type=float, required=True)
        parser.add_argument("--first-token-ms", type=float, required=True)
        return parser.parse_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=200, help="concurrent users, one conversation each")
    parser.add_argument("--messages", type=int, default=1, help="messages each conversation sends, in turn")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per answer")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="the upstream's time between tokens")
    parser.add_argument("--first-token-ms", type=float, default=20.0, help="the upstream's time to the first token")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which the first sends are spread")
    parser.add_argument("--warmup", type=int, default=0, metavar="N",
                        help="messages each conversation sends before the window, not measured (see above)")
    parser.add_argument("--signup-concurrency", type=int, default=8)
    parser.add_argument("--profile", metavar="PATH",
                        help="cProfile (CPU time) the hub over the measured window, stats to PATH")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args(sys.argv[1:])
    if getattr(args, "upstream", None):
        serve_upstream(args.port, args.tokens, args.interval_ms / 1000, args.first_token_ms / 1000)
        return
    admin_dsn = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    asyncio.run(run(args, admin_dsn))


if __name__ == "__main__":
    main()
