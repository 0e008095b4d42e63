"""Summaries of a run: counting outcomes as they come, and printing the result."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from downloader.records import Outcome, Status

__all__ = ["RunReport", "Summary", "Tally", "print_summary"]

# How many distinct failure reasons the summary lists before "and N more".
TOP_REASONS = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """Totals of one run, computed from its records."""

    counts: dict[Status, int]
    bytes_downloaded: int
    """Bytes fetched in this run (skipped URLs excluded)."""
    images: int
    """Images written in this run."""
    wall_s: float
    cpu_s: float
    """CPU seconds of this process and its finished children."""
    interrupted: bool
    failure_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Records written, one per unique input."""
        return sum(self.counts.values())

    @property
    def images_per_s(self) -> float:
        """Images written per second of wall time."""
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def megabytes_per_s(self) -> float:
        """Megabytes downloaded per second of wall time."""
        return self.bytes_downloaded / 1e6 / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class RunReport:
    """What ``run()`` returns: every record, in completion order, and the totals."""

    results: tuple[Outcome, ...]
    summary: Summary


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class Tally:
    """Count outcomes as they arrive; ``summary()`` freezes the totals."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started = clock()
        self._cpu_started = _cpu_seconds()
        self.counts: Counter[Status] = Counter()
        self.reasons: Counter[str] = Counter()
        self.bytes = 0
        self.images = 0

    def add(self, outcome: Outcome) -> None:
        """Count one record."""
        self.counts[outcome.status] += 1
        if outcome.status is Status.SKIPPED:
            return
        self.bytes += outcome.bytes or 0
        if outcome.status is Status.OK:
            self.images += 1
        elif outcome.error:
            self.reasons[outcome.error] += 1

    def summary(
        self, *, interrupted: bool = False, worker_cpu_s: float = 0.0
    ) -> Summary:
        """Return the totals so far; add the CPU time that worker processes reported."""
        return Summary(
            counts={status: self.counts[status] for status in Status},
            bytes_downloaded=self.bytes,
            images=self.images,
            wall_s=self._clock() - self._started,
            cpu_s=_cpu_seconds() - self._cpu_started + worker_cpu_s,
            interrupted=interrupted,
            failure_reasons=dict(self.reasons.most_common()),
        )


def print_summary(summary: Summary, *, out_dir: str, file: IO[str]) -> None:
    """Print the short end-of-run report a person reads."""
    counts = ", ".join(f"{n} {status.value}" for status, n in summary.counts.items())
    heading = "interrupted" if summary.interrupted else "done"
    print(f"{heading}: {summary.total} URLs ({counts})", file=file)
    print(
        f"  {summary.bytes_downloaded / 1e6:.1f} MB downloaded, "
        f"{summary.images} images in {summary.wall_s:.2f} s "
        f"({summary.images_per_s:.1f} images/s, {summary.megabytes_per_s:.1f} MB/s), "
        f"CPU {summary.cpu_s:.1f} s",
        file=file,
    )
    reasons = list(summary.failure_reasons.items())
    for reason, count in reasons[:TOP_REASONS]:
        print(f"  failed x{count}: {reason}", file=file)
    if len(reasons) > TOP_REASONS:
        print(f"  ... and {len(reasons) - TOP_REASONS} other reasons", file=file)
    print(f"  results in {out_dir} (manifest.jsonl", end="", file=file)
    failed = summary.counts.get(Status.FAILED, 0)
    print(", failed.txt)" if failed else ")", file=file)
