"""Shared test helpers: captures, an ASGI driver, and a scripted upstream."""

from __future__ import annotations

import inspect
import json
import pathlib
import signal
from typing import Any, AsyncIterator, Awaitable, Callable

import attrs
import httpx
import pytest
import trio

from sentinel._app import App
from sentinel._channel import SerialChannel
from sentinel._config import Config
from sentinel._supervisor import ServerState, Status
from sentinel._upstream import Upstream

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "claude-code-2.1.197"


def capture(name: str) -> list[dict[str, Any]]:
    """The requests of one trimmed Claude Code capture, in order."""
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def captured_body(name: str, n: int) -> dict[str, Any]:
    return next(record["body"] for record in capture(name) if record["n"] == n)


def main_turn(stream: bool = True, max_tokens: int = 16) -> dict[str, Any]:
    """The captured interactive main turn (27 tools), with a short reply budget."""
    body = captured_body("session-title-and-turns", 3)
    return {**body, "stream": stream, "max_tokens": max_tokens}


def title_request(stream: bool = True) -> dict[str, Any]:
    return {**captured_body("session-title-and-turns", 2), "stream": stream}


# -- an ASGI driver -----------------------------------------------------------


@attrs.define(eq=False)
class Reply:
    """What the app sent back, gathered as it arrives."""

    status: int | None = None
    headers: dict[str, str] = attrs.field(factory=dict)
    chunks: list[bytes] = attrs.field(factory=list)
    chunk_times: list[float] = attrs.field(factory=list)
    complete: bool = False
    changed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[tuple[str, Any]]:
        """The SSE events received, as (name, parsed data)."""
        out = []
        for block in self.body.decode().split("\n\n"):
            if not block.strip():
                continue
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            out.append((fields["event"], json.loads(fields["data"])))
        return out

    async def wait_for(self, predicate: Callable[[Reply], bool]) -> None:
        while not predicate(self):
            event = self.changed
            await event.wait()


async def asgi_request(app: Any, method: str, path: str, body: bytes | dict | None = None,
                       headers: dict[str, str] | None = None, reply: Reply | None = None,
                       disconnect: trio.Event | None = None, chunk_size: int | None = None) -> Reply:
    """Drive one request through an ASGI app, as hypercorn would.

    After the body, ``receive`` blocks until ``disconnect`` is set (the client
    leaves) or the response is complete.
    """
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    body = body or b""
    reply = Reply() if reply is None else reply
    disconnect = trio.Event() if disconnect is None else disconnect
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if body and "content-length" not in (headers or {}):
        raw_headers.append((b"content-length", str(len(body)).encode()))
    path, _, query = path.partition("?")
    scope = {"type": "http", "method": method, "path": path, "query_string": query.encode(),
             "headers": raw_headers, "http_version": "1.1", "scheme": "http"}
    size = chunk_size or max(1, len(body))
    pieces = [body[i:i + size] for i in range(0, len(body), size)] or [b""]

    async def receive() -> dict[str, Any]:
        if pieces:
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
        while not (disconnect.is_set() or reply.complete):
            await reply.changed.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            assert reply.status is not None, "body before start"
            assert not reply.complete, "body after the response ended"
            if message.get("body"):
                reply.chunks.append(message["body"])
                reply.chunk_times.append(trio.current_time())
            reply.complete = not message.get("more_body", False)
        previous, reply.changed = reply.changed, trio.Event()
        previous.set()

    async def watch_disconnect() -> None:
        await disconnect.wait()
        previous, reply.changed = reply.changed, trio.Event()
        previous.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_disconnect)
        await app(scope, receive, send)
        nursery.cancel_scope.cancel()
    return reply


# -- a fake llama-server process and its launcher ------------------------------


@attrs.define(eq=False)
class FakeProcess:
    pid: int
    obeys_sigterm: bool = True
    returncode: int | None = None
    signals: list[int] = attrs.field(factory=list)
    _exited: trio.Event = attrs.field(factory=trio.Event)

    def exit(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
            self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        return self.returncode

    #: A hung process ignores everything but SIGKILL.
    hung: bool = False

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL or (sig in (signal.SIGTERM, signal.SIGABRT) and self.obeys_sigterm
                                     and not self.hung):
            self.exit(-sig)


@attrs.define(eq=False)
class FakeLauncher:
    obeys_sigterm: bool = True
    launched: list[FakeProcess] = attrs.field(factory=list)
    argv: list[list[str]] = attrs.field(factory=list)
    #: Seconds each process takes to load; /health says 503 until then.
    load_time: float = 2.0
    started_at: list[float] = attrs.field(factory=list)

    async def launch(self, argv, env, log_path):
        process = FakeProcess(1000 + len(self.launched), self.obeys_sigterm)
        self.launched.append(process)
        self.argv.append(list(argv))
        self.started_at.append(trio.current_time())
        return process

    @property
    def current(self) -> FakeProcess:
        return self.launched[-1]

    def health(self, request: httpx.Request) -> httpx.Response:
        if not self.launched or self.launched[-1].returncode is not None:
            raise httpx.ConnectError("refused", request=request)
        if self.launched[-1].hung:
            raise httpx.ReadTimeout("no answer", request=request)
        loading = trio.current_time() - self.started_at[-1] < self.load_time
        return httpx.Response(503 if loading else 200)



# -- a scripted upstream ------------------------------------------------------


def sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def stream_events(text: str = "Hello") -> list[bytes]:
    return [
        sse("message_start", {"type": "message_start", "message": {
            "id": "m1", "type": "message", "role": "assistant", "content": [], "model": "m",
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 0}}}),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "text_delta", "text": text}}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                              "usage": {"output_tokens": 1}}),
        sse("message_stop", {"type": "message_stop"}),
    ]


def json_message(text: str = "Hello") -> dict[str, Any]:
    return {"id": "m1", "type": "message", "role": "assistant", "model": "m",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}


class ScriptedStream(httpx.AsyncByteStream):
    """A response body that yields chunks with pauses, and notes when it is closed."""

    def __init__(self, upstream: ScriptedUpstream, chunks: list[bytes | float]) -> None:
        self.upstream = upstream
        self.chunks = chunks
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            if isinstance(chunk, (int, float)):
                await trio.sleep(chunk)
            elif callable(chunk):
                result = chunk()  # e.g. crash the server mid-stream
                if inspect.isawaitable(result):
                    await result
            else:
                yield chunk

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.upstream.release()


@attrs.define(eq=False)
class ScriptedUpstream:
    """An upstream llama-server as a function: it records what it saw.

    ``script`` maps a request to the chunks of a streamed body; numbers in
    that list are pauses in seconds. ``open`` counts requests whose response
    is still open, and ``max_open`` is the most ever open at once.
    """

    script: Callable[[httpx.Request, dict], Awaitable[httpx.Response]] | None = None
    requests: list[dict[str, Any]] = attrs.field(factory=list)
    count_requests: int = 0
    open: int = 0
    max_open: int = 0
    streams: list[ScriptedStream] = attrs.field(factory=list)
    token_count: int = 42
    count_delay: float = 0.0

    def release(self) -> None:
        self.open -= 1

    def respond(self, status: int, chunks: list[bytes | float], content_type: str) -> httpx.Response:
        stream = ScriptedStream(self, chunks)
        self.streams.append(stream)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        return httpx.Response(status, headers={"content-type": content_type}, stream=stream)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/messages/count_tokens":
            self.count_requests += 1
            await trio.sleep(self.count_delay)
            return httpx.Response(200, json={"input_tokens": self.token_count})
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        body = json.loads(await request.aread())
        self.requests.append(body)
        if self.script is not None:
            return await self.script(request, body)
        return self.default(body)

    def default(self, body: dict[str, Any], pause: float = 0.0) -> httpx.Response:
        if body.get("stream"):
            return self.respond(200, [pause, *stream_events()], "text/event-stream")
        return self.respond(200, [pause, json.dumps(json_message()).encode()], "application/json")


@attrs.define(eq=False)
class FakeServer:
    upstream: Upstream
    state: ServerState = attrs.field(factory=lambda: ServerState(Status.READY, generation=1))
    failures: list[Exception] = attrs.field(factory=list)

    completed: int = 0
    crashed: bool = False

    def report_failure(self, error: Exception) -> None:
        self.failures.append(error)

    def report_stall(self) -> None:
        pass

    def request_completed(self) -> None:
        self.completed += 1

    async def confirm_crash(self, generation: int) -> bool:
        return self.crashed


@attrs.define(eq=False)
class Harness:
    app: App
    upstream: ScriptedUpstream
    server: FakeServer
    channel: SerialChannel

    async def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Reply:
        return await asgi_request(self.app, method, path, body, **kwargs)


@pytest.fixture
async def harness(nursery: trio.Nursery) -> Harness:
    return await make_harness(nursery)


async def make_harness(nursery: trio.Nursery, config: Config | None = None,
                       upstream: ScriptedUpstream | None = None) -> Harness:
    upstream = upstream or ScriptedUpstream()
    server = FakeServer(Upstream("http://upstream", transport=httpx.MockTransport(upstream)))
    config = config or Config()
    channel = SerialChannel(server, queue_limit=config.channel.queue_limit)
    await nursery.start(channel.run)
    return Harness(App(config, server, channel), upstream, server, channel)
