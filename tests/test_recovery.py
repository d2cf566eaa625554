"""Crash recovery: the real supervisor, channel and front end over a fake launcher.

The fake llama-server "crashes" when a script says so: its process exits
with a signal and its connection breaks, exactly the two things sentinel
sees of a real segfault. Time is trio's autojump clock, so backoff
schedules are asserted to the exact virtual second.
"""

import json
import signal
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing

from sentinel._app import App
from sentinel._channel import SerialChannel
from sentinel._config import Config, RecoveryConfig, ServerConfig
from sentinel._journal import Journal, format_table, last_crash_line, read_events
from sentinel._restart import Backoff, CrashLoopBreaker, Quarantine
from sentinel._supervisor import Status, Supervisor
from conftest import (FakeLauncher, Reply, ScriptedUpstream, asgi_request, json_message, main_turn,
                      stream_events)

EVENT_NAMES = ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
               "message_delta", "message_stop"]


# -- the pure policies ---------------------------------------------------------------------------


def test_backoff_doubles_to_the_cap():
    backoff = Backoff()
    assert [backoff.next_delay(now=0) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_backoff_resets_after_healthy_running():
    backoff = Backoff()
    assert [backoff.next_delay(0), backoff.next_delay(1)] == [0.5, 1]
    backoff.healthy(10)
    assert backoff.next_delay(69.9) == 2  # 59.9 s healthy: not yet
    backoff.healthy(100)
    assert backoff.next_delay(160) == 0.5  # 60 s healthy: reset


def test_breaker_trips_on_the_sixth_crash_in_the_window():
    breaker = CrashLoopBreaker(max_crashes=5, window=120)
    assert [breaker.crashed(t) for t in (0, 10, 20, 30, 40)] == [False] * 5
    assert breaker.crashed(50)


def test_breaker_forgets_old_crashes_and_completed_requests_reset_it():
    breaker = CrashLoopBreaker(max_crashes=5, window=120)
    assert not any(breaker.crashed(t) for t in (0, 30, 60, 90, 121, 150))  # t=0 fell out
    breaker.request_completed()
    assert not any(breaker.crashed(t) for t in (160, 161, 162, 163, 164))


def test_quarantine_expires():
    quarantine = Quarantine(duration=600)
    quarantine.add("fp", "SIGSEGV", now=0)
    assert quarantine.cause("fp", now=599) == "SIGSEGV"
    assert quarantine.cause("fp", now=600) is None


# -- the whole recovery path ------------------------------------------------------------------------


@attrs.define(eq=False)
class Rig:
    supervisor: Supervisor
    launcher: FakeLauncher
    upstream: ScriptedUpstream
    channel: SerialChannel
    app: App
    journal: Journal

    def events(self, kind: str | None = None) -> list[dict]:
        return [e for e in read_events(self.journal.directory) if kind is None or e["event"] == kind]

    async def request(self, body, **kwargs) -> Reply:
        return await asgi_request(self.app, "POST", "/v1/messages", body, **kwargs)

    def crash(self, sig: int = signal.SIGSEGV):
        """A step for a scripted stream: the server dies now."""
        def die():
            self.launcher.current.exit(-sig)
            raise httpx.ReadError("connection reset by peer")
        return die


async def make_rig(nursery, tmp_path: Path, recovery: RecoveryConfig | None = None,
                   load_time: float = 1.0) -> Rig:
    recovery = recovery or RecoveryConfig()
    launcher = FakeLauncher(load_time=load_time)
    upstream = ScriptedUpstream()
    journal = Journal(tmp_path, clock=trio.current_time)

    def route(request: httpx.Request):
        if request.url.path == "/health":
            return launcher.health(request)
        if launcher.current.returncode is not None:
            raise httpx.ConnectError("refused", request=request)
        return upstream(request)

    supervisor = Supervisor(ServerConfig(), Path("/bin/llama-server"), Path("/m/model.gguf"), env={},
                            log_path=tmp_path / "server.log", recovery=recovery, journal=journal,
                            launcher=launcher)
    supervisor.upstream.transport = httpx.MockTransport(route)
    channel = SerialChannel(supervisor, recovery=recovery, journal=journal)
    supervisor.in_flight = channel.in_flight_facts
    await nursery.start(supervisor.run)
    await nursery.start(channel.run)
    app = App(Config(recovery=recovery), supervisor, channel)
    return Rig(supervisor, launcher, upstream, channel, app, journal)


def crash_then_recover(rig: Rig, crashes: int, before_crash: list[bytes] = ()):
    """A script: the first ``crashes`` attempts die after ``before_crash``; then a normal reply."""
    calls = []

    async def script(request, body):
        calls.append(trio.current_time())
        if len(calls) <= crashes:
            return rig.upstream.respond(200, [*before_crash, rig.crash()], "text/event-stream")
        return rig.upstream.default(body)

    return script, calls


async def test_crash_and_restart_schedule_then_the_breaker(nursery, tmp_path, autojump_clock):
    rig = await make_rig(nursery, tmp_path, load_time=0)
    for _ in range(6):
        await rig.supervisor.state.wait_ready()
        rig.launcher.current.exit(-signal.SIGSEGV)
        await trio.testing.wait_all_tasks_blocked()
    starts = rig.launcher.started_at
    assert [round(b - a, 3) for a, b in zip(starts, starts[1:])] == [0.5, 1, 2, 4, 8]
    assert rig.supervisor.state.status is Status.FAILED
    assert "crash-looping (SIGSEGV" in rig.supervisor.state.detail
    assert [e["backoff"] for e in rig.events("restart")] == [0.5, 1, 2, 4, 8]
    crashes = rig.events("crash")
    assert len(crashes) == 6 and {c["signal"] for c in crashes} == {"SIGSEGV"}
    assert all(c["returncode"] == -11 and "uptime" in c and "stderr_tail" in c for c in crashes)
    assert len(rig.events("crash_loop_failed")) == 1

    # Failed: a real request is refused at once, naming the cause.
    reply = await rig.request(main_turn(stream=False))
    assert reply.status == 503
    assert reply.json()["error"]["type"] == "api_error"
    assert "SIGSEGV" in reply.json()["error"]["message"]

    # `sentinel restart-server` clears it.
    restart = await asgi_request(rig.app, "POST", "/sentinel/restart-server")
    assert restart.status == 202
    await rig.supervisor.state.wait_ready()
    assert (await rig.request(main_turn(stream=False))).status == 200


async def test_failed_state_retries_slowly_by_itself(nursery, tmp_path, autojump_clock):
    recovery = RecoveryConfig(crash_loop_max=1, failed_retry_interval=300)
    rig = await make_rig(nursery, tmp_path, recovery, load_time=0)
    for _ in range(2):
        await rig.supervisor.state.wait_ready()
        rig.launcher.current.exit(-signal.SIGABRT)
        await trio.testing.wait_all_tasks_blocked()
    assert rig.supervisor.state.status is Status.FAILED
    failed_at = trio.current_time()
    while not rig.supervisor.state.ready:
        await rig.supervisor.state.wait_changed()
    assert trio.current_time() - failed_at == pytest.approx(300)


async def test_backoff_resets_after_a_minute_of_health(nursery, tmp_path, autojump_clock):
    rig = await make_rig(nursery, tmp_path, load_time=0)
    for healthy_for in (0, 0, 61, 10):
        await rig.supervisor.state.wait_ready()
        await trio.sleep(healthy_for)
        rig.launcher.current.exit(-signal.SIGKILL)
        await trio.testing.wait_all_tasks_blocked()
    await rig.supervisor.state.wait_ready()
    assert [e["backoff"] for e in rig.events("restart")] == [0.5, 1, 0.5, 1]


async def test_crash_before_content_is_replayed_transparently(nursery, tmp_path, autojump_clock):
    rig = await make_rig(nursery, tmp_path)
    events = stream_events()
    rig.upstream.script, calls = crash_then_recover(rig, crashes=1, before_crash=[events[0]])
    reply = await rig.request(main_turn())
    assert reply.status == 200
    # One well-formed stream: the replay's duplicate message_start was dropped.
    assert [name for name, _ in reply.events()] == EVENT_NAMES
    assert len(calls) == 2 and len(rig.upstream.requests) == 2
    # The replay went to the restarted server: crash, 0.5 s backoff, 1 s load.
    assert calls[1] - calls[0] == pytest.approx(1.5, abs=0.2)
    crash, = rig.events("crash")
    assert crash["signal"] == "SIGSEGV" and crash["attempt"] == 1
    assert crash["request_id"].startswith("req_") and len(crash["fingerprint"]) == 64
    replay, = rig.events("replay")
    assert replay["attempt"] == 2 and replay["cause"] == "SIGSEGV"


async def test_non_streaming_request_is_replayed(nursery, tmp_path, autojump_clock):
    rig = await make_rig(nursery, tmp_path)
    calls = []

    async def script(request, body):
        calls.append(1)
        if len(calls) == 1:
            return rig.upstream.respond(200, [b'{"id": "m1", "content"', rig.crash()], "application/json")
        return rig.upstream.default(body)

    rig.upstream.script = script
    reply = await rig.request(main_turn(stream=False))
    assert (reply.status, reply.json()) == (200, json_message())


async def test_waiting_stream_is_pinged_through_a_restart(nursery, tmp_path, autojump_clock):
    rig = await make_rig(nursery, tmp_path, load_time=40)
    rig.upstream.script, _ = crash_then_recover(rig, crashes=1)
    reply = await rig.request(main_turn())
    names = [name for name, _ in reply.events()]
    assert names[:2] == ["ping", "ping"] and names[2:] == EVENT_NAMES


async def test_crash_after_content_ends_with_overloaded_error(nursery, tmp_path, autojump_clock):
    rig = await make_rig(nursery, tmp_path)
    events = stream_events()
    crashed_at = []

    async def script(request, body):
        def crash():
            crashed_at.append(trio.current_time())
            rig.crash()()
        return rig.upstream.respond(200, [*events[:3], 0.3, crash], "text/event-stream")

    rig.upstream.script = script
    reply = await rig.request(main_turn())
    names = [name for name, _ in reply.events()]
    assert names == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert reply.events()[-1][1]["error"]["type"] == "overloaded_error"
    assert reply.chunk_times[-1] - crashed_at[0] <= 1.0
    assert len(rig.upstream.requests) == 1  # never replayed once content was out
    await rig.supervisor.state.wait_ready()
    assert len(rig.events("crash")) == 1


async def test_poison_request_is_given_up_and_quarantined(nursery, tmp_path, autojump_clock):
    rig = await make_rig(nursery, tmp_path)
    poison = main_turn(max_tokens=666)

    async def script(request, body):
        if body["max_tokens"] == 666:
            return rig.upstream.respond(200, [rig.crash()], "text/event-stream")
        return rig.upstream.default(body)

    rig.upstream.script = script
    replies: dict[str, Reply] = {}

    async def send(name, body):
        replies[name] = await rig.request(body)

    async with trio.open_nursery() as clients:
        clients.start_soon(send, "poison", poison)
        await trio.testing.wait_all_tasks_blocked()
        clients.start_soon(send, "behind", main_turn(max_tokens=7))

    # llama-server commits its 200 before the prefill, and so does sentinel: the
    # stream ends in an error event, which Claude Code retries without `stream`.
    bad = replies["poison"]
    assert bad.status == 200
    (name, error), = bad.events()
    assert name == "error" and error["error"]["type"] == "api_error"
    assert "3 times" in error["error"]["message"] and "SIGSEGV" in error["error"]["message"]
    assert replies["behind"].status == 200  # the request behind it is served
    assert [b["max_tokens"] for b in rig.upstream.requests] == [666, 666, 666, 7]
    assert len(rig.events("crash")) == 3 and len(rig.events("replay")) == 2
    gave_up, = rig.events("gave_up")
    quarantine, = rig.events("quarantine")
    assert gave_up["fingerprint"] == quarantine["fingerprint"]

    # An identical resubmission fails fast, without touching the server, and so
    # does Claude Code's retry after a failed stream: the same body without `stream`.
    fallback = {key: value for key, value in poison.items() if key != "stream"}
    for body in (poison, fallback):
        again = await rig.request(body)
        assert again.status == 500 and again.headers["x-should-retry"] == "false"
        assert "recently crashed" in again.json()["error"]["message"]
    assert len(rig.upstream.requests) == 4


async def test_hang_is_detected_killed_and_the_request_replayed(nursery, tmp_path, autojump_clock):
    rig = await make_rig(nursery, tmp_path)
    calls = []

    async def script(request, body):
        calls.append(trio.current_time())
        if len(calls) == 1:
            process = rig.launcher.current
            process.hung = True  # SIGSTOP: no bytes, no /health

            async def until_killed():
                await process.wait()
                raise httpx.ReadError("connection reset by peer")

            return rig.upstream.respond(200, [until_killed], "text/event-stream")
        return rig.upstream.default(body)

    rig.upstream.script = script
    hung = rig.launcher.launched[0]
    reply = await rig.request(main_turn())
    assert [name for name, _ in reply.events() if name != "ping"] == EVENT_NAMES
    assert hung.signals == [signal.SIGABRT, signal.SIGCONT, signal.SIGKILL]
    hang_kill, = rig.events("hang_kill")
    assert "3 probes" in hang_kill["reason"] and hang_kill["request_id"].startswith("req_")
    crash, = rig.events("crash")
    assert crash["reason"] == "hang" and crash["signal"] == "SIGKILL"
    # Probes every 2 s, then every 0.5 s after a failure; SIGKILL 2 s after SIGABRT.
    assert hang_kill["mono"] - calls[0] == pytest.approx(3.0, abs=0.3)
    assert crash["mono"] - hang_kill["mono"] == pytest.approx(2.0)


async def test_stalled_request_with_a_healthy_server_is_left_alone(nursery, tmp_path, autojump_clock):
    rig = await make_rig(nursery, tmp_path, RecoveryConfig(stall_timeout=10))

    async def long_prefill(request, body):
        return rig.upstream.default(body, pause=100)  # silent, but /health answers

    rig.upstream.script = long_prefill
    reply = await rig.request(main_turn(stream=False))
    assert reply.status == 200
    assert rig.events("hang_kill") == [] and len(rig.launcher.launched) == 1


async def test_queued_requests_wait_through_a_restart(nursery, tmp_path, autojump_clock):
    rig = await make_rig(nursery, tmp_path)
    rig.upstream.script, _ = crash_then_recover(rig, crashes=1)
    replies = []

    async def send(n):
        replies.append((n, await rig.request(main_turn(max_tokens=n))))

    async with trio.open_nursery() as clients:
        for n in (1, 2, 3):
            clients.start_soon(send, n)
            await trio.testing.wait_all_tasks_blocked()
    assert all(reply.status == 200 for _, reply in replies)
    assert [b["max_tokens"] for b in rig.upstream.requests] == [1, 1, 2, 3]


async def test_journal_table_and_last_crash_line(nursery, tmp_path, autojump_clock):
    rig = await make_rig(nursery, tmp_path)
    rig.upstream.script, _ = crash_then_recover(rig, crashes=1)
    await rig.request(main_turn())
    await rig.supervisor.state.wait_ready()
    table = format_table(rig.events())
    lines = table.splitlines()
    assert lines[0].split()[:6] == ["WHEN", "WHAT", "SIGNAL", "UPTIME", "REQUEST", "DOWNTIME"]
    assert [line.split()[2] for line in lines[1:]] == [
        "server_start", "ready", "crash", "restart", "server_start", "ready", "replay"]
    ready_after_crash = lines[6]
    assert "1.5s" in ready_after_crash  # downtime: 0.5 s backoff + 1 s load
    assert "SIGSEGV" in last_crash_line(tmp_path)


def test_journal_is_private_rotates_and_holds_no_prompt_text(tmp_path):
    journal = Journal(tmp_path, max_bytes=2000, keep=2)
    for i in range(40):
        journal.record("crash", pid=i, stderr_tail="x" * 100)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["journal.jsonl", "journal.jsonl.1", "journal.jsonl.2"]
    assert (tmp_path / "journal.jsonl").stat().st_mode & 0o777 == 0o600
    entries = list(read_events(tmp_path))
    assert [e["pid"] for e in entries] == sorted(e["pid"] for e in entries)
    assert {"ts", "mono", "run", "event"} <= set(entries[0])


async def test_no_prompt_text_reaches_the_journal(nursery, tmp_path, autojump_clock):
    rig = await make_rig(nursery, tmp_path)
    rig.upstream.script, _ = crash_then_recover(rig, crashes=1)
    body = main_turn()
    secret = "sk-secret-prompt-words-123"
    body["messages"] = [{"role": "user", "content": secret}]
    await rig.request(body, headers={"x-api-key": "sk-ant-client-key"})
    text = (tmp_path / "journal.jsonl").read_text()
    assert secret not in text and "sk-ant-client-key" not in text
    assert rig.supervisor.api_key not in text


async def test_a_config_change_clears_the_failed_state(nursery, tmp_path, autojump_clock):
    rig = await make_rig(nursery, tmp_path, RecoveryConfig(crash_loop_max=1), load_time=0)
    changed = []
    rig.supervisor.reload = lambda: ServerConfig(ctx_size=4096) if changed else None
    for _ in range(2):
        await rig.supervisor.state.wait_ready()
        rig.launcher.current.exit(-signal.SIGSEGV)
        await trio.testing.wait_all_tasks_blocked()
    assert rig.supervisor.state.status is Status.FAILED
    await trio.sleep(30)
    assert rig.supervisor.state.status is Status.FAILED  # nothing changed yet
    changed.append(True)
    while not rig.supervisor.state.ready:
        await rig.supervisor.state.wait_changed()
    assert trio.current_time() < 40  # not the 300 s slow retry
    assert "--ctx-size" in rig.launcher.argv[-1]  # the new config is used


def test_journal_and_status_commands(tmp_path, capsys):
    from sentinel._cli import main
    journal = Journal(tmp_path / "state")
    journal.record("server_start", pid=1, model="/m/gemma.gguf")
    journal.record("ready", pid=1, load_seconds=1.0)
    journal.record("crash", pid=1, returncode=-11, signal="SIGSEGV", uptime=42.0,
                   request_id="req_abc", stderr_tail="ggml_abort: boom\n")
    config = tmp_path / "sentinel.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[listen]\nport = 1\n')

    assert main(["journal", "--config", str(config)]) == 0
    table = capsys.readouterr().out
    assert "crash" in table and "SIGSEGV" in table and "req_abc" in table and "42.0s" in table
    assert main(["journal", "--config", str(config), "--json", "--since", "1h"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["server_start", "ready", "crash"]
    assert main(["journal", "--config", str(config), "--since", "2999-01-01T00:00:00"]) == 0
    assert "no events" in capsys.readouterr().out

    assert main(["status", "--config", str(config)]) == 3  # nothing listens on port 1
    out = capsys.readouterr().out
    assert "not running" in out
    assert "last crash:" in out and "SIGSEGV" in out and "req_abc" in out
