"""Purchase pipeline: purchases/s from payment to completed with N purchase workers, and where the time goes.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/purchases.py
    .venv/bin/python bench/purchases.py --workers 1,2,4 --purchases 500 --block-interval 0.5 [--wait-sealed]

For each N in `--workers`: a fresh database on the DATABASE_URL server and one real server process
(`python -m server serve`, as bench/rewards.py starts it) with PURCHASE_WORKERS=N, its block
producer on and BLOCK_INTERVAL=`--block-interval` (history in Redis under its own prefix when
REDIS_URL is set). Seeded straight into the database: `--sellers` sellers with `--datapods`
published DataPods (dataset keys wrapped under the server's MASTER_KEY, as uploads leave them),
`--buyers` buyers with a registered KVP wallet funded through the ledger, and a session token each
(AuthService.start_session). Each of the `--purchases` purchases is one (buyer, DataPod) pair.

Then, as a buyer does it: every payment is signed beforehand (a KVP transfer of the price to the
escrow wallet `GET /api/v1/escrow` names), all are submitted (`POST /api/v1/transactions`), and at
once (or, with `--wait-sealed`, once every one is sealed) all purchases are started
(`POST /api/v1/purchases` with `payment_tx_digest`), `--concurrency` requests in flight. The bench
waits until every purchase has ended (polling the database), and prints:

- purchases/s from the first start to the last `completed` (and from the first payment);
- latency p50/p99 from start to completed (the purchase's `completed_at`), and from payment;
- where the time goes: the schema keeps no time per job step (`purchase_jobs` rows are deleted at
  the end), so the steps are timed by the buyer's `purchase_progressed` events, read back from the
  `user:<buyer>` history (`GET /api/v1/events`): their `ts` is when the outbox relay published
  them. The step waiting for the payment is split at the time its block sealed it
  (`transactions.confirmed_at`): before, waiting for the block; after, the verification, the retry
  backoff and the worker's poll. The relay's own lag (completed committed -> published) is shown
  beside, so the precision of the event times is known;
- exactness: every purchase completed exactly once (status, one `completed` event, no job left),
  one escrow row holding the amount paid, the receipts, DataPod counters, each buyer's balance
  (funded - paid), the escrow wallet's balance, and `verify_chain` (blocks, ledger, escrows).

The client runs in this process, beside the server and PostgreSQL: on a small machine read the
figures as a floor.
With BENCH_SHOW_ERRORS=1 it also prints every error line the server logged (counted otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402

from bench.cluster import delete_keys  # noqa: E402
from bench.rewards import admin, free_port, percentile, start_server, stop_server, wait_ready, with_database  # noqa: E402
from db import ledger  # noqa: E402
from db.pool import init_connection  # noqa: E402
from server.core import wallets  # noqa: E402
from server.core.crypto import wrap_key  # noqa: E402
from server.services.auth import AuthService  # noqa: E402
from server.services.chain import verify_chain  # noqa: E402

STEPS = ("payment_pending", "payment_verifying", "payment_verified", "key_wrapping", "escrow_holding", "completed")
# Rows of "where the time goes": (label, start mark, end mark); marks are event steps, or the
# client's "start" and the payment's "sealed" time.
PHASES = (
    ("API: start -> payment_pending published", "start", "payment_pending"),
    ("queue: -> payment_verifying (a worker claims the job)", "payment_pending", "payment_verifying"),
    ("verify: waiting for the payment's block", "payment_verifying", "sealed"),
    ("verify: after the block (check, backoff, poll)", "sealed", "payment_verified"),
    ("wrap: -> key_wrapping", "payment_verified", "key_wrapping"),
    ("hold: -> escrow_holding", "key_wrapping", "escrow_holding"),
    ("complete: -> completed", "escrow_holding", "completed"),
)
FUNDING_SPARE = Decimal("10")  # each buyer keeps this after paying for all its purchases


@dataclass
class Buyer:
    id: uuid.UUID
    wallet: wallets.Wallet
    token: str = ""
    funded: Decimal = Decimal(0)


@dataclass
class Purchase:
    buyer: Buyer
    datapod_id: uuid.UUID
    price: Decimal
    payment: dict
    paid_at: float = 0.0     # wall clock, when the payment was sent
    digest: str = ""
    started_at: float = 0.0  # wall clock, when the purchase was sent
    acked_at: float = 0.0    # wall clock, when its 202 came back
    id: str = ""
    error: str = ""


@dataclass
class Run:
    workers: int
    purchases: list[Purchase]
    pay_seconds: float = 0.0
    start_seconds: float = 0.0
    rows: dict[str, asyncpg.Record] = field(default_factory=dict)
    steps: dict[str, dict[str, float]] = field(default_factory=dict)   # purchase id -> step -> ts
    completed_events: Counter = field(default_factory=Counter)
    log: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    chain: str = ""


# --- seeding -------------------------------------------------------------------------------------

async def seed(dsn: str, master_key: bytes, jwt_secret: bytes, sellers: int, datapods: int, buyers: int,
               purchases: int, escrow: str) -> list[Purchase]:
    """Sellers, DataPods, funded buyers with wallets and tokens, and every purchase's signed payment."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            seller_ids = [uuid.uuid4() for _ in range(sellers)]
            people = [Buyer(uuid.uuid4(), wallets.Wallet.generate()) for _ in range(buyers)]
            await conn.execute(
                """INSERT INTO users (id, username, email, password_hash)
                   SELECT id, 'bench_seller_' || n, 'bench_seller_' || n || '@example.org', 'not-a-login'
                   FROM unnest($1::uuid[]) WITH ORDINALITY AS t(id, n)""", seller_ids)
            await conn.execute(
                """INSERT INTO users (id, username, email, password_hash, wallet_public_key, wallet_address)
                   SELECT id, 'bench_buyer_' || n, 'bench_buyer_' || n || '@example.org', 'not-a-login', k, a
                   FROM unnest($1::uuid[], $2::text[], $3::text[]) WITH ORDINALITY AS t(id, k, a, n)""",
                [b.id for b in people], [b.wallet.public_key for b in people], [b.wallet.address for b in people])
            pods, prices, rows = [], [], []
            for n in range(datapods):
                pod_id, key = uuid.uuid4(), secrets.token_bytes(32)
                price = Decimal("1.25") + Decimal("0.5") * (n % 7)
                pods.append(pod_id)
                prices.append(price)
                rows.append((pod_id, seller_ids[n % sellers], f"Bench pod {n}", price, f"bench-blob-{pod_id}",
                             hashlib.sha256(key).hexdigest(), secrets.token_hex(12),
                             wrap_key(master_key, key, str(pod_id).encode()), secrets.token_hex(32)))
            await conn.executemany(
                """INSERT INTO datapods (id, seller_id, title, category, price_sui, walrus_blob_id, walrus_storage_size,
                       encryption_key_hash, encryption_iv, wrapped_key, file_type, file_size, data_hash, published)
                   VALUES ($1, $2, $3, 'climate', $4, $5, 1000, $6, $7, $8, 'text/csv', 1000, $9, true)""", rows)
            # Purchase i: DataPod i % D bought by buyer (i // D + i) % B, so no pair repeats while
            # purchases <= buyers * datapods, and neighbours touch other pods and other buyers.
            chosen = []
            for i in range(purchases):
                d = i % datapods
                chosen.append((people[(i // datapods + d) % buyers], d))
            owed: dict[uuid.UUID, Decimal] = {}
            for buyer, d in chosen:
                owed[buyer.id] = owed.get(buyer.id, Decimal(0)) + prices[d]
            changes = []
            for buyer in people:
                buyer.funded = owed.get(buyer.id, Decimal(0)) + FUNDING_SPARE
                changes.append(ledger.BalanceChange(buyer.id, buyer.funded, ledger.FAUCET, f"bench:{buyer.id}"))
            await ledger.apply_balance_changes(conn, changes)
        auth = AuthService(jwt_secret=jwt_secret, access_token_ttl=3600, refresh_token_ttl=86_400,
                           session_cache_ttl=5.0, google_client_id=None, google_jwks_url="http://127.0.0.1:9/")
        for buyer in people:
            async with conn.transaction():
                tokens = await auth.start_session(conn, buyer.id, ip_address=None, device_info="bench/purchases.py")
            buyer.token = tokens.token
    finally:
        await conn.close()
    nonces: Counter = Counter()
    result = []
    for buyer, d in chosen:  # signed before anything is timed
        payment = buyer.wallet.sign_transfer(escrow, prices[d], nonces[buyer.id])
        nonces[buyer.id] += 1
        result.append(Purchase(buyer, pods[d], prices[d], payment))
    return result


# --- the load ------------------------------------------------------------------------------------

async def post_all(http: aiohttp.ClientSession, url: str, purchases: list[Purchase], concurrency: int,
                   path: str, body, expect: int, done) -> float:
    """POST one request per purchase, `concurrency` in flight; returns the seconds it took."""
    gate = asyncio.Semaphore(concurrency)

    async def one(p: Purchase) -> None:
        async with gate:
            sent = time.time()
            async with http.post(url + path, json=body(p), headers={"Authorization": f"Bearer {p.buyer.token}"}) as r:
                answer = await r.json()
            if r.status != expect:
                p.error = f"{path} {r.status}: {answer.get('error', answer)}"
                return
            done(p, sent, time.time(), answer["data"])

    began = time.monotonic()
    await asyncio.gather(*(one(p) for p in purchases))
    return time.monotonic() - began


async def wait_sealed(dsn: str, digests: list[str], timeout: float) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = await conn.fetchval("""SELECT count(*) FROM transactions
                                          WHERE transaction_hash = ANY($1::text[]) AND status <> 'confirmed'""",
                                       digests)
            if not left:
                return
            await asyncio.sleep(0.1)
        raise SystemExit("the payments were not sealed in time")
    finally:
        await conn.close()


async def wait_ended(dsn: str, count: int, timeout: float) -> int:
    """Poll until `count` purchases have ended (completed, failed, refunded); returns how many did."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        ended = 0
        while time.monotonic() < deadline:
            ended = await conn.fetchval(
                "SELECT count(*) FROM purchases WHERE status IN ('completed', 'failed', 'refunded')")
            if ended >= count:
                break
            await asyncio.sleep(0.1)
        return ended
    finally:
        await conn.close()


async def read_events(http: aiohttp.ClientSession, url: str, run: Run, timeout: float = 15.0) -> None:
    """Each buyer's purchase_progressed history: the time of every step, and the `completed` count."""
    buyers = {p.buyer.id: p.buyer for p in run.purchases if p.id}
    expected = {p.id for p in run.purchases if p.id}
    deadline = time.monotonic() + timeout
    while True:
        run.steps.clear()
        run.completed_events.clear()
        for buyer in buyers.values():
            channel, since = f"user:{buyer.id}", None
            while True:
                params = {"channel": channel} if since is None else {"channel": channel, "since": since, "wait": "0"}
                async with http.get(url + "/api/v1/events", params=params,
                                    headers={"Authorization": f"Bearer {buyer.token}"}) as r:
                    body = (await r.json())["data"]
                for event in body["events"]:
                    if event["type"] != "purchase_progressed":
                        continue
                    data = event["data"]
                    run.steps.setdefault(data["purchase_id"], {}).setdefault(data["step"], event["ts"])
                    if data["step"] == "completed":
                        run.completed_events[data["purchase_id"]] += 1
                if not body["has_more"] or not body["events"]:
                    break
                since = body["events"][-1]["id"]
        if expected <= set(run.completed_events) or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.3)  # the relay may still be publishing the last ones


async def read_rows(dsn: str, run: Run) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT p.id::text AS id, p.status, p.created_at, p.completed_at, t.confirmed_at, t.status AS tx_status
               FROM purchases p LEFT JOIN transactions t ON t.transaction_hash = p.payment_tx_digest""")
        run.rows = {row["id"]: row for row in rows}
    finally:
        await conn.close()


# --- checks --------------------------------------------------------------------------------------

async def check(dsn: str, run: Run, escrow_address: str) -> None:
    """Every purchase completed once, one escrow each, money adds up, and the chain verifies."""
    problems = run.problems
    started = [p for p in run.purchases if p.id]
    ids = [uuid.UUID(p.id) for p in started]
    problems += [f"{p.error}" for p in run.purchases if p.error][:5]
    if len(started) < len(run.purchases):
        problems.append(f"{len(run.purchases) - len(started)} purchases were not started")
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)  # the block data's JSON codecs, as the server's pool has them
    try:
        statuses = Counter({row["status"]: row["n"] for row in await conn.fetch(
            "SELECT status, count(*) AS n FROM purchases GROUP BY status")})
        if statuses != Counter({"completed": len(started)}):
            problems.append(f"purchase statuses {dict(statuses)}, expected {len(started)} completed")
        twice = [pid for pid, n in run.completed_events.items() if n != 1]
        missing = [p.id for p in started if p.id not in run.completed_events]
        if twice or missing:
            problems.append(f"`completed` events: {len(missing)} missing, {len(twice)} more than once")
        jobs = await conn.fetchval("SELECT count(*) FROM purchase_jobs")
        if jobs:
            problems.append(f"{jobs} purchase jobs left")
        row = await conn.fetchrow(
            """SELECT count(*) AS escrows, count(DISTINCT e.purchase_id) AS purchases,
                      count(*) FILTER (WHERE e.status <> 'holding') AS not_holding,
                      count(*) FILTER (WHERE e.amount_sui <> p.amount_sui) AS wrong_amount,
                      coalesce(sum(e.amount_sui), 0) AS held
               FROM escrow_transactions e JOIN purchases p ON p.id = e.purchase_id
               WHERE e.purchase_id = ANY($1::uuid[])""", ids)
        if (row["escrows"], row["purchases"], row["not_holding"], row["wrong_amount"]) != (len(ids), len(ids), 0, 0):
            problems.append(f"escrows: {dict(row)} for {len(ids)} purchases")
        receipts = await conn.fetchval(
            "SELECT count(DISTINCT purchase_id) FROM payment_receipts WHERE purchase_id = ANY($1::uuid[])", ids)
        if receipts != len(ids):
            problems.append(f"{receipts} payment receipts for {len(ids)} purchases")
        counters = await conn.fetchval(
            """SELECT count(*) FROM datapods d
               WHERE purchase_count <> (SELECT count(*) FROM purchases p
                                        WHERE p.datapod_id = d.id AND p.status = 'completed')""")
        if counters:
            problems.append(f"{counters} DataPods whose purchase_count is not their completed purchases")
        paid = sum((p.price for p in started), Decimal(0))
        spent: dict[uuid.UUID, Decimal] = {}
        for p in started:
            spent[p.buyer.id] = spent.get(p.buyer.id, Decimal(0)) + p.price
        people = {p.buyer.id: p.buyer for p in run.purchases}
        balances = {row["id"]: row["total_balance"] for row in await conn.fetch(
            "SELECT id, total_balance FROM users WHERE id = ANY($1::uuid[])", list(people))}
        wrong = [b for b in people.values() if balances.get(b.id) != b.funded - spent.get(b.id, Decimal(0))]
        if wrong:
            problems.append(f"{len(wrong)} buyers' balances are not funded - paid (e.g. {wrong[0].id}: "
                            f"{balances.get(wrong[0].id)} != {wrong[0].funded - spent.get(wrong[0].id, Decimal(0))})")
        escrow_balance = await conn.fetchval("SELECT total_balance FROM users WHERE wallet_address = $1",
                                             escrow_address)
        if not (escrow_balance == row["held"] == paid):
            problems.append(f"escrow wallet holds {escrow_balance}, escrows {row['held']}, payments {paid}")
        sums = await conn.fetchrow("""SELECT (SELECT coalesce(sum(total_balance), 0) FROM users) AS balances,
                                             (SELECT coalesce(sum(delta), 0) FROM balance_ledger) AS ledger""")
        if sums["balances"] != sums["ledger"]:
            problems.append(f"balances sum to {sums['balances']}, the ledger to {sums['ledger']}")
        report = await verify_chain(conn)
        run.chain = f"chain verify ok ({report.blocks} blocks)" if report.ok else "chain verify FAILED"
        if not report.ok:
            problems.append(f"chain verify: {report.problem or ''} {'; '.join(report.ledger_problems[:3])}")
    finally:
        await conn.close()


def read_log(path: Path) -> Counter:
    """Counts of what the server logged about the jobs (pending verdicts are retries) and its errors."""
    counts: Counter = Counter()
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        name = entry.get("event")
        if name == "payment_verdict":
            counts[f"verdict_{entry.get('outcome')}"] += 1
        elif name in ("purchase_job_claimed", "purchase_job_lease_lost", "purchase_job_step_failed",
                      "purchase_worker_error", "purchase_failed"):
            counts[name] += 1
        if entry.get("level") in ("error", "critical"):
            counts["errors"] += 1
            counts[f"error:{name}" + (f" ({entry['task']})" if entry.get("task") else "")] += 1
            if os.environ.get("BENCH_SHOW_ERRORS"):
                print(line)
    return counts


# --- one N ---------------------------------------------------------------------------------------

async def run_once(args: argparse.Namespace, workers: int, admin_dsn: str) -> Run:
    name = f"hub_bench_purchases_{uuid.uuid4().hex[:8]}"
    dsn = with_database(admin_dsn, name)
    prefix = f"{name}:"
    master_key, jwt_secret = secrets.token_bytes(32), secrets.token_bytes(32)
    env = {"BLOCK_PRODUCER": "true", "BLOCK_INTERVAL": str(args.block_interval), "PURCHASE_WORKERS": str(workers),
           "REDIS_PREFIX": prefix, "MASTER_KEY": base64.urlsafe_b64encode(master_key).decode(),
           "JWT_SECRET": base64.urlsafe_b64encode(jwt_secret).decode()}
    await admin(admin_dsn, f'CREATE DATABASE "{name}"')
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="hub-bench-purchases-") as tmp:
        log_path = Path(tmp) / "server.log"
        process = start_server(dsn, port, Path(tmp), log_path, None, env)
        try:
            await wait_ready(url, process)  # the server migrates the new database on start
            connector = aiohttp.TCPConnector(limit=args.concurrency)
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.get(url + "/api/v1/escrow") as r:
                    escrow = (await r.json())["data"]["address"]
                purchases = await seed(dsn, master_key, jwt_secret, args.sellers, args.datapods, args.buyers,
                                       args.purchases, escrow)
                run = Run(workers, purchases)

                def paid(p: Purchase, sent: float, acked: float, data: dict) -> None:
                    p.paid_at, p.digest = sent, data["hash"]

                def started(p: Purchase, sent: float, acked: float, data: dict) -> None:
                    p.started_at, p.acked_at, p.id = sent, acked, data["id"]

                run.pay_seconds = await post_all(http, url, purchases, args.concurrency, "/api/v1/transactions",
                                                 lambda p: p.payment, 201, paid)
                if args.wait_sealed:
                    await wait_sealed(dsn, [p.digest for p in purchases if p.digest], args.timeout)
                todo = [p for p in purchases if p.digest]
                run.start_seconds = await post_all(
                    http, url, todo, args.concurrency, "/api/v1/purchases",
                    lambda p: {"datapod_id": str(p.datapod_id), "payment_tx_digest": p.digest}, 202, started)
                count = sum(1 for p in purchases if p.id)
                ended = await wait_ended(dsn, count, args.timeout)
                if ended < count:
                    run.problems.append(f"only {ended} of {count} purchases ended within {args.timeout:.0f} s")
                await read_rows(dsn, run)
                await read_events(http, url, run)
            await check(dsn, run, escrow)
        finally:
            stop_server(process)
            await admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            if os.environ.get("REDIS_URL"):
                await delete_keys(os.environ["REDIS_URL"], prefix)
        run.log = read_log(log_path)
    return run


# --- report --------------------------------------------------------------------------------------

def summarise(run: Run) -> dict:
    done = [p for p in run.purchases if p.id and run.rows.get(p.id) and run.rows[p.id]["completed_at"]]
    if not done:
        return {"rate": 0.0, "phases": {}}
    last = max(run.rows[p.id]["completed_at"].timestamp() for p in done)
    first_start = min(p.started_at for p in run.purchases if p.id)
    first_paid = min(p.paid_at for p in run.purchases if p.digest)
    latency = [(run.rows[p.id]["completed_at"].timestamp() - p.started_at) * 1000 for p in done]
    acks = [(p.acked_at - p.started_at) * 1000 for p in done]
    from_payment = [(run.rows[p.id]["completed_at"].timestamp() - p.paid_at) * 1000 for p in done]
    phases: dict[str, list[float]] = {label: [] for label, _, _ in PHASES}
    relay, totals, unsealed = [], [], 0
    for p in done:
        marks = dict(run.steps.get(p.id, {}))
        if not all(step in marks for step in STEPS):
            continue
        marks["start"] = p.started_at
        sealed = run.rows[p.id]["confirmed_at"].timestamp()
        # Sealed before the job first looked: no wait; sealed after it verified: cannot be (clamped).
        marks["sealed"] = min(max(sealed, marks["payment_verifying"]), marks["payment_verified"])
        unsealed += sealed > marks["payment_verifying"]
        for label, begin, end in PHASES:
            phases[label].append((marks[end] - marks[begin]) * 1000)
        totals.append((marks["completed"] - p.started_at) * 1000)
        relay.append((marks["completed"] - run.rows[p.id]["completed_at"].timestamp()) * 1000)
    return {"count": len(done), "rate": len(done) / (last - first_start), "rate_paid": len(done) / (last - first_paid),
            "seconds": last - first_start, "p50": statistics.median(latency), "p99": percentile(latency, 0.99),
            "paid_p50": statistics.median(from_payment), "paid_p99": percentile(from_payment, 0.99),
            "ack_p50": statistics.median(acks), "ack_p99": percentile(acks, 0.99),
            "phases": phases, "totals": totals, "relay": relay, "unsealed": unsealed, "timed": len(totals)}


def report_run(run: Run, s: dict, args: argparse.Namespace) -> None:
    n = len(run.purchases)
    print(f"\nPURCHASE_WORKERS={run.workers}: {n} payments submitted in {run.pay_seconds:.2f} s, "
          f"purchases started in {run.start_seconds:.2f} s "
          f"({n / max(run.start_seconds, 1e-9):,.0f}/s taken by the API)")
    if not s.get("count"):
        print("  nothing completed")
    else:
        print(f"  {s['count']} completed in {s['seconds']:.2f} s: {s['rate']:,.1f} purchases/s from the first start "
              f"({s['rate_paid']:,.1f}/s from the first payment)")
        print(f"  latency ms: start -> completed p50 {s['p50']:,.0f}, p99 {s['p99']:,.0f}; "
              f"payment -> completed p50 {s['paid_p50']:,.0f}, p99 {s['paid_p99']:,.0f}; "
              f"start acked (202) p50 {s['ack_p50']:,.0f}, p99 {s['ack_p99']:,.0f}")
        mean_total = statistics.fmean(s["totals"]) if s["totals"] else float("nan")
        print(f"  where the time goes ({s['timed']} purchases timed by their events; {s['unsealed']} payments were "
              f"not sealed yet when their job first looked):")
        print(f"    {'step':<56}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'share':>7}")
        for label, values in s["phases"].items():
            if values:
                mean = statistics.fmean(values)
                print(f"    {label:<56}{statistics.median(values):>9,.1f}{percentile(values, 0.99):>9,.1f}"
                      f"{mean:>9,.1f}{mean / mean_total:>7.0%}")
        if s["totals"]:
            print(f"    {'total: start -> completed published':<56}{statistics.median(s['totals']):>9,.1f}"
                  f"{percentile(s['totals'], 0.99):>9,.1f}{mean_total:>9,.1f}")
            print(f"    {'(outbox relay: completed committed -> published)':<56}{statistics.median(s['relay']):>9,.1f}"
                  f"{percentile(s['relay'], 0.99):>9,.1f}{statistics.fmean(s['relay']):>9,.1f}")
    log = run.log
    print(f"  server log: {log['purchase_job_claimed']} job claims, {log['verdict_pending']} verifications found the "
          f"payment unsealed (retried), {log['purchase_job_step_failed']} step failures, "
          f"{log['purchase_job_lease_lost']} lost leases, {log['errors']} errors "
          f"{ {k[6:]: v for k, v in log.items() if k.startswith('error:')} or ''}")
    print(f"  checks: {'ok' if not run.problems else 'MISMATCH'} ({run.chain})")
    for problem in run.problems:
        print(f"    - {problem}")


def report_table(results: list[tuple[Run, dict]], args: argparse.Namespace) -> None:
    short = ("queue", "block", "after", "wrap", "hold", "complete")
    print(f"\n{args.purchases} purchases, {args.buyers} buyers, {args.datapods} DataPods of {args.sellers} sellers, "
          f"BLOCK_INTERVAL {args.block_interval} s, {'payments sealed first, ' if args.wait_sealed else ''}"
          f"redis: {'yes' if os.environ.get('REDIS_URL') else 'no'}, load average {os.getloadavg()[0]:.2f}")
    header = (f"{'workers':>7}{'purch/s':>9}{'p50 ms':>8}{'p99 ms':>8}"
              + "".join(f"{name:>9}" for name in short) + "   checks")
    print(header + "\n" + "-" * len(header))
    labels = [label for label, _, _ in PHASES][1:]
    for run, s in results:
        means = [statistics.fmean(s["phases"][label]) if s.get("phases", {}).get(label) else float("nan")
                 for label in labels]
        print(f"{run.workers:>7}{s.get('rate', 0):>9,.1f}{s.get('p50', float('nan')):>8,.0f}"
              f"{s.get('p99', float('nan')):>8,.0f}" + "".join(f"{m:>9,.1f}" for m in means)
              + f"   {'ok' if not run.problems else 'MISMATCH'}")
    print("(step columns: mean ms per purchase; queue = until a worker claims it, block = waiting for the "
          "payment's block, after = verification after the block incl. retry backoff and poll)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="PURCHASE_WORKERS values, one server run each")
    parser.add_argument("--purchases", type=int, default=500)
    parser.add_argument("--buyers", type=int, default=100)
    parser.add_argument("--sellers", type=int, default=10)
    parser.add_argument("--datapods", type=int, default=50)
    parser.add_argument("--block-interval", type=float, default=0.5, help="BLOCK_INTERVAL of the server (s)")
    parser.add_argument("--concurrency", type=int, default=50, help="HTTP requests in flight")
    parser.add_argument("--wait-sealed", action="store_true",
                        help="start the purchases only once every payment is sealed (the pipeline without the block)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all purchases to end")
    args = parser.parse_args()
    if args.purchases > args.buyers * args.datapods:
        raise SystemExit("--purchases must be at most --buyers x --datapods (a buyer buys a DataPod once)")
    if -(-args.purchases // args.buyers) * 7 > 900:
        raise SystemExit("too many purchases per buyer for its channel's history (HISTORY_CAP): add --buyers")
    admin_dsn = os.environ.get("DATABASE_URL")
    if not admin_dsn:
        raise SystemExit("set DATABASE_URL to a PostgreSQL server where the bench may create a database")
    results = []
    for workers in [int(n) for n in args.workers.split(",") if n.strip()]:
        run = await run_once(args, workers, admin_dsn)
        s = summarise(run)
        report_run(run, s, args)
        results.append((run, s))
    report_table(results, args)


if __name__ == "__main__":
    asyncio.run(main())
