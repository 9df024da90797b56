"""The Explorer view (#/chain) in a real Chromium against the real server: the first paint from REST
(blocks, the chart, transactions, mining rewards, halving, burns), live blocks, block -> transaction ->
address pages with the server's figures, search, deep links and reload, and the phone layout. Also
the two REST lists the first paint reads (the chain's latest transactions and mining rewards)."""

from __future__ import annotations

import re
import uuid
from decimal import Decimal

import pytest
from playwright.async_api import expect

from db import explorer as queries
from db import users as user_queries
from server.services.chain import seal_block
from tests.helpers import register, server_url, wait_until
from tests.test_browser import browser, no_csp_violations, sign_up, until_live, watch_csp  # noqa: F401 - fixtures
from tests.test_browser_app import OVERFLOW, SMALL_TARGETS
from tests.test_explorer import _plan, call, chain, get, walk  # noqa: F401 - `chain` is a fixture

# The chart's canvas (when the page shows it) ends inside the window: it follows the screen's width.
CHART_FITS = ("(document.querySelector('#tab-chain .chart-box canvas')?.getBoundingClientRect().right ?? 0)"
              " <= window.innerWidth")


def kvp(amount: str) -> str:
    """An amount as the page shows it (formatAmount: no trailing zeros)."""
    text = f"{Decimal(amount):f}"
    return (text.rstrip("0").rstrip(".") if "." in text else text) + " KVP"


@pytest.fixture
async def desktop(browser):  # noqa: F811 - the fixture imported above
    context = await browser.new_context(viewport={"width": 1440, "height": 900})
    page = await context.new_page()
    await watch_csp(page)
    yield page
    await no_csp_violations(page)
    await context.close()


@pytest.fixture
async def phone(browser):  # noqa: F811
    context = await browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = await context.new_page()
    await watch_csp(page)
    yield page
    await no_csp_violations(page)
    await context.close()


async def open_explorer(page, base_url: str) -> None:
    await sign_up(page, base_url)
    await page.get_by_role("tab", name="Explorer").click()
    await expect(page.get_by_role("tabpanel", name="Explorer")).to_be_visible()


# --- the REST lists of the first paint ----------------------------------------------------------

async def test_the_chains_latest_transactions_and_rewards_page_newest_first(client, db, chain):  # noqa: F811
    sealed, pending, miner = chain["sealed"], chain["pending"], chain["miner"]
    for limit in (1, 2, 100):
        items = await walk(client, "/api/v1/chain/transactions", "before", limit)
        assert [(tx["hash"], tx["status"]) for tx in items] == [(pending, "pending")] + [
            (tx, "confirmed") for tx in reversed(sealed)], limit
        rewards = await walk(client, "/api/v1/chain/mining-rewards", "before", limit)
        assert [(r["height"], r["miner"], r["user_id"], r["amount"]) for r in rewards] == [
            (2, miner.address, str(miner.id), "50.00000000"), (1, miner.address, str(miner.id), "50.00000000")]
    first = await get(client, "/api/v1/chain/transactions", limit=1)
    assert first["items"][0] == await get(client, f"/api/v1/transactions/{pending}")
    for path in ("/api/v1/chain/transactions", "/api/v1/chain/mining-rewards"):
        for query in ({"limit": "0"}, {"limit": "101"}, {"before": "0"}, {"before": "2147483648"}):
            status, body = await call(client, "GET", path, params=query)
            assert (status, body["error"]["code"], body["error"]["field"]) == (400, "invalid_payload",
                                                                               next(iter(query))), (path, query)
    await db.execute("ANALYZE")
    for sql, index in ((queries.LATEST_TRANSACTIONS, "transactions_pkey"),
                       (queries.LATEST_MINING_REWARDS, "mining_rewards_pkey")):
        plan = await _plan(db, sql, queries.MAX_INTEGER_KEY, 21)
        assert "Seq Scan" not in plan and "Sort" not in plan and index in plan, plan


# --- the page -------------------------------------------------------------------------------------

async def test_first_paint_live_blocks_and_block_tx_address_pages(client, db, chain, desktop):  # noqa: F811
    page = desktop
    base_url = server_url(client)
    alice, bob, miner = chain["alice"], chain["bob"], chain["miner"]
    await open_explorer(page, base_url)

    # The first paint has the chain as it is, before any new block: blocks, chart, transactions, rewards.
    blocks = page.locator("#blocks li")
    await expect(blocks).to_have_count(2)
    await expect(blocks.first).to_have_attribute("data-key", "2")
    await expect(page.locator('#blocks [data-key="1"]')).to_contain_text("4 transactions")
    await expect(page.locator('#blocks [data-key="1"]')).to_contain_text("reward 50 KVP")
    chart = page.get_by_role("group", name="Block times and transactions per block")
    await expect(chart).to_have_attribute("data-points", "2")
    await expect(chart).to_have_attribute("data-gaps", "1")
    await expect(chart.locator("canvas")).to_have_count(1)
    await expect(page.get_by_role("img", name=re.compile("seconds between blocks"))).to_be_visible()
    await expect(page.locator("#chain-chart-summary")).to_contain_text(
        re.compile(r"Average \d+\.\d s between the last 1 block .*2\.0 transactions per block"))
    transactions = page.locator("#transactions li")
    await expect(transactions).to_have_count(5)
    await expect(transactions.first).to_have_attribute("data-key", chain["pending"])
    await expect(transactions.first).to_contain_text("0.5 KVP")
    await expect(transactions.first).to_contain_text("pending")
    await expect(page.locator(f'#transactions [data-key="{chain["sealed"][1]}"]')).to_contain_text(
        "confirmed in #1")
    mining = page.locator("#mining li")
    await expect(mining).to_have_count(2)
    await expect(mining.first).to_have_text(re.compile(r"kvp1\w+…\w+ earned 50 KVP for block #2 · Node"))
    assert "{" not in await page.locator("#mining").inner_text()  # readable text, not JSON
    halving = await get(client, "/api/v1/chain/halving")
    await expect(page.locator("#chain-halving tbody tr").first).to_contain_text("1–999")
    await expect(page.locator("#chain-halving tr.current")).to_contain_text(kvp(halving["current_reward"]))
    await expect(page.locator("#tab-chain .stats")).to_contain_text(f"block #{halving['next_halving_height']}")
    await expect(page.locator("#chain-burn-totals")).to_have_text("No block has been burned: 0 blocks, 0 KVP.")

    # The pending transfer's page follows it into the next block, live.
    for channel in ("chain:blocks", "chain:transactions", "chain:mining"):
        await until_live(page, "/chain", channel)
    await transactions.first.locator(".main a").click()
    await expect(page.locator(".tx-status")).to_have_text("Pending: waiting for the next block to confirm it.")
    await seal_block(db, chain["config"])
    await expect(page.locator(".tx-status")).to_have_text("Confirmed in block #3.", timeout=10_000)
    await page.go_back()
    await expect(blocks.first).to_have_attribute("data-key", "3")
    await expect(transactions.first).to_contain_text("confirmed in #3")

    # A new block arrives live, in the list and on the chart.
    await seal_block(db, chain["config"])
    await expect(blocks.first).to_have_attribute("data-key", "4", timeout=10_000)
    await expect(chart).to_have_attribute("data-points", "4")
    await expect(mining.first).to_contain_text("for block #4", timeout=10_000)

    # Burning blocks updates the totals live.
    admin = await register(client)
    await user_queries.upsert_admin(db, uuid.UUID(admin["user"]["id"]), username=admin["user"]["username"],
                                    email=admin["user"]["email"], password_hash="x")
    status, body = await call(client, "POST", "/api/v1/admin/blocks/burn", admin["token"],
                              json={"miner_id": str(miner.id)})
    assert status == 200, body
    burns = await get(client, "/api/v1/chain/burns")
    await expect(page.locator("#chain-burn-totals")).to_contain_text(
        f"4 blocks burned, with {kvp(burns['burned_rewards'])} of mining rewards", timeout=10_000)

    # Block -> its transactions -> an address, with the server's figures.
    await page.locator('#blocks [data-key="1"]').get_by_role("link", name="#1", exact=True).click()
    assert page.url.endswith("#/chain/block/1")
    block = await get(client, "/api/v1/chain/blocks/1")
    await expect(page.get_by_role("heading", name="Block #1", level=2)).to_be_focused()
    await expect(page.locator(".block-facts code.full")).to_have_text(block["hash"])
    await expect(page.locator("#block-tx-count")).to_have_text(str(block["tx_count"]))
    await expect(page.locator("#block-reward")).to_have_text(kvp(block["reward"]))
    await expect(page.locator("#block-transactions li")).to_have_count(4)
    await expect(page.locator("#block-rewards li")).to_contain_text("earned 50 KVP")
    await expect(page.get_by_role("link", name="Block #2 →")).to_be_visible()

    second_tx = await get(client, f"/api/v1/transactions/{chain['sealed'][1]}")
    await page.locator(f'#block-transactions [data-key="{second_tx["hash"]}"]').get_by_role(
        "link", name=re.compile("…")).first.click()
    assert page.url.endswith(f"#/chain/tx/{second_tx['hash']}")
    await expect(page.locator(".tx-facts code.full").first).to_have_text(second_tx["hash"])
    await expect(page.locator("#tx-amount")).to_have_text(kvp(second_tx["amount"]))   # 2.5 KVP
    await expect(page.locator("#tx-sender")).to_contain_text(alice.address)
    await expect(page.locator("#tx-receiver")).to_contain_text(bob.address)
    await expect(page.locator(".tx-status")).to_have_text("Confirmed in block #1.")

    await page.locator("#tx-sender").get_by_role("link", name=alice.address).click()
    assert page.url.endswith(f"#/chain/address/{alice.address}")
    summary = await get(client, f"/api/v1/chain/addresses/{alice.address}")
    await expect(page.locator("#address-balance")).to_have_text(kvp(summary["balance"]))       # 7.5 KVP
    await expect(page.locator("#address-available")).to_have_text(kvp(summary["available"]))   # 7 KVP
    await expect(page.locator("#address-pending")).to_have_text(kvp(summary["pending_outgoing"]))
    history = await get(client, f"/api/v1/chain/addresses/{alice.address}/transactions")
    rows = page.locator("#address-transactions li")
    await expect(rows).to_have_count(len(history["items"]))
    await expect(rows.first).to_have_attribute("data-key", history["items"][0]["hash"])
    ledger = await get(client, f"/api/v1/chain/addresses/{alice.address}/ledger")
    await expect(page.locator("#address-ledger li")).to_have_count(len(ledger["items"]))
    await expect(page.locator("#address-ledger")).to_contain_text("Demo faucet")
    await expect(page.locator("#address-rewards")).to_contain_text("This address has earned no mining rewards.")

    # Back returns through the pages; the miner's page pages its rewards ("older").
    await page.go_back()
    await expect(page.get_by_role("heading", name="Transaction", level=2)).to_be_visible()
    await page.go_back()
    await expect(page.get_by_role("heading", name="Block #1", level=2)).to_be_visible()
    await page.goto(f"{base_url}/#/chain/address/{miner.address}")
    await expect(page.locator("#address-reward-totals")).to_have_text("4 rewards, 200 KVP in all.")
    await expect(page.locator("#address-rewards li")).to_have_count(4)


async def test_search_lands_on_the_right_page_and_says_nothing_found(client, db, chain, desktop):  # noqa: F811
    page = desktop
    base_url = server_url(client)
    await db.execute("UPDATE reward_pools SET total_tokens = 10000 WHERE pool_name = 'mining'")
    for _ in range(20):  # blocks 3 to 22: the miner has more rewards than a page holds
        await seal_block(db, chain["config"])
    await open_explorer(page, base_url)
    search = page.get_by_role("search", name="Search the chain")
    box = search.get_by_role("searchbox")

    async def find(query: str) -> None:
        await box.fill(query)
        await box.press("Enter")

    await find("2")
    await expect(page.get_by_role("heading", name="Block #2", level=2)).to_be_visible()
    assert page.url.endswith("#/chain/block/2")
    await find(chain["first"].hash.upper())
    await expect(page.get_by_role("heading", name="Block #1", level=2)).to_be_visible()
    await find(chain["pending"])
    await expect(page.get_by_role("heading", name="Transaction", level=2)).to_be_visible()
    assert page.url.endswith(f"#/chain/tx/{chain['pending']}")
    await expect(page.locator(".tx-status")).to_have_text("Confirmed in block #3.")   # pending until block 3
    await find(f" {chain['bob'].address} ")
    await expect(page.locator("#address-balance")).to_be_visible()
    assert page.url.endswith(f"#/chain/address/{chain['bob'].address}")

    for unknown in ("999", "f" * 64, "hello"):
        await find(unknown)
        await expect(page.locator("#chain-search-result")).to_contain_text(f"Nothing found for “{unknown}”")
        assert page.url.endswith(f"#/chain/address/{chain['bob'].address}")  # it stays where it was
    await find("1")
    await expect(page.get_by_role("heading", name="Block #1", level=2)).to_be_visible()
    await expect(page.locator("#chain-search-result")).to_be_empty()

    # A deep link opens its page, a reload keeps it, and an unknown one says so.
    await page.goto(f"{base_url}/#/chain/tx/{chain['sealed'][0]}")
    await expect(page.locator("#tx-amount")).to_have_text("1 KVP")
    await page.reload()
    await expect(page.get_by_role("tab", name="Explorer")).to_have_attribute("aria-selected", "true")
    await expect(page.locator("#tx-amount")).to_have_text("1 KVP")
    await page.goto(f"{base_url}/#/chain/block/42")
    await expect(page.get_by_role("heading", name="Block not found", level=2)).to_be_visible()
    await expect(page.locator("#tab-chain .nothing")).to_contain_text("Nothing found")

    # An address's lists page back ("older") without repeating a row.
    await page.goto(f"{base_url}/#/chain/address/{chain['miner'].address}")
    await expect(page.locator("#address-reward-totals")).to_have_text("22 rewards, 1100 KVP in all.")
    rewards = page.locator("#address-rewards li")
    await expect(rewards).to_have_count(20)
    await expect(rewards.first).to_contain_text("50 KVP for block #22")
    await page.get_by_role("button", name="Older rewards").click()
    await expect(rewards).to_have_count(22)
    await expect(rewards.last).to_contain_text("for block #1")
    await expect(page.get_by_role("button", name="Older rewards")).to_have_count(0)


async def test_phone_journey_without_sideways_scroll(client, chain, phone):  # noqa: F811
    page = phone
    base_url = server_url(client)
    alice = chain["alice"]
    await open_explorer(page, base_url)
    await expect(page.locator("#blocks li")).to_have_count(2)

    async def fits(where: str) -> None:
        assert await page.evaluate(OVERFLOW) <= 0, where
        assert await page.evaluate(SMALL_TARGETS) == [], where
        assert await page.evaluate(CHART_FITS), where

    await fits("overview")
    await page.locator('#blocks [data-key="1"]').get_by_role("link", name="#1", exact=True).click()
    await expect(page.locator("#block-transactions li")).to_have_count(4)
    await fits("block")
    await page.locator("#block-transactions li").first.get_by_role("link").first.click()
    await expect(page.locator("#tx-amount")).to_have_text("1 KVP")
    await fits("transaction")
    await page.locator("#tx-sender a").click()
    await expect(page.locator("#address-ledger li").first).to_be_visible()
    await fits("address")
    assert page.url.endswith(f"#/chain/address/{alice.address}")

    # At 360 px wide nothing scrolls sideways either, and the chart shrinks with the screen.
    await page.set_viewport_size({"width": 360, "height": 740})
    await fits("address at 360")
    await page.get_by_role("link", name="Explorer", exact=True).click()
    await expect(page.locator("#blocks li")).to_have_count(2)
    await wait_until(lambda: page.evaluate(CHART_FITS), timeout=10, interval=0.05)  # no in-page eval (CSP)
    await fits("overview at 360")
    await page.goto(f"{base_url}/#/chain/tx/{chain['sealed'][2]}")
    await expect(page.locator("#tx-amount")).to_have_text("3 KVP")
    await fits("transaction at 360")
