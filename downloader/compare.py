"""Run several modes on the same list, one after the other, and measure each.

::

    compare(source, settings, modes)
      for each mode: iter_results(list, settings with mode, out=OUT/<mode>, force)
          ├─ EventLog          → timeline spans (lane, stage, start, end)
          ├─ Tally + Usage     → wall s, images/s, MB/s, CPU s (workers included)
          └─ _MemorySampler    → peak RSS of the main process and of each worker
      hash every output image  → do the modes' outputs match?
      → report.Comparison → comparison.json + comparison.png in OUT

Nothing is written outside OUT: a symbolic link at ``comparison.json`` /
``comparison.png`` (or anything there but a file), at ``OUT/<mode>`` (or anything there
but a folder), or at a name a mode's run writes in it (its ``OutputFolder`` is entered
once for each mode up front) stops the comparison before any mode runs, with an
``OutputError`` (exit 3) naming it; each mode's folder is checked again just before its
run. The two files are written through ``manifest.write_file``: a new temporary file
in OUT, renamed over the name, never through a link.

Memory is measured honestly for what it is: the main process's high-water mark
(``VmHWM``, reset before each run through ``/proc/self/clear_refs``, after freed heap
is handed back to the OS so earlier modes do not set the floor), the largest
worker high-water mark, and main plus workers summed at each 0.1 s sample. The
forkserver and the demo server are not counted. Where ``/proc`` is missing, only the
main process's lifetime peak (``ru_maxrss``) is known.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import IO, TextIO

from downloader.api import Source, iter_results
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
    draw_comparison,
)
from downloader.runtime import Cancellation, Usage
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
            a mode's folder, checked before any mode runs; or they cannot be written.
    """
    for name in (JSON_NAME, PNG_NAME):
        refuse_link(settings.out / name)
    runs = [_mode_settings(settings, mode) for mode in modes]
    for run in runs:
        # What each run checks at its start (links and wrong kinds of entry at the
        # names it writes, its lock), done for every mode before the first runs.
        with OutputFolder.for_settings(run):
            pass
    replayable = _replayable(source)
    cancel = cancel or Cancellation()
    results = []
    with _ray_if_asked(settings, modes, log):
        for mode in modes:
            if cancel.is_set():
                break
            if log is not None:
                log.write(f"compare: running {mode.value}...\n")
            results.append(run_mode(replayable, settings, mode, cancel=cancel))
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
        write_file(settings.out, PNG_NAME, [_chart_png(comparison, settings.out)])
    return comparison


@contextlib.contextmanager
def _ray_if_asked(
    settings: Settings, modes: Sequence[Mode], log: IO[str] | None
) -> Iterator[None]:
    """With ``ray`` among ``modes``, start (or join) Ray before any mode runs, so
    that its start-up is not in the ray row's time (it is said on ``log``)."""
    if Mode.RAY not in modes:
        yield
        return
    from downloader.ray_mode import connected  # the optional extra

    started = time.perf_counter()
    with connected(settings):
        if log is not None:
            seconds = time.perf_counter() - started
            log.write(f"compare: Ray ready in {seconds:.1f} s (not timed below)\n")
        yield


def _chart_png(comparison: Comparison, out: Path) -> bytes:
    """Draw the chart and return the PNG's bytes.

    ``draw_comparison`` saves to a path (Pillow picks the format from its name), so
    it draws into a fresh private folder in ``out`` (mode 0700, a new random name:
    nothing can be waiting at the path), read back without following links.
    """
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".comparison-", dir=out))
    except OSError as exc:
        raise OutputError(f"cannot write in {out}: {exc.strerror or exc}") from exc
    try:
        path = scratch / PNG_NAME
        draw_comparison(comparison, path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as png:
            return png.read()
    except OSError as exc:
        raise OutputError(
            f"cannot draw {out / PNG_NAME}: {exc.strerror or exc}"
        ) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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
    """Run one mode into ``settings.out/<mode>`` (redoing everything); measure it.

    Raises:
        OutputError: ``settings.out/<mode>`` is a symbolic link, or not a folder.
    """
    mode_settings = _mode_settings(settings, mode)
    log = EventLog()
    usage = Usage()
    written: dict[str, tuple[str, ...]] = {}
    error = None
    _release_free_memory()
    with _MemorySampler() as memory:
        started = time.perf_counter()
        tally = Tally()
        try:
            for outcome in iter_results(
                source, mode_settings, events=log, cancel=cancel, usage=usage
            ):
                tally.add(outcome)
                if outcome.status is Status.OK and outcome.path is not None:
                    written[outcome.url] = (outcome.path, *(outcome.outputs or ()))
        except (OutputError, WorkerCrashed) as exc:
            error = str(exc)
        summary = tally.summary(
            interrupted=cancel.is_set(), worker_cpu_s=usage.worker_cpu_s
        )
    threads, procs = _concurrency(mode, settings)
    return ModeResult(
        mode=mode,
        threads=threads,
        procs=procs,
        summary=summary,
        memory=memory.peak(),
        outputs={
            url: _files_sha256(mode_settings.out, paths)
            for url, paths in written.items()
        },
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


def _release_free_memory() -> None:
    """Give freed heap back to the OS, so one mode's peak does not raise the next's.

    Python keeps freed memory in its allocator (and glibc in its arenas); without
    this a mode that ran before would set the floor of every later mode's RSS.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)  # glibc only; elsewhere nothing to do


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


def _workers() -> list[int]:
    """Grandchildren of this process: workers forked by the forkserver."""
    return [pid for child in _children(os.getpid()) for pid in _children(child)]


class _MemorySampler:
    """Sample the RSS of this process and its workers while a run goes on."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="memory-sampler", daemon=True
        )
        self._proc = Path("/proc/self/status").exists()
        self._hwm_reset = False
        self._main_kib = 0
        self._total_kib = 0
        self._worker_hwm: dict[int, int] = {}

    def __enter__(self) -> _MemorySampler:
        if self._proc:
            with contextlib.suppress(OSError):
                # "5" resets this process's VmHWM to its current RSS (Linux >= 4.0).
                Path("/proc/self/clear_refs").write_text("5")
                self._hwm_reset = True
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
            self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        main = _status_kib("self", "VmRSS") or 0
        total = main
        for pid in _workers():
            rss, hwm = _status_kib(pid, "VmRSS"), _status_kib(pid, "VmHWM")
            if rss is None or hwm is None:
                continue  # it exited between the listing and the read
            total += rss
            self._worker_hwm[pid] = max(hwm, self._worker_hwm.get(pid, 0))
        self._main_kib = max(self._main_kib, main)
        self._total_kib = max(self._total_kib, total)

    def peak(self) -> MemoryPeak:
        """The peaks seen, in MB; worker and total are None without ``/proc``."""
        if not self._proc:
            # ru_maxrss is in KiB on Linux, bytes on macOS: a lifetime peak either way.
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            scale = 1 if sys.platform == "darwin" else _KIB
            return MemoryPeak(maxrss * scale / _MB, None, None)
        main = self._main_kib
        if self._hwm_reset:
            main = max(main, _status_kib("self", "VmHWM") or 0)
        workers = max(self._worker_hwm.values(), default=None)
        return MemoryPeak(
            main * _KIB / _MB,
            None if workers is None else workers * _KIB / _MB,
            self._total_kib * _KIB / _MB,
        )
