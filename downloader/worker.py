"""The worker-process side of the transform stage, shared by every process scheduler.

A worker takes ``Task`` records (paths, never bytes) from its own inbox Queue, runs
``transform_file`` on each, and reports over its own Pipe: ``TaskStarted`` before the
work (so a crash can be pinned on the right item), then ``TaskDone`` or ``TaskFailed``.
It ignores SIGINT (the parent coordinates shutdown), exits when the parent dies, and
retires after ``max_tasks`` items so that a long run does not accumulate memory.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing import parent_process
from multiprocessing.connection import Connection, wait
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

from downloader.errors import OutputError, TransformError
from downloader.records import Transformed
from downloader.settings import ImageSpec
from downloader.transform import configure_pillow, transform_file

__all__ = [
    "Task",
    "TaskDone",
    "TaskFailed",
    "TaskStarted",
    "WorkerError",
    "WorkerExit",
    "WorkerMessage",
    "WorkerRetired",
    "cpu_seconds",
    "exit_when_parent_dies",
    "worker_main",
]


@dataclass(frozen=True, slots=True)
class Task:
    """One downloaded file to transform."""

    index: int
    src: str
    stem: str
    owned: tuple[str, ...] = ()
    """Files the previous manifest records as this URL's (``Job.owned``)."""


@dataclass(frozen=True, slots=True)
class TaskStarted:
    """The worker began ``index`` (sent first, so a crash is attributed)."""

    index: int
    time: float


@dataclass(frozen=True, slots=True)
class TaskDone:
    """``index`` is finished and its output is under its final name."""

    index: int
    result: Transformed
    time: float


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """``index`` could not be transformed; ``fatal`` means a local fault (disk full)."""

    index: int
    reason: str
    elapsed: float
    time: float
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class WorkerRetired:
    """The worker did its share of tasks and exits; queued tasks go elsewhere."""

    tasks: int


@dataclass(frozen=True, slots=True)
class WorkerExit:
    """The worker's last word: the CPU time it used, for the run's totals."""

    cpu_s: float


@dataclass(frozen=True, slots=True)
class WorkerError:
    """An unexpected exception ended the worker; the traceback comes back as text."""

    traceback: str


WorkerMessage = (
    TaskStarted | TaskDone | TaskFailed | WorkerRetired | WorkerError | WorkerExit
)


def exit_when_parent_dies() -> None:
    """End this child process at once when its parent dies (a watcher thread)."""
    parent = parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def cpu_seconds() -> float:
    """CPU seconds this process has used so far (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_task(task: Task, out: Path, spec: ImageSpec) -> TaskDone | TaskFailed:
    """Transform one file and describe the result as a message."""
    started = time.perf_counter()
    try:
        result = transform_file(Path(task.src), out, task.stem, spec, task.owned)
    except TransformError as exc:
        now = time.perf_counter()
        return TaskFailed(task.index, exc.reason, now - started, now)
    except OutputError as exc:
        now = time.perf_counter()
        return TaskFailed(task.index, str(exc), now - started, now, fatal=True)
    return TaskDone(task.index, result, time.perf_counter())


def worker_main(
    inbox: Queue[Task | None],
    results: Connection,
    stop: Event,
    out: str,
    spec: ImageSpec,
    max_tasks: int,
) -> None:
    """Run in a worker process: transform tasks from ``inbox`` until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_when_parent_dies()
    try:
        configure_pillow(spec)
        for done, task in enumerate(iter(inbox.get, None), start=1):
            if stop.is_set():
                break
            results.send(TaskStarted(task.index, time.perf_counter()))
            results.send(run_task(task, Path(out), spec))
            if done >= max_tasks:
                results.send(WorkerRetired(done))
                break
    except Exception:  # noqa: BLE001 (worker boundary: report, then end)
        results.send(WorkerError(traceback.format_exc()))
    finally:
        with contextlib.suppress(OSError):
            results.send(WorkerExit(cpu_seconds()))
        results.close()
