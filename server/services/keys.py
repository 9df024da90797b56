"""MASTER_KEY and its rotation: every key stored wrapped under it is re-wrapped under a new one.

Each wrapped value names its key (crypto.wrapped_prefix), so a rotation is resumable by design: a
run skips what the new key already wraps, re-wraps the rest row by row (one compare-and-set UPDATE
each, so an interruption leaves every row either old or new and never wraps anything twice), and
reports what failed. While it runs, servers unwrap with MASTER_KEY or PREVIOUS_MASTER_KEY.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import asyncpg
import structlog
from cryptography.exceptions import InvalidTag

from db import demo_game as demo_queries
from db import key_rotation as queries
from db.key_rotation import Holder
from server.core.crypto import MasterKey, key_id, unwrap_key, wrap_key, wrapped_prefix
from server.core.secrets import load_or_create_secret
from server.core.settings import Settings
from server.services import datasets, delivery, escrow, kyc
from server.services.demo import DEMO_USERS
from server.services.demo_game import DEMO_GAME, demo_token
from server.services.games import token_digest

log = structlog.get_logger(__name__)

MASTER_KEY_FILE = "master_key"  # DATA_DIR/secrets/<name>, as load_or_create_secret keeps it
PREVIOUS_KEY_FILE = "previous_master_key"
ROTATION_BATCH = 200
CAS_ATTEMPTS = 3  # a row rewritten under us this often is left for the next run

# What a column's master-wrapped values start with (purchases also hold X25519 envelopes).
_MARKERS = {Holder.DATASETS: "", Holder.KYC: "", Holder.PURCHASES: delivery.MASTER_PREFIX, Holder.SYSTEM_WALLETS: ""}


def _context(holder: Holder, row_id: Any) -> bytes:
    """What a stored key is bound to, exactly as its writer bound it."""
    if holder is Holder.DATASETS:
        return datasets.associated_data(row_id)
    if holder is Holder.KYC:
        return kyc.associated_data(row_id)
    if holder is Holder.SYSTEM_WALLETS:
        return escrow.system_wallet_context(row_id)
    return f"purchase:{row_id}".encode()  # delivery.seal_for_server


def secret_path(data_dir: Path, name: str) -> Path:
    """Where load_or_create_secret keeps a generated secret."""
    return data_dir / "secrets" / name


def decode_key(text: str, data_dir: Path) -> bytes:
    """A key given as text (base64url of 32 bytes, or any string), decoded as MASTER_KEY is."""
    # A configured value is only decoded, never written: the same rules as MASTER_KEY itself.
    return load_or_create_secret(data_dir, MASTER_KEY_FILE, text)


def load_master_key(settings: Settings) -> MasterKey:
    """MASTER_KEY (configured or DATA_DIR's), with PREVIOUS_MASTER_KEY (configured or DATA_DIR's) for unwrapping."""
    current = load_or_create_secret(settings.data_dir, MASTER_KEY_FILE, settings.master_key)
    previous = None
    if settings.previous_master_key:
        previous = decode_key(settings.previous_master_key, settings.data_dir)
    elif (path := secret_path(settings.data_dir, PREVIOUS_KEY_FILE)).exists():
        previous = decode_key(path.read_text().strip(), settings.data_dir)
    return MasterKey(current, [previous])


def write_secret_file(path: Path, text: str) -> None:
    """Replace a secret file atomically (mode 0600): readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


@dataclasses.dataclass(slots=True)
class RotationReport:
    """What one run did, per holder: re-wrapped now, already under the new key, failed (left as they were)."""

    new_key_id: str
    rewrapped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    already_new: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    failed: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    demo_token_moved: bool = False

    @property
    def complete(self) -> bool:
        """Whether every stored key is now wrapped under the new key."""
        return not sum(self.failed.values())

    def lines(self) -> list[str]:
        """A table for the operator: one line per holder and a total."""
        rows = [(holder.value, self.rewrapped[holder.value], self.already_new[holder.value],
                 self.failed[holder.value]) for holder in Holder]
        rows.append(("total", sum(self.rewrapped.values()), sum(self.already_new.values()),
                     sum(self.failed.values())))
        demo = ["the demo game's token now derives from the new key"] if self.demo_token_moved else []
        return [f"{'':<10}{'re-wrapped':>12}{'already new':>13}{'failed':>8}",
                *(f"{name:<10}{a:>12}{b:>13}{c:>8}" for name, a, b, c in rows), *demo]


async def rotate(conn: asyncpg.Connection, new_key: bytes, old_keys: Iterable[bytes], *,
                 batch: int = ROTATION_BATCH) -> RotationReport:
    """Re-wrap every stored key not yet under `new_key`, opening it with `new_key` or one of `old_keys`."""
    keyring = MasterKey(new_key, old_keys)
    report = RotationReport(new_key_id=key_id(new_key).hex())
    for holder in Holder:
        marker = _MARKERS[holder]
        prefix = marker + wrapped_prefix(new_key)
        report.already_new[holder.value] = await queries.count_wrapped_by(conn, holder, prefix)
        after = None
        while rows := await queries.not_wrapped_by(conn, holder, marker, prefix, after, batch):
            for row in rows:
                if outcome := await _rotate_row(conn, holder, row, keyring, marker, prefix):
                    getattr(report, outcome)[holder.value] += 1
            after = rows[-1].id
    report.demo_token_moved = await _move_demo_token(conn, new_key, keyring.previous)
    log.info("master_key_rotated", new_key_id=report.new_key_id, rewrapped=sum(report.rewrapped.values()),
             already_new=sum(report.already_new.values()), failed=sum(report.failed.values()))
    return report


async def _move_demo_token(conn: asyncpg.Connection, new_key: bytes, old_keys: Iterable[bytes]) -> bool:
    """Give the demo game the token the new key derives, if it still holds one an old key derived."""
    game = await demo_queries.find_game(conn, DEMO_GAME, DEMO_USERS[0][0])
    if game is None or game.token_hash is None:
        return False
    for old_key in old_keys:
        if game.token_hash == token_digest(demo_token(old_key, game.game_id)):
            return await queries.replace_game_token(conn, game.game_id, game.token_hash,
                                                   token_digest(demo_token(new_key, game.game_id)))
    return False  # its owner issued a token of their own: not ours to move


async def _rotate_row(conn: asyncpg.Connection, holder: Holder, row: queries.WrappedRow, keyring: MasterKey,
                      marker: str, prefix: str) -> str | None:
    """One row re-wrapped by compare-and-set; the RotationReport counter it belongs to (None: row gone)."""
    context = _context(holder, row.id)
    current: queries.WrappedRow | None = row
    for _ in range(CAS_ATTEMPTS):
        if current is None:
            return None  # deleted, or no longer master-wrapped: nothing left under the old key
        if current.wrapped.startswith(prefix):
            return "already_new"  # a server with the new key rewrote it meanwhile
        try:
            key = unwrap_key(keyring, current.wrapped[len(marker):], context)
        except (InvalidTag, ValueError) as exc:
            # Left as it was: the operator sees it counted and logged, and a later run retries it.
            log.error("master_key_rotation_row_failed", holder=holder.value, row_id=str(row.id),
                      error=type(exc).__name__, detail=str(exc) if not isinstance(exc, InvalidTag) else None)
            return "failed"
        rewrapped = marker + wrap_key(keyring, key, context)
        if await queries.replace_wrapped(conn, holder, row.id, current.wrapped, rewrapped):
            return "rewrapped"
        current = await queries.get_wrapped(conn, holder, marker, row.id)
    log.error("master_key_rotation_row_failed", holder=holder.value, row_id=str(row.id),
              error="changed during rotation")
    return "failed"

