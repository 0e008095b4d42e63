"""The threads → Queue → processes pipeline, end to end against the local server."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import threading
import time
from multiprocessing.queues import SimpleQueue
from pathlib import Path

import pytest
from PIL import Image

from downloader import (
    Cancellation,
    EventKind,
    HttpSettings,
    ImageSpec,
    Mode,
    ProgressEvent,
    Stage,
    Status,
    iter_results,
    run,
)
from downloader.children import mp_context
from downloader.demo import serve_in_thread
from downloader.pipeline import _Waiter
from downloader.progress import EventLog
from downloader.spares import Spare, SpareFiles
from downloader.worker import Task, TaskDone, TaskFailed, worker_main
from tests.helpers import (
    FLAT_IMAGE,
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
from tests.user_transforms import kills


def test_every_url_ends_ok_with_an_image_inside_the_box(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A clean list gives one ok record and one small decodable image per URL."""
    urls = corpus_urls(server, corpus)
    out = tmp_path / "out"

    report = run(urls, fast_settings(out))

    assert [o.status for o in report.results] == [Status.OK] * len(urls)
    records = read_manifest(out)
    assert sorted(str(r["url"]) for r in records) == sorted(urls)
    for record in records:
        path = out / str(record["path"])
        with Image.open(path) as image:
            image.load()
            assert image.format == "JPEG"
            assert max(image.size) <= 64
            assert image.size == (record["width"], record["height"])
        assert record["http_status"] == 200
        assert len(str(record["sha256"])) == 64
    assert leftovers(out) == []
    assert report.summary.images == len(urls)


def test_failures_are_records_and_the_run_goes_on(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Bad lines, HTTP errors and non-images fail alone, with a reason."""
    good = corpus_urls(server, corpus)[:3]
    lines = [
        *good,
        good[0].replace("http://127.0.0.1", "HTTP://127.0.0.1") + "#frag",
        "ftp://example.invalid/x.jpg",
        "not a url",
        "not a url",
        f"{server.base_url}/status/404",
        f"{server.base_url}/noise",
    ]
    out = tmp_path / "out"

    report = run(lines, fast_settings(out))

    by_url = {o.url: o for o in report.results}
    assert len(report.results) == len(read_manifest(out)) == 7
    assert all(by_url[url].status is Status.OK for url in good)
    assert "unsupported scheme" in str(by_url["ftp://example.invalid/x.jpg"].error)
    assert by_url["not a url"].status is Status.FAILED
    assert by_url[f"{server.base_url}/status/404"].error == "HTTP 404"
    noise = by_url[f"{server.base_url}/noise"]
    assert noise.stage is Stage.TRANSFORM
    assert str(noise.error).startswith("not an image (starts with bytes 00 01")
    assert (out / "failed.txt").read_text().splitlines() == sorted(
        (o.url for o in report.results if o.status is Status.FAILED),
        key=[o.url for o in report.results].index,
    )


def test_rerun_skips_what_is_done_and_force_redoes_it(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A second run fetches nothing already ok; --force fetches everything again."""
    urls = corpus_urls(server, corpus)[:5]
    out = tmp_path / "out"
    run(urls, fast_settings(out))
    first = server.request_count()

    again = run([*urls, f"{server.base_url}/status/500"], fast_settings(out))
    after_rerun = server.request_count()
    forced = run(urls, fast_settings(out, force=True))

    assert first == len(urls)
    assert [o.status for o in again.results].count(Status.SKIPPED) == len(urls)
    assert all(o.path for o in again.results if o.status is Status.SKIPPED)
    assert after_rerun - first == 2  # only the new URL: one attempt plus one retry
    assert [o.status for o in forced.results] == [Status.OK] * len(urls)
    assert server.request_count() - after_rerun == len(urls)
    records = read_manifest(out)
    assert len(records) == len(urls) + 1  # one line per unique URL, latest outcome
    assert sorted(str(r["status"]) for r in records) == ["failed"] + ["ok"] * len(urls)


# The modes that transform in worker processes.
WORKER_MODES = [Mode.PROCESSES, Mode.PIPELINE, Mode.ASYNC]
# The reason of an item whose worker was killed twice. The pipeline watches each
# worker; a process pool (concurrent.futures) tells neither the signal nor which of
# the items in it was running, so only the shape of its reason is fixed.
KILLED_TWICE = {
    Mode.PIPELINE: re.escape(
        "worker process crashed (killed by SIGKILL) while processing this image; "
        "retried once"
    ),
    Mode.PROCESSES: r"worker process crashed \(.+\) while .+; retried once",
    Mode.ASYNC: r"worker process crashed \(.+\) while .+; retried once",
}


def _killing(transform: str) -> ImageSpec:
    """The tests' box with a ``tests.user_transforms`` function that kills workers."""
    return ImageSpec(max_size=64, transform=f"tests.user_transforms:{transform}")


@pytest.mark.parametrize("mode", WORKER_MODES, ids=lambda m: m.value)
def test_a_killed_worker_is_replaced_and_its_item_retried(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path, worker_kills: Path
) -> None:
    """SIGKILL of the worker busy with an item: the item is redone, nothing is lost."""
    urls = [server.url_for(FLAT_IMAGE), *corpus_urls(server, corpus)[:4]]
    image = _killing("kill_worker_on_flat_once")

    report = run(urls, fast_settings(tmp_path / "out", mode=mode, procs=1, image=image))

    killed = kills(worker_kills)
    assert len(killed) == 1
    assert [o.status for o in report.results] == [Status.OK] * len(urls)
    assert len(read_manifest(tmp_path / "out")) == len(urls)
    assert wait_gone(killed) == []


@pytest.mark.parametrize("mode", WORKER_MODES, ids=lambda m: m.value)
def test_an_item_that_kills_two_workers_fails_with_a_reason(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path, worker_kills: Path
) -> None:
    """Killed twice on the same item: failed after one retry; the run still finishes."""
    urls = [server.url_for(FLAT_IMAGE), *corpus_urls(server, corpus)[:3]]
    image = _killing("kill_worker_on_flat")

    report = run(urls, fast_settings(tmp_path / "out", mode=mode, procs=1, image=image))

    by_url = {o.url: o for o in report.results}
    flat = by_url[urls[0]]
    killed = kills(worker_kills)
    assert len(killed) == 2
    assert flat.status is Status.FAILED
    assert flat.stage is not None  # it was started
    assert re.fullmatch(KILLED_TWICE[mode], str(flat.error)), flat.error
    others = [by_url[url] for url in urls[1:]]
    if mode is Mode.PIPELINE:  # each worker has its own channels: the crash is pinned
        assert [o.error for o in others if o.status is not Status.OK] == []
    else:
        # A broken process pool fails every item in it: an item that was in both
        # broken pools fails too (the documented cost of a standard pool); none
        # fails for any other reason.
        assert all(
            o.status is Status.OK or re.fullmatch(KILLED_TWICE[mode], str(o.error))
            for o in others
        ), [o.error for o in others]
    assert len(read_manifest(tmp_path / "out")) == len(urls)
    assert wait_gone(killed) == []
    assert leftovers(tmp_path / "out") == []


def test_a_stuck_item_is_failed_after_the_item_timeout(
    server: LocalServer, tmp_path: Path
) -> None:
    """An image that takes longer than --item-timeout fails; its worker is replaced."""
    urls = [server.url_for(SLOW_IMAGE)]

    report = run(urls, fast_settings(tmp_path / "out", procs=1, item_timeout=0.01))

    (outcome,) = report.results
    assert outcome.status is Status.FAILED
    assert outcome.error == "processing timed out after 0.01s (worker replaced)"


def test_cancelling_stops_early_and_records_what_was_cut_short(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Cancel after the first result: the run ends early, every URL has a record."""
    urls = corpus_urls(server, corpus)
    cancel = Cancellation()
    out = tmp_path / "out"
    seen = []

    for outcome in iter_results(urls, fast_settings(out, threads=1), cancel=cancel):
        seen.append(outcome)
        cancel.set()

    records = read_manifest(out)
    assert len(seen) == len(records) == len(urls)
    assert seen[0].status is Status.OK
    not_started = [o for o in seen if o.error == "not started (interrupted)"]
    assert not_started
    assert all(o.stage is None for o in not_started)
    assert all(
        o.status is Status.OK or o.error in {"interrupted", "not started (interrupted)"}
        for o in seen
    )
    assert leftovers(out) == []
    assert worker_pids() == []


def test_events_show_both_stages_in_threads_and_processes(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Downloads are reported from thread lanes and transforms from process lanes."""
    log = EventLog()
    urls = corpus_urls(server, corpus)

    run(urls, fast_settings(tmp_path / "out"), events=log)

    lanes = {(e.stage, e.lane.split("-")[0]) for e in log.events}
    assert lanes == {(Stage.DOWNLOAD, "thread"), (Stage.TRANSFORM, "proc")}
    finished = [e for e in log.events if e.kind is EventKind.FINISHED]
    assert len(finished) == 2 * len(urls)


def _the_worker() -> int:
    """The run's one worker process, once started: the workers start while the
    downloads begin, and nothing announces one, so /proc is read again (bounded)."""
    deadline = time.monotonic() + WAIT_S
    while not (pids := worker_pids()) and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    (pid,) = pids
    return pid


def test_a_frozen_idle_worker_is_replaced_and_its_queue_handed_on(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A worker that gets work but says nothing (SIGSTOP) is replaced; none fail."""
    urls = corpus_urls(server, corpus)[:4]
    frozen: list[int] = []
    once = threading.Lock()  # events come from several download threads at once

    def freeze_the_worker(event: ProgressEvent) -> None:
        with once:
            if event.stage is Stage.DOWNLOAD and not frozen:
                pid = _the_worker()  # before the first file is handed to it
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)

    settings = fast_settings(tmp_path / "out", procs=1, item_timeout=1.0)
    report = run(urls, settings, events=freeze_the_worker)

    assert len(frozen) == 1
    assert [o.status for o in report.results] == [Status.OK] * len(urls)
    assert wait_gone(frozen) == []


def test_jobs_set_aside_for_a_busy_host_get_a_record_when_stopped(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Stopped while jobs wait for a busy host: each is recorded 'not started'."""
    with serve_in_thread(LocalServer(corpus, latency=0.2)) as slow:
        slow_urls = [f"{slow.url_for('img-0000.jpg')}?n={n}" for n in range(8)]
        fast_urls = corpus_urls(server, corpus)[:4]
        cancel = Cancellation()
        settings = fast_settings(
            tmp_path / "out",
            threads=4,
            http=HttpSettings(timeout=5, deadline=20, retries=0, backoff=0, per_host=1),
        )
        seen = []
        for outcome in iter_results([*slow_urls, *fast_urls], settings, cancel=cancel):
            seen.append(outcome)
            cancel.set()

    assert sorted(o.url for o in seen) == sorted([*slow_urls, *fast_urls])
    assert any(o.error == "not started (interrupted)" for o in seen)
    assert leftovers(tmp_path / "out") == []


def _worker_ends(
    tmp_path: Path, tasks: list[Task]
) -> tuple[dict[int, TaskDone | TaskFailed], int | None]:
    """Run ``tasks`` through one real worker process; its last answer for each task
    and its exit code."""
    mp = mp_context()
    inbox: SimpleQueue[Task | None] = mp.SimpleQueue()
    results, results_end = mp.Pipe(duplex=False)
    stop_end, stop = mp.Pipe(duplex=False)
    out = tmp_path / "out"
    out.mkdir()
    worker = mp.Process(
        target=worker_main,
        args=(inbox, results_end, stop_end, str(out), ImageSpec(max_size=32), 10),
    )
    worker.start()
    results_end.close()
    stop_end.close()
    for task in tasks:
        inbox.put(task)
    inbox.put(None)
    ends: dict[int, TaskDone | TaskFailed] = {}
    while len(ends) < len(tasks) and results.poll(WAIT_S):
        message = results.recv()
        if isinstance(message, TaskDone | TaskFailed):
            ends[message.index] = message
    worker.join(WAIT_S)
    stop.close()
    return ends, worker.exitcode


def test_a_worker_removes_a_download_nobody_keeps_once_it_said_done(
    corpus: Path, tmp_path: Path
) -> None:
    """``Task.discard_src``: the worker removes its source after it sent ``TaskDone``
    (a photo's removal is the costliest step of recording it in the main process); a
    source to keep (``--keep-originals``, a local file) stays, and so does one that
    failed, for the main process to hash and remove."""
    image = next(p for p in sorted(corpus.iterdir()) if p.suffix == ".jpg")
    gone, kept, broken = (tmp_path / f"{name}.part" for name in ("a", "b", "c"))
    shutil.copyfile(image, gone)
    shutil.copyfile(image, kept)
    broken.write_bytes(b"not an image")
    tasks = [
        Task(0, str(gone), "a", discard_src=True),
        Task(1, str(kept), "b"),
        Task(2, str(broken), "c", discard_src=True),
    ]
    answers, exitcode = _worker_ends(tmp_path, tasks)
    ends = {index: type(message) for index, message in answers.items()}

    assert ends == {0: TaskDone, 1: TaskDone, 2: TaskFailed}
    assert exitcode == 0
    assert not gone.exists()
    assert kept.read_bytes() == image.read_bytes()
    assert broken.read_bytes() == b"not an image"
    assert {"a.jpg", "b.jpg"} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_a_worker_links_a_done_download_to_its_spare_name_before_saying_done(
    corpus: Path, tmp_path: Path
) -> None:
    """``Task.recycle_to``: the worker links its source to the spare name before it
    sends ``TaskDone`` (``recycled``: the file's device and inode), then removes the
    source as ever: the spare is the same file. It links nothing for a failed task,
    nor when the source is no longer the file its download wrote (a hard link to a
    file elsewhere put in its place, which a later download would otherwise write
    over), nor when the link cannot be made; the source goes all the same."""
    image = next(p for p in sorted(corpus.iterdir()) if p.suffix == ".jpg")
    good, broken, unlinkable, swapped = (
        tmp_path / f"{n}.part" for n in ("a", "b", "c", "d")
    )
    for src in (good, unlinkable, swapped):
        shutil.copyfile(image, src)
    broken.write_bytes(b"not an image")
    identities = {
        src: (src.stat().st_dev, src.stat().st_ino)
        for src in (good, broken, unlinkable, swapped)
    }
    victim = tmp_path / "victim.jpg"
    shutil.copyfile(image, victim)
    swapped.unlink()
    os.link(victim, swapped)
    spares = [tmp_path / f"{n}.spare" for n in range(4)]
    sources = [good, broken, unlinkable, swapped]
    targets = [spares[0], spares[1], tmp_path / "no" / "x", spares[3]]
    tasks = [
        Task(
            index,
            str(src),
            src.stem,
            discard_src=True,
            recycle_to=str(spare),
            src_identity=identities[src],
        )
        for index, (src, spare) in enumerate(zip(sources, targets, strict=True))
    ]
    ends, _ = _worker_ends(tmp_path, tasks)

    assert [type(ends[i]) for i in range(4)] == [
        TaskDone,
        TaskFailed,
        TaskDone,
        TaskDone,
    ]
    recycled = [getattr(ends[i], "recycled", None) for i in range(4)]
    assert recycled == [identities[good], None, None, None]
    assert spares[0].stat().st_ino == identities[good][1]
    assert spares[0].read_bytes() == image.read_bytes()
    assert not good.exists()
    assert not unlinkable.exists()
    assert not spares[1].exists()
    assert not spares[3].exists()
    assert broken.read_bytes() == b"not an image"  # the main process's to remove
    assert victim.read_bytes() == image.read_bytes()


def test_downloads_written_over_spares_are_exactly_their_bodies(
    server: LocalServer, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Download threads write over the files the workers are done with (``spares``):
    each record's SHA-256 and size are those of the body served, and the outputs are
    those of a run that writes every download to a new file; nothing is left in the
    scratch folder. The corpus's images differ in size, so a body written over a
    larger one would keep the old tail without the cut at close."""
    taken: list[Spare | None] = []
    take = SpareFiles.take

    def noted_take(self: SpareFiles) -> Spare | None:
        spare = take(self)
        taken.append(spare)
        return spare

    urls = [f"{url}?n={n}" for n in range(3) for url in corpus_urls(server, corpus)]
    serial = {"threads": 1, "procs": 1, "mode": Mode.PIPELINE}
    baseline = run(urls, fast_settings(tmp_path / "new", mode=Mode.THREADS))
    monkeypatch.setattr(SpareFiles, "take", noted_take)
    report = run(urls, fast_settings(tmp_path / "over", **serial))

    assert [o.status for o in report.results] == [Status.OK] * len(urls)
    assert [o.status for o in baseline.results] == [Status.OK] * len(urls)
    assert sum(spare is not None for spare in taken) >= len(urls) // 2
    records = read_manifest(tmp_path / "over")
    for record in records:
        served = corpus / str(record["url"]).rsplit("/", 1)[1].split("?")[0]
        assert record["sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()
        assert record["bytes"] == served.stat().st_size
    for record in records:
        output = str(record["path"])
        assert (tmp_path / "over" / output).read_bytes() == (
            tmp_path / "new" / output
        ).read_bytes()
    assert leftovers(tmp_path / "over") == []


def test_the_coordinators_wait_keeps_watching_a_number_opened_again() -> None:
    """``_Waiter`` keeps its selector between waits on the same objects; a pipe
    closed and opened again under the same descriptor number is still watched (an
    epoll set would have dropped it, and the coordinator would sleep through it)."""
    waiter = _Waiter()
    reader, writer = os.pipe()
    try:
        assert waiter.wait([reader], 0) == []
        new_reader, new_writer = os.pipe()
        os.dup2(new_reader, reader)  # the old pipe closed, the new one at its number
        os.close(new_reader)
        os.close(writer)
        writer = new_writer
        os.write(writer, b"x")
        assert waiter.wait([reader], WAIT_S) == [reader]
        other, other_writer = os.pipe()
        os.write(other_writer, b"y")
        assert sorted(waiter.wait([reader, other], WAIT_S)) == sorted([reader, other])
        os.close(other)
        os.close(other_writer)
    finally:
        waiter.close()
        os.close(reader)
        os.close(writer)
