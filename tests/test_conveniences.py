"""The conveniences, from the CLI and from Python: --events, --dry-run, --quiet and
--verbose, --json, --header, the TOML config, --insecure and --block-private."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing.forkserver
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import downloader
from downloader import (
    EventStream,
    HttpSettings,
    InputError,
    Mode,
    Settings,
    Status,
    dry_run,
    iter_results,
)
from downloader.cli import load_settings, main
from downloader.demo import serve_in_thread
from downloader.dryrun import Action
from downloader.fetch import _pools, make_client
from downloader.progress import Bars, BarsHandler, EventKind, ProgressEvent
from downloader.records import Outcome, Stage
from downloader.settings import LOCAL_MODES
from tests.helpers import (
    LocalServer,
    corpus_urls,
    fast_settings,
    read_manifest,
    write_list,
)

QUICK = ["--no-progress", "--threads", "2", "--procs", "1", "--retries", "0"]
QUICK += ["--no-config"]
FAST = [*QUICK, "--max-size", "32"]


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def two_good_one_404(server: LocalServer, corpus: Path, tmp_path: Path) -> Path:
    """A list of two corpus URLs and one that answers 404."""
    urls = [*corpus_urls(server, corpus)[:2], f"{server.base_url}/status/404"]
    return write_list(tmp_path / "urls.txt", urls)


# ------------------------------------------------------------------------ events


def test_events_file_has_steps_results_and_summary(
    two_good_one_404: Path, tmp_path: Path
) -> None:
    """--events writes start, started/finished per stage, a result per URL, summary."""
    events = tmp_path / "events.jsonl"

    code = main(
        [
            str(two_good_one_404),
            "--out",
            str(tmp_path / "o"),
            "--events",
            str(events),
            *FAST,
        ]
    )

    lines = _lines(events)
    types = [line["type"] for line in lines]
    results = [line for line in lines if line["type"] == "result"]
    finished = [
        line
        for line in lines
        if line["type"] == "finished" and line["stage"] == "download"
    ]
    assert code == 1
    assert types[0] == "start"
    assert types[-1] == "summary"
    assert sorted(r["status"] for r in results) == ["failed", "ok", "ok"]
    assert any(r.get("error") == "HTTP 404" for r in results)
    assert len(finished) == 3
    assert sum(1 for f in finished if f["bytes"] > 0) == 2
    assert {line["stage"] for line in lines if line["type"] == "started"} == {
        "download",
        "transform",
    }
    assert all(isinstance(line["time"], float) for line in lines)
    assert all("lane" in line for line in lines if line["type"] == "started")
    assert lines[-1]["counts"] == {"ok": 2, "failed": 1, "skipped": 0}


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_events_name_each_item_the_same_way_in_every_kind(
    mode: Mode, two_good_one_404: Path, tmp_path: Path
) -> None:
    """started, finished and result lines all carry index and url, and they agree
    (started/finished had no url, result no index); a line that reached no stage
    has index null."""
    with two_good_one_404.open("a") as listing:
        listing.write("not a url\n")
    events = tmp_path / "events.jsonl"
    argv = [str(two_good_one_404), "--out", str(tmp_path / "o"), "--mode", mode.value]

    main([*argv, "--events", str(events), *FAST])

    lines = [
        line for line in _lines(events) if line["type"] not in ("start", "summary")
    ]
    assert {line["type"] for line in lines} == {"started", "finished", "result"}
    assert all({"index", "url"} <= line.keys() for line in lines)
    pairs = {(line["index"], line["url"]) for line in lines}
    assert pairs == {(None, "not a url")} | {
        (n, url) for n, url in enumerate(two_good_one_404.read_text().split()[:3])
    }


def test_events_dash_goes_to_stdout(
    two_good_one_404: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--events - writes the JSON lines on standard output."""
    main([str(two_good_one_404), "--out", str(tmp_path / "o"), "--events", "-", *FAST])

    out = capsys.readouterr().out
    assert [json.loads(line)["type"] for line in out.splitlines()].count("result") == 3


def test_event_stream_is_flushed_per_line_from_python(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """From Python: each line is on disk as soon as it is written, before close."""
    path = tmp_path / "events.jsonl"
    urls = corpus_urls(server, corpus)[:2]
    with EventStream.open(path) as stream:
        seen_during_run = [
            len(path.read_text().splitlines())
            for _ in iter_results(urls, fast_settings(tmp_path / "o"), events=stream)
        ]

    assert seen_during_run[0] >= 4  # start, started, finished(download), ..., result
    types = [line["type"] for line in _lines(path)]
    assert types.count("result") == 2  # written by the library, as for --events
    assert (types[0], types[-1]) == ("start", "summary")


def test_event_stream_stops_quietly_when_its_file_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A write error ends the stream with one warning instead of failing the run."""

    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

    stream = EventStream(Full())
    event = ProgressEvent(Stage.DOWNLOAD, EventKind.STARTED, 0, "thread-0", 1.0)

    with caplog.at_level(logging.WARNING, logger="downloader"):
        stream(event)
        stream(event)
    stream.close()

    assert stream.error is not None
    assert "No space left" in stream.error
    assert len(caplog.records) == 1


def test_bars_handler_prints_log_lines_above_the_bars() -> None:
    """BarsHandler sends records through Bars.write, with the level for warnings."""
    screen = io.StringIO()
    logger = logging.getLogger("downloader.test-bars")
    with Bars(file=screen, disable=True) as bars:
        handler = BarsHandler(bars.write)
        logger.addHandler(handler)
        try:
            logger.warning("disk is %s", "slow")
        finally:
            logger.removeHandler(handler)

    assert screen.getvalue() == "warning: disk is slow\n"


# ----------------------------------------------------------------------- dry run


def test_dry_run_plans_without_network_or_writes(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--dry-run lists fetches, invalid lines and duplicates; no request, no folder."""
    good = corpus_urls(server, corpus)[:2]
    url_list = write_list(tmp_path / "urls.txt", [good[0], "ftp://x/y", good[0], *good])
    out = tmp_path / "never"

    code = main([str(url_list), "--out", str(out), "--dry-run", *FAST])

    printed = capsys.readouterr().out
    host = server.base_url.removeprefix("http://")
    assert code == 1
    assert not out.exists()
    assert sum(server.requests.values()) == 0
    assert f"line 1: fetch {good[0]} -> {out}/" in printed
    assert "line 2: invalid ftp://x/y -- unsupported scheme 'ftp'" in printed
    assert "line 3: duplicate" in printed
    assert "(same as line 1)" not in printed
    assert "same as line 1" in printed
    assert f"per host: {host} 2" in printed


def test_dry_run_shows_skips_and_leaves_the_manifest_alone(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """From Python: URLs already ok are 'skip'; the manifest is only read."""
    urls = corpus_urls(server, corpus)[:3]
    settings = fast_settings(tmp_path / "o")
    downloader.run(urls[:2], settings)
    manifest = tmp_path / "o" / "manifest.jsonl"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    requests_before = sum(server.requests.values())

    plan = dry_run(urls, settings)

    assert [item.action for item in plan.items] == [
        Action.SKIP,
        Action.SKIP,
        Action.FETCH,
    ]
    assert plan.ok
    assert plan.items[2].path is not None
    assert plan.items[2].path.endswith(".jpg")
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before
    assert sum(server.requests.values()) == requests_before


def test_dry_run_json_exits_0_for_a_clean_list(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--dry-run --json prints the plan as JSON; all lines usable means exit 0."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:2])

    code = main(
        [
            str(url_list),
            "--out",
            str(tmp_path / "o"),
            "--dry-run",
            "--json",
            *QUICK,
            "--sizes",
            "16,32",
        ]
    )

    plan = json.loads(capsys.readouterr().out)
    assert code == 0
    assert plan["ok"] is True
    assert plan["counts"]["fetch"] == 2
    assert plan["items"][0]["outputs"][0].startswith("16/")


# ------------------------------------------------------------ logging and --json


def test_quiet_prints_nothing_and_verbose_names_each_failure(
    two_good_one_404: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quiet: one line saying how many failed and where they are listed; default:
    the summary; --verbose: settings and each failure."""
    base = [str(two_good_one_404), *FAST]

    quiet = main([*base, "--out", str(tmp_path / "q"), "--quiet"])
    quiet_err = capsys.readouterr().err
    default = main([*base, "--out", str(tmp_path / "d")])
    default_err = capsys.readouterr().err
    verbose = main([*base, "--out", str(tmp_path / "v"), "--verbose"])
    verbose_err = capsys.readouterr().err

    assert (quiet, default, verbose) == (1, 1, 1)
    assert (
        quiet_err
        == f"failed: 1 of 3 URLs (listed in {tmp_path / 'q' / 'failed.txt'})\n"
    )
    assert (tmp_path / "q" / "failed.txt").read_text().count("\n") == 1
    again = main([*base, "--out", str(tmp_path / "q"), "--quiet"])
    assert again == 1
    assert capsys.readouterr().err == quiet_err  # the rerun still has one failure
    assert "done: 3 URLs" in default_err
    assert "/status/404: HTTP 404" not in default_err
    assert "mode pipeline: 2 threads in 1 download process(es), 1 worker" in verbose_err
    assert f"failed {two_good_one_404.read_text().split()[2]}: HTTP 404" in verbose_err


def test_json_summary_on_stdout(
    two_good_one_404: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints one JSON object with the totals on stdout, no text summary."""
    code = main([str(two_good_one_404), "--out", str(tmp_path / "o"), "--json", *FAST])

    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert code == 1
    assert summary["counts"] == {"ok": 2, "failed": 1, "skipped": 0}
    assert summary["images"] == 2
    assert summary["bytes"] > 0
    assert summary["failure_reasons"] == {"HTTP 404": 1}
    assert summary["interrupted"] is False
    assert summary["out"] == str(tmp_path / "o")
    assert {"wall_s", "cpu_s", "images_per_s"} <= summary.keys()
    assert "done:" not in captured.err


def test_json_with_compare_prints_the_comparison(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--compare --json prints comparison.json's figures on stdout."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:2])

    code = main(
        [
            str(url_list),
            "--out",
            str(tmp_path / "o"),
            "--compare",
            "--json",
            *FAST,
            "--modes",
            "sequential",
            "--quiet",
        ]
    )

    figures = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [mode["mode"] for mode in figures["modes"]] == ["sequential"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--events", "-", "--json"], "both write to stdout"),
        (["--dry-run", "--compare"], "do not go together"),
        (["--events", "e.jsonl", "--compare"], "does not go with --compare"),
        (["--quiet", "--verbose"], "not allowed with argument"),
    ],
)
def test_conflicting_flags_exit_2(
    flags: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Flags that cannot go together are a usage error, before anything runs."""
    monkeypatch.chdir(tmp_path)
    write_list(tmp_path / "urls.txt", ["http://127.0.0.1:9/a.jpg"])

    code = main(["urls.txt", "--out", "o", "--no-config", *flags])

    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------- headers


def test_headers_reach_the_server(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """--header adds request headers and replaces a default one of the same name."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:1])

    code = main(
        [
            str(url_list),
            "--out",
            str(tmp_path / "o"),
            *FAST,
            "--header",
            "X-Token: s3cret",
            "--header",
            "User-Agent: tester/1",
        ]
    )

    headers = server.request_headers[-1]
    assert code == 0
    assert headers["x-token"] == "s3cret"
    assert headers["user-agent"] == "tester/1"


@pytest.mark.parametrize(
    ("header", "message"),
    [("NoColon", "not a header: 'NoColon'"), ("Bad Name: x", "not a header")],
)
def test_bad_header_is_a_usage_error(
    header: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A header without 'Name: value' shape exits 2 with the flag named."""
    code = main(["urls.txt", "--out", str(tmp_path / "o"), "--header", header, *FAST])

    assert code == 2
    assert f"--header: {message}" in capsys.readouterr().err


def test_headers_are_checked_from_python() -> None:
    """HttpSettings refuses a header name that is not a token, or a line break."""
    with pytest.raises(InputError, match="not a valid HTTP token"):
        HttpSettings(headers=[("Bad Name", "x")])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="line break"):
        HttpSettings(headers=(("X-A", "1\r\nX-B: 2"),))


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--demo-count", "5"], "error: --demo-count goes with --demo"),
        (["--demo-latency", "0"], "error: --demo-latency goes with --demo"),
        (["--compare", "--mode", "threads"], "error: --compare runs --modes"),
        (["--compare", "--mode=pipeline"], "error: --compare runs --modes"),
        (
            ["--mode", "threads", "--download-procs", "2"],
            "error: --download-procs applies to --mode pipeline",
        ),
        (["--mode=async", "--item-timeout", "5"], "error: --item-timeout applies to"),
    ],
)
def test_a_flag_that_would_be_ignored_is_refused(
    flags: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--demo-count without --demo, --mode with --compare: exit 2 instead of being
    silently ignored. The same values from a config file are defaults: no error."""
    monkeypatch.chdir(tmp_path)
    write_list(tmp_path / "urls.txt", ["http://127.0.0.1:9/a.jpg"])
    (tmp_path / "c.toml").write_text('demo-count = 5\nmode = "threads"\n')

    typed = main(["urls.txt", "--dry-run", "--no-config", *flags])
    typed_err = capsys.readouterr().err
    from_file = main(["urls.txt", "--dry-run", "--config", "c.toml"])

    assert typed == 2
    assert typed_err.startswith(message)
    assert from_file == 0


@pytest.mark.parametrize(
    "flags",
    [
        ["--insecure"],
        ["--proxy", "http://127.0.0.1:9"],
        ["--user-agent", "me/1"],
        ["--rate-per-host", "2/s"],
        ["--header", "X-A: 1"],
    ],
)
def test_download_flags_with_local_files_are_refused(
    flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--input-dir downloads nothing: a download flag with it would be ignored (and
    --insecure warned that TLS was off and marked local files insecure)."""
    folder = tmp_path / "in"
    folder.mkdir()
    out = tmp_path / "out"

    code = main(["--input-dir", str(folder), "--out", str(out), "--no-config", *flags])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {flags[0]} is for downloads; --input-dir reads")
    assert not out.exists()


def test_merge_parts_refuses_the_options_it_would_ignore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--merge-parts with --format, --threads or --force: refused, not ignored."""
    codes = [
        main(["--merge-parts", "--out", str(tmp_path), "--no-config", *flags])
        for flags in (["--format", "png"], ["--threads", "3"], ["--force"])
    ]

    err = capsys.readouterr().err.splitlines()
    assert codes == [2, 2, 2]
    assert [line.split(", not ")[1].split(";")[0] for line in err] == [
        "--format",
        "--threads",
        "--force",
    ]


def test_verbose_names_the_config_file_and_header_is_a_key(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """./downloader.toml applied: -v says so (it was applied without a word); its
    headers key also takes the flag's own name, header."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "downloader.toml").write_text('header = ["X-From: config"]\n')
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:1])

    code = main([str(url_list), "--out", "o", "-v", *QUICK[:-1]])

    assert code == 0
    assert "defaults from downloader.toml (flags win)" in capsys.readouterr().err
    assert server.request_headers[-1]["x-from"] == "config"


def test_config_file_sets_defaults_and_flags_win(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """./downloader.toml gives defaults; a flag replaces the file's value."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "downloader.toml").write_text(
        'format = "png"\nsize = "20x10"\nthreads = 2\nprocs = 1\nretries = 0\n'
        'headers = ["X-From: config", "X-Both: config"]\nno-progress = true\n'
    )
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:1])

    code = main(
        [
            str(url_list),
            "--out",
            "o",
            "--max-size",
            "16",
            "--header",
            "X-Both: flag",
            "--quality",
            "70",
        ]
    )

    record = read_manifest(tmp_path / "o")[0]
    headers = server.request_headers[-1]
    assert code == 0
    assert str(record["path"]).endswith(".png")
    assert max(int(str(record["width"])), int(str(record["height"]))) == 16
    assert (headers["x-from"], headers["x-both"]) == ("config", "flag")


def test_load_settings_from_python(tmp_path: Path) -> None:
    """load_settings reads a config file into the Settings the CLI would use."""
    config = tmp_path / "c.toml"
    config.write_text('threads = 3\nmax-bytes = "2M"\ninsecure = true\n')

    settings = load_settings(config)

    assert settings.threads == 3
    assert settings.http.max_bytes == 2 * 1024**2
    assert settings.http.verify is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("thread = 4\n", "unknown key 'thread' (did you mean 'threads'?)"),
        ("threads = 0\n", "threads must be an integer from 1 to 1024, got 0"),
        ('threads = "8"\n', "threads must be an integer from 1 to 1024, got '8' (str)"),
        ('format = "tiff"\n', "format: 'tiff' is not one of"),
        ('insecure = "yes"\n', "insecure: expected true or false"),
        ("[download]\nretries = 1\n", "[download] is a table"),
        ("threads = \n", "not valid TOML"),
        ("size = 10\nmax-size = 20\n", "exclude each other"),
        (b"threads = 4 # caf\xe9\n", "not valid TOML: not UTF-8 (byte 17)"),
    ],
)
def test_bad_config_exits_2_naming_the_key(
    text: str | bytes,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unknown key, a bad value or a table: exit 2 with the file and key named."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "downloader.toml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())

    code = main(["urls.txt", "--dry-run"])

    err = capsys.readouterr().err
    assert code == 2
    assert "error: config downloader.toml" in err
    assert message in err


def test_missing_config_and_no_config(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A named config must exist; --no-config ignores ./downloader.toml."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "downloader.toml").write_text("bogus = 1\n")
    write_list(tmp_path / "urls.txt", ["http://127.0.0.1:9/a.jpg"])

    missing = main(["urls.txt", "--dry-run", "--config", "nope.toml"])
    ignored = main(["urls.txt", "--dry-run", "--no-config"])

    assert (missing, ignored) == (2, 0)
    assert "error: cannot read config nope.toml" in capsys.readouterr().err


# ---------------------------------------------------------------------- insecure


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def tls_server(corpus: Path, tls_files: tuple[Path, Path]) -> Iterator[LocalServer]:
    """The corpus served over https with a certificate nobody trusts."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*tls_files)
    httpd = LocalServer(corpus)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    with serve_in_thread(httpd) as running:
        assert isinstance(running, LocalServer)
        yield running


def test_tls_is_verified_unless_insecure(
    tls_server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A self-signed https server fails; --insecure fetches, warns, and records it."""
    urls = [u.replace("http://", "https://") for u in corpus_urls(tls_server, corpus)]
    url_list = write_list(tmp_path / "urls.txt", urls[:1])

    verified = main([str(url_list), "--out", str(tmp_path / "v"), *FAST])
    verified_err = capsys.readouterr().err
    insecure = main([str(url_list), "--out", str(tmp_path / "i"), "--insecure", *FAST])
    insecure_err = capsys.readouterr().err

    assert verified == 1
    assert "CERTIFICATE_VERIFY_FAILED" in verified_err
    assert "insecure" not in read_manifest(tmp_path / "v")[0]
    assert insecure == 0
    assert "warning: TLS certificate verification is OFF" in insecure_err
    assert read_manifest(tmp_path / "i")[0]["insecure"] is True


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_the_ca_bundle_is_loaded_at_the_first_handshake_and_trusts_as_httpx(
    tls_server: LocalServer,
    tls_files: tuple[Path, Path],
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    mode: Mode,
) -> None:
    """A client loads no CA until its first TLS handshake (a run of http:// URLs
    never pays for it); then it trusts what httpx trusts: ``SSL_CERT_FILE`` names
    the self-signed certificate, and the https fetch that fails without it passes.
    Set after the forkserver started (the suite's, as a Python caller's own): the
    workers are given the run's own variables, not the forkserver's older ones."""
    assert getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    with make_client(HttpSettings(), 1) as client:
        [pool] = _pools(client)
        assert pool._ssl_context.cert_store_stats()["x509_ca"] == 0
        assert pool._ssl_context._made is None
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))
    urls = [u.replace("http://", "https://") for u in corpus_urls(tls_server, corpus)]
    url_list = write_list(tmp_path / "urls.txt", urls[:2])

    code = main(
        [str(url_list), "--out", str(tmp_path / "t"), "--mode", mode.value, *FAST]
    )

    assert code == 0, capsys.readouterr().err
    assert [r["status"] for r in read_manifest(tmp_path / "t")] == ["ok", "ok"]


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_a_ca_bundle_that_cannot_be_loaded_fails_each_https_url_saying_so(
    tls_server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    mode: Mode,
) -> None:
    """``SSL_CERT_FILE`` naming no file: each https URL fails once (not retried),
    saying which bundle could not be loaded, in every mode alike; http is unharmed."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "no-such-bundle.pem"))
    urls = corpus_urls(tls_server, corpus)[:2]
    url_list = write_list(
        tmp_path / "urls.txt", [u.replace("http://", "https://") for u in urls]
    )

    argv = [str(url_list), "--out", str(tmp_path / "t"), "--mode", mode.value, *FAST]
    code = main([*argv, "--retries", "2"])

    assert code == 1, capsys.readouterr().err
    records = read_manifest(tmp_path / "t")
    assert len(records) == 2
    for record in records:
        assert record["status"] == "failed"
        assert str(record["error"]).startswith(
            "cannot load the CA bundle (SSL_CERT_FILE="
        )
        assert "no-such-bundle.pem" in str(record["error"])
        assert record["attempts"] == 1


def test_insecure_from_python_is_recorded(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """HttpSettings(verify=False) marks every requested URL's record, failed too."""
    http = HttpSettings(timeout=5, deadline=20, retries=0, verify=False)
    settings = fast_settings(tmp_path / "o", http=http)
    urls = [*corpus_urls(server, corpus)[:2], f"{server.base_url}/status/404"]

    report = downloader.run([*urls, "not a url"], settings)

    by_url = {r.url: r for r in report.results}
    assert [by_url[url].insecure for url in urls] == [True, True, True]
    assert by_url["not a url"].insecure is None
    assert sum(r.get("insecure") is True for r in read_manifest(tmp_path / "o")) == 3


# ----------------------------------------------------------------- block-private


def test_block_private_refuses_loopback_and_is_off_by_default(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """--block-private fails loopback URLs unsent; by default they are fetched."""
    url = corpus_urls(server, corpus)[0]
    by_name = url.replace("127.0.0.1", "localhost")
    url_list = write_list(tmp_path / "urls.txt", [url, by_name])

    blocked = main(
        [str(url_list), "--out", str(tmp_path / "b"), "--block-private", *FAST]
    )
    requests_when_blocked = sum(server.requests.values())
    allowed = main([str(url_list), "--out", str(tmp_path / "a"), *FAST])

    errors = sorted(str(r["error"]) for r in read_manifest(tmp_path / "b"))
    assert blocked == 1
    assert requests_when_blocked == 0
    assert all(e.startswith("blocked address ") for e in errors)
    assert "blocked address 127.0.0.1 (loopback, --block-private)" in errors
    assert allowed == 0


def test_block_private_from_python_in_async_mode(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """HttpSettings(block_private=True) refuses loopback in the asyncio mode too."""
    http = HttpSettings(timeout=5, deadline=20, retries=0, block_private=True)
    settings = fast_settings(tmp_path / "o", http=http, mode=downloader.Mode.ASYNC)

    report = downloader.run(corpus_urls(server, corpus)[:1], settings)

    assert report.results[0].status is Status.FAILED
    assert str(report.results[0].error).startswith("blocked address 127.0.0.1")
    assert sum(server.requests.values()) == 0


# ------------------------------------------------------------------------ exports


def test_public_names_are_exported() -> None:
    """The package exports the input types, ResizeMode and the new names."""
    for name in (
        "LocalFiles",
        "UrlList",
        "InputFormat",
        "ResizeMode",
        "EventStream",
        "dry_run",
        "DryRun",
    ):
        assert name in downloader.__all__
        assert getattr(downloader, name) is not None
    assert isinstance(Settings(), Settings)
    assert Outcome(url="u", status=Status.OK, insecure=True).to_json()["insecure"]
