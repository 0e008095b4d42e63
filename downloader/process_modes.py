"""The two schedulers built on a standard process pool: ``processes`` and ``async``.

Both use a ``concurrent.futures.ProcessPoolExecutor`` of ``itemwork`` workers, started
from ``children.mp_context()``: the Pool idea, shown as it is usually written::

    processes   ProcessPoolExecutor(procs): fetch → transform per item, in workers
                with their own httpx.Client (itemwork.process_job); with
                --name-by sha256, fetch (itemwork.fetch_job) → claim here →
                transform (itemwork.transform_task), so that the parent can claim
    async       an event loop in one thread: TaskGroup of fetch tasks bounded by
                Semaphore(threads), one AsyncClient, aiofiles → transforms in the
                pool (itemwork.transform_task)

A worker that dies (SIGKILL, out of memory) breaks the whole executor: every future
in it fails with ``BrokenProcessPool``, whatever item it held. So the pool is replaced
and each of those items counts a crash and is run again under the lifecycle's retry
policy (``Lifecycle.crashed``): one broken pool can cost an innocent item one of its
runs, and an item in two broken pools fails. The pipeline scheduler, whose workers
each have their own channels, pins a crash on the one item being processed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from downloader.children import RestartBudget, StopLine, mp_context
from downloader.errors import OutputError, WorkerCrashed
from downloader.fetch import AsyncHostLimiter, make_async_client, network_environ
from downloader.itemwork import (
    FetchReport,
    JobReport,
    TransformReport,
    fetch_job,
    fetched_task,
    init_worker,
    process_job,
    transform_task,
)
from downloader.lifecycle import Lifecycle
from downloader.politeness import process_rate
from downloader.records import Fetched, Job, Outcome, Stage
from downloader.runtime import Wakeup
from downloader.scheduling import (
    IN_FLIGHT_SLACK,
    Lanes,
    Launch,
    Outbox,
    WorkerCpu,
    schedule,
    stop_when_left_early,
)
from downloader.settings import NameBy

__all__ = ["run_async", "run_processes"]

ASYNC_JOIN_S = 30.0
"""How long the caller waits for the asyncio thread after asking it to stop."""
_BROKEN_POOL = (
    "worker process crashed (its process pool broke) while this image was in the pool"
)


_START_FAILURES = (BrokenProcessPool, EOFError, OSError)
"""What submitting to a pool raises when it cannot start a worker: broken already, or
the forkserver gone (a SIGTERM sent to the whole process group ends it too)."""


def _broken(cause: BaseException) -> Future[Any]:
    """A future that failed as if its pool broke: settled like any other break."""
    future: Future[Any] = Future()
    error = BrokenProcessPool(f"cannot start a pool worker: {cause}")
    future.set_exception(error)
    return future


class _ProcessPool:
    """A ``ProcessPoolExecutor`` of ``itemwork`` workers, replaced when one dies."""

    def __init__(self, lifecycle: Lifecycle, stop: Connection) -> None:
        settings, context = lifecycle.settings, lifecycle.context
        self._lifecycle = lifecycle
        self._restarts = RestartBudget(settings.procs)
        self._procs = settings.procs
        self._mp = mp_context()
        numbers = self._mp.Value("i", 0)  # workers' numbers: their rate phases
        self._initargs = (
            settings,
            str(context.out),
            str(context.tmp),
            stop,
            numbers,
            network_environ(),
        )
        self.executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self._procs,
            mp_context=self._mp,
            initializer=init_worker,
            initargs=self._initargs,
        )

    def replace(self, broken: ProcessPoolExecutor) -> None:
        """Start a fresh pool if ``broken`` is still the current one.

        Not once the run is stopping (what is left ends ``interrupted``), nor past
        the restart budget: then the run fails with ``WorkerCrashed``.
        """
        if broken is not self.executor:
            return
        broken.shutdown(wait=True, cancel_futures=True)
        if self._lifecycle.stopping:
            return
        if not self._restarts.allow():
            self._lifecycle.fail_run(
                WorkerCrashed(
                    "worker processes keep dying (their process pool broke); giving up"
                )
            )
            return
        self.executor = self._start()

    def succeeded(self) -> None:
        """A worker finished an item: the pool is not dying in a loop."""
        self._restarts.succeeded()

    def close(self) -> None:
        """Cancel queued calls, let running ones end, join the workers."""
        self.executor.shutdown(wait=True, cancel_futures=True)


class _ProcessesRun:
    """Turn worker reports into records through the lifecycle; count worker CPU.

    Names after URLs: one ``process_job`` call per job. Names after content: a
    ``fetch_job`` call, the claim here, then a ``transform_task`` call for a leader.
    """

    def __init__(self, pool: _ProcessPool, lifecycle: Lifecycle) -> None:
        self.pool = pool
        self.lifecycle = lifecycle
        self.split = lifecycle.settings.name_by is NameBy.SHA256
        self.lanes = Lanes("proc")
        self.cpu = WorkerCpu()
        self.owners: dict[Future[Any], ProcessPoolExecutor] = {}
        self.claimed: dict[int, Fetched] = {}
        """Downloads claimed here, waiting for or in their ``transform_task`` call."""

    def submit(self, job: Job) -> Future[Any]:
        executor = self.pool.executor
        fetched = self.claimed.get(job.index)
        future: Future[Any]
        try:
            if fetched is not None:
                future = executor.submit(transform_task, fetched_task(fetched))
            elif self.split:
                future = executor.submit(fetch_job, job)
            else:
                future = executor.submit(process_job, job)
        except _START_FAILURES as exc:
            future = _broken(exc)
        self.owners[future] = executor
        return future

    def settle(
        self, future: Future[Any], job: Job, launch: Launch
    ) -> Iterator[Outcome]:
        owner = self.owners.pop(future)
        if future.cancelled():
            yield self._stopped(job)
            return
        try:
            report: JobReport | FetchReport | TransformReport = future.result()
        except BrokenProcessPool:
            self.pool.replace(owner)
            # A pool worker that dies is nearly always decoding (out of memory, a
            # crash in a codec): the transform, even where it also downloads.
            outcome = self.lifecycle.crashed(
                job, self.claimed.get(job.index), _BROKEN_POOL, stage=Stage.TRANSFORM
            )
            if outcome is None:
                launch(job)
            else:
                self.claimed.pop(job.index, None)
                yield outcome
            return
        self.pool.succeeded()
        self.cpu.record(report.pid, report.cpu_s)
        lane = self.lanes.name(report.pid)
        if isinstance(report, TransformReport):
            fetched = self.claimed.pop(job.index)
            yield self.lifecycle.transformed(
                fetched, report.message, lane, started_at=report.started
            )
            return
        for event in report.events:
            self.lifecycle.context.events(replace(event, lane=lane))
        if report.fault is not None:
            self.lifecycle.fail_run(OutputError(report.fault))
        if isinstance(report, JobReport):
            yield self._in_parent_words(report.outcome, job)
            return
        result = report.result
        if isinstance(result, Outcome):
            result = self._in_parent_words(result, job)
        claimed = self.lifecycle.after_fetch(result)
        if isinstance(claimed, Fetched):
            self.claimed[job.index] = claimed
            launch(job)
        elif claimed is not None:
            yield claimed

    def _in_parent_words(self, outcome: Outcome, job: Job) -> Outcome:
        """A worker's ``not started`` record in the run's words, not the worker's."""
        if outcome.stage is None and (outcome.error or "").startswith("not started ("):
            return self.lifecycle.not_started(job)
        return outcome

    def _stopped(self, job: Job) -> Outcome:
        """A job whose call was cancelled in the pool's queue when the run stopped."""
        fetched = self.claimed.pop(job.index, None)
        if fetched is None:
            return self.lifecycle.not_started(job)  # it never began
        return self.lifecycle.interrupted(job, Stage.TRANSFORM, fetched)


def run_processes(
    items: Iterable[Job | Outcome], lifecycle: Lifecycle
) -> Iterator[Outcome]:
    """Download and transform each item in a pool worker process."""
    stop_line = StopLine(mp_context())
    pool = _ProcessPool(lifecycle, stop_line.reader)
    run = _ProcessesRun(pool, lifecycle)

    def stop() -> None:
        stop_line.stop()  # every worker's watcher reads EOF: stop downloading
        pool.executor.shutdown(wait=False, cancel_futures=True)

    try:
        with stop_when_left_early(lifecycle):
            yield from schedule(
                items,
                lifecycle,
                limit=lifecycle.settings.procs * (1 + IN_FLIGHT_SLACK),
                submit=run.submit,
                settle=run.settle,
                on_stop=stop,
            )
    finally:
        stop_line.stop()
        pool.close()
        stop_line.close()
        lifecycle.context.usage.add_worker_cpu(run.cpu.total())


# ------------------------------------------------------------------------ asyncio


@dataclass(frozen=True, slots=True)
class _LoopEnded:
    error: BaseException | None


def run_async(
    items: Iterable[Job | Outcome], lifecycle: Lifecycle
) -> Iterator[Outcome]:
    """Download with asyncio tasks and transform in worker processes.

    The event loop runs in its own thread, so that records reach the caller (and the
    manifest) as they are decided; this generator only relays them.
    """
    outbox: Outbox[Outcome | _LoopEnded] = Outbox()
    thread = threading.Thread(
        target=_run_loop,
        args=(items, lifecycle, outbox),
        name="downloader-asyncio",
        daemon=True,
    )
    try:
        with stop_when_left_early(lifecycle):
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
    lifecycle: Lifecycle,
    outbox: Outbox[Outcome | _LoopEnded],
) -> None:
    """The body of the asyncio thread: run the loop, then say how it ended."""
    try:
        asyncio.run(_AsyncRun(lifecycle, outbox.put).main(items))
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

    def __init__(self, lifecycle: Lifecycle, post: Callable[[Outcome], None]) -> None:
        settings = lifecycle.settings
        self.lifecycle, self.post = lifecycle, post
        self.stop = asyncio.Event()
        self.download_slots = asyncio.Semaphore(settings.threads)
        self.transform_slots = asyncio.Semaphore(settings.procs * (1 + IN_FLIGHT_SLACK))
        self.free_lanes = list(reversed(range(settings.threads)))
        self.hosts = AsyncHostLimiter(
            settings.http.per_host, process_rate(settings.http, 1)
        )
        self.proc_lanes = Lanes("proc")
        self.cpu = WorkerCpu()

    async def main(self, items: Iterable[Job | Outcome]) -> None:
        """Feed every item to download tasks; return when all records are posted."""
        loop = asyncio.get_running_loop()
        wakeup = Wakeup()
        loop.add_reader(wakeup.fileno(), self._on_wakeup, wakeup)
        stop_line = StopLine(mp_context())
        self.pool = _ProcessPool(self.lifecycle, stop_line.reader)
        settings = self.lifecycle.settings
        try:
            with self.lifecycle.context.cancel.waking(wakeup):
                async with (
                    make_async_client(settings.http, settings.threads) as self.client,
                    asyncio.TaskGroup() as group,
                ):
                    await self._feed(iter(items), group)
        finally:
            loop.remove_reader(wakeup.fileno())
            wakeup.close()
            stop_line.stop()
            self.pool.close()
            stop_line.close()
            self.lifecycle.context.usage.add_worker_cpu(self.cpu.total())

    def _on_wakeup(self, wakeup: Wakeup) -> None:
        wakeup.clear()
        if self.lifecycle.stopping:
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
        lifecycle = self.lifecycle
        try:
            fetched = await lifecycle.fetch_async(
                job, self.client, self.hosts, self.stop, f"task-{lane_number}"
            )
            result = lifecycle.after_fetch(fetched)
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

    async def _transform(self, fetched: Fetched) -> Outcome:
        """Run the transform in the pool, again on a fresh pool if a worker died."""
        loop = asyncio.get_running_loop()
        task = fetched_task(fetched)
        job = fetched.job
        while True:
            if self.stop.is_set():
                return self.lifecycle.interrupted(job, Stage.TRANSFORM, fetched)
            executor = self.pool.executor
            try:
                report: TransformReport = await loop.run_in_executor(
                    executor, transform_task, task
                )
            except _START_FAILURES:
                self.pool.replace(executor)
                outcome = self.lifecycle.crashed(job, fetched, _BROKEN_POOL)
                if outcome is not None:
                    return outcome
                continue
            except BaseException:
                self.lifecycle.interrupted(job, Stage.TRANSFORM, fetched)
                raise
            self.pool.succeeded()
            self.cpu.record(report.pid, report.cpu_s)
            lane = self.proc_lanes.name(report.pid)
            return self.lifecycle.transformed(
                fetched, report.message, lane, started_at=report.started
            )
