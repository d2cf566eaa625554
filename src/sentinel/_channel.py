"""The strictly serial forwarding channel and its single worker.

Invariant: **the upstream never sees two requests at once.** One worker task
takes jobs in FIFO order and holds at most one upstream connection. Each job
talks back to the front end through its own memory channel:

    Head(status, content_type)   once, when the upstream answers
    bytes                        the body: whole SSE events, or one JSON body
    ApiError                     a failure, instead of or after the above

A job whose client leaves while queued is removed from the queue. One whose
client leaves in flight has its cancel scope cancelled, which closes the
upstream connection so llama-server stops generating and frees its slot.
"""

from __future__ import annotations

import collections
import logging
from typing import Protocol

import attrs
import httpx
import trio

from . import _sse
from ._errors import ApiError, overloaded
from ._supervisor import ServerState
from ._upstream import Upstream

__all__ = ["Head", "Job", "QueueFull", "SerialChannel", "Server"]

log = logging.getLogger("sentinel.channel")

_JOB_BUFFER = 64  # events in flight between the worker and one client
_STALE_CONNECTION = (httpx.RemoteProtocolError,)  # "disconnected without sending a response"


class Server(Protocol):
    """What the worker needs of a supervisor: its state and a client to it."""

    state: ServerState
    upstream: Upstream

    def report_failure(self, error: Exception) -> None:
        """The worker saw a transport failure talking to the upstream."""


@attrs.frozen
class Head:
    status: int
    content_type: str


class QueueFull(Exception):
    pass


@attrs.define(eq=False)
class Job:
    id: str
    body: bytes
    stream: bool
    #: Requests ahead of this one when it was queued, the one in flight included.
    position: int = 0
    state: str = "queued"  # queued, running, done
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _send: trio.MemorySendChannel = attrs.field(init=False)
    receive: trio.MemoryReceiveChannel = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self.receive = trio.open_memory_channel(_JOB_BUFFER)

    async def put(self, item: Head | bytes | ApiError) -> None:
        """Hand one item to the client; raises BrokenResourceError if it left."""
        await self._send.send(item)

    def finish(self) -> None:
        self.state = "done"
        self._send.close()


@attrs.define(eq=False)
class SerialChannel:
    server: Server
    queue_limit: int = 32
    _queue: collections.deque[Job] = attrs.field(factory=collections.deque, init=False)
    _wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)
    current: Job | None = attrs.field(default=None, init=False)
    #: Upstream requests ever open at once; the invariant says this stays at 1.
    in_flight: int = attrs.field(default=0, init=False)
    max_in_flight: int = attrs.field(default=0, init=False)

    @property
    def depth(self) -> int:
        """Jobs waiting, not counting the one in flight."""
        return len(self._queue)

    def submit(self, job_id: str, body: bytes, stream: bool) -> Job:
        if len(self._queue) >= self.queue_limit:
            raise QueueFull
        job = Job(job_id, body, stream, position=len(self._queue) + (self.current is not None))
        self._queue.append(job)
        self._wakeup.set()
        return job

    def abandon(self, job: Job) -> None:
        """The client left: drop the job if queued, cancel it if in flight."""
        if job.state == "queued":
            self._queue.remove(job)
            job.finish()
        elif job.state == "running":
            job.cancel_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
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
            finally:
                self.current = None
                job.finish()

    async def _serve(self, job: Job) -> None:
        for attempt in (1, 2):
            await self.server.state.wait_ready()
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            answered = False
            try:
                async with self.server.upstream.messages(job.body) as response:
                    answered = True
                    content_type = response.headers.get("content-type", "")
                    await job.put(Head(response.status_code, content_type))
                    if response.status_code == 200 and content_type.startswith("text/event-stream"):
                        await self._relay_events(job, response)
                    else:
                        await job.put(await response.aread())
                return
            except trio.BrokenResourceError:
                log.info("%s client left; upstream request closed", job.id)
                return
            except httpx.TransportError as e:
                if attempt == 1 and not answered and isinstance(e, _STALE_CONNECTION):
                    # The server closed a kept-alive connection as we reused it:
                    # nothing was processed, so sending again is safe.
                    log.info("%s upstream connection was stale (%s); resending", job.id,
                             type(e).__name__)
                    continue
                log.warning("%s upstream failed: %s", job.id, type(e).__name__)
                self.server.report_failure(e)
                await self._put_quietly(job, overloaded(
                    "The model server failed during this request; retry shortly.", retry_after=1))
                return
            finally:
                self.in_flight -= 1

    async def _relay_events(self, job: Job, response: httpx.Response) -> None:
        framer = _sse.EventFramer()
        finished = False
        async for chunk in response.aiter_raw():
            for event in framer.feed(chunk):
                finished = finished or _sse.event_name(event) in ("message_stop", "error")
                await job.put(event)
        if not finished:
            await job.put(overloaded("The model server ended the stream early; retry shortly."))

    @staticmethod
    async def _put_quietly(job: Job, item: ApiError) -> None:
        try:
            await job.put(item)
        except trio.BrokenResourceError:
            pass
