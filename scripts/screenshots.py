"""Screenshots of every view at desktop and phone size, for docs/screenshots/ and the README.

Run against a server with the demo data (`make run` in another terminal):

    .venv/bin/python scripts/screenshots.py --url http://127.0.0.1:8080

It signs in as alice (demo-password) in Debian's Chromium and writes docs/screenshots/<view>-<size>.png.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from playwright.async_api import async_playwright, expect

OUT = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
SIZES = {"desktop": (1440, 900), "phone": (390, 844)}
# tab name, file name
VIEWS = [("Marketplace", "marketplace"), ("Purchases", "purchases"), ("Seller studio", "studio"),
         ("Assistant", "assistant"), ("Explorer", "explorer"), ("Games", "games"), ("DAO", "dao"), ("NFTs", "nfts"),
         ("KYC", "kyc"), ("Account", "account")]


async def capture(url: str, user: str, password: str) -> list[Path]:
    """Sign in once per size and photograph each view, the DataPod page and the signed-out page."""
    written = []
    OUT.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        for size, (width, height) in SIZES.items():
            page = await browser.new_page(viewport={"width": width, "height": height})
            await page.goto(url)
            await expect(page.locator("#datapods li").first).to_be_visible()
            written.append(await shoot(page, f"signed-out-{size}"))
            await page.locator("#datapods li a").first.click()
            await expect(page.locator("#datapod-sample tbody tr").first).to_be_visible()
            written.append(await shoot(page, f"datapod-{size}"))
            await page.goto(f"{url}/#/marketplace")
            form = page.locator("#login-form")
            await form.locator("[name=login]").fill(user)
            await form.locator("[name=password]").fill(password)
            await form.get_by_role("button", name="Sign in").click()
            await expect(page.locator("#whoami")).to_have_text(user)
            for tab, name in VIEWS:
                await page.get_by_role("tab", name=tab).click()
                if name == "assistant":  # a conversation rather than the empty start
                    await page.get_by_role("button", name="Which DataPods are the cheapest?").click()
                    await page.keyboard.press("Enter")
                    await page.wait_for_timeout(4000)
                await page.wait_for_load_state("networkidle")
                await page.wait_for_timeout(500)  # live feeds and charts settle
                written.append(await shoot(page, f"{name}-{size}"))
            await page.close()
        await browser.close()
    return written


async def shoot(page, name: str) -> Path:
    """One full-page PNG under docs/screenshots/."""
    path = OUT / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


def main() -> None:
    """Parse the arguments and write the screenshots."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--password", default="demo-password")
    args = parser.parse_args()
    for path in asyncio.run(capture(args.url.rstrip("/"), args.user, args.password)):
        print(path.relative_to(OUT.parent.parent))


if __name__ == "__main__":
    main()
