"""The chat model: any OpenAI-compatible endpoint, its Chat Completions over aiohttp (see `ChatModel`
for why not the SDK) and its model list through `openai.AsyncOpenAI`.

Only this module talks to the model. It streams Chat Completions with
`stream_options={"include_usage": True}`, retries 429 and 5xx answers and connection failures that
happen before the first chunk (honouring `Retry-After` / `Retry-After-Ms`, with exponential backoff
otherwise), and turns every failure into a `ModelError` with a stable `code` and `retryable` flag.

The openai client would retry by itself too, and honour Retry-After up to two minutes, but it
cannot bound the total wait nor tell us what it did, so its own retries are off (`max_retries=0`).

Token counts: when the endpoint sends no usage chunk (several servers ignore `include_usage`),
`estimate_tokens` counts about 4 characters per token (OpenAI's rule of thumb for English) plus
4 tokens per message for the chat framing; the message is then marked `tokens_estimated`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import math
import random
import time
from typing import Any, AsyncIterator

import aiohttp
import openai
import orjson
import structlog

from server.core.settings import Settings

log = structlog.get_logger(__name__)

PLACEHOLDER_API_KEY = "sk-no-key"  # local servers (llama.cpp, vLLM, Ollama) accept any key
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


def estimate_tokens(text: str) -> int:
    """A local token estimate: ~4 characters per token, at least 1 for non-empty text."""
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


def estimate_messages(messages: list[dict[str, Any]]) -> int:
    """The prompt-size estimate of a list of chat messages (content, tool calls and framing)."""
    total = 0
    for message in messages:
        total += TOKENS_PER_MESSAGE + estimate_tokens(message.get("content") or "")
        for call in message.get("tool_calls") or ():
            function = call.get("function", {})
            total += estimate_tokens(function.get("name", "") + function.get("arguments", ""))
    return total


@dataclasses.dataclass
class ModelError(Exception):
    """A generation failure as clients see it in `message_failed`."""

    code: str
    message: str
    retryable: bool
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_event(self) -> dict[str, Any]:
        data: dict[str, Any] = {"code": self.code, "message": self.message, "retryable": self.retryable}
        if self.retry_after is not None:
            data["retry_after"] = round(self.retry_after, 3)
        return data


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from `Retry-After-Ms` / `Retry-After` (seconds or an HTTP date); None if absent."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is None:
                continue
            seconds = email.utils.mktime_tz(parsed) - time.time()
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None


def classify(exc: BaseException) -> ModelError:
    """Map an exception from the openai client to a ModelError."""
    if isinstance(exc, ModelError):
        return exc
    if isinstance(exc, openai.APITimeoutError) and not _refused(exc):
        return ModelError("upstream_timeout", "the model did not answer in time", True)
    if isinstance(exc, openai.APIConnectionError):
        return ModelError("upstream_unreachable", "the model endpoint cannot be reached", True)
    if isinstance(exc, openai.APIStatusError):
        return status_error(exc.status_code, exc.response.headers if exc.response is not None else None,
                            str(exc.message))
    if isinstance(exc, openai.APIError):
        # An error object inside the stream (a server-side failure mid-answer).
        return ModelError("upstream_error", "the model endpoint reported an error mid-answer", True)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ModelError("generation_timeout", "the answer took too long", True)
    return ModelError("internal_error", "the answer failed on the server", False)


def status_error(status: int, headers: Any, message: str) -> ModelError:
    """The ModelError for an HTTP error answer of the endpoint (`message`: the error it gave)."""
    retry_after = retry_after_seconds(headers)
    if status == 429:
        return ModelError("upstream_rate_limited", "the model endpoint is rate limiting us", True, retry_after)
    if status >= 500 or status in (408, 409):
        return ModelError("upstream_unavailable", f"the model endpoint failed (HTTP {status})", True, retry_after)
    if status in (401, 403):
        return ModelError("upstream_auth", "the model endpoint refused our credentials", False)
    if status == 404:
        return ModelError("upstream_model_not_found", "the model endpoint does not know the model", False)
    if status == 400 and "context" in message.lower():
        return ModelError("context_too_long", "the conversation does not fit the model's window", False)
    return ModelError("upstream_rejected", f"the model endpoint rejected the request (HTTP {status})", False)


def _error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), else the body's text."""
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")
    error = decoded.get("error") if isinstance(decoded, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return body.decode("utf-8", "replace")


def _chat_error(exc: BaseException) -> ModelError:
    """The ModelError for a failure of a chat request: aiohttp's own (connecting or reading), else
    as `classify` maps it."""
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts are also OSErrors: first
        return ModelError("upstream_timeout", "the model did not answer in time", True)
    if isinstance(exc, _TRANSPORT_ERRORS):
        return ModelError("upstream_unreachable", "the model endpoint cannot be reached", True)
    return classify(exc)


_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


def _refused(exc: BaseException) -> bool:
    """Whether a connection failure under `exc` was a refusal or reset, not a timeout.

    The SDK's aiohttp transport reports every aiohttp connection error, a refused connection
    included, as a connect *timeout*.
    """
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
            return True
        cause = cause.__cause__
    return False


class ChatModel:
    """A chat client for one endpoint: streamed answers (AI_MODEL unless a call names another
    model), short completions, and the endpoint's model list."""

    def __init__(self, settings: Settings) -> None:
        self.model = settings.ai_model
        self.max_retries = settings.ai_max_retries
        self.retry_max_wait = settings.ai_retry_max_wait
        self.max_output_tokens = settings.ai_max_output_tokens
        self.silence_timeout = settings.ai_timeout
        timeout = openai.Timeout(settings.ai_timeout, connect=5.0)
        api_key = settings.openai_api_key or PLACEHOLDER_API_KEY
        # The SDK lists the endpoint's models. Chat requests, two per answer, go straight through
        # aiohttp: the SDK's request building, header merging and its HTTP library's layers cost
        # about 0.75 ms of CPU per request and 6 us per streamed token (bench/assistant.py), where
        # the hub's whole budget is 50 us a token. The SDK's aiohttp transport: h11 and httpcore
        # parsed every chunk in Python.
        self.client = openai.AsyncOpenAI(base_url=settings.openai_base_url, api_key=api_key, timeout=timeout,
                                         max_retries=0, http_client=openai.DefaultAioHttpClient(timeout=timeout))
        self._chat_url = settings.openai_base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                         "Accept": "application/json, text/event-stream"}
        self._timeout = aiohttp.ClientTimeout(sock_connect=5.0, sock_read=settings.ai_timeout)
        self._session: aiohttp.ClientSession | None = None  # made on first use, inside the running loop

    async def close(self) -> None:
        await self.client.close()
        if self._session is not None:
            await self._session.close()

    async def list_models(self) -> list[str]:
        """The ids of the models the endpoint serves (its `/v1/models`), as it lists them."""
        try:
            page = await self.client.models.list()
            return [item.id async for item in page]
        except Exception as exc:  # noqa: BLE001 - one error type for the caller
            raise classify(exc) from exc

    async def complete(self, messages: list[dict[str, Any]], *, model: str | None = None,
                       max_tokens: int = 32) -> tuple[str, int | None, int | None]:
        """One short non-streamed completion, not retried: its text and the usage the endpoint
        reported (prompt, completion; None when it sent none)."""
        try:
            response = await self._chat({"model": model or self.model, "messages": messages,
                                         "max_tokens": max_tokens, "stream": False})
            async with response:
                answer = orjson.loads(await response.read())
            text = answer["choices"][0]["message"]["content"] or ""
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - a malformed answer (no choices, not JSON) included
            raise _chat_error(exc) from exc
        usage = answer.get("usage")
        if not isinstance(usage, dict):
            return text, None, None
        return text, usage.get("prompt_tokens"), usage.get("completion_tokens")

    async def _chat(self, body: dict[str, Any]) -> aiohttp.ClientResponse:
        """POST /chat/completions; the response with its body unread (the reader maps its failures),
        or ModelError for an HTTP error or a failure to get the answer's headers."""
        if self._session is None:
            # No cap on connections here: aiohttp's default of 100 queued the 101st concurrent answer,
            # with no timeout, until another one ended. The assistant bounds its answers at admission
            # (AI_MAX_STREAMS), and with a clear error.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:
            response = await self._session.post(self._chat_url, data=orjson.dumps(body), headers=self._headers,
                                                timeout=self._timeout)
        except _TRANSPORT_ERRORS as exc:
            raise _chat_error(exc) from exc
        if response.status >= 400:
            async with response:
                raise status_error(response.status, response.headers, _error_message(await response.read()))
        return response

    async def open_stream(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                          tool_choice: str | dict[str, Any] | None = None, model: str | None = None) -> Any:
        """Start a streamed completion; retries what may be retried before any text was produced."""
        kwargs: dict[str, Any] = {"model": model or self.model, "messages": messages, "stream": True,
                                  "stream_options": {"include_usage": True},
                                  "max_tokens": self.max_output_tokens}
        if tools:
            kwargs["tools"] = tools
            if tool_choice is not None:
                kwargs["tool_choice"] = tool_choice
        attempt = 0
        while True:
            try:
                # The chunks are read by `read_chunks` (see there why).
                return await self._chat(kwargs)
            except Exception as exc:  # noqa: BLE001 - classified below
                error = classify(exc)
                if not error.retryable or error.code == "internal_error" or attempt >= self.max_retries:
                    raise error from exc
                delay = error.retry_after
                if delay is None:
                    delay = min(0.5 * 2 ** attempt, 8.0) * (1 - 0.25 * random.random())
                elif delay > self.retry_max_wait:
                    raise error from exc  # the client is told when to come back
                attempt += 1
                log.info("model_retry", code=error.code, attempt=attempt, delay=round(delay, 3))
                await asyncio.sleep(delay)

    async def stream(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                     tool_choice: str | dict[str, Any] | None = None,
                     model: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """The chunks of one streamed completion (`model`: else AI_MODEL), as decoded JSON objects;
        closing the generator closes the HTTP stream."""
        response = await self.open_stream(messages, tools, tool_choice, model)
        silence = Silence(response, self.silence_timeout)
        read_to_done = False
        try:
            async for chunk in read_chunks(response.content, silence):
                yield chunk
            read_to_done = True
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - one error type for the caller
            raise _chat_error(exc) from exc
        finally:
            silence.cancel()
            if read_to_done:
                response.release()  # back to the pool if the body has ended, else closed
            else:
                response.close()  # a stop (cancellation) or a failure: the server sees the disconnect


class Silence:
    """Fails a streamed answer once the model has sent nothing for `seconds` (AI_TIMEOUT).

    aiohttp's `sock_read` does the same, but re-arms its timer on every read: about 4 of the 27 us
    of CPU a token cost `stream` (100 streams in one process, measured apart). It still bounds the
    wait for the response's headers; for the body it is switched off and this timer, re-armed only
    when it fires, takes its place. Comments (keep-alives) count as heard, as any bytes did.
    """

    def __init__(self, response: aiohttp.ClientResponse, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._content = response.content
        self._seconds = seconds
        self.heard = self._loop.time()  # set by the reader whenever bytes arrive
        if response.connection is not None:
            response.connection.protocol.read_timeout = None
        self._timer = self._loop.call_at(self.heard + seconds, self._check)

    def _check(self) -> None:
        deadline = self.heard + self._seconds
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check)
            return
        # The error aiohttp's own read timeout sets: the reader maps it to upstream_timeout.
        self._content.set_exception(aiohttp.SocketTimeoutError(f"the model sent nothing for {self._seconds:g} s"))

    def cancel(self) -> None:
        """Stop watching (the stream ended)."""
        self._timer.cancel()


async def read_chunks(body: aiohttp.StreamReader, silence: Silence) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a Chat Completions event stream, each a decoded JSON object, until `data: [DONE]`.

    Not the SDK's stream: it builds a typed model of every chunk, about 125 us of CPU each
    (bench/assistant.py), more than everything else the hub does for a token. Nor a line iterator:
    the body's bytes are split into lines here as they arrive and each event is parsed by orjson.
    Server-Sent Events framing: lines end with CRLF, LF or CR; `data:` lines, joined by newlines,
    make one event at the blank line that ends it; other fields are ignored.
    """
    data: list[bytes] = []
    pending = b""
    clock = asyncio.get_running_loop().time
    async for received in body.iter_any():
        silence.heard = clock()
        pending += received
        if b"\r" in pending:
            # A CR ending the buffer may be the first half of a CRLF: it waits for the next bytes.
            held = pending.endswith(b"\r")
            pending = pending[:-1] if held else pending
            pending = pending.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if held else b"")
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
                continue
            if line or not data:
                continue
            event, data = b"\n".join(data), []
            if event.startswith(b"[DONE]"):
                return
            decoded = orjson.loads(event)
            if not isinstance(decoded, dict):
                raise ModelError("upstream_error", "the model endpoint sent a chunk that is not an object", True)
            if decoded.get("error"):
                raise ModelError("upstream_error", "the model endpoint reported an error mid-answer", True)
            yield decoded
