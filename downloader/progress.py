"""Progress events and the one place that draws them (tqdm, in the main process only).

Stages report small ``ProgressEvent`` records: download threads call the sink directly,
worker processes send them over their Pipe and the scheduler forwards them. ``Bars``
turns them into two live bars; ``EventLog`` keeps them for the comparison timeline.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Protocol

from tqdm import tqdm

from downloader.records import Outcome, Stage, Status

__all__ = ["Bars", "EventKind", "EventLog", "Events", "ProgressEvent", "fan_out"]


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


class Events(Protocol):
    """A sink for progress events; must be safe to call from any thread."""

    def __call__(self, event: ProgressEvent, /) -> None: ...


def ignore_events(event: ProgressEvent, /) -> None:
    """Drop an event (the sink used when nobody watches)."""


def fan_out(*sinks: Events) -> Events:
    """Return a sink that passes each event to every one of ``sinks``."""

    def emit(event: ProgressEvent, /) -> None:
        for sink in sinks:
            sink(event)

    return emit


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
        common = {"file": file, "disable": disable, "mininterval": mininterval}
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
            self._download.write(message, file=self._download.fp)

    def close(self) -> None:
        """Draw the final state and release the terminal lines."""
        with self._lock:
            self._process.close()
            self._download.close()

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
