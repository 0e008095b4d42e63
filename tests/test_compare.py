"""The side-by-side comparison of modes: table, comparison.json, comparison.png."""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from downloader.cli import main
from downloader.compare import compare, gil_enabled
from downloader.errors import OutputError
from downloader.records import Stage
from downloader.report import (
    Comparison,
    MemoryPeak,
    ModeResult,
    Span,
    Tally,
    comparison_png,
)
from downloader.settings import LOCAL_MODES, ImageSpec, Mode
from tests.helpers import (
    WAIT_S,
    LocalServer,
    corpus_urls,
    fast_settings,
    leftovers,
    read_manifest,
    session_pids,
    wait_gone,
    write_list,
)
from tests.test_manifest import _outside, _snapshot
from tests.test_signals import (  # the signal tests' subprocess and tmpfs helpers
    STOP_S,
    _command,
    _finish,
    _start,
    _tmpfs,
    short_tmp,
    slow_server,
)
from tests.user_transforms import KILLS_ENV

__all__ = ["short_tmp", "slow_server"]  # fixtures, used by name


def test_compare_prints_the_table_and_writes_json_and_png(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--compare runs each chosen mode into OUT/<mode>/ and says outputs match."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:4])
    out = tmp_path / "out"

    code = main(
        [
            str(url_list),
            "--compare",
            "--modes",
            "sequential,processes,async",
            "--out",
            str(out),
            "--threads",
            "2",
            "--procs",
            "1",
            "--max-size",
            "64",
        ]
    )

    table = capsys.readouterr().out
    assert code == 0
    assert "all modes ok, outputs match" in table
    assert [line.split("|")[1].strip() for line in table.splitlines()[3:6]] == [
        "sequential",
        "processes",
        "async",
    ]
    assert f"GIL {'enabled' if gil_enabled() else 'disabled'}" in table
    data = json.loads((out / "comparison.json").read_text())
    assert [m["mode"] for m in data["modes"]] == ["sequential", "processes", "async"]
    assert all(m["outputs_match"] and m["images"] == 4 for m in data["modes"])
    assert data["modes"][0]["speedup_vs_sequential"] == 1.0
    assert {lane for m in data["modes"] for lane, *_ in m["timeline"]} >= {
        "thread-0",
        "proc-0",
        "task-0",
    }
    assert all((out / m["mode"] / "manifest.jsonl").is_file() for m in data["modes"])
    with Image.open(out / "comparison.png") as chart:
        assert chart.format == "PNG"
        assert chart.width >= 800


def test_a_failed_url_makes_the_comparison_exit_1(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A URL that fails in every mode: outputs still match, but the exit code is 1."""
    urls = [*corpus_urls(server, corpus)[:2], f"{server.base_url}/status/404"]
    url_list = write_list(tmp_path / "urls.txt", urls)

    code = main(
        [
            *(str(url_list), "--compare", "--modes", "threads,pipeline"),
            *("--out", str(tmp_path / "out"), "--procs", "1", "--retries", "0"),
        ]
    )

    table = capsys.readouterr().out
    assert code == 1
    assert "NOT all ok/matching" in table
    assert table.count("| match") == 2


def test_modes_without_compare_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--modes alone, or an unknown mode name, exits 2 with a message."""
    url_list = write_list(tmp_path / "urls.txt", ["http://127.0.0.1:9/x.jpg"])

    alone = main([str(url_list), "--modes", "threads", "--out", str(tmp_path)])
    alone_err = capsys.readouterr().err
    unknown = main([str(url_list), "--compare", "--modes", "threads,warp"])
    unknown_err = capsys.readouterr().err

    assert alone == 2
    assert "--modes goes with --compare" in alone_err
    assert unknown == 2
    assert "unknown mode(s): warp" in unknown_err


def test_the_library_comparison_reads_a_one_shot_iterable_once_per_mode(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A generator of URLs is kept, so every mode gets the whole list."""
    urls = corpus_urls(server, corpus)[:3]
    settings = fast_settings(tmp_path / "out", threads=2, procs=1)

    comparison = compare(
        (url for url in urls), settings, [Mode.SEQUENTIAL, Mode.THREADS]
    )

    assert [r.summary.images for r in comparison.results] == [3, 3]
    assert comparison.ok
    assert comparison.speedup(comparison.results[0]) == 1.0
    assert comparison.gil_enabled is getattr(sys, "_is_gil_enabled", lambda: True)()


# --- nothing is written outside OUT ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "is_folder"),
    [
        ("comparison.json", False),
        ("comparison.png", False),
        ("threads", True),
        ("sequential", True),
        ("threads/failed.txt", False),
        ("threads/.tmp", True),
    ],
)
def test_a_link_at_a_name_compare_writes_is_refused_before_any_mode_runs(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    is_folder: bool,
) -> None:
    """A symlink at OUT/comparison.*, OUT/<mode> or a name a mode's run writes in
    OUT/<mode>: exit 3, one line, before any mode runs."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:2])
    outside, precious = _outside(tmp_path)
    target = outside if is_folder else precious
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True)
    (out / name).symlink_to(target)
    before = _snapshot(outside)

    code = main(
        [
            *(str(url_list), "--compare", "--modes", "sequential,threads"),
            *("--out", str(out), "--procs", "1", "--max-size", "64"),
        ]
    )

    captured = capsys.readouterr()
    assert code == 3
    assert captured.err.splitlines() == [
        f"error: {out / name} is a symbolic link (to {target}): refused, since this "
        "tool reads and writes only inside the output folder; remove the link or "
        "choose another --out"
    ]
    assert _snapshot(outside) == before
    assert server.request_count() == 0
    assert (out / name).is_symlink()  # left for the user to look at
    assert name == "comparison.json" or not (out / "comparison.json").exists()
    assert not list(out.rglob("*.jpg"))


@pytest.mark.parametrize(
    ("name", "is_folder"), [("comparison.json", False), ("threads", True)]
)
def test_a_link_planted_after_the_start_checks_is_refused_when_written(
    server: LocalServer, corpus: Path, tmp_path: Path, name: str, is_folder: bool
) -> None:
    """The link appears once the comparison is under way (here: while it reads the
    list, after its first checks): refused when the name is written, never followed."""
    urls = corpus_urls(server, corpus)[:2]
    outside, precious = _outside(tmp_path)
    target = outside if is_folder else precious
    out = tmp_path / "out"
    before = _snapshot(outside)

    def planting() -> Iterator[str]:
        if (out / name).is_dir():  # made by the start checks: swapped for a link
            shutil.rmtree(out / name)
        out.mkdir(exist_ok=True)
        (out / name).symlink_to(target)
        yield from urls

    with pytest.raises(OutputError) as caught:
        compare(
            planting(),
            fast_settings(out, threads=2, procs=1),
            [Mode.SEQUENTIAL, Mode.THREADS],
        )

    assert str(caught.value).startswith(
        f"{out / name} is a symbolic link (to {target})"
    )
    assert _snapshot(outside) == before
    assert (out / name).is_symlink()
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary file


def test_a_link_at_the_temporary_name_is_removed_not_followed(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """comparison.json is written under a new temporary name: a link waiting at the
    name it will use is removed, never written through."""
    outside, precious = _outside(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    planted = out / f".comparison.json.{os.getpid()}.new"
    planted.symlink_to(precious)
    before = _snapshot(outside)

    compare(
        corpus_urls(server, corpus)[:1],
        fast_settings(out, threads=1, procs=1),
        [Mode.SEQUENTIAL],
    )

    assert _snapshot(outside) == before
    assert not planted.is_symlink()
    assert json.loads((out / "comparison.json").read_text())["modes"][0]["images"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "comparison.json",
        "comparison.png",
        "sequential",
    ]


def test_quiet_compare_prints_nothing_and_still_writes_its_files(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """-q is errors only: no table, no notes, one line per mode whose URLs failed;
    comparison.json and .png are written."""
    urls = [*corpus_urls(server, corpus)[:2], f"{server.base_url}/status/404"]
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"

    code = main(
        [
            *(str(url_list), "--compare", "--modes", "sequential,threads", "-q"),
            *("--out", str(out), "--procs", "1", "--retries", "0"),
        ]
    )

    assert capsys.readouterr() == (
        "",
        "".join(
            f"failed: 1 of 3 URLs (listed in {out / mode / 'failed.txt'})\n"
            for mode in ("sequential", "threads")
        ),
    )
    assert code == 1  # a URL failed: told by the exit code, as in a run with -q
    assert json.loads((out / "comparison.json").read_text())["ok"] is False
    with Image.open(out / "comparison.png") as chart:
        assert chart.format == "PNG"


# --- every mode measured alike, in a fresh process of its own -------------------------

# Touched memory the caller holds while the modes run: far above any mode's own peak
# here (a fresh interpreter with the package imported is ~40-110 MB).
BALLAST_MB = 400


def test_every_mode_runs_in_a_fresh_process_and_total_is_never_below_main(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Each mode runs in its own new process, never the caller: so no mode's figures
    hold what the caller or an earlier mode left (the caller's ballast here), and the
    order of the modes cannot change them. Total (the mode's process and all its
    descendants) is never below main, nor below the largest worker."""
    ballast = b"\x01" * (BALLAST_MB * 1_000_000)  # touched: resident in the caller
    settings = fast_settings(tmp_path / "out", threads=2, procs=1)

    comparison = compare(corpus_urls(server, corpus)[:3], settings, LOCAL_MODES)

    assert len(ballast) == BALLAST_MB * 1_000_000
    results = comparison.results
    assert [r.mode for r in results] == list(LOCAL_MODES)
    assert comparison.ok
    for result in results:
        memory = result.memory
        assert memory.total_mb is not None
        assert 0 < memory.main_mb <= memory.total_mb, result.mode
        assert memory.main_mb < BALLAST_MB / 2, result.mode  # the caller's is not in it
        if not result.procs:
            assert memory.worker_mb is None, result.mode
        elif memory.worker_mb is not None:  # sampled: a worker of <0.1 s may be missed
            assert 0 < memory.worker_mb <= memory.total_mb, result.mode
    pids = [r.pid for r in results]
    assert None not in pids
    assert os.getpid() not in pids
    assert len(set(pids)) == len(pids)  # one new process per mode
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # all reaped


def test_a_mode_whose_process_dies_gets_an_error_and_the_next_mode_runs(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sequential runs the transform in the mode's own process: a transform that
    SIGKILLs it leaves that mode without a result; its row says so, the next mode
    runs, the comparison is written and is not ok."""
    kills = tmp_path / "kills"
    kills.mkdir()
    monkeypatch.setenv(KILLS_ENV, str(kills))
    image = ImageSpec(max_size=64, transform="tests.user_transforms:kill_worker")
    out = tmp_path / "out"
    settings = fast_settings(out, threads=2, procs=1, image=image)

    comparison = compare(
        corpus_urls(server, corpus)[:2], settings, [Mode.SEQUENTIAL, Mode.PIPELINE]
    )

    dead, pipeline = comparison.results
    assert dead.error == "its process ended without a result (exit code -9)"
    assert dead.pid is not None
    assert str(dead.pid) in os.listdir(kills)
    assert pipeline.mode is Mode.PIPELINE
    assert pipeline.pid != dead.pid
    assert not comparison.ok
    assert json.loads((out / "comparison.json").read_text())["ok"] is False
    assert not [p for p in out.iterdir() if p.name.startswith(".comparison-")]


def test_scratch_folders_an_older_version_left_are_swept_links_are_not_followed(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """``.comparison-*`` folders (left by a kill -9 while an older version drew the
    picture in one) are removed; a link of that name is left, its target untouched."""
    outside, precious = _outside(tmp_path)
    out = tmp_path / "out"
    (out / ".comparison-abc123").mkdir(parents=True)
    (out / ".comparison-abc123" / "comparison.png").write_bytes(b"half a picture")
    (out / ".comparison-link").symlink_to(outside)
    before = _snapshot(outside)

    compare(
        corpus_urls(server, corpus)[:1],
        fast_settings(out, threads=1, procs=1),
        [Mode.SEQUENTIAL],
    )

    assert not (out / ".comparison-abc123").exists()
    assert (out / ".comparison-link").is_symlink()
    assert _snapshot(outside) == before
    assert precious.exists()


# --- the picture: one time axis for every mode ----------------------------------------


def _mode_result(mode: Mode, wall_s: float) -> ModeResult:
    """A mode that was downloading on one lane from its start to its end."""
    summary = replace(Tally().summary(), wall_s=wall_s)
    return ModeResult(
        mode=mode,
        threads=1,
        procs=0,
        summary=summary,
        memory=MemoryPeak(1.0, None, 1.0),
        outputs={},
        spans=(Span("thread-0", Stage.DOWNLOAD, 0.0, wall_s),),
    )


def test_the_timelines_share_one_time_axis() -> None:
    """A mode that took 1 s is drawn half as long as one that took 2 s."""
    comparison = Comparison(
        results=(_mode_result(Mode.THREADS, 1.0), _mode_result(Mode.SEQUENTIAL, 2.0)),
        gil_enabled=True,
        cores=2,
    )
    download_colour = (52, 120, 198)

    with Image.open(io.BytesIO(comparison_png(comparison))) as chart:
        rgb = chart.convert("RGB")
        widths = []  # the width of the download colour in each row that has a bar
        for y in range(rgb.height):
            xs = [
                x for x in range(rgb.width) if rgb.getpixel((x, y)) == download_colour
            ]
            if xs and xs[-1] - xs[0] > 100:  # not the legend's small box
                widths.append(xs[-1] - xs[0] + 1)

    first, last = widths[0], widths[-1]  # the threads lane, then sequential's
    assert 0.48 < first / last < 0.52


# --- Ctrl-C, SIGTERM and local faults during a comparison -----------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_signal_during_compare_stops_it_cleanly_with_130(
    slow_server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    short_tmp: Path,
    signum: signal.Signals,
) -> None:
    """Ctrl-C (to the whole process group, as a terminal sends it) or SIGTERM (to the
    main process only) while the first mode runs: that mode stops in order and is
    kept, the next does not run, exit 130; no process, no temporary file is left.

    A mode's scratch folder (``out/<mode>/...``) under pytest's ``tmp_path`` is too
    deep for the forkserver's socket, so the run puts it in the system's temporary
    directory: that must be short (``short_tmp``). A folder in ``tmp_path`` is not:
    it is 10 bytes deeper under pytest-xdist (``popen-gw0/``), too deep for any
    socket, and the mode then fails with "AF_UNIX path too long"."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(slow_server, corpus))
    out = tmp_path / "out"
    command = _command(url_list, out, "--compare", "--modes", "pipeline,threads")
    # Killed only if the test fails before the process ends (so that no process or
    # open pipe of it is left to fail the next test), never before the check that
    # the tool itself left no process; ``with`` closes its pipes in every case.
    with _start(command, short_tmp) as process:
        try:
            slow_server.wait_for_requests(3)
            if signum is signal.SIGINT:
                os.killpg(process.pid, signum)
            else:
                os.kill(process.pid, signum)
            code, err = _finish(process, STOP_S * 4)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            raise

    assert code == 130, err
    assert "Traceback" not in err
    assert wait_gone(session_pids(process.pid)) == []
    modes = json.loads((out / "comparison.json").read_text())["modes"]
    assert [(m["mode"], m["ok"]) for m in modes] == [("pipeline", False)]  # stopped
    assert modes[0]["error"] is None  # stopped in order: not "ended without a result"
    assert len(read_manifest(out / "pipeline")) == len(corpus_urls(slow_server, corpus))
    assert not (out / "threads" / "manifest.jsonl").exists()
    assert leftovers(out) == []
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert os.listdir(short_tmp) == []


def test_a_full_disk_during_compare_exits_3_and_stops_the_comparison(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A local fault in a mode's run is the run's exit 3, not an interruption (130):
    one line, the later modes are not run."""
    urls = [*corpus_urls(server, corpus)[:2], f"{server.base_url}/big-unsized"]
    url_list = write_list(tmp_path / "urls.txt", urls)

    with _tmpfs(tmp_path / "disk", "size=256k") as disk:
        out = disk / "out"
        code = main(
            [
                *(str(url_list), "--compare", "--modes", "sequential,threads"),
                *("--out", str(out), "--procs", "1", "--max-size", "64", "-q"),
            ]
        )
        err = capsys.readouterr().err
        threads_ran = (out / "threads" / "manifest.jsonl").exists()
        left = leftovers(out)

    assert code == 3
    assert len(err.splitlines()) == 1
    assert "No space left on device" in err
    assert not threads_ran
    assert left == []


def test_the_cpu_of_reaped_children_is_not_counted_again() -> None:
    """Workers report their own CPU time; the forkserver that reaps them is reaped by
    the run, which would put their time in this process's children counters too. The
    summary counts this process's own time and what workers reported, nothing else."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tally = Tally()
    subprocess.run(
        [sys.executable, "-c", "sum(range(30_000_000))"], check=True, timeout=WAIT_S
    )
    summary = tally.summary(worker_cpu_s=0.5)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)

    child_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert child_cpu > 0.1  # it did burn CPU, and was reaped here
    assert 0.5 <= summary.cpu_s < 0.5 + child_cpu
