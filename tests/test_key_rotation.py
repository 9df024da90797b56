"""Master key rotation on real PostgreSQL: every dataset, KYC and purchase key re-wrapped under a new
MASTER_KEY; downloads and KYC documents still served with the new key alone; a run interrupted
midway resumes without wrapping anything twice; a server keeps working while it runs; the CLI."""

from __future__ import annotations

import base64
import hashlib
import secrets
import stat
import uuid

import pytest
from cryptography.exceptions import InvalidTag

from server.adapters.blobs import BLOBS
from server.app import create_app
from server.core.crypto import MASTER_KEY, MasterKey, UnknownMasterKey, unwrap_key, wrap_key, wrapped_prefix
from server.services import delivery, escrow, keys
from server.services.demo_game import DEMO_GAME_PLAYER
from tests.helpers import register, register_seller, wait_until
from tests.test_chain import admin_token, bearer
from tests.test_cli import run_cli
from tests.test_demo_game import FAST as DEMO_FAST
from tests.test_kyc import PNG, submitted
from tests.test_purchases import DATASET, auth, buy, make_pod

PODS = 5


def new_secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


async def stored_keys(db) -> list[tuple[str, object, str, bytes]]:
    """Every master-wrapped value: (holder, row id, value without its marker, what it is bound to)."""
    found = [("datasets", row["id"], row["wrapped_key"], str(row["id"]).encode())
             for row in await db.fetch("SELECT id, wrapped_key FROM datapods")]
    found += [("kyc", row["kyc_id"], row["document_key"], f"kyc:{row['kyc_id']}".encode())
              for row in await db.fetch("SELECT kyc_id, document_key FROM kyc_submissions "
                                        "WHERE document_key IS NOT NULL")]
    found += [("purchases", row["id"], row["decryption_key"][len(delivery.MASTER_PREFIX):],
               f"purchase:{row['id']}".encode())
              for row in await db.fetch("SELECT id, decryption_key FROM purchases WHERE decryption_key LIKE 'mk1:%'")]
    found += [("wallets", row["name"], row["wrapped_private_key"], escrow.system_wallet_context(row["name"]))
              for row in await db.fetch("SELECT name, wrapped_private_key FROM system_wallets")]
    return found


async def pod_keys_match_their_hash(db, master_key: bytes, skip: uuid.UUID | None = None) -> None:
    """Each pod's key opens with `master_key` and is the very dataset key (not a wrapped value wrapped again)."""
    for row in await db.fetch("SELECT id, wrapped_key, encryption_key_hash FROM datapods WHERE id IS DISTINCT FROM $1",
                              skip):
        key = unwrap_key(master_key, row["wrapped_key"], str(row["id"]).encode())
        assert len(key) == 32 and hashlib.sha256(key).hexdigest() == row["encryption_key_hash"]


async def test_rotation_rewraps_everything_and_the_new_key_alone_serves_it(settings, aiohttp_client, db):
    new = new_secret()
    fast = settings.replace(purchase_poll_interval=0.05, payment_verify_timeout=1)
    before = await aiohttp_client(create_app(fast))
    seller, buyer = await register_seller(before), await register(before)
    seller_id, buyer_id = uuid.UUID(seller["user"]["id"]), uuid.UUID(buyer["user"]["id"])
    pods = [await make_pod(db, before.app[BLOBS], before.app[MASTER_KEY], seller_id) for _ in range(3)]
    purchase_id = await buy(before, db, buyer, buyer_id, seller_id, pods[0])
    admin = await admin_token(before, db)
    applicant = await register(before)
    document = await submitted(before, applicant["token"])
    old_key = before.app[MASTER_KEY]
    await before.close()
    held = await stored_keys(db)
    assert sorted({holder for holder, *_ in held}) == ["datasets", "kyc", "purchases", "wallets"] and len(held) == 7

    report = await keys.rotate(db, keys.decode_key(new, settings.data_dir), [old_key])
    assert report.complete and sum(report.rewrapped.values()) == 7 and sum(report.already_new.values()) == 0
    assert dict(report.rewrapped) == {"datasets": 3, "kyc": 1, "purchases": 1, "wallets": 2}

    after = await aiohttp_client(create_app(fast.replace(master_key=new)))  # no previous key at all
    new_key = after.app[MASTER_KEY]
    # The escrow wallet's key opened under the new key alone: same wallet, still able to sign.
    assert after.app[escrow.ESCROW_ACCOUNTS].escrow.address == await db.fetchval(
        "SELECT u.wallet_address FROM system_wallets s JOIN users u ON u.id = s.user_id WHERE s.name = 'escrow'")
    response = await after.get(f"/api/v1/purchases/{purchase_id}/download", headers=auth(buyer))
    assert response.status == 200 and await response.read() == DATASET
    response = await after.get(f"/api/v1/admin/kyc/{document['id']}/document", headers=bearer(admin))
    assert response.status == 200 and await response.read() == PNG
    await pod_keys_match_their_hash(db, new_key)
    for holder, row_id, wrapped, context in await stored_keys(db):
        assert wrapped.startswith(wrapped_prefix(new_key)), (holder, row_id)
        assert len(unwrap_key(new_key, wrapped, context)) == 32
        with pytest.raises(UnknownMasterKey):
            unwrap_key(old_key, wrapped, context)
    # The buyer's own master-wrapped copy still holds the dataset key.
    pod_hash = await db.fetchval("SELECT encryption_key_hash FROM datapods WHERE id = $1", pods[0])
    stored = await db.fetchval("SELECT decryption_key FROM purchases WHERE id = $1", uuid.UUID(purchase_id))
    purchase_key = unwrap_key(new_key, stored[len(delivery.MASTER_PREFIX):], f"purchase:{purchase_id}".encode())
    assert hashlib.sha256(purchase_key).hexdigest() == pod_hash


async def test_an_interrupted_rotation_resumes_and_wraps_nothing_twice(client, db, monkeypatch):
    old = client.app[MASTER_KEY]
    new = secrets.token_bytes(32)
    seller_id = uuid.UUID((await register_seller(client))["user"]["id"])
    for _ in range(PODS):
        await make_pod(db, client.app[BLOBS], old, seller_id, plaintext=b"a,b\n1,2\n")
    # A pod under a key nobody has any more: counted as failed, left exactly as it was.
    lost = await make_pod(db, client.app[BLOBS], secrets.token_bytes(32), seller_id, plaintext=b"a\n1\n")
    lost_value = await db.fetchval("SELECT wrapped_key FROM datapods WHERE id = $1", lost)

    calls = 0
    real_wrap = keys.wrap_key

    def wrap_then_crash(*args):
        nonlocal calls
        calls += 1
        if calls > 2:
            raise ConnectionResetError("the operator's session died")
        return real_wrap(*args)

    monkeypatch.setattr(keys, "wrap_key", wrap_then_crash)
    with pytest.raises(ConnectionResetError):
        await keys.rotate(db, new, [old], batch=2)
    prefixes = [value[:12] for value in await db.fetchval("SELECT array_agg(wrapped_key) FROM datapods")]
    assert prefixes.count(wrapped_prefix(new)) == 2 and prefixes.count(wrapped_prefix(old)) == PODS - 2
    # Mid-rotation every row opens with one of the two keys, as a server holding both sees it.
    await pod_keys_match_their_hash(db, MasterKey(new, [old]), skip=lost)

    monkeypatch.setattr(keys, "wrap_key", real_wrap)
    report = await keys.rotate(db, new, [old], batch=2)
    assert (report.rewrapped["datasets"], report.already_new["datasets"], report.failed["datasets"]) == \
        (PODS - 2, 2, 1)
    assert not report.complete
    assert await db.fetchval("SELECT wrapped_key FROM datapods WHERE id = $1", lost) == lost_value
    await db.execute("DELETE FROM datapods WHERE id = $1", lost)
    await pod_keys_match_their_hash(db, new)

    again = await keys.rotate(db, new, [old])
    assert again.complete and sum(again.rewrapped.values()) == 0 and again.already_new["datasets"] == PODS
    with pytest.raises(UnknownMasterKey):
        await pod_keys_match_their_hash(db, old)


async def test_a_server_holding_both_keys_serves_old_and_new_rows_during_rotation(settings, aiohttp_client, db):
    old, new = settings.master_key, new_secret()
    fast = settings.replace(purchase_poll_interval=0.05, payment_verify_timeout=1, master_key=new,
                            previous_master_key=old)
    hub = await aiohttp_client(create_app(fast))
    old_key = keys.decode_key(old, settings.data_dir)
    assert hub.app[MASTER_KEY].previous == (old_key,)
    seller, buyer = await register_seller(hub), await register(hub)
    seller_id, buyer_id = uuid.UUID(seller["user"]["id"]), uuid.UUID(buyer["user"]["id"])
    under_old = await make_pod(db, hub.app[BLOBS], old_key, seller_id, title="Old")
    under_new = await make_pod(db, hub.app[BLOBS], hub.app[MASTER_KEY], seller_id, title="New")
    for pod in (under_old, under_new):
        purchase_id = await buy(hub, db, buyer, buyer_id, seller_id, pod)
        response = await hub.get(f"/api/v1/purchases/{purchase_id}/download", headers=auth(buyer))
        assert response.status == 200 and await response.read() == DATASET
        stored = await db.fetchval("SELECT decryption_key FROM purchases WHERE id = $1", uuid.UUID(purchase_id))
        assert stored.startswith(delivery.MASTER_PREFIX + wrapped_prefix(hub.app[MASTER_KEY]))  # wraps with new
    report = await keys.rotate(db, hub.app[MASTER_KEY], hub.app[MASTER_KEY].previous)
    assert dict(report.rewrapped) == {"datasets": 1} and report.already_new["purchases"] == 2


def test_master_key_never_shows_itself_and_first_format_values_still_open():
    old, new, dataset_key = secrets.token_bytes(32), secrets.token_bytes(32), secrets.token_bytes(32)
    ring = MasterKey(new, [old, None, new])
    assert ring.previous == (old,) and bytes(ring) == new
    assert old.hex() not in repr(ring) and new.hex() not in repr(ring) and repr(new)[2:20] not in str(ring)
    # Values written before key ids existed (version 1) open with whichever configured key fits.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    nonce = secrets.token_bytes(12)
    first_format = base64.urlsafe_b64encode(b"\x01" + nonce + AESGCM(old).encrypt(nonce, dataset_key, b"ctx")).decode()
    assert unwrap_key(ring, first_format, b"ctx") == dataset_key
    with pytest.raises(InvalidTag):
        unwrap_key(new, first_format, b"ctx")
    # The key id is bound to the value: relabelling it does not open it with another key.
    wrapped = base64.urlsafe_b64decode(wrap_key(old, dataset_key, b"ctx"))
    relabelled = base64.urlsafe_b64encode(b"\x02" + base64.urlsafe_b64decode(wrapped_prefix(new))[1:] + wrapped[9:])
    with pytest.raises(InvalidTag):
        unwrap_key(ring, relabelled.decode(), b"ctx")


async def test_cli_rotates_installs_the_key_file_and_never_prints_a_key(db_dsn, db, tmp_path):
    data_dir = tmp_path / "data"
    old_text, new_text = new_secret(), new_secret()
    keys.write_secret_file(keys.secret_path(data_dir, keys.MASTER_KEY_FILE), old_text)
    old = keys.decode_key(old_text, data_dir)
    for _ in range(2):
        await make_pod(db, _NoBlobs(), old, None)
    new_file = tmp_path / "new_master_key"
    new_file.write_text(new_text + "\n")
    env = {"DATABASE_URL": db_dsn, "DATA_DIR": str(data_dir), "REDIS_URL": "", "JWT_SECRET": "j" * 43,
           "MASTER_KEY": "", "PREVIOUS_MASTER_KEY": "", "NEW_MASTER_KEY": ""}

    nothing = run_cli("rotate-master-key", env=env)
    assert nothing.returncode == 2 and "nothing to rotate to" in nothing.stderr

    result = run_cli("rotate-master-key", "--new-key-file", str(new_file), "--write-key-file", env=env)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert old_text not in output and new_text not in output
    assert "datasets             2            0       0" in result.stdout
    key_file = keys.secret_path(data_dir, keys.MASTER_KEY_FILE)
    previous_file = keys.secret_path(data_dir, keys.PREVIOUS_KEY_FILE)
    assert key_file.read_text().strip() == new_text and previous_file.read_text().strip() == old_text
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 == stat.S_IMODE(previous_file.stat().st_mode)
    new = keys.decode_key(new_text, data_dir)
    await pod_keys_match_their_hash(db, new)

    # A straggler a server still on the old key wrote after the run: the rerun (new key from the file,
    # old one from previous_master_key) picks it up, and says what to do with the old key.
    await make_pod(db, _NoBlobs(), old, None)
    rerun = run_cli("rotate-master-key", env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert "datasets             1            2       0" in rerun.stdout and "destroy the old key" in rerun.stdout
    await pod_keys_match_their_hash(db, new)


class _NoBlobs:
    """A blob store for rows whose blob nobody reads."""

    async def put(self, data: bytes) -> str:
        return "blob-" + hashlib.sha256(data).hexdigest()[:32]


async def test_the_demo_data_and_its_game_survive_a_rotation(aiohttp_client, settings, db):
    before = await aiohttp_client(create_app(settings.replace(**DEMO_FAST)))
    await wait_until(lambda: before.app[DEMO_GAME_PLAYER].rewards >= 1)
    old_key = before.app[MASTER_KEY]
    await before.close()
    new = new_secret()
    report = await keys.rotate(db, keys.decode_key(new, settings.data_dir), [old_key])
    assert report.complete and report.demo_token_moved and report.rewrapped["datasets"] > 0
    # Without the moved token the demo player would wait for ever (demo_game_waiting).
    after = await aiohttp_client(create_app(settings.replace(master_key=new, **DEMO_FAST)))
    await wait_until(lambda: after.app[DEMO_GAME_PLAYER].rewards >= 2)
    await pod_keys_match_their_hash(db, after.app[MASTER_KEY])
