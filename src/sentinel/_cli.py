"""The ``sentinel`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Sequence

import attrs
import httpx
import trio

from . import __version__
from ._config import Config, ConfigError, default_state_dir, load
from ._daemon import Daemon, serve
from ._journal import JOURNAL_FILE, format_table, last_crash_line, parse_since, read_events
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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help="config file (default: $SENTINEL_CONFIG, then the platform's config dir)")

    up = commands.add_parser("up", parents=[common], help="run the daemon in the foreground")
    up.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="port to listen on (default 9090; 0 picks a free one)")
    up.add_argument("--model", metavar="PATH", help="GGUF model for llama-server")
    up.add_argument("--server-binary", metavar="PATH", help="llama-server binary")
    up.add_argument("--upstream", metavar="URL",
                    help="front an already-running llama-server instead of launching one")

    journal = commands.add_parser("journal", parents=[common],
                                  help="what happened to llama-server: starts, crashes, restarts, replays")
    journal.add_argument("--json", action="store_true", help="one JSON object per line")
    journal.add_argument("--since", metavar="WHEN", help="30m, 2h, 1d, or an ISO 8601 time")
    journal.add_argument("--follow", "-f", action="store_true", help="keep printing new events")

    commands.add_parser("status", parents=[common], help="the running daemon's state and the last crash")
    service = commands.add_parser(
        "service", help="print a systemd user unit (Linux) or launchd agent (macOS) that runs sentinel at boot")
    service.add_argument("--platform", choices=["linux", "macos"],
                         default="macos" if sys.platform == "darwin" else "linux")
    commands.add_parser("restart-server", parents=[common],
                        help="restart llama-server now, clearing a crash-loop failure")
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


def banner(daemon: Daemon, api_key: str, last_crash: str | None = None) -> str:
    state = daemon.server.state
    upstream = f"llama-server pid {state.pid}" if state.pid else f"upstream {daemon.server.upstream.base_url}"
    lines = [
        f"sentinel {__version__} listening on {daemon.url} ({upstream}, model {daemon.app.model_name})",
        "Point Claude Code at it:",
        f"  export ANTHROPIC_BASE_URL={daemon.url} ANTHROPIC_API_KEY={api_key or 'sentinel'}",
    ]
    if last_crash:
        lines.append(f"({last_crash}; see `sentinel journal`)")
    return "\n".join(lines)


async def _run_up(config: Config) -> None:
    last_crash = last_crash_line(config.state_path)  # before this run adds to the journal
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(lambda task_status: serve(
            config, handle_signals=True, task_status=task_status))
        print(banner(daemon, config.listen.api_key, last_crash), flush=True)


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


def _load(args: argparse.Namespace) -> Config | None:
    try:
        return load(args.config)
    except ConfigError as e:
        print(f"sentinel: invalid config: {e}", file=sys.stderr)
        return None


def _journal(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    since = None
    if args.since:
        try:
            since = parse_since(args.since)
        except ValueError:
            print(f"sentinel: --since: not a duration or a time: {args.since!r}", file=sys.stderr)
            return EXIT_CONFIG
    directory = config.state_path
    entries = list(read_events(directory, since))
    if args.json:
        for entry in entries:
            print(json.dumps(entry))
    elif entries:
        print(format_table(entries))
    else:
        print(f"no events in {directory / JOURNAL_FILE}")
    if args.follow:
        try:
            _follow(directory, len(entries), since, args.json)
        except KeyboardInterrupt:
            pass
    return 0


def _follow(directory, seen: int, since, as_json: bool) -> None:
    while True:
        time.sleep(0.5)
        entries = list(read_events(directory, since))
        for entry in entries[seen:]:
            print(json.dumps(entry) if as_json else format_table([entry]).splitlines()[1], flush=True)
        seen = len(entries) if len(entries) >= seen else 0  # rotated: start over


def _daemon_url(config: Config) -> str:
    host = config.listen.host if config.listen.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{config.listen.port}"


def _status(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    url = _daemon_url(config)
    try:
        health = httpx.get(f"{url}/sentinel/health", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        print(f"sentinel is not running at {url}")
        code = 3
    else:
        upstream, queue = health["upstream"], health["queue"]
        print(f"sentinel at {url}: {health['status']}; llama-server {upstream['status']}"
              f" (pid {upstream['pid']}, start #{upstream['generation']})"
              f"{': ' + upstream['detail'] if upstream['detail'] else ''}; "
              f"{queue['depth']} queued, {'1 in flight' if queue['in_flight'] else 'none in flight'}")
        code = 0 if health["status"] == "ok" else 1
    crash = last_crash_line(config.state_path)
    print(crash or "no crash recorded")
    return code


def _restart_server(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    url = _daemon_url(config)
    try:
        response = httpx.post(f"{url}/sentinel/restart-server", timeout=5)
    except httpx.HTTPError:
        print(f"sentinel is not running at {url}", file=sys.stderr)
        return 3
    if response.status_code != 202:
        print(f"sentinel: {response.json()['error']['message']}", file=sys.stderr)
        return 1
    print("restart requested")
    return 0


def _service(args: argparse.Namespace) -> int:
    name = "dev.sentinel.plist" if args.platform == "macos" else "sentinel.service"
    template = (resources.files("sentinel") / "service" / name).read_text()
    beside_python = Path(sys.executable).parent / "sentinel"  # the venv's console script
    executable = str(beside_python) if beside_python.exists() else shutil.which("sentinel")
    if executable is None:
        print("sentinel: cannot find the `sentinel` executable to run at boot", file=sys.stderr)
        return 1
    log_path = default_state_dir() / "sentinel.log"
    print(template.replace("@SENTINEL@", executable).replace("@LOG@", str(log_path)), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"up": _up, "journal": _journal, "status": _status, "restart-server": _restart_server,
                "service": _service}
    return commands[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
