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
as what it is, ``len(self._connections)``: the same decisions in the same order,
each connection's ``is_idle()`` asked once. It is set on the pool object, not by
subclassing, so proxy pools (subclasses) keep their own class; and only on
httpcore 1.0.x, whose method body this one is (its second loop is copied as it
is). On another version the pool is left as httpcore made it.
"""

from __future__ import annotations

import types
from typing import Any

import httpcore

__all__ = ["linear_assignment"]

_KNOWN = "1.0."
"""The httpcore versions whose ``_assign_requests_to_connections`` this mirrors."""


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
    and async alike: it does no I/O), its first loop in one pass.

    Called under the pool's lock, as the original is. Returns the connections to
    close, outside the lock.
    """
    closing_connections = []
    connections = self._connections

    # Closed, expired and (over max_keepalive_connections) idle connections go.
    # httpcore compares len([c.is_idle() for c in connections]) with the maximum:
    # that is len(connections), here without the list.
    for connection in list(connections):
        if connection.is_closed():
            connections.remove(connection)
        elif connection.has_expired() or (
            connection.is_idle() and len(connections) > self._max_keepalive_connections
        ):
            connections.remove(connection)
            closing_connections.append(connection)

    # Queued requests go to a connection: as httpcore 1.0.x does it.
    queued_requests = [request for request in self._requests if request.is_queued()]
    for pool_request in queued_requests:
        origin = pool_request.request.url.origin
        available_connections = [
            connection
            for connection in connections
            if connection.can_handle_request(origin) and connection.is_available()
        ]
        idle_connections = [c for c in connections if c.is_idle()]
        if available_connections:
            pool_request.assign_to_connection(available_connections[0])
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
