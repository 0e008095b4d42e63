"""The schedulers: one function per ``Mode``, all with the same signature.

Each takes the planned items (jobs, and ready-made records to pass through), the
settings and the run context, and yields one ``Outcome`` per item. They differ only in
how they schedule the same two steps (``steps.fetch_step`` and the transform).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from downloader.pipeline import run_pipeline
from downloader.records import Job, Outcome
from downloader.runtime import RunContext
from downloader.settings import Mode, Settings

__all__ = ["RUNNERS", "Runner"]

Runner = Callable[[Iterable[Job | Outcome], Settings, RunContext], Iterator[Outcome]]

RUNNERS: dict[Mode, Runner] = {
    Mode.PIPELINE: run_pipeline,
}
