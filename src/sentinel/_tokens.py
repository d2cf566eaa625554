"""A local estimate of ``input_tokens``, for when the upstream cannot count.

It counts every part of a request that reaches the model: the system prompt,
each tool's name, description and schema, and every message block (text,
tool_use inputs, tool_result contents, thinking). The rate of about four
bytes of UTF-8 per token is the usual figure for English and code with BPE
tokenizers; the estimate is meant for ``/context``'s proportions, not billing.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["estimate_input_tokens"]

_BYTES_PER_TOKEN = 4.0
_PER_MESSAGE = 4  # role markers and separators in a chat template
_PER_TOOL = 8


def _text_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if value is None:
        return 0
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def _block_bytes(block: Any) -> int:
    if isinstance(block, str):
        return _text_bytes(block)
    if not isinstance(block, dict):
        return 0
    kind = block.get("type")
    if kind == "text":
        return _text_bytes(block.get("text"))
    if kind == "thinking":
        return _text_bytes(block.get("thinking"))
    if kind == "tool_use":
        return _text_bytes(block.get("name")) + _text_bytes(block.get("input"))
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return sum(_block_bytes(part) for part in content)
        return _text_bytes(content)
    # Images, documents and unknown blocks: count what they carry.
    return _text_bytes({k: v for k, v in block.items() if k not in ("type", "cache_control")})


def _content_bytes(content: Any) -> int:
    if isinstance(content, list):
        return sum(_block_bytes(block) for block in content)
    return _block_bytes(content)


def estimate_input_tokens(body: dict[str, Any]) -> int:
    total = _content_bytes(body.get("system"))
    tools = body.get("tools") or []
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict):
            total += _text_bytes(tool.get("name")) + _text_bytes(tool.get("description"))
            total += _text_bytes(tool.get("input_schema"))
    messages = body.get("messages") or []
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict):
            total += _content_bytes(message.get("content"))
    overhead = _PER_MESSAGE * len(messages) + _PER_TOOL * len(tools)
    return max(1, round(total / _BYTES_PER_TOKEN) + overhead)
