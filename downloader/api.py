"""The library entry points that the CLI is built on: ``run`` and ``iter_results``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from downloader.errors import InputError
from downloader.manifest import ManifestWriter, OutputFolder, PreviousRun
from downloader.modes import RUNNERS
from downloader.progress import Events, ignore_events
from downloader.records import Job, Outcome, Status
from downloader.report import RunReport, Tally
from downloader.reuse import ContentIndex, settings_fingerprint
from downloader.runtime import Cancellation, RunContext, Usage, cancel_on_signals
from downloader.settings import NameBy, Settings
from downloader.sources import Source, open_source
from downloader.steps import not_started

__all__ = ["Source", "iter_results", "run"]

SKIP_NOTE = "already ok in the manifest (use --force to redo)"


def _plan(
    items: Iterator[Job | Outcome], previous: PreviousRun, force: bool
) -> Iterator[Job | Outcome]:
    """Skip what still stands; redo the rest, from a kept original if there is one."""
    for item in items:
        if isinstance(item, Job) and not force:
            earlier = previous.earlier(item.url)
            if earlier is not None and previous.current(earlier):
                yield earlier.skipped(SKIP_NOTE, line=item.line)
                continue
            original = None if earlier is None else previous.kept_original(earlier)
            if original is not None and item.local_path is None:
                item = replace(item, local_path=str(original))
        yield item


def _marked_insecure(outcome: Outcome) -> Outcome:
    """Flag a record whose URL was requested with TLS verification off."""
    requested = outcome.status is Status.OK or outcome.stage is not None
    return replace(outcome, insecure=True) if requested else outcome


def _not_started(plan: Iterator[Job | Outcome], reason: str) -> Iterator[Outcome]:
    for item in plan:
        if isinstance(item, Job):
            yield not_started(item, reason)
        else:
            yield item


def iter_results(
    source: Source,
    settings: Settings,
    *,
    events: Events = ignore_events,
    cancel: Cancellation | None = None,
    usage: Usage | None = None,
) -> Iterator[Outcome]:
    """Run the job and yield each URL's record as soon as it is written.

    The manifest in ``settings.out`` gets one line per unique input. Stopping early
    (``break``, ``close()``, Ctrl-C or ``cancel.set()``) shuts the run down cleanly.
    After Ctrl-C or ``cancel.set()``, URLs cut short are recorded as ``interrupted`` and
    those never reached as ``not started``; a caller that stops iterating gets records
    only for what had started.

    Raises:
        InputError: the list cannot be read (before anything is written).
        OutputError: the output folder is unusable, locked, or the disk is full.
        WorkerCrashed: a worker failed in a way that is a bug, not a bad image.
    """
    if isinstance(source, str | Path) and str(source) != "-" and Path(source).is_dir():
        raise InputError(f"cannot read URL list {source}: it is a directory")
    items = open_source(source, exclude=settings.out)
    cancel = cancel or Cancellation()
    runner = RUNNERS.get(settings.mode)
    if runner is None:
        raise InputError(f"mode {settings.mode.value!r} is not available")
    with (
        cancel_on_signals(cancel),
        OutputFolder(settings.out) as folder,
    ):
        previous = PreviousRun(
            folder,
            fingerprint=settings_fingerprint(settings),
            by_content=settings.name_by is NameBy.SHA256 and not settings.force,
        )
        context = RunContext(folder.path, folder.tmp, events, cancel, usage or Usage())
        content = ContentIndex(settings, folder.path, previous.same_content)
        with ManifestWriter(folder, previous) as manifest:
            plan = _plan(items, previous, settings.force)
            results = content.relay(runner(plan, settings, context, content.claim))
            try:
                for outcome in results:
                    if not settings.http.verify:
                        outcome = _marked_insecure(outcome)
                    manifest.write(outcome)
                    yield outcome
            finally:
                close = getattr(results, "close", None)
                if close is not None:
                    close()
            if cancel.is_set():
                # Stopped before reaching the end of the list: every input still
                # gets its one record, so failed.txt and the rerun cover them too.
                for outcome in _not_started(plan, cancel.reason or "interrupted"):
                    manifest.write(outcome)
                    yield outcome


def run(
    source: Source,
    settings: Settings | None = None,
    *,
    events: Events = ignore_events,
    cancel: Cancellation | None = None,
) -> RunReport:
    """Run the whole job and return every record plus the totals.

    Keeps every record in memory; for very long lists iterate ``iter_results``.
    """
    settings = settings or Settings()
    cancel = cancel or Cancellation()
    usage = Usage()
    tally = Tally()
    results = []
    for outcome in iter_results(
        source, settings, events=events, cancel=cancel, usage=usage
    ):
        tally.add(outcome)
        results.append(outcome)
    summary = tally.summary(
        interrupted=cancel.is_set(), worker_cpu_s=usage.worker_cpu_s
    )
    return RunReport(tuple(results), summary)
