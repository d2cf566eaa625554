"""The HTTP client to llama-server: one place that knows its URLs and its key.

Timeouts: connecting is bounded, reading is not, since a prefill on a big
model can be silent for many minutes. The serial channel bounds a request by
cancellation instead, and leaving ``stream()`` early closes the connection so
llama-server stops generating and frees its slot.
"""

from __future__ import annotations

import re
from contextlib import asynccontextmanager
from typing import AsyncIterator

import attrs
import httpx

__all__ = ["Upstream"]

_FORWARD_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=60.0, pool=5.0)
_METRIC_LINE = re.compile(rb"^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})?\s+([-+0-9.eE]+|NaN)$", re.M)


@attrs.define(eq=False)
class Upstream:
    """A llama-server at ``base_url``, reached with ``api_key`` if it has one."""

    base_url: str
    api_key: str = ""
    transport: httpx.AsyncBaseTransport | None = None
    _client: httpx.AsyncClient | None = attrs.field(default=None, init=False)

    @property
    def client(self) -> httpx.AsyncClient:
        # Created lazily, inside trio.run, as httpx requires.
        if self._client is None:
            headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                timeout=_FORWARD_TIMEOUT,
                transport=self.transport,
                # A reused connection saves ~0.5 ms a request. Few are kept, and
                # briefly (llama-server's own keep-alive is 5 s): each idle one
                # holds one of its HTTP threads.
                limits=httpx.Limits(max_keepalive_connections=2, keepalive_expiry=1.0),
            )
        return self._client

    def move(self, base_url: str) -> None:
        """Point at a restarted server. Requests in flight to the old one are not
        disturbed (they fail on their own, as that server is gone), and the next
        one connects to the new address."""
        self.base_url = base_url
        if self._client is not None:
            self._client.base_url = base_url

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @asynccontextmanager
    async def messages(self, body: bytes) -> AsyncIterator[httpx.Response]:
        """POST ``/v1/messages``; the response is open until the block ends."""
        request = self.client.build_request(
            "POST", "/v1/messages", content=body,
            headers={"content-type": "application/json", "accept-encoding": "identity"},
        )
        response = await self.client.send(request, stream=True)
        try:
            yield response
        finally:
            await response.aclose()

    async def count_tokens(self, body: bytes, timeout: float) -> int:
        response = await self.client.post(
            "/v1/messages/count_tokens", content=body, timeout=timeout,
            headers={"content-type": "application/json"},
        )
        response.raise_for_status()
        count = response.json().get("input_tokens")
        if not isinstance(count, int):
            raise ValueError("upstream count_tokens answered without input_tokens")
        return count

    async def health(self, timeout: float) -> int:
        """The status of ``GET /health``: 200 ready, 503 loading."""
        response = await self.client.get("/health", timeout=timeout)
        return response.status_code

    async def metrics(self, timeout: float = 5.0) -> dict[str, float]:
        """Prometheus counters from ``/metrics`` (needs ``--metrics``)."""
        response = await self.client.get("/metrics", timeout=timeout)
        response.raise_for_status()
        return parse_metrics(response.content)


def parse_metrics(text: bytes) -> dict[str, float]:
    return {name.decode(): float(value) for name, value in _METRIC_LINE.findall(text)}
