"""Upstream errors are translated into the Anthropic envelope."""

import json

import pytest

from sentinel._errors import ApiError, from_upstream


def llama(code, message, kind, **extra):
    return json.dumps({"error": {"code": code, "message": message, "type": kind, **extra}}).encode()


def test_context_overflow_becomes_prompt_is_too_long():
    error = from_upstream(400, llama(400, "request (40024 tokens) exceeds the available context size "
                                     "(32768 tokens), try increasing it", "exceed_context_size_error",
                                     n_prompt_tokens=40024, n_ctx=32768))
    assert error.status == 400
    assert error.body() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "prompt is too long: 40024 tokens > 32768 maximum"}}


def test_loading_is_overloaded_and_retryable():
    error = from_upstream(503, llama(503, "Loading model", "unavailable_error"))
    assert (error.status, error.type) == (529, "overloaded_error")
    assert (b"retry-after", b"1") in error.headers()


@pytest.mark.parametrize("message", ["'messages' is required",
                                     "[json.exception.parse_error.101] parse error at line 1"])
def test_llama_500_for_bad_input_is_a_400(message):
    error = from_upstream(500, llama(500, message, "server_error"))
    assert (error.status, error.type, error.message) == (400, "invalid_request_error", message)


def test_real_server_error_stays_api_error():
    error = from_upstream(500, llama(500, "failed to decode", "server_error"))
    assert (error.status, error.type) == (500, "api_error")


def test_upstream_auth_failure_is_sentinels_fault_not_the_clients():
    error = from_upstream(401, llama(401, "Invalid API Key", "authentication_error"))
    assert (error.status, error.type) == (500, "api_error")


def test_non_json_body():
    error = from_upstream(502, b"<html>bad gateway</html>")
    assert error.type == "api_error" and error.status == 502
    assert "bad gateway" in error.message


def test_anthropic_shaped_error_passes_through():
    body = json.dumps({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}).encode()
    error = from_upstream(429, body)
    assert (error.status, error.type, error.message) == (429, "rate_limit_error", "slow")


def test_sse_error_event():
    event = ApiError("overloaded_error", "busy").sse_event()
    assert event.startswith(b"event: error\ndata: ")
    assert json.loads(event.split(b"data: ", 1)[1]) == {
        "type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
