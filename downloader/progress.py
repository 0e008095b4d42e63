"""Progress events and the one place that draws them (tqdm, in the main process only).

Stages report small ``ProgressEvent`` records: download threads call the sink directly,
worker processes send them over their Pipe and the scheduler forwards them. ``Bars``
turns them into two live bars; ``EventLog`` keeps them for the comparison timeline;
``EventStream`` writes them as JSON lines for other programs (``--events``), and
``BarsHandler`` sends the ``downloader`` logger's messages above the bars.
"""

from __future__ import annotations

import enum
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from downloader.records import Outcome, Stage, Status

__all__ = [
    "Bars",
    "BarsHandler",
    "EventKind",
    "EventLog",
    "EventStream",
    "Events",
    "ProgressEvent",
    "fan_out",
    "tell_note",
    "tell_outcome",
]

_log = logging.getLogger("downloader")


class EventKind(enum.Enum):
    """What happened to one item in one stage."""

    STARTED = "started"
    FINISHED = "finished"
    BYTES = "bytes"


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One step of one item: small enough to send between processes."""

    stage: Stage
    kind: EventKind
    index: int
    lane: str
    """Which thread or process did the work, e.g. ``thread-3`` or ``proc-1``."""
    time: float
    """``time.perf_counter()`` (CLOCK_MONOTONIC, comparable across processes)."""
    nbytes: int = 0
    url: str = ""
    """The item's URL as in its record, on ``started`` and ``finished`` events."""


class Events(Protocol):
    """A sink for progress events; must be safe to call from any thread.

    A sink may also take the run's other news, which the library gives every sink
    that has the method (``EventStream`` does): ``outcome(record)`` once per input as
    its record is written, and ``note(kind, fields)`` for ``start`` (the settings)
    and ``summary`` (the totals). So ``run(..., events=stream)`` and the command
    line's ``--events`` write the same lines.
    """

    def __call__(self, event: ProgressEvent, /) -> None: ...


def ignore_events(event: ProgressEvent, /) -> None:
    """Drop an event (the sink used when nobody watches)."""


def tell_outcome(sink: Events, outcome: Outcome) -> None:
    """Give ``outcome`` to ``sink`` if it takes records (see ``Events``)."""
    method = getattr(sink, "outcome", None)
    if callable(method):
        method(outcome)


def tell_note(sink: Events, kind: str, fields: Mapping[str, Any]) -> None:
    """Give a ``note`` to ``sink`` if it takes notes (see ``Events``)."""
    method = getattr(sink, "note", None)
    if callable(method):
        method(kind, fields)


class _FanOut:
    """A sink that passes each event, record and note to every one of its sinks."""

    def __init__(self, sinks: tuple[Events, ...]) -> None:
        self._sinks = sinks

    def __call__(self, event: ProgressEvent, /) -> None:
        for sink in self._sinks:
            sink(event)

    def outcome(self, outcome: Outcome) -> None:
        """Pass a record on to the sinks that take records."""
        for sink in self._sinks:
            tell_outcome(sink, outcome)

    def note(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Pass a note on to the sinks that take notes."""
        for sink in self._sinks:
            tell_note(sink, kind, fields)


def fan_out(*sinks: Events) -> Events:
    """Return a sink that passes everything it gets to every one of ``sinks``."""
    return _FanOut(sinks)


class EventLog:
    """Keep STARTED/FINISHED events (not byte counts) for a timeline."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []
        self._lock = threading.Lock()

    def __call__(self, event: ProgressEvent, /) -> None:
        """Record ``event`` unless it is a byte count."""
        if event.kind is not EventKind.BYTES:
            with self._lock:
                self.events.append(event)


class Bars:
    """Two tqdm bars: downloads (files and bytes) and finished URLs (by status)."""

    def __init__(
        self,
        *,
        total: int | None = None,
        file: IO[str] | None = None,
        disable: bool | None = None,
        mininterval: float = 0.1,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        # Imported here: only the main process draws, and the workers (which import
        # this module for the events) start sooner without it.
        from tqdm import tqdm

        common = {"file": file, "disable": disable, "mininterval": mininterval}
        # tqdm draws on stderr by default but writes messages to stdout by default.
        self._file = file if file is not None else sys.stderr
        self._download = tqdm(
            total=total, desc="download", unit="file", position=0, **common
        )
        self._process = tqdm(
            total=total, desc="process ", unit="img", position=1, **common
        )
        self._lock = threading.Lock()
        self._clock = clock
        self._started = clock()
        self._bytes = 0
        self._counts = dict.fromkeys(Status, 0)

    def __call__(self, event: ProgressEvent, /) -> None:
        """Advance the download bar for a finished download or received bytes."""
        if event.stage is not Stage.DOWNLOAD or event.kind is EventKind.STARTED:
            return
        with self._lock:
            if event.kind is EventKind.FINISHED:
                self._download.update(1)
                return
            self._bytes += event.nbytes
            elapsed = max(self._clock() - self._started, 1e-9)
            megabytes = self._bytes / 1e6
            self._download.set_postfix_str(
                f"{megabytes:.1f} MB, {megabytes / elapsed:.1f} MB/s", refresh=False
            )

    def outcome(self, outcome: Outcome) -> None:
        """Count a finished URL on the processing bar (on both, if never fetched)."""
        with self._lock:
            if outcome.status is Status.SKIPPED or (
                outcome.status is Status.FAILED and outcome.stage is None
            ):
                self._download.update(1)
            self._counts[outcome.status] += 1
            self._process.update(1)
            self._process.set_postfix_str(
                ", ".join(f"{n} {s.value}" for s, n in self._counts.items() if n),
                refresh=False,
            )

    def write(self, message: str) -> None:
        """Print a line above the bars without breaking them."""
        with self._lock:
            # A disabled bar has no fp of its own; tqdm.write still works.
            self._download.write(message, file=self._file)

    def close(self) -> None:
        """Draw the final state and release the terminal lines."""
        with self._lock:
            for bar in (self._download, self._process):
                if bar.total is not None and bar.n != bar.total:
                    # The total was an upper bound (duplicates, stopped early).
                    bar.total = bar.n
                    bar.refresh()
            # Top line first, so the finished bars stay in their places.
            self._download.close()
            self._process.close()

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class BarsHandler(logging.Handler):
    """A logging handler that prints each record through ``write`` (``Bars.write``).

    Messages then appear above the bars instead of breaking them. Warnings and errors
    are prefixed with their level (``warning: ...``); info lines are printed as is.
    """

    def __init__(self, write: Callable[[str], None], level: int = logging.NOTSET):
        super().__init__(level)
        self.target = write
        """Where lines go; the CLI points it at ``Bars.write`` while bars are drawn."""

    def emit(self, record: logging.LogRecord) -> None:
        """Print one record."""
        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                message = f"{record.levelname.lower()}: {message}"
            self.target(message)
        # The logging contract: a handler does not raise; handleError reports it.
        except (OSError, ValueError, TypeError):
            self.handleError(record)


class EventStream:
    """Write progress events and results as JSON lines, one flushed line each.

    Every line is an object with ``"type"`` and ``"time"`` (Unix seconds):

    - ``started`` / ``finished``: one item entering or leaving a stage, with
      ``stage`` (download, transform), ``index`` (the item's position among the
      list's unique URLs, from 0), ``url`` and ``lane`` (thread-N, task-N, proc-N);
      a download's ``finished`` line has ``bytes``, the bytes received;
    - ``result``: one per input, as its manifest record (``url``, ``status``,
      ``error``, ``path``, ...) plus the ``index`` its ``started`` lines had (null
      for an input that reached no stage: a skip, a bad line, one not started),
      written by ``outcome()``;
    - anything a caller adds with ``note()`` (the CLI adds ``start`` and ``summary``).

    A sink for ``events=`` (safe from any thread). If writing fails (a full disk)
    the stream stops writing, logs one warning and keeps the reason in ``error``; the
    run goes on. A closed pipe (``| head``: the reader left) calls ``reader_left``
    instead of the warning, when given: the command line then stops the run.
    """

    def __init__(
        self,
        file: IO[str],
        *,
        close_file: bool = False,
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], float] = time.time,
        reader_left: Callable[[], None] | None = None,
    ) -> None:
        self._file: IO[str] | None = file
        self._close_file = close_file
        self._reader_left = reader_left
        # Event times are perf_counter readings (comparable across processes);
        # this offset turns them into Unix time for readers.
        self._offset = wall_clock() - clock()
        self._clock = clock
        self._lock = threading.Lock()
        self._bytes: dict[int, int] = {}
        # URL -> index of the items that started and have no result yet.
        self._indexes: dict[str, int] = {}
        self.error: str | None = None
        self.reader_gone = False
        """True once writing failed because the reader of the pipe left."""

    @classmethod
    def open(
        cls, target: str | Path, *, reader_left: Callable[[], None] | None = None
    ) -> EventStream:
        """Open ``target`` for writing (replacing it); ``"-"`` means standard output.

        Raises:
            OSError: the file cannot be created.
        """
        if str(target) == "-":
            return cls(sys.stdout, reader_left=reader_left)
        # Line buffered: each event reaches the file as soon as it is written.
        file = open(target, "w", encoding="utf-8", buffering=1)  # noqa: SIM115
        return cls(file, close_file=True, reader_left=reader_left)

    def __call__(self, event: ProgressEvent, /) -> None:
        """Write a started/finished event; add up byte counts for the finished one."""
        if event.kind is EventKind.BYTES:
            with self._lock:
                self._bytes[event.index] = (
                    self._bytes.get(event.index, 0) + event.nbytes
                )
            return
        line: dict[str, Any] = {
            "type": event.kind.value,
            "time": self._unix(event.time),
            "stage": event.stage.value,
            "index": event.index,
            "url": event.url,
            "lane": event.lane,
        }
        if event.kind is EventKind.STARTED:
            with self._lock:
                self._indexes[event.url] = event.index
        if event.kind is EventKind.FINISHED and event.stage is Stage.DOWNLOAD:
            with self._lock:
                line["bytes"] = self._bytes.pop(event.index, 0)
        self._write(line)

    def outcome(self, outcome: Outcome) -> None:
        """Write the ``result`` line of one finished input."""
        with self._lock:
            index = self._indexes.pop(outcome.url, None)
        time_now = self._unix(self._clock())
        self._write(
            {"type": "result", "time": time_now, "index": index, **outcome.to_json()}
        )

    def note(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Write a line of type ``kind`` with ``fields`` (e.g. the run's summary)."""
        self._write({"type": kind, "time": self._unix(self._clock()), **fields})

    def close(self) -> None:
        """Flush, and close the file if this stream opened it (idempotent)."""
        with self._lock:
            file, self._file = self._file, None
            if file is None:
                return
            try:
                file.flush()
                if self._close_file:
                    file.close()
            except OSError as exc:
                self._failed(exc)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _unix(self, moment: float) -> float:
        return round(moment + self._offset, 6)

    def _write(self, line: Mapping[str, Any]) -> None:
        text = json.dumps(line, ensure_ascii=False) + "\n"
        with self._lock:
            if self.error is not None:
                return
            if self._file is None:
                raise RuntimeError("EventStream is closed")
            try:
                self._file.write(text)
                self._file.flush()
            except (OSError, ValueError) as exc:  # ValueError: closed by someone else
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        if self.error is not None:
            return
        self.error = f"cannot write events: {exc}"
        self.reader_gone = isinstance(exc, BrokenPipeError)
        if self.reader_gone and self._reader_left is not None:
            self._reader_left()
        else:
            _log.warning("%s; no more events are written", self.error)
