"""Leaving ``iter_results`` early stops the run as Ctrl-C does, in every mode.

The caller may close the generator, drop it after ``break``, or leave its loop by an
exception: in each case every unique input still gets its one manifest line, every
image on disk has the ok record that names it, and no thread or process of the run
is left behind.
"""

from __future__ import annotations

import contextlib
import multiprocessing.forkserver
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from downloader import Mode, iter_results
from downloader.children import mp_context
from downloader.demo import serve_in_thread
from downloader.settings import LOCAL_MODES, Settings
from tests.helpers import (
    WAIT_S,
    LocalServer,
    corpus_urls,
    descendants,
    fast_settings,
    leftovers,
    read_manifest,
    wait_gone,
)

# Enough latency that several downloads are in flight when the caller leaves.
LATENCY_S = 0.05
# Copies of each corpus image (distinct URLs by their query): a list much longer
# than what is in flight, so that some of it is never started.
COPIES = 3
# Records the caller reads before it leaves.
READ_BEFORE_LEAVING = 3
# The files of an output folder that are not images.
BOOKKEEPING = {"manifest.jsonl", "failed.txt", ".lock"}
WAYS_TO_LEAVE = ["close", "break", "raise"]


class CallerLeft(Exception):
    """Raised in the caller's loop body to leave it."""


@pytest.fixture
def slow_server(corpus: Path) -> Iterator[LocalServer]:
    """The corpus server with latency, so that items are mid-flight for a while."""
    with serve_in_thread(LocalServer(corpus, latency=LATENCY_S)) as running:
        assert isinstance(running, LocalServer)
        yield running


@pytest.fixture
def helpers_running() -> None:
    """Start the forkserver (and its resource tracker) before counting children.

    They are long-lived helpers of multiprocessing shared by every run, not
    processes of one run; started here, they are in the "before" snapshot.
    """
    mp_context()  # sets the forkserver's preload before it starts
    multiprocessing.forkserver.ensure_running()


def _read_then_raise(urls: list[str], settings: Settings) -> None:
    """Leave the loop by an exception, the generator closed by ``closing``."""
    with contextlib.closing(iter_results(urls, settings)) as results:
        for read, _ in enumerate(results, start=1):
            if read == READ_BEFORE_LEAVING:
                raise CallerLeft


def _leave_early(leave: str, urls: list[str], settings: Settings) -> None:
    """Read ``READ_BEFORE_LEAVING`` records, then leave as ``leave`` says."""
    if leave == "close":
        results = iter_results(urls, settings)
        for read, _ in enumerate(results, start=1):
            if read == READ_BEFORE_LEAVING:
                break
        results.close()
    elif leave == "break":
        # No reference is kept: the generator is collected when the loop ends.
        for read, _ in enumerate(iter_results(urls, settings), start=1):
            if read == READ_BEFORE_LEAVING:
                break
    else:
        with pytest.raises(CallerLeft):
            _read_then_raise(urls, settings)


def _images(out: Path) -> set[str]:
    """Every file under ``out`` that is an output image, relative to ``out``."""
    return {
        path.relative_to(out).as_posix()
        for path in out.rglob("*")
        if path.is_file() and path.name not in BOOKKEEPING and ".tmp" not in path.parts
    }


@pytest.mark.usefixtures("helpers_running")
@pytest.mark.parametrize("leave", WAYS_TO_LEAVE)
@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_leaving_early_records_every_input_and_stops_everything(
    mode: Mode, leave: str, slow_server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """After the caller leaves: one line per input, a record per image, no leftovers."""
    urls = [
        f"{url}?copy={copy}"
        for copy in range(COPIES)
        for url in corpus_urls(slow_server, corpus)
    ]
    out = tmp_path / "out"
    settings = fast_settings(out, mode=mode, threads=2, procs=1)
    threads_before = set(threading.enumerate())
    children_before = set(descendants(os.getpid()))

    _leave_early(leave, urls, settings)

    records = read_manifest(out)
    assert sorted(str(r["url"]) for r in records) == sorted(urls)
    named = set()
    for record in records:
        if record["status"] == "ok":
            outputs = record.get("outputs") or []
            assert isinstance(outputs, list)
            named |= {str(record["path"]), *map(str, outputs)}
    assert _images(out) <= named
    assert all(
        r["status"] == "ok"
        or r["error"] == "interrupted"
        or str(r["error"]).startswith("not started")
        for r in records
    )
    assert any(str(r.get("error", "")).startswith("not started") for r in records)
    assert leftovers(out) == []
    new_threads = set(threading.enumerate()) - threads_before
    for thread in new_threads:
        thread.join(WAIT_S)
    assert [t.name for t in new_threads if t.is_alive()] == []
    new_children = set(descendants(os.getpid())) - children_before
    assert wait_gone(sorted(new_children)) == []
