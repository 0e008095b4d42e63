"""Tests for the download stage against a misbehaving HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import random
import select
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest

from downloader.connection_pool import SWEEP_S
from downloader.errors import FetchError, OutputError
from downloader.fetch import (
    CHUNK,
    AsyncHostLimiter,
    HostLimiter,
    _PartFile,
    _pools,
    blocked_address_kind,
    fetch,
    fetch_async,
    make_async_client,
    make_client,
)
from downloader.records import Fetched, Job
from downloader.settings import HttpSettings
from downloader.spares import SpareFiles
from tests.helpers import block_127_0_0_2

FAST = HttpSettings(
    timeout=0.5,
    deadline=2.0,
    retries=2,
    backoff=0,
    max_backoff=0.2,
    max_bytes=1_000_000,
    max_redirects=5,
    per_host=4,
    min_speed=1000,
)
"""Small limits so that every failure path of the whole file runs in a few seconds."""

WAIT = 10.0
"""Seconds any blocking call in a test may take before the test fails instead."""

BIG = 300_000
BOMB = gzip.compress(bytes(20 * 1024 * 1024))
_tokens = count()


def payload(size: int) -> bytes:
    """Return ``size`` pseudo-random bytes, the same ones for the same size."""
    return random.Random(size).randbytes(size)


def client_gone(connection: socket.socket, seconds: float) -> bool:
    """Wait up to ``seconds``; True if the client closed (or wrote) meanwhile."""
    readable, _, _ = select.select([connection], [], [], seconds)
    return bool(readable)


class Server(ThreadingHTTPServer):
    """A threaded HTTP/1.1 server that logs requests and counts concurrency."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.log: list[tuple[str, dict[str, str]]] = []
        self.counters: Counter[str] = Counter()
        self.active: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.head_bytes: dict[str, tuple[int, int]] = {}
        self.head_done = threading.Condition(self.lock)
        """Per query: bytes of the head sent before the client left, and in all."""

    def record(self, path: str, headers: dict[str, str]) -> None:
        """Append one request to the log."""
        with self.lock:
            self.log.append((path, headers))

    def bump(self, key: str) -> int:
        """Count one more request for ``key``; return the new count."""
        with self.lock:
            self.counters[key] += 1
            return self.counters[key]


class Handler(BaseHTTPRequestHandler):
    """Route ``/<name>/<args...>`` to ``route_<name>``."""

    protocol_version = "HTTP/1.1"
    timeout = 5
    server: Server

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""

    def handle(self) -> None:
        """Serve requests until the client goes; a client hanging up is not an error."""
        try:
            super().handle()
        except ConnectionError:
            self.close_connection = True

    def do_GET(self) -> None:
        """Log the request and dispatch on the first path segment."""
        self.server.record(self.path, {k.lower(): v for k, v in self.headers.items()})
        parts = urlsplit(self.path)
        name, *args = parts.path.strip("/").split("/")
        self.query = parts.query
        route: Callable[..., None] = getattr(self, f"route_{name.replace('-', '_')}")
        route(*args)

    def send_body(self, body: bytes, status: int = 200, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str, **headers: str) -> None:
        self.send_body(b"", 302, Location=location, **headers)

    def route_ok(self, size: str) -> None:
        self.send_body(payload(int(size)), Content_Type="image/jpeg")

    def route_status(self, code: str) -> None:
        if code in ("204", "304"):
            self.send_response(int(code))
            self.end_headers()
        else:
            self.send_body(b"", int(code))

    def route_flaky503(self, key: str, failures: str) -> None:
        if self.server.bump(self.path) <= int(failures):
            self.send_body(b"", 503)
        else:
            self.route_ok("100")

    def route_retry_after(self, key: str, value: str) -> None:
        if self.server.bump(self.path) == 1:
            self.send_body(b"", 429, Retry_After=unquote(value))
        else:
            self.route_ok("100")

    def route_ok_then_close(self, size: str) -> None:
        """A keep-alive answer (no ``Connection: close``), then the server hangs up:
        the client holds an idle connection its server has closed."""
        self.route_ok(size)
        self.close_connection = True

    def route_ok_then_junk(self, size: str) -> None:
        """A keep-alive answer followed, in the same write, by bytes past its
        Content-Length."""
        body = payload(int(size))
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
            + b"JUNKJUNKJUNK"
        )
        self.wfile.flush()

    def route_short(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(payload(100))
        self.close_connection = True

    def route_chunked_cut(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"64\r\n" + payload(100) + b"\r\n")
        self.close_connection = True

    def route_reset(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(payload(5000))
        self.wfile.flush()
        # Linger 0: closing sends RST instead of FIN. The real close happens when
        # finish() drops the file objects; the server's own shutdown then fails quietly.
        linger = struct.pack("ii", 1, 0)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        self.connection.close()
        self.close_connection = True

    def route_drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        for byte in payload(100):  # 100 bytes, one per 0.05 s: 5 s at most
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            if client_gone(self.connection, 0.05):
                break
        self.close_connection = True

    def route_silent(self) -> None:
        client_gone(self.connection, 5.0)
        self.close_connection = True

    def route_slow(self, size: str) -> None:
        with self.server.lock:
            self.server.active[self.query] += 1
            self.server.peak[self.query] = max(
                self.server.peak[self.query], self.server.active[self.query]
            )
        try:
            client_gone(self.connection, 0.1)
            self.route_ok(size)
        finally:
            with self.server.lock:
                self.server.active[self.query] -= 1

    def route_big(self) -> None:
        self.route_ok(str(BIG))

    def route_big_nolen(self) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload(BIG))
        self.close_connection = True

    def route_gzip_bomb(self) -> None:
        self.send_body(BOMB, Content_Encoding="gzip")

    def route_encoded(self, kind: str) -> None:
        body = payload(5000)
        raw_deflate = zlib.compressobj(wbits=-15)
        encodings = {
            "gzip": ("gzip", gzip.compress(body)),
            "zlib": ("deflate", zlib.compress(body)),
            "raw": ("deflate", raw_deflate.compress(body) + raw_deflate.flush()),
            "br": ("br", body),
            "bad": ("gzip", b"This is not valid gzip data"),
            "cut": ("gzip", gzip.compress(body)[:-20]),
        }
        encoding, data = encodings[kind]
        self.send_body(data, Content_Encoding=encoding)

    def route_redirect(self, hops: str) -> None:
        if int(hops) == 0:
            self.route_ok("10")
        else:
            self.redirect(f"/redirect/{int(hops) - 1}?{self.query}")

    def route_loop(self) -> None:
        self.redirect(self.path, Connection="close")
        self.close_connection = True

    def route_to_file(self) -> None:
        self.redirect("file:///etc/passwd")

    def route_to_ftp(self) -> None:
        self.redirect("ftp://127.0.0.1/image.jpg")

    def route_relative(self) -> None:
        self.redirect("ok/10")

    def route_empty(self) -> None:
        self.send_body(b"")

    def route_to_host(self, host: str) -> None:
        port = self.server.server_address[1]
        self.redirect(f"http://{host}:{port}/ok/10?{self.query}")

    def route_set_cookie(self) -> None:
        self.send_body(payload(10), Set_Cookie="sess=SECRET; Path=/")

    def route_to_port(self, port: str) -> None:
        self.redirect(f"http://127.0.0.1:{port}/ok/10?{self.query}")

    def route_to_raw(self, quoted: str) -> None:
        """A redirect to any ``Location`` at all (percent-decoded from the path)."""
        self.redirect(unquote(quoted))

    def route_two_locations(self) -> None:
        self.send_response(302)
        self.send_header("Location", f"/ok/10?{self.query}")
        self.send_header("Location", f"/ok/20?{self.query}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_raw(self, name: str) -> None:
        """Reply with bytes that are not valid HTTP/1.1, then hang up."""
        replies = {
            "not-http": b"NOT HTTP AT ALL\r\n\r\n",
            "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
            b"Content-Length: 6\r\n\r\nhello!",
            "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nhello\r\n",
            "nothing": b"",
            "http10": b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 4\r\n\r\n\xff\xd8\xff\xdb",
            "close": b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
            b"Connection: close\r\nContent-Length: 4\r\n\r\n\xff\xd8\xff\xdb",
        }
        self.wfile.write(replies[name])
        self.wfile.flush()
        self.close_connection = True

    def route_drip_head(self) -> None:
        """Send the status line and headers a byte every 0.05 s (20 s in all)."""
        head = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 380 + b"\r\n"
        head += b"Content-Length: 10\r\n\r\n"
        sent = 0
        for byte in head:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            sent += 1
            if client_gone(self.connection, 0.05):
                break
        with self.server.head_done:
            self.server.head_bytes[self.query] = (sent, len(head))
            self.server.head_done.notify_all()
        self.close_connection = True


class Site:
    """One test's view of the server: URLs tagged with a token, and their requests."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.token = f"t={next(_tokens)}"
        self.host = f"127.0.0.1:{server.server_address[1]}"

    def url(self, path: str) -> str:
        """Return the absolute URL of ``path``, tagged with this test's token."""
        return f"http://{self.host}{path}?{self.token}"

    def requests(self, prefix: str = "/") -> list[dict[str, str]]:
        """Return the headers of this test's requests whose path starts with prefix."""
        with self.server.lock:
            return [
                headers
                for path, headers in self.server.log
                if path.startswith(prefix) and path.endswith(f"?{self.token}")
            ]

    def hits(self, prefix: str = "/") -> int:
        """Count this test's requests whose path starts with ``prefix``."""
        return len(self.requests(prefix))


class RecordingLimiter(HostLimiter):
    """A real limiter that also records every slow_down() call."""

    def __init__(self, per_host: int = 4, *, cancel: threading.Event | None = None):
        super().__init__(per_host)
        self.slowed: list[tuple[str, float]] = []
        self._cancel_on_slow_down = cancel

    def slow_down(self, host: str, delay: float) -> None:
        self.slowed.append((host, delay))
        if self._cancel_on_slow_down is not None:
            self._cancel_on_slow_down.set()
        super().slow_down(host, delay)


@contextmanager
def running_server() -> Iterator[Server]:
    """A ``Server`` serving in a thread for the block, then shut down."""
    httpd = Server()
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=WAIT)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running_server() as httpd:
        yield httpd


@pytest.fixture
def site(server: Server) -> Site:
    return Site(server)


def make_job(url: str, stem: str = "item") -> Job:
    return Job(index=0, line=1, url=url, key=url, stem=stem)


def download(
    url: str,
    tmp_dir: Path,
    http: HttpSettings = FAST,
    *,
    cancel: threading.Event | None = None,
    hosts: HostLimiter | None = None,
    on_bytes: Callable[[int], None] | None = None,
    stem: str = "item",
) -> Fetched:
    with make_client(http, threads=4) as client:
        return fetch(
            make_job(url, stem),
            client,
            http,
            tmp_dir,
            cancel=cancel or threading.Event(),
            hosts=hosts or HostLimiter(http.per_host),
            on_bytes=on_bytes,
        )


def failure(
    url: str, tmp_dir: Path, http: HttpSettings = FAST, **kw: Any
) -> FetchError:
    """Fetch ``url`` expecting a FetchError; check that nothing was left on disk."""
    with pytest.raises(FetchError) as info:
        download(url, tmp_dir, http, **kw)
    assert list(tmp_dir.iterdir()) == []
    return info.value


def test_ok_body_is_saved_with_its_hash(site: Site, tmp_path: Path) -> None:
    """A 200 body lands in <stem>.part, byte for byte, with its sha256 and size."""
    fetched = download(site.url(f"/ok/{BIG}"), tmp_path)

    body = payload(BIG)
    assert fetched.path == tmp_path / "item.part"
    assert fetched.path.read_bytes() == body
    assert fetched.sha256 == hashlib.sha256(body).hexdigest()
    assert fetched.nbytes == BIG
    assert (fetched.http_status, fetched.attempts) == (200, 1)
    assert fetched.final_url == site.url(f"/ok/{BIG}")
    assert fetched.path.stat().st_mode & 0o777 == 0o600
    assert site.hits() == 1


def test_request_headers(site: Site, tmp_path: Path) -> None:
    """Requests ask for identity and images, with our UA and the extra headers."""
    http = replace(FAST, headers=(("X-Test", "yes"),))
    download(site.url("/ok/10"), tmp_path, http)

    [headers] = site.requests()
    assert headers["accept-encoding"] == "identity"
    assert "downloader/" in headers["user-agent"]
    assert headers["accept"].startswith("image/*")
    assert headers["x-test"] == "yes"


def test_make_client_settings() -> None:
    """The client leaves redirects to us and waits for a connection up to deadline."""
    with make_client(FAST, threads=3) as client:
        assert client.follow_redirects is False
        assert client.timeout.read == FAST.timeout
        assert client.timeout.pool == FAST.deadline


def test_on_bytes_sees_every_byte(site: Site, tmp_path: Path) -> None:
    """The progress callback's counts add up to the body size."""
    seen: list[int] = []
    fetched = download(site.url(f"/ok/{BIG}"), tmp_path, on_bytes=seen.append)

    assert sum(seen) == fetched.nbytes == BIG


def test_stale_part_file_is_replaced(site: Site, tmp_path: Path) -> None:
    """A leftover .part from an earlier run does not block or pollute the download."""
    (tmp_path / "item.part").write_bytes(b"stale" * 1000)
    fetched = download(site.url("/ok/100"), tmp_path)

    assert fetched.path.read_bytes() == payload(100)


def test_part_symlink_is_not_followed(site: Site, tmp_path: Path) -> None:
    """A symlink planted at the .part name never leads a write outside tmp_dir."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    (tmp_dir / "item.part").symlink_to(outside)
    fetched = download(site.url("/ok/100"), tmp_dir)

    assert outside.read_bytes() == b"precious"
    assert not fetched.path.is_symlink()
    assert fetched.path.read_bytes() == payload(100)


@pytest.mark.parametrize("code", [400, 401, 403, 404, 410, 600, 999])
def test_client_errors_are_not_retried(site: Site, tmp_path: Path, code: int) -> None:
    """4xx other than 408/429, and codes past 5xx, fail after one request."""
    error = failure(site.url(f"/status/{code}"), tmp_path)

    assert error.reason == f"HTTP {code}"
    assert (error.http_status, error.attempts) == (code, 1)
    assert site.hits() == 1


@pytest.mark.parametrize("code", [204, 206, 301, 304])
def test_unexpected_statuses_fail(site: Site, tmp_path: Path, code: int) -> None:
    """Other 2xx, and 3xx without a Location, fail without retry."""
    error = failure(site.url(f"/status/{code}"), tmp_path)

    assert error.reason == f"unexpected HTTP status {code}"
    assert site.hits() == 1


@pytest.mark.parametrize("code", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(site: Site, tmp_path: Path, code: int) -> None:
    """408, 429 and 5xx are retried `retries` times, then reported with the count."""
    error = failure(site.url(f"/status/{code}"), tmp_path)

    assert error.reason == f"HTTP {code} after 3 attempts"
    assert (error.http_status, error.attempts) == (code, 3)
    assert site.hits() == 3


def test_no_retries_means_one_request(site: Site, tmp_path: Path) -> None:
    """With retries=0 a 503 fails at once, without an attempt count."""
    error = failure(site.url("/status/503"), tmp_path, replace(FAST, retries=0))

    assert error.reason == "HTTP 503"
    assert site.hits() == 1


def test_flaky_server_recovers(site: Site, tmp_path: Path) -> None:
    """503 twice then 200: three requests and a success that says so."""
    fetched = download(site.url("/flaky503/a/2"), tmp_path)

    assert fetched.attempts == 3
    assert fetched.path.read_bytes() == payload(100)
    assert site.hits() == 3


@pytest.mark.parametrize(
    ("value", "delay"),
    [
        ("1", 0.2),  # capped at max_backoff
        ("0", 0.0),
        ("Wed, 21 Oct 2099 07:28:00 GMT", 0.2),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("abc", 0.0),  # garbage: normal backoff, which is 0 here
    ],
)
def test_retry_after_slows_the_host(
    site: Site, tmp_path: Path, value: str, delay: float
) -> None:
    """429 + Retry-After: the wait is capped, the host is slowed, the retry succeeds."""
    hosts = RecordingLimiter()
    fetched = download(site.url(f"/retry-after/k/{value}"), tmp_path, hosts=hosts)

    assert fetched.attempts == 2
    assert site.hits() == 2
    assert hosts.slowed == [(site.host, delay)]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/short", "connection closed early (100 of 1000 bytes) after 3 attempts"),
        ("/chunked-cut", "incomplete chunked read"),
        ("/reset", "Connection reset by peer after 3 attempts"),
    ],
)
def test_cut_bodies_are_retried(
    site: Site, tmp_path: Path, path: str, reason: str
) -> None:
    """A body cut short (lying length, cut chunks, RST) is retried, then fails."""
    error = failure(site.url(path), tmp_path)

    assert reason in error.reason
    assert error.attempts == 3
    assert site.hits() == 3


def test_connection_reset_names_the_cause(site: Site, tmp_path: Path) -> None:
    """A reset mid-body reads as a connection problem, not as success."""
    error = failure(site.url("/reset"), tmp_path, replace(FAST, retries=0))

    assert error.reason.startswith("connection error:")
    assert "reset" in error.reason.lower()


def test_refused_connection_is_retried(tmp_path: Path) -> None:
    """A closed port is a transient failure: retried, then reported."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = failure(f"http://127.0.0.1:{port}/x", tmp_path)

    assert error.reason == "cannot connect: Connection refused after 3 attempts"
    assert error.attempts == 3


def test_silent_server_times_out(site: Site, tmp_path: Path) -> None:
    """A server that never answers hits the read timeout."""
    error = failure(site.url("/silent"), tmp_path, replace(FAST, retries=0))

    assert error.reason == "read timeout (0.5s)"
    assert site.hits() == 1


def test_drip_is_too_slow(site: Site, tmp_path: Path) -> None:
    """A byte every 0.05 s fails the minimum-speed check, and is retried once."""
    error = failure(site.url("/drip"), tmp_path, replace(FAST, retries=1))

    assert error.reason.startswith("too slow: ")
    assert error.reason.endswith(" B/s for 0.5s after 2 attempts")
    assert site.hits() == 2


def test_drip_hits_the_deadline(site: Site, tmp_path: Path) -> None:
    """With no speed floor, the whole-download deadline still stops a drip."""
    http = replace(FAST, retries=0, min_speed=0, deadline=0.5)
    error = failure(site.url("/drip"), tmp_path, http)

    assert error.reason == "past the 0.5s deadline"


def test_declared_size_over_cap_fails_at_once(site: Site, tmp_path: Path) -> None:
    """A Content-Length above --max-bytes fails without reading or retrying."""
    error = failure(site.url("/big"), tmp_path, replace(FAST, max_bytes=100_000))

    assert error.reason == (
        f"larger than --max-bytes (100000 bytes): Content-Length {BIG}"
    )
    assert site.hits() == 1


def test_undeclared_size_over_cap_fails(site: Site, tmp_path: Path) -> None:
    """A close-delimited body is cut off once it passes --max-bytes."""
    seen: list[int] = []
    http = replace(FAST, max_bytes=100_000)
    error = failure(site.url("/big-nolen"), tmp_path, http, on_bytes=seen.append)

    assert error.reason == "larger than --max-bytes (100000 bytes)"
    assert sum(seen) <= 100_000
    assert site.hits() == 1


def test_gzip_bomb_is_cut_off_in_small_pieces(site: Site, tmp_path: Path) -> None:
    """A gzip bomb is decoded at most CHUNK bytes at a time and stops at the cap."""
    seen: list[int] = []
    error = failure(site.url("/gzip-bomb"), tmp_path, on_bytes=seen.append)

    assert error.reason == f"larger than --max-bytes ({FAST.max_bytes} bytes)"
    assert max(seen) <= CHUNK
    assert sum(seen) <= FAST.max_bytes
    assert site.hits() == 1


@pytest.mark.parametrize("kind", ["gzip", "zlib", "raw"])
def test_encoded_bodies_are_decoded(site: Site, tmp_path: Path, kind: str) -> None:
    """gzip and both kinds of deflate are decoded; the hash is of the decoded body."""
    fetched = download(site.url(f"/encoded/{kind}"), tmp_path)

    assert fetched.path.read_bytes() == payload(5000)
    assert fetched.sha256 == hashlib.sha256(payload(5000)).hexdigest()


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("br", "unsupported Content-Encoding 'br'"),
        ("bad", "bad gzip data: "),
        ("cut", "bad gzip data: stream ends early"),
    ],
)
def test_bad_encodings_fail(site: Site, tmp_path: Path, kind: str, reason: str) -> None:
    """Unknown or broken content codings fail without retry."""
    error = failure(site.url(f"/encoded/{kind}"), tmp_path)

    assert error.reason.startswith(reason)
    assert site.hits() == 1


def test_redirects_are_followed(site: Site, tmp_path: Path) -> None:
    """A chain within the limit ends at the body, and the final URL is recorded."""
    fetched = download(site.url("/redirect/3"), tmp_path)

    assert fetched.final_url == site.url("/redirect/0")
    assert fetched.path.read_bytes() == payload(10)
    assert site.hits("/redirect/") == 4


def test_too_many_redirects(site: Site, tmp_path: Path) -> None:
    """A chain longer than max_redirects fails after max_redirects + 1 requests."""
    error = failure(site.url("/redirect/6"), tmp_path)

    assert error.reason == "too many redirects (more than 5)"
    assert error.attempts == 1
    assert site.hits("/redirect/") == 6


def test_relative_redirect_is_resolved(site: Site, tmp_path: Path) -> None:
    """A relative Location is resolved against the current URL."""
    fetched = download(site.url("/relative"), tmp_path)

    assert fetched.final_url == f"http://{site.host}/ok/10"
    assert fetched.path.read_bytes() == payload(10)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/loop", "redirect loop"),
        ("/to-file", "redirect to unsupported scheme 'file'"),
        ("/to-ftp", "redirect to unsupported scheme 'ftp'"),
    ],
)
def test_bad_redirects_fail(site: Site, tmp_path: Path, path: str, reason: str) -> None:
    """Loops and non-http(s) targets fail on the first hop, without retry."""
    error = failure(site.url(path), tmp_path)

    assert error.reason == reason
    assert site.hits() == 1


def test_empty_body_fails(site: Site, tmp_path: Path) -> None:
    """A 200 with no bytes is a failure, not an empty image."""
    error = failure(site.url("/empty"), tmp_path)

    assert error.reason == "empty body"
    assert site.hits() == 1


def test_cancelled_before_start(site: Site, tmp_path: Path) -> None:
    """A set cancel flag stops fetch before any request."""
    cancel = threading.Event()
    cancel.set()
    error = failure(site.url("/ok/10"), tmp_path, cancel=cancel)

    assert error.reason == "interrupted"
    assert error.attempts == 0
    assert site.hits() == 0


def test_cancelled_between_chunks(site: Site, tmp_path: Path) -> None:
    """Cancel during the body stops the download and removes the .part file."""
    cancel = threading.Event()
    error = failure(
        site.url(f"/ok/{BIG}"), tmp_path, cancel=cancel, on_bytes=lambda _: cancel.set()
    )

    assert error.reason == "interrupted"


def test_cancelled_during_backoff(site: Site, tmp_path: Path) -> None:
    """Cancel while waiting to retry ends the wait at once."""
    cancel = threading.Event()
    hosts = RecordingLimiter(cancel=cancel)
    http = replace(FAST, backoff=60, max_backoff=60)
    error = failure(site.url("/status/503"), tmp_path, http, cancel=cancel, hosts=hosts)

    assert error.reason == "interrupted"
    assert error.attempts == 1
    assert site.hits() == 1


def test_unwritable_tmp_dir_is_an_output_error(site: Site, tmp_path: Path) -> None:
    """A tmp_dir that cannot hold files stops the run instead of failing the URL."""
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OutputError, match="cannot write"):
        download(site.url("/ok/10"), blocker / "tmp")

    assert list(tmp_path.iterdir()) == [blocker]


def _slow_downloads(
    pool: ThreadPoolExecutor,
    site: Site,
    client: Any,
    http: HttpSettings,
    hosts: HostLimiter,
    tmp_path: Path,
    numbers: Iterable[int],
) -> list[int]:
    """Fetch ``/slow/1000`` as ``item<n>`` for each of ``numbers``, all at once in
    ``pool``; the sizes fetched."""
    futures = [
        pool.submit(
            fetch,
            make_job(site.url("/slow/1000"), f"item{n}"),
            client,
            http,
            tmp_path,
            cancel=threading.Event(),
            hosts=hosts,
        )
        for n in numbers
    ]
    return [future.result(timeout=WAIT).nbytes for future in futures]


def test_per_host_limit_holds_across_threads(site: Site, tmp_path: Path) -> None:
    """With per_host=1, four threads never have two requests open on one host."""
    http = replace(FAST, per_host=1)
    hosts = HostLimiter(1)
    with ThreadPoolExecutor(max_workers=4) as pool, make_client(http, 4) as client:
        sizes = _slow_downloads(pool, site, client, http, hosts, tmp_path, range(4))

    assert sizes == [1000] * 4
    assert site.server.peak[site.token] == 1
    assert site.hits() == 4


def test_the_shared_pool_keeps_its_connections_in_one_pass(
    site: Site, tmp_path: Path
) -> None:
    """Eight threads on one client: eight keep-alive connections, all kept and
    used again. The pool's bookkeeping (twice per download, under its lock) asks
    each connection whether it is idle once per pass; httpcore 1.0's own pass asks
    8 + 8 x 8 times (``connection_pool``)."""
    threads = 8
    http = replace(FAST, per_host=threads)
    hosts = HostLimiter(threads)

    def round_of_downloads(first: int) -> list[int]:
        numbers = range(first, first + threads)
        return _slow_downloads(pool, site, client, http, hosts, tmp_path, numbers)

    with (
        ThreadPoolExecutor(max_workers=threads) as pool,
        make_client(http, threads) as client,
    ):
        assert round_of_downloads(0) == [1000] * threads
        [connection_pool] = _pools(client)
        connections = list(connection_pool._connections)
        asked: Counter[int] = Counter()
        for connection in connections:
            is_idle = connection.is_idle

            def counted(connection: Any = connection, is_idle: Any = is_idle) -> bool:
                asked[id(connection)] += 1
                return bool(is_idle())

            connection.is_idle = counted
        with connection_pool._optional_thread_lock:
            closing = connection_pool._assign_requests_to_connections()
        assert closing == []
        assert sum(asked.values()) == threads  # once each
        assert round_of_downloads(threads) == [1000] * threads
        assert connection_pool._connections == connections  # kept, used again

    assert len(connections) == threads
    assert site.hits() == 2 * threads


def _fetch_on(
    client: httpx.Client,
    url: str,
    tmp_dir: Path,
    http: HttpSettings = FAST,
    *,
    hosts: HostLimiter,
    spares: SpareFiles | None = None,
) -> Fetched:
    """``fetch`` of ``url`` on a client the test holds (its pool is looked at)."""
    return fetch(
        make_job(url),
        client,
        http,
        tmp_dir,
        hosts=hosts,
        cancel=threading.Event(),
        spares=spares,
    )


def test_the_pool_polls_idle_sockets_once_a_second_not_per_download(
    site: Site, tmp_path: Path
) -> None:
    """Whether an idle connection was closed by its server costs a ``poll`` of its
    socket. The pool's bookkeeping asks it of every idle connection on a sweep, at
    most once per ``SWEEP_S``; between sweeps, a pass with no request to place asks
    nothing, and a download asks it of the connection it is given only (httpcore
    1.0 asks every idle connection on every pass: twice per download)."""
    threads = 8
    http = replace(FAST, per_host=threads)
    hosts = HostLimiter(threads)
    with (
        ThreadPoolExecutor(max_workers=threads) as pool,
        make_client(http, threads) as client,
    ):
        numbers = range(threads)
        _slow_downloads(pool, site, client, http, hosts, tmp_path, numbers)
        [connection_pool] = _pools(client)
        connections = list(connection_pool._connections)
        asked: Counter[int] = Counter()
        for connection in connections:
            has_expired = connection.has_expired

            def counted(
                connection: Any = connection, has_expired: Any = has_expired
            ) -> bool:
                asked[id(connection)] += 1
                return bool(has_expired())

            connection.has_expired = counted

        def one_pass(swept_ago: float) -> int:
            asked.clear()
            connection_pool._downloader_swept_at = time.monotonic() - swept_ago
            with connection_pool._optional_thread_lock:
                assert connection_pool._assign_requests_to_connections() == []
            return sum(asked.values())

        assert one_pass(swept_ago=0.0) == 0
        assert one_pass(swept_ago=SWEEP_S) == threads  # a sweep: each once
        connection_pool._downloader_swept_at = time.monotonic()
        asked.clear()
        assert download(site.url("/ok/10"), tmp_path, http, hosts=hosts)
        assert sum(asked.values()) == 0  # download() has its own client
        _fetch_on(client, site.url("/ok/10"), tmp_path, http, hosts=hosts)
        assert sum(asked.values()) == 1  # the connection it was given
        assert connection_pool._connections == connections  # all kept


def test_an_idle_connection_its_server_closed_is_never_handed_out(
    site: Site, tmp_path: Path
) -> None:
    """Between sweeps, the connection a request is given is still asked whether
    its server closed it: a keep-alive connection the server hung up is replaced
    before the request is sent, so the download needs no second attempt."""
    hosts = HostLimiter(1)
    with make_client(FAST, 1) as client:
        first = _fetch_on(
            client, site.url("/ok-then-close/10"), tmp_path, FAST, hosts=hosts
        )
        [connection_pool] = _pools(client)
        [connection] = connection_pool._connections
        sock = connection._connection._network_stream.get_extra_info("socket")
        readable, _, _ = select.select([sock], [], [], WAIT)  # the server's FIN
        assert readable
        connection_pool._downloader_swept_at = time.monotonic()  # no sweep now
        second = _fetch_on(client, site.url("/ok/10"), tmp_path, FAST, hosts=hosts)
        assert connection_pool._connections != [connection]

    assert (first.attempts, second.attempts) == (1, 1)
    assert site.hits() == 2


def _ready_spare(folder: Path, content: bytes) -> tuple[SpareFiles, Path]:
    """Spare files with one ready: a file of ``content``, as a worker leaves one."""
    spares = SpareFiles(folder, 4)
    name = spares.lend(len(content))
    assert name is not None
    spare = Path(name)
    spare.write_bytes(content)
    spares.settle(name, (spare.stat().st_dev, spare.stat().st_ino))
    return spares, spare


def _fetch_with_spares(site: Site, folder: Path, spares: SpareFiles) -> Fetched:
    """``/ok/1000`` into ``folder``, over a spare when one is ready."""
    with make_client(FAST, 1) as client:
        return _fetch_on(
            client,
            site.url("/ok/1000"),
            folder,
            FAST,
            hosts=HostLimiter(1),
            spares=spares,
        )


def test_a_body_is_written_over_a_spare_and_cut_to_its_length(
    site: Site, tmp_path: Path
) -> None:
    """A download given a ready spare (``spares``) renames it to its ``.part`` and
    writes over it: the same inode, exactly the body, none of the 3 MB it held."""
    spares, spare = _ready_spare(tmp_path, b"\x01" * 3_000_000)
    inode = spare.stat().st_ino
    (tmp_path / "item.part").write_bytes(b"stale")  # replaced, as _open_part does
    fetched = _fetch_with_spares(site, tmp_path, spares)

    assert fetched.path.read_bytes() == payload(1000)
    assert fetched.path.stat().st_ino == inode
    assert fetched.identity == (fetched.path.stat().st_dev, inode)
    assert not spare.exists()
    assert spares.take() is None


@pytest.mark.parametrize("planted", ["symlink", "hardlink", "fifo", "gone"])
def test_what_is_put_under_a_spares_name_is_never_written_through(
    site: Site, tmp_path: Path, planted: str
) -> None:
    """A spare is written over only if it is still the file its worker linked:
    whatever replaced it under its name (a link to a file elsewhere, hard or
    symbolic; a FIFO with a reader; nothing) is passed over and left as it is, and
    the body goes to a new file."""
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"not yours")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spares, spare = _ready_spare(scratch, b"\x01" * 1000)
    spare.unlink()
    reader = -1
    if planted == "symlink":
        spare.symlink_to(victim)
    elif planted == "hardlink":
        os.link(victim, spare)
    elif planted == "fifo":
        os.mkfifo(spare)
        reader = os.open(spare, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fetched = _fetch_with_spares(site, scratch, spares)
    finally:
        if reader >= 0:
            os.close(reader)

    assert fetched.path.read_bytes() == payload(1000)
    assert victim.read_bytes() == b"not yours"
    assert spare.is_symlink() or spare.exists() is (planted != "gone")
    assert fetched.path.stat().st_ino != victim.stat().st_ino
    assert spares.take() is None


def test_a_write_cut_short_over_a_spare_keeps_only_what_was_written(
    tmp_path: Path,
) -> None:
    """However the writing of a body over a spare ends, the file is cut to what was
    written when it is closed: a partial body kept to be continued is exactly the
    bytes received, never followed by the spare's old ones."""
    spares, _ = _ready_spare(tmp_path, b"\x01" * 100_000)
    path = tmp_path / "item.part"

    def cut_short() -> None:
        with _PartFile(path, spares=spares) as part:
            part.write_all(iter([b"abc", memoryview(b"defg")]))
            raise ConnectionResetError("cut")

    with pytest.raises(ConnectionResetError):
        cut_short()

    assert path.read_bytes() == b"abcdefg"


def test_slot_is_released_after_a_failure(site: Site, tmp_path: Path) -> None:
    """A failed request gives its host slot back, so the next one can run."""
    hosts = HostLimiter(1)
    failure(site.url("/status/404"), tmp_path, hosts=hosts)
    cancel = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(
            download, site.url("/ok/10"), tmp_path, cancel=cancel, hosts=hosts
        )
        try:
            fetched = future.result(timeout=WAIT)
        finally:
            cancel.set()

    assert fetched.nbytes == 10


def test_slot_wait_checks_cancel() -> None:
    """Waiting for a busy host's slot ends with "interrupted" once cancel is set."""
    hosts = HostLimiter(1)
    cancel = threading.Event()
    cancel.set()
    with hosts.slot("a:80", threading.Event()):
        with pytest.raises(FetchError, match="interrupted"), hosts.slot("a:80", cancel):
            pytest.fail("got a second slot on a per_host=1 limiter")
        with hosts.slot("b:80", threading.Event()):
            busy_elsewhere = True

    assert busy_elsewhere


def test_slow_down_holds_back_only_that_host() -> None:
    """slow_down() makes later requests to that host wait; other hosts go on."""
    hosts = HostLimiter(2)
    hosts.slow_down("a:80", 60)
    with hosts.slot("b:80", threading.Event()):
        other_host_ran = True
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(FetchError, match="interrupted"), hosts.slot("a:80", cancel):
        pytest.fail("slot granted during a slow-down")

    assert other_host_ran


def test_invalid_limiter_size() -> None:
    """A limiter needs at least one slot per host."""
    with pytest.raises(ValueError, match="per_host"):
        HostLimiter(0)


def test_fetch_error_keeps_final_url(site: Site, tmp_path: Path) -> None:
    """A failure after a redirect records the URL where it happened."""
    error = failure(site.url("/relative"), tmp_path, replace(FAST, max_bytes=5))

    assert error.reason == "larger than --max-bytes (5 bytes): Content-Length 10"
    assert error.final_url == f"http://{site.host}/ok/10"


# ------------------------------------------------------------- --block-private

BLOCKING = replace(FAST, block_private=True, retries=0)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.31.255.255", "private"),
        ("192.168.0.1", "private"),
        ("fd12:3456::1", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%lo", "link-local"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("64:ff9b::a00:1", "private"),
        ("2002:c0a8:101::1", "private"),
        ("8.8.8.8", None),
        ("172.32.0.1", None),
        ("100.128.0.1", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_address_classifier(address: str, kind: str | None) -> None:
    """Literal addresses are judged without any lookup; mapped IPv4 by its IPv4."""
    assert blocked_address_kind(address) == kind


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "2130706433", "0x7f.1", "127.1", "017700000001"]
)
def test_block_private_refuses_loopback_in_every_spelling(
    site: Site, tmp_path: Path, host: str
) -> None:
    """Names and numeric forms that reach 127.0.0.1 fail unsent, without retries."""
    url = site.url("/ok/10").replace("127.0.0.1", host)

    error = failure(url, tmp_path, BLOCKING)

    assert error.reason == "blocked address 127.0.0.1 (loopback, --block-private)"
    assert error.attempts == 1
    assert site.hits() == 0


def test_block_private_refuses_mapped_ipv6(tmp_path: Path) -> None:
    """[::ffff:127.0.0.1] is loopback, whatever its spelling."""
    error = failure("http://[::ffff:127.0.0.1]:9/x.jpg", tmp_path, BLOCKING)

    assert error.reason.startswith("blocked address ::ffff:127.0.0.1 (loopback")


def test_block_private_is_off_by_default(site: Site, tmp_path: Path) -> None:
    """Without the flag a loopback URL is fetched as usual."""
    fetched = download(site.url("/ok/10"), tmp_path)

    assert fetched.nbytes == 10


def test_block_private_checks_every_redirect_hop(site: Site, tmp_path: Path) -> None:
    """A redirect to a blocked host is refused before it is requested."""
    # The policy refuses 127.0.0.2 only, so the first hop (127.0.0.1) passes; the
    # hop to "internal.test" resolves (through the test's table) to 127.0.0.2.
    seen: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        seen.append(host)
        return ["127.0.0.2"]

    http = replace(BLOCKING, resolver=resolve, block_policy=block_127_0_0_2)
    error = failure(site.url("/to-host/internal.test"), tmp_path, http)

    assert error.reason == "blocked address 127.0.0.2 (test-internal, --block-private)"
    assert error.final_url is not None
    assert "internal.test" in error.final_url
    assert seen == ["internal.test"]
    assert site.hits("/to-host/") == 1
    assert site.hits("/ok/") == 0


def test_unresolvable_host_is_a_connect_failure(tmp_path: Path) -> None:
    """A lookup that fails is reported like httpx's connect error."""

    def resolve(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    http = replace(BLOCKING, resolver=resolve)
    error = failure("http://nowhere.invalid/x.jpg", tmp_path, http)

    assert error.reason == (
        "cannot connect: cannot resolve nowhere.invalid: Name or service not known"
    )


def test_block_private_in_asyncio(site: Site, tmp_path: Path) -> None:
    """fetch_async looks the host up in the event loop and refuses loopback too."""

    async def attempt() -> FetchError:
        async with make_async_client(BLOCKING, 1) as client:
            with pytest.raises(FetchError) as info:
                await fetch_async(
                    make_job(site.url("/ok/10").replace("127.0.0.1", "localhost")),
                    client,
                    BLOCKING,
                    tmp_path,
                    stop=asyncio.Event(),
                    hosts=AsyncHostLimiter(1),
                )
        return info.value

    error = asyncio.run(asyncio.wait_for(attempt(), WAIT))

    assert error.reason == "blocked address 127.0.0.1 (loopback, --block-private)"
    assert site.hits() == 0


def test_insecure_downloads_are_marked(site: Site, tmp_path: Path) -> None:
    """With verify off the Fetched record says so (it reaches the manifest)."""
    secure = download(site.url("/ok/10"), tmp_path, stem="a")
    insecure = download(
        site.url("/ok/10"), tmp_path, replace(FAST, verify=False), stem="b"
    )

    assert (secure.insecure, insecure.insecure) == (False, True)


# Hostile replies: each fails its URL with a plain reason, in both drivers, and the
# caller (every scheduler) goes on.

DRIVERS = ["sync", "async"]


def fetch_by(driver: str, url: str, tmp_dir: Path, http: HttpSettings) -> Fetched:
    """Fetch ``url`` with the blocking driver or the asyncio one."""
    if driver == "sync":
        return download(url, tmp_dir, http)

    async def attempt() -> Fetched:
        async with make_async_client(http, 4) as client:
            return await fetch_async(
                make_job(url),
                client,
                http,
                tmp_dir,
                stop=asyncio.Event(),
                hosts=AsyncHostLimiter(http.per_host),
            )

    return asyncio.run(asyncio.wait_for(attempt(), WAIT))


def failure_by(
    driver: str, url: str, tmp_dir: Path, http: HttpSettings = FAST
) -> FetchError:
    """``failure`` for either driver: the FetchError, and nothing left on disk."""
    with pytest.raises(FetchError) as info:
        fetch_by(driver, url, tmp_dir, http)
    assert list(tmp_dir.iterdir()) == []
    return info.value


HOSTILE_LOCATIONS = [
    "javascript:alert(1)",
    "http://[::1",
    "http://exa\x01mple/",
    "http://127.0.0.1:99999/x",
    "https://",
    "data:image/png;base64,AAAA",
    "//:80/x",
]


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("location", HOSTILE_LOCATIONS)
def test_unrepresentable_redirects_fail_the_url(
    site: Site, tmp_path: Path, driver: str, location: str
) -> None:
    """A Location httpx cannot turn into a request fails that URL, once, plainly.

    httpx raises ``InvalidURL`` (not an ``HTTPError``) while it builds the next
    request, even with redirects off; it used to escape and stop the whole run.
    """
    quoted = "".join(f"%{byte:02X}" for byte in location.encode())
    error = failure_by(driver, site.url(f"/to-raw/{quoted}"), tmp_path)

    assert error.reason.startswith(("bad redirect: ", "redirect to unsupported"))
    assert "\n" not in error.reason
    assert error.final_url is not None
    assert site.hits() == 1


@pytest.mark.parametrize("driver", DRIVERS)
def test_two_locations_are_ambiguous(site: Site, tmp_path: Path, driver: str) -> None:
    """Two Location headers are not joined into one target: the URL fails."""
    error = failure_by(driver, site.url("/two-locations"), tmp_path)

    assert error.reason == "ambiguous redirect: 2 Location headers"
    assert site.hits() == 1


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("not-http", "bad HTTP response: illegal status line: NOT HTTP AT ALL"),
        ("two-lengths", "bad HTTP response: "),
        ("bad-chunk", "bad HTTP response: "),
    ],
)
def test_malformed_replies_are_not_retried(
    site: Site, tmp_path: Path, driver: str, name: str, reason: str
) -> None:
    """A reply that is not valid HTTP is a final failure: retrying cannot help."""
    error = failure_by(driver, site.url(f"/raw/{name}"), tmp_path)

    assert error.reason.startswith(reason)
    assert "bytearray" not in error.reason
    assert site.hits() == 1


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("reply", ["http10", "close"])
def test_a_body_that_ends_its_connection_is_saved_at_once(
    site: Site, tmp_path: Path, driver: str, reply: str
) -> None:
    """An HTTP/1.0 answer, or one with ``Connection: close``, is read whole and
    saved at once: the end of its body is the end of its connection, which is not
    kept. (Taking the body's end in ``raw_body.whole`` without saying so left httpx
    waiting for more, forever and at full CPU.) Bounded: the fetch runs in a daemon
    thread given ``WAIT`` seconds."""
    fetched: list[Fetched] = []
    thread = threading.Thread(
        target=lambda: fetched.append(
            fetch_by(driver, site.url(f"/raw/{reply}"), tmp_path, FAST)
        ),
        daemon=True,
    )
    thread.start()
    thread.join(WAIT)

    assert not thread.is_alive()
    [first] = fetched
    assert first.path.read_bytes() == b"\xff\xd8\xff\xdb"
    assert first.attempts == 1
    assert site.hits() == 1


@pytest.mark.parametrize("driver", DRIVERS)
def test_bytes_past_a_body_do_not_reach_the_next_request_on_its_connection(
    site: Site, tmp_path: Path, driver: str
) -> None:
    """A server that sends more than its Content-Length on a keep-alive connection:
    the body is saved as it should be, and the connection is not used again, so the
    next URL to that host gets a response of its own at its first attempt (it read
    the extra bytes as its status line and failed)."""
    first_url, next_url = site.url("/ok-then-junk/1000"), site.url("/ok/10")
    if driver == "sync":
        with make_client(FAST, 1) as client:
            hosts = HostLimiter(1)
            first = _fetch_on(client, first_url, tmp_path, FAST, hosts=hosts)
            body = first.path.read_bytes()
            second = _fetch_on(client, next_url, tmp_path, FAST, hosts=hosts)
    else:

        async def both() -> tuple[Fetched, bytes, Fetched]:
            async with make_async_client(FAST, 1) as client:
                hosts, stop = AsyncHostLimiter(1), asyncio.Event()
                first = await fetch_async(
                    make_job(first_url), client, FAST, tmp_path, stop=stop, hosts=hosts
                )
                body = first.path.read_bytes()
                second = await fetch_async(
                    make_job(next_url), client, FAST, tmp_path, stop=stop, hosts=hosts
                )
                return first, body, second

        first, body, second = asyncio.run(asyncio.wait_for(both(), WAIT))

    assert body == payload(1000)
    assert second.path.read_bytes() == payload(10)
    assert (first.attempts, second.attempts) == (1, 1)
    assert site.hits() == 2


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_silent_hang_up_is_retried(site: Site, tmp_path: Path, driver: str) -> None:
    """A connection closed before any reply may be a stale keep-alive: retried."""
    error = failure_by(driver, site.url("/raw/nothing"), tmp_path)

    assert error.reason == (
        "Server disconnected without sending a response after 3 attempts"
    )  # not "…a response. after 3 attempts"
    assert site.hits() == 3


@pytest.mark.parametrize("driver", DRIVERS)
def test_deadline_bounds_the_response_head(
    site: Site, tmp_path: Path, driver: str
) -> None:
    """Status line and headers dripped a byte at a time still end at --deadline.

    Each byte comes well within the read timeout, so only a deadline on the whole
    request stops it: the server sees the client leave before its head is sent.
    """
    http = replace(FAST, retries=0, deadline=1.0, min_speed=0)
    error = failure_by(driver, site.url("/drip-head"), tmp_path, http)

    assert error.reason == "past the 1s deadline"
    with site.server.head_done:
        assert site.server.head_done.wait_for(
            lambda: site.token in site.server.head_bytes, WAIT
        )
        sent, total = site.server.head_bytes[site.token]
    assert sent < total / 2


SECRETS = (("Authorization", "Bearer s3cret"), ("Cookie", "session=s3cret"))


@pytest.mark.parametrize("driver", DRIVERS)
def test_credentials_stay_with_their_origin(
    site: Site, tmp_path: Path, driver: str
) -> None:
    """Authorization and Cookie from --header go to the listed URL's origin only."""
    http = replace(FAST, headers=(*SECRETS, ("X-Trace", "1")))

    fetch_by(driver, site.url("/to-host/localhost"), tmp_path, http)

    first, second = site.requests()
    assert (first["authorization"], first["cookie"]) == (
        "Bearer s3cret",
        "session=s3cret",
    )
    assert "authorization" not in second
    assert "cookie" not in second
    assert second["x-trace"] == "1"


@pytest.mark.parametrize("driver", DRIVERS)
def test_credentials_follow_a_same_origin_redirect(
    site: Site, tmp_path: Path, driver: str
) -> None:
    """A hop on the same scheme, host and port keeps the user's headers."""
    http = replace(FAST, headers=SECRETS)

    fetch_by(driver, site.url("/redirect/2"), tmp_path, http)

    requests = site.requests()
    assert len(requests) == 3
    assert all(r["authorization"] == "Bearer s3cret" for r in requests)


def test_credentials_do_not_follow_a_port_change(site: Site, tmp_path: Path) -> None:
    """Another port on the same host is another origin."""
    with running_server() as other:
        http = replace(FAST, headers=SECRETS)
        download(site.url(f"/to-port/{other.server_address[1]}"), tmp_path, http)
        with other.lock:
            ((_, headers),) = other.log

    assert "authorization" not in headers
    assert "cookie" not in headers
    assert site.requests()[0]["authorization"] == "Bearer s3cret"


def test_cookies_a_server_sets_are_not_kept(site: Site, tmp_path: Path) -> None:
    """A Set-Cookie is not stored: no later request, to any origin, carries it."""
    with running_server() as other:
        with make_client(FAST, threads=1) as client:
            for number, url in enumerate(
                [
                    site.url("/set-cookie"),
                    site.url("/ok/10"),
                    f"http://127.0.0.1:{other.server_address[1]}/ok/10?{site.token}",
                ]
            ):
                fetch(
                    make_job(url, f"c{number}"),
                    client,
                    FAST,
                    tmp_path,
                    cancel=threading.Event(),
                    hosts=HostLimiter(4),
                )
        with other.lock:
            ((_, elsewhere),) = other.log

    assert "cookie" not in site.requests("/ok")[0]
    assert "cookie" not in elsewhere


def test_final_url_keeps_no_credentials(site: Site, tmp_path: Path) -> None:
    """A redirect to ``user:password@host`` does not put the password in records."""
    target = f"http://user:pw@{site.host}/ok/10?{site.token}"
    quoted = "".join(f"%{byte:02X}" for byte in target.encode())

    fetched = download(site.url(f"/to-raw/{quoted}"), tmp_path)

    assert fetched.final_url == f"http://{site.host}/ok/10?{site.token}"
