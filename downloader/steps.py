"""The two steps every scheduler runs, wrapped with progress events and records.

``fetch_step`` turns one ``Job`` into a ``Fetched`` file or a ``failed`` ``Outcome``;
``transform_step`` turns a ``Fetched`` file into the final ``Outcome`` in the calling
process (the process-based schedulers run ``worker.run_task`` in workers instead).
Local faults (``OutputError``) are not per-URL failures and propagate.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator

import httpx

from downloader.errors import FetchError, TransformError
from downloader.fetch import HostLimiter, fetch
from downloader.progress import EventKind, Events, ProgressEvent
from downloader.records import Fetched, Job, Outcome, Stage
from downloader.runtime import RunContext
from downloader.settings import Settings
from downloader.transform import transform_file

__all__ = [
    "discard",
    "emit",
    "fetch_step",
    "interrupted",
    "passthrough",
    "transform_step",
]


def emit(
    events: Events,
    stage: Stage,
    kind: EventKind,
    index: int,
    lane: str,
    *,
    nbytes: int = 0,
    at: float | None = None,
) -> None:
    """Send one progress event, stamped now unless ``at`` is given."""
    moment = time.perf_counter() if at is None else at
    events(ProgressEvent(stage, kind, index, lane, moment, nbytes))


def _byte_counter(events: Events, index: int, lane: str) -> Callable[[int], None]:
    def on_bytes(nbytes: int) -> None:
        emit(events, Stage.DOWNLOAD, EventKind.BYTES, index, lane, nbytes=nbytes)

    return on_bytes


def fetch_step(
    job: Job,
    client: httpx.Client,
    settings: Settings,
    context: RunContext,
    hosts: HostLimiter,
    lane: str,
) -> Fetched | Outcome:
    """Download ``job``; a per-URL failure comes back as a ``failed`` record."""
    emit(context.events, Stage.DOWNLOAD, EventKind.STARTED, job.index, lane)
    started = time.perf_counter()
    try:
        return fetch(
            job,
            client,
            settings.http,
            context.tmp,
            cancel=context.cancel.event,
            hosts=hosts,
            on_bytes=_byte_counter(context.events, job.index, lane),
        )
    except FetchError as exc:
        return Outcome.failure(
            job,
            Stage.DOWNLOAD,
            exc.reason,
            http_status=exc.http_status,
            attempts=exc.attempts,
            final_url=exc.final_url,
            download_s=time.perf_counter() - started,
        )
    finally:
        emit(context.events, Stage.DOWNLOAD, EventKind.FINISHED, job.index, lane)


def transform_step(
    fetched: Fetched, settings: Settings, context: RunContext, lane: str
) -> Outcome:
    """Transform a downloaded file here, in this process, and remove the download."""
    index = fetched.job.index
    emit(context.events, Stage.TRANSFORM, EventKind.STARTED, index, lane)
    started = time.perf_counter()
    try:
        result = transform_file(
            fetched.path, context.out, fetched.job.stem, settings.image
        )
    except TransformError as exc:
        elapsed = time.perf_counter() - started
        return Outcome.failure(
            fetched.job,
            Stage.TRANSFORM,
            exc.reason,
            fetched=fetched,
            transform_s=elapsed,
        )
    finally:
        discard(fetched)
        emit(context.events, Stage.TRANSFORM, EventKind.FINISHED, index, lane)
    return Outcome.success(fetched, result)


def discard(fetched: Fetched) -> None:
    """Remove a download's temporary file (it is done with, or abandoned)."""
    with contextlib.suppress(FileNotFoundError):
        fetched.path.unlink()


def interrupted(job: Job, stage: Stage, fetched: Fetched | None = None) -> Outcome:
    """The record of a URL whose work was cut short by a stop request."""
    return Outcome.failure(job, stage, "interrupted", fetched=fetched)


def passthrough(
    items: Iterable[Job | Outcome], on_outcome: Callable[[Outcome], None]
) -> Iterator[Job]:
    """Yield the jobs of ``items``, handing ready-made records to ``on_outcome``."""
    for item in items:
        if isinstance(item, Outcome):
            on_outcome(item)
        else:
            yield item
