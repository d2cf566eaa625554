"""The forwarding transport against a small HTTP/1.1 server on loopback.

The server is scripted per test: it records what it received and answers
with raw bytes, so the tests see exactly what crosses the socket.
"""

from __future__ import annotations

import ssl
from functools import partial
from typing import Awaitable, Callable

import attrs
import h11
import httpx
import pytest
import trio
import trustme

from sentinel._forward import ForwardTransport

Script = Callable[[trio.SocketStream, h11.Request, bytes], Awaitable[None]]


@attrs.define(eq=False)
class LoopbackServer:
    """Reads one request per connection, then hands the socket to ``script``."""

    script: Script | None = None
    port: int = 0
    connections: int = 0
    requests: list[tuple[h11.Request, bytes]] = attrs.field(factory=list)
    closed_by_peer: trio.Event = attrs.field(factory=trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        connection = h11.Connection(h11.SERVER)
        request, body = None, b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        self.requests.append((request, body))
        await self.script(stream, request, body)
        try:
            if await stream.receive_some(1) == b"":
                self.closed_by_peer.set()
        except trio.ClosedResourceError:
            pass  # the script closed it


@pytest.fixture
async def server(nursery: trio.Nursery) -> LoopbackServer:
    server = LoopbackServer()
    listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), server.handle, 0)
    server.port = listeners[0].socket.getsockname()[1]
    return server


def post(url: str, body: bytes = b'{"messages":[]}') -> httpx.Request:
    return httpx.Request("POST", f"{url}/v1/messages", content=body,
                         headers={"authorization": "Bearer k", "content-type": "application/json"})


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_the_request_arrives_as_given_on_a_connection_of_its_own(server):
    async def answer(stream, request, body):
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                              b"content-length: 2\r\n\r\n{}")

    server.script = answer
    transport = ForwardTransport()
    for payload in (b'{"a":1}', b'{"b":2}' * 5000):
        response = await transport.handle_async_request(post(server.url, payload))
        assert response.status_code == 200 and await response.aread() == b"{}"
        await response.aclose()
    assert server.connections == 2  # no pool: nothing can go stale between requests
    request, body = server.requests[1]
    assert (request.method, request.target, body) == (b"POST", b"/v1/messages", b'{"b":2}' * 5000)
    headers = dict(request.headers)
    assert headers[b"authorization"] == b"Bearer k"
    assert headers[b"host"] == f"127.0.0.1:{server.port}".encode()
    assert headers[b"content-length"] == str(len(body)).encode()


async def test_a_stream_is_handed_on_as_each_chunk_arrives(server):
    release = trio.Event()

    async def stream_slowly(stream, request, body):
        await stream.send_all(SSE_HEAD + chunk(b"event: a\ndata: {}\n\n"))
        await release.wait()
        await stream.send_all(chunk(b"event: b\ndata: {}\n\n") + b"0\r\n\r\n")

    server.script = stream_slowly
    response = await ForwardTransport().handle_async_request(post(server.url))
    assert response.headers["content-type"] == "text/event-stream"
    received = []
    with trio.fail_after(5):  # a transport that waited for the whole body would wait forever
        async for data in response.aiter_raw():
            received.append(data)
            release.set()  # the second chunk is sent only once the first was received
    await response.aclose()
    assert received == [b"event: a\ndata: {}\n\n", b"event: b\ndata: {}\n\n"]


async def test_leaving_a_response_early_closes_its_connection(server):
    async def stream_forever(stream, request, body):
        await stream.send_all(SSE_HEAD + chunk(b"event: a\ndata: {}\n\n"))

    server.script = stream_forever
    response = await ForwardTransport().handle_async_request(post(server.url))
    async for _ in response.aiter_raw():
        break
    await response.aclose()
    with trio.fail_after(5):
        await server.closed_by_peer.wait()  # llama-server's cue to stop generating


async def test_a_server_that_closes_without_answering(server):
    async def hang_up(stream, request, body):
        await stream.aclose()

    server.script = hang_up
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        await ForwardTransport().handle_async_request(post(server.url))


async def test_a_stream_cut_mid_body_is_a_protocol_error(server):
    async def cut(stream, request, body):
        await stream.send_all(SSE_HEAD + chunk(b"event: a\ndata: {}\n\n"))
        await stream.aclose()

    server.script = cut
    response = await ForwardTransport().handle_async_request(post(server.url))
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        async for data in response.aiter_raw():
            received.append(data)
    await response.aclose()
    assert received == [b"event: a\ndata: {}\n\n"]


async def test_a_refused_connection_is_a_connect_error(server):
    # A port that was just free: nothing listens there.
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        await ForwardTransport().handle_async_request(post(f"http://127.0.0.1:{port}"))


async def test_a_host_name_is_resolved(server):
    async def answer(stream, request, body):
        await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")

    server.script = answer
    response = await ForwardTransport().handle_async_request(post(f"http://localhost:{server.port}"))
    assert response.status_code == 204
    await response.aclose()


async def test_an_https_upstream_is_reached_over_tls(nursery):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def answer(stream: trio.SSLStream) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                data += await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                  b"content-length: 2\r\n\r\n{}")
        except trio.BrokenResourceError:
            return  # a client that refused our certificate
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, host="127.0.0.1"), answer, 0,
                                    server_context)
    port = listeners[0].transport_listener.socket.getsockname()[1]
    transport = ForwardTransport(ssl_context=client_context)
    response = await transport.handle_async_request(post(f"https://127.0.0.1:{port}"))
    assert response.status_code == 200 and await response.aread() == b"{}"
    await response.aclose()

    # Without the CA, the certificate is refused: a connect error, not a response.
    with pytest.raises(httpx.ConnectError):
        await ForwardTransport().handle_async_request(post(f"https://127.0.0.1:{port}"))
