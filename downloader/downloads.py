"""The pipeline's downloads, behind one interface: threads here, or download processes.

``ThreadDownloads`` runs ``--threads`` threads in this process sharing one
``httpx.Client``; ``ProcessDownloads`` runs them in ``--download-procs`` processes
(``download_worker``), each with its own client, for many cores, where one process's
GIL caps downloads near ~200 images/s. The coordinator (``pipeline``) drives either
through the same calls: ``start``, ``pump`` (send work out), ``wait_objects`` and
``read`` (records and downloaded files coming back), ``stop``, ``abandon``, ``close``.

Either way a download that must wait before its next attempt does not hold a thread:
it waits in a ``RetryHeap`` (the feed's here, each process's own there) while the
thread downloads other URLs. A finished download is claimed in this process
(``Lifecycle.after_fetch``) and handed to the transform pool; a download thread waits
for a free slot, a download process's file is parked here until one frees.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Protocol

from downloader.children import ChildFault, RestartBudget, StopLine
from downloader.download_worker import (
    Downloaded,
    DownloadEvents,
    DownloadFatal,
    DownloadMessage,
    download_main,
)
from downloader.errors import OutputError, WorkerCrashed
from downloader.feed import Feed
from downloader.fetch import HostLimiter, make_client, network_environ
from downloader.lifecycle import Lifecycle
from downloader.politeness import process_rate
from downloader.progress import EventKind
from downloader.records import Fetched, Job, Outcome, Stage
from downloader.runtime import Wakeup
from downloader.spares import SpareFiles
from downloader.steps import Retry
from downloader.transform_pool import (
    SHUTDOWN_GRACE_S,
    TransformPool,
    crash_error,
    describe_exit,
)
from downloader.worker import WorkerExit

__all__ = [
    "DOWNLOAD_QUEUE_PER_THREAD",
    "Downloads",
    "ProcessDownloads",
    "ThreadDownloads",
]

DOWNLOAD_QUEUE_PER_THREAD = 2
"""Jobs sent to a download process per thread it runs: one being fetched and one
waiting, so a thread never idles while its next job crosses the Queue. More would
only move the waiting line out of the main process, where host scheduling and the
stall report can see it."""


class Downloads(Protocol):
    """What the coordinator needs of the download side, whichever it is."""

    @property
    def running(self) -> bool:
        """True while downloads may still produce records or files."""
        ...

    @property
    def alive(self) -> bool:
        """True while a thread or process of the downloads has not ended."""
        ...

    def start(self) -> None:
        """Start the threads or processes."""
        ...

    def pump(self) -> Iterator[Outcome]:
        """Send work out and hand waiting files on; records of what could not go."""
        ...

    def wait_objects(self) -> list[Connection | int]:
        """Pipes and sentinels to wait on (threads wake the coordinator instead)."""
        ...

    def read(self, ready: Container[object]) -> Iterator[Outcome]:
        """Records that came back, and of anything that died."""
        ...

    def stop(self) -> None:
        """Start nothing new; let what is in progress end as ``interrupted``."""
        ...

    def abandon(self) -> Iterator[Outcome]:
        """Past the grace period: record what is still in progress, give up on it."""
        ...

    def close(self, deadline: float) -> None:
        """Join everything until ``deadline`` (monotonic), then kill (idempotent)."""
        ...

    def in_progress(self) -> list[str]:
        """URLs being downloaded now, for the stall report."""
        ...


@dataclass(frozen=True, slots=True)
class _ThreadDone:
    lane: str


@dataclass(frozen=True, slots=True)
class _ThreadCrashed:
    lane: str
    traceback: str


_ThreadMessage = Outcome | _ThreadDone | _ThreadCrashed


class ThreadDownloads:
    """``--threads`` download threads in this process, one shared ``httpx.Client``."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        feed: Feed,
        pool: TransformPool,
        wakeup: Wakeup,
        spares: SpareFiles | None = None,
    ) -> None:
        self._lifecycle = lifecycle
        self._spares = spares
        self._feed = feed
        self._pool = pool
        self._wakeup = wakeup
        settings = lifecycle.settings
        self._client = make_client(settings.http, settings.threads)
        self._hosts = HostLimiter(
            settings.http.per_host, process_rate(settings.http, 1)
        )
        self._outbox: queue.SimpleQueue[_ThreadMessage] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._running = 0

    @property
    def running(self) -> bool:
        return self._running > 0

    @property
    def alive(self) -> bool:
        return self._running > 0

    def start(self) -> None:
        for number in range(self._lifecycle.settings.threads):
            lane = f"thread-{number}"
            thread = threading.Thread(
                target=self._loop, args=(lane,), name=lane, daemon=True
            )
            self._threads.append(thread)
            self._running += 1
            thread.start()

    def pump(self) -> Iterator[Outcome]:
        return iter(())

    def wait_objects(self) -> list[Connection | int]:
        return []

    def read(self, ready: Container[object]) -> Iterator[Outcome]:
        while True:
            try:
                message = self._outbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, Outcome):
                yield message
            elif isinstance(message, _ThreadDone):
                self._running -= 1
            else:
                self._lifecycle.fail_run(
                    WorkerCrashed(
                        f"download thread {message.lane} crashed:\n{message.traceback}"
                    )
                )

    def stop(self) -> None:
        self._feed.stop()

    def abandon(self) -> Iterator[Outcome]:
        stuck = self._feed.abandon()
        yield from self.read(set())
        for job in stuck:
            yield self._lifecycle.interrupted(job, Stage.DOWNLOAD)

    def close(self, deadline: float) -> None:
        self._feed.stop()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._client.close()

    def in_progress(self) -> list[str]:
        return self._feed.in_progress()

    # --------------------------------------------------------- in each thread

    def _loop(self, lane: str) -> None:
        try:
            while not self._lifecycle.stopping:
                item = self._feed.next_item(lane)
                if item is None:
                    break
                if isinstance(item, Outcome):
                    self._post(item)
                else:
                    self._download(lane, item)
        except BaseException:  # noqa: BLE001 (thread boundary: report to the main loop)
            job = self._feed.release(lane)
            if job is not None:
                self._post(self._lifecycle.interrupted(job, Stage.DOWNLOAD))
            self._post(_ThreadCrashed(lane, traceback.format_exc()))
        finally:
            self._post(_ThreadDone(lane))

    def _download(self, lane: str, item: Job | Retry) -> None:
        job = item.job if isinstance(item, Retry) else item
        lifecycle = self._lifecycle
        try:
            fetched = lifecycle.fetch(
                item,
                self._client,
                self._hosts,
                lane,
                defer=True,
                worker_hashes=True,
                spares=self._spares,
            )
        finally:
            self._feed.done(job)
        if isinstance(fetched, Retry):
            self._feed.put_aside(lane, fetched)
            return
        result = lifecycle.after_fetch(fetched)
        if isinstance(result, Fetched) and self._pool.hand_off(result):
            self._feed.release(lane)
            return
        if isinstance(result, Fetched):  # the run is stopping: no worker takes it
            result = lifecycle.interrupted(job, Stage.TRANSFORM, result)
        if self._feed.release(lane) is not None and result is not None:
            self._post(result)

    def _post(self, message: _ThreadMessage) -> None:
        self._outbox.put(message)
        self._wakeup.wake()


@dataclass(eq=False)
class _Downloader:
    """A download process, its channels, and the jobs sent to it not yet answered."""

    number: int
    threads: int
    process: BaseProcess
    inbox: Queue[Job | None]
    reader: Connection
    assigned: dict[int, Job] = field(default_factory=dict)
    started: set[int] = field(default_factory=set)
    """Jobs it began (their download ``started`` event came back)."""
    fault: ChildFault | None = None

    @property
    def lane(self) -> str:
        return f"dl-{self.number}"

    @property
    def full(self) -> bool:
        return len(self.assigned) >= DOWNLOAD_QUEUE_PER_THREAD * self.threads


class ProcessDownloads:
    """``--download-procs`` download processes, ``--threads`` split between them.

    The coordinator's ``pump`` sends a process a job only while it has fewer than
    ``DOWNLOAD_QUEUE_PER_THREAD`` jobs per thread in flight, no downloaded file is
    parked and a transform slot is free; files that arrive with no free slot are
    parked here until one frees. ``--per-host`` applies per download process (each
    has its own ``HostLimiter``). A dead download process is replaced; each job it
    held counts a crash (``Lifecycle.crashed``: sent out again once, then failed).
    """

    def __init__(
        self,
        lifecycle: Lifecycle,
        feed: Feed,
        pool: TransformPool,
        mp: ForkServerContext | SpawnContext,
    ) -> None:
        self._lifecycle = lifecycle
        self._feed = feed
        self._pool = pool
        self._mp = mp
        self._count = lifecycle.settings.download_processes
        self._processes: list[_Downloader] = []
        self._stop_line = StopLine(mp)
        """At its EOF every download process cancels its downloads."""
        self._numbers = iter(range(1_000_000))
        self._parked: deque[Fetched] = deque()
        """Downloaded files waiting for a transform slot."""
        self._stopping = False
        self._restarts = RestartBudget(self._count)

    @property
    def running(self) -> bool:
        in_flight = any(process.assigned for process in self._processes)
        more = not (self._feed.exhausted or self._stopping)
        return in_flight or bool(self._parked) or (more and bool(self._processes))

    @property
    def alive(self) -> bool:
        return bool(self._processes)

    def start(self) -> None:
        for number in range(self._count):
            self._processes.append(self._start(self._threads_of(number)))

    def _threads_of(self, number: int) -> int:
        """Download threads of process ``number``: an even share, at least one."""
        share, rest = divmod(self._lifecycle.settings.threads, self._count)
        return max(1, share + (number < rest))

    def _start(self, threads: int) -> _Downloader:
        reader, writer = self._mp.Pipe(duplex=False)
        # Room for its jobs in flight plus one end-of-work sentinel per thread.
        slots = (DOWNLOAD_QUEUE_PER_THREAD + 1) * threads
        inbox: Queue[Job | None] = self._mp.Queue(maxsize=slots)
        number = next(self._numbers)
        lane = f"dl-{number}"
        context = self._lifecycle.context
        process = self._mp.Process(
            target=download_main,
            args=(
                inbox,
                writer,
                self._stop_line.reader,
                self._lifecycle.settings,
                str(context.out),
                str(context.tmp),
                lane,
                threads,
                number,
                network_environ(),
            ),
            name=f"downloader-{lane}",
            daemon=True,
        )
        process.start()
        writer.close()
        return _Downloader(number, threads, process, inbox, reader)

    def pump(self) -> Iterator[Outcome]:
        """Hand parked files to free transform slots, then send out more jobs."""
        if self._stopping:
            yield from self._drop_parked()
            return
        while self._parked and self._pool.hand_off(self._parked[0], wait=False):
            self._parked.popleft()
        while not self._parked and self._pool.has_room:
            process = min(
                self._processes,
                key=lambda p: len(p.assigned) / p.threads,
                default=None,
            )
            if process is None or process.full:
                return
            item = self._feed.take()
            if item is None:
                return
            if isinstance(item, Outcome):
                yield item
            else:
                process.assigned[item.index] = item
                process.inbox.put_nowait(item)

    def wait_objects(self) -> list[Connection | int]:
        objects: list[Connection | int] = []
        for process in self._processes:
            objects += [process.reader, process.process.sentinel]
        return objects

    def read(self, ready: Container[object]) -> Iterator[Outcome]:
        for process in list(self._processes):
            if process.reader in ready or process.process.sentinel in ready:
                yield from self._read(process)

    def _read(self, process: _Downloader) -> Iterator[Outcome]:
        try:
            while process.reader.poll():
                message: DownloadMessage = process.reader.recv()
                yield from self._handle(process, message)
        except (EOFError, OSError):
            pass
        else:
            if process.process.is_alive():
                return
        yield from self._bury(process)

    def _handle(
        self, process: _Downloader, message: DownloadMessage
    ) -> Iterator[Outcome]:
        lifecycle = self._lifecycle
        if isinstance(message, DownloadEvents):
            for event in message.events:
                if event.kind is EventKind.STARTED:
                    process.started.add(event.index)
                lifecycle.context.events(event)
        elif isinstance(message, Downloaded):
            job = process.assigned.pop(message.index)
            process.started.discard(message.index)
            self._feed.done(job)
            self._restarts.succeeded()
            claimed = lifecycle.after_fetch(message.result)
            if isinstance(claimed, Fetched):
                self._parked.append(claimed)
            elif claimed is not None:
                yield claimed
        elif isinstance(message, DownloadFatal):
            lifecycle.fail_run(OutputError(message.reason))
        elif isinstance(message, WorkerExit):
            lifecycle.context.usage.add_worker_cpu(message.cpu_s)
        else:
            process.fault = message

    def _bury(self, process: _Downloader) -> Iterator[Outcome]:
        """Account for a download process that exited: its jobs, its successor."""
        process.process.join(SHUTDOWN_GRACE_S)
        if process.fault is not None:
            who = f"download process {process.lane}"
            self._lifecycle.fail_run(crash_error(who, process.fault))
        self._processes.remove(process)
        if not self._stopping and self._keep_restarting(process):
            self._processes.append(self._start(process.threads))
        _discard_channels(process)
        reason = f"download process crashed ({describe_exit(process.process)})"
        for job in process.assigned.values():
            self._feed.done(job)
            if self._stopping:
                if job.index in process.started:
                    yield self._lifecycle.interrupted(job, Stage.DOWNLOAD)
                else:
                    yield self._lifecycle.not_started(job)
                continue
            outcome = self._lifecycle.crashed(job, None, reason)
            if outcome is not None:
                yield outcome
            elif self._processes:
                self._feed.requeue(job)
            else:
                yield self._lifecycle.interrupted(job, Stage.DOWNLOAD)

    def _keep_restarting(self, process: _Downloader) -> bool:
        if not self._restarts.allow():
            self._lifecycle.fail_run(
                WorkerCrashed(
                    "download processes keep dying "
                    f"({describe_exit(process.process)}); giving up"
                )
            )
            return False
        return True

    def _drop_parked(self) -> Iterator[Outcome]:
        while self._parked:
            fetched = self._parked.popleft()
            yield self._lifecycle.interrupted(fetched.job, Stage.TRANSFORM, fetched)

    def stop(self) -> None:
        self._stopping = True
        self._feed.stop()
        self._stop_line.stop()
        for process in self._processes:
            with contextlib.suppress(ValueError, queue.Full, OSError):
                for _ in range(process.threads):
                    process.inbox.put_nowait(None)

    def abandon(self) -> Iterator[Outcome]:
        for process in list(self._processes):
            process.process.kill()
            yield from self._bury(process)
        yield from self._drop_parked()

    def close(self, deadline: float) -> None:
        for process in self._processes:
            process.process.join(max(0.0, deadline - time.monotonic()))
            if process.process.is_alive():
                process.process.kill()
                process.process.join(SHUTDOWN_GRACE_S)
            _discard_channels(process)
        self._processes.clear()
        self._stop_line.close()
        for fetched in self._parked:
            self._lifecycle.interrupted(fetched.job, Stage.TRANSFORM, fetched)
        self._parked.clear()

    def in_progress(self) -> list[str]:
        urls = self._feed.in_progress()
        for process in self._processes:
            urls += [job.url for job in process.assigned.values()]
        return urls


def _discard_channels(process: _Downloader) -> None:
    process.reader.close()
    process.inbox.cancel_join_thread()
    process.inbox.close()
