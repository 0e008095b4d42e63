"""``--part K/N`` into one shared folder, then ``--merge-parts``: one manifest.

The parts run as real ``python cli.py`` processes at the same time on one list and one
output folder, against the loopback corpus server; the refusals run in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from downloader.cli import main
from downloader.demo import serve_in_thread
from downloader.dryrun import dry_run
from downloader.manifest import OutputFolder, RecordFiles
from downloader.parts import part_of
from downloader.settings import Mode, NameBy, Part
from tests.helpers import (
    WAIT_S,
    LocalServer,
    corpus_urls,
    fast_settings,
    read_manifest,
    session_pids,
    wait_gone,
    write_list,
)

CLI = Path(__file__).resolve().parents[1] / "cli.py"
PARTS = 3
# Latency of the server for the kill test: the killed part is still downloading then.
LATENCY_S = 0.2
# Each row: the modes of parts 1, 2 and 3, then the single run's; every mode runs
# as a part in one of the rows.
MODE_ROWS = [
    (Mode.PIPELINE, Mode.THREADS, Mode.ASYNC, Mode.SEQUENTIAL),
    (Mode.PROCESSES, Mode.SEQUENTIAL, Mode.PIPELINE, Mode.ASYNC),
]


@pytest.fixture
def slow_server(corpus: Path) -> Iterator[LocalServer]:
    """The corpus server with latency, so that a run is mid-flight for a while."""
    with serve_in_thread(LocalServer(corpus, latency=LATENCY_S)) as running:
        assert isinstance(running, LocalServer)
        yield running


def _flags(out: Path, *extra: str) -> list[str]:
    return [
        "--out",
        str(out),
        "--no-progress",
        "--no-config",
        "--threads",
        "2",
        "--procs",
        "2",
        "--max-size",
        "64",
        "--retries",
        "0",
        *extra,
    ]


def _command(url_list: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(CLI), str(url_list), *_flags(out, *extra)]


@contextlib.contextmanager
def _running(*commands: list[str]) -> Iterator[list[subprocess.Popen[str]]]:
    """Start the commands at once, each in its own session; at the end, kill the
    session of any still running (a failed test) and reap them all."""
    processes = [
        subprocess.Popen(
            command,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=WAIT_S)


def _codes(processes: list[subprocess.Popen[str]]) -> list[int]:
    """Wait for each process (bounded); their exit codes."""
    for process in processes:
        process.communicate(timeout=WAIT_S * 2)
    return [process.returncode for process in processes]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=WAIT_S * 2)


def _merge(out: Path) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, str(CLI), "--merge-parts", "--out", str(out)])


def _inputs(server: LocalServer, corpus: Path) -> list[str]:
    """Corpus URLs, a 404, an unusable line and another spelling of the first URL."""
    urls = corpus_urls(server, corpus)
    spelled = urls[0].replace("http://127.0.0.1", "HTTP://127.0.0.1") + "#again"
    return [*urls, server.url_for("status/404"), "not a url", spelled]


def _by_url(out: Path) -> dict[str, dict[str, object]]:
    records = read_manifest(out)
    by_url = {str(record["url"]): record for record in records}
    assert len(by_url) == len(records)  # one line per URL
    return by_url


def _facts(record: dict[str, object], out: Path) -> tuple[object, ...]:
    """What must match between runs: status, names, error, and the output bytes."""
    outputs = record.get("outputs") or []
    assert isinstance(outputs, list)
    names = [record.get("path"), *outputs]
    data = [(out / str(name)).read_bytes() for name in names if name]
    return (record["status"], record.get("path"), record.get("error"), data)


@pytest.mark.parametrize(
    "modes", MODE_ROWS, ids=lambda row: "-".join(mode.value for mode in row)
)
def test_three_parts_at_once_then_merge_equal_a_single_run(
    server: LocalServer, corpus: Path, tmp_path: Path, modes: tuple[Mode, ...]
) -> None:
    """Parts 1-3 of 3 at once into one folder, merged: a single run's records and
    bytes, one line per URL, failed.txt, no part's scratch left."""
    url_list = write_list(tmp_path / "urls.txt", _inputs(server, corpus))
    out, single = tmp_path / "out", tmp_path / "single"
    *part_modes, single_mode = modes
    commands = [
        _command(url_list, out, "--part", f"{k}/{PARTS}", "--mode", mode.value)
        for k, mode in enumerate(part_modes, start=1)
    ]
    with _running(*commands) as processes:
        codes = _codes(processes)
    scratch = list((out / ".tmp").iterdir())
    merged = _merge(out)
    quiet = _run([sys.executable, str(CLI), "--merge-parts", "--out", str(out), "-q"])
    alone = _run(_command(url_list, single, "--mode", single_mode.value))

    assert set(codes) <= {0, 1}, codes
    assert merged.returncode == 1, merged.stderr  # the 404 and the unusable line
    assert merged.stderr.count("\n") == 1
    assert "merged 3 part(s)" in merged.stderr
    assert quiet.returncode == 1  # -q: only the failures' line, as a run's
    assert (
        quiet.stderr
        == f"failed: 2 of {len(_by_url(out))} URLs (listed in {out / 'failed.txt'})\n"
    )
    assert alone.returncode == 1, alone.stderr
    parts_records, single_records = _by_url(out), _by_url(single)
    assert sorted(parts_records) == sorted(single_records)
    assert len(parts_records) == len(corpus_urls(server, corpus)) + 2
    for url, record in single_records.items():
        assert _facts(parts_records[url], out) == _facts(record, single), url
    failed = (out / "failed.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(failed) == sorted(
        (single / "failed.txt").read_text(encoding="utf-8").splitlines()
    )
    assert scratch == []  # each part removed its own scratch folder
    for k in range(1, PARTS + 1):
        own = _urls_in(out / RecordFiles.for_part(Part(k, PARTS)).manifest)
        assert {part_of(url, PARTS) for url in own} <= {k}
        shared = own & set().union(*(_urls_in(out / f) for f in _part_files(out, k)))
        assert not shared


def _urls_in(path: Path) -> set[str]:
    """The URLs of a record file (one line each, checked)."""
    urls = [json.loads(line)["url"] for line in path.read_text().splitlines()]
    assert len(set(urls)) == len(urls)
    return set(urls)


def _part_files(out: Path, but: int) -> list[str]:
    """The record files of the parts other than ``but``."""
    return [
        RecordFiles.for_part(Part(k, PARTS)).manifest
        for k in range(1, PARTS + 1)
        if k != but
    ]


def _biggest_part(urls: list[str]) -> int:
    """The part of 3 with the most of ``urls`` (so that killing it is mid-run)."""
    sizes = dict.fromkeys(range(1, PARTS + 1), 0)
    for url in urls:
        sizes[part_of(url, PARTS)] += 1
    return max(sizes, key=lambda k: sizes[k])


def test_a_killed_part_rerun_alone_completes_the_merge(
    slow_server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """kill -9 of one part mid-run: merge refuses it as unfinished; rerun alone, it
    touches only its own URLs and file; the merge then has every URL once."""
    urls = corpus_urls(slow_server, corpus)
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"
    killed = _biggest_part(urls)
    others = [k for k in range(1, PARTS + 1) if k != killed]
    one_at_a_time = ("--threads", "1", "--per-host", "1")
    victim_command = _command(
        url_list, out, "--part", f"{killed}/{PARTS}", *one_at_a_time
    )
    with _running(victim_command) as (victim,):
        slow_server.wait_for_requests(1)
        group = session_pids(victim.pid)
        os.killpg(victim.pid, signal.SIGKILL)
        assert wait_gone(group, timeout=10) == []
    slow_server.latency = 0  # the latency was for the kill to land mid-run
    others_commands = [
        _command(url_list, out, "--part", f"{k}/{PARTS}") for k in others
    ]
    with _running(*others_commands) as processes:
        codes = _codes(processes)
    refused = _merge(out)
    other_files = {
        k: (out / RecordFiles.for_part(Part(k, PARTS)).manifest).read_bytes()
        for k in others
    }
    requests_before = len(slow_server.log)
    rerun = _run(_command(url_list, out, "--part", f"{killed}/{PARTS}"))
    rerun_paths = {path for path, _ in slow_server.log[requests_before:]}
    merged = _merge(out)

    assert victim.returncode == -signal.SIGKILL
    assert codes == [0, 0]
    assert refused.returncode == 3
    assert refused.stderr.count("\n") == 1
    assert f"part {killed} of {PARTS} did not finish" in refused.stderr
    assert rerun.returncode == 0, rerun.stderr
    own = {
        "/" + url.rpartition("/")[2] for url in urls if part_of(url, PARTS) == killed
    }
    assert rerun_paths <= own
    for k in others:
        path = out / RecordFiles.for_part(Part(k, PARTS)).manifest
        assert path.read_bytes() == other_files[k]
    assert merged.returncode == 0, merged.stderr
    records = read_manifest(out)
    assert sorted(str(r["url"]) for r in records) == sorted(urls)
    assert {str(r["status"]) for r in records} <= {"ok", "skipped"}
    assert (out / "failed.txt").read_text(encoding="utf-8") == ""


def _run_parts(
    url_list: Path, out: Path, count: int, numbers: list[int], *extra: str
) -> list[int]:
    """Run parts of ``count`` in this process, one after the other; their exit codes."""
    return [
        main(
            [
                str(url_list),
                *_flags(out, "--mode", "threads", "--part", f"{k}/{count}", *extra),
            ]
        )
        for k in numbers
    ]


def test_merge_refuses_a_missing_part_in_one_line(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Parts 1 and 2 of 3 only: --merge-parts exits 3, one line, no manifest."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus))
    out = tmp_path / "out"
    codes = _run_parts(url_list, out, PARTS, [1, 2])
    capsys.readouterr()

    code = main(["--merge-parts", "--out", str(out)])

    err = capsys.readouterr().err
    assert codes == [0, 0]
    assert code == 3
    assert err == f"error: part 3 of 3 missing in {out}: run --part 3/3 first\n"
    assert not (out / "manifest.jsonl").exists()


def test_another_n_is_refused_by_a_part_and_by_the_merge(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A part of 2 in a folder of parts of 3 is refused; so is merging a mix of N."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus))
    out, halves = tmp_path / "out", tmp_path / "halves"
    codes = _run_parts(url_list, out, PARTS, [1, 2, 3])
    capsys.readouterr()

    refused = main([str(url_list), *_flags(out, "--part", "1/2")])
    refused_err = capsys.readouterr().err
    _run_parts(url_list, halves, 2, [1, 2])
    for path in halves.glob("manifest.part-*"):
        (out / path.name).write_bytes(path.read_bytes())
    capsys.readouterr()
    merge = main(["--merge-parts", "--out", str(out)])
    merge_err = capsys.readouterr().err

    assert codes == [0, 0, 0]
    assert refused == 3
    assert refused_err.count("\n") == 1
    assert "holds parts of a split into 3" in refused_err
    assert not (out / "manifest.part-1-of-2.jsonl.new").exists()
    assert merge == 3
    assert merge_err.count("\n") == 1
    assert "parts of splits into 2, 3" in merge_err
    assert not (out / "manifest.jsonl").exists()


def test_parts_with_other_settings_are_refused_by_the_merge(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Part 2 made with another image size: the merge refuses, in one line."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus))
    out = tmp_path / "out"
    _run_parts(url_list, out, 2, [1])
    _run_parts(url_list, out, 2, [2], "--max-size", "32")
    capsys.readouterr()

    code = main(["--merge-parts", "--out", str(out)])

    err = capsys.readouterr().err
    assert code == 3
    assert err.count("\n") == 1
    assert "different image settings" in err


def test_parts_of_different_lists_are_refused_by_the_merge(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Part 1 ran on the first half of the list, part 2 on all of it (a list that grew
    between two array tasks): merging would leave URLs with no record, so it refuses
    in one line; rerunning part 1 on the full list then merges every URL once."""
    urls = corpus_urls(server, corpus)
    url_list = write_list(tmp_path / "urls.txt", urls[: len(urls) // 2])
    out = tmp_path / "out"
    first = _run_parts(url_list, out, 2, [1])
    write_list(url_list, urls)
    second = _run_parts(url_list, out, 2, [2])
    capsys.readouterr()

    refused = main(["--merge-parts", "--out", str(out)])
    err = capsys.readouterr().err
    again = _run_parts(url_list, out, 2, [1])
    merged = main(["--merge-parts", "--out", str(out)])

    assert (first, second, again) == ([0], [0], [0])
    assert refused == 3
    assert err.count("\n") == 1
    assert "read different lists" in err
    assert merged == 0
    assert sorted(str(r["url"]) for r in read_manifest(out)) == sorted(urls)


def test_a_part_file_cut_after_it_finished_is_refused_by_the_merge(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A finished part's record file cut short (or emptied) by hand: the merge would
    drop its records without a word, so it refuses and names the part to rerun; the
    rerun completes it."""
    urls = corpus_urls(server, corpus)
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"
    codes = _run_parts(url_list, out, 2, [1, 2])
    records = out / RecordFiles.for_part(Part(1, 2)).manifest
    lines = records.read_bytes().splitlines(keepends=True)
    records.write_bytes(b"".join(lines[:-1]) + lines[-1][:10])
    capsys.readouterr()

    refused = main(["--merge-parts", "--out", str(out)])
    err = capsys.readouterr().err
    again = _run_parts(url_list, out, 2, [1])
    merged = main(["--merge-parts", "--out", str(out)])

    assert codes == [0, 0]
    assert refused == 3
    assert err.count("\n") == 1
    assert "changed after part 1/2 finished" in err
    assert again == [0]
    assert merged == 0
    assert sorted(str(r["url"]) for r in read_manifest(out)) == sorted(urls)


def test_merging_again_changes_nothing_and_a_part_resumes_from_it(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A second merge writes the same bytes; a part rerun after it fetches nothing."""
    urls = [*corpus_urls(server, corpus), server.url_for("status/404")]
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"
    _run_parts(url_list, out, PARTS, [1, 2, 3])
    first_code = main(["--merge-parts", "--out", str(out)])
    first = [(out / name).read_bytes() for name in ("manifest.jsonl", "failed.txt")]
    second_code = main(["--merge-parts", "--out", str(out)])
    second = [(out / name).read_bytes() for name in ("manifest.jsonl", "failed.txt")]
    requests = len(server.log)
    good = urls[:-1]  # not the 404 (its port may hold "404" too: not by text)
    own = next(part_of(url, PARTS) for url in good)
    rerun = _run_parts(url_list, out, PARTS, [own])

    assert first_code == second_code == 1
    assert first == second
    assert first[1].decode() == server.url_for("status/404") + "\n"
    assert len(read_manifest(out)) == len(urls)
    records = (out / RecordFiles.for_part(Part(own, PARTS)).manifest).read_text()
    statuses = {
        json.loads(line)["url"]: json.loads(line)["status"]
        for line in records.splitlines()
    }
    assert rerun in ([0], [1])
    assert {url for url, status in statuses.items() if status == "skipped"} == {
        url for url in good if part_of(url, PARTS) == own
    }
    assert [path for path, _ in server.log[requests:]] in ([], ["/status/404"])


def test_parts_resume_from_an_earlier_whole_run(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Parts after a run without --part skip what it did, fetching nothing."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus))
    out = tmp_path / "out"
    whole = main([str(url_list), *_flags(out, "--mode", "threads")])
    requests = len(server.log)

    codes = _run_parts(url_list, out, PARTS, [1, 2, 3])
    merged = main(["--merge-parts", "--out", str(out)])

    assert whole == 0
    assert codes == [0, 0, 0]
    assert merged == 0
    assert len(server.log) == requests
    assert {str(r["status"]) for r in read_manifest(out)} == {"skipped"}
    assert len(read_manifest(out)) == len(corpus_urls(server, corpus))


def test_a_run_without_part_is_refused_on_a_folder_with_parts(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Part files there, merged or not: a run without --part exits 3 in one line,
    fetching nothing and leaving the manifest as the merge wrote it."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus))
    out = tmp_path / "out"
    _run_parts(url_list, out, 2, [1, 2])
    main(["--merge-parts", "--out", str(out)])
    manifest = (out / "manifest.jsonl").read_bytes()
    requests = len(server.log)
    capsys.readouterr()

    code = main([str(url_list), *_flags(out)])

    err = capsys.readouterr().err
    assert code == 3
    assert err.count("\n") == 1
    assert "holds the files of a --part run" in err
    assert len(server.log) == requests
    assert (out / "manifest.jsonl").read_bytes() == manifest


def test_parts_share_the_folder_but_not_a_part_or_a_whole_run(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """While part 1 runs: part 2 runs and leaves part 1's scratch alone; part 1 again,
    a run without --part and a merge are refused; while a whole run runs, a part is."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus))
    out = tmp_path / "out"
    part_one = OutputFolder(out, files=RecordFiles.for_part(Part(1, 2)))
    with part_one:
        scratch = part_one.tmp / "half-a-download.part"
        scratch.write_bytes(b"part 1 is writing this")
        second = _run_parts(url_list, out, 2, [2])
        survived = scratch.read_bytes()
        capsys.readouterr()
        again = _run_parts(url_list, out, 2, [1])
        again_err = capsys.readouterr().err
        whole = main([str(url_list), *_flags(out)])
        whole_err = capsys.readouterr().err
        merge = main(["--merge-parts", "--out", str(out)])
        merge_err = capsys.readouterr().err
    with OutputFolder(out):
        during_whole = _run_parts(url_list, out, 2, [2])
        during_err = capsys.readouterr().err

    assert second == [0]
    assert survived == b"part 1 is writing this"
    assert again == [3]
    assert "this same part is using" in again_err
    assert whole == merge == 3
    assert "is using" in whole_err
    assert "is using" in merge_err
    assert during_whole == [3]
    assert "a run without --part is using" in during_err
    for err in (again_err, whole_err, merge_err, during_err):
        assert err.count("\n") == 1


def test_name_by_sha256_does_not_go_with_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--name-by sha256 with --part: a usage error in one line, nothing written."""
    url_list = write_list(tmp_path / "urls.txt", ["http://127.0.0.1:9/a.jpg"])
    out = tmp_path / "out"

    code = main([str(url_list), *_flags(out, "--part", "1/2", "--name-by", "sha256")])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --name-by sha256 does not go with --part")
    assert err.count("\n") == 1
    assert not out.exists()


def test_part_of_is_the_same_in_another_process_and_for_every_spelling() -> None:
    """The split follows the manifest's URL identity, not Python's hash()."""
    urls = [f"http://example.test/{n}.jpg" for n in range(40)]
    spellings = [
        url.replace("http://example.test", "HTTP://Example.TEST:80") + "#x"
        for url in urls
    ]
    script = (
        "import json, sys; from downloader.parts import part_of; "
        "print(json.dumps([part_of(u, 7) for u in json.loads(sys.argv[1])]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run(
        [sys.executable, "-c", script, json.dumps(urls)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env=env,
        check=True,
    )

    here = [part_of(url, 7) for url in urls]
    assert json.loads(other.stdout) == here
    assert [part_of(url, 7) for url in spellings] == here
    assert set(here) == set(range(1, 8))


def test_dry_run_of_a_part_shows_its_lines_and_counts_the_others(
    tmp_path: Path,
) -> None:
    """The dry runs of parts 1-3 split the list's lines between them, none twice."""
    lines = [f"http://example.test/{n}.jpg" for n in range(30)]
    lines += ["not a url", "http://EXAMPLE.test/0.jpg"]
    url_list = write_list(tmp_path / "urls.txt", lines)
    whole = dry_run(url_list, fast_settings(tmp_path / "out"))

    plans = [
        dry_run(url_list, fast_settings(tmp_path / "out", part=Part(k, PARTS)))
        for k in range(1, PARTS + 1)
    ]

    shown = sorted(item.line or 0 for plan in plans for item in plan.items)
    assert shown == sorted(item.line or 0 for item in whole.items)
    for plan in plans:
        assert plan.part is not None
        assert plan.other_parts == len(whole.items) - len(plan.items)
        assert {part_of(item.url, PARTS) for item in plan.items} <= {plan.part.number}


def test_name_by_sha256_with_a_part_is_refused_by_the_settings(tmp_path: Path) -> None:
    """The library refuses it too (Settings checks every value)."""
    with pytest.raises(Exception, match="does not go with --part"):
        fast_settings(tmp_path, part=Part(1, 2), name_by=NameBy.SHA256)


@pytest.mark.parametrize(
    "name",
    [
        "manifest.part-1-of-0.json",
        "manifest.part-0-of-2.jsonl",
        f"manifest.part-1-of-{10**20}.jsonl",
    ],
)
def test_a_file_no_part_made_is_named_and_refused(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A part file name with K/N out of range was merged as 0 parts (exit 0, an
    empty manifest written) or refused as a --part usage error: exit 3, named."""
    (tmp_path / name).touch()

    code = main(["--merge-parts", "--out", str(tmp_path)])

    assert code == 3
    assert capsys.readouterr().err == (
        f"error: {tmp_path / name} is not the file of a part (K/N out of range): "
        "remove it\n"
    )
    assert not (tmp_path / "manifest.jsonl").exists()
