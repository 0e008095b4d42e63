"""The worker-process side of the transform stage, shared by every process scheduler.

A worker takes ``Task`` records (paths, never bytes) from its own inbox Queue, runs
``transform_file`` on each, and reports over its own Pipe: ``TaskStarted`` before the
work (so a crash can be pinned on the right item), then ``TaskDone`` or ``TaskFailed``.
It starts through ``children.child_process`` (SIGINT ignored, exit when the parent
dies, stop on EOF of its stop Pipe, an unexpected exception sent back as a
``ChildFault``) and retires after ``max_tasks`` items so that a long run does not
accumulate memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.queues import SimpleQueue
from pathlib import Path

from downloader.children import ChildFault, child_process
from downloader.errors import OutputError, TransformError
from downloader.records import Identity, Transformed
from downloader.settings import ImageSpec
from downloader.transform import configure_pillow, transform_file

__all__ = [
    "Task",
    "TaskDone",
    "TaskFailed",
    "TaskStarted",
    "WorkerExit",
    "WorkerMessage",
    "WorkerRetired",
    "cpu_seconds",
    "file_sha256",
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
    hash_src: bool = False
    """Hash ``src`` here (its ``Fetched.sha256`` is None): the worker reads the
    file anyway, and the main process's CPU is the one a run runs short of."""
    discard_src: bool = False
    """Remove ``src`` once its ``TaskDone`` is sent: a download nobody keeps. Its
    removal frees the file's pages, the largest single cost of recording a photo
    in the main process's loop (whose ``steps.discard`` then finds it gone). Sent
    first, so that a worker dying in between leaves the file to the main process,
    which removes it, as ever."""
    recycle_to: str | None = None
    """Link ``src`` to this name before ``TaskDone`` is sent, as a spare for the
    next download to write over (``spares``): set only with ``discard_src``."""
    src_identity: Identity | None = None
    """``src``'s device and inode as its download closed it: linked only while
    ``src`` is still that file (``Fetched.identity``)."""


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
    sha256: str | None = None
    """The source file's SHA-256 (``Task.hash_src``)."""
    recycled: Identity | None = None
    """``src`` was linked to ``Task.recycle_to``: the file's device and inode."""


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """``index`` could not be transformed; ``fatal`` means a local fault (disk full)."""

    index: int
    reason: str
    elapsed: float
    time: float
    fatal: bool = False
    sha256: str | None = None
    """The source file's SHA-256 (``Task.hash_src``), if it could be read."""


@dataclass(frozen=True, slots=True)
class WorkerRetired:
    """The worker did its share of tasks and exits; queued tasks go elsewhere."""

    tasks: int


@dataclass(frozen=True, slots=True)
class WorkerExit:
    """The worker's last word: the CPU time it used, for the run's totals."""

    cpu_s: float


WorkerMessage = (
    TaskStarted | TaskDone | TaskFailed | WorkerRetired | ChildFault | WorkerExit
)


def cpu_seconds() -> float:
    """CPU seconds this process has used so far (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def file_sha256(path: Path) -> str | None:
    """The SHA-256 of the file at ``path``, or None if it cannot be read."""
    try:
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError:
        return None


def run_task(task: Task, out: Path, spec: ImageSpec) -> TaskDone | TaskFailed:
    """Transform one file and describe the result as a message."""
    started = time.perf_counter()
    sha256 = file_sha256(Path(task.src)) if task.hash_src else None
    try:
        result = transform_file(Path(task.src), out, task.stem, spec, task.owned)
    except TransformError as exc:
        now = time.perf_counter()
        return TaskFailed(task.index, exc.reason, now - started, now, sha256=sha256)
    except OutputError as exc:
        now = time.perf_counter()
        return TaskFailed(
            task.index, str(exc), now - started, now, fatal=True, sha256=sha256
        )
    return TaskDone(task.index, result, time.perf_counter(), sha256)


def _linked(task: Task) -> Identity | None:
    """Link ``task.src`` to its spare name if it is still the file its download
    wrote (``Task.src_identity``); that identity, or None if not linked."""
    if task.recycle_to is None or task.src_identity is None:
        return None
    try:
        status = os.lstat(task.src)
        if (status.st_dev, status.st_ino) != task.src_identity:
            return None
        os.link(task.src, task.recycle_to, follow_symlinks=False)
    except OSError:
        return None
    return task.src_identity


def worker_main(
    inbox: SimpleQueue[Task | None],
    results: Connection,
    stop: Connection,
    out: str,
    spec: ImageSpec,
    max_tasks: int,
) -> None:
    """Run in a worker process: transform tasks from ``inbox`` until told to stop.

    ``stop`` is the reader of the parent's ``children.StopLine``: at its EOF the
    worker takes no further task (the one running finishes).
    """
    stopping = threading.Event()
    try:
        with child_process(stop, stopping.set, results.send):
            configure_pillow(spec)
            for done, task in enumerate(iter(inbox.get, None), start=1):
                if stopping.is_set():
                    break
                results.send(TaskStarted(task.index, time.perf_counter()))
                message = run_task(task, Path(out), spec)
                if task.recycle_to is not None and isinstance(message, TaskDone):
                    message = replace(message, recycled=_linked(task))
                results.send(message)
                if task.discard_src and isinstance(message, TaskDone):
                    with contextlib.suppress(OSError):
                        os.unlink(task.src)
                if done >= max_tasks:
                    results.send(WorkerRetired(done))
                    break
    finally:
        with contextlib.suppress(OSError):
            results.send(WorkerExit(cpu_seconds()))
        results.close()
