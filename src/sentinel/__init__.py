"""sentinel: a serial, supervised proxy between Claude Code and a local llama-server."""

from ._config import Config as Config, ConfigError as ConfigError
from ._errors import ApiError as ApiError
from ._triage import RequestClass as RequestClass, classify as classify

__version__ = "0.1.0"

__all__ = ["ApiError", "Config", "ConfigError", "RequestClass", "classify", "__version__"]
