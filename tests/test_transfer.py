"""Mid-body rules (``downloader/transfer.py``) against a misbehaving server on
127.0.0.1: stalls, early refusal of what is not an image, continuing a cut body.

Every test counts what the server saw (requests, the bytes it managed to send, the
range headers it got) and the attempts and reason of the result; none measures time.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import select
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from pathlib import Path

import httpx
import pytest
from PIL import Image

from downloader import Mode, Stage, Status, run
from downloader.errors import FetchError
from downloader.fetch import (
    HostLimiter,
    RetryLater,
    fetch,
    make_client,
)
from downloader.records import Fetched
from downloader.settings import LOCAL_MODES, HttpSettings
from downloader.transfer import (
    SNIFF_BYTES,
    STALL_RETRIES,
    Partial,
    partial_for,
    refusal,
)
from tests.helpers import fast_settings, leftovers
from tests.test_fetch import failure_by as failure_with_driver
from tests.test_fetch import fetch_by as fetch_with_driver
from tests.test_fetch import make_job

HTTP = HttpSettings(
    timeout=0.5,
    deadline=8.0,
    retries=3,
    backoff=0,
    max_backoff=0.1,
    max_bytes=100_000_000,
    per_host=4,
    min_speed=1000,
)
"""Four attempts allowed, a 0.5 s stall window, and a deadline far beyond it."""

WAIT = 15.0
"""Seconds any wait of a test may last before the test fails instead."""

BODY = random.Random(7).randbytes(400_000)
"""A body without any signature: neither an image nor text; the worker would judge."""
PAGE = b"<!DOCTYPE html>\n<html><body>\n" + b"<p>Sign in to see this.</p>\n" * 900_000
"""An HTML page of about 25 MB: far more than the socket buffers hold (about 3 MB
of it got out before the client hung up, here)."""
ETAG, NEW_ETAG = '"v1"', '"v2"'
LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"
DRIP_S = 0.05
"""The drip routes send a byte per this many seconds: 20 B/s, below min_speed."""
_keys = count()


def _photo() -> bytes:
    noise = Image.effect_noise((320, 240), 80).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


PHOTO = _photo()


def client_gone(connection: socket.socket, seconds: float) -> bool:
    """Wait up to ``seconds``; True if the client closed (or wrote) meanwhile."""
    readable, _, _ = select.select([connection], [], [], seconds)
    return bool(readable)


class Server(ThreadingHTTPServer):
    """Logs each request's headers and the body bytes each answer got out."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Condition()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.sent: list[tuple[str, int]] = []
        self.counts: Counter[str] = Counter()

    def url(self, path: str) -> str:
        """An absolute URL of ``path``, made unique to the caller by a query."""
        return f"http://127.0.0.1:{self.server_address[1]}{path}?k={next(_keys)}"

    def headers_of(self, url: str) -> list[dict[str, str]]:
        """The headers of every request for ``url``, in order."""
        target = url.partition(str(self.server_address[1]))[2]
        with self.lock:
            return [headers for path, headers in self.requests if path == target]

    def sent_for(self, url: str, answers: int) -> list[int]:
        """The body bytes sent by each answer for ``url``, once ``answers`` ended."""
        target = url.partition(str(self.server_address[1]))[2]

        def done() -> list[int]:
            return [n for path, n in self.sent if path == target]

        with self.lock:
            assert self.lock.wait_for(lambda: len(done()) >= answers, WAIT)
            return done()


class Handler(BaseHTTPRequestHandler):
    """``/<route>/<args>``: see each ``route_*``."""

    protocol_version = "HTTP/1.1"
    timeout = WAIT
    server: Server

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""

    def do_GET(self) -> None:
        """Log the request, then answer it by its first path segment."""
        headers = {name.lower(): value for name, value in self.headers.items()}
        with self.server.lock:
            self.server.requests.append((self.path, headers))
            self.server.counts[self.path] += 1
            self.nth = self.server.counts[self.path]
        name, *args = self.path.partition("?")[0].strip("/").split("/")
        getattr(self, f"route_{name.replace('-', '_')}")(*args)

    def start(self, status: int, length: int | None, **headers: str) -> None:
        self.send_response(status)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()

    def send(self, data: bytes) -> int:
        """Write ``data`` in blocks until done or the client hangs up; note the
        bytes that got out (into the socket's buffers at least)."""
        sent = 0
        try:
            for at in range(0, len(data), 65536):
                block = data[at : at + 65536]
                self.wfile.write(block)
                sent += len(block)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        with self.server.lock:
            self.server.sent.append((self.path, sent))
            self.server.lock.notify_all()
        return sent

    def drip(self, data: bytes) -> None:
        """Send ``data`` a byte per ``DRIP_S`` until the client hangs up."""
        sent = 0
        for byte in data:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                break
            sent += 1
            if client_gone(self.connection, DRIP_S):
                break
        self.close_connection = True
        with self.server.lock:
            self.server.sent.append((self.path, sent))
            self.server.lock.notify_all()

    def route_drip(self) -> None:
        """Headers, then a byte per ``DRIP_S``: a stall below min_speed."""
        self.start(200, len(BODY))
        self.drip(BODY)

    def route_mute(self) -> None:
        """No answer at all until the client leaves."""
        client_gone(self.connection, WAIT)
        self.close_connection = True

    def route_hush(self) -> None:
        """Headers and 100 bytes, then nothing until the client leaves."""
        self.start(200, len(BODY))
        self.send(BODY[:100])
        client_gone(self.connection, WAIT)
        self.close_connection = True

    def label(self, parts: tuple[str, ...]) -> dict[str, str]:
        """The Content-Type named by the path's segments (``-``: none)."""
        content_type = "/".join(parts)
        return {} if content_type == "-" else {"Content_Type": content_type}

    def route_page(self, *label: str) -> None:
        """A 25 MB HTML page, labelled as the rest of the path says."""
        self.start(200, len(PAGE), **self.label(label))
        self.send(PAGE)

    def route_typed(self, *args: str) -> None:
        """``/typed/LABEL/KIND``: a body of ``kind`` (photo, html, json, svg, noise)
        labelled ``LABEL``."""
        *label, kind = args
        bodies = {
            "photo": PHOTO,
            "html": b"<html><body>404</body></html>",
            "json": b'{"error": "not found"}',
            "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="8"/>',
            "noise": BODY[:5000],
        }
        self.start(200, len(bodies[kind]), **self.label(tuple(label)))
        self.send(bodies[kind])

    def route_cut(self, variant: str, name: str) -> None:
        """The first answer offers ranges, sends half the body and hangs up (or, for
        ``stall``, goes quiet). Later ones, by ``variant``: ``etag``, ``dated`` and
        ``stall`` honour ``Range`` under ``If-Range``; ``ignore`` sends it all again;
        ``changed`` has a new body and ETag; ``bad-range`` answers its first range
        request from the wrong byte, ``unsatisfiable`` with a 416; ``weak`` has
        only a weak ETag (``weak-dated``: and a Last-Modified); ``always`` cuts every
        answer. These answer a range request with a 206 that is not the rest of this
        body: ``other-total`` the tail of a longer body, ``longer`` the rest plus
        more bytes in a longer range, ``star`` an unknown complete length (``/*``),
        ``chunked`` the right range with no Content-Length, chunked, plus junk."""
        body = PHOTO if name == "photo" else BODY
        weak = 'W/"v1"'
        validator = {"dated": LAST_MODIFIED, "weak": weak, "weak-dated": weak}.get(
            variant, ETAG
        )
        field = "Last-Modified" if variant == "dated" else "ETag"
        offer = {"Accept_Ranges": "bytes", field.replace("-", "_"): validator}
        if variant == "weak-dated":
            offer["Last_Modified"] = LAST_MODIFIED
        if self.nth == 1 or variant == "always":
            self.start(200, len(body), Content_Type="image/jpeg", **offer)
            self.send(body[: len(body) // 2])
            if variant == "stall":
                client_gone(self.connection, WAIT)
            self.close_connection = True
            return
        if variant == "changed":
            body, validator = body[::-1], NEW_ETAG
            offer["ETag"] = validator
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if variant == "unsatisfiable" and wanted is not None:
            self.start(416, 0, Content_Range=f"bytes */{len(body)}")
            return
        fresh = self.headers.get("If-Range") == validator
        if variant == "ignore" or wanted is None or not fresh:
            self.start(200, len(body), Content_Type="image/jpeg", **offer)
            self.send(body)
            return
        first = 0 if variant == "bad-range" and self.nth == 2 else int(wanted[1])
        if variant in SPLICES:
            self.splice(variant, body, first, offer)
            return
        last = len(body) - 1
        self.start(
            206,
            len(body) - first,
            Content_Type="image/jpeg",
            Content_Range=f"bytes {first}-{last}/{len(body)}",
            **offer,
        )
        self.send(body[first:])

    def splice(
        self, variant: str, body: bytes, first: int, offer: dict[str, str]
    ) -> None:
        """A 206 from byte ``first`` that is not the rest of ``body``."""
        if variant == "chunked":
            rest = body[first:] + b"junk" * 1000
            self.start(
                206,
                None,
                Content_Type="image/jpeg",
                Content_Range=f"bytes {first}-{len(body) - 1}/{len(body)}",
                Transfer_Encoding="chunked",
                **offer,
            )
            self.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
            return
        other = body + BODY[:1000] if variant == "longer" else BODY[::-1] * 2
        total = "*" if variant == "star" else str(len(other))
        self.start(
            206,
            len(other) - first,
            Content_Type="image/jpeg",
            Content_Range=f"bytes {first}-{len(other) - 1}/{total}",
            **offer,
        )
        self.send(other[first:])


SPLICES = ("other-total", "longer", "star", "chunked")
"""``route_cut`` variants whose 206 would splice two bodies if taken."""


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
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


DRIVERS = ["sync", "async"]


def fetch_by(driver: str, url: str, tmp_dir: Path) -> Fetched:
    """``tests.test_fetch.fetch_by`` with this file's settings."""
    return fetch_with_driver(driver, url, tmp_dir, HTTP)


def failure_by(driver: str, url: str, tmp_dir: Path) -> FetchError:
    """``tests.test_fetch.failure_by`` with this file's settings."""
    return failure_with_driver(driver, url, tmp_dir, HTTP)


def deferred(
    url: str, tmp_dir: Path, client: httpx.Client, http: HttpSettings
) -> Callable[[int, RetryLater | None], Fetched]:
    """Fetch as the pipeline does: a retry comes back as RetryLater, and the next
    call goes on from it (its attempts and its state)."""

    def call(attempts: int, later: RetryLater | None) -> Fetched:
        return fetch(
            make_job(url),
            client,
            http,
            tmp_dir,
            cancel=threading.Event(),
            hosts=HostLimiter(http.per_host),
            defer_retries=True,
            attempts_done=attempts,
            state=None if later is None else later.state,
        )

    return call


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- 1. stalls


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_dripping_body_is_cut_after_timeout_and_retried_once(
    server: Server, tmp_path: Path, driver: str
) -> None:
    """20 B/s is below min_speed over the --timeout window (0.5 s, not 30 s): cut,
    retried once (a stall's budget), then failed, though retries allow four."""
    url = server.url("/drip")
    error = failure_by(driver, url, tmp_path)

    assert re.fullmatch(r"too slow: \d+ B/s for 0\.5s after 2 attempts", error.reason)
    assert error.attempts == STALL_RETRIES + 1 == 2
    sent = server.sent_for(url, 2)
    assert len(sent) == 2
    assert all(0 < n < len(BODY) // 100 for n in sent)


@pytest.mark.parametrize("driver", DRIVERS)
def test_headers_then_silence_is_a_stall(
    server: Server, tmp_path: Path, driver: str
) -> None:
    """A body that stops after 100 bytes times out after --timeout and is retried
    once, not --retries times."""
    url = server.url("/hush")
    error = failure_by(driver, url, tmp_path)

    assert error.reason == "read timeout (0.5s) after 2 attempts"
    assert error.attempts == 2
    assert server.sent_for(url, 2) == [100, 100]


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_server_that_never_answers_is_a_stall_too(
    server: Server, tmp_path: Path, driver: str
) -> None:
    """Connected, but not even a status line for --timeout: the same budget."""
    url = server.url("/mute")
    error = failure_by(driver, url, tmp_path)

    assert error.reason == "read timeout (0.5s) after 2 attempts"
    assert len(server.headers_of(url)) == 2


def test_a_stall_retry_waiting_in_a_scheduler_keeps_its_budget(
    server: Server, tmp_path: Path
) -> None:
    """With deferred retries (the pipeline's), the stall count travels with the
    RetryLater: the call after the wait fails at its first stall."""
    http = replace(HTTP, backoff=0.05)
    url = server.url("/hush")
    with make_client(http, threads=2) as client:
        call = deferred(url, tmp_path, client, http)
        with pytest.raises(RetryLater) as first:
            call(0, None)
        assert first.value.state.stalls == 1
        with pytest.raises(FetchError) as last:
            call(first.value.attempts, first.value)

    assert last.value.reason == "read timeout (0.5s) after 2 attempts"
    assert len(server.headers_of(url)) == 2
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------- 3. early refusal


REFUSALS = [
    ("text/html; charset=utf-8", b"<!DOCTYPE html><html>", "server sent text/html"),
    ("application/json", b'{"error": 1}', "server sent application/json"),
    ("application/problem+json", b'{"a": 1}', "server sent application/problem+json"),
    ("image/jpeg", b"<html>oops</html>", "the body is text"),
    ("application/octet-stream", b"  \n<html lang=de>B\xc3\xbccher", "body is text"),
    (None, b"Access denied.\r\n", "the body is text"),
    ("application/pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3", "server sent application/pdf"),
    ("image/svg+xml", b"<svg xmlns='x'/>", "unsupported image format: SVG"),
]
PASSES = [
    ("application/octet-stream", b"\xff\xd8\xff\xe0\x00\x10JFIF"),
    ("binary/octet-stream", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    (None, b"GIF89a\x01\x00\x01\x00\x80\x00\x00"),
    ("text/html", b"RIFF\x24\x00\x00\x00WEBPVP8 "),
    ("text/plain", b"BM\x36\x00\x0c\x00\x00\x00\x00\x00\x36\x00"),
    ("application/json", b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00"),
    ("application/octet-stream", random.Random(1).randbytes(SNIFF_BYTES)),
    ("image/jpeg", b"\xff\xff\xff\xff"),
    ("", b""),
]


@pytest.mark.parametrize(("content_type", "head", "words"), REFUSALS)
def test_refusal_names_the_label_or_the_text(
    content_type: str | None, head: bytes, words: str
) -> None:
    """A label that is clearly not an image, or a body that reads as text, is
    refused with the reason; the start of the body is quoted."""
    reason = refusal(content_type, head)

    assert reason is not None
    assert words in reason


@pytest.mark.parametrize(("content_type", "head"), PASSES)
def test_image_signatures_win_over_wrong_labels(
    content_type: str | None, head: bytes
) -> None:
    """An image signature passes whatever the label; unknown binary data under a
    vague or image label is left to the worker."""
    assert refusal(content_type, head) is None


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize(
    ("label", "reason"),
    [
        ("text/html", "not an image: server sent text/html"),
        ("-", "not an image: the body is text"),
        ("image/jpeg", "not an image: the body is text"),
    ],
)
def test_an_html_page_is_refused_after_its_first_bytes(
    server: Server, tmp_path: Path, driver: str, label: str, reason: str
) -> None:
    """The 25 MB page is not downloaded: the client hangs up after its first read,
    so the server gets out a small part of it; one attempt, never retried."""
    url = server.url(f"/page/{label}")
    error = failure_by(driver, url, tmp_path)

    assert error.reason.startswith(reason)
    assert "'<!DOCTYPE html>'" in error.reason
    assert error.attempts == 1
    [sent] = server.sent_for(url, 1)
    assert sent < len(PAGE) // 3


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize(
    ("label", "kind", "reason"),
    [
        ("application/octet-stream", "photo", None),
        ("binary/octet-stream", "photo", None),
        ("-", "photo", None),
        ("text/html", "photo", None),
        ("application/octet-stream", "noise", None),
        ("image/jpeg", "html", "not an image: the body is text"),
        ("application/json", "json", "not an image: server sent application/json"),
        ("image/svg+xml", "svg", "unsupported image format: SVG"),
    ],
)
def test_labels_and_first_bytes_decide_together(
    server: Server,
    tmp_path: Path,
    driver: str,
    label: str,
    kind: str,
    reason: str | None,
) -> None:
    """Wrongly labelled images come through whole; short text bodies (judged at
    their end) are refused, once."""
    url = server.url(f"/typed/{label}/{kind}")
    if reason is None:
        fetched = fetch_by(driver, url, tmp_path)
        assert fetched.attempts == 1
        assert fetched.nbytes == server.sent_for(url, 1)[0]
    else:
        error = failure_by(driver, url, tmp_path)
        assert error.reason.startswith(reason)
        assert error.attempts == 1
        assert len(server.headers_of(url)) == 1


# ------------------------------------------------------ 5. continuing a cut body


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("variant", ["etag", "dated", "stall"])
def test_a_cut_body_continues_with_a_range_request(
    server: Server, tmp_path: Path, driver: str, variant: str
) -> None:
    """Cut (or stalled) after half the body, the retry asks only for the rest, under
    If-Range: the server sends the body once in all, and the file is the body."""
    url = server.url(f"/cut/{variant}/noise")
    fetched = fetch_by(driver, url, tmp_path)

    assert fetched.sha256 == sha256(BODY)
    assert fetched.path.read_bytes() == BODY
    assert (fetched.nbytes, fetched.attempts) == (len(BODY), 2)
    assert sum(server.sent_for(url, 2)) == len(BODY)
    first, second = server.headers_of(url)
    assert "range" not in first
    assert second["range"] == f"bytes={len(BODY) // 2}-"
    assert second["if-range"] == (LAST_MODIFIED if variant == "dated" else ETAG)
    assert list(tmp_path.iterdir()) == [fetched.path]


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize(
    ("variant", "expected", "requests"),
    [
        ("ignore", BODY, 2),  # range ignored: the whole body again, in a 200
        ("changed", BODY[::-1], 2),  # validator changed: the new body, in a 200
        ("bad-range", BODY, 3),  # a 206 from the wrong byte: dropped, then whole
        ("unsatisfiable", BODY, 3),  # a 416: dropped, then whole
        # 206s that are not the rest of this body: dropped, then whole
        *((variant, BODY, 3) for variant in SPLICES),
    ],
)
def test_a_server_that_does_not_continue_gets_a_whole_download(
    server: Server,
    tmp_path: Path,
    driver: str,
    variant: str,
    expected: bytes,
    requests: int,
) -> None:
    """Whatever the server does with the range request, the file is one whole body
    as the server last sent it, never a splice of two."""
    url = server.url(f"/cut/{variant}/noise")
    fetched = fetch_by(driver, url, tmp_path)

    assert fetched.path.read_bytes() == expected
    assert fetched.sha256 == sha256(expected)
    assert fetched.attempts == requests
    assert server.headers_of(url)[1]["range"] == f"bytes={len(BODY) // 2}-"
    assert len(server.headers_of(url)) == requests
    if requests == 3:  # the partial file was dropped: the last asks for it all
        assert "range" not in server.headers_of(url)[-1]


@pytest.mark.parametrize(
    ("headers", "partial"),
    [
        ({"Accept-Ranges": "bytes", "ETag": ETAG}, Partial("http://h/x", ETAG)),
        (
            {"Accept-Ranges": "Bytes", "Last-Modified": LAST_MODIFIED},
            Partial("http://h/x", LAST_MODIFIED),
        ),
        (
            {"Accept-Ranges": "bytes", "ETag": ETAG, "Content-Length": "99"},
            Partial("http://h/x", ETAG, 99),
        ),
        (
            {"Accept-Ranges": "Bytes", "ETag": 'W/"1"', "Last-Modified": LAST_MODIFIED},
            None,
        ),
        ({"Accept-Ranges": "bytes", "ETag": 'W/"1"'}, None),
        ({"Accept-Ranges": "none", "ETag": ETAG}, None),
        ({"ETag": ETAG}, None),
        ({"Accept-Ranges": "bytes", "ETag": ETAG, "Content-Encoding": "gzip"}, None),
    ],
)
def test_what_may_be_continued(
    headers: dict[str, str], partial: Partial | None
) -> None:
    """Byte ranges offered, no content coding, and a strong validator: a strong
    ETag, or Last-Modified when there is no ETag (never with a weak one)."""
    response = httpx.Response(
        200, headers=headers, request=httpx.Request("GET", "http://h/x")
    )

    assert partial_for(response) == partial


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("variant", ["weak", "weak-dated"])
def test_a_weak_etag_is_no_ground_to_continue(
    server: Server, tmp_path: Path, driver: str, variant: str
) -> None:
    """If-Range takes no weak ETag, nor a date from a client that has an ETag
    (RFC 9110, 13.1.5): the retry downloads the whole body, without Range."""
    url = server.url(f"/cut/{variant}/noise")
    fetched = fetch_by(driver, url, tmp_path)

    assert fetched.path.read_bytes() == BODY
    assert fetched.sha256 == sha256(BODY)
    assert sum(server.sent_for(url, 2)) == len(BODY) + len(BODY) // 2
    sent = server.headers_of(url)
    assert [("range" in h, "if-range" in h) for h in sent] == [(False, False)] * 2


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_body_cut_every_time_leaves_nothing(
    server: Server, tmp_path: Path, driver: str
) -> None:
    """Each retry continues (and is cut again); when the retries run out the
    partial file goes with the failure."""
    url = server.url("/cut/always/noise")
    error = failure_by(driver, url, tmp_path)

    assert error.reason.startswith("connection closed early")
    assert error.reason.endswith("after 4 attempts")
    assert len(server.headers_of(url)) == 4


def test_a_deferred_retry_continues_the_partial_body(
    server: Server, tmp_path: Path
) -> None:
    """With deferred retries the partial file waits on disk with the RetryLater,
    and the next call asks only for the rest."""
    http = replace(HTTP, backoff=0.05)
    url = server.url("/cut/etag/noise")
    with make_client(http, threads=2) as client:
        call = deferred(url, tmp_path, client, http)
        with pytest.raises(RetryLater) as first:
            call(0, None)
        assert (tmp_path / "item.part").stat().st_size == len(BODY) // 2
        fetched = call(first.value.attempts, first.value)

    assert fetched.sha256 == sha256(BODY)
    assert sum(server.sent_for(url, 2)) == len(BODY)


# ------------------------------------------------------- end to end, every mode


def run_one(url: str, out: Path, mode: Mode) -> tuple[Status, dict[str, object]]:
    http = HttpSettings(
        timeout=5, deadline=20, retries=2, backoff=0.05, max_backoff=0.1, per_host=8
    )
    report = run([url], fast_settings(out, mode=mode, threads=2, http=http))
    [outcome] = report.results
    assert leftovers(out) == []
    return outcome.status, {
        "stage": outcome.stage,
        "error": outcome.error,
        "attempts": outcome.attempts,
        "sha256": outcome.sha256,
        "path": outcome.path,
    }


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_every_mode_refuses_a_page_early(
    server: Server, tmp_path: Path, mode: Mode
) -> None:
    """The page fails in the download stage with the reason, after one request, and
    the server got out only a small part of it."""
    url = server.url("/page/text/html")
    status, record = run_one(url, tmp_path / "out", mode)

    assert status is Status.FAILED
    assert record["stage"] is Stage.DOWNLOAD
    assert record["error"] == (
        "not an image: server sent text/html (starts with '<!DOCTYPE html>')"
    )
    assert record["attempts"] == 1
    [sent] = server.sent_for(url, 1)
    assert sent < len(PAGE) // 3


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_every_mode_continues_a_cut_photo(
    server: Server, tmp_path: Path, mode: Mode
) -> None:
    """A photo cut mid-way is continued with a range request (the pipeline's retry
    waits in its heap meanwhile): ok, the body sent once in all, its hash whole."""
    url = server.url("/cut/etag/photo")
    status, record = run_one(url, tmp_path / "out", mode)

    assert status is Status.OK, record
    assert record["sha256"] == sha256(PHOTO)
    assert record["attempts"] == 2
    assert sum(server.sent_for(url, 2)) == len(PHOTO)
    assert (tmp_path / "out" / str(record["path"])).is_file()
