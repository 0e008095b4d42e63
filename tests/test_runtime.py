"""Run-wide plumbing: signals for a whole command, and a run's helper processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing.context import ForkServerContext, SpawnContext
from pathlib import Path

import pytest

from downloader.api import run
from downloader.children import mp_context
from downloader.cli import main
from downloader.records import Status
from downloader.report import RunReport
from downloader.runtime import (
    FALLBACK_PREFIX,
    MAX_SOCKET_PATH_BYTES,
    Cancellation,
    helper_processes,
    interrupt_on_signals,
    stop_helper_processes,
)
from downloader.settings import Mode
from tests.helpers import (
    WAIT_S,
    LocalServer,
    corpus_urls,
    descendants,
    fast_settings,
    write_list,
)

# The modes whose runs start worker processes (through the forkserver).
WORKER_MODES = [Mode.PROCESSES, Mode.PIPELINE, Mode.ASYNC]
POLL_S = 0.01
"""How often a test looks for a helper process it waits for."""


def _forkservers() -> list[int]:
    """This process's live forkservers (children running multiprocessing's)."""
    found = []
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):  # it may have just exited
            if (
                b"multiprocessing.forkserver"
                in Path(f"/proc/{pid}/cmdline").read_bytes()
            ):
                found.append(pid)
    return found


def _start_child(context: ForkServerContext | SpawnContext) -> None:
    """Start a trivial child through ``context`` and wait for it."""
    child = context.Process(target=os.getpid)
    child.start()
    child.join(WAIT_S)
    assert child.exitcode == 0


def _sockets(folder: Path) -> list[str]:
    return [entry.name[: len("listener-")] for entry in folder.iterdir()]


@pytest.fixture
def no_forkserver() -> None:
    """Start with no forkserver (an earlier test may have started one outside a run)."""
    stop_helper_processes()
    assert _forkservers() == []


@pytest.fixture
def short_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh folder of a short path as the system's temporary directory."""
    folder = Path(tempfile.mkdtemp(prefix="dl-test-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.mark.usefixtures("no_forkserver")
@pytest.mark.parametrize("mode", WORKER_MODES, ids=lambda m: m.value)
def test_a_run_stops_the_forkserver_it_started(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """After run() returns, no forkserver of the run is left, nor its socket folder.

    In every mode with worker processes: the suite's other in-process runs use the
    forkserver that ``warm_forkserver`` (tests/conftest.py) starts outside them."""
    urls = corpus_urls(server, corpus)[:2]
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"

    report = run(url_list, fast_settings(out, mode=mode))

    assert [r.status for r in report.results] == [Status.OK, Status.OK]
    assert _forkservers() == []
    assert not (out / ".tmp").exists()


@pytest.mark.parametrize("mode", WORKER_MODES, ids=lambda m: m.value)
def test_the_command_in_process_leaves_the_callers_forkserver(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """``main()`` called from Python while a forkserver runs (the caller's, started
    outside any run): its run uses it and ``main()`` leaves it running, as ``run()``
    does. It used to stop it at its end: a fresh start for the caller's next worker
    (most of the suite's in-process command lines' time)."""
    _start_child(mp_context())  # the caller's forkserver, started outside any run
    before = _forkservers()
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:2])
    argv = [str(url_list), "--out", str(tmp_path / "out"), "--mode", mode.value]

    code = main([*argv, "--max-size", "64", "--no-progress", "--quiet"])

    assert code == 0
    assert len(before) == 1
    assert _forkservers() == before


def _first_forkserver(thread: threading.Thread) -> int | None:
    """The forkserver that appears while ``thread`` runs, polled (bounded)."""
    deadline = time.monotonic() + WAIT_S
    while thread.is_alive() and time.monotonic() < deadline:
        found = _forkservers()
        if found:
            return found[0]
        time.sleep(POLL_S)
    return None


@pytest.mark.usefixtures("no_forkserver")
@pytest.mark.parametrize("end", ["list ends", "cancelled"])
def test_the_forkserver_starts_with_the_folder_and_stops_unused(
    end: str, tmp_path: Path
) -> None:
    """A processes run starts the forkserver once its folder is taken, before its
    first job reaches a worker (its start-up overlaps the run's). When the run then
    ends with nothing to do (its list had nothing; a stop), it stops and reaps that
    forkserver all the same (at once: it started no worker), and leaves no socket."""
    release = threading.Event()
    cancel = Cancellation()
    reports: list[RunReport] = []

    def nothing_until_released() -> Iterator[str]:
        release.wait(WAIT_S)
        yield from ()

    def go() -> None:
        settings = fast_settings(tmp_path / "out", mode=Mode.PROCESSES)
        reports.append(run(nothing_until_released(), settings, cancel=cancel))

    thread = threading.Thread(target=go)
    thread.start()
    try:
        forkserver = _first_forkserver(thread)
    finally:
        if end == "cancelled":
            cancel.set()
        release.set()
        thread.join(WAIT_S)

    assert forkserver is not None
    assert not thread.is_alive()
    assert [r.results for r in reports] == [()]
    assert _forkservers() == []
    with pytest.raises(ChildProcessError):
        os.waitpid(forkserver, os.WNOHANG)  # reaped: not even a zombie is left
    assert not (tmp_path / "out" / ".tmp").exists()


@pytest.mark.usefixtures("no_forkserver")
@pytest.mark.parametrize("mode", [Mode.SEQUENTIAL, Mode.THREADS], ids=lambda m: m.value)
def test_a_mode_without_workers_starts_no_forkserver(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Sequential and threads runs start no helper process at all."""
    urls = corpus_urls(server, corpus)[:1]
    forkservers: list[list[int]] = []

    def note(event: object) -> None:
        forkservers.append(_forkservers())

    report = run(urls, fast_settings(tmp_path / "out", mode=mode), events=note)

    assert [r.status for r in report.results] == [Status.OK]
    assert forkservers
    assert all(found == [] for found in forkservers)


@pytest.mark.usefixtures("no_forkserver")
def test_overlapping_runs_hand_the_forkserver_over(tmp_path: Path) -> None:
    """Overlapping runs share the forkserver; it moves when its run ends first."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    context = mp_context()
    first_run, second_run = helper_processes(first), helper_processes(second)

    first_run.__enter__()
    try:
        _start_child(context)
        in_first = _sockets(first / "mp")
        second_run.__enter__()
    finally:
        first_run.__exit__(None, None, None)
    try:
        first_left = (first / "mp").exists()
        _start_child(context)
        in_second = _sockets(second / "mp")
    finally:
        second_run.__exit__(None, None, None)

    assert in_first == ["listener-"]
    assert not first_left
    assert in_second == ["listener-"]
    assert not (second / "mp").exists()
    assert _forkservers() == []


@pytest.mark.usefixtures("no_forkserver")
def test_a_scratch_too_deep_for_a_socket_uses_a_swept_temporary_folder(
    tmp_path: Path, short_tmp: Path
) -> None:
    """Too deep: a locked temporary folder; unlocked ones swept, locked ones kept."""
    deep = tmp_path / ("d" * MAX_SOCKET_PATH_BYTES)
    deep.mkdir()
    stale = short_tmp / f"{FALLBACK_PREFIX}stale"
    stale.mkdir()
    (stale / "lock").touch()
    live = short_tmp / f"{FALLBACK_PREFIX}live"
    live.mkdir()
    context = mp_context()

    with open(live / "lock", "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with helper_processes(deep):
            _start_child(context)
            during = {entry.name for entry in short_tmp.iterdir()} - {live.name}
            inside = {name: sorted(_sockets(short_tmp / name)) for name in during}
        after = sorted(entry.name for entry in short_tmp.iterdir())

    assert len(during) == 1  # the stale one is gone, this run's is there
    (mine,) = during
    assert mine.startswith(FALLBACK_PREFIX)
    assert inside[mine] == ["listener-", "lock"]
    assert after == [live.name]
    assert not (deep / "mp").exists()
    assert _forkservers() == []


def test_a_signal_raises_while_armed_and_is_only_noted_outside() -> None:
    """Outside ``armed`` a signal is noted; entering ``armed`` then raises at once."""
    before = signal.getsignal(signal.SIGTERM)

    with interrupt_on_signals() as interrupts:
        signal.raise_signal(signal.SIGTERM)
        noted = interrupts.received
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"), interrupts.armed():
            pass

    assert noted is signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_while_armed_raises_keyboard_interrupt() -> None:
    """Inside ``armed`` SIGTERM interrupts like Ctrl-C does, naming the signal."""
    with (
        interrupt_on_signals() as interrupts,
        pytest.raises(KeyboardInterrupt, match="interrupted by SIGTERM"),
        interrupts.armed(),
    ):
        signal.raise_signal(signal.SIGTERM)
