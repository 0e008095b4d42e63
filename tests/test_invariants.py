"""The invariants of ``../shared/DESIGN.md`` in every scheduler, with real parts only.

- One record per unique input, whatever the list holds (duplicates spelled
  differently, bad lines, hostile URLs), from the library and from the command line.
- The library's event stream has what the command line's ``--events`` has.
- Worker processes that keep dying end the run with ``WorkerCrashed``, and every input
  still has its record.

The full disk, read-only ``--out`` and signals are in ``test_signals.py``; single
killed workers in ``test_pipeline.py``, ``test_modes.py`` and
``test_download_procs.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from downloader import (
    EventStream,
    HttpSettings,
    ImageSpec,
    Mode,
    Stage,
    Status,
    WorkerCrashed,
    iter_results,
    run,
)
from downloader.cli import main
from downloader.demo import serve_in_thread
from downloader.report import RunReport
from downloader.runtime import Cancellation
from downloader.settings import LOCAL_MODES
from tests.helpers import (
    WAIT_S,
    LocalServer,
    corpus_urls,
    download_pids,
    fast_settings,
    leftovers,
    read_manifest,
    wait_gone,
    worker_pids,
    write_list,
)
from tests.user_transforms import kills

# The modes that transform in worker processes.
WORKER_MODES = [Mode.PROCESSES, Mode.PIPELINE, Mode.ASYNC]
# The same settings for the library and the command line (no retries: no backoff).
HTTP = HttpSettings(timeout=5, deadline=20, retries=0, backoff=0, per_host=8)
CLI_OPTIONS = [
    *("--no-progress", "--no-config", "-q", "--threads", "4", "--procs", "2"),
    *("--max-size", "64", "--timeout", "5", "--deadline", "20", "--retries", "0"),
    *("--per-host", "8"),
]
# Bounds the kills of the download-process test (it gives up after far fewer).
MAX_KILLS = 40
# Latency of the server whose download processes are killed: a request is still
# unanswered when the kill comes.
LATENCY_S = 0.3


def _port(server: LocalServer) -> int:
    port = urllib.parse.urlsplit(server.base_url).port
    assert port is not None
    return port


def _inputs(server: LocalServer, corpus: Path) -> tuple[list[str], list[str]]:
    """The list's unique inputs (as first written), then the list with duplicates."""
    good = corpus_urls(server, corpus)[:4]
    names = [url.rpartition("/")[2] for url in good]
    port = _port(server)
    unique = [
        *good[:3],
        f"http://localhost:{port}/{names[3]}",
        f"{server.base_url}/status/404",
        f"{server.base_url}/reset",
        f"{server.base_url}/loop",
        "http://127.0.0.1/nothing-listens.jpg",  # port 80: connection refused
        "not a url",
        "ftp://example.invalid/x.jpg",
        "http://exa mple.com/x.jpg",
    ]
    duplicates = [
        f"HTTP://127.0.0.1:{port}/{names[0]}",  # scheme case
        f"http://LOCALHOST:{port}/{names[3]}",  # host case
        f"{good[1]}#fragment",
        "http://127.0.0.1:80/nothing-listens.jpg",  # the default port
        f"{server.base_url}/status/404",
        "not a url",
    ]
    return unique, [*unique, *duplicates]


def _json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@dataclass(frozen=True)
class SharedRun:
    """One mode's library run and command-line run of the same list."""

    mode: Mode
    unique: list[str]
    lines: list[str]
    report: RunReport
    library_out: Path
    library_events: list[dict[str, Any]]
    cli_code: int
    cli_out: Path
    cli_events: list[dict[str, Any]]


@pytest.fixture(scope="module", params=list(Mode), ids=lambda m: m.value)
def shared(
    request: pytest.FixtureRequest,
    corpus: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> SharedRun:
    """Run the list once through ``run(..., events=EventStream)`` and once through
    ``main([... --events FILE])`` in one mode (ray: on the session's Ray)."""
    mode: Mode = request.param
    if mode is Mode.RAY:
        request.getfixturevalue("ray_cluster")
    folder = tmp_path_factory.mktemp(f"shared-{mode.value}")
    with serve_in_thread(LocalServer(corpus)) as server:
        assert isinstance(server, LocalServer)
        unique, lines = _inputs(server, corpus)
        settings = fast_settings(folder / "library", mode=mode, http=HTTP)
        with EventStream.open(folder / "library.jsonl") as stream:
            report = run(lines, settings, events=stream)
        url_list = write_list(folder / "urls.txt", lines)
        code = main(
            [
                str(url_list),
                *("--out", str(folder / "cli"), "--mode", mode.value),
                *("--events", str(folder / "cli.jsonl"), *CLI_OPTIONS),
            ]
        )
    return SharedRun(
        mode,
        unique,
        lines,
        report,
        folder / "library",
        _json_lines(folder / "library.jsonl"),
        code,
        folder / "cli",
        _json_lines(folder / "cli.jsonl"),
    )


# ------------------------------------------------------ one record per unique input


def test_one_record_per_unique_input_from_the_library(shared: SharedRun) -> None:
    """Duplicates spelled differently, bad lines, hostile URLs: one line per input."""
    records = read_manifest(shared.library_out)
    by_url = {str(r["url"]): r for r in records}

    assert sorted(by_url) == sorted(shared.unique)
    assert len(records) == len(shared.unique)
    assert sorted(o.url for o in shared.report.results) == sorted(shared.unique)
    assert [by_url[url]["status"] for url in shared.unique[:4]] == ["ok"] * 4
    assert by_url[shared.unique[4]]["error"] == "HTTP 404"
    assert by_url[shared.unique[5]]["status"] == "failed"
    assert by_url[shared.unique[5]]["stage"] == "download"
    assert by_url[shared.unique[6]]["error"] == "redirect loop"
    assert by_url[shared.unique[7]]["status"] == "failed"
    assert all("stage" not in by_url[line] for line in shared.unique[8:])
    assert all(by_url[line]["status"] == "failed" for line in shared.unique[8:])
    assert leftovers(shared.library_out) == []


def test_one_record_per_unique_input_from_the_command_line(shared: SharedRun) -> None:
    """The same list through the command line: the same records, exit 1."""
    library = {str(r["url"]): r["status"] for r in read_manifest(shared.library_out)}
    records = read_manifest(shared.cli_out)

    assert shared.cli_code == 1
    assert len(records) == len(shared.unique)
    assert {str(r["url"]): r["status"] for r in records} == library
    failed = (shared.cli_out / "failed.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(failed) == sorted(u for u, s in library.items() if s == "failed")
    assert leftovers(shared.cli_out) == []


# --------------------------------------------------- the library's events = the CLI's


def _steps(events: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """The (type, stage, index) of every started/finished line, sorted."""
    return sorted(
        (e["type"], e["stage"], e["index"])
        for e in events
        if e["type"] in {"started", "finished"}
    )


def _results(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The result lines as manifest records (without the line's type, time and
    index, which the manifest does not have)."""
    return [
        {k: v for k, v in e.items() if k not in {"type", "time", "index"}}
        for e in events
        if e["type"] == "result"
    ]


def _by_url(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(record["url"]): record for record in records}


def test_the_library_stream_has_the_kinds_of_events_of_the_command_line(
    shared: SharedRun,
) -> None:
    """run(..., events=EventStream) writes what --events writes: same kinds, counts."""
    library = Counter(e["type"] for e in shared.library_events)
    cli = Counter(e["type"] for e in shared.cli_events)

    assert library == cli
    assert {"started", "finished", "result", "summary"} <= set(cli)
    assert _steps(shared.library_events) == _steps(shared.cli_events)
    assert shared.library_events[-1]["type"] == "summary"
    assert shared.cli_events[-1]["type"] == "summary"


def test_the_library_stream_has_a_result_per_input_and_the_summary(
    shared: SharedRun,
) -> None:
    """Its result lines are the manifest's records; its summary has the CLI's fields."""
    library_results = _results(shared.library_events)
    cli_results = _results(shared.cli_events)
    library_summary = shared.library_events[-1]
    cli_summary = shared.cli_events[-1]

    assert len(library_results) == len(cli_results) == len(shared.unique)
    assert _by_url(library_results) == _by_url(read_manifest(shared.library_out))
    assert _by_url(cli_results) == _by_url(read_manifest(shared.cli_out))
    assert {(r["url"], r["status"], r.get("stage")) for r in library_results} == {
        (r["url"], r["status"], r.get("stage")) for r in cli_results
    }
    assert library_summary.keys() == cli_summary.keys()
    for key in ("counts", "total", "images", "interrupted"):
        assert library_summary[key] == cli_summary[key], key
    assert library_summary["counts"] == {"ok": 4, "failed": 7, "skipped": 0}


def test_download_lines_carry_the_bytes_received(shared: SharedRun) -> None:
    """A download's finished line has its bytes, in both streams, for the ok URLs."""

    def received(events: list[dict[str, Any]]) -> int:
        finished = [
            e
            for e in events
            if e["type"] == "finished" and e.get("stage") == Stage.DOWNLOAD.value
        ]
        assert all(isinstance(e.get("bytes"), int) for e in finished)
        return sum(e["bytes"] for e in finished)

    ok_bytes = sum(o.bytes or 0 for o in shared.report.results if o.status is Status.OK)

    assert received(shared.library_events) >= ok_bytes > 0
    assert received(shared.cli_events) >= ok_bytes


def test_ok_records_hash_and_size_the_body_served(
    shared: SharedRun, corpus: Path
) -> None:
    """Each ok record's SHA-256 and size are those of the file the server sent,
    whoever hashed it and whatever file the body was written to (``spares``)."""
    for out in (shared.library_out, shared.cli_out):
        records = [
            r for r in _json_lines(out / "manifest.jsonl") if r["status"] == "ok"
        ]
        assert len(records) == 4
        for record in records:
            served = (corpus / str(record["url"]).rsplit("/", 1)[1]).read_bytes()
            assert record["sha256"] == hashlib.sha256(served).hexdigest()
            assert record["bytes"] == len(served)


# -------------------------------------------------------- workers that keep dying


def _not_started(record: dict[str, object]) -> bool:
    return str(record["error"]).startswith(("not started (", "not started: "))


@pytest.mark.parametrize("mode", WORKER_MODES, ids=lambda m: m.value)
def test_workers_that_keep_dying_end_the_run_with_worker_crashed(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path, worker_kills: Path
) -> None:
    """Every image kills its worker: WorkerCrashed, and still a record per input."""
    urls = corpus_urls(server, corpus)[:6]
    out = tmp_path / "out"
    image = ImageSpec(max_size=64, transform="tests.user_transforms:kill_worker")

    with pytest.raises(WorkerCrashed, match="worker processes keep dying"):
        run(urls, fast_settings(out, mode=mode, procs=1, image=image))

    records = read_manifest(out)
    assert sorted(str(r["url"]) for r in records) == sorted(urls)
    crashed = [r for r in records if str(r["error"]).startswith("worker process")]
    assert crashed
    assert all(r["stage"] == "transform" for r in crashed)
    assert all(
        r["status"] == "failed"
        and (r in crashed or r["error"] == "interrupted" or _not_started(r))
        for r in records
    ), records
    assert wait_gone(kills(worker_kills)) == []
    assert worker_pids() == []
    assert leftovers(out) == []


@pytest.fixture
def slow_server(corpus: Path) -> Iterator[LocalServer]:
    """The corpus server with latency, so that a request is in flight for a while."""
    with serve_in_thread(LocalServer(corpus, latency=LATENCY_S)) as running:
        assert isinstance(running, LocalServer)
        yield running


def _requests(server: LocalServer) -> int:
    return sum(server.requests.values())


def _kill_every_downloader(
    server: LocalServer, done: threading.Event, killed: list[int]
) -> None:
    """Kill the download process behind each request the server gets, until done."""
    for arrived in range(1, MAX_KILLS + 1):

        def news(count: int = arrived) -> bool:
            return done.is_set() or _requests(server) >= count

        with server.arrivals:
            server.arrivals.wait_for(news, WAIT_S)
        if done.is_set():
            return
        for pid in download_pids(server):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(pid)


def test_download_processes_that_keep_dying_end_the_run_with_worker_crashed(
    slow_server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Download processes killed mid-request: WorkerCrashed, a record per input."""
    urls = corpus_urls(slow_server, corpus)[:8]
    out = tmp_path / "out"
    settings = fast_settings(out, threads=2, procs=1, download_procs=2)
    done = threading.Event()
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_every_downloader, args=(slow_server, done, killed)
    )
    killer.start()
    try:
        with pytest.raises(WorkerCrashed, match="download processes keep dying"):
            run(urls, settings)
    finally:
        done.set()
        with slow_server.arrivals:
            slow_server.arrivals.notify_all()
        killer.join(WAIT_S)

    records = read_manifest(out)
    assert sorted(str(r["url"]) for r in records) == sorted(urls)
    crashed = [r for r in records if str(r["error"]).startswith("download process")]
    assert crashed
    assert all(r["stage"] == "download" for r in crashed)
    assert all(
        r["status"] == "failed"
        and (r in crashed or r["error"] == "interrupted" or _not_started(r))
        for r in records
    ), records
    assert len(killed) > 2
    assert wait_gone(killed) == []
    assert worker_pids() == []
    assert leftovers(out) == []


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_urls_never_requested_are_not_started(
    corpus: Path, tmp_path: Path, mode: Mode
) -> None:
    """Stopped early: a URL the server never saw is `not started`, never `interrupted`
    (threads and processes used to call their queued jobs interrupted)."""
    with serve_in_thread(LocalServer(corpus, latency=0.3)) as served:
        assert isinstance(served, LocalServer)
        urls = corpus_urls(served, corpus)
        cancel = Cancellation()
        settings = fast_settings(tmp_path / "out", mode=mode, threads=1, procs=1)
        for _ in iter_results(urls, settings, cancel=cancel):
            cancel.set("stopped by the test")
        seen = {
            url: served.request_count(urllib.parse.urlsplit(url).path) for url in urls
        }

    records = {str(r["url"]): r for r in read_manifest(tmp_path / "out")}
    assert sorted(records) == sorted(urls)
    never = [url for url in urls if not seen[url]]
    assert len(never) > 2  # the test stopped the run early enough to mean something
    not_started = [
        url
        for url in never
        if str(records[url]["error"]).startswith(("not started (", "not started: "))
    ]
    # One worker, one job at a time: at most the job it had begun when the stop came,
    # its request not yet at the server (a loaded machine), is `interrupted`; every
    # queued one is `not started` (the old bug called them all interrupted).
    begun = [url for url in never if url not in not_started]
    assert len(begun) <= 1, [records[url] for url in begun]
    assert all(records[url]["error"] == "interrupted" for url in begun)


def test_item_timeouts_do_not_count_as_workers_dying(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """The pipeline kills a worker past --item-timeout: that item fails, the run goes
    on; it used to count as a worker dying and end the run after a few."""
    urls = corpus_urls(server, corpus)[:5]  # more than the restart budget of 1 worker
    image = ImageSpec(max_size=64, transform="tests.user_transforms:hang")
    settings = fast_settings(
        tmp_path / "out", mode=Mode.PIPELINE, procs=1, item_timeout=0.5, image=image
    )

    report = run(urls, settings)

    assert [o.error for o in report.results] == [
        "processing timed out after 0.5s (worker replaced)"
    ] * len(urls)
