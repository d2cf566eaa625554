"""Benchmark: the forwarding transport against httpx's pooled client, same run.

    .venv/bin/python bench/bench_forward.py [--n 2000]

An instant upstream in a child process answers every POST with a short SSE
stream (the shape of llama-server's), so what is measured is the client's
own cost: CPU time and wall time per streamed exchange of the captured main
turn (28 KB), sending it and reading the stream to its end.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import socket
import subprocess
import sys
import time

import h11
import httpx
import trio

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import main_turn, stream_events  # noqa: E402

from sentinel._forward import ForwardTransport  # noqa: E402


async def serve(port: int) -> None:
    """Answer each request with SSE, then close, as llama-server does after a stream."""
    events = stream_events()

    async def handle(stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        while True:
            event = connection.next_event()
            if isinstance(event, h11.EndOfMessage):
                break
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                connection.receive_data(data)
        await stream.send_all(connection.send(h11.Response(
            status_code=200, headers=[("content-type", "text/event-stream"), ("transfer-encoding", "chunked")])))
        for event in events:
            await stream.send_all(connection.send(h11.Data(data=event)))
        await stream.send_all(connection.send(h11.EndOfMessage()))
        await stream.aclose()

    await trio.serve_tcp(handle, port, host="127.0.0.1")


async def exchange_httpx(client: httpx.AsyncClient, url: str, body: bytes) -> None:
    request = client.build_request("POST", url, content=body, headers={"content-type": "application/json"})
    response = await client.send(request, stream=True)
    async for _ in response.aiter_raw():
        pass
    await response.aclose()


async def exchange_forward(transport: ForwardTransport, url: str, body: bytes) -> None:
    response = await transport.handle_async_request(
        httpx.Request("POST", url, content=body, headers={"content-type": "application/json"}))
    async for _ in response.aiter_raw():
        pass
    await response.aclose()


async def measure(n: int, url: str) -> dict[str, dict[str, float]]:
    body = json.dumps(main_turn()).encode()
    results: dict[str, dict[str, float]] = {}
    async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=2)) as client:
        transport = ForwardTransport()
        candidates = {"httpx AsyncClient (pooled)": lambda: exchange_httpx(client, url, body),
                      "sentinel ForwardTransport": lambda: exchange_forward(transport, url, body)}
        for _ in range(50):  # warm both
            for run in candidates.values():
                await run()
        for name, run in candidates.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                await run()
            results[name] = {"cpu_us": (time.process_time() - cpu) / n * 1e6,
                             "wall_us": (time.perf_counter() - wall) / n * 1e6}
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return trio.run(serve, args.serve)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        results = trio.run(measure, args.n, f"http://127.0.0.1:{port}/v1/messages")
    finally:
        server.terminate()
        server.wait()
    base = results["httpx AsyncClient (pooled)"]
    for name, r in results.items():
        print(f"| {name:27} | {r['cpu_us']:6.0f} µs CPU | {r['wall_us']:6.0f} µs wall | "
              f"CPU ratio {r['cpu_us'] / base['cpu_us']:.2f} |")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "forward.json").write_text(json.dumps({"n": args.n, **results}, indent=2))


if __name__ == "__main__":
    main()
