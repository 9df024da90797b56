"""Payment verification behind one interface: the KVP chain in PostgreSQL (default) or Sui via pysui.

A verifier answers one question for a purchase: does this transaction digest prove that the buyer
paid the seller (or the escrow address) at least the price, recently enough? The answer is
`verified`, `rejected` (final: the purchase fails) or `pending` (not visible yet or the node did
not answer: the job retries until PAYMENT_VERIFY_TIMEOUT).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import re
import urllib.parse
import uuid
from decimal import Decimal
from typing import Any, Protocol

import asyncpg
import structlog
from aiohttp import web

from db import payments as payment_queries

log = structlog.get_logger(__name__)

MIST_PER_SUI = 10**9
SUI_COIN_TYPE = "0x" + "0" * 63 + "2::sui::SUI"
_SUI_ADDRESS = re.compile(r"^0x[0-9a-f]{1,64}$")


class Outcome(str, enum.Enum):
    """What a verification concluded."""

    VERIFIED = "verified"
    REJECTED = "rejected"
    PENDING = "pending"


@dataclasses.dataclass(frozen=True, slots=True)
class PaymentClaim:
    """What the buyer claims: this digest pays `price_sui` from them to the seller for a purchase."""

    digest: str
    buyer_id: uuid.UUID
    buyer_sui_address: str | None
    seller_id: uuid.UUID
    seller_sui_address: str | None
    price_sui: Decimal
    started_at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """A verifier's answer; sender, receiver and amount are filled when the transaction was read."""

    outcome: Outcome
    reason: str = ""
    chain: str = ""
    sender: str | None = None
    receiver: str | None = None
    amount_sui: Decimal | None = None
    # A refused payment that still moved the buyer's money into the escrow: it is owed back.
    paid_escrow: bool = False

    @classmethod
    def rejected(cls, chain: str, reason: str) -> "Verdict":
        """A final refusal."""
        return cls(Outcome.REJECTED, reason, chain)

    @classmethod
    def pending(cls, chain: str, reason: str) -> "Verdict":
        """Not decidable yet; ask again later."""
        return cls(Outcome.PENDING, reason, chain)


class ChainVerifier(Protocol):
    """Checks a payment claim against a chain."""

    chain: str

    async def verify(self, claim: PaymentClaim) -> Verdict:
        """Verified, rejected or pending; never raises for a bad claim."""


PAYMENT_VERIFIER: web.AppKey[ChainVerifier] = web.AppKey("payment_verifier", ChainVerifier)


def _too_old(tx_time: dt.datetime, claim: PaymentClaim, max_age: float) -> bool:
    # The digest is sent with start_purchase, so the payment always precedes the purchase row:
    # "after the purchase started" means "not older than max_age before it" (0 = strictly after).
    return tx_time < claim.started_at - dt.timedelta(seconds=max_age)


class KvpChainVerifier:
    """The default: a payment is a KVP-chain `transactions` row found by `transaction_hash`.

    Rules (docs/schema.md, "Payments"): the row is confirmed (`status` 'confirmed' since migration
    0004; before it, sealed in a block), `pending` rows are waited for and `rejected` ones refused;
    the sender is the buyer (`sender_id`, or `sender` = the buyer's wallet address), the receiver is
    the server's escrow wallet (the seller too when no escrow address is given: the pre-escrow rule,
    kept for tools that verify outside the app), `amount` >= the price, and `created_at` is not
    older than max_age before the purchase.
    """

    chain = "kvp"

    def __init__(self, pool: asyncpg.Pool, *, escrow_address: str | None = None, max_age: float = 3600.0) -> None:
        self.pool = pool
        self.escrow_address = escrow_address
        self.max_age = max_age

    async def verify(self, claim: PaymentClaim) -> Verdict:
        """Check the claim against the transactions table."""
        async with self.pool.acquire() as conn:
            payment = await payment_queries.find_payment(conn, claim.digest, claim.buyer_id, claim.seller_id)
        if payment is None:
            return Verdict.pending(self.chain, "no transaction with that hash (yet)")
        if payment.status == "rejected":
            return Verdict.rejected(self.chain, "the transaction was rejected by the chain")
        if payment.status == "pending" or (payment.status is None and payment.block_id is None):
            return Verdict.pending(self.chain, "the transaction is not confirmed yet")
        common = {"chain": self.chain, "sender": payment.sender, "receiver": payment.receiver,
                  "amount_sui": payment.amount}
        from_buyer = payment.sender_id == claim.buyer_id or (
            payment.buyer_wallet is not None and payment.sender == payment.buyer_wallet)
        if not from_buyer:
            return Verdict(Outcome.REJECTED, "the transaction was not sent by the buyer", **common)
        if self.escrow_address is not None:
            if payment.receiver != self.escrow_address:
                return Verdict(Outcome.REJECTED, "the transaction does not pay the escrow address", **common)
            common["paid_escrow"] = True
        elif not (payment.receiver_id == claim.seller_id
                  or (payment.seller_wallet is not None and payment.receiver == payment.seller_wallet)):
            return Verdict(Outcome.REJECTED, "the transaction does not pay the seller", **common)
        if payment.amount is None or payment.amount < claim.price_sui:
            return Verdict(Outcome.REJECTED, "the amount is below the price", **common)
        if _too_old(payment.created_at, claim, self.max_age):
            return Verdict(Outcome.REJECTED, "the transaction is older than the purchase allows", **common)
        return Verdict(Outcome.VERIFIED, "", **{**common, "paid_escrow": False})


def normalise_sui_address(address: str | None) -> str | None:
    """Lower-case 0x + 64 hex digits (Sui addresses may be written without leading zeros)."""
    if not address:
        return None
    value = address.strip().lower()
    if not _SUI_ADDRESS.match(value):
        return None
    return "0x" + value[2:].rjust(64, "0")


def _is_sui(coin_type: str | None) -> bool:
    if not coin_type:
        return False
    head, sep, rest = coin_type.partition("::")
    normal = normalise_sui_address(head)
    return bool(sep) and normal is not None and f"{normal}::{rest}" == SUI_COIN_TYPE


class SuiGrpcTransport:
    """The one pysui gRPC call we need, without pysui's on-disk PysuiConfig.json (which a read-only
    verifier has no use for). Same `execute_grpc_request` signature as pysui's GrpcProtocolClient,
    so either can be given to SuiChainVerifier."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        from grpclib.client import Channel

        parts = urllib.parse.urlsplit(url if "://" in url else f"https://{url}")
        secure = parts.scheme in ("https", "grpcs")
        self._channel = Channel(host=parts.hostname, port=parts.port or (443 if secure else 80), ssl=secure)
        self._timeout = timeout

    async def execute_grpc_request(self, *, request: Any, **_: Any) -> Any:
        """Run a pysui ledger request; NOT_FOUND answers ok with no data, as pysui's `not_found_as_none`."""
        import pysui.sui.sui_grpc.suimsgs.sui.rpc.v2 as sui_prot
        from grpclib.const import Status
        from grpclib.exceptions import GRPCError
        from pysui import SuiRpcResult

        method, message = request.to_request(stub=sui_prot.LedgerServiceStub(self._channel))
        try:
            return SuiRpcResult(True, None, await method(message, timeout=self._timeout))
        except GRPCError as exc:
            if exc.status == Status.NOT_FOUND:
                return SuiRpcResult(True, None, None)
            return SuiRpcResult(False, f"{exc.status.name}: {exc.message}")
        except (OSError, TimeoutError) as exc:
            return SuiRpcResult(False, f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


class SuiChainVerifier:
    """With SUI_RPC_URL: the transaction by digest through pysui's gRPC `GetTransaction`.

    Checks `effects.status.success`, `transaction.sender` = the buyer's sui_address, the seller's
    address (or the escrow address) credited at least the price in MIST by `balance_changes` in SUI,
    and the checkpoint `timestamp` not older than max_age before the purchase. A transaction that is
    not found or not yet checkpointed is pending.
    """

    chain = "sui"
    READ_MASK = ["digest", "transaction.sender", "effects.status", "balance_changes", "timestamp", "checkpoint"]

    def __init__(self, client: Any, *, escrow_address: str | None = None, max_age: float = 3600.0) -> None:
        self.client = client
        self.escrow_address = normalise_sui_address(escrow_address)
        self.max_age = max_age

    async def verify(self, claim: PaymentClaim) -> Verdict:
        """Fetch the transaction and check it."""
        from pysui.sui.sui_grpc.pgrpc_requests import GetTransaction

        buyer = normalise_sui_address(claim.buyer_sui_address)
        if buyer is None:
            return Verdict.rejected(self.chain, "the buyer has no Sui address (sign in with Google first)")
        request = GetTransaction(digest=claim.digest, field_mask=self.READ_MASK)
        request.not_found_as_none = True  # pysui's client then answers ok with None
        try:
            result = await self.client.execute_grpc_request(request=request)
        except Exception as exc:  # noqa: BLE001 - a node failure is retried, never a verdict
            log.warning("sui_verify_failed", error=type(exc).__name__)
            return Verdict.pending(self.chain, "the Sui node did not answer")
        if not result.is_ok():
            return Verdict.pending(self.chain, f"the Sui node refused: {str(result.result_string)[:200]}")
        executed = result.result_data
        if executed is None:
            return Verdict.pending(self.chain, "no transaction with that digest (yet)")
        if executed.digest and executed.digest != claim.digest:
            return Verdict.rejected(self.chain, "the node answered for another digest")
        sender = normalise_sui_address(executed.transaction.sender if executed.transaction else None)
        status = executed.effects.status if executed.effects else None
        if status is None:
            return Verdict.pending(self.chain, "the transaction has no effects yet")
        if not status.success:
            return Verdict(Outcome.REJECTED, "the transaction failed on chain", self.chain, sender)
        if sender != buyer:
            return Verdict(Outcome.REJECTED, "the transaction was not sent by the buyer", self.chain, sender)
        payees = {address for address in (normalise_sui_address(claim.seller_sui_address), self.escrow_address)
                  if address}
        if not payees:
            return Verdict(Outcome.REJECTED, "the seller has no Sui address and no escrow address is set",
                           self.chain, sender)
        credited: dict[str, int] = {}
        for change in executed.balance_changes or ():
            address = normalise_sui_address(change.address)
            if address in payees and _is_sui(change.coin_type) and change.amount:
                credited[address] = credited.get(address, 0) + int(change.amount)
        receiver, mist = max(credited.items(), key=lambda item: item[1], default=(None, 0))
        amount = Decimal(mist) / MIST_PER_SUI
        common = {"chain": self.chain, "sender": sender, "receiver": receiver, "amount_sui": amount}
        if mist < sui_to_mist(claim.price_sui):
            return Verdict(Outcome.REJECTED, "the seller was credited less than the price", **common)
        if executed.timestamp is None:
            return Verdict.pending(self.chain, "the transaction is not in a checkpoint yet")
        if _too_old(executed.timestamp, claim, self.max_age):
            return Verdict(Outcome.REJECTED, "the transaction is older than the purchase allows", **common)
        return Verdict(Outcome.VERIFIED, "", **common)


def sui_to_mist(amount: Decimal) -> int:
    """SUI (NUMERIC(20,9)) to integer MIST, exactly; refuses sub-MIST fractions."""
    mist = amount * MIST_PER_SUI
    if mist != mist.to_integral_value():
        raise ValueError(f"{amount} SUI is not a whole number of MIST")
    return int(mist)


def make_verifier(settings: Any, pool: asyncpg.Pool, kvp_escrow_address: str) -> ChainVerifier:
    """The Sui verifier when SUI_RPC_URL is set (payments to ESCROW_ADDRESS or the seller), else the
    KVP-chain one (payments to the server's escrow wallet only)."""
    if settings.sui_rpc_url:
        return SuiChainVerifier(SuiGrpcTransport(settings.sui_rpc_url), escrow_address=settings.escrow_address,
                                max_age=settings.payment_max_age)
    return KvpChainVerifier(pool, escrow_address=kvp_escrow_address, max_age=settings.payment_max_age)
