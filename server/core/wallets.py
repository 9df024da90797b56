"""KVP wallets: Ed25519 keys, addresses, the canonical bytes a transaction signs, block hashing.

Everything a client must reproduce byte for byte is here and in docs/protocol.md ("/chain").
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
from decimal import Decimal, InvalidOperation

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from server.core.money import AMOUNT_QUANTUM

ADDRESS_PREFIX = "kvp1"
TX_DOMAIN = "KVP-TX-V1"
BLOCK_DOMAIN = "KVP-BLOCK-V1"
MAX_AMOUNT = Decimal("999999999999.99999999")
MAX_NONCE = 2**63 - 1
ADDRESS_RE = re.compile(r"^kvp1[0-9a-f]{40}$")
PUBLIC_KEY_RE = re.compile(r"^[0-9a-fA-F]{64}$")
SIGNATURE_RE = re.compile(r"^[0-9a-fA-F]{128}$")


class AmountError(ValueError):
    """An amount that is not a positive KVP amount with at most 8 decimals."""


def address_of(public_key_hex: str) -> str:
    """The wallet address of a raw Ed25519 public key: "kvp1" + first 20 bytes of its SHA-256, hex."""
    raw = bytes.fromhex(public_key_hex)
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key has 32 bytes")
    return ADDRESS_PREFIX + hashlib.sha256(raw).hexdigest()[:40]


def parse_public_key(public_key_hex: str) -> Ed25519PublicKey:
    """Load a raw 32-byte public key given as hex; ValueError when it is not one."""
    if not PUBLIC_KEY_RE.fullmatch(public_key_hex):
        raise ValueError("the public key must be 64 hex characters (32 raw bytes)")
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))


def canonical_amount(value: str | int | Decimal) -> str:
    """An amount as signed and stored: a plain decimal with exactly 8 fractional digits."""
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise AmountError("the amount is not a decimal number") from None
    if not amount.is_finite() or amount <= 0:
        raise AmountError("the amount must be greater than 0")
    if amount != amount.quantize(AMOUNT_QUANTUM):
        raise AmountError("the amount has more than 8 decimal places")
    if amount > MAX_AMOUNT:
        raise AmountError("the amount is too large")
    return f"{amount.quantize(AMOUNT_QUANTUM):f}"


def transaction_message(sender: str, receiver: str, amount: str | Decimal, nonce: int) -> bytes:
    """The exact bytes a sender signs: four fields after a domain tag, newline-separated, UTF-8."""
    return "\n".join((TX_DOMAIN, sender, receiver, canonical_amount(amount), str(int(nonce)))).encode()


def transaction_hash(sender: str, receiver: str, amount: str | Decimal, nonce: int) -> str:
    """The transaction's id: SHA-256 of its signed message, lowercase hex."""
    return hashlib.sha256(transaction_message(sender, receiver, amount, nonce)).hexdigest()


def verify_signature(public_key_hex: str, message: bytes, signature_hex: str) -> bool:
    """Whether `signature_hex` (64 bytes, hex) is the key's Ed25519 signature of `message`."""
    if not SIGNATURE_RE.fullmatch(signature_hex or ""):
        return False
    try:
        parse_public_key(public_key_hex).verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclasses.dataclass(frozen=True, slots=True)
class Wallet:
    """A key pair (clients and tests; the server never holds users' private keys)."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> "Wallet":
        """A fresh random key pair."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> str:
        """The raw public key, hex."""
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    @property
    def address(self) -> str:
        """The wallet address."""
        return address_of(self.public_key)

    def sign_transfer(self, receiver: str, amount: str | Decimal, nonce: int) -> dict:
        """A ready-to-submit transfer payload signed by this wallet."""
        message = transaction_message(self.address, receiver, amount, nonce)
        return {"sender": self.address, "receiver": receiver, "amount": canonical_amount(amount),
                "nonce": nonce, "signature": self.private_key.sign(message).hex()}


# --- blocks -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class BlockHeader:
    """What a block hash commits to (everything but the nonce, which the proof of work searches)."""

    height: int
    previous_hash: str | None
    timestamp: dt.datetime
    miner: str
    reward: str
    difficulty: int
    state_hash: str
    tx_hashes: tuple[str, ...]

    def prefix(self) -> bytes:
        """The header bytes before the nonce: fields joined by '|' after a domain tag."""
        if self.timestamp.tzinfo is None:
            raise ValueError("block timestamps must be timezone-aware")
        # Integer arithmetic on the datetime avoids float rounding of large epoch values.
        epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
        delta = self.timestamp - epoch
        micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        fields = (BLOCK_DOMAIN, str(self.height), self.previous_hash or "", str(micros), self.miner,
                  self.reward, str(self.difficulty), self.state_hash, ",".join(self.tx_hashes))
        return ("|".join(fields) + "|").encode()

    def hash_with(self, nonce: int) -> str:
        """The block hash for a given nonce."""
        return hashlib.sha256(self.prefix() + str(nonce).encode()).hexdigest()


def meets_difficulty(block_hash: str, difficulty: int) -> bool:
    """Whether the hash starts with `difficulty` zero bits."""
    return difficulty <= 0 or int(block_hash, 16) >> (256 - difficulty) == 0


def mine(header: BlockHeader, max_tries: int = 50_000_000) -> tuple[int, str]:
    """The first nonce (from 0) whose hash meets the header's difficulty, and that hash."""
    prefix = header.prefix()
    base = hashlib.sha256(prefix)
    for nonce in range(max_tries):
        digest = base.copy()
        digest.update(str(nonce).encode())
        block_hash = digest.hexdigest()
        if meets_difficulty(block_hash, header.difficulty):
            return nonce, block_hash
    raise RuntimeError(f"no nonce below {max_tries} meets difficulty {header.difficulty}")


def state_hash(balances_after: dict[str, str]) -> str:
    """SHA-256 over the touched accounts' balances after the block, sorted by account."""
    text = "\n".join(f"{account}={balance}" for account, balance in sorted(balances_after.items()))
    return hashlib.sha256(text.encode()).hexdigest()
