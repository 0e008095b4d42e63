"""Settings: frozen dataclasses made once (by the CLI or a caller) and passed down.

Every value is checked in ``__post_init__`` so that a bad value fails at once with a
plain message (``InputError``, exit code 2) before any thread or process starts.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path

from downloader.errors import InputError

__all__ = ["HttpSettings", "ImageFormat", "ImageSpec", "Mode", "Settings"]

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

    @property
    def extension(self) -> str:
        """File name extension (without the dot) for this format."""
        return "jpg" if self is ImageFormat.JPEG else self.value


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
    verify: bool = True

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


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageSpec:
    """What the transform stage makes of each downloaded image."""

    max_size: int = 1024
    """Fit within a box of this many pixels on each side; never upscale."""
    format: ImageFormat = ImageFormat.JPEG
    quality: int = 85
    max_pixels: int = 90_000_000
    """Images with more pixels than this are refused as decompression bombs."""

    def __post_init__(self) -> None:
        _require(self.max_size > 0, "max_size must be greater than 0")
        _require(1 <= self.quality <= 100, "quality must be between 1 and 100")
        _require(self.max_pixels > 0, "max_pixels must be greater than 0")


def _default_procs() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything one run needs; ``HttpSettings`` and ``ImageSpec`` hold the groups."""

    out: Path = Path("output")
    mode: Mode = Mode.PIPELINE
    threads: int = 8
    procs: int = field(default_factory=_default_procs)
    force: bool = False
    """Redo URLs that the manifest in ``out`` already records as ok."""
    item_timeout: float = 120.0
    """Seconds one image may take in a worker before that worker is replaced."""
    max_tasks_per_worker: int = 1000
    """A worker process is recycled after this many images, to bound its memory."""
    http: HttpSettings = field(default_factory=HttpSettings)
    image: ImageSpec = field(default_factory=ImageSpec)

    def __post_init__(self) -> None:
        _require(self.threads > 0, "threads must be greater than 0")
        _require(self.procs > 0, "procs must be greater than 0")
        _require(self.item_timeout > 0, "item_timeout must be greater than 0")
        _require(self.max_tasks_per_worker > 0, "max_tasks_per_worker must be > 0")
        if not isinstance(self.out, Path):
            object.__setattr__(self, "out", Path(self.out))
