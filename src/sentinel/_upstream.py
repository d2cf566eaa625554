"""The HTTP client to llama-server: one place that knows its URLs and its key.

Forwarded requests go through :class:`~sentinel._forward.ForwardTransport`;
the side calls (count_tokens, health, metrics) through a small pooled
``httpx`` client. Timeouts: connecting is bounded, reading a forwarded
response is not, since a prefill on a big model can be silent for many
minutes. The serial channel bounds a request by cancellation instead, and
leaving ``messages()`` early closes the connection so llama-server stops
generating and frees its slot.
"""

from __future__ import annotations

import re
from contextlib import asynccontextmanager
from typing import AsyncIterator

import attrs
import httpx

from ._forward import ForwardTransport

__all__ = ["Upstream"]

_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=5.0)
_METRIC_LINE = re.compile(rb"^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})?\s+([-+0-9.eE]+|NaN)$", re.M)


@attrs.define(eq=False)
class Upstream:
    """A llama-server at ``base_url``, reached with ``api_key`` if it has one."""

    base_url: str
    api_key: str = ""
    #: Replaces the network for every call, forwarding included (tests script it).
    transport: httpx.AsyncBaseTransport | None = None
    _client: httpx.AsyncClient | None = attrs.field(default=None, init=False)
    _forward: ForwardTransport = attrs.field(factory=ForwardTransport, init=False)
    #: The forwarded request's URL and headers, built once per address: parsing
    #: them anew cost ~13 µs of every first byte (more with a cold cache).
    _messages_url: httpx.URL = attrs.field(init=False)
    _messages_headers: httpx.Headers = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.move(self.base_url)
        self._messages_headers = httpx.Headers({
            "content-type": "application/json", "accept-encoding": "identity",
            "user-agent": "sentinel", **self._auth()})

    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def client(self) -> httpx.AsyncClient:
        # Created lazily, inside trio.run, as httpx requires.
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=self._auth(),
                timeout=_TIMEOUT,
                transport=self.transport,
                # A reused connection saves ~0.5 ms a call (/context sends 14
                # count_tokens at once). Few are kept, and briefly (llama-server's
                # own keep-alive is 5 s): each idle one holds one of its HTTP threads.
                limits=httpx.Limits(max_keepalive_connections=2, keepalive_expiry=1.0),
            )
        return self._client

    def move(self, base_url: str) -> None:
        """Point at a restarted server. Requests in flight to the old one are not
        disturbed (they fail on their own, as that server is gone), and the next
        one connects to the new address."""
        self.base_url = base_url
        self._messages_url = httpx.URL(f"{base_url}/v1/messages")
        if self._client is not None:
            self._client.base_url = base_url

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @asynccontextmanager
    async def messages(self, body: bytes) -> AsyncIterator[httpx.Response]:
        """POST ``/v1/messages``; the response is open until the block ends.

        This is the hot path: it goes straight to a transport, on a fresh
        connection, without the client's pool, redirects, cookies and hooks.
        """
        request = httpx.Request("POST", self._messages_url, content=body, headers=self._messages_headers)
        response = await (self.transport or self._forward).handle_async_request(request)
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
