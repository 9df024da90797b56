"""Browser hardening headers: the page's Content-Security-Policy, nosniff and the referrer policy."""

from __future__ import annotations

from typing import Awaitable, Callable, MutableMapping

from aiohttp import web

# The page loads only its own files: scripts are modules from this origin (no inline script, no
# eval), styles come from style.css, and the only connections are the REST API and the Socket.IO
# websocket. CSP Level 3 'self' covers ws:/wss: to the page's own host, so connect-src names no host
# (a host taken from the request's Host header could be used to inject directives into a cached page).
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))

# The page never needs to tell another site where it came from, and its addresses hold DataPod ids.
# no-referrer does not change the Origin header of fetch() or websocket requests, which the server's
# origin check reads.
REFERRER_POLICY = "no-referrer"

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": REFERRER_POLICY,
}


@web.middleware
async def security_headers(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Add the hardening headers to every response not yet sent (a websocket's are sent at upgrade)."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # aiohttp's own answers (a redirect, a bare 4xx) are responses too
        _add_headers(exc.headers)
        raise
    if not response.prepared:
        _add_headers(response.headers)
    return response


def _add_headers(headers: MutableMapping[str, str]) -> None:
    # On every response, not just HTML: a static file's type is only known once it is being sent,
    # the policy does nothing to a subresource, and a JSON or text answer opened as a document gets
    # no script at all.
    for name, value in SECURITY_HEADERS.items():
        headers.setdefault(name, value)
