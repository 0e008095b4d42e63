"""Read a response body straight from its socket, below httpx, when that is safe.

httpx hands a body over in 64 KiB pieces, each one received into a new ``bytes``,
appended to h11's buffer, copied out of it twice and once more by httpcore, through
six generator layers: ~4 ms of CPU for a 1.45 MB image where the socket alone costs
~1 ms. ``direct_reads`` yields the same bytes, received into one reused buffer per
thread, for a plain HTTP/1.1 body with a ``Content-Length`` on a connection whose
socket this process reads itself (plain TCP or ``ssl.SSLSocket``; not TLS inside a
proxy's TLS, not chunked, not read-until-close). Whatever it does not take, httpx
reads as before, so the caller finishes with ``response.iter_raw()``, unless
``whole`` says the body was all read here (then h11 has taken its end); the
caller's checks (size caps, decoding, sniffing, speed, deadline, cancellation) see
every piece either way.

It keeps h11's own count of the body (``ContentLengthReader._remaining``) up to
date, so that once the body is complete h11 sees its end and httpcore puts the
connection back in the pool; a body cut short leaves h11 mid-body, and httpcore
closes that connection, as it does when httpx reads. Each read is made by the caller's
``receive``, given the read of a timeout (``fetch`` caps it by the request's deadline
and waits in slices, checking its stop flag); a timeout raises
``httpx.ReadTimeout``, a socket error ``httpx.ReadError``, an early close
``httpx.RemoteProtocolError``: the exceptions httpx raises for the same events.

It reaches into httpx, httpcore and h11 internals (stable from httpx 0.23 to 0.28,
httpcore 1.0, h11 0.14 to 0.16). Where one is missing it reads nothing and httpx
reads the whole body, so a new version can only make it slower, never wrong
(``tests/test_fetch.py`` checks that the direct path is taken).
"""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import h11
import httpx

__all__ = ["READ_BYTES", "Read", "direct_reads", "plain_socket", "whole"]

READ_BYTES = 1024 * 1024
"""Most bytes one direct read takes: sixteen of httpx's reads in one, so a photo
is read (and written) in a few calls, each with its checks. The buffer is made once
per thread and reused, so a larger read costs no fresh memory (a new ``bytes`` of
over 128 KiB is a fresh ``mmap`` each time, page faults included)."""

_buffers = threading.local()


def plain_socket(stream: Any) -> socket.socket | None:
    """The socket under an httpcore ``SyncStream`` (plain or TLS), else None.

    Only that stream type reads its socket as it is: TLS inside a proxy's TLS
    (``TLSinTLSStream``) has a socket that carries the proxy's encryption.
    """
    if type(stream).__name__ != "SyncStream":
        return None
    sock = getattr(stream, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


Read = Callable[[float | None], int]
"""One read from the socket, waiting at most the timeout it is given."""


def direct_reads(
    response: httpx.Response, receive: Callable[[Read], int]
) -> Iterator[bytes | bytearray | memoryview]:
    """Yield the body of ``response`` from its socket (nothing if not possible).

    A yielded ``memoryview`` is valid until the next one is asked for.
    ``receive(read)`` makes one read, calling ``read(timeout)`` (again, after a
    timeout, if it wants to wait longer) and returning its count.
    """
    parts = _body_parts(response)
    if parts is None:
        return
    _, reader, buffered, sock = parts
    early = buffered.maybe_extract_at_most(reader._remaining)
    if early:
        reader._remaining -= len(early)
        yield early
    view = _buffer()
    while reader._remaining > 0:
        piece = view[: reader._remaining]
        received = receive(functools.partial(_read_into, sock, piece))
        if received == 0:
            expected = reader._length
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body "
                f"(received {expected - reader._remaining} bytes, expected {expected})"
            )
        reader._remaining -= received
        yield view[:received]


def whole(response: httpx.Response) -> bool:
    """If ``direct_reads`` took all of the body of ``response``, let h11 take its end
    (its count is zero: it reads nothing) and return True: httpx has nothing left to
    read, so the caller must skip ``iter_raw`` (which would walk six layers to find
    that out, and, the end taken, would wait for more). Closing the response then
    puts the connection back in the pool, or closes it if the server said it ends
    with this response (``Connection: close``, HTTP/1.0). False otherwise, having
    taken nothing: the caller reads the rest with ``iter_raw``, as ever.

    Raises:
        httpx.RemoteProtocolError: h11 had something else than the body's end.
    """
    parts = _body_parts(response)
    if parts is None:
        return False
    state, reader, _, _ = parts
    if reader._remaining != 0:
        return False
    event = state.next_event()
    if not isinstance(event, h11.EndOfMessage):
        raise httpx.RemoteProtocolError(f"{type(event).__name__} at a body's end")
    return True


def _body_parts(response: httpx.Response) -> tuple[Any, Any, Any, socket.socket] | None:
    """h11's state, body reader and receive buffer, and the socket, if all are as
    expected."""
    bound: Any = response.stream
    try:
        connection = bound._stream._httpcore_stream._stream._connection
        state = connection._h11_state
        reader, buffered = state._reader, state._receive_buffer
        if state._receive_buffer_closed or type(reader).__name__ != (
            "ContentLengthReader"
        ):
            return None
        stream = connection._network_stream.raw_stream
        remaining = reader._remaining
    except AttributeError:
        return None
    sock = plain_socket(stream)
    if sock is None or not isinstance(remaining, int):
        return None
    return state, reader, buffered, sock


def _buffer() -> memoryview:
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(READ_BYTES))
    return view


def _read_into(sock: socket.socket, view: memoryview, timeout: float | None) -> int:
    try:
        sock.settimeout(timeout)
        return sock.recv_into(view)
    except TimeoutError as exc:
        raise httpx.ReadTimeout(str(exc) or "timed out") from exc
    except OSError as exc:
        raise httpx.ReadError(str(exc)) from exc
