"""Shards of a ``--mode ray`` run: their part files, and what one task does.

A shard is up to ``--shard-size`` consecutive jobs of the list. Its task (on any node
of the cluster) runs the same lifecycle as a local run, ``modes.run_threads`` over
its jobs in this process, and appends each record to the shard's own part file in
the shared output folder, one ``write`` per record::

    OUT/.parts/<run>-shard-00017.jsonl    manifest lines (manifest.record_line)

The driver (``ray_mode``) is the only writer of ``manifest.jsonl``: it writes each
record it hears of from the task, reads the part when the task ends for the ones it
has not heard of (the task may have died between the two), then removes the part.

**Retries.** Ray runs a task again when its worker process dies. The new attempt
reads the part and skips every URL recorded there, so no URL gets two lines and the
work done is kept; a torn last line (the attempt died inside its ``write``) is not a
record, and is cut off before the next record is appended.

**Tar shards** (``--output-format webdataset``). The task's slice is a shard
(``ShardSpec.tar``, numbered by the driver): its ok outputs go into it as they come
(``shard_writer.SliceShard``, in the attempt's own scratch), their records are held;
once the slice is done the shard is renamed into the output folder, and only then
are they appended. An attempt killed before the rename leaves scratch (the retry
writes the shard anew); one killed after it leaves the shard, whose samples the
retry records (``_renamed``) without redoing them.

**A killed driver.** Parts it had not merged stay in ``OUT/.parts``; the next run on
that folder, whatever its mode, merges them into the manifest before it plans
(``merge_leftover_parts``, the merge of ``--merge-parts``), so their work counts and
is not redone. A ``--part`` run is refused there until then: it writes a part's
records, not the manifest. ``--part`` itself does not go with ``--mode ray``.

This module needs no Ray: the task's Ray side (sending news, the stop flag) is in
``ray_mode``. Part files are read and written here only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from downloader.errors import OutputError
from downloader.lifecycle import Lifecycle
from downloader.manifest import (
    OutputFolder,
    RecordFiles,
    parse_record,
    record_key,
    record_line,
    refuse_link,
)
from downloader.parts import refuse_parts
from downloader.progress import EventKind, ProgressEvent
from downloader.records import Job, Outcome, Stage, Status
from downloader.runtime import Cancellation, RunContext
from downloader.settings import ImageFormat, Settings
from downloader.shard_writer import SliceShard, shard_records
from downloader.steps import ORIGINALS_NAME
from downloader.transform import output_names
from downloader.worker import cpu_seconds

__all__ = [
    "PARTS_NAME",
    "PartFile",
    "ShardNews",
    "ShardReport",
    "ShardSpec",
    "merge_leftover_parts",
    "parts_folder",
    "remove_unrecorded_outputs",
    "run_shard_here",
]

PARTS_NAME = ".parts"
"""The folder of the output folder that holds the part files of unmerged shards."""
_PART_SUFFIX = ".jsonl"
_FILE_MODE = 0o644
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def parts_folder(out: Path) -> Path:
    """Create (if need be) and return ``out/.parts``; a link there is refused.

    Raises:
        OutputError: ``.parts`` is a link or not a folder, or cannot be made.
    """
    path = out / PARTS_NAME
    refuse_link(path, kind="folder")
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {path}: {exc.strerror or exc}") from exc
    return path


def new_run_name() -> str:
    """A name for this run's parts, distinct from any earlier run's."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


class PartFile:
    """One shard's part file: complete records appended, one ``write`` each."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> Iterator[Outcome]:
        """The records of the complete lines; a torn or foreign line is skipped."""
        try:
            fd = os.open(self.path, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise OutputError(
                f"cannot read {self.path}: {exc.strerror or exc}"
            ) from exc
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise OutputError(f"{self.path} is not a regular file")
            for line in handle:
                outcome = parse_record(line) if line.endswith(b"\n") else None
                if outcome is not None:
                    yield outcome

    def recorded(self) -> set[bytes]:
        """The ``record_key`` of every URL the part records."""
        return {record_key(outcome.url) for outcome in self.records()}

    @contextlib.contextmanager
    def appending(self) -> Iterator[_Appender]:
        """Open for appending; a torn last line (an attempt killed in its ``write``)
        is cut off first, so that every line of the part is a record."""
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | _OPEN_FLAGS
        try:
            fd = os.open(self.path, flags, _FILE_MODE)
        except OSError as exc:
            raise OutputError(
                f"cannot write {self.path}: {exc.strerror or exc}"
            ) from exc
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A shard's part is small (--shard-size lines): read it whole.
                os.ftruncate(fd, os.pread(fd, size, 0).rfind(b"\n") + 1)
            yield _Appender(fd, self.path)
        finally:
            os.close(fd)

    def remove(self) -> None:
        """Remove the part (its records are in the manifest)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class _Appender:
    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self._path = path

    def append(self, outcome: Outcome) -> None:
        _write_all(self._fd, self._path, record_line(outcome))


def _write_all(fd: int, path: Path, data: bytes) -> None:
    try:
        written = os.write(fd, data)
        if written != len(data):  # a full disk: never leave a record half-written
            raise OSError(f"wrote {written} of {len(data)} bytes")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc


def merge_leftover_parts(folder: OutputFolder) -> set[str]:
    """Merge the parts a killed ``--mode ray`` run left into the manifest; return
    the tar shard each part's last shard record names.

    A task writes its shard's records to its part after the rename, one after
    another, so a kill in between leaves that shard named by some of its records
    only, the part's last (``shard_writer.adopt_unrecorded_shards`` records the
    rest).

    Called by every run when it has taken its output folder, before it reads the
    manifest to plan. The merge is the one ``--merge-parts`` makes of ``--part``
    files (``OutputFolder.merge_files``): the manifest's lines, then the parts',
    the later line of each URL winning, renamed over the manifest before the parts
    are removed (killed in between, the next run merges the same lines again).

    Raises:
        OutputError: ``.parts`` is a link or not a folder, or a part cannot be
            read; or this is a ``--part`` run, whose records go to a part's file:
            the leftovers, of any URL of the list, would mix into that part; or
            the folder holds the files of ``--part`` runs (``refuse_parts``).
    """
    path = folder.path / PARTS_NAME
    refuse_link(path, kind="folder")
    try:
        names = sorted(e.name for e in path.iterdir() if e.name.endswith(_PART_SUFFIX))
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if names and folder.files != RecordFiles():
        raise OutputError(
            f"{path} holds the shards of a --mode ray run that was stopped by force: "
            "run once without --part (any mode merges them into manifest.jsonl), "
            "then the parts"
        )
    cut_short: set[str] = set()
    if names:
        refuse_parts(folder.path)  # while they are there, only their merge writes
        for name in names:
            tars = [o.shard for o in PartFile(path / name).records() if o.shard]
            cut_short.update(tars[-1:])
        manifest = folder.files.manifest
        shards = [f"{PARTS_NAME}/{name}" for name in names]
        folder.merge_files(manifest, [manifest, *shards])
        for name in names:
            PartFile(path / name).remove()
    with contextlib.suppress(OSError):
        path.rmdir()  # only if empty
    return cut_short


def remove_unrecorded_outputs(
    out: Path, job: Job, settings: Settings, since: float
) -> None:
    """Remove what a task that died placed for ``job`` and did not record.

    The driver records ``job`` itself (failed: its task kept dying; not started: it
    was cancelled), so a file its task had placed under a final name, the task
    dying before it appended the record, would be named by no record. The names
    are the job's own outputs in any format it may have had (and its kept
    original); a file there is removed only if it is a regular file written since
    the shard was sent or linked since (``since``, ``time.time()``: an older one is
    no attempt's of this shard) and not one the job's earlier record names (``owned``).
    """
    spec = settings.image
    kinds: tuple[ImageFormat, ...] = (spec.format,)
    if spec.format is ImageFormat.KEEP:
        kinds = tuple(kind for kind in ImageFormat if kind is not ImageFormat.KEEP)
    names = [name for kind in kinds for name in output_names(job.stem, spec, kind)]
    if settings.keep_originals:
        names += [f"{ORIGINALS_NAME}/{job.stem}.{ext}" for ext in _ORIGINAL_EXTENSIONS]
    for name in names:
        if name in job.owned:
            continue
        with contextlib.suppress(OSError):
            found = os.lstat(out / name)
            # ctime: a kept original linked from --input-dir keeps its source's
            # old mtime, but linking it changed its ctime.
            placed = max(found.st_mtime, found.st_ctime)
            if stat.S_ISREG(found.st_mode) and placed >= since:
                (out / name).unlink()


_ORIGINAL_EXTENSIONS = ("jpg", "png", "gif", "bmp", "webp", "bin")
"""Every extension ``steps.original_extension`` gives a kept original."""


# ------------------------------------------------------------------ in the task


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """What one shard task gets: its number, its jobs, where to write."""

    number: int
    jobs: tuple[Job, ...]
    part: Path
    """The shard's part file."""
    scratch: Path
    """Its own scratch folder (under ``OUT/.tmp``), emptied when an attempt starts."""
    tar: str | None = None
    """``--output-format webdataset``: the name of the slice's shard (``00017.tar``),
    which the task writes; None: outputs are files."""


@dataclass(frozen=True, slots=True)
class ShardReport:
    """What a finished shard task returns (its records went to the part and news)."""

    number: int
    pid: int
    cpu_s: float
    """CPU seconds this attempt used (the process's, all its threads)."""
    fault: str | None = None
    """A local fault (disk full) that stopped the shard: the driver stops the run."""


class ShardNews:
    """What a task has to tell the driver since it last asked: events and records.

    An ``Events`` sink for the task's lifecycle, safe from any thread. Byte counts
    are summed per item while they wait (the driver's bars need the total, not
    every read), and put just before the download's ``finished`` event, where a
    reader of the events expects them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[ProgressEvent] = []
        self._bytes: dict[int, ProgressEvent] = {}
        self._records: list[Outcome] = []

    def __call__(self, event: ProgressEvent, /) -> None:
        with self._lock:
            if event.kind is EventKind.BYTES:
                waiting = self._bytes.get(event.index)
                if waiting is not None:
                    event = replace(event, nbytes=waiting.nbytes + event.nbytes)
                self._bytes[event.index] = event
                return
            if event.kind is EventKind.FINISHED and event.stage is Stage.DOWNLOAD:
                waiting = self._bytes.pop(event.index, None)
                if waiting is not None:
                    self._events.append(waiting)
            self._events.append(event)

    def record(self, outcome: Outcome) -> None:
        """Tell the driver of a record (already in the part file)."""
        with self._lock:
            self._records.append(outcome)

    def take(self) -> tuple[list[ProgressEvent], list[Outcome]]:
        """Everything since the last call: events (byte counts so far), records."""
        with self._lock:
            events = [*self._events, *self._bytes.values()]
            records = self._records
            self._events, self._bytes, self._records = [], {}, []
        return events, records


def run_shard_here(
    spec: ShardSpec,
    settings: Settings,
    out: Path,
    news: ShardNews,
    cancel: Cancellation,
) -> ShardReport:
    """Run one shard's jobs in this process, as ``--mode threads`` runs a list.

    Each record goes to the part file, then to ``news``; the URLs the part already
    records (an earlier attempt of this task) are skipped. ``cancel`` stops it as
    Ctrl-C stops a local run: items cut short are recorded ``interrupted``, the
    jobs never begun are left for the driver to record.
    """
    from downloader.modes import run_threads  # modes imports every scheduler

    started_cpu = cpu_seconds()
    part = PartFile(spec.part)
    done = part.recorded()
    shutil.rmtree(spec.scratch, ignore_errors=True)  # an earlier attempt's
    # Each attempt's own folder: its shard in progress is never another's.
    scratch = spec.scratch / uuid.uuid4().hex
    try:
        scratch.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"cannot create {scratch}: {exc}") from exc
    context = RunContext(out, scratch, news, cancel)
    lifecycle = Lifecycle(settings, context)
    todo = [job for job in spec.jobs if record_key(job.url) not in done]
    if spec.tar is not None and _renamed(spec.tar, out, part, done, news):
        todo = []  # the rest were never begun (a stop): the driver records them
    outcomes = run_threads(todo, lifecycle)
    shard = None
    if spec.tar is not None:
        shard = SliceShard(spec.tar, out, scratch, lifecycle.fail_run)
    indexes = {record_key(job.url): job.index for job in todo}
    try:
        with part.appending() as appender:
            for outcome in outcomes:
                if shard is not None and outcome.status is Status.OK:
                    # Held until the shard is renamed; a failure if it cannot go in.
                    held = shard.add(indexes[record_key(outcome.url)], outcome)
                    if held is None:
                        continue
                    outcome = held
                appender.append(outcome)
                news.record(outcome)
            for outcome in shard.finish() if shard is not None else ():
                appender.append(outcome)
                news.record(outcome)
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:  # the scheduler's generator: stop and join its pool
            close()
        if shard is not None:
            shard.abandon()  # not finished (an error): its samples are not recorded
        shutil.rmtree(spec.scratch, ignore_errors=True)
    fault = None if lifecycle.failure is None else str(lifecycle.failure)
    return ShardReport(spec.number, os.getpid(), cpu_seconds() - started_cpu, fault)


def _renamed(
    name: str, out: Path, part: PartFile, done: set[bytes], news: ShardNews
) -> bool:
    """Record the samples of the shard an earlier attempt renamed, if it did.

    The shard is the slice's commit: an attempt renames it once each of its jobs
    has a record, then appends its samples' records; killed between the two, the
    next attempt appends those its part lacks, from the shard's ``<key>.json``.
    The driver numbered the slice past every shard of the folder, so a shard of
    that name is an earlier attempt's.

    Raises:
        OutputError: it is there but cannot be read.
    """
    path = out / name
    if not os.path.lexists(path):
        return False
    try:
        records = shard_records(path)
    except (OSError, tarfile.TarError) as exc:
        raise OutputError(f"cannot read {path}: {exc}") from exc
    with part.appending() as appender:
        for outcome in records:
            if record_key(outcome.url) not in done:
                appender.append(outcome)
                news.record(outcome)
    return True
