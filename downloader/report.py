"""Summaries of a run, and the side-by-side comparison of modes.

``Tally`` counts outcomes as they come and freezes them into a ``Summary``;
``print_summary`` prints it. ``Comparison`` holds one ``ModeResult`` per mode run on
the same list: ``print_comparison`` prints the table, ``comparison_json`` gives the
raw figures, ``comparison_png`` draws ``comparison.png`` (a bar chart of wall time,
then one timeline per mode with a lane per thread, task or process, all on one time
axis).
"""

from __future__ import annotations

import io
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from downloader.records import Outcome, Stage, Status, counted
from downloader.settings import Mode

if TYPE_CHECKING:  # the chart's types; Pillow's drawing is imported when it draws
    from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "Comparison",
    "MemoryPeak",
    "ModeResult",
    "RunReport",
    "Span",
    "Summary",
    "Tally",
    "comparison_json",
    "comparison_png",
    "print_comparison",
    "print_summary",
    "summary_json",
]

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
    """CPU seconds of this process, plus those its worker processes reported."""
    interrupted: bool
    failure_reasons: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    """Tar shards holding this run's samples, ok or skipped (``webdataset``)."""

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
    """This process's own CPU seconds, never its children's counters.

    Workers report their own CPU time (``worker_cpu_s``); the forkserver reaps them,
    and once a run has reaped the forkserver their time is in this process's
    children counters too: counting both would count every worker twice.
    """
    times = os.times()
    return times.user + times.system


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
        self.shards: set[str] = set()

    def add(self, outcome: Outcome) -> None:
        """Count one record."""
        self.counts[outcome.status] += 1
        if outcome.shard is not None:
            self.shards.add(outcome.shard)
        if outcome.status is Status.SKIPPED:
            return
        if outcome.attempts:  # fetched over the network: not a local or kept file
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
            shards=len(self.shards),
        )


def print_summary(
    summary: Summary,
    *,
    out_dir: str,
    file: IO[str],
    records: str | None = None,
    index: str | None = None,
) -> None:
    """Print the short end-of-run report a person reads.

    ``records``: the file the records went to when it is not the manifest (a
    part's, which has no failed list of its own). ``index``: the manifest's Parquet
    index, when the run wrote one.
    """
    counts = ", ".join(f"{n} {status.value}" for status, n in summary.counts.items())
    heading = "interrupted" if summary.interrupted else "done"
    print(f"{heading}: {counted(summary.total, 'URL')} ({counts})", file=file)
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
    if records is not None:
        print(f"  results in {out_dir} ({records}; then --merge-parts)", file=file)
        return
    listed = "manifest.jsonl" if index is None else f"manifest.jsonl, {index}"
    if summary.shards:
        listed = f"{counted(summary.shards, 'shard')} *.tar, {listed}"
    print(f"  results in {out_dir} ({listed}", end="", file=file)
    failed = summary.counts.get(Status.FAILED, 0)
    print(", failed.txt)" if failed else ")", file=file)


def summary_json(
    summary: Summary, *, out_dir: str, index: str | None = None
) -> dict[str, Any]:
    """The totals of a run as plain JSON types (what ``--json`` prints).

    ``index``: the Parquet index's path, when the run wrote one; ``shards`` (with
    ``--output-format webdataset``) counts the shards holding the run's samples.
    """
    figures: dict[str, Any] = {
        "counts": {status.value: n for status, n in summary.counts.items()},
        "total": summary.total,
        "bytes": summary.bytes_downloaded,
        "images": summary.images,
        "wall_s": round(summary.wall_s, 4),
        "cpu_s": round(summary.cpu_s, 4),
        "images_per_s": round(summary.images_per_s, 3),
        "megabytes_per_s": round(summary.megabytes_per_s, 3),
        "interrupted": summary.interrupted,
        "failure_reasons": dict(summary.failure_reasons),
        "out": out_dir,
    }
    if summary.shards:
        figures["shards"] = summary.shards
    if index is not None:
        figures["index"] = index
    return figures


# --------------------------------------------------------------------- comparison


@dataclass(frozen=True, slots=True)
class Span:
    """One lane busy with one item in one stage, in seconds from the run's start."""

    lane: str
    stage: Stage
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class MemoryPeak:
    """Peak resident memory of one run, in MB (None where it could not be read)."""

    main_mb: float
    """The mode's own process (a fresh one per mode): its high-water mark."""
    worker_mb: float | None
    """The largest high-water mark of any one worker process."""
    total_mb: float | None
    """The mode's process and all its descendants, their RSS summed at each sample
    (every 0.1 s); never below ``main_mb`` or ``worker_mb`` (each is a lower bound of
    the sum's peak that a sample may miss)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModeResult:
    """One mode's run in a comparison."""

    mode: Mode
    threads: int
    """Threads (or asyncio tasks) downloading in the main process; 0 for none."""
    procs: int
    """Worker processes; 0 when everything runs in the main process."""
    summary: Summary
    memory: MemoryPeak
    outputs: dict[str, str]
    """URL → SHA-256 of its output image, for every ok record."""
    spans: tuple[Span, ...] = ()
    error: str | None = None
    """Why the run stopped, if it raised instead of finishing."""
    pid: int | None = None
    """The process the mode ran in: a new one for each mode, never the caller."""

    @property
    def ok(self) -> bool:
        """True if the run finished and every URL ended ok or skipped."""
        failed = self.summary.counts.get(Status.FAILED, 0)
        return self.error is None and failed == 0 and not self.summary.interrupted

    @property
    def cpu_percent(self) -> float:
        """CPU time as a share of all cores over the wall time."""
        cores = os.cpu_count() or 1
        wall = self.summary.wall_s
        return 100 * self.summary.cpu_s / (wall * cores) if wall > 0 else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Comparison:
    """Several modes run on the same list; the first is the outputs' reference."""

    results: tuple[ModeResult, ...]
    gil_enabled: bool
    cores: int

    def speedup(self, result: ModeResult) -> float | None:
        """Wall time of ``sequential`` divided by this mode's, if both ran."""
        baseline = next(
            (r for r in self.results if r.mode is Mode.SEQUENTIAL and r.ok), None
        )
        if baseline is None or result.summary.wall_s <= 0:
            return None
        return baseline.summary.wall_s / result.summary.wall_s

    def outputs_match(self, result: ModeResult) -> bool:
        """True if this mode wrote the same images (by hash) as the reference."""
        reference = self.results[0].outputs
        return bool(reference) and result.outputs == reference

    @property
    def ok(self) -> bool:
        """Every mode finished with every URL ok, and all outputs match."""
        return all(r.ok and self.outputs_match(r) for r in self.results)


def _megabytes(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


_COLUMNS = (
    "mode",
    "threads",
    "procs",
    "wall s",
    "images/s",
    "MB/s",
    "CPU %",
    "peak MB main/worker/total",
    "speed-up",
    "outputs",
)


def _row(comparison: Comparison, result: ModeResult) -> tuple[str, ...]:
    summary, memory = result.summary, result.memory
    speedup = comparison.speedup(result)
    if result.error is not None:
        outputs = "error"
    else:
        outputs = "match" if comparison.outputs_match(result) else "DIFFER"
    return (
        result.mode.value,
        str(result.threads or "-"),
        str(result.procs or "-"),
        f"{summary.wall_s:.2f}",
        f"{summary.images_per_s:.1f}",
        f"{summary.megabytes_per_s:.1f}",
        f"{result.cpu_percent:.0f}",
        f"{memory.main_mb:.0f} / {_megabytes(memory.worker_mb)} / "
        f"{_megabytes(memory.total_mb)}",
        "-" if speedup is None else f"{speedup:.2f}x",
        outputs,
    )


def print_comparison(comparison: Comparison, *, file: IO[str]) -> None:
    """Print the comparison as an aligned markdown table, with a verdict line."""
    rows = [_COLUMNS, *(_row(comparison, r) for r in comparison.results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]

    def line(cells: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
            + " |"
        )

    gil = "enabled" if comparison.gil_enabled else "disabled (free-threaded build)"
    print(f"GIL {gil}; {comparison.cores} cores", file=file)
    print(line(rows[0]), file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for row in rows[1:]:
        print(line(row), file=file)
    for result in comparison.results:
        if result.error is not None:
            print(f"{result.mode.value}: {result.error}", file=file)
    verdict = "all modes ok, outputs match" if comparison.ok else "NOT all ok/matching"
    print(verdict, file=file)


def comparison_json(comparison: Comparison) -> dict[str, Any]:
    """The raw figures of a comparison, as written to ``comparison.json``."""
    return {
        "gil_enabled": comparison.gil_enabled,
        "cores": comparison.cores,
        "ok": comparison.ok,
        "modes": [_result_json(comparison, r) for r in comparison.results],
    }


def _result_json(comparison: Comparison, result: ModeResult) -> dict[str, Any]:
    summary = result.summary
    return {
        "mode": result.mode.value,
        "threads": result.threads,
        "procs": result.procs,
        "ok": result.ok,
        "error": result.error,
        "counts": {s.value: n for s, n in summary.counts.items()},
        "wall_s": round(summary.wall_s, 4),
        "cpu_s": round(summary.cpu_s, 4),
        "cpu_percent": round(result.cpu_percent, 1),
        "images": summary.images,
        "images_per_s": round(summary.images_per_s, 3),
        "bytes": summary.bytes_downloaded,
        "megabytes_per_s": round(summary.megabytes_per_s, 3),
        "peak_main_mb": round(result.memory.main_mb, 1),
        "peak_worker_mb": _rounded(result.memory.worker_mb),
        "peak_total_mb": _rounded(result.memory.total_mb),
        "speedup_vs_sequential": _rounded(comparison.speedup(result), 3),
        "outputs_match": comparison.outputs_match(result),
        "timeline": [
            [s.lane, s.stage.value, round(s.start, 4), round(s.end, 4)]
            for s in result.spans
        ],
    }


def _rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# ------------------------------------------------------------------------- chart

_WIDTH = 1400
_MARGIN = 16
_LABEL_W = 150
_BAR_H = 24
_LANE_H = 9
_LANE_GAP = 2
_WHITE = (255, 255, 255)
_INK = (30, 30, 30)
_GRID = (200, 200, 200)
_IDLE = (234, 234, 234)
_STAGE_COLOURS = {Stage.DOWNLOAD: (52, 120, 198), Stage.TRANSFORM: (235, 137, 33)}
_BAR_COLOUR = (90, 90, 90)
_LANE_ORDER = {"thread": 0, "dl": 0, "task": 1, "proc": 2}


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    from PIL import ImageFont  # only --compare draws (start-up time)

    return ImageFont.load_default(size=size)


def _lane_key(lane: str) -> tuple[int, tuple[int, ...], str]:
    """Order lanes by kind, then numerically: ``dl-0/thread-2`` before ``thread-10``."""
    prefix = lane.partition("-")[0]
    numbers = tuple(int(n) for n in re.findall(r"\d+", lane))
    return (_LANE_ORDER.get(prefix, 3), numbers, lane)


def _nice_step(span: float) -> float:
    """A round tick interval (1, 2 or 5 times a power of ten): about 10 ticks."""
    raw = max(span / 10, 1e-3)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(f * magnitude for f in (1, 2, 5, 10) if raw <= f * magnitude)


class _Chart:
    """Lay out and draw the comparison picture, top to bottom."""

    def __init__(self, comparison: Comparison) -> None:
        self.comparison = comparison
        self.results = comparison.results
        # One time axis for the bars and every timeline: the longest run sets it.
        self.scale_s = (
            max(
                (
                    max([r.summary.wall_s, *(s.end for s in r.spans)])
                    for r in self.results
                ),
                default=1.0,
            )
            or 1.0
        )
        self.plot_x = _MARGIN + _LABEL_W
        self.plot_w = _WIDTH - self.plot_x - _MARGIN - 90
        self.font = _font(14)
        self.small = _font(11)
        self.title = _font(18)

    def height(self) -> int:
        bars = len(self.results) * (_BAR_H + 6)
        lanes = sum(
            len({s.lane for s in r.spans}) * (_LANE_H + _LANE_GAP) + 44
            for r in self.results
        )
        return 70 + bars + 40 + lanes + 50

    def x(self, seconds: float) -> int:
        """The x of ``seconds`` on the one time axis (the longest run's)."""
        return self.plot_x + round(self.plot_w * seconds / self.scale_s)

    def draw(self) -> Image.Image:
        from PIL import Image, ImageDraw  # only --compare draws (start-up time)

        image = Image.new("RGB", (_WIDTH, self.height()), _WHITE)
        draw = ImageDraw.Draw(image)
        y = self._header(draw)
        y = self._bars(draw, y)
        for result in self.results:
            y = self._timeline(draw, result, y)
        self._legend(draw, y + 6)
        return image

    def _header(self, draw: ImageDraw.ImageDraw) -> int:
        first = self.results[0].summary if self.results else None
        urls = first.total if first else 0
        gil = "enabled" if self.comparison.gil_enabled else "disabled"
        draw.text(
            (_MARGIN, 12),
            f"Modes compared on the same {urls} URLs: wall time, and what each "
            "thread/process did over time",
            fill=_INK,
            font=self.title,
        )
        draw.text(
            (_MARGIN, 38),
            f"{self.comparison.cores} cores, GIL {gil}. Shorter bar = faster; "
            "speed-up is relative to sequential. All timelines share one time axis.",
            fill=_INK,
            font=self.font,
        )
        return 66

    def _bars(self, draw: ImageDraw.ImageDraw, y: int) -> int:
        for result in self.results:
            wall = result.summary.wall_s
            draw.text((_MARGIN, y + 4), result.mode.value, fill=_INK, font=self.font)
            draw.rectangle(
                (self.plot_x, y, max(self.plot_x + 1, self.x(wall)), y + _BAR_H),
                fill=_BAR_COLOUR,
            )
            speedup = self.comparison.speedup(result)
            label = f"{wall:.2f} s"
            if speedup is not None:
                label += f"  ({speedup:.1f}x)"
            draw.text((self.x(wall) + 6, y + 4), label, fill=_INK, font=self.font)
            y += _BAR_H + 6
        return y + 10

    def _axis(self, draw: ImageDraw.ImageDraw, top: int, bottom: int) -> None:
        step = _nice_step(self.scale_s)
        tick = 0.0
        while tick <= self.scale_s + 1e-9:
            x = self.x(tick)
            draw.line((x, top, x, bottom), fill=_GRID)
            draw.text((x - 8, bottom + 2), f"{tick:g}s", fill=_INK, font=self.small)
            tick += step

    def _timeline(self, draw: ImageDraw.ImageDraw, result: ModeResult, y: int) -> int:
        lanes = sorted({s.lane for s in result.spans}, key=_lane_key)
        summary = result.summary
        draw.text(
            (_MARGIN, y + 6),
            f"{result.mode.value}: {_who(result)}, "
            f"{summary.wall_s:.2f} s, "
            f"{summary.images_per_s:.1f} images/s, "
            f"CPU {result.cpu_percent:.0f}% of all cores",
            fill=_INK,
            font=self.font,
        )
        top = y + 26
        row = {lane: top + i * (_LANE_H + _LANE_GAP) for i, lane in enumerate(lanes)}
        bottom = top + len(lanes) * (_LANE_H + _LANE_GAP)
        for lane, lane_y in row.items():
            draw.text((_MARGIN + 20, lane_y - 2), lane, fill=_INK, font=self.small)
            draw.rectangle(
                (self.plot_x, lane_y, self.x(summary.wall_s), lane_y + _LANE_H),
                fill=_IDLE,
            )
        for span in result.spans:
            lane_y = row[span.lane]
            draw.rectangle(
                (
                    self.x(span.start),
                    lane_y,
                    # One pixel short, so that back-to-back items stay apart.
                    max(self.x(span.start) + 1, self.x(span.end) - 1),
                    lane_y + _LANE_H,
                ),
                fill=_STAGE_COLOURS[span.stage],
            )
        self._axis(draw, top - 2, bottom)
        return bottom + 18

    def _legend(self, draw: ImageDraw.ImageDraw, y: int) -> None:
        x = self.plot_x
        entries = [
            ("downloading", _STAGE_COLOURS[Stage.DOWNLOAD]),
            ("processing", _STAGE_COLOURS[Stage.TRANSFORM]),
            ("idle", _IDLE),
        ]
        for label, colour in entries:
            draw.rectangle((x, y, x + 18, y + 12), fill=colour)
            draw.text((x + 24, y - 2), label, fill=_INK, font=self.font)
            x += 150


def _who(result: ModeResult) -> str:
    kind = "tasks" if result.mode is Mode.ASYNC else "threads"
    parts = []
    if result.threads:
        plural = kind if result.threads > 1 else kind[:-1]
        parts.append(f"{result.threads} download {plural}")
    if result.procs:
        plural = "es" if result.procs > 1 else ""
        parts.append(f"{result.procs} worker process{plural}")
    return " + ".join(parts)


def comparison_png(comparison: Comparison) -> bytes:
    """Draw the bar chart and the per-mode timelines; return the PNG's bytes.

    Drawn in memory: no file is made on the way, so none can be left behind.
    """
    buffer = io.BytesIO()
    _Chart(comparison).draw().save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
