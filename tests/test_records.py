"""Records: reasons stay one printable line, whatever produced them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from downloader.records import (
    REASON_MAX_CHARS,
    Job,
    Outcome,
    Stage,
    aside,
    counted,
    one_line,
)

JOB = Job(index=0, line=1, url="http://127.0.0.1/a.jpg", key="k", stem="a")
TRACEBACK = """download thread thread-1 crashed:
Traceback (most recent call last):
  File "/x/pipeline.py", line 495, in _download_loop
    fetched = fetch_deferring(
httpx.InvalidURL: For absolute URLs, path must be empty or begin with '/'"""


def test_a_traceback_becomes_its_first_and_last_line() -> None:
    """A crash's reason names where (first line) and what (last line), on one line."""
    record = Outcome.failure(JOB, None, f"not started ({TRACEBACK})")

    assert record.error == (
        "not started (download thread thread-1 crashed: … httpx.InvalidURL: "
        "For absolute URLs, path must be empty or begin with '/')"
    )


def test_control_characters_are_escaped() -> None:
    """A terminal escape from a server's reply cannot reach a terminal raw."""
    record = Outcome.failure(JOB, Stage.DOWNLOAD, "bad HTTP response: \x1b[2J\x07")

    assert record.error == "bad HTTP response: \\x1b[2J\\x07"


def test_long_reasons_are_cut() -> None:
    record = Outcome.failure(JOB, Stage.DOWNLOAD, "x" * 10_000)

    assert record.error is not None
    assert len(record.error) == REASON_MAX_CHARS
    assert record.error.endswith("…")


def test_notes_are_one_line_too() -> None:
    record = Outcome.failure(JOB, None, "a").skipped("kept\nfrom before", line=1)

    assert record.note == "kept … from before"


@given(st.text())
def test_one_line_is_one_printable_line_and_stable(text: str) -> None:
    line = one_line(text)

    assert "\n" not in line
    assert "\r" not in line
    assert len(line) <= REASON_MAX_CHARS
    assert line.isprintable()
    assert one_line(line) == line


def test_an_aside_never_nests_parentheses() -> None:
    """``not started (why)``, but a ``why`` with parentheses of its own follows a
    colon instead: never ``(already ok in the manifest (use --force to redo))``."""
    assert aside("not started", "interrupted") == "not started (interrupted)"
    assert aside("skip x", "already ok (use --force to redo)") == (
        "skip x: already ok (use --force to redo)"
    )


@pytest.mark.parametrize(
    ("count", "said"),
    [(0, "0 URLs"), (1, "1 URL"), (2, "2 URLs"), (12_345, "12,345 URLs")],
)
def test_a_count_is_said_with_its_noun(count: int, said: str) -> None:
    """Summaries say ``done: 1 URL``, not ``1 URLs``, and group long counts."""
    assert counted(count, "URL") == said
