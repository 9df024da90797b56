"""Storage and network REST resources against real PostgreSQL: the swarm, bandwidth and gateway
triggers through the API, ownership (another user's rows are not_found), admin-managed DNS,
pagination, row caps, and bad input that writes nothing."""

from __future__ import annotations

import asyncio
import uuid

from tests.helpers import register
from tests.test_chain import admin_token, call

FILES = "/api/v1/storage/files"
NET = "/api/v1/network"
TABLES = ("cloud", "mirror", "tracker", "seeder", "peer", "channel", "dns", "bandwidth", "gateway")


class User:
    """A registered user: token and id."""

    def __init__(self, data: dict) -> None:
        self.token = data["token"]
        self.id = uuid.UUID(data["user"]["id"])


async def user(client) -> User:
    return User(await register(client))


async def create(client, who: User | str, path: str, body: dict | None = None) -> dict:
    token = who if isinstance(who, str) else who.token
    status, answer = await call(client, "POST", path, token, json=body if body is not None else {})
    assert status == 201, answer
    return answer["data"]


async def new_file(client, who: User, path: str = "/data/set.bin", size: int = 1024) -> dict:
    return await create(client, who, FILES, {"file_path": path, "size": size})


async def file_status(db, file_id: int) -> str:
    return await db.fetchval("SELECT status FROM cloud WHERE id = $1", file_id)


async def utility(db, who: User) -> dict:
    return await db.fetchval("SELECT utility_status FROM users WHERE id = $1", who.id)


async def snapshot(db) -> tuple:
    """Every row of every storage and network table, and every user's utility_status."""
    rows = [tuple(map(tuple, await db.fetch(f"SELECT * FROM {table} ORDER BY id"))) for table in TABLES]
    users = await db.fetch("SELECT id, utility_status FROM users ORDER BY id")
    return tuple(rows), tuple((row["id"], str(row["utility_status"])) for row in users)


async def test_swarm_status_follows_peers_and_seeders(client, db):
    alice = await user(client)
    item = await new_file(client, alice)
    fid = item["id"]
    assert (item["owner_id"], item["file_path"], item["size"], item["status"]) == \
        (str(alice.id), "/data/set.bin", 1024, "inactive")

    laptop = await create(client, alice, f"{FILES}/{fid}/peers")
    phone = await create(client, alice, f"{FILES}/{fid}/peers", {"status": "inactive"})
    assert (laptop["user_id"], laptop["file_id"], laptop["status"], phone["status"]) == \
        (str(alice.id), fid, "active", "inactive")
    assert await file_status(db, fid) == "active"

    async def set_status(kind: str, row_id: int, status: str) -> None:
        code, answer = await call(client, "PATCH", f"{FILES}/{fid}/{kind}/{row_id}", alice.token,
                                  json={"status": status})
        assert code == 200 and answer["data"]["status"] == status, answer

    await set_status("peers", laptop["id"], "inactive")
    assert await file_status(db, fid) == "inactive"
    await set_status("peers", phone["id"], "active")
    assert await file_status(db, fid) == "active"

    seeder = await create(client, alice, f"{FILES}/{fid}/seeders")
    await set_status("peers", phone["id"], "inactive")
    assert await file_status(db, fid) == "active"          # the seeder still holds it
    code, answer = await call(client, "DELETE", f"{FILES}/{fid}/seeders/{seeder['id']}", alice.token)
    assert code == 200 and answer["data"] == {"id": seeder["id"], "deleted": True}
    assert await file_status(db, fid) == "inactive"
    code, answer = await call(client, "GET", f"{FILES}/{fid}", alice.token)
    assert code == 200 and answer["data"]["status"] == "inactive"

    code, answer = await call(client, "GET", f"{FILES}/{fid}/peers", alice.token)
    assert code == 200 and [p["id"] for p in answer["data"]["peers"]] == [laptop["id"], phone["id"]]
    code, _ = await call(client, "DELETE", f"{FILES}/{fid}", alice.token)
    assert code == 200
    assert await db.fetchval("SELECT count(*) FROM peer WHERE file_id = $1", fid) == 0


async def test_bandwidth_records_update_the_users_totals(client, db):
    alice, bob = await user(client), await user(client)
    await create(client, bob, f"{NET}/bandwidth", {"bandwidth_limit": 50, "usage": 5})
    bob_before = await utility(db, bob)
    first = await create(client, alice, f"{NET}/bandwidth", {"bandwidth_limit": 1000, "usage": 300})
    second = await create(client, alice, f"{NET}/bandwidth", {"bandwidth_limit": 500, "usage": 400})
    assert (second["user_id"], second["bandwidth_limit"], second["usage"]) == (str(alice.id), 500, 400)

    totals = (await utility(db, alice))["bandwidth"]
    assert {k: v for k, v in totals.items() if k != "updated_at"} == {
        "limit": 500, "total_usage": 700, "last_usage": 400, "records": 2, "remaining": 0, "over_limit": True}
    code, answer = await call(client, "GET", f"{NET}/usage", alice.token)
    assert code == 200 and answer["data"] == {"bandwidth": totals, "gateway": None}

    code, _ = await call(client, "DELETE", f"{NET}/bandwidth/{second['id']}", alice.token)
    assert code == 200
    totals = (await utility(db, alice))["bandwidth"]
    assert (totals["limit"], totals["total_usage"], totals["remaining"], totals["over_limit"], totals["records"]) == \
        (1000, 300, 700, False, 1)
    code, _ = await call(client, "DELETE", f"{NET}/bandwidth/{first['id']}", alice.token)
    assert code == 200
    assert "bandwidth" not in await utility(db, alice)
    assert await utility(db, bob) == bob_before
    # Records are facts: there is no route to change one.
    code, answer = await call(client, "PATCH", f"{NET}/bandwidth/{first['id']}", alice.token, json={"usage": 1})
    assert (code, answer["error"]["code"]) == (404, "not_found")


async def test_gateways_update_the_share(client, db):
    alice = await user(client)
    first = await create(client, alice, f"{NET}/gateways", {"share_point": "gw://eu-1"})
    second = await create(client, alice, f"{NET}/gateways", {"share_point": "gw://us-2"})
    share = (await utility(db, alice))["gateway"]
    assert (share["share_points"], share["last_share_point"]) == (2, "gw://us-2")
    code, answer = await call(client, "GET", f"{NET}/usage", alice.token)
    assert code == 200 and answer["data"]["gateway"] == share

    code, _ = await call(client, "DELETE", f"{NET}/gateways/{second['id']}", alice.token)
    assert code == 200
    share = (await utility(db, alice))["gateway"]
    assert (share["share_points"], share["last_share_point"]) == (1, "gw://eu-1")
    code, _ = await call(client, "DELETE", f"{NET}/gateways/{first['id']}", alice.token)
    assert code == 200
    assert "gateway" not in await utility(db, alice)


async def test_other_users_rows_are_not_found(client, db):
    alice, bob = await user(client), await user(client)
    fid = (await new_file(client, alice))["id"]
    other_fid = (await new_file(client, alice, "/data/other.bin"))["id"]
    rows = {
        f"{FILES}/{fid}": {"size": 1},
        f"{FILES}/{fid}/mirrors/{(await create(client, alice, f'{FILES}/{fid}/mirrors', {'mirror_path': '/m/1'}))['id']}":
            {"mirror_path": "/m/2"},
        f"{FILES}/{fid}/trackers/"
        f"{(await create(client, alice, f'{FILES}/{fid}/trackers', {'tracker_url': 'udp://t.example:6969'}))['id']}":
            {"status": "inactive"},
        f"{FILES}/{fid}/seeders/{(await create(client, alice, f'{FILES}/{fid}/seeders'))['id']}":
            {"status": "inactive"},
        f"{FILES}/{fid}/peers/{(await create(client, alice, f'{FILES}/{fid}/peers'))['id']}": {"status": "inactive"},
        f"{NET}/channels/{(await create(client, alice, f'{NET}/channels', {'access_point': 'ap-1'}))['id']}":
            {"access_point": "ap-2"},
        f"{NET}/bandwidth/{(await create(client, alice, f'{NET}/bandwidth', {'bandwidth_limit': 9, 'usage': 1}))['id']}":
            None,
        f"{NET}/gateways/{(await create(client, alice, f'{NET}/gateways', {'share_point': 'gw'}))['id']}": None,
    }
    before = await snapshot(db)
    for path, change in rows.items():
        code, answer = await call(client, "GET", path, alice.token)
        assert code == 200, answer
        missing = path.rsplit("/", 1)[0] + "/2147483647"
        _, unknown = await call(client, "GET", missing, alice.token)
        for method, body in (("GET", None), ("PATCH", change), ("DELETE", None)):
            if method == "PATCH" and change is None:
                continue
            code, answer = await call(client, method, path, bob.token, json=body)
            # Exactly what a row that does not exist answers: nothing tells bob it is there.
            assert (code, answer) == (404, unknown), (method, path, answer)
    # A row of alice's file is not found under her other file either.
    peer_path = next(p for p in rows if "/peers/" in p)
    code, answer = await call(client, "GET", peer_path.replace(f"/{fid}/", f"/{other_fid}/"), alice.token)
    assert (code, answer["error"]["code"]) == (404, "not_found")

    for kind in ("mirrors", "trackers", "seeders", "peers"):
        code, answer = await call(client, "GET", f"{FILES}/{fid}/{kind}", bob.token)
        assert (code, answer["error"]["code"], answer["error"]["field"]) == (404, "not_found", "file_id")
        code, answer = await call(client, "POST", f"{FILES}/{fid}/{kind}", bob.token,
                                  json={"mirror_path": "/x"} if kind == "mirrors" else
                                  {"tracker_url": "http://x.example"} if kind == "trackers" else {})
        assert (code, answer["error"]["field"]) == (404, "file_id"), answer
    for listing, key in ((FILES, "files"), (f"{NET}/channels", "channels"), (f"{NET}/bandwidth", "records"),
                         (f"{NET}/gateways", "gateways")):
        code, answer = await call(client, "GET", listing, bob.token)
        assert code == 200 and answer["data"][key] == [], answer
    assert await snapshot(db) == before


async def test_unauthenticated_callers_get_401(client, db):
    alice = await user(client)
    fid = (await new_file(client, alice))["id"]
    before = await snapshot(db)
    requests = [("GET", FILES), ("POST", FILES), ("GET", f"{FILES}/{fid}"), ("PATCH", f"{FILES}/{fid}"),
                ("DELETE", f"{FILES}/{fid}"), ("POST", f"{FILES}/{fid}/peers"), ("GET", f"{NET}/channels"),
                ("POST", f"{NET}/bandwidth"), ("GET", f"{NET}/dns"), ("POST", f"{NET}/dns"), ("GET", f"{NET}/usage")]
    for method, path in requests:
        for token in (None, "not-a-token"):
            code, answer = await call(client, method, path, token, json={"file_path": "/x", "size": 1})
            assert (code, answer["error"]["code"]) == (401, "unauthorized"), (method, path, token, answer)
    assert await snapshot(db) == before


async def test_bad_input_is_invalid_payload_and_writes_nothing(client, db):
    alice = await user(client)
    admin = await admin_token(client, db)
    fid = (await new_file(client, alice))["id"]
    peer = await create(client, alice, f"{FILES}/{fid}/peers")
    before = await snapshot(db)
    cases = [
        (alice.token, "POST", FILES, {"file_path": "/x"}, "size"),
        (alice.token, "POST", FILES, {"file_path": "/x", "size": -1}, "size"),
        (alice.token, "POST", FILES, {"file_path": "/x", "size": 2**63}, None),   # beyond 64 bits: not JSON we read
        (alice.token, "POST", FILES, {"file_path": "/x", "size": "12"}, "size"),
        (alice.token, "POST", FILES, {"file_path": "x" * 256, "size": 1}, "file_path"),
        (alice.token, "POST", FILES, {"file_path": "/a\u0000b", "size": 1}, "file_path"),
        (alice.token, "POST", FILES, {"file_path": "/x", "size": 1, "status": "active"}, "status"),
        (alice.token, "PATCH", f"{FILES}/{fid}", {}, None),
        (alice.token, "PATCH", f"{FILES}/{fid}", {"owner_id": str(uuid.uuid4())}, "owner_id"),
        (alice.token, "POST", f"{FILES}/{fid}/mirrors", {}, "mirror_path"),
        (alice.token, "POST", f"{FILES}/{fid}/trackers", {"tracker_url": "ftp://t.example"}, "tracker_url"),
        (alice.token, "POST", f"{FILES}/{fid}/peers", {"status": "gone"}, "status"),
        (alice.token, "POST", f"{FILES}/{fid}/peers", {"user_id": str(uuid.uuid4())}, "user_id"),
        (alice.token, "PATCH", f"{FILES}/{fid}/peers/{peer['id']}", {"file_id": fid}, "file_id"),
        (alice.token, "POST", f"{NET}/channels", {"access_point": ""}, "access_point"),
        (alice.token, "POST", f"{NET}/bandwidth", {"bandwidth_limit": 10, "usage": -5}, "usage"),
        (alice.token, "POST", f"{NET}/bandwidth", {"bandwidth_limit": 2**31, "usage": 5}, "bandwidth_limit"),
        (alice.token, "POST", f"{NET}/bandwidth", {"usage": 5}, "bandwidth_limit"),
        (alice.token, "POST", f"{NET}/gateways", {"share_point": 7}, "share_point"),
        (admin, "POST", f"{NET}/dns", {"domain_name": "Example.COM"}, "domain_name"),
        (admin, "POST", f"{NET}/dns", {"domain_name": "example.com", "ip_address": "300.1.1.1"}, "ip_address"),
    ]
    for token, method, path, body, field in cases:
        code, answer = await call(client, method, path, token, json=body)
        assert (code, answer["error"]["code"]) == (400, "invalid_payload"), (path, body, answer)
        if field is not None:
            assert answer["error"]["field"] == field, (path, body, answer)
    code, answer = await call(client, "POST", FILES, alice.token, data=b"{not json")
    assert (code, answer["error"]["code"]) == (400, "invalid_payload")
    for query in ("limit=0", "limit=101", "after=-1", "after=x"):
        code, answer = await call(client, "GET", f"{NET}/channels?{query}", alice.token)
        assert (code, answer["error"]["code"]) == (400, "invalid_payload"), query
    for path in (f"{FILES}/abc", f"{FILES}/0", f"{FILES}/{'9' * 5000}", f"{FILES}/x/peers"):
        code, answer = await call(client, "GET", path, alice.token)
        assert (code, answer["error"]["code"]) == (404, "not_found"), path
    assert await snapshot(db) == before


async def test_dns_is_managed_by_administrators(client, db):
    alice = await user(client)
    admin = await admin_token(client, db)
    code, answer = await call(client, "POST", f"{NET}/dns", alice.token, json={"domain_name": "hub.example"})
    assert (code, answer["error"]["code"]) == (403, "forbidden")
    assert await db.fetchval("SELECT count(*) FROM dns") == 0

    record = await create(client, admin, f"{NET}/dns", {"domain_name": "hub.example", "ip_address": "10.0.0.7"})
    code, answer = await call(client, "POST", f"{NET}/dns", admin, json={"domain_name": "hub.example"})
    assert (code, answer["error"]["code"], answer["error"]["field"]) == (409, "conflict", "domain_name")
    code, answer = await call(client, "GET", f"{NET}/dns", alice.token)
    assert code == 200 and answer["data"]["records"] == [record]

    path = f"{NET}/dns/{record['id']}"
    for method, body in (("PATCH", {"ip_address": "10.0.0.8"}), ("DELETE", None)):
        code, answer = await call(client, method, path, alice.token, json=body)
        assert (code, answer["error"]["code"]) == (403, "forbidden")
    code, answer = await call(client, "PATCH", path, admin, json={"ip_address": "2001:db8::1"})
    assert code == 200 and answer["data"]["ip_address"] == "2001:db8::1"
    assert await db.fetchval("SELECT ip_address FROM dns WHERE id = $1", record["id"]) == "2001:db8::1"
    code, _ = await call(client, "DELETE", path, admin)
    assert code == 200 and await db.fetchval("SELECT count(*) FROM dns") == 0


async def test_lists_page_by_id(client, db):
    alice = await user(client)
    made = [(await create(client, alice, f"{NET}/channels", {"access_point": f"ap-{n}"}))["id"] for n in range(5)]
    seen, after = [], 0
    for expected_next in (True, True, False):
        code, answer = await call(client, "GET", f"{NET}/channels?limit=2&after={after}", alice.token)
        assert code == 200, answer
        page = answer["data"]
        seen += [c["id"] for c in page["channels"]]
        assert (page["next_after"] is not None) == expected_next
        after = page["next_after"]
    assert seen == made


async def test_row_caps_refuse_more_and_write_nothing(client, db):
    alice = await user(client)
    fid = (await new_file(client, alice))["id"]
    await db.execute("INSERT INTO mirror (cloud_id, mirror_path) SELECT $1, '/m/' || n FROM generate_series(1, 46) n",
                     fid)
    # Eight racing creates for the last four places: exactly four get in.
    answers = await asyncio.gather(*(call(client, "POST", f"{FILES}/{fid}/mirrors", alice.token,
                                          json={"mirror_path": f"/race/{n}"}) for n in range(8)))
    assert sorted(code for code, _ in answers) == [201] * 4 + [409] * 4, answers
    assert {answer["error"]["code"] for code, answer in answers if code == 409} == {"conflict"}
    assert await db.fetchval("SELECT count(*) FROM mirror WHERE cloud_id = $1", fid) == 50
    # The cap is per file: another file of the same owner takes mirrors.
    other = (await new_file(client, alice, "/data/b.bin"))["id"]
    mirror = await create(client, alice, f"{FILES}/{other}/mirrors", {"mirror_path": "/m/1"})
    assert mirror["cloud_id"] == other
