"""Turn an input list into ``Job`` records: streamed, validated, deduplicated.

::

    path / "-" / lines ──read_lines──► Line ──plan_jobs──┬─► Job      one per unique URL
      (txt, csv, tsv, jsonl)                            └─► Outcome  one per bad row
    folder / glob ──local_jobs──► Job (with local_path: processed, never downloaded)

- ``read_lines`` streams numbered lines of a list in one of the ``InputFormat``s. A file
  is read in binary and decoded line by line, so one bad line becomes a ``Line`` with an
  ``error`` instead of stopping the run. Plain text drops blanks and ``#`` comments;
  CSV and TSV need a header row with a ``url`` column (checked when ``read_lines`` is
  called), JSON Lines one object with a ``"url"`` per line. An optional ``name`` column
  names the output file; the other columns are kept as the job's ``extra``.
- ``check_url`` says why a text is not a usable http(s) URL.
- ``normalize_url`` gives the key that recognises two spellings of one URL.
- ``safe_stem`` gives the output file stem of a key: readable, and unique by its hash;
  ``safe_name`` the stem a ``name`` column asks for.
- ``plan_jobs`` keeps only digests of what it has seen, so memory grows with the number
  of unique URLs, never with the length of the list or of its URLs.
- ``open_source`` is the one entry point the runner uses, for every kind of ``Source``.
- ``count_entries`` reads a list ahead for the progress total, but only a regular file
  (``can_reread``): stdin, a pipe, a FIFO or ``/dev/fd/N`` give their lines once, to
  the run, so they are never opened for it.
"""

from __future__ import annotations

import collections
import csv
import enum
import glob
import hashlib
import io
import json
import logging
import os
import queue
import re
import stat
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TextIO, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

import idna

from downloader.errors import InputError
from downloader.records import Extra, Job, Outcome, Status

__all__ = [
    "IMAGE_SUFFIXES",
    "JSON_LINE_HINT",
    "MAX_URL_LENGTH",
    "InputFormat",
    "Line",
    "LocalFiles",
    "Prefetched",
    "Source",
    "UrlList",
    "ascii_host",
    "can_reread",
    "check_url",
    "count_entries",
    "earlier_stems",
    "local_jobs",
    "normalize_url",
    "open_source",
    "plan_jobs",
    "read_lines",
    "reads_once",
    "safe_name",
    "safe_stem",
]

# RFC 9110 asks clients and servers to support at least 8000 octets, and common servers
# refuse longer request lines (nginx and Apache both stop near 8 KiB), so a longer URL
# could not be fetched anyway; the cap also bounds the memory one line can take.
MAX_URL_LENGTH = 8192

_log = logging.getLogger("downloader")
JSON_LINE_HINT = "a JSON object, not a URL (for JSON Lines: --input-format jsonl)"
"""The reason of a line of a plain list that starts with ``{``: most likely the
list is JSON Lines read as text (from stdin, or a ``.txt``)."""
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"})
"""File name suffixes taken from an ``--input-dir`` folder: what the transform reads."""

# A line longer than this cannot hold a usable URL (8192 characters of at most 4 UTF-8
# bytes each, plus padding); reading stops there so one endless line cannot fill memory.
_MAX_LINE_BYTES = 64 * 1024
# How much of an over-long line is kept, so its record still says which line it was.
_LONG_LINE_PREVIEW = 200

# Part of the file stem that is readable; with the hash the stem stays far below the
# 255-byte name limit of common file systems, leaving room for suffixes.
_STEM_READABLE_CHARS = 60
# A name given in the list may be longer; still leaves 100+ bytes for the hash, size
# label, extension and temporary suffix.
_NAME_CHARS = 120
# 48 bits of sha256: distinct keys that share a readable part collide only by chance.
_STEM_HASH_DIGITS = 12
# The "seen" sets hold 128-bit blake2b digests instead of keys: a false duplicate is
# practically impossible, and each entry costs ~80 bytes (about 80 MB per million
# unique URLs) however long the URL is.
_SEEN_DIGEST_BYTES = 16

_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_PORT = 65535
# Unicode whitespace plus the C0 and C1 control characters.
_FORBIDDEN_CHARACTER = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")
# Only a short alphanumeric suffix counts as an extension, so the dots of a decoded
# "../../x" are not mistaken for one.
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,10}\Z")
# A name keeps its dots ("2024.05.01"); only an image extension is dropped from it.
_IMAGE_EXTENSION = re.compile(r"\.(jpe?g|png|gif|webp|bmp|avif|tiff?|heic)\Z", re.I)
# The shape of a hashed stem: a name of that shape gets a hash too, so that a name can
# never take the stem another URL of the list gets.
_HASHED_STEM = re.compile(rf".*-[0-9a-f]{{{_STEM_HASH_DIGITS}}}\Z")
_GLOB_MAGIC = re.compile(r"[*?[]")
# Dropped at the start of every line, not only the first: lists joined with `cat` carry
# one byte order mark per file.
_BOM = "\ufeff"
_URL_FIELD = "url"
_NAME_FIELD = "name"


class InputFormat(enum.Enum):
    """How a list is written; ``.value`` is what ``--input-format`` accepts."""

    TXT = "txt"
    """One URL per line; blank lines and ``#`` comments are skipped."""
    CSV = "csv"
    """Comma-separated with a header row naming a ``url`` column."""
    TSV = "tsv"
    """Tab-separated with a header row naming a ``url`` column."""
    JSONL = "jsonl"
    """One JSON object per line with a ``"url"`` string (also ``.ndjson``)."""

    @classmethod
    def for_path(cls, path: str | os.PathLike[str]) -> InputFormat:
        """Return the format a file name's extension says; plain text by default."""
        suffix = Path(path).suffix.lower()
        return {
            ".csv": cls.CSV,
            ".tsv": cls.TSV,
            ".jsonl": cls.JSONL,
            ".ndjson": cls.JSONL,
        }.get(suffix, cls.TXT)


@dataclass(frozen=True, slots=True)
class UrlList:
    """A list in an explicit format: a path, ``"-"`` for stdin, or lines of text."""

    source: str | Path | TextIO | Iterable[str]
    format: InputFormat | None = None
    """None: from the file name's extension (plain text for stdin and streams)."""


@dataclass(frozen=True, slots=True)
class LocalFiles:
    """Local image files to process without downloading (``--input-dir``).

    ``pattern`` is a folder (its files with an image suffix, not recursive), a glob
    pattern (every regular file it matches; ``**`` recurses), or one file. The files
    are only read: the processing works on a hard link or a copy of each.
    """

    pattern: str | Path


Source = str | Path | TextIO | Iterable[str] | UrlList | LocalFiles
"""What a run reads: a list's path (``"-"`` for stdin), an open text stream, URLs, a
``UrlList`` with an explicit format, or ``LocalFiles``."""


@dataclass(frozen=True, slots=True)
class Line:
    """One usable-looking entry of a list: a line of text or a row with fields."""

    number: int
    """Line number in the list (1-based), counting blank and comment lines."""
    text: str
    """The URL (stripped); for an unusable entry, what the entry says."""
    error: str | None = None
    """Why the line cannot be used whatever it says, e.g. it is not valid UTF-8."""
    name: str | None = None
    """The ``name`` column: the output file stem it asks for (before sanitising)."""
    extra: Extra = ()
    """The other columns of a CSV, TSV or JSON Lines row, in order."""


_Physical = tuple[int, str, str | None]
"""A decoded line of a list: its number, its text (line end kept), what is wrong."""


def normalize_url(url: str) -> str:
    """Return the key that recognises duplicates of a URL that passed ``check_url``.

    Scheme and host are lowercased, an international host is written in its ASCII
    (IDNA) form, as httpx connects to it, a default port and any fragment are dropped,
    and an empty path becomes ``/``; the rest (credentials, path and query) is kept
    exactly. So ``http://BÜCHER.example/x`` and ``http://xn--bcher-kva.example/x`` are
    one URL. (Keys made before the IDNA step kept such a host as written, lowercased:
    the manifest recomputes every record's key from its URL, so old records are
    found; ``earlier_stems`` names their outputs.)
    """
    parts = urlsplit(url)
    host = ascii_host(parts.hostname or "")
    return _join_key(parts, host)


def earlier_stems(job: Job) -> tuple[str, ...]:
    """The stems ``job``'s outputs may have on disk: its own, and for an
    international host the one an earlier key rule gave it (the host in Unicode), so
    that a rerun that redoes the URL removes outputs made under either name."""
    digest = _key_digest(job.key)
    parts = urlsplit(job.key)
    host = parts.hostname or ""
    if not job.stem.endswith(digest) or "xn--" not in host:
        return (job.stem,)
    try:
        unicode_host = idna.decode(host)
    except idna.IDNAError:
        return (job.stem,)
    earlier = _key_digest(_join_key(parts, unicode_host))
    return (job.stem, job.stem.removesuffix(digest) + earlier)


def ascii_host(host: str) -> str:
    """``host`` lowercased, in IDNA (``xn--…``) form if it has non-ASCII letters.

    The encoding is httpx's (the ``idna`` package, IDNA 2008, of the lowercased
    name), so that the key names the host a request connects to. A name that
    encoding refuses is kept as it is: its request fails with the reason anyway.
    """
    host = host.lower()
    if host.isascii():
        return host
    try:
        return idna.encode(host).decode("ascii")
    except idna.IDNAError:
        return host


def _join_key(parts: SplitResult, host: str) -> str:
    if ":" in host:
        host = f"[{host}]"
    userinfo, at, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}{at}{host}"
    port = _port_text(parts.netloc)
    if port and int(port) != _DEFAULT_PORTS.get(parts.scheme):
        netloc = f"{netloc}:{int(port)}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


def check_url(url: str) -> str | None:
    """Return why ``url`` is not a usable http(s) URL, or None if it is."""
    if len(url) > MAX_URL_LENGTH:
        return f"URL longer than {MAX_URL_LENGTH} characters"
    if _FORBIDDEN_CHARACTER.search(url):
        return "whitespace or control character in URL"
    try:
        url.encode("utf-8")
        parts = urlsplit(url)
    except UnicodeEncodeError:
        return "URL is not valid Unicode (lone surrogate)"
    except ValueError as exc:
        return f"malformed URL: {exc}"
    if not parts.scheme:
        return "not a URL (no scheme)"
    if parts.scheme not in _DEFAULT_PORTS:
        return f"unsupported scheme {parts.scheme!r} (only http and https)"
    return _check_authority(parts)


def safe_stem(key: str, readable_from: str | None = None) -> str:
    """Return a readable file stem for a normalised URL, unique by a hash of the key.

    The readable part comes from ``readable_from`` if given (a ``name`` column), else
    from the last path segment without its extension, limited to ``[A-Za-z0-9._-]``;
    the stem never contains a path separator, never starts with a dot or a dash and
    is at most 73 characters long.
    """
    if readable_from is None:
        path = key.partition("#")[0].partition("?")[0]
        name = unquote(path.rpartition("/")[2], errors="replace")
        readable = _sanitise(_EXTENSION.sub("", name))
    else:
        readable = safe_name(readable_from)
    readable = readable[:_STEM_READABLE_CHARS] or "image"
    return f"{readable}-{_key_digest(key)}"


def _key_digest(key: str) -> str:
    """The hash part of a stem: the first hex digits of the key's SHA-256."""
    # surrogatepass: keep the function total for any str a library caller passes.
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return digest[:_STEM_HASH_DIGITS]


def safe_name(name: str) -> str:
    """Return the file stem a ``name`` column asks for; empty if nothing is left.

    An image extension is dropped (``cat.png`` → ``cat``), runs of characters outside
    ``[A-Za-z0-9._-]`` become ``_``, leading dots and dashes go, and the result is cut
    to 120 characters, so a name can never leave the output folder.
    """
    base = _IMAGE_EXTENSION.sub("", name.strip())
    return _sanitise(base)[:_NAME_CHARS]


def read_lines(
    source: str | Path | TextIO | Iterable[str],
    input_format: InputFormat | None = None,
) -> Iterator[Line]:
    """Stream the entries of a list in ``input_format``.

    ``source`` is a path, ``"-"`` for standard input, an open text stream, or any
    iterable of strings (numbered from 1). Without ``input_format`` a path's
    extension decides (``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``, else plain text);
    anything else is plain text.

    Raises:
        InputError: at call time, when a path cannot be opened (missing, unreadable,
            a directory) or a CSV/TSV header has no ``url`` column; also later if
            reading the file fails.
    """
    if input_format is None:
        if isinstance(source, str | os.PathLike) and source != "-":
            input_format = InputFormat.for_path(source)
        else:
            input_format = InputFormat.TXT
    if isinstance(source, str) and source == "-":
        try:
            stdin_fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):  # replaced, e.g. in tests
            stdin_bytes: BinaryIO | None = getattr(sys.stdin, "buffer", None)
            if stdin_bytes is not None:
                return _parse(
                    _binary_lines(stdin_bytes), input_format, "standard input"
                )
            return _parse(_text_lines(sys.stdin), input_format, "standard input")
        stdin_raw = io.FileIO(stdin_fd, closefd=False)
        return _parse(
            _binary_lines(_RawLines(stdin_raw)), input_format, "standard input"
        )
    if isinstance(source, str | os.PathLike) and reads_once(source):
        return _stream_lines(Path(source), input_format)
    if isinstance(source, str | os.PathLike):
        return _file_lines(Path(source), input_format)
    return _parse(_text_lines(source), input_format, "the URL list")


def plan_jobs(lines: Iterable[Line]) -> Iterator[Job | Outcome]:
    """Yield a ``Job`` per unique usable URL and a failed ``Outcome`` per unusable text.

    Later spellings of an already seen URL are dropped silently; the first occurrence
    gives the job its line, text, name and extra fields. Jobs are indexed 0, 1, 2, ...
    in the order yielded. A ``name`` is used as the stem as is (sanitised) the first
    time it appears; a name already taken in this list (compared ignoring case) gets
    the URL's hash appended, like a stem made from the URL.
    """
    seen_keys: set[bytes] = set()
    seen_rejects: set[bytes] = set()
    seen_names: set[bytes] = set()
    index = 0
    for line in lines:
        reason = line.error or check_url(line.text)
        if reason is not None:
            if _first_time(seen_rejects, line.text):
                yield Outcome(
                    url=line.text,
                    status=Status.FAILED,
                    line=line.number,
                    error=reason,
                    extra=line.extra or None,
                )
            continue
        key = normalize_url(line.text)
        if _first_time(seen_keys, key):
            stem = _stem_for(key, line.name, seen_names)
            yield Job(index, line.number, line.text, key, stem, extra=line.extra)
            index += 1


def local_jobs(
    pattern: str | Path, *, exclude: Path | None = None
) -> Iterator[Job | Outcome]:
    """Yield a ``Job`` per local image file that ``pattern`` names (see ``LocalFiles``).

    Each job's ``url`` is the file's ``file://`` URI (its identity in the manifest; it
    is never fetched) and its ``local_path`` the resolved path. Files under
    ``exclude`` (the output folder) are left out. The file names are listed and
    sorted when called; the files are opened only when processed.

    Raises:
        InputError: at call time, when ``pattern`` names no folder or file, or matches
            no image files.
    """
    files = _expand(str(pattern))
    outside = None if exclude is None else exclude.resolve()
    jobs: list[Job | Outcome] = []
    seen: set[str] = set()
    for number, file in enumerate(files, start=1):
        resolved = file.resolve()
        url = resolved.as_uri()
        if url in seen or (outside is not None and resolved.is_relative_to(outside)):
            continue
        seen.add(url)
        jobs.append(
            Job(len(jobs), number, url, url, safe_stem(url), local_path=str(resolved))
        )
    if not jobs:
        raise InputError(f"no image files to process in {pattern}")
    return iter(jobs)


def count_entries(source: Source) -> int | None:
    """Count a list's entries cheaply, for a progress total; None when unknown.

    Reads a regular file once more, line by line (blank lines and ``#`` comments are
    not entries, nor a CSV/TSV header). Duplicates still count, so it is an upper
    bound. Anything else a path can name (stdin, a pipe, ``/dev/fd/N``, a FIFO, a
    device) can be read only once and belongs to the run, so it is never opened
    here: its total is unknown.
    """
    path: str | Path | None = None
    input_format: InputFormat | None = None
    if isinstance(source, UrlList):
        if isinstance(source.source, str | Path):
            path, input_format = source.source, source.format
    elif isinstance(source, str | Path):
        path = source
    elif isinstance(source, list | tuple):
        return len(source)
    if path is None or str(path) == "-":
        return None
    count = _count_lines(Path(path))
    if count is None:
        return None
    input_format = input_format or InputFormat.for_path(path)
    header = input_format in (InputFormat.CSV, InputFormat.TSV)
    return max(0, count - 1) if header else count


def can_reread(path: str | os.PathLike[str]) -> bool:
    """Return True if ``path`` names a regular file: one that reads the same twice.

    ``"-"``, pipes, FIFOs, sockets, devices and ``/dev/stdin`` or ``/dev/fd/N`` on one
    of those give their lines once; whoever opens them first takes them.
    """
    if str(path) == "-":
        return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def reads_once(path: str | os.PathLike[str]) -> bool:
    """Return True if ``path`` names a list that gives its lines only once.

    That is ``"-"`` and anything that exists but is neither a regular file nor a
    folder: a pipe or FIFO (also as ``/dev/stdin`` or ``/dev/fd/N``), a socket, a
    device. A caller that needs the lines twice must keep them from one read.
    """
    if str(path) == "-":
        return True
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False  # missing or unreadable: reading it reports why
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _count_lines(path: Path) -> int | None:
    """Count the non-blank, non-comment lines of a regular file; None otherwise.

    The file is opened without blocking and checked again once open, so a path
    swapped for a FIFO after the first check still cannot hold the run up.
    """
    if not can_reread(path):
        return None
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with open(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        try:
            return sum(
                1
                for raw in handle
                if (text := raw.strip()) and not text.startswith(b"#")
            )
        except OSError:
            return None


def open_source(
    source: Source, *, exclude: Path | None = None
) -> Iterator[Job | Outcome]:
    """Start reading ``source`` and return its jobs and records of unusable entries.

    Errors in opening it are raised now, before any run starts; ``exclude`` (the
    output folder) is only used by ``LocalFiles``.
    """
    if isinstance(source, LocalFiles):
        return local_jobs(source.pattern, exclude=exclude)
    if isinstance(source, UrlList):
        return plan_jobs(read_lines(source.source, source.format))
    return plan_jobs(read_lines(source))


_T = TypeVar("_T")

PREFETCH_ITEMS = 256
"""Items of the list read ahead by its reader thread (a bounded queue)."""
_STOPPED_GRACE_S = 1.0
"""How long, once the run is stopping, a consumer waits for the list's next item
before it gives up on a list that is not coming (a pipe whose writer says nothing)."""
_POLL_S = 0.25


class Prefetched(Iterator[_T]):
    """A list read in a thread of its own, so that waiting for it never blocks a stop.

    A pipe's writer may say nothing for minutes. Read in the scheduler's thread, such
    a list would hold the run (and Ctrl-C, and SIGTERM) until the next line came:
    here the consumer waits on a bounded queue instead, and once ``stopped()`` is
    true it gives up after ``_STOPPED_GRACE_S`` without a new item: the lines not
    read yet were never inputs of this run. A list that is all there (a file) is read
    to its end as usual, so every input it holds still gets its record. The reader
    is a daemon thread; blocked on such a pipe, it ends with the process.
    """

    def __init__(self, items: Iterable[_T], stopped: Callable[[], bool]) -> None:
        self._stopped = stopped
        self._queue: queue.Queue[tuple[str, object]] = queue.Queue(PREFETCH_ITEMS)
        self._closed = threading.Event()
        self._ended = False
        reader = threading.Thread(
            target=self._read, args=(iter(items),), name="list-reader", daemon=True
        )
        reader.start()

    def __next__(self) -> _T:
        if self._ended:
            raise StopIteration
        waited = 0.0
        while True:
            try:
                kind, value = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                waited = waited + _POLL_S if self._stopped() else 0.0
                if waited >= _STOPPED_GRACE_S:
                    self.close()
                    raise StopIteration from None
                continue
            if kind == "item":
                return value  # type: ignore[return-value]
            self.close()
            if kind == "error":
                assert isinstance(value, BaseException)
                raise value
            raise StopIteration

    def close(self) -> None:
        """Stop reading (the reader ends at its next item)."""
        self._ended = True
        self._closed.set()

    def _read(self, items: Iterator[_T]) -> None:
        try:
            for item in items:
                if not self._put("item", item):
                    return
        except BaseException as exc:  # noqa: BLE001 (thread boundary: to the consumer)
            self._put("error", exc)
        else:
            self._put("end", None)

    def _put(self, kind: str, value: object) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put((kind, value), timeout=_POLL_S)
            except queue.Full:
                continue
            return True
        return False


def _sanitise(text: str) -> str:
    # A leading '-' would read as an option to command-line tools.
    return _UNSAFE_RUN.sub("_", text).lstrip("._-")


def _stem_for(key: str, name: str | None, seen_names: set[bytes]) -> str:
    """Return the stem of a new job: its name if free, else a hashed stem."""
    readable = None if name is None else safe_name(name)
    if not readable:  # no name, or nothing of it is usable
        return safe_stem(key)
    free = not _HASHED_STEM.match(readable) and _first_time(
        seen_names, readable.lower()
    )
    return readable if free else safe_stem(key, name)


def _expand(pattern: str) -> list[Path]:
    """Return the sorted files a folder, glob pattern or file name stands for."""
    path = Path(pattern)
    if path.is_dir():
        try:
            entries = list(path.iterdir())
        except OSError as exc:
            raise InputError(f"cannot list {pattern}: {exc.strerror or exc}") from exc
        files = [entry for entry in entries if entry.is_file()]
        _say_left_out(
            pattern, [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
        )
        return sorted(f for f in files if f.suffix.lower() in IMAGE_SUFFIXES)
    if _GLOB_MAGIC.search(pattern):
        matches = glob.glob(pattern, recursive=True)
        return sorted(Path(match) for match in matches if Path(match).is_file())
    if path.is_file():
        return [path]
    raise InputError(f"no such folder or file: {pattern}")


def _say_left_out(folder: str, files: list[Path]) -> None:
    """Log, as one warning, the files of an ``--input-dir`` folder not processed."""
    if not files:
        return
    kinds = collections.Counter(f.suffix.lower() or "no suffix" for f in files)
    listed = ", ".join(f"{suffix} {n}" for suffix, n in sorted(kinds.items()))
    _log.warning(
        "%s: %d file(s) left out, not named as images (%s); processed are %s",
        folder,
        len(files),
        listed,
        ", ".join(sorted(IMAGE_SUFFIXES)),
    )


def _check_authority(parts: SplitResult) -> str | None:
    """Return why the host or port of a split http(s) URL is unusable, or None."""
    host = parts.hostname
    if not host:
        return "no host"
    port = _port_text(parts.netloc)
    if port and not _is_port(port):
        return f"invalid port {port!r}"
    if ":" in host:  # an IPv6 literal, already checked by urlsplit
        return None
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        return f"host is not a valid name: {host!r} ({exc.__cause__ or exc})"
    if not _HOST_NAME.fullmatch(ascii_host):
        return f"host is not a valid name: {host!r}"
    if "xn--" in ascii_host:
        # httpx decodes an IDNA name to give the request its host: one that does not
        # decode (xn--n3h is a snowman, which IDNA 2008 refuses) must fail here, as
        # this URL's reason, not raise in a download thread.
        try:
            idna.decode(ascii_host)
        except (idna.IDNAError, UnicodeError) as exc:
            return f"host is not a valid name: {host!r} ({exc})"
    return None


def _port_text(netloc: str) -> str | None:
    """Return what follows the host in ``netloc`` (the port, without ':'), or None."""
    host_and_port = netloc.rpartition("@")[2]
    if host_and_port.startswith("["):
        after_bracket = host_and_port.partition("]")[2]
        return after_bracket.removeprefix(":") if after_bracket else None
    _, colon, port = host_and_port.partition(":")
    return port if colon else None


def _is_port(text: str) -> bool:
    """Return True if ``text`` is a TCP port number a request can use (1-65535)."""
    # Check the length first: int() refuses strings of thousands of digits.
    return (
        len(text) <= len(str(_MAX_PORT))
        and text.isascii()
        and text.isdigit()
        and (0 < int(text) <= _MAX_PORT)
    )


def _first_time(seen: set[bytes], text: str) -> bool:
    """Record ``text`` in ``seen`` by a fixed-size digest; False if it was there."""
    digest = hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=_SEEN_DIGEST_BYTES
    ).digest()
    if digest in seen:
        return False
    seen.add(digest)
    return True


def _file_lines(path: Path, input_format: InputFormat) -> Iterator[Line]:
    """Open ``path`` now, so errors surface at call time, and stream its entries."""
    try:
        file = path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read URL list {path}: {exc.strerror or exc}") from exc
    try:
        lines = _parse(_read_and_close(file, path), input_format, str(path))
    except BaseException:
        file.close()
        raise
    # A generator closed or dropped before its first next() never enters its `with`;
    # closing the file when the generator goes away covers that case too.
    weakref.finalize(lines, file.close)
    return lines


class _LineSource(Protocol):
    def readline(self, limit: int = -1, /) -> bytes: ...


class _RawLines:
    """``readline`` over ``os.read`` on a descriptor: a stream read only once.

    No lock is held while it waits: a thread blocked here (a pipe whose writer says
    nothing) cannot hold up a second Ctrl-C or the interpreter's exit, as a thread
    blocked in a ``BufferedReader`` does ("could not acquire lock … at shutdown").
    """

    def __init__(self, raw: io.FileIO) -> None:
        self._raw = raw
        self._buffer = bytearray()
        self._ended = False

    def readline(self, limit: int = -1, /) -> bytes:
        limit = limit if limit > 0 else sys.maxsize
        while True:
            end = self._buffer.find(b"\n", 0, limit)
            if end >= 0 or len(self._buffer) >= limit or self._ended:
                size = end + 1 if end >= 0 else min(limit, len(self._buffer))
                line = bytes(self._buffer[:size])
                del self._buffer[:size]
                return line
            chunk = self._raw.read(64 * 1024)  # one read(2), no lock
            if chunk:
                self._buffer += chunk
            else:
                self._ended = True


def _stream_lines(path: Path, input_format: InputFormat) -> Iterator[Line]:
    """``_file_lines`` for a pipe, FIFO or device: read without a buffer's lock."""
    try:
        raw = io.FileIO(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read URL list {path}: {exc.strerror or exc}") from exc
    lines = _parse(_read_raw_and_close(raw, path), input_format, str(path))
    weakref.finalize(lines, raw.close)
    return lines


def _read_raw_and_close(raw: io.FileIO, path: Path) -> Iterator[_Physical]:
    with raw:
        try:
            yield from _binary_lines(_RawLines(raw))
        except OSError as exc:
            message = f"cannot read URL list {path}: {exc.strerror or exc}"
            raise InputError(message) from exc


def _read_and_close(file: BinaryIO, path: Path) -> Iterator[_Physical]:
    """Stream the lines of an open file and close it when done or closed."""
    with file:
        try:
            yield from _binary_lines(file)
        except OSError as exc:
            message = f"cannot read URL list {path}: {exc.strerror or exc}"
            raise InputError(message) from exc


def _binary_lines(stream: _LineSource) -> Iterator[_Physical]:
    """Decode a byte stream line by line as UTF-8, marking lines that cannot be used."""
    number = 0
    while raw := stream.readline(_MAX_LINE_BYTES):
        number += 1
        error = None
        if len(raw) == _MAX_LINE_BYTES and not raw.endswith(b"\n"):
            _skip_rest_of_line(stream)
            raw = raw[:_LONG_LINE_PREVIEW] + "…".encode()
            error = f"line longer than {_MAX_LINE_BYTES} bytes"
        try:
            text = raw.decode("utf-8").removeprefix(_BOM)
        except UnicodeDecodeError:
            text = raw.decode("utf-8", "replace").removeprefix(_BOM)
            error = error or "line is not valid UTF-8"
        yield number, text, error


def _skip_rest_of_line(stream: _LineSource) -> None:
    """Read and drop bytes up to and including the next newline (or the end)."""
    while (chunk := stream.readline(_MAX_LINE_BYTES)) and not chunk.endswith(b"\n"):
        pass


def _text_lines(lines: Iterable[str]) -> Iterator[_Physical]:
    """Number already decoded lines from 1."""
    for number, text in enumerate(lines, start=1):
        yield number, text.removeprefix(_BOM), None


def _parse(
    physical: Iterator[_Physical], input_format: InputFormat, where: str
) -> Iterator[Line]:
    """Return the entries of decoded lines; a CSV/TSV header is read and checked now."""
    if input_format is InputFormat.TXT:
        return _plain_lines(physical)
    if input_format is InputFormat.JSONL:
        return _json_lines(physical)
    dialect = "excel" if input_format is InputFormat.CSV else "excel-tab"
    rows = _Rows(physical)
    reader = csv.reader(rows, dialect)
    columns = _Columns.read(reader, rows, where)
    return _table_lines(reader, rows, columns)


def _plain_lines(physical: Iterator[_Physical]) -> Iterator[Line]:
    """Yield the lines of a plain list, skipping blanks and comments."""
    for number, text, error in physical:
        if line := _make_line(number, text, error):
            yield line


def _make_line(number: int, text: str, error: str | None) -> Line | None:
    """Return the ``Line`` for one decoded line, or None for a blank or a comment."""
    text = text.strip()
    if not text or text.startswith("#"):
        return None
    if error is None and "\x00" in text:
        error = "NUL byte in line"
    if error is None and text.startswith("{"):
        error = JSON_LINE_HINT
    return Line(number, text, error)


def _preview(text: str) -> str:
    """Return the start of a long text, enough to recognise it in a record."""
    text = text.strip()
    if len(text) <= _LONG_LINE_PREVIEW:
        return text
    return text[:_LONG_LINE_PREVIEW] + "…"


def _as_text(value: object) -> str:
    """Return a field value as text: strings as they are, other JSON as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _json_lines(physical: Iterator[_Physical]) -> Iterator[Line]:
    """Yield one entry per non-blank line of JSON Lines."""
    for number, text, error in physical:
        if not text.strip():
            continue
        if error is not None:
            yield Line(number, _preview(text), error)
        else:
            yield _json_line(number, text)


JSON_DEPTH_LIMIT = 64
"""Deepest nesting of a JSON Lines entry's values: far past any real metadata, and
far below what pickling a job to a worker process (or a Ray task) can recurse
through; a deeper entry failed its whole run there."""


def _depth(value: object) -> int:
    """How deep lists and objects nest in ``value`` (a scalar is 0), iteratively."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            if depth + 1 > JSON_DEPTH_LIMIT:
                return deepest  # deep enough to refuse: stop looking
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _json_line(number: int, text: str) -> Line:
    """Return the entry of one JSON line; a bad line becomes an entry with an error."""
    try:
        # NaN and Infinity are not JSON: kept as their text, so the manifest stays JSON.
        record = json.loads(text, parse_constant=str)
    except json.JSONDecodeError as exc:
        # The decoder counts lines and columns within this one line; only the
        # column means something to the reader (the entry already names its line).
        reason = f"line is not valid JSON: {exc.msg.lower()} at column {exc.colno}"
        return Line(number, _preview(text), reason)
    except RecursionError:
        return Line(number, _preview(text), "line is not valid JSON: nested too deeply")
    except ValueError as exc:  # a number too long to convert, for one
        return Line(number, _preview(text), f"line is not valid JSON: {exc}")
    if not isinstance(record, dict):
        return Line(number, _preview(text), "line is not a JSON object")
    if _depth(record) > JSON_DEPTH_LIMIT:
        reason = f"line nests deeper than {JSON_DEPTH_LIMIT} levels"
        return Line(number, _preview(text), reason)
    extra = tuple(
        (str(key), value)  # JSON values keep their types (records.Extra)
        for key, value in record.items()
        if key not in (_URL_FIELD, _NAME_FIELD)
    )
    url = record.get(_URL_FIELD)
    if not isinstance(url, str) or not url.strip():
        error = 'object has no "url" string'
        return Line(number, _preview(text), error, extra=extra)
    name = record.get(_NAME_FIELD)
    name_text = None if name is None else _as_text(name)
    return Line(number, url.strip(), None, name_text, extra)


class _Rows:
    """Feed decoded lines to ``csv.reader``; note where rows start, and faults."""

    def __init__(self, physical: Iterator[_Physical]) -> None:
        self._physical = physical
        self.number = 0
        """Number of the last line handed out."""
        self.first_text = ""
        self.error: str | None = None

    def start_row(self) -> int:
        """Forget the last row's faults; return the number the next row starts at."""
        self.error = None
        self.first_text = ""
        return self.number + 1

    def __iter__(self) -> _Rows:
        return self

    def __next__(self) -> str:
        number, text, error = next(self._physical)
        if not self.first_text:
            self.first_text = text
        self.number = number
        self.error = self.error or error
        return text


@dataclass(frozen=True, slots=True)
class _Columns:
    """The header of a CSV/TSV list: where the url and name are, and the others."""

    width: int
    url: int
    name: int | None
    others: tuple[tuple[int, str], ...]

    @classmethod
    def read(cls, reader: Iterator[list[str]], rows: _Rows, where: str) -> _Columns:
        """Read the first non-blank row as the header and check it."""
        try:
            header = next(row for row in reader if any(cell.strip() for cell in row))
        except StopIteration:
            raise InputError(f"{where} is empty: it needs a header row") from None
        except csv.Error as exc:
            raise InputError(f"{where}: cannot read the header row: {exc}") from exc
        if rows.error is not None:
            raise InputError(f"{where}: header row: {rows.error}")
        names = [cell.strip() for cell in header]
        folded = [name.casefold() for name in names]
        repeated = sorted({n for n in folded if n and folded.count(n) > 1})
        if repeated:
            raise InputError(f"{where}: the header repeats the column {repeated[0]!r}")
        if _URL_FIELD not in folded:
            found = ", ".join(repr(name) for name in names[:5])
            raise InputError(
                f"{where} has no 'url' column; its first row must name the columns "
                f"(found {found})"
            )
        name = folded.index(_NAME_FIELD) if _NAME_FIELD in folded else None
        others = tuple(
            (position, names[position])
            for position, key in enumerate(folded)
            if key and key not in (_URL_FIELD, _NAME_FIELD)
        )
        return cls(len(names), folded.index(_URL_FIELD), name, others)

    def line(self, number: int, row: list[str], error: str | None) -> Line:
        """Return the entry of one data row."""

        def cell(position: int) -> str:
            return row[position] if position < len(row) else ""

        url = cell(self.url).strip()
        name = None if self.name is None else (cell(self.name).strip() or None)
        extra = tuple((header, cell(position)) for position, header in self.others)
        if error is None and len(row) > self.width:
            error = f"row has {len(row)} fields but the header has {self.width}"
        if error is None and not url:
            error = "no URL in the 'url' column"
        text = url or _preview(",".join(row))
        return Line(number, text, error, name, extra)


def _table_lines(
    reader: Iterator[list[str]], rows: _Rows, columns: _Columns
) -> Iterator[Line]:
    """Yield one entry per non-blank data row of a CSV/TSV list."""
    while True:
        number = rows.start_row()
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield Line(number, _preview(rows.first_text), f"malformed row: {exc}")
            continue
        if any(cell.strip() for cell in row):
            yield columns.line(number, row, rows.error)
