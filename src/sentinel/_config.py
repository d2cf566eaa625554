"""Configuration: TOML in, validated frozen attrs objects out.

TOML is parsed into plain data first, then each section is built field by
field, so every problem is reported as one line naming the key:
``server.port: must be between 0 and 65535 (got 70000)``.

The file is found at ``--config``, then ``$SENTINEL_CONFIG``, then
``sentinel.toml`` in the platform's config directory. ``config/sentinel.example.toml``
documents every key with its default.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import attrs
import platformdirs

__all__ = ["Config", "ConfigError", "find_config_file", "load"]

APP_NAME = "sentinel"
POLICIES = ("synthesize", "forward")


class ConfigError(Exception):
    """A configuration problem, as one line that names the key."""


def _check(predicate, problem: str):
    def validator(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not predicate(value):
            raise ConfigError(f"{attribute.name}: {problem} (got {value!r})")
    return validator


def _one_of(*choices: str):
    return _check(lambda v: v in choices, "must be one of " + ", ".join(choices))


_port = _check(lambda v: 0 <= v <= 65535, "must be between 0 and 65535")
_positive = _check(lambda v: v > 0, "must be greater than 0")
_not_negative = _check(lambda v: v >= 0, "must be 0 or more")


@attrs.frozen
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=9090, validator=_port)
    #: If set, clients must present this key (x-api-key or Bearer); else any key is accepted.
    api_key: str = ""
    max_body_bytes: int = attrs.field(default=32 * 1024 * 1024, validator=_positive)


@attrs.frozen
class ServerConfig:
    #: ``supervise`` launches and owns llama-server; ``upstream`` fronts a running one.
    mode: str = attrs.field(default="supervise", validator=_one_of("supervise", "upstream"))
    #: Base URL of the server to front in ``upstream`` mode.
    url: str = ""
    #: Key to send to an ``upstream`` server that requires one.
    upstream_api_key: str = ""
    binary: str = ""
    model: str = ""
    #: Name reported by ``GET /v1/models``; empty means the model file's stem.
    model_name: str = ""
    ctx_size: int = attrs.field(default=0, validator=_not_negative)
    #: Upper bound on a request's max_tokens; 0 leaves it to the client
    #: (with the built-in demo model, 0 means 512).
    max_tokens: int = attrs.field(default=0, validator=_not_negative)
    args: tuple[str, ...] = ()
    startup_timeout: float = attrs.field(default=600.0, validator=_positive)
    stop_timeout: float = attrs.field(default=10.0, validator=_positive)
    health_interval: float = attrs.field(default=0.02, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.mode == "upstream" and not self.url:
            raise ConfigError("url: is required when mode is 'upstream'")


@attrs.frozen
class ChannelConfig:
    #: Requests waiting for the model, beyond which clients get 529 with retry-after.
    queue_limit: int = attrs.field(default=32, validator=_positive)
    #: A streaming request silent this long (queued, or in prefill) gets its 200
    #: committed and an ``event: ping``, then another every interval.
    ping_interval: float = attrs.field(default=15.0, validator=_positive)
    retry_after: int = attrs.field(default=2, validator=_not_negative)


@attrs.frozen
class RecoveryConfig:
    """When llama-server dies or hangs: detection, restart, replay."""

    #: Restart backoff: the first delay, doubling to the cap; back to the first
    #: after this many seconds of healthy running.
    backoff_initial: float = attrs.field(default=0.5, validator=_positive)
    backoff_cap: float = attrs.field(default=30.0, validator=_positive)
    backoff_reset_after: float = attrs.field(default=60.0, validator=_positive)
    #: More than this many crashes within the window, with no request
    #: completing, puts sentinel in the ``failed`` state.
    crash_loop_max: int = attrs.field(default=5, validator=_positive)
    crash_loop_window: float = attrs.field(default=120.0, validator=_positive)
    #: While ``failed``, try starting the server again this often.
    failed_retry_interval: float = attrs.field(default=300.0, validator=_positive)
    #: Health probes while the server is ready: a hang is this many probes
    #: in a row that time out or fail.
    probe_interval: float = attrs.field(default=2.0, validator=_positive)
    probe_timeout: float = attrs.field(default=2.0, validator=_positive)
    hang_probes: int = attrs.field(default=3, validator=_positive)
    #: A request that gets no bytes this long has its server probed at once.
    stall_timeout: float = attrs.field(default=60.0, validator=_positive)
    #: Seconds between SIGABRT (so the server can dump) and SIGKILL for a hang.
    abort_grace: float = attrs.field(default=2.0, validator=_positive)
    #: A request whose attempts crash the server max_replays + 1 times is given up on.
    max_replays: int = attrs.field(default=2, validator=_not_negative)
    quarantine_seconds: float = attrs.field(default=600.0, validator=_positive)
    #: On SIGTERM/SIGINT, how long the in-flight request may take to finish.
    shutdown_grace: float = attrs.field(default=30.0, validator=_positive)


@attrs.frozen
class TriageConfig:
    title: str = attrs.field(default="synthesize", validator=_one_of(*POLICIES))
    haiku: str = attrs.field(default="synthesize", validator=_one_of(*POLICIES))
    bash_prefix: str = attrs.field(default="synthesize", validator=_one_of(*POLICIES))
    quota: str = attrs.field(default="synthesize", validator=_one_of(*POLICIES))

    def policy(self, request_class_value: str) -> str:
        return getattr(self, request_class_value, "forward")


@attrs.frozen
class CountTokensConfig:
    mode: str = attrs.field(default="upstream", validator=_one_of("upstream", "estimate"))
    concurrency: int = attrs.field(default=4, validator=_positive)
    timeout: float = attrs.field(default=5.0, validator=_positive)


@attrs.frozen
class LogConfig:
    level: str = attrs.field(default="info", validator=_one_of("debug", "info", "warning", "error"))


@attrs.frozen
class Config:
    listen: ListenConfig = ListenConfig()
    server: ServerConfig = ServerConfig()
    channel: ChannelConfig = ChannelConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    triage: TriageConfig = TriageConfig()
    count_tokens: CountTokensConfig = CountTokensConfig()
    log: LogConfig = LogConfig()
    #: Where logs, the pidfile and the journal live; empty means the platform's state dir.
    state_dir: str = ""
    #: The file this came from, if any.
    source: str | None = attrs.field(default=None, eq=False)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Config:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML ({e})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> Config:
        sections: dict[str, Any] = {}
        top_level: dict[str, Any] = {}
        for key, value in data.items():
            field = _fields(cls).get(key)
            if field is None or key == "source":
                raise ConfigError(f"{key}: unknown key")
            if attrs.has(type(field.default)):
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: must be a table")
                sections[key] = _build(type(field.default), value, prefix=key + ".")
            else:
                top_level[key] = _coerce(key, field.default, value)
        return cls(**sections, **top_level, source=source)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser() if self.state_dir else default_state_dir()


def _fields(cls: type) -> dict[str, attrs.Attribute]:
    return {field.name: field for field in attrs.fields(cls)}


def _coerce(key: str, default: Any, value: Any) -> Any:
    """Check ``value`` against the type of the field's default."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        kind = "true or false"
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        kind = "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        kind = "a number"
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        value = tuple(value) if ok else value
        kind = "a list of strings"
    else:
        ok = isinstance(value, str)
        kind = "a string"
    if not ok:
        raise ConfigError(f"{key}: must be {kind} (got {value!r})")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key")
        kwargs[key] = _coerce(prefix + key, fields[key].default, value)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(prefix + str(e)) from None


def default_config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def default_state_dir() -> Path:
    return Path(platformdirs.user_state_dir(APP_NAME, appauthor=False))


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def find_config_file(explicit: str | None = None) -> Path | None:
    """``--config``, then ``$SENTINEL_CONFIG``, then the platform's config dir."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get("SENTINEL_CONFIG")
    if from_env:
        return Path(from_env)
    candidate = default_config_dir() / "sentinel.toml"
    return candidate if candidate.is_file() else None


def load(explicit: str | None = None) -> Config:
    path = find_config_file(explicit)
    return Config() if path is None else Config.from_toml(path)
