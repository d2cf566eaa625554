"""End-to-end fixtures: `sentinel up` as a subprocess, with the real llama-server and model.

Nothing here is skipped when a component is missing: a missing llama-server
or model is a failure, with `sentinel up`'s own message.
"""

from __future__ import annotations

import os
import pathlib
import re
import select
import signal
import subprocess
import sys
import time

import attrs
import httpx
import pytest

from sentinel._upstream import parse_metrics

STARTUP_SECONDS = 180  # first run assembles the 250 MB default model


@attrs.define
class Daemon:
    process: subprocess.Popen
    url: str
    state_dir: pathlib.Path
    log_path: pathlib.Path

    def health(self) -> dict:
        return httpx.get(f"{self.url}/sentinel/health", timeout=10).json()

    def upstream(self) -> tuple[str, str, int]:
        """The supervised llama-server's URL, key and pid, read from its command line."""
        pid = self.health()["upstream"]["pid"]
        argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        args = [a.decode() for a in argv]
        port = args[args.index("--port") + 1]
        key = args[args.index("--api-key") + 1]
        return f"http://127.0.0.1:{port}", key, pid

    def upstream_metrics(self) -> dict[str, float]:
        url, key, _ = self.upstream()
        response = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {key}"}, timeout=10)
        response.raise_for_status()
        return parse_metrics(response.content)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


_started: list[Daemon] = []


@pytest.fixture(autouse=True)
def stop_leftover_daemons():
    """A test that fails before stopping its daemon must not leave it (and its
    llama-server) running: stop whatever a test started and left behind."""
    yield
    while _started:
        daemon = _started.pop()
        if daemon.process.poll() is None:
            try:
                daemon.stop(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait()


def shared(daemon: Daemon) -> Daemon:
    """A daemon for a whole module or session: its fixture stops it, not each test."""
    _started.remove(daemon)
    return daemon


def start_daemon(tmp: pathlib.Path, extra_config: str = "", args: tuple[str, ...] = ()) -> Daemon:
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "sentinel.toml"
    config.write_text(f'state_dir = "{tmp / "state"}"\n{extra_config}')
    log_path = tmp / "sentinel.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sentinel", "up", "--config", str(config), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + STARTUP_SECONDS
    output = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            output += chunk
            match = re.search(rb"export ANTHROPIC_BASE_URL=(\S+)", output)
            if match:
                daemon = Daemon(process, match.group(1).decode(), tmp / "state", log_path)
                _started.append(daemon)
                return daemon
        elif process.poll() is not None:
            break
    process.kill()
    process.wait()
    pytest.fail("sentinel up did not start:\n" + output.decode() + log_path.read_text()[-3000:])


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    daemon = shared(start_daemon(tmp_path_factory.mktemp("daemon")))
    yield daemon
    daemon.stop()
