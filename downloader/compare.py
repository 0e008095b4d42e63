"""Run several modes on the same list, each in a fresh process of its own; measure each.

::

    compare(source, settings, modes)                    the caller
      for each mode: run_mode() ─ spawn ─► a fresh process (never the caller)
                     _TreeSampler ◄─ /proc   │ iter_results(list, settings with mode,
                     (it + its descendants,  │              out=OUT/<mode>, force)
                      every 0.1 s)           ├─ EventLog     → timeline spans
                                             ├─ Tally, Usage → wall s, images/s, CPU s
                                             ├─ SHA-256 of every output image
                     ModeResult ◄── Pipe ────┘─ its own VmHWM → peak of "main"
      → report.Comparison → comparison.json + comparison.png in OUT

Every mode is measured under the same conditions: each runs in a new interpreter
(``spawn``), so no mode inherits the heap, threads, imports or forkserver that another
left, and the order of the modes changes none of a mode's figures beyond noise. The
caller only waits and samples; its own memory (a demo server, a notebook's data) is in
no mode's figures. A first Ctrl-C or SIGTERM (or ``cancel``) closes the mode's stop
line: it stops in order, as a run does, and its result is kept; the modes after it are
not run. A mode whose process dies or whose workers crash gets its error in its row, and
the next mode runs. A local fault in a mode (a full disk: ``OutputError``) stops the
comparison and is raised here, as a run raises it (exit 3).

Nothing is written outside OUT: a symbolic link at ``comparison.json`` /
``comparison.png`` (or anything there but a file), at ``OUT/<mode>`` (or anything there
but a folder), or at a name a mode's run writes in it (its ``OutputFolder`` is entered
once for each mode up front) stops the comparison before any mode runs, with an
``OutputError`` (exit 3) naming it; each mode's folder is checked again just before its
run. The two files are written through ``manifest.write_file``: a new temporary file
in OUT, renamed over the name, never through a link. The picture is drawn in memory, so
no scratch folder is made (those that older versions left when killed are swept).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from types import TracebackType
from typing import IO, TextIO

from downloader.api import Source, iter_results
from downloader.children import ChildFault, StopLine, child_process
from downloader.errors import InputError, OutputError, WorkerCrashed
from downloader.manifest import OutputFolder, refuse_link, write_file
from downloader.progress import EventKind, EventLog, ProgressEvent
from downloader.records import Stage, Status
from downloader.report import (
    Comparison,
    MemoryPeak,
    ModeResult,
    Span,
    Tally,
    comparison_json,
    comparison_png,
)
from downloader.runtime import Cancellation, Usage, Wakeup, cancel_on_signals
from downloader.settings import LOCAL_MODES, Mode, Settings
from downloader.sources import InputFormat, LocalFiles, UrlList, reads_once

__all__ = ["DEFAULT_MODES", "compare", "gil_enabled", "run_mode"]

DEFAULT_MODES: tuple[Mode, ...] = LOCAL_MODES
"""Every mode but ``ray`` (an optional extra that starts a cluster; ask for it with
``--modes``), sequential first (it is the speed-up baseline)."""
# Often enough to catch a worker's peak between two images, rarely enough to cost
# nothing measurable (one /proc read per process per sample).
SAMPLE_INTERVAL_S = 0.1
JSON_NAME = "comparison.json"
PNG_NAME = "comparison.png"
# The prefix of the scratch folders older versions drew the picture in.
_OLD_SCRATCH_PREFIX = ".comparison-"
# How long a mode's process may take to end once it has sent its result, or once told
# to stop at once (a second Ctrl-C); then it is killed. Its own run has already ended.
MODE_EXIT_S = 10.0
# Descendants of a mode's process this deep at most are counted (mode → forkserver →
# worker is 2); a bound on the walk, never reached by this tool's processes.
_MAX_DEPTH = 4
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_HASH_CHUNK = 1024 * 1024
_KIB = 1024
_MB = 1e6


def gil_enabled() -> bool:
    """Ask the interpreter whether the GIL is on (always, before 3.13)."""
    check = getattr(sys, "_is_gil_enabled", None)
    return True if check is None else bool(check())


def compare(
    source: Source,
    settings: Settings,
    modes: Sequence[Mode] = DEFAULT_MODES,
    *,
    cancel: Cancellation | None = None,
    log: IO[str] | None = None,
) -> Comparison:
    """Run each of ``modes`` on ``source`` into ``settings.out/<mode>``; compare them.

    Writes ``comparison.json`` and ``comparison.png`` into ``settings.out``.

    Raises:
        OutputError: a link (or the wrong kind of entry) at one of those names or at
            a mode's folder, checked before any mode runs; a local fault in a mode's
            run (a full disk), which stops the comparison; or the two files cannot be
            written.
    """
    for name in (JSON_NAME, PNG_NAME):
        refuse_link(settings.out / name)
    runs = [_mode_settings(settings, mode) for mode in modes]
    for run in runs:
        # What each run checks at its start (links and wrong kinds of entry at the
        # names it writes, its lock), done for every mode before the first runs.
        with OutputFolder.for_settings(run):
            pass
    _sweep_old_scratch(settings.out)
    replayable = _replayable(source)
    cancel = cancel or Cancellation()
    results = []
    with cancel_on_signals(cancel), _ray_if_asked(settings, modes, log) as joining:
        for mode in modes:
            if cancel.is_set():
                break
            if log is not None:
                log.write(f"compare: running {mode.value}...\n")
            results.append(run_mode(replayable, joining, mode, cancel=cancel))
    comparison = Comparison(
        results=tuple(results), gil_enabled=gil_enabled(), cores=os.cpu_count() or 1
    )
    try:
        settings.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        message = f"cannot create output folder {settings.out}: {exc.strerror or exc}"
        raise OutputError(message) from exc
    text = json.dumps(comparison_json(comparison), indent=1) + "\n"
    write_file(settings.out, JSON_NAME, [text.encode()])
    if results:
        write_file(settings.out, PNG_NAME, [comparison_png(comparison)])
    return comparison


@contextlib.contextmanager
def _ray_if_asked(
    settings: Settings, modes: Sequence[Mode], log: IO[str] | None = None
) -> Iterator[Settings]:
    """With ``ray`` among ``modes``, start (or join) Ray for the block, before any
    mode runs, so that its start-up is in no row (it is said on ``log``); yield the
    settings that join it (``ray_address``: its address), else ``settings``.

    A mode's process joins before its clock starts (``_mode_process``), so the ray
    row holds neither the start nor the joining, as a warm cluster would.
    """
    if Mode.RAY not in modes:
        yield settings
        return
    from downloader.ray_mode import connected  # the optional extra

    started = time.perf_counter()
    with connected(settings) as ray:
        if log is not None:
            seconds = time.perf_counter() - started
            log.write(f"compare: Ray ready in {seconds:.1f} s (not timed below)\n")
        yield replace(settings, ray_address=ray.get_runtime_context().gcs_address)


def _sweep_old_scratch(out: Path) -> None:
    """Remove the ``.comparison-*`` folders older versions drew in and, killed, left.

    This version draws in memory and makes none, so any found is a leftover.
    """
    with contextlib.suppress(OSError):
        for entry in out.iterdir():
            if entry.name.startswith(_OLD_SCRATCH_PREFIX):
                with contextlib.suppress(OSError):
                    if stat.S_ISDIR(entry.lstat().st_mode):  # never through a link
                        shutil.rmtree(entry)


def _replayable(source: Source) -> Source:
    """A source that can be read once per mode: a path, or the lines kept in a list."""
    if isinstance(source, LocalFiles):
        return source
    if isinstance(source, UrlList):
        return replace(source, source=_replayable_text(source.source))
    if isinstance(source, str | Path) and str(source) != "-" and reads_once(source):
        # Kept as lines, in the format its name says (a FIFO may be called x.csv).
        return UrlList(_replayable_text(source), InputFormat.for_path(source))
    return _replayable_text(source)


def _replayable_text(
    source: str | Path | TextIO | Iterable[str],
) -> str | Path | list[str]:
    if isinstance(source, str | Path):
        if str(source) == "-":
            return list(sys.stdin)
        if not reads_once(source):
            return source
        try:  # a pipe or FIFO gives its lines once: keep them
            with open(source, encoding="utf-8", errors="replace") as lines:
                return list(lines)
        except OSError as exc:
            message = f"cannot read URL list {source}: {exc.strerror or exc}"
            raise InputError(message) from exc
    return list(source)


def run_mode(
    source: Source, settings: Settings, mode: Mode, *, cancel: Cancellation
) -> ModeResult:
    """Run one mode into ``settings.out/<mode>`` (redoing everything) in a fresh
    process of its own; measure it from here.

    ``cancel`` set while it runs: the mode's process stops in order and its result
    (``interrupted``) is returned. Its process dying without a result, or its workers
    crashing, is the result's ``error``.

    Raises:
        OutputError: ``settings.out/<mode>`` is a symbolic link, or not a folder; or
            the mode's run stopped on a local fault (a full disk).
        KeyboardInterrupt: a second Ctrl-C; the mode's process is ended first.
    """
    mode_settings = _mode_settings(settings, mode)
    spawn = multiprocessing.get_context("spawn")
    reader, writer = spawn.Pipe(duplex=False)
    with StopLine(spawn) as stop:
        process = spawn.Process(
            target=_mode_process,
            args=(source, mode_settings, stop.reader, writer),
            name=f"downloader-compare-{mode.value}",
        )
        try:
            with _signals_held():  # it starts with them held: see _leave_the_terminal
                process.start()
            writer.close()  # ours must go, or a dead child would never read as EOF
            with _TreeSampler(process.pid) as tree:
                message = _receive(reader, stop, cancel)
        except KeyboardInterrupt:
            # A second Ctrl-C: the mode's run stops at once too, as a run does.
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGINT)
            raise
        finally:
            stop.stop()
            reader.close()  # a result no one will read fails to send: it ends
            _end(process)
    if isinstance(message, ChildFault):
        raise message.exception()
    memory = tree.peak(None if message is None else message.memory.main_mb)
    if message is None:  # killed (the OOM killer), or died in a way it could not tell
        return ModeResult(
            mode=mode,
            threads=0,
            procs=0,
            summary=Tally().summary(interrupted=cancel.is_set()),
            memory=memory,
            outputs={},
            error=f"its process ended without a result (exit code {process.exitcode})",
            pid=process.pid,
        )
    return replace(message, memory=memory, pid=process.pid)


def _receive(
    reader: Connection, stop: StopLine, cancel: Cancellation
) -> ModeResult | ChildFault | None:
    """Wait for the mode's one message; on ``cancel``, tell it to stop and wait on.

    None when the process ended without one (EOF: the only writer left is its own).
    """
    wakeup = Wakeup()
    try:
        with cancel.waking(wakeup):
            while reader not in wait([reader, wakeup.fileno()]):
                wakeup.clear()
                stop.stop()  # the run stops in order, then sends its result
        try:
            message: ModeResult | ChildFault = reader.recv()
        except EOFError:
            return None
        return message
    finally:
        wakeup.close()


def _end(process: multiprocessing.process.BaseProcess) -> None:
    """Let the mode's process end (bounded), then kill it; it leaves no zombie."""
    if process.pid is None:
        return  # it never started
    process.join(MODE_EXIT_S)
    if process.exitcode is None:
        process.kill()
        process.join()


def _mode_process(
    source: Source, settings: Settings, stop: Connection, results: Connection
) -> None:
    """The body of a mode's process: run the mode, send its result or its fault.

    A second Ctrl-C stops the run at once (``cancel_on_signals`` in the run): it ends
    quietly, without a result; the caller is interrupted too.
    """
    _leave_the_terminal()
    cancel = Cancellation()
    with (
        contextlib.suppress(KeyboardInterrupt),
        contextlib.closing(results),
        child_process(stop, cancel.set, results.send),
        _ray_if_asked(settings, (settings.mode,)),  # joined before the clock starts
    ):
        results.send(_run_here(source, settings, cancel))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back in this thread for the block; none is lost.

    A process started in the block starts with them held (the mask survives exec).
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _leave_the_terminal() -> None:
    """Move this mode's process to a process group of its own; then let signals in.

    A terminal's Ctrl-C goes to its whole foreground group: here, only to the caller,
    which tells the mode once, by its stop line. Reached by both, the mode would take
    whichever came second for a second Ctrl-C (stop at once, record nothing more).
    It started with the signals held (``_signals_held``): one sent before this is
    pending, and is dropped here, ignored; the caller got it and tells the mode.
    """
    os.setpgrp()
    for number in _STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _run_here(source: Source, settings: Settings, cancel: Cancellation) -> ModeResult:
    """Run ``settings.mode`` in this process into ``settings.out``; measure it.

    Memory: this process's own peak only (the caller samples the workers).
    """
    log = EventLog()
    usage = Usage()
    written: dict[str, tuple[str, ...]] = {}
    error = None
    started = time.perf_counter()
    tally = Tally()
    try:
        for outcome in iter_results(
            source, settings, events=log, cancel=cancel, usage=usage
        ):
            tally.add(outcome)
            if outcome.status is Status.OK and outcome.path is not None:
                written[outcome.url] = (outcome.path, *(outcome.outputs or ()))
    except WorkerCrashed as exc:
        error = str(exc)
    summary = tally.summary(
        interrupted=cancel.is_set(), worker_cpu_s=usage.worker_cpu_s
    )
    threads, procs = _concurrency(settings.mode, settings)
    outputs = {
        url: _files_sha256(settings.out, paths) for url, paths in written.items()
    }
    return ModeResult(
        mode=settings.mode,
        threads=threads,
        procs=procs,
        summary=summary,
        memory=MemoryPeak(_own_peak_mb(), None, None),
        outputs=outputs,
        spans=_spans(log.events, started),
        error=error,
    )


def _mode_settings(settings: Settings, mode: Mode) -> Settings:
    """The settings of ``mode``'s run, into ``settings.out/<mode>``, from scratch.

    Raises:
        OutputError: ``settings.out/<mode>`` is a symbolic link, or not a folder
            (refused here, not recorded as the mode's error: nothing runs through a
            link).
    """
    out = settings.out / mode.value
    refuse_link(out, kind="folder")
    return replace(settings, mode=mode, out=out, force=True)


def _concurrency(mode: Mode, settings: Settings) -> tuple[int, int]:
    """Download threads (or tasks) in the main process, and worker processes."""
    return {
        Mode.SEQUENTIAL: (1, 0),
        Mode.THREADS: (settings.threads, 0),
        Mode.PROCESSES: (0, settings.procs),
        Mode.PIPELINE: (settings.threads, settings.procs),
        Mode.ASYNC: (settings.threads, settings.procs),
        Mode.RAY: (settings.threads, 0),  # per task; a task per cluster CPU
    }[mode]


def _files_sha256(folder: Path, paths: tuple[str, ...]) -> str:
    """One SHA-256 over the names and bytes of one URL's output files."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode() + b"\0")
        with (folder / path).open("rb") as file:
            while chunk := file.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _spans(events: Iterable[ProgressEvent], origin: float) -> tuple[Span, ...]:
    """Pair each STARTED event with its FINISHED one into a span of one lane."""
    opened: dict[tuple[str, Stage, int], float] = {}
    spans = []
    for event in sorted(events, key=lambda e: e.time):
        key = (event.lane, event.stage, event.index)
        if event.kind is EventKind.STARTED:
            opened[key] = event.time
        elif event.kind is EventKind.FINISHED and key in opened:
            start = opened.pop(key) - origin
            spans.append(Span(event.lane, event.stage, start, event.time - origin))
    return tuple(spans)


# --------------------------------------------------------------------- memory
#
# Why measured this way. "main" is the mode's process's own high-water mark (VmHWM),
# which the kernel keeps exactly, for that process's memory alone: as the process is
# new, nothing before the mode's run is in it (but the interpreter's start). Not
# getrusage: a spawned process's ru_maxrss also holds the peak of the process it was
# forked from before its exec (Linux folds the old memory's peak into it), here the
# caller's; and RUSAGE_CHILDREN gives the largest single child's peak, not a sum. The
# sum of several processes' memory has no kernel high-water mark at all, so "total"
# is sampled: the mode's process plus all its descendants (its forkserver and the
# workers), their RSS summed every SAMPLE_INTERVAL_S. A sample can miss a short peak,
# while each process's own peak is a true lower bound of the sum's: "total" is the
# largest of these, so it is never below "main" or "worker". RSS counts pages shared
# between processes (the forkserver's imports) once per process, in every mode alike.


def _own_peak_mb() -> float:
    """This process's peak RSS in MB: VmHWM, or where there is no /proc, ru_maxrss."""
    hwm = _status_kib("self", "VmHWM")
    if hwm is not None:
        return hwm * _KIB / _MB
    # ru_maxrss is in KiB on Linux, bytes on macOS (where it may include the peak of
    # the process this one was forked from: the best that is known there).
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss * (1 if sys.platform == "darwin" else _KIB) / _MB


def _status_kib(pid: int | str, field: str) -> int | None:
    """Read one ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/<pid>/status``."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found += [int(child) for child in text.split()]
    return found


def _descendants(pid: int) -> list[tuple[int, int]]:
    """``(pid, depth)`` of every live descendant of ``pid``: children are depth 1."""
    found: list[tuple[int, int]] = []
    level = [pid]
    for depth in range(1, _MAX_DEPTH + 1):
        level = [child for parent in level for child in _children(parent)]
        found += [(child, depth) for child in level]
    return found


class _TreeSampler:
    """Sample, from the caller, the RSS of a mode's process and its descendants.

    Workers are the descendants below the mode's own children (those are helpers:
    the forkserver that forks the workers). Nothing is known without ``/proc``.
    """

    def __init__(self, pid: int | None) -> None:
        self._pid = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="memory-sampler", daemon=True
        )
        self._proc = pid is not None and Path(f"/proc/{pid}/status").exists()
        self._total_kib = 0
        self._worker_hwm: dict[int, int] = {}

    def __enter__(self) -> _TreeSampler:
        if self._proc:
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc:
            self._stop.set()
            self._thread.join()

    def _loop(self) -> None:
        self._sample()
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        assert self._pid is not None  # started only with a pid
        total = _status_kib(self._pid, "VmRSS")
        if total is None:
            return  # it has ended
        for pid, depth in _descendants(self._pid):
            rss, hwm = _status_kib(pid, "VmRSS"), _status_kib(pid, "VmHWM")
            if rss is None or hwm is None:
                continue  # it exited between the listing and the read
            total += rss
            if depth > 1:
                self._worker_hwm[pid] = max(hwm, self._worker_hwm.get(pid, 0))
        self._total_kib = max(self._total_kib, total)

    def peak(self, main_mb: float | None) -> MemoryPeak:
        """The peaks in MB, given the mode's own (``main_mb``; None: not known).

        Total is the largest of the sampled sum and each process's own peak.
        """
        main = main_mb or 0.0
        if not self._proc:
            return MemoryPeak(main, None, None)
        kib = max(self._worker_hwm.values(), default=None)
        worker = None if kib is None else kib * _KIB / _MB
        total = max(self._total_kib * _KIB / _MB, main, worker or 0.0)
        return MemoryPeak(main, worker, total)
