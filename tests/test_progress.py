"""Progress events drawn as bars, and kept for timelines."""

from __future__ import annotations

import io

from downloader.progress import Bars, EventKind, EventLog, ProgressEvent, fan_out
from downloader.records import Outcome, Stage, Status
from downloader.steps import BYTES_EVENT_INTERVAL_S, ByteCounter


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


def test_received_bytes_are_reported_summed_and_all_by_the_flush() -> None:
    """A download's reads become one bytes event per interval, not one per read, and
    the flush before its finished event reports the rest: the sum is every byte."""
    log: list[ProgressEvent] = []
    now = [0.0]
    counter = ByteCounter(log.append, 7, "thread-2", clock=lambda: now[0])

    for _ in range(10):  # ten reads within one interval: nothing reported yet
        now[0] += BYTES_EVENT_INTERVAL_S / 20
        counter(1000)
    assert log == []
    now[0] += BYTES_EVENT_INTERVAL_S
    counter(500)  # the interval is over: the sum so far, in one event
    counter(250)  # just after: waits for the next interval or the flush
    counter.flush()
    counter.flush()  # nothing left: no empty event

    assert [event.nbytes for event in log] == [10_500, 250]
    assert {(e.kind, e.stage, e.index, e.lane) for e in log} == {
        (EventKind.BYTES, Stage.DOWNLOAD, 7, "thread-2")
    }
