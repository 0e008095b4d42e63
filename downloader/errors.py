"""The exception hierarchy, with the exit code each error means.

::

    DownloaderError                  exit 1   base class
    ├── InputError                   exit 2   bad flag value, unreadable list
    ├── OutputError                  exit 3   output folder unusable, disk full, locked
    ├── FetchError                   (per URL, becomes a failed record)
    ├── TransformError               (per image, becomes a failed record)
    └── WorkerCrashed                exit 1   a worker process died unexpectedly

A per-URL failure is data (a ``failed`` manifest record), not an exception that stops
the run: ``FetchError`` and ``TransformError`` are raised inside a stage and turned into
records at the stage boundary. Only the others reach the caller of ``run()``.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "DownloaderError",
    "FetchError",
    "InputError",
    "OutputError",
    "TransformError",
    "WorkerCrashed",
]


class DownloaderError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code: ClassVar[int] = 1


class InputError(DownloaderError):
    """The user's input or settings cannot be used (exit code 2)."""

    exit_code: ClassVar[int] = 2


class OutputError(DownloaderError):
    """A local fault stops the run: output folder unusable, disk full (exit code 3)."""

    exit_code: ClassVar[int] = 3


class FetchError(DownloaderError):
    """One URL could not be downloaded; ``reason`` is what a person reads."""

    def __init__(
        self,
        reason: str,
        *,
        http_status: int | None = None,
        attempts: int = 1,
        final_url: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status
        self.attempts = attempts
        self.final_url = final_url


class TransformError(DownloaderError):
    """One downloaded file could not be turned into output images."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WorkerCrashed(DownloaderError):
    """A worker process or thread ended unexpectedly and the run cannot go on."""
