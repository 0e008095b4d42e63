"""Tests for reading a body below httpx (``raw_body``) against a real local server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from downloader.fetch import make_client
from downloader.raw_body import READ_BYTES, Read, direct_reads, whole
from downloader.settings import HttpSettings
from tests.helpers import BIG_BODY, LocalServer

TIMEOUT = 5.0
"""Seconds one read may wait before the test fails instead of hanging."""


def _within(timeout: float) -> Callable[[Read], int]:
    """A ``receive`` that makes each read wait at most ``timeout``."""
    return lambda read: read(timeout)


@contextmanager
def _streamed(client: httpx.Client, url: str) -> Iterator[httpx.Response]:
    with client.stream("GET", url) as response:
        yield response


def _pool_connections(client: httpx.Client) -> list[object]:
    pool = client._transport._pool  # type: ignore[attr-defined]
    return list(pool.connections)


def _largest_image(corpus: Path) -> Path:
    return max(corpus.glob("img-*"), key=lambda path: path.stat().st_size)


def test_a_sized_body_is_read_from_the_socket_and_its_connection_kept(
    server: LocalServer, corpus: Path
) -> None:
    """A Content-Length body comes whole from the socket; the connection is reused."""
    image = _largest_image(corpus)
    with make_client(HttpSettings(), 1) as client:
        with _streamed(client, server.url_for(image.name)) as response:
            direct = b"".join(
                bytes(p) for p in direct_reads(response, _within(TIMEOUT))
            )
            rest = b"".join(response.iter_raw())
        first = _pool_connections(client)
        with _streamed(client, server.url_for(image.name)) as response:
            again = b"".join(bytes(p) for p in direct_reads(response, _within(TIMEOUT)))
            again += b"".join(response.iter_raw())
        second = _pool_connections(client)

    assert direct == image.read_bytes()
    assert rest == b""
    assert again == direct
    assert len(first) == 1
    assert second == first


def test_a_body_read_whole_needs_nothing_from_httpx_and_keeps_its_connection(
    server: LocalServer, corpus: Path
) -> None:
    """Once ``direct_reads`` took the whole body, ``whole`` lets h11 take its end:
    the caller skips httpx's reads, and closing the response still puts the
    connection back in the pool for the next request. Before the body is whole,
    ``whole`` says so and takes nothing."""
    with make_client(HttpSettings(), 1) as client:
        with _streamed(client, f"{server.base_url}/big") as response:
            reads = direct_reads(response, _within(TIMEOUT))
            first = bytes(next(reads))
            early = whole(response)
            big = first + b"".join(bytes(p) for p in reads)
            done = whole(response)
        image = _largest_image(corpus)
        bodies, pools = [], []
        for _ in range(2):
            with _streamed(client, server.url_for(image.name)) as response:
                reads = direct_reads(response, _within(TIMEOUT))
                bodies.append(b"".join(bytes(p) for p in reads))
                assert whole(response)
            pools.append(_pool_connections(client))

    assert (early, done) == (False, True)
    assert len(first) < BIG_BODY
    assert big == b"\xff" * BIG_BODY
    assert bodies == [image.read_bytes()] * 2
    assert len(pools[0]) == 1
    assert pools[1] == pools[0]


def test_a_large_body_comes_in_large_reads(server: LocalServer) -> None:
    """A body larger than httpx's reads comes from the socket, in reads of up to
    ``READ_BYTES``; httpx has nothing left to read."""
    with (
        make_client(HttpSettings(), 1) as client,
        _streamed(client, f"{server.base_url}/big") as response,
    ):
        sizes = [len(piece) for piece in direct_reads(response, _within(TIMEOUT))]
        rest = b"".join(response.iter_raw())

    assert sum(sizes) == BIG_BODY
    assert max(sizes) <= READ_BYTES
    assert len(sizes) > 1
    assert rest == b""


def test_a_body_without_length_is_left_to_httpx(server: LocalServer) -> None:
    """A close-delimited body is not read directly: httpx reads all of it."""
    with (
        make_client(HttpSettings(), 1) as client,
        _streamed(client, f"{server.base_url}/big-unsized") as response,
    ):
        direct = list(direct_reads(response, _within(TIMEOUT)))
        rest = sum(len(piece) for piece in response.iter_raw())

    assert direct == []
    assert rest > READ_BYTES


def test_a_body_cut_short_raises_as_httpx_does_and_drops_the_connection(
    server: LocalServer,
) -> None:
    """A body closed before its Content-Length raises RemoteProtocolError; the
    connection is not kept."""
    sizes: list[int] = []

    def read_all(response: httpx.Response) -> None:
        sizes.extend(len(piece) for piece in direct_reads(response, _within(TIMEOUT)))

    with make_client(HttpSettings(), 1) as client:
        with (
            _streamed(client, f"{server.base_url}/short") as response,
            pytest.raises(httpx.RemoteProtocolError, match="received 100 bytes"),
        ):
            read_all(response)
        left = _pool_connections(client)

    assert sum(sizes) == 100
    assert left == []


def test_a_silent_body_times_out_as_a_read_timeout(server: LocalServer) -> None:
    """A server that sends nothing after its headers trips the read timeout."""
    with (
        make_client(HttpSettings(), 1) as client,
        _streamed(client, f"{server.base_url}/silent") as response,
        pytest.raises(httpx.ReadTimeout),
    ):
        list(direct_reads(response, _within(0.2)))
