"""The worker-process side of the pool-based modes (``process_modes``).

These top-level functions run in ``ProcessPoolExecutor`` workers started from
``children.mp_context()``; what a job's record is comes from a ``Lifecycle`` made per
job in the worker (its events recorded for the parent)::

    init_worker(settings, out, tmp, stop)     once per worker: children.enter_child
                                              (SIGINT, stop and parent watch), Pillow
                                              limits, own httpx.Client
    process_job(job)      -> JobReport        processes mode: download + transform
    fetch_job(job)        -> FetchReport      processes mode, --name-by sha256:
                                              download only (the parent claims it)
    transform_task(task)  -> TransformReport  async mode, and the above: transform

A report carries the progress events recorded in the worker (the parent names the
lane), the worker's pid and its CPU seconds so far, so the parent can draw the timeline
and count worker CPU (forkserver children are not this process's children).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, replace
from multiprocessing import util
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

import httpx

from downloader.children import enter_child
from downloader.fetch import HostLimiter, make_client, use_network_environ
from downloader.lifecycle import Lifecycle
from downloader.politeness import process_pace
from downloader.progress import EventKind, ProgressEvent
from downloader.records import Fetched, Job, Outcome, Stage
from downloader.runtime import Cancellation, RunContext
from downloader.settings import Settings
from downloader.transform import configure_pillow
from downloader.worker import Task, TaskDone, TaskFailed, cpu_seconds, run_task

__all__ = [
    "FetchReport",
    "JobReport",
    "TransformReport",
    "fetch_job",
    "init_worker",
    "process_job",
    "transform_task",
]

# The lane name workers put on their events; the parent replaces it with proc-N.
WORKER_LANE = "proc"
# Runs after the client's finaliser is registered at a worker's exit (higher first).
_CLIENT_EXIT_PRIORITY = 10


@dataclass(frozen=True, slots=True)
class JobReport:
    """What ``process_job`` sends back: the record, its events, who did it."""

    outcome: Outcome
    events: tuple[ProgressEvent, ...]
    pid: int
    cpu_s: float
    """CPU seconds the worker used so far (it only grows)."""
    fault: str | None = None
    """A local fault the job hit here (disk full): the parent stops the run."""


@dataclass(frozen=True, slots=True)
class FetchReport:
    """What ``fetch_job`` sends back: the download (a path) or its record, events."""

    result: Fetched | Outcome
    events: tuple[ProgressEvent, ...]
    pid: int
    cpu_s: float
    fault: str | None = None
    """A local fault the download hit here: the parent stops the run."""


@dataclass(frozen=True, slots=True)
class TransformReport:
    """What ``transform_task`` sends back: the worker's message and when it started."""

    message: TaskDone | TaskFailed
    started: float
    pid: int
    cpu_s: float


class _Recorder:
    """An event sink that keeps STARTED/FINISHED events and sums byte counts.

    The sum goes in just before the download's FINISHED event, where a reader that
    adds bytes to that event (``EventStream``) expects them.
    """

    def __init__(self) -> None:
        self.kept: list[ProgressEvent] = []
        self._bytes: ProgressEvent | None = None

    def __call__(self, event: ProgressEvent, /) -> None:
        if event.kind is EventKind.BYTES:
            nbytes = event.nbytes + (0 if self._bytes is None else self._bytes.nbytes)
            self._bytes = replace(event, nbytes=nbytes)
            return
        finishing = event.kind is EventKind.FINISHED and event.stage is Stage.DOWNLOAD
        if finishing and self._bytes is not None:
            self.kept.append(self._bytes)
            self._bytes = None
        self.kept.append(event)

    def events(self) -> tuple[ProgressEvent, ...]:
        """The events in the order they happened."""
        tail = () if self._bytes is None else (self._bytes,)
        return (*self.kept, *tail)


@dataclass(frozen=True, slots=True)
class _WorkerState:
    settings: Settings
    context: RunContext
    client: httpx.Client
    hosts: HostLimiter


_state: _WorkerState | None = None
"""This worker process's own client and settings, set once by ``init_worker``."""


def init_worker(
    settings: Settings,
    out: str,
    tmp: str,
    stop: Connection,
    numbers: Synchronized[int],
    environ: dict[str, str],
) -> None:
    """Prepare a pool worker; ``stop`` reads EOF when the parent wants it to stop.

    ``environ``: the parent's variables a client reads (``fetch.network_environ``).

    ``numbers`` counts the workers started: this one's number sets its phase of the
    rate per host (``politeness.Pace``), so that the pool's workers interleave.

    ``stop`` is the reader of the parent's ``children.StopLine``. A job's exception
    goes back through the executor's own boundary (``_ExceptionWithTraceback``).
    """
    global _state  # per-process state of a pool worker, set once here
    cancel = Cancellation()
    enter_child(stop, functools.partial(cancel.set, "stopped by the parent"))
    configure_pillow(settings.image)
    use_network_environ(environ)
    client = make_client(settings.http, 1)
    # Pool workers end through multiprocessing's exit path, which runs finalisers.
    util.Finalize(client, client.close, exitpriority=_CLIENT_EXIT_PRIORITY)
    context = RunContext(Path(out), Path(tmp), _Recorder(), cancel)
    _state = _WorkerState(
        settings,
        context,
        client,
        # One limiter per pool process: each keeps to its share of the rate.
        HostLimiter(
            settings.http.per_host,
            process_pace(settings.http, settings.procs, _next_number(numbers)),
        ),
    )


def _next_number(numbers: Synchronized[int]) -> int:
    with numbers.get_lock():
        number = numbers.value
        numbers.value += 1
    return number


def _worker_state() -> _WorkerState:
    if _state is None:
        raise RuntimeError("init_worker has not run in this process")
    return _state


def _job_lifecycle(state: _WorkerState) -> tuple[Lifecycle, _Recorder]:
    """A lifecycle for one job in this worker: its events recorded for the parent."""
    recorder = _Recorder()
    context = replace(state.context, events=recorder)
    return Lifecycle(state.settings, context), recorder


def _fault(lifecycle: Lifecycle) -> str | None:
    return None if lifecycle.failure is None else str(lifecycle.failure)


def process_job(job: Job) -> JobReport:
    """Download and transform one job in this worker process."""
    state = _worker_state()
    lifecycle, recorder = _job_lifecycle(state)
    outcome = lifecycle.run_here(job, state.client, state.hosts, WORKER_LANE)
    if outcome is None:  # only a parent's claim defers; this one keeps everything
        raise RuntimeError(f"job {job.index} was deferred in a worker")
    return JobReport(
        outcome, recorder.events(), os.getpid(), cpu_seconds(), _fault(lifecycle)
    )


def fetch_job(job: Job) -> FetchReport:
    """Download one job in this worker process; the parent decides what follows."""
    state = _worker_state()
    lifecycle, recorder = _job_lifecycle(state)
    fetched = lifecycle.fetch_now(job, state.client, state.hosts, WORKER_LANE)
    result = lifecycle.after_fetch(fetched)  # keeps it, unless stopped meanwhile
    assert result is not None  # a worker's claim keeps every download
    return FetchReport(
        result, recorder.events(), os.getpid(), cpu_seconds(), _fault(lifecycle)
    )


def transform_task(task: Task) -> TransformReport:
    """Transform one downloaded file in this worker process."""
    state = _worker_state()
    started = time.perf_counter()
    message = run_task(task, state.context.out, state.settings.image)
    return TransformReport(message, started, os.getpid(), cpu_seconds())


def fetched_task(fetched: Fetched) -> Task:
    """The ``Task`` (a path, never the bytes) that hands ``fetched`` to a worker."""
    job = fetched.job
    return Task(job.index, str(fetched.path), job.stem, job.owned)
