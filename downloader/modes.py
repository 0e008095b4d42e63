"""The schedulers: one function per ``Mode``, all with the same signature.

Each takes the planned items (jobs, and ready-made records to pass through), the
settings, the run context and the claim (``reuse.ContentIndex.claim``, called on each
download before it is transformed), and yields one ``Outcome`` per job it started,
except for a job whose claim deferred it (its record comes from the index). They
differ only in how they schedule the same two steps (``steps.fetch_step`` or
``fetch.fetch_async``, then ``transform.transform_file``)::

    sequential  this thread: fetch → transform, one item after the other
    threads     ThreadPoolExecutor(threads): fetch → transform per item (one GIL)
    processes   ProcessPoolExecutor(procs): fetch → transform per item, in workers
                with their own httpx.Client (itemwork.process_job); with
                --name-by sha256, fetch (itemwork.fetch_job) → claim here →
                transform (itemwork.transform_task), so that the parent can claim
    pipeline    pipeline.run_pipeline: threads fetch, worker processes transform
    async       an event loop in one thread: TaskGroup of fetch tasks bounded by
                Semaphore(threads), one AsyncClient, aiofiles → transforms in a
                ProcessPoolExecutor(procs) (itemwork.transform_task)

Each scheduler owns its pools in one function and releases them in ``finally``; a
stop request (Ctrl-C, an error, the caller closing the generator) stops feeding,
cancels queued work, lets running items end as "interrupted", then shuts down. Pool
workers that die (SIGKILL, out of memory) break a ``ProcessPoolExecutor``: it is
replaced and the items it held are run again, at most ``MAX_RUNS_PER_ITEM`` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import Any, Generic, TypeVar

from downloader.errors import FetchError, OutputError
from downloader.fetch import (
    AsyncHostLimiter,
    HostLimiter,
    fetch_async,
    make_async_client,
    make_client,
)
from downloader.itemwork import (
    FetchReport,
    JobReport,
    TransformReport,
    fetch_and_transform,
    fetch_job,
    fetched_task,
    init_worker,
    process_job,
    transform_task,
)
from downloader.pipeline import mp_context, run_pipeline
from downloader.progress import EventKind
from downloader.records import Fetched, Job, Outcome, Stage
from downloader.reuse import Claim
from downloader.runtime import RunContext, Wakeup
from downloader.settings import Mode, NameBy, Settings
from downloader.steps import (
    byte_counter,
    discard,
    emit,
    fetch_failure,
    finish_success,
    interrupted,
    passthrough,
    stage_local_reporting,
)
from downloader.transform import configure_pillow
from downloader.worker import TaskDone

__all__ = [
    "RUNNERS",
    "Runner",
    "run_async",
    "run_processes",
    "run_sequential",
    "run_threads",
]

Runner = Callable[
    [Iterable[Job | Outcome], Settings, RunContext, Claim], Iterator[Outcome]
]

# Items submitted per thread or process beyond the one it works on: enough that none
# idles while the scheduler reads a result, few enough that a stop leaves little to
# cancel and few downloaded files wait on disk (compare pipeline.WORK_QUEUE_SLACK).
IN_FLIGHT_SLACK = 2
# Longest a scheduler waits without news; stop requests and results wake it sooner.
TICK_S = 0.5
# An item that was in a pool whose worker died is run again once; the second time it
# fails, so a poison image cannot crash workers forever.
MAX_RUNS_PER_ITEM = 2
# How long the caller waits for the asyncio thread after asking it to stop.
ASYNC_JOIN_S = 30.0

_T = TypeVar("_T")


# ----------------------------------------------------------------- shared parts


class _Outbox(Generic[_T]):
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


class _Lanes:
    """Name lanes ``<prefix>-N`` in order of first appearance of a thread or pid."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._names: dict[Hashable, str] = {}
        self._lock = threading.Lock()

    def name(self, key: Hashable) -> str:
        """Return the lane of ``key``, naming it on first sight."""
        with self._lock:
            return self._names.setdefault(key, f"{self._prefix}-{len(self._names)}")


class _WorkerCpu:
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
def _stop_when_left_early(context: RunContext) -> Iterator[None]:
    """Set the stop flag if the block ends by an error or by the caller leaving."""
    try:
        yield
    except BaseException:
        context.cancel.set("run abandoned")
        raise


class _ProcessPool:
    """A ``ProcessPoolExecutor`` of ``itemwork`` workers, replaced when one dies."""

    def __init__(self, settings: Settings, context: RunContext, stop: Connection):
        self._procs = settings.procs
        self._mp = mp_context()
        self._initargs = (settings, str(context.out), str(context.tmp), stop)
        self.executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self._procs,
            mp_context=self._mp,
            initializer=init_worker,
            initargs=self._initargs,
        )

    def replace(self, broken: ProcessPoolExecutor) -> None:
        """Start a fresh pool if ``broken`` is still the current one."""
        if broken is self.executor:
            broken.shutdown(wait=True, cancel_futures=True)
            self.executor = self._start()

    def close(self) -> None:
        """Cancel queued calls, let running ones end, join the workers."""
        self.executor.shutdown(wait=True, cancel_futures=True)


def _crash_failure(job: Job, fetched: Fetched | None = None) -> Outcome:
    reason = (
        "worker process crashed while this image was in its pool; "
        f"tried {MAX_RUNS_PER_ITEM} times"
    )
    stage = None if fetched is None else Stage.TRANSFORM
    return Outcome.failure(job, stage, reason, fetched=fetched)


# ------------------------------------------------------- futures-based schedulers

_Launch = Callable[[Job], None]
_Settle = Callable[[Future[Any], Job, _Launch], Iterator[Outcome]]


def _schedule(
    items: Iterable[Job | Outcome],
    context: RunContext,
    *,
    limit: int,
    submit: Callable[[Job], Future[Any]],
    settle: _Settle,
    on_stop: Callable[[], None],
) -> Iterator[Outcome]:
    """Keep up to ``limit`` jobs submitted; yield each record as its future settles."""
    outbox: _Outbox[Future[Any]] = _Outbox()
    pending: dict[Future[Any], Job] = {}
    ready: list[Outcome] = []
    jobs = passthrough(items, ready.append)
    feeding = True

    def launch(job: Job) -> None:
        future = submit(job)
        pending[future] = job
        future.add_done_callback(outbox.put)

    try:
        with context.cancel.waking(outbox.wakeup):
            while feeding or pending or ready:
                if feeding and context.cancel.is_set():
                    feeding = False
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


def run_sequential(
    items: Iterable[Job | Outcome],
    settings: Settings,
    context: RunContext,
    claim: Claim,
) -> Iterator[Outcome]:
    """Download then transform each item in turn, in this thread."""
    configure_pillow(settings.image)
    hosts = HostLimiter(settings.http.per_host)
    feed = iter(items)
    with make_client(settings.http, 1) as client:
        # Check before taking an item: what is left of the feed is the caller's.
        while not context.cancel.is_set():
            item = next(feed, None)
            if item is None:
                return
            if isinstance(item, Outcome):
                yield item
                continue
            outcome = fetch_and_transform(
                item, client, hosts, settings, context, "thread-0", claim
            )
            if outcome is not None:
                yield outcome


def _settle_outcome(
    future: Future[Outcome | None], job: Job, launch: _Launch
) -> Iterator[Outcome]:
    if future.cancelled():
        yield interrupted(job, Stage.DOWNLOAD)
        return
    outcome = future.result()
    if outcome is not None:
        yield outcome


def run_threads(
    items: Iterable[Job | Outcome],
    settings: Settings,
    context: RunContext,
    claim: Claim,
) -> Iterator[Outcome]:
    """Download and transform each item in a pool thread; one GIL for all of it."""
    configure_pillow(settings.image)
    lanes = _Lanes("thread")
    hosts = HostLimiter(settings.http.per_host)
    client = make_client(settings.http, settings.threads)
    pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="downloader")

    def work(job: Job) -> Outcome | None:
        lane = lanes.name(threading.get_ident())
        return fetch_and_transform(job, client, hosts, settings, context, lane, claim)

    try:
        with _stop_when_left_early(context):
            yield from _schedule(
                items,
                context,
                limit=settings.threads * (1 + IN_FLIGHT_SLACK),
                submit=lambda job: pool.submit(work, job),
                settle=_settle_outcome,
                on_stop=lambda: pool.shutdown(wait=False, cancel_futures=True),
            )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        client.close()


class _ProcessesRun:
    """Turn worker reports into records, events and CPU totals.

    Names after URLs: one ``process_job`` call per job. Names after content: a
    ``fetch_job`` call, the claim here, then a ``transform_task`` call for a leader.
    """

    def __init__(
        self, pool: _ProcessPool, settings: Settings, context: RunContext, claim: Claim
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.context = context
        self.claim = claim
        self.split = settings.name_by is NameBy.SHA256
        self.lanes = _Lanes("proc")
        self.cpu = _WorkerCpu()
        self.runs: Counter[int] = Counter()
        self.owners: dict[Future[Any], ProcessPoolExecutor] = {}
        self.claimed: dict[int, Fetched] = {}
        """Downloads claimed here, waiting for or in their ``transform_task`` call."""

    def submit(self, job: Job) -> Future[Any]:
        self.runs[job.index] += 1
        executor = self.pool.executor
        fetched = self.claimed.get(job.index)
        future: Future[Any]
        if fetched is not None:
            future = executor.submit(transform_task, fetched_task(fetched))
        elif self.split:
            future = executor.submit(fetch_job, job)
        else:
            future = executor.submit(process_job, job)
        self.owners[future] = executor
        return future

    def settle(
        self, future: Future[Any], job: Job, launch: _Launch
    ) -> Iterator[Outcome]:
        owner = self.owners.pop(future)
        if future.cancelled():
            yield self._stopped(job)
            return
        try:
            report: JobReport | FetchReport | TransformReport = future.result()
        except BrokenProcessPool:
            self.pool.replace(owner)
            if self.context.cancel.is_set():
                yield self._stopped(job)
            elif self.runs[job.index] >= MAX_RUNS_PER_ITEM:
                fetched = self.claimed.pop(job.index, None)
                if fetched is not None:
                    discard(fetched)
                yield _crash_failure(job, fetched)
            else:
                launch(job)
            return
        self.runs.pop(job.index, None)
        self.cpu.record(report.pid, report.cpu_s)
        lane = self.lanes.name(report.pid)
        if isinstance(report, TransformReport):
            fetched = self.claimed.pop(job.index)
            yield _relay_transform(report, fetched, lane, self.context, self.settings)
            return
        for event in report.events:
            self.context.events(replace(event, lane=lane))
        if isinstance(report, JobReport):
            yield report.outcome
        else:
            yield from self._claim(report.result, job, launch)

    def _claim(
        self, result: Fetched | Outcome, job: Job, launch: _Launch
    ) -> Iterator[Outcome]:
        """Claim a download made by ``fetch_job``; a leader goes back to a worker."""
        if isinstance(result, Outcome):
            yield result
        elif self.context.cancel.is_set():
            discard(result)
            yield interrupted(job, Stage.TRANSFORM, result)
        else:
            claimed = self.claim(result)
            if isinstance(claimed, Fetched):
                self.claimed[job.index] = claimed
                launch(job)
            elif claimed is not None:
                yield claimed

    def _stopped(self, job: Job) -> Outcome:
        fetched = self.claimed.pop(job.index, None)
        if fetched is None:
            return interrupted(job, Stage.DOWNLOAD)
        discard(fetched)
        return interrupted(job, Stage.TRANSFORM, fetched)


def run_processes(
    items: Iterable[Job | Outcome],
    settings: Settings,
    context: RunContext,
    claim: Claim,
) -> Iterator[Outcome]:
    """Download and transform each item in a pool worker process."""
    stop_reader, stop_writer = mp_context().Pipe(duplex=False)
    pool = _ProcessPool(settings, context, stop_reader)
    run = _ProcessesRun(pool, settings, context, claim)

    def stop() -> None:
        stop_writer.close()  # every worker's watcher reads EOF: stop downloading
        pool.executor.shutdown(wait=False, cancel_futures=True)

    try:
        with _stop_when_left_early(context):
            yield from _schedule(
                items,
                context,
                limit=settings.procs * (1 + IN_FLIGHT_SLACK),
                submit=run.submit,
                settle=run.settle,
                on_stop=stop,
            )
    finally:
        stop_writer.close()
        pool.close()
        stop_reader.close()
        context.usage.add_worker_cpu(run.cpu.total())


# ------------------------------------------------------------------------ asyncio


@dataclass(frozen=True, slots=True)
class _LoopEnded:
    error: BaseException | None


def run_async(
    items: Iterable[Job | Outcome],
    settings: Settings,
    context: RunContext,
    claim: Claim,
) -> Iterator[Outcome]:
    """Download with asyncio tasks and transform in worker processes.

    The event loop runs in its own thread, so that records reach the caller (and the
    manifest) as they are decided; this generator only relays them.
    """
    outbox: _Outbox[Outcome | _LoopEnded] = _Outbox()
    thread = threading.Thread(
        target=_run_loop,
        args=(items, settings, context, claim, outbox),
        name="downloader-asyncio",
        daemon=True,
    )
    try:
        with _stop_when_left_early(context):
            thread.start()
            while True:
                for message in outbox.wait():
                    if not isinstance(message, _LoopEnded):
                        yield message
                    elif message.error is not None:
                        raise message.error
                    else:
                        return
    finally:
        thread.join(ASYNC_JOIN_S)
        outbox.wakeup.close()


def _run_loop(
    items: Iterable[Job | Outcome],
    settings: Settings,
    context: RunContext,
    claim: Claim,
    outbox: _Outbox[Outcome | _LoopEnded],
) -> None:
    """The body of the asyncio thread: run the loop, then say how it ended."""
    try:
        asyncio.run(_AsyncRun(settings, context, claim, outbox.put).main(items))
    except BaseExceptionGroup as group:
        outbox.put(_LoopEnded(_first_leaf(group)))
    except BaseException as exc:  # noqa: BLE001 (thread boundary: hand it to the caller)
        outbox.put(_LoopEnded(exc))
    else:
        outbox.put(_LoopEnded(None))


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


class _AsyncRun:
    """One event loop's run: the client, the limits, the task group, the pool."""

    def __init__(
        self,
        settings: Settings,
        context: RunContext,
        claim: Claim,
        post: Callable[[Outcome], None],
    ) -> None:
        self.settings, self.context, self.post = settings, context, post
        self.claim = claim
        self.stop = asyncio.Event()
        self.download_slots = asyncio.Semaphore(settings.threads)
        self.transform_slots = asyncio.Semaphore(settings.procs * (1 + IN_FLIGHT_SLACK))
        self.free_lanes = list(reversed(range(settings.threads)))
        self.hosts = AsyncHostLimiter(settings.http.per_host)
        self.proc_lanes = _Lanes("proc")
        self.cpu = _WorkerCpu()

    async def main(self, items: Iterable[Job | Outcome]) -> None:
        """Feed every item to download tasks; return when all records are posted."""
        loop = asyncio.get_running_loop()
        wakeup = Wakeup()
        loop.add_reader(wakeup.fileno(), self._on_wakeup, wakeup)
        stop_reader, stop_writer = mp_context().Pipe(duplex=False)
        self.pool = _ProcessPool(self.settings, self.context, stop_reader)
        try:
            with self.context.cancel.waking(wakeup):
                async with (
                    make_async_client(
                        self.settings.http, self.settings.threads
                    ) as self.client,
                    asyncio.TaskGroup() as group,
                ):
                    await self._feed(iter(items), group)
        finally:
            loop.remove_reader(wakeup.fileno())
            wakeup.close()
            stop_writer.close()
            self.pool.close()
            stop_reader.close()
            self.context.usage.add_worker_cpu(self.cpu.total())

    def _on_wakeup(self, wakeup: Wakeup) -> None:
        wakeup.clear()
        if self.context.cancel.is_set():
            self.stop.set()

    async def _feed(
        self, items: Iterator[Job | Outcome], group: asyncio.TaskGroup
    ) -> None:
        while not self.stop.is_set():
            # The list may be stdin: read it off the loop, so downloads keep going.
            item = await asyncio.to_thread(next, items, None)
            if item is None:
                return
            if isinstance(item, Outcome):
                self.post(item)
                continue
            # Once taken, a job gets its record: after a stop, "interrupted".
            await self.download_slots.acquire()
            group.create_task(self._one(item, self.free_lanes.pop()))

    async def _one(self, job: Job, lane_number: int) -> None:
        """Download ``job`` in a slot, wait for a transform slot, then transform."""
        try:
            fetched = await self._fetch(job, f"task-{lane_number}")
            result = self.claim(fetched) if isinstance(fetched, Fetched) else fetched
            if result is None:
                return  # the same body is in progress: its record comes with that one
            if isinstance(result, Outcome):
                self.post(result)
                return
            # Keep the download slot until the file has a transform slot: downloads
            # must not run ahead of transforms (bounded files on disk).
            await self.transform_slots.acquire()
        finally:
            self.free_lanes.append(lane_number)
            self.download_slots.release()
        try:
            self.post(await self._transform(result))
        finally:
            self.transform_slots.release()

    async def _fetch(self, job: Job, lane: str) -> Fetched | Outcome:
        events = self.context.events
        emit(events, Stage.DOWNLOAD, EventKind.STARTED, job.index, lane)
        started = time.perf_counter()
        try:
            if job.local_path is not None:
                return await asyncio.to_thread(
                    stage_local_reporting, job, self.context, lane
                )
            return await fetch_async(
                job,
                self.client,
                self.settings.http,
                self.context.tmp,
                stop=self.stop,
                hosts=self.hosts,
                on_bytes=byte_counter(events, job.index, lane),
            )
        except FetchError as exc:
            return fetch_failure(job, exc, started)
        finally:
            emit(events, Stage.DOWNLOAD, EventKind.FINISHED, job.index, lane)

    async def _transform(self, fetched: Fetched) -> Outcome:
        try:
            report = await self._run_transform(fetched)
        except BaseException:
            discard(fetched)
            raise
        if report is None:
            discard(fetched)
            return interrupted(fetched.job, Stage.TRANSFORM, fetched)
        if isinstance(report, Outcome):
            discard(fetched)
            return report
        self.cpu.record(report.pid, report.cpu_s)
        lane = self.proc_lanes.name(report.pid)
        return _relay_transform(report, fetched, lane, self.context, self.settings)

    async def _run_transform(
        self, fetched: Fetched
    ) -> TransformReport | Outcome | None:
        """Run the transform in the pool, again on a fresh pool if a worker died."""
        loop = asyncio.get_running_loop()
        task = fetched_task(fetched)
        for _ in range(MAX_RUNS_PER_ITEM):
            if self.stop.is_set():
                return None
            executor = self.pool.executor
            try:
                return await loop.run_in_executor(executor, transform_task, task)
            except BrokenProcessPool:
                self.pool.replace(executor)
        return _crash_failure(fetched.job, fetched)


def _relay_transform(
    report: TransformReport,
    fetched: Fetched,
    lane: str,
    context: RunContext,
    settings: Settings,
) -> Outcome:
    """Emit a pool transform's events and make its record; the download is let go."""
    index = fetched.job.index
    events = context.events
    emit(events, Stage.TRANSFORM, EventKind.STARTED, index, lane, at=report.started)
    emit(
        events,
        Stage.TRANSFORM,
        EventKind.FINISHED,
        index,
        lane,
        at=report.message.time,
    )
    message = report.message
    if isinstance(message, TaskDone):
        return finish_success(fetched, message.result, context.out, settings)
    discard(fetched)
    if message.fatal:
        raise OutputError(message.reason)
    return Outcome.failure(
        fetched.job,
        Stage.TRANSFORM,
        message.reason,
        fetched=fetched,
        transform_s=message.elapsed,
    )


RUNNERS: dict[Mode, Runner] = {
    Mode.SEQUENTIAL: run_sequential,
    Mode.THREADS: run_threads,
    Mode.PROCESSES: run_processes,
    Mode.PIPELINE: run_pipeline,
    Mode.ASYNC: run_async,
}
