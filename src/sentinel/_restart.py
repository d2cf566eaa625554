"""The restart policy, sans I/O: backoff between restarts, and the crash-loop breaker.

Both take the time as an argument, so they are tested without a clock::

    backoff.next_delay(now)    0.5, 1, 2, 4, ... capped at 30 s; back to 0.5 s
                               once the server has run healthy for 60 s
    breaker.crashed(now)       True when more than K crashes fell within W s
                               with no request completing in between
"""

from __future__ import annotations

import collections

import attrs

__all__ = ["Backoff", "CrashLoopBreaker", "Quarantine"]


@attrs.define
class Backoff:
    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    #: Healthy running this long resets the delay to ``initial``.
    reset_after: float = 60.0
    _next: float | None = attrs.field(default=None, init=False)
    _healthy_since: float | None = attrs.field(default=None, init=False)

    def healthy(self, now: float) -> None:
        """The server became ready at ``now``."""
        self._healthy_since = now

    def next_delay(self, now: float) -> float:
        """The delay before the next restart, for a crash at ``now``."""
        if self._healthy_since is not None and now - self._healthy_since >= self.reset_after:
            self._next = None
        self._healthy_since = None
        delay = self.initial if self._next is None else self._next
        self._next = min(delay * self.factor, self.cap)
        return delay


@attrs.define
class CrashLoopBreaker:
    max_crashes: int = 5
    window: float = 120.0
    _crashes: collections.deque[float] = attrs.field(factory=collections.deque, init=False)

    def request_completed(self) -> None:
        """A request completed: the server is doing useful work, not looping."""
        self._crashes.clear()

    def crashed(self, now: float) -> bool:
        """Record a crash; True if this one trips the breaker."""
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self.window:
            self._crashes.popleft()
        return len(self._crashes) > self.max_crashes

    def reset(self) -> None:
        self._crashes.clear()


@attrs.define
class Quarantine:
    """Fingerprints of requests that crashed the server, each until a deadline."""

    duration: float = 600.0
    _until: dict[str, tuple[float, str]] = attrs.field(factory=dict, init=False)

    def __bool__(self) -> bool:
        return bool(self._until)

    def add(self, fingerprint: str, cause: str, now: float) -> None:
        self._until[fingerprint] = (now + self.duration, cause)

    def cause(self, fingerprint: str, now: float) -> str | None:
        """Why ``fingerprint`` is quarantined, or None if it is not (any more)."""
        entry = self._until.get(fingerprint)
        if entry is None:
            return None
        if now >= entry[0]:
            del self._until[fingerprint]
            return None
        return entry[1]
