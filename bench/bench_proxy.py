"""Benchmark: sentinel against direct llama-server, in one run, same prompts.

    .venv/bin/python bench/bench_proxy.py [--n 100]

Starts `sentinel up` with the built-in model, finds the llama-server it
supervises, and measures:

1. streaming turns sent in rotation direct, through a bare TCP relay (the
   floor for any proxy hop on this machine: a Python + trio byte pipe with no
   HTTP in it), through a bare hypercorn proxy (the floor for sentinel's
   stack: the same front end, parsing the body and relaying the upstream's
   bytes, and nothing else) and through sentinel: time to first byte and
   total time (median, p95, and the median of paired differences against
   direct);
2. synthesized title replies: throughput, and, while a real stream flows,
   their p99 latency and that stream's token rate, against quiet streams
   alternated with it, at two title rates: every 100 ms and back to back.
   As a control, the same titles from the same client also go to a
   do-nothing server (a canned reply, no HTTP stack): the slowdown any
   server would show on this machine, with the client's own CPU in it;
3. sentinel's resident memory idle, and with 100 queued 90 KB requests.

Results print as a table and are saved to bench/results/proxy.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Iterator

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


async def connect(port: int) -> trio.SocketStream:
    """A loopback connection opened as sentinel opens one: no resolution, no happy eyeballs."""
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def relay(port: int, upstream_port: int) -> None:
    """A bare TCP relay: bytes in, bytes out, no HTTP (run as a child process)."""

    async def pipe(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    async def handle(client: trio.SocketStream) -> None:
        upstream = await connect(upstream_port)
        async with upstream, client, trio.open_nursery() as nursery:
            nursery.start_soon(pipe, client, upstream, nursery.cancel_scope)
            nursery.start_soon(pipe, upstream, client, nursery.cancel_scope)

    await trio.serve_tcp(handle, port, host="127.0.0.1")


async def hypercorn_proxy(port: int, upstream_port: int) -> None:
    """The least a hypercorn front end can do per request: read and parse the
    body, open a connection, send it on, relay what comes back, chunk by chunk
    (run as a child process)."""
    import h11
    import hypercorn.config
    import hypercorn.trio
    import orjson

    async def app(scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        orjson.loads(body)
        auth = next(value for name, value in scope["headers"] if name == b"authorization")
        upstream = await connect(upstream_port)
        connection = h11.Connection(h11.CLIENT)
        headers = [("host", "127.0.0.1"), ("content-type", "application/json"),
                   ("authorization", auth), ("content-length", str(len(body)))]
        await upstream.send_all(connection.send(h11.Request(method="POST", target="/v1/messages",
                                                            headers=headers))
                                + connection.send(h11.Data(data=body))
                                + connection.send(h11.EndOfMessage()))
        async with upstream:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await upstream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    await send({"type": "http.response.start", "status": event.status_code,
                                "headers": [(b"content-type", b"text/event-stream")]})
                elif isinstance(event, h11.Data):
                    await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
                else:
                    return await send({"type": "http.response.body", "body": b""})

    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.keep_alive_timeout = 75
    config.accesslog = None
    config.loglevel = "WARNING"
    await hypercorn.trio.serve(app, config)


async def null_server(port: int) -> None:
    """Answers every request at once with the bytes sentinel sends for a title,
    parsing no more than the content-length (run as a child process)."""
    from sentinel import _synth

    body = _synth.sse_events(title_request(stream=True), '{"title": "A title"}')
    reply = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
             b"content-length: %d\r\n\r\n" % len(body)) + body
    length = re.compile(rb"content-length:\s*(\d+)", re.I)

    async def handle(client: trio.SocketStream) -> None:
        buffer = b""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                while b"\r\n\r\n" not in buffer:
                    if not (data := await client.receive_some(65536)):
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                size = int(length.search(head).group(1))
                while len(buffer) < size:
                    buffer += await client.receive_some(65536)
                buffer = buffer[size:]
                await client.send_all(reply)

    await trio.serve_tcp(handle, port, host="127.0.0.1")


@contextlib.contextmanager
def child(*args: str) -> Iterator[str]:
    """This script as a child process (--relay, --hypercorn, --null) on a free
    port: its URL once it listens; stopped when the block ends."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, __file__, args[0], str(port), *args[1:]])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait()


async def bench_streaming(daemon_url: str, direct_url: str, key: str, n: int) -> dict:
    body = {**main_turn(stream=True, max_tokens=8), "temperature": 0}
    upstream_port = direct_url.rsplit(":", 1)[1]
    auth = {"authorization": f"Bearer {key}"}
    # llama-server closes the connection after every stream, so its clients
    # cannot keep one alive; sentinel's clients (Claude Code) do.
    fresh = httpx.Limits(max_keepalive_connections=0)
    with child("--relay", upstream_port) as relay_url, child("--hypercorn", upstream_port) as hypercorn_url:
        routes = {"direct": (direct_url, auth, fresh), "relay": (relay_url, auth, fresh),
                  "hypercorn": (hypercorn_url, auth, httpx.Limits()),
                  "sentinel": (daemon_url, {}, httpx.Limits())}
        times = {name: {"ttfb": [], "total": []} for name in routes}
        async with contextlib.AsyncExitStack() as stack:
            clients = {name: await stack.enter_async_context(
                httpx.AsyncClient(timeout=300, headers=headers, limits=limits))
                for name, (_, headers, limits) in routes.items()}
            for _ in range(3):  # warm the prompt cache and the connections
                for name, (url, _, _) in routes.items():
                    await timed_stream(clients[name], f"{url}/v1/messages", body)
            # A fresh random order each round: who goes first, and who follows
            # whom, moves a route's time to first byte by tenths of a millisecond
            # on this machine (measured: one sentinel in two places of a fixed
            # rotation, 0.2 ms apart). Seeded, so runs are alike.
            rng = random.Random(0)
            for _ in range(n):
                for name in rng.sample(list(routes), len(routes)):
                    ttfb, total, _ = await timed_stream(clients[name], f"{routes[name][0]}/v1/messages", body)
                    times[name]["ttfb"].append(ttfb * 1000)
                    times[name]["total"].append(total * 1000)
    direct = times["direct"]
    results: dict = {"direct_ttfb_ms": summary(direct["ttfb"]), "direct_total_ms": summary(direct["total"])}
    for name in ("relay", "hypercorn", "sentinel"):
        via = times[name]
        results[f"{name}_ttfb_ms"] = summary(via["ttfb"])
        results[f"{name}_total_ms"] = summary(via["total"])
        results[f"{name}_added_ttfb_ms"] = summary([a - b for a, b in zip(via["ttfb"], direct["ttfb"])])
        results[f"{name}_added_total_ms"] = summary([a - b for a, b in zip(via["total"], direct["total"])])
        results[f"{name}_ttfb_ratio_median"] = statistics.median(via["ttfb"]) / statistics.median(direct["ttfb"])
        results[f"{name}_total_ratio_median"] = statistics.median(via["total"]) / statistics.median(direct["total"])
    return results


STORY = {"model": "m", "max_tokens": 150, "stream": True, "temperature": 0,
         "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}


async def stream_with_titles(client: httpx.AsyncClient, interval: float | None,
                             titles: httpx.AsyncClient | None = None) -> tuple[float, list[float]]:
    """One real stream's content deltas per second, with titles fired every
    ``interval`` seconds while it flows (none if None) at ``titles`` (sentinel
    if None), and their latencies."""
    title = title_request(stream=True)
    latencies: list[float] = []
    result = {}

    async def stream() -> None:
        result["stream"] = await timed_stream(client, "/v1/messages", STORY)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream)
        await trio.sleep(0.3)  # let the stream start flowing
        while interval is not None and "stream" not in result:
            t = time.perf_counter()
            response = await (titles or client).post("/v1/messages", json=title)
            latencies.append((time.perf_counter() - t) * 1000)
            assert response.status_code == 200
            await trio.sleep(interval)
    _, total, deltas = result["stream"]
    return deltas / total, latencies


async def bench_synthesized(daemon_url: str, n: int, rounds: int) -> dict:
    body = title_request(stream=True)
    with child("--null") as null_url:
        async with httpx.AsyncClient(base_url=daemon_url, timeout=60) as client, \
                httpx.AsyncClient(base_url=null_url, timeout=60) as null:
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
            results: dict = {"replies_per_second": (count // 8 * 8) / (time.perf_counter() - start)}

            # The same stream quiet, with titles to sentinel, and with the same
            # titles to the do-nothing server, in turn, so drift hits all alike.
            for label, interval in (("every_100ms", 0.1), ("back_to_back", 0.01)):
                quiet: list[float] = []
                busy: list[float] = []
                control: list[float] = []
                latencies: list[float] = []
                for _ in range(rounds):
                    quiet.append((await stream_with_titles(client, None))[0])
                    rate, lat = await stream_with_titles(client, interval)
                    busy.append(rate)
                    latencies += lat
                    control.append((await stream_with_titles(client, interval, null))[0])
                quiet_median = statistics.median(quiet)
                results[label] = {
                    "title_interval_s": interval,
                    "latency_ms": summary(latencies),
                    "quiet_rates": quiet, "busy_rates": busy, "control_rates": control,
                    "rate_ratio": statistics.median(busy) / quiet_median,
                    "control_rate_ratio": statistics.median(control) / quiet_median,
                    # Sentinel's own part: each round's stream with titles to
                    # sentinel against its neighbour with titles to the control.
                    "sentinel_vs_control": statistics.median(b / c for b, c in zip(busy, control)),
                    # How far quiet runs stray from their own median: the smallest
                    # slowdown this measurement can tell from noise.
                    "quiet_spread": (max(quiet) - min(quiet)) / quiet_median,
                }
    return results


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

    def ms(d: dict, digits: int = 1) -> str:
        return f"{d['median']:.{digits}f} / {d['p95']:.{digits}f} ms"

    rows = [
        ("streaming TTFB, direct (median / p95)", ms(s["direct_ttfb_ms"])),
        ("streaming TTFB, bare TCP relay (median / p95)", ms(s["relay_ttfb_ms"])),
        ("streaming TTFB, bare hypercorn proxy (median / p95)", ms(s["hypercorn_ttfb_ms"])),
        ("streaming TTFB, sentinel (median / p95)", ms(s["sentinel_ttfb_ms"])),
        ("added TTFB, bare relay, paired (median / p95)", ms(s["relay_added_ttfb_ms"], 2)),
        ("added TTFB, bare hypercorn proxy, paired (median / p95)", ms(s["hypercorn_added_ttfb_ms"], 2)),
        ("added TTFB, sentinel, paired (median / p95)", ms(s["sentinel_added_ttfb_ms"], 2)),
        ("TTFB ratio sentinel/direct (median)", f"{s['sentinel_ttfb_ratio_median']:.3f}"),
        ("streaming total, direct (median / p95)", ms(s["direct_total_ms"])),
        ("streaming total, sentinel (median / p95)", ms(s["sentinel_total_ms"])),
        ("total ratio sentinel/direct (median)", f"{s['sentinel_total_ratio_median']:.3f}"),
        ("synthesized titles per second (8 clients)", f"{y['replies_per_second']:.0f}"),
    ]
    for label, name in (("every_100ms", "every 100 ms"), ("back_to_back", "back to back (10 ms gaps)")):
        r = y[label]
        rows += [
            (f"titles {name} during a stream: latency (median / p99)",
             f"{r['latency_ms']['median']:.2f} / {r['latency_ms']['p99']:.2f} ms (n={r['latency_ms']['n']})"),
            (f"titles {name}: stream rate with / without",
             f"{r['rate_ratio']:.3f} (quiet runs' spread {r['quiet_spread']:.3f})"),
            (f"same titles {name} to a do-nothing server: stream rate with / without",
             f"{r['control_rate_ratio']:.3f}"),
            (f"titles {name}: stream rate, titles to sentinel / to the do-nothing server (paired)",
             f"{r['sentinel_vs_control']:.3f}"),
        ]
    rows += [
        ("sentinel RSS idle", f"{m['rss_idle_mib']:.1f} MiB"),
        ("sentinel RSS, 100 queued 90 KB requests", f"{m['rss_100_queued_90kb_mib']:.1f} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"| {name.ljust(width)} | {value} |" for name, value in rows)


async def main(n: int, rounds: int, threads: int | None) -> None:
    tmp = tempfile.mkdtemp(prefix="sentinel-bench-")
    server_args = f'[server]\nargs = ["--threads", "{threads}"]\n' if threads else ""
    daemon = start_daemon(pathlib.Path(tmp), extra_config="[channel]\nqueue_limit = 128\n" + server_args)
    try:
        direct_url, key, _ = daemon.upstream()
        results = {
            "n": n,
            "rounds": rounds,
            "llama_server_threads": threads,
            "streaming": await bench_streaming(daemon.url, direct_url, key, n),
            "synthesized": await bench_synthesized(daemon.url, n, rounds),
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
    parser.add_argument("--n", type=int, default=100, help="streaming turns per route")
    parser.add_argument("--rounds", type=int, default=5, help="quiet/busy stream pairs per title rate")
    parser.add_argument("--threads", type=int, help="llama-server --threads (default: its own)")
    parser.add_argument("--relay", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hypercorn", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--null", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        trio.run(relay, *args.relay)
    elif args.hypercorn:
        trio.run(hypercorn_proxy, *args.hypercorn)
    elif args.null:
        trio.run(null_server, args.null)
    else:
        trio.run(main, args.n, args.rounds, args.threads)
