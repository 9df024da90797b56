"""The KYC view (#/kyc) in a real Chromium against the real server: a user sends a document from the
page, an administrator opens it from the review queue and rejects, then approves, and the user's
page follows each decision live; non-administrators never see the queue; the phone layout."""

from __future__ import annotations

import struct
import zlib

import pytest
from playwright.async_api import expect

from tests.helpers import register, server_url
from tests.test_browser import browser, sign_up  # noqa: F401 - fixtures
from tests.test_browser_app import OVERFLOW, SMALL_TARGETS, sign_in
from tests.test_browser_dao import PHONE, SMALL_LINKS, contexts, until_live  # noqa: F401 - a fixture
from tests.test_games import make_admin
from tests.test_kyc import submitted


def png(width: int = 3, height: int = 2) -> bytes:
    """A real (tiny, red) PNG: the page shows it only if the hub decrypted it intact."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


async def submit_in_page(tab, kind: str, name: str, data: bytes, mime: str) -> None:
    form = tab.locator("#kyc-form")
    await form.get_by_label("Kind of document").select_option(label=kind)
    await form.get_by_label("Document (PDF, PNG or JPEG)").set_input_files(
        files=[{"name": name, "mimeType": mime, "buffer": data}])
    await form.get_by_role("button", name="Send the document").click()


def admin_calls(tab) -> list[str]:
    calls: list[str] = []
    tab.on("request", lambda request: calls.append(request.url) if "/api/v1/admin/" in request.url else None)
    return calls


async def test_submit_review_reject_then_approve_live(client, db, contexts):  # noqa: F811
    base_url = server_url(client)
    user = await contexts()
    calls = admin_calls(user)
    username = await sign_up(user, base_url)
    await user.get_by_role("tab", name="KYC").click()
    status = user.locator("#kyc-status")
    await expect(status).to_contain_text("Not submitted")
    await expect(user.locator("#kyc-queue")).to_have_count(0)  # no queue for a non-administrator

    form = user.locator("#kyc-form")
    await form.get_by_role("button", name="Send the document").click()
    await expect(form.get_by_role("alert")).to_have_text(
        "Choose the document's file (a PDF, PNG or JPEG scan or photo).")
    await submit_in_page(user, "Passport", "notes.txt", b"just text", "text/plain")
    await expect(form.get_by_role("alert")).to_have_text("The document must be a PDF, PNG or JPEG file.")
    await submit_in_page(user, "Identity card", "scan.png", png(), "image/png")
    await expect(user.locator("#tab-kyc .kyc-notice").first).to_contain_text("Your document was sent.")
    await expect(status).to_contain_text("Pending review")
    await expect(status).to_contain_text("Your identity card is waiting for an administrator.")
    await expect(form).to_have_count(0)
    row = await db.fetchrow("SELECT kyc_id, document_type, status FROM kyc_submissions")
    assert (row["document_type"], row["status"]) == ("id_card", "Pending")
    user_id = await db.fetchval("SELECT id FROM users WHERE username = $1", username)
    await until_live(user, "/purchases", f"user:{user_id}")

    # An administrator in another browser: the queue, the decrypted document, a refusal, then a rejection.
    admin_account = await make_admin(client, db)
    admin = await contexts()
    await sign_in(admin, base_url, admin_account["user"]["username"], "correct horse battery")
    await admin.goto(f"{base_url}/#/kyc")
    queue = admin.locator("#kyc-queue")
    item = queue.locator(f'[data-kyc-id="{row["kyc_id"]}"]')
    await expect(item).to_contain_text(username)
    await expect(item).to_contain_text("Identity card")
    await item.get_by_role("button", name=f"Open {username}'s document").click()
    dialog = admin.get_by_role("dialog", name=f"{username}: Identity card")
    image = dialog.get_by_role("img")
    await expect(image).to_be_visible()
    assert await image.evaluate("(img) => img.complete && img.naturalWidth") == 3  # decrypted intact
    await expect(dialog.get_by_role("link", name="Download")).to_have_attribute("download", f"kyc-{row['kyc_id']}.png")
    await dialog.get_by_role("button", name="Close").click()
    await expect(dialog).to_be_hidden()

    await item.get_by_role("button", name=f"Reject {username}").click()
    await expect(item.get_by_role("alert")).to_have_text("Give the reason for the rejection: the user sees it.")
    await item.get_by_label(f"Reason for {username}").fill("The scan is blurred.")
    await item.get_by_role("button", name=f"Reject {username}").click()
    await expect(queue.locator(".kyc-notice")).to_have_text(f"Rejected {username}'s identity card.")
    await expect(item).to_have_count(0)
    await expect(queue).to_contain_text("No document is waiting for review.")

    # The user's page shows the rejection and its reason without a reload, and offers to send again.
    await expect(status).to_contain_text("Rejected", timeout=10_000)
    await expect(status).to_contain_text("Reason: The scan is blurred.")
    await submit_in_page(user, "Passport", "passport.png", png(4, 4), "image/png")
    await expect(status).to_contain_text("Pending review")

    await queue.get_by_role("button", name="Refresh").click()
    second = queue.locator(".kyc-item").filter(has_text=username)
    await expect(second).to_contain_text("Passport")
    await second.get_by_label(f"Reason for {username}").fill("Matches the account.")
    await second.get_by_role("button", name=f"Approve {username}").click()
    await expect(queue.locator(".kyc-notice")).to_have_text(f"Approved {username}'s passport.")
    await expect(status).to_contain_text("Approved", timeout=10_000)
    await expect(status).to_contain_text("Your identity is verified")
    await expect(user.locator("#kyc-form")).to_have_count(0)
    assert await db.fetchval("SELECT kyc_status FROM users WHERE username = $1", username) == "Approved"

    # The decided submissions are in the queue's other lists; the user's page reloads in place.
    await queue.get_by_label("Show").select_option("Rejected")
    await expect(queue.locator(".kyc-item")).to_contain_text("The scan is blurred.")
    await user.reload()
    await expect(user.get_by_role("tabpanel", name="KYC")).to_be_visible()
    await expect(status).to_contain_text("Approved")
    await user.get_by_text("Your submissions (2)").click()
    await expect(user.locator(".kyc-history li")).to_have_count(2)
    await expect(user.locator("#kyc-queue")).to_have_count(0)
    assert calls == []  # the user's page never asked for the administrators' routes


@pytest.mark.parametrize("width", [360, 390])
async def test_the_kyc_view_fits_a_phone(client, db, contexts, width):  # noqa: F811
    base_url = server_url(client)
    applicant = await register(client, f"a-rather-long-username-{width}")
    await submitted(client, applicant["token"], data=png(), document_type="license")
    admin_account = await make_admin(client, db)
    phone = await contexts({"width": width, "height": PHONE["height"]}, is_mobile=True, has_touch=True)
    await sign_in(phone, base_url, admin_account["user"]["username"], "correct horse battery")
    await phone.get_by_role("tab", name="KYC").click()
    item = phone.locator("#kyc-queue .kyc-item")
    await expect(item).to_contain_text("Driving licence")
    await expect(phone.locator("#kyc-form")).to_be_visible()
    assert await phone.evaluate(OVERFLOW) <= 0
    assert await phone.evaluate(SMALL_TARGETS) == []
    await item.get_by_role("button", name=f"Open {applicant['user']['username']}'s document").click()
    await expect(phone.get_by_role("dialog").get_by_role("img")).to_be_visible()
    assert await phone.evaluate(OVERFLOW) <= 0
    assert await phone.evaluate(SMALL_TARGETS) == []
    assert await phone.evaluate(SMALL_LINKS, "#tab-kyc") == []
    await phone.keyboard.press("Escape")
    await expect(phone.get_by_role("dialog")).to_have_count(0)
