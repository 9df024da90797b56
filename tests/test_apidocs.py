"""The API documents: OpenAPI 3.1 and AsyncAPI 3.0 built from the live app cover every route and
command, with the schemas validation uses, and the docs page is served without inline script."""

from __future__ import annotations

import re

import pytest
from jsonschema import Draft202012Validator

import handlers
from handlers import apidocs as apidocs_handlers
from server.edge.apidocs import SOCKETIO_PATH, namespace_commands
from server.edge.rest import endpoint_spec

HTTP_METHODS = {"GET", "PUT", "POST", "PATCH", "DELETE"}


def with_apidocs(app):
    """The app with the API document routes (until server/app.py registers them itself)."""
    if not any(route.resource is not None and route.resource.canonical == "/api/v1/openapi.json"
               for route in app.router.routes()):
        app.router.add_routes(apidocs_handlers.routes)
    return app


@pytest.fixture
async def docs_client(settings, aiohttp_client):
    """A real app on a real socket, serving the API documents."""
    from server.app import create_app

    return await aiohttp_client(with_apidocs(create_app(settings)))


async def fetch_json(client, path: str) -> dict:
    response = await client.get(path)
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


def resolve(document: dict, ref: str):
    """A local JSON pointer of the document."""
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def all_refs(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in all_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in all_refs(v)]
    return []


async def test_openapi_covers_every_route_with_its_declared_schemas(docs_client):
    doc = await fetch_json(docs_client, "/api/v1/openapi.json")
    assert doc["openapi"].startswith("3.1")
    routes = [route for route in docs_client.app.router.routes()
              if route.method in HTTP_METHODS and not route.resource.canonical.startswith(SOCKETIO_PATH)]
    assert len(routes) > 100
    described = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    expected = {(route.method, route.resource.canonical) for route in routes}
    assert described == expected
    operation_ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))
    for route in routes:
        operation = doc["paths"][route.resource.canonical][route.method.lower()]
        spec = endpoint_spec(route.handler)
        # Every path parameter of the template is described, and a declared one with its schema.
        names = re.findall(r"\{(\w+)\}", route.resource.canonical)
        path_params = {p["name"]: p for p in operation["parameters"] if p["in"] == "path"}
        assert sorted(path_params) == sorted(names), route.resource.canonical
        if spec is None:
            continue
        assert operation.get("security") == ([{"bearer": []}] if spec.auth else None), route.resource.canonical
        for name, schema in (spec.path or {}).items():
            assert path_params[name]["schema"] == schema
        if spec.body is not None:
            assert operation["requestBody"]["content"]["application/json"]["schema"] == spec.body
        for name, schema in ((spec.query or {}).get("properties") or {}).items():
            assert {"name": name, "in": "query", "required": name in (spec.query.get("required") or ()),
                    "schema": schema} in operation["parameters"]
    for ref in all_refs(doc):
        resolve(doc, ref)


async def test_every_route_with_an_id_in_its_path_declares_the_id(docs_client):
    """Fuzzers generate from these declarations: an undeclared id would be fuzzed as any string."""
    doc = await fetch_json(docs_client, "/api/v1/openapi.json")
    undeclared = sorted(
        f"{method.upper()} {path} {param['name']}"
        for path, ops in doc["paths"].items() for method, op in ops.items() for param in op["parameters"]
        if param["in"] == "path" and param["schema"] == {"type": "string", "minLength": 1}
        and path != "/{path}")  # the static files: any path
    assert undeclared == []


async def test_openapi_describes_queries_bodies_and_uploads(docs_client):
    doc = await fetch_json(docs_client, "/api/v1/openapi.json")
    blocks = doc["paths"]["/api/v1/blocks"]["get"]
    before = next(p for p in blocks["parameters"] if p["name"] == "before_height")
    assert before["schema"]["maximum"] == 2**31 - 1 and before["required"] is False
    events = doc["paths"]["/api/v1/events"]["get"]
    assert next(p for p in events["parameters"] if p["name"] == "channel")["required"] is True
    upload = doc["paths"]["/api/v1/datapods"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"file", "title", "category", "price_sui"} <= set(upload["required"])
    # A body whose schema accepts nothing (an absent body) is optional.
    assert doc["paths"]["/api/v1/conversations"]["post"]["requestBody"]["required"] is False
    assert doc["paths"]["/api/v1/auth/login"]["post"]["requestBody"]["required"] is True
    rewards = doc["paths"]["/api/v1/game-sessions/{session_id}/rewards"]["post"]
    assert set(rewards["requestBody"]["content"]["application/json"]["schema"]["required"]) == {
        "seq", "reward_type", "value"}
    assert doc["paths"]["/api/v1/admin/stats"]["get"]["security"] == [{"bearer": []}]
    for path, ops in doc["paths"].items():
        for op in ops.values():
            for param in op["parameters"]:
                Draft202012Validator.check_schema(param["schema"])


async def test_asyncapi_covers_every_command_with_its_schema_and_events(docs_client):
    doc = await fetch_json(docs_client, "/api/v1/asyncapi.json")
    assert doc["asyncapi"] == "3.0.0"
    by_address = {channel["address"]: (key, channel) for key, channel in doc["channels"].items()}
    assert set(by_address) == {namespace.name for namespace in handlers.NAMESPACES}
    receive = {(resolve(doc, op["channel"]["$ref"])["address"], resolve(doc, op["messages"][0]["$ref"])["name"])
               for op in doc["operations"].values() if op["action"] == "receive"}
    expected = set()
    for namespace in handlers.NAMESPACES:
        key, channel = by_address[namespace.name]
        for attr in dir(namespace):
            spec = getattr(getattr(namespace, attr), "__hub_command__", None)
            if attr.startswith("on_") and spec is not None:
                event = attr[3:]
                expected.add((namespace.name, event))
                message = channel["messages"][event]
                assert message["payload"] == spec.validator.schema
                assert message["x-sign-in-required"] == spec.user_required
        sent = {message["name"] for message in channel["messages"].values()
                if message["payload"] == {"$ref": "#/components/schemas/Event"}}
        assert set(namespace.events) <= sent and "history_gap" in sent
        assert channel["x-subscribable-channels"] == [rule.pattern for rule in namespace.channels]
    assert receive == expected
    assert len(expected) == sum(len(namespace_commands(ns)) for ns in handlers.NAMESPACES) > 30
    assert ("/chain", "blocks_since") in receive and ("/purchases", "start_purchase") in receive
    for operation in doc["operations"].values():
        if operation["action"] == "receive":
            assert resolve(doc, operation["reply"]["messages"][0]["$ref"])["payload"] == {
                "$ref": "#/components/schemas/Ack"}
    for ref in all_refs(doc):
        resolve(doc, ref)


async def test_docs_page_is_served_without_inline_script(docs_client):
    page = await docs_client.get("/api/v1/docs")
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all('src="/' in attrs and body.strip() == "" for attrs, body in scripts)
    assert " style=" not in html and "<style" not in html and "http" not in html.replace("/api/v1/", "")
    script = await docs_client.get("/apidocs.js")
    assert script.status == 200 and "javascript" in script.content_type
    source = await script.text()
    assert "/api/v1/openapi.json" in source and "/api/v1/asyncapi.json" in source
    assert "innerHTML" not in source and "eval(" not in source


async def test_docs_page_renders_both_documents_in_chromium_under_the_page_policy(settings, aiohttp_client):
    from playwright.async_api import async_playwright, expect

    from server.app import create_app
    from server.edge.security_headers import security_headers
    from tests.test_browser import CHROMIUM

    app = with_apidocs(create_app(settings))
    if security_headers not in app.middlewares:
        app.middlewares.append(security_headers)  # until server/app.py installs it
    client = await aiohttp_client(app)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            refused: list[str] = []
            page.on("console", lambda message: refused.append(message.text)
                    if "Content Security Policy" in message.text else None)
            response = await page.goto(str(client.make_url("/api/v1/docs")))
            assert "script-src 'self'" in response.headers["content-security-policy"]
            await expect(page.locator("#docs-status")).to_contain_text("namespaces", timeout=10_000)
            assert await page.locator("#rest-operations article").count() > 100
            await expect(page.locator("#socketio-namespaces")).to_contain_text("blocks_since")
            await expect(page.locator("#rest-operations")).to_contain_text("/api/v1/blocks/{height}")
            assert refused == []
        finally:
            await browser.close()
