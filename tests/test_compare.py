"""The side-by-side comparison of modes: table, comparison.json, comparison.png."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from downloader.cli import main
from downloader.compare import compare, gil_enabled
from downloader.errors import OutputError
from downloader.settings import Mode
from tests.helpers import LocalServer, corpus_urls, fast_settings, write_list


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


def _outside(tmp_path: Path) -> tuple[Path, Path]:
    """A folder outside --out holding one precious file; return (folder, file)."""
    folder = tmp_path / "outside"
    folder.mkdir()
    precious = folder / "precious.txt"
    precious.write_text("keep me\n", encoding="utf-8")
    return folder, precious


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")}


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
    """-q is errors only: no table, no notes; comparison.json and .png are written."""
    urls = [*corpus_urls(server, corpus)[:2], f"{server.base_url}/status/404"]
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"

    code = main(
        [
            *(str(url_list), "--compare", "--modes", "sequential,threads", "-q"),
            *("--out", str(out), "--procs", "1", "--retries", "0"),
        ]
    )

    assert capsys.readouterr() == ("", "")
    assert code == 1  # a URL failed: told by the exit code, as in a run with -q
    assert json.loads((out / "comparison.json").read_text())["ok"] is False
    with Image.open(out / "comparison.png") as chart:
        assert chart.format == "PNG"
