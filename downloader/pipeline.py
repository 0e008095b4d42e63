"""The pipeline scheduler: download threads → Queue → worker processes → Pipes.

::

    jobs ─► feed ─► downloads ─fetch─► claim ─► transform pool ─► inbox Queue per worker
            (feed.py)  (downloads.py: threads here,     (transform_pool.py)   │
                        or download processes)                                ▼
                          │ failed / ready records                   P worker processes
                          ▼                                          transform_file()
             coordinator: connection.wait(self-pipe, Pipes, sentinels) ◄── Pipe ─┘
                          │
                          └─► yields one Outcome per job (the caller writes them)

This module is the coordinator: it starts the parts (the transform pool starts its
workers in a thread while the downloads begin: the first request waits for no
process), runs the main loop, and owns the one shutdown path. The parts
own their state: the feed (jobs, per-host deferral, retries), the downloads (threads
or download processes, one interface), the transform pool (workers, slots,
deadlines, replacement). Every record comes from the run's ``Lifecycle``.

The coordinator's state is explicit (``State``): RUNNING until the work is done or a
stop is asked (Ctrl-C, a fault, the caller leaving); STOPPING while what is in
progress ends, for at most ``SHUTDOWN_GRACE_S``, after which what is left is
abandoned and recorded; DRAINED once every job has its record; CLOSED when every
thread and process is joined. ``close`` is the one way out, whatever the state.
"""

from __future__ import annotations

import enum
import logging
import selectors
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from types import TracebackType
from typing import Any

from downloader.children import mp_context
from downloader.downloads import Downloads, ProcessDownloads, ThreadDownloads
from downloader.feed import Feed
from downloader.lifecycle import Lifecycle
from downloader.records import Job, Outcome, Stage
from downloader.runtime import Wakeup
from downloader.scheduling import TICK_S
from downloader.spares import SpareFiles
from downloader.transform_pool import (
    SHUTDOWN_GRACE_S,
    WORK_QUEUE_SLACK,
    TransformPool,
)

__all__ = ["HOST_LOOKAHEAD_PER_THREAD", "State", "run_pipeline"]

_log = logging.getLogger("downloader")

HOST_LOOKAHEAD_PER_THREAD = 4
"""Jobs per download thread that may be set aside while their host is at --per-host,
so that threads serve other hosts instead of queueing behind one. More would read
further ahead of the list."""


class State(enum.Enum):
    """Where a pipeline run is; it only moves forward."""

    RUNNING = "running"
    STOPPING = "stopping"
    DRAINED = "drained"
    CLOSED = "closed"


def run_pipeline(
    items: Iterable[Job | Outcome], lifecycle: Lifecycle
) -> Iterator[Outcome]:
    """Download with threads and transform in worker processes; yield each outcome."""
    with _Pipeline(items, lifecycle) as pipeline:
        yield from pipeline.run()


class _Waiter:
    """``multiprocessing.connection.wait``, with its selector kept between calls.

    The coordinator waits several times per image, on the same few objects (the
    self-pipe, each worker's Pipe and sentinel, the download processes'); ``wait``
    makes a selector and registers every object on each call, a tenth of the main
    thread's CPU in a profile. This one registers them again only when the set
    changes. A ``PollSelector``, as ``wait`` uses: it polls descriptor numbers, so a
    closed one that is opened again under the same number is still watched (an
    epoll set would drop it).
    """

    def __init__(self) -> None:
        self._selector: selectors.PollSelector | None = None
        self._objects: tuple[Any, ...] = ()

    def wait(self, objects: Sequence[Any], timeout: float) -> list[Any]:
        """The objects ready to read (or at EOF) within ``timeout`` seconds."""
        if self._selector is None or tuple(objects) != self._objects:
            self.close()
            self._selector = selectors.PollSelector()
            for item in objects:
                self._selector.register(item, selectors.EVENT_READ)
            self._objects = tuple(objects)
        return [key.fileobj for key, _ in self._selector.select(timeout)]

    def close(self) -> None:
        """Forget the objects (idempotent)."""
        if self._selector is not None:
            self._selector.close()
        self._selector, self._objects = None, ()


class _Pipeline:
    """One run of the pipeline: its parts, its state, its main loop and shutdown."""

    def __init__(self, items: Iterable[Job | Outcome], lifecycle: Lifecycle) -> None:
        settings = lifecycle.settings
        self._lifecycle = lifecycle
        self._state = State.RUNNING
        self._stop_deadline = 0.0
        self._last_progress = time.monotonic()
        self._wakeup = Wakeup()
        self._waiter = _Waiter()
        mp = mp_context()
        remote = settings.download_processes > 1
        self._feed = Feed(
            items,
            host_limit=settings.http.per_host * settings.download_processes,
            lookahead=HOST_LOOKAHEAD_PER_THREAD * settings.threads,
        )
        # Downloads in this process write over the files the workers are done
        # with (``spares``); download processes keep to new files.
        spares = None
        if not remote:
            most = settings.threads + settings.procs * (1 + WORK_QUEUE_SLACK)
            spares = SpareFiles(lifecycle.context.tmp, most)
        self._pool = TransformPool(lifecycle, mp, self._wakeup, spares)
        self._downloads: Downloads = (
            ProcessDownloads(lifecycle, self._feed, self._pool, mp)
            if remote
            else ThreadDownloads(
                lifecycle, self._feed, self._pool, self._wakeup, spares
            )
        )

    def __enter__(self) -> _Pipeline:
        try:
            self._pool.start()
            self._downloads.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------- main loop

    def run(self) -> Iterator[Outcome]:
        """Yield records until every job has one; then the run is DRAINED."""
        with self._lifecycle.context.cancel.waking(self._wakeup):
            while self._downloads.running or self._pool.busy:
                yield from self._step()
                if self._state is State.STOPPING and self._past_grace():
                    yield from self._abandon()
                    break
            yield from self._finish_workers()
        # Jobs set aside for a busy host when the run was stopped never began.
        set_aside, waiting = self._feed.leftovers()
        for job in set_aside:
            yield self._lifecycle.not_started(job)
        for job in waiting:
            yield self._lifecycle.interrupted(job, Stage.DOWNLOAD)
        self._state = State.DRAINED

    def _step(self) -> Iterator[Outcome]:
        records = chain(self._downloads.pump(), self._wait_and_read())
        for outcome in records:
            self._last_progress = time.monotonic()
            yield outcome
        self._report_stall()

    def _wait_and_read(self) -> Iterator[Outcome]:
        objects = [
            self._wakeup.fileno(),
            *self._pool.wait_objects(),
            *self._downloads.wait_objects(),
        ]
        ready = set(self._waiter.wait(objects, self._timeout()))
        self._wakeup.clear()
        if self._lifecycle.stopping and self._state is State.RUNNING:
            self._stop()
        yield from self._downloads.read(ready)
        yield from self._pool.read(ready)

    def _timeout(self) -> float:
        now = time.monotonic()
        deadlines = [now + TICK_S]
        item_deadline = self._pool.next_deadline()
        if item_deadline is not None:
            deadlines.append(item_deadline)
        if self._state is State.STOPPING:
            deadlines.append(self._stop_deadline)
        return max(0.0, min(deadlines) - now)

    def _report_stall(self) -> None:
        """Name the URLs in progress when nothing has finished for a long while."""
        quiet = time.monotonic() - self._last_progress
        if quiet < self._lifecycle.settings.stall_report:
            return
        self._last_progress = time.monotonic()  # report again after as long
        downloading = self._downloads.in_progress()
        processing = self._pool.processing()
        if downloading or processing:
            _log.warning(
                "no item finished for %.1fs; downloading: %s; processing: %s",
                quiet,
                ", ".join(downloading) or "-",
                ", ".join(processing) or "-",
            )

    # -------------------------------------------------------------- shutdown

    def _stop(self) -> None:
        """Stop feeding and ask every part to finish its current item."""
        self._state = State.STOPPING
        self._stop_deadline = time.monotonic() + SHUTDOWN_GRACE_S
        self._downloads.stop()
        self._pool.stop()

    def _past_grace(self) -> bool:
        return time.monotonic() > self._stop_deadline

    def _abandon(self) -> Iterator[Outcome]:
        """Past the grace period: kill workers, give up on stuck downloads."""
        yield from self._pool.kill_all()
        yield from self._downloads.abandon()

    def _finish_workers(self) -> Iterator[Outcome]:
        """The work is done: let each worker leave, reading it out until it has."""
        if self._state is State.RUNNING:
            self._stop()
        while (self._pool.alive or self._downloads.alive) and not self._past_grace():
            yield from self._step()
        yield from self._downloads.pump()  # files parked when the run stopped

    def close(self) -> None:
        """Release everything this run owns, whatever its state (idempotent)."""
        if self._state is State.CLOSED:
            return
        if self._state is not State.DRAINED:
            # Left early (an error, or the caller stopped iterating).
            self._lifecycle.context.cancel.set("run abandoned")
        if self._state is State.RUNNING:
            self._stop()
        self._downloads.close(self._stop_deadline)
        self._pool.close(self._stop_deadline)
        self._wakeup.close()
        self._waiter.close()
        self._state = State.CLOSED
