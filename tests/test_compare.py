"""The side-by-side comparison of modes: table, comparison.json, comparison.png."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from downloader.cli import main
from downloader.compare import compare, gil_enabled
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
