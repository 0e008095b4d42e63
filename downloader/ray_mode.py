"""The ``ray`` scheduler: shards of the list as Ray tasks, one manifest (the extra).

::

    driver (this process)                        Ray cluster (any node)
    items ──cut into shards of --shard-size──►  _shard_task(spec): the lifecycle over
      at most 2 x cluster CPUs in flight          the shard's jobs (modes.run_threads,
      (ray.wait)                                  --threads threads, in-task
                                                  transforms), each record appended
                                                  to OUT/.parts/<run>-shard-N.jsonl
    records + events ◄── _Inbox actor ◄───────── every SEND_S: events, records
      yielded: api writes manifest.jsonl           (the reply: stop, if the run stops)
    task ends: the part's records not yet heard of, then the part is removed

With ``--output-format webdataset`` a shard of the list is a tar shard too: the
driver names slice N ``first_free_number + N`` and its task writes that tar
(``ray_shards``), so no tar bytes ever pass through the driver.

Why this shape: a task per CPU (``num_cpus=1``) running the ``threads`` scheduler
keeps one node's cores busy without processes inside Ray's workers (on this
machine ``threads`` matches ``pipeline``'s images/s, README "Modes"), and a worker
that dies is Ray's business: it runs the task again (``SHARD_RETRIES``), which
resumes after what the part records (``ray_shards``). The driver holds only the jobs
of the shards in flight, so the list never sits in its memory nor in Ray's object
store; only the driver writes the manifest, so it stays one line per URL.

Without ``--ray-address`` a local Ray is started for the run, bound to 127.0.0.1
(Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` as "this machine only"), without
dashboard or usage statistics, and stopped after it; a watcher (``ray_reaper``)
stops it if the driver is killed. With one, the address is tried before
``ray.init`` (which would retry for minutes). A caller that has already called
``ray.init`` (a script, the tests) keeps its Ray: it is used, not stopped.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from downloader import ray_reaper
from downloader.errors import InputError, OutputError
from downloader.lifecycle import Lifecycle
from downloader.manifest import record_key
from downloader.politeness import process_rate
from downloader.progress import ProgressEvent
from downloader.ray_shards import (
    PartFile,
    ShardNews,
    ShardReport,
    ShardSpec,
    new_run_name,
    parts_folder,
    remove_unrecorded_outputs,
    run_shard_here,
)
from downloader.records import Job, Outcome
from downloader.runtime import Cancellation, close_open_runs
from downloader.scheduling import TICK_S, Lanes, jobs_of, stop_when_left_early
from downloader.settings import RAY_EXTRA_HINT, OutputFormat, Settings
from downloader.shard_writer import first_free_number, shard_name

__all__ = ["SHARDS_PER_CPU", "SHARD_RETRIES", "run_ray"]

SHARDS_PER_CPU = 2
"""Shards in flight per cluster CPU: one running, one queued to start at once."""
SHARD_RETRIES = 3
"""Times Ray runs a shard's task again after its worker process died (Ray's own
default). A retry resumes after the records its part holds, so it costs only the
items that were in flight; a node lost on a cluster is a normal event."""
SEND_S = 0.5
"""How often a task sends its news (events, records) to the driver."""
STOP_GRACE_S = 30.0
"""How long the driver waits, after a stop, for running tasks to record what they
were doing (``interrupted``) before it cancels them by force."""
_REPLY_S = 60.0
"""Longest a task waits for the driver's inbox to answer before it stops."""
_log = logging.getLogger("downloader")
_LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's "not a cluster" switch: every address it picks is 127.0.0.1.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def _import_ray(address: str | None) -> Any:
    """Import Ray (set up for a local start when there is no ``address``).

    Raises:
        InputError: Ray is not installed.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        for name, value in _LOCAL_ENV.items():
            os.environ.setdefault(name, value)
    try:
        ray = importlib.import_module("ray")
    except ImportError as exc:
        raise InputError(
            f"--mode ray needs Ray, which is not installed: {RAY_EXTRA_HINT}"
        ) from exc
    # Exit handlers run last registered first: runs left open are closed (their
    # tasks cancelled, a local Ray stopped) before Ray's own handler shuts it down,
    # after which a Ray call would connect again, and wait minutes.
    atexit.unregister(close_open_runs)
    atexit.register(close_open_runs)
    return ray


@contextlib.contextmanager
def connected(settings: Settings) -> Iterator[Any]:
    """Yield the ``ray`` module, connected: to the caller's Ray, a cluster, or a
    local Ray started here (and stopped after)."""
    ray = _import_ray(settings.ray_address)
    with _messages_logged():
        if ray.is_initialized():
            yield ray
            return
        with _started(ray, settings):
            yield ray


@contextlib.contextmanager
def _messages_logged() -> Iterator[None]:
    """Send the messages Ray prints for the driver (a task's worker died, it is
    retried) to the ``downloader`` logger (debug) instead of standard output,
    which belongs to ``--json`` and ``--events -``; the records say what came of
    them. Ray offers no switch for these, so its printer is replaced for the run
    (``ray._private.worker.print_to_stdstream``; nothing is done if it is gone)."""
    module: Any = sys.modules.get("ray._private.worker")
    printer = getattr(module, "print_to_stdstream", None)
    if module is None or printer is None:
        yield
        return

    def log(data: dict[str, Any], ignore_prefix: bool) -> None:
        for line in data.get("lines", ()):
            _log.debug("ray: %s", line)

    module.print_to_stdstream = log
    try:
        yield
    finally:
        module.print_to_stdstream = printer


@contextlib.contextmanager
def _started(ray: Any, settings: Settings) -> Iterator[None]:
    """``ray.init`` for the run, ``ray.shutdown`` after it.

    Raises:
        OutputError: no Ray answers at ``--ray-address``, or a local one could not
            start: the run cannot begin (exit 3), and nothing is written.
    """
    # Ray sets its own SIGTERM handler in ray.init; the run's (Ctrl-C and SIGTERM
    # stop it in order) are put back.
    saved = _signal_handlers()
    with contextlib.ExitStack() as stack:
        try:
            if settings.ray_address is None:
                # Started first, so that it ends last: after ray.shutdown, or after
                # this process itself, however it ended.
                token = stack.enter_context(_reaped())
                with _marked(token):
                    ray.init(
                        address="local",
                        _node_ip_address="127.0.0.1",
                        include_dashboard=False,
                        log_to_driver=False,
                        logging_level="error",
                    )
            else:
                _check_answers(ray, settings.ray_address)
                ray.init(
                    address=settings.ray_address,
                    log_to_driver=False,
                    logging_level="error",
                )
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = settings.ray_address or "a local Ray"
            raise OutputError(f"cannot start or join Ray ({where}): {exc}") from exc
        finally:
            _restore(saved)
        try:
            yield
        finally:
            _inboxes.clear()
            ray.shutdown()


PROBE_S = 5.0
"""How long the driver waits for the cluster's port to accept a connection before
it gives up (exit 3). Ray itself would retry for minutes."""


def _check_answers(ray: Any, address: str) -> None:
    """Raise unless something accepts a connection at the cluster's address.

    ``auto`` is looked up as Ray does (``RAY_ADDRESS``, then the address of the last
    ``ray start`` on this machine); the error names the address as given.

    Raises:
        OutputError: nothing answers there (or ``auto`` finds no cluster).
    """
    shown = address
    target = address.removeprefix("ray://")
    if address == "auto":
        services = getattr(getattr(ray, "_private", None), "services", None)
        find = getattr(services, "canonicalize_bootstrap_address_or_die", None)
        if find is None:  # Ray moved it: ray.init looks, with its own retries
            return
        try:
            target = find(address)
        except ConnectionError as exc:
            raise OutputError(f"cannot join Ray at --ray-address auto: {exc}") from exc
        shown = f"auto ({target})"
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), PROBE_S) as conn:
            speaks_grpc = _speaks_http2(conn)
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or exc
        raise OutputError(
            f"cannot reach Ray at --ray-address {shown}: {why} (is the cluster "
            "started? ray start --head)"
        ) from exc
    if not speaks_grpc:
        raise OutputError(
            f"cannot join Ray at --ray-address {shown}: something answers there, "
            "but not Ray (its GCS speaks gRPC; is this the right port?)"
        )


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
"""A client's HTTP/2 connection preface, then an empty SETTINGS frame."""
_SETTINGS_FRAME = 0x04


def _speaks_http2(conn: socket.socket) -> bool:
    """Whether the server at ``conn`` answers an HTTP/2 preface with SETTINGS.

    Ray's GCS (and its client server) speak gRPC over HTTP/2, whose server opens
    with a SETTINGS frame; a web server or anything else does not. Without this
    check ``ray.init`` retries such a port for minutes, deaf to Ctrl-C.
    """
    conn.settimeout(PROBE_S)
    conn.sendall(_HTTP2_PREFACE)
    header = b""
    with contextlib.suppress(TimeoutError):
        while len(header) < 9:  # bounded: 9 bytes, each recv waits PROBE_S at most
            chunk = conn.recv(9 - len(header))
            if not chunk:
                break
            header += chunk
    return len(header) == 9 and header[3] == _SETTINGS_FRAME


@contextlib.contextmanager
def _reaped() -> Iterator[str]:
    """Start the watcher that ends the local Ray's processes with this process;
    yield the token that marks them (``ray_reaper``).

    At the end of the block the watcher is told to end them now (``ray.shutdown``
    has stopped most; an agent or idle worker may linger) and waited for.
    """
    token = uuid.uuid4().hex
    try:
        driver = os.pidfd_open(os.getpid())
    except (AttributeError, OSError):  # no pidfds: the closed pipe tells it too
        driver = -1
    fds = () if driver < 0 else (driver,)
    try:
        watcher = subprocess.Popen(
            [sys.executable, "-I", ray_reaper.__file__, token, str(driver)],
            stdin=subprocess.PIPE,
            pass_fds=fds,
            start_new_session=True,  # not in the terminal's group: Ctrl-C is ours
        )
    finally:
        if driver >= 0:
            os.close(driver)
    try:
        yield token
    finally:
        assert watcher.stdin is not None
        watcher.stdin.close()
        try:
            watcher.wait(ray_reaper.REAP_S + 5)
        except subprocess.TimeoutExpired:
            watcher.kill()
            watcher.wait()


@contextlib.contextmanager
def _marked(token: str) -> Iterator[None]:
    """Put the token in the environment the local Ray's processes inherit."""
    os.environ[ray_reaper.OWNER_ENV] = token
    try:
        yield
    finally:
        del os.environ[ray_reaper.OWNER_ENV]


def _signal_handlers() -> dict[signal.Signals, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {number: signal.getsignal(number) for number in _SIGNALS}


def _restore(saved: dict[signal.Signals, Any]) -> None:
    for number, handler in saved.items():
        signal.signal(number, signal.SIG_DFL if handler is None else handler)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# ------------------------------------------------------------- the task's side


@dataclass(frozen=True, slots=True)
class _Batch:
    """One message from a task: its news since the last one."""

    run: str
    shard: int
    worker: tuple[str, int]
    """(node, pid) of the worker process."""
    clock_offset: float
    """``time.time() - time.perf_counter()`` there: event times are its own."""
    events: list[ProgressEvent]
    records: list[Outcome]


class _Inbox:
    """The driver's mailbox (a small actor): tasks push news, the driver takes it.

    The reply to a push is the stop reason once its run stops, else None: that is
    how a running task learns to stop in order. One inbox serves every run of a
    driver process (starting an actor takes a worker process, seconds on a busy
    machine), so its state is by run.
    """

    def __init__(self) -> None:
        self._batches: dict[str, list[_Batch]] = {}
        self._stops: dict[str, str] = {}

    def push(self, batch: _Batch) -> str | None:
        self._batches.setdefault(batch.run, []).append(batch)
        return self._stops.get(batch.run)

    def take(self, run: str) -> list[_Batch]:
        return self._batches.pop(run, [])

    def stop(self, run: str, reason: str) -> None:
        self._stops[run] = reason

    def forget(self, run: str) -> None:
        self._batches.pop(run, None)
        self._stops.pop(run, None)


_inboxes: dict[str, Any] = {}
"""The inbox of each Ray job this process has driven (by job id)."""


def _inbox(ray: Any) -> Any:
    """This driver's inbox, started on first use in its Ray job."""
    job = ray.get_runtime_context().get_job_id()
    if job not in _inboxes:
        _inboxes.clear()  # those of earlier jobs died with their job
        _inboxes[job] = ray.remote(num_cpus=0, max_restarts=0)(_Inbox).remote()
    return _inboxes[job]


class _Sender:
    """The task's thread that sends its news every ``SEND_S`` and hears a stop.

    A push is not waited for (the inbox may still be starting while the task
    works): its reply is read when the next one goes. The last push, when the
    task ends, is waited for, so its records and events reach the inbox before the
    task's result reaches the driver.
    """

    def __init__(
        self, ray: Any, inbox: Any, run: str, shard: int, news: ShardNews
    ) -> None:
        self._ray, self._inbox, self._news = ray, inbox, news
        self._run, self._shard = run, shard
        self.cancel = Cancellation()
        self._worker = (ray.get_runtime_context().get_node_id()[:8], os.getpid())
        self._reply: Any = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="downloader-news")

    def send(self, *, wait: bool = False) -> None:
        """Send what is new, once the inbox has answered the last push."""
        self._settle(wait=wait)
        if self._reply is None:
            events, records = self._news.take()
            offset = time.time() - time.perf_counter()
            batch = _Batch(
                self._run, self._shard, self._worker, offset, events, records
            )
            self._reply = self._inbox.push.remote(batch)

    def _settle(self, *, wait: bool) -> None:
        """Hear the reply to the last push if it has come (or wait for it)."""
        if self._reply is not None:
            ready, _ = self._ray.wait([self._reply], timeout=_REPLY_S if wait else 0)
            if ready:
                self._heard(self._reply)
                self._reply = None

    def _heard(self, reply: Any) -> None:
        try:
            stop = self._ray.get(reply)
        except self._ray.exceptions.RayError as exc:
            stop = f"the driver is gone ({type(exc).__name__})"
        if stop is not None:
            self.cancel.set(stop)

    def __enter__(self) -> _Sender:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()
        self.send(wait=True)  # the last news, in the inbox before the result
        self._settle(wait=True)

    def _loop(self) -> None:
        self.send()  # at once: the driver knows the task has begun
        while not self._done.wait(SEND_S):
            self.send()


def _shard_task(
    spec: ShardSpec, settings: Settings, out: str, inbox: Any, run: str
) -> ShardReport:
    """The body of a shard's Ray task (any node): the lifecycle over its jobs."""
    import ray  # in a Ray worker, Ray is there

    news = ShardNews()
    with _Sender(ray, inbox, run, spec.number, news) as sender:
        return run_shard_here(spec, settings, Path(out), news, sender.cancel)


# ------------------------------------------------------------ the driver's side


@dataclass(slots=True)
class _Shard:
    spec: ShardSpec
    waiting: dict[bytes, Job]
    """Jobs without a record yet, by ``record_key`` of their URL."""
    heard: bool = False
    """A batch came from its task: it has started."""
    sent: float = field(default_factory=time.time)
    """When it was submitted (``time.time()``): files its attempts wrote are newer."""


def run_ray(items: Iterable[Job | Outcome], lifecycle: Lifecycle) -> Iterator[Outcome]:
    """Run the jobs of ``items`` in shards on a Ray cluster; yield every record."""
    with connected(lifecycle.settings) as ray, stop_when_left_early(lifecycle):
        yield from _RayRun(ray, lifecycle).run(items)


class _RayRun:
    """One run's shards in flight, their news, and their ends."""

    def __init__(self, ray: Any, lifecycle: Lifecycle) -> None:
        self.ray = ray
        self.lifecycle = lifecycle
        self.settings = lifecycle.settings
        self.out = Path(os.path.abspath(lifecycle.context.out))
        self.tmp = Path(os.path.abspath(lifecycle.context.tmp))
        self.parts = parts_folder(self.out)
        self.run_name = new_run_name()
        self.in_flight: dict[Any, _Shard] = {}
        self.by_number: dict[int, _Shard] = {}
        self.lanes = Lanes("ray")
        self.clock_offset = time.time() - time.perf_counter()
        self.stop_deadline: float | None = None
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.limit = SHARDS_PER_CPU * cpus
        # --rate-per-host holds for the whole run: each task that may run at once
        # (one per cluster CPU) keeps to its share, as a local download process does.
        http = replace(
            self.settings.http, rate_per_host=process_rate(self.settings.http, cpus)
        )
        self.task_settings = replace(self.settings, http=http)
        # SPREAD: shards go to every node, not first to fill the driver's (a
        # download tool spreads its network load too).
        self.task = ray.remote(
            num_cpus=1,
            max_retries=SHARD_RETRIES,
            retry_exceptions=False,
            scheduling_strategy="SPREAD",
        )(_shard_task)
        self.inbox = _inbox(ray)
        # --output-format webdataset: slice N's task writes shard first + N, past
        # every shard in the folder (as ShardWriter numbers them).
        self.first_tar: int | None = None
        if self.settings.output_format is OutputFormat.WEBDATASET:
            self.first_tar = first_free_number(self.out)

    def run(self, items: Iterable[Job | Outcome]) -> Iterator[Outcome]:
        ready: list[Outcome] = []
        shards = _cut(jobs_of(items, ready.append), self.settings.shard_size)
        numbers = itertools.count()
        feeding = True
        try:
            while feeding or self.in_flight or ready:
                if self.lifecycle.stopping:
                    feeding = False
                    self._stop()
                while feeding and len(self.in_flight) < self.limit:
                    jobs = next(shards, None)
                    if jobs is None:
                        feeding = False
                    else:
                        self._submit(next(numbers), jobs)
                yield from ready
                ready.clear()
                if self.in_flight:
                    done, _ = self.ray.wait(
                        list(self.in_flight), num_returns=1, timeout=TICK_S
                    )
                    yield from self._news()
                    for ref in done:
                        yield from self._finish(ref)
        finally:
            for ref in self.in_flight:
                self.ray.cancel(ref, force=True)
            self.inbox.forget.remote(self.run_name)
            with contextlib.suppress(OSError):
                self.parts.rmdir()  # only if empty: parts left are merged next run

    def _submit(self, number: int, jobs: list[Job]) -> None:
        # Absolute paths: a task's working folder is not the driver's.
        spec = ShardSpec(
            number,
            tuple(_absolute(job) for job in jobs),
            self.parts / f"{self.run_name}-shard-{number:05d}.jsonl",
            self.tmp / f"shard-{number:05d}",
            None if self.first_tar is None else shard_name(self.first_tar + number),
        )
        shard = _Shard(spec, {record_key(job.url): job for job in jobs})
        ref = self.task.remote(
            spec, self.task_settings, str(self.out), self.inbox, self.run_name
        )
        self.in_flight[ref] = shard
        self.by_number[number] = shard

    def _stop(self) -> None:
        """Tell the tasks to stop; drop those not begun; force the rest later."""
        if self.stop_deadline is None:
            reason = self.lifecycle.context.cancel.reason or "interrupted"
            self.ray.get(self.inbox.stop.remote(self.run_name, reason))
            self.stop_deadline = time.monotonic() + STOP_GRACE_S
            for ref, shard in self.in_flight.items():
                if not shard.heard:
                    self.ray.cancel(ref)
        elif time.monotonic() > self.stop_deadline:
            for ref in self.in_flight:
                self.ray.cancel(ref, force=True)
            self.stop_deadline = float("inf")

    def _news(self) -> Iterator[Outcome]:
        """Relay the tasks' events; yield their records (once per job)."""
        events = self.lifecycle.context.events
        for batch in self.ray.get(self.inbox.take.remote(self.run_name)):
            shard = self.by_number.get(batch.shard)
            if shard is None:
                continue  # a shard already finished
            shard.heard = True
            shift = batch.clock_offset - self.clock_offset
            for event in batch.events:
                lane = self.lanes.name((*batch.worker, event.lane))
                events(replace(event, lane=lane, time=event.time + shift))
            for outcome in batch.records:
                if shard.waiting.pop(record_key(outcome.url), None) is not None:
                    yield outcome

    def _finish(self, ref: Any) -> Iterator[Outcome]:
        """A shard's task ended: every job of it gets its record, the part goes."""
        reason = None
        report: ShardReport | None = None
        try:
            report = self.ray.get(ref)
        except self.ray.exceptions.TaskCancelledError:
            pass
        except self.ray.exceptions.RayError as exc:
            reason = _task_failure(self.ray, exc)
        yield from self._news()  # what it sent last, before it returned
        shard = self.in_flight.pop(ref)
        del self.by_number[shard.spec.number]
        part = PartFile(shard.spec.part)
        # Read only if a record was not heard of (its task died after writing it).
        for outcome in part.records() if shard.waiting else ():
            if shard.waiting.pop(record_key(outcome.url), None) is not None:
                yield outcome
        for job in shard.waiting.values():
            # Its task may have died between placing an image and recording it.
            remove_unrecorded_outputs(self.out, job, self.settings, shard.sent)
            if reason is None:
                yield self.lifecycle.not_started(job)
            else:
                yield Outcome.failure(job, None, reason)
        shard.waiting.clear()
        part.remove()
        if report is not None:
            self.lifecycle.context.usage.add_worker_cpu(report.cpu_s)
            if report.fault is not None:
                self.lifecycle.fail_run(OutputError(report.fault))


def _task_failure(ray: Any, error: BaseException) -> str:
    """The reason recorded for the jobs of a shard whose task failed for good."""
    if isinstance(
        error, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError
    ):
        return (
            f"ray task failed: its worker process died {SHARD_RETRIES + 1} times "
            "while running this shard"
        )
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"ray task failed: {type(cause).__name__}: {text[-1] if text else ''}"


def _absolute(job: Job) -> Job:
    """``job`` with its local file (``--input-dir``, a kept original) absolute."""
    if job.local_path is None or os.path.isabs(job.local_path):
        return job
    return replace(job, local_path=os.path.abspath(job.local_path))


def _cut(jobs: Iterator[Job], size: int) -> Iterator[list[Job]]:
    """Consecutive shards of ``size`` jobs (the last one shorter)."""
    while True:
        shard = list(itertools.islice(jobs, size))
        if not shard:
            return
        yield shard
