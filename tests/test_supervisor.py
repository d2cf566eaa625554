"""The supervisor with a fake launcher and a scripted /health, on trio's autojump clock."""

import signal
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing

from sentinel._config import ServerConfig
from sentinel._supervisor import StartupError, Status, Supervisor, server_argv, terminate
from conftest import FakeLauncher, FakeProcess


def make_supervisor(tmp_path: Path, launcher: FakeLauncher, **config) -> Supervisor:
    supervisor = Supervisor(ServerConfig(**config), Path("/bin/llama-server"), Path("/m/model.gguf"),
                            env={}, log_path=tmp_path / "server.log", launcher=launcher)
    supervisor.upstream.transport = httpx.MockTransport(launcher.health)
    return supervisor


async def test_ready_only_after_health_turns_200(tmp_path, autojump_clock, nursery):
    launcher = FakeLauncher(load_time=2.0)
    supervisor = make_supervisor(tmp_path, launcher)
    await nursery.start(supervisor.run)
    assert supervisor.state.status is Status.READY
    assert 2.0 <= trio.current_time() <= 2.0 + supervisor.config.health_interval
    assert supervisor.state.pid == 1000


async def test_argv_binds_loopback_with_a_private_key(tmp_path):
    argv = server_argv("/bin/llama-server", "/m.gguf", ServerConfig(ctx_size=8192, args=("--jinja",)),
                       port=4242, api_key="k")
    assert argv[:3] == ["/bin/llama-server", "--model", "/m.gguf"]
    assert argv[-6:] == ["--host", "127.0.0.1", "--port", "4242", "--api-key", "k"]
    assert "--jinja" in argv and argv[argv.index("--ctx-size") + 1] == "8192"


def test_replies_name_the_model_as_v1_models_does_not_by_its_path():
    def alias(config: ServerConfig) -> str:
        argv = server_argv("/bin/llama-server", "/models/qwen3-coder-30b.gguf", config, port=1, api_key="k")
        return argv[argv.index("--alias") + 1]

    assert alias(ServerConfig()) == "qwen3-coder-30b"
    assert alias(ServerConfig(model_name="coder")) == "coder"
    # The user's own --alias comes last on the command line, and wins.
    argv = server_argv("/bin/llama-server", "/m.gguf", ServerConfig(args=("--alias", "mine")), port=1, api_key="k")
    last = len(argv) - 1 - argv[::-1].index("--alias")
    assert argv.count("--alias") == 2 and argv[last + 1] == "mine"


async def test_api_keys_differ_between_instances(tmp_path):
    launcher = FakeLauncher()
    assert make_supervisor(tmp_path, launcher).api_key != make_supervisor(tmp_path, launcher).api_key


async def test_startup_timeout_kills_the_server(tmp_path, autojump_clock):
    launcher = FakeLauncher(load_time=1000)
    supervisor = make_supervisor(tmp_path, launcher, startup_timeout=30)
    with pytest.raises(StartupError, match="not healthy within 30 s"):
        await supervisor.run()
    process = launcher.launched[0]
    assert process.signals == [signal.SIGTERM] and process.returncode == -signal.SIGTERM


async def test_exit_during_startup_names_the_cause(tmp_path, autojump_clock, nursery):
    launcher = FakeLauncher(load_time=10)
    supervisor = make_supervisor(tmp_path, launcher)
    (tmp_path / "server.log").write_text("loading...\nerror: failed to open model file\n")

    async def crash_soon():
        await trio.sleep(1)
        launcher.launched[0].exit(1)

    nursery.start_soon(crash_soon)
    with pytest.raises(StartupError, match="exit code 1.*failed to open model file"):
        await supervisor.run()


async def test_stop_escalates_from_sigterm_to_sigkill(tmp_path, autojump_clock):
    launcher = FakeLauncher(obeys_sigterm=False, load_time=0)
    supervisor = make_supervisor(tmp_path, launcher, stop_timeout=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        stopped_at = trio.current_time()
        nursery.cancel_scope.cancel()
    process = launcher.launched[0]
    assert process.signals == [signal.SIGTERM, signal.SIGKILL]
    assert process.returncode == -signal.SIGKILL
    assert trio.current_time() - stopped_at == pytest.approx(10)
    assert supervisor.state.status is Status.STOPPED


async def test_terminate_returns_at_once_when_sigterm_is_obeyed(autojump_clock):
    process = FakeProcess(1)
    assert await terminate(process, grace=10) == -signal.SIGTERM
    assert trio.current_time() == 0


async def test_crash_is_seen_and_the_server_comes_back(tmp_path, autojump_clock, nursery):
    launcher = FakeLauncher(load_time=1.0)
    supervisor = make_supervisor(tmp_path, launcher)
    await nursery.start(supervisor.run)
    crashed_at = trio.current_time()
    launcher.launched[0].exit(-signal.SIGSEGV)
    await trio.testing.wait_all_tasks_blocked()
    assert supervisor.state.status is Status.DOWN
    assert supervisor.state.detail == "SIGSEGV"
    await supervisor.state.wait_ready()
    assert len(launcher.launched) == 2 and supervisor.state.generation == 2
    assert trio.current_time() > crashed_at
