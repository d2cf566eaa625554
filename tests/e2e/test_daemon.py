"""`sentinel up` with the real llama-server and Gemma 3 270M, driven over HTTP."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess

import httpx
import httpx_sse
import psutil
import pytest
import trio

from sentinel._upstream import parse_metrics
from conftest import capture, main_turn, title_request
from daemon_helpers import daemon, start_daemon, stop_leftover_daemons  # noqa: F401 - fixtures

pytestmark = pytest.mark.e2e

HEADERS = {"x-api-key": "anything", "anthropic-version": "2023-06-01",
           "x-claude-code-session-id": "00000000-0000-4000-8000-000000000000"}


def client(daemon, timeout: float = 120) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=daemon.url, headers=HEADERS, timeout=timeout)


async def stream_events(http: httpx.AsyncClient, body: dict) -> list[tuple[str, dict]]:
    async with httpx_sse.aconnect_sse(http, "POST", "/v1/messages?beta=true", json=body) as source:
        assert source.response.status_code == 200
        return [(event.event, json.loads(event.data)) async for event in source.aiter_sse()]


def short_turn(text: str, max_tokens: int = 8, stream: bool = False) -> dict:
    return {"model": "local-model", "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": text}]}


async def test_head_probe_and_health(daemon):
    async with client(daemon) as http:
        assert (await http.head("/")).status_code == 200
        health = (await http.get("/sentinel/health")).json()
    assert health["status"] == "ok" and health["upstream"]["status"] == "ready"


async def test_streaming_main_turn_from_the_capture(daemon):
    async with client(daemon) as http:
        events = await stream_events(http, main_turn(stream=True, max_tokens=16))
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
    names = [name for name, _ in events if name != "ping"]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert "content_block_delta" in names
    message = events[0][1]["message"]
    assert message["usage"]["input_tokens"] > 0
    # The model by its name, not by the path of its file (Claude Code keeps it in transcripts).
    assert message["model"] == model == "gemma-3-270m-q4_k_m"


async def test_non_streaming_main_turn_from_the_capture(daemon):
    async with client(daemon) as http:
        response = await http.post("/v1/messages?beta=true", json=main_turn(stream=False, max_tokens=16))
    assert response.status_code == 200, response.text
    message = response.json()
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] and message["stop_reason"] in ("end_turn", "max_tokens")


@pytest.mark.parametrize("stream", [True, False])
async def test_title_never_reaches_the_model(daemon, stream):
    before = daemon.upstream_metrics()
    async with client(daemon) as http:
        if stream:
            events = await stream_events(http, title_request(stream=True))
            text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
        else:
            response = await http.post("/v1/messages?beta=true", json=title_request(stream=False))
            text = response.json()["content"][0]["text"]
    after = daemon.upstream_metrics()
    assert json.loads(text)["title"]
    assert after["llamacpp:prompt_tokens_total"] == before["llamacpp:prompt_tokens_total"]
    assert after["llamacpp:n_decode_total"] == before["llamacpp:n_decode_total"]


async def test_count_tokens_flood_matches_the_servers_own_count(daemon):
    bodies = [r["body"] for r in capture("tool-roundtrip-and-context") if "count_tokens" in r["path"]]
    assert len(bodies) == 14
    url, key, _ = daemon.upstream()
    ours: dict[int, int] = {}

    async with client(daemon) as http:
        async def count(i: int) -> None:
            response = await http.post("/v1/messages/count_tokens?beta=true", json=bodies[i])
            assert response.status_code == 200
            ours[i] = response.json()["input_tokens"]

        async with trio.open_nursery() as nursery:  # the /context flood: all at once
            for i in range(len(bodies)):
                nursery.start_soon(count, i)

    async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {key}"}) as direct:
        for i, body in enumerate(bodies):
            theirs = (await direct.post("/v1/messages/count_tokens", json=body)).json()["input_tokens"]
            assert ours[i] == theirs


async def test_eight_concurrent_clients_never_overlap_upstream(daemon):
    samples: list[dict[str, float]] = []
    url, key, _ = daemon.upstream()
    results: dict[int, int] = {}

    async with client(daemon) as http, \
            httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {key}"}) as direct:
        async def watch() -> None:
            while True:
                response = await direct.get("/metrics")
                samples.append(parse_metrics(response.content))
                await trio.sleep(0.02)

        async def one(i: int) -> None:
            body = short_turn(f"Count to {i + 3}.", max_tokens=12, stream=i % 2 == 0)
            if body["stream"]:
                events = await stream_events(http, body)
                assert events[-1][0] == "message_stop"
                results[i] = 200
            else:
                results[i] = (await http.post("/v1/messages", json=body)).status_code

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as clients:
                for i in range(8):
                    clients.start_soon(one, i)
            nursery.cancel_scope.cancel()

    assert results == {i: 200 for i in range(8)}
    assert samples, "the upstream was never observed"
    assert max(s["llamacpp:requests_processing"] for s in samples) == 1
    assert max(s["llamacpp:requests_deferred"] for s in samples) == 0
    assert daemon.health()["queue"]["max_in_flight"] == 1


async def test_bad_inputs_get_anthropic_errors_and_the_daemon_keeps_serving(daemon):
    async with client(daemon) as http:
        bad_json = await http.post("/v1/messages", content=b"{oops", headers={"content-type": "application/json"})
        assert bad_json.status_code == 400
        assert bad_json.json()["error"]["type"] == "invalid_request_error"
        missing = await http.post("/v1/messages", json={"model": "m", "max_tokens": 3})
        assert missing.status_code == 400
        unknown = await http.get("/v1/nothing")
        assert (unknown.status_code, unknown.json()["error"]["type"]) == (404, "not_found_error")
        too_long = await http.post("/v1/messages", json=short_turn("hello world " * 20000))
        assert too_long.status_code == 400
        message = too_long.json()["error"]["message"]
        assert message.startswith("prompt is too long: ") and "tokens > " in message
        ok = await http.post("/v1/messages", json=short_turn("Say hi."))
        assert ok.status_code == 200


async def test_client_leaving_mid_stream_frees_the_model(daemon):
    async with client(daemon) as http:
        body = short_turn("Write a very long story about a lighthouse.", max_tokens=2000, stream=True)
        async with http.stream("POST", "/v1/messages", json=body) as response:
            async for chunk in response.aiter_raw():
                if b"content_block_delta" in chunk:
                    break  # leave mid-stream: the context manager closes the connection
        with trio.fail_after(30):
            while daemon.upstream_metrics()["llamacpp:requests_processing"] != 0:
                await trio.sleep(0.05)
        ok = await http.post("/v1/messages", json=short_turn("Say hi."))
        assert ok.status_code == 200
    assert daemon.upstream_metrics()["llamacpp:tokens_predicted_total"] < 1_000_000


def test_sigterm_stops_cleanly_without_leaving_llama_server(tmp_path):
    own = start_daemon(tmp_path)
    _, _, pid = own.upstream()
    server = psutil.Process(pid)
    assert server.ppid() == own.process.pid
    assert own.stop(signal.SIGTERM) == 0
    assert not psutil.pid_exists(pid)  # reaped: neither running nor a zombie
    assert "stopping llama-server pid" in own.log_path.read_text()


def test_killed_sentinel_takes_llama_server_with_it(tmp_path):
    if not os.uname().sysname == "Linux":
        pytest.skip("the parent-death signal is Linux-only")
    own = start_daemon(tmp_path)
    _, _, pid = own.upstream()
    pidfd = os.pidfd_open(pid)  # readable once the process has exited
    own.stop(signal.SIGKILL)
    readable, _, _ = select.select([pidfd], [], [], 10)
    os.close(pidfd)
    assert readable, "llama-server outlived its SIGKILLed parent"
    # Dead: gone, or a zombie waiting for init to reap it (sentinel, its parent, is gone).
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def _llama_server_binary() -> str:
    from sentinel._locate import find_binary
    return str(find_binary("").path), find_binary("").environment()


def test_orphan_left_by_a_killed_sentinel_is_reaped_and_journaled(tmp_path):
    from sentinel._supervisor import free_port
    binary, env = _llama_server_binary()
    port = free_port()
    from sentinel._locate import find_model
    orphan = subprocess.Popen([binary, "--model", str(find_model("")), "--host", "127.0.0.1",
                               "--port", str(port), "--api-key", "old"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        state = tmp_path / "state"
        state.mkdir()
        (state / "llama-server.pid").write_text(json.dumps(
            {"pid": orphan.pid, "binary": binary, "port": port}))
        own = start_daemon(tmp_path)
        assert orphan.wait(timeout=30) is not None  # killed by sentinel, reaped here
        events = [json.loads(line) for line in (state / "journal.jsonl").read_text().splitlines()]
        reaped = [e for e in events if e["event"] == "orphan_reaped"]
        assert len(reaped) == 1 and reaped[0]["pid"] == orphan.pid
        assert "old" not in json.dumps(reaped[0])  # the key is redacted
        assert own.stop() == 0
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_an_unrelated_process_in_a_stale_pidfile_is_left_alone(tmp_path):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        state = tmp_path / "state"
        state.mkdir()
        (state / "llama-server.pid").write_text(json.dumps(
            {"pid": bystander.pid, "binary": "/usr/bin/llama-server", "port": 1234}))
        own = start_daemon(tmp_path)
        assert bystander.poll() is None
        assert own.stop() == 0
    finally:
        bystander.kill()
        bystander.wait()


async def signalled_in_flight(own, ask, *signals: int, gap: float = 0.5):
    """Run ``ask(http)``; once its request is in flight, send ``signals`` to sentinel."""
    result = {}
    async with client(own) as http, trio.open_nursery() as nursery:
        async def run() -> None:
            result["value"] = await ask(http)

        nursery.start_soon(run)
        with trio.fail_after(30):
            while own.health()["queue"]["in_flight"] is None:
                await trio.sleep(0.02)
        for i, sig in enumerate(signals):
            await trio.sleep(gap if i else 0)
            own.process.send_signal(sig)
    return result["value"]


def long_story(http: httpx.AsyncClient):
    return stream_events(http, short_turn("Write a very long story.", max_tokens=2000, stream=True))


async def test_sigterm_lets_the_request_in_flight_finish(tmp_path):
    own = start_daemon(tmp_path)
    try:
        response = await signalled_in_flight(
            own, lambda http: http.post("/v1/messages", json=short_turn("Tell a story.", max_tokens=48)),
            signal.SIGTERM)
        assert response.status_code == 200 and response.json()["type"] == "message"
        assert own.process.wait(timeout=60) == 0
    finally:
        own.stop()
    events = [json.loads(line)["event"] for line in (own.state_dir / "journal.jsonl").read_text().splitlines()]
    assert events[-1] == "stop"


async def test_sigterm_past_the_grace_answers_the_client_with_an_error(tmp_path):
    own = start_daemon(tmp_path, "[recovery]\nshutdown_grace = 1.0\n")
    try:
        events = await signalled_in_flight(own, long_story, signal.SIGTERM)
        name, data = events[-1]
        assert (name, data["error"]["type"]) == ("error", "overloaded_error")
        assert own.process.wait(timeout=60) == 0
    finally:
        own.stop()


async def test_a_second_signal_stops_at_once_and_still_answers(tmp_path):
    own = start_daemon(tmp_path)  # shutdown_grace is 30 s
    try:
        events = await signalled_in_flight(own, long_story, signal.SIGTERM, signal.SIGINT)
        name, data = events[-1]
        assert (name, data["error"]["type"]) == ("error", "overloaded_error")
        assert own.process.wait(timeout=15) == 0  # far less than the 30 s grace
    finally:
        own.stop()


async def test_upstream_mode_fronts_a_server_it_does_not_own(tmp_path):
    from sentinel._locate import find_model
    from sentinel._supervisor import free_port
    binary, env = _llama_server_binary()
    port = free_port()
    server = subprocess.Popen([binary, "--model", str(find_model("")), "--host", "127.0.0.1",
                               "--port", str(port), "--api-key", "theirs", "--parallel", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        own = start_daemon(tmp_path, '[server]\nupstream_api_key = "theirs"\n',
                           args=("--upstream", f"http://127.0.0.1:{port}"))
        try:
            assert own.health()["upstream"]["pid"] is None  # not ours
            async with client(own) as http:
                response = await http.post("/v1/messages", json=short_turn("Say hi."))
                assert response.status_code == 200 and response.json()["type"] == "message"
                count = await http.post("/v1/messages/count_tokens", json=short_turn("Say hi."))
                assert count.json()["input_tokens"] > 0
        finally:
            assert own.stop() == 0
        assert server.poll() is None  # sentinel leaves a server it does not own running
    finally:
        server.terminate()
        server.wait()
