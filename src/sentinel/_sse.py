"""Server-sent events, sans I/O: framing an upstream byte stream, and encoding.

Sentinel forwards the upstream's events as the exact bytes it received, one
whole event at a time, so it never re-serialises a model's output and never
splits an event when it inserts a ``ping`` or an ``error`` of its own.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["EventFramer", "encode", "event_name", "PING"]


def encode(event: str, data: Any) -> bytes:
    """One SSE event: ``event: NAME`` and a single-line JSON ``data``."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


PING = encode("ping", {"type": "ping"})


def event_name(event: bytes) -> str | None:
    """The ``event:`` field of one framed event, or None if it has none."""
    for line in event.splitlines():
        if line.startswith(b"event:"):
            return line[6:].strip().decode("utf-8", "replace")
    return None


class EventFramer:
    """Split a byte stream into whole SSE events (each ending with a blank line).

    ``feed`` returns the events completed by the new bytes; a partial event is
    kept until its end arrives. ``\\r\\n`` line endings are accepted, since the
    SSE grammar allows them.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._buffer + chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        events = data.split(b"\n\n")
        self._buffer = events.pop()
        return [event + b"\n\n" for event in events if event.strip()]

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has not ended yet."""
        return self._buffer
