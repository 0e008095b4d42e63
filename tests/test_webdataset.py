"""``--output-format webdataset``: tar shards read back with tarfile and webdataset.

Every local mode, against the real corpus server: each ok URL is one sample in
one shard, whose JSON agrees with its manifest record; failures have records and no
sample; Ctrl-C and ``kill -9`` mid-shard, then a rerun, lose and duplicate nothing
and leave finished shards as they were; a shard no record names (a kill between its
rename and its records) is adopted, or set aside, never left to be read twice.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
from PIL import Image

from downloader import (
    InputError,
    OutputFormat,
    Settings,
    Status,
    dry_run,
    iter_results,
    run,
)
from downloader.cli import main
from downloader.settings import LOCAL_MODES, ImageSpec, Mode, NameBy, Part
from downloader.sources import LocalFiles
from tests.helpers import (
    WAIT_S,
    LocalServer,
    corpus_urls,
    fast_settings,
    leftovers,
    read_manifest,
)
from tests.test_signals import (  # the signal tests' subprocess and tmpfs helpers
    STOP_S,
    _command,
    _env,
    _finish,
    _start,
    _tmpfs,
    slow_server,
)

__all__ = ["slow_server"]  # a fixture, used by name

SHARD_SIZE = 3
README = Path(__file__).resolve().parents[1] / "README.md"
MODES = pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)


def _caption_list(path: Path, urls: list[str]) -> Path:
    """A CSV list with a caption per URL (``caption <n>``)."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["url", "caption"])
        writer.writerows([url, f"caption {n}"] for n, url in enumerate(urls))
    return path


def _shards(out: Path) -> list[Path]:
    return sorted(out.glob("*.tar"))


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """A shard's samples: key → extension → bytes (tarfile, in the order stored)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r:") as archive:
        for member in archive:
            key, _, extension = member.name.partition(".")
            data = archive.extractfile(member)
            assert data is not None
            samples.setdefault(key, {})[extension] = data.read()
    return samples


def _all_samples(out: Path) -> list[tuple[str, str, dict[str, bytes]]]:
    """(shard, key, members) of every sample in every shard of ``out``."""
    return [
        (shard.name, key, members)
        for shard in _shards(out)
        for key, members in _read_tar(shard).items()
    ]


def _read_with_webdataset(shards: list[Path]) -> list[dict[str, Any]]:
    """The samples as the webdataset library streams and decodes them."""
    # webdataset 1.0.2 leaves its open shard files to the garbage collector: collect
    # here, where their ResourceWarning is expected, not in a later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        dataset = wds.WebDataset([str(s) for s in shards], shardshuffle=False)
        samples = list(dataset.decode("pil"))
        del dataset
        gc.collect()
    return samples


def _by_url(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(record["url"]): record for record in records}


def _check_shards_agree_with_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """Every ok record's sample is in its shard once, and says what the record says;
    across ``OUT/*.tar`` no sample is there twice, and none no record names.

    Returns the manifest's records by URL.
    """
    records = _by_url(read_manifest(out))
    samples = _all_samples(out)
    keys = Counter(key for _, key, _ in samples)
    urls = Counter(json.loads(m["json"])["url"] for _, _, m in samples)
    done = {url: r for url, r in records.items() if r["status"] in ("ok", "skipped")}

    assert [key for key, n in keys.items() if n > 1] == []  # no key twice
    assert sorted(urls) == sorted(done)  # every ok URL, and nothing else
    assert max(urls.values()) == 1
    where = {key: (shard, members) for shard, key, members in samples}
    for url, record in done.items():
        shard, members = where[record["key"]]
        sample = json.loads(members["json"])
        assert record["shard"] == shard
        assert "path" not in record
        assert (sample["url"], sample["shard"], sample["key"]) == (
            url,
            shard,
            record["key"],
        )
        for field in ("sha256", "width", "height", "bytes"):
            assert sample[field] == record[field]
        with Image.open(io.BytesIO(members["jpg"])) as image:
            image.load()
            assert image.size == (record["width"], record["height"])
    return records


@MODES
def test_every_ok_url_is_one_sample_that_matches_its_record(
    server: LocalServer, corpus: Path, tmp_path: Path, mode: Mode
) -> None:
    """Shards hold each ok URL once (image, record, caption); failures: no sample."""
    good = corpus_urls(server, corpus)
    bad = [server.url_for("status/404"), server.url_for("noise/x.jpg")]
    urls = good[:4] + bad + good[4:]
    url_list = _caption_list(tmp_path / "urls.csv", urls)
    out = tmp_path / "out"
    settings = fast_settings(
        out, mode=mode, output_format=OutputFormat.WEBDATASET, shard_size=SHARD_SIZE
    )

    report = run(url_list, settings)

    records = _check_shards_agree_with_manifest(out)
    assert [o.status for o in report.results].count(Status.OK) == len(good)
    for url in bad:
        assert records[url]["status"] == "failed"
        assert "shard" not in records[url]
        assert "key" not in records[url]
    for number, url in enumerate(urls):
        record = records[url]
        if url in good:  # the first run: shard number = list index // shard size
            assert record["key"] == f"{number:09d}"
            assert record["shard"] == f"{number // SHARD_SIZE:05d}.tar"
    names = {p.name for p in out.iterdir()}
    assert names == {".lock", "manifest.jsonl", "failed.txt"} | {
        s.name for s in _shards(out)
    }  # no loose image, no scratch
    streamed = _read_with_webdataset(_shards(out))
    assert sorted(s["json"]["url"] for s in streamed) == sorted(good)
    for sample in streamed:
        position = urls.index(sample["json"]["url"])
        assert sample["__key__"] == f"{position:09d}"
        assert sample["txt"] == f"caption {position}"
        assert sample["jpg"].size == (sample["json"]["width"], sample["json"]["height"])


def _snapshot(shards: list[Path]) -> dict[str, tuple[bytes, int]]:
    return {s.name: (s.read_bytes(), s.stat().st_mtime_ns) for s in shards}


def _check_intact(out: Path) -> None:
    """After a stop: every shard reads whole; every ok record's shard holds it."""
    for shard in _shards(out):
        _read_tar(shard)
    samples = {(shard, key) for shard, key, _ in _all_samples(out)}
    for record in read_manifest(out):
        if record["status"] == "ok":
            assert (record["shard"], record["key"]) in samples


def _rerun_and_check(
    command: list[str], out: Path, system_tmp: Path, urls: list[str]
) -> None:
    """Rerun ``command``: finished shards untouched, every URL once, no scratch."""
    finished = _snapshot(_shards(out))
    rerun = subprocess.run(
        command, capture_output=True, text=True, timeout=WAIT_S, env=_env(system_tmp)
    )

    assert rerun.returncode == 0, rerun.stderr
    assert leftovers(out) == []
    assert not (out / ".tmp").exists()
    assert {n: v for n, v in _snapshot(_shards(out)).items() if n in finished} == (
        finished
    )
    records = _check_shards_agree_with_manifest(out)
    assert sorted(records) == sorted(urls)
    assert {r["status"] for r in records.values()} <= {"ok", "skipped"}


def _webdataset_command(url_list: Path, out: Path, mode: Mode) -> list[str]:
    return _command(
        url_list,
        out,
        "--mode",
        mode.value,
        "--output-format",
        "webdataset",
        "--shard-size",
        str(SHARD_SIZE),
    )


def _started_run(
    server: LocalServer, corpus: Path, tmp_path: Path, mode: Mode
) -> tuple[list[str], Path, Path, list[str], subprocess.Popen[str]]:
    """A webdataset run of the corpus with captions, started as a subprocess: its
    URLs, output folder, TMPDIR, command and process."""
    urls = corpus_urls(server, corpus)
    url_list = _caption_list(tmp_path / "urls.csv", urls)
    out = tmp_path / "out"
    system_tmp = tmp_path / "system-tmp"
    command = _webdataset_command(url_list, out, mode)
    return urls, out, system_tmp, command, _start(command, system_tmp)


@MODES
def test_ctrl_c_mid_shard_then_a_rerun_loses_and_duplicates_nothing(
    slow_server: LocalServer, corpus: Path, tmp_path: Path, mode: Mode
) -> None:
    """Ctrl-C: shards in progress end with what they hold, records after; rerun
    fills in the rest in new shards, finished ones untouched."""
    urls, out, system_tmp, command, process = _started_run(
        slow_server, corpus, tmp_path, mode
    )
    slow_server.wait_for_requests(4)

    os.killpg(process.pid, signal.SIGINT)
    code, stderr = _finish(process, STOP_S)

    assert code == 130, stderr
    assert leftovers(out) == []
    assert len(read_manifest(out)) == len(urls)  # one record per input
    _check_intact(out)
    slow_server.latency = 0  # the latency was for the signal to land mid-run
    _rerun_and_check(command, out, system_tmp, urls)


@MODES
def test_kill_9_mid_shard_then_a_rerun_loses_and_duplicates_nothing(
    slow_server: LocalServer, corpus: Path, tmp_path: Path, mode: Mode
) -> None:
    """kill -9 of the main process: no shard under a final name is partial, no
    record names a missing sample; the rerun completes without duplicates (a shard
    renamed just before the kill, its records not yet written, is adopted)."""
    urls, out, system_tmp, command, process = _started_run(
        slow_server, corpus, tmp_path, mode
    )
    slow_server.wait_for_requests(6)

    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=WAIT_S)

    assert process.returncode == -signal.SIGKILL
    _check_intact(out)
    slow_server.latency = 0  # the latency was for the kill to land mid-run
    _rerun_and_check(command, out, system_tmp, urls)


@MODES
def test_a_full_disk_ends_the_shards_in_progress_with_their_records(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mode: Mode,
) -> None:
    """A local fault mid-shard: exit 3, a record per input, every ok record's
    sample in a whole shard, no scratch left."""
    small = corpus_urls(server, corpus)[:5]
    big = f"{server.base_url}/big-unsized"
    urls = [*small[:3], big, *small[3:]]
    url_list = _caption_list(tmp_path / "urls.csv", urls)

    with _tmpfs(tmp_path / "disk", "size=256k") as disk:
        out = disk / "out"
        options = ["--mode", mode.value, "--threads", "1", "--procs", "1"]
        options += ["--output-format", "webdataset", "--shard-size", "2"]
        options += ["--out", str(out), "--no-progress", "--max-size", "64"]
        code = main([str(url_list), *options])
        err = capsys.readouterr().err
        records = _by_url(read_manifest(out))
        _check_intact(out)
        samples = len(_all_samples(out))
        left = leftovers(out)

    assert code == 3
    assert "No space left on device" in err
    assert sorted(records) == sorted(urls)
    assert records[big]["status"] == "failed"
    assert samples == sum(r["status"] == "ok" for r in records.values()) > 0
    assert left == []


def _first_run(
    server: LocalServer, corpus: Path, tmp_path: Path, mode: Mode = Mode.PIPELINE
) -> tuple[Path, Settings]:
    """Run the corpus with captions into shards of SHARD_SIZE; its list and settings."""
    url_list = _caption_list(tmp_path / "urls.csv", corpus_urls(server, corpus))
    settings = fast_settings(
        tmp_path / "out",
        mode=mode,
        output_format=OutputFormat.WEBDATASET,
        shard_size=SHARD_SIZE,
    )
    run(url_list, settings)
    return url_list, settings


def test_a_deleted_shard_is_redone_into_a_new_shard(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Only the deleted shard's samples are fetched again, into a new number."""
    url_list, settings = _first_run(server, corpus, tmp_path)
    out = settings.out
    shards = _shards(out)
    lost = {json.loads(m["json"])["url"] for m in _read_tar(out / "00001.tar").values()}
    (out / "00001.tar").unlink()
    kept = _snapshot(_shards(out))
    requests_before = sum(server.requests.values())

    report = run(url_list, settings)

    redone = {o.url for o in report.results if o.status is Status.OK}
    assert redone == lost
    assert sum(server.requests.values()) - requests_before == len(lost)
    assert _snapshot([out / name for name in kept]) == kept
    new = sorted(set(_shards(out)) - set(shards))
    assert len(new) == 1
    assert int(new[0].stem) > max(int(s.stem) for s in shards)
    assert {json.loads(m["json"])["url"] for m in _read_tar(new[0]).values()} == lost
    _check_shards_agree_with_manifest(out)


def _unrecord(out: Path, shard: str) -> set[str]:
    """Take the records naming ``shard`` out of the manifest, as a ``kill -9``
    between its rename and its records leaves it; the URLs of its samples."""
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("shard") != shard]
    manifest.write_text("".join(kept), encoding="utf-8")
    return {json.loads(line)["url"] for line in lines if line not in kept}


@MODES
def test_a_shard_renamed_before_its_records_is_adopted_not_redone(
    server: LocalServer, corpus: Path, tmp_path: Path, mode: Mode
) -> None:
    """The window of a kill between a shard's rename and its records, made without
    a race: the rerun records the shard's samples from their <key>.json, fetches
    none of them again, writes no new shard, and every URL has one record."""
    urls = corpus_urls(server, corpus)
    url_list, settings = _first_run(server, corpus, tmp_path, mode)
    out = settings.out
    unrecorded = _unrecord(out, "00001.tar")
    assert len(unrecorded) == SHARD_SIZE
    shards = _snapshot(_shards(out))
    requests_before = Counter(server.requests)

    report = run(url_list, settings)

    assert {o.status for o in report.results} == {Status.SKIPPED}
    assert len(report.results) == len(urls)
    assert server.requests == requests_before  # nothing fetched again
    assert _snapshot(_shards(out)) == shards  # no new shard, none rewritten
    records = _check_shards_agree_with_manifest(out)
    assert sorted(records) == sorted(urls)
    assert {records[url]["shard"] for url in unrecorded} == {"00001.tar"}


def _cut_records(lines: list[str], shard: str) -> tuple[list[str], set[str]]:
    """``lines`` without the records naming ``shard`` but its first (a kill as the
    shard's records were written); and the URLs of the records taken out."""
    named = [line for line in lines if json.loads(line).get("shard") == shard]
    kept = [line for line in lines if line not in named[1:]]
    return kept, {json.loads(line)["url"] for line in named[1:]}


def _shard_urls(out: Path) -> Counter[str]:
    return Counter(json.loads(m["json"])["url"] for _, _, m in _all_samples(out))


@MODES
def test_a_kill_as_a_shard_was_recorded_leaves_its_other_samples_adopted(
    server: LocalServer, corpus: Path, tmp_path: Path, mode: Mode
) -> None:
    """A kill while a renamed shard's records were written leaves it named by the
    manifest's last record and missing the rest: the rerun records its other
    samples from their <key>.json, fetches none of them, and puts none in a second
    shard (made without a race: the manifest cut after the shard's first record)."""
    urls = corpus_urls(server, corpus)
    url_list, settings = _first_run(server, corpus, tmp_path, mode)
    out = settings.out
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    last = [json.loads(line).get("shard") for line in lines if "shard" in line][-1]
    first_of_last = [json.loads(line).get("shard") for line in lines].index(last)
    kept, unrecorded = _cut_records(lines[: first_of_last + SHARD_SIZE], last)
    manifest.write_text("".join(kept), encoding="utf-8")
    assert len(unrecorded) >= 1
    shards = _snapshot(_shards(out))
    requests_before = Counter(server.requests)

    report = run(url_list, settings)

    fetched = {url for url, n in server.requests.items() if n > requests_before[url]}
    assert fetched.isdisjoint(unrecorded)  # adopted, not fetched again
    assert {o.url for o in report.results if o.url in unrecorded} == unrecorded
    assert {o.status for o in report.results if o.url in unrecorded} == {Status.SKIPPED}
    assert {n: v for n, v in _snapshot(_shards(out)).items() if n in shards} == shards
    assert [url for url, n in _shard_urls(out).items() if n > 1] == []
    records = _check_shards_agree_with_manifest(out)
    assert sorted(records) == sorted(urls)
    assert {records[url]["shard"] for url in unrecorded} == {last}


_KILLED_AFTER_A_RECORD = """
import os, signal, sys
from pathlib import Path
from downloader import OutputFormat, iter_results
from downloader.settings import Mode
from tests.helpers import fast_settings
url_list, out, mode, last = sys.argv[1:]
settings = fast_settings(
    Path(out), mode=Mode(mode), output_format=OutputFormat.WEBDATASET, shard_size=3
)
for outcome in iter_results(Path(url_list), settings):
    if outcome.url == last:
        os.kill(os.getpid(), signal.SIGKILL)
"""


@MODES
def test_a_resume_killed_as_a_shard_was_recorded_leaves_its_other_samples_adopted(
    server: LocalServer, corpus: Path, tmp_path: Path, mode: Mode
) -> None:
    """A resume writes its records of URLs the manifest has to the updates file, and
    the merge after a kill puts them last: the shard cut short is still found (the
    last shard record of each file, read before the merge), its other samples are
    recorded, none is fetched again or put in a second shard. For real: the run
    kills itself right after the new shard's first record is written."""
    urls = corpus_urls(server, corpus)[:9]
    out = tmp_path / "out"
    settings = fast_settings(
        out, mode=mode, output_format=OutputFormat.WEBDATASET, shard_size=SHARD_SIZE
    )
    run(urls[:6], settings)
    url_list = _caption_list(tmp_path / "urls.csv", urls)
    script = [sys.executable, "-c", _KILLED_AFTER_A_RECORD, str(url_list), str(out)]
    killed = subprocess.run(
        [*script, mode.value, urls[6]],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        cwd=README.parent,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / ".manifest-updates.jsonl").is_file()  # the resume's skip records
    requests_before = Counter(server.requests)

    report = run(url_list, settings)

    fetched = {url for url, n in server.requests.items() if n > requests_before[url]}
    assert fetched == set()  # u7 and u8 adopted from the shard, not fetched again
    assert {o.status for o in report.results} == {Status.SKIPPED}
    assert [url for url, n in _shard_urls(out).items() if n > 1] == []
    records = _check_shards_agree_with_manifest(out)
    assert sorted(records) == sorted(urls)


def test_a_rerun_under_other_settings_adopts_nothing_and_warns_of_no_kill(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The last shard's samples have records, made under other settings: they are
    recorded, not cut short by a kill; the rerun redoes them under its own settings
    (into a new shard) without a word about a kill, and writes no record twice."""
    url_list, settings = _first_run(server, corpus, tmp_path)
    other = replace(settings, image=ImageSpec(max_size=48))

    with caplog.at_level("WARNING", logger="downloader"):
        report = run(url_list, other)

    assert not [r for r in caplog.records if "killed" in r.getMessage()]
    assert {o.status for o in report.results} == {Status.OK}
    lines = read_manifest(settings.out)
    assert len(lines) == len({line["url"] for line in lines})


def test_ray_parts_cut_short_as_their_shards_were_recorded_are_adopted(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A killed --mode ray run leaves a part per task; two tasks killed as they
    wrote their shards' records leave two shards each named by one record, at the
    end of its part (not of the merged manifest): the next run adopts both's other
    samples, fetching none."""
    url_list, settings = _first_run(server, corpus, tmp_path)
    out = settings.out
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    unrecorded: set[str] = set()
    (out / ".parts").mkdir()
    for number, shard in enumerate(["00001.tar", "00002.tar"]):
        named = [line for line in lines if json.loads(line).get("shard") == shard]
        lines = [line for line in lines if line not in named]
        part = out / ".parts" / f"run-shard-{number:05d}.jsonl"
        part.write_text(named[0], encoding="utf-8")
        unrecorded |= {json.loads(line)["url"] for line in named[1:]}
    manifest.write_text("".join(lines), encoding="utf-8")
    requests_before = Counter(server.requests)

    run(url_list, settings)

    fetched = {url for url, n in server.requests.items() if n > requests_before[url]}
    assert len(unrecorded) == 2 * (SHARD_SIZE - 1)
    assert fetched.isdisjoint(unrecorded)
    assert not (out / ".parts").exists()
    assert [url for url, n in _shard_urls(out).items() if n > 1] == []
    records = _check_shards_agree_with_manifest(out)
    assert {records[url]["shard"] for url in unrecorded} == {"00001.tar", "00002.tar"}


def test_a_shard_no_record_names_that_cannot_be_adopted_is_set_aside(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Unreadable, another shard's samples, or samples done elsewhere: renamed
    <name>.orphan (out of OUT/*.tar, never deleted) with one line each; the run
    redoes nothing and numbers its shards as ever."""
    url_list, settings = _first_run(server, corpus, tmp_path)
    out = settings.out
    first = _snapshot(_shards(out))
    (out / "00007.tar").write_bytes(b"not a tar at all")
    copy = (out / "00000.tar").read_bytes()  # its samples' records name 00000.tar
    (out / "00008.tar").write_bytes(copy)
    (out / "00008.tar.orphan").write_bytes(b"set aside by an earlier run")
    requests_before = Counter(server.requests)

    options = ["--output-format", "webdataset", "--shard-size", str(SHARD_SIZE)]
    options += ["--max-size", "64", "--out", str(out), "--no-progress", "--no-config"]
    code = main([str(url_list), *options])
    err = capsys.readouterr().err

    assert code == 0, err
    assert server.requests == requests_before
    assert _snapshot(_shards(out)) == first
    assert (out / "00007.tar.orphan").read_bytes() == b"not a tar at all"
    assert (out / "00008.tar.1.orphan").read_bytes() == copy
    assert (out / "00008.tar.orphan").read_bytes() == b"set aside by an earlier run"
    aside = [line for line in err.splitlines() if "renamed" in line]
    assert len(aside) == 2
    assert "renamed 00007.tar.orphan" in aside[1]
    assert "cannot be read" in aside[1]
    assert "renamed 00008.tar.1.orphan" in aside[0]
    assert "not this shard's" in aside[0]
    _check_shards_agree_with_manifest(out)


def _rewrite_shard(path: Path, keep: Any, extra: list[tarfile.TarInfo]) -> None:
    """Rewrite shard ``path`` with the members ``keep(member)`` accepts, then
    ``extra`` (members without data: links)."""
    data = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=data, mode="w") as dst:
        for member in src:
            if keep(member):
                dst.addfile(member, src.extractfile(member))
        for member in extra:
            dst.addfile(member)
    path.write_bytes(data.getvalue())


def test_only_whole_samples_of_plain_files_are_adopted(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A shard no record names whose samples have no image (records alone), or one
    holding a link, is set aside, not adopted: its URLs are fetched again, so that
    no URL is skipped onto an image that is nowhere (found by a probe)."""
    url_list, settings = _first_run(server, corpus, tmp_path)
    out = settings.out
    _rewrite_shard(out / "00001.tar", lambda m: m.name.endswith(".json"), [])
    link = tarfile.TarInfo("000000099.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _rewrite_shard(out / "00002.tar", lambda m: True, [link])
    redone = _unrecord(out, "00001.tar") | _unrecord(out, "00002.tar")
    requests_before = Counter(server.requests)

    run(url_list, settings)

    fetched = Counter(server.requests) - requests_before
    assert sum(fetched.values()) == len(redone) > 0
    assert (out / "00001.tar.orphan").is_file()
    assert (out / "00002.tar.orphan").is_file()
    records = _check_shards_agree_with_manifest(out)
    assert all(records[url]["status"] == "ok" for url in redone)


def test_a_record_too_large_to_be_one_is_not_read(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A shard's <key>.json over 1 MiB is not read (a hostile member may claim
    gigabytes, and every rerun would read it): its sample counts as not there, so
    the URL is redone, even when the member is a valid record of it."""
    url_list, settings = _first_run(server, corpus, tmp_path)
    out = settings.out
    shard = out / "00000.tar"
    with tarfile.open(shard) as archive:
        member = next(m for m in archive if m.name.endswith(".json"))
        record = json.loads(archive.extractfile(member).read())  # type: ignore[union-attr]
    padded = json.dumps(record).encode() + b" " * (1024 * 1024)
    huge = tarfile.TarInfo(member.name)
    huge.size = len(padded)
    _rewrite_shard(shard, lambda m: m.name != member.name, [])
    with tarfile.open(shard, "a") as archive:
        archive.addfile(huge, io.BytesIO(padded))
    requests_before = Counter(server.requests)

    report = run(url_list, settings)

    fetched = Counter(server.requests) - requests_before
    assert sum(fetched.values()) == 1
    by_url = {o.url: o.status for o in report.results}
    assert by_url[record["url"]] is Status.OK
    assert (
        sum(status is Status.SKIPPED for status in by_url.values()) == len(by_url) - 1
    )


def test_a_shard_whose_samples_are_all_done_elsewhere_is_set_aside(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Other settings redo every sample into new shards; the old shards are then
    named by no record. The next run does not adopt them (their URLs have standing
    samples): they are set aside, so a glob sees each URL once."""
    url_list, settings = _first_run(server, corpus, tmp_path)
    out = settings.out
    old = _snapshot(_shards(out))
    other = replace(settings, image=ImageSpec(max_size=48))
    run(url_list, other)  # every sample redone, into new shards
    new = set(_snapshot(_shards(out))) - set(old)
    requests_before = Counter(server.requests)

    report = run(url_list, other)

    assert {o.status for o in report.results} == {Status.SKIPPED}
    assert server.requests == requests_before
    assert {s.name for s in _shards(out)} == new
    for name, (data, _) in old.items():
        assert (out / f"{name}.orphan").read_bytes() == data
    _check_shards_agree_with_manifest(out)


def test_a_record_whose_shard_key_now_holds_another_url_is_redone(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """--force with another list writes 00000.tar:000000000 again for another URL:
    the first list's records that still name it are redone, never skipped onto the
    other URL's image."""
    urls = corpus_urls(server, corpus)
    first, second = urls[:2], urls[2:4]
    out = tmp_path / "out"
    settings = fast_settings(out, output_format=OutputFormat.WEBDATASET)
    run(first, settings)
    run(second, replace(settings, force=True))
    requests_before = sum(server.requests.values())

    report = run(first, settings)

    assert [o.status for o in report.results] == [Status.OK, Status.OK]
    assert sum(server.requests.values()) - requests_before == len(first)
    for record in read_manifest(out):
        members = _read_tar(out / str(record["shard"]))[str(record["key"])]
        assert json.loads(members["json"])["url"] == record["url"]


def test_force_starts_over_without_the_old_shards(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """--force removes the folder's shards and writes them again from 00000."""
    url_list, settings = _first_run(server, corpus, tmp_path)
    out = settings.out
    first = [s.name for s in _shards(out)]

    report = run(url_list, replace(settings, force=True))

    assert {o.status for o in report.results} == {Status.OK}
    assert [s.name for s in _shards(out)] == first
    _check_shards_agree_with_manifest(out)


def test_other_sizes_and_local_files_go_into_the_shards(
    corpus: Path, tmp_path: Path
) -> None:
    """--input-dir works; --sizes adds <key>.<box>.jpg beside <key>.jpg."""
    out = tmp_path / "out"
    image = ImageSpec(sizes=((64, 64), (32, 32)))
    settings = fast_settings(  # a shard per image: each opened by its own sample
        out, output_format=OutputFormat.WEBDATASET, shard_size=1, image=image
    )

    report = run(LocalFiles(str(corpus / "img-*")), settings)

    oks = [o for o in report.results if o.status is Status.OK]
    assert oks
    assert not (out / "32").exists()  # its files all went into the shards
    samples = _all_samples(out)
    assert len(samples) == len(oks) == len(_shards(out))
    for _, _, members in samples:
        assert {"jpg", "32.jpg", "json"} <= set(members)
        with Image.open(io.BytesIO(members["32.jpg"])) as small:
            assert max(small.size) == 32


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--part", "1/2"], "--part does not go with --output-format webdataset"),
        (["--name-by", "sha256"], "--name-by sha256 does not go with --output-format"),
        (["--compare"], "does not go with --output-format webdataset"),
    ],
)
def test_what_shards_do_not_go_with_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], words: str
) -> None:
    """Refused before anything starts: exit 2, one error line, nothing written."""
    url_list = tmp_path / "urls.txt"
    url_list.write_text("http://127.0.0.1:9/a.jpg\n", encoding="utf-8")
    out = tmp_path / "out"

    code = main(
        [str(url_list), "--out", str(out), "--output-format", "webdataset", *flags]
    )

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert words in err
    assert not out.exists()


def test_shard_size_goes_with_webdataset_and_the_library_checks_the_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--shard-size is refused with files only; a bad format is refused by name."""
    url_list = tmp_path / "urls.txt"
    url_list.write_text("", encoding="utf-8")
    out = str(tmp_path / "out")

    refused = main([str(url_list), "--out", out, "--shard-size", "5"])
    refused_err = capsys.readouterr().err
    shards = ["--output-format", "webdataset"]
    accepted = main([str(url_list), "--out", out, "--shard-size", "5", "-q", *shards])

    assert refused == 2
    assert "--output-format webdataset" in refused_err
    assert accepted == 0
    with pytest.raises(InputError, match="--output-format"):
        Settings(output_format="tar")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="--part"):
        Settings(output_format=OutputFormat.WEBDATASET, part=Part(1, 2))
    with pytest.raises(InputError, match="sha256"):
        Settings(output_format=OutputFormat.WEBDATASET, name_by=NameBy.SHA256)
    assert Settings(output_format="webdataset").output_format is (  # type: ignore[arg-type]
        OutputFormat.WEBDATASET
    )


def test_the_config_file_sets_the_output_format(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """output-format = "webdataset" in downloader.toml writes shards."""
    url_list = _caption_list(tmp_path / "urls.csv", corpus_urls(server, corpus)[:2])
    config = tmp_path / "downloader.toml"
    config.write_text('output-format = "webdataset"\nmax-size = 64\n', "utf-8")
    out = tmp_path / "out"

    code = main([str(url_list), "--out", str(out), "--config", str(config), "-q"])

    assert code == 0
    assert [s.name for s in _shards(out)] == ["00000.tar"]


def _readme_block(marker: str) -> str:
    """The fenced block of the README that follows the line holding ``marker``."""
    text = README.read_text(encoding="utf-8")
    found = re.search(re.escape(marker) + r".*?\n```\w*\n(.*?)```", text, re.S)
    assert found is not None, f"no block after {marker!r} in the README"
    return found.group(1)


def test_the_readme_streams_the_shards_as_written(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """The README's command and training loop, run as written, see every sample."""
    urls = corpus_urls(server, corpus)
    _caption_list(tmp_path / "urls.csv", urls)
    command = _readme_block("<!-- webdataset command -->").strip()
    script = tmp_path / "train_loop.py"
    script.write_text(_readme_block("<!-- webdataset loop -->"), encoding="utf-8")
    cli = Path(__file__).resolve().parents[1] / "cli.py"
    argv = command.split()
    assert argv[:2] == ["python", "cli.py"]

    made = subprocess.run(
        [sys.executable, str(cli), *argv[2:], "--no-progress", "--max-size", "64"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    loop = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )

    assert made.returncode == 0, made.stderr
    assert loop.returncode == 0, loop.stderr
    assert loop.stdout.splitlines() == [
        f"epoch {epoch}: {len(urls)} images" for epoch in range(2)
    ]


def test_a_dry_run_shows_each_sample_in_its_shard(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Done samples are skips in their shard; new ones go to shards after them."""
    urls = corpus_urls(server, corpus)[:4]
    out = tmp_path / "out"
    settings = fast_settings(
        out, output_format=OutputFormat.WEBDATASET, shard_size=SHARD_SIZE
    )
    run(urls[:2], settings)

    plan = dry_run(urls, settings)

    assert [(item.action.value, item.path) for item in plan.items] == [
        ("skip", "00000.tar:000000000"),
        ("skip", "00000.tar:000000001"),
        ("fetch", "00001.tar:000000002.jpg"),
        ("fetch", "00002.tar:000000003.jpg"),
    ]


def test_leaving_iter_results_early_ends_the_shards_with_their_records(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A caller that stops reading: shards in progress end whole, records follow."""
    urls = corpus_urls(server, corpus)
    out = tmp_path / "out"
    settings = fast_settings(
        out, output_format=OutputFormat.WEBDATASET, shard_size=SHARD_SIZE
    )

    results = iter_results(urls, settings)
    first = next(results)
    results.close()

    assert first.url in urls
    assert sorted(str(r["url"]) for r in read_manifest(out)) == sorted(urls)
    _check_intact(out)
    assert leftovers(out) == []
