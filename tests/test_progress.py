"""Progress events drawn as bars, and kept for timelines."""

from __future__ import annotations

import io

from downloader.progress import Bars, EventKind, EventLog, ProgressEvent, fan_out
from downloader.records import Outcome, Stage, Status


def _event(stage: Stage, kind: EventKind, nbytes: int = 0) -> ProgressEvent:
    return ProgressEvent(stage, kind, 0, "thread-0", 1.0, nbytes)


def test_bars_count_downloads_bytes_and_outcomes() -> None:
    """Bars show files and megabytes downloaded and finished URLs by status."""
    screen = io.StringIO()
    ticks = iter([0.0, 2.0, 2.0, 2.0])

    with Bars(
        total=2, file=screen, disable=False, mininterval=0, clock=lambda: next(ticks)
    ) as bars:
        bars(_event(Stage.DOWNLOAD, EventKind.BYTES, 3_000_000))
        bars(_event(Stage.DOWNLOAD, EventKind.FINISHED))
        bars.outcome(Outcome(url="http://h/a", status=Status.OK))
        bars.outcome(Outcome(url="bad", status=Status.FAILED, error="not a URL"))

    text = screen.getvalue()
    assert "download: 100%" in text
    assert "2/2" in text
    assert "3.0 MB, 1.5 MB/s" in text
    assert "1 ok, 1 failed" in text


def test_event_log_keeps_steps_not_bytes() -> None:
    """The timeline log records starts and finishes only; fan_out feeds every sink."""
    first, second = EventLog(), EventLog()
    emit = fan_out(first, second)

    emit(_event(Stage.TRANSFORM, EventKind.STARTED))
    emit(_event(Stage.DOWNLOAD, EventKind.BYTES, 10))
    emit(_event(Stage.TRANSFORM, EventKind.FINISHED))

    assert [e.kind for e in first.events] == [EventKind.STARTED, EventKind.FINISHED]
    assert first.events == second.events


def test_bars_end_at_what_was_done_when_the_total_was_an_upper_bound() -> None:
    """A total counted with duplicates is lowered to the final count on close."""
    screen = io.StringIO()

    with Bars(total=5, file=screen, disable=False, mininterval=0) as bars:
        bars(_event(Stage.DOWNLOAD, EventKind.FINISHED))
        bars.outcome(Outcome(url="http://h/a", status=Status.OK))

    text = screen.getvalue()
    assert "1/1" in text
    assert "100%" in text
