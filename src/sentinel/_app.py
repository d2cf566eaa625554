"""The front end: an ASGI app speaking the Anthropic Messages API.

Routes::

    HEAD|GET /                      200, Claude Code's startup probe
    GET  /v1/models                 the configured model
    GET  /sentinel/health           sentinel's own state (200 when the upstream is ready)
    POST /v1/messages               triage, then synthesize or forward through the channel
    POST /v1/messages/count_tokens  the upstream's tokenizer, or a local estimate

Every failure becomes an Anthropic-shaped error and every request gets a
response: Claude Code hangs on a connection closed without one. A stream's
200 is committed as soon as the upstream's is (llama-server sends it before
its prefill), or after ``ping_interval`` in the queue, and a silent stream is
kept alive with ``event: ping``; a failure after that point ends the stream
with an ``error`` event instead of an HTTP status.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any, Awaitable, Callable

import attrs
import httpx
import orjson
import trio

from . import _sse, _synth, _tokens
from ._channel import Head, Job, QueueFull, SerialChannel, Server, fingerprint
from ._config import Config
from ._errors import ApiError, from_upstream, overloaded
from ._supervisor import Status
from ._triage import RequestClass, classify

__all__ = ["App"]

log = logging.getLogger("sentinel.requests")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


@attrs.define(eq=False)
class Exchange:
    """One HTTP request and its response, with the facts the request log needs."""

    scope: Scope
    receive: Receive
    _send: Send
    id: str = attrs.field(factory=lambda: "req_" + secrets.token_hex(6))
    started_at: float = attrs.field(factory=trio.current_time)
    status: int | None = None
    first_byte_at: float | None = None
    streaming: bool = False
    finished: bool = False
    facts: dict[str, Any] = attrs.field(factory=dict)
    rewrite_stop: bool = False

    def rewritten(self, data: bytes) -> bytes:
        """``data`` with a ``max_tokens`` stop turned into ``end_turn``, when sentinel capped it."""
        if self.rewrite_stop and b'"max_tokens"' in data and b"stop_reason" in data:
            return data.replace(b'"stop_reason":"max_tokens"', b'"stop_reason":"end_turn"').replace(
                b'"stop_reason": "max_tokens"', b'"stop_reason": "end_turn"')
        return data

    @property
    def method(self) -> str:
        return self.scope["method"]

    @property
    def path(self) -> str:
        return self.scope["path"]

    def header(self, name: bytes) -> str | None:
        for key, value in self.scope["headers"]:
            if key == name:
                return value.decode("latin-1")
        return None

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [*headers, (b"request-id", self.id.encode())]})

    async def body(self, data: bytes, more: bool = False) -> None:
        if self.first_byte_at is None and data:
            self.first_byte_at = trio.current_time()
        self.finished = not more
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def respond(self, status: int, payload: Any, headers: list[tuple[bytes, bytes]] = _JSON) -> None:
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        await self.start(status, [*headers, (b"content-length", str(len(data)).encode())])
        await self.body(data)

    async def start_stream(self) -> None:
        self.streaming = True
        await self.start(200, _SSE_HEADERS)

    async def fail(self, error: ApiError) -> None:
        """Report ``error`` in whatever form the response still allows."""
        self.facts.setdefault("error", error.type)
        if self.status is None:
            await self.respond(error.status, error.body_bytes(), error.headers())
        elif self.streaming and not self.finished:
            await self.body(error.sse_event())
        elif not self.finished:
            await self.body(b"")

    async def read_body(self, limit: int) -> bytes:
        length = self.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _ClientGone(Exception):
    pass


def _too_large(limit: int) -> ApiError:
    return ApiError("request_too_large", f"Request body is larger than the limit of {limit} bytes.")


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError("invalid_request_error", f"Request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request_error", "Request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ApiError("invalid_request_error",
                       "messages: Field required" if messages is None else "messages: must be a list")
    return body


@attrs.define(eq=False)
class App:
    config: Config
    server: Server
    channel: SerialChannel
    model_name: str = "local-model"
    #: Upper bound on forwarded max_tokens; 0 for none.
    max_tokens: int = 0
    #: Shutting down: real requests are refused with a retryable error.
    draining: bool = False
    counts: dict[str, int] = attrs.field(factory=dict)
    _count_limiter: trio.CapacityLimiter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._count_limiter = trio.CapacityLimiter(self.config.count_tokens.concurrency)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return
        exchange = Exchange(scope, receive, send)
        try:
            await self._dispatch(exchange)
        except ApiError as error:
            await exchange.fail(error)
        except _ClientGone:
            exchange.facts["error"] = "client_gone"
        except Exception:
            log.exception("%s internal error", exchange.id)
            await exchange.fail(ApiError("api_error", "Internal error in sentinel; see its log."))
        finally:
            self._log(exchange)

    async def _dispatch(self, ex: Exchange) -> None:
        route = (ex.method, ex.path)
        if ex.path == "/" and ex.method == "HEAD":
            return await ex.respond(200, b"")
        if ex.path == "/" and ex.method == "GET":
            return await ex.respond(200, {"name": "sentinel", "status": self.server.state.status.value})
        if route == ("GET", "/sentinel/health"):
            return await ex.respond(200 if self.server.state.ready else 503, self.health())
        if route == ("GET", "/v1/models"):
            return await ex.respond(200, self._models())
        if route == ("POST", "/sentinel/restart-server"):
            self._authenticate(ex)
            restart = getattr(self.server, "restart_server", None)
            if restart is None:
                raise ApiError("invalid_request_error", "sentinel does not supervise the upstream.")
            restart()
            return await ex.respond(202, {"status": self.server.state.status.value})
        if ex.path in ("/v1/messages", "/v1/messages/count_tokens"):
            if ex.method != "POST":
                raise ApiError("invalid_request_error", f"Method {ex.method} is not allowed on {ex.path}.",
                               status=405)
            self._authenticate(ex)
            raw = await ex.read_body(self.config.listen.max_body_bytes)
            # The parsed body is not kept here: a queued request holds only its bytes.
            if ex.path == "/v1/messages":
                return await self._messages(ex, raw, _parse(raw))
            return await self._count_tokens(ex, raw, _parse(raw))
        raise ApiError("not_found_error", f"Not found: {ex.method} {ex.path}")

    def _authenticate(self, ex: Exchange) -> None:
        expected = self.config.listen.api_key
        if not expected:
            return
        presented = ex.header(b"x-api-key") or (ex.header(b"authorization") or "").removeprefix("Bearer ")
        if not secrets.compare_digest(presented.encode(), expected.encode()):
            raise ApiError("authentication_error", "invalid x-api-key")

    def health(self) -> dict[str, Any]:
        state = self.server.state
        current = self.channel.current
        return {
            "status": "ok" if state.ready else state.status.value,
            "upstream": {"status": state.status.value, "generation": state.generation,
                         "pid": state.pid, "detail": state.detail},
            "queue": {"depth": self.channel.depth, "limit": self.channel.queue_limit,
                      "in_flight": current.id if current else None,
                      "max_in_flight": self.channel.max_in_flight},
            "requests": dict(self.counts),
        }

    def _models(self) -> dict[str, Any]:
        model = {"type": "model", "id": self.model_name, "display_name": self.model_name,
                 "created_at": "1970-01-01T00:00:00Z"}
        return {"data": [model], "has_more": False, "first_id": self.model_name,
                "last_id": self.model_name}

    # -- /v1/messages ---------------------------------------------------------

    async def _messages(self, ex: Exchange, raw: bytes, body: dict[str, Any]) -> None:
        request_class = classify(body)
        stream = body.get("stream") is True
        ex.facts.update(cls=request_class.value, model=body.get("model"),
                        tools=len(body.get("tools") or []), bytes=len(raw), fp=None,
                        session=ex.header(b"x-claude-code-session-id"))
        self.counts[request_class.value] = self.counts.get(request_class.value, 0) + 1
        job: Job | None = None
        try:
            if request_class.is_background and self.config.triage.policy(request_class.value) == "synthesize":
                ex.facts["synth"] = True
                return await _synthesize(ex, request_class, body, stream)
            requested = body.get("max_tokens")
            capped = bool(self.max_tokens and isinstance(requested, int) and requested > self.max_tokens)
            if capped:
                raw = orjson.dumps({**body, "max_tokens": self.max_tokens})
            del body  # parsed, a 90 KB request is ~3x its size; while it waits, only its bytes are needed
            job = self._submit(ex, raw, stream)
            # Stopping at sentinel's own cap is not the client's max_tokens: report it
            # as the end of the turn, or Claude Code says its 32000-token limit was hit.
            ex.rewrite_stop = capped
            await self._relay(ex, job, stream)
        finally:
            # For the log line: worked out once answered, off the first byte's path
            # (a job may have worked it out already, for the quarantine or the journal).
            ex.facts["fp"] = (job.fingerprint if job else fingerprint(raw))[:12]

    def _submit(self, ex: Exchange, raw: bytes, stream: bool) -> Job:
        if self.draining:
            raise overloaded("sentinel is shutting down; retry shortly.", retry_after=5)
        if self.server.state.status is Status.FAILED:
            raise ApiError("api_error", self.server.state.detail, status=503)
        try:
            job = self.channel.submit(ex.id, raw, stream)
        except QueueFull:
            retry = self.config.channel.retry_after
            raise overloaded(f"sentinel's queue is full ({self.channel.queue_limit} waiting); "
                             "retry shortly.", retry_after=retry) from None
        ex.facts["queue"] = job.position
        return job

    async def _relay(self, ex: Exchange, job: Job, stream: bool) -> None:
        error: ApiError | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_disconnect, ex, nursery.cancel_scope)
                try:
                    await (self._relay_stream if stream else self._relay_json)(ex, job)
                except ApiError as e:
                    error = e  # raised outside the nursery, not wrapped in a group
                nursery.cancel_scope.cancel()
        finally:
            job.sink = None  # nothing more to this response once its handler is done
            self.channel.abandon(job)
            job.receive.close()
            if job.attempt > 1:
                ex.facts["attempts"] = job.attempt  # replayed over a crash
        if error is not None:
            raise error

    async def _relay_json(self, ex: Exchange, job: Job) -> None:
        head: Head | None = None
        async for item in job.receive:
            if isinstance(item, ApiError):
                raise item
            if isinstance(item, Head):
                head = item
                continue
            if head is None or head.status != 200:
                raise from_upstream(head.status if head else 502, item)
            return await ex.respond(200, ex.rewritten(item), [(b"content-type", head.content_type.encode())])
        raise overloaded("The model server gave no response; retry shortly.")

    async def _relay_stream(self, ex: Exchange, job: Job) -> None:
        interval = self.config.channel.ping_interval
        head: Head | None = None
        deadline = trio.current_time() + interval
        while True:
            with trio.move_on_at(deadline) as waiting:
                try:
                    item = await job.receive.receive()
                except trio.EndOfChannel:
                    break
            if waiting.cancelled_caught:
                if job.sink is not None and trio.current_time() - job.last_progress < interval:
                    deadline = job.last_progress + interval  # the worker is writing: not silent
                    continue
                # Silent upstream (queue or prefill): commit early and keep the client's watchdog fed.
                if ex.status is None:
                    await ex.start_stream()
                await ex.body(_sse.PING, more=True)
                deadline += interval
                continue
            deadline = trio.current_time() + interval
            if isinstance(item, ApiError):
                raise item
            if isinstance(item, Head):  # a replay after a crash sends another
                head = item
                if head.status == 200 and ex.status is None:
                    await ex.start_stream()
            elif head is None or head.status != 200:
                raise from_upstream(head.status if head else 502, item)
            else:
                await ex.body(ex.rewritten(item), more=True)
            if head.status == 200 and job.sink is None:
                # From here the worker writes the events itself.
                job.hand_sink(lambda events: ex.body(ex.rewritten(events), more=True))
        if ex.status is None:
            raise overloaded("The model server gave no response; retry shortly.")
        await ex.body(b"")

    # -- /v1/messages/count_tokens -------------------------------------------

    async def _count_tokens(self, ex: Exchange, raw: bytes, body: dict[str, Any]) -> None:
        ex.facts.update(cls="count_tokens", tools=len(body.get("tools") or []), bytes=len(raw))
        self.counts["count_tokens"] = self.counts.get("count_tokens", 0) + 1
        settings = self.config.count_tokens
        count = None
        if settings.mode == "upstream" and self.server.state.ready:
            # Bounded in time and in concurrency: /context sends 14 at once, and
            # a slow tokenizer must never hold the user up.
            with trio.move_on_after(settings.timeout):
                try:
                    async with self._count_limiter:
                        count = await self.server.upstream.count_tokens(raw, settings.timeout)
                    ex.facts["counter"] = "upstream"
                except (httpx.HTTPError, ValueError) as e:
                    log.debug("%s upstream count_tokens failed (%s)", ex.id, type(e).__name__)
        if count is None:
            count = _tokens.estimate_input_tokens(body)
            ex.facts["counter"] = "estimate"
        await ex.respond(200, {"input_tokens": count})

    # -- logging --------------------------------------------------------------

    def _log(self, ex: Exchange) -> None:
        now = trio.current_time()
        ttfb = f"{(ex.first_byte_at - ex.started_at) * 1000:.1f}ms" if ex.first_byte_at else "-"
        fields = [ex.id, ex.method, ex.path]
        fields += [f"{key}={value}" for key, value in ex.facts.items() if value is not None]
        fields += [f"status={ex.status or '-'}", f"ttfb={ttfb}",
                   f"total={(now - ex.started_at) * 1000:.1f}ms"]
        log.info(" ".join(fields))


async def _synthesize(ex: Exchange, request_class: RequestClass, body: dict[str, Any], stream: bool) -> None:
    text = _synth.reply_text(request_class, body)
    if stream:
        # The whole event stream is known, so it goes with a content-length:
        # two writes to the socket instead of three (head, body, last chunk),
        # on a path that is mostly hypercorn and syscalls.
        ex.streaming = True
        await ex.respond(200, _synth.sse_events(body, text), _SSE_HEADERS)
    else:
        await ex.respond(200, _synth.message(body, text))


async def _watch_disconnect(ex: Exchange, scope: trio.CancelScope) -> None:
    while True:
        message = await ex.receive()
        if message["type"] == "http.disconnect":
            if not ex.finished:
                ex.facts["error"] = "client_gone"
                scope.cancel()
            return


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
