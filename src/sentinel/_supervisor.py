"""The supervisor: it owns the llama-server process and publishes its state.

Nothing else starts, signals or waits for the process. The serial worker asks
:class:`ServerState` whether the upstream is ready before every request, so
the rules for when requests may flow live here and nowhere else.

Lifecycle of one server::

    launch ──> STARTING ──/health 200──> READY ──exit──> DOWN ──> launch ...
                  │                                        │
                  └──exit or startup timeout──> StartupError (first start only)

Stopping is cancellation: whatever state the supervisor is in, leaving
``run`` sends SIGTERM, waits ``stop_timeout``, then SIGKILLs and reaps the
child, so there is never an orphan or a zombie.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Protocol, Sequence

import attrs
import httpx
import trio

from ._config import ServerConfig
from ._upstream import Upstream

__all__ = [
    "Status", "ServerState", "StartupError", "Process", "Launcher", "TrioLauncher",
    "Supervisor", "ExternalServer", "server_argv", "free_port", "tail",
]

log = logging.getLogger("sentinel.supervisor")


class Status(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DOWN = "down"
    STOPPED = "stopped"


class StartupError(Exception):
    """The server never became healthy; the message says why in one line."""


@attrs.define(eq=False)
class ServerState:
    """The upstream's state, as the rest of sentinel sees it.

    ``generation`` counts servers started, so a caller that saw a failure can
    tell whether the server it used is the one still running.
    """

    status: Status = Status.STARTING
    generation: int = 0
    pid: int | None = None
    detail: str = ""
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def set(self, status: Status, detail: str = "") -> None:
        self.status = status
        self.detail = detail
        self._changed.set()
        self._changed = trio.Event()

    @property
    def ready(self) -> bool:
        return self.status is Status.READY

    async def wait_ready(self) -> None:
        while self.status is not Status.READY:
            await self._changed.wait()

    async def wait_changed(self) -> None:
        await self._changed.wait()


class Process(Protocol):
    pid: int
    returncode: int | None

    async def wait(self) -> int: ...
    def send_signal(self, sig: int) -> None: ...


class Launcher(Protocol):
    async def launch(self, argv: Sequence[str], env: dict[str, str], log_path: Path) -> Process: ...


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # If sentinel is SIGKILLed, the kernel kills llama-server too.
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _PidfdProcess:
    """A child spawned from the Trio thread itself, awaited through a pidfd.

    Linux's parent-death signal fires when the *thread* that forked the child
    exits, and ``trio.lowlevel.open_process`` forks from a worker thread that
    ends when idle, which would kill llama-server seconds after it started.
    Spawning from the long-lived main thread avoids that; fork is quick.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._pidfd = os.pidfd_open(popen.pid)

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        if self._popen.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)
        returncode = self._popen.wait()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        return returncode

    def send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)


class TrioLauncher:
    """Starts the real process: its own session, stdout and stderr to a log file."""

    async def launch(self, argv: Sequence[str], env: dict[str, str], log_path: Path) -> Process:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            options = dict(env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                           # A Ctrl-C at the terminal reaches sentinel, which stops the server in order.
                           start_new_session=True)
            if sys.platform.startswith("linux") and hasattr(os, "pidfd_open"):
                return _PidfdProcess(subprocess.Popen(list(argv), preexec_fn=_die_with_parent, **options))
            return await trio.lowlevel.open_process(list(argv), **options)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_argv(binary: Path | str, model: Path | str, config: ServerConfig,
                port: int, api_key: str) -> list[str]:
    """The command line: defaults first, the user's args next, then what sentinel must own."""
    # --threads-http: count_tokens (bounded) and /health run beside the one
    # generation, and llama-server's default pool is as small as 3 threads.
    argv = [str(binary), "--model", str(model), "--metrics", "--parallel", "1", "--threads-http", "8"]
    if config.ctx_size:
        argv += ["--ctx-size", str(config.ctx_size)]
    argv += list(config.args)
    argv += ["--host", "127.0.0.1", "--port", str(port), "--api-key", api_key]
    return argv


def tail(path: Path, size: int = 8192) -> str:
    """The last ``size`` bytes of a log file, as text."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def last_line(path: Path) -> str:
    lines = [line.strip() for line in tail(path, 4096).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


@attrs.define(eq=False)
class Supervisor:
    """Runs llama-server: launch, wait for health, watch, restart, stop."""

    config: ServerConfig
    binary: Path
    model: Path
    env: dict[str, str]
    log_path: Path
    state: ServerState = attrs.field(factory=ServerState)
    launcher: Launcher = attrs.field(factory=TrioLauncher)
    api_key: str = attrs.field(factory=lambda: secrets.token_urlsafe(24))
    restart_delay: float = 0.5
    upstream: Upstream = attrs.field(init=False)
    port: int = attrs.field(init=False, default=0)
    _process: Process | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.upstream = Upstream("http://127.0.0.1:0", self.api_key)

    @property
    def process(self) -> Process | None:
        return self._process

    def report_failure(self, error: Exception) -> None:
        # The process's exit is the source of truth for a supervised server.
        pass

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._start()
            task_status.started()
            while True:
                returncode = await self._process.wait()
                cause = describe_exit(returncode)
                log.warning("llama-server pid %s died (%s): %s", self._process.pid, cause,
                            last_line(self.log_path))
                self.state.set(Status.DOWN, cause)
                await self._restart()
        finally:
            with trio.CancelScope(shield=True):
                await self._stop()
                self.state.set(Status.STOPPED)

    async def _restart(self) -> None:
        delay = self.restart_delay
        while True:
            await trio.sleep(delay)
            try:
                return await self._start()
            except StartupError as e:
                log.error("restart failed: %s", e)
                self.state.set(Status.DOWN, str(e))
                delay = min(delay * 2, 30.0)

    async def _start(self) -> None:
        self.port = free_port()
        self.upstream.base_url = f"http://127.0.0.1:{self.port}"
        await self.upstream.aclose()
        argv = server_argv(self.binary, self.model, self.config, self.port, self.api_key)
        started = trio.current_time()
        self._process = await self.launcher.launch(argv, self.env, self.log_path)
        self.state.generation += 1
        self.state.pid = self._process.pid
        self.state.set(Status.STARTING)
        log.info("llama-server pid %s starting on port %s (%s)", self._process.pid, self.port,
                 self.model.name)
        try:
            await self._wait_healthy()
        except StartupError:
            with trio.CancelScope(shield=True):
                await terminate(self._process, self.config.stop_timeout)
            raise
        self.state.set(Status.READY)
        log.info("llama-server pid %s ready in %.1f s", self._process.pid,
                 trio.current_time() - started)

    async def _wait_healthy(self) -> None:
        process = self._process
        with trio.move_on_after(self.config.startup_timeout) as timeout:
            while True:
                if process.returncode is not None:
                    raise StartupError(
                        f"llama-server exited during startup ({describe_exit(process.returncode)}): "
                        f"{last_line(self.log_path) or 'no output'}")
                try:
                    if await self.upstream.health(timeout=max(1.0, self.config.health_interval)) == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                await trio.sleep(self.config.health_interval)
        if timeout.cancelled_caught:
            raise StartupError(
                f"llama-server was not healthy within {self.config.startup_timeout:g} s; "
                f"last output: {last_line(self.log_path) or 'none'}")

    async def _stop(self) -> None:
        await self.upstream.aclose()
        process = self._process
        if process is None or process.returncode is not None:
            return
        log.info("stopping llama-server pid %s", process.pid)
        await terminate(process, self.config.stop_timeout)


async def terminate(process: Process, grace: float) -> int:
    """SIGTERM, ``grace`` seconds, then SIGKILL; always reaps the child."""
    try:
        process.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        pass
    with trio.move_on_after(grace):
        return await process.wait()
    try:
        process.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    return await process.wait()


@attrs.define(eq=False)
class ExternalServer:
    """``upstream`` mode: front a server someone else runs, watching its health."""

    config: ServerConfig
    state: ServerState = attrs.field(factory=ServerState)
    upstream: Upstream = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.upstream = Upstream(self.config.url.rstrip("/"), self.config.upstream_api_key)

    def report_failure(self, error: Exception) -> None:
        if self.state.ready and isinstance(error, httpx.ConnectError):
            self.state.set(Status.DOWN, type(error).__name__)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.state.generation = 1
        try:
            with trio.move_on_after(self.config.startup_timeout):
                await self._until_healthy()
            if not self.state.ready:
                raise StartupError(f"upstream {self.config.url} was not healthy within "
                                   f"{self.config.startup_timeout:g} s")
            task_status.started()
            while True:  # re-check while down; the worker marks it down on errors
                await self.state.wait_changed()
                if self.state.status is Status.DOWN:
                    await self._until_healthy()
        finally:
            with trio.CancelScope(shield=True):
                await self.upstream.aclose()

    async def _until_healthy(self) -> None:
        while True:
            try:
                if await self.upstream.health(timeout=2.0) == 200:
                    self.state.set(Status.READY)
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(max(self.config.health_interval, 0.5))
