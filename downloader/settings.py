"""Settings: frozen dataclasses made once (by the CLI or a caller) and passed down.

Every value is checked in ``__post_init__`` so that a bad value fails at once with a
plain message (``InputError``, exit code 2) before any thread or process starts.
"""

from __future__ import annotations

import enum
import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from downloader.errors import InputError

__all__ = [
    "HttpSettings",
    "ImageFormat",
    "ImageSpec",
    "Mode",
    "NameBy",
    "ResizeMode",
    "Settings",
    "box_label",
    "import_callable",
]

VERSION = "0.1.0"
USER_AGENT = f"downloader/{VERSION} (+https://github.com/downloader/downloader)"
MEGABYTE = 1024 * 1024


class Mode(enum.Enum):
    """How the two stages are scheduled; ``.value`` is what ``--mode`` accepts."""

    SEQUENTIAL = "sequential"
    THREADS = "threads"
    PROCESSES = "processes"
    PIPELINE = "pipeline"
    ASYNC = "async"


class ImageFormat(enum.Enum):
    """Output encodings; ``.value`` is what ``--format`` accepts."""

    JPEG = "jpeg"
    WEBP = "webp"
    PNG = "png"
    AVIF = "avif"
    KEEP = "keep"
    """The source's own format when it is one of the above, else JPEG."""

    @property
    def extension(self) -> str:
        """File name extension (without the dot) for this format."""
        if self is ImageFormat.KEEP:
            raise ValueError("format 'keep' has no extension of its own")
        return "jpg" if self is ImageFormat.JPEG else self.value


class NameBy(enum.Enum):
    """What output files are named after; ``.value`` is what ``--name-by`` accepts."""

    URL = "url"
    """A safe stem made from the URL (or the list's ``name`` column)."""
    SHA256 = "sha256"
    """The first ``SHA256_STEM_DIGITS`` hex digits of the body's SHA-256; bodies with
    the same content are transformed once."""


# 16 hex digits = 64 bits: a chance collision needs about 4 billion distinct bodies.
SHA256_STEM_DIGITS = 16


class ResizeMode(enum.Enum):
    """How an image is brought to a box; ``.value`` is what ``--resize`` accepts."""

    FIT = "fit"
    """Scale to fit inside the box, keeping the aspect ratio."""
    FILL = "fill"
    """Scale to cover the box, keeping the aspect ratio, then crop the centre."""
    EXACT = "exact"
    """Scale to the box exactly, changing the aspect ratio if need be."""
    NONE = "none"
    """Keep the pixel size (the image is still oriented and re-encoded)."""


# RFC 9110 token characters; a value must not break the header block.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\r\n\x00]")
# module:function, where function may be a dotted path (a class's static method).
_CALLABLE_REF = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")


def import_callable(ref: str) -> Callable[..., object]:
    """Import and return the callable that a ``module:function`` reference names.

    Raises:
        InputError: the reference is malformed, its module cannot be imported (any
            exception the import raises), or it names nothing callable.
    """
    match = _CALLABLE_REF.fullmatch(ref)
    if match is None:
        raise InputError(f"transform {ref!r} is not of the form module:function")
    module_name, attribute = match.groups()
    try:
        target: object = importlib.import_module(module_name)
    # User code: any exception while importing it is a usage error.
    except Exception as exc:
        raise InputError(
            f"cannot import transform module {module_name!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise InputError(
                f"transform module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not callable(target):
        raise InputError(f"transform {ref!r} is not callable")
    return target


def box_label(box: tuple[int, int]) -> str:
    """Return the name of a box: ``"256"`` for a square, ``"640x480"`` otherwise."""
    width, height = box
    return str(width) if width == height else f"{width}x{height}"


def _can_write(image_format: ImageFormat) -> bool:
    """Tell whether the installed Pillow can encode ``image_format``."""
    from PIL import Image  # only needed for this check; keeps settings import light

    Image.init()
    return image_format.name in Image.SAVE


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpSettings:
    """How one URL is fetched: timeouts, retries, limits."""

    timeout: float = 30.0
    """Seconds for connecting and for each read (httpx's per-operation timeout)."""
    deadline: float = 300.0
    """Seconds for a whole download, so a slow drip cannot hold a thread."""
    retries: int = 3
    """Extra attempts after a transient failure (connection, timeout, 429, 5xx)."""
    backoff: float = 0.5
    """Base of the exponential backoff between attempts, in seconds (jittered)."""
    max_backoff: float = 30.0
    """Cap on one wait between attempts, ``Retry-After`` included."""
    max_bytes: int = 100 * MEGABYTE
    """A body larger than this (as written to disk) fails the URL."""
    max_redirects: int = 5
    per_host: int = 4
    """Concurrent connections to one host:port."""
    min_speed: int = 1024
    """Bytes per second below which a download counts as stalled ..."""
    speed_window: float = 30.0
    """... when measured over this many seconds."""
    user_agent: str = USER_AGENT
    headers: tuple[tuple[str, str], ...] = ()
    """Extra request headers (name, value); they replace defaults of the same name."""
    verify: bool = True
    """Verify TLS certificates; False (``--insecure``) is recorded in the manifest."""
    block_private: bool = False
    """Refuse hosts that resolve to loopback, private, link-local or metadata
    addresses, on every redirect hop too (``--block-private``)."""

    def __post_init__(self) -> None:
        _require(self.timeout > 0, "timeout must be greater than 0")
        _require(self.deadline > 0, "deadline must be greater than 0")
        _require(self.retries >= 0, "retries must be 0 or more")
        _require(self.backoff >= 0, "backoff must be 0 or more")
        _require(self.max_backoff >= 0, "max_backoff must be 0 or more")
        _require(self.max_bytes > 0, "max_bytes must be greater than 0")
        _require(self.max_redirects >= 0, "max_redirects must be 0 or more")
        _require(self.per_host > 0, "per_host must be greater than 0")
        _require(self.min_speed >= 0, "min_speed must be 0 or more")
        _require(self.speed_window > 0, "speed_window must be greater than 0")
        # Accept any iterable of pairs (a list from a caller, a dict's items).
        pairs = tuple((name, value) for name, value in self.headers)
        object.__setattr__(self, "headers", pairs)
        for name, value in self.headers:
            _require(
                _HEADER_NAME.fullmatch(name) is not None,
                f"header name {name!r} is not a valid HTTP token",
            )
            _require(
                _HEADER_VALUE_FORBIDDEN.search(value) is None,
                f"header {name!r} has a line break or NUL in its value",
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageSpec:
    """What the transform stage makes of each downloaded image.

    The box is ``sizes`` (several outputs), else ``size``, else ``max_size`` square.
    With several boxes the largest (by area) makes the main output
    ``{stem}.{ext}``; each other box ``B`` makes ``{label}/{stem}.{ext}``, where the
    label is ``"256"`` for a square box and ``"640x480"`` otherwise.
    """

    resize: ResizeMode = ResizeMode.FIT
    max_size: int = 1024
    """Side of the square box when neither ``size`` nor ``sizes`` is given."""
    size: tuple[int, int] | None = None
    """The box as (width, height) in pixels."""
    sizes: tuple[tuple[int, int], ...] = ()
    """Several boxes: one output each, from one decode."""
    upscale: bool = False
    """Enlarge images smaller than the box (otherwise they are never enlarged)."""
    format: ImageFormat = ImageFormat.JPEG
    quality: int = 85
    """JPEG, WebP and AVIF quality (PNG is lossless)."""
    progressive: bool = False
    """Write progressive JPEGs."""
    optimize: bool = False
    """Spend more time for smaller files (JPEG optimize, PNG level 9, WebP method 6)."""
    keep_metadata: bool = False
    """Keep EXIF (minus the orientation, which is applied) and the ICC profile."""
    grayscale: bool = False
    transform: str | None = None
    """``module:function`` applied to each output image after the built-in steps."""
    max_pixels: int = 90_000_000
    """Images with more pixels than this are refused as decompression bombs."""

    def __post_init__(self) -> None:
        _require(self.max_size > 0, "max_size must be greater than 0")
        _require(1 <= self.quality <= 100, "quality must be between 1 and 100")
        _require(self.max_pixels > 0, "max_pixels must be greater than 0")
        if not isinstance(self.sizes, tuple):
            object.__setattr__(self, "sizes", tuple(self.sizes))
        boxes = [*self.sizes, *([self.size] if self.size else [])]
        for width, height in boxes:
            _require(width > 0 and height > 0, "sizes must be greater than 0")
        _require(
            len(set(self.sizes)) == len(self.sizes), "sizes must not repeat a size"
        )
        _require(
            self.resize is not ResizeMode.NONE or not boxes,
            "resize 'none' keeps the pixel size: give no size or sizes with it",
        )
        if self.format not in (ImageFormat.KEEP, ImageFormat.JPEG):
            _require(
                _can_write(self.format),
                f"this Pillow cannot write {self.format.name} images "
                f"(format {self.format.value!r} is not supported here)",
            )
        if self.transform is not None:
            import_callable(self.transform)

    @property
    def boxes(self) -> tuple[tuple[int, int], ...]:
        """The boxes to make, the main output's first; empty for resize 'none'."""
        if self.resize is ResizeMode.NONE:
            return ()
        if self.sizes:
            main = max(self.sizes, key=lambda box: box[0] * box[1])
            return (main, *(box for box in self.sizes if box != main))
        return (self.size or (self.max_size, self.max_size),)


# Worker processes one download process keeps busy: 8 workers transform ~130 images/s
# of 1-12 MP photos, within what one process's GIL can download.
DOWNLOAD_PROC_PER_WORKERS = 8


def _default_procs() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything one run needs; ``HttpSettings`` and ``ImageSpec`` hold the groups."""

    out: Path = Path("output")
    mode: Mode = Mode.PIPELINE
    threads: int = 8
    procs: int = field(default_factory=_default_procs)
    download_procs: int | None = None
    """Processes the pipeline's download threads run in (``--download-procs``); None
    picks one per 8 worker processes (see ``download_processes``)."""
    force: bool = False
    """Redo URLs that the manifest in ``out`` already records as ok."""
    name_by: NameBy = NameBy.URL
    """Name outputs after the URL or after the body's SHA-256 (``--name-by``)."""
    keep_originals: bool = False
    """Keep each download under ``out/originals/`` (``--keep-originals``); a rerun
    with other image settings then works from them instead of downloading again."""
    item_timeout: float = 120.0
    """Seconds one image may take in a worker before that worker is replaced."""
    max_tasks_per_worker: int = 1000
    """A worker process is recycled after this many images, to bound its memory."""
    stall_report: float = 60.0
    """Seconds without any item finishing after which the URLs in progress are logged
    (logger ``downloader``, warning); the run goes on."""
    http: HttpSettings = field(default_factory=HttpSettings)
    image: ImageSpec = field(default_factory=ImageSpec)

    def __post_init__(self) -> None:
        _require(self.threads > 0, "threads must be greater than 0")
        _require(self.procs > 0, "procs must be greater than 0")
        _require(
            self.download_procs is None or self.download_procs > 0,
            "download_procs must be greater than 0",
        )
        _require(self.item_timeout > 0, "item_timeout must be greater than 0")
        _require(self.max_tasks_per_worker > 0, "max_tasks_per_worker must be > 0")
        _require(self.stall_report > 0, "stall_report must be greater than 0")
        if not isinstance(self.out, Path):
            object.__setattr__(self, "out", Path(self.out))

    @property
    def download_processes(self) -> int:
        """Return how many download processes a pipeline run starts.

        ``download_procs`` when given; else 1 below 8 worker processes and one per 8
        above (one process's GIL caps its downloads near ~200 images/s), never more
        than ``threads``.
        """
        if self.download_procs is not None:
            return self.download_procs
        return max(1, min(self.procs // DOWNLOAD_PROC_PER_WORKERS, self.threads))
