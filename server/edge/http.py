"""The HTTP server's own answers: requests refused before routing still get the error envelope."""

from __future__ import annotations

import warnings
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from server.core import jsonutil
from server.core.errors import ErrorCode, HubError, InvalidPayload, PayloadTooLarge
from server.core.protocol import error_envelope

log = structlog.get_logger(__name__)

# RFC 6585: the status for a request whose header fields are too large.
HEADERS_TOO_LARGE = 431


def parse_error(status: int, exc: BaseException | None) -> tuple[HubError, int]:
    """The envelope error and HTTP status for a request aiohttp refused while parsing or handling it."""
    if isinstance(exc, LineTooLong):
        return PayloadTooLarge("a request line or header field exceeds 8190 bytes"), HEADERS_TOO_LARGE
    if status >= 500:
        return HubError("internal error"), status
    return InvalidPayload("the request is not valid HTTP/1.1"), status


class EnvelopeRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering malformed requests with the envelope, not plain text."""

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """The envelope for a request that never reached the application (or crashed outside it)."""
        if request.writer.output_size > 0:
            # Part of a response is out: aiohttp's own handling closes the connection.
            return super().handle_error(request, status, exc, message)
        error, status = parse_error(status, exc)
        if error.code is ErrorCode.INTERNAL_ERROR:
            log.error("http_request_failed", error=type(exc).__name__ if exc else None)
        else:
            log.info("http_request_refused", status=status, reason=str(message or exc or "")[:200])
        response = web.Response(body=jsonutil.dumpb(error_envelope(error)), status=status,
                                content_type="application/json")
        response.force_close()
        return response


class EnvelopeServer(web.Server):
    """aiohttp's low-level server with `EnvelopeRequestHandler` connections."""

    def __call__(self) -> RequestHandler:
        """A handler for a new connection."""
        return EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


# aiohttp discourages subclassing Application (its attributes are frozen at startup); this class
# adds no state and changes only which server class serves it, so the warning is silenced here.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)

    class HubApplication(web.Application):
        """The application whose connections answer malformed HTTP with the error envelope."""

        def _make_handler(self, *, loop: Any = None, access_log_class: Any = web.AccessLogger,
                          **kwargs: Any) -> web.Server:
            server = super()._make_handler(loop=loop, access_log_class=access_log_class, **kwargs)
            # Same handler, same arguments; only the per-connection class differs.
            return EnvelopeServer(server.request_handler, request_factory=server.request_factory,
                                  handler_cancellation=server.handler_cancellation, loop=server._loop,
                                  **server._kwargs)
