"""Model servers for the assistant tests.

- `llm_server` (session): the real tiny model `stories260K.gguf` served by llama-cpp-python's
  OpenAI-compatible server on loopback (tests/data/stories260K.gguf); `llm_tools_server` the same
  model with the `chatml-function-calling` chat format, for real tool calls. Without llama-cpp-python
  (the `dev` extra) or the model file the tests fail rather than skip.
- `ScriptedModel`: an aiohttp OpenAI-compatible endpoint that answers from a script, for the
  exact cases a real model cannot be made to produce (HTTP 500/429 with Retry-After, a tool call).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web

from tests.helpers import free_port

MODEL_PATH = Path(os.environ.get("HUB_TEST_GGUF", Path(__file__).resolve().parent / "data" / "stories260K.gguf"))



@contextlib.contextmanager
def _serve_model(chat_format: str) -> Iterator[str]:
    """Run llama-cpp-python's server on the tiny model; yields its base URL (".../v1")."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python[server] is not installed; `make test` installs it (the dev extra) "
                    "and the real-model assistant tests need it")
    if not MODEL_PATH.is_file():
        pytest.fail(f"the test model {MODEL_PATH} is missing (set HUB_TEST_GGUF)")
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{port}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(MODEL_PATH), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "2048", "--chat_format", chat_format, "--n_threads", "1",
         "--seed", "1234"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the model server exited with {process.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(base + "/models", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the model server did not start within 60 s; see {log.name}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="session")
def llm_server():
    """Base URL of the tiny stories model behind llama-cpp-python's plain chatml format."""
    with _serve_model("chatml") as base:
        yield base


@pytest.fixture(scope="session")
def llm_tools_server():
    """Base URL of the same model behind `chatml-function-calling`, which emits real tool calls."""
    with _serve_model("chatml-function-calling") as base:
        yield base


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": "scripted", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


class ScriptedModel:
    """An OpenAI-compatible Chat Completions endpoint answering each request from `script`.

    Each script entry is one request's answer: `{"status": 429, "headers": {...}}` for an error,
    `{"text": [...], "usage": {...} or None}` for a streamed answer, or
    `{"tool_calls": [{"name": ..., "arguments": {...}}]}` for a streamed tool call; `delay` slows
    the text down, `break` drops the connection after it. `requests` records the streamed requests.

    A non-streamed request (the assistant's title call) never takes a step of the script, which
    is meant for answers: it gets `title` (or HTTP `title_status`) after `title_delay` seconds, with
    `title_usage`, and is recorded in `title_requests`. Without a `title` it fails (HTTP 503), so
    the heuristic title stays and the call counts no tokens in tests that are not about titles.
    """

    def __init__(self, script: list[dict[str, Any]], *, title: str | None = None, title_status: int | None = None,
                 title_delay: float = 0.0, title_usage: dict[str, int] | None = None) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.disconnects = 0
        self.title, self.title_status, self.title_delay = title, title_status, title_delay
        self.title_usage = title_usage
        self.title_requests: list[dict[str, Any]] = []
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        self.app = app

    async def title_completion(self, body: dict[str, Any]) -> web.Response:
        self.title_requests.append(body)
        await asyncio.sleep(self.title_delay)
        if self.title_status or self.title is None:
            return web.json_response({"error": {"message": "scripted failure", "type": "server_error"}},
                                     status=self.title_status or 503)
        answer: dict[str, Any] = {
            "id": "chatcmpl-title", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.title}, "finish_reason": "stop"}]}
        if self.title_usage is not None:
            answer["usage"] = self.title_usage
        return web.json_response(answer)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return await self.title_completion(body)
        self.requests.append(body)
        self.times.append(time.monotonic())
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if "status" in step:
            return web.json_response({"error": {"message": "scripted failure", "type": "server_error"}},
                                     status=step["status"], headers=step.get("headers", {}))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(data: Any) -> None:
            await response.write(f"data: {json.dumps(data)}\n\n".encode())

        if "tool_calls" in step:
            for n, call in enumerate(step["tool_calls"]):
                await send(_chunk({"role": "assistant", "tool_calls": [{
                    "index": n, "id": f"call_{n}", "type": "function",
                    "function": {"name": call["name"], "arguments": ""}}]}))
                await send(_chunk({"tool_calls": [{"index": n, "function": {
                    "arguments": json.dumps(call["arguments"])}}]}))
            await send(_chunk({}, "tool_calls"))
        else:
            try:
                for piece in step.get("text", []):
                    await send(_chunk({"content": piece}))
                    await asyncio.sleep(step.get("delay", 0))
            except (ConnectionResetError, asyncio.CancelledError):
                self.disconnects += 1  # the client closed the stream (stop_generation)
                raise
            if step.get("break"):  # the connection drops midway: no finish, no [DONE]
                request.transport.abort()
                return response
            await send(_chunk({}, "stop"))
        if step.get("usage"):
            await send({**_chunk({}), "choices": [], "usage": step["usage"]})
        await response.write(b"data: [DONE]\n\n")
        return response


class SlowProxy:
    """A loopback proxy to a real model server that delays each streamed event by `delay` seconds,
    so a test can act mid-answer (stop, refresh). It counts answers the client cut off."""

    def __init__(self, upstream: str, delay: float = 0.03) -> None:
        self.upstream = upstream.rstrip("/")
        self.delay = delay
        self.disconnects = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/v1/{tail:.*}", self.forward)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        import aiohttp

        url = self.upstream + "/" + request.match_info["tail"]
        async with aiohttp.ClientSession() as session:
            async with session.request(request.method, url, data=await request.read(),
                                       headers={"Content-Type": "application/json"}) as upstream:
                if not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                    return web.Response(body=await upstream.read(), status=upstream.status,
                                        content_type=upstream.content_type)
                response = web.StreamResponse(status=upstream.status,
                                              headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                try:
                    async for line in upstream.content:
                        await response.write(line)
                        if line in (b"\n", b"\r\n"):
                            await asyncio.sleep(self.delay)
                except (ConnectionResetError, asyncio.CancelledError):
                    self.disconnects += 1  # leaving the block closes the upstream request too
                    raise
                return response
