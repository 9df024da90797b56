"""Dataset encryption (AES-256-GCM, pod id as associated data) and key wrapping under MASTER_KEY."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os

from aiohttp import web
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASTER_KEY: web.AppKey[bytes] = web.AppKey("master_key", bytes)  # wraps every dataset key

NONCE_BYTES = 12
WRAP_VERSION = b"\x01"


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
    return master_key if len(master_key) == 32 else hashlib.sha256(master_key).digest()


def wrap_key(master_key: bytes, key: bytes, context: bytes) -> str:
    """Encrypt a dataset key under MASTER_KEY, bound to `context` (the pod id); base64 text."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(_wrapping_key(master_key)).encrypt(nonce, key, context)
    return base64.urlsafe_b64encode(WRAP_VERSION + nonce + sealed).decode()


def unwrap_key(master_key: bytes, wrapped: str, context: bytes) -> bytes:
    """Recover a dataset key wrapped by wrap_key."""
    raw = base64.urlsafe_b64decode(wrapped)
    if raw[:1] != WRAP_VERSION:
        raise ValueError("unknown wrapped-key version")
    nonce, sealed = raw[1:1 + NONCE_BYTES], raw[1 + NONCE_BYTES:]
    return AESGCM(_wrapping_key(master_key)).decrypt(nonce, sealed, context)


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
