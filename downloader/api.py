"""The library entry points that the CLI is built on: ``run`` and ``iter_results``."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from downloader.errors import DownloaderError, InputError, OutputError
from downloader.manifest import ManifestWriter, OutputFolder, PreviousRun
from downloader.parquet_index import IndexAtEnd
from downloader.parts import ListDigest, finish_part, only_part, start_part
from downloader.progress import Events, ignore_events, tell_note, tell_outcome
from downloader.records import Job, Outcome, Status
from downloader.report import RunReport, Tally, summary_json
from downloader.reuse import ContentIndex, settings_fingerprint
from downloader.runtime import (
    Cancellation,
    RunContext,
    Usage,
    cancel_on_signals,
    close_at_exit,
    helper_processes,
)
from downloader.settings import (
    VERSION,
    Mode,
    NameBy,
    OutputFormat,
    Settings,
    box_label,
    check_environment_proxies,
)
from downloader.shard_writer import (
    ShardIndex,
    ShardWriter,
    adopt_unrecorded_shards,
    remove_empty_folders,
    remove_shards,
)
from downloader.sources import LocalFiles, Prefetched, Source, open_source

if TYPE_CHECKING:
    # Imported when a run has taken its output folder (_in_folder).
    from downloader.lifecycle import Lifecycle

__all__ = ["Source", "iter_results", "run"]

SKIP_NOTE = "already ok in the manifest (use --force to redo)"
LEFT_EARLY = "the caller stopped reading the results"
"""The stop reason when the caller leaves ``iter_results`` early."""


def _plan(
    items: Iterator[Job | Outcome], previous: PreviousRun, force: bool
) -> Iterator[Job | Outcome]:
    """Skip what still stands; redo the rest, from a kept original if there is one."""
    for item in items:
        earlier = previous.earlier(item.url) if isinstance(item, Job) else None
        if isinstance(item, Job) and earlier is not None:
            if not force and previous.current(earlier):
                yield earlier.skipped(SKIP_NOTE, line=item.line)
                continue
            item = _redo(item, earlier, previous, force)
        yield item


def _redo(job: Job, earlier: Outcome, previous: PreviousRun, force: bool) -> Job:
    """``job``, which may replace the files of its ``earlier`` ok record.

    Unless forced, it is processed again from its kept original if there is one.
    """
    recorded = (earlier.path, *(earlier.outputs or ()), earlier.original)
    job = replace(job, owned=tuple(name for name in recorded if name))
    original = None if force else previous.kept_original(earlier)
    if original is not None and job.local_path is None:
        job = replace(job, local_path=str(original))
    return job


def start_fields(settings: Settings) -> dict[str, object]:
    """What the ``start`` note of a run says about it."""
    return {
        "version": VERSION,
        "mode": settings.mode.value,
        "out": str(settings.out),
        "threads": settings.threads,
        "procs": settings.procs,
        "download_procs": settings.download_processes,
        "insecure": not settings.http.verify,
        "part": None if settings.part is None else str(settings.part),
    }


def _marked_insecure(outcome: Outcome) -> Outcome:
    """Flag a record whose URL was requested with TLS verification off."""
    requested = outcome.status is Status.OK or outcome.stage is not None
    return replace(outcome, insecure=True) if requested else outcome


def _every_record(
    results: Iterator[Outcome], plan: Iterator[Job | Outcome], lifecycle: Lifecycle
) -> Generator[Outcome, None, None]:
    """The scheduler's records, then, if the run was stopped, those never reached.

    A fault the scheduler raises (a worker that keeps dying, a full disk) stops the
    run like any other: the inputs not reached still get their records, then it is
    raised. Closing this generator closes the scheduler (``results``), which then
    gives up on what it was doing: the path of a second interruption.
    """
    try:
        yield from results
    except DownloaderError as exc:
        lifecycle.fail_run(exc)
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
    if lifecycle.stopping:
        # Stopped before reaching the end of the list: every input still gets its
        # one record, so failed.txt and the rerun cover them too.
        for item in plan:
            yield lifecycle.not_started(item) if isinstance(item, Job) else item
    lifecycle.raise_if_failed()


def _shard_writer(
    settings: Settings, folder: OutputFolder, lifecycle: Lifecycle
) -> ShardWriter | None:
    """The run's shard writer with ``--output-format webdataset``, else None."""
    if settings.output_format is OutputFormat.FILES:
        return None
    if settings.mode is Mode.RAY:
        # Each task writes the shard of its slice (ray_shards); numbered from the
        # folder's first free number once the driver starts, after this removal.
        if settings.force:
            remove_shards(folder.path)
        return None
    return ShardWriter(
        folder.path,
        folder.tmp,
        settings.shard_size,
        lifecycle.fail_run,
        force=settings.force,
    )


def iter_results(
    source: Source,
    settings: Settings,
    *,
    events: Events = ignore_events,
    cancel: Cancellation | None = None,
    usage: Usage | None = None,
) -> Generator[Outcome, None, None]:
    """Run the job and yield each URL's record as soon as it is written.

    The manifest in ``settings.out`` gets one line per unique input, however the run
    ends. After Ctrl-C or ``cancel.set()``, the run stops taking new URLs, lets those
    in progress end (an image being written gets its ok record; the others are
    ``interrupted``) and records the rest as ``not started``; those records are
    yielded too.

    A caller that leaves early stops the run the same way: when this generator is
    closed (``close()``, or collected once nothing refers to it, which CPython does at
    once after a ``break`` out of ``for outcome in iter_results(...)``) or when an
    exception is thrown into it, the run is cancelled and drained before ``close()``
    returns: every output on disk has its ok record, the rest are written as
    ``interrupted`` / ``not started`` (not yielded: the caller has left), and every
    thread and process of the run has ended. An exception in the caller's loop body
    does not close the generator by itself while something still refers to it; wrap
    the loop in ``contextlib.closing(iter_results(...))`` to stop the run there and
    then. One still open when the interpreter exits is closed then, before the exit
    handlers of the libraries the run uses (Ray's).

    Raises:
        InputError: the list cannot be read (before anything is written).
        OutputError: the output folder is unusable, locked, or the disk is full; no
            Ray answers at ``--ray-address`` (before any record is written).
        WorkerCrashed: a worker failed in a way that is a bug, not a bad image.
    """
    results = _iter_results(source, settings, events, cancel, usage)
    close_at_exit(results)
    return results


def _iter_results(
    source: Source,
    settings: Settings,
    events: Events,
    cancel: Cancellation | None,
    usage: Usage | None,
) -> Generator[Outcome, None, None]:
    """The run of ``iter_results``."""
    # First: a reader of the events knows the run is up before the list is opened
    # (a FIFO's open waits for its writer).
    tell_note(events, "start", start_fields(settings))
    if not isinstance(source, LocalFiles):
        check_environment_proxies(settings.http)
    if isinstance(source, str | Path) and str(source) != "-" and Path(source).is_dir():
        raise InputError(f"cannot read URL list {source}: it is a directory")
    cancel = cancel or Cancellation()
    # Read in a thread of its own: a list that waits (a silent pipe) never blocks a
    # stop; the rest of a list that is there still gets its records after one.
    digest = ListDigest()
    items = Prefetched(
        only_part(open_source(source, exclude=settings.out), settings.part, digest),
        cancel.is_set,
    )
    with (
        cancel_on_signals(cancel),
        OutputFolder.for_settings(settings) as folder,
        helper_processes(folder.tmp, start=settings.mode in EARLY_FORKSERVER),
    ):
        yield from _in_folder(settings, folder, items, digest, events, cancel, usage)


EARLY_FORKSERVER = frozenset({Mode.PROCESSES})
"""The modes whose first request is a worker process's: their forkserver is started
as soon as the output folder is taken (its socket lives there), so that its start-up
(a fresh interpreter importing the workers' modules) overlaps this process's own
imports and planning instead of following them. The other worker modes make their
first requests here: a forkserver started early would only compete with them for
the CPU (pipeline: 0.69 -> 1.15 s to the first request, 2 busy cores)."""


def _in_folder(
    settings: Settings,
    folder: OutputFolder,
    items: Prefetched[Job | Outcome],
    digest: ListDigest,
    events: Events,
    cancel: Cancellation,
    usage: Usage | None,
) -> Generator[Outcome, None, None]:
    """The run of ``iter_results`` once its output folder is taken."""
    # Imported only now, as the forkserver starts (helper_processes): until the
    # folder is taken the command needs none of the fetch and run machinery.
    from downloader.lifecycle import Lifecycle
    from downloader.modes import RUNNERS, scheduler_ready
    from downloader.ray_shards import merge_leftover_parts

    runner = RUNNERS[settings.mode]  # every Mode has its scheduler
    with scheduler_ready(settings):
        cut_short = merge_leftover_parts(folder)  # what a killed ray run left
        fingerprint = settings_fingerprint(settings)
        start_part(folder, settings.part, fingerprint)

        def previous_run() -> PreviousRun:
            return PreviousRun(
                folder,
                fingerprint=fingerprint,
                by_content=settings.name_by is NameBy.SHA256 and not settings.force,
                holds=ShardIndex(folder.path).holds,
            )

        previous = previous_run()
        # What a run killed between a shard's rename and its records left: recorded
        # before the plan reads the records (a part run writes no shards).
        adopting = settings.part is None and not settings.force
        if adopting and adopt_unrecorded_shards(folder, previous, cut_short):
            previous = previous_run()
        usage = usage or Usage()
        context = RunContext(folder.path, folder.tmp, events, cancel, usage)
        content = ContentIndex(settings, folder.path, previous.same_content)
        lifecycle = Lifecycle(settings, context, content.claim)
        shards = _shard_writer(settings, folder, lifecycle)
        # The index is written as the manifest writer has closed (merged): the
        # final manifest, before the summary says the run is over.
        with (
            IndexAtEnd(folder, settings.parquet) as index,
            ManifestWriter(folder, previous) as manifest,
        ):
            watched = items if shards is None else shards.watch(items)
            plan = _plan(watched, previous, settings.force)
            results = content.relay(runner(plan, lifecycle))
            records = _every_record(results, plan, lifecycle)
            if shards is not None:
                records = shards.place(records)

            tally = Tally()

            def write(outcome: Outcome) -> Outcome:
                if not settings.http.verify:
                    outcome = _marked_insecure(outcome)
                try:
                    manifest.write(outcome)
                except OutputError as exc:
                    # The manifest cannot take more (a full disk): stop at once; the
                    # first fault is raised (no record is ever torn).
                    lifecycle.fail_run(exc)
                    records.close()
                    lifecycle.raise_if_failed()
                tally.add(outcome)
                tell_outcome(events, outcome)
                return outcome

            try:
                for outcome in records:
                    written = write(outcome)
                    try:
                        yield written
                    except BaseException:
                        # The caller left (GeneratorExit) or threw an error in: stop
                        # as Ctrl-C does, and still record every input.
                        cancel.set(LEFT_EARLY)
                        for rest in records:
                            write(rest)
                        raise
            finally:
                records.close()
                items.close()
        if settings.output_format is OutputFormat.WEBDATASET:
            # Every output is in its shard now: no --sizes folder left empty.
            labels = (box_label(box) for box in settings.image.boxes[1:])
            remove_empty_folders(folder.path, labels)
        if not cancel.is_set():  # reached the end of its list: ready to be merged
            finish_part(folder, settings.part, fingerprint, digest)
        summary = tally.summary(
            interrupted=cancel.is_set(), worker_cpu_s=usage.worker_cpu_s
        )
        figures = summary_json(summary, out_dir=str(settings.out), index=index.written)
        tell_note(events, "summary", figures)
        # Only the index failed: the run is told (the summary) before the fault.
        index.raise_if_failed()


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
