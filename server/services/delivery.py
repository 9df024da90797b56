"""Delivering a bought dataset: the buyer's key envelope (X25519) and verified, streamed decryption.

Key envelope (docs/decrypt.md): an ephemeral X25519 key agrees a secret with the buyer's registered
public key; HKDF-SHA256 (salt = ephemeral public || recipient public, info = ENVELOPE_INFO) turns
it into an AES-256-GCM key that seals the dataset key, with "<purchase id>|<datapod id>" as
associated data. Only the holder of the buyer's private key can open it.

Download: AES-GCM authenticates only at the end of the ciphertext, so nothing is released before
the whole blob has been checked. Pass one streams the blob through the decryptor and the SHA-256 of
the plaintext and discards the output; only if the tag and the seed's data_hash both match does
pass two stream the decrypted bytes to the buyer. Memory stays at one chunk and no plaintext
touches the disk; the cost is reading the blob twice.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import uuid
from typing import Any, AsyncIterator, Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from server.core.crypto import NONCE_BYTES, TAG_BYTES, wrap_key

ENVELOPE_ALG = "X25519-HKDF-SHA256-AES-256-GCM"
ENVELOPE_INFO = b"sourcenet-hub datapod key v1"
MASTER_PREFIX = "mk1:"  # purchases.decryption_key for buyers without an X25519 key


class IntegrityError(Exception):
    """The blob does not decrypt to the dataset that was uploaded (tag or data_hash mismatch)."""


def b64(data: bytes) -> str:
    """Unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    """Decode base64url with or without padding."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _envelope_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=ENVELOPE_INFO).derive(shared)


def envelope_aad(purchase_id: uuid.UUID | str, datapod_id: uuid.UUID | str) -> bytes:
    """What the sealed key is bound to."""
    return f"{purchase_id}|{datapod_id}".encode()


def seal_for_buyer(dataset_key: bytes, recipient_public: bytes, *, purchase_id: uuid.UUID,
                   datapod_id: uuid.UUID, dataset_nonce_hex: str, blob_id: str,
                   data_hash: str | None) -> dict[str, Any]:
    """The dataset key sealed to the buyer's X25519 public key, with what decryption needs."""
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_public))
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(_envelope_key(shared, ephemeral_public, recipient_public)).encrypt(
        nonce, dataset_key, envelope_aad(purchase_id, datapod_id))
    return {"version": 1, "alg": ENVELOPE_ALG, "purchase_id": str(purchase_id), "datapod_id": str(datapod_id),
            "recipient_public_key": b64(recipient_public), "ephemeral_public_key": b64(ephemeral_public),
            "nonce": b64(nonce), "sealed_key": b64(sealed),
            "dataset": {"cipher": "AES-256-GCM", "nonce_hex": dataset_nonce_hex,
                        "associated_data": str(datapod_id), "tag": "last 16 bytes of the blob",
                        "blob_id": blob_id, "data_hash_sha256": data_hash}}


def open_envelope(envelope: dict[str, Any], private_key: bytes) -> bytes:
    """The dataset key from an envelope (the buyer's side; docs/decrypt_datapod.py does the same)."""
    ephemeral, recipient = unb64(envelope["ephemeral_public_key"]), unb64(envelope["recipient_public_key"])
    shared = X25519PrivateKey.from_private_bytes(private_key).exchange(X25519PublicKey.from_public_bytes(ephemeral))
    return AESGCM(_envelope_key(shared, ephemeral, recipient)).decrypt(
        unb64(envelope["nonce"]), unb64(envelope["sealed_key"]),
        envelope_aad(envelope["purchase_id"], envelope["datapod_id"]))


def is_envelope(decryption_key: str | None) -> bool:
    """Whether purchases.decryption_key holds an X25519 envelope (JSON) rather than a master-wrapped key."""
    return bool(decryption_key) and decryption_key.startswith("{")  # type: ignore[union-attr]


def seal_for_server(master_key: bytes, dataset_key: bytes, purchase_id: uuid.UUID) -> str:
    """The dataset key wrapped under MASTER_KEY, bound to this purchase (buyers without X25519)."""
    return MASTER_PREFIX + wrap_key(master_key, dataset_key, f"purchase:{purchase_id}".encode())


def parse_public_key(text: str) -> bytes:
    """A 32-byte raw X25519 public key from base64url (or standard base64); ValueError otherwise."""
    try:
        raw = unb64(text.replace("+", "-").replace("/", "_"))
    except (ValueError, TypeError) as exc:
        raise ValueError("not base64") from exc
    if len(raw) != 32:
        raise ValueError("an X25519 public key is 32 bytes")
    X25519PublicKey.from_public_bytes(raw)
    return raw


def envelope_json(envelope: dict[str, Any]) -> str:
    """Compact, stable JSON for the TEXT column."""
    return json.dumps(envelope, separators=(",", ":"), sort_keys=True)


@dataclasses.dataclass(slots=True)
class _TailHolder:
    """Holds back the last TAG_BYTES of a stream (GCM's tag) while passing the rest on."""

    tail: bytes = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.tail + chunk
        self.tail = data[-TAG_BYTES:]
        return data[:-TAG_BYTES]


async def _decrypt_pass(chunks: AsyncIterator[bytes], key: bytes, nonce: bytes, aad: bytes,
                        expected_hash: str | None, sink: Callable[[bytes], Any] | None) -> tuple[str, int]:
    decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).decryptor()
    decryptor.authenticate_additional_data(aad)
    holder, digest, size = _TailHolder(), hashlib.sha256(), 0
    async for chunk in chunks:
        body = holder.feed(chunk)
        if body:
            plain = decryptor.update(body)
            digest.update(plain)
            size += len(plain)
            if sink is not None:
                await sink(plain)
    if len(holder.tail) < TAG_BYTES:
        raise IntegrityError("the blob is shorter than a GCM tag")
    try:
        last = decryptor.finalize_with_tag(holder.tail)
    except InvalidTag:
        raise IntegrityError("the blob failed authentication (AES-GCM tag)") from None
    digest.update(last)
    size += len(last)
    if sink is not None and last:
        await sink(last)
    if expected_hash is not None and digest.hexdigest() != expected_hash.lower():
        raise IntegrityError("the decrypted data does not match the DataPod's data_hash")
    return digest.hexdigest(), size


async def verify_blob(stream: Callable[[], AsyncIterator[bytes]], key: bytes, nonce: bytes, aad: bytes,
                      expected_hash: str | None) -> tuple[str, int]:
    """Pass one: authenticate and hash the plaintext without releasing it; returns (hash, size)."""
    return await _decrypt_pass(stream(), key, nonce, aad, expected_hash, None)


async def decrypt_to(stream: Callable[[], AsyncIterator[bytes]], key: bytes, nonce: bytes, aad: bytes,
                     expected_hash: str | None, write: Callable[[bytes], Any]) -> None:
    """Pass two: decrypt into `write`; raises IntegrityError if the blob changed since pass one."""
    await _decrypt_pass(stream(), key, nonce, aad, expected_hash, write)
