"""The Assistant view (static/views/assistant.js) in a real Chromium against the real server.

Most tests answer with a scripted OpenAI-compatible model (tests/llm_server.py): it streams exactly
the markdown a test needs (a table, code, an injection attempt), slowly when Stop must be caught,
with the usage that the day's token count shows. The conversation tests use the retrieval-only
assistant (no model configured), where the model controls must not show.
"""

from __future__ import annotations

import json
import re

import pytest
from playwright.async_api import expect

from server.app import create_app
from server.core.crypto import MASTER_KEY
from server.services.demo import load_if_empty
from tests.helpers import server_url
from tests.test_assistant import scripted
from tests.test_browser import (  # noqa: F401 - fixtures
    _screenshot_on_failure,
    browser,
    no_csp_violations,
    published_pod,
    sign_up,
    until_live,
    watch_csp,
)
from tests.test_browser_app import OVERFLOW, SMALL_TARGETS
from tests.test_browser_views import axe_violations

DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
USAGE = {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45}


@pytest.fixture
async def desktop(request, browser):  # noqa: F811 - the fixture imported above
    """A 1440x900 page that may use the clipboard and download files; no CSP violation allowed."""
    context = await browser.new_context(viewport=DESKTOP, accept_downloads=True,
                                        permissions=["clipboard-read", "clipboard-write"])
    page = await context.new_page()
    await watch_csp(page)
    yield page
    await _screenshot_on_failure(request, page, request.node.name)
    await no_csp_violations(page)
    await context.close()


@pytest.fixture
async def phone(request, browser):  # noqa: F811
    """A 390x844 touch page (a phone)."""
    context = await browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = await context.new_page()
    await watch_csp(page)
    yield page
    await _screenshot_on_failure(request, page, request.node.name)
    await no_csp_violations(page)
    await context.close()


async def model_client(aiohttp_client, settings, script: list[dict]):
    """The app answering from a scripted model; the model and the test server to close."""
    model, server = await scripted(script)
    client = await aiohttp_client(create_app(settings.replace(
        openai_base_url=str(server.make_url("/v1")), ai_model="scripted", ai_max_tool_rounds=0)))
    return client, model, server


async def ask(page, text: str) -> None:
    """Type a question and send it with Enter; wait until its answer is finished."""
    answers = page.locator("#messages .message.assistant")
    before = await answers.count()
    box = page.locator("#chat-input")
    await box.fill(text)
    await box.press("Enter")
    # The new answer, not the last one before it (already finished): only then is .last this answer.
    await expect(answers).to_have_count(before + 1)
    await expect(answers.last).to_have_attribute("data-status", re.compile("complete|stopped|failed"), timeout=15_000)


def conversation_in_address(page) -> str:
    match = re.search(r"#/assistant/([0-9a-f-]{36})$", page.url)
    assert match, page.url
    return match.group(1)


# --- an answer: markdown, safety, actions --------------------------------------------------------------

async def test_answers_render_markdown_safely_with_usage_copy_feedback_and_datapod_links(
        aiohttp_client, settings, db, desktop):
    client, model, server = await model_client(aiohttp_client, settings, [{"text": []}])
    try:
        _, pod = await published_pod(client)
        markdown = (
            "### Weather data\n\n"
            f"**{pod['title']}** [datapod:{pod['id']}] fits; see also [datapod:{pod['id']}].\n\n"
            "| city | rain |\n|---|---|\n| Oslo | 12 |\n| Lima | 0 |\n\n"
            "```python\nprint('hello')\n```\n\n"
            "Read [the docs](https://example.org/docs).\n\n"
            "<img src=x onerror=\"window.pwned = 'img'\"><script>window.pwned = 'script'</script>"
            "<a href=\"javascript:window.pwned = 'href'\">click</a> ![tracker](https://example.org/t.png)"
            "<p style=\"color: red\" onclick=\"window.pwned = 'click'\">styled</p>")
        model.script = [{"text": [markdown[i:i + 40] for i in range(0, len(markdown), 40)], "usage": USAGE}]
        base_url = server_url(client)
        await sign_up(desktop, base_url)
        await desktop.get_by_role("tab", name="Assistant").click()
        usage = desktop.locator("#assistant-usage")
        await expect(usage).to_contain_text("Today: 0 tokens")
        await expect(desktop.get_by_text("Model and system prompt")).to_be_visible()  # a model is configured

        # Shift+Enter is a new line; Enter sends. Send is disabled while the box is empty.
        box = desktop.locator("#chat-input")
        send = desktop.locator("#chat-form button[type=submit]")
        await expect(send).to_be_disabled()
        await box.fill("Any weather data? <img src=x onerror=\"window.pwned = 'user'\">")
        await expect(send).to_be_enabled()
        await box.press("Shift+Enter")
        await box.type("Rain, please.")
        await expect(desktop.locator("#messages .message")).to_have_count(0)
        assert "\n" in await box.input_value()
        await box.press("Enter")
        await expect(box).to_have_value("")
        answer = desktop.locator("#messages .message.assistant").last
        await expect(answer).to_have_attribute("data-status", "complete", timeout=15_000)
        conversation_id = conversation_in_address(desktop)

        # Rendered markdown: heading, table, code; nothing of the injection runs or loads.
        text = answer.locator(".text")
        await expect(text.locator("h3")).to_have_text("Weather data")
        await expect(text.locator("table tbody tr")).to_have_count(2)
        await expect(text.locator("pre code")).to_have_text("print('hello')")
        assert await desktop.evaluate("window.pwned") is None
        assert await desktop.locator("#messages img, #messages script, #messages [onerror], "
                                     "#messages [onclick], #messages [style]").count() == 0
        assert await text.locator("a[href^='javascript']").count() == 0
        await expect(text).to_contain_text("<script>window.pwned = 'script'</script>")  # raw HTML shows as text
        external = text.get_by_role("link", name="the docs")
        assert await external.get_attribute("target") == "_blank"
        assert await external.get_attribute("rel") == "noopener noreferrer"
        await expect(text.get_by_role("link", name="tracker")).to_have_attribute("rel", "noopener noreferrer")
        user = desktop.locator("#messages .message.user")
        typed = "Any weather data? <img src=x onerror=\"window.pwned = 'user'\">\nRain, please."
        await expect(user.locator(".text")).to_have_text(typed)  # shown as typed, as text
        # Who said it and when; screen readers hear the finished answer once.
        await expect(user.locator(".speaker")).to_have_text("You")
        await expect(answer.locator(".speaker")).to_have_text("Assistant")
        assert await answer.locator("time").get_attribute("datetime")
        await expect(desktop.locator("#assistant-live")).to_contain_text("Assistant: Weather data")
        assert await desktop.locator("#assistant-live").get_attribute("aria-live") == "polite"
        # Today's tokens follow the answer (usage_changed).
        await expect(usage).to_contain_text("Today: 45 tokens")
        await expect(usage).to_contain_text("199,955")

        # Copy puts the answer's markdown on the clipboard.
        await answer.get_by_role("button", name="Copy answer").click()
        await expect(answer.get_by_role("button", name="Copy answer")).to_have_text("Copied")
        assert await desktop.evaluate("navigator.clipboard.readText()") == markdown

        # Feedback: a thumb, then an optional comment.
        down = answer.get_by_role("button", name="Bad answer")
        await down.click()
        await expect(down).to_have_attribute("aria-pressed", "true")
        await answer.get_by_label("What was wrong? (optional)").fill("No units.")
        await answer.get_by_role("button", name="Send comment").click()
        await expect(answer.get_by_text("Thanks for the feedback.")).to_be_visible()
        row = await db.fetchrow("SELECT rating, comment FROM ai_message_feedback")
        assert (row["rating"], row["comment"]) == ("down", "No units.")
        await desktop.reload()  # the rating is the server's: it stays shown
        await expect(answer.get_by_role("button", name="Bad answer")).to_have_attribute("aria-pressed", "true")
        await expect(answer.get_by_role("button", name="Good answer")).to_have_attribute("aria-pressed", "false")

        # A DataPod reference is a link to its page.
        link = text.get_by_role("link", name=pod["title"]).first
        assert await link.get_attribute("href") == f"#/datapods/{pod['id']}"
        assert await link.get_attribute("target") is None
        await expect(text.locator(f"a[href='#/datapods/{pod['id']}']")).to_have_count(2)
        await link.click()
        await expect(desktop.locator("#datapod-view")).to_be_visible()
        await expect(desktop.locator("#datapod-title")).to_have_text(pod["title"])
        assert desktop.url.endswith(f"#/datapods/{pod['id']}")
        await desktop.go_back()
        await expect(desktop.locator("#chat-title")).to_be_visible()
        assert conversation_in_address(desktop) == conversation_id
    finally:
        await server.close()


async def test_settings_stop_regenerate_edit_and_branches(aiohttp_client, settings, db, desktop):
    slow = {"text": [f"word{n} " for n in range(60)], "delay": 0.1, "usage": USAGE}
    client, model, server = await model_client(aiohttp_client, settings, [slow])
    try:
        await sign_up(desktop, server_url(client))
        await desktop.get_by_role("tab", name="Assistant").click()
        stop = desktop.get_by_role("button", name="Stop")
        await expect(desktop.locator("#chat-input")).to_be_visible()
        await expect(stop).to_be_hidden()

        # With a model: its choice and a system prompt, given before the conversation exists.
        await desktop.get_by_text("Model and system prompt").click()
        form = desktop.locator(".settings form")
        await expect(form.get_by_label("Model")).to_have_value("")
        await expect(form.get_by_label("Model").locator("option")).to_have_text(["Default (scripted)"])
        assert await form.get_by_label("System prompt").get_attribute("maxlength") == "2000"
        await form.get_by_label("System prompt").fill("Answer in French.")
        await form.get_by_role("button", name="Save settings").click()
        await expect(form).to_contain_text("the new conversation starts with these settings")

        # Stop shows only while an answer streams, and keeps what was written.
        await desktop.locator("#chat-input").fill("Tell me a long story.")
        await desktop.locator("#chat-input").press("Enter")
        answer = desktop.locator("#messages .message.assistant").last
        await expect(answer.locator(".text")).to_contain_text("word2", timeout=10_000)
        await expect(stop).to_be_visible()
        await expect(desktop.locator("#chat-form button[type=submit]")).to_be_hidden()
        await stop.click()
        await expect(answer).to_have_attribute("data-status", "stopped", timeout=10_000)
        await expect(stop).to_be_hidden()
        await expect(answer.locator(".badge")).to_have_text("Stopped")
        first_text = await answer.locator(".text").evaluate("node => node.markdownSource")
        assert "word59" not in first_text
        conversation_id = conversation_in_address(desktop)
        saved = "SELECT system_prompt FROM ai_conversations WHERE id = $1::uuid"
        assert await db.fetchval(saved, conversation_id) == "Answer in French."
        systems = [m["content"] for m in model.requests[-1]["messages"] if m["role"] == "system"]
        assert systems[-1].endswith("\n\nAnswer in French.")  # after the platform's own

        # Regenerate: a second version of the answer, with a switcher between the two.
        model.script = [{"text": ["A second ", "version."], "usage": USAGE}]
        await answer.get_by_role("button", name="Regenerate").click()
        await expect(answer.locator(".text")).to_have_text("A second version.", timeout=10_000)
        await expect(answer).to_have_attribute("data-status", "complete")
        await expect(answer.locator(".branch-position")).to_have_text("2/2")
        await answer.get_by_role("button", name="Previous version").click()
        await expect(answer.locator(".branch-position")).to_have_text("1/2")
        await expect(answer).to_have_attribute("data-status", "stopped")
        assert await answer.locator(".text").evaluate("node => node.markdownSource") == first_text

        # Edit the question: a new branch with its own answer; the old question is one click away.
        model.script = [{"text": ["Edited ", "answer."], "usage": USAGE}]
        question = desktop.locator("#messages .message.user")
        await question.get_by_role("button", name="Edit").click()
        editor = question.get_by_label("Edit your message")
        await expect(editor).to_be_focused()
        await editor.fill("Tell me a short story.")
        await editor.press("Enter")
        await expect(question.locator(".text")).to_have_text("Tell me a short story.")
        await expect(answer.locator(".text")).to_have_text("Edited answer.", timeout=10_000)
        await expect(question.locator(".branch-position")).to_have_text("2/2")
        await expect(answer.locator(".branches")).to_have_count(0)  # the new question's only answer
        asked = [m["content"] for m in model.requests[-1]["messages"] if m["role"] == "user"]
        assert asked == ["Tell me a short story."]
        await question.get_by_role("button", name="Previous version").click()
        await expect(question.locator(".text")).to_have_text("Tell me a long story.")
        await expect(question.locator(".branch-position")).to_have_text("1/2")
        # switch_branch shows the newest branch through the old question: its regenerated answer.
        await expect(answer.locator(".text")).to_have_text("A second version.")
        await expect(answer.locator(".branch-position")).to_have_text("2/2")
        await desktop.reload()  # the branch switched to is the conversation's current one
        await expect(desktop.locator("#messages .message.user .text")).to_have_text("Tell me a long story.")
        await expect(desktop.locator("#messages .message.user .branch-position")).to_have_text("1/2")

        # The open conversation's system prompt changes on the server.
        await desktop.get_by_text("Model and system prompt").click()
        await expect(form.get_by_label("System prompt")).to_have_value("Answer in French.")
        await form.get_by_label("System prompt").fill("Answer in German.")
        await form.get_by_role("button", name="Save settings").click()
        await expect(form).to_contain_text("Saved.")
        assert await db.fetchval(saved, conversation_id) == "Answer in German."
    finally:
        await server.close()


# --- conversations: list, address, rename, search, export, share, delete ---------------------------------

async def test_conversations_rename_search_export_share_delete_and_deep_links(client, desktop, tmp_path):
    base_url = server_url(client)
    await sign_up(desktop, base_url)
    await desktop.get_by_role("tab", name="Assistant").click()
    await expect(desktop.get_by_text("No conversations yet.")).to_be_visible()
    # Retrieval-only: the model controls are not offered.
    await expect(desktop.locator("#chat-help")).to_contain_text("Retrieval-only")
    await expect(desktop.get_by_text("Model and system prompt")).to_have_count(0)

    await ask(desktop, "Any glacier melt data?")
    first = conversation_in_address(desktop)
    await desktop.get_by_role("button", name="New conversation").click()
    await expect(desktop.locator("#messages .message")).to_have_count(0)
    assert desktop.url.endswith("#/assistant/new")
    await ask(desktop, "Which categories are there?")
    second = conversation_in_address(desktop)
    assert second != first
    items = desktop.locator("#conversations li")
    await expect(items).to_have_count(2)
    await expect(items.first).to_have_attribute("data-key", second)  # the newest first
    await expect(items.first.locator("a")).to_have_attribute("aria-current", "page")

    # Links, back and reload keep the conversation in the address.
    await items.nth(1).locator("a").click()
    await expect(desktop.locator("#messages .message.user")).to_contain_text("glacier")
    assert conversation_in_address(desktop) == first
    await desktop.go_back()
    await expect(desktop.locator("#messages .message.user")).to_contain_text("categories")
    await desktop.reload()
    await expect(desktop.locator("#messages .message.user")).to_contain_text("categories")
    assert conversation_in_address(desktop) == second
    await desktop.goto(f"{base_url}/#/assistant/{first}")  # a deep link, in a freshly loaded page
    await desktop.reload()
    await expect(desktop.locator("#messages .message.user")).to_contain_text("glacier")
    await desktop.get_by_role("tab", name="Marketplace").click()
    await desktop.get_by_role("tab", name="Assistant").click()  # a bare #/assistant: the last one again
    await expect(desktop.locator("#messages .message.user")).to_contain_text("glacier")
    # Waited for: the messages stayed on the page while the tab was away, and the route puts the
    # conversation back in the address a moment after the tab shows.
    await expect(desktop).to_have_url(f"{base_url}/#/assistant/{first}")

    # Rename through a dialog.
    await desktop.locator(".toolbar").get_by_role("button", name="Rename").click()
    dialog = desktop.get_by_role("dialog", name="Rename the conversation")
    await dialog.get_by_label("Title").fill("Ice sheets")
    await dialog.get_by_role("button", name="Rename").click()
    await expect(dialog).to_be_hidden()
    await expect(desktop.locator("#chat-title")).to_have_text("Ice sheets")
    await expect(desktop.locator(f"#conversations li[data-key='{first}']")).to_contain_text("Ice sheets")

    # Search (full text over titles and messages, every branch); a hit opens its conversation.
    await desktop.locator(f"#conversations li[data-key='{second}'] a").click()
    await expect(desktop.locator("#messages .message.user")).to_contain_text("categories")
    await desktop.get_by_label("Search conversations").fill("glacier")
    hits = desktop.locator("#search-results li")
    await expect(hits).to_have_count(1)
    await expect(hits).to_contain_text("Ice sheets")
    await expect(hits.locator("mark").first).to_have_text(re.compile("glacier", re.I))
    await hits.locator("a").click()
    await expect(desktop.locator("#messages .message.user")).to_contain_text("glacier")
    await expect(desktop).to_have_url(f"{base_url}/#/assistant/{first}")
    await desktop.get_by_label("Search conversations").fill("nothingmatchesthis")
    await expect(desktop.get_by_text("No conversation matches.")).to_be_visible()
    await desktop.get_by_label("Search conversations").fill("")
    await expect(desktop.locator("#conversations li")).to_have_count(2)

    # Export as Markdown and as JSON: files with the conversation in them.
    async with desktop.expect_download() as info:
        await desktop.get_by_role("button", name="Export Markdown").click()
    exported = tmp_path / "conversation.md"
    await (await info.value).save_as(exported)
    assert (await info.value).suggested_filename.endswith(".md")
    text = exported.read_text()
    assert "# Ice sheets" in text and "## You" in text and "Any glacier melt data?" in text and "## Assistant" in text
    async with desktop.expect_download() as info:
        await desktop.get_by_role("button", name="Export JSON").click()
    exported = tmp_path / "conversation.json"
    await (await info.value).save_as(exported)
    document = json.loads(exported.read_text())
    assert document["conversation"]["id"] == first
    assert [m["role"] for m in document["messages"]] == ["user", "assistant"]

    # A share link that opens without signing in, until it is revoked.
    await desktop.get_by_role("button", name="Share").click()
    dialog = desktop.get_by_role("dialog", name="Share a read-only link")
    await dialog.get_by_role("button", name="Create link").click()
    link = await dialog.get_by_label("Link").input_value()
    response = await client.get(link.removeprefix(base_url))
    assert response.status == 200
    assert (await response.json())["data"]["messages"][0]["content"] == "Any glacier melt data?"
    await dialog.get_by_role("button", name="Revoke link").click()
    await expect(dialog).to_contain_text("Link revoked")
    assert (await client.get(link.removeprefix(base_url))).status == 404
    await dialog.get_by_role("button", name="Close").click()
    await expect(dialog).to_be_hidden()

    # Delete asks first; cancelling keeps it.
    await desktop.locator(".toolbar").get_by_role("button", name="Delete").click()
    dialog = desktop.get_by_role("dialog", name="Delete the conversation?")
    await expect(dialog).to_contain_text("cannot be undone")
    await dialog.get_by_role("button", name="Cancel").click()
    await expect(desktop.locator("#conversations li")).to_have_count(2)
    await desktop.locator(".toolbar").get_by_role("button", name="Delete").click()
    await dialog.get_by_role("button", name="Delete").click()
    await expect(desktop.locator("#conversations li")).to_have_count(1)
    await expect(desktop.locator("#chat-title")).to_have_text("New conversation")
    assert desktop.url.endswith("#/assistant/new")
    await desktop.goto(f"{base_url}/#/assistant/{first}")  # the deleted one's address
    await desktop.reload()
    await expect(desktop.locator("#assistant-error")).to_have_text("That conversation does not exist, or is not yours.")
    await ask(desktop, "Hello")
    await expect(desktop.locator("#assistant-error")).to_be_empty()  # the next success clears it


# --- phone size ----------------------------------------------------------------------------------------

async def test_phone_journey_without_sideways_scroll(aiohttp_client, settings, phone):
    wide = ("| " + " | ".join(f"column{n}" for n in range(14)) + " |\n|" + "---|" * 14 + "\n| "
            + " | ".join(f"value{n}" for n in range(14)) + " |\n\n```\n" + "x = " + "1234567890" * 20 + "\n```\n\n"
            + "https://example.org/" + "a" * 150)
    client, model, server = await model_client(aiohttp_client, settings, [{"text": [wide], "usage": USAGE}])
    try:
        await sign_up(phone, server_url(client))
        await phone.get_by_role("tab", name="Assistant").click()
        toggle = phone.get_by_role("button", name=re.compile("^Conversations"))
        await expect(toggle).to_be_visible()
        await expect(toggle).to_have_attribute("aria-expanded", "false")
        await expect(phone.get_by_label("Search conversations")).to_be_hidden()  # folded: the chat has the width
        box = phone.locator("#chat-input")
        await box.fill("A wide table, please")
        await box.press("Enter")  # a touch keyboard's Enter is a new line
        await expect(phone.locator("#messages .message")).to_have_count(0)
        await phone.get_by_role("button", name="Send").click()
        answer = phone.locator("#messages .message.assistant")
        await expect(answer).to_have_attribute("data-status", "complete", timeout=15_000)
        chat = await phone.locator("#tab-assistant .chat").bounding_box()
        assert chat["width"] > PHONE["width"] - 40
        assert await phone.evaluate(OVERFLOW) <= 0
        # The table and the code scroll inside their own boxes.
        for selector in (".text table", ".text pre"):
            assert await answer.locator(selector).evaluate("n => n.scrollWidth > n.clientWidth"), selector
        assert await phone.evaluate(SMALL_TARGETS) == []

        await toggle.click()
        await expect(toggle).to_have_attribute("aria-expanded", "true")
        await expect(phone.locator("#conversations li")).to_have_count(1)
        await phone.get_by_role("button", name="New conversation").click()
        await expect(phone.get_by_label("Search conversations")).to_be_hidden()
        await toggle.click()
        await phone.locator("#conversations li a").click()
        await expect(phone.locator("#messages .message.user")).to_contain_text("A wide table")
        await expect(phone.get_by_label("Search conversations")).to_be_hidden()
        assert await phone.evaluate(SMALL_TARGETS) == []

        await phone.set_viewport_size({"width": 360, "height": 740})
        assert await phone.evaluate(OVERFLOW) <= 0
        await phone.locator("#messages .message.user").get_by_role("button", name="Edit").click()
        assert await phone.evaluate(OVERFLOW) <= 0
        await phone.keyboard.press("Escape")
        actions = phone.get_by_role("button", name="Actions")  # the conversation's actions fold away too
        await expect(phone.get_by_role("button", name="Share")).to_be_hidden()
        await actions.click()
        await expect(actions).to_have_attribute("aria-expanded", "true")
        await phone.get_by_role("button", name="Share").click()
        assert await phone.evaluate(OVERFLOW) <= 0
        await phone.get_by_role("dialog", name="Share a read-only link").get_by_role("button", name="Close").click()
    finally:
        await server.close()



# --- accessibility --------------------------------------------------------------------------------------

async def test_a_conversation_with_tables_cards_and_dialogs_passes_an_axe_scan(client, db, settings, browser):  # noqa: F811
    assert await load_if_empty(db, settings, client.app[MASTER_KEY]) is True  # the demo DataPods to answer from
    # axe is injected as an inline script, which the page's CSP refuses: only this scan's context bypasses it.
    context = await browser.new_context(bypass_csp=True, viewport=DESKTOP)
    page = await context.new_page()
    try:
        await sign_up(page, server_url(client))
        await page.get_by_role("tab", name="Assistant").click()
        found = {"empty": await axe_violations(page)}
        await ask(page, "Compare the two cheapest")
        await ask(page, "The cheapest datapods")
        answer = page.locator("#messages .message.assistant").last
        await expect(answer.locator(".text table")).to_be_visible()
        await expect(answer.locator(".text a[href^='#/datapods/']").first).to_be_visible()
        cards = answer.locator(".pods")
        await cards.locator("summary").click()  # the answer's DataPods as the marketplace's cards
        await expect(cards.locator(".cards li").first).to_be_visible()
        count = await cards.locator(".cards li").count()
        await answer.get_by_role("button", name="Good answer").click()
        found["answers"] = await axe_violations(page)
        await page.reload()  # the cards come back from the answer's saved tool calls
        await page.locator("#messages .message.assistant .pods summary").last.click()
        await expect(page.locator("#messages .message.assistant").last.locator(".cards li")).to_have_count(count)
        await page.get_by_label("Search conversations").fill("cheapest")
        await expect(page.locator("#search-results li")).to_have_count(1)
        found["search"] = await axe_violations(page)
        await page.locator(".toolbar").get_by_role("button", name="Delete").click()
        found["dialog"] = await axe_violations(page)
        await page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
        await page.set_viewport_size(PHONE)
        found["phone"] = await axe_violations(page)
        assert {name: violations for name, violations in found.items() if violations} == {}
    finally:
        await context.close()
