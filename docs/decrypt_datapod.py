#!/usr/bin/env python3
"""Decrypt a bought DataPod on your own machine (docs/decrypt.md). Needs only `cryptography`.

    python decrypt_datapod.py keygen --out buyer.key          # prints the public key to register
    python decrypt_datapod.py decrypt --private-key buyer.key --envelope envelope.json \\
        --blob blob.bin --out dataset.csv

The envelope comes from GET /api/v1/purchases/{id}/key, the blob from GET /api/v1/purchases/{id}/blob
(or a Walrus aggregator: GET /v1/blobs/{dataset.blob_id}). Nothing is written to --out unless the
blob authenticates (AES-GCM tag) and the plaintext matches the DataPod's SHA-256.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import tempfile

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ALG = "X25519-HKDF-SHA256-AES-256-GCM"
INFO = b"sourcenet-hub datapod key v1"
TAG_BYTES = 16
CHUNK = 1 << 20


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    text = text.strip()
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def open_envelope(envelope: dict, private_key: bytes) -> bytes:
    """The 32-byte dataset key; raises InvalidTag for any other private key or a modified envelope."""
    if envelope.get("alg") != ALG or envelope.get("version") != 1:
        raise ValueError(f"unsupported envelope: {envelope.get('alg')} v{envelope.get('version')}")
    ephemeral = unb64(envelope["ephemeral_public_key"])
    recipient = unb64(envelope["recipient_public_key"])
    shared = X25519PrivateKey.from_private_bytes(private_key).exchange(X25519PublicKey.from_public_bytes(ephemeral))
    wrapping_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=INFO).derive(shared)
    aad = f"{envelope['purchase_id']}|{envelope['datapod_id']}".encode()
    return AESGCM(wrapping_key).decrypt(unb64(envelope["nonce"]), unb64(envelope["sealed_key"]), aad)


def decrypt_file(envelope: dict, key: bytes, blob_path: str, out_path: str) -> None:
    """Stream-decrypt the blob into out_path; only a verified result is kept."""
    dataset = envelope["dataset"]
    size = os.path.getsize(blob_path)
    if size < TAG_BYTES:
        raise ValueError("the blob is too short")
    with open(blob_path, "rb") as blob:
        blob.seek(size - TAG_BYTES)
        tag = blob.read(TAG_BYTES)
        blob.seek(0)
        decryptor = Cipher(algorithms.AES(key), modes.GCM(bytes.fromhex(dataset["nonce_hex"]), tag)).decryptor()
        decryptor.authenticate_additional_data(dataset["associated_data"].encode())
        digest, remaining = hashlib.sha256(), size - TAG_BYTES
        directory = os.path.dirname(os.path.abspath(out_path))
        handle, temp = tempfile.mkstemp(dir=directory, prefix=".datapod-")
        try:
            with os.fdopen(handle, "wb") as out:
                while remaining:
                    chunk = blob.read(min(CHUNK, remaining))
                    remaining -= len(chunk)
                    plain = decryptor.update(chunk)
                    digest.update(plain)
                    out.write(plain)
                last = decryptor.finalize()  # raises InvalidTag when anything was modified
                digest.update(last)
                out.write(last)
            expected = dataset.get("data_hash_sha256")
            if expected and digest.hexdigest() != expected:
                raise ValueError("the plaintext does not match the DataPod's data hash")
            os.replace(temp, out_path)
        except BaseException:
            os.unlink(temp)
            raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("keygen", help="create an X25519 key pair")
    keygen.add_argument("--out", required=True, help="where to write the private key (base64url)")
    decrypt = commands.add_parser("decrypt", help="open the envelope and decrypt the blob")
    decrypt.add_argument("--private-key", required=True)
    decrypt.add_argument("--envelope", required=True)
    decrypt.add_argument("--blob", required=True)
    decrypt.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    if args.command == "keygen":
        private = X25519PrivateKey.generate()
        raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(b64(raw) + "\n")
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        print(json.dumps({"public_key": b64(public)}))
        return 0

    with open(args.private_key) as handle:
        private_key = unb64(handle.read())
    with open(args.envelope) as handle:
        envelope = json.load(handle)
    envelope = envelope.get("data", envelope)  # accept the API's whole answer too
    try:
        key = open_envelope(envelope, private_key)
        decrypt_file(envelope, key, args.blob, args.out)
    except InvalidTag:
        print("refused: this private key does not open the envelope, or the blob was modified", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    print(f"decrypted {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
