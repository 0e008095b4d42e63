"""The manifest, failed.txt and resume: what a rerun reads back and what it redoes."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from downloader import Status, run
from downloader.cli import main
from downloader.demo import serve_in_thread
from downloader.dryrun import Action, dry_run
from downloader.settings import HttpSettings, ImageSpec
from tests.helpers import (
    WAIT_S,
    LocalHandler,
    LocalServer,
    corpus_urls,
    fast_settings,
    leftovers,
    read_manifest,
    session_pids,
    wait_gone,
    write_list,
)

NO_RETRY = HttpSettings(timeout=5, retries=0, backoff=0, per_host=8)


def test_feeding_failed_txt_back_retries_exactly_the_failures(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """failed.txt lists the failures; running it fetches those and nothing else."""
    good = corpus_urls(server, corpus)[:3]
    name = corpus_urls(server, corpus)[3].rpartition("/")[2]
    flaky = f"{server.base_url}/flaky/1/{name}"
    gone = f"{server.base_url}/status/404"
    out = tmp_path / "out"
    run([*good, flaky, gone], fast_settings(out, http=NO_RETRY))
    failed_txt = out / "failed.txt"
    listed = failed_txt.read_text(encoding="utf-8").splitlines()
    before = dict(server.requests)

    report = run(failed_txt, fast_settings(out, http=NO_RETRY))

    assert sorted(listed) == sorted([flaky, gone])
    new_requests = {p: n - before.get(p, 0) for p, n in server.requests.items()}
    assert {p for p, n in new_requests.items() if n} == {
        f"/flaky/1/{name}",
        "/status/404",
    }
    by_url = {o.url: o for o in report.results}
    assert by_url[flaky].status is Status.OK
    assert by_url[gone].error == "HTTP 404"
    assert failed_txt.read_text(encoding="utf-8").splitlines() == [gone]
    records = read_manifest(out)
    assert len(records) == 5  # one line per URL, the latest outcome
    assert sorted(str(r["status"]) for r in records) == ["failed"] + ["ok"] * 4


def test_a_torn_last_line_is_ignored_and_its_url_redone(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A crash mid-write leaves half a line: the rerun redoes that URL only."""
    urls = corpus_urls(server, corpus)[:3]
    out = tmp_path / "out"
    run(urls, fast_settings(out))
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    torn = lines[-1][: len(lines[-1]) // 2]
    (out / "manifest.jsonl").write_text("\n".join([*lines[:-1], torn]))
    redo = [url for url in urls if url not in "\n".join(lines[:-1])]
    before = server.request_count()

    report = run(urls, fast_settings(out))

    assert len(redo) == 1
    assert server.request_count() - before == 1
    assert {o.url: o.status for o in report.results}[redo[0]] is Status.OK
    records = read_manifest(out)
    assert sorted(str(r["url"]) for r in records) == sorted(urls)
    assert not (out / "manifest.rejected.txt").exists()  # half a record: not kept


def test_an_ok_record_whose_image_was_deleted_is_redone(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Resume trusts the manifest only while the image it names is still there."""
    urls = corpus_urls(server, corpus)[:2]
    out = tmp_path / "out"
    first = run(urls, fast_settings(out))
    (out / str(first.results[0].path)).unlink()
    before = server.request_count()

    again = run(urls, fast_settings(out))

    statuses = {o.url: o.status for o in again.results}
    assert statuses[first.results[0].url] is Status.OK
    assert statuses[first.results[1].url] is Status.SKIPPED
    assert server.request_count() - before == 1
    assert len(read_manifest(out)) == 2


# --- nothing is written outside the output folder -------------------------------------


def _cli_options(*extra: str) -> list[str]:
    return ["--no-progress", "--retries", "0", *extra]


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
    ("name", "is_folder", "extra"),
    [
        ("manifest.jsonl", False, ("--max-size", "64")),
        ("failed.txt", False, ("--max-size", "64")),
        (".lock", False, ("--max-size", "64")),
        (".manifest-updates.jsonl", False, ("--max-size", "64")),
        (".tmp", True, ("--max-size", "64")),
        ("originals", True, ("--keep-originals",)),
        ("32", True, ("--sizes", "32,64")),
    ],
)
@pytest.mark.parametrize("dangling", [False, True], ids=["to-file", "dangling"])
def test_a_link_at_a_name_the_run_writes_is_refused_before_anything_is_fetched(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    is_folder: bool,
    extra: tuple[str, ...],
    dangling: bool,
) -> None:
    """A symlink in OUT where the run writes a file or folder: exit 3, one line."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:2])
    outside, precious = _outside(tmp_path)
    target = outside / "missing" if dangling else (outside if is_folder else precious)
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(target)
    before = _snapshot(outside)

    code = main([str(url_list), "--out", str(out), *_cli_options(*extra)])

    err = capsys.readouterr().err.splitlines()
    assert code == 3
    assert len(err) == 1
    assert f"{out / name} is a symbolic link (to {target})" in err[0]
    assert _snapshot(outside) == before
    assert server.request_count() == 0
    assert (out / name).is_symlink()  # left for the user to look at


@pytest.mark.parametrize("name", [".manifest.jsonl.new", ".failed.txt.new"])
def test_a_link_left_at_a_temporary_name_is_removed_not_followed(
    server: LocalServer, corpus: Path, tmp_path: Path, name: str
) -> None:
    """Names only the tool uses for files being rewritten: a link there goes."""
    urls = corpus_urls(server, corpus)[:2]
    outside, precious = _outside(tmp_path)
    out = tmp_path / "out"
    run(urls, fast_settings(out))
    (out / name).symlink_to(precious)
    before = _snapshot(outside)

    report = run([*urls, corpus_urls(server, corpus)[2]], fast_settings(out))

    assert report.summary.counts.get(Status.FAILED, 0) == 0
    assert _snapshot(outside) == before
    assert not (out / name).exists()
    assert not (out / name).is_symlink()
    assert len(read_manifest(out)) == 3


# --- a gate: URLs that hang until the test opens it -----------------------------------

CLI = Path(__file__).resolve().parents[1] / "cli.py"
UPDATES = ".manifest-updates.jsonl"


# How long a gated request waits for the gate (a test opens it, or the server's
# teardown does): longer than any test waits, so a slow machine cannot end the hold.
GATE_S = 3 * WAIT_S


class GatedHandler(LocalHandler):
    """``/gate/NAME``: serves NAME once the server's gate is open (503 after GATE_S)."""

    def _gate(self, rest: str) -> None:
        server = self.server
        assert isinstance(server, GatedServer)
        if server.gate.wait(GATE_S):
            self._corpus_file(rest)
        else:
            self.send_bytes(503, b"gate closed\n", "text/plain")

    ROUTES: ClassVar[dict[str, Callable[[LocalHandler, str], None]]] = {
        **LocalHandler.ROUTES,
        "gate": _gate,  # type: ignore[dict-item]  # a GatedHandler method
    }


class GatedServer(LocalServer):
    """The local server with ``/gate/NAME`` routes, open while ``gate`` is set."""

    def __init__(self, corpus: Path) -> None:
        super().__init__(corpus)
        self.RequestHandlerClass = GatedHandler
        self.gate = threading.Event()
        self.gate.set()

    def server_close(self) -> None:
        """Let held requests go, then close."""
        self.gate.set()
        super().server_close()


@pytest.fixture
def gated(corpus: Path) -> Iterator[GatedServer]:
    """A gated server in a thread of the test process (gate open)."""
    with serve_in_thread(GatedServer(corpus)) as running:
        assert isinstance(running, GatedServer)
        yield running


def _command(url_list: Path, out: Path, size: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(CLI),
        str(url_list),
        "--out",
        str(out),
        "--threads",
        "4",
        "--procs",
        "2",
        "--per-host",
        "4",
        "--timeout",
        str(2 * GATE_S),
        *_cli_options("--max-size", str(size), *extra),
    ]


def _start(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@contextlib.contextmanager
def _reaped(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """Kill the run's whole session if the block fails, and always reap it."""
    try:
        yield
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=WAIT_S)


def _read_results(process: subprocess.Popen[bytes], count: int) -> None:
    """Read the run's ``--events -`` until ``count`` results (each already written)."""
    assert process.stdout is not None
    deadline = time.monotonic() + 2 * WAIT_S
    pending = b""
    seen = 0
    while seen < count:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([process.stdout], [], [], max(left, 0))
        assert ready, f"{seen} of {count} results in time"
        chunk = os.read(process.stdout.fileno(), 65536)
        assert chunk, f"the run ended after {seen} of {count} results"
        *lines, pending = (pending + chunk).split(b"\n")
        seen += sum(json.loads(line)["type"] == "result" for line in lines if line)


def _one_line_per_url(out: Path) -> dict[str, dict[str, object]]:
    """The manifest's records by URL, checking that no URL has two lines."""
    records = read_manifest(out)
    by_url = {str(r["url"]): r for r in records}
    assert len(by_url) == len(records), "a URL has two lines"
    return by_url


def test_a_rerun_killed_mid_way_leaves_one_line_per_url_and_loses_nothing(
    gated: GatedServer, corpus: Path, tmp_path: Path
) -> None:
    """kill -9 mid-rerun: one line per URL still; the next run redoes nothing done."""
    images = corpus_urls(gated, corpus)[:6]
    held = f"{gated.base_url}/gate/{images[0].rpartition('/')[2]}"
    gone = f"{gated.base_url}/status/404"
    urls = [*images, gone, held]
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"
    first = subprocess.run(
        _command(url_list, out, 64), capture_output=True, timeout=WAIT_S
    )
    assert first.returncode == 1, first.stderr  # the 404
    gated.gate.clear()
    # Other settings: every URL is redone; the gated one hangs, so the run cannot end.
    command = _command(url_list, out, 48, "--events", "-")
    rerun = _start(command)
    with _reaped(rerun):
        _read_results(rerun, len(urls) - 1)

        os.kill(rerun.pid, signal.SIGKILL)
        rerun.wait(timeout=WAIT_S)
        at_the_kill = _one_line_per_url(out)

    assert rerun.returncode == -signal.SIGKILL
    assert wait_gone(session_pids(rerun.pid)) == []
    assert sorted(at_the_kill) == sorted(urls)
    assert {r["status"] for r in at_the_kill.values()} == {"ok", "failed"}
    plan = dry_run(url_list, fast_settings(out, image=ImageSpec(max_size=48)))
    assert {item.url: item.action for item in plan.items} == {
        **dict.fromkeys(images, Action.SKIP),  # found in what the killed run left
        gone: Action.FETCH,
        held: Action.FETCH,
    }
    redone = {"/" + url.rpartition("/")[2] for url in images}
    before = {path: gated.request_count(path) for path in redone}
    gated.gate.set()

    last = subprocess.run(command, capture_output=True, timeout=WAIT_S)

    assert last.returncode == 1, last.stderr
    assert {path: gated.request_count(path) for path in redone} == before
    records = _one_line_per_url(out)
    assert sorted(records) == sorted(urls)
    assert {url: records[url]["status"] for url in images} == dict.fromkeys(
        images, "skipped"
    )
    assert records[held]["status"] == "ok"
    assert records[gone]["status"] == "failed"
    for url in images:
        with Image.open(out / str(records[url]["path"])) as image:
            assert max(image.size) <= 48
    assert not (out / UPDATES).exists()
    assert leftovers(out) == []
    assert (out / "failed.txt").read_text(encoding="utf-8").splitlines() == [gone]


@pytest.mark.parametrize(
    ("name", "code"),
    [(UPDATES, 3), ("failed.txt", 3), (".manifest.jsonl.new", 0)],
)
def test_a_link_planted_during_the_run_is_never_written_through(
    gated: GatedServer, corpus: Path, tmp_path: Path, name: str, code: int
) -> None:
    """A link made after the start checks: refused when its name is opened or
    written (exit 3, the link left as it was), or, at a temporary name, removed."""
    held = f"{gated.base_url}/gate/{corpus_urls(gated, corpus)[0].rpartition('/')[2]}"
    url_list = write_list(tmp_path / "urls.txt", [held])
    out = tmp_path / "out"
    options = _cli_options("--max-size", "64")
    assert main([str(url_list), "--out", str(out), *options]) == 0
    first = read_manifest(out)
    outside, _ = _outside(tmp_path)
    target = outside / "planted"
    gated.gate.clear()
    rerun = _start(_command(url_list, out, 48))
    with _reaped(rerun):
        gated.wait_for_requests(2)  # the run is past its checks, held at the gate
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(target)
        gated.gate.set()
        _, stderr = rerun.communicate(timeout=WAIT_S)

    assert rerun.returncode == code, stderr
    assert not target.exists()
    if code == 3:
        assert stderr.decode().splitlines() == [
            f"error: {out / name} is a symbolic link (to {target}): refused, since "
            "this tool reads and writes only inside the output folder; remove the "
            "link or choose another --out"
        ]
        assert (out / name).is_symlink()
    else:
        assert not (out / name).is_symlink()
    if name == UPDATES:  # refused before the record was written
        assert read_manifest(out) == first
    else:  # failed.txt is written last: the manifest has the rerun's record
        assert [r["status"] for r in read_manifest(out)] == ["ok"]
        assert read_manifest(out) != first


def test_duplicate_lines_left_by_an_older_version_are_merged(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A manifest with two lines for one URL comes out of the next run with one."""
    urls = corpus_urls(server, corpus)[:2]
    out = tmp_path / "out"
    run(urls, fast_settings(out))
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    manifest.write_text("".join([*lines, lines[0]]), encoding="utf-8")

    run([corpus_urls(server, corpus)[2]], fast_settings(out))

    assert len(_one_line_per_url(out)) == 3


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_a_file_of_the_users_at_tmp_is_refused_not_deleted(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
) -> None:
    """OUT/.tmp that is not a folder is someone's: exit 3, one line, left as it was
    (as at OUT/originals); the scratch inside a .tmp folder is still swept."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:2])
    out = tmp_path / "out"
    out.mkdir()
    if kind == "file":
        (out / ".tmp").write_text("my notes\n", encoding="utf-8")
    else:
        os.mkfifo(out / ".tmp")

    code = main([str(url_list), "--out", str(out), *_cli_options("--max-size", "64")])

    assert code == 3
    assert capsys.readouterr().err.splitlines() == [
        f"error: {out / '.tmp'} is not a folder: remove it or choose another --out "
        "(the tool writes there)"
    ]
    assert server.request_count() == 0
    if kind == "file":
        assert (out / ".tmp").read_text(encoding="utf-8") == "my notes\n"
    else:
        assert (out / ".tmp").is_fifo()
    assert not (out / "manifest.jsonl").exists()


SUMMARY = ("done: ", "  ")
"""How the lines of the summary a run prints on stderr start."""


def test_lines_that_are_not_records_are_kept_aside_with_a_warning(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A note, a non-record JSON line and a garbage line in the manifest: the rerun
    goes on, moves them (as they were) to manifest.rejected.txt with one warning,
    and leaves one record per line; a blank line just goes; the next run is quiet."""
    urls = corpus_urls(server, corpus)[:3]
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"
    options = [str(url_list), "--out", str(out), *_cli_options("--max-size", "64")]
    assert main(options) == 0
    capsys.readouterr()
    manifest = out / "manifest.jsonl"
    records = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    strangers = [
        "# batch of 3 March, from Ana\n",
        '{"comment": "checked by hand"}\n',
        "\u00e9t\u00e9 \x00\x01 {not json\n",
        # JSON, but no record: each crashed every later run before.
        "42\n",
        "[]\n",
        '{"url": 5, "status": "ok"}\n',
        "[" * 100_000 + "\n",
    ]
    mixed = (records[0], strangers[0], "\n", records[1], *strangers[1:], records[2])
    manifest.write_text("".join(mixed), encoding="utf-8")

    code = main(options)

    err = capsys.readouterr().err.splitlines()
    assert code == 0
    assert [line for line in err if not line.startswith(SUMMARY)] == [
        f"warning: {manifest}: 7 line(s) that are not records of this tool moved to "
        f"{out / 'manifest.rejected.txt'} (the manifest keeps one record per line)"
    ]
    rejected = out / "manifest.rejected.txt"
    assert rejected.read_text(encoding="utf-8") == "".join(strangers)
    assert sorted(_one_line_per_url(out)) == sorted(urls)
    assert {str(r["status"]) for r in read_manifest(out)} == {"skipped"}

    assert main(options) == 0

    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if not line.startswith(SUMMARY)] == []
    assert rejected.read_text(encoding="utf-8") == "".join(strangers)
    assert sorted(_one_line_per_url(out)) == sorted(urls)


def test_an_unterminated_last_line_that_is_not_a_record_is_kept_too(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Only half a record is taken for a crash's torn line; a note without a final
    newline is kept aside like any other line that is not a record."""
    urls = corpus_urls(server, corpus)[:2]
    out = tmp_path / "out"
    run(urls, fast_settings(out))
    manifest = out / "manifest.jsonl"
    with manifest.open("a", encoding="utf-8") as text:
        text.write("todo: add the April list")

    report = run(urls, fast_settings(out))

    assert [o.status for o in report.results] == [Status.SKIPPED] * 2
    rejected = out / "manifest.rejected.txt"
    assert rejected.read_text(encoding="utf-8") == "todo: add the April list\n"
    assert sorted(_one_line_per_url(out)) == sorted(urls)
