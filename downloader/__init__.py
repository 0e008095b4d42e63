"""Download a list of image URLs concurrently and process the images in parallel.

The public API::

    from downloader import run, Settings
    report = run(["https://…", …], Settings(threads=8, procs=4, out="imgs"))
    for outcome in report.results: ...

``iter_results`` yields each record as it is written, for consuming a run as it goes.
"""

from __future__ import annotations

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
from downloader.settings import (
    VERSION,
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

__version__ = VERSION

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
