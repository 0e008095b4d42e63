"""Every mode, end to end against the local server: same records, same images."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Generator
from pathlib import Path

import pytest
from PIL import Image

from downloader import Cancellation, Mode, Stage, Status, iter_results, run
from downloader.children import PRELOAD
from downloader.progress import EventLog
from downloader.settings import LOCAL_MODES
from tests.helpers import (
    NOISE,
    SLOW_IMAGE,
    WAIT_S,
    LocalServer,
    corpus_urls,
    fast_settings,
    leftovers,
    read_manifest,
    wait_gone,
    worker_pids,
)

ALL_MODES = list(LOCAL_MODES)
NEW_MODES = [Mode.SEQUENTIAL, Mode.THREADS, Mode.PROCESSES, Mode.ASYNC]


def output_hashes(out: Path) -> dict[str, str]:
    """URL → SHA-256 of its output image, from the manifest's ok records."""
    return {
        str(record["url"]): hashlib.sha256(
            (out / str(record["path"])).read_bytes()
        ).hexdigest()
        for record in read_manifest(out)
        if record["status"] == "ok"
    }


@pytest.mark.parametrize("mode", NEW_MODES, ids=lambda m: m.value)
def test_every_url_ends_ok_with_an_image_inside_the_box(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Each mode gives one ok record and one small decodable image per URL."""
    urls = corpus_urls(server, corpus)
    out = tmp_path / "out"
    log = EventLog()

    report = run(urls, fast_settings(out, mode=mode), events=log)

    assert [o.status for o in report.results] == [Status.OK] * len(urls)
    records = read_manifest(out)
    assert sorted(str(r["url"]) for r in records) == sorted(urls)
    for record in records:
        with Image.open(out / str(record["path"])) as image:
            image.load()
            assert max(image.size) <= 64
            assert image.size == (record["width"], record["height"])
    assert leftovers(out) == []
    finished = {(e.stage, e.lane.split("-")[0]) for e in log.events}
    assert {stage for stage, _ in finished} == {Stage.DOWNLOAD, Stage.TRANSFORM}


def test_every_mode_writes_byte_identical_images(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Same list and settings: every mode's output files have the same bytes."""
    urls = corpus_urls(server, corpus)

    hashes = {}
    for mode in ALL_MODES:
        run(urls, fast_settings(tmp_path / mode.value, mode=mode))
        hashes[mode] = output_hashes(tmp_path / mode.value)

    assert len(hashes[Mode.SEQUENTIAL]) == len(urls)
    assert all(h == hashes[Mode.SEQUENTIAL] for h in hashes.values())


@pytest.mark.parametrize("mode", NEW_MODES, ids=lambda m: m.value)
def test_failures_and_passed_through_records_in_every_mode(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Bad lines, HTTP errors and non-images fail alone; done URLs are skipped."""
    good = corpus_urls(server, corpus)[:2]
    out = tmp_path / "out"
    run(good, fast_settings(out, mode=mode))
    lines = [
        *good,
        "not a url",
        f"{server.base_url}/status/404",
        f"{server.base_url}/noise",
    ]

    report = run(lines, fast_settings(out, mode=mode))

    by_url = {o.url: o for o in report.results}
    assert len(report.results) == len(lines)
    assert all(by_url[url].status is Status.SKIPPED for url in good)
    assert by_url["not a url"].status is Status.FAILED
    assert by_url[f"{server.base_url}/status/404"].error == "HTTP 404"
    noise = by_url[f"{server.base_url}/noise"]
    assert noise.stage is Stage.TRANSFORM
    assert str(noise.error).startswith("not an image (starts with bytes 00 01")
    assert leftovers(out) == []


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.value)
def test_every_record_of_a_body_has_its_sha256_in_every_mode(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """ok and transform-failed records carry the SHA-256 of the body served,
    wherever it is computed (the pipeline's workers hash what its threads fetch)."""
    urls = [*corpus_urls(server, corpus)[:3], f"{server.base_url}/noise"]
    out = tmp_path / "out"
    bodies = {url: (corpus / url.rsplit("/", 1)[1]).read_bytes() for url in urls[:3]}
    bodies[urls[3]] = NOISE

    report = run(urls, fast_settings(out, mode=mode))

    by_url = {str(record["url"]): record for record in read_manifest(out)}
    assert [o.status for o in report.results].count(Status.OK) == 3
    assert {url: by_url[url].get("sha256") for url in urls} == {
        url: hashlib.sha256(body).hexdigest() for url, body in bodies.items()
    }


@pytest.mark.parametrize("mode", NEW_MODES, ids=lambda m: m.value)
def test_cancelling_stops_early_and_leaves_nothing_behind(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Cancel after the first record: every record is final, no temp, no child."""
    urls = corpus_urls(server, corpus)
    cancel = Cancellation()
    out = tmp_path / "out"
    seen = []

    settings = fast_settings(out, mode=mode, threads=1, procs=1)
    for outcome in iter_results(urls, settings, cancel=cancel):
        seen.append(outcome)
        cancel.set()

    assert len(seen) == len(read_manifest(out)) == len(urls)
    assert seen[0].status is Status.OK
    assert any(o.error == "not started (interrupted)" for o in seen)
    assert all(
        o.status is Status.OK or o.error in {"interrupted", "not started (interrupted)"}
        for o in seen
    )
    assert leftovers(out) == []
    assert wait_gone(worker_pids()) == []


@pytest.mark.parametrize("mode", NEW_MODES, ids=lambda m: m.value)
def test_leaving_the_loop_early_stops_the_run(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Closing the iterator after one record shuts the mode down, recording all."""
    urls = corpus_urls(server, corpus)
    out = tmp_path / "out"

    results = iter_results(urls, fast_settings(out, mode=mode, threads=2, procs=1))
    first = next(results)
    assert isinstance(results, Generator)
    results.close()

    assert first.status is Status.OK
    assert len(read_manifest(out)) == len(urls)  # the rest: interrupted
    assert leftovers(out) == []
    assert wait_gone(worker_pids()) == []


# When the worker is surely busy with the slow image: in processes mode it asks for
# it itself; in async mode (one download task) and in the pipeline (one download
# thread) the transform is handed to the worker before the second download starts.
KILL_AFTER_REQUESTS = {Mode.PROCESSES: 1, Mode.PIPELINE: 2, Mode.ASYNC: 2}


@pytest.mark.parametrize("mode", list(KILL_AFTER_REQUESTS), ids=lambda m: m.value)
def test_a_killed_pool_worker_does_not_hang_the_run(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """SIGKILL of the busy worker: the pool is replaced and every URL still ends ok."""
    urls = [server.url_for(SLOW_IMAGE), *corpus_urls(server, corpus)[:3]]
    settings = fast_settings(tmp_path / "out", mode=mode, threads=1, procs=1)
    killed: list[int] = []

    def kill_workers_once_the_slow_image_is_asked_for() -> None:
        server.wait_for_requests(KILL_AFTER_REQUESTS[mode])
        for pid in worker_pids():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_workers_once_the_slow_image_is_asked_for)
    killer.start()
    try:
        report = run(urls, settings)
    finally:
        killer.join(WAIT_S)

    assert killed
    assert len(report.results) == len(urls)
    assert [o.status for o in report.results] == [Status.OK] * len(urls)
    assert wait_gone(killed) == []
    assert leftovers(tmp_path / "out") == []


# What a run does not import (start-up time): the other modes' schedulers, asyncio
# outside the modes that use it, Pillow's drawing (only --compare draws), the extras.
_NEVER_FOR_A_PLAIN_RUN = ["pyarrow", "ray", "PIL.ImageDraw", "PIL.ImageFont"]
_IMPORTED_ONLY_BY = {
    "asyncio": {Mode.PROCESSES, Mode.ASYNC},
    "aiofiles": {Mode.ASYNC},
    "downloader.pipeline": {Mode.PIPELINE},
    "downloader.process_modes": {Mode.PROCESSES, Mode.ASYNC},
}


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.value)
def test_a_run_imports_only_what_its_mode_uses(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """After a whole command-line run in a fresh interpreter, the extras, the chart's
    drawing and other modes' machinery are not loaded: each costs start-up time."""
    url_list = tmp_path / "urls.txt"
    url_list.write_text("".join(u + "\n" for u in corpus_urls(server, corpus)[:2]))
    watched = [*_NEVER_FOR_A_PLAIN_RUN, *_IMPORTED_ONLY_BY]
    argv = [str(url_list), "--out", str(tmp_path / "out"), "--mode", mode.value]
    argv += ["--procs", "1", "--no-progress", "-q"]
    code = (
        "import sys; from downloader.cli import main; code = main(sys.argv[1:]); "
        f"print(sorted(m for m in {watched!r} if m in sys.modules)); sys.exit(code)"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env={**os.environ, "PYTHONPATH": str(root)},
    )

    assert done.returncode == 0, done.stderr
    expected = sorted(m for m, modes in _IMPORTED_ONLY_BY.items() if mode in modes)
    assert done.stdout.splitlines()[-1] == str(expected)


# What is not imported yet at each step before a run takes its output folder, and in
# the forkserver (start-up time: the forkserver starts once the folder is taken, and
# imports its preload while the command imports the rest).
_NOT_YET = {
    # The package: its names come on first use, so a worker's or the command line's
    # first import of a module of it does not bring in the library.
    "downloader": ["httpx", "PIL", "tqdm", "downloader.api", "downloader.settings"],
    # The command line and the library's entry point: the run's machinery (httpx
    # included) comes once the output folder is taken.
    "downloader.cli,downloader.api": [
        "httpx",
        "downloader.lifecycle",
        "downloader.fetch",
        "downloader.modes",
    ],
    # The forkserver's preload: what workers need, not the drawing of bars, nor
    # the command's and the run's own modules.
    ",".join(PRELOAD): ["tqdm", "downloader.cli", "downloader.api"],
}


@pytest.mark.parametrize("imported", list(_NOT_YET))
def test_imports_before_the_folder_leave_the_rest_for_later(imported: str) -> None:
    """In a fresh interpreter, importing the package, the command line's module or
    the forkserver's preload leaves out what is needed only later."""
    watched = _NOT_YET[imported]
    code = (
        f"import sys, {imported}; print([m for m in {watched!r} if m in sys.modules])"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
    )

    assert done.stdout.strip() == "[]"


def test_the_package_names_come_on_first_use() -> None:
    """Every name in ``__all__`` (``__version__`` too) resolves, to the object of
    the module it comes from, and shows in ``dir()``; another name is an
    AttributeError as usual."""
    import downloader
    from downloader import api, settings

    for name in downloader.__all__:
        assert getattr(downloader, name) is not None
    assert downloader.run is api.run
    assert downloader.Settings is settings.Settings
    assert downloader.__version__ == settings.VERSION
    assert set(downloader.__all__) <= set(dir(downloader))
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = downloader.nothing_here  # type: ignore[attr-defined]
