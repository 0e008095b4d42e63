"""The output folder's state: the manifest (single writer), resume data, lock, scratch.

Layout of an output folder::

    DIR/<stem>.<ext>             processed images (final names, atomic renames)
    DIR/<box>/<stem>.<ext>       the other sizes of --sizes
    DIR/originals/               the downloads themselves (--keep-originals)
    DIR/manifest.jsonl           one JSON line per input URL (its latest outcome)
    DIR/failed.txt               the failed URLs, one per line, ready to feed back in
    DIR/manifest.rejected.txt    lines found in the manifest that are not records
    DIR/.manifest-updates.jsonl  a rerun's records of URLs the manifest already has
    DIR/.manifest.jsonl.new      the next manifest, while it is being written
    DIR/.failed.txt.new          the next failed.txt, while it is being written
    DIR/.tmp/                    partial downloads and outputs; emptied at start and end
    DIR/.lock                    held (flock) while a run uses the folder

A run with ``--part K/N`` (``RecordFiles.for_part``) owns other names instead, so that
the N parts share the folder: ``manifest.part-K-of-N.jsonl`` (and its updates and
rejected files) in place of the manifest, which it only reads, as the earlier runs'
records; ``.tmp/part-K-of-N/`` as its scratch folder (``.tmp`` itself is left alone);
``.lock`` held shared (parts run together, a run without ``--part`` waits for none
and is refused while one runs) plus ``.lock.part-K-of-N`` held alone. It writes no
``failed.txt``: ``downloader.parts`` merges the parts into the manifest.

**One line per URL at every moment.** ``manifest.jsonl`` changes in two ways only:

- a record of a URL that has no line in it is appended, in one ``write`` (so a reader
  can see a torn last line, and only the last line, while it is being written);
- it is replaced whole by renaming ``.manifest.jsonl.new`` over it.

A record of a URL that already has a line (a rerun redoing or skipping it) is appended
to ``.manifest-updates.jsonl`` instead; when the run ends (normally, on an error or
after Ctrl-C) the manifest and the updates are merged, the later line of each URL
winning, into ``.manifest.jsonl.new``, which is renamed over the manifest before the
updates file is removed. A run killed with ``kill -9`` (or a power cut) leaves the
updates file, or a torn last line; the next run merges them the same way before it
starts, so it neither loses nor redoes the killed run's finished work. Every record is
flushed to the OS as soon as it is decided, wherever it goes.

**Resume** reads the manifest, then the updates file (which a run has merged away by
then; a dry run, which writes nothing, reads what a killed run left), and remembers per
URL a 16-byte digest and, for an ok record, the offset of its line, so that memory
stays small for huge manifests; the line is read again when it is needed. Writing
needs no table of its own: a run has one record per unique input, so a record goes to
the updates file exactly when resume knows its URL.

A URL is skipped if its latest record is ok, its image is still there and its
``settings`` fingerprint is the current one (a record without one, from an older
version, counts as current). Any other ok record is redone: from its kept original
when there is one, else by downloading again.

**Nothing is written outside the folder.** Every file this module writes is opened
relative to a descriptor of the folder with ``O_NOFOLLOW`` (a symbolic link planted at
its name, even between a check and a use, makes the open fail instead of writing
through it), new files are created with ``O_EXCL``, and a rename replaces a link at its
target rather than following it. At the start, a symbolic link at any name the run
writes (the files above, ``.tmp``, ``originals`` and the ``--sizes`` folders) stops the
run with an ``OutputError`` (exit 3) naming it, before anything is fetched, and so does
the wrong kind of entry there (a folder at ``failed.txt``, a file at ``.tmp``): what is
inside ``.tmp`` is scratch, but a file called ``.tmp`` is someone's. A file replaced
whole (``failed.txt``, the merged manifest) goes through ``write_file``, which checks
its name again when it writes and refuses a link there (one made in the instant
between that check and the rename is replaced, never followed); the other modules
that write a file of their own in an output folder (``--compare``, ``--demo``) use it
too. Refusing,
rather than replacing the link, because the link may be the user's own arrangement (a
manifest kept elsewhere) that replacing would silently break, and a link nobody made
means someone else writes in the folder, which a person should look at; stopping before
the run loses nothing. The other modules write under ``.tmp``, ``originals`` and the
``--sizes`` folders by path, so for those the check is made at the start only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from downloader.errors import OutputError
from downloader.records import Outcome, Status
from downloader.settings import Part, Settings, box_label
from downloader.sources import check_url, normalize_url
from downloader.steps import ORIGINALS_NAME

__all__ = [
    "FAILED_NAME",
    "MANIFEST_NAME",
    "UPDATES_NAME",
    "ManifestWriter",
    "OutputFolder",
    "PreviousRun",
    "RecordFiles",
    "parse_record",
    "read_outcomes",
    "read_record_lines",
    "record_key",
    "record_line",
    "refuse_link",
    "write_file",
]

_log = logging.getLogger("downloader")

MANIFEST_NAME = "manifest.jsonl"
UPDATES_NAME = ".manifest-updates.jsonl"
FAILED_NAME = "failed.txt"
REJECTED_NAME = "manifest.rejected.txt"
"""Where lines of the manifest that are not records go, appended, when it is merged."""
TMP_NAME = ".tmp"
LOCK_NAME = ".lock"
INDEX_NAME = "manifest.parquet"
"""``--parquet``'s table of the manifest (``parquet_index``); its ``.new`` is
scratch that a killed index write leaves, removed as a run takes the folder."""
NEW_SUFFIX = ".new"
"""A file being rewritten is written as ``.<name>.new`` beside it, then renamed."""

# Files are opened without following a link at their name; O_NONBLOCK so that a FIFO
# planted there cannot hang the open (it is then refused as not a regular file).
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_FILE_MODE = 0o644
# How much of a line one read takes when a record is read again by its offset.
_READ_CHUNK = 4096
# Where a resume entry's line is: (offset << _WHICH_BITS) | which file; or, for a
# record that is not ok, _NOT_DONE (in the writer's own files) or _NOT_DONE_IN_BASE.
_IN_MANIFEST = 0
_IN_UPDATES = 1
_IN_BASE = 2
_WHICH_BITS = 2
_WHICH_MASK = (1 << _WHICH_BITS) - 1
_NOT_DONE = -1
_NOT_DONE_IN_BASE = -2


def record_key(url: str) -> bytes:
    """Return the compact identity of a manifest URL (normalised, then hashed).

    A 16-byte digest instead of the URL string keeps the resume table small.
    """
    key = normalize_url(url) if check_url(url) is None else url
    return hashlib.blake2b(
        key.encode("utf-8", "surrogatepass"), digest_size=16
    ).digest()


@dataclass(frozen=True, slots=True)
class RecordFiles:
    """The names one writer of records owns in an output folder (see the docstring).

    A run without ``--part`` owns the folder's manifest; a part owns files of its own
    and reads the manifest (``base``) as earlier runs' records.
    """

    manifest: str = MANIFEST_NAME
    updates: str = UPDATES_NAME
    rejected: str = REJECTED_NAME
    failed: str | None = FAILED_NAME
    """None: no failed list (a part's failures are listed when parts are merged)."""
    base: str | None = None
    """A manifest read, never written, before ``manifest``."""
    scratch: str = TMP_NAME
    lock: str | None = None
    """A lock held alone; ``LOCK_NAME`` is then held shared. None: ``LOCK_NAME``
    held alone."""

    @classmethod
    def for_part(cls, part: Part) -> RecordFiles:
        """The files of ``part``: ``manifest.part-K-of-N.jsonl`` and the others."""
        label = part.label
        return cls(
            manifest=f"manifest.{label}.jsonl",
            updates=f".manifest.{label}-updates.jsonl",
            rejected=f"manifest.{label}.rejected.txt",
            failed=None,
            base=MANIFEST_NAME,
            scratch=f"{TMP_NAME}/{label}",
            lock=f"{LOCK_NAME}.{label}",
        )


def _output_error(action: str, path: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot {action} {path}: {exc.strerror or exc}")


def _link_error(path: Path) -> OutputError:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return OutputError(
        f"{path} is a symbolic link (to {target}): refused, since this tool reads "
        "and writes only inside the output folder; remove the link or choose "
        "another --out"
    )


def _kind_error(path: Path, kind: str) -> OutputError:
    return OutputError(
        f"{path} is not a {kind}: remove it or choose another --out "
        "(the tool writes there)"
    )


def _new_name(name: str) -> str:
    return f".{name}{NEW_SUFFIX}"


def write_file(
    folder: Path,
    name: str,
    chunks: Iterable[bytes],
    *,
    dir_fd: int | None = None,
    temporary: str | None = None,
) -> Path:
    """Make ``chunks`` the whole content of the file ``folder/name``; return its path.

    ``name`` is a bare name (no ``/``).

    The one way this package writes a file of its own in an output folder: the
    content goes to a new temporary file in ``folder`` itself (``temporary``, by
    default ``.<name>.<pid>.new``; one left there is removed first), created with
    ``O_EXCL | O_NOFOLLOW``, flushed to disk, then renamed over ``name``. A symbolic
    link at ``name`` is refused (``OutputError`` naming it, as at a run's start),
    never written through nor replaced; so is anything there but a regular file.
    ``dir_fd``: a descriptor of ``folder`` already open (else it is opened here).

    Raises:
        OutputError: refused, or it could not be written; ``name`` is then unchanged.
    """
    if dir_fd is None:
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _output_error("open folder", folder, exc) from exc
        try:
            return write_file(folder, name, chunks, dir_fd=fd, temporary=temporary)
        finally:
            os.close(fd)
    path = folder / name
    temporary = temporary or f".{name}.{os.getpid()}{NEW_SUFFIX}"
    try:
        refuse_link(path, dir_fd=dir_fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=dir_fd)  # a link there goes, unfollowed
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS
        fd = os.open(temporary, flags, _FILE_MODE, dir_fd=dir_fd)
    except OSError as exc:
        raise _output_error("write", path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.writelines(chunks)  # reading them may fail too (OutputError)
            handle.flush()
            os.fsync(handle.fileno())
        # A link planted at ``name`` since the check is replaced, not followed.
        os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=dir_fd)
        if isinstance(exc, OSError):
            raise _output_error("write", path, exc) from exc
        raise
    return path


def refuse_link(
    path: Path, *, kind: str = "regular file", dir_fd: int | None = None
) -> None:
    """Refuse a symbolic link at ``path``, or anything there but a ``kind``.

    ``kind``: ``"regular file"`` or ``"folder"``; nothing there is fine. For a name
    that is written later through ``write_file`` (which checks again), or a folder
    that is then written into by path (a check at the start, as for ``originals``).
    With ``dir_fd`` (a descriptor of ``path.parent``), ``path.name`` is looked up in it.

    Raises:
        OutputError: a link, or the wrong kind of entry, is at ``path``.
    """
    try:
        if dir_fd is None:
            mode = os.lstat(path).st_mode
        else:
            mode = os.lstat(path.name, dir_fd=dir_fd).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _output_error("check", path, exc) from exc
    if stat.S_ISLNK(mode):
        raise _link_error(path)
    if not (stat.S_ISDIR(mode) if kind == "folder" else stat.S_ISREG(mode)):
        raise _kind_error(path, kind)


class OutputFolder:
    """Own one output folder for a run: create, check, lock, recover, and scratch.

    Entering it creates the folder, takes the lock, refuses links at the names the
    run writes, merges what a killed run left (see the module docstring), and resets
    ``.tmp``. An OutputFolder that is never entered only reads (a dry run).
    """

    def __init__(
        self,
        path: Path,
        *,
        subfolders: Iterable[str] = (),
        files: RecordFiles | None = None,
    ) -> None:
        """``subfolders``: folders the run writes into besides ``originals``.

        ``files``: the names this writer owns (default: the whole folder's).
        """
        self.path = path
        self.files = files or RecordFiles()
        self.tmp = path / self.files.scratch
        self.manifest = path / self.files.manifest
        self.updates = path / self.files.updates
        self.subfolders = (ORIGINALS_NAME, *subfolders)
        self.crash_tails: frozenset[str] = frozenset()
        """The tar shards named by the last shard record of the manifest and of the
        updates file a killed run left, read before they are merged (the merge puts
        every update after the manifest's lines): a shard's records are written one
        after another, so one cut short by the kill is one of these
        (``shard_writer.adopt_unrecorded_shards``)."""
        self._fd: int | None = None
        self._lock_fds: list[int] = []

    @classmethod
    def for_settings(cls, settings: Settings) -> OutputFolder:
        """The output folder of ``settings``, with the ``--sizes`` folders it writes."""
        labels = (box_label(box) for box in settings.image.boxes[1:])
        files = None if settings.part is None else RecordFiles.for_part(settings.part)
        return cls(settings.out, subfolders=labels, files=files)

    def __enter__(self) -> OutputFolder:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _output_error("create output folder", self.path, exc) from exc
        try:
            self._lock()
            self._refuse_links()
            self._remove(_new_name(self.files.manifest))
            if self.files.failed is not None:
                self._remove(_new_name(self.files.failed))
            self._remove(_new_name(INDEX_NAME))
            if self._left_by_a_crash():
                self.crash_tails = frozenset(
                    shard
                    for name in (self.files.manifest, self.files.updates)
                    if (shard := self._last_shard(name)) is not None
                )
                self.merge_manifest()
            self._reset_scratch()
            self._probe_writable()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.files.scratch, dir_fd=self._fd)
        self._close()

    def _close(self) -> None:
        for fd in (*reversed(self._lock_fds), self._fd):
            if fd is not None:
                os.close(fd)  # closing the lock file releases the flock
        self._lock_fds = []
        self._fd = None

    def open_file(self, name: str, flags: int) -> int:
        """Open the regular file ``name`` of the folder, never through a link.

        Raises:
            OutputError: it cannot be opened, is a symbolic link or not a file.
            FileNotFoundError: it does not exist (and ``flags`` do not create it).
        """
        path = self.path / name
        try:
            if self._fd is None:
                fd = os.open(path, flags | _OPEN_FLAGS, _FILE_MODE)
            else:
                fd = os.open(name, flags | _OPEN_FLAGS, _FILE_MODE, dir_fd=self._fd)
        except FileNotFoundError as exc:
            if flags & os.O_CREAT:  # the folder itself is gone
                raise _output_error("create", path, exc) from exc
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _link_error(path) from exc
            raise _output_error("open", path, exc) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise _kind_error(path, "regular file")
        return fd

    def merge_manifest(self) -> None:
        """Make the manifest one line per URL, the latest, from it and the updates.

        The merged manifest is renamed over the old one before the updates file is
        removed, so a crash at any point leaves files that the next run merges again.
        """
        self.merge_files(self.files.manifest, (self.files.manifest, self.files.updates))
        self._remove(self.files.updates)

    def merge_files(self, target: str, sources: Sequence[str]) -> None:
        """Make ``target`` one line per URL, the latest, from the files ``sources``.

        Later files' lines win; ``target`` may be one of ``sources`` (it is replaced
        whole, by a rename). A line that is not a record is appended to the rejected
        file first, with a warning (``_Rejects``). Memory: a digest and a line number
        per URL.
        """
        last_line: dict[bytes, int] = {}
        with _Rejects(self) as rejects:
            number = 0
            for line, outcome in _all_lines(self, sources):
                if outcome is None:
                    rejects.add(line)
                else:
                    last_line[record_key(outcome.url)] = number
                    number += 1
            # On disk before the manifest without them replaces the old one.
            rejects.report()
        self.replace_file(
            target,
            (
                line if line.endswith(b"\n") else line + b"\n"
                for number, (line, outcome) in enumerate(_all_records(self, sources))
                if last_line[record_key(outcome.url)] == number
            ),
        )

    def write_failed_list(self) -> None:
        """Write the failed URLs of the manifest to the failed list, if it has one."""
        if self.files.failed is None:
            return
        failed = (
            outcome.url.encode("utf-8", "backslashreplace") + b"\n"
            for _, _, outcome in _read_records(self, self.files.manifest)
            if outcome is not None and outcome.status is Status.FAILED
        )
        self.replace_file(self.files.failed, failed)

    def replace_file(self, name: str, lines: Iterable[bytes]) -> None:
        """Write ``lines`` as the new content of ``name``: beside it, then rename.

        Through ``write_file``, as ``.<name>.new``: a link at ``name`` is refused.

        Raises:
            OutputError: refused, or it could not be written; ``name`` is unchanged.
        """
        write_file(
            self.path, name, lines, dir_fd=self._dir(), temporary=_new_name(name)
        )

    def _remove(self, name: str) -> None:
        """Remove the file (or link) ``name`` if it is there."""
        try:
            os.unlink(name, dir_fd=self._dir())
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _output_error("remove", self.path / name, exc) from exc

    def _lock(self) -> None:
        """Hold ``.lock`` alone; a part holds it shared, and its own lock alone."""
        own = self.files.lock
        self._take_lock(
            LOCK_NAME,
            exclusive=own is None,
            held_by="another run" if own is None else "a run without --part",
        )
        if own is not None:
            self._take_lock(own, exclusive=True, held_by="this same part")

    def _take_lock(self, name: str, *, exclusive: bool, held_by: str) -> None:
        # Read and write: where flock is emulated by fcntl locks (NFS), a shared
        # lock needs a file open for reading, an exclusive one for writing.
        fd = self.open_file(name, os.O_RDWR | os.O_CREAT)
        self._lock_fds.append(fd)
        try:
            fcntl.flock(
                fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            )
        except BlockingIOError:
            raise OutputError(
                f"{held_by} is using {self.path} (it holds {self.path / name}); "
                "wait for it to finish or choose another --out"
            ) from None

    def _refuse_links(self) -> None:
        """Refuse a link, or the wrong kind of entry, at a name this run writes."""
        files = self.files
        for name in (files.manifest, files.updates, files.failed, files.rejected):
            if name is not None:
                refuse_link(self.path / name, dir_fd=self._dir())
        if files.base is not None:
            refuse_link(self.path / files.base, dir_fd=self._dir())
        # What is in .tmp is scratch, but a file at .tmp itself is not ours.
        for name in (TMP_NAME, *self.subfolders):
            refuse_link(self.path / name, kind="folder", dir_fd=self._dir())

    def _mode(self, name: str) -> int | None:
        """The ``st_mode`` of ``name`` itself, None if absent; a link is refused."""
        try:
            mode = os.lstat(name, dir_fd=self._dir()).st_mode
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _output_error("check", self.path / name, exc) from exc
        if stat.S_ISLNK(mode):
            raise _link_error(self.path / name)
        return mode

    def _dir(self) -> int:
        """The folder's descriptor: writing needs the folder entered."""
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not open for writing (not entered)")
        return self._fd

    def _last_shard(self, name: str) -> str | None:
        """The shard the last record of file ``name`` that names one names."""
        last = None
        for _, _, outcome in _read_records(self, name):
            if outcome is not None and outcome.shard:
                last = outcome.shard
        return last

    def _left_by_a_crash(self) -> bool:
        """Tell whether a killed run left updates or a torn last manifest line."""
        if self._mode(self.files.updates) is not None:
            return True
        try:
            fd = self.open_file(self.files.manifest, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            return not _ends_with_newline(fd)
        finally:
            os.close(fd)

    def _reset_scratch(self) -> None:
        # Anything in the scratch folder was left by a run that crashed or was
        # killed: no record points at it, so it is safe to remove. (That .tmp is a
        # folder, not a link nor a file, was checked by _refuse_links.) A part's
        # scratch is inside .tmp, which other parts use at the same time.
        scratch = self.files.scratch
        try:
            if scratch != TMP_NAME:
                os.mkdir(TMP_NAME, mode=0o700, dir_fd=self._dir())
        except FileExistsError:
            pass
        except OSError as exc:
            raise _output_error("prepare scratch folder", self.tmp, exc) from exc
        try:
            shutil.rmtree(scratch, dir_fd=self._dir())
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _output_error("prepare scratch folder", self.tmp, exc) from exc
        try:
            os.mkdir(scratch, mode=0o700, dir_fd=self._dir())
        except OSError as exc:
            raise _output_error("prepare scratch folder", self.tmp, exc) from exc

    def _probe_writable(self) -> None:
        probe = f"{self.files.scratch}/probe"
        try:
            fd = self.open_file(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                _write_all(fd, b"probe")
            finally:
                os.close(fd)
            os.unlink(probe, dir_fd=self._dir())
        except OSError as exc:
            raise _output_error("write in output folder", self.path, exc) from exc


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_records(
    folder: OutputFolder, name: str
) -> Iterator[tuple[int, bytes, Outcome | None]]:
    """Yield (offset, line, record) for each line of a manifest file, in order.

    ``record`` is None for a line that is not one (cut short by a crash); a file that
    is not there yields nothing.
    """
    try:
        fd = folder.open_file(name, os.O_RDONLY)
    except FileNotFoundError:
        return
    offset = 0
    with os.fdopen(fd, "rb") as handle:
        for line in handle:
            yield offset, line, parse_record(line)
            offset += len(line)


def read_outcomes(folder: OutputFolder) -> Iterator[Outcome]:
    """Yield the records of the folder's (or part's) manifest; skip other lines."""
    for _, _, outcome in _read_records(folder, folder.files.manifest):
        if outcome is not None:
            yield outcome


def read_record_lines(folder: OutputFolder) -> Iterator[bytes]:
    """Yield the line of each record of the folder's manifest, as written (with
    the fields this version does not know); skip other lines."""
    for _, line, outcome in _read_records(folder, folder.files.manifest):
        if outcome is not None:
            yield line


def parse_record(line: bytes) -> Outcome | None:
    """The record a manifest line holds; None for a line that is not one.

    A hand-edited line may be any JSON (``42``, ``[]``, a ``url`` that is a
    number, nesting deep enough to exhaust the parser): each is not a record, set
    aside like any other, never an exception that every later run would hit again.
    """
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("url"), str):
        return None
    try:
        return Outcome.from_json(record)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


_RECORD_START = b'{"url": '
"""How every record's line starts (``url`` is ``Outcome``'s first field)."""


def _torn(line: bytes) -> bool:
    """Tell whether ``line`` is a record cut short: no newline, a record's start."""
    return not line.endswith(b"\n") and (
        line.startswith(_RECORD_START) or _RECORD_START.startswith(line)
    )


def _all_lines(
    folder: OutputFolder, names: Sequence[str]
) -> Iterator[tuple[bytes, Outcome | None]]:
    """The lines of the files ``names`` in order, each with its record."""
    for name in names:
        for _, line, outcome in _read_records(folder, name):
            yield line, outcome


def _all_records(
    folder: OutputFolder, names: Sequence[str]
) -> Iterator[tuple[bytes, Outcome]]:
    """The records of the files ``names`` in order (later lines win)."""
    for line, outcome in _all_lines(folder, names):
        if outcome is not None:
            yield line, outcome


class _Rejects:
    """Keep the lines of a merge that are not records in ``REJECTED_NAME``.

    A line that is not a record (not JSON, or not an object with this tool's fields)
    is someone's: a note, a hand edit gone wrong, another tool's line. The manifest
    stays one record per line, so such a line leaves it, but it is appended to
    ``manifest.rejected.txt`` and a warning says so, never dropped in silence. Two
    kinds of line are dropped: blank ones, and the torn last line that a crash
    leaves: no newline, and the start of one of our records (``{"url": …``), whose
    URL is simply redone.
    """

    def __init__(self, folder: OutputFolder) -> None:
        self._folder = folder
        self._file: _Appender | None = None
        self.kept = 0

    def __enter__(self) -> _Rejects:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()

    def add(self, line: bytes) -> None:
        """Keep ``line`` unless it is blank or torn."""
        if not line.strip() or _torn(line):
            return
        if self._file is None:
            self._file = _Appender(self._folder, self._folder.files.rejected)
        self._file.append(line if line.endswith(b"\n") else line + b"\n")
        self.kept += 1

    def report(self) -> None:
        """Flush what was kept to disk and say so in one line (a warning)."""
        if self._file is None:
            return
        self._file.sync()
        _log.warning(
            "%s: %d line(s) that are not records of this tool moved to %s "
            "(the manifest keeps one record per line)",
            self._folder.manifest,
            self.kept,
            self._folder.path / self._folder.files.rejected,
        )


class PreviousRun:
    """What earlier runs into the same folder finished: the latest record per URL.

    ``fingerprint`` is the current settings' (``reuse.settings_fingerprint``); with
    ``by_content`` the current ok records are also indexed by their body's SHA-256.
    Records are read again from the files when asked for, so use it while the run
    that made it has its folder (a dry run: at any time). A part reads the folder's
    manifest first (``RecordFiles.base``), then its own files, whose lines win.
    """

    def __init__(
        self,
        folder: OutputFolder,
        *,
        fingerprint: str | None = None,
        by_content: bool = False,
        holds: Callable[[Outcome], bool] | None = None,
    ) -> None:
        """``holds``: whether a record's tar shard holds its sample
        (``shard_writer.ShardIndex.holds``); None: no record in a shard stands."""
        self._folder = folder
        self._fingerprint = fingerprint
        self._holds = holds
        self._latest: dict[bytes, int] = {}
        """URL digest → where its latest line is if it is ok, else ``_NOT_DONE``
        (or ``_NOT_DONE_IN_BASE``)."""
        self._by_content: dict[bytes, int] = {}
        """Content digest → where an ok line with that body is (checked when read)."""
        self.lines = 0
        """Records read in the writer's own files (lines that are one)."""
        self.torn = 0
        """Lines of its own files that are not a record (cut short, or not ours)."""
        self.unique = 0
        """The number of distinct URLs with a record in the writer's own files."""
        self._load(by_content)

    @property
    def untidy(self) -> bool:
        """True if the files read hold torn lines or several lines of one URL."""
        return self.torn > 0 or self.lines > self.unique

    def has_line(self, key: bytes) -> bool:
        """Tell whether the URL with this ``record_key`` has a record already in the
        writer's own manifest (a part's record file, not the base)."""
        where = self._latest.get(key)
        return where is not None and _own(where)

    def _load(self, by_content: bool) -> None:
        for which in (_IN_BASE, _IN_MANIFEST, _IN_UPDATES):
            name = self._name(which)
            if name is None:
                continue
            for offset, _, outcome in _read_records(self._folder, name):
                own = which != _IN_BASE
                if outcome is None:
                    self.torn += own
                    continue
                key = record_key(outcome.url)
                if own:
                    self.lines += 1
                    self.unique += not _own(self._latest.get(key, _NOT_DONE_IN_BASE))
                where = _NOT_DONE if own else _NOT_DONE_IN_BASE
                if outcome.ok and (outcome.path or outcome.shard):
                    where = offset << _WHICH_BITS | which
                    if by_content and outcome.sha256:
                        self._by_content[_content_key(outcome.sha256)] = where
                self._latest[key] = where

    def _name(self, which: int) -> str | None:
        files = self._folder.files
        return {
            _IN_MANIFEST: files.manifest,
            _IN_UPDATES: files.updates,
            _IN_BASE: files.base,
        }[which]

    def _read(self, where: int) -> Outcome | None:
        """The record whose line is at ``where``, if it is still there."""
        name = self._name(where & _WHICH_MASK)
        if name is None:
            return None
        try:
            fd = self._folder.open_file(name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            line = _line_at(fd, where >> _WHICH_BITS)
        finally:
            os.close(fd)
        outcome = parse_record(line)
        if outcome is None or self._latest.get(record_key(outcome.url)) != where:
            return None  # the file changed under us: treat the URL as not done
        return outcome

    def earlier(self, url: str) -> Outcome | None:
        """Return the latest record of ``url`` if it is ok (its files unchecked)."""
        if not self._latest:  # a first run: no URL to look up (nor to hash)
            return None
        where = self._latest.get(record_key(url), _NOT_DONE)
        return None if where < 0 else self._read(where)

    def current(self, outcome: Outcome) -> bool:
        """Tell whether an ok record still stands: same settings, image still there
        (for a sample: its shard still holds its key)."""
        if outcome.settings is not None and outcome.settings != self._fingerprint:
            return False
        if outcome.shard is not None:
            return self._holds is not None and self._holds(outcome)
        return outcome.path is not None and (self._folder.path / outcome.path).is_file()

    def kept_original(self, outcome: Outcome) -> Path | None:
        """Return the kept download of an ok record, if it is still there."""
        if outcome.original is None:
            return None
        path = self._folder.path / outcome.original
        return path if path.is_file() else None

    def same_content(self, sha256: str) -> Outcome | None:
        """Return a standing ok record of a body with this SHA-256 (``by_content``)."""
        where = self._by_content.get(_content_key(sha256))
        if where is None:
            return None
        outcome = self._read(where)
        if outcome is None or outcome.sha256 != sha256 or not self.current(outcome):
            return None
        return outcome


def _own(where: int) -> bool:
    """Tell whether a resume entry is a line of the writer's own files."""
    if where < 0:
        return where == _NOT_DONE
    return where & _WHICH_MASK != _IN_BASE


def _line_at(fd: int, offset: int) -> bytes:
    """Read the line that starts at ``offset`` (without a limit: lines are ours)."""
    chunks = []
    while True:
        chunk = os.pread(fd, _READ_CHUNK, offset)
        end = chunk.find(b"\n")
        if end >= 0 or len(chunk) < _READ_CHUNK:
            chunks.append(chunk if end < 0 else chunk[: end + 1])
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _content_key(sha256: str) -> bytes:
    """16 bytes of a hex SHA-256: enough to find a record, which is then checked."""
    try:
        return bytes.fromhex(sha256[:32])
    except ValueError:  # not hex: a hand-edited record; it will not match
        return sha256.encode("utf-8", "surrogatepass")


class _Appender:
    """One file of the folder that records are appended to, one ``write`` each."""

    def __init__(self, folder: OutputFolder, name: str) -> None:
        self.path = folder.path / name
        # Read as well: to see whether a crash tore the last line.
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND
        self._fd: int | None = folder.open_file(name, flags)
        try:
            if not _ends_with_newline(self._fd):
                # A crash tore the last line; start ours on a fresh line.
                _write_all(self._fd, b"\n")
        except OSError as exc:
            self.close()
            raise _output_error("write", self.path, exc) from exc

    def append(self, line: bytes) -> None:
        """Append ``line`` whole, or not at all: a full disk leaves no torn line."""
        if self._fd is None:
            raise RuntimeError("the manifest is closed")
        try:
            end = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                _write_all(self._fd, line)
            except OSError:
                os.ftruncate(self._fd, end)  # freeing space cannot fail for lack of it
                raise
        except OSError as exc:
            raise _output_error("write", self.path, exc) from exc

    def sync(self) -> None:
        """Flush what was appended to disk."""
        if self._fd is None:
            raise RuntimeError(f"{self.path} is closed")
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise _output_error("write", self.path, exc) from exc

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def record_line(outcome: Outcome) -> bytes:
    """The manifest line of ``outcome``: one JSON object and a newline, UTF-8."""
    # backslashreplace: a lone surrogate becomes its JSON escape, still valid JSON.
    line = json.dumps(outcome.to_json(), ensure_ascii=False) + "\n"
    return line.encode("utf-8", "backslashreplace")


class ManifestWriter:
    """Write each record as it is decided; the only writer (see the module docstring).

    A URL without a line in the manifest gets its record appended there; one that
    has a line gets it in the updates file, and ``close`` merges the two.
    """

    def __init__(self, folder: OutputFolder, previous: PreviousRun) -> None:
        self._folder = folder
        self._previous = previous
        self._manifest: _Appender | None = _Appender(folder, folder.files.manifest)
        self._updates: _Appender | None = None

    def write(self, outcome: Outcome) -> None:
        """Write ``outcome`` (flushed to the OS: one ``write`` call)."""
        if self._manifest is None:
            raise RuntimeError("the manifest is closed")
        data = record_line(outcome)
        # One record per unique input (sources dedupe by the same normalised URL):
        # only the earlier runs' URLs need looking up.
        # (Without own lines read, no URL has one: its key need not be computed.)
        if self._previous.lines and self._previous.has_line(record_key(outcome.url)):
            if self._updates is None:
                self._updates = _Appender(self._folder, self._folder.files.updates)
            self._updates.append(data)
        else:
            self._manifest.append(data)

    def close(self) -> None:
        """Close the files, merge them and write ``failed.txt`` (idempotent)."""
        if self._manifest is None:
            return
        manifest, self._manifest = self._manifest, None
        manifest.close()
        if self._updates is not None:
            self._updates.close()
        if self._updates is not None or self._previous.untidy:
            self._folder.merge_manifest()
        self._folder.write_failed_list()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
