"""Download a list of image URLs concurrently and process the images in parallel.

The public API::

    from downloader import run, Settings
    report = run(["https://…", …], Settings(threads=8, procs=4, out="imgs"))
    for outcome in report.results: ...

``iter_results`` yields each record as it is written, for consuming a run as it goes.
"""

from __future__ import annotations

from downloader.api import Source, iter_results, run
from downloader.errors import (
    DownloaderError,
    FetchError,
    InputError,
    OutputError,
    TransformError,
    WorkerCrashed,
)
from downloader.progress import EventKind, ProgressEvent
from downloader.records import Outcome, Stage, Status
from downloader.report import RunReport, Summary
from downloader.runtime import Cancellation
from downloader.settings import (
    VERSION,
    HttpSettings,
    ImageFormat,
    ImageSpec,
    Mode,
    Settings,
)

__version__ = VERSION

__all__ = [
    "Cancellation",
    "DownloaderError",
    "EventKind",
    "FetchError",
    "HttpSettings",
    "ImageFormat",
    "ImageSpec",
    "InputError",
    "Mode",
    "Outcome",
    "OutputError",
    "ProgressEvent",
    "RunReport",
    "Settings",
    "Source",
    "Stage",
    "Status",
    "Summary",
    "TransformError",
    "WorkerCrashed",
    "__version__",
    "iter_results",
    "run",
]
