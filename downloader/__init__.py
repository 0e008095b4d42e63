"""Download a list of image URLs concurrently and process the images in parallel.

The public API::

    from downloader import run, Settings
    report = run(["https://…", …], Settings(threads=8, procs=4, out="imgs"))
    for outcome in report.results: ...

``iter_results`` yields each record as it is written, for consuming a run as it goes.

The names are imported when first used (PEP 562 ``__getattr__``), not with the
package: a worker process imports ``downloader.worker`` (which imports this package
first) and the command line its settings before it takes the output folder, and
neither needs httpx nor the run's machinery at that point. Type checkers and IDEs see
them through the ``TYPE_CHECKING`` imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from downloader.api import Source, iter_results, run
    from downloader.dryrun import DryRun, dry_run
    from downloader.errors import (
        DownloaderError,
        FetchError,
        InputError,
        OutputError,
        TransformError,
        WorkerCrashed,
    )
    from downloader.progress import EventKind, EventStream, ProgressEvent
    from downloader.records import Outcome, Stage, Status
    from downloader.report import RunReport, Summary
    from downloader.runtime import Cancellation
    from downloader.settings import VERSION as __version__
    from downloader.settings import (
        HttpSettings,
        ImageFormat,
        ImageSpec,
        Mode,
        OutputFormat,
        Part,
        Resample,
        ResizeMode,
        Settings,
    )
    from downloader.sources import InputFormat, LocalFiles, UrlList

__all__ = [
    "Cancellation",
    "DownloaderError",
    "DryRun",
    "EventKind",
    "EventStream",
    "FetchError",
    "HttpSettings",
    "ImageFormat",
    "ImageSpec",
    "InputError",
    "InputFormat",
    "LocalFiles",
    "Mode",
    "Outcome",
    "OutputError",
    "OutputFormat",
    "Part",
    "ProgressEvent",
    "Resample",
    "ResizeMode",
    "RunReport",
    "Settings",
    "Source",
    "Stage",
    "Status",
    "Summary",
    "TransformError",
    "UrlList",
    "WorkerCrashed",
    "__version__",
    "dry_run",
    "iter_results",
    "run",
]

_HOMES = {
    "downloader.api": ("Source", "iter_results", "run"),
    "downloader.dryrun": ("DryRun", "dry_run"),
    "downloader.errors": (
        "DownloaderError",
        "FetchError",
        "InputError",
        "OutputError",
        "TransformError",
        "WorkerCrashed",
    ),
    "downloader.progress": ("EventKind", "EventStream", "ProgressEvent"),
    "downloader.records": ("Outcome", "Stage", "Status"),
    "downloader.report": ("RunReport", "Summary"),
    "downloader.runtime": ("Cancellation",),
    "downloader.settings": (
        "HttpSettings",
        "ImageFormat",
        "ImageSpec",
        "Mode",
        "OutputFormat",
        "Part",
        "Resample",
        "ResizeMode",
        "Settings",
    ),
    "downloader.sources": ("InputFormat", "LocalFiles", "UrlList"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
"""The module each public name comes from."""


if not TYPE_CHECKING:  # type checkers see the imports above, and flag other names

    def __getattr__(name: str) -> Any:
        """Import a public name on first use, and keep it (PEP 562)."""
        if name == "__version__":
            value = importlib.import_module("downloader.settings").VERSION
        elif name in _HOME:
            value = getattr(importlib.import_module(_HOME[name]), name)
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    """The module's names, the public ones not imported yet included."""
    return sorted({*globals(), *__all__})
