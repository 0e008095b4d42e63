"""The command line, run in-process through ``main(argv)``, and its entry points."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from downloader import __version__
from downloader.cli import USAGE_HINT, load_settings, main
from downloader.errors import InputError
from downloader.settings import LOCAL_MODES, ImageSpec, Mode
from tests.helpers import WAIT_S, LocalServer, corpus_urls, read_manifest, write_list
from tests.test_transform import png_header

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
        # A value that starts with '-' looks like an option to argparse: say how to
        # write it; written so, the option's own check says what is wrong with it.
        (
            ["urls.txt", "--part", "-1/2"],
            "error: --part: expected one argument, got '-1/2' (write --part=-1/2)",
        ),
        (["urls.txt", "--part=-1/2"], "error: --part: not a part: '-1/2'"),
        (
            ["urls.txt", "--rate-per-host", "-1/s"],
            "got '-1/s' (write --rate-per-host=-1/s)",
        ),
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


def _help_blocks(text: str) -> dict[str, tuple[str, str]]:
    """--help's options that take a value: option -> (group title, its help)."""
    blocks: dict[str, tuple[str, str]] = {}
    title = option = ""
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            title, option = line[:-1], ""
        elif found := re.match(r"  (?:-\w, )?(--[a-z-]+) [A-Z{']", line):
            option = found.group(1)
            blocks[option] = (title, line)
        elif line.startswith("  -") or not line.strip():
            option = ""
        elif option:
            blocks[option] = (title, blocks[option][1] + " " + line.strip())
    return blocks


# Options with no default value: nothing is done unless they are given.
NO_DEFAULT = {"--input-dir", "--events", "--header", "--size", "--sizes", "--transform"}


def test_help_groups_the_options_shows_defaults_and_ends_with_examples(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--help: options grouped as the README groups them (--item-timeout with the
    run, not the images), every default shown, --mode explained, examples last
    (it was one group of ~20 options, few defaults, no examples)."""
    monkeypatch.setenv("COLUMNS", "100")

    code = main(["--help"])

    text = capsys.readouterr().out
    blocks = _help_blocks(text)
    assert code == 0
    assert blocks["--item-timeout"][0] == "run"
    assert blocks["--timeout"][0] == "download"
    assert blocks["--max-pixels"][0].startswith("transforms")
    assert blocks["--demo-count"][0] == "demo"
    assert "scheduled: sequential, threads" in blocks["--mode"][1]
    for option, (_, block) in blocks.items():
        assert ("default: " in block) is (option not in NO_DEFAULT), block
    assert text.index("examples:") > text.index("--demo-latency")
    assert "downloader urls.txt --dry-run" in text[text.index("examples:") :]


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


@pytest.mark.parametrize("output", [["--json"], ["--events", "-"]])
def test_a_reader_gone_before_the_run_writes_ends_it_quietly(
    output: list[str], tmp_path: Path
) -> None:
    """``… --json | head`` and ``… --events - | head`` with the reader gone before the
    first write: exit 141 without a traceback or an 'Errno 32' line, and every input
    still has its one record (a stopped run, which a rerun finishes)."""
    lines = [f"not a url {n}" for n in range(50)] + ["http://127.0.0.1:9/x.jpg"]
    listing = write_list(tmp_path / "urls.txt", lines)
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: the first write fails
    try:
        child = subprocess.run(
            [sys.executable, str(CLI), str(listing), "--no-config", *output, *FAST],
            cwd=tmp_path,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)

    assert "Traceback" not in child.stderr
    assert "Errno 32" not in child.stderr
    assert child.returncode == 141, child.stderr
    assert len(read_manifest(tmp_path / "output")) == len(lines)


@pytest.fixture(scope="module")
def camera_photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one 10000x9500 JPEG (95 MP, as a large camera's): one grey, so
    it is ~1 MB on disk and, shrunk to a small box, decoded at 1/8 scale."""
    folder = tmp_path_factory.mktemp("photo")
    Image.new("L", (10_000, 9_500), 128).save(folder / "photo.jpg", quality=50)
    return folder


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_a_large_camera_photo_is_not_a_bomb(
    mode: Mode, camera_photo: Path, tmp_path: Path
) -> None:
    """95 MP passes the default pixel limit (it failed as a bomb over 90 MP) in every
    mode; --max-pixels lowers the limit, and the image then fails with the reason."""
    base = ["--input-dir", str(camera_photo), "--mode", mode.value, *FAST]
    base += ["--no-config", "--max-size", "64"]

    default = main([*base, "--out", str(tmp_path / "default")])
    lowered = main([*base, "--out", str(tmp_path / "low"), "--max-pixels", "90000000"])

    assert default == 0
    (accepted,) = read_manifest(tmp_path / "default")
    assert (accepted["status"], accepted["width"]) == ("ok", 64)
    assert lowered == 1
    (refused,) = read_manifest(tmp_path / "low")
    assert (
        refused["error"] == "decompression bomb: 95,000,000 pixels (limit 90,000,000)"
    )


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_an_image_a_decoder_chokes_on_fails_alone(mode: Mode, tmp_path: Path) -> None:
    """A PNG declaring 1 x 4,000,000,000 pixels under the largest --max-pixels makes
    Pillow raise OverflowError: that file fails with the reason, its neighbour is ok,
    and the run ends 1 with a record each (it ended the run, every rerun again)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a-hostile.png").write_bytes(png_header(1, 4_000_000_000))
    Image.new("RGB", (80, 60), "red").save(folder / "b-fine.png")
    out = tmp_path / "out"
    args = ["--input-dir", str(folder), "--out", str(out), "--mode", mode.value]
    args += [*FAST, "--no-config", "--max-size", "64", "--max-pixels", "4294836225"]

    code = main(args)

    assert code == 1
    records = {Path(str(r["url"])).name: r for r in read_manifest(out)}
    assert records["b-fine.png"]["status"] == "ok"
    hostile = records["a-hostile.png"]
    assert hostile["status"] == "failed"
    assert str(hostile["error"]).startswith("cannot decode image: OverflowError: ")


def test_max_pixels_is_checked_from_flag_config_and_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-pixels, the config's max-pixels and ImageSpec(max_pixels=) are one
    setting, refused out of range in the same words."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/x.jpg\n")
    (tmp_path / "c.toml").write_text("max-pixels = 0\n")
    (tmp_path / "ok.toml").write_text("max-pixels = 1_000\n")

    flag = main(["urls.txt", "--dry-run", "--no-config", "--max-pixels", "0"])
    flag_err = capsys.readouterr().err
    config = main(["urls.txt", "--dry-run", "--config", "c.toml"])
    config_err = capsys.readouterr().err

    assert (flag, config) == (2, 2)
    assert flag_err.startswith("error: --max-pixels must be an integer from 1 to ")
    assert config_err.startswith("error: config c.toml: max-pixels must be an integer")
    with pytest.raises(InputError, match=r"^--max-pixels must be an integer from 1 "):
        ImageSpec(max_pixels=0)
    assert load_settings("ok.toml").image.max_pixels == 1_000
    assert ImageSpec().max_pixels >= 16_320 * 12_240  # a 200 MP phone's photo


def test_events_never_overwrite_the_list_or_the_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--events naming the list, the manifest or any file in --out is refused before
    anything is opened (opening it for writing wiped the list or the records); an
    empty name is a usage error, not a local fault."""
    urls = write_list(tmp_path / "urls.txt", ["http://127.0.0.1:9/a.jpg"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").write_text('{"url": "http://127.0.0.1:9/a.jpg"}\n')
    before = urls.read_text(), (out / "manifest.jsonl").read_text()
    base = [str(urls), "--out", str(out), "--no-config", "--no-progress"]

    codes = [
        main([*base, "--events", str(urls)]),
        main([*base, "--events", str(out / "manifest.jsonl")]),
        main([*base, "--events", str(out / "new" / "events.jsonl")]),
        main([*base, "--events", ""]),
    ]
    err = capsys.readouterr().err.splitlines()

    assert codes == [2, 2, 2, 2]
    assert (urls.read_text(), (out / "manifest.jsonl").read_text()) == before
    assert not (out / "new").exists()
    assert len(err) == 4
    assert all(line.startswith("error: --events ") for line in err), err
    assert "is the URL list" in err[0]
    assert "inside the output folder" in err[1]
