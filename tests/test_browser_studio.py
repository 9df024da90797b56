"""The Seller studio (#/studio) in a real Chromium against the real server: upload with progress, the
inferred schema and sample before publishing, publish / edit / unpublish seen on the Marketplace, the
figures updated live by a sale, errors from the server, deep links, and the phone layout."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from playwright.async_api import expect

from db import kyc as kyc_queries
from db.pool import POOL
from server.app import create_app
from tests.helpers import server_url
from tests.test_browser import (  # noqa: F401 - fixtures
    bought,
    browser,
    no_csp_violations,
    page,
    published_pod,
    sign_up,
    until_live,
    watch_csp,
)
from tests.test_browser_app import OVERFLOW, SMALL_TARGETS, new_page, sign_in
from tests.test_marketplace import CSV_BYTES, auth

UPLOAD_LIMIT = 4096  # bytes: CSV_BYTES (844) fits, TOO_BIG does not
TOO_BIG = b"city,temp_c\n" + b"".join(f"row{i},{i}.5\n".encode() for i in range(600))
NEW_VERSION = b"city,temp_c,humidity\nBerlin,8.0,71\nLagos,30.2,80\nLima,19.4,77\n"
PASSWORD = "correct horse battery"


@pytest.fixture
async def client(aiohttp_client, fast):
    """The real app with a quick purchase worker and a small upload limit (to see the size error)."""
    return await aiohttp_client(create_app(fast.replace(max_upload_bytes=UPLOAD_LIMIT)))


async def approve_kyc(client, db, username: str) -> uuid.UUID:
    user_id = await db.fetchval("SELECT id FROM users WHERE username = $1", username)
    async with client.app[POOL].acquire() as conn:
        await kyc_queries.set_user_status(conn, user_id, kyc_queries.APPROVED)
    return user_id


def csv_file(name: str = "weather.csv", data: bytes = CSV_BYTES, mime: str = "text/csv") -> dict:
    return {"name": name, "mimeType": mime, "buffer": data}


async def upload_through_the_page(tab, title: str = "City weather", price: str = "1.5") -> str:
    """Fill the upload form and send it; the id of the new draft (the page opens it)."""
    form = tab.locator("#studio-upload-form")
    await form.get_by_label("Dataset file").set_input_files(csv_file())
    await form.get_by_label("Title").fill(title)
    await form.get_by_label("Description").fill("Daily weather for two cities")
    await form.get_by_label("Category").fill("climate")
    await form.get_by_label("Price (SUI)").fill(price)
    await form.get_by_label("Tags").fill("weather, daily")
    await form.get_by_role("button", name="Upload").click()
    progress = tab.locator(".studio-upload-progress")
    await expect(progress).to_have_attribute("data-state", "done", timeout=10_000)
    await expect(progress.locator("progress")).to_have_attribute("value", "100")
    await expect(progress).to_contain_text(f'Uploaded "{title}" as a draft')
    await tab.wait_for_url("**/#/studio/*")
    return tab.url.rsplit("/", 1)[1]


async def test_upload_review_publish_edit_unpublish_and_delete(client, db, page):  # noqa: F811
    base_url = server_url(client)
    username = await sign_up(page, base_url)
    await page.get_by_role("tab", name="Seller studio").click()
    assert page.url.endswith("#/studio")
    await expect(page.locator("#tab-studio")).to_contain_text("You have no DataPods yet")
    await expect(page.locator('[data-figure="sales"]')).to_have_text("0")
    await expect(page.locator("#tab-studio figcaption")).to_contain_text("Last 30 days: 0 sales")

    # The server's refusals, clearly: a file over the limit, then a format it does not read.
    form = page.locator("#studio-upload-form")
    await form.get_by_label("Title").fill("Too big")
    await form.get_by_label("Category").fill("climate")
    await form.get_by_label("Price (SUI)").fill("1")
    await form.get_by_label("Dataset file").set_input_files(csv_file("big.csv", TOO_BIG))
    await form.get_by_role("button", name="Upload").click()
    alert = page.locator(".studio-upload-progress-error")
    await expect(page.locator(".studio-upload-progress")).to_have_attribute("data-state", "failed")
    await expect(alert).to_contain_text("Not uploaded (big.csv): the file is too large")
    parquet = csv_file("table.parquet", b"PAR1\x00\x01", "application/octet-stream")
    await form.get_by_label("Dataset file").set_input_files(parquet)
    await form.get_by_role("button", name="Upload").click()
    await expect(alert).to_contain_text("File: the file must be CSV (.csv) or JSON lines")
    assert await db.fetchval("SELECT count(*) FROM datapods") == 0

    # A real upload: progress to done, then the draft's page with what the server inferred.
    pod_id = await upload_through_the_page(page)
    await expect(alert).to_be_empty()
    await expect(page.get_by_role("heading", name="City weather", level=3)).to_be_visible()
    await expect(page.locator(".studio-detail .studio-status")).to_have_text("Draft")
    schema = page.locator("#studio-schema tbody tr")
    await expect(schema).to_have_count(5)
    await expect(schema.nth(2)).to_have_text("temp_cnumber1")
    await expect(page.locator("#studio-sample thead th")).to_have_text(["date", "city", "temp_c", "rainy", "note"])
    await expect(page.locator("#studio-sample tbody tr")).to_have_count(10)
    await expect(page.locator(".studio-facts")).to_contain_text("weather, daily")

    # Publishing needs KYC: the page says so and where to go; approved, it publishes.
    await page.get_by_role("button", name="Publish").click()
    detail_error = page.locator(".studio-detail > .error")
    await expect(detail_error).to_contain_text("selling needs a verified identity (KYC)")
    await expect(detail_error.get_by_role("link", name="Submit your identity document in the KYC view")).to_be_visible()
    await approve_kyc(client, db, username)
    await page.get_by_role("button", name="Publish").click()
    await expect(page.locator(".studio-detail .studio-status")).to_have_text("Published")
    await expect(detail_error).to_be_empty()
    await expect(page.locator(".studio-detail > .studio-live")).to_contain_text("Published")

    await page.get_by_role("tab", name="Marketplace").click()
    card = page.locator(f'#datapods [data-key="{pod_id}"]')
    await expect(card.locator(".price")).to_have_text("1.5 SUI")

    # An invalid price: the server's error, and nothing changes.
    await page.go_back()
    await expect(page.get_by_role("heading", name="City weather", level=3)).to_be_visible()
    edit = page.locator("#studio-edit-form")
    await edit.get_by_label("Price (SUI)").fill("-2")
    await edit.get_by_role("button", name="Save changes").click()
    edit_error = edit.locator("[data-edit-error]")
    await expect(edit_error).to_contain_text("Not saved. Price (SUI): '-2' does not match")
    await expect(edit.get_by_label("Price (SUI)")).to_have_attribute("aria-invalid", "true")
    await expect(page.locator('[data-fact="price"]')).to_have_text("1.5 SUI")
    assert await db.fetchval("SELECT price_sui FROM datapods WHERE id = $1", uuid.UUID(pod_id)) == Decimal("1.5")

    # A good price and description: saved, the error gone, the Marketplace card follows live.
    await edit.get_by_label("Price (SUI)").fill("2.25")
    await edit.get_by_label("Description").fill("Daily weather for Lima and Oslo")
    await edit.get_by_role("button", name="Save changes").click()
    await expect(edit.locator("[data-edit-notice]")).to_have_text("Saved the new description, price. "
                                                                  "The Marketplace shows it now.")
    await expect(edit_error).to_be_empty()
    await expect(page.locator('[data-fact="price"]')).to_have_text("2.25 SUI")
    await expect(card.locator(".price")).to_have_text("2.25 SUI")
    await expect(card).to_contain_text("Daily weather for Lima and Oslo")

    # Unpublish: off the Marketplace.
    await page.get_by_role("button", name="Unpublish").click()
    await expect(page.locator(".studio-detail .studio-status")).to_have_text("Draft")
    await page.get_by_role("tab", name="Marketplace").click()
    await expect(card).to_have_count(0)
    await expect(page.locator("#market-count")).to_have_text("No DataPods found.")

    # The list shows the draft with its price; delete asks first.
    await page.get_by_role("tab", name="Seller studio").click()
    row = page.locator(f'#studio-pods tr[data-datapod-id="{pod_id}"]')
    await expect(row).to_contain_text("Draft")
    await expect(row).to_contain_text("2.25 SUI")
    await row.get_by_role("link", name="City weather").click()
    await page.get_by_role("button", name="Delete this DataPod…").click()
    dialog = page.get_by_role("dialog", name='Delete "City weather"?')
    await expect(dialog).to_be_visible()
    await dialog.get_by_role("button", name="Keep it").click()
    await expect(dialog).to_be_hidden()
    assert await db.fetchval("SELECT deleted_at FROM datapods WHERE id = $1", uuid.UUID(pod_id)) is None
    await page.get_by_role("button", name="Delete this DataPod…").click()
    await dialog.get_by_role("button", name="Delete for good").click()
    await page.wait_for_url("**/#/studio")
    await expect(page.locator("#tab-studio")).to_contain_text('Deleted "City weather"')
    await expect(page.locator("#tab-studio")).to_contain_text("You have no DataPods yet")
    assert await db.fetchval("SELECT deleted_at FROM datapods WHERE id = $1", uuid.UUID(pod_id)) is not None


async def test_a_sale_shows_live_in_the_figures_and_deep_links_reload(client, db, page):  # noqa: F811
    from tests.helpers import register
    from tests.test_marketplace import upload

    seller, pod = await published_pod(client)
    await upload(client, seller, title="Unsold draft")
    base_url = server_url(client)
    await sign_in(page, base_url, seller["user"]["username"], PASSWORD, "#/studio")
    await expect(page.get_by_role("tabpanel", name="Seller studio")).to_be_visible()
    row = page.locator(f'#studio-pods tr[data-datapod-id="{pod["id"]}"]')
    await expect(row.locator("[data-sales]")).to_have_text("0")
    await expect(page.locator("#studio-pods tbody tr")).to_have_count(2)
    await expect(page.locator('[data-figure="sales"]')).to_have_text("0")
    await expect(page.locator("#tab-studio")).to_contain_text("No payouts yet")
    await until_live(page, "/purchases", f"user:{seller['user']['id']}")

    buyer = await register(client)
    purchase = await bought(client, db, buyer, seller, pod)
    await expect(page.locator("[data-live]")).to_have_text(
        'New sale: "City weather" for 1.5 KVP, held in escrow.', timeout=10_000)
    await expect(page.locator('[data-figure="sales"]')).to_have_text("1")
    await expect(page.locator('[data-figure="escrow"]')).to_contain_text("1.5 KVP")
    await expect(page.locator('[data-figure="revenue"]')).to_have_text("1.5 KVP")
    await expect(page.locator("#tab-studio figcaption")).to_contain_text("Last 30 days: 1 sale bringing 1.5 KVP")
    await expect(row.locator("[data-sales]")).to_have_text("1")
    await page.get_by_text("The same figures as a table").click()
    await expect(page.locator(".studio-figure table tbody tr")).to_have_count(1)

    # The buyer confirms: the escrow is released to the seller, live too.
    response = await client.post(f"/api/v1/purchases/{purchase}/confirm", headers=auth(buyer))
    assert response.status == 200, await response.text()
    await expect(page.locator("[data-live]")).to_have_text(
        'The payment of 1.5 KVP for "City weather" was released to you.', timeout=10_000)
    await expect(page.locator('[data-figure="escrow"]')).to_contain_text("0 KVP")

    # A DataPod's own page by its address: a reload stays there; back returns to the list.
    await row.get_by_role("link", name="City weather").click()
    assert page.url.endswith(f"#/studio/{pod['id']}")
    heading = page.get_by_role("heading", name="City weather", level=3)
    await expect(heading).to_be_visible()
    await expect(page.locator('.studio-detail [data-figure="sales"]')).to_have_text("1")
    await page.reload()
    await expect(heading).to_be_visible()
    await expect(page.get_by_role("tab", name="Seller studio")).to_have_attribute("aria-selected", "true")
    await expect(page.locator('.studio-detail [data-figure="sales"]')).to_have_text("1")
    await expect(page.locator("#studio-schema tbody tr")).to_have_count(5)

    # A new version: its own progress, the new columns, and the buyer is told.
    versions = page.locator("#studio-version-form")
    await versions.get_by_label("New file").set_input_files(csv_file("v2.csv", NEW_VERSION))
    await versions.get_by_role("button", name="Upload new version").click()
    progress = page.locator(".studio-version-progress")
    await expect(progress).to_have_attribute("data-state", "done", timeout=10_000)
    await expect(progress).to_contain_text("Version 2 is live")
    await expect(progress).to_contain_text("1 buyer told.")
    await expect(page.locator("#studio-schema tbody tr")).to_have_count(3)
    await expect(page.locator(".studio-versions li")).to_have_count(2)
    await page.go_back()
    await expect(page.locator("#studio-pods")).to_be_visible()
    assert page.url.endswith("#/studio")
    await page.goto(f"{base_url}/#/studio/{uuid.uuid4()}")
    await expect(page.get_by_role("heading", name="No such DataPod")).to_be_visible()


async def test_phone_journey_without_sideways_scroll(client, db, browser):  # noqa: F811
    context = await browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    phone = await new_page(context)
    try:
        username = await sign_up(phone, server_url(client))
        await approve_kyc(client, db, username)
        await phone.get_by_role("tab", name="Seller studio").click()
        await expect(phone.locator("#tab-studio")).to_contain_text("You have no DataPods yet")
        assert await phone.evaluate(OVERFLOW) <= 0
        assert await phone.evaluate(SMALL_TARGETS) == []
        await upload_through_the_page(phone, title=("Phone weather " + "long " * 12).strip())
        await phone.get_by_role("button", name="Publish").click()
        await expect(phone.locator(".studio-detail .studio-status")).to_have_text("Published")
        await phone.locator("#studio-edit-form").get_by_label("Price (SUI)").fill("3")
        await phone.locator("#studio-edit-form").get_by_role("button", name="Save changes").click()
        await expect(phone.locator('[data-fact="price"]')).to_have_text("3 SUI")
        await phone.get_by_text("The same figures as a table").first.click()
        detail = phone.url.rsplit("#", 1)[1]
        for width, height in ((390, 844), (360, 740)):
            await phone.set_viewport_size({"width": width, "height": height})
            for path in (detail, "/studio"):
                await phone.evaluate(f"location.hash = {path!r}")
                await expect(phone.locator("#studio-root h3").first).to_be_visible()
                await phone.wait_for_timeout(100)  # the chart follows its box's width
                assert await phone.evaluate(OVERFLOW) <= 0, (width, path)
                assert await phone.evaluate(SMALL_TARGETS) == [], (width, path)
    finally:
        await no_csp_violations(phone)
        await context.close()
