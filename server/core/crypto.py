"""Dataset encryption (AES-256-GCM, pod id as associated data) and key wrapping under MASTER_KEY.

A wrapped key names the master key that wrapped it (a short HMAC id), so during a rotation a value
is opened with the right key of MasterKey (current plus previous) without trying each one.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import os
from typing import Iterable

from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASTER_KEY: web.AppKey[bytes] = web.AppKey("master_key", bytes)  # wraps every dataset key

NONCE_BYTES = 12
_WRAP_VERSION_1 = b"\x01"  # version, nonce, sealed key: no key id (still read)
WRAP_VERSION = b"\x02"  # version, key id, nonce, sealed key; the AAD is version + key id + context
KEY_ID_BYTES = 8
KEY_ID_LABEL = b"sourcenet-hub master key id"


class UnknownMasterKey(ValueError):
    """A wrapped value names a master key that is neither MASTER_KEY nor PREVIOUS_MASTER_KEY."""


@dataclasses.dataclass(frozen=True, slots=True)
class EncryptedDataset:
    """Ciphertext plus what the datapods row records about it."""

    ciphertext: bytes
    key: bytes
    nonce: bytes

    @property
    def key_hash(self) -> str:
        """SHA-256 of the dataset key (the seed's encryption_key_hash)."""
        return hashlib.sha256(self.key).hexdigest()

    @property
    def iv_hex(self) -> str:
        """The nonce as hex (the seed's encryption_iv)."""
        return self.nonce.hex()


def encrypt_dataset(plaintext: bytes, associated_data: bytes) -> EncryptedDataset:
    """Encrypt with a fresh random 256-bit key and 96-bit nonce."""
    key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(NONCE_BYTES)
    return EncryptedDataset(AESGCM(key).encrypt(nonce, plaintext, associated_data), key, nonce)


def decrypt_dataset(ciphertext: bytes, key: bytes, nonce: bytes, associated_data: bytes) -> bytes:
    """Decrypt and authenticate; raises cryptography's InvalidTag on any tampering."""
    return AESGCM(key).decrypt(nonce, ciphertext, associated_data)


def _wrapping_key(master_key: bytes) -> bytes:
    # MASTER_KEY may be any configured string; derive exactly 32 bytes for AES-256.
    return bytes(master_key) if len(master_key) == 32 else hashlib.sha256(master_key).digest()


def key_id(master_key: bytes) -> bytes:
    """A short public name of a master key (HMAC under the key), written into every value it wraps."""
    return hmac.new(_wrapping_key(master_key), KEY_ID_LABEL, hashlib.sha256).digest()[:KEY_ID_BYTES]


class MasterKey(bytes):
    """The current MASTER_KEY (it wraps, and is used as plain bytes elsewhere) plus earlier keys that may
    still unwrap while a rotation is under way."""

    previous: tuple[bytes, ...]

    def __new__(cls, current: bytes, previous: Iterable[bytes | None] = ()) -> MasterKey:
        self = super().__new__(cls, current)
        self.previous = tuple(key for key in previous if key and key != current)
        return self

    def __repr__(self) -> str:
        # A key must never reach a log line or a traceback by accident.
        return f"MasterKey(id={key_id(self).hex()}, previous={len(self.previous)})"

    __str__ = __repr__

    @property
    def all(self) -> tuple[bytes, ...]:
        """The current key first, then the previous ones."""
        return (bytes(self), *self.previous)


def wrap_key(master_key: bytes, key: bytes, context: bytes) -> str:
    """Encrypt a dataset key under MASTER_KEY, bound to `context` (the pod id); base64 text naming the key."""
    nonce = os.urandom(NONCE_BYTES)
    header = WRAP_VERSION + key_id(master_key)
    sealed = AESGCM(_wrapping_key(master_key)).encrypt(nonce, key, header + context)
    return base64.urlsafe_b64encode(header + nonce + sealed).decode()


def wrapped_prefix(master_key: bytes) -> str:
    """The text every value this key wraps starts with (version and key id: 9 bytes, 12 base64 characters)."""
    return base64.urlsafe_b64encode(WRAP_VERSION + key_id(master_key)).decode()


def unwrap_key(master_key: bytes, wrapped: str, context: bytes) -> bytes:
    """Recover a key wrapped by wrap_key, with the current key or (during a rotation) a previous one."""
    candidates = master_key.all if isinstance(master_key, MasterKey) else (master_key,)
    raw = base64.urlsafe_b64decode(wrapped)
    if raw[:1] == _WRAP_VERSION_1:
        nonce, sealed = raw[1:1 + NONCE_BYTES], raw[1 + NONCE_BYTES:]
        for candidate in candidates[:-1]:
            with contextlib.suppress(InvalidTag):
                return AESGCM(_wrapping_key(candidate)).decrypt(nonce, sealed, context)
        return AESGCM(_wrapping_key(candidates[-1])).decrypt(nonce, sealed, context)
    if raw[:1] != WRAP_VERSION:
        raise ValueError("unknown wrapped-key version")
    header_end = 1 + KEY_ID_BYTES
    header, nonce, sealed = raw[:header_end], raw[header_end:header_end + NONCE_BYTES], raw[header_end + NONCE_BYTES:]
    for candidate in candidates:
        if hmac.compare_digest(key_id(candidate), header[1:]):
            return AESGCM(_wrapping_key(candidate)).decrypt(nonce, sealed, header + context)
    raise UnknownMasterKey(f"wrapped under master key {header[1:].hex()}, which is not configured")


TAG_BYTES = 16


class StreamEncryptor:
    """AES-256-GCM over chunks with a fresh key; the output equals encrypt_dataset's (ciphertext, then tag)."""

    def __init__(self, associated_data: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self.key = AESGCM.generate_key(bit_length=256)
        self.nonce = os.urandom(NONCE_BYTES)
        self._encryptor = Cipher(algorithms.AES(self.key), modes.GCM(self.nonce)).encryptor()
        self._encryptor.authenticate_additional_data(associated_data)

    def update(self, chunk: bytes) -> bytes:
        """Encrypt the next chunk."""
        return self._encryptor.update(chunk)

    def finalize(self) -> bytes:
        """The last bytes and the 16-byte tag; nothing may follow."""
        return self._encryptor.finalize() + self._encryptor.tag

    @property
    def key_hash(self) -> str:
        """SHA-256 of the dataset key (the seed's encryption_key_hash)."""
        return hashlib.sha256(self.key).hexdigest()

    @property
    def iv_hex(self) -> str:
        """The nonce as hex (the seed's encryption_iv)."""
        return self.nonce.hex()


class StreamDecryptor:
    """Decrypts a stream_encrypted (or encrypt_dataset) body chunk by chunk; `finalize` checks the tag."""

    def __init__(self, key: bytes, nonce: bytes, tag: bytes, associated_data: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce, tag)).decryptor()
        self._decryptor.authenticate_additional_data(associated_data)

    def update(self, chunk: bytes) -> bytes:
        """Decrypt the next chunk (not yet authenticated: trust it only after finalize)."""
        return self._decryptor.update(chunk)

    def finalize(self) -> bytes:
        """Authenticate the whole stream; raises cryptography's InvalidTag on tampering."""
        return self._decryptor.finalize()
