"""The daemon: one Trio nursery, its parts started in order.

    supervisor  ──started (upstream healthy)──>
    worker      ──started──>
    front end   ──started (listening)──>  banner

Shutdown is cancellation. The first SIGINT or SIGTERM stops the front end
accepting and gives open requests ``graceful_timeout`` to finish; then the
nursery is cancelled and the supervisor stops llama-server. A second signal
cancels at once.
"""

from __future__ import annotations

import logging
import signal
from functools import partial
from pathlib import Path
from typing import Callable

import attrs
import hypercorn
import hypercorn.trio
import trio

from ._app import App
from ._channel import SerialChannel
from ._config import Config, ConfigError, ServerConfig
from ._errors import overloaded
from ._journal import Journal
from ._locate import DEFAULT_MODEL_MAX_TOKENS, find_binary, find_model
from ._supervisor import ExternalServer, Launcher, Supervisor, TrioLauncher, model_alias

__all__ = ["Daemon", "serve"]

log = logging.getLogger("sentinel")


@attrs.frozen
class Daemon:
    """What a started daemon tells its caller."""

    url: str
    server: Supervisor | ExternalServer
    channel: SerialChannel
    app: App
    journal: Journal


def build_server(config: Config, journal: Journal,
                 launcher: Launcher | None = None) -> tuple[Supervisor | ExternalServer, str]:
    """The supervisor (or the external upstream) and the model name to report."""
    if config.server.mode == "upstream":
        return ExternalServer(config.server), config.server.model_name or "local-model"
    binary = find_binary(config.server.binary)
    model = find_model(config.server.model)
    log.info("llama-server binary %s (from %s); model %s", binary.path, binary.source, model)
    supervisor = Supervisor(
        config.server, binary.path, model, binary.environment(),
        log_path=config.state_path / "llama-server.log",
        recovery=config.recovery,
        journal=journal,
        launcher=launcher or TrioLauncher(),
        pidfile=config.state_path / "llama-server.pid",
        reload=_config_reloader(config),
    )
    return supervisor, model_alias(config.server, model)


def _config_reloader(config: Config) -> Callable[[], ServerConfig | None]:
    """For the failed state: the new ``[server]`` section once the config file changes."""
    path = Path(config.source) if config.source else None
    seen = path.stat().st_mtime_ns if path and path.exists() else None

    def reload() -> ServerConfig | None:
        nonlocal seen
        if path is None or not path.exists() or path.stat().st_mtime_ns == seen:
            return None
        seen = path.stat().st_mtime_ns
        try:
            return Config.from_toml(path).server
        except ConfigError as e:
            log.error("config changed but is invalid: %s", e)
            return None

    return reload


def _hypercorn_config(config: Config) -> hypercorn.Config:
    hc = hypercorn.Config()
    host = config.listen.host
    hc.bind = [f"[{host}]:{config.listen.port}" if ":" in host else f"{host}:{config.listen.port}"]
    # Past shutdown_grace sentinel answers the in-flight request itself; this is a backstop.
    hc.graceful_timeout = config.recovery.shutdown_grace + 5.0
    hc.keep_alive_timeout = 75.0
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


async def serve(config: Config, *, launcher: Launcher | None = None,
                handle_signals: bool = False,
                task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
    journal = Journal(config.state_path, clock=trio.current_time)
    server, model_name = build_server(config, journal, launcher)
    channel = SerialChannel(server, queue_limit=config.channel.queue_limit,
                            recovery=config.recovery, journal=journal)
    if isinstance(server, Supervisor):
        server.in_flight = channel.in_flight_facts
    max_tokens = config.server.max_tokens
    if not max_tokens and config.server.mode == "supervise" and not config.server.model:
        max_tokens = DEFAULT_MODEL_MAX_TOKENS
    app = App(config, server, channel, model_name=model_name, max_tokens=max_tokens)
    stop_accepting = trio.Event()

    async with trio.open_nursery() as nursery:
        if handle_signals:
            nursery.start_soon(_on_signals, app, stop_accepting, nursery.cancel_scope)
        await nursery.start(server.run)
        await nursery.start(channel.run)
        hc = _hypercorn_config(config)
        binds = await nursery.start(partial(
            _serve_front_end, app, hc, stop_accepting, nursery.cancel_scope))
        nursery.start_soon(_drain, app, stop_accepting, config.recovery.shutdown_grace)
        url = binds[0]
        task_status.started(Daemon(url, server, channel, app, journal))


async def _serve_front_end(app: App, hc: hypercorn.Config, stop_accepting: trio.Event,
                           everything: trio.CancelScope, *,
                           task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    await hypercorn.trio.serve(app, hc, shutdown_trigger=stop_accepting.wait, task_status=task_status)
    # The front end has drained: nothing can reach the upstream any more.
    everything.cancel()


async def _drain(app: App, stop_accepting: trio.Event, grace: float) -> None:
    """On shutdown: refuse new requests, give the one in flight ``grace``, then answer it."""
    await stop_accepting.wait()
    app.draining = True
    await trio.sleep(grace)
    app.channel.fail_all(overloaded("sentinel is shutting down; retry shortly.", retry_after=5))


async def _on_signals(app: App, stop_accepting: trio.Event, everything: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not stop_accepting.is_set():
                log.info("%s: finishing open requests, then stopping", signal.Signals(signum).name)
                stop_accepting.set()
            else:
                log.info("%s again: stopping now", signal.Signals(signum).name)
                # Even now, no client is left without an answer.
                app.channel.fail_all(overloaded("sentinel is stopping; retry shortly.", retry_after=5))
                await trio.sleep(0.2)  # for the handlers to write it
                everything.cancel()
                return
