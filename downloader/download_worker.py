"""The download-process side of the pipeline, when downloads run in several processes.

One process cannot download much past ~200 images/s of ~1 MB files: httpx costs ~5 ms
of CPU per file, all under that process's GIL. With ``Settings.download_procs`` > 1 the
pipeline starts that many download processes, each running ``download_main``::

    inbox Queue (Job | None) ──► T download threads ──fetch──► <tmp>/<stem>.part
    (from the main process)      own httpx.Client, own HostLimiter,     │
                                 one Lifecycle per process              ▼
              Pipe back (one writer, lock-guarded): DownloadEvents (started/finished
              at once, received bytes summed per EVENT_BATCH_S), Downloaded (a
              Fetched: a path, never the bytes; or the failed Outcome), DownloadFatal,
              ChildFault, WorkerExit

The main process keeps everything else: the plan, content claims, the hand-off to
transform workers, the manifest. A download process starts through
``children.child_process``: it ignores SIGINT (the parent coordinates shutdown), exits
when the parent dies, cancels its downloads when its stop Pipe reaches EOF (they end
as ``interrupted`` and leave no ``.part`` file), and sends an unexpected exception
back as a ``ChildFault``; it ends after one ``None`` per thread. Its records come from
one ``Lifecycle`` per process; a local fault (a ``.part`` file that cannot be written)
stops this process's downloads and is sent once as ``DownloadFatal``, right after the
record of the job that hit it. ``--per-host`` applies per download process: each has
its own ``HostLimiter``.

A download that must wait before its next attempt (a 503, a 429's Retry-After, a
reset) does not hold its thread: ``Lifecycle.fetch(…, defer=True)`` returns a
``Retry`` record, the job goes into this process's ``RetryHeap`` (by due time), and
the thread takes other work meanwhile. Threads take due retries before new jobs, and
wait on the inbox only until the earliest due time. Jobs still waiting when the
process is stopped are never reported: the main process records every job it did not
hear back about.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from pathlib import Path

import httpx

from downloader.children import ChildFault, child_process
from downloader.feed import RetryHeap
from downloader.fetch import HostLimiter, make_client, use_network_environ
from downloader.lifecycle import Lifecycle
from downloader.politeness import process_pace
from downloader.progress import EventKind, ProgressEvent
from downloader.records import Fetched, Job, Outcome, Stage
from downloader.runtime import Cancellation, RunContext
from downloader.settings import Settings
from downloader.steps import Retry
from downloader.worker import WorkerExit, cpu_seconds

__all__ = [
    "EVENT_BATCH_S",
    "DownloadEvents",
    "DownloadFatal",
    "DownloadMessage",
    "Downloaded",
    "download_main",
]

EVENT_BATCH_S = 0.1
"""Received bytes are summed and sent at most this often (and before an item's
``finished`` event), so a fast download does not cost a message per read."""


@dataclass(frozen=True, slots=True)
class Downloaded:
    """Job ``index`` is downloaded (its file, by path) or failed (its record)."""

    index: int
    result: Fetched | Outcome


@dataclass(frozen=True, slots=True)
class DownloadEvents:
    """Progress events of this process's threads, in the order they happened."""

    events: tuple[ProgressEvent, ...]


@dataclass(frozen=True, slots=True)
class DownloadFatal:
    """A local fault (a ``.part`` file could not be written): the run must stop."""

    reason: str


DownloadMessage = Downloaded | DownloadEvents | DownloadFatal | ChildFault | WorkerExit


class _Link:
    """This process's end of its Pipe, shared by its threads; batches byte counts.

    A ``DownloadFatal`` goes out once: every thread that finds the process's
    lifecycle failed says so, the first one is sent.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()
        self._fatal_sent = False
        self._received: dict[tuple[int, str], tuple[int, float]] = {}
        """(index, lane) → (bytes not yet reported, time of the latest read)."""
        self._flushed = time.perf_counter()

    def event(self, event: ProgressEvent, /) -> None:
        """Take one progress event (an ``Events`` sink; any thread may call it)."""
        with self._lock:
            if event.kind is not EventKind.BYTES:
                self._send_events(event)
                return
            key = (event.index, event.lane)
            nbytes, _ = self._received.get(key, (0, 0.0))
            self._received[key] = (nbytes + event.nbytes, event.time)
            if event.time - self._flushed >= EVENT_BATCH_S:
                self._send_events()

    def send(self, *messages: DownloadMessage) -> None:
        """Send ``messages`` together, after any byte counts not yet sent."""
        with self._lock:
            if self._received:
                self._send_events()
            for message in messages:
                if isinstance(message, DownloadFatal):
                    if self._fatal_sent:
                        continue
                    self._fatal_sent = True
                self._connection.send(message)

    def _send_events(self, *events: ProgressEvent) -> None:
        """Send the summed byte counts, then ``events`` (lock held)."""
        counts = tuple(
            ProgressEvent(Stage.DOWNLOAD, EventKind.BYTES, index, lane, at, nbytes)
            for (index, lane), (nbytes, at) in self._received.items()
        )
        self._received.clear()
        self._flushed = time.perf_counter()
        self._connection.send(DownloadEvents(counts + events))


class _Waiting:
    """This process's ``RetryHeap``, shared by its threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heap = RetryHeap()

    def push(self, retry: Retry) -> None:
        """Put ``retry`` aside until it is due."""
        with self._lock:
            self._heap.push(retry)

    def next_job(
        self, inbox: Queue[Job | None], cancel: Cancellation
    ) -> Job | Retry | None:
        """A due retry, else the next job from ``inbox``; None on its end or a stop.

        With retries waiting, the inbox is read only until the earliest is due; the
        thread that put one aside waits here too, so each is taken up in time.
        """
        while not cancel.is_set():
            with self._lock:
                retry = self._heap.pop_due()
                timeout = self._heap.until_next()
            if retry is not None:
                return retry
            try:
                return inbox.get(timeout=timeout)
            except queue.Empty:
                continue
        return None  # the main process records the jobs it never heard back about


def _download_loop(
    inbox: Queue[Job | None],
    link: _Link,
    client: httpx.Client,
    lifecycle: Lifecycle,
    hosts: HostLimiter,
    lane: str,
    waiting: _Waiting,
) -> None:
    """Download jobs from ``inbox`` until its ``None`` or a stop; report each."""
    try:
        while (item := waiting.next_job(inbox, lifecycle.context.cancel)) is not None:
            job = item.job if isinstance(item, Retry) else item
            result = lifecycle.fetch(item, client, hosts, lane, defer=True)
            if isinstance(result, Retry):
                waiting.push(result)
                continue
            downloaded = Downloaded(job.index, result)
            if lifecycle.failure is None:
                link.send(downloaded)
            else:  # a local fault: the whole run stops, not only this process
                link.send(downloaded, DownloadFatal(str(lifecycle.failure)))
    except Exception as exc:  # noqa: BLE001 (thread boundary: report to the parent)
        with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
            link.send(ChildFault.capture(exc))


def download_main(
    inbox: Queue[Job | None],
    results: Connection,
    stop: Connection,
    settings: Settings,
    out: str,
    tmp: str,
    lane: str,
    threads: int,
    number: int = 0,
    environ: dict[str, str] | None = None,
) -> None:
    """Run in a download process: ``threads`` threads fetch jobs from ``inbox``.

    ``stop`` is the reader of the parent's ``children.StopLine``: at its EOF the
    downloads in progress are cancelled and no further job is taken. ``number``
    (the lane's) sets this process's phase of the rate per host (``Pace``).
    ``environ``: the parent's variables a client reads (``fetch.network_environ``).
    """
    if environ is not None:
        use_network_environ(environ)
    link = _Link(results)
    cancel = Cancellation()
    try:
        with child_process(stop, cancel.set, link.send):
            context = RunContext(Path(out), Path(tmp), link.event, cancel)
            lifecycle = Lifecycle(settings, context)
            with make_client(settings.http, threads) as client:
                hosts = HostLimiter(
                    settings.http.per_host,
                    process_pace(settings.http, settings.download_processes, number),
                )
                waiting = _Waiting()
                crew = [
                    threading.Thread(
                        target=_download_loop,
                        args=(inbox, link, client, lifecycle, hosts, name, waiting),
                        name=name,
                    )
                    for name in (f"{lane}/thread-{n}" for n in range(threads))
                ]
                for thread in crew:
                    thread.start()
                for thread in crew:
                    thread.join()
    finally:
        with contextlib.suppress(OSError):
            link.send(WorkerExit(cpu_seconds()))
        results.close()
