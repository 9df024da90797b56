"""The NFTs view (#/nfts) in a real Chromium against the real server: mint and list from the page,
another user buys from a fresh browser while the seller's page follows live, cancel, deep links,
the refusals, and the phone layout."""

from __future__ import annotations

import json

import pytest
from playwright.async_api import expect

from tests.helpers import server_url
from tests.test_browser import browser, sign_up  # noqa: F401 - fixtures
from tests.test_browser_app import OVERFLOW, SMALL_TARGETS
from tests.test_browser_dao import PHONE, SMALL_LINKS, contexts, until_live  # noqa: F401 - a fixture
from tests.test_chain import account, call


async def mint_in_page(tab, name: str, *, description: str = "", image: str = "", attributes=()) -> None:
    form = tab.locator("#nft-mint-form")
    if not await form.is_visible():
        await tab.get_by_text("Mint an NFT").click()
    await form.get_by_label("Name", exact=True).fill(name)
    await form.get_by_label("Description (optional)").fill(description)
    await form.get_by_label("Image address (optional)").fill(image)
    for index, (trait, value) in enumerate(attributes, start=1):
        if index > 1:
            await form.get_by_role("button", name="Add an attribute").click()
        await form.get_by_label(f"Attribute {index} name").fill(trait)
        await form.get_by_label(f"Attribute {index} value").fill(value)
    await form.get_by_role("button", name="Mint").click()
    await expect(tab.locator("#tab-nfts .nft-notice")).to_have_text(f"Minted “{name}”: it is in your NFTs.")


def card(tab, name: str, where: str = "#nft-mine"):
    return tab.locator(f"{where} .nft-card").filter(has=tab.get_by_role("link", name=name, exact=True))


async def list_in_page(tab, name: str, price: str) -> None:
    mine = card(tab, name)
    await mine.get_by_label(f"Price in KVP for {name}").fill(price)
    await mine.get_by_role("button", name="List for sale").click()


async def test_mint_list_buy_elsewhere_and_cancel_with_live_updates(client, db, contexts):  # noqa: F811
    base_url = server_url(client)
    seller = await contexts()
    await sign_up(seller, base_url)
    await seller.get_by_role("tab", name="NFTs").click()
    await expect(seller.locator("#tab-nfts")).to_contain_text("You own no NFTs yet.")
    await expect(seller.locator("#tab-nfts")).to_contain_text("No one else has an NFT for sale right now.")

    # Minting: the page checks the fields, then makes and registers the wallet and mints.
    form = seller.locator("#nft-mint-form")
    await expect(form).to_be_visible()  # opened for a first NFT
    await form.get_by_label("Image address (optional)").fill("javascript:alert(1)")
    await form.get_by_role("button", name="Mint").click()
    await expect(form.get_by_role("alert")).to_contain_text("Nothing was minted")
    await expect(form.locator("#nft-error-name")).to_have_text("Give the NFT a name.")
    await expect(form.locator("#nft-error-image")).to_contain_text("http://, https:// or ipfs://")
    await mint_in_page(seller, "Golden Sword", description="Forged in block 7.", image="https://example.org/sword.png",
                       attributes=[("power", "9"), ("edge", "sharp")])
    await expect(form.locator("[role=alert]")).to_be_empty()
    stored = await db.fetchrow("SELECT nft_id, owner_wallet, metadata FROM nfts")
    metadata = json.loads(stored["metadata"]) if isinstance(stored["metadata"], str) else stored["metadata"]
    assert metadata == {"name": "Golden Sword", "description": "Forged in block 7.", "image": "https://example.org/sword.png",
                        "attributes": [{"trait_type": "power", "value": "9"}, {"trait_type": "edge", "value": "sharp"}]}
    sword_id = stored["nft_id"]
    await mint_in_page(seller, "Silver Shield")

    # Listing: a bad price is refused in the page, a good one lists it.
    await list_in_page(seller, "Golden Sword", "2.123456789")
    await expect(card(seller, "Golden Sword").get_by_role("alert")).to_contain_text("at most 8 decimals")
    await list_in_page(seller, "Golden Sword", "2.5")
    await expect(card(seller, "Golden Sword").locator(".nft-price")).to_have_text("For sale at 2.5 KVP")
    await expect(card(seller, "Golden Sword").locator("[role=alert]")).to_be_empty()
    await list_in_page(seller, "Silver Shield", "100")
    await expect(card(seller, "Silver Shield").locator(".nft-price")).to_have_text("For sale at 100 KVP")
    await until_live(seller, "/marketplace", "market:nfts")

    # A buyer in another browser: demo funds from the faucet, then Buy with a confirmation.
    buyer = await contexts()
    await sign_up(buyer, base_url)
    await buyer.get_by_role("tab", name="Purchases").click()
    await buyer.get_by_role("button", name="Get demo funds").click()
    await expect(buyer.locator("#wallet-message")).to_contain_text("Received")
    await buyer.goto(f"{base_url}/#/nfts")
    sale = buyer.locator("#nft-sale")
    await expect(sale.locator(".nft-card")).to_have_count(2)
    await expect(card(buyer, "Golden Sword", "#nft-sale")).to_contain_text("2.5 KVP")
    seller_address = stored["owner_wallet"]
    await expect(card(buyer, "Golden Sword", "#nft-sale").locator(".nft-meta")).to_contain_text(
        f"Seller {seller_address[:10]}…{seller_address[-4:]}")
    await until_live(buyer, "/marketplace", "market:nfts")

    await card(buyer, "Silver Shield", "#nft-sale").get_by_role("button", name="Buy Silver Shield for 100 KVP").click()
    await expect(card(buyer, "Silver Shield", "#nft-sale").get_by_role("alert")).to_contain_text(
        "Not enough KVP: this costs 100 KVP and you have 10 KVP available")

    await card(buyer, "Golden Sword", "#nft-sale").get_by_role("button", name="Buy Golden Sword for 2.5 KVP").click()
    dialog = buyer.get_by_role("dialog", name="Buy “Golden Sword”?")
    await expect(dialog).to_contain_text("You pay 2.5 KVP from your KVP balance (10 KVP available)")
    await dialog.get_by_role("button", name="Cancel").click()
    await expect(dialog).to_be_hidden()
    assert await db.fetchval("SELECT status FROM marketplace WHERE nft_id = $1", sword_id) == "Available"
    await card(buyer, "Golden Sword", "#nft-sale").get_by_role("button", name="Buy Golden Sword for 2.5 KVP").click()
    await dialog.get_by_role("button", name="Pay 2.5 KVP").click()
    await expect(buyer.locator("#tab-nfts .nft-notice")).to_have_text(
        "You bought “Golden Sword” for 2.5 KVP: it is in your NFTs.")
    await expect(card(buyer, "Golden Sword")).to_be_visible()
    await expect(card(buyer, "Golden Sword", "#nft-sale")).to_have_count(0)
    await expect(card(buyer, "Silver Shield", "#nft-sale").get_by_role("alert")).to_contain_text("Not enough KVP")
    await expect(buyer.locator(".nft-wallet")).to_contain_text("7.5 KVP available")
    assert await db.fetchval("SELECT status FROM marketplace WHERE nft_id = $1", sword_id) == "Sold"

    # The seller's page follows without a reload: the sword is gone, with a note of the sale.
    await expect(card(seller, "Golden Sword")).to_have_count(0, timeout=10_000)
    await expect(seller.locator("#tab-nfts .nft-notice")).to_have_text("Your NFT “Golden Sword” was sold for 2.5 KVP.")
    await expect(seller.locator(".nft-wallet")).to_contain_text("2.5 KVP available")

    # The seller withdraws the shield: it leaves the buyer's list live.
    await card(seller, "Silver Shield").get_by_role("button", name="Cancel the listing of Silver Shield").click()
    await expect(seller.locator("#tab-nfts .nft-notice")).to_have_text("“Silver Shield” is no longer for sale.")
    await expect(card(seller, "Silver Shield").get_by_role("button", name="List for sale")).to_be_visible()
    await expect(card(buyer, "Silver Shield", "#nft-sale")).to_have_count(0, timeout=10_000)
    await expect(buyer.locator("#tab-nfts")).to_contain_text("No one else has an NFT for sale right now.")

    # A deep link to the NFT survives a reload, and names the owner.
    await buyer.goto(f"{base_url}/#/nfts/{sword_id}")
    await buyer.reload()
    detail = buyer.locator(".nft-detail")
    await expect(detail.get_by_role("heading", name="Golden Sword")).to_be_visible()
    await expect(detail.locator(".nft-owner")).to_have_text("you")
    await expect(detail).to_contain_text("power")
    await expect(detail.get_by_role("link", name="Image (opens another site)")).to_have_attribute(
        "href", "https://example.org/sword.png")
    await expect(buyer.get_by_role("tab", name="NFTs")).to_have_attribute("aria-selected", "true")
    await seller.goto(f"{base_url}/#/nfts/{sword_id}")
    await expect(seller.locator(".nft-detail .nft-status")).to_have_text("Not for sale")
    buyer_wallet = await db.fetchval("SELECT owner_wallet FROM nfts WHERE nft_id = $1", sword_id)
    assert buyer_wallet != seller_address
    await expect(seller.locator(".nft-detail .nft-owner")).to_have_text(f"{buyer_wallet[:10]}…{buyer_wallet[-4:]}")


@pytest.mark.parametrize("width", [360, 390])
async def test_the_nfts_view_fits_a_phone(client, contexts, width):  # noqa: F811
    base_url = server_url(client)
    other = await account(client)
    long_name = "A very long NFT name that wraps " * 3
    status, body = await call(client, "POST", "/api/v1/nfts", other.token, json={"metadata": {
        "name": long_name.strip()[:100], "description": "kvp1" + "ab" * 80}})
    assert status == 201, body
    status, body = await call(client, "POST", "/api/v1/nft-listings", other.token, json={"nft_id": body["data"]["id"],
                                                                                         "price": "12345.12345678"})
    assert status == 201, body
    phone = await contexts({"width": width, "height": PHONE["height"]}, is_mobile=True, has_touch=True)
    await sign_up(phone, base_url)
    await phone.get_by_role("tab", name="NFTs").click()
    await expect(phone.locator("#nft-sale .nft-card")).to_have_count(1)
    await expect(phone.locator("#nft-mint-form")).to_be_visible()
    assert await phone.evaluate(OVERFLOW) <= 0
    assert await phone.evaluate(SMALL_TARGETS) == []
    await mint_in_page(phone, "Pocket Knife", attributes=[("blade", "short")])
    await expect(card(phone, "Pocket Knife")).to_be_visible()
    await phone.locator("#nft-sale .nft-card button.nft-buy").click()
    await expect(phone.locator("#nft-sale .nft-card").get_by_role("alert")).to_contain_text("Not enough KVP")
    assert await phone.evaluate(OVERFLOW) <= 0
    assert await phone.evaluate(SMALL_TARGETS) == []
    assert await phone.evaluate(SMALL_LINKS, "#tab-nfts") == []
    await card(phone, "Pocket Knife").get_by_role("link", name="Pocket Knife").click()
    await expect(phone.locator(".nft-detail").get_by_role("heading", name="Pocket Knife")).to_be_focused()
    assert await phone.evaluate(OVERFLOW) <= 0
    assert await phone.evaluate(SMALL_TARGETS) == []
    assert await phone.evaluate(SMALL_LINKS, "#tab-nfts") == []
