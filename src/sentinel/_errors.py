"""Anthropic-shaped errors, and the one place llama.cpp's errors are translated.

Every failure a client sees goes through :class:`ApiError`::

    ApiError                      an HTTP status, an Anthropic error type, a message
    ├── invalid_request_error     400  bad JSON, missing fields, prompt too long
    ├── authentication_error      401  wrong key for sentinel itself
    ├── not_found_error           404  unknown path
    ├── request_too_large         413  body over the limit
    ├── api_error                 500/502/503  upstream broke or is not ready
    └── overloaded_error          529  queue full, upstream busy: clients retry

Claude Code retries 529 and 5xx, honours ``retry-after`` and ``x-should-retry``,
and compacts the conversation when a message says ``prompt is too long: N
tokens > M``. The translation below is written for those behaviours.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

__all__ = ["ApiError", "from_upstream", "STATUS_BY_TYPE"]

STATUS_BY_TYPE: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


@attrs.define
class ApiError(Exception):
    """An error to send to the client, as an HTTP response or an SSE event."""

    type: str
    message: str
    status: int = attrs.field()
    retry_after: int | None = None
    should_retry: bool | None = None

    @status.default
    def _status_from_type(self) -> int:
        return STATUS_BY_TYPE.get(self.type, 500)

    def body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        if self.should_retry is not None:
            headers.append((b"x-should-retry", b"true" if self.should_retry else b"false"))
        return headers

    def sse_event(self) -> bytes:
        """The error as an SSE ``error`` event, for a stream already committed."""
        return b"event: error\ndata: " + self.body_bytes() + b"\n\n"


def overloaded(message: str, retry_after: int | None = None) -> ApiError:
    return ApiError("overloaded_error", message, retry_after=retry_after)


# llama.cpp's error types, as its server/utils report them, mapped to Anthropic's.
_TYPE_FROM_LLAMA: dict[str, str] = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "api_error",  # sentinel holds the key: a mismatch is ours
    "permission_error": "api_error",
    "not_found_error": "not_found_error",
    "server_error": "api_error",
    "not_supported_error": "invalid_request_error",
    "unavailable_error": "overloaded_error",  # 503 while the model loads
    "exceed_context_size_error": "invalid_request_error",
}


def from_upstream(status: int, body: bytes) -> ApiError:
    """Translate an upstream error response into the Anthropic envelope.

    An Anthropic-shaped body passes through as is. A llama.cpp body
    (``{"error": {"code", "message", "type"}}``) is mapped by type, and a
    context overflow becomes ``prompt is too long: N tokens > M maximum``, the
    wording that makes Claude Code compact the conversation.
    """
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        text = body[:200].decode("utf-8", "replace").strip() or "no body"
        return ApiError(_type_from_status(status), f"upstream answered HTTP {status}: {text}",
                        status=_client_status(status))

    llama_type = str(error.get("type", ""))
    message = str(error.get("message", "")) or f"upstream answered HTTP {status}"
    if payload.get("type") == "error" and llama_type in STATUS_BY_TYPE:
        return ApiError(llama_type, message, status=_client_status(status))
    if llama_type == "exceed_context_size_error" or "exceeds the available context" in message:
        n_prompt, n_ctx = error.get("n_prompt_tokens"), error.get("n_ctx")
        if isinstance(n_prompt, int) and isinstance(n_ctx, int):
            message = f"prompt is too long: {n_prompt} tokens > {n_ctx} maximum"
        return ApiError("invalid_request_error", message, status=400)
    if llama_type in _TYPE_FROM_LLAMA:
        anthropic_type = _TYPE_FROM_LLAMA[llama_type]
    else:
        anthropic_type = _type_from_status(status)
    if anthropic_type == "overloaded_error":
        return overloaded(message, retry_after=1)
    if status == 500 and _looks_like_bad_input(message):
        # llama.cpp reports many malformed requests as 500 server_error.
        return ApiError("invalid_request_error", message, status=400)
    return ApiError(anthropic_type, message, status=_client_status(status))


def _looks_like_bad_input(message: str) -> bool:
    lowered = message.lower()
    return "is required" in lowered or "parse error" in lowered or "invalid" in lowered


def _type_from_status(status: int) -> str:
    if status in (503, 529):
        return "overloaded_error"
    for anthropic_type, code in STATUS_BY_TYPE.items():
        if code == status:
            return anthropic_type
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def _client_status(status: int) -> int:
    if status == 401 or status == 403:
        return 500  # the client's key is not the upstream's: this is sentinel's fault
    return status if 400 <= status < 600 else 502
