"""Turn a URL list into ``Job`` records: streamed, validated, deduplicated.

::

    path / "-" / lines ──read_lines──► Line ──plan_jobs──┬─► Job      one per unique URL
                                                         └─► Outcome  one per bad text

- ``read_lines`` streams numbered, stripped lines and drops blanks and ``#`` comments. A
  file is read in binary and decoded line by line, so one bad line becomes a ``Line``
  with an ``error`` instead of stopping the run.
- ``check_url`` says why a text is not a usable http(s) URL.
- ``normalize_url`` gives the key that recognises two spellings of one URL.
- ``safe_stem`` gives the output file stem of a key: readable, and unique by its hash.
- ``plan_jobs`` keeps only digests of what it has seen, so memory grows with the number
  of unique URLs, never with the length of the list or of its URLs.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from downloader.errors import InputError
from downloader.records import Job, Outcome, Status

__all__ = [
    "MAX_URL_LENGTH",
    "Line",
    "check_url",
    "normalize_url",
    "plan_jobs",
    "read_lines",
    "safe_stem",
]

# RFC 9110 asks clients and servers to support at least 8000 octets, and common servers
# refuse longer request lines (nginx and Apache both stop near 8 KiB), so a longer URL
# could not be fetched anyway; the cap also bounds the memory one line can take.
MAX_URL_LENGTH = 8192

# A line longer than this cannot hold a usable URL (8192 characters of at most 4 UTF-8
# bytes each, plus padding); reading stops there so one endless line cannot fill memory.
_MAX_LINE_BYTES = 64 * 1024
# How much of an over-long line is kept, so its record still says which line it was.
_LONG_LINE_PREVIEW = 200

# Part of the file stem that is readable; with the hash the stem stays far below the
# 255-byte name limit of common file systems, leaving room for suffixes.
_STEM_READABLE_CHARS = 60
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
# Dropped at the start of every line, not only the first: lists joined with `cat` carry
# one byte order mark per file.
_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class Line:
    """One non-blank, non-comment line of a URL list."""

    number: int
    """Line number in the list (1-based), counting blank and comment lines."""
    text: str
    """The line without surrounding whitespace."""
    error: str | None = None
    """Why the line cannot be used whatever it says, e.g. it is not valid UTF-8."""


def normalize_url(url: str) -> str:
    """Return the key that recognises duplicates of a URL that passed ``check_url``.

    Scheme and host are lowercased, a default port and any fragment are dropped, and an
    empty path becomes ``/``; the rest (credentials, path and query) is kept exactly.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
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


def safe_stem(key: str) -> str:
    """Return a readable file stem for a normalised URL, unique by a hash of the key.

    The readable part comes from the last path segment without its extension, limited
    to ``[A-Za-z0-9._-]``; the stem never contains a path separator, never starts with
    a dot or a dash and is at most 73 characters long.
    """
    path = key.partition("#")[0].partition("?")[0]
    name = unquote(path.rpartition("/")[2], errors="replace")
    base = _EXTENSION.sub("", name)
    # A leading '-' would read as an option to command-line tools.
    readable = _UNSAFE_RUN.sub("_", base).lstrip("._-")
    readable = readable[:_STEM_READABLE_CHARS] or "image"
    # surrogatepass: keep the function total for any str a library caller passes.
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{readable}-{digest[:_STEM_HASH_DIGITS]}"


def read_lines(source: str | Path | TextIO | Iterable[str]) -> Iterator[Line]:
    """Stream the non-blank, non-comment lines of a URL list.

    ``source`` is a path, ``"-"`` for standard input, an open text stream, or any
    iterable of strings (numbered from 1).

    Raises:
        InputError: at call time, when a path cannot be opened (missing, unreadable,
            a directory); also later if reading it fails.
    """
    if isinstance(source, str) and source == "-":
        stdin_bytes: BinaryIO | None = getattr(sys.stdin, "buffer", None)
        if stdin_bytes is None:  # replaced by a text-only stream, e.g. in tests
            return _text_lines(sys.stdin)
        return _binary_lines(stdin_bytes)
    if isinstance(source, str | os.PathLike):
        return _file_lines(Path(source))
    return _text_lines(source)


def plan_jobs(lines: Iterable[Line]) -> Iterator[Job | Outcome]:
    """Yield a ``Job`` per unique usable URL and a failed ``Outcome`` per unusable text.

    Later spellings of an already seen URL are dropped silently; the first occurrence
    gives the job its line and text. Jobs are indexed 0, 1, 2, ... in the order yielded.
    """
    seen_keys: set[bytes] = set()
    seen_rejects: set[bytes] = set()
    index = 0
    for line in lines:
        reason = line.error or check_url(line.text)
        if reason is not None:
            if _first_time(seen_rejects, line.text):
                yield Outcome(
                    url=line.text, status=Status.FAILED, line=line.number, error=reason
                )
            continue
        key = normalize_url(line.text)
        if _first_time(seen_keys, key):
            stem = safe_stem(key)
            yield Job(index=index, line=line.number, url=line.text, key=key, stem=stem)
            index += 1


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


def _file_lines(path: Path) -> Iterator[Line]:
    """Open ``path`` now, so errors surface at call time, and stream its lines."""
    try:
        file = path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read URL list {path}: {exc.strerror or exc}") from exc
    lines = _read_and_close(file, path)
    # A generator closed or dropped before its first next() never enters its `with`;
    # closing the file when the generator goes away covers that case too.
    weakref.finalize(lines, file.close)
    return lines


def _read_and_close(file: BinaryIO, path: Path) -> Iterator[Line]:
    """Stream the lines of an open file and close it when done or closed."""
    with file:
        try:
            yield from _binary_lines(file)
        except OSError as exc:
            message = f"cannot read URL list {path}: {exc.strerror or exc}"
            raise InputError(message) from exc


def _binary_lines(stream: BinaryIO) -> Iterator[Line]:
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
        if line := _make_line(number, text, error):
            yield line


def _skip_rest_of_line(stream: BinaryIO) -> None:
    """Read and drop bytes up to and including the next newline (or the end)."""
    while (chunk := stream.readline(_MAX_LINE_BYTES)) and not chunk.endswith(b"\n"):
        pass


def _text_lines(lines: Iterable[str]) -> Iterator[Line]:
    """Number already decoded lines from 1, marking lines that cannot be used."""
    for number, text in enumerate(lines, start=1):
        if line := _make_line(number, text.removeprefix(_BOM), None):
            yield line


def _make_line(number: int, text: str, error: str | None) -> Line | None:
    """Return the ``Line`` for one decoded line, or None for a blank or a comment."""
    text = text.strip()
    if not text or text.startswith("#"):
        return None
    if error is None and "\x00" in text:
        error = "NUL byte in line"
    return Line(number, text, error)
