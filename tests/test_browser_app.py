"""The page as a product (issue 17): a wallet that travels, phone layout, tabs and routes, discovery signed out."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.hazmat.primitives.serialization import load_der_private_key
from playwright.async_api import expect

from server.core.crypto import MASTER_KEY
from server.realtime.hub import publish
from server.services.demo import DEMO_PASSWORD, DEMO_USERS, demo_wallet, load_if_empty
from tests.helpers import server_url
from tests.test_browser import (  # noqa: F401 - fixtures
    browser,
    no_csp_violations,
    page,
    published_pod,
    sign_up,
    until_live,
    watch_csp,
)

STATIC = Path(__file__).parent.parent / "static"
PASSPHRASE = "a long backup passphrase"
VIEWS = ("Marketplace", "Purchases", "Seller studio", "Assistant", "Explorer", "Games", "DAO", "NFTs", "KYC", "Account")


@pytest.fixture
async def fresh_context(browser):  # noqa: F811 - the fixture imported above
    """Another browser profile (its own IndexedDB and storage): "another browser"."""
    context = await browser.new_context(accept_downloads=True)
    yield context
    for other in context.pages:
        await no_csp_violations(other)
    await context.close()


async def new_page(context):
    tab = await context.new_page()
    await watch_csp(tab)
    return tab


async def sign_in(tab, base_url: str, login: str, password: str, path: str = "#/purchases") -> None:
    """Sign in through the page's form, opened at `path`."""
    await tab.goto(f"{base_url}/{path}")
    form = tab.locator("#login-form")
    await form.locator("[name=login]").fill(login)
    await form.locator("[name=password]").fill(password)
    await form.get_by_role("button", name="Sign in").click()
    await expect(tab.locator("#whoami")).to_have_text(login)


async def open_buy_dialog(tab, pod_title: str):
    """Funds from the faucet, then Buy opens the confirmation (in KVP): this browser holds the key that pays."""
    await tab.get_by_role("button", name="Get demo funds").click()
    await expect(tab.locator("#wallet-message")).to_contain_text("Received")
    await tab.get_by_role("tab", name="Marketplace").click()
    await tab.get_by_role("button", name=f"Buy {pod_title}").click()
    dialog = tab.get_by_role("dialog", name="Confirm your purchase")
    await expect(dialog).to_contain_text("KVP")
    return dialog


async def can_pay(tab, pod_title: str) -> None:
    """The confirmation opens for this browser's wallet; cancelled, nothing is paid."""
    await (await open_buy_dialog(tab, pod_title)).get_by_role("button", name="Cancel").click()


def open_backup(document: dict, passphrase: str) -> bytes:
    """The backup format read independently of the page (Python's cryptography): the PKCS #8 key."""
    assert document["format"] == "sourcenet-kvp-wallet-backup" and document["version"] == 1
    assert document["kdf"]["name"] == "PBKDF2" and document["kdf"]["hash"] == "SHA-256"
    assert document["kdf"]["iterations"] >= 600_000
    key = PBKDF2HMAC(hashes.SHA256(), 32, base64.b64decode(document["kdf"]["salt"]),
                     document["kdf"]["iterations"]).derive(passphrase.encode())
    return AESGCM(key).decrypt(base64.b64decode(document["cipher"]["iv"]), base64.b64decode(document["ciphertext"]),
                               document["address"].encode())


def test_the_demo_wallet_files_hold_the_demo_keys():
    for username, _, _ in DEMO_USERS:
        document = json.loads((STATIC / "demo-wallets" / f"{username}.json").read_text())
        wallet = demo_wallet(username)
        assert document["address"] == wallet.address and document["public_key"] == wallet.public_key
        private = load_der_private_key(open_backup(document, DEMO_PASSWORD), password=None)
        assert private.private_bytes_raw() == wallet.private_key.private_bytes_raw()


async def test_a_wallet_backup_restores_in_another_browser(client, page, fresh_context, tmp_path):  # noqa: F811
    base_url = server_url(client)
    _, pod = await published_pod(client)
    username = await sign_up(page, base_url)
    await page.get_by_role("tab", name="Purchases").click()
    await page.get_by_role("button", name="Create wallet").click()
    await expect(page.locator("#wallet-message")).to_have_text("Wallet ready.")
    address = await page.locator("#wallet-address").text_content()
    await expect(page.locator("#wallet")).to_contain_text("nobody can recover it")

    await page.get_by_text("Back up this wallet").click()
    form = page.locator("#wallet-export-form")
    await form.locator("[name=passphrase]").fill(PASSPHRASE)
    await form.locator("[name=repeat]").fill(PASSPHRASE)
    async with page.expect_download() as info:
        await form.get_by_role("button", name="Download the backup file").click()
    download = await info.value
    backup = tmp_path / download.suggested_filename
    await download.save_as(backup)
    document = json.loads(backup.read_text())
    assert document["address"] == address
    assert len(open_backup(document, PASSPHRASE)) == 48  # an Ed25519 PKCS #8 key, readable outside the browser

    # Another browser: the account is there, its key is not, and the page says how to bring it.
    other = await new_page(fresh_context)
    await sign_in(other, base_url, username, "correct horse battery")
    await expect(other.get_by_role("tab", name="Purchases")).to_have_attribute("aria-selected", "true")
    await expect(other.locator("#wallet-key-state")).to_contain_text("restore it from your backup file")
    await other.get_by_text("Restore a wallet from a backup file").click()
    restore = other.locator("#wallet-import-form")
    await restore.locator("[name=file]").set_input_files(backup)
    await restore.locator("[name=passphrase]").fill("not the passphrase")
    await restore.get_by_role("button", name="Restore").click()
    await expect(other.locator("#wallet-error")).to_contain_text("Wrong passphrase", timeout=15_000)
    await restore.locator("[name=file]").set_input_files(backup)
    await restore.locator("[name=passphrase]").fill(PASSPHRASE)
    await restore.get_by_role("button", name="Restore").click()
    await expect(other.locator("#wallet-message")).to_have_text("Wallet restored: this browser can pay from it now.",
                                                               timeout=15_000)
    await expect(other.locator("#wallet-error")).to_be_empty()  # the earlier failure is gone
    await expect(other.locator("#wallet-address")).to_have_text(address)
    await can_pay(other, pod["title"])


async def test_every_demo_user_takes_the_demo_wallet_into_any_browser(client, db, settings, fresh_context):
    assert await load_if_empty(db, settings, client.app[MASTER_KEY]) is True
    base_url = server_url(client)
    page = await new_page(fresh_context)  # noqa: F811
    await sign_in(page, base_url, "carol", DEMO_PASSWORD)
    demo = page.get_by_role("button", name="Use the demo wallet")
    await demo.click()
    await expect(page.locator("#wallet-message")).to_have_text("Demo wallet ready: this browser can pay from it now.",
                                                              timeout=15_000)
    await expect(page.locator("#wallet-address")).to_have_text(demo_wallet("carol").address)
    await expect(demo).to_be_hidden()
    await can_pay(page, "Hourly road traffic counts")

    # A backup of another account's wallet is refused, clearly.
    await page.get_by_role("tab", name="Purchases").click()
    await page.get_by_text("Restore a wallet from a backup file").click()
    restore = page.locator("#wallet-import-form")
    await restore.locator("[name=file]").set_input_files(STATIC / "demo-wallets" / "bob.json")
    await restore.locator("[name=passphrase]").fill(DEMO_PASSWORD)
    await restore.get_by_role("button", name="Restore").click()
    await expect(page.locator("#wallet-error")).to_contain_text("not for this account's wallet")


def contrast(rgb_a: str, rgb_b: str) -> float:
    def luminance(rgb: str) -> float:
        channels = [int(v) / 255 for v in re.findall(r"\d+", rgb)[:3]]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    high, low = sorted((luminance(rgb_a), luminance(rgb_b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


OVERFLOW = "document.documentElement.scrollWidth - window.innerWidth"
# Visible controls shorter than 44 px (a touch target's minimum height).
SMALL_TARGETS = """() => [...document.querySelectorAll('button, select, input, summary, [role="tab"]')]
  .filter((node) => node.offsetParent !== null && node.type !== "file")
  .map((node) => [node.textContent.trim() || node.name || node.id, node.getBoundingClientRect().height])
  .filter(([, height]) => height < 44)"""


@pytest.mark.parametrize("size", [(360, 740), (390, 844)])
async def test_phone_layout_has_no_sideways_scroll_and_big_targets(client, browser, size):  # noqa: F811
    context = await browser.new_context(viewport={"width": size[0], "height": size[1]}, is_mobile=True, has_touch=True)
    page = await new_page(context)  # noqa: F811
    try:
        await published_pod(client)
        await page.goto(server_url(client))  # signed out: the marketplace
        await expect(page.locator("#datapods li")).to_have_count(1)
        assert await page.evaluate(OVERFLOW) <= 0
        await sign_up(page, server_url(client))
        await until_live(page, "/chain", "chain:mining")
        await publish(client.app, "chain:mining", "reward_paid", {"detail": "x" * 400, "miner": "kvp1" + "f" * 40})
        await publish(client.app, "chain:blocks", "block_added", {"height": 1, "hash": "ab" * 32})
        for view in VIEWS:
            await page.get_by_role("tab", name=view).click()
            await expect(page.get_by_role("tabpanel", name=view)).to_be_visible()
            assert await page.evaluate(OVERFLOW) <= 0, view
            assert await page.evaluate(SMALL_TARGETS) == [], view
        await expect(page.locator("#mining li")).to_have_count(1)
        assert await page.evaluate(OVERFLOW) <= 0
        await page.get_by_role("tab", name="Marketplace").click()
        await page.locator("#datapods li a").first.click()
        await expect(page.locator("#datapod-view")).to_be_visible()
        assert await page.evaluate(OVERFLOW) <= 0
    finally:
        await no_csp_violations(page)
        await context.close()


async def test_tabs_follow_the_aria_pattern_and_every_view_has_an_address(client, fresh_context):
    page = await new_page(fresh_context)  # noqa: F811 - a context of its own: a second tab follows
    base_url = server_url(client)
    username = await sign_up(page, base_url)
    tablist = page.get_by_role("tablist", name="Views")
    assert [await tab.text_content() for tab in await tablist.get_by_role("tab").all()] == list(VIEWS)
    marketplace = page.get_by_role("tab", name="Marketplace")
    await expect(marketplace).to_have_attribute("aria-selected", "true")
    await expect(page.get_by_role("tabpanel", name="Marketplace")).to_be_visible()

    await marketplace.focus()
    await page.keyboard.press("ArrowRight")
    purchases = page.get_by_role("tab", name="Purchases")
    await expect(purchases).to_be_focused()
    await expect(purchases).to_have_attribute("aria-selected", "true")
    await expect(page.get_by_role("tabpanel", name="Purchases")).to_be_visible()
    assert page.url.endswith("#/purchases")
    await page.keyboard.press("End")
    await expect(page.get_by_role("tab", name=VIEWS[-1])).to_be_focused()
    await page.keyboard.press("ArrowRight")  # wraps around
    await expect(marketplace).to_be_focused()
    await page.keyboard.press("ArrowLeft")
    await expect(page.get_by_role("tab", name=VIEWS[-1])).to_have_attribute("aria-selected", "true")
    assert await page.locator('[role="tab"][tabindex="0"]').count() == 1  # one tab stop

    # A click is a history entry: back returns to the previous view.
    await page.get_by_role("tab", name="Explorer").click()
    await page.get_by_role("tab", name="Games").click()
    assert page.url.endswith("#/games")
    await page.go_back()
    await expect(page.get_by_role("tabpanel", name="Explorer")).to_be_visible()
    assert page.url.endswith("#/chain")

    # A reload stays on the view, signed in; so does a deep link in a new tab of the same browser.
    await page.reload()
    await expect(page.locator("#whoami")).to_have_text(username)
    await expect(page.get_by_role("tab", name="Explorer")).to_have_attribute("aria-selected", "true")
    await expect(page.get_by_role("tabpanel", name="Explorer")).to_be_visible()
    tab = await new_page(fresh_context)
    await tab.goto(f"{base_url}/#/assistant")
    await expect(tab.locator("#whoami")).to_have_text(username)
    await expect(tab.get_by_role("tabpanel", name="Assistant")).to_be_visible()

    # The status badge reads at WCAG AA (4.5:1) in each of its states.
    for state in ("connected", "reconnecting", "signed out"):
        colours = await page.evaluate("""(state) => {
            const badge = document.querySelector("#connection");
            badge.dataset.state = state;
            const style = getComputedStyle(badge);
            return [style.color, style.backgroundColor];
        }""", state)
        assert contrast(*colours) >= 4.5, (state, colours)


LIST_REQUEST = re.compile(r"/api/v1/datapods\?")


async def test_errors_clear_when_the_hub_is_back_and_an_outage_shows_a_banner(client, page):  # noqa: F811
    await sign_up(page, server_url(client))
    await until_live(page, "/marketplace", "market")
    await page.route(LIST_REQUEST, lambda route: route.abort())
    await page.get_by_role("button", name="Search").click()
    await expect(page.locator("#market-error")).to_contain_text("Could not load datapods")
    await page.unroute(LIST_REQUEST)

    await page.evaluate("window.hub.manager.engine.close()")
    await expect(page.locator("#offline-banner")).to_contain_text("Reconnected", timeout=10_000)
    await expect(page.locator("#market-error")).to_be_empty()
    await expect(page.locator("#offline-banner")).to_be_hidden(timeout=10_000)


async def test_anyone_browses_filters_and_sees_an_empty_state(client, page):  # noqa: F811
    from tests.test_marketplace import auth, upload

    seller, pod = await published_pod(client)
    other = await upload(client, seller, title="Bus timetables", category="transport", price_sui="12")
    assert (await client.post(f"/api/v1/datapods/{other['id']}/publish", headers=auth(seller))).status == 200
    base_url = server_url(client)
    await page.goto(f"{base_url}/#/chain")  # a private view's link, signed out: the marketplace, and why
    await expect(page.locator("#sign-in-notice")).to_have_text("Sign in to open Explorer.")
    cards = page.locator("#datapods li")
    await expect(cards).to_have_count(2)
    await expect(page.locator("#market-count")).to_have_text("2 DataPods")
    card = page.locator(f'#datapods [data-key="{pod["id"]}"]')
    await expect(card.locator(".price")).to_have_text("1.5 SUI")
    await expect(card).to_contain_text(f"by {seller['user']['username']}")
    await expect(card).to_contain_text("No ratings yet")
    await expect(card.locator("time")).to_be_visible()
    await expect(card.get_by_role("button", name=re.compile("^Buy"))).to_have_count(0)  # signed out: no wallet
    assert await page.evaluate("window.hub.sockets.size") == 0

    search = page.locator("#market-search")
    await expect(search.locator("[name=category] option")).to_have_text(
        ["All categories", "climate (1)", "transport (1)"])
    await search.locator("[name=category]").select_option("transport")
    await expect(cards).to_have_count(1)
    await expect(cards.first).to_contain_text("Bus timetables")
    await expect(page.locator("#market-count")).to_have_text("1 DataPod")
    await search.locator("[name=category]").select_option("")
    await search.locator("[name=sort]").select_option("price:desc")
    await expect(cards.first).to_contain_text("Bus timetables")
    await search.locator("[name=max_price]").fill("5")
    await search.get_by_role("button", name="Search").click()
    await expect(cards).to_have_count(1)
    await expect(cards.first).to_contain_text("City weather")

    await search.locator("[name=q]").fill("zzzz nothing like this")
    await search.get_by_role("button", name="Search").click()
    await expect(page.locator("#market-empty")).to_be_visible()
    await expect(page.locator("#market-count")).to_have_text("No DataPods found.")
    await page.get_by_role("button", name="Clear the filters").click()
    await expect(cards).to_have_count(2)
    await expect(page.locator("#market-empty")).to_be_hidden()

    # A DataPod page, signed out, by its address.
    await card.get_by_role("link", name="City weather").click()
    assert page.url.endswith(f"#/datapods/{pod['id']}")
    await expect(page.get_by_role("heading", name="City weather", level=2)).to_be_visible()
    await expect(page.locator("#datapod-price")).to_have_text("1.5 SUI")
    await page.go_back()
    await expect(page.locator("#market-list")).to_be_visible()
