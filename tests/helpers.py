"""Test helpers: the local server with misbehaving routes, settings, process checks."""

from __future__ import annotations

import json
import os
import re
import select
import threading
from pathlib import Path

from downloader.demo import CorpusHandler, CorpusServer
from downloader.settings import HttpSettings, ImageSpec, Settings

CORPUS_SIZE = 12
# A flat 8000x6000 PNG: ~150 KB on the wire but ~0.3 s to decode, so a test can act
# on a worker while it is busy with it.
SLOW_IMAGE = "slow.png"
SLOW_IMAGE_SIZE = (8000, 6000)
WAIT_S = 30.0


class LocalHandler(CorpusHandler):
    """The corpus server plus a few misbehaving routes."""

    def do_GET(self) -> None:
        """Route special paths, else serve the corpus."""
        path = self.request_path()
        status = re.fullmatch(r"/status/(\d{3})", path)
        if status:
            self.count_request()
            self.send_bytes(int(status.group(1)), b"nope\n", "text/plain")
        elif path == "/html":
            self.count_request()
            self.send_bytes(200, b"<html><body>404</body></html>", "text/html")
        else:
            super().do_GET()

    def count_request(self) -> None:
        """Count the request and wake anyone waiting for a number of requests."""
        super().count_request()
        server = self.server
        assert isinstance(server, LocalServer)
        with server.arrivals:
            server.arrivals.notify_all()


class LocalServer(CorpusServer):
    """A corpus server whose tests can wait for requests to arrive."""

    def __init__(self, corpus: Path, *, latency: float = 0.0) -> None:
        super().__init__(corpus, latency=latency, handler=LocalHandler)
        self.arrivals = threading.Condition(self.lock)

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
