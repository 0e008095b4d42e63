"""The pipeline with its download threads in several processes (``--download-procs``).

To tell a download process from a transform worker (both are forkserver grandchildren
of the test process), the tests look at open connections (``helpers.download_pids``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from downloader import (
    Cancellation,
    EventKind,
    ProgressEvent,
    Settings,
    Stage,
    Status,
    iter_results,
    run,
)
from downloader.cli import load_settings
from downloader.demo import serve_in_thread
from downloader.errors import InputError
from downloader.progress import EventLog
from tests.helpers import (
    WAIT_S,
    LocalServer,
    corpus_urls,
    download_pids,
    fast_settings,
    leftovers,
    read_manifest,
    session_pids,
    wait_gone,
    worker_pids,
    write_list,
)

CLI = Path(__file__).resolve().parents[1] / "cli.py"
# Long enough that a request is still unanswered when a test acts on its process.
LATENCY_S = 0.3
# How long the tool may take to stop after Ctrl-C.
STOP_S = 8.0
# Manifest fields that are timings, which differ from run to run.
TIMINGS = {"download_s", "transform_s"}


@pytest.fixture
def slow_server(corpus: Path) -> Iterator[LocalServer]:
    """The corpus server with latency, so that downloads are in flight for a while."""
    with serve_in_thread(LocalServer(corpus, latency=LATENCY_S)) as running:
        assert isinstance(running, LocalServer)
        yield running


def _comparable(out: Path) -> list[dict[str, object]]:
    records = [
        {key: value for key, value in record.items() if key not in TIMINGS}
        for record in read_manifest(out)
    ]
    return sorted(records, key=lambda record: str(record["url"]))


def test_settings_pick_one_download_process_per_4_workers() -> None:
    """Automatic: 1 below 8 workers, procs // 4 above, at most threads; 0 refused."""
    assert Settings(procs=2).download_processes == 1
    assert Settings(procs=7).download_processes == 1
    assert Settings(procs=8).download_processes == 2
    assert Settings(procs=16, threads=16).download_processes == 4
    assert Settings(procs=64, threads=4).download_processes == 4
    assert Settings(procs=2, download_procs=3).download_processes == 3
    with pytest.raises(InputError, match="--download-procs must be an integer from 1"):
        Settings(download_procs=0)


def test_the_config_key_and_flag_set_download_procs(tmp_path: Path) -> None:
    """``download-procs`` in a config file (the flag's name) reaches the settings."""
    config = tmp_path / "downloader.toml"
    config.write_text("download-procs = 3\n", encoding="utf-8")

    settings = load_settings(config)

    assert settings.download_procs == 3


def test_two_download_processes_give_the_same_records_and_images(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Same ok records and byte-identical outputs as one; both processes download."""
    urls = corpus_urls(server, corpus)
    events: list[ProgressEvent] = []  # only the main loop calls the sink

    one = run(urls, fast_settings(tmp_path / "one", download_procs=1))
    two = run(
        urls, fast_settings(tmp_path / "two", download_procs=2), events=events.append
    )

    assert [o.status for o in two.results] == [Status.OK] * len(urls)
    assert _comparable(tmp_path / "two") == _comparable(tmp_path / "one")
    for record in read_manifest(tmp_path / "one"):
        name = str(record["path"])
        assert (tmp_path / "two" / name).read_bytes() == (
            tmp_path / "one" / name
        ).read_bytes()
    download_lanes = {e.lane for e in events if e.stage is Stage.DOWNLOAD}
    assert {lane.split("/")[0] for lane in download_lanes} == {"dl-0", "dl-1"}
    received = sum(e.nbytes for e in events if e.kind is EventKind.BYTES)
    assert received == sum(o.bytes or 0 for o in one.results)
    assert two.summary.images == one.summary.images == len(urls)
    assert leftovers(tmp_path / "two") == []
    assert worker_pids() == []


def test_failures_and_passthrough_records_come_through(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Bad lines, HTTP errors and non-images fail alone, with the usual reasons."""
    good = corpus_urls(server, corpus)[:3]
    lines = [
        *good,
        "ftp://example.invalid/x.jpg",
        "not a url",
        f"{server.base_url}/status/404",
        f"{server.base_url}/noise",
    ]
    out = tmp_path / "out"

    report = run(lines, fast_settings(out, download_procs=2))

    by_url = {o.url: o for o in report.results}
    assert len(report.results) == len(read_manifest(out)) == len(lines)
    assert all(by_url[url].status is Status.OK for url in good)
    assert "unsupported scheme" in str(by_url["ftp://example.invalid/x.jpg"].error)
    assert by_url["not a url"].status is Status.FAILED
    assert by_url[f"{server.base_url}/status/404"].error == "HTTP 404"
    noise = by_url[f"{server.base_url}/noise"]
    assert noise.stage is Stage.TRANSFORM
    assert str(noise.error).startswith("not an image (starts with bytes 00 01")
    assert leftovers(out) == []


def test_a_rerun_skips_what_is_done(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A second run with download processes fetches nothing already ok."""
    urls = corpus_urls(server, corpus)[:5]
    out = tmp_path / "out"
    run(urls, fast_settings(out, download_procs=2))
    first = server.request_count()

    again = run([*urls, f"{server.base_url}/status/500"], fast_settings(out))
    forced = run(urls, fast_settings(out, download_procs=2, force=True))

    assert first == len(urls)
    assert [o.status for o in again.results].count(Status.SKIPPED) == len(urls)
    assert [o.status for o in forced.results] == [Status.OK] * len(urls)
    assert server.request_count() == first + 2 + len(urls)  # 500: one retry


def test_a_killed_download_process_is_replaced_and_its_jobs_retried(
    slow_server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """SIGKILL of a download process mid-request: it is replaced, nothing is lost."""
    urls = corpus_urls(slow_server, corpus)[:6]
    killed: list[int] = []
    log = EventLog()

    def kill_a_downloader(event: ProgressEvent) -> None:
        log(event)
        started = event.stage is Stage.DOWNLOAD and event.kind is EventKind.STARTED
        if started and not killed:
            slow_server.wait_for_requests(1)
            pid = download_pids(slow_server)[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            slow_server.latency = 0  # the latency was for the kill to land mid-request

    settings = fast_settings(tmp_path / "out", threads=4, download_procs=2)
    report = run(urls, settings, events=kill_a_downloader)

    assert len(killed) == 1
    assert wait_gone(killed) == []
    assert [o.status for o in report.results] == [Status.OK] * len(urls)
    assert slow_server.request_count() > len(urls)  # the cut-short ones again
    processes = {e.lane.split("/")[0] for e in log.events if e.stage is Stage.DOWNLOAD}
    assert "dl-2" in processes  # the replacement
    assert leftovers(tmp_path / "out") == []


def test_a_job_that_loses_two_download_processes_fails_with_a_reason(
    slow_server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Its download process killed twice: failed after one retry; the run ends."""
    urls = corpus_urls(slow_server, corpus)[:1]
    killed: list[int] = []

    def kill_its_downloader(event: ProgressEvent) -> None:
        started = event.stage is Stage.DOWNLOAD and event.kind is EventKind.STARTED
        if started and len(killed) < 2:
            slow_server.wait_for_requests(len(killed) + 1)
            (pid,) = download_pids(slow_server)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    settings = fast_settings(tmp_path / "out", threads=2, download_procs=2)
    report = run(urls, settings, events=kill_its_downloader)

    (outcome,) = report.results
    assert len(killed) == 2
    assert outcome.status is Status.FAILED
    assert outcome.stage is Stage.DOWNLOAD
    assert outcome.error == (
        "download process crashed (killed by SIGKILL); retried once"
    )
    assert wait_gone(killed) == []
    assert leftovers(tmp_path / "out") == []


def test_cancelling_leaves_no_temp_files_and_no_processes(
    slow_server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Cancel mid-run: every URL has a record, no temp file, no process is left."""
    urls = corpus_urls(slow_server, corpus)
    cancel = Cancellation()
    out = tmp_path / "out"
    seen = []
    settings = fast_settings(out, threads=4, download_procs=2)

    for outcome in iter_results(urls, settings, cancel=cancel):
        seen.append(outcome)
        cancel.set()

    assert sorted(o.url for o in seen) == sorted(urls)
    assert len(read_manifest(out)) == len(urls)
    cut_short = {"interrupted", "not started (interrupted)"}
    assert all(o.status is Status.OK or o.error in cut_short for o in seen)
    assert any(o.error == "interrupted" for o in seen)
    assert leftovers(out) == []
    assert worker_pids() == []


def test_ctrl_c_stops_the_download_processes_cleanly(
    slow_server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Ctrl-C to the whole group: exit 130, a record per URL, no temp, no process."""
    urls = corpus_urls(slow_server, corpus)
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(CLI),
        str(url_list),
        *("--out", str(out), "--no-progress", "--threads", "4", "--procs", "2"),
        *("--download-procs", "2", "--per-host", "4", "--max-size", "64"),
    ]
    process = subprocess.Popen(
        command,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        slow_server.wait_for_requests(3)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=STOP_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=WAIT_S)

    assert process.returncode == 130, stderr
    assert wait_gone(session_pids(process.pid)) == []
    records = read_manifest(out)
    assert sorted(str(r["url"]) for r in records) == sorted(urls)
    cut_short = {"interrupted", "not started (interrupted by SIGINT)"}
    assert all(r["status"] == "ok" or r["error"] in cut_short for r in records)
    assert leftovers(out) == []
    assert not (out / ".tmp").exists()


def test_a_download_process_stops_when_its_jobs_run_out(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """More download processes than jobs: the run still ends, every process gone."""
    urls = corpus_urls(server, corpus)[:1]

    report = run(urls, fast_settings(tmp_path / "out", threads=3, download_procs=3))

    assert [o.status for o in report.results] == [Status.OK]
    assert worker_pids() == []
