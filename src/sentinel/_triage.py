"""Which requests are housekeeping: classification by content, sans I/O.

Claude Code 2.1.197 sends its session-title call under the main model's name,
so the model name proves nothing: a request is classified by what it asks.
Only calls whose answer is cosmetic, or has a safe neutral answer, are
background classes. Anything that needs the model's judgement is ``REAL``:
``/compact`` summaries, subagents (which carry tools), and prompts applied to
fetched web content.
"""

from __future__ import annotations

import enum
from typing import Any, Iterator

__all__ = ["RequestClass", "classify", "texts", "system_texts", "last_user_text", "schema_properties"]


class RequestClass(enum.Enum):
    REAL = "real"
    TITLE = "title"
    HAIKU = "haiku"
    BASH_PREFIX = "bash_prefix"
    QUOTA = "quota"

    @property
    def is_background(self) -> bool:
        return self is not RequestClass.REAL


_TITLE_MARKERS = (
    "generate a concise, sentence-case title",
    "isnewtopic",
    "analyze if this message indicates a new conversation topic",
)
_BASH_PREFIX_MARKERS = (
    "<policy_spec>",
    "command prefix",
    "command_injection_detected",
)
_NEEDS_JUDGEMENT_MARKERS = (
    "web page content:",  # WebFetch applies the user's prompt to a fetched page
    "critical: respond with text only",  # /compact
)


def texts(content: Any) -> Iterator[str]:
    """Every text string in a ``content`` or ``system`` value (str or blocks)."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for block in content:
            if isinstance(block, dict):
                text = block.get("text")
                if isinstance(text, str):
                    yield text
                elif "content" in block:  # tool_result
                    yield from texts(block["content"])
            elif isinstance(block, str):
                yield block


def system_texts(body: dict[str, Any]) -> list[str]:
    return list(texts(body.get("system")))


def last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return "\n".join(texts(message.get("content")))
    return ""


def schema_properties(body: dict[str, Any]) -> dict[str, Any]:
    output_config = body.get("output_config")
    fmt = output_config.get("format") if isinstance(output_config, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return {}
    schema = fmt.get("schema")
    properties = schema.get("properties") if isinstance(schema, dict) else None
    return properties if isinstance(properties, dict) else {}


def classify(body: dict[str, Any]) -> RequestClass:
    """The class of one ``/v1/messages`` body. Pure; never raises on odd shapes."""
    if body.get("tools"):
        # A tool-using call is an agent at work (the main loop or a subagent).
        return RequestClass.REAL
    system = "\n".join(system_texts(body)).lower()
    user = last_user_text(body).lower()
    if any(marker in user or marker in system for marker in _NEEDS_JUDGEMENT_MARKERS):
        return RequestClass.REAL

    properties = schema_properties(body)
    if "title" in properties and set(properties) <= {"title", "isNewTopic"}:
        return RequestClass.TITLE
    if any(marker in system for marker in _TITLE_MARKERS):
        return RequestClass.TITLE
    if any(marker in system or marker in user for marker in _BASH_PREFIX_MARKERS):
        return RequestClass.BASH_PREFIX
    if body.get("max_tokens") == 1:
        return RequestClass.QUOTA
    model = body.get("model")
    if isinstance(model, str) and "haiku" in model.lower():
        return RequestClass.HAIKU
    return RequestClass.REAL
