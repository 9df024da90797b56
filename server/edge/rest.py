"""The REST edge: request ids, the error envelope, body validation, authentication decorators."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Collection

import structlog
from aiohttp import BodyPartReader, web

from db.pool import POOL
from server.core import jsonutil
from server.core.errors import (
    ErrorCode,
    Forbidden,
    HubError,
    InvalidPayload,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    error_from_exception,
)
from server.core.identity import Identity
from server.core.metrics import METRICS
from server.core.protocol import error_envelope, ok
from server.core.settings import SETTINGS
from server.edge.schemas import MAX_INTEGER_ID, compile_schema, validate
from server.services.auth import AUTH

log = structlog.get_logger(__name__)


def json_response(body: Any, status: int = 200, **kwargs: Any) -> web.Response:
    """A JSON response serialised with orjson."""
    return web.Response(body=jsonutil.dumpb(body), status=status, content_type="application/json", **kwargs)


def ok_response(data: Any = None, status: int = 200) -> web.Response:
    """A success envelope as a response."""
    return json_response(ok(data), status=status)


def error_response(error: HubError) -> web.Response:
    """An error envelope with the code's HTTP status."""
    headers = {}
    if error.code is ErrorCode.RATE_LIMITED and "retry_after" in error.extra:
        headers["Retry-After"] = str(max(1, round(error.extra["retry_after"])))
    return json_response(error_envelope(error), status=error.code.http_status, headers=headers)


@web.middleware
async def request_context(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Give each request an id (echoed back), bind it to the logs, count and time it."""
    supplied = request.headers.get("X-Request-ID", "")
    request_id = supplied if 0 < len(supplied) <= 64 and supplied.isprintable() else uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-ID"] = request_id
        return response
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        metrics = request.app[METRICS]
        metrics.http_requests.labels(request.method, name, str(status)).inc()
        metrics.http_seconds.labels(name).observe(time.perf_counter() - started)
        structlog.contextvars.unbind_contextvars("request_id")


@web.middleware
async def error_envelopes(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Translate every failure into the protocol's error envelope at the edge."""
    try:
        return await handler(request)
    except HubError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        return error_response(PayloadTooLarge("the request body is too large"))
    except web.HTTPNotFound:
        return error_response(NotFound(f"no route {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed:
        return error_response(NotFound(f"{request.method} is not allowed on {request.path}"))
    except web.HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - the edge must answer with an envelope
        error = error_from_exception(exc)
        if error.code is ErrorCode.INTERNAL_ERROR:
            log.exception("request_failed", method=request.method, path=request.path)
        return error_response(error)


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; refuses other content and malformed JSON."""
    if not request.can_read_body:
        return {}
    raw = await request.read()
    try:
        return jsonutil.loads(raw)
    except ValueError as exc:
        raise InvalidPayload("the body is not valid JSON") from exc




def path_int(request: web.Request, name: str, missing: str, *, minimum: int = 1) -> int:
    """An INTEGER id from the URL path; NotFound(`missing`) for anything else, never a server error."""
    raw = request.match_info[name]
    # ASCII digits of bounded length first: int() refuses 4,300+ digits and accepts other scripts.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or not minimum <= int(raw) <= MAX_INTEGER_ID:
        raise NotFound(missing, field=name)
    return int(raw)


def path_uuid(request: web.Request, name: str, missing: str) -> uuid.UUID:
    """A UUID id from the URL path; NotFound(`missing`) for anything else."""
    try:
        return uuid.UUID(request.match_info[name])
    except ValueError:
        raise NotFound(missing, field=name) from None


def int_query(request: web.Request, name: str, *, minimum: int, maximum: int = MAX_INTEGER_ID) -> int | None:
    """An optional integer query parameter within bounds (by default an INTEGER column's); InvalidPayload otherwise."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    # ASCII digits of bounded length first: int() refuses 4,300+ digits and accepts other scripts.
    if not (raw.isascii() and raw.lstrip("-").isdigit() and len(raw) <= 20):
        raise InvalidPayload(f"'{name}' must be an integer", field=name)
    value = int(raw)
    if not minimum <= value <= maximum:
        raise InvalidPayload(f"'{name}' must be between {minimum} and {maximum}", field=name)
    return value


def query_payload(request: web.Request, validator: Any) -> dict[str, Any]:
    """The query string as the matching socket command's payload (`limit` as an integer), validated."""
    params: dict[str, Any] = dict(request.query)
    if "limit" in params:
        try:
            params["limit"] = int(params["limit"])
        except ValueError:
            raise InvalidPayload("limit must be an integer", field="limit") from None
    return validate(validator, params)


async def current_identity(request: web.Request) -> Identity:
    """The caller's identity from `Authorization: Bearer <token>`."""
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else None
    return await request.app[AUTH].authenticate(request.app[POOL], token)


async def session_lives(request: web.Request) -> bool:
    """Whether a long response's token still stands (signed out, revoked, suspended or expired ends it);
    the check is cached a few seconds, so a stream may ask on every event."""
    try:
        await current_identity(request)
    except Unauthorized:
        return False
    return True


async def optional_identity(request: web.Request) -> Identity | None:
    """The caller's identity when a token is sent (it must be valid), None for anonymous callers."""
    if "Authorization" not in request.headers:
        return None
    return await current_identity(request)


Handler = Callable[..., Awaitable[web.StreamResponse]]
AUTH_LEVELS = (None, "user", "admin")


@dataclasses.dataclass(frozen=True, slots=True)
class EndpointSpec:
    """What a REST handler accepts, as `endpoint` declared it; the API documents are built from it.

    `query` and `path` describe what the handler parses itself (int_query, path_int...): an object
    schema whose properties are the parameters, and a schema per path parameter. `form` is the
    schema of a multipart upload's text fields (the upload also has a binary `file` part);
    `json_body` a JSON body the handler validates itself, after checks of its own.
    """

    body: dict[str, Any] | None = None
    auth: str | None = None
    query: dict[str, Any] | None = None
    path: dict[str, dict[str, Any]] | None = None
    form: dict[str, Any] | None = None
    json_body: dict[str, Any] | None = None
    summary: str | None = None


ENDPOINT_SPEC = "__hub_endpoint__"


def endpoint_spec(handler: Any) -> EndpointSpec | None:
    """The declaration `endpoint` attached to a route handler (None for undeclared handlers)."""
    return getattr(handler, ENDPOINT_SPEC, None)


def endpoint(*, body: dict[str, Any] | None = None, auth: str | None = None, query: dict[str, Any] | None = None,
             path: dict[str, dict[str, Any]] | None = None, form: dict[str, Any] | None = None,
             json_body: dict[str, Any] | None = None, doc: str | None = None) -> Callable[[Handler], Handler]:
    """Declare a REST handler's body schema and who may call it; checks run before the handler.

    auth: None (anyone), "user" (a signed-in user) or "admin". The handler receives
    `identity=` when auth is set and `body=` when a schema is declared. `query`, `path`, `form`,
    `json_body` and `doc` (a summary instead of the docstring's first line) only describe the
    route for the API documents; the handler still parses those parts itself.
    """
    validator = compile_schema(body) if body is not None else None
    if auth not in AUTH_LEVELS:
        raise ValueError(f"unknown auth level {auth!r}")
    for schema in (query, form, json_body, *(path or {}).values()):
        if schema is not None:
            compile_schema(schema)  # a broken declaration fails at import, like a body schema
    spec = EndpointSpec(body=body, auth=auth, query=query, path=path, form=form, json_body=json_body, summary=doc)

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            kwargs: dict[str, Any] = {}
            if auth is not None:
                identity = await current_identity(request)
                if auth == "admin" and not identity.is_admin:
                    raise Forbidden("administrators only")
                kwargs["identity"] = identity
            if validator is not None:
                kwargs["body"] = validate(validator, await read_json(request))
            return await handler(request, **kwargs)

        setattr(wrapper, ENDPOINT_SPEC, spec)
        return wrapper

    return decorate


@functools.lru_cache(maxsize=8)
def _networks(proxies: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(proxy, strict=False) for proxy in proxies)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def client_ip(request: web.Request) -> str | None:
    """The client's address: the peer's, or, when the peer is a trusted proxy (TRUSTED_PROXIES),
    the nearest untrusted address its X-Forwarded-For names."""
    networks = _networks(request.app[SETTINGS].trusted_proxies)

    def trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return address is not None and any(address in network for network in networks)

    remote = request.remote
    if remote is None or not trusted(_address(remote)):
        return remote
    # Read from the right: each proxy appends the address it got the request from, and anything
    # left of the last trusted hop was written by the client and proves nothing.
    hops = ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")
    for hop in reversed([hop.strip() for hop in hops if hop.strip()]):
        address = _address(hop)
        if not trusted(address):
            return str(address) if address is not None else remote
    return remote


# Room for the text fields and the multipart framing around an upload's file, on top of its limit.
FORM_OVERHEAD_BYTES = 256 * 1024


async def form_parts(request: web.Request, names: Collection[str],
                     hint: str) -> AsyncIterator[tuple[str, BodyPartReader]]:
    """The parts of a multipart/form-data upload with their names, read as they stream in; refuses
    another content type (naming the expected parts: `hint`), nested multipart parts, and part
    names other than "file" and `names`."""
    if not request.content_type.startswith("multipart/"):
        raise InvalidPayload(f"send multipart/form-data with {hint}", field="file")
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise InvalidPayload("nested multipart bodies are not accepted", field="file")
        name = part.name or ""
        if name != "file" and name not in names:
            raise InvalidPayload(f"unknown field '{name}'", field=name or "file")
        yield name, part
