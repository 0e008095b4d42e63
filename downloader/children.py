"""The one bootstrap of every child process: start method, stop, parent watch, faults.

Transform workers (``worker.worker_main``), download processes
(``download_worker.download_main``) and pool workers (``itemwork.init_worker``) all
start the same way::

    parent                                   child
    ──────                                   ─────
    mp_context(), StopLine ── Process(args=(…, stop.reader)) ──►
                                             child_process(stop, on_stop, report)
                                             ├─ SIGINT ignored (the parent
                                             │  coordinates shutdown)
    StopLine.stop(): close the writer ─EOF─► ├─ watch thread: EOF → on_stop();
    the parent dies ──── its sentinel ─────► │  the parent's death → os._exit(1)
                                             └─ error boundary: an unexpected
    ChildFault.exception() ◄── results Pipe ◄─── exception → ChildFault, then end

The stop signal is a Pipe whose only writer the parent holds and closes, never a shared
``multiprocessing.Event``: a process killed while waiting on such an Event leaves the
next ``set()`` waiting forever for it to wake. A fault crosses the process boundary as
data (its type, message and formatted traceback, and the pickled exception when it
pickles), as CPython's ``concurrent.futures.process._ExceptionWithTraceback`` does;
``ChildFault.exception()`` rebuilds it in the parent with the child's traceback as its
``__cause__``.

How often a pool replaces children that keep dying is stated once, in
``RestartBudget``.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import (
    forkserver,
    parent_process,
    popen_forkserver,
    reduction,
    spawn,
    util,
)
from multiprocessing.connection import Connection, wait
from multiprocessing.context import (
    ForkServerContext,
    ForkServerProcess,
    SpawnContext,
    set_spawning_popen,
)
from types import TracebackType
from typing import Any, Self

__all__ = [
    "RESTARTS_PER_CHILD",
    "ChildError",
    "ChildFault",
    "RemoteTraceback",
    "RestartBudget",
    "StopLine",
    "child_process",
    "enter_child",
    "launches",
    "mp_context",
    "watch",
]

RESTARTS_PER_CHILD = 3
"""Restarts of children that died before finishing anything, per child of a pool.
Replacing children that keep dying would loop forever; a few tell a child that died
by chance (an image that kills its worker, the OOM killer) from a pool that cannot
work at all (a broken install, no memory)."""


PRELOAD = ("downloader.worker", "downloader.itemwork", "downloader.download_worker")
"""What the forkserver imports once, so that each child it forks has it already: the
bodies of the transform workers, the pool workers and the download processes (the
fetch stack: httpx, the lifecycle). A pool worker's first request then follows its
fork at once; the package itself imports none of it (``downloader/__init__.py``)."""


def mp_context() -> ForkServerContext | SpawnContext:
    """Return the explicit start method: forkserver on Linux, spawn elsewhere.

    Never plain fork: the main process runs threads (httpx, tqdm) by the time a worker
    may be replaced, and forking a threaded process can deadlock the child. On Linux
    the children never import the caller's ``__main__`` (see ``_Popen``).
    """
    if sys.platform == "linux":
        _FORKSERVER.set_forkserver_preload(list(PRELOAD))
        return _FORKSERVER
    return multiprocessing.get_context("spawn")


def launches() -> int:
    """How many children this process has started through the forkserver so far."""
    return _launch_count[0]


_launch_count = [0]
"""``launches()``'s count; one list, so that ``_Popen`` adds to it without a global."""


def _preparation_data(name: str) -> dict[str, object]:
    """What a child is told of its parent, less the parent's ``__main__``."""
    data: dict[str, object] = spawn.get_preparation_data(name)
    data.pop("init_main_from_path", None)
    data.pop("init_main_from_name", None)
    return data


class _Popen(popen_forkserver.Popen):
    """The forkserver's way to start a child, without the caller's ``__main__``.

    multiprocessing makes every child import the parent's main module again (the
    script, as ``__mp_main__``), so that functions defined there can be found. Our
    children run only the package's functions: importing the caller's script would
    re-run a script without the ``if __name__ == "__main__":`` guard (a second run
    in every worker), and fails outright for ``python -`` (``<stdin>`` is no file).
    So the library works from any script, ``python -``, a REPL or a notebook. The
    body is CPython's ``popen_forkserver.Popen._launch`` (3.11 to 3.13) with the
    preparation data trimmed; ``--transform`` must therefore name an importable
    module, which ``settings`` checks up front.
    """

    def _launch(self, process_obj: Any) -> None:
        prep_data = _preparation_data(process_obj._name)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        fds: list[int] = self._fds  # type: ignore[attr-defined]
        _launch_count[0] += 1  # before asking: the forkserver may fork from then on
        self.sentinel, w = forkserver.connect_to_new_process(fds)
        # A duplicate of the data pipe's write end: the child's sentinel of its parent.
        parent_w = os.dup(w)
        close_fds = util.close_fds  # type: ignore[attr-defined]
        self.finalizer = util.Finalize(self, close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _Process(ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> _Popen:
        return _Popen(process_obj)


class _ForkServer(ForkServerContext):
    Process = _Process


_FORKSERVER = _ForkServer()


# ------------------------------------------------------------------- the parent


class StopLine:
    """The parent's stop signal to its children: EOF on ``reader`` means stop.

    Hand ``reader`` to each child at creation (``Process(args=…)`` or ``initargs``);
    ``stop()`` closes the only writer, and every child holding ``reader`` sees EOF.
    Keep the line open while children may still be started from it.
    """

    def __init__(self, context: ForkServerContext | SpawnContext) -> None:
        self.reader, self._writer = context.Pipe(duplex=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def stopped(self) -> bool:
        """True once ``stop()`` (or ``close()``) was called."""
        return self._writer.closed

    def stop(self) -> None:
        """Tell every child holding ``reader`` to stop (idempotent)."""
        self._writer.close()

    def close(self) -> None:
        """Stop, and release this end of the reader too (idempotent)."""
        self.stop()
        self.reader.close()


class RestartBudget:
    """How many children of a pool of ``children`` may be replaced without progress.

    Each restart of a child that died is counted (``allow``); a child that finishes
    something resets the count (``succeeded``). Past ``RESTARTS_PER_CHILD`` restarts
    per child in a row, the pool gives up. Not thread-safe: its owner's loop uses it.
    """

    def __init__(self, children: int) -> None:
        if children < 1:
            raise ValueError("children must be greater than 0")
        self.limit = RESTARTS_PER_CHILD * children
        self.fruitless = 0
        """Restarts since a child last finished something."""

    def succeeded(self) -> None:
        """A child finished something: the pool is not dying in a loop."""
        self.fruitless = 0

    def allow(self) -> bool:
        """Count one restart of a child that died; False once over the limit."""
        self.fruitless += 1
        return self.fruitless <= self.limit


class RemoteTraceback(Exception):  # named after concurrent.futures' _RemoteTraceback
    """The formatted traceback of an exception raised in a child process."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class ChildError(Exception):
    """A child's exception that could not be rebuilt here (it did not pickle)."""


@dataclass(frozen=True, slots=True)
class ChildFault:
    """An unexpected exception ended a child; it crosses the boundary as data."""

    type_name: str
    """The exception's type: ``ValueError``, ``package.module.Error``."""
    message: str
    traceback: str
    """The formatted traceback, as the child would have printed it."""
    pickled: bytes | None = None
    """The exception itself, pickled in the child; None where it does not pickle."""

    @classmethod
    def capture(cls, exc: BaseException) -> ChildFault:
        """Describe ``exc`` (being handled in this child) for the parent."""
        kind = type(exc)
        name = kind.__qualname__
        if kind.__module__ != "builtins":
            name = f"{kind.__module__}.{name}"
        try:
            pickled: bytes | None = pickle.dumps(exc)
        except Exception:  # noqa: BLE001 (any pickling failure: send the text only)
            pickled = None
        text = "".join(traceback.format_exception(exc))
        return cls(name, str(exc), text, pickled)

    def exception(self) -> BaseException:
        """The child's exception, rebuilt here, its traceback text as ``__cause__``.

        ``raise fault.exception()`` shows the child's traceback, then this one's. An
        exception that does not rebuild here comes back as a ``ChildError``.
        """
        error: BaseException | None = None
        if self.pickled is not None:
            try:
                error = pickle.loads(self.pickled)  # our own child's data
            except Exception:  # noqa: BLE001 (any failure: rebuild from the text)
                error = None
        if not isinstance(error, BaseException):
            error = ChildError(f"{self.type_name}: {self.message}")
        error.__cause__ = RemoteTraceback(self.traceback)
        return error


# -------------------------------------------------------------------- the child


def watch(stop: Connection, on_stop: Callable[[], None]) -> threading.Thread:
    """Start this child's one watch thread over ``stop`` and the parent's sentinel.

    The parent dead: ``os._exit(1)`` at once (nothing is left to report to). EOF on
    ``stop``: ``on_stop()``, called from the watch thread, then the watch goes on
    for the parent's death.
    """
    parent = parent_process()
    parent_sentinel = None if parent is None else parent.sentinel

    def run() -> None:
        watched: list[Connection | int] = [stop]
        if parent_sentinel is not None:
            watched.append(parent_sentinel)
        ready = wait(watched)
        if parent_sentinel is not None and parent_sentinel in ready:
            os._exit(1)
        on_stop()
        if parent_sentinel is not None:
            wait([parent_sentinel])
            os._exit(1)

    thread = threading.Thread(target=run, name="child-watch", daemon=True)
    thread.start()
    return thread


def enter_child(stop: Connection, on_stop: Callable[[], None]) -> None:
    """Bootstrap this child: ignore SIGINT (the parent coordinates shutdown), watch.

    For children whose error boundary is elsewhere (a ``ProcessPoolExecutor`` sends
    its workers' exceptions back itself); others use ``child_process``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(stop, on_stop)


@contextlib.contextmanager
def child_process(
    stop: Connection,
    on_stop: Callable[[], None],
    report: Callable[[ChildFault], None],
) -> Iterator[None]:
    """Run the block as a child's body: ``enter_child``, then an error boundary.

    An unexpected exception in the block is sent with ``report`` as a ``ChildFault``
    and goes no further: the child ends after the block (its ``finally`` clauses run).
    """
    enter_child(stop, on_stop)
    try:
        yield
    except Exception as exc:  # noqa: BLE001 (process boundary: report, then end)
        with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
            report(ChildFault.capture(exc))
