"""One item lifecycle: whatever happens to a job becomes exactly one ``Outcome``.

Every scheduler (sequential, threads, processes, pipeline, async, and any added
later) decides only where and when the two steps run; what a job's record and events
are comes from here, and only from here::

    Job ──fetch()──► Fetched ──after_fetch()──► Fetched ──transform_here()──► Outcome
     │     │                     │ (or a worker's message ──transformed()──► Outcome)
     │     │                     ├──► Outcome: stopped meanwhile, same content done
     │     │                     └──► None: same content in progress (its record
     │     │                               comes with the leader's, reuse.ContentIndex)
     │     ├──► Retry: wait, then fetch() again (pipeline, download processes)
     │     └──► Outcome: failed, or hit a local fault
     └──► crashed(), timed_out(), interrupted(), not_started(): the other ends

A local fault (``OutputError``: a full disk, a read-only folder) is not one URL's
failure: the URL that hit it gets its record with the reason, the run is stopped with
that reason (so every input not reached gets ``not started (<reason>)``), and the
caller raises the fault once every record is written (``raise_if_failed``). A
failure of the run itself (``fail_run``: workers that keep dying) takes the same path.

The retry policy for crashes is stated once, here: an item whose worker (or download
process) died while it held the item is run once more, then fails (``crashed``).
"""

from __future__ import annotations

import contextlib
import stat
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import httpx

from downloader.errors import FetchError, OutputError, TransformError
from downloader.fetch import (
    AsyncHostLimiter,
    HostLimiter,
    RetryLater,
    fetch,
    fetch_async,
)
from downloader.progress import EventKind
from downloader.records import (
    Fetched,
    Job,
    Outcome,
    Stage,
    Status,
    Transformed,
    aside,
)
from downloader.reuse import Claim
from downloader.runtime import RunContext
from downloader.settings import NameBy, Settings
from downloader.sources import earlier_stems
from downloader.spares import SpareFiles
from downloader.steps import (
    ORIGINALS_NAME,
    Retry,
    byte_counter,
    discard,
    emit,
    finish_success,
    hashed,
    stage_local,
)
from downloader.transform import transform_file
from downloader.worker import TaskDone, TaskFailed

if TYPE_CHECKING:  # asyncio is imported where --mode async runs
    import asyncio

__all__ = ["CRASH_RETRIES", "Lifecycle", "keep_every_download"]

CRASH_RETRIES = 1
"""Times an item is run again after the process that held it died. One more run
tells a worker that died by chance from an image that kills every worker; more would
let a poison image take down worker after worker."""


def keep_every_download(fetched: Fetched) -> Fetched:
    """The claim of a lifecycle without a content index (a worker's): keep it."""
    return fetched


class Lifecycle:
    """The records and events of one run's jobs, the run's failure, its crash counts.

    Thread-safe: download threads, the main loop and an event loop's thread call it at
    once. A worker process that runs whole items has a lifecycle of its own (its
    ``context`` records events for the parent, its claim keeps every download).
    """

    def __init__(
        self,
        settings: Settings,
        context: RunContext,
        claim: Claim = keep_every_download,
    ) -> None:
        self.settings = settings
        self.context = context
        self._claim = claim
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self._crashes: Counter[int] = Counter()

    # ----------------------------------------------------------------- the run

    @property
    def stopping(self) -> bool:
        """True once the run was asked to stop (Ctrl-C, a fault, the caller)."""
        return self.context.cancel.is_set()

    @property
    def failure(self) -> BaseException | None:
        """The fault that stopped the run, if one did."""
        return self._failure

    def fail_run(self, error: BaseException) -> None:
        """Stop the run because of ``error``; the first one is raised at the end."""
        with self._lock:
            if self._failure is None:
                self._failure = error
        self.context.cancel.set(str(error))

    def raise_if_failed(self) -> None:
        """Raise the fault that stopped the run (once every record is written)."""
        if self._failure is not None:
            raise self._failure

    # ------------------------------------------------------------ the download

    def fetch(
        self,
        item: Job | Retry,
        client: httpx.Client,
        hosts: HostLimiter,
        lane: str,
        *,
        defer: bool = False,
        worker_hashes: bool = False,
        spares: SpareFiles | None = None,
    ) -> Fetched | Outcome | Retry:
        """Download a job (or continue a waiting one) with its progress events.

        With ``worker_hashes`` (the pipeline's downloads, whose worker reads the file
        in full anyway) the body is not hashed here (``Fetched.sha256`` None), unless
        ``--name-by sha256`` needs the hash before the hand-off. ``spares``: files
        the workers are done with, for the body to be written over (``spares``).

        With ``defer`` (or for a ``Retry``) a wait before the next attempt comes back
        as a ``Retry`` instead of being slept; the job's ``started`` event comes with
        its first attempt and ``finished`` with its last, so progress counts each
        download once however often it waited.
        """
        job, attempts, state = (
            (item.job, item.attempts, item.state)
            if isinstance(item, Retry)
            else (item, 0, None)
        )
        events = self.context.events
        if attempts == 0:
            emit(
                events, Stage.DOWNLOAD, EventKind.STARTED, job.index, lane, url=job.url
            )
        started = time.perf_counter()
        waits = False
        received = byte_counter(events, job.index, lane)
        try:
            if job.local_path is not None:
                return self.stage_local(job, lane)
            return fetch(
                job,
                client,
                self.settings.http,
                self.context.tmp,
                cancel=self.context.cancel.event,
                hosts=hosts,
                on_bytes=received,
                defer_retries=defer or attempts > 0,
                attempts_done=attempts,
                state=state,
                hash_body=not worker_hashes or self.settings.name_by is NameBy.SHA256,
                spares=spares,
            )
        except RetryLater as later:
            waits = True
            due = time.monotonic() + later.delay
            return Retry(job, later.attempts, due, later.state)
        except FetchError as exc:
            return self.fetch_failed(job, exc, started)
        except OutputError as exc:
            return self.local_fault(job, Stage.DOWNLOAD, exc)
        finally:
            received.flush()
            if not waits:
                emit(
                    events,
                    Stage.DOWNLOAD,
                    EventKind.FINISHED,
                    job.index,
                    lane,
                    url=job.url,
                )

    async def fetch_async(
        self,
        job: Job,
        client: httpx.AsyncClient,
        hosts: AsyncHostLimiter,
        stop: asyncio.Event,
        lane: str,
    ) -> Fetched | Outcome:
        """``fetch`` for asyncio: the same events and records, the I/O of a loop."""
        import asyncio  # only --mode async runs this (start-up time)

        events = self.context.events
        emit(events, Stage.DOWNLOAD, EventKind.STARTED, job.index, lane, url=job.url)
        started = time.perf_counter()
        received = byte_counter(events, job.index, lane)
        try:
            if job.local_path is not None:
                return await asyncio.to_thread(self.stage_local, job, lane)
            return await fetch_async(
                job,
                client,
                self.settings.http,
                self.context.tmp,
                stop=stop,
                hosts=hosts,
                on_bytes=received,
            )
        except FetchError as exc:
            return self.fetch_failed(job, exc, started)
        except OutputError as exc:
            return self.local_fault(job, Stage.DOWNLOAD, exc)
        finally:
            received.flush()
            emit(
                events, Stage.DOWNLOAD, EventKind.FINISHED, job.index, lane, url=job.url
            )

    def stage_local(self, job: Job, lane: str) -> Fetched:
        """Put a local file where its download would land; report its bytes.

        Raises:
            FetchError: the file cannot be read.
            OutputError: the staged copy cannot be written.
        """
        staged = stage_local(job, self.context.tmp)
        emit(
            self.context.events,
            Stage.DOWNLOAD,
            EventKind.BYTES,
            job.index,
            lane,
            nbytes=staged.nbytes,
        )
        return staged

    def fetch_failed(self, job: Job, error: FetchError, started: float) -> Outcome:
        """The record of a download that failed; it began at ``started``.

        Stopped before its first request, it never began: ``not started``.
        """
        if error.reason == "interrupted" and error.attempts == 0:
            return self.not_started(job)
        return Outcome.failure(
            job,
            Stage.DOWNLOAD,
            error.reason,
            http_status=error.http_status,
            attempts=error.attempts,
            final_url=error.final_url,
            download_s=time.perf_counter() - started,
        )

    def after_fetch(self, result: Fetched | Outcome) -> Fetched | Outcome | None:
        """What becomes of a download: transform it, a record now, or None.

        A download finished after a stop is let go (``interrupted``); otherwise the
        content index claims it: None means the same body is in progress and this
        job's record comes with that one's.
        """
        if isinstance(result, Outcome):
            return result
        if self.stopping:
            return self.interrupted(result.job, Stage.TRANSFORM, result)
        try:
            return self._claim(result)
        except OutputError as exc:
            return self.local_fault(result.job, Stage.DOWNLOAD, exc, result)

    # ----------------------------------------------------------- the transform

    def transform_here(self, fetched: Fetched, lane: str) -> Outcome:
        """Transform a download in this process, with its events; the download goes."""
        job = fetched.job
        events = self.context.events
        emit(events, Stage.TRANSFORM, EventKind.STARTED, job.index, lane, url=job.url)
        started = time.perf_counter()
        try:
            result = transform_file(
                fetched.path, self.context.out, job.stem, self.settings.image, job.owned
            )
        except TransformError as exc:
            discard(fetched)
            elapsed = time.perf_counter() - started
            return Outcome.failure(
                job, Stage.TRANSFORM, exc.reason, fetched=fetched, transform_s=elapsed
            )
        except OutputError as exc:
            return self.local_fault(job, Stage.TRANSFORM, exc, fetched)
        except BaseException:
            discard(fetched)
            raise
        finally:
            emit(
                events,
                Stage.TRANSFORM,
                EventKind.FINISHED,
                job.index,
                lane,
                url=job.url,
            )
        return self.finish(fetched, result)

    def fetch_now(
        self, job: Job, client: httpx.Client, hosts: HostLimiter, lane: str
    ) -> Fetched | Outcome:
        """``fetch`` that sleeps between attempts itself (never a ``Retry``)."""
        result = self.fetch(job, client, hosts, lane)
        assert not isinstance(result, Retry)  # only deferring fetches wait outside
        return result

    def run_here(
        self, job: Job, client: httpx.Client, hosts: HostLimiter, lane: str
    ) -> Outcome | None:
        """Download then transform ``job`` here (None: see ``after_fetch``)."""
        result = self.after_fetch(self.fetch_now(job, client, hosts, lane))
        if isinstance(result, Fetched):
            return self.transform_here(result, lane)
        return result

    def transform_started(self, job: Job, lane: str, at: float) -> None:
        """A worker began transforming ``job`` at ``at`` (perf_counter)."""
        emit(
            self.context.events,
            Stage.TRANSFORM,
            EventKind.STARTED,
            job.index,
            lane,
            at=at,
            url=job.url,
        )

    def transformed(
        self,
        fetched: Fetched,
        message: TaskDone | TaskFailed,
        lane: str,
        *,
        started_at: float | None = None,
    ) -> Outcome:
        """The record of a transform a worker process ended, with its events.

        ``started_at``: when it began, if ``transform_started`` was not told.
        """
        job = fetched.job
        if message.sha256 is not None:
            fetched = replace(fetched, sha256=message.sha256)
        if started_at is not None:
            self.transform_started(job, lane, started_at)
        emit(
            self.context.events,
            Stage.TRANSFORM,
            EventKind.FINISHED,
            job.index,
            lane,
            at=message.time,
            url=job.url,
        )
        if isinstance(message, TaskDone):
            return self.finish(fetched, message.result)
        if message.fatal:
            return self.local_fault(
                job, Stage.TRANSFORM, OutputError(message.reason), fetched
            )
        discard(fetched)
        return Outcome.failure(
            job,
            Stage.TRANSFORM,
            message.reason,
            fetched=fetched,
            transform_s=message.elapsed,
        )

    def finish(self, fetched: Fetched, result: Transformed) -> Outcome:
        """The ``ok`` record of a transformed download (kept, or removed).

        Outputs this URL's earlier record named and the new one does not (a rerun
        with another ``--format`` or ``--sizes``) are removed once the new ones are
        in place, so none is left on disk that no record names. Not with
        ``--name-by sha256``, where other records may share a name.
        """
        try:
            outcome = finish_success(fetched, result, self.context.out, self.settings)
        except OutputError as exc:
            return self.local_fault(fetched.job, Stage.TRANSFORM, exc, fetched)
        if outcome.status is Status.OK and self.settings.name_by is NameBy.URL:
            kept = {outcome.path, *(outcome.outputs or ()), outcome.original}
            superseded = [name for name in fetched.job.owned if name not in kept]
            if superseded:  # the stems cost a URL parse: only when there is work
                stems = earlier_stems(fetched.job)
                remove_superseded(self.context.out, superseded, stems)
        return outcome

    # -------------------------------------------------------------- other ends

    def crashed(
        self,
        job: Job,
        fetched: Fetched | None,
        reason: str,
        *,
        stage: Stage | None = None,
    ) -> Outcome | None:
        """A process died holding ``job``: None to run it again, else its record.

        ``reason`` says what died and how (``worker process crashed (killed by
        SIGKILL) while processing this image``). The policy is ``CRASH_RETRIES``,
        counted per job over the whole run; after a stop nothing runs again.
        ``stage`` defaults to the transform when there is a download, else the
        download.
        """
        stage = stage or _stage(fetched)
        with self._lock:
            self._crashes[job.index] += 1
            crashes = self._crashes[job.index]
        if crashes <= CRASH_RETRIES:
            if not self.stopping:
                return None
            return self.interrupted(job, stage, fetched)
        if fetched is not None:
            fetched = _let_go(fetched)
        if crashes > 1:
            reason += (
                "; retried once" if crashes == 2 else f"; retried {crashes - 1} times"
            )
        return Outcome.failure(job, stage, reason, fetched=fetched)

    def timed_out(self, fetched: Fetched) -> Outcome:
        """A transform ran past ``--item-timeout``; its worker was replaced."""
        fetched = _let_go(fetched)
        reason = (
            f"processing timed out after {self.settings.item_timeout:g}s "
            "(worker replaced)"
        )
        return Outcome.failure(fetched.job, Stage.TRANSFORM, reason, fetched=fetched)

    def interrupted(
        self, job: Job, stage: Stage, fetched: Fetched | None = None
    ) -> Outcome:
        """The record of a job cut short by a stop; its download, if any, goes."""
        if fetched is not None:
            fetched = _let_go(fetched)
        return Outcome.failure(job, stage, "interrupted", fetched=fetched)

    def not_started(self, job: Job, reason: str | None = None) -> Outcome:
        """The record of a job the run never reached before it was stopped."""
        why = reason or self.context.cancel.reason or "interrupted"
        return Outcome.failure(job, None, aside("not started", why))

    def local_fault(
        self,
        job: Job,
        stage: Stage,
        error: OutputError,
        fetched: Fetched | None = None,
    ) -> Outcome:
        """``job`` hit a local fault: its record, and the run stops with the reason."""
        if fetched is not None:
            fetched = _let_go(fetched)
        self.fail_run(error)
        return Outcome.failure(job, stage, str(error), fetched=fetched)


def _let_go(fetched: Fetched) -> Fetched:
    """Remove the download of a job that ends without its worker's result; the
    download with its SHA-256 for the record (read first if the worker was to)."""
    fetched = hashed(fetched)
    discard(fetched)
    return fetched


def remove_superseded(out: Path, names: list[str], stems: tuple[str, ...]) -> None:
    """Remove earlier outputs of a URL, named relative to ``out`` by its old record.

    The names come from a manifest, which anyone may have edited: only a regular
    file inside ``out`` named as this URL's outputs are (``<stem>.<ext>`` for one of
    ``stems``, at the top or in one size folder; never a kept original) goes. A
    user's own file, whatever a record says of it, stays.
    """
    for name in names:
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or len(relative.parts) > 2:
            continue
        if relative.parts[:1] == (ORIGINALS_NAME,):
            continue  # a kept download is an input, not an output
        if relative.stem not in stems or not relative.suffix:
            continue  # not a name this tool gives this URL's outputs
        path = out / relative
        with contextlib.suppress(OSError):
            if stat.S_ISREG(path.lstat().st_mode):
                path.unlink()


def _stage(fetched: Fetched | None) -> Stage:
    return Stage.DOWNLOAD if fetched is None else Stage.TRANSFORM
