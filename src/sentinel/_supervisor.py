"""The supervisor: it owns the llama-server process and publishes its state.

Nothing else starts, signals or waits for the process. The serial worker asks
:class:`ServerState` whether the upstream is ready before every request, so
the rules for when requests may flow live here and nowhere else.

Lifecycle::

    launch ─> STARTING ─/health 200─> READY ─exit, or hang killed─> DOWN ─backoff─> launch ...
                 │                                                   │
                 └─ exit or timeout: StartupError (first start)      └─ crash loop ─> FAILED
                                                                        (slow retry, restart-server,
                                                                         or a config change)

Every transition is journaled. Stopping is cancellation: whatever state the supervisor is in, leaving
``run`` sends SIGTERM, waits ``stop_timeout``, then SIGKILLs and reaps the
child, so there is never an orphan or a zombie.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import attrs
import httpx
import psutil
import trio

from ._config import RecoveryConfig, ServerConfig
from ._journal import Journal
from ._restart import Backoff, CrashLoopBreaker
from ._upstream import Upstream

__all__ = [
    "Status", "ServerState", "StartupError", "ServerFailed", "Process", "Launcher", "TrioLauncher",
    "Supervisor", "ExternalServer", "model_alias", "server_argv", "free_port", "tail",
]

log = logging.getLogger("sentinel.supervisor")


class Status(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DOWN = "down"
    FAILED = "failed"
    STOPPED = "stopped"


class StartupError(Exception):
    """The server never became healthy; the message says why in one line."""


class ServerFailed(Exception):
    """The crash-loop breaker has tripped; the message names the cause."""


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
        """Return once ready; raise ServerFailed at once while crash-looping."""
        while self.status is not Status.READY:
            if self.status is Status.FAILED:
                raise ServerFailed(self.detail)
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


def model_alias(config: ServerConfig, model: Path | str) -> str:
    """What the model is called: ``model_name`` from config, else its file's name."""
    return config.model_name or Path(model).stem


def server_argv(binary: Path | str, model: Path | str, config: ServerConfig,
                port: int, api_key: str) -> list[str]:
    """The command line: defaults first, the user's args next, then what sentinel must own."""
    # --threads-http: count_tokens (bounded) and /health run beside the one
    # generation, and llama-server's default pool is as small as 3 threads.
    # --alias: without it llama-server names the model in every reply by its
    # file's full path, which lands in Claude Code's transcripts.
    argv = [str(binary), "--model", str(model), "--alias", model_alias(config, model),
            "--metrics", "--parallel", "1", "--threads-http", "8"]
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
    """Runs llama-server: launch, wait for health, watch, restart, stop.

    Detection: the process's exit is seen at once (a pidfd on Linux); a hang
    is ``hang_probes`` failed ``/health`` probes in a row, probed every
    ``probe_interval`` and at once when the worker reports a refused
    connection or a stalled request. A hung server gets SIGABRT (so it can
    dump), then SIGKILL, and is handled as a crash.
    """

    config: ServerConfig
    binary: Path
    model: Path
    env: dict[str, str]
    log_path: Path
    recovery: RecoveryConfig = attrs.field(factory=RecoveryConfig)
    journal: Journal | None = None
    state: ServerState = attrs.field(factory=ServerState)
    launcher: Launcher = attrs.field(factory=TrioLauncher)
    api_key: str = attrs.field(factory=lambda: secrets.token_urlsafe(24))
    pidfile: Path | None = None
    #: What the channel has in flight, for crash records: id, fingerprint, attempt, bytes.
    in_flight: Callable[[], dict[str, Any]] = dict
    #: Called when the config file changed while failed; returns the new server config.
    reload: Callable[[], ServerConfig | None] | None = None
    upstream: Upstream = attrs.field(init=False)
    port: int = attrs.field(init=False, default=0)
    backoff: Backoff = attrs.field(init=False)
    breaker: CrashLoopBreaker = attrs.field(init=False)
    _process: Process | None = attrs.field(init=False, default=None)
    _started_at: float = attrs.field(init=False, default=0.0)
    _hang_cause: str | None = attrs.field(init=False, default=None)
    _probe_now: trio.Event = attrs.field(init=False, factory=trio.Event)
    _retry_now: trio.Event = attrs.field(init=False, factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self.upstream = Upstream("http://127.0.0.1:0", self.api_key)
        r = self.recovery
        self.backoff = Backoff(r.backoff_initial, 2.0, r.backoff_cap, r.backoff_reset_after)
        self.breaker = CrashLoopBreaker(r.crash_loop_max, r.crash_loop_window)

    @property
    def process(self) -> Process | None:
        return self._process

    # -- what the worker tells the supervisor ----------------------------------

    def report_failure(self, error: Exception) -> None:
        """A transport failure talking to the server: probe it now."""
        self._probe_now.set()

    def report_stall(self) -> None:
        """A request has had no bytes for ``stall_timeout``: probe the server now."""
        self._probe_now.set()

    def request_completed(self) -> None:
        self.breaker.request_completed()

    def restart_server(self) -> None:
        """``sentinel restart-server``: leave the failed state and start now."""
        self._retry_now.set()

    async def confirm_crash(self, generation: int) -> bool:
        """After a failed request: is server ``generation`` dead (or being killed)?

        An exit is seen within milliseconds; a live server gets probed, and one
        that fails ``hang_probes`` probes is killed. False means the server
        answers its health check, so the failure was not the server's.
        """
        if self.state.generation != generation or not self.state.ready:
            return True
        self._probe_now.set()
        with trio.move_on_after(0.25):  # an exit is seen in milliseconds
            while self.state.generation == generation and self.state.ready:
                await self.state.wait_changed()
            return True
        try:
            healthy = await self.upstream.health(timeout=self.recovery.probe_timeout) == 200
        except httpx.HTTPError:
            healthy = False
        if healthy:
            return False
        while self.state.generation == generation and self.state.ready:
            await self.state.wait_changed()  # the prober kills it after hang_probes failures
        return True

    # -- the lifecycle ---------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            self._reap_orphan()
            await self._start()
            task_status.started()
            while True:
                returncode = await self._watch()
                await self._after_exit(returncode)
        finally:
            with trio.CancelScope(shield=True):
                running = self._process is not None and self._process.returncode is None
                returncode = await self._stop()
                self.state.set(Status.STOPPED)
                if running:
                    self._journal("stop", pid=self._process.pid, returncode=returncode,
                                  uptime=round(trio.current_time() - self._started_at, 3))

    async def _watch(self) -> int:
        """Wait for the running server to exit (or be killed as hung)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._probe_health, self._process)
            returncode = await self._process.wait()
            nursery.cancel_scope.cancel()
        return returncode

    async def _after_exit(self, returncode: int) -> None:
        """Journal the exit, then restart with backoff until a server is ready."""
        now = trio.current_time()
        cause = self._hang_cause or describe_exit(returncode)
        self.state.set(Status.DOWN, cause)
        self._record_exit(returncode, cause, now)
        while True:
            if self.breaker.crashed(now):
                await self._failed(cause)
            else:
                delay = self.backoff.next_delay(now)
                self._journal("restart", backoff=delay, attempt_cause=cause)
                log.info("restarting llama-server in %.1f s", delay)
                await trio.sleep(delay)
            try:
                return await self._start()
            except StartupError as e:
                now = trio.current_time()
                cause = str(e)
                log.error("restart failed: %s", e)
                self.state.set(Status.DOWN, cause)
                self._journal("crash", pid=self.state.pid, reason=cause, during="startup",
                              stderr_tail=tail(self.log_path))

    async def _failed(self, cause: str) -> None:
        """The crash-loop breaker tripped: refuse requests until a retry is due."""
        detail = f"llama-server is crash-looping ({cause}; last output: {last_line(self.log_path) or 'none'})"
        log.error("%s; retrying every %.0f s", detail, self.recovery.failed_retry_interval)
        self._journal("crash_loop_failed", reason=detail, crashes=self.recovery.crash_loop_max + 1,
                      window=self.recovery.crash_loop_window)
        self.state.set(Status.FAILED, detail)
        self._retry_now = trio.Event()
        with trio.move_on_after(self.recovery.failed_retry_interval):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_config, nursery.cancel_scope)
                await self._retry_now.wait()
                nursery.cancel_scope.cancel()
        self.breaker.reset()
        self.backoff = Backoff(self.backoff.initial, self.backoff.factor, self.backoff.cap,
                               self.backoff.reset_after)

    async def _watch_config(self, done: trio.CancelScope) -> None:
        if self.reload is None:
            return
        while True:
            await trio.sleep(2.0)
            config = self.reload()
            if config is not None:
                log.info("config changed: retrying llama-server")
                self.config = config
                done.cancel()
                self._retry_now.set()
                return

    def _record_exit(self, returncode: int, cause: str, now: float) -> None:
        signal_name = describe_exit(returncode) if returncode < 0 else None
        event = "exit" if returncode == 0 and self._hang_cause is None else "crash"
        log.warning("llama-server pid %s %s (%s): %s", self._process.pid,
                    "exited" if event == "exit" else "crashed", cause, last_line(self.log_path))
        self._journal(event, pid=self._process.pid, returncode=returncode, signal=signal_name,
                      reason=cause, uptime=round(now - self._started_at, 3),
                      stderr_tail=tail(self.log_path), **self.in_flight())
        self._hang_cause = None

    async def _start(self) -> None:
        self.port = free_port()
        self.upstream.move(f"http://127.0.0.1:{self.port}")
        argv = server_argv(self.binary, self.model, self.config, self.port, self.api_key)
        self._process = await self.launcher.launch(argv, self.env, self.log_path)
        self._started_at = trio.current_time()
        self.state.generation += 1
        self.state.pid = self._process.pid
        self.state.set(Status.STARTING)
        self._write_pidfile()
        self._journal("server_start", pid=self._process.pid, argv=redact(argv, self.api_key),
                      model=str(self.model), binary=str(self.binary), generation=self.state.generation)
        log.info("llama-server pid %s starting on port %s (%s)", self._process.pid, self.port,
                 self.model.name)
        try:
            await self._wait_healthy()
        except StartupError:
            with trio.CancelScope(shield=True):
                await terminate(self._process, self.config.stop_timeout)
            raise
        load_seconds = trio.current_time() - self._started_at
        self.backoff.healthy(trio.current_time())
        self._journal("ready", pid=self._process.pid, load_seconds=round(load_seconds, 3),
                      generation=self.state.generation)
        self.state.set(Status.READY)
        log.info("llama-server pid %s ready in %.1f s", self._process.pid, load_seconds)

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

    async def _probe_health(self, process: Process) -> None:
        """Hang detection: kill a live server that stops answering /health."""
        recovery = self.recovery
        failures = 0
        while True:
            interval = recovery.probe_interval if failures == 0 else recovery.probe_interval / 4
            with trio.move_on_after(interval):
                await self._probe_now.wait()
            self._probe_now = trio.Event()
            try:
                ok = await self.upstream.health(timeout=recovery.probe_timeout) == 200
            except httpx.HTTPError:
                ok = False
            failures = 0 if ok else failures + 1
            if failures >= recovery.hang_probes:
                break
        reason = f"no /health answer in {failures} probes"
        self._hang_cause = "hang"
        log.error("llama-server pid %s hangs (%s): SIGABRT, then SIGKILL", process.pid, reason)
        self._journal("hang_kill", pid=process.pid, reason=reason, **self.in_flight())
        for sig in (signal.SIGABRT, signal.SIGCONT):  # SIGCONT: a stopped process must run to dump
            _signal(process, sig)
        # _watch, the one task that waits for the process, cancels this once it exits.
        await trio.sleep(recovery.abort_grace)
        _signal(process, signal.SIGKILL)
        await trio.sleep_forever()

    async def _stop(self) -> int | None:
        await self.upstream.aclose()
        process, returncode = self._process, None
        if process is not None and process.returncode is None:
            log.info("stopping llama-server pid %s", process.pid)
            returncode = await terminate(process, self.config.stop_timeout)
        if self.pidfile is not None:
            self.pidfile.unlink(missing_ok=True)
        return returncode

    # -- process hygiene -----------------------------------------------------------

    def _write_pidfile(self) -> None:
        if self.pidfile is None:
            return
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.write_text(json.dumps({"pid": self._process.pid, "binary": str(self.binary),
                                            "port": self.port}))

    def _reap_orphan(self) -> None:
        """Kill a llama-server left running by a sentinel that was SIGKILLed."""
        if self.pidfile is None or not self.pidfile.exists():
            return
        try:
            record = json.loads(self.pidfile.read_text())
            process = psutil.Process(int(record["pid"]))
            cmdline = process.cmdline()
        except (ValueError, KeyError, OSError, psutil.Error):
            self.pidfile.unlink(missing_ok=True)
            return
        # Only ours: the same binary, on the recorded port, with an API key.
        ours = (cmdline and Path(cmdline[0]).name == Path(record.get("binary", "")).name
                and "--api-key" in cmdline and str(record.get("port")) in cmdline)
        if ours:
            log.warning("killing llama-server pid %s left by a previous sentinel", process.pid)
            process.terminate()
            if not _wait_dead(process, self.config.stop_timeout):
                process.kill()
                _wait_dead(process, self.config.stop_timeout)
            self._journal("orphan_reaped", pid=process.pid, reason="left by a previous sentinel",
                          argv=redact(cmdline, None))
        self.pidfile.unlink(missing_ok=True)

    def _journal(self, event: str, **fields: Any) -> None:
        if self.journal is not None:
            self.journal.record(event, **fields)


def redact(argv: Sequence[str], api_key: str | None) -> list[str]:
    """``argv`` without the API key's value."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--api-key":
            out[i + 1] = "<redacted>"
    return [a if api_key is None or a != api_key else "<redacted>" for a in out]


def _wait_dead(process: psutil.Process, timeout: float) -> bool:
    """Wait (blocking: this runs once, before anything else) until a process that is
    not our child has exited; as it is not ours to reap, a zombie counts as dead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _signal(process: Process, sig: int) -> None:
    try:
        process.send_signal(sig)
    except ProcessLookupError:
        pass


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

    def report_stall(self) -> None:
        pass

    def request_completed(self) -> None:
        pass

    async def confirm_crash(self, generation: int) -> bool:
        """Not ours to restart: a server that fails its health check is down."""
        try:
            healthy = await self.upstream.health(timeout=2.0) == 200
        except httpx.HTTPError:
            healthy = False
        if not healthy and self.state.ready:
            self.state.set(Status.DOWN, "health check failed")
        return not healthy

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
