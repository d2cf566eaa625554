"""Benchmark: sentinel against direct llama-server, in one run, same prompts.

    .venv/bin/python bench/bench_proxy.py [--n 30]

Starts `sentinel up` with the built-in model, finds the llama-server it
supervises, and measures:

1. streaming turns, direct vs through sentinel, interleaved: time to first
   byte and total time (median, p95, and the median of paired differences);
2. synthesized title replies: throughput, and p99 latency while a real
   stream is flowing, and that stream's token rate against an undisturbed one;
3. sentinel's resident memory idle, and with 100 queued 90 KB requests.

Results print as a table and are saved to bench/results/proxy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import httpx
import psutil
import trio

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))

from conftest import main_turn, title_request  # noqa: E402
from daemon_helpers import start_daemon  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p95": pct(values, 95), "p99": pct(values, 99),
            "n": len(values)}


async def timed_stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, int]:
    """Time to first body byte, total time, and content deltas, of one streaming turn."""
    start = time.perf_counter()
    first = None
    deltas = 0
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200, response.status_code
        async for chunk in response.aiter_raw():
            if first is None:
                first = time.perf_counter()
            deltas += chunk.count(b"event: content_block_delta")
    return first - start, time.perf_counter() - start, deltas


async def bench_streaming(daemon_url: str, direct_url: str, key: str, n: int) -> dict:
    body = {**main_turn(stream=True, max_tokens=8), "temperature": 0}
    via, direct = {"ttfb": [], "total": []}, {"ttfb": [], "total": []}
    async with httpx.AsyncClient(timeout=300) as through, \
            httpx.AsyncClient(timeout=300, headers={"authorization": f"Bearer {key}"},
                              # as sentinel does upstream: llama-server drops idle keep-alives
                              limits=httpx.Limits(max_keepalive_connections=0)) as straight:
        for _ in range(3):  # warm the prompt cache and both connection pools
            await timed_stream(through, f"{daemon_url}/v1/messages", body)
            await timed_stream(straight, f"{direct_url}/v1/messages", body)
        for i in range(n):
            order = [(through, daemon_url, via), (straight, direct_url, direct)]
            for client, url, out in order if i % 2 else order[::-1]:
                ttfb, total, _ = await timed_stream(client, f"{url}/v1/messages", body)
                out["ttfb"].append(ttfb * 1000)
                out["total"].append(total * 1000)
    added = [a - b for a, b in zip(via["ttfb"], direct["ttfb"])]
    added_total = [a - b for a, b in zip(via["total"], direct["total"])]
    return {
        "direct_ttfb_ms": summary(direct["ttfb"]), "sentinel_ttfb_ms": summary(via["ttfb"]),
        "direct_total_ms": summary(direct["total"]), "sentinel_total_ms": summary(via["total"]),
        "added_ttfb_ms": summary(added), "added_total_ms": summary(added_total),
        "ttfb_ratio_median": statistics.median(via["ttfb"]) / statistics.median(direct["ttfb"]),
        "total_ratio_median": statistics.median(via["total"]) / statistics.median(direct["total"]),
    }


async def bench_synthesized(daemon_url: str, n: int) -> dict:
    body = title_request(stream=True)
    stream_body = {"model": "m", "max_tokens": 200, "stream": True, "temperature": 0,
                   "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}
    async with httpx.AsyncClient(base_url=daemon_url, timeout=60) as client:
        # Throughput: 8 concurrent clients for n * 10 replies.
        count = n * 10
        start = time.perf_counter()

        async def worker(k: int) -> None:
            for _ in range(k):
                response = await client.post("/v1/messages", json=body)
                assert response.status_code == 200

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(worker, count // 8)
        throughput = (count // 8 * 8) / (time.perf_counter() - start)

        # Undisturbed streams, for the token rate and its run-to-run noise.
        quiet = [await timed_stream(client, "/v1/messages", stream_body) for _ in range(3)]
        quiet_rates = [deltas / total for _, total, deltas in quiet]

        # The same stream with titles fired at it, one after another.
        latencies: list[float] = []
        result = {}

        async def stream() -> None:
            result["busy"] = await timed_stream(client, "/v1/messages", stream_body)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream)
            await trio.sleep(0.5)  # let the stream start flowing
            while "busy" not in result:  # titles back to back, far more than Claude Code sends
                t = time.perf_counter()
                response = await client.post("/v1/messages", json=body)
                latencies.append((time.perf_counter() - t) * 1000)
                assert response.status_code == 200
                await trio.sleep(0.01)
        _, busy_total, busy_deltas = result["busy"]
    quiet_rate, busy_rate = statistics.median(quiet_rates), busy_deltas / busy_total
    return {
        "replies_per_second": throughput,
        "latency_during_stream_ms": summary(latencies),
        "stream_deltas_per_s_quiet": quiet_rate,
        "stream_deltas_per_s_with_titles": busy_rate,
        "stream_rate_ratio": busy_rate / quiet_rate,
        "stream_rate_noise": (max(quiet_rates) - min(quiet_rates)) / quiet_rate,
    }


async def bench_memory(daemon_url: str, pid: int) -> dict:
    process = psutil.Process(pid)
    idle = process.memory_info().rss
    big = main_turn(stream=False, max_tokens=4)
    big["messages"] = [*big["messages"], {"role": "user", "content": "x" * (90_000 - len(json.dumps(big)))}]
    payload = json.dumps(big).encode()
    blocker = {"model": "m", "max_tokens": 400, "stream": True,
               "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}
    async with httpx.AsyncClient(base_url=daemon_url, timeout=600,
                                 limits=httpx.Limits(max_connections=200)) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: timed_stream(client, "/v1/messages", blocker))
            await trio.sleep(1.0)
            for _ in range(100):
                nursery.start_soon(lambda: client.post("/v1/messages", content=payload,
                                                       headers={"content-type": "application/json"}))
            with trio.fail_after(60):
                while (await client.get("/sentinel/health")).json()["queue"]["depth"] < 100:
                    await trio.sleep(0.1)
            queued = process.memory_info().rss
            nursery.cancel_scope.cancel()  # the clients leave; their jobs leave the queue
    return {"rss_idle_mib": idle / 2**20, "rss_100_queued_90kb_mib": queued / 2**20,
            "body_bytes": len(payload)}


def table(results: dict) -> str:
    s, y, m = results["streaming"], results["synthesized"], results["memory"]
    rows = [
        ("streaming TTFB, direct (median / p95)", f"{s['direct_ttfb_ms']['median']:.1f} / {s['direct_ttfb_ms']['p95']:.1f} ms"),
        ("streaming TTFB, sentinel (median / p95)", f"{s['sentinel_ttfb_ms']['median']:.1f} / {s['sentinel_ttfb_ms']['p95']:.1f} ms"),
        ("added TTFB, paired (median / p95)", f"{s['added_ttfb_ms']['median']:.2f} / {s['added_ttfb_ms']['p95']:.2f} ms"),
        ("TTFB ratio sentinel/direct (median)", f"{s['ttfb_ratio_median']:.3f}"),
        ("streaming total, direct (median / p95)", f"{s['direct_total_ms']['median']:.1f} / {s['direct_total_ms']['p95']:.1f} ms"),
        ("streaming total, sentinel (median / p95)", f"{s['sentinel_total_ms']['median']:.1f} / {s['sentinel_total_ms']['p95']:.1f} ms"),
        ("total ratio sentinel/direct (median)", f"{s['total_ratio_median']:.3f}"),
        ("synthesized titles per second (8 clients)", f"{y['replies_per_second']:.0f}"),
        ("title latency during a stream (median / p99)", f"{y['latency_during_stream_ms']['median']:.2f} / {y['latency_during_stream_ms']['p99']:.2f} ms (n={y['latency_during_stream_ms']['n']})"),
        ("stream rate with titles / without", f"{y['stream_rate_ratio']:.3f} (quiet run-to-run spread {y['stream_rate_noise']:.3f})"),
        ("sentinel RSS idle", f"{m['rss_idle_mib']:.1f} MiB"),
        ("sentinel RSS, 100 queued 90 KB requests", f"{m['rss_100_queued_90kb_mib']:.1f} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"| {name.ljust(width)} | {value} |" for name, value in rows)


async def main(n: int, threads: int | None) -> None:
    tmp = tempfile.mkdtemp(prefix="sentinel-bench-")
    server_args = f'[server]\nargs = ["--threads", "{threads}"]\n' if threads else ""
    if True:
        daemon = start_daemon(pathlib.Path(tmp),
                              extra_config="[channel]\nqueue_limit = 128\n" + server_args)
        try:
            direct_url, key, _ = daemon.upstream()
            results = {
                "n": n,
                "llama_server_threads": threads,
                "streaming": await bench_streaming(daemon.url, direct_url, key, n),
                "synthesized": await bench_synthesized(daemon.url, n),
                "memory": await bench_memory(daemon.url, daemon.process.pid),
                "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            }
        finally:
            daemon.stop()
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "proxy.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--threads", type=int, help="llama-server --threads (default: its own)")
    args = parser.parse_args()
    trio.run(main, args.n, args.threads)
