"""The API documents, built from the declarations validation already uses: OpenAPI 3.1 for the REST
routes (`endpoint(...)` metadata, server/edge/rest.py) and AsyncAPI 3.0 for the Socket.IO
namespaces (`@command(...)` schemas, the namespaces' channel rules and declared events)."""

from __future__ import annotations

import inspect
import re
from typing import Any, Iterable

from aiohttp import web

from server.core.errors import ErrorCode
from server.edge.namespace import CommandSpec, HubNamespace
from server.edge.rest import EndpointSpec, endpoint_spec
from server.edge.schemas import compile_schema
from server.realtime.fanout import SEND_QUEUE_OVERFLOWED_EVENT
from server.realtime.hub import (
    HISTORY_GAP_EVENT,
    PRESENCE_CHANGED_EVENT,
    SERVER_SHUTDOWN_EVENT,
    SIGNED_OUT_EVENT,
    TOKEN_EXPIRING_EVENT,
)

API_TITLE = "SourceNet Hub"
API_VERSION = "1"
# Routes the documents leave out: python-engineio's transport endpoint is the Socket.IO server,
# described by the AsyncAPI document, not a REST operation.
SOCKETIO_PATH = "/socket.io"
METHODS = ("get", "put", "post", "patch", "delete")
_PATH_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "enum": [code.value for code in ErrorCode]},
        "message": {"type": "string"},
        "field": {"type": "string"},
        "retry_after": {"type": "number"},
    },
    "required": ["code", "message"],
}
OK_ENVELOPE = {"type": "object", "properties": {"ok": {"const": True}, "data": {}}, "required": ["ok", "data"]}
ERROR_ENVELOPE = {"type": "object",
                  "properties": {"ok": {"const": False}, "error": {"$ref": "#/components/schemas/Error"}},
                  "required": ["ok", "error"]}
# A live event as every namespace delivers it (server/realtime/history.py Event.to_wire).
EVENT_WIRE = {
    "type": "object",
    "properties": {"id": {"type": ["string", "null"]}, "channel": {"type": "string"}, "type": {"type": "string"},
                   "data": {"type": "object"}, "ts": {"type": "number"}, "offset": {"type": ["integer", "null"]},
                   "epoch": {"type": ["string", "null"]}},
    "required": ["channel", "type", "data"],
}
# Events every namespace may deliver, whatever its domain: live notices of the delivery engine.
CONNECTION_EVENTS = {
    HISTORY_GAP_EVENT: "Events were lost for a channel: subscribe again from your position (`since`).",
    PRESENCE_CHANGED_EVENT: "Someone joined or left a channel with presence: {count, action, user_id}.",
    SEND_QUEUE_OVERFLOWED_EVENT: "The connection could not keep up and is closed: reconnect and catch up.",
    SERVER_SHUTDOWN_EVENT: "This server process is stopping: reconnect (to another process).",
    TOKEN_EXPIRING_EVENT: "The access token ends soon: refresh it and send `refresh_token`: {expires_at, expires_in}.",
    SIGNED_OUT_EVENT: "The session ended ({reason}); the server disconnects right after. Sign in again.",
}


def _doc_lines(obj: Any) -> tuple[str, str]:
    """The summary (first line) and the whole of an object's docstring."""
    doc = inspect.getdoc(obj) or ""
    return (doc.splitlines()[0] if doc else ""), doc


def _accepts_empty(schema: dict[str, Any]) -> bool:
    """Whether a body schema lets the body be left out (an absent body reads as `{}`)."""
    return compile_schema(schema).is_valid({})


def _tag(path: str) -> str:
    parts = [part for part in path.split("/") if part and not part.startswith("{")]
    if parts[:2] == ["api", "v1"]:
        parts = parts[2:]
    if parts and parts[0] == "admin":
        return "admin"
    return parts[0] if parts else "pages"


def _operation_id(method: str, path: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", path.replace("/api/v1/", "/")).strip("_") or "root"
    return f"{method}_{slug}"


def _parameters(path: str, spec: EndpointSpec | None) -> list[dict[str, Any]]:
    declared = (spec.path or {}) if spec else {}
    params = [{"name": name, "in": "path", "required": True,
               "schema": declared.get(name, {"type": "string", "minLength": 1})}
              for name in _PATH_PARAM.findall(path)]
    query = spec.query if spec else None
    if query:
        required = set(query.get("required", ()))
        for name, schema in query.get("properties", {}).items():
            params.append({"name": name, "in": "query", "required": name in required, "schema": schema})
    return params


def _request_body(spec: EndpointSpec | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    body = spec.body if spec.body is not None else spec.json_body
    if body is not None:
        return {"required": not _accepts_empty(body), "content": {"application/json": {"schema": body}}}
    if spec.form is not None:
        form = spec.form
        schema = {**form, "properties": {**form.get("properties", {}),
                                         "file": {"type": "string", "contentMediaType": "application/octet-stream"}},
                  "required": sorted({*form.get("required", ()), "file"})}
        return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    return None


def _operation(method: str, path: str, handler: Any) -> dict[str, Any]:
    spec = endpoint_spec(handler)
    summary, description = _doc_lines(handler)
    operation: dict[str, Any] = {
        "operationId": _operation_id(method, path),
        "summary": (spec.summary if spec and spec.summary else summary) or f"{method.upper()} {path}",
        "description": description,
        "tags": [_tag(path)],
        "parameters": _parameters(path, spec),
        "responses": {
            "2XX": {"description": "Success: the envelope `{ok: true, data}` (files and streams answer "
                                   "their own content type).",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Ok"}}}},
            "4XX": {"description": "Refused: the error envelope `{ok: false, error: {code, message, field?}}`.",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}},
            "5XX": {"description": "`unavailable` (a backend is down) or `internal_error`.",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}},
        },
    }
    if spec is not None and spec.auth is not None:
        operation["security"] = [{"bearer": []}]
        if spec.auth == "admin":
            operation["description"] = (description + "\n\nAdministrators only.").strip()
    body = _request_body(spec)
    if body is not None:
        operation["requestBody"] = body
    return operation


def documented_routes(routes: Iterable[web.AbstractRoute]) -> list[tuple[str, str, Any]]:
    """(method, path template, handler) of every route the OpenAPI document describes."""
    found = []
    for route in routes:
        method = route.method.lower()
        resource = route.resource
        if method not in METHODS or resource is None or resource.canonical.startswith(SOCKETIO_PATH):
            continue
        found.append((method, resource.canonical, route.handler))
    return found


def openapi_document(routes: Iterable[web.AbstractRoute]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of these routes (an app's `app.router.routes()`)."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path, handler in documented_routes(routes):
        paths.setdefault(path, {})[method] = _operation(method, path, handler)
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {"title": f"{API_TITLE} REST API", "version": API_VERSION,
                 "description": "Every answer is an envelope: `{ok: true, data}` or "
                                "`{ok: false, error: {code, message, field?}}` (docs/protocol.md). "
                                "The Socket.IO side is described by /api/v1/asyncapi.json."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": {"Ok": OK_ENVELOPE, "ErrorEnvelope": ERROR_ENVELOPE, "Error": ERROR_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                           "description": "The access token from /api/v1/auth/login."}},
        },
    }


def namespace_commands(namespace: type[HubNamespace] | HubNamespace) -> dict[str, tuple[CommandSpec, Any]]:
    """Every client command of a namespace: event name -> (its spec, its handler)."""
    cls = namespace if isinstance(namespace, type) else type(namespace)
    commands = {}
    for attr in sorted(dir(cls)):
        handler = getattr(cls, attr)
        spec = getattr(handler, "__hub_command__", None)
        if attr.startswith("on_") and isinstance(spec, CommandSpec):
            commands[attr[3:]] = (spec, handler)
    return commands


def _key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "root"


def asyncapi_document(namespaces: Iterable[type[HubNamespace] | HubNamespace]) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of these Socket.IO namespaces: commands (with acks) and events."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for namespace in namespaces:
        cls = namespace if isinstance(namespace, type) else type(namespace)
        if not issubclass(cls, HubNamespace):
            continue
        channel_key = _key(cls.name)
        ref = {"$ref": f"#/channels/{channel_key}"}
        messages: dict[str, Any] = {}
        for event, (spec, handler) in namespace_commands(cls).items():
            summary, description = _doc_lines(handler)
            message_key, ack_key = f"{_key(event)}", f"{_key(event)}_ack"
            messages[message_key] = {"name": event, "title": event, "summary": summary, "description": description,
                                     "payload": spec.validator.schema,
                                     "x-sign-in-required": spec.user_required}
            messages[ack_key] = {"name": f"{event} ack", "payload": {"$ref": "#/components/schemas/Ack"}}
            operations[f"{channel_key}_{message_key}"] = {
                "action": "receive", "channel": ref, "title": f"{cls.name} {event}", "summary": summary,
                "messages": [{"$ref": f"#/channels/{channel_key}/messages/{message_key}"}],
                "reply": {"channel": ref, "messages": [{"$ref": f"#/channels/{channel_key}/messages/{ack_key}"}]},
            }
        events = {**{name: "" for name in getattr(cls, "events", ())}, **CONNECTION_EVENTS}
        for event, description in events.items():
            message_key = f"event_{_key(event)}"
            messages[message_key] = {"name": event, "title": event, "description": description,
                                     "payload": {"$ref": "#/components/schemas/Event"}}
            operations[f"{channel_key}_{message_key}"] = {
                "action": "send", "channel": ref, "title": f"{cls.name} {event}",
                "messages": [{"$ref": f"#/channels/{channel_key}/messages/{message_key}"}],
            }
        summary, description = _doc_lines(cls)
        channels[channel_key] = {
            "address": cls.name, "title": cls.name, "summary": summary, "description": description,
            "messages": messages,
            "x-anonymous-allowed": cls.allow_anonymous,
            "x-subscribable-channels": [rule.pattern for rule in cls.channels],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": f"{API_TITLE} Socket.IO API", "version": API_VERSION,
                 "description": "Socket.IO v5 over Engine.IO v4 at /socket.io/. Each AsyncAPI channel is a "
                                "namespace. Connect with `auth: {token}` (an access token); commands are "
                                "events emitted with an ack, answered by the envelope `{ok, data}` or "
                                "`{ok: false, error}`. Live events arrive after `subscribe {channel}`."},
        "defaultContentType": "application/json",
        "servers": {"hub": {"host": "localhost", "protocol": "ws", "pathname": f"{SOCKETIO_PATH}/",
                            "description": "The same origin as the page; Socket.IO path /socket.io/."}},
        "channels": channels,
        "operations": operations,
        "components": {"schemas": {
            "Ack": {"oneOf": [OK_ENVELOPE, ERROR_ENVELOPE]},
            "Error": ERROR_SCHEMA,
            "Event": EVENT_WIRE,
        }},
    }
