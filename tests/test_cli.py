"""The command line, run in-process through ``main(argv)``, and its entry points."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from downloader import __version__
from downloader.cli import USAGE_HINT, main
from tests.helpers import WAIT_S, LocalServer, corpus_urls, read_manifest, write_list

FAST = ["--no-progress", "--threads", "2", "--procs", "1", "--retries", "0"]
CLI = Path(__file__).resolve().parents[1] / "cli.py"


def test_a_clean_list_exits_0_with_a_summary(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """All URLs ok: exit 0, a one-line-per-URL manifest, a summary on stderr."""
    urls = corpus_urls(server, corpus)[:3]
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"

    code = main([str(url_list), "--out", str(out), "--max-size", "32", *FAST])

    assert code == 0
    assert len(read_manifest(out)) == 3
    err = capsys.readouterr().err
    assert "done: 3 URLs (3 ok, 0 failed, 0 skipped)" in err
    assert "images/s" in err


def test_a_failed_url_exits_1_and_a_rerun_skips_the_rest(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One 404 makes exit 1; the rerun skips the ok URL and still exits 1."""
    urls = [corpus_urls(server, corpus)[0], f"{server.base_url}/status/404"]
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"
    args = [str(url_list), "--out", str(out), *FAST]

    first = main(args)
    second = main(args)

    assert (first, second) == (1, 1)
    assert "failed x1: HTTP 404" in capsys.readouterr().err
    assert sorted(str(r["status"]) for r in read_manifest(out)) == ["failed", "skipped"]
    assert (out / "failed.txt").read_text() == urls[1] + "\n"


def test_stdin_list(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """'-' reads the URL list from standard input."""
    urls = corpus_urls(server, corpus)[:2]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(urls) + "\n"))

    code = main(["-", "--out", str(tmp_path / "out"), *FAST])

    assert code == 0
    assert {str(r["url"]) for r in read_manifest(tmp_path / "out")} == set(urls)


def test_a_pipe_named_by_dev_fd_is_read_once(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``cli.py <(cat list)``: the list is read once, by the run, so no URL is lost."""
    urls = corpus_urls(server, corpus)[:3]
    reader, writer = os.pipe()
    os.write(writer, "".join(url + "\n" for url in urls).encode())
    os.close(writer)
    out = tmp_path / "out"

    try:
        code = main([f"/dev/fd/{reader}", "--out", str(out), *FAST])
    finally:
        os.close(reader)

    assert code == 0
    assert sorted(str(r["url"]) for r in read_manifest(out)) == urls
    assert "done: 3 URLs (3 ok, 0 failed, 0 skipped)" in capsys.readouterr().err


def test_compare_runs_every_mode_on_a_list_read_once(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--compare`` on ``<(cat list)``: the lines are kept, so each mode gets them."""
    urls = corpus_urls(server, corpus)[:2]
    reader, writer = os.pipe()
    os.write(writer, "".join(url + "\n" for url in urls).encode())
    os.close(writer)
    out = tmp_path / "out"
    modes = ["--compare", "--modes", "sequential,threads"]

    try:
        code = main([f"/dev/fd/{reader}", "--out", str(out), *modes, *FAST])
    finally:
        os.close(reader)

    assert code == 0, capsys.readouterr().err
    for mode in ("sequential", "threads"):
        assert sorted(str(r["url"]) for r in read_manifest(out / mode)) == urls


def test_dev_stdin_fed_by_a_pipe_is_read_once(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """``cat list | cli.py /dev/stdin``: every URL of the list is run."""
    urls = corpus_urls(server, corpus)[:3]
    out = tmp_path / "out"

    done = subprocess.run(
        [sys.executable, str(CLI), "/dev/stdin", "--out", str(out), *FAST],
        input="".join(url + "\n" for url in urls),
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )

    assert done.returncode == 0, done.stderr
    assert sorted(str(r["url"]) for r in read_manifest(out)) == urls
    assert "done: 3 URLs (3 ok, 0 failed, 0 skipped)" in done.stderr


def test_a_named_fifo_is_read_once(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A FIFO as the list: the run is its one reader; nothing waits for a 2nd writer."""
    urls = corpus_urls(server, corpus)[:3]
    fifo = tmp_path / "urls.txt"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    feed = "import sys; open(sys.argv[1], 'w').write(sys.stdin.read())"
    run = subprocess.Popen(
        [sys.executable, str(CLI), str(fifo), "--out", str(out), *FAST],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", feed, str(fifo)], stdin=subprocess.PIPE, text=True
    )
    try:
        writer.communicate("".join(url + "\n" for url in urls), timeout=WAIT_S)
        _, err = run.communicate(timeout=WAIT_S)
    finally:
        for process in (writer, run):
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=WAIT_S)

    assert run.returncode == 0, err
    assert sorted(str(r["url"]) for r in read_manifest(out)) == urls
    assert "done: 3 URLs (3 ok, 0 failed, 0 skipped)" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.txt"], "error: cannot read URL list missing.txt"),
        ([], "error: give a file of URLs"),
        (["urls.txt", "--threads", "0"], "error: --threads must be an integer from 1 "),
        (["urls.txt", "--max-bytes", "lots"], "--max-bytes: not a size: 'lots'"),
        (["urls.txt", "--quality", "101"], "error: --quality must be an integer "),
        (["urls.txt", "--format", "tiff"], "--format: invalid choice: 'tiff'"),
    ],
)
def test_usage_errors_exit_2_with_one_clear_line(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bad arguments: exit 2, a message naming the problem, no traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/x.jpg\n")

    code = main([*argv, "--out", str(tmp_path / "out")])

    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--threads", "0"],
        ["--procs", "-1"],
        ["--max-size", "abc"],
        ["--max-bytes", "12Q"],
        ["--mode", "turbo"],
        ["--header", "bad"],
        ["--no-such-option"],
        ["--threads"],
        ["-q", "-v"],
        ["--modes", "threads"],
    ],
)
def test_a_usage_error_is_one_line_with_a_hint(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Whatever is wrong on the command line: exit 2 and one line, one prefix, a
    pointer to --help; never argparse's usage block first."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/x.jpg\n")

    code = main(["urls.txt", "--no-config", "--dry-run", *argv])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("error: ")
    assert captured.err.endswith(f"{USAGE_HINT}\n")
    assert "usage:" not in captured.err


def test_an_unusable_output_folder_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out below a regular file: exit 3 before any download."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    url_list = write_list(tmp_path / "urls.txt", ["http://127.0.0.1:9/x.jpg"])

    code = main([str(url_list), "--out", str(blocker / "out"), *FAST])

    assert code == 3
    assert "error: cannot create output folder" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package version and exits 0."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"downloader {__version__}"


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "cli.py", "--version"],
        [sys.executable, "-m", "downloader", "--version"],
    ],
)
def test_entry_points(command: list[str]) -> None:
    """The top-level cli.py and ``python -m downloader`` run the same main()."""
    root = Path(__file__).resolve().parent.parent

    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0
    assert done.stdout.strip() == f"downloader {__version__}"


def test_demo_runs_offline_on_the_embedded_corpus(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--demo generates a corpus, serves it on loopback and processes all of it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"

    code = main(["--demo", "--demo-count", "3", "--out", str(out), *FAST])

    records = read_manifest(out)
    assert code == 0
    assert [r["status"] for r in records] == ["ok"] * 3
    assert all(str(r["url"]).startswith("http://127.0.0.1:") for r in records)
    assert (out / "demo-urls.txt").is_file()
    assert "demo: serving" in capsys.readouterr().err

    # The same command again resumes: the demo serves on its earlier port, so the
    # URLs are the same ones and nothing is done twice (it used to add 3 more).
    listed = (out / "demo-urls.txt").read_text()
    again = main(["--demo", "--demo-count", "3", "--out", str(out), *FAST])

    assert again == 0
    assert (out / "demo-urls.txt").read_text() == listed
    assert [r["status"] for r in read_manifest(out)] == ["skipped"] * 3


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """``cli.py … --dry-run | head -1``: no traceback; the exit code of a tool cut
    short by SIGPIPE. (3000 lines: far more than a pipe holds, so writing fails.)"""
    urls = [f"http://127.0.0.1:9/x{n}.jpg" for n in range(3000)]
    listing = write_list(tmp_path / "urls.txt", urls)
    child = subprocess.Popen(
        [sys.executable, str(CLI), str(listing), "--dry-run", "--no-config"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline()  # the reader takes one line, then leaves
    child.stdout.close()
    _, err = child.communicate(timeout=60)

    assert "Traceback" not in err
    assert child.returncode == 141
