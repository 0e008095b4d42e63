"""What the schedulers share: the feed loop over futures, hand-over, lanes, CPU totals.

A scheduler decides where and when a job's two steps run; everything it needs that
is not about a job's record (``lifecycle``) is here: ``schedule`` keeps a bounded
number of jobs submitted to an executor and settles each future as it finishes,
``Outbox`` hands results from other threads to the scheduling thread and wakes it,
``Lanes`` names threads and processes for the timeline, ``WorkerCpu`` adds up CPU
time that pool workers report.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future
from multiprocessing.connection import wait
from typing import Any, Generic, TypeVar

from downloader.lifecycle import Lifecycle
from downloader.records import Job, Outcome
from downloader.runtime import Wakeup

__all__ = [
    "IN_FLIGHT_SLACK",
    "TICK_S",
    "Lanes",
    "Launch",
    "Outbox",
    "Runner",
    "Settle",
    "WorkerCpu",
    "jobs_of",
    "schedule",
    "stop_when_left_early",
]

Runner = Callable[[Iterable[Job | Outcome], Lifecycle], Iterator[Outcome]]
"""A scheduler: the planned items (jobs, and ready records to pass through) and the
run's lifecycle in; one record per job it took out (except a job whose claim
deferred it: its record comes from the content index)."""

IN_FLIGHT_SLACK = 2
"""Items submitted per thread or process beyond the one it works on: enough that none
idles while the scheduler reads a result, few enough that a stop leaves little to
cancel and few downloaded files wait on disk."""
TICK_S = 0.5
"""Longest a scheduler waits without news; stop requests and results wake it sooner."""

_T = TypeVar("_T")


class Outbox(Generic[_T]):
    """Things finished in other threads, handed over to the scheduling thread."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[_T] = queue.SimpleQueue()
        self.wakeup = Wakeup()

    def put(self, item: _T) -> None:
        """Hand ``item`` over and wake the scheduler (any thread may call this)."""
        self._items.put(item)
        self.wakeup.wake()

    def wait(self) -> list[_T]:
        """Wait until something arrives (or a tick passes); return all that did."""
        wait([self.wakeup.fileno()], TICK_S)
        self.wakeup.clear()
        arrived = []
        with contextlib.suppress(queue.Empty):
            while True:
                arrived.append(self._items.get_nowait())
        return arrived


class Lanes:
    """Name lanes ``<prefix>-N`` in order of first appearance of a thread or pid."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._names: dict[Hashable, str] = {}
        self._lock = threading.Lock()

    def name(self, key: Hashable) -> str:
        """Return the lane of ``key``, naming it on first sight."""
        with self._lock:
            return self._names.setdefault(key, f"{self._prefix}-{len(self._names)}")


class WorkerCpu:
    """CPU seconds of pool workers, from the running totals their reports carry."""

    def __init__(self) -> None:
        self._by_pid: dict[int, float] = {}

    def record(self, pid: int, cpu_s: float) -> None:
        """Keep the latest total of worker ``pid``."""
        self._by_pid[pid] = max(cpu_s, self._by_pid.get(pid, 0.0))

    def total(self) -> float:
        """Sum over every worker seen (a killed worker counts up to its last report)."""
        return sum(self._by_pid.values())


@contextlib.contextmanager
def stop_when_left_early(lifecycle: Lifecycle) -> Iterator[None]:
    """Stop the run if the block ends by an error or by the caller leaving."""
    try:
        yield
    except BaseException:
        lifecycle.context.cancel.set("run abandoned")
        raise


def jobs_of(
    items: Iterable[Job | Outcome], on_outcome: Callable[[Outcome], None]
) -> Iterator[Job]:
    """Yield the jobs of ``items``, handing ready-made records to ``on_outcome``."""
    for item in items:
        if isinstance(item, Outcome):
            on_outcome(item)
        else:
            yield item


Launch = Callable[[Job], None]
"""Submit a job (again): what ``settle`` calls to run an item once more."""
Settle = Callable[[Future[Any], Job, Launch], Iterator[Outcome]]
"""Turn a finished future of ``job`` into its records (or launch it again)."""


def schedule(
    items: Iterable[Job | Outcome],
    lifecycle: Lifecycle,
    *,
    limit: int,
    submit: Callable[[Job], Future[Any]],
    settle: Settle,
    on_stop: Callable[[], None],
) -> Iterator[Outcome]:
    """Keep up to ``limit`` jobs submitted; yield each record as its future settles.

    Once the run is stopping, no job is taken from ``items`` (``api`` records the rest
    as not started) and ``on_stop`` cancels what the executor has not begun.
    """
    outbox: Outbox[Future[Any]] = Outbox()
    pending: dict[Future[Any], Job] = {}
    ready: list[Outcome] = []
    jobs = jobs_of(items, ready.append)
    feeding, stopped = True, False

    def launch(job: Job) -> None:
        future = submit(job)
        pending[future] = job
        future.add_done_callback(outbox.put)

    try:
        with lifecycle.context.cancel.waking(outbox.wakeup):
            while feeding or pending or ready:
                if not stopped and lifecycle.stopping:
                    # Also once every job is in: what runs must hear of the stop.
                    stopped, feeding = True, False
                    on_stop()
                while feeding and len(pending) < limit:
                    job = next(jobs, None)
                    if job is None:
                        feeding = False
                    else:
                        launch(job)
                yield from ready
                ready.clear()
                if pending:
                    for future in outbox.wait():
                        yield from settle(future, pending.pop(future), launch)
    finally:
        outbox.wakeup.close()
