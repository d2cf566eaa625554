"""The forwarding transport: one fresh HTTP/1.1 connection per request, h11 on a trio socket.

The serial channel sends llama-server one request at a time, so the hot path
needs no connection pool, and llama-server closes the connection after every
streamed response anyway. A fresh connection per request also means sentinel
never writes a request into a kept-alive connection the server has just
closed, so "disconnected without a response" always means the server dropped
this request.

It is an ``httpx`` transport, so the channel sees ``httpx.Response`` and the
``httpx`` exception tree whichever transport it is given (tests script the
upstream with ``httpx.MockTransport``). Against httpx's pooled client it costs
less than half the CPU per streamed exchange (bench/bench_forward.py), and
that CPU is on the path of every first byte.

Cancellation: leaving the response (``aclose``) closes the socket, which is
how llama-server learns to stop generating and free its slot.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from contextlib import contextmanager
from typing import AsyncIterator, Iterator

import h11
import httpx
import trio

__all__ = ["ForwardTransport"]

_READ_SIZE = 65536


class ForwardTransport(httpx.AsyncBaseTransport):
    """POST a request with a bytes body and stream the response back."""

    def __init__(self, connect_timeout: float = 5.0, write_timeout: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        #: For an ``https://`` upstream; the system's trust store unless given.
        self._ssl_context = ssl_context

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        stream = await self._connect(request.url)
        try:
            connection = h11.Connection(h11.CLIENT)
            with _mapped(httpx.WriteError, request):
                data = connection.send(h11.Request(method=request.method, target=request.url.raw_path,
                                                   headers=request.headers.raw))
                data += connection.send(h11.Data(data=request.content))
                data += connection.send(h11.EndOfMessage())
                with trio.fail_after(self.write_timeout):
                    await stream.send_all(data)
            with _mapped(httpx.ReadError, request):
                head = await _read_head(connection, stream, request)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        return httpx.Response(head.status_code, headers=head.headers, request=request,
                              stream=_ResponseStream(connection, stream, request),
                              extensions={"http_version": b"HTTP/1.1"})

    async def _connect(self, url: httpx.URL) -> trio.abc.Stream:
        host, port = url.host, url.port or (443 if url.scheme == "https" else 80)
        with _mapped(httpx.ConnectError), trio.move_on_after(self.connect_timeout) as timer:
            stream = await _open_tcp(host, port)
            if url.scheme == "https":
                if self._ssl_context is None:
                    self._ssl_context = ssl.create_default_context()
                stream = trio.SSLStream(stream, self._ssl_context, server_hostname=host,
                                        https_compatible=True)
                await stream.do_handshake()
            return stream
        assert timer.cancelled_caught
        raise httpx.ConnectTimeout(f"Connecting to {host}:{port} timed out.")


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, connection: h11.Connection, stream: trio.abc.Stream, request: httpx.Request) -> None:
        self._connection = connection
        self._stream = stream
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped(httpx.ReadError, self._request):
            while True:
                event = await _next_event(self._connection, self._stream)
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return
                else:  # ConnectionClosed: h11 raises first if the body was incomplete
                    raise httpx.RemoteProtocolError("Server closed the connection mid-response.",
                                                    request=self._request)

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _open_tcp(host: str, port: int) -> trio.abc.Stream:
    """A TCP stream; an IP address (the supervised server's case) skips resolution
    and happy eyeballs, about 0.1 ms of a request's first byte."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _read_head(connection: h11.Connection, stream: trio.abc.Stream,
                     request: httpx.Request) -> h11.Response:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_READ_SIZE)
            if not data and connection.their_state is h11.SEND_RESPONSE:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.",
                                                request=request)
            connection.receive_data(data)
        elif isinstance(event, h11.Response):
            return event
        # an InformationalResponse (100 Continue): the real one follows


async def _next_event(connection: h11.Connection, stream: trio.abc.Stream) -> h11.Event:
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(await stream.receive_some(_READ_SIZE))


@contextmanager
def _mapped(error: type[httpx.TransportError], request: httpx.Request | None = None) -> Iterator[None]:
    """Translate socket and protocol failures into ``httpx``'s tree, at this one boundary."""
    try:
        yield
    except h11.RemoteProtocolError as e:
        raise httpx.RemoteProtocolError(str(e), request=request) from e
    except trio.TooSlowError as e:
        raise httpx.WriteTimeout("Sending the request timed out.", request=request) from e
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
        raise error(str(e) or type(e).__name__, request=request) from e
