"""Fault injection: the real llama-server, killed and hung under real requests.

Every request goes through a ledger: it must end with a valid response, or
(only when the crash came mid-stream) an ``overloaded_error`` event; no
request may hang or be answered twice. The journal must hold exactly one
crash per injected fault, and no llama-server may outlive the daemon.
"""

from __future__ import annotations

import json
import os
import random
import signal

import attrs
import httpx
import psutil
import pytest
import trio

from daemon_helpers import shared, start_daemon, stop_leftover_daemons  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e

# The exact backoff schedule is unit-tested; here a low cap keeps back-to-back
# faults from waiting 30 s each.
FAST_RECOVERY = """
[recovery]
backoff_cap = 2.0
probe_interval = 0.5
probe_timeout = 1.0
hang_probes = 3
abort_grace = 1.0
"""
REQUEST_DEADLINE = 120  # seconds: a request still open then has hung


@attrs.define
class Outcome:
    kind: str  # "ok", "overloaded_event", or "bad: ..."
    events: list[str] = attrs.field(factory=list)


@attrs.define
class Ledger:
    outcomes: list[Outcome] = attrs.field(factory=list)

    def record(self, outcome: Outcome) -> Outcome:
        self.outcomes.append(outcome)
        return outcome

    def bad(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind not in ("ok", "overloaded_event")]


def judge_stream(names: list[str], payloads: list[dict]) -> Outcome:
    body = [n for n in names if n != "ping"]
    if body.count("message_start") > 1 or body.count("message_stop") > 1:
        return Outcome("bad: answered twice", names)
    if body and body[0] == "message_start" and body[-1] == "message_stop":
        return Outcome("ok", names)
    if body and body[-1] == "error":
        error = payloads[-1]["error"]["type"]
        mid_stream = any(n == "content_block_delta" for n in body)
        if error == "overloaded_error" and mid_stream:
            return Outcome("overloaded_event", names)
        return Outcome(f"bad: error event {error} (mid_stream={mid_stream})", names)
    return Outcome(f"bad: malformed stream {body[:3]}...{body[-3:]}", names)


async def send(http: httpx.AsyncClient, body: dict, ledger: Ledger,
               on_event=None) -> Outcome:
    """One request through sentinel, judged for the ledger. Never hangs the test."""
    with trio.move_on_after(REQUEST_DEADLINE) as deadline:
        if body.get("stream"):
            names, payloads = [], []
            async with http.stream("POST", "/v1/messages?beta=true", json=body) as response:
                if response.status_code != 200:
                    return ledger.record(Outcome(f"bad: HTTP {response.status_code} {await response.aread()!r}"))
                buffer = b""
                async for chunk in response.aiter_raw():
                    buffer += chunk
                    while b"\n\n" in buffer:
                        raw, buffer = buffer.split(b"\n\n", 1)
                        fields = dict(line.split(": ", 1) for line in raw.decode().splitlines())
                        names.append(fields["event"])
                        payloads.append(json.loads(fields["data"]))
                        if on_event is not None:
                            on_event(fields["event"])
            return ledger.record(judge_stream(names, payloads))
        response = await http.post("/v1/messages", json=body)
        if response.status_code == 200 and response.json().get("type") == "message":
            return ledger.record(Outcome("ok"))
        return ledger.record(Outcome(f"bad: HTTP {response.status_code} {response.text[:200]}"))
    return ledger.record(Outcome("bad: hung"))  # the deadline passed


def turn(text: str, max_tokens: int = 24, stream: bool = True) -> dict:
    return {"model": "local-model", "max_tokens": max_tokens, "stream": stream, "temperature": 0,
            "messages": [{"role": "user", "content": text}]}


def long_prompt(words: int = 2200) -> str:
    """An uncached prompt: a few seconds of prefill on this machine."""
    rng = random.Random()
    vocabulary = "lighthouse harbour keeper storm lantern tide rope gull stone night ship".split()
    return f"[{rng.random()}] " + " ".join(rng.choice(vocabulary) for _ in range(words)) + "\nSummarise."


class Faults:
    """A daemon to break, and the bookkeeping to check it afterwards."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.injected = 0
        self.pids: set[int] = set()
        self.crashes_before = self.crash_count()

    def crash_count(self) -> int:
        return sum(1 for e in self.journal() if e["event"] == "crash")

    def journal(self) -> list[dict]:
        path = self.daemon.state_dir / "journal.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def server_pid(self) -> int:
        pid = self.daemon.health()["upstream"]["pid"]
        self.pids.add(pid)
        return pid

    def inject(self, sig: int, pid: int | None = None) -> int:
        pid = pid or self.server_pid()
        self.pids.add(pid)
        os.kill(pid, sig)
        if sig != signal.SIGSTOP:
            self.injected += 1
        return pid

    async def wait_for_health(self, predicate, timeout: float = 60, poll: float = 0.02) -> dict:
        """Poll sentinel's health (there is no event to wait on across processes)."""
        with trio.fail_after(timeout):
            while not predicate(health := self.daemon.health()):
                await trio.sleep(poll)
        self.pids.add(health["upstream"]["pid"])
        return health

    async def wait_ready(self, not_pid: int | None = None, timeout: float = 60) -> None:
        await self.wait_for_health(
            lambda h: h["status"] == "ok" and h["upstream"]["pid"] != not_pid, timeout)

    async def wait_processing(self, timeout: float = 30) -> None:
        """Until llama-server is working on a request (prefill has begun)."""
        with trio.fail_after(timeout):
            while self.daemon.upstream_metrics()["llamacpp:requests_processing"] < 1:
                await trio.sleep(0.02)

    def assert_one_crash_per_fault(self) -> None:
        assert self.crash_count() - self.crashes_before == self.injected


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    daemon = shared(start_daemon(tmp_path_factory.mktemp("faults"), FAST_RECOVERY))
    faults = Faults(daemon)
    yield faults
    assert daemon.stop() == 0
    alive = [pid for pid in faults.pids if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], "llama-server left running"


def client(faults: Faults) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=faults.daemon.url, timeout=REQUEST_DEADLINE,
                             headers={"x-api-key": "sentinel"})


SIGNALS = [signal.SIGSEGV, signal.SIGABRT, signal.SIGKILL]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
async def test_fault_while_idle(broken, sig):
    await broken.wait_ready()
    pid = broken.inject(sig)
    await broken.wait_ready(not_pid=pid)
    ledger = Ledger()
    async with client(broken) as http:
        await send(http, turn("Say hi."), ledger)
    assert ledger.bad() == []
    crash = [e for e in broken.journal() if e["event"] == "crash"][-1]
    assert crash["pid"] == pid and crash["signal"] == sig.name
    broken.assert_one_crash_per_fault()


async def fault_in_prefill(broken, sig: signal.Signals, stream: bool) -> tuple[Ledger, int]:
    """Send a long prompt, hit the server with ``sig`` while it processes it,
    and wait for the answer; the ledger and the pid that was hit."""
    await broken.wait_ready()
    ledger = Ledger()
    async with client(broken) as http, trio.open_nursery() as nursery:
        nursery.start_soon(send, http, turn(long_prompt(), stream=stream), ledger)
        await broken.wait_processing()
        await trio.sleep(0.3)
        pid = broken.inject(sig)
    return ledger, pid


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
async def test_fault_during_prefill_is_replayed(broken, sig):
    ledger, _ = await fault_in_prefill(broken, sig, stream=sig != signal.SIGABRT)
    assert [o.kind for o in ledger.outcomes] == ["ok"]
    replay = [e for e in broken.journal() if e["event"] == "replay"][-1]
    assert replay["attempt"] == 2
    broken.assert_one_crash_per_fault()


async def test_fault_with_a_request_queued(broken):
    await broken.wait_ready()
    ledger = Ledger()
    async with client(broken) as http, trio.open_nursery() as nursery:
        nursery.start_soon(send, http, turn(long_prompt(), stream=False), ledger)
        await broken.wait_processing()
        nursery.start_soon(send, http, turn("Say hi.", stream=True), ledger)
        await broken.wait_for_health(lambda h: h["queue"]["depth"] >= 1, timeout=10)
        broken.inject(signal.SIGSEGV)
    assert [o.kind for o in ledger.outcomes] == ["ok", "ok"]
    broken.assert_one_crash_per_fault()


async def test_fault_mid_stream_ends_with_overloaded_error(broken):
    await broken.wait_ready()
    ledger = Ledger()
    deltas = trio.Event()

    def on_event(name: str) -> None:
        if name == "content_block_delta":
            deltas.set()

    async with client(broken) as http, trio.open_nursery() as nursery:
        nursery.start_soon(send, http, turn("Write a long story about a lighthouse.", max_tokens=400),
                           ledger, on_event)
        await deltas.wait()
        broken.inject(signal.SIGSEGV)
    outcome, = ledger.outcomes
    assert outcome.kind == "overloaded_event", outcome
    broken.assert_one_crash_per_fault()
    await broken.wait_ready()


async def test_fault_during_model_load(broken):
    await broken.wait_ready()
    first = broken.inject(signal.SIGKILL)
    health = await broken.wait_for_health(  # catch the restarted server while it loads
        lambda h: h["upstream"]["pid"] != first and h["upstream"]["status"] == "starting",
        timeout=30, poll=0.005)
    broken.inject(signal.SIGSEGV, health["upstream"]["pid"])
    await broken.wait_ready(not_pid=health["upstream"]["pid"])
    ledger = Ledger()
    async with client(broken) as http:
        await send(http, turn("Say hi."), ledger)
    assert ledger.bad() == []
    broken.assert_one_crash_per_fault()


async def test_sigstop_hang_is_killed_and_the_request_replayed(broken):
    ledger, pid = await fault_in_prefill(broken, signal.SIGSTOP, stream=True)
    broken.injected += 1  # a hang ends as one crash, of the hung server
    assert [o.kind for o in ledger.outcomes] == ["ok"]
    hang = [e for e in broken.journal() if e["event"] == "hang_kill"][-1]
    crash = [e for e in broken.journal() if e["event"] == "crash"][-1]
    assert hang["pid"] == crash["pid"] == pid and crash["reason"] == "hang"
    broken.assert_one_crash_per_fault()


# -- the soak ------------------------------------------------------------------------------------

SOAK_SECONDS = 170
SOAK_INJECTIONS = 32


async def test_soak_random_faults_under_claude_code_like_load(tmp_path):
    from conftest import capture, main_turn, title_request

    # Faults come every few seconds here, so one request may meet many in a row:
    # that is not a poison request (the poison path is tested on its own).
    daemon = start_daemon(tmp_path, FAST_RECOVERY.replace("backoff_cap = 2.0", "backoff_cap = 0.5")
                          + "backoff_initial = 0.2\nmax_replays = 1000\ncrash_loop_max = 1000\n")
    faults = Faults(daemon)
    rng = random.Random(2026)
    ledger = Ledger()
    counts = [r["body"] for r in capture("tool-roundtrip-and-context") if "count_tokens" in r["path"]]
    stop = trio.Event()
    try:
        async with client(faults) as http:
            async def user(seed: int) -> None:
                local = random.Random(seed)
                while not stop.is_set():
                    kind = local.random()
                    if kind < 0.45:
                        body = main_turn(stream=local.random() < 0.7, max_tokens=local.choice([8, 24, 64]))
                        body["messages"] = [*body["messages"],
                                            {"role": "user", "content": f"[{local.random()}] continue"}]
                        await send(http, body, ledger)
                    elif kind < 0.6:
                        await send(http, turn(long_prompt(local.choice([200, 500])),
                                              stream=local.random() < 0.5), ledger)
                    elif kind < 0.8:
                        await send(http, title_request(stream=True), ledger)
                    else:
                        response = await http.post("/v1/messages/count_tokens", json=local.choice(counts))
                        ledger.record(Outcome("ok" if response.status_code == 200 else
                                              f"bad: count_tokens HTTP {response.status_code}"))

            async def injector() -> None:
                # Each fault lands a random 0.5-4 s into a server's healthy life,
                # so requests sometimes finish and sometimes meet a crash.
                with trio.move_on_after(SOAK_SECONDS):
                    while faults.injected < SOAK_INJECTIONS:
                        await faults.wait_ready()
                        await trio.sleep(rng.uniform(0.5, 4.0))
                        health = daemon.health()
                        if health["upstream"]["status"] != "ready":
                            continue
                        try:
                            faults.inject(rng.choice(SIGNALS), health["upstream"]["pid"])
                        except ProcessLookupError:
                            continue  # it was already on its way out
                stop.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(injector)
                for seed in range(3):
                    nursery.start_soon(user, seed)
    finally:
        assert daemon.stop() == 0
    assert faults.injected >= 30
    assert ledger.bad() == [], ledger.bad()[:5]
    assert len([o for o in ledger.outcomes if o.kind == "ok"]) > 50
    faults.assert_one_crash_per_fault()
    assert not [pid for pid in faults.pids if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
