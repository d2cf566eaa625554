"""The front end and the serial channel, against a scripted upstream.

Time is trio's autojump clock: a test that waits 45 s of virtual time for
pings runs in milliseconds and asserts exact times.
"""

import json
import random
import re

import attrs
import httpx
import pytest
import trio
import trio.testing

from sentinel._config import ChannelConfig, Config, CountTokensConfig, ListenConfig, TriageConfig
from sentinel._supervisor import Status
from conftest import (Reply, ScriptedUpstream, captured_body, json_message, main_turn, make_harness,
                      sse, stream_events, title_request)

EVENT_NAMES = ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
               "message_delta", "message_stop"]


def error_of(reply: Reply) -> dict:
    body = reply.json()
    assert body["type"] == "error", body
    return body["error"]


# -- forwarding ---------------------------------------------------------------


async def test_streaming_turn_is_forwarded_event_by_event(harness):
    reply = await harness.request("POST", "/v1/messages?beta=true", main_turn())
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/event-stream"
    assert [name for name, _ in reply.events()] == EVENT_NAMES
    assert reply.body == b"".join(stream_events())
    assert harness.upstream.requests == [main_turn()]


async def test_non_streaming_turn_returns_json(harness):
    reply = await harness.request("POST", "/v1/messages", main_turn(stream=False))
    assert reply.status == 200
    assert reply.json() == json_message()
    assert reply.headers["request-id"].startswith("req_")


async def test_events_are_forwarded_as_they_arrive_not_buffered(nursery, autojump_clock):
    upstream = ScriptedUpstream()

    async def slow(request, body):
        events = stream_events()
        return upstream.respond(200, [events[0], 5.0, *events[1:3], 5.0, *events[3:]],
                                "text/event-stream")

    upstream.script = slow
    harness = await make_harness(nursery, upstream=upstream)
    start = trio.current_time()
    reply = await harness.request("POST", "/v1/messages", main_turn())
    times = [t - start for t in reply.chunk_times]
    assert times == [0, 5, 5, 10, 10, 10]


async def test_events_read_together_are_written_together_and_never_split(nursery, autojump_clock):
    upstream = ScriptedUpstream()
    events = stream_events()
    delta = events[2]

    async def chunked(request, body):
        # message_start and content_block_start in one read, as llama-server sends
        # them; a delta split across two reads 5 s apart; the rest in one read.
        return upstream.respond(200, [events[0] + events[1], delta[:20], 5.0, delta[20:],
                                      b"".join(events[3:])], "text/event-stream")

    upstream.script = chunked
    harness = await make_harness(nursery, upstream=upstream)
    start = trio.current_time()
    reply = await harness.request("POST", "/v1/messages", main_turn())
    assert reply.chunks == [events[0] + events[1], delta, b"".join(events[3:])]
    assert [t - start for t in reply.chunk_times[:3]] == [0, 5, 5]


async def test_worker_writes_a_long_stream_itself_in_order(nursery, autojump_clock, monkeypatch):
    """Past the head, the worker writes events to the client itself; none is
    lost or overtaken at the hand-over, whether events come at once or apart."""
    from sentinel._channel import Job

    handed = []
    hand_sink = Job.hand_sink
    monkeypatch.setattr(Job, "hand_sink", lambda job, sink: handed.append(hand_sink(job, sink)) or handed[-1])
    events = stream_events()
    deltas = [sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": f"w{i} "}})
              for i in range(60)]
    expected = [*events[:2], *deltas, *events[3:]]
    upstream = ScriptedUpstream()
    # A burst at once (queued before the hand-over), then events apart, then a burst.
    upstream.script = lambda request, body: _async(upstream.respond(
        200, [*expected[:20], *[x for event in expected[20:40] for x in (0.5, event)], *expected[40:]],
        "text/event-stream"))
    harness = await make_harness(nursery, upstream=upstream)
    reply = await harness.request("POST", "/v1/messages", main_turn())
    assert reply.body == b"".join(expected)
    assert True in handed


async def test_no_pings_while_the_worker_writes_a_slow_stream(nursery, autojump_clock):
    """Pings are for silence: events 10 s apart, with a 15 s ping interval, get none."""
    events = stream_events()
    upstream = ScriptedUpstream()
    upstream.script = lambda request, body: _async(upstream.respond(
        200, [events[0], 10.0, events[1], 10.0, events[2], 10.0, *events[3:]], "text/event-stream"))
    harness = await make_harness(nursery, upstream=upstream)
    reply = await harness.request("POST", "/v1/messages", main_turn())
    assert [name for name, _ in reply.events()] == EVENT_NAMES


async def test_silence_mid_stream_is_pinged(nursery, autojump_clock):
    events = stream_events()
    upstream = ScriptedUpstream()
    upstream.script = lambda request, body: _async(upstream.respond(
        200, [events[0], 5.0, events[1], 40.0, *events[2:]], "text/event-stream"))
    harness = await make_harness(nursery, upstream=upstream)
    start = trio.current_time()
    reply = await harness.request("POST", "/v1/messages", main_turn())
    names = [name for name, _ in reply.events()]
    assert names == EVENT_NAMES[:2] + ["ping", "ping"] + EVENT_NAMES[2:]
    assert [t - start for t in reply.chunk_times[2:4]] == [20, 35]


# -- triage -------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_title_is_synthesized_without_touching_the_upstream(harness, stream):
    reply = await harness.request("POST", "/v1/messages?beta=true", title_request(stream))
    assert reply.status == 200
    assert harness.upstream.requests == []
    if stream:
        assert reply.headers["content-type"] == "text/event-stream"
        events = reply.events()
        assert [name for name, _ in events] == EVENT_NAMES
        text = events[2][1]["delta"]["text"]
    else:
        text = reply.json()["content"][0]["text"]
    assert json.loads(text) == {"title": "Hello what files are in this directory"}
    # Sent whole: one body with its length, not a chunked stream.
    assert int(reply.headers["content-length"]) == len(reply.body)


async def test_forward_policy_sends_titles_to_the_model(nursery):
    config = Config(triage=TriageConfig(title="forward"))
    harness = await make_harness(nursery, config=config)
    reply = await harness.request("POST", "/v1/messages", title_request(stream=False))
    assert reply.status == 200
    assert len(harness.upstream.requests) == 1


@pytest.mark.parametrize("body, text", [
    ({"model": "claude-haiku-4-5", "max_tokens": 1, "messages": [{"role": "user", "content": "quota"}]}, "ok"),
    ({"model": "x", "max_tokens": 99, "messages": [{"role": "user", "content": "<policy_spec>..."
                                                    "</policy_spec>\nCommand: ls"}]}, "none"),
])
async def test_background_classes_are_synthesized(harness, body, text):
    reply = await harness.request("POST", "/v1/messages", body)
    assert reply.json()["content"][0]["text"] == text
    assert harness.upstream.requests == []


# -- count_tokens ---------------------------------------------------------------


async def test_count_tokens_uses_the_upstream_tokenizer(harness):
    body = captured_body("tool-roundtrip-and-context", 12)
    reply = await harness.request("POST", "/v1/messages/count_tokens?beta=true", body)
    assert reply.json() == {"input_tokens": 42}
    assert harness.upstream.count_requests == 1
    assert harness.upstream.requests == []  # never the messages endpoint, never the channel


async def test_count_tokens_does_not_wait_for_the_model(nursery, autojump_clock):
    harness = await make_harness(nursery)
    harness.upstream.script = lambda request, body: _async(harness.upstream.default(body, pause=100))
    async with trio.open_nursery() as clients:
        clients.start_soon(harness.request, "POST", "/v1/messages", main_turn())
        await trio.testing.wait_all_tasks_blocked()
        reply = await harness.request("POST", "/v1/messages/count_tokens", {"messages": []})
        assert trio.current_time() < 1
        assert reply.json() == {"input_tokens": 42}


async def test_count_tokens_estimates_when_the_upstream_is_slow(nursery, autojump_clock):
    harness = await make_harness(nursery)
    harness.upstream.count_delay = 60
    body = captured_body("tool-roundtrip-and-context", 12)
    reply = await harness.request("POST", "/v1/messages/count_tokens", body)
    assert trio.current_time() == pytest.approx(5.0)  # the configured timeout
    assert reply.json()["input_tokens"] > 1000


async def test_count_tokens_estimates_when_the_upstream_is_not_ready(harness):
    harness.server.state.set(Status.DOWN)
    reply = await harness.request("POST", "/v1/messages/count_tokens",
                                  {"messages": [{"role": "user", "content": "x" * 400}]})
    assert reply.json()["input_tokens"] == 104
    assert harness.upstream.count_requests == 0


async def test_count_tokens_estimate_mode(nursery):
    harness = await make_harness(nursery, config=Config(count_tokens=CountTokensConfig(mode="estimate")))
    await harness.request("POST", "/v1/messages/count_tokens", {"messages": []})
    assert harness.upstream.count_requests == 0


# -- bad input --------------------------------------------------------------------


@pytest.mark.parametrize("body, status, kind, words", [
    (b"{not json", 400, "invalid_request_error", "not valid JSON"),
    (b"[1, 2]", 400, "invalid_request_error", "JSON object"),
    (b'{"model": "x", "max_tokens": 5}', 400, "invalid_request_error", "messages"),
    (b'{"messages": "hi"}', 400, "invalid_request_error", "messages"),
])
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_bad_bodies(harness, body, status, kind, words, path):
    reply = await harness.request("POST", path, body)
    assert reply.status == status
    error = error_of(reply)
    assert error["type"] == kind and words in error["message"]
    assert harness.upstream.requests == []


async def test_body_over_the_limit_by_content_length(nursery):
    harness = await make_harness(nursery, config=Config(listen=ListenConfig(max_body_bytes=1000)))
    reply = await harness.request("POST", "/v1/messages", b"x" * 1001)
    assert reply.status == 413
    assert error_of(reply)["type"] == "request_too_large"


async def test_body_over_the_limit_without_content_length(nursery):
    harness = await make_harness(nursery, config=Config(listen=ListenConfig(max_body_bytes=1000)))
    reply = await harness.request("POST", "/v1/messages", b"x" * 5000, chunk_size=100,
                                  headers={"content-length": "10"})
    assert reply.status == 413


@pytest.mark.parametrize("method, path, status, kind", [
    ("GET", "/v2/whatever", 404, "not_found_error"),
    ("POST", "/v1/complete", 404, "not_found_error"),
    ("GET", "/v1/messages", 405, "invalid_request_error"),
])
async def test_unknown_routes(harness, method, path, status, kind):
    reply = await harness.request(method, path)
    assert reply.status == status
    assert error_of(reply)["type"] == kind


async def test_head_probe_and_models(harness):
    head = await harness.request("HEAD", "/")
    assert (head.status, head.body) == (200, b"")
    models = (await harness.request("GET", "/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["local-model"]


async def test_health_reports_the_upstream_state(harness):
    reply = await harness.request("GET", "/sentinel/health")
    assert reply.status == 200 and reply.json()["status"] == "ok"
    harness.server.state.set(Status.DOWN, "SIGSEGV")
    reply = await harness.request("GET", "/sentinel/health")
    assert reply.status == 503
    assert reply.json()["upstream"] == {"status": "down", "generation": 1, "pid": None,
                                        "detail": "SIGSEGV"}


async def test_api_key_is_checked_when_configured(nursery):
    harness = await make_harness(nursery, config=Config(listen=ListenConfig(api_key="s3cret")))
    wrong = await harness.request("POST", "/v1/messages", main_turn(), headers={"x-api-key": "nope"})
    assert (wrong.status, error_of(wrong)["type"]) == (401, "authentication_error")
    right = await harness.request("POST", "/v1/messages", main_turn(), headers={"x-api-key": "s3cret"})
    assert right.status == 200


# -- upstream errors -----------------------------------------------------------------


def overflow(request, body):
    return _async(httpx.Response(400, json={"error": {
        "code": 400, "message": "request (40024 tokens) exceeds the available context size (32768 tokens)",
        "type": "exceed_context_size_error", "n_prompt_tokens": 40024, "n_ctx": 32768}}))


async def _async(value):
    return value


@pytest.mark.parametrize("stream", [True, False])
async def test_context_overflow_tells_claude_code_to_compact(harness, stream):
    harness.upstream.script = overflow
    reply = await harness.request("POST", "/v1/messages", main_turn(stream))
    assert reply.status == 400
    assert error_of(reply) == {"type": "invalid_request_error",
                               "message": "prompt is too long: 40024 tokens > 32768 maximum"}


async def test_connection_refused_is_a_retryable_error(nursery):
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)
    harness = await make_harness(nursery)
    harness.server.upstream.transport = httpx.MockTransport(refuse)
    reply = await harness.request("POST", "/v1/messages", main_turn())
    assert reply.status == 529
    assert error_of(reply)["type"] == "overloaded_error"
    assert len(harness.server.failures) == 1


async def test_stream_cut_mid_way_ends_with_an_overloaded_event(harness):
    async def cut(request, body):
        return harness.upstream.respond(200, stream_events()[:3], "text/event-stream")
    harness.upstream.script = cut
    reply = await harness.request("POST", "/v1/messages", main_turn())
    events = reply.events()
    assert [name for name, _ in events] == EVENT_NAMES[:3] + ["error"]
    assert events[-1][1]["error"]["type"] == "overloaded_error"
    assert reply.complete


# -- waiting: pings, early commit, queue bound ---------------------------------------


async def test_waiting_stream_is_committed_and_pinged(nursery, autojump_clock):
    harness = await make_harness(nursery)
    harness.upstream.script = lambda request, body: _async(harness.upstream.default(body, pause=40))
    start = trio.current_time()
    reply = await harness.request("POST", "/v1/messages", main_turn())
    events = reply.events()
    assert [name for name, _ in events] == ["ping", "ping"] + EVENT_NAMES
    assert [t - start for t in reply.chunk_times[:2]] == [15, 30]
    assert reply.status == 200


async def test_failure_after_commit_is_an_overloaded_event(nursery, autojump_clock):
    harness = await make_harness(nursery)

    async def fail_late(request, body):
        await trio.sleep(20)
        raise httpx.ReadError("reset")

    harness.upstream.script = fail_late
    reply = await harness.request("POST", "/v1/messages", main_turn())
    assert reply.status == 200
    assert [name for name, _ in reply.events()] == ["ping", "error"]
    assert reply.events()[-1][1]["error"]["type"] == "overloaded_error"


async def test_ping_interval_is_configurable(nursery, autojump_clock):
    harness = await make_harness(nursery, config=Config(channel=ChannelConfig(ping_interval=4)))
    harness.upstream.script = lambda request, body: _async(harness.upstream.default(body, pause=10))
    reply = await harness.request("POST", "/v1/messages", main_turn())
    assert [name for name, _ in reply.events()][:3] == ["ping", "ping", "message_start"]


async def test_full_queue_answers_529_with_retry_after(nursery, autojump_clock):
    harness = await make_harness(nursery, config=Config(channel=ChannelConfig(queue_limit=2)))
    harness.upstream.script = lambda request, body: _async(harness.upstream.default(body, pause=100))
    async with trio.open_nursery() as clients:
        for _ in range(3):  # one in flight, two queued
            clients.start_soon(harness.request, "POST", "/v1/messages", main_turn(stream=False))
            await trio.testing.wait_all_tasks_blocked()
        reply = await harness.request("POST", "/v1/messages", main_turn(stream=False))
        assert reply.status == 529
        assert reply.headers["retry-after"] == "2"
        assert error_of(reply)["type"] == "overloaded_error"
        clients.cancel_scope.cancel()


# -- disconnects -------------------------------------------------------------------------


async def test_client_leaving_while_queued_is_dropped(nursery, autojump_clock):
    harness = await make_harness(nursery)
    harness.upstream.script = lambda request, body: _async(harness.upstream.default(body, pause=10))
    gone = trio.Event()
    async with trio.open_nursery() as clients:
        clients.start_soon(harness.request, "POST", "/v1/messages", main_turn(max_tokens=1))
        await trio.testing.wait_all_tasks_blocked()
        clients.start_soon(lambda: harness.request("POST", "/v1/messages", main_turn(max_tokens=2),
                                                   disconnect=gone))
        await trio.testing.wait_all_tasks_blocked()
        assert harness.channel.depth == 1
        gone.set()
        await trio.testing.wait_all_tasks_blocked()
        assert harness.channel.depth == 0
    assert [body["max_tokens"] for body in harness.upstream.requests] == [1]


async def test_client_leaving_in_flight_closes_the_upstream_request(nursery, autojump_clock):
    harness = await make_harness(nursery)
    harness.upstream.script = lambda request, body: _async(harness.upstream.default(body, pause=300))
    gone = trio.Event()
    reply = Reply()
    async with trio.open_nursery() as clients:
        clients.start_soon(lambda: harness.request("POST", "/v1/messages", main_turn(),
                                                   disconnect=gone, reply=reply))
        await trio.sleep(20)
        assert harness.upstream.open == 1
        gone.set()
    assert trio.current_time() == pytest.approx(20)
    assert harness.upstream.open == 0 and harness.upstream.streams[0].closed
    assert harness.channel.current is None
    # The next request is served at once.
    reply = await harness.request("POST", "/v1/messages", main_turn(stream=False))
    assert reply.status == 200


# -- the serial invariant ------------------------------------------------------------------


async def test_twenty_mixed_clients_fifo_and_never_two_upstream_requests(nursery, autojump_clock):
    harness = await make_harness(nursery)

    async def varied(request, body):
        pause = random.Random(body["max_tokens"]).uniform(0.1, 3)
        events = stream_events(str(body["max_tokens"]))
        if body.get("stream"):
            return harness.upstream.respond(200, [pause, *events[:3], pause, *events[3:]],
                                            "text/event-stream")
        return harness.upstream.respond(200, [pause, json.dumps(json_message()).encode()],
                                        "application/json")

    harness.upstream.script = varied
    kinds = ["real-stream", "real-json", "title", "count", "quota"]
    replies: dict[int, Reply] = {}
    real_order = []

    async def client(i: int) -> None:
        kind = kinds[i % len(kinds)]
        if kind.startswith("real"):
            real_order.append(100 + i)
            body = main_turn(stream=kind == "real-stream", max_tokens=100 + i)
            replies[i] = await harness.request("POST", "/v1/messages", body)
        elif kind == "title":
            replies[i] = await harness.request("POST", "/v1/messages", title_request())
        elif kind == "count":
            replies[i] = await harness.request("POST", "/v1/messages/count_tokens", main_turn())
        else:
            replies[i] = await harness.request("POST", "/v1/messages", {
                "model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "quota"}]})

    async with trio.open_nursery() as clients:
        for i in range(20):
            clients.start_soon(client, i)
            await trio.testing.wait_all_tasks_blocked()  # a definite arrival order

    assert all(reply.status == 200 for reply in replies.values())
    assert harness.upstream.max_open == 1
    assert harness.channel.max_in_flight == 1
    assert [body["max_tokens"] for body in harness.upstream.requests] == real_order
    assert len(real_order) == 8


async def test_max_tokens_cap_applies_to_forwarded_requests(nursery):
    harness = await make_harness(nursery)
    harness.app.max_tokens = 512

    async def cut_at_limit(request, body):
        stop = sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                                     "usage": {"output_tokens": body["max_tokens"]}})
        events = stream_events()
        return harness.upstream.respond(200, [*events[:4], stop, events[5]], "text/event-stream")

    harness.upstream.script = cut_at_limit
    capped = await harness.request("POST", "/v1/messages", main_turn(max_tokens=32000))
    uncapped = await harness.request("POST", "/v1/messages", main_turn(max_tokens=100))
    assert [body["max_tokens"] for body in harness.upstream.requests] == [512, 100]
    assert harness.upstream.requests[0]["tools"] == main_turn()["tools"]
    # Our cap ended the turn, not the client's limit; the client's own limit is reported as is.
    assert capped.events()[4][1]["delta"]["stop_reason"] == "end_turn"
    assert uncapped.events()[4][1]["delta"]["stop_reason"] == "max_tokens"


async def test_a_request_a_healthy_server_drops_is_answered_retryable_not_resent(harness):
    calls = []

    async def drop(request, body):
        calls.append(1)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    harness.upstream.script = drop
    reply = await harness.request("POST", "/v1/messages", main_turn())
    # Every forwarded request has a connection of its own, so this cannot be a
    # stale keep-alive: sentinel does not guess, the client retries.
    assert reply.status == 529 and reply.headers["retry-after"] == "1"
    assert reply.json()["error"]["type"] == "overloaded_error"
    assert len(calls) == 1


# -- the request log ------------------------------------------------------------


async def test_one_log_line_per_request_with_its_facts_and_no_content(harness, caplog):
    caplog.set_level("INFO", logger="sentinel.requests")
    secret_words = "the lighthouse keeper's private diary"
    turn = main_turn()
    turn["messages"] = [*turn["messages"], {"role": "user", "content": secret_words}]
    headers = {"x-claude-code-session-id": "sess-123", "authorization": "Bearer sk-secret-key"}
    reply = await harness.request("POST", "/v1/messages", turn, headers=headers)
    title = await harness.request("POST", "/v1/messages", title_request(), headers=headers)

    lines = [record.getMessage() for record in caplog.records if record.name == "sentinel.requests"]
    assert len(lines) == 2
    real, synthesized = lines
    assert real.startswith(reply.headers["request-id"] + " POST /v1/messages ")
    for fact in ("cls=real", f"model={turn['model']}", "tools=27", "session=sess-123", "queue=0",
                 "status=200"):
        assert fact in real.split(), fact
    assert re.search(r" fp=[0-9a-f]{12} ", real) and re.search(r" ttfb=[\d.]+ms total=[\d.]+ms$", real)
    assert title.headers["request-id"] in synthesized and "cls=title" in synthesized
    assert "synth=True" in synthesized and re.search(r" fp=[0-9a-f]{12} ", synthesized)
    for line in lines:
        assert "lighthouse" not in line and "sk-secret-key" not in line
