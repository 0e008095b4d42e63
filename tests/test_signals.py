"""The command line under interruption, crashes, a held lock and local faults.

Runs ``python cli.py`` as a real subprocess in its own session, so signals go to its
whole process group as a terminal's Ctrl-C would, and every process it started can
be found afterwards. Each gets its own system temporary directory (``TMPDIR``), so
that what a run leaves outside ``--out`` shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from downloader.cli import main
from downloader.demo import serve_in_thread
from downloader.runtime import FALLBACK_PREFIX, MAX_SOCKET_PATH_BYTES
from downloader.settings import LOCAL_MODES, Mode
from tests.helpers import (
    WAIT_S,
    LocalServer,
    corpus_urls,
    leftovers,
    read_manifest,
    session_pids,
    wait_gone,
    write_list,
)

CLI = Path(__file__).resolve().parents[1] / "cli.py"
LATENCY_S = 0.2
# How long the tool may take to stop after a signal.
STOP_S = 8.0


@pytest.fixture
def slow_server(corpus: Path) -> Iterator[LocalServer]:
    """The corpus server with latency, so that a run is mid-flight for a while."""
    with serve_in_thread(LocalServer(corpus, latency=LATENCY_S)) as running:
        assert isinstance(running, LocalServer)
        yield running


def _command(url_list: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(CLI),
        str(url_list),
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "2",
        "--procs",
        "2",
        "--per-host",
        "2",
        "--max-size",
        "64",
        "--retries",
        "0",
        *extra,
    ]


def _start(command: list[str], system_tmp: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(system_tmp),
    )


def _env(system_tmp: Path) -> dict[str, str]:
    """The environment with ``system_tmp`` as the system's temporary directory."""
    system_tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(system_tmp)}


def _finish(process: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=WAIT_S)
        raise
    return process.returncode, stderr


def _ok_paths(out: Path) -> set[str]:
    """Server paths (``/name``) of the URLs the manifest records as ok."""
    return {
        "/" + str(r["url"]).rpartition("/")[2]
        for r in read_manifest(out)
        if r["status"] == "ok"
    }


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_signal_stops_the_run_cleanly_and_a_rerun_finishes_it(
    slow_server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    signum: signal.Signals,
    mode: Mode,
) -> None:
    """Ctrl-C/SIGTERM: exit 130 soon, a record per URL, no temp, no child; rerun: 0."""
    urls = corpus_urls(slow_server, corpus)
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"
    system_tmp = tmp_path / "system-tmp"
    command = _command(url_list, out, "--mode", mode.value)
    process = _start(command, system_tmp)
    slow_server.wait_for_requests(3)

    os.killpg(process.pid, signum)
    code, stderr = _finish(process, STOP_S)

    assert code == 130, stderr
    assert "rerun the same command" in stderr
    assert session_pids(process.pid) == []  # none left to end after the main one
    assert list(system_tmp.iterdir()) == []
    records = read_manifest(out)  # every line is complete JSON
    assert sorted(str(r["url"]) for r in records) == sorted(urls)
    cut_short = {"interrupted", f"not started (interrupted by {signum.name})"}
    assert all(r["status"] == "ok" or r["error"] in cut_short for r in records)
    assert any(str(r.get("error")).startswith("not started") for r in records)
    assert leftovers(out) == []
    assert not (out / ".tmp").exists()
    done = _ok_paths(out)
    before = {path: slow_server.request_count(path) for path in done}
    slow_server.latency = 0  # the latency was for the signal to land mid-run

    rerun = subprocess.run(
        command, capture_output=True, text=True, timeout=WAIT_S, env=_env(system_tmp)
    )

    assert rerun.returncode == 0, rerun.stderr
    assert list(system_tmp.iterdir()) == []
    assert {path: slow_server.request_count(path) for path in done} == before
    records = read_manifest(out)
    assert sorted(str(r["url"]) for r in records) == sorted(urls)
    assert {str(r["status"]) for r in records} <= {"ok", "skipped"}
    assert all((out / str(r["path"])).is_file() for r in records)
    assert leftovers(out) == []


# Runs a command as a child subreaper (prctl PR_SET_CHILD_SUBREAPER = 36): a process
# that outlives the command's main process is re-parented to it, and so is found (and
# reaped) however soon after the main process it exits. Bounded by an alarm.
_REAPER = """
import ctypes, json, os, signal, subprocess, sys
assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
signal.alarm(int(sys.argv[1]))
command = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL)
print(command.pid, flush=True)
code = command.wait()
orphans = []
while True:
    try:
        pid, _ = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    orphans.append(pid)
print(json.dumps({"code": code, "orphans": orphans}), flush=True)
"""


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_ctrl_c_ends_downloads_stalled_in_headers_or_body_in_seconds(
    server: LocalServer, tmp_path: Path, mode: Mode
) -> None:
    """Servers gone quiet before their headers and within a body, ``--timeout 60``:
    Ctrl-C ends the run in seconds (a blocked read looks at the stop flag every
    ``fetch.STOP_CHECK_S``), not when a read times out or the server lets go."""
    urls = [
        f"{server.base_url}/{route}/{n}" for route in ("silent", "mute") for n in (1, 2)
    ]
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"
    command = _command(url_list, out, "--mode", mode.value, "--timeout", "60")
    command += ["--threads", "4", "--per-host", "4"]
    process = _start(command, tmp_path / "system-tmp")
    server.wait_for_requests(1)  # a read blocked (sequential: one at a time)

    os.killpg(process.pid, signal.SIGINT)
    code, stderr = _finish(process, STOP_S)  # the server holds each for HOLD_S

    assert code == 130, stderr
    records = read_manifest(out)
    assert sorted(str(r["url"]) for r in records) == sorted(urls)
    cut_short = {"interrupted", "not started (interrupted by SIGINT)"}
    assert {r["error"] for r in records} <= cut_short, records
    assert leftovers(out) == []


@pytest.mark.parametrize(
    "signum", [None, signal.SIGINT, signal.SIGTERM], ids=["end", "INT", "TERM"]
)
def test_no_process_of_a_run_outlives_its_main_process(
    slow_server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    signum: signal.Signals | None,
) -> None:
    """End or a signal: the main process reaps forkserver and resource tracker first."""
    if signum is None:
        slow_server.latency = 0  # the latency is for a signal to land mid-run
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(slow_server, corpus))
    command = _command(url_list, tmp_path / "out")
    reaper = _start(
        [sys.executable, "-c", _REAPER, str(int(WAIT_S)), *command],
        tmp_path / "system-tmp",
    )
    assert reaper.stdout is not None
    try:
        # Plain reads: the reaper's alarm bounds them (its end is an end of file).
        main_pid = int(reaper.stdout.readline())
        if signum is not None:
            slow_server.wait_for_requests(3)
            os.kill(main_pid, signum)
        report = json.loads(reaper.stdout.readline())
    finally:
        _finish(reaper, WAIT_S)

    assert report["code"] == (0 if signum is None else 130)
    assert report["orphans"] == []


@pytest.mark.parametrize("mode", [Mode.PIPELINE, Mode.PROCESSES, Mode.ASYNC])
def test_kill_9_of_the_main_process_leaves_no_orphan_and_a_rerun_cleans_up(
    slow_server: LocalServer, corpus: Path, tmp_path: Path, mode: Mode
) -> None:
    """SIGKILL of the main process: no child lives on (pool workers included: they
    watch their parent), nothing left outside --out; the next run sweeps."""
    urls = corpus_urls(slow_server, corpus)
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"
    system_tmp = tmp_path / "system-tmp"
    command = _command(url_list, out, "--mode", mode.value)
    process = _start(command, system_tmp)
    slow_server.wait_for_requests(3)

    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=WAIT_S)

    assert process.returncode == -signal.SIGKILL
    assert wait_gone(session_pids(process.pid), timeout=10) == []
    assert list(system_tmp.iterdir()) == []
    assert (out / ".tmp" / "mp").is_dir()  # what the killed run left behind
    (out / ".tmp" / "stale.part").write_bytes(b"half a download")
    slow_server.latency = 0  # the latency was for the kill to land mid-run
    rerun = subprocess.run(
        command, capture_output=True, text=True, timeout=WAIT_S, env=_env(system_tmp)
    )

    assert rerun.returncode == 0, rerun.stderr
    assert leftovers(out) == []
    assert not (out / ".tmp").exists()
    records = read_manifest(out)
    assert sorted(str(r["url"]) for r in records) == sorted(urls)
    assert {str(r["status"]) for r in records} <= {"ok", "skipped"}


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh folder of a short path (tmp_path is too deep to hold a socket)."""
    folder = Path(tempfile.mkdtemp(prefix="dl-test-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def test_with_a_deep_out_the_socket_folder_is_swept_by_the_next_run(
    slow_server: LocalServer, corpus: Path, tmp_path: Path, short_tmp: Path
) -> None:
    """--out too deep for a socket: kill -9 leaves a temp folder; a rerun sweeps it."""
    urls = corpus_urls(slow_server, corpus)
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / ("d" * MAX_SOCKET_PATH_BYTES) / "out"
    system_tmp = short_tmp
    command = _command(url_list, out)
    process = _start(command, system_tmp)
    slow_server.wait_for_requests(3)

    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=WAIT_S)
    assert wait_gone(session_pids(process.pid), timeout=10) == []
    left = [entry.name for entry in system_tmp.iterdir()]
    slow_server.latency = 0  # the latency was for the kill to land mid-run
    rerun = subprocess.run(
        command, capture_output=True, text=True, timeout=WAIT_S, env=_env(system_tmp)
    )

    assert len(left) == 1
    assert left[0].startswith(FALLBACK_PREFIX)
    assert rerun.returncode == 0, rerun.stderr
    assert list(system_tmp.iterdir()) == []
    assert {str(r["status"]) for r in read_manifest(out)} <= {"ok", "skipped"}


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_worker_processes_that_cannot_start_end_the_run_with_every_record(
    server: LocalServer, corpus: Path, tmp_path: Path, mode: Mode
) -> None:
    """--out and TMPDIR both too deep for the forkserver's socket: a mode with worker
    processes exits 1 without a traceback (the pipeline, whose downloads begin while
    its workers start, names the cause); every URL has its one record."""
    urls = corpus_urls(server, corpus)[:4]
    url_list = write_list(tmp_path / "urls.txt", urls)
    system_tmp = tmp_path / ("d" * MAX_SOCKET_PATH_BYTES)
    out = system_tmp / "out"
    command = _command(url_list, out, "--mode", mode.value)

    done = subprocess.run(
        command, capture_output=True, text=True, timeout=WAIT_S, env=_env(system_tmp)
    )

    workers = mode in {Mode.PIPELINE, Mode.PROCESSES, Mode.ASYNC}
    assert done.returncode == (1 if workers else 0), done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(str(r["url"]) for r in read_manifest(out)) == sorted(urls)
    assert leftovers(out) == []
    assert sorted(p.name for p in system_tmp.iterdir()) == ["out"]
    if mode is Mode.PIPELINE:
        last = done.stderr.splitlines()[-1]
        assert last.startswith("error: cannot start worker processes: "), last
        assert "AF_UNIX path too long" in last


def _read_line(process: subprocess.Popen[str]) -> str:
    """The next line of the process's stdout, waiting at most ``WAIT_S``."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], WAIT_S)
    assert ready, "no output in time"
    return process.stdout.readline()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_signal_while_the_list_is_opened_exits_130(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """A FIFO list with no writer yet: a signal ends the wait with 130 and one line."""
    fifo = tmp_path / "urls.txt"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    system_tmp = tmp_path / "system-tmp"
    process = _start(_command(fifo, out, "--events", "-"), system_tmp)
    # The start event comes just before the list is opened, after the handlers.
    assert json.loads(_read_line(process))["type"] == "start"

    os.killpg(process.pid, signum)
    code, stderr = _finish(process, STOP_S)

    assert code == 130, stderr
    assert stderr.splitlines() == [f"interrupted by {signum.name}"]
    assert session_pids(process.pid) == []
    assert list(system_tmp.iterdir()) == []


def test_a_second_run_on_the_same_out_is_refused(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """While another process holds the lock, a run exits 3 and fetches nothing."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:2])
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys\n"
            "f = open(sys.argv[1], 'ab')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
            str(out / ".lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"

        code = main([str(url_list), "--out", str(out), "--no-progress"])
    finally:
        holder.communicate(input="", timeout=WAIT_S)

    assert code == 3
    assert "another run is using" in capsys.readouterr().err
    assert server.request_count() == 0
    assert not (out / "manifest.jsonl").exists()
    assert main([str(url_list), "--out", str(out), "--no-progress"]) == 0


@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    """Mount a tmpfs at ``where`` for the block (tests run as root)."""
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        check=True,
        timeout=WAIT_S,
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True, timeout=WAIT_S)


# What the records of the URLs never reached say when the disk filled up.
NOT_STARTED_BY_A_FULL_DISK = re.compile(r"not started \(.*No space left on device\)")


def _records_in(out: Path) -> list[dict[str, Any]]:
    """Parse every line of the manifest in ``out`` (none if there is no manifest)."""
    manifest = out / "manifest.jsonl"
    if not manifest.exists():
        return []
    return [json.loads(line) for line in manifest.read_text().splitlines()]


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_a_full_disk_stops_the_run_with_exit_3_and_a_true_manifest(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mode: Mode,
) -> None:
    """A 2.5 MB body on a 256 KiB filesystem: exit 3, a clear error, a record per input.

    The URL that filled the disk fails with the reason; those before it are ok (or
    cut short), those after it are ``not started``, as after Ctrl-C.
    """
    small = corpus_urls(server, corpus)[:7]
    big = f"{server.base_url}/big-unsized"
    urls = [*small[:3], big, *small[3:]]
    url_list = write_list(tmp_path / "urls.txt", urls)

    with _tmpfs(tmp_path / "disk", "size=256k") as disk:
        out = disk / "out"
        options = [
            "--no-progress",
            "--mode",
            mode.value,
            "--threads",
            "1",
            "--procs",
            "1",
            "--max-size",
            "64",
        ]
        code = main([str(url_list), "--out", str(out), *options])
        err = capsys.readouterr().err
        records = _records_in(out)  # every line is complete JSON
        left = leftovers(out)
        for record in records:
            if record["status"] == "ok":
                with Image.open(out / record["path"]) as image:
                    image.load()

    assert code == 3
    assert "No space left on device" in err
    assert sorted(r["url"] for r in records) == sorted(urls)
    by_url = {r["url"]: r for r in records}
    assert "No space left on device" in by_url[big]["error"]
    assert by_url[big]["status"] == "failed"
    others = [r for url, r in by_url.items() if url != big]
    assert all(
        r["status"] == "ok"
        or r["error"] == "interrupted"
        or NOT_STARTED_BY_A_FULL_DISK.fullmatch(r["error"])
        for r in others
    ), others
    assert any(
        NOT_STARTED_BY_A_FULL_DISK.fullmatch(str(r.get("error"))) for r in others
    )
    assert left == []


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_a_read_only_output_folder_is_exit_3(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mode: Mode,
) -> None:
    """An --out on a read-only mount fails at once with exit 3; nothing is fetched."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:2])

    with _tmpfs(tmp_path / "ro", "ro,size=64k") as read_only:
        out = read_only / "out"
        options = ["--no-progress", "--mode", mode.value]
        code = main([str(url_list), "--out", str(out), *options])

    assert code == 3
    assert "Read-only file system" in capsys.readouterr().err
    assert server.request_count() == 0


def test_an_output_folder_under_a_file_is_exit_3(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An --out whose parent is a regular file fails with exit 3 and says why."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:2])
    (tmp_path / "file").write_text("not a folder")

    code = main([str(url_list), "--out", str(tmp_path / "file" / "out")])

    assert code == 3
    assert "Not a directory" in capsys.readouterr().err
    assert server.request_count() == 0
