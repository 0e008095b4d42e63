"""What every scheduler shares for one run: output paths, progress sink, cancellation.

``Cancellation`` is the one flag that Ctrl-C, SIGTERM, a fatal error or a library caller
sets to stop a run. Besides a ``threading.Event`` (for download threads) it owns a
self-pipe, so a scheduler blocked in ``multiprocessing.connection.wait`` wakes at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from downloader.progress import Events

__all__ = ["Cancellation", "RunContext", "Usage", "Wakeup", "cancel_on_signals"]


class Wakeup:
    """A self-pipe: any thread (or a signal handler) can wake a ``wait()`` on it."""

    def __init__(self) -> None:
        self._reader, self._writer = os.pipe()
        os.set_blocking(self._reader, False)
        # A full pipe already means "wake up"; a writer must never block on it.
        os.set_blocking(self._writer, False)
        self._closed = False

    def fileno(self) -> int:
        """Return the descriptor to wait on."""
        return self._reader

    def wake(self) -> None:
        """Make the next (or current) wait on this object return."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._writer, b"\0")

    def clear(self) -> None:
        """Consume pending wake-ups."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._reader, 4096):
                pass

    def close(self) -> None:
        """Close both ends (idempotent)."""
        if not self._closed:
            self._closed = True
            os.close(self._reader)
            os.close(self._writer)


class Cancellation:
    """The stop flag of one run, with the reason it was set."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason: str | None = None
        self._wakeups: list[Wakeup] = []
        self._lock = threading.Lock()

    def set(self, reason: str = "interrupted") -> None:
        """Ask the run to stop; the first reason given is kept."""
        if self.reason is None:
            self.reason = reason
        self.event.set()
        for wakeup in list(self._wakeups):
            wakeup.wake()

    def is_set(self) -> bool:
        """Return True once the run has been asked to stop."""
        return self.event.is_set()

    @contextlib.contextmanager
    def waking(self, wakeup: Wakeup) -> Iterator[None]:
        """Wake ``wakeup`` when cancelled, for as long as the block runs."""
        with self._lock:
            self._wakeups.append(wakeup)
        if self.is_set():
            wakeup.wake()
        try:
            yield
        finally:
            with self._lock:
                self._wakeups.remove(wakeup)


class Usage:
    """CPU seconds used by worker processes, which ``os.times`` cannot see.

    Workers are forked by the forkserver, not by this process, so their time never
    shows up in this process's children counters; each reports it when it exits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.worker_cpu_s = 0.0

    def add_worker_cpu(self, seconds: float) -> None:
        """Add the CPU time a finished worker reported."""
        with self._lock:
            self.worker_cpu_s += seconds


@dataclass(frozen=True, slots=True)
class RunContext:
    """Paths and shared objects one scheduler needs besides the settings."""

    out: Path
    """The output folder (final images, manifest)."""
    tmp: Path
    """Scratch folder inside ``out`` for partial downloads and outputs."""
    events: Events
    cancel: Cancellation
    usage: Usage = field(default_factory=Usage)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def cancel_on_signals(cancel: Cancellation) -> Iterator[None]:
    """Turn the first Ctrl-C or SIGTERM into a cancellation; a second one interrupts.

    Outside the main thread signal handlers cannot be installed, so this does nothing
    there and a caller's own KeyboardInterrupt handling applies.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        cancel.set(f"interrupted by {name}")

    previous = {number: signal.signal(number, handle) for number in _SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            # None means a handler installed from C; the default is the best we have.
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
