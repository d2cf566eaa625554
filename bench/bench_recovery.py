"""Benchmark: crash recovery against the server's own cold start, in one run.

    .venv/bin/python bench/bench_recovery.py [--n 10]

1. Cold start: llama-server launched directly, from exec to /health 200
   (polled every 10 ms), N times.
2. Through `sentinel up` (backoff capped at its 0.5 s initial delay, so every
   restart pays the same), N times: a request is sent, llama-server is
   SIGKILLed during its prefill, and from sentinel's journal (microsecond
   wall-clock timestamps) we read:
   - detection latency: the kill → the ``crash`` event;
   - restart-to-ready: the ``crash`` event → ``ready`` (0.5 s backoff, spawn, load);
   - load: ``server_start`` → ``ready``;
   - crash-to-replay start: ``ready`` → ``replay``.

Results print as a table and are saved to bench/results/recovery.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import trio

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))
sys.path.insert(0, str(HERE.parent / "tests"))

from daemon_helpers import start_daemon  # noqa: E402
from sentinel._locate import find_binary, find_model  # noqa: E402
from sentinel._supervisor import free_port  # noqa: E402
from test_faults import long_prompt, turn  # noqa: E402


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(values), "p95": ordered[round(0.95 * (len(ordered) - 1))],
            "min": ordered[0], "max": ordered[-1], "n": len(values)}


def cold_starts(n: int) -> list[float]:
    binary, model = find_binary(""), find_model("")
    times = []
    for _ in range(n):
        port = free_port()
        start = time.monotonic()
        process = subprocess.Popen(
            [str(binary.path), "--model", str(model), "--metrics", "--parallel", "1",
             "--threads-http", "8", "--host", "127.0.0.1", "--port", str(port), "--api-key", "k"],
            env=binary.environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.01)
            times.append(time.monotonic() - start)
        finally:
            process.terminate()
            process.wait()
    return times


def wall(entry: dict) -> float:
    return datetime.datetime.fromisoformat(entry["ts"]).timestamp()


async def crashes(n: int) -> dict[str, list[float]]:
    daemon = start_daemon(pathlib.Path(tempfile.mkdtemp(prefix="sentinel-bench-")),
                          "[recovery]\nbackoff_cap = 0.5\nmax_replays = 100\ncrash_loop_max = 1000\n")
    out: dict[str, list[float]] = {"detection": [], "restart_to_ready": [], "load": [], "replay_after_ready": []}
    try:
        async with httpx.AsyncClient(base_url=daemon.url, timeout=300) as http:
            for _ in range(n):
                async with trio.open_nursery() as nursery:
                    body = turn(long_prompt(), stream=False)
                    nursery.start_soon(lambda: http.post("/v1/messages", json=body))
                    while daemon.upstream_metrics()["llamacpp:requests_processing"] < 1:
                        await trio.sleep(0.01)
                    await trio.sleep(0.3)
                    pid = daemon.health()["upstream"]["pid"]
                    killed_at = time.time()
                    os.kill(pid, signal.SIGKILL)
                events = [json.loads(line) for line in (daemon.state_dir / "journal.jsonl").read_text().splitlines()]
                crash = next(e for e in events if e["event"] == "crash" and e["pid"] == pid)
                after = [e for e in events if wall(e) >= wall(crash)]
                start = next(e for e in after if e["event"] == "server_start")
                ready = next(e for e in after if e["event"] == "ready")
                replay = next(e for e in after if e["event"] == "replay")
                out["detection"].append(wall(crash) - killed_at)
                out["restart_to_ready"].append(wall(ready) - wall(crash))
                out["load"].append(wall(ready) - wall(start))
                out["replay_after_ready"].append(wall(replay) - wall(ready))
    finally:
        daemon.stop()
    return out


async def main(n: int) -> None:
    cold = cold_starts(n)
    measured = await crashes(n)
    results = {"n": n, "cold_start_s": summary(cold),
               **{f"{key}_s": summary(values) for key, values in measured.items()}}
    cold_median = results["cold_start_s"]["median"]
    results["restart_to_ready_minus_cold_s"] = results["restart_to_ready_s"]["median"] - cold_median
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "recovery.json").write_text(json.dumps(results, indent=2))
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    rows = [
        ("cold start, direct (median / p95)", f"{ms(cold_median)} / {ms(results['cold_start_s']['p95'])}"),
        ("crash → ready through sentinel (median / p95)",
         f"{ms(results['restart_to_ready_s']['median'])} / {ms(results['restart_to_ready_s']['p95'])}"),
        ("  of which backoff", "500.0 ms"),
        ("  load inside sentinel (median)", ms(results["load_s"]["median"])),
        ("crash → ready minus cold start (median)", ms(results["restart_to_ready_minus_cold_s"])),
        ("detection latency (median / max)",
         f"{ms(results['detection_s']['median'])} / {ms(results['detection_s']['max'])}"),
        ("ready → replay start (median / max)",
         f"{ms(results['replay_after_ready_s']['median'])} / {ms(results['replay_after_ready_s']['max'])}"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"| {name.ljust(width)} | {value} |" for name, value in rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10)
    trio.run(main, parser.parse_args().n)
