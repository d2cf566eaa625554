"""Synthesized replies parse as the client expects, in both modes."""

import json

from sentinel import RequestClass
from sentinel._synth import message, reply_text, sse_events, title_from
from conftest import Reply, title_request


def parse_sse(data: bytes):
    reply = Reply(chunks=[data])
    return reply.events()


def test_title_is_json_matching_the_requested_schema():
    body = title_request()
    text = reply_text(RequestClass.TITLE, body)
    parsed = json.loads(text)
    schema = body["output_config"]["format"]["schema"]
    assert set(parsed) == set(schema["required"]) == {"title"}
    assert isinstance(parsed["title"], str)
    assert parsed["title"] == "Hello what files are in this directory"


def test_title_comes_from_the_users_words_in_sentence_case():
    assert title_from("<session>\nfix the flaky login test on CI please now\n</session>") == \
        "Fix the flaky login test on CI"
    assert title_from("   ") == "New session"


def test_older_title_form_gets_is_new_topic():
    body = {"model": "claude-haiku", "system": "... 'isNewTopic' (boolean) and 'title' ...",
            "messages": [{"role": "user", "content": "refactor the parser"}]}
    assert json.loads(reply_text(RequestClass.TITLE, body)) == {
        "isNewTopic": True, "title": "Refactor the parser"}


def test_bash_prefix_answer_is_none():
    assert reply_text(RequestClass.BASH_PREFIX, {"messages": []}) == "none"


def test_json_message_shape():
    body = title_request(stream=False)
    reply = message(body, '{"title": "X"}')
    assert reply["type"] == "message" and reply["role"] == "assistant"
    assert reply["content"] == [{"type": "text", "text": '{"title": "X"}'}]
    assert reply["stop_reason"] == "end_turn"
    assert reply["model"] == body["model"]
    assert set(reply["usage"]) >= {"input_tokens", "output_tokens"}


def test_sse_sequence_is_complete_and_ordered():
    events = parse_sse(sse_events(title_request(), '{"title": "X"}'))
    names = [name for name, _ in events]
    assert names == ["message_start", "content_block_start", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]
    for name, data in events:
        assert data["type"] == name
    assert events[0][1]["message"]["content"] == []
    assert events[2][1]["delta"] == {"type": "text_delta", "text": '{"title": "X"}'}
    assert events[4][1]["delta"]["stop_reason"] == "end_turn"


def test_empty_text_has_no_content_block():
    names = [name for name, _ in parse_sse(sse_events({"model": "m"}, ""))]
    assert names == ["message_start", "message_delta", "message_stop"]
