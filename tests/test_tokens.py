from sentinel._tokens import estimate_input_tokens
from conftest import captured_body

BASE = {"messages": [{"role": "user", "content": "hello"}]}


def grows(extra: dict) -> bool:
    return estimate_input_tokens({**BASE, **extra}) > estimate_input_tokens(BASE)


def test_every_part_counts():
    text = "word " * 200
    assert grows({"system": [{"type": "text", "text": text}]})
    assert grows({"tools": [{"name": "Bash", "description": text, "input_schema": {"type": "object"}}]})
    for block in ({"type": "tool_use", "id": "t", "name": "Bash", "input": {"command": text}},
                  {"type": "tool_result", "tool_use_id": "t", "content": text},
                  {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": text}]},
                  {"type": "thinking", "thinking": text, "signature": "s"}):
        assert grows({"messages": [*BASE["messages"], {"role": "assistant", "content": [block]}]}), block


def test_a_context_flood_request_has_a_plausible_size():
    body = captured_body("tool-roundtrip-and-context", 12)  # 9 tools, trimmed descriptions
    assert 500 < estimate_input_tokens(body) < 20000
