"""The threads → Queue → processes → Pipes engine; the only owner of its pools.

::

    jobs ─► feed ─► N download threads ─fetch─► handoff ─► inbox Queue per worker
            (lock)        │ failed / ready records    (bounded)            │
                          ▼                                                ▼
             outbox (SimpleQueue + self-pipe)                    P worker processes
                          │                                      transform_file()
                          ▼                                                │ Pipe
             main loop: connection.wait(self-pipe, worker Pipes, sentinels) ◄─┘
                          │
                          └─► yields one Outcome per job (the caller writes manifest)

With ``Settings.download_processes`` = D > 1 the download threads run in D download
processes (``download_worker``) instead, and the main loop feeds them itself::

    jobs ─► feed ─► main loop ──► inbox Queue per download process (≤ 2 per thread)
                      ▲  │                               │
                      │  │                               ▼
                      │  │            D download processes, N/D threads each
                      │  │            (own httpx.Client, own per-host limit)
                      │  │                               │ Pipe: events, Downloaded
                      └──┼── wait(their Pipes, sentinels) ◄─┘ (a path | failed record)
                         │
                         └─► claim ─► parked ─► handoff ─► inbox Queue per worker ─► …

- Download threads share one ``httpx.Client``; each finished file is claimed
  (``reuse.ContentIndex``: a body already done or in progress is not transformed
  again) and handed to the worker with the fewest assigned tasks as a ``Task`` (a
  path, never the bytes).
- A download that must wait before its next attempt (503, 429 Retry-After, reset)
  does not hold its thread: it goes into a heap of waiting retries by due time, and
  the thread takes other work. Due retries come before new jobs; a thread with only
  not-yet-due retries left waits on a Condition until the earliest is due. Retries
  still waiting when the run is stopped end as ``interrupted``.
- Backpressure: at most ``procs * (1 + WORK_QUEUE_SLACK)`` files wait for or are in a
  worker; a download thread that finds no free slot waits, so memory and scratch space
  stay bounded whatever the length of the list.
- Each worker has its own inbox Queue and its own Pipe back. A killed worker can damage
  only its own channels, which are thrown away with it (a shared Queue whose reader dies
  holding its lock would hang every other worker).
- The main loop wakes on a message, a dead worker (its sentinel) or a deadline. A dead
  worker's started item is retried once on a fresh worker, then failed; its queued items
  go to other workers; the worker is replaced.
- Download processes (D > 1): the main loop sends a process a job only while it has
  fewer than ``DOWNLOAD_QUEUE_PER_THREAD`` jobs per thread in flight, no downloaded file
  is parked and a transform slot is free; files that arrive with no free slot are
  parked in the main process until one frees. ``--per-host`` applies per download
  process (each has its own ``HostLimiter``), so a host may see D times per-host
  connections. A dead download process is replaced; every job it held is retried once
  on another, then failed.
- One shutdown path (``_stop`` then ``_close``) for the normal end, errors and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import signal
import sys
import threading
import time
import traceback
import urllib.parse
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from types import TracebackType

from downloader.download_worker import (
    Downloaded,
    DownloadEvents,
    DownloadFatal,
    DownloadMessage,
    RetryHeap,
    download_main,
)
from downloader.errors import OutputError, WorkerCrashed
from downloader.fetch import HostLimiter, make_client
from downloader.progress import EventKind
from downloader.records import Fetched, Job, Outcome, Stage
from downloader.reuse import Claim
from downloader.runtime import RunContext, Wakeup
from downloader.settings import Settings
from downloader.steps import (
    Retry,
    discard,
    emit,
    fetch_deferring,
    finish_success,
    interrupted,
    not_started,
)
from downloader.worker import (
    Task,
    TaskDone,
    TaskFailed,
    TaskStarted,
    WorkerExit,
    WorkerMessage,
    WorkerRetired,
    worker_main,
)

__all__ = ["mp_context", "run_pipeline"]

_log = logging.getLogger("downloader")

# Tasks queued per worker beyond the one it is running. Two absorb a burst of finished
# downloads without starving a worker; more would strand more work behind a slow image
# and keep more downloaded files on disk at once.
WORK_QUEUE_SLACK = 2
# Longest the main loop sleeps without a message: it bounds how late a stuck item's
# deadline or a stop request is noticed.
TICK_S = 0.5
# Time given to workers and download threads to finish their current item on stop.
SHUTDOWN_GRACE_S = 5.0
# Replacing workers that keep dying before finishing anything would loop forever.
MAX_FRUITLESS_RESTARTS_PER_WORKER = 3
# Jobs per download thread that may be set aside while their host is at --per-host, so
# that threads serve other hosts instead of queueing behind one (a list sorted by host
# would otherwise starve every other host). More would read further ahead of the list.
HOST_LOOKAHEAD_PER_THREAD = 4
# Jobs sent to a download process per thread it runs: one being fetched and one waiting,
# so a thread never idles while its next job crosses the Queue. More would only move
# the waiting line out of the main process, where host scheduling and the stall report
# can see it.
DOWNLOAD_QUEUE_PER_THREAD = 2


def mp_context() -> ForkServerContext | SpawnContext:
    """Return the explicit start method: forkserver on Linux, spawn elsewhere.

    Never plain fork: the main process runs threads (httpx, tqdm) by the time a worker
    may be replaced, and forking a threaded process can deadlock the child.
    """
    if sys.platform == "linux":
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["downloader.worker"])
        return context
    return multiprocessing.get_context("spawn")


def run_pipeline(
    items: Iterable[Job | Outcome],
    settings: Settings,
    context: RunContext,
    claim: Claim,
) -> Iterator[Outcome]:
    """Download with threads and transform in worker processes; yield each outcome."""
    with _Pipeline(settings, context, claim) as pipeline:
        yield from pipeline.run(items)


@dataclass(eq=False)
class _Worker:
    number: int
    process: BaseProcess
    inbox: Queue[Task | None]
    reader: Connection
    assigned: dict[int, Fetched] = field(default_factory=dict)
    current: int | None = None
    started_at: float = 0.0
    heard_at: float = field(default_factory=time.monotonic)
    """When the worker last sent a message, or got work while it had none."""
    retiring: bool = False
    timed_out: bool = False
    error: str | None = None

    @property
    def lane(self) -> str:
        return f"proc-{self.number}"


@dataclass(eq=False)
class _Downloader:
    """A download process, its channels, and the jobs sent to it not yet answered."""

    number: int
    threads: int
    process: BaseProcess
    inbox: Queue[Job | None]
    reader: Connection
    stop: Connection
    """Closing it tells the process to cancel its downloads."""
    assigned: dict[int, Job] = field(default_factory=dict)
    error: str | None = None

    @property
    def lane(self) -> str:
        return f"dl-{self.number}"

    @property
    def full(self) -> bool:
        return len(self.assigned) >= DOWNLOAD_QUEUE_PER_THREAD * self.threads


@dataclass(frozen=True, slots=True)
class _ThreadDone:
    lane: str


@dataclass(frozen=True, slots=True)
class _ThreadCrashed:
    lane: str
    traceback: str


@dataclass(frozen=True, slots=True)
class _Fatal:
    error: OutputError


_ThreadMessage = Outcome | _ThreadDone | _ThreadCrashed | _Fatal


def _host_of(url: str) -> str:
    """Return the host:port a job's first request goes to (for scheduling only)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.hostname}:{port or parts.scheme}"


def _describe_exit(process: BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


class _Pipeline:
    """One run of the pipeline: owns the client, threads, workers, queues and pipes."""

    def __init__(self, settings: Settings, context: RunContext, claim: Claim) -> None:
        self._settings = settings
        self._context = context
        self._claim = claim
        self._mp = mp_context()
        self._stop_workers = self._mp.Event()
        self._workers: list[_Worker] = []
        self._worker_numbers = iter(range(1_000_000))
        self._capacity = settings.procs * (1 + WORK_QUEUE_SLACK)
        self._free_slots = self._capacity
        self._handoff = threading.Condition()
        self._outbox: queue.SimpleQueue[_ThreadMessage] = queue.SimpleQueue()
        self._wakeup = Wakeup()
        self._threads: list[threading.Thread] = []
        self._threads_running = 0
        self._in_flight: dict[str, Job] = {}
        self._feed_lock = threading.Lock()
        self._retry_due = threading.Condition(self._feed_lock)
        """Notified when a retry is put aside, and on stop."""
        self._waiting = RetryHeap()
        self._feed: Iterator[Job | Outcome] = iter(())
        self._deferred: deque[Job] = deque()
        self._host_load: Counter[str] = Counter()
        self._crashes: Counter[int] = Counter()
        self._fruitless_restarts = 0
        self._download_procs = settings.download_processes
        self._remote = self._download_procs > 1
        """Downloads run in download processes, not in threads of this one."""
        self._host_limit = settings.http.per_host * self._download_procs
        self._downloaders: list[_Downloader] = []
        self._downloader_numbers = iter(range(1_000_000))
        self._parked: deque[Fetched] = deque()
        """Downloaded files waiting for a transform slot (download processes only)."""
        self._feed_done = False
        self._lost_downloads: Counter[int] = Counter()
        self._fruitless_download_restarts = 0
        self._stopping = False
        self._finished = False
        self._abandoned = False
        self._stop_deadline = 0.0
        self._error: BaseException | None = None
        self._last_progress = time.monotonic()
        self._exit_stack = contextlib.ExitStack()

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> _Pipeline:
        try:
            for _ in range(self._settings.procs):
                self._workers.append(self._start_worker())
            if self._remote:
                for number in range(self._download_procs):
                    self._downloaders.append(
                        self._start_downloader(self._threads_of(number))
                    )
            else:
                self._client = self._exit_stack.enter_context(
                    make_client(self._settings.http, self._settings.threads)
                )
                self._hosts = HostLimiter(self._settings.http.per_host)
            self._exit_stack.enter_context(self._context.cancel.waking(self._wakeup))
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def _start_worker(self) -> _Worker:
        reader, writer = self._mp.Pipe(duplex=False)
        inbox: Queue[Task | None] = self._mp.Queue(maxsize=self._capacity + 1)
        number = next(self._worker_numbers)
        process = self._mp.Process(
            target=worker_main,
            args=(
                inbox,
                writer,
                self._stop_workers,
                str(self._context.out),
                self._settings.image,
                self._settings.max_tasks_per_worker,
            ),
            name=f"downloader-worker-{number}",
            daemon=True,
        )
        process.start()
        writer.close()  # the parent keeps no writer end: EOF means the worker is gone
        return _Worker(number, process, inbox, reader)

    def _threads_of(self, number: int) -> int:
        """Download threads of process ``number``: an even share, at least one."""
        share, rest = divmod(self._settings.threads, self._download_procs)
        return max(1, share + (number < rest))

    def _start_downloader(self, threads: int) -> _Downloader:
        reader, writer = self._mp.Pipe(duplex=False)
        stop_reader, stop = self._mp.Pipe(duplex=False)
        # Room for its jobs in flight plus one end-of-work sentinel per thread.
        slots = (DOWNLOAD_QUEUE_PER_THREAD + 1) * threads
        inbox: Queue[Job | None] = self._mp.Queue(maxsize=slots)
        number = next(self._downloader_numbers)
        lane = f"dl-{number}"
        process = self._mp.Process(
            target=download_main,
            args=(
                inbox,
                writer,
                stop_reader,
                self._settings,
                str(self._context.out),
                str(self._context.tmp),
                lane,
                threads,
            ),
            name=f"downloader-{lane}",
            daemon=True,
        )
        process.start()
        writer.close()
        stop_reader.close()
        return _Downloader(number, threads, process, inbox, reader, stop)

    # ------------------------------------------------------------------ main loop

    def run(self, items: Iterable[Job | Outcome]) -> Iterator[Outcome]:
        """Start the download threads, then yield outcomes until all work is done."""
        self._feed = iter(items)
        for number in range(0 if self._remote else self._settings.threads):
            lane = f"thread-{number}"
            thread = threading.Thread(
                target=self._download_loop, args=(lane,), name=lane, daemon=True
            )
            self._threads.append(thread)
            self._threads_running += 1
            thread.start()
        while self._downloading() or self._workers_busy():
            yield from self._step()
            if self._stopping and time.monotonic() > self._stop_deadline:
                yield from self._abandon_stragglers()
                break
        yield from self._finish_workers()
        # Jobs set aside for a busy host when the run was stopped never began.
        reason = self._context.cancel.reason or "interrupted"
        with self._feed_lock:
            set_aside, self._deferred = list(self._deferred), deque()
            waiting = self._waiting.drain()
        for job in set_aside:
            yield not_started(job, reason)
        for job in waiting:
            yield interrupted(job, Stage.DOWNLOAD)
        self._finished = True
        if self._error is not None:
            raise self._error

    def _workers_busy(self) -> bool:
        return any(worker.assigned for worker in self._workers)

    def _downloading(self) -> bool:
        if not self._remote:
            return self._threads_running > 0
        in_flight = any(downloader.assigned for downloader in self._downloaders)
        return (
            in_flight or bool(self._parked) or not (self._feed_done or self._stopping)
        )

    def _step(self) -> Iterator[Outcome]:
        for outcome in chain(self._pump(), self._wait_and_read()):
            self._last_progress = time.monotonic()
            yield outcome
        self._report_stall()

    def _wait_and_read(self) -> Iterator[Outcome]:
        ready = set(wait(self._wait_objects(), self._timeout()))
        self._wakeup.clear()
        if self._context.cancel.is_set() and not self._stopping:
            self._stop()
        yield from self._read_outbox()
        for worker in list(self._workers):
            if worker.reader in ready or worker.process.sentinel in ready:
                yield from self._read_worker(worker)
        for downloader in list(self._downloaders):
            if downloader.reader in ready or downloader.process.sentinel in ready:
                yield from self._read_downloader(downloader)
        self._enforce_deadlines()

    def _report_stall(self) -> None:
        """Name the URLs in progress when nothing has finished for a long while."""
        quiet = time.monotonic() - self._last_progress
        if quiet < self._settings.stall_report:
            return
        self._last_progress = time.monotonic()  # report again after as long
        with self._feed_lock:
            downloading = [job.url for job in self._in_flight.values()]
            downloading += [
                f"{job.url} (retry waiting)" for job in self._waiting.jobs()
            ]
        for downloader in self._downloaders:
            downloading += [job.url for job in downloader.assigned.values()]
        processing = [
            worker.assigned[worker.current].job.url
            for worker in self._workers
            if worker.current in worker.assigned
        ]
        if downloading or processing:
            _log.warning(
                "no item finished for %.1fs; downloading: %s; processing: %s",
                quiet,
                ", ".join(downloading) or "-",
                ", ".join(processing) or "-",
            )

    def _wait_objects(self) -> list[Connection | int]:
        objects: list[Connection | int] = [self._wakeup.fileno()]
        channels: list[_Worker | _Downloader] = [*self._workers, *self._downloaders]
        for channel in channels:
            objects += [channel.reader, channel.process.sentinel]
        return objects

    def _timeout(self) -> float:
        now = time.monotonic()
        deadlines = [
            worker.started_at + self._settings.item_timeout
            for worker in self._workers
            if worker.current is not None
        ]
        if self._stopping:
            deadlines.append(self._stop_deadline)
        return max(0.0, min([now + TICK_S, *deadlines]) - now)

    # ----------------------------------------------------------- download threads

    def _download_loop(self, lane: str) -> None:
        try:
            while not self._context.cancel.is_set():
                item = self._next_item(lane)
                if item is None:
                    break
                if isinstance(item, Outcome):
                    self._post(item)
                    continue
                job = item.job if isinstance(item, Retry) else item
                try:
                    fetched = fetch_deferring(
                        item,
                        self._client,
                        self._settings,
                        self._context,
                        self._hosts,
                        lane,
                    )
                finally:
                    self._fetched(job)
                if isinstance(fetched, Retry):
                    self._wait_to_retry(lane, fetched)
                    continue
                result = (
                    self._claim(fetched) if isinstance(fetched, Fetched) else fetched
                )
                if result is None:
                    self._defer(lane)
                elif isinstance(result, Outcome):
                    self._settle(lane, result)
                else:
                    self._hand_off(lane, result)
        except OutputError as exc:
            # The job this thread was on still needs its one record.
            with self._feed_lock:
                lost = self._in_flight.pop(lane, None)
            if lost is not None:
                self._post(Outcome.failure(lost, Stage.DOWNLOAD, str(exc)))
            self._post(_Fatal(exc))
        except BaseException:  # noqa: BLE001 (thread boundary: report to the main loop)
            self._post(_ThreadCrashed(lane, traceback.format_exc()))
        finally:
            self._post(_ThreadDone(lane))

    def _next_item(self, lane: str) -> Job | Retry | Outcome | None:
        """Take a due retry, the next record, or the next job whose host is free.

        With the feed used up and only retries not yet due, wait for the earliest
        (or a stop); None once the feed and the retries are both done.
        """
        with self._retry_due:
            while True:
                item = self._take_due() or self._take()
                if isinstance(item, Job | Retry):
                    self._in_flight[lane] = (
                        item.job if isinstance(item, Retry) else item
                    )
                if item is not None or not self._waiting:
                    return item
                if self._context.cancel.is_set():
                    return None
                self._retry_due.wait(self._waiting.until_next())

    def _take_due(self) -> Retry | None:
        """Take the earliest retry if due (feed lock held); count it on its host."""
        retry = self._waiting.pop_due()
        if retry is not None:
            self._host_load[_host_of(retry.job.url)] += 1
        return retry

    def _wait_to_retry(self, lane: str, retry: Retry) -> None:
        """Put ``lane``'s job aside until its retry is due; the thread moves on."""
        with self._retry_due:
            if self._abandoned:
                return  # the main loop gave up on it and recorded it
            self._in_flight.pop(lane, None)
            self._waiting.push(retry)
            self._retry_due.notify_all()

    def _take(self) -> Job | Outcome | None:
        """Take the next record or job (feed lock held); count the job on its host."""
        item = self._pick_deferred() or self._pull()
        if isinstance(item, Job):
            self._host_load[_host_of(item.url)] += 1
        return item

    def _pick_deferred(self) -> Job | None:
        for position, job in enumerate(self._deferred):
            if self._host_free(job):
                del self._deferred[position]
                return job
        return None

    def _pull(self) -> Job | Outcome | None:
        limit = HOST_LOOKAHEAD_PER_THREAD * self._settings.threads
        for item in self._feed:
            if isinstance(item, Outcome) or self._host_free(item):
                return item
            self._deferred.append(item)
            if len(self._deferred) > limit:
                # Every host in sight is busy: wait in line for the oldest.
                return self._deferred.popleft()
        return self._deferred.popleft() if self._deferred else None

    def _host_free(self, job: Job) -> bool:
        return self._host_load[_host_of(job.url)] < self._host_limit

    def _fetched(self, job: Job) -> None:
        with self._feed_lock:
            host = _host_of(job.url)
            self._host_load[host] -= 1
            if not self._host_load[host]:
                del self._host_load[host]

    def _settle(self, lane: str, outcome: Outcome) -> None:
        """Post the record of ``lane``'s job, unless the main loop gave up on it."""
        with self._feed_lock:
            if self._abandoned:
                return
            self._in_flight.pop(lane, None)
            self._post(outcome)

    def _defer(self, lane: str) -> None:
        """Let go of ``lane``'s job: its body is in progress, its record follows."""
        with self._feed_lock:
            self._in_flight.pop(lane, None)

    def _post(self, message: _ThreadMessage) -> None:
        self._outbox.put(message)
        self._wakeup.wake()

    def _hand_off(self, lane: str, fetched: Fetched) -> None:
        """Give a downloaded file to the least busy worker, waiting for a free slot."""
        with self._handoff:
            while self._free_slots == 0 and not self._stopping:
                self._handoff.wait(TICK_S)
            if not self._stopping and self._workers:
                self._free_slots -= 1
                with self._feed_lock:
                    self._in_flight.pop(lane, None)
                self._assign(fetched)
                return
        discard(fetched)
        self._settle(lane, interrupted(fetched.job, Stage.TRANSFORM, fetched))

    def _assign(self, fetched: Fetched, worker: _Worker | None = None) -> None:
        """Queue ``fetched`` on ``worker`` or the least busy one (handoff lock held)."""
        if worker is None:
            candidates = [w for w in self._workers if not w.retiring] or self._workers
            worker = min(candidates, key=lambda w: len(w.assigned))
        if not worker.assigned:
            worker.heard_at = time.monotonic()
        worker.assigned[fetched.job.index] = fetched
        job = fetched.job
        worker.inbox.put_nowait(Task(job.index, str(fetched.path), job.stem, job.owned))

    def _release(self, fetched: Fetched) -> None:
        discard(fetched)
        with self._handoff:
            self._free_slots += 1
            self._handoff.notify()

    # --------------------------------------------------- download processes (D > 1)

    def _pump(self) -> Iterator[Outcome]:
        """Hand parked files to free transform slots, then send out more jobs."""
        if not self._remote:
            return
        if self._stopping:
            yield from self._drop_parked()
            return
        with self._handoff:
            while self._parked and self._free_slots and self._workers:
                self._free_slots -= 1
                self._assign(self._parked.popleft())
        while not (self._feed_done or self._parked) and self._free_slots:
            downloader = min(
                self._downloaders,
                key=lambda d: len(d.assigned) / d.threads,
                default=None,
            )
            if downloader is None or downloader.full:
                return
            with self._feed_lock:
                item = self._take()
            if item is None:
                self._feed_done = True
            elif isinstance(item, Outcome):
                yield item
            else:
                downloader.assigned[item.index] = item
                downloader.inbox.put_nowait(item)

    def _drop_parked(self) -> Iterator[Outcome]:
        while self._parked:
            fetched = self._parked.popleft()
            discard(fetched)
            yield interrupted(fetched.job, Stage.TRANSFORM, fetched)

    def _read_downloader(self, downloader: _Downloader) -> Iterator[Outcome]:
        try:
            while downloader.reader.poll():
                message: DownloadMessage = downloader.reader.recv()
                yield from self._handle_download(downloader, message)
        except (EOFError, OSError):
            pass
        else:
            if downloader.process.is_alive():
                return
        yield from self._bury_downloader(downloader)

    def _handle_download(
        self, downloader: _Downloader, message: DownloadMessage
    ) -> Iterator[Outcome]:
        if isinstance(message, DownloadEvents):
            for event in message.events:
                self._context.events(event)
        elif isinstance(message, Downloaded):
            job = downloader.assigned.pop(message.index)
            self._fetched(job)
            self._fruitless_download_restarts = 0
            yield from self._downloaded(job, message.result)
        elif isinstance(message, DownloadFatal):
            self._fail(OutputError(message.reason))
        elif isinstance(message, WorkerExit):
            self._context.usage.add_worker_cpu(message.cpu_s)
        else:
            downloader.error = message.traceback

    def _downloaded(self, job: Job, result: Fetched | Outcome) -> Iterator[Outcome]:
        """Claim a download like a download thread does; park it for a worker."""
        try:
            claimed = self._claim(result) if isinstance(result, Fetched) else result
        except OutputError as exc:
            self._fail(exc)
            claimed = Outcome.failure(job, Stage.DOWNLOAD, str(exc))
        if isinstance(claimed, Outcome):
            yield claimed
        elif claimed is not None and self._stopping:
            discard(claimed)
            yield interrupted(claimed.job, Stage.TRANSFORM, claimed)
        elif claimed is not None:
            self._parked.append(claimed)

    def _bury_downloader(self, downloader: _Downloader) -> Iterator[Outcome]:
        """Account for a download process that exited: its jobs, its successor."""
        downloader.process.join(SHUTDOWN_GRACE_S)
        if downloader.error is not None:
            self._fail(
                WorkerCrashed(
                    f"download process {downloader.lane} failed:\n{downloader.error}"
                )
            )
        self._downloaders.remove(downloader)
        if not self._stopping and self._keep_restarting_downloads(downloader):
            self._downloaders.append(self._start_downloader(downloader.threads))
        self._discard_channels(downloader)
        for job in downloader.assigned.values():
            self._fetched(job)
            if self._stopping:
                yield interrupted(job, Stage.DOWNLOAD)
            else:
                yield from self._retry_download(downloader, job)

    def _keep_restarting_downloads(self, downloader: _Downloader) -> bool:
        self._fruitless_download_restarts += 1
        limit = MAX_FRUITLESS_RESTARTS_PER_WORKER * self._download_procs
        if self._fruitless_download_restarts > limit:
            self._fail(
                WorkerCrashed(
                    "download processes keep dying "
                    f"({_describe_exit(downloader.process)}); giving up"
                )
            )
            return False
        return True

    def _retry_download(self, downloader: _Downloader, job: Job) -> Iterator[Outcome]:
        """Send a dead download process's job out again, once; else fail it."""
        self._lost_downloads[job.index] += 1
        retried = self._lost_downloads[job.index] > 1
        if retried or self._stopping or not self._downloaders:
            reason = f"download process crashed ({_describe_exit(downloader.process)})"
            yield Outcome.failure(
                job, Stage.DOWNLOAD, reason + ("; retried once" if retried else "")
            )
        else:
            with self._feed_lock:
                self._deferred.appendleft(job)
            self._feed_done = False

    # ------------------------------------------------------------------ messages

    def _read_outbox(self) -> Iterator[Outcome]:
        while True:
            try:
                message = self._outbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, Outcome):
                yield message
            elif isinstance(message, _ThreadDone):
                self._threads_running -= 1
            elif isinstance(message, _Fatal):
                self._fail(message.error)
            else:
                self._fail(
                    WorkerCrashed(
                        f"download thread {message.lane} crashed:\n{message.traceback}"
                    )
                )

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._context.cancel.set(str(error))
        if not self._stopping:
            self._stop()

    def _read_worker(self, worker: _Worker) -> Iterator[Outcome]:
        try:
            while worker.reader.poll():
                message: WorkerMessage = worker.reader.recv()
                yield from self._handle(worker, message)
        except (EOFError, OSError):
            pass
        else:
            if worker.process.is_alive():
                return
        yield from self._bury(worker)

    def _handle(self, worker: _Worker, message: WorkerMessage) -> Iterator[Outcome]:
        events = self._context.events
        worker.heard_at = time.monotonic()
        if isinstance(message, TaskStarted):
            worker.current = message.index
            worker.started_at = time.monotonic()
            emit(
                events,
                Stage.TRANSFORM,
                EventKind.STARTED,
                message.index,
                worker.lane,
                at=message.time,
            )
        elif isinstance(message, TaskDone | TaskFailed):
            worker.current = None
            fetched = worker.assigned.pop(message.index)
            outcome = self._task_outcome(fetched, message)
            self._release(fetched)
            emit(
                events,
                Stage.TRANSFORM,
                EventKind.FINISHED,
                message.index,
                worker.lane,
                at=message.time,
            )
            yield outcome
        elif isinstance(message, WorkerRetired):
            worker.retiring = True
        elif isinstance(message, WorkerExit):
            self._context.usage.add_worker_cpu(message.cpu_s)
        else:
            worker.error = message.traceback

    def _task_outcome(
        self, fetched: Fetched, message: TaskDone | TaskFailed
    ) -> Outcome:
        """The record of a task a worker ended; a kept download is moved here."""
        if isinstance(message, TaskDone):
            self._fruitless_restarts = 0
            try:
                return finish_success(
                    fetched, message.result, self._context.out, self._settings
                )
            except OutputError as exc:
                self._fail(exc)
                reason = str(exc)
        else:
            reason = message.reason
            if message.fatal:
                self._fail(OutputError(message.reason))
        return Outcome.failure(
            fetched.job,
            Stage.TRANSFORM,
            reason,
            fetched=fetched,
            transform_s=None if isinstance(message, TaskDone) else message.elapsed,
        )

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        limit = self._settings.item_timeout
        for worker in self._workers:
            if worker.timed_out:
                continue
            if worker.current is not None and now - worker.started_at > limit:
                worker.timed_out = True
                worker.process.kill()
            elif worker.assigned and now - worker.heard_at > limit:
                # Work waits but the worker says nothing (stuck before it could
                # start, e.g. blocked on a full stderr pipe): replace it; its queued
                # items go to other workers without counting as a failure.
                worker.process.kill()

    # -------------------------------------------------------------- dead workers

    def _bury(self, worker: _Worker) -> Iterator[Outcome]:
        """Account for a worker that exited: its items, its channels, its successor."""
        worker.process.join(SHUTDOWN_GRACE_S)
        if worker.error is not None:
            self._fail(WorkerCrashed(f"worker {worker.lane} failed:\n{worker.error}"))
        replacement = None
        if not self._stopping and self._keep_restarting(worker):
            replacement = self._start_worker()
        with self._handoff:
            self._workers.remove(worker)
            if replacement is not None:
                self._workers.append(replacement)
        self._discard_channels(worker)
        for index, fetched in worker.assigned.items():
            if self._stopping:
                self._release(fetched)
                yield interrupted(fetched.job, Stage.TRANSFORM, fetched)
            elif index != worker.current:
                with self._handoff:
                    self._assign(fetched)
            else:
                yield from self._retry_or_fail(worker, fetched, replacement)

    def _keep_restarting(self, worker: _Worker) -> bool:
        if worker.retiring and worker.current is None:
            return True
        self._fruitless_restarts += 1
        limit = MAX_FRUITLESS_RESTARTS_PER_WORKER * self._settings.procs
        if self._fruitless_restarts > limit:
            self._fail(
                WorkerCrashed(
                    f"worker processes keep dying ({_describe_exit(worker.process)}); "
                    "giving up"
                )
            )
            return False
        return True

    def _retry_or_fail(
        self, worker: _Worker, fetched: Fetched, replacement: _Worker | None
    ) -> Iterator[Outcome]:
        index = fetched.job.index
        self._crashes[index] += 1
        if worker.timed_out:
            reason = (
                f"processing timed out after {self._settings.item_timeout:g}s "
                "(worker replaced)"
            )
        else:
            reason = (
                f"worker process crashed ({_describe_exit(worker.process)}) "
                "while processing this image"
            )
        if worker.timed_out or self._crashes[index] > 1 or replacement is None:
            if self._crashes[index] > 1:
                reason += "; retried once"
            self._release(fetched)
            yield Outcome.failure(fetched.job, Stage.TRANSFORM, reason, fetched=fetched)
        else:
            with self._handoff:
                self._assign(fetched, replacement)

    @staticmethod
    def _discard_channels(worker: _Worker | _Downloader) -> None:
        worker.reader.close()
        if isinstance(worker, _Downloader):
            worker.stop.close()
        # The tasks still in a dead worker's inbox are tracked in ``assigned`` and
        # handed out again, so its unsent data may be dropped.
        worker.inbox.cancel_join_thread()
        worker.inbox.close()

    # ------------------------------------------------------------------ shutdown

    def _stop(self) -> None:
        """Stop feeding and ask everything to finish its current item."""
        self._stopping = True
        self._stop_deadline = time.monotonic() + SHUTDOWN_GRACE_S
        self._stop_workers.set()
        with self._handoff:
            self._handoff.notify_all()
        with self._retry_due:
            self._retry_due.notify_all()
        for worker in self._workers:
            with contextlib.suppress(ValueError, queue.Full, OSError):
                worker.inbox.put_nowait(None)
        for downloader in self._downloaders:
            downloader.stop.close()
            with contextlib.suppress(ValueError, queue.Full, OSError):
                for _ in range(downloader.threads):
                    downloader.inbox.put_nowait(None)

    def _abandon_stragglers(self) -> Iterator[Outcome]:
        """Past the grace period: kill workers, give up on stuck downloads."""
        for worker in list(self._workers):
            worker.process.kill()
            yield from self._bury(worker)
        for downloader in list(self._downloaders):
            downloader.process.kill()
            yield from self._bury_downloader(downloader)
        yield from self._drop_parked()
        with self._feed_lock:
            self._abandoned = True
            stuck, self._in_flight = list(self._in_flight.values()), {}
        yield from self._read_outbox()
        for job in stuck:
            yield interrupted(job, Stage.DOWNLOAD)

    def _finish_workers(self) -> Iterator[Outcome]:
        """Send each worker its end-of-work sentinel; read them out until they leave."""
        if not self._stopping:
            self._stop()
        while (self._workers or self._downloaders) and (
            time.monotonic() <= self._stop_deadline
        ):
            yield from self._step()
        yield from self._drop_parked()

    def _close(self) -> None:
        """Release everything this run owns, whatever state it is in (idempotent)."""
        if not self._finished:
            # Left early (an error, or the caller stopped iterating): stop the threads.
            self._context.cancel.set("run abandoned")
        if not self._stopping:
            self._stop()
        for thread in self._threads:
            thread.join(max(0.0, self._stop_deadline - time.monotonic()))
        children: list[_Worker | _Downloader] = [*self._workers, *self._downloaders]
        for worker in children:
            worker.process.join(max(0.0, self._stop_deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(SHUTDOWN_GRACE_S)
            self._discard_channels(worker)
        self._workers.clear()
        self._downloaders.clear()
        for fetched in self._parked:
            discard(fetched)
        self._parked.clear()
        self._exit_stack.close()
        self._wakeup.close()
