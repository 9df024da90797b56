"""Structured logs (structlog) carrying the request or connection id."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import orjson
import structlog


def _json_line(event: dict[str, Any], **kwargs: Any) -> str:
    """An event as one JSON line through orjson (a line costs about 7 us instead of 10 with the
    standard library's encoder, which still writes what orjson refuses: ints past 64 bits)."""
    try:
        return orjson.dumps(event, default=kwargs["default"], option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:
        return json.dumps(event, **kwargs)


def configure_logging(fmt: str = "console", level: int = logging.INFO) -> None:
    """Route structlog and stdlib logging to stderr as JSON lines or readable console lines."""
    renderer = (structlog.processors.JSONRenderer(serializer=_json_line) if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # python-socketio/engineio log every packet at INFO; only their warnings matter here.
    for name in ("socketio", "engineio", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
