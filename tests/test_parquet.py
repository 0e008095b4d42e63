"""``--parquet``: ``OUT/manifest.parquet``, one row per manifest record, in every mode.

Runs go against the loopback corpus server with lists that hold ok URLs, failures
and extra columns of different shapes; the index is read back with pyarrow and
compared with the manifest's records read back as JSON. Without pyarrow is a real
interpreter whose site folder lacks it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from downloader import iter_results, run
from downloader.cli import main
from downloader.errors import InputError
from downloader.parquet_index import INDEX_NAME
from downloader.records import Status
from downloader.runtime import Cancellation
from downloader.settings import LOCAL_MODES, ImageSpec, Mode, Part
from tests.conftest import RayCluster
from tests.helpers import (
    WAIT_S,
    LocalServer,
    corpus_urls,
    fast_settings,
    read_manifest,
    write_list,
)
from tests.test_ray import ray_settings

ROOT = Path(__file__).resolve().parents[1]
MISSING = "error: --parquet needs pyarrow, which is not installed: " + (
    "pip install 'downloader[parquet]'"
)


def _entries(server: LocalServer, corpus: Path) -> list[dict[str, Any]]:
    """JSON Lines entries: ok URLs and failures, extra fields of several shapes."""
    urls = corpus_urls(server, corpus)
    return [
        {"url": urls[0], "caption": "a cat", "tags": [1, "two", None]},
        {"url": urls[1], "score": 7, "meta": {"licence": "CC BY", "n": 1.5}},
        {"url": urls[2]},
        {"url": server.url_for("status/404"), "caption": "gone"},
        {"url": server.url_for("noise/x.jpg"), "flag": True},
        {"url": "ftp://example.invalid/a.jpg", "caption": None},
    ]


def _write_jsonl(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    return path


def _index_rows(out: Path) -> list[dict[str, Any]]:
    """The index's rows as records: nulls dropped, ``extra`` parsed from its text."""
    rows = []
    for row in pq.read_table(out / INDEX_NAME).to_pylist():
        record = {name: value for name, value in row.items() if value is not None}
        if "extra" in record:
            record["extra"] = json.loads(record["extra"])
        rows.append(record)
    return rows


def _assert_index_is_manifest(out: Path, inputs: int) -> list[dict[str, Any]]:
    """One row per input, each equal to its manifest record, in the same order."""
    manifest = read_manifest(out)
    rows = _index_rows(out)
    assert len(manifest) == inputs
    assert rows == manifest
    assert len({row["url"] for row in rows}) == inputs
    return rows


@pytest.mark.parametrize("mode", LOCAL_MODES, ids=lambda m: m.value)
def test_index_is_the_manifest_after_a_run_and_a_rerun(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Every mode writes the index at the end; a rerun that redoes some URLs and
    adds others rebuilds it: still one row per URL, equal to the manifest."""
    out = tmp_path / "out"
    entries = _entries(server, corpus)
    first = _write_jsonl(tmp_path / "first.jsonl", entries)

    report = run(first, fast_settings(out, mode=mode, parquet=True))

    rows = _assert_index_is_manifest(out, len(entries))
    assert [r.status.value for r in report.results].count("ok") == 3
    extras = {row["url"]: row.get("extra") for row in rows}
    assert [extras[e["url"]] for e in entries] == [
        {"caption": "a cat", "tags": [1, "two", None]},
        {"score": 7, "meta": {"licence": "CC BY", "n": 1.5}},
        None,
        {"caption": "gone"},
        {"flag": True},
        {"caption": None},
    ]
    assert {row["status"] for row in rows} == {"ok", "failed"}
    # The rerun: new image settings redo the ok URLs, failures are retried, and a
    # URL of the corpus is new; the first list's entries all stay in the manifest.
    added = {"url": corpus_urls(server, corpus)[3], "caption": "new"}
    second = _write_jsonl(tmp_path / "second.jsonl", [*entries[:4], added])

    small = ImageSpec(max_size=4)
    run(second, fast_settings(out, mode=mode, parquet=True, image=small))

    rows = _assert_index_is_manifest(out, len(entries) + 1)
    assert {row["width"] for row in rows if row["status"] == "ok"} <= {1, 2, 3, 4}


def test_ray_mode_writes_the_index_too(
    ray_cluster: RayCluster, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """``--mode ray`` (the session's local Ray): the driver's manifest is indexed
    when the run ends, and again after a rerun that adds URLs."""
    out = tmp_path / "out"
    entries = _entries(server, corpus)
    url_list = _write_jsonl(tmp_path / "list.jsonl", entries)

    run(url_list, ray_settings(out, parquet=True))

    _assert_index_is_manifest(out, len(entries))
    added = [{"url": url} for url in corpus_urls(server, corpus)[3:5]]
    run(_write_jsonl(url_list, [*entries, *added]), ray_settings(out, parquet=True))
    _assert_index_is_manifest(out, len(entries) + 2)


def test_a_stopped_run_indexes_every_input(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Ctrl-C (a cancel) after the first record: every input has a record then
    (``not started`` for the rest), and the index holds them all."""
    out = tmp_path / "out"
    urls = corpus_urls(server, corpus)
    cancel = Cancellation()

    for outcome in iter_results(
        urls, fast_settings(out, parquet=True, threads=1), cancel=cancel
    ):
        cancel.set("test stop")
        assert outcome.url in urls

    rows = _assert_index_is_manifest(out, len(urls))
    assert any("not started" in row.get("error", "") for row in rows)


def test_a_caller_that_leaves_early_still_gets_the_index(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Leaving ``iter_results`` after one record stops the run as Ctrl-C does; the
    index is written before ``close()`` returns."""
    out = tmp_path / "out"
    urls = corpus_urls(server, corpus)

    with contextlib.closing(iter_results(urls, fast_settings(out, parquet=True))) as it:
        next(it)

    _assert_index_is_manifest(out, len(urls))


def test_merged_parts_are_indexed_once_per_url(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two parts, then ``--merge-parts``, with ``parquet = true`` in the config file:
    the parts leave the index to the merge, which indexes the merged manifest. A
    part refuses a typed ``--parquet`` (its records are a share of the folder's)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "downloader.toml").write_text("parquet = true\nprocs = 1\n")
    entries = _entries(server, corpus)
    url_list = str(_write_jsonl(tmp_path / "list.jsonl", entries))
    with pytest.raises(InputError, match="--parquet does not go with --part"):
        fast_settings(tmp_path, part=Part(1, 2), parquet=True)
    assert main([url_list, "--part", "1/2", "--parquet", "--out", "out"]) == 2
    assert capsys.readouterr().err.startswith("error: --parquet indexes a run's")
    codes = [main([url_list, "--part", f"{k}/2", "--out", "out", "-q"]) for k in (1, 2)]
    assert set(codes) <= {0, 1}
    assert not (tmp_path / "out" / INDEX_NAME).exists()
    # A link at the index's name: refused before anything is merged, as a run
    # refuses it before fetching.
    link = tmp_path / "out" / INDEX_NAME
    link.symlink_to(tmp_path / "elsewhere.parquet")
    assert main(["--merge-parts", "--out", "out", "-q"]) == 3
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
    link.unlink()
    capsys.readouterr()

    code = main(["--merge-parts", "--out", "out", "--json", "-q"])

    assert code == 1  # some URLs failed
    assert json.loads(capsys.readouterr().out)["index"] == str(Path("out", INDEX_NAME))
    _assert_index_is_manifest(tmp_path / "out", len(entries))


def test_parquet_only_rebuilds_from_the_folder_and_new_fields_become_columns(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Fields this version does not write (a newer version's ``shard``/``key``)
    become columns of their own type, or of JSON text when mixed; a known field
    edited to a wrong type keeps its values as JSON text; notes are not rows."""
    out = tmp_path / "out"
    entries = _entries(server, corpus)
    run(_write_jsonl(tmp_path / "list.jsonl", entries), fast_settings(out))
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    for number, record in enumerate(records):
        if record["status"] == "ok":
            record.update(shard="00000.tar", key=f"{number:09d}", row=number)
        record["mixed"] = number if number % 2 else f"n{number}"
    records[0]["width"] = "wide"  # by hand
    (out / "manifest.jsonl").write_text(
        "# a note\n" + "".join(json.dumps(r) + "\n" for r in records),
        encoding="utf-8",
    )

    code = main(["--parquet-only", "--out", str(out), "--no-config"])

    assert code == 0
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {out / 'manifest.jsonl'}: field 'width' has values that are not "
        f"integer (edited by hand?): its column in {INDEX_NAME} holds each value's "
        "JSON text",
        f"indexed {len(entries)} records of {out / 'manifest.jsonl'} "
        f"in {out / INDEX_NAME}",
    ]
    schema = pq.read_schema(out / INDEX_NAME)
    assert schema.names[:3] == ["url", "status", "line"]
    assert schema.field("shard").type == pa.string()
    assert schema.field("key").type == pa.string()
    assert schema.field("row").type == pa.int64()
    assert schema.field("mixed").type == pa.string()
    assert schema.field("width").type == pa.string()
    assert schema.field("height").type == pa.int64()
    table = pq.read_table(out / INDEX_NAME).to_pylist()
    assert [row["shard"] for row in table] == [r.get("shard") for r in records]
    assert [row["row"] for row in table] == [r.get("row") for r in records]
    assert [json.loads(row["mixed"]) for row in table] == [r["mixed"] for r in records]
    assert json.loads(table[0]["width"]) == "wide"


def test_unicode_that_is_not_text_is_written_escaped(tmp_path: Path) -> None:
    """A caller's URL with a lone surrogate fails (before any request) with a record
    that keeps it; Arrow text is UTF-8, so the index holds its escape."""
    out = tmp_path / "out"

    report = run(["http://127.0.0.1:9/a\udcff.jpg"], fast_settings(out, parquet=True))

    assert report.summary.counts[Status.FAILED] == 1
    (record,) = read_manifest(out)
    (row,) = pq.read_table(out / INDEX_NAME).to_pylist()
    url = str(record["url"])
    assert "\udcff" in url
    assert row["url"] == url.encode("utf-8", "backslashreplace").decode()


def test_the_index_is_replaced_whole_never_rewritten_in_place(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A reader that opened the old index still reads it whole after a rebuild
    (a rename replaced it), and no temporary file is left."""
    out = tmp_path / "out"
    urls = corpus_urls(server, corpus)
    run(urls[:2], fast_settings(out, parquet=True))
    with (out / INDEX_NAME).open("rb") as old:
        run(urls[:4], fast_settings(out, parquet=True))

        assert pq.read_table(old).num_rows == 2
    assert pq.read_table(out / INDEX_NAME).num_rows == 4
    assert sorted(p.name for p in out.iterdir() if "parquet" in p.name) == [INDEX_NAME]


def test_batches_bound_what_is_held_and_split_row_groups(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The index is written a batch at a time (one row group each), each batch
    converted a few rows at a time: the rows are the same as in one batch."""
    monkeypatch.setattr("downloader.parquet_index.BATCH_ROWS", 5)
    monkeypatch.setattr("downloader.parquet_index.CONVERT_ROWS", 2)
    out = tmp_path / "out"
    urls = corpus_urls(server, corpus)

    run(urls, fast_settings(out, parquet=True))

    assert pq.ParquetFile(out / INDEX_NAME).num_row_groups == -(-len(urls) // 5)
    _assert_index_is_manifest(out, len(urls))


def test_wide_rows_end_a_batch_by_their_bytes_not_only_their_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows with large extras: a batch (a row group) ends once its JSON text reaches
    the byte budget, long before the row count; the rows are all there, in order."""
    monkeypatch.setattr("downloader.parquet_index.BATCH_BYTES", 50_000)
    monkeypatch.setattr("downloader.parquet_index.CONVERT_BYTES", 25_000)
    entries = [
        {"url": f"http://example.invalid/{n}.jpg", "status": "failed", "line": n}
        | {"extra": {"description": f"{n:05d}" * 4_000}}  # 20 kB of text a row
        for n in range(10)
    ]
    out = tmp_path / "out"
    out.mkdir()
    _write_jsonl(out / "manifest.jsonl", entries)

    assert main(["--parquet-only", "--out", str(out), "-q"]) == 0

    index = pq.ParquetFile(out / INDEX_NAME)
    groups = [index.metadata.row_group(n).num_rows for n in range(index.num_row_groups)]
    assert groups == [3, 3, 3, 1]  # 2 rows reach 41 kB < 50 kB; the third ends it
    assert _index_rows(out) == entries


def _fifo_run(
    server: LocalServer, corpus: Path, tmp_path: Path, *options: str
) -> tuple[int, Path]:
    """Run the CLI on a list fed through a FIFO; once the first URL's request has
    arrived (the run has checked the index's name), plant a link at the index's
    name, then end the list. Its exit code and output folder."""
    urls = corpus_urls(server, corpus)[:2]
    fifo = tmp_path / "urls.txt"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere.parquet"
    elsewhere.write_bytes(b"mine")

    def feed() -> None:
        with fifo.open("w", encoding="utf-8") as file:
            file.write(f"{urls[0]}\n")
            file.flush()
            server.wait_for_requests(1)
            (out / INDEX_NAME).symlink_to(elsewhere)
            file.write(f"{urls[1]}\n")

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        code = main([str(fifo), "--out", str(out), "--parquet", *options])
    finally:
        feeder.join(WAIT_S)
    assert not feeder.is_alive()
    assert elsewhere.read_bytes() == b"mine"
    return code, out


@pytest.mark.parametrize("json_summary", [False, True], ids=["text", "json"])
def test_an_index_that_cannot_be_written_after_a_good_run_comes_after_its_summary(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    json_summary: bool,
) -> None:
    """The run went well, only its index could not be written: the summary (text or
    --json, which then names no index) is printed, then the one error line; exit 3."""
    options = ["--no-progress", "--no-config", *(["--json"] if json_summary else [])]

    code, out = _fifo_run(server, corpus, tmp_path, *options)

    printed = capsys.readouterr()
    err = printed.err.splitlines()
    assert code == 3
    assert [r["status"] for r in read_manifest(out)] == ["ok", "ok"]
    assert err[-1].startswith(f"error: {out / INDEX_NAME} is a symbolic link")
    assert "--parquet-only writes the index again" in err[-1]
    if json_summary:
        figures = json.loads(printed.out)
        assert figures["counts"]["ok"] == 2
        assert "index" not in figures
    else:
        assert err[0].startswith("done: 2 URLs (2 ok,")
        assert err[-2] == f"  results in {out} (manifest.jsonl)"


def test_the_json_summary_names_the_index_and_the_shards(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--json of a run with --parquet gives the index's path; with webdataset
    output, the number of shards holding the run's samples (the text says both)."""
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:5])
    out = tmp_path / "out"
    options = ["--out", str(out), "--parquet", "--no-progress", "--no-config"]
    options += ["--output-format", "webdataset", "--shard-size", "2"]

    assert main([str(url_list), *options, "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert main([str(url_list), *options]) == 0
    text = capsys.readouterr().err.splitlines()

    assert figures["index"] == str(out / INDEX_NAME)
    assert figures["shards"] == 3 == len(list(out.glob("*.tar")))
    assert (
        text[-1] == f"  results in {out} (3 shards *.tar, manifest.jsonl, {INDEX_NAME})"
    )


def test_an_empty_manifest_gives_an_empty_index_with_every_known_column(
    tmp_path: Path,
) -> None:
    """A list with nothing in it: the index has no rows and the usual columns."""
    out = tmp_path / "out"

    run(write_list(tmp_path / "empty.txt", []), fast_settings(out, parquet=True))

    table = pq.read_table(out / INDEX_NAME)
    assert table.num_rows == 0
    assert table.schema.field("extra").type == pa.string()
    assert table.schema.field("outputs").type == pa.list_(pa.string())
    # The webdataset fields are known ones: columns of text in any folder.
    assert table.schema.field("shard").type == pa.string()
    assert table.schema.field("key").type == pa.string()


def test_an_index_write_cut_short_leaves_nothing_after_the_next_run(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A kill -9 while the index was written leaves its ``.new`` (tens of MB on a
    long list); the next run takes the folder and removes it, --parquet or not."""
    out = tmp_path / "out"
    urls = corpus_urls(server, corpus)[:2]
    run(urls, fast_settings(out))
    cut_short = out / f".{INDEX_NAME}.new"
    cut_short.write_bytes(b"PAR1 half a row group")

    run(urls, fast_settings(out))

    assert not cut_short.exists()


def test_cli_flag_config_key_and_refusals(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``parquet = true`` in the config file writes the index (the summary names
    it); --parquet with
    --dry-run, a list with --parquet-only, and a link at the index are refused;
    --parquet-only without a manifest says so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "downloader.toml").write_text("parquet = true\n")
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:2])

    assert main([str(url_list), "--out", "o", "--procs", "1", "--no-progress"]) == 0
    assert pq.read_table(tmp_path / "o" / INDEX_NAME).num_rows == 2
    assert capsys.readouterr().err.endswith(
        "  results in o (manifest.jsonl, manifest.parquet)\n"
    )
    elsewhere = tmp_path / "elsewhere.parquet"
    elsewhere.write_bytes(b"mine")
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / INDEX_NAME).symlink_to(elsewhere)
    codes = [
        main([str(url_list), "--dry-run", "--parquet", "--no-config"]),
        main([str(url_list), "--parquet-only", "--out", "o"]),
        main(["--parquet-only", "--merge-parts", "--out", "o"]),
        main(["--parquet-only", "--out", "o", "--threads", "2"]),
        main(["--parquet-only", "--out", "nothing-here"]),
        main([str(url_list), "--out", "l", "--parquet", "--no-config"]),
    ]
    err = capsys.readouterr().err.splitlines()

    assert codes == [2, 2, 2, 2, 3, 3]
    assert err[:4] == [
        "error: --parquet indexes a run's whole manifest: not with --dry-run (which "
        "writes nothing) nor --part (give it to --merge-parts); see --help",
        "error: --parquet-only indexes the manifest in --out; it takes no URL list; "
        "see --help",
        "error: --merge-parts takes --out, --parquet, --json, -q and -v only, not "
        "--parquet-only; see --help",
        "error: --parquet-only takes --out, --json, -q and -v only, not --threads; "
        "see --help",
    ]
    assert err[4].startswith("error: no manifest.jsonl in nothing-here to index")
    assert err[5].startswith(f"error: l/{INDEX_NAME} is a symbolic link")
    assert elsewhere.read_bytes() == b"mine"
    assert not (tmp_path / "l" / "manifest.jsonl").exists()


def _site_without_pyarrow(folder: Path) -> Path:
    """A site folder with every package of this interpreter's but pyarrow."""
    folder.mkdir()
    for place in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in Path(place).iterdir():
            name = entry.name.lower()
            if not name.startswith("pyarrow") and not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry)
    return folder


def _isolated(site_dir: Path, code: str) -> list[str]:
    """An isolated interpreter (``-I -S``: no environment, no site folder of its
    own) that runs ``code`` with this project and ``site_dir`` on its path."""
    setup = (
        f"import site, sys; sys.path[:0] = [{str(ROOT)!r}]; "
        f"site.addsitedir({str(site_dir)!r}); "
    )
    return [sys.executable, "-I", "-S", "-c", setup + code]


@pytest.fixture
def without_pyarrow(tmp_path: Path) -> Path:
    """A site folder with every package installed here but pyarrow."""
    return _site_without_pyarrow(tmp_path / "site")


def _cli(command: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=WAIT_S * 2
    )


def test_without_pyarrow_one_line_exit_2_before_anything_runs(
    without_pyarrow: Path, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """No pyarrow: --parquet, --parquet-only and --merge-parts --parquet stop with
    the line that says how to install it, and write nothing; without --parquet the
    same interpreter runs the list (it never imports pyarrow)."""
    probe = _cli(_isolated(without_pyarrow, "import PIL, httpx; import pyarrow"))
    assert probe.stderr.endswith("ModuleNotFoundError: No module named 'pyarrow'\n")
    cli = _isolated(
        without_pyarrow,
        "from downloader.cli import main; raise SystemExit(main(sys.argv[1:]))",
    )
    url_list = write_list(tmp_path / "urls.txt", corpus_urls(server, corpus)[:2])
    out = tmp_path / "out"

    refused = [
        _cli(cli, str(url_list), "--out", str(out), "--parquet"),
        _cli(cli, "--parquet-only", "--out", str(out)),
        _cli(cli, "--merge-parts", "--parquet", "--out", str(out)),
    ]

    for result in refused:
        assert (result.returncode, result.stderr) == (2, MISSING + "; see --help\n")
    assert not out.exists()
    done = _cli(cli, str(url_list), "--out", str(out), "--procs", "1")
    assert done.returncode == 0, done.stderr
    assert len(read_manifest(out)) == 2
    assert not (out / INDEX_NAME).exists()


def test_the_tool_does_not_import_pyarrow_unless_asked() -> None:
    """Starting the CLI and the library without --parquet leaves pyarrow unloaded."""
    code = (
        "import sys; import downloader, downloader.cli; print('pyarrow' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert result.stdout == "False\n"
