"""Synthesized replies for background calls, sans I/O.

A synthesized reply has the exact shape Claude Code parses, in the mode it
asked for: a JSON message, or a complete SSE sequence from ``message_start``
to ``message_stop``. Titles are made from the user's own words, so a session
list stays readable without a round trip to the model.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from . import _sse
from ._triage import RequestClass, schema_properties, last_user_text

__all__ = ["reply_text", "message", "sse_events", "estimate_output_tokens"]

_SESSION = re.compile(r"<session>\s*(.*?)\s*</session>", re.S)
_NOISE = re.compile(r"<system-reminder>.*?</system-reminder>", re.S)
_WORD = re.compile(r"[^\W_][\w'’./-]*", re.U)
_TITLE_WORDS = 7  # the prompt asks for 3-7 words


def title_from(text: str) -> str:
    """A short sentence-case title made of the first words the user wrote."""
    match = _SESSION.search(text)
    text = match.group(1) if match else _NOISE.sub(" ", text)
    words = _WORD.findall(text)[:_TITLE_WORDS]
    if not words:
        return "New session"
    title = " ".join(words).rstrip(".-/")
    return title[:1].upper() + title[1:]


def reply_text(request_class: RequestClass, body: dict[str, Any]) -> str:
    """The text of the synthesized answer to one background request."""
    if request_class is RequestClass.TITLE:
        title = title_from(last_user_text(body))
        properties = schema_properties(body)
        system = json.dumps(body.get("system", "")).lower()
        if "isNewTopic" in properties or "isnewtopic" in system:
            return json.dumps({"isNewTopic": True, "title": title})
        return json.dumps({"title": title})
    if request_class is RequestClass.BASH_PREFIX:
        return "none"  # no prefix: Claude Code asks about the full command
    if request_class is RequestClass.QUOTA:
        return "ok"
    return ""  # a haiku-named call with nothing safer to say


def estimate_output_tokens(text: str) -> int:
    return max(1, len(text) // 4) if text else 0


def _message_id() -> str:
    return "msg_sentinel_" + uuid.uuid4().hex[:24]


def message(body: dict[str, Any], text: str) -> dict[str, Any]:
    """A complete non-streaming Messages API response carrying ``text``."""
    return {
        "id": _message_id(),
        "type": "message",
        "role": "assistant",
        "model": body.get("model") or "sentinel",
        "content": [{"type": "text", "text": text}] if text else [],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": estimate_output_tokens(text)},
    }


def sse_events(body: dict[str, Any], text: str) -> bytes:
    """The same reply as a full SSE sequence, as one buffer."""
    start = message(body, "")
    start["stop_reason"] = None
    start["usage"]["output_tokens"] = 0
    events = [_sse.encode("message_start", {"type": "message_start", "message": start})]
    if text:
        events += [
            _sse.encode("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}}),
            _sse.encode("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": text}}),
            _sse.encode("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ]
    events += [
        _sse.encode("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                      "usage": {"output_tokens": estimate_output_tokens(text)}}),
        _sse.encode("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(events)
