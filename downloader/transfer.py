"""What one body transfer decides beyond moving bytes: is it an image at all, did it
stall, and may a cut one continue where it stopped.

``fetch.py`` drives the transfer; the rules it applies mid-body live here, small and
testable alone:

- **Early refusal** (``Sniff``): the Content-Type and the first ``SNIFF_BYTES`` bytes
  are judged as they arrive, so an HTML page (a login wall, a soft 404) is refused
  after one read instead of being downloaded in full and failing in a worker. Many
  servers label images wrongly (``application/octet-stream``, ``binary/octet-stream``,
  none at all, even ``text/html``), so a known image signature always wins over the
  label, a label that is clearly not an image refuses the rest, and when the label
  says neither, only a body that reads as text is refused. Anything else is left to
  the worker, which alone decodes.
- **Stalls** (``STALL_RETRIES``): a server that sends nothing for ``--timeout``
  seconds once connected (a read timeout, before or within the body), or a body that
  crawls below the minimum speed for that long.
- **Resuming a cut body** (``Continuation``, ``Partial``, ``partial_for``): a body
  cut mid-way from a server that offers byte ranges for it (``Accept-Ranges: bytes``)
  and names its version (a strong ``ETag``, or ``Last-Modified`` when there is no
  ETag at all) is continued by the next attempt with ``Range: bytes=N-`` guarded by
  ``If-Range``, so a server whose file changed meanwhile sends the whole new one (a
  200) instead of a mismatched tail. ``If-Range`` is only as good as the server's
  word, so a 206 must also prove it is the rest of the same body
  (``continued_size``): from byte N exactly to the end of a body as long as the first
  reply said; anything else would splice two bodies, so the partial file is dropped
  and the next attempt downloads the whole body. Only within one run: the partial
  file lives in the run's scratch folder, which no run leaves behind.
"""

from __future__ import annotations

import codecs
import re
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the command imports this before httpx
    import httpx

__all__ = [
    "SNIFF_BYTES",
    "STALL_RETRIES",
    "AttemptState",
    "Continuation",
    "Partial",
    "Sniff",
    "continued_size",
    "partial_for",
    "refusal",
]

STALL_RETRIES = 1
"""Times a download is tried again after its body stalled. A stall mostly means the
server (or the path to it) cannot serve this file now: one more attempt tells a stuck
connection or a busy replica from that, and continues from the bytes already
received when the server allows it; each further attempt would cost another whole
``--timeout`` window for little chance, so a second stall is final. It counts within
``--retries``: with ``--retries 0`` there is no second attempt at all."""

SNIFF_BYTES = 64
"""Bytes of a body judged before the rest is accepted: every image signature fits in
the first 12, and 64 are enough to tell text (an HTML page) from binary data."""

_HINT_CHARS = 40
"""Characters of a text body quoted in a refusal, for a person to recognise it."""

_IMAGE_PREFIXES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
    b"\x00\x00\x01\x00",  # ICO
    b"8BPS",  # Photoshop
    b"qoif",  # QOI
    b"\xff\x0a",  # JPEG XL codestream
    b"\x00\x00\x00\x0cJXL \r\n\x87\n",  # JPEG XL container
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000
)
_IMAGE_BRANDS = frozenset(
    {b"avif", b"avis", b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"}
)
"""ISO media brands (bytes 8-12 after ``ftyp``) of still images: AVIF and HEIF."""
_TEXT_CONTROLS = frozenset("\t\n\r\f")
_NON_IMAGE_TOP_TYPES = frozenset(
    {"text", "audio", "video", "font", "model", "multipart", "message"}
)
_NON_IMAGE_APPLICATION_TYPES = frozenset(
    {
        "json",
        "xml",
        "javascript",
        "x-javascript",
        "ecmascript",
        "pdf",
        "zip",
        "gzip",
        "x-gzip",
        "x-tar",
        "rtf",
        "msword",
    }
)
"""``application/…`` subtypes that are clearly not images; ``octet-stream`` and the
other vague labels are not listed, on purpose: the first bytes decide those."""


def refusal(content_type: str | None, head: bytes) -> str | None:
    """Why a body labelled ``content_type`` and starting with ``head`` is refused as
    not an image, or None to let it through (the worker decides).

    ``head`` is the first ``SNIFF_BYTES`` bytes, or the whole body when shorter.
    """
    if not head or _is_image_start(head):
        return None
    media_type = _media_type(content_type)
    text = _is_text(head)
    if media_type == "image/svg+xml" and text:
        return "unsupported image format: SVG (server sent image/svg+xml)"
    if media_type is not None and _clearly_not_image(media_type):
        return f"not an image: server sent {media_type} ({_describe(head, text)})"
    if text:
        label = f"sent as {media_type}" if media_type else "no Content-Type"
        return f"not an image: the body is text ({_describe(head, text)}; {label})"
    return None


class Sniff:
    """Judge one body by its label and first bytes, once, as the bytes arrive."""

    def __init__(self, content_type: str | None, *, decided: bool = False) -> None:
        self._content_type = content_type
        self._head = b""
        self.decided = decided
        """True once the body was let through (a resumed body already was)."""

    def feed(self, piece: bytes) -> str | None:
        """Take the next decoded piece; return a refusal once one is certain."""
        if self.decided:
            return None
        self._head += piece[: SNIFF_BYTES - len(self._head)]
        return self._judge() if len(self._head) >= SNIFF_BYTES else None

    def finish(self) -> str | None:
        """Judge a body shorter than ``SNIFF_BYTES`` (nothing for an empty one)."""
        return None if self.decided else self._judge()

    def _judge(self) -> str | None:
        reason = refusal(self._content_type, self._head)
        self.decided = reason is None
        return reason


def _media_type(content_type: str | None) -> str | None:
    """``text/html`` of ``Text/HTML; charset=utf-8``; None if absent or empty."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    return media_type or None


def _clearly_not_image(media_type: str) -> bool:
    top, _, sub = media_type.partition("/")
    if top in _NON_IMAGE_TOP_TYPES:
        return True
    return top == "application" and (
        sub in _NON_IMAGE_APPLICATION_TYPES or sub.endswith(("+json", "+xml"))
    )


def _is_image_start(head: bytes) -> bool:
    """True if ``head`` begins with the signature of an image format."""
    return (
        head.startswith(_IMAGE_PREFIXES)
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
        # BMP: "BM", the file size, then four reserved zero bytes.
        or (head[:2] == b"BM" and head[6:10] == bytes(4))
        or (head[4:8] == b"ftyp" and head[8:12] in _IMAGE_BRANDS)
    )


def _is_text(head: bytes) -> bool:
    """True if ``head`` reads as UTF-8 (or ASCII) text without control characters."""
    data = head.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The window may end inside a character: judge what comes before it.
        if exc.reason != "unexpected end of data":
            return False
        text = data[: exc.start].decode("utf-8")
    return bool(text.strip()) and all(
        char.isprintable() or char in _TEXT_CONTROLS for char in text
    )


def _describe(head: bytes, text: bool) -> str:
    if not text:
        return f"starts with bytes {head[:8].hex(' ')}"
    first_line = head.decode("utf-8", "replace").strip().splitlines()[0]
    return f"starts with {first_line.removeprefix(chr(0xFEFF))[:_HINT_CHARS]!r}"


@dataclass(frozen=True, slots=True)
class Partial:
    """A body cut mid-way, on disk, that a range request to ``url`` may continue."""

    url: str
    """Where the body came from (after redirects): the only URL asked for the rest."""
    validator: str
    """The ``If-Range`` value: the body's strong ETag, else its Last-Modified."""
    length: int | None = None
    """The whole body's size, as the first reply's Content-Length said (None: it did
    not say): a 206 for another size is the rest of another body."""


@dataclass(frozen=True, slots=True)
class AttemptState:
    """What one attempt leaves to the next beyond the count: stalls, a partial body.

    Carried by ``RetryLater`` to a scheduler and back, so that a download retried
    later keeps the same stall budget and continues its partial file.
    """

    stalls: int = 0
    partial: Partial | None = None


def partial_for(response: httpx.Response) -> Partial | None:
    """How the body of this 200 could be continued if cut, or None if it cannot.

    Only a body sent as it is (no content coding: the ranges count the bytes on the
    wire) by a server offering byte ranges, with a validator ``If-Range`` accepts: a
    strong ETag, or a Last-Modified date when there is no ETag. A weak ETag is no
    validator for ``If-Range``, and a client that has one must not send a date there
    instead (RFC 9110, 13.1.5): such a body is not continued at all.
    """
    headers = response.headers
    if headers.get("Accept-Ranges", "").strip().lower() != "bytes":
        return None
    if not _identity(headers):
        return None
    etag = headers.get("ETag", "").strip()
    if etag.startswith("W/"):
        return None
    validator = etag or headers.get("Last-Modified", "").strip()
    if not validator:
        return None
    length = headers.get("Content-Length", "").strip()
    return Partial(
        str(response.url), validator, int(length) if length.isdigit() else None
    )


def _identity(headers: httpx.Headers) -> bool:
    """True if the body has no content coding: its bytes are those ranges count."""
    return headers.get("Content-Encoding", "").strip().lower() in ("", "identity")


class Continuation:
    """The partial body of one download in its ``.part`` file, and what the current
    request asked of it; owned by that download alone.

    ``partial`` says which URL and which version of the body the file is the start
    of (None: nothing worth continuing, and the file is the download's to replace).
    """

    def __init__(self, path: Path, partial: Partial | None = None) -> None:
        self.path = path
        self.partial = partial
        self.asked_from = 0
        """The byte the current request asked the body from (0: all of it)."""

    def range_headers(self, url: str) -> dict[str, str]:
        """The headers of a request to ``url``: the rest of the partial body, if it
        is the start of ``url``'s body, and only if that body has not changed."""
        self.asked_from = 0
        if self.partial is not None and self.partial.url == url:
            with suppress(OSError):
                self.asked_from = self.path.lstat().st_size
        if not self.asked_from or self.partial is None:
            return {}
        return {
            "Range": f"bytes={self.asked_from}-",
            "If-Range": self.partial.validator,
        }

    def body_start(self, response: httpx.Response) -> tuple[int, int | None]:
        """Where the body of this 200 or 206 begins in the file, and the body's
        whole size if a 206 states it.

        A 200 is the whole body: the server ignored the range, or the body changed
        (``If-Range``); it replaces the partial one. A 206 continues it.

        Raises:
            ValueError: a 206 that is not the rest of the partial body
                (``continued_size``); the partial body is dropped.
        """
        if response.status_code != _PARTIAL_CONTENT:
            self.partial = None
            return 0, None
        length = None if self.partial is None else self.partial.length
        try:
            return self.asked_from, continued_size(response, self.asked_from, length)
        except ValueError:
            self.drop()
            raise

    def drop(self) -> None:
        """Forget the partial body and remove its file."""
        self.partial = None
        with suppress(OSError):
            self.path.unlink(missing_ok=True)


_PARTIAL_CONTENT = 206
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


def continued_size(
    response: httpx.Response, offset: int, length: int | None = None
) -> int:
    """Check that a 206 is the rest, from ``offset``, of a body of ``length`` bytes
    (the first reply's Content-Length; None if it gave none); return the body's size.

    The 206 must say which body it is the end of: one byte range from ``offset`` to
    the last byte of a stated complete length (not ``*``) equal to ``length``. And
    the bytes it sends must be exactly that range: a Content-Length equal to the
    range, with no chunked framing or content coding that could carry more or other
    bytes (h11 then reads exactly that many, no more). The file thus ends where the
    body does, never with the start of one body and the end of another.

    Raises:
        ValueError: the 206 is not that range, or does not say so.
    """
    headers = response.headers
    value = headers.get("Content-Range", "").strip()
    match = _CONTENT_RANGE.fullmatch(value)
    if match is None:
        raise ValueError(f"bad Content-Range {value!r} in a 206")
    first, last, total = int(match[1]), int(match[2]), match[3]
    sent = headers.get("Content-Length", "").strip()
    if (
        first != offset
        or total == "*"
        or last != int(total) - 1
        or last < first
        or (length is not None and int(total) != length)
        or sent != str(last - first + 1)
        or "Transfer-Encoding" in headers
        or not _identity(headers)
    ):
        raise ValueError(
            f"Content-Range {value!r} does not continue the body at byte {offset}"
            + ("" if length is None else f" of {length}")
        )
    return int(total)
