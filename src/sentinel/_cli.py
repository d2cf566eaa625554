"""The ``sentinel`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

import attrs
import trio

from . import __version__
from ._config import Config, ConfigError, load
from ._daemon import Daemon, serve
from ._locate import NotFound
from ._supervisor import StartupError

__all__ = ["main"]

EXIT_CONFIG = 2
EXIT_STARTUP = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sentinel", description=(
        "A serial, supervised proxy between Claude Code and a local llama-server."))
    parser.add_argument("--version", action="version", version=f"sentinel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run the daemon in the foreground")
    up.add_argument("--config", metavar="PATH",
                    help="config file (default: $SENTINEL_CONFIG, then the platform's config dir)")
    up.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="port to listen on (default 9090; 0 picks a free one)")
    up.add_argument("--model", metavar="PATH", help="GGUF model for llama-server")
    up.add_argument("--server-binary", metavar="PATH", help="llama-server binary")
    up.add_argument("--upstream", metavar="URL",
                    help="front an already-running llama-server instead of launching one")
    return parser


def _apply_overrides(config: Config, args: argparse.Namespace) -> Config:
    listen, server = config.listen, config.server
    try:
        if args.host is not None:
            listen = attrs.evolve(listen, host=args.host)
        if args.port is not None:
            listen = attrs.evolve(listen, port=args.port)
        if args.model is not None:
            server = attrs.evolve(server, model=args.model)
        if args.server_binary is not None:
            server = attrs.evolve(server, binary=args.server_binary)
        if args.upstream is not None:
            server = attrs.evolve(server, mode="upstream", url=args.upstream)
    except ConfigError as e:
        raise ConfigError(f"command line --{e}") from None
    return attrs.evolve(config, listen=listen, server=server)


def banner(daemon: Daemon, api_key: str) -> str:
    state = daemon.server.state
    upstream = f"llama-server pid {state.pid}" if state.pid else f"upstream {daemon.server.upstream.base_url}"
    return "\n".join([
        f"sentinel {__version__} listening on {daemon.url} ({upstream}, model {daemon.app.model_name})",
        "Point Claude Code at it:",
        f"  export ANTHROPIC_BASE_URL={daemon.url} ANTHROPIC_API_KEY={api_key or 'sentinel'}",
    ])


async def _run_up(config: Config) -> None:
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(lambda task_status: serve(
            config, handle_signals=True, task_status=task_status))
        print(banner(daemon, config.listen.api_key), flush=True)


def _first(group: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    if isinstance(group, kinds):
        return group
    if isinstance(group, BaseExceptionGroup):
        for inner in group.exceptions:
            found = _first(inner, kinds)
            if found is not None:
                return found
    return None


def _up(args: argparse.Namespace) -> int:
    try:
        config = _apply_overrides(load(args.config), args)
    except ConfigError as e:
        print(f"sentinel: invalid config: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=config.log.level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        trio.run(_run_up, config)
    except KeyboardInterrupt:
        pass
    except BaseException as e:
        known = _first(e, (NotFound, StartupError, OSError))
        if known is None:
            raise
        print(f"sentinel: {known}", file=sys.stderr)
        return EXIT_STARTUP
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "up":
        return _up(args)
    return EXIT_CONFIG  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
