"""Test helpers: the local server with misbehaving routes, settings, process checks."""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import functools
import gzip
import json
import os
import select
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

from downloader.demo import CorpusHandler, CorpusServer
from downloader.settings import HttpSettings, ImageSpec, Settings

CORPUS_SIZE = 12
# A flat 8000x6000 PNG: ~150 KB on the wire but ~0.3 s to decode, so a test can act
# on a worker while it is busy with it.
SLOW_IMAGE = "slow.png"
SLOW_IMAGE_SIZE = (8000, 6000)
# A small one-colour PNG: the image that the worker-killing transforms of
# ``tests.user_transforms`` pick out (named to sort after the others, see /named).
FLAT_IMAGE = "tiny-flat.png"
WAIT_S = 30.0
# Misbehaving routes hold a connection at most this long (or until the server closes).
HOLD_S = 10.0
# The slow drip sends one byte per this many seconds.
DRIP_S = 0.05
# Size of the oversized bodies (tests set --max-bytes far below it).
BIG_BODY = 2_500_000
# Zeros that the gzip bomb inflates to (about 20 KB on the wire).
BOMB_BYTES = 20_000_000
# The body of /noise: no image format's signature, and not text.
NOISE = bytes(range(256)) * 4
# Seconds a 429 asks the client to wait (tests cap the wait with max_backoff).
RETRY_AFTER_S = 2


@functools.cache
def gzip_bomb() -> bytes:
    """A small gzip stream that inflates to ``BOMB_BYTES`` zeros."""
    return gzip.compress(b"\0" * BOMB_BYTES, compresslevel=9)


class LocalHandler(CorpusHandler):
    """The corpus server plus misbehaving routes, each bounded in time.

    ``/status/NNN``, ``/html``; ``/noise/...`` (binary bytes that are no image,
    labelled image/jpeg: they pass the download and fail in a worker);
    ``/flaky/N/NAME`` (503 N times, then NAME);
    ``/retry-after/seconds|date/NAME`` (one 429, then NAME); ``/reset`` (RST mid-body);
    ``/short`` (Content-Length 1000, 100 bytes); ``/silent`` (headers, then nothing);
    ``/mute`` (nothing at all, not even a status line);
    ``/drip`` (a byte every ``DRIP_S``); ``/chunked-cut``; ``/big`` and
    ``/big-unsized`` (``BIG_BODY`` bytes with and without a Content-Length);
    ``/gzip-bomb``; ``/redirect/N/NAME`` (a chain of N hops to NAME); ``/loop``;
    ``/location/QUOTED`` (a redirect to any Location, percent-encoded in the path);
    ``/to-file``; ``/to-ftp``; ``/relative/NAME`` (``Location: ../NAME``);
    ``/disposition/dotdot|absolute/NAME``; ``/named/...`` (any path: the first file
    of the corpus); ``/empty`` (a 200 with no body); ``/overrun/NAME`` (NAME, then
    bytes past its Content-Length).
    """

    def do_GET(self) -> None:
        """Route special paths, else serve the corpus."""
        path = self.request_path()
        head, _, rest = path.removeprefix("/").partition("/")
        route = self.ROUTES.get(head)
        server = self.server
        assert isinstance(server, LocalServer)
        with server.lock:
            server.request_headers.append(
                {name.lower(): value for name, value in self.headers.items()}
            )
        with server.tracking(path):
            if route is None:
                super().do_GET()
            else:
                self.count_request()
                route(self, rest)

    def _status(self, rest: str) -> None:
        self.send_bytes(int(rest), b"nope\n", "text/plain")

    def _html(self, rest: str) -> None:
        self.send_bytes(200, b"<html><body>404</body></html>", "text/html")

    def _noise(self, rest: str) -> None:
        self.send_bytes(200, NOISE, "image/jpeg")

    def _corpus_file(self, name: str) -> None:
        path = self.server.corpus / name
        if "/" in name or not path.is_file():
            self.send_bytes(404, b"not found\n", "text/plain")
        else:
            self.send_file(path)

    def _flaky(self, rest: str) -> None:
        failures, _, name = rest.partition("/")
        if self.server.request_count(self.request_path()) <= int(failures):
            self.send_bytes(503, b"busy\n", "text/plain")
        else:
            self._corpus_file(name)

    def _retry_after(self, rest: str) -> None:
        form, _, name = rest.partition("/")
        if self.server.request_count(self.request_path()) > 1:
            self._corpus_file(name)
            return
        if form == "date":
            value = email.utils.formatdate(time.time() + RETRY_AFTER_S, usegmt=True)
        else:
            value = str(RETRY_AFTER_S)
        self.send_response(429)
        self.send_header("Retry-After", value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _start(self, length: int | None, **headers: str) -> None:
        """Send a 200's headers; no Content-Length (close-delimited) if ``length``
        is None."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", headers.pop("content_type", "image/jpeg"))
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.flush()

    def _reset(self, rest: str) -> None:
        self._start(100_000)
        self.wfile.write(b"\xff" * 5000)
        self.wfile.flush()
        # Linger 0: closing sends RST instead of FIN.
        self.connection.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        os.close(self.connection.detach())

    def _short(self, rest: str) -> None:
        self._start(1000)
        self.wfile.write(b"\xff" * 100)

    def _silent(self, rest: str) -> None:
        self._start(1000)
        self._hold(HOLD_S)

    def _mute(self, rest: str) -> None:
        self._hold(HOLD_S)  # not even a status line

    def _hold(self, seconds: float) -> bool:
        """Wait ``seconds`` unless the server closes; True if it is closing."""
        server = self.server
        assert isinstance(server, LocalServer)
        return server.closing.wait(seconds)

    def _drip(self, rest: str) -> None:
        self._start(1000)
        for _ in range(1000):
            try:
                self.wfile.write(b"\xff")
                self.wfile.flush()
            except OSError:
                return
            if self._hold(DRIP_S):
                return

    def _chunked_cut(self, rest: str) -> None:
        self._start(None, Transfer_Encoding="chunked")
        self.wfile.write(b"5\r\nhello\r\n")

    def _big(self, rest: str, *, sized: bool = True) -> None:
        self._start(BIG_BODY if sized else None)
        block = b"\xff" * 65536
        sent = 0
        try:
            while sent < BIG_BODY:
                self.wfile.write(block[: BIG_BODY - sent])
                sent += len(block)
        except OSError:
            return  # the client hung up, as it should

    def _big_unsized(self, rest: str) -> None:
        self._big(rest, sized=False)

    def _gzip_bomb(self, rest: str) -> None:
        body = gzip_bomb()
        self._start(len(body), Content_Encoding="gzip")
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def _redirect_to(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _redirect(self, rest: str) -> None:
        hops, _, name = rest.partition("/")
        if int(hops) == 0:
            self._corpus_file(name)
        else:
            self._redirect_to(f"/redirect/{int(hops) - 1}/{name}")

    def _loop(self, rest: str) -> None:
        self._redirect_to("/loop")

    def _location(self, rest: str) -> None:
        # Any Location at all (the path is percent-decoded): javascript:, a bad port…
        self._redirect_to(rest)

    def _to_file(self, rest: str) -> None:
        self._redirect_to("file:///etc/passwd")

    def _to_ftp(self, rest: str) -> None:
        self._redirect_to("ftp://127.0.0.1/x.jpg")

    def _relative(self, rest: str) -> None:
        self._redirect_to(f"../{rest}")

    def _disposition(self, rest: str) -> None:
        kind, _, name = rest.partition("/")
        filename = "../../evil.jpg" if kind == "dotdot" else "/evil-absolute.jpg"
        data = (self.server.corpus / name).read_bytes()
        self._start(len(data), Content_Disposition=f'attachment; filename="{filename}"')
        self.wfile.write(data)

    def _named(self, rest: str) -> None:
        first = min(p for p in self.server.corpus.iterdir() if p.is_file())
        self.send_file(first)

    def _empty(self, rest: str) -> None:
        self.send_bytes(200, b"", "image/jpeg")

    def _overrun(self, rest: str) -> None:
        # /overrun/NAME: NAME, then bytes past its Content-Length in the same write,
        # on a connection kept open.
        data = (self.server.corpus / rest).read_bytes()
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
            + b"JUNKJUNKJUNK"
        )
        self.wfile.flush()

    def _robots(self, rest: str) -> None:
        # /robots/VALUE/NAME: NAME with "X-Robots-Tag: VALUE" (VALUE percent-encoded
        # in the path; "|" separates several headers).
        value, _, name = rest.rpartition("/")
        data = (self.server.corpus / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        for one in value.split("|"):
            self.send_header("X-Robots-Tag", one)
        self.end_headers()
        self.wfile.write(data)

    ROUTES: ClassVar[dict[str, Callable[[LocalHandler, str], None]]] = {
        "status": _status,
        "html": _html,
        "noise": _noise,
        "flaky": _flaky,
        "retry-after": _retry_after,
        "reset": _reset,
        "short": _short,
        "silent": _silent,
        "mute": _mute,
        "drip": _drip,
        "chunked-cut": _chunked_cut,
        "big": _big,
        "big-unsized": _big_unsized,
        "gzip-bomb": _gzip_bomb,
        "redirect": _redirect,
        "loop": _loop,
        "location": _location,
        "to-file": _to_file,
        "to-ftp": _to_ftp,
        "relative": _relative,
        "disposition": _disposition,
        "named": _named,
        "empty": _empty,
        "overrun": _overrun,
        "robots": _robots,
    }

    def count_request(self) -> None:
        """Count the request and wake anyone waiting for a number of requests."""
        super().count_request()
        server = self.server
        assert isinstance(server, LocalServer)
        with server.arrivals:
            server.arrivals.notify_all()


class LocalServer(CorpusServer):
    """A corpus server whose tests can wait for requests to arrive."""

    # socketserver's default backlog of 5 drops the SYNs of a burst of connections, and
    # a dropped SYN is retried only after 1 s: longer than the tests' connect timeouts.
    request_queue_size = 128

    def __init__(self, corpus: Path, *, latency: float = 0.0) -> None:
        super().__init__(corpus, latency=latency, handler=LocalHandler)
        self.arrivals = threading.Condition(self.lock)
        self.closing = threading.Event()
        self.active = 0
        self.max_active = 0
        self.log: list[tuple[str, float]] = []
        """(path, arrival time) of every request, in order."""
        self.request_headers: list[dict[str, str]] = []
        """The headers (names lowercased) of every request, in order."""

    @contextlib.contextmanager
    def tracking(self, path: str) -> Iterator[None]:
        """Log the request and count it as active while it is being answered."""
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.log.append((path, time.monotonic()))
        try:
            yield
        finally:
            with self.lock:
                self.active -= 1

    def server_close(self) -> None:
        """Release handlers that hold their connection, then close."""
        self.closing.set()
        super().server_close()

    def wait_for_requests(self, count: int, timeout: float = WAIT_S) -> None:
        """Block until at least ``count`` requests arrived (fails after ``timeout``)."""
        with self.arrivals:
            arrived = self.arrivals.wait_for(
                lambda: sum(self.requests.values()) >= count, timeout
            )
        assert arrived, f"fewer than {count} requests within {timeout} s"


def corpus_urls(server: CorpusServer, corpus: Path) -> list[str]:
    """URLs of the generated images (not the slow PNG), sorted."""
    names = sorted(p.name for p in corpus.glob("img-*"))
    return [server.url_for(name) for name in names]


def write_list(path: Path, urls: list[str]) -> Path:
    """Write a URL list file."""
    path.write_text("".join(url + "\n" for url in urls), encoding="utf-8")
    return path


class LoggedResolver:
    """A resolver for ``HttpSettings.resolver`` that answers from a table, never DNS.

    ``answers`` maps a name to the answers of its successive lookups (the last one
    repeats); a name with no answers does not resolve. Every lookup is appended to
    ``log`` (a file, under a lock), so lookups are counted, and numbered, across the
    processes of a run: picklable, it travels to them with the settings.
    """

    def __init__(self, log: Path, answers: dict[str, list[list[str]]]) -> None:
        self.log = log
        self.answers = answers

    def __call__(self, host: str, port: int) -> list[str]:
        with open(self.log, "a+", encoding="utf-8") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            file.seek(0)
            earlier = file.read().splitlines().count(host)
            file.write(host + "\n")
        answers = self.answers.get(host)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[min(earlier, len(answers) - 1)]

    def lookups(self) -> list[str]:
        """Every name looked up so far, in order."""
        if not self.log.exists():
            return []
        return self.log.read_text(encoding="utf-8").splitlines()


def block_127_0_0_2(address: str) -> str | None:
    """A ``block_policy`` for tests: refuse 127.0.0.2 only, so 127.0.0.1 (where the
    test servers listen) stays reachable."""
    return "test-internal" if address == "127.0.0.2" else None


def block_127_0_0_1(address: str) -> str | None:
    """A ``block_policy`` that refuses 127.0.0.1 only (a test proxy's address)."""
    return "test-internal" if address == "127.0.0.1" else None


def fast_settings(out: Path, **overrides: object) -> Settings:
    """Settings for tests: small images, short timeouts, no backoff."""
    values: dict[str, object] = {
        "out": out,
        "threads": 4,
        "procs": 2,
        "http": HttpSettings(timeout=5, deadline=20, retries=1, backoff=0, per_host=8),
        "image": ImageSpec(max_size=64),
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def read_manifest(out: Path) -> list[dict[str, object]]:
    """Parse every line of ``out/manifest.jsonl``."""
    text = (out / "manifest.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def leftovers(out: Path) -> list[Path]:
    """Temporary files left anywhere under ``out``."""
    return [
        p
        for p in out.rglob("*")
        if p.is_file() and (".tmp" in p.parts or p.suffix in {".part", ".tmp"})
    ]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after its last ')'.
    return text[text.rindex(")") + 2 :].split()


def session_pids(session: int) -> list[int]:
    """Live (non-zombie) processes of the given session id."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and fields[0] != "Z" and int(fields[3]) == session:
                pids.append(int(entry))
    return pids


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children, grandchildren, ...)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def worker_pids() -> list[int]:
    """PIDs of this test process's worker processes (forkserver grandchildren)."""
    me = os.getpid()
    result = []
    for pid in descendants(me):
        fields = _stat_fields(pid)
        if fields and int(fields[1]) != me:  # not a direct child: forked by forkserver
            result.append(pid)
    return result


def wait_gone(pids: list[int], timeout: float = WAIT_S) -> list[int]:
    """Wait (on pidfds, no polling) until ``pids`` exit; return those still alive."""
    handles = {}
    for pid in pids:
        try:
            handles[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    try:
        remaining = dict(handles)
        deadline = timeout
        while remaining and deadline > 0:
            ready, _, _ = select.select(list(remaining), [], [], deadline)
            if not ready:
                break
            for fd in ready:
                remaining.pop(fd)
        return sorted(remaining.values())
    finally:
        for fd in handles:
            os.close(fd)


def _port(server: LocalServer) -> int:
    port = urllib.parse.urlsplit(server.base_url).port
    assert port is not None
    return port


def _tcp_inodes_to(port: int) -> set[str]:
    """Socket inodes of this network namespace's TCP connections to ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[2].rpartition(":")[2], 16) == port:
                    inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{name}")
                if target.startswith("socket:["):
                    inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    return inodes


def download_pids(server: LocalServer) -> list[int]:
    """Worker processes of this test connected to ``server``: the download ones.

    Download processes and transform workers are both forkserver grandchildren of
    the test process; only a download process holds a TCP socket connected to the
    test server's port.
    """
    connected = _tcp_inodes_to(_port(server))
    return [pid for pid in worker_pids() if _socket_inodes(pid) & connected]
