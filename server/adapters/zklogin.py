"""zkLogin salt and Sui address derivation behind an interface.

Sui's zkLogin address is BLAKE2b-256(0x05 || len(iss) || iss || address_seed), where address_seed
is a Poseidon(BN254) hash of the key claim, the audience and the user's salt. No well-kept Python
package provides circom-compatible Poseidon, so `StandInAddressDeriver` computes the seed with
SHA-256 over the same inputs (README says so). The address layout, flag and hash are Sui's; only
the seed differs, and a Poseidon implementation can replace `address_seed` without touching callers.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Protocol

ZKLOGIN_FLAG = 0x05


def new_salt() -> str:
    """A random 128-bit zkLogin salt as a decimal string (the form Sui's salt services use)."""
    return str(int.from_bytes(secrets.token_bytes(16), "big"))


class AddressDeriver(Protocol):
    """Turns a verified identity and its salt into a Sui address."""

    def address(self, *, iss: str, sub: str, aud: str, salt: str) -> str:
        """The 0x-prefixed 32-byte Sui address."""


class StandInAddressDeriver:
    """Sui's zkLogin address layout with a SHA-256 stand-in for the Poseidon address seed."""

    def address_seed(self, *, sub: str, aud: str, salt: str) -> bytes:
        """32-byte seed bound to the key claim (sub), audience and salt."""
        material = b"\x00".join((b"sub", sub.encode(), aud.encode(), salt.encode()))
        return hashlib.sha256(material).digest()

    def address(self, *, iss: str, sub: str, aud: str, salt: str) -> str:
        """BLAKE2b-256(flag || iss length || iss || seed), hex with 0x."""
        issuer = iss.encode()
        digest = hashlib.blake2b(
            bytes([ZKLOGIN_FLAG, len(issuer)]) + issuer + self.address_seed(sub=sub, aud=aud, salt=salt),
            digest_size=32)
        return "0x" + digest.hexdigest()
