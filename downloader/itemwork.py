"""One item end to end, and the worker-process side of the pool-based modes.

``fetch_and_transform`` downloads one ``Job`` then transforms it in the calling thread
(``sequential`` and ``threads`` modes run it directly). The pool-based modes run these
top-level functions in ``ProcessPoolExecutor`` workers started from
``pipeline.mp_context()``::

    init_worker(settings, out, tmp, stop)     once per worker: ignore SIGINT, Pillow
                                              limits, own httpx.Client, stop watcher
    process_job(job)      -> JobReport        processes mode: download + transform
    fetch_job(job)        -> FetchReport      processes mode, --name-by sha256:
                                              download only (the parent claims it)
    transform_task(task)  -> TransformReport  async mode, and the above: transform

A report carries the progress events recorded in the worker (the parent names the
lane), the worker's pid and its CPU seconds so far, so the parent can draw the timeline
and count worker CPU (forkserver children are not this process's children).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing import parent_process, util
from multiprocessing.connection import Connection, wait
from pathlib import Path

import httpx

from downloader.fetch import HostLimiter, make_client
from downloader.progress import EventKind, ProgressEvent
from downloader.records import Fetched, Job, Outcome, Stage
from downloader.reuse import Claim
from downloader.runtime import Cancellation, RunContext
from downloader.settings import Settings
from downloader.steps import discard, fetch_step, interrupted, transform_step
from downloader.transform import configure_pillow
from downloader.worker import Task, TaskDone, TaskFailed, cpu_seconds, run_task

__all__ = [
    "FetchReport",
    "JobReport",
    "TransformReport",
    "fetch_and_transform",
    "fetch_job",
    "init_worker",
    "process_job",
    "transform_task",
]

# The lane name workers put on their events; the parent replaces it with proc-N.
WORKER_LANE = "proc"
# Runs after the client's finaliser is registered at a worker's exit (higher first).
_CLIENT_EXIT_PRIORITY = 10


def _as_is(fetched: Fetched) -> Fetched:
    """The claim of a worker process that names outputs after URLs: keep everything."""
    return fetched


def fetch_and_transform(
    job: Job,
    client: httpx.Client,
    hosts: HostLimiter,
    settings: Settings,
    context: RunContext,
    lane: str,
    claim: Claim = _as_is,
) -> Outcome | None:
    """Download ``job``, then transform it here, unless the run was stopped between.

    None means that ``claim`` found the same body in progress elsewhere: its record
    comes with that one's (``reuse.ContentIndex``).
    """
    result = _fetch_unless_stopped(job, client, hosts, settings, context, lane)
    if isinstance(result, Outcome):
        return result
    claimed = claim(result)
    if not isinstance(claimed, Fetched):
        return claimed
    return transform_step(claimed, settings, context, lane)


def _fetch_unless_stopped(
    job: Job,
    client: httpx.Client,
    hosts: HostLimiter,
    settings: Settings,
    context: RunContext,
    lane: str,
) -> Fetched | Outcome:
    """Download ``job``; a download finished after a stop request is let go."""
    result = fetch_step(job, client, settings, context, hosts, lane)
    if isinstance(result, Fetched) and context.cancel.is_set():
        discard(result)
        return interrupted(job, Stage.TRANSFORM, result)
    return result


@dataclass(frozen=True, slots=True)
class JobReport:
    """What ``process_job`` sends back: the record, its events, who did it."""

    outcome: Outcome
    events: tuple[ProgressEvent, ...]
    pid: int
    cpu_s: float
    """CPU seconds the worker used so far (it only grows)."""


@dataclass(frozen=True, slots=True)
class FetchReport:
    """What ``fetch_job`` sends back: the download (a path) or its record, events."""

    result: Fetched | Outcome
    events: tuple[ProgressEvent, ...]
    pid: int
    cpu_s: float


@dataclass(frozen=True, slots=True)
class TransformReport:
    """What ``transform_task`` sends back: the worker's message and when it started."""

    message: TaskDone | TaskFailed
    started: float
    pid: int
    cpu_s: float


class _Recorder:
    """An event sink that keeps STARTED/FINISHED events and sums byte counts."""

    def __init__(self) -> None:
        self.kept: list[ProgressEvent] = []
        self._bytes: ProgressEvent | None = None

    def __call__(self, event: ProgressEvent, /) -> None:
        if event.kind is not EventKind.BYTES:
            self.kept.append(event)
        elif self._bytes is None:
            self._bytes = event
        else:
            self._bytes = replace(event, nbytes=self._bytes.nbytes + event.nbytes)

    def events(self) -> tuple[ProgressEvent, ...]:
        """The events in order, the byte count folded in before the last one."""
        if self._bytes is None:
            return tuple(self.kept)
        return (*self.kept[:-1], self._bytes, *self.kept[-1:])


@dataclass(frozen=True, slots=True)
class _WorkerState:
    settings: Settings
    context: RunContext
    client: httpx.Client
    hosts: HostLimiter


_state: _WorkerState | None = None
"""This worker process's own client and settings, set once by ``init_worker``."""


def init_worker(settings: Settings, out: str, tmp: str, stop: Connection) -> None:
    """Prepare a pool worker; ``stop`` reads EOF when the parent wants it to stop."""
    global _state  # per-process state of a pool worker, set once here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_pillow(settings.image)
    cancel = Cancellation()
    threading.Thread(
        target=_watch, args=(stop, cancel), name="stop-watch", daemon=True
    ).start()
    client = make_client(settings.http, 1)
    # Pool workers end through multiprocessing's exit path, which runs finalisers.
    util.Finalize(client, client.close, exitpriority=_CLIENT_EXIT_PRIORITY)
    context = RunContext(Path(out), Path(tmp), _Recorder(), cancel)
    _state = _WorkerState(
        settings, context, client, HostLimiter(settings.http.per_host)
    )


def _watch(stop: Connection, cancel: Cancellation) -> None:
    """Stop on the parent's word (EOF on ``stop``); exit at once if the parent dies."""
    parent = parent_process()
    watched: list[Connection | int] = [stop]
    if parent is not None:
        watched.append(parent.sentinel)
    ready = wait(watched)
    if stop not in ready:
        os._exit(1)
    cancel.set("stopped by the parent")


def _worker_state() -> _WorkerState:
    if _state is None:
        raise RuntimeError("init_worker has not run in this process")
    return _state


def process_job(job: Job) -> JobReport:
    """Download and transform one job in this worker process."""
    state = _worker_state()
    recorder = _Recorder()
    context = replace(state.context, events=recorder)
    outcome = fetch_and_transform(
        job, state.client, state.hosts, state.settings, context, WORKER_LANE
    )
    if outcome is None:  # only a parent's claim defers; this one keeps everything
        raise RuntimeError(f"job {job.index} was deferred in a worker")
    return JobReport(outcome, recorder.events(), os.getpid(), cpu_seconds())


def fetch_job(job: Job) -> FetchReport:
    """Download one job in this worker process; the parent decides what follows."""
    state = _worker_state()
    recorder = _Recorder()
    context = replace(state.context, events=recorder)
    result = _fetch_unless_stopped(
        job, state.client, state.hosts, state.settings, context, WORKER_LANE
    )
    return FetchReport(result, recorder.events(), os.getpid(), cpu_seconds())


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
