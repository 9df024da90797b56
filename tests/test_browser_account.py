"""The Account view in a real Chromium against the real server: profile, password, devices (revoke
one, sign out everywhere), the wallet pointer, deleting the account, and Google sign-in when configured."""

from __future__ import annotations

import re
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.async_api import expect

from tests.helpers import register, server_url
from tests.test_auth import AUDIENCE, google_client, google_key, google_token, jwks_url  # noqa: F401 - fixtures
from tests.test_browser import browser, no_csp_violations, sign_up, watch_csp  # noqa: F401 - fixtures
from tests.test_browser_app import OVERFLOW, SMALL_TARGETS, sign_in

SIZES = {"desktop": {"width": 1440, "height": 900}, "phone": {"width": 390, "height": 844}}
PASSWORD = "correct horse battery"
SIGNED_OUT = "You were signed out: this session was ended. Sign in again."


@pytest.fixture
async def device(request, browser):  # noqa: F811 - the fixture imported above
    """A factory of pages, each in a browser context of its own (another device), at the test's size;
    each is watched for CSP reports and console 404s."""
    callspec = getattr(request.node, "callspec", None)
    size = callspec.params.get("size", "desktop") if callspec else "desktop"
    contexts = []

    async def make():
        context = await browser.new_context(viewport=SIZES[size], is_mobile=size == "phone", has_touch=size == "phone")
        contexts.append(context)
        page = await context.new_page()
        await watch_csp(page)
        page.not_found = []
        page.on("console", lambda message: page.not_found.append(message.text) if "404" in message.text else None)
        return page

    yield make
    for context in contexts:
        for page in context.pages:
            await no_csp_violations(page)
            assert page.not_found == []
        await context.close()


async def fits_a_phone(page) -> None:
    """At 360 px wide: no sideways scroll, and every control a 44 px target."""
    await page.set_viewport_size({"width": 360, "height": 740})
    assert await page.evaluate(OVERFLOW) <= 0
    assert await page.evaluate(SMALL_TARGETS) == []


@pytest.mark.parametrize("size", ["desktop", "phone"])
async def test_profile_password_devices_and_sign_out_everywhere(client, device, size):
    base_url = server_url(client)
    page = await device()
    username = await sign_up(page, base_url)
    await page.get_by_role("tab", name="Account").click()
    panel = page.get_by_role("tabpanel", name="Account")
    await expect(panel.get_by_role("heading", name="Your account")).to_be_visible()
    await expect(panel.locator("#account-email")).to_have_text(f"{username}@example.org")

    # The profile: a taken username is refused and said so; the fix saves, and the error goes.
    taken = await register(client)
    profile = panel.locator("#account-profile")
    await profile.get_by_label("Username").fill(taken["user"]["username"])
    await profile.get_by_role("button", name="Save the profile").click()
    await expect(panel.locator("#account-profile-error")).to_have_text("This username is taken: choose another.")
    renamed = f"r{uuid.uuid4().hex[:9]}"
    await profile.get_by_label("Username").fill(renamed)
    await profile.get_by_label("Display name").fill("Gina Tester")
    await profile.get_by_label("About you").fill("I play and I sell weather data.")
    await profile.get_by_role("button", name="Save the profile").click()
    await expect(panel.get_by_role("status").filter(has_text="Profile saved.")).to_be_visible()
    await expect(panel.locator("#account-profile-error")).to_be_empty()
    await expect(page.locator("#whoami")).to_have_text(renamed)
    token = await page.evaluate("localStorage.getItem('hub.token')")
    me = (await (await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})).json())["data"]
    assert (me["username"], me["name"], me["bio"]) == (renamed, "Gina Tester", "I play and I sell weather data.")
    await page.reload()  # the address stays, and the form shows what was saved
    await expect(panel.locator("#account-profile").get_by_label("Display name")).to_have_value("Gina Tester")

    # The password (at desktop size; the phone run keeps to the rest): a wrong current one is refused;
    # the change works, and the new one signs in.
    password = PASSWORD
    if size == "desktop":
        password = "a new long password"
        form = panel.locator("#account-password")
        await form.get_by_label("Current password").fill("not my password")
        await form.get_by_label("New password (8 to 128 characters)").fill("a new long password")
        await form.get_by_label("New password again").fill("a new long password")
        await form.get_by_role("button", name="Change the password").click()
        await expect(panel.locator("#account-password-error")).to_have_text("The current password is wrong.")
        await form.get_by_label("Current password").fill(PASSWORD)
        await form.get_by_label("New password (8 to 128 characters)").fill("a new long password")
        await form.get_by_label("New password again").fill("a new long password")
        await form.get_by_role("button", name="Change the password").click()
        await expect(panel.get_by_role("status").filter(has_text="Password changed.")).to_be_visible()
        await expect(panel.locator("#account-password-error")).to_be_empty()
        await page.locator("#sign-out").click()
        await expect(page.locator("#login-form")).to_be_visible()
        await sign_in(page, base_url, renamed, "a new long password", "#/account")
        await expect(page.get_by_role("tabpanel", name="Account")).to_be_visible()  # back where the link said

    # Two devices: each sees both, "this device" marked; one signs the other out, which notices at once.
    other = await device()
    await sign_in(other, base_url, renamed, password, "#/games")
    await panel.get_by_role("button", name="Refresh the list").click()
    sessions = panel.locator("#account-sessions li")
    await expect(sessions).to_have_count(2)
    this_device = sessions.filter(has=page.locator(".this-device"))
    await expect(this_device).to_have_count(1)
    await expect(this_device.locator(".this-device")).to_have_text("This device")
    await expect(this_device).to_have_class("current")
    await expect(this_device.get_by_role("button")).to_have_text("Sign out here")
    await expect(sessions.first).to_contain_text("Chrome on Linux")
    if size == "phone":
        await fits_a_phone(page)
    await panel.get_by_role("button", name=re.compile(r"^Sign out Chrome on Linux, last active ")).click()
    # (On a private view's address the notice adds "Sign in to open Games." to the reason;
    # data-reason holds the reason alone.)
    await expect(other.locator("#sign-in-notice")).to_have_attribute("data-reason", SIGNED_OUT, timeout=10_000)
    await expect(other.locator("#login-form")).to_be_visible()
    await expect(sessions).to_have_count(1)
    await expect(panel).to_contain_text("No other device is signed in.")
    await expect(panel.get_by_role("status").filter(has_text="is signed out.")).to_be_visible()

    # The wallet backup lives in Purchases.
    await panel.get_by_role("link", name="Back up or restore the wallet (Purchases)").click()
    await expect(page.get_by_role("tabpanel", name="Purchases")).to_be_visible()
    await page.go_back()
    await expect(panel).to_be_visible()

    # Sign out everywhere: asked first (Cancel keeps everything), then both devices sign out.
    await sign_in(other, base_url, renamed, password, "#/account")
    await panel.get_by_role("button", name="Refresh the list").click()
    await expect(sessions).to_have_count(2)
    await panel.get_by_role("button", name="Sign out everywhere").click()
    dialog = page.get_by_role("dialog", name="Sign out everywhere?")
    await expect(dialog).to_contain_text("(1 other)")
    if size == "phone":
        assert await page.evaluate(OVERFLOW) <= 0
    await dialog.get_by_role("button", name="Cancel").click()
    await expect(dialog).to_be_hidden()
    await expect(sessions).to_have_count(2)
    tokens = [await tab.evaluate("localStorage.getItem('hub.token')") for tab in (page, other)]
    await panel.get_by_role("button", name="Sign out everywhere").click()
    await dialog.get_by_role("button", name="Sign out everywhere").click()
    await expect(page.locator("#login-form")).to_be_visible()
    await expect(other.locator("#sign-in-notice")).to_have_attribute("data-reason", SIGNED_OUT, timeout=10_000)
    await expect(other.locator("#login-form")).to_be_visible()
    for token in tokens:
        response = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert response.status == 401


async def test_deleting_the_account_asks_for_the_password(client, device):
    base_url = server_url(client)
    page = await device()
    username = await sign_up(page, base_url)
    await page.goto(f"{base_url}/#/account")
    panel = page.get_by_role("tabpanel", name="Account")
    await panel.get_by_role("button", name="Delete my account…").click()
    dialog = page.get_by_role("dialog", name="Delete your account for good?")
    await expect(dialog).to_be_visible()
    await dialog.get_by_label("Your password, to confirm").fill("not my password")
    await dialog.get_by_role("button", name="Delete my account").click()
    await expect(dialog.get_by_role("alert")).to_have_text("The password is wrong: nothing was deleted.")
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()
    await expect(page.locator("#whoami")).to_have_text(username)
    await panel.get_by_role("button", name="Delete my account…").click()
    await expect(dialog.locator("#account-delete-error")).to_be_empty()  # a new attempt starts clean
    await expect(dialog.get_by_label("Your password, to confirm")).to_have_value("")
    await dialog.get_by_label("Your password, to confirm").fill(PASSWORD)
    await dialog.get_by_role("button", name="Delete my account").click()
    await expect(page.locator("#sign-in-notice")).to_have_text(
        "Your account has been deleted, and every device it was signed in on signed out.")
    response = await client.post("/api/v1/auth/login", json={"login": username, "password": PASSWORD})
    assert response.status == 401


async def test_google_sign_in_is_offered_only_when_configured(client, device):
    assert (await (await client.get("/api/v1/auth/google")).json())["data"] == {"configured": False, "client_id": None}
    page = await device()
    await page.goto(server_url(client))
    await expect(page.get_by_text("Forgot your password?")).to_be_visible()  # the view has rendered its part
    await expect(page.locator("#google-sign-in")).to_have_count(0)

    # The password reset by mail is on the sign-in form too.
    await page.get_by_text("Forgot your password?").click()
    await page.get_by_label("Your account's email").fill("nobody@example.org")
    await page.get_by_role("button", name="Mail me a reset link").click()
    sent = page.get_by_role("status").filter(has_text="a link to set a new password is on its way")
    await expect(sent).to_be_visible()


async def test_google_sign_in_posts_googles_answer_and_signs_in(google_client, google_key, device):  # noqa: F811
    base_url = server_url(google_client)
    config = (await (await google_client.get("/api/v1/auth/google")).json())["data"]
    assert config == {"configured": True, "client_id": AUDIENCE}
    page = await device()
    asked = []

    async def google(route):
        """Google's authorization endpoint, played here: it answers with an ID token for the nonce asked."""
        query = {name: values[0] for name, values in parse_qs(urlsplit(route.request.url).query).items()}
        asked.append(query)
        token = google_token(google_key, nonce=query["nonce"], sub="5550001", email="gina.g@example.org", name="Gina G")
        back = f"{query['redirect_uri']}#id_token={token}&state={query['state']}"
        await route.fulfill(status=302, headers={"Location": back})

    await page.route("https://accounts.google.com/**", google)
    posted = []
    page.on("request", lambda request: posted.append(request.url) if request.url.endswith("/api/v1/auth/google")
            and request.method == "POST" else None)
    await page.goto(f"{base_url}/#/account")
    button = page.get_by_role("button", name="Sign in with Google")
    await expect(button).to_be_visible()
    await button.click()
    await expect(page.locator("#whoami")).not_to_be_empty()
    assert posted == [f"{base_url}/api/v1/auth/google"]
    assert asked[0]["client_id"] == AUDIENCE and asked[0]["redirect_uri"] == f"{base_url}/"
    assert asked[0]["response_type"] == "id_token" and asked[0]["scope"] == "openid email profile"
    assert page.url == f"{base_url}/#/account"  # the token is gone from the address; back where it started
    panel = page.get_by_role("tabpanel", name="Account")
    await expect(panel.locator("#account-email")).to_have_text("gina.g@example.org")

    # An answer this tab did not ask for (no matching state) signs nobody in.
    await page.locator("#sign-out").click()
    await expect(page.get_by_role("button", name="Sign in with Google")).to_be_visible()
    forged = google_token(google_key, nonce="forged", sub="5550002", email="eve@example.org")
    await page.goto(f"{base_url}/#id_token={forged}&state=forged")
    await page.reload()  # a fresh load with the answer in the address, as when Google sends the browser back
    await expect(page.locator("#google-sign-in-error")).to_have_text(
        "This Google answer was not asked for by this tab. Try again.")
    await expect(page.locator("#login-form")).to_be_visible()
    assert len(posted) == 1
