"""The durable purchase job: verify the payment, wrap the key for the buyer, hold escrow, complete.

A job is a `purchase_jobs` row. Workers (several per process, any number of processes) lease one
with `FOR UPDATE SKIP LOCKED` and run its steps; each step commits its state change, its next
step and its events (through the outbox) in one transaction that first re-checks the lease, so a
step is applied once even if a stalled worker's lease was taken over. While a job runs, a heartbeat
renews its lease every PURCHASE_JOB_HEARTBEAT seconds, so the lease itself can be short: a worker
that dies stops renewing, its lease expires within PURCHASE_JOB_LEASE and another worker resumes
the job at its recorded step.

This module only drives the job (lease, step order, retries with backoff) and the escrow sweep
(release after the window, pay out decided escrows); what each step does to the purchase, and the
money rules, are in server/services/purchases.py and server/services/escrow.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from db import purchases as queries
from db.pool import POOL
from server.adapters.payments import PAYMENT_VERIFIER, ChainVerifier, Outcome, make_verifier
from server.core.aio import wait_event
from server.core.crypto import MASTER_KEY
from server.core.settings import SETTINGS, Settings
from server.services import escrow, purchases

log = structlog.get_logger(__name__)

STEPS = ("verify", "wrap", "hold", "complete")
MAX_ATTEMPTS = 8
ESCROW_SWEEP_SECONDS = 1.0  # a payout waits at most this long (plus a block) after its decision


class LostLease(Exception):
    """Another worker owns the job now (our lease expired); stop without touching it."""


class PurchaseWorker:
    """Runs purchase jobs from PostgreSQL; `run` loops until cancelled, `run_once` does one job."""

    def __init__(self, pool: asyncpg.Pool, verifier: ChainVerifier, master_key: bytes, settings: Settings,
                 *, worker_id: str | None = None, escrow_accounts: escrow.EscrowAccounts | None = None) -> None:
        self.pool = pool
        self.escrow_accounts = escrow_accounts
        self.verifier = verifier
        self.master_key = master_key
        self.settings = settings
        self.worker_id = worker_id or uuid.uuid4().hex
        self.lease = settings.purchase_job_lease
        self.heartbeat = settings.purchase_job_heartbeat
        self._wake = asyncio.Event()

    # --- loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Process jobs with PURCHASE_WORKERS tasks, woken by NOTIFY or every poll interval."""
        def wake(*_: Any) -> None:
            self._wake.set()

        async with self.pool.acquire() as conn:
            await conn.add_listener(queries.JOBS_NOTIFY_CHANNEL, wake)
            tasks = [asyncio.create_task(self._loop(n)) for n in range(max(1, self.settings.purchase_workers))]
            tasks.append(asyncio.create_task(self._sweep_loop()))
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await conn.remove_listener(queries.JOBS_NOTIFY_CHANNEL, wake)

    async def _loop(self, n: int) -> None:
        while True:
            try:
                if await self.run_once():
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the worker
                log.exception("purchase_worker_error", worker=self.worker_id, task=n)
                await asyncio.sleep(self.settings.purchase_poll_interval)
            self._wake.clear()
            await wait_event(self._wake, self.settings.purchase_poll_interval)

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.release_due_escrows()
                await self.settle_escrows()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("escrow_sweep_failed")
            await asyncio.sleep(min(ESCROW_SWEEP_SECONDS, max(0.2, self.settings.escrow_release_seconds / 2)))

    async def release_due_escrows(self) -> int:
        """Release escrows of completed purchases older than ESCROW_RELEASE_SECONDS; returns how many."""
        return await escrow.release_due(self.pool, self.settings.escrow_release_seconds,
                                        escrow.fee_rate(self.settings))

    async def settle_escrows(self) -> int:
        """Sign the payouts of decided escrows, and mark sealed ones settled; returns how many settled."""
        if self.escrow_accounts is None:
            return 0
        return await escrow.settle_decided(self.pool, self.escrow_accounts, self.settings)

    async def run_once(self, purchase_id: uuid.UUID | None = None) -> bool:
        """Claim one runnable job (optionally a given one) and run it as far as it goes."""
        async with self.pool.acquire() as conn:
            job = await queries.claim_job(conn, self.worker_id, self.lease, purchase_id)
        if job is None:
            return False
        log.info("purchase_job_claimed", purchase_id=str(job.purchase_id), step=job.step, attempts=job.attempts)
        heartbeat = asyncio.create_task(self._keep_lease(job.purchase_id))
        step: str | None = job.step
        try:
            while step is not None:
                step = await getattr(self, f"_step_{step}")(job.purchase_id, step)
        except LostLease:
            log.warning("purchase_job_lease_lost", purchase_id=str(job.purchase_id), step=step)
        except Exception as exc:  # noqa: BLE001 - retried with backoff, then failed (refunded if paid)
            log.exception("purchase_job_step_failed", purchase_id=str(job.purchase_id), step=step)
            await self._retry_or_fail(job, step or job.step, f"{type(exc).__name__}: {exc}")
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
        return True

    async def _keep_lease(self, purchase_id: uuid.UUID) -> None:
        """Renew our lease every PURCHASE_JOB_HEARTBEAT seconds until cancelled or the lease is lost.

        A lost lease (expired and claimed by another worker, or the job finished) just ends the
        heartbeat: the running step finds it lost too when it re-checks the lease before committing.
        """
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                async with self.pool.acquire() as conn:
                    if not await queries.hold_job(conn, purchase_id, self.worker_id, None, self.lease):
                        return
            except Exception as exc:  # noqa: BLE001 - a database hiccup: the next beat tries again
                log.warning("purchase_job_heartbeat_failed", purchase_id=str(purchase_id),
                            error=f"{type(exc).__name__}: {exc}")

    # --- steps ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _step(self, purchase_id: uuid.UUID, step: str):
        """A transaction that holds our lease on the job at `step` (LostLease otherwise)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await queries.hold_job(conn, purchase_id, self.worker_id, step, self.lease):
                raise LostLease(str(purchase_id))
            purchase = await queries.get_purchase(conn, purchase_id)
            if purchase is None:
                raise LostLease(str(purchase_id))  # deleted with its DataPod: the job went with it
            yield conn, purchase

    async def _step_verify(self, purchase_id: uuid.UUID, step: str) -> str | None:
        async with self._step(purchase_id, step) as (conn, purchase):
            claim = await purchases.begin_verification(conn, purchase)
        verdict = await self.verifier.verify(claim)
        log.info("payment_verdict", purchase_id=str(purchase_id), outcome=verdict.outcome.value, reason=verdict.reason)
        if verdict.outcome is Outcome.PENDING:
            waited = (dt.datetime.now(dt.timezone.utc) - purchase.created_at).total_seconds()
            if waited >= self.settings.payment_verify_timeout:
                await self._fail(purchase_id, step, f"payment not confirmed in time: {verdict.reason}")
                return None
            async with self.pool.acquire() as conn:
                attempts = await queries.job_attempts(conn, purchase_id)
                await queries.retry_job(conn, purchase_id, self.worker_id, _backoff(attempts or 1), verdict.reason)
            return None
        if verdict.outcome is Outcome.REJECTED:
            if verdict.paid_escrow:
                async with self._step(purchase_id, step) as (conn, purchase):
                    await purchases.keep_refused_payment(conn, purchase, verdict)
            await self._fail(purchase_id, step, verdict.reason)
            return None
        async with self._step(purchase_id, step) as (conn, purchase):
            if await purchases.record_payment(conn, purchase, verdict):
                await queries.advance_job(conn, purchase_id, "wrap")
                return "wrap"
        await self._fail(purchase_id, step, "this payment already paid for another purchase")
        return None

    async def _step_wrap(self, purchase_id: uuid.UUID, step: str) -> str:
        async with self.pool.acquire() as conn:
            sealed = await purchases.seal_key(conn, self.master_key, purchase_id)
        if sealed is None:
            raise LostLease(str(purchase_id))
        async with self._step(purchase_id, step) as (conn, purchase):
            if not await purchases.store_key(conn, purchase, sealed):
                raise LostLease(f"{purchase_id} left processing")
            await queries.advance_job(conn, purchase_id, "hold")
        return "hold"

    async def _step_hold(self, purchase_id: uuid.UUID, step: str) -> str:
        async with self._step(purchase_id, step) as (conn, purchase):
            await purchases.hold_escrow(conn, purchase)
            await queries.advance_job(conn, purchase_id, "complete")
        return "complete"

    async def _step_complete(self, purchase_id: uuid.UUID, step: str) -> None:
        async with self._step(purchase_id, step) as (conn, purchase):
            await queries.finish_job(conn, purchase_id)
            if not await purchases.complete_purchase(conn, purchase):
                return None  # refunded meanwhile by an admin: nothing to complete
        log.info("purchase_completed", purchase_id=str(purchase_id))
        return None

    # --- failure ----------------------------------------------------------------------------

    async def _fail(self, purchase_id: uuid.UUID, step: str, reason: str) -> None:
        """End the job: `failed` if the payment was never verified, else refunded through escrow."""
        async with self._step(purchase_id, step) as (conn, purchase):
            await queries.finish_job(conn, purchase_id)
            await purchases.fail_purchase(conn, purchase, reason)
        log.info("purchase_failed", purchase_id=str(purchase_id), reason=reason)

    async def _retry_or_fail(self, job: queries.Job, step: str, error: str) -> None:
        try:
            async with self.pool.acquire() as conn:
                attempts = await queries.job_attempts(conn, job.purchase_id, self.worker_id)
                if attempts is None:
                    return
                if attempts < MAX_ATTEMPTS:
                    await queries.retry_job(conn, job.purchase_id, self.worker_id, _backoff(attempts), error)
                    return
            await self._fail(job.purchase_id, step, "the purchase could not be processed")
        except LostLease:
            pass


PURCHASE_WORKER: web.AppKey[PurchaseWorker] = web.AppKey("purchase_worker", PurchaseWorker)


def _backoff(attempts: int) -> float:
    """0.5 s, 1 s, 2 s ... capped at 30 s."""
    return min(30.0, 0.5 * 2 ** max(0, attempts - 1))


async def purchase_jobs_ctx(app: Any) -> Any:
    """An aiohttp cleanup context: the payment verifier and the purchase worker of this process."""
    accounts = app[escrow.ESCROW_ACCOUNTS]
    if app.get(PAYMENT_VERIFIER) is None:
        app[PAYMENT_VERIFIER] = make_verifier(app[SETTINGS], app[POOL], accounts.escrow.address)
    worker = app[PURCHASE_WORKER] = PurchaseWorker(app[POOL], app[PAYMENT_VERIFIER], app[MASTER_KEY], app[SETTINGS],
                                                   escrow_accounts=accounts)
    task = asyncio.create_task(worker.run())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    close = getattr(getattr(app[PAYMENT_VERIFIER], "client", None), "close", None)
    if close is not None:
        close()
