"""httpcore's connection pool bookkeeping, in one pass instead of a quadratic one.

httpcore (1.0.x) runs ``_assign_requests_to_connections`` under the pool's lock
whenever a request starts or a response is closed: twice per download. Its first
loop decides, for each idle connection, whether the pool holds more than
``max_keepalive_connections``, by building a list of every connection's
``is_idle()``, whose length is that of the pool. With 16 download threads sharing
one client that is 16 x 16 calls per pass, a fifth of the download threads' CPU
per photo in a profile of ``benchmarks/main_cpu.py``, spent while every other
thread waits on the lock (encode/httpcore#1035 and #929, not released).

``linear_assignment`` gives a pool the same method with that list's length taken
as what it is, ``len(self._connections)``, each connection's ``is_idle()`` asked
once. And it asks whether an idle connection was closed by its server (a ``poll``
of its socket, ``has_expired``) where httpcore's answer is used: of the idle
connection a request is about to be given, and of all of them at most once a
second (``SWEEP_S``), rather than of every idle connection twice per download
(16 threads: ~20 polls a photo). A connection the server closed is thus never
handed out, as before; one nobody asks for is closed up to a second later. Nor is
one whose server sent more than its last response (``_holds_unasked_bytes``). It is
set on the pool object, not by subclassing, so proxy pools (subclasses) keep their
own class; and only on httpcore 1.0.x, whose method this one mirrors. On another
version the pool is left as httpcore made it.
"""

from __future__ import annotations

import time
import types
from typing import Any

import httpcore

__all__ = ["linear_assignment"]

_KNOWN = "1.0."
"""The httpcore versions whose ``_assign_requests_to_connections`` this mirrors."""

SWEEP_S = 1.0
"""Seconds between two checks of every idle connection for a server's close."""


def linear_assignment(pool: Any) -> bool:
    """Give ``pool`` (a sync or async httpcore pool) the one-pass bookkeeping.

    Returns:
        True if it was given; False on an httpcore this was not written for.
    """
    if not httpcore.__version__.startswith(_KNOWN):
        return False
    if not hasattr(pool, "_assign_requests_to_connections"):
        return False
    pool._assign_requests_to_connections = types.MethodType(_assign, pool)
    return True


def _assign(self: Any) -> list[Any]:
    """httpcore 1.0.x's ``ConnectionPool._assign_requests_to_connections`` (sync
    and async alike: it does no I/O but ``poll``), in one pass, polling idle
    sockets only where it matters (the module's docstring).

    Called under the pool's lock, as the original is. Returns the connections to
    close, outside the lock.
    """
    closing_connections = []
    connections = self._connections
    now = time.monotonic()
    sweep = now - getattr(self, "_downloader_swept_at", -SWEEP_S) >= SWEEP_S
    if sweep:
        self._downloader_swept_at = now

    # Closed, (on a sweep) expired and (over max_keepalive_connections) idle
    # connections go. httpcore compares len([c.is_idle() for c in connections])
    # with the maximum: that is len(connections), here without the list.
    for connection in list(connections):
        if connection.is_closed():
            connections.remove(connection)
        elif (sweep and connection.has_expired()) or (
            connection.is_idle() and len(connections) > self._max_keepalive_connections
        ):
            connections.remove(connection)
            closing_connections.append(connection)

    # Queued requests go to a connection, as httpcore 1.0.x does it; an available
    # one is first asked whether it has expired, as httpcore's first loop would.
    queued_requests = [request for request in self._requests if request.is_queued()]
    for pool_request in queued_requests:
        origin = pool_request.request.url.origin
        available = _first_available(self, origin, closing_connections)
        idle_connections = [c for c in connections if c.is_idle()]
        if available is not None:
            pool_request.assign_to_connection(available)
        elif len(connections) < self._max_connections:
            connection = self.create_connection(origin)
            connections.append(connection)
            pool_request.assign_to_connection(connection)
        elif idle_connections:
            connections.remove(idle_connections[0])
            closing_connections.append(idle_connections[0])
            connection = self.create_connection(origin)
            connections.append(connection)
            pool_request.assign_to_connection(connection)

    return closing_connections


def _first_available(self: Any, origin: Any, closing: list[Any]) -> Any:
    """The first connection that can take a request to ``origin`` now and has not
    expired; the expired ones met on the way are moved to ``closing``."""
    connections = self._connections
    for connection in list(connections):
        if not (connection.can_handle_request(origin) and connection.is_available()):
            continue
        if connection.has_expired() or _holds_unasked_bytes(connection):
            connections.remove(connection)
            closing.append(connection)
            continue
        return connection
    return None


def _holds_unasked_bytes(connection: Any) -> bool:
    """An HTTP/1.1 connection with bytes in h11's buffer that no request asked for:
    its server sent more than its last response's ``Content-Length`` (already read
    with that response). Handed out, the next request would read them as the start
    of its own response, and fail, or take a forged one. (Bytes that come later make
    the idle socket readable: ``has_expired``.)"""
    for _ in range(_MOST_WRAPPERS):
        connection = getattr(connection, "_connection", None)
        state = getattr(connection, "_h11_state", None)
        if state is not None:
            return bool(getattr(state, "_receive_buffer", None))
    return False


_MOST_WRAPPERS = 4
"""How deep the HTTP/1.1 connection may sit: ``HTTPConnection`` wraps it, a proxy's
``ForwardHTTPConnection`` or ``TunnelHTTPConnection`` wraps that."""
