"""The pipeline's transform pool: worker processes, their channels, slots, deadlines.

Each worker (``worker.worker_main``) has its own inbox Queue and its own Pipe back, so
a killed worker can damage only its own channels, which are thrown away with it (a
shared Queue whose reader dies holding its lock would hang every other worker). The
inbox is a ``multiprocessing.SimpleQueue``: the download thread that hands a file
over writes its task to the pipe itself, where a ``Queue`` would wake a feeder
thread to do it (a wake-up and a thread switch per photo, in the process whose CPU
runs short); a task is a few hundred bytes and at most ``procs * (1 +
WORK_QUEUE_SLACK)`` are in flight, far from filling a pipe. The
pool hands a downloaded file (a ``Task``: a path, never the bytes) to the worker with
the fewest assigned, at most ``procs * (1 + WORK_QUEUE_SLACK)`` at once: when they
are all taken, ``hand_off`` waits, so downloads never run far ahead of transforms.

The workers start in a thread of their own (``start``) while the downloads begin: no
worker is needed before the first file is downloaded, and starting them (the
forkserver and its imports, then each worker) takes most of a second. ``hand_off``
waits for the first one; a failure to start one is the run's error, which ``read``
raises through the lifecycle (every input still gets its record).

What it decides, and only it:

- a dead worker's started item counts a crash (``Lifecycle.crashed``: run once more on
  the worker that replaces it, then failed); its queued items go to other workers;
- an item past ``--item-timeout`` has its worker killed (``Lifecycle.timed_out``); a
  worker that holds work but says nothing for as long is replaced, its items moved;
- a worker that retires after ``max_tasks_per_worker`` items is replaced for free;
  others only while the restart budget lasts (``children.RestartBudget``), past
  which the run fails with ``WorkerCrashed``.

The coordinator (``pipeline``) calls ``read`` with what ``wait`` found ready; download
threads call ``hand_off`` (thread-safe); nothing else touches a worker.
"""

from __future__ import annotations

import contextlib
import select
import signal
import threading
import time
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from multiprocessing.queues import SimpleQueue

from downloader.children import ChildFault, RestartBudget, StopLine
from downloader.errors import WorkerCrashed
from downloader.lifecycle import Lifecycle
from downloader.records import Fetched, Identity, Outcome, Stage
from downloader.runtime import Wakeup
from downloader.scheduling import TICK_S
from downloader.spares import SpareFiles
from downloader.steps import discard
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

__all__ = [
    "SHUTDOWN_GRACE_S",
    "WORK_QUEUE_SLACK",
    "TransformPool",
    "crash_error",
    "describe_exit",
]

WORK_QUEUE_SLACK = 2
"""Tasks queued per worker beyond the one it is running. Two absorb a burst of finished
downloads without starving a worker; more would strand more work behind a slow image
and keep more downloaded files on disk at once."""
SHUTDOWN_GRACE_S = 5.0
"""Time given to workers (and download threads) to finish their current item on stop."""


def describe_exit(process: BaseProcess) -> str:
    """How a child process ended, for a reason (``killed by SIGKILL``)."""
    code = process.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass(eq=False)
class _Worker:
    number: int
    process: BaseProcess
    inbox: SimpleQueue[Task | None]
    reader: Connection
    assigned: dict[int, Fetched] = field(default_factory=dict)
    current: int | None = None
    started_at: float = 0.0
    heard_at: float = field(default_factory=time.monotonic)
    """When the worker last sent a message, or got work while it had none."""
    retiring: bool = False
    timed_out: bool = False
    fault: ChildFault | None = None
    _poller: select.poll = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._poller = select.poll()
        self._poller.register(self.reader.fileno(), select.POLLIN)

    def has_message(self) -> bool:
        """A message (or the end of the Pipe) waits: ``Connection.poll`` without
        the selector it builds, fills and closes on each call (several a photo)."""
        return bool(self._poller.poll(0))

    @property
    def lane(self) -> str:
        return f"proc-{self.number}"


class TransformPool:
    """The worker processes of one pipeline run and the files assigned to them."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        mp: ForkServerContext | SpawnContext,
        wakeup: Wakeup,
        spares: SpareFiles | None = None,
    ) -> None:
        self._lifecycle = lifecycle
        self._spares = spares
        """Where a worker links a download nobody keeps, for the next one to reuse."""
        self._lent: dict[int, str] = {}
        """Job index -> the spare name its task was given (slots lock held)."""
        self._wakeup = wakeup
        """Woken when a worker has started (one more Pipe and sentinel to wait on)."""
        self._settings = lifecycle.settings
        self._mp = mp
        self._stop_line = StopLine(mp)
        self._workers: list[_Worker] = []
        self._numbers = iter(range(1_000_000))
        self._capacity = self._settings.procs * (1 + WORK_QUEUE_SLACK)
        self._free_slots = self._capacity
        self._slots = threading.Condition()
        """Guards free slots, workers and assignment; notified on a free slot."""
        self._stopping = False
        self._restarts = RestartBudget(self._settings.procs)
        self._starter: threading.Thread | None = None
        self._starting = False
        """True while the starter thread may still add a worker (slots lock held)."""
        self._start_error: Exception | None = None

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Start ``procs`` workers in a thread, so that downloads need not wait."""
        self._starting = True
        self._starter = threading.Thread(
            target=self._start_workers, name="downloader-pool-start", daemon=True
        )
        self._starter.start()

    def _start_workers(self) -> None:
        """The starter thread: add the workers one by one, until stopped or failed."""
        try:
            for _ in range(self._settings.procs):
                with self._slots:
                    if self._stopping:
                        return
                worker = self._start_worker()
                with self._slots:
                    self._workers.append(worker)
                    if self._stopping:  # ``stop`` may not have seen it
                        _tell_stop(worker)
                    self._slots.notify_all()
                self._wakeup.wake()
        except Exception as exc:  # noqa: BLE001 (thread boundary: the run's error)
            self._start_error = exc
        finally:
            with self._slots:
                self._starting = False
                self._slots.notify_all()
            self._wakeup.wake()

    def _start_worker(self) -> _Worker:
        reader, writer = self._mp.Pipe(duplex=False)
        inbox: SimpleQueue[Task | None] = self._mp.SimpleQueue()
        number = next(self._numbers)
        process = self._mp.Process(
            target=worker_main,
            args=(
                inbox,
                writer,
                self._stop_line.reader,
                str(self._lifecycle.context.out),
                self._settings.image,
                self._settings.max_tasks_per_worker,
            ),
            name=f"downloader-worker-{number}",
            daemon=True,
        )
        try:
            process.start()
        except BaseException:
            reader.close()
            inbox.close()
            raise
        finally:
            writer.close()  # the parent keeps no writer end: EOF: the worker is gone
        return _Worker(number, process, inbox, reader)

    # --------------------------------------------------------------- hand-off

    @property
    def has_room(self) -> bool:
        """True while a downloaded file could be handed over without waiting."""
        with self._slots:
            return self._free_slots > 0 and (bool(self._workers) or self._starting)

    @property
    def busy(self) -> bool:
        """True while any worker holds a file."""
        with self._slots:
            return any(worker.assigned for worker in self._workers)

    @property
    def alive(self) -> bool:
        """True while the pool has workers or starts them (it may have none after
        giving up)."""
        with self._slots:
            return bool(self._workers) or self._starting

    def hand_off(self, fetched: Fetched, *, wait: bool = True) -> bool:
        """Give ``fetched`` to the least busy worker; False once stopping.

        With ``wait`` (download threads) a full pool is waited out; without, False
        at once when no slot is free. Before the first worker has started, a
        download thread waits for it.
        """
        with self._slots:
            while (
                wait
                and not self._stopping
                and (self._free_slots == 0 or (self._starting and not self._workers))
            ):
                self._slots.wait(TICK_S)
            if self._stopping or not self._workers or self._free_slots == 0:
                return False
            self._free_slots -= 1
            self._assign(fetched)
            return True

    def _assign(self, fetched: Fetched, worker: _Worker | None = None) -> None:
        """Queue ``fetched`` on ``worker`` or the least busy one (slots lock held)."""
        if worker is None:
            candidates = [w for w in self._workers if not w.retiring] or self._workers
            worker = min(candidates, key=lambda w: len(w.assigned))
        if not worker.assigned:
            worker.heard_at = time.monotonic()
        worker.assigned[fetched.job.index] = fetched
        job = fetched.job
        discard_src = job.local_path is None and not self._settings.keep_originals
        recycle_to = None
        if discard_src and self._spares is not None and fetched.identity is not None:
            recycle_to = self._spares.lend(fetched.nbytes)
            if recycle_to is not None:
                self._lent[job.index] = recycle_to
        task = Task(
            job.index,
            str(fetched.path),
            job.stem,
            job.owned,
            hash_src=fetched.sha256 is None,
            discard_src=discard_src,
            recycle_to=recycle_to,
            src_identity=fetched.identity if recycle_to is not None else None,
        )
        worker.inbox.put(task)

    def _settle(self, index: int, *, linked: Identity | None) -> None:
        """The spare name lent for job ``index`` is answered for (slots lock held)."""
        name = self._lent.pop(index, None)
        if name is not None and self._spares is not None:
            self._spares.settle(name, linked)

    def _release(self) -> None:
        """A slot is free again (its file was recorded and let go)."""
        with self._slots:
            self._free_slots += 1
            self._slots.notify()

    # -------------------------------------------------------------- main loop

    def wait_objects(self) -> list[Connection | int]:
        """What the coordinator waits on for this pool: Pipes and sentinels."""
        objects: list[Connection | int] = []
        for worker in self._workers:
            objects += [worker.reader, worker.process.sentinel]
        return objects

    def next_deadline(self) -> float | None:
        """The earliest moment (monotonic) an item may time out, if any is running."""
        limit = self._settings.item_timeout
        deadlines = [
            worker.started_at + limit
            for worker in self._workers
            if worker.current is not None
        ]
        return min(deadlines, default=None)

    def read(self, ready: Container[object]) -> Iterator[Outcome]:
        """Read the workers that ``wait`` found ready; bury those that exited.

        A failure of the starter thread ends the run here (``Lifecycle.fail_run``),
        unless the run is stopping already: a SIGTERM to the whole process group
        ends the forkserver too, and a worker it was starting is not wanted.
        """
        error, self._start_error = self._start_error, None
        if error is not None and not self._lifecycle.stopping:
            crashed = WorkerCrashed(f"cannot start worker processes: {error}")
            crashed.__cause__ = error
            self._lifecycle.fail_run(crashed)
        for worker in list(self._workers):
            if worker.reader in ready or worker.process.sentinel in ready:
                yield from self._read_worker(worker)
        self._enforce_deadlines()

    def processing(self) -> list[str]:
        """The URLs being transformed now, for the stall report."""
        return [
            worker.assigned[worker.current].job.url
            for worker in self._workers
            if worker.current in worker.assigned
        ]

    def _read_worker(self, worker: _Worker) -> Iterator[Outcome]:
        try:
            while worker.has_message():
                message: WorkerMessage = worker.reader.recv()
                yield from self._handle(worker, message)
        except (EOFError, OSError):
            pass
        else:
            if worker.process.is_alive():
                return
        yield from self._bury(worker)

    def _handle(self, worker: _Worker, message: WorkerMessage) -> Iterator[Outcome]:
        worker.heard_at = time.monotonic()
        if isinstance(message, TaskStarted):
            worker.current = message.index
            worker.started_at = time.monotonic()
            fetched = worker.assigned[message.index]
            self._lifecycle.transform_started(fetched.job, worker.lane, message.time)
        elif isinstance(message, TaskDone | TaskFailed):
            worker.current = None
            fetched = worker.assigned.pop(message.index)
            linked = message.recycled if isinstance(message, TaskDone) else None
            with self._slots:
                self._settle(message.index, linked=linked)
            if isinstance(message, TaskDone):
                self._restarts.succeeded()
            outcome = self._lifecycle.transformed(fetched, message, worker.lane)
            self._release()
            yield outcome
        elif isinstance(message, WorkerRetired):
            worker.retiring = True
        elif isinstance(message, WorkerExit):
            self._lifecycle.context.usage.add_worker_cpu(message.cpu_s)
        else:
            worker.fault = message

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

    # ----------------------------------------------------------- dead workers

    def _bury(self, worker: _Worker) -> Iterator[Outcome]:
        """Account for a worker that exited: its items, its channels, its successor."""
        worker.process.join(SHUTDOWN_GRACE_S)
        if worker.fault is not None:
            self._lifecycle.fail_run(crash_error(f"worker {worker.lane}", worker.fault))
        replacement = None
        if not self._stopping and self._keep_restarting(worker):
            replacement = self._start_worker()
        with self._slots:
            self._workers.remove(worker)
            if replacement is not None:
                self._workers.append(replacement)
            for index in worker.assigned:
                self._settle(index, linked=None)
        _discard_channels(worker)
        for index, fetched in worker.assigned.items():
            if self._stopping or (replacement is None and not self._workers):
                self._release()
                yield self._lifecycle.interrupted(fetched.job, Stage.TRANSFORM, fetched)
            elif index != worker.current:
                with self._slots:
                    self._assign(fetched)
            else:
                yield from self._crashed(worker, fetched, replacement)

    def _keep_restarting(self, worker: _Worker) -> bool:
        if worker.retiring and worker.current is None:
            return True
        if worker.timed_out:
            return True  # killed by us for --item-timeout: not a worker dying
        if not self._restarts.allow():
            self._lifecycle.fail_run(
                WorkerCrashed(
                    f"worker processes keep dying ({describe_exit(worker.process)}); "
                    "giving up"
                )
            )
            return False
        return True

    def _crashed(
        self, worker: _Worker, fetched: Fetched, replacement: _Worker | None
    ) -> Iterator[Outcome]:
        """The item a dead worker was processing: its record, or one more run."""
        if worker.timed_out:
            self._release()
            yield self._lifecycle.timed_out(fetched)
            return
        reason = (
            f"worker process crashed ({describe_exit(worker.process)}) "
            "while processing this image"
        )
        outcome = self._lifecycle.crashed(fetched.job, fetched, reason)
        if outcome is None and replacement is not None:
            with self._slots:
                self._assign(fetched, replacement)
            return
        self._release()
        if outcome is None:  # no worker left to run it on
            outcome = self._lifecycle.interrupted(fetched.job, Stage.TRANSFORM, fetched)
        yield outcome

    # ---------------------------------------------------------------- shutdown

    def stop(self) -> None:
        """Take no more files; ask each worker to finish its current item and leave."""
        with self._slots:
            self._stopping = True
            self._slots.notify_all()
        self._stop_line.stop()
        for worker in self._workers:
            _tell_stop(worker)

    def kill_all(self) -> Iterator[Outcome]:
        """Past the grace period: kill every worker; record what each held."""
        for worker in list(self._workers):
            worker.process.kill()
            yield from self._bury(worker)

    def close(self, deadline: float) -> None:
        """Join the workers until ``deadline`` (monotonic), then kill (idempotent).

        The starter thread is joined first (stopped, it adds no further worker).
        """
        if self._starter is not None:
            self._starter.join()
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(SHUTDOWN_GRACE_S)
            _discard_channels(worker)
            for fetched in worker.assigned.values():
                discard(fetched)
        self._workers.clear()
        self._stop_line.close()


def crash_error(who: str, fault: ChildFault) -> WorkerCrashed:
    """The run's error for a child that died of an unexpected exception (a bug)."""
    error = WorkerCrashed(f"{who} failed: {fault.type_name}: {fault.message}")
    error.__cause__ = fault.exception()
    return error


def _tell_stop(worker: _Worker) -> None:
    """Ask ``worker`` to leave once its queued tasks are done (its sentinel)."""
    with contextlib.suppress(ValueError, OSError):
        worker.inbox.put(None)


def _discard_channels(worker: _Worker) -> None:
    worker.reader.close()
    # The tasks still in a dead worker's inbox are tracked in ``assigned`` and handed
    # out again, so what it holds may be dropped.
    worker.inbox.close()
