"""The strictly serial forwarding channel and its single worker.

Invariant: **the upstream never sees two requests at once.** One worker task
takes jobs in FIFO order and holds at most one upstream connection. Each job
talks back to the front end through its own memory channel:

    Head(status, content_type)   when the upstream answers
    bytes                        the body: whole SSE events, or one JSON body
    ApiError                     a failure, instead of or after the above

Once the client's 200 is committed and everything before it written, the
front end may hand the job a ``sink``: the worker then writes the stream's
events to the client itself, one task switch less on each event's way
(about 0.1 ms of the first byte in a timestamped trace against the real
model). Heads and errors still go through the memory channel, after the
events the worker has written.

A job whose client leaves while queued is removed from the queue. One whose
client leaves in flight has its cancel scope cancelled, which closes the
upstream connection so llama-server stops generating and frees its slot.

**Replay.** When the server dies under a request, the worker keeps the job at
the head of the queue, waits for the supervisor's restarted server, and sends
it again, as long as no content has reached the client (pings and a
``message_start`` don't count; the replay's duplicate ``message_start`` is
dropped). After content, the stream ends with an ``overloaded_error`` event,
which Claude Code retries. A request that crashes the server on
``max_replays + 1`` tries is given up on, and its fingerprint quarantined.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
from typing import Awaitable, Callable, Protocol

import attrs
import httpx
import orjson
import trio

from . import _sse
from ._config import RecoveryConfig
from ._errors import ApiError, overloaded
from ._journal import Journal
from ._restart import Quarantine
from ._supervisor import ServerFailed, ServerState
from ._upstream import Upstream

__all__ = ["Head", "Job", "QueueFull", "SerialChannel", "Server", "fingerprint"]

log = logging.getLogger("sentinel.channel")

_JOB_BUFFER = 64  # events in flight between the worker and one client


class Server(Protocol):
    """What the worker needs of a supervisor."""

    state: ServerState
    upstream: Upstream

    def report_failure(self, error: Exception) -> None:
        """A transport failure talking to the upstream."""

    def report_stall(self) -> None:
        """A request has had no bytes for ``stall_timeout``."""

    def request_completed(self) -> None:
        """A request completed: the server does useful work."""

    async def confirm_crash(self, generation: int) -> bool:
        """Is server ``generation`` dead (or being killed as hung)?"""


@attrs.frozen
class Head:
    status: int
    content_type: str


class QueueFull(Exception):
    pass


class _UpstreamBroke(Exception):
    """The upstream failed under a request (transport error or a cut stream)."""

    def __init__(self, cause: Exception | str) -> None:
        super().__init__(str(cause))
        self.cause = cause


@attrs.define(eq=False)
class Job:
    id: str
    body: bytes
    stream: bool
    #: Requests ahead of this one when it was queued, the one in flight included.
    position: int = 0
    state: str = "queued"  # queued, running, done
    attempt: int = 0
    crashes: int = 0
    bytes_sent: int = 0
    #: Whether anything beyond message_start and pings has reached the client.
    content_sent: bool = False
    message_start_sent: bool = False
    last_progress: float = 0.0
    attempt_generation: int = 0
    attempt_scope: trio.CancelScope | None = None
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: Writes a stream's events straight to the client; set by the front end.
    sink: Callable[[bytes], Awaitable[None]] | None = None
    _send: trio.MemorySendChannel = attrs.field(init=False)
    receive: trio.MemoryReceiveChannel = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self.receive = trio.open_memory_channel(_JOB_BUFFER)

    async def put(self, item: Head | bytes | ApiError) -> None:
        """Hand one item to the client; raises BrokenResourceError if it left."""
        await self._send.send(item)
        if isinstance(item, bytes):
            self.bytes_sent += len(item)

    async def put_events(self, events: bytes) -> None:
        """Whole SSE events of a 200 stream: written by the sink if there is one."""
        if self.sink is None:
            return await self.put(events)
        await self.sink(events)
        self.bytes_sent += len(events)

    def hand_sink(self, sink: Callable[[bytes], Awaitable[None]]) -> bool:
        """Let the worker write events with ``sink`` from now on, if nothing
        handed over is still waiting to be written (it would be overtaken)."""
        if self.receive.statistics().current_buffer_used:
            return False
        self.sink = sink
        return True

    @functools.cached_property
    def fingerprint(self) -> str:
        """How the journal, the log and the quarantine know a request: see
        :func:`fingerprint`. Worked out only when asked for, so that hashing
        is never on the way of a request the quarantine is empty for."""
        return fingerprint(self.body)

    def finish(self) -> None:
        self.state = "done"
        self._send.close()

    def fail_now(self, error: ApiError) -> None:
        """Stop this job and hand ``error`` to its client, whatever it was doing."""
        try:
            self._send.send_nowait(error)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the client then sees its stream end without message_stop, and retries
        self.cancel_scope.cancel()
        self.finish()

    def facts(self) -> dict[str, object]:
        """What the journal records of the request in flight: no content."""
        return {"request_id": self.id, "fingerprint": self.fingerprint, "attempt": self.attempt,
                "bytes_sent": self.bytes_sent, "request_bytes": len(self.body)}


@attrs.define(eq=False)
class SerialChannel:
    server: Server
    queue_limit: int = 32
    recovery: RecoveryConfig = attrs.field(factory=RecoveryConfig)
    journal: Journal | None = None
    quarantine: Quarantine = attrs.field(init=False)
    _queue: collections.deque[Job] = attrs.field(factory=collections.deque, init=False)
    _wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)
    current: Job | None = attrs.field(default=None, init=False)
    #: Upstream requests ever open at once; the invariant says this stays at 1.
    in_flight: int = attrs.field(default=0, init=False)
    max_in_flight: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.quarantine = Quarantine(self.recovery.quarantine_seconds)

    @property
    def depth(self) -> int:
        """Jobs waiting, not counting the one in flight."""
        return len(self._queue)

    def in_flight_facts(self) -> dict[str, object]:
        return self.current.facts() if self.current is not None else {}

    def submit(self, job_id: str, body: bytes, stream: bool) -> Job:
        if len(self._queue) >= self.queue_limit:
            raise QueueFull
        job = Job(job_id, body, stream, position=len(self._queue) + (self.current is not None))
        if self.quarantine:
            cause = self.quarantine.cause(job.fingerprint, trio.current_time())
            if cause is not None:
                raise _poisoned(cause, self.recovery.max_replays + 1, quarantined=True)
        self._queue.append(job)
        self._wakeup.set()
        return job

    def fail_all(self, error: ApiError) -> None:
        """Answer every job with ``error`` now: queued ones, and the one in flight."""
        for job in [*self._queue, *([self.current] if self.current else [])]:
            job.fail_now(error)
        self._queue.clear()

    def abandon(self, job: Job) -> None:
        """The client left: drop the job if queued, cancel it if in flight."""
        if job.state == "queued":
            self._queue.remove(job)
            job.finish()
        elif job.state == "running":
            job.cancel_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_stalls)
            nursery.start_soon(self._watch_server)
            task_status.started()
            await self._work()

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            job = self._queue.popleft()
            job.state = "running"
            self.current = job
            try:
                with job.cancel_scope:
                    await self._serve(job)
            except trio.BrokenResourceError:
                log.info("%s client left; upstream request closed", job.id)
            except Exception:
                # One request's bug must not stop the worker that serves everyone.
                log.exception("%s failed inside sentinel", job.id)
                job.fail_now(ApiError("api_error", "Internal error in sentinel; see its log."))
            finally:
                self.current = None
                job.finish()

    async def _serve(self, job: Job) -> None:
        """Send ``job`` upstream until it completes, replaying it over crashes."""
        replay_cause: str | None = None
        while True:
            try:
                await self.server.state.wait_ready()
            except ServerFailed as e:
                return await job.put(ApiError("api_error", str(e), status=503))
            generation = self.server.state.generation
            job.attempt += 1
            if replay_cause is not None:
                self._journal("replay", **job.facts(), cause=replay_cause)
                log.info("%s replaying after the server's %s (attempt %d)", job.id, replay_cause,
                         job.attempt)
            try:
                await self._attempt(job)
            except _UpstreamBroke as broke:
                cause = broke.cause if isinstance(broke.cause, Exception) else RuntimeError(str(broke))
                log.warning("%s upstream failed on attempt %d: %s", job.id, job.attempt,
                            type(cause).__name__ if isinstance(broke.cause, Exception) else broke)
                self.server.report_failure(cause)
                crashed = await self.server.confirm_crash(generation)
                if not crashed:
                    # Every request has a connection of its own, so this is the
                    # server's doing, not a kept-alive connection gone stale.
                    return await job.put(overloaded(
                        "The model server dropped the request; retry shortly.", retry_after=1))
                if job.content_sent:
                    # Too late to replay: Claude Code retries an overloaded_error event.
                    return await job.put(overloaded(
                        "The model server failed mid-response; retry the request."))
                job.crashes += 1
                replay_cause = self.server.state.detail or "crash"
                if job.crashes > self.recovery.max_replays:
                    return await self._give_up(job, replay_cause)
                continue
            self.server.request_completed()
            return

    async def _watch_server(self) -> None:
        """End an attempt at once when its server is known to be gone.

        A dead server's connection normally breaks by itself; this makes the
        failure prompt whatever the socket does, so a mid-stream client gets
        its error event within moments of the crash being seen.
        """
        state = self.server.state
        while True:
            await state.wait_changed()
            job = self.current
            if (job is not None and job.attempt_scope is not None
                    and (state.generation != job.attempt_generation or not state.ready)):
                job.attempt_scope.cancel()

    async def _attempt(self, job: Job) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        job.attempt_generation = self.server.state.generation
        job.attempt_scope = trio.CancelScope()
        try:
            with job.attempt_scope:
                await self._send_once(job)
            if job.attempt_scope.cancelled_caught:
                raise _UpstreamBroke("the server went down")
        finally:
            job.attempt_scope = None
            self.in_flight -= 1

    async def _send_once(self, job: Job) -> None:
        job.last_progress = trio.current_time()
        try:
            async with self.server.upstream.messages(job.body) as response:
                job.last_progress = trio.current_time()
                content_type = response.headers.get("content-type", "")
                head = Head(response.status_code, content_type)
                if response.status_code == 200 and content_type.startswith("text/event-stream"):
                    await self._relay_events(job, response, head)
                else:
                    body = await response.aread()  # whole, so a crash mid-body can be replayed
                    await job.put(head)
                    await job.put(body)
        except httpx.TransportError as e:
            raise _UpstreamBroke(e) from None

    async def _relay_events(self, job: Job, response: httpx.Response, head: Head) -> None:
        framer = _sse.EventFramer()
        finished = False
        # The 200 goes on at once, as llama-server itself commits it before its
        # prefill: the client's headers are then out of the way of the first
        # event. A failure from here on is an `error` event (and a poison
        # request's retry without `stream` meets the quarantine).
        await job.put(head)
        async for chunk in response.aiter_raw():
            job.last_progress = trio.current_time()
            ready = []
            for event in framer.feed(chunk):
                name = _sse.event_name(event)
                if name == "message_start":
                    if job.message_start_sent:
                        continue  # a replay's: the client already has one
                    job.message_start_sent = True
                elif name != "ping":
                    job.content_sent = True
                    finished = finished or name in ("message_stop", "error")
                ready.append(event)
            if not ready:
                continue
            # Whole events, all that this read completed, in one write to the
            # client: no event waits for a later one.
            await job.put_events(b"".join(ready))
        if not finished:
            raise _UpstreamBroke("the stream ended before message_stop")

    async def _watch_stalls(self) -> None:
        """A request with no bytes for ``stall_timeout``: ask the supervisor to probe.

        A long prefill is silent too; the supervisor kills the server only if
        its /health does not answer either.
        """
        timeout = self.recovery.stall_timeout
        while True:
            job = self.current
            if job is None or not self.in_flight:
                await trio.sleep(timeout)
                continue
            deadline = job.last_progress + timeout
            if trio.current_time() >= deadline:  # one expression for both tests: no float drift
                log.warning("%s no bytes for %.0f s; probing the server", job.id, timeout)
                self.server.report_stall()
                job.last_progress = trio.current_time()
                deadline = job.last_progress + timeout
            await trio.sleep_until(deadline)

    async def _give_up(self, job: Job, cause: str) -> None:
        tries = job.crashes
        now = trio.current_time()
        self.quarantine.add(job.fingerprint, cause, now)
        reason = f"crashed the server {tries} times in a row ({cause})"
        log.error("%s given up: %s; fingerprint %s quarantined for %.0f s", job.id, reason,
                  job.fingerprint[:12], self.quarantine.duration)
        self._journal("gave_up", reason=reason, **job.facts())
        self._journal("quarantine", fingerprint=job.fingerprint, cause=cause,
                      seconds=self.quarantine.duration, request_id=job.id)
        await job.put(_poisoned(cause, tries))

    def _journal(self, event: str, **fields: object) -> None:
        if self.journal is not None:
            self.journal.record(event, **fields)


def fingerprint(body: bytes) -> str:
    """sha256 of a request's content (a JSON object), whatever its ``stream``.

    After a failed stream Claude Code retries the same body without
    ``stream`` (measured on 2.1.197), so the quarantine must know the two as
    one request. Key order is kept as sent: it is stable for one client.
    """
    content = {key: value for key, value in orjson.loads(body).items() if key != "stream"}
    return hashlib.sha256(orjson.dumps(content)).hexdigest()


def _poisoned(cause: str, tries: int, quarantined: bool = False) -> ApiError:
    detail = ("An identical request recently crashed the model server" if quarantined
              else f"This request crashed the model server {tries} times in a row")
    return ApiError("api_error", f"{detail} ({cause}); not retrying it.", status=500,
                    should_retry=False)
