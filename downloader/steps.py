"""Pieces of the two steps that the lifecycle and the workers share: files, events.

``emit`` and ``byte_counter`` make progress events; ``Retry`` is a download waiting
for its next attempt. The record a job ends with is decided in ``lifecycle``.

A job with a ``local_path`` (``--input-dir``, or a kept original a rerun works from) is
never fetched: ``stage_local`` puts a hard link to the file (a copy across file systems)
where a download would go, so every scheduler processes it unchanged and removing the
staged file leaves the original.

After a successful transform, ``finish_success`` lets the download go: with
``--keep-originals`` it is renamed (atomically, on the same file system) to
``originals/<stem>.<ext>``, the extension from the body's magic bytes; else removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from downloader.errors import FetchError, OutputError, TransformError
from downloader.progress import EventKind, Events, ProgressEvent
from downloader.records import Fetched, Job, Outcome, Stage, Transformed
from downloader.settings import Settings
from downloader.transfer import AttemptState
from downloader.transform import place_file, remove_outputs
from downloader.worker import file_sha256

__all__ = [
    "BYTES_EVENT_INTERVAL_S",
    "ORIGINALS_NAME",
    "ByteCounter",
    "Retry",
    "byte_counter",
    "discard",
    "emit",
    "finish_success",
    "hashed",
    "keep_download",
    "original_extension",
    "stage_local",
]

ORIGINALS_NAME = "originals"
"""Folder of the output folder where ``--keep-originals`` keeps the downloads."""
# Read size for hashing or copying a local file: large reads, few system calls.
_COPY_CHUNK = 1024 * 1024
# Magic bytes of the formats the transform accepts (transform.ALLOWED_FORMATS).
_MAGIC_EXTENSIONS = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)
_SNIFF_BYTES = 12


def emit(
    events: Events,
    stage: Stage,
    kind: EventKind,
    index: int,
    lane: str,
    *,
    nbytes: int = 0,
    at: float | None = None,
    url: str = "",
) -> None:
    """Send one progress event, stamped now unless ``at`` is given."""
    moment = time.perf_counter() if at is None else at
    events(ProgressEvent(stage, kind, index, lane, moment, nbytes, url))


BYTES_EVENT_INTERVAL_S = 0.1
"""Received bytes of one download are summed and reported at most this often (and
all of them before its ``finished`` event): a progress event per read cost more main
process CPU than the read itself, and bars redraw no faster anyway."""


class ByteCounter:
    """The ``on_bytes`` callback of one download: reports its received bytes.

    Reads are summed and sent as one ``bytes`` event at most every
    ``BYTES_EVENT_INTERVAL_S``; ``flush`` sends what is left (the caller does, before
    the download's ``finished`` event), so the events still add up to every byte.
    """

    __slots__ = ("_clock", "_events", "_index", "_lane", "_pending", "_sent_at")

    def __init__(
        self,
        events: Events,
        index: int,
        lane: str,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._events, self._index, self._lane = events, index, lane
        self._clock = clock
        self._pending = 0
        self._sent_at = clock()

    def __call__(self, nbytes: int) -> None:
        """Count ``nbytes`` more; report the sum if the last report is old enough."""
        self._pending += nbytes
        if self._clock() - self._sent_at >= BYTES_EVENT_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Report the bytes not reported yet, if any."""
        if self._pending:
            nbytes, self._pending = self._pending, 0
            emit(
                self._events,
                Stage.DOWNLOAD,
                EventKind.BYTES,
                self._index,
                self._lane,
                nbytes=nbytes,
            )
        self._sent_at = self._clock()


def byte_counter(events: Events, index: int, lane: str) -> ByteCounter:
    """Return the ``on_bytes`` callback that reports received bytes for ``index``."""
    return ByteCounter(events, index, lane)


@dataclass(frozen=True, slots=True)
class Retry:
    """Fetch ``job`` again at ``due`` (monotonic); ``attempts`` were made so far, and
    ``state`` (stalls, a partial body) continues with the next one."""

    job: Job
    attempts: int
    due: float
    state: AttemptState = field(default_factory=AttemptState)


def finish_success(
    fetched: Fetched, result: Transformed, out: Path, settings: Settings
) -> Outcome:
    """Let a transformed download go (kept or removed) and make its ``ok`` record.

    If the original's name is taken by something not ours, the URL fails instead and
    its new outputs are removed (no ok record names them).

    Raises:
        OutputError: the download could not be kept under ``originals/``.
    """
    try:
        original = keep_download(fetched, out, settings)
    except TransformError as exc:
        remove_outputs(out, (result.path, *result.outputs))
        return Outcome.failure(
            fetched.job, Stage.TRANSFORM, exc.reason, fetched=fetched
        )
    local = fetched.job.local_path
    note = None
    if local is not None and original is not None and _is_kept(Path(local), out):
        note = f"processed again from the kept original {original}"
    return Outcome.success(fetched, result, original=original, note=note)


def keep_download(fetched: Fetched, out: Path, settings: Settings) -> str | None:
    """Keep ``fetched`` as ``originals/<stem>.<ext>`` or remove it; return the name.

    A job that was staged from a kept original keeps that one (its staged link is
    removed). The rename is atomic: an original is never seen half-written; it never
    replaces what is not this URL's (``transform.place_file``).

    Raises:
        TransformError: the original's name is taken; the download is removed.
        OutputError: the download could not be renamed into ``originals/``.
    """
    local = fetched.job.local_path
    if local is not None and _is_kept(Path(local), out):
        discard(fetched)
        return f"{ORIGINALS_NAME}/{Path(local).name}"
    if not settings.keep_originals:
        discard(fetched)
        return None
    name = f"{ORIGINALS_NAME}/{fetched.job.stem}.{original_extension(fetched.path)}"
    try:
        place_file(fetched.path, out, name, fetched.job.owned)
    except (TransformError, OutputError):
        discard(fetched)
        raise
    return name


def _is_kept(path: Path, out: Path) -> bool:
    """Tell whether ``path`` is a kept original of the output folder ``out``."""
    return path.parent == out / ORIGINALS_NAME


def original_extension(path: Path) -> str:
    """Return the extension of the image format ``path`` starts with, else ``bin``."""
    try:
        with path.open("rb") as file:
            head = file.read(_SNIFF_BYTES)
    except OSError:
        return "bin"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for magic, extension in _MAGIC_EXTENSIONS:
        if head.startswith(magic):
            return extension
    return "bin"


def stage_local(job: Job, tmp_dir: Path) -> Fetched:
    """Put ``job.local_path`` at ``tmp_dir/<stem>.part`` as if it had been downloaded.

    A hard link when the file is on the same file system, else a copy; the original
    is only read. The record has no HTTP status, no final URL and no attempts.

    Raises:
        FetchError: the local file cannot be read or is not a regular file.
        OutputError: the staged copy could not be written; the run should stop.
    """
    if job.local_path is None:
        raise ValueError(f"job {job.index} has no local file")
    started = time.perf_counter()
    source = Path(job.local_path)
    part = tmp_dir / f"{job.stem}.part"
    try:
        file = source.open("rb")
    except OSError as exc:
        raise FetchError(
            f"cannot read local file: {exc.strerror or exc}", attempts=0
        ) from exc
    with file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise FetchError("local file is not a regular file", attempts=0)
        try:
            nbytes, sha256 = _link_or_copy(source, file, part)
        except BaseException:
            with contextlib.suppress(OSError):
                part.unlink()
            raise
    return Fetched(
        job=job,
        path=part,
        nbytes=nbytes,
        sha256=sha256,
        final_url=None,
        http_status=None,
        attempts=0,
        elapsed=time.perf_counter() - started,
    )


def _link_or_copy(source: Path, file: BinaryIO, part: Path) -> tuple[int, str]:
    """Hard-link ``source`` to ``part`` or copy it there; return its size and hash."""
    try:
        os.link(source, part)
    except OSError as exc:
        # EXDEV: another file system; EPERM: protected_hardlinks or a file system
        # without links. Anything else about ``part`` is a local fault.
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise OutputError(f"cannot stage {source}: {exc.strerror}") from exc
        return _copy(file, part)
    return _hash(file, None)


def _copy(file: BinaryIO, part: Path) -> tuple[int, str]:
    try:
        target = part.open("xb")
    except OSError as exc:
        raise OutputError(f"cannot write {part}: {exc.strerror}") from exc
    with target:
        return _hash(file, target)


def _hash(file: BinaryIO, target: BinaryIO | None) -> tuple[int, str]:
    """Read ``file`` to the end, writing it to ``target`` if given; size and sha256."""
    digest = hashlib.sha256()
    nbytes = 0
    while True:
        try:
            chunk = file.read(_COPY_CHUNK)
        except OSError as exc:
            raise FetchError(
                f"cannot read local file: {exc.strerror}", attempts=0
            ) from exc
        if not chunk:
            return nbytes, digest.hexdigest()
        digest.update(chunk)
        nbytes += len(chunk)
        if target is not None:
            try:
                target.write(chunk)
            except OSError as exc:
                raise OutputError(
                    f"cannot write {target.name}: {exc.strerror}"
                ) from exc


def hashed(fetched: Fetched) -> Fetched:
    """``fetched`` with its SHA-256, read from its file if the download left it to
    the worker (``Fetched.sha256``): for a record made without that worker
    (crashed, timed out, interrupted) or a claim by content."""
    if fetched.sha256 is not None:
        return fetched
    return replace(fetched, sha256=file_sha256(fetched.path))


def discard(fetched: Fetched) -> None:
    """Remove a download's temporary file (it is done with, or abandoned)."""
    with contextlib.suppress(FileNotFoundError):
        fetched.path.unlink()
