"""The DAO against real PostgreSQL and real sockets: proposals, signed votes, one vote per wallet,
live tallies on dao:{proposal_id}, closing at the deadline, results."""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg
import pytest

from server.core import wallets
from server.services.dao import sign_vote, vote_message
from tests.helpers import register, server_url
from tests.test_chain import account, admin_token, call


async def proposal(client, user, **overrides) -> dict:
    body = {"title": "Lower the fee", "description": "From 2% to 1% for a quarter.", "duration_seconds": 3600,
            **overrides}
    status, answer = await call(client, "POST", "/api/v1/proposals", user.token, json=body)
    assert status == 201, answer
    return answer["data"]


def vote_body(wallet: wallets.Wallet, proposal_id: int, choice: str) -> dict:
    signed = sign_vote(wallet, proposal_id, choice)
    del signed["proposal_id"]
    return signed


async def rest_vote(client, user, proposal_id: int, body: dict) -> tuple[int, dict]:
    return await call(client, "POST", f"/api/v1/proposals/{proposal_id}/votes", user.token, json=body)


async def dao_state(db) -> tuple:
    """Everything a refused vote must leave untouched."""
    # The outbox relay deletes what it publishes, so count what was ever queued (the id sequence).
    return (await db.fetchval("SELECT count(*) FROM votes"),
            await db.fetchval("SELECT last_value FROM event_outbox_id_seq"))


async def expire(db, proposal_id: int) -> None:
    await db.execute("UPDATE proposals SET deadline = now() - interval '1 second' WHERE proposal_id = $1",
                     proposal_id)


def test_vote_message_is_the_documented_bytes():
    voter = "kvp1" + "ab" * 20
    assert vote_message(7, "Abstain", voter) == f"KVP-VOTE-V1\n7\nAbstain\n{voter}".encode()
    with pytest.raises(ValueError):
        vote_message(7, "Maybe", voter)


async def test_signed_votes_count_and_subscribers_see_the_tally(client, db, sockets):
    alice, bob = await account(client), await account(client)
    creator = sockets()
    await creator.connect(server_url(client), "/chain", token=alice.token)
    created = await creator.call("/chain", "create_proposal", {
        "title": "  Fund the explorer  ", "description": "1000 KVP for a block explorer.", "duration_seconds": 600})
    assert created["ok"], created
    item = created["data"]
    assert (item["title"], item["status"], item["creator_wallet"], item["result"], item["tally"]) == \
        ("Fund the explorer", "Open", alice.address, None, {"yes": 0, "no": 0, "abstain": 0})
    pid = item["id"]

    watcher = sockets()
    await watcher.connect(server_url(client), "/chain")
    assert (await watcher.call("/chain", "subscribe", {"channel": f"dao:{pid}"}))["ok"]

    ack = await creator.call("/chain", "cast_vote", sign_vote(alice.wallet, pid, "Yes"))
    assert ack["ok"], ack
    assert (ack["data"]["voter"], ack["data"]["choice"], ack["data"]["tally"]) == \
        (alice.address, "Yes", {"yes": 1, "no": 0, "abstain": 0})
    first = await watcher.wait_for("tally_changed")
    assert first["channel"] == f"dao:{pid}"
    assert first["data"] == {"proposal_id": pid, "yes": 1, "no": 0, "abstain": 0}

    status, body = await rest_vote(client, bob, pid, vote_body(bob.wallet, pid, "No"))
    assert status == 201, body

    async def tallies():
        while True:
            seen = [data["data"] for _, name, data in watcher.events if name == "tally_changed"]
            if len(seen) == 2:
                return seen
            await asyncio.sleep(0.01)
    seen = await asyncio.wait_for(tallies(), 5)
    assert seen[1] == {"proposal_id": pid, "yes": 1, "no": 1, "abstain": 0}

    got = await watcher.call("/chain", "get_proposal", {"proposal_id": pid, "votes": True})
    assert got["ok"] and got["data"]["tally"] == {"yes": 1, "no": 1, "abstain": 0}
    # Every stored vote verifies on its own against the voter's key.
    for stored, wallet in zip(got["data"]["votes"], (alice.wallet, bob.wallet)):
        assert wallets.verify_signature(wallet.public_key, vote_message(pid, stored["choice"], stored["voter"]),
                                        stored["signature"])
    status, body = await call(client, "GET", "/api/v1/proposals?status=Open")
    assert status == 200 and [p["id"] for p in body["data"]["proposals"]] == [pid]


async def test_refused_votes_write_nothing(client, db, sockets):
    alice, bob = await account(client), await account(client)
    pid = (await proposal(client, alice))["id"]
    before = await dao_state(db)
    forger = wallets.Wallet.generate()
    forged = {**vote_body(forger, pid, "Yes"), "voter": alice.address}          # another key's signature
    tampered = {**vote_body(alice.wallet, pid, "Yes"), "choice": "No"}           # signed Yes, sent No
    other_proposal = vote_body(alice.wallet, pid + 1, "Yes")                      # signed for another proposal
    cases = [
        (alice, forged, 400, "signature"),
        (alice, tampered, 400, "signature"),
        (alice, other_proposal, 400, "signature"),
        (bob, vote_body(alice.wallet, pid, "Yes"), 403, "voter"),                  # alice's valid vote, bob's session
        (alice, vote_body(forger, pid, "Yes"), 404, "voter"),                      # unregistered wallet
    ]
    for user, body, expected, field in cases:
        status, answer = await rest_vote(client, user, pid, body)
        assert (status, answer["error"]["field"]) == (expected, field), answer
    status, answer = await rest_vote(client, alice, 999999, vote_body(alice.wallet, 999999, "Yes"))
    assert (status, answer["error"]["field"]) == (404, "proposal_id")
    status, answer = await call(client, "POST", f"/api/v1/proposals/{pid}/votes",
                                json=vote_body(alice.wallet, pid, "Yes"))
    assert status == 401
    sock = sockets()
    await sock.connect(server_url(client), "/chain", token=alice.token)
    refused = await sock.call("/chain", "cast_vote", {**sign_vote(forger, pid, "No"), "voter": alice.address})
    assert refused["error"]["code"] == "invalid_payload" and refused["error"]["field"] == "signature"
    bad_choice = await sock.call("/chain", "cast_vote", {**sign_vote(alice.wallet, pid, "Yes"), "choice": "Maybe"})
    assert bad_choice["error"]["code"] == "invalid_payload"
    assert await dao_state(db) == before


async def test_one_vote_per_wallet_also_when_two_race(client, db):
    alice, bob = await account(client), await account(client)
    pid = (await proposal(client, alice))["id"]
    assert (await rest_vote(client, alice, pid, vote_body(alice.wallet, pid, "Yes")))[0] == 201
    state = await dao_state(db)
    status, answer = await rest_vote(client, alice, pid, vote_body(alice.wallet, pid, "No"))
    assert (status, answer["error"]["field"]) == (409, "voter")
    assert await dao_state(db) == state

    results = await asyncio.gather(*(rest_vote(client, bob, pid, vote_body(bob.wallet, pid, choice))
                                     for choice in ("Yes", "No", "Abstain")))
    assert sorted(status for status, _ in results) == [201, 409, 409]
    assert await db.fetchval("SELECT count(*) FROM votes WHERE voter_wallet = $1", bob.address) == 1
    winner = next(body["data"] for status, body in results if status == 201)
    assert winner["tally"]["yes"] + winner["tally"]["no"] + winner["tally"]["abstain"] == 2

    # The database itself refuses a second row, whatever the code in front of it does.
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(
            """INSERT INTO votes (proposal_id, voter_wallet, vote_option, signature)
               VALUES ($1, $2, 'No', $3)""", pid, bob.address, "0" * 128)


async def test_votes_after_the_deadline_are_refused_and_the_result_is_announced(client, db, sockets):
    alice, bob, carol = await account(client), await account(client), await account(client)
    pid = (await proposal(client, alice))["id"]
    watcher = sockets()
    await watcher.connect(server_url(client), "/chain")
    assert (await watcher.call("/chain", "subscribe", {"channel": f"dao:{pid}"}))["ok"]
    for user, choice in ((alice, "Yes"), (bob, "Yes"), (carol, "No")):
        assert (await rest_vote(client, user, pid, vote_body(user.wallet, pid, choice)))[0] == 201

    await expire(db, pid)
    late = await account(client)
    status, answer = await rest_vote(client, late, pid, vote_body(late.wallet, pid, "No"))
    assert (status, answer["error"]["code"], answer["error"]["field"]) == (409, "conflict", "proposal_id")
    closed = await watcher.wait_for("proposal_closed")
    assert {k: v for k, v in closed["data"].items() if k != "closed_at"} == \
        {"proposal_id": pid, "yes": 2, "no": 1, "abstain": 0, "result": "Passed"}
    assert await db.fetchval("SELECT count(*) FROM votes WHERE proposal_id = $1", pid) == 3
    status, body = await call(client, "GET", f"/api/v1/proposals/{pid}")
    assert (body["data"]["status"], body["data"]["result"], body["data"]["tally"]) == \
        ("Closed", "Passed", {"yes": 2, "no": 1, "abstain": 0})
    assert body["data"]["closed_at"] is not None
    # Still refused once closed, and only one proposal_closed was announced.
    status, answer = await rest_vote(client, late, pid, vote_body(late.wallet, pid, "Yes"))
    assert status == 409
    await asyncio.sleep(0.2)
    assert [name for _, name, _ in watcher.events].count("proposal_closed") == 1


async def test_reading_closes_an_expired_proposal_and_admins_close_early(client, db, sockets):
    alice, bob = await account(client), await account(client)
    tied = (await proposal(client, alice))["id"]
    for user, choice in ((alice, "Yes"), (bob, "No")):
        assert (await rest_vote(client, user, tied, vote_body(user.wallet, tied, choice)))[0] == 201
    await expire(db, tied)
    status, body = await call(client, "GET", "/api/v1/proposals")                 # the list closes it
    assert status == 200
    assert (body["data"]["proposals"][0]["status"], body["data"]["proposals"][0]["result"]) == ("Closed", "Rejected")
    assert await db.fetchval("SELECT count(*) FROM event_outbox WHERE type = 'proposal_closed'") <= 1

    early = (await proposal(client, alice))["id"]
    assert (await rest_vote(client, bob, early, vote_body(bob.wallet, early, "Yes")))[0] == 201
    status, _ = await call(client, "POST", f"/api/v1/admin/proposals/{early}/close", alice.token)
    assert status == 403
    admin = await admin_token(client, db)
    status, body = await call(client, "POST", f"/api/v1/admin/proposals/{early}/close", admin)
    assert status == 200 and (body["data"]["status"], body["data"]["result"]) == ("Closed", "Passed")
    status, body = await call(client, "POST", f"/api/v1/admin/proposals/{early}/close", admin)
    assert status == 200 and body["data"]["result"] == "Passed"                    # a no-op the second time
    status, _ = await rest_vote(client, alice, early, vote_body(alice.wallet, early, "No"))
    assert status == 409
    sock = sockets()
    await sock.connect(server_url(client), "/chain")
    got = await sock.call("/chain", "get_proposal", {"proposal_id": early})
    assert got["ok"] and got["data"]["result"] == "Passed"
    missing = await sock.call("/chain", "get_proposal", {"proposal_id": 424242})
    assert missing["error"]["code"] == "not_found"
    status, body = await call(client, "GET", "/api/v1/proposals?status=Closed&limit=1")
    assert [p["id"] for p in body["data"]["proposals"]] == [early] and body["data"]["next_before_id"] == early


async def test_creating_proposals_needs_a_wallet_and_valid_fields(client, db, sockets):
    no_wallet = await register(client)
    status, body = await call(client, "POST", "/api/v1/proposals", no_wallet["token"],
                              json={"title": "t", "description": "d", "duration_seconds": 600})
    assert (status, body["error"]["field"]) == (403, "wallet")
    alice = await account(client)
    soon = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)).isoformat()
    status, body = await call(client, "POST", "/api/v1/proposals", alice.token,
                              json={"title": "t", "description": "d", "deadline": soon})
    assert status == 201 and dt.datetime.fromisoformat(body["data"]["deadline"]) == dt.datetime.fromisoformat(soon)
    bad = [
        {"title": "x" * 201, "description": "d", "duration_seconds": 600},
        {"title": "t", "description": "d" * 5001, "duration_seconds": 600},
        {"title": "   ", "description": "d", "duration_seconds": 600},
        {"title": "t", "description": "d"},                                           # no deadline
        {"title": "t", "description": "d", "duration_seconds": 600, "deadline": soon},  # both
        {"title": "t", "description": "d", "deadline": "2020-01-01T00:00:00+00:00"},  # past
        {"title": "t", "description": "d", "deadline": "2099-01-01T00:00:00"},        # no offset
        {"title": "t", "description": "d", "deadline": "tomorrow"},
        {"title": "t", "description": "d", "duration_seconds": 10},
    ]
    for payload in bad:
        status, body = await call(client, "POST", "/api/v1/proposals", alice.token, json=payload)
        assert (status, body["error"]["code"]) == (400, "invalid_payload"), payload
    sock = sockets()
    await sock.connect(server_url(client), "/chain")
    anonymous = await sock.call("/chain", "create_proposal", {"title": "t", "description": "d",
                                                              "duration_seconds": 600})
    assert anonymous["error"]["code"] == "unauthorized"
    assert await db.fetchval("SELECT count(*) FROM proposals") == 1


async def test_closing_in_plain_sql_fills_the_result(db):
    pid = await db.fetchval(
        "INSERT INTO proposals (title, description, creator_wallet) VALUES ('t', 'd', 'w') RETURNING proposal_id")
    for voter, choice in (("a", "No"), ("b", "No"), ("c", "Yes")):
        await db.execute("INSERT INTO votes (proposal_id, voter_wallet, vote_option) VALUES ($1, $2, $3)",
                         pid, voter, choice)
    row = await db.fetchrow("UPDATE proposals SET status = 'Closed' WHERE proposal_id = $1 RETURNING result, closed_at",
                            pid)
    assert row["result"] == "Rejected" and row["closed_at"] is not None
    with pytest.raises(asyncpg.CheckViolationError, match="proposals_title_length_check"):
        await db.execute("INSERT INTO proposals (title, description, creator_wallet) VALUES ('', 'd', 'w')")


async def test_the_deadline_sweeper_closes_and_announces_without_a_read(aiohttp_client, settings, db, sockets):
    from server.app import create_app

    client = await aiohttp_client(create_app(settings.replace(dao_sweep_interval=0.1)))
    alice = await account(client)
    proposal_id = (await proposal(client, alice))["id"]
    assert (await rest_vote(client, alice, proposal_id, vote_body(alice.wallet, proposal_id, "Yes")))[0] == 201
    watcher = sockets()
    await watcher.connect(server_url(client), "/chain")
    await watcher.call("/chain", "subscribe", {"channel": f"dao:{proposal_id}"})
    await expire(db, proposal_id)
    closed = await watcher.wait_for("proposal_closed", timeout=10)
    assert closed["data"]["result"] == "Passed"
