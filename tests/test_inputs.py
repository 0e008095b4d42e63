"""Richer inputs and transforms end to end: ``run()`` and the CLI on real runs."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from downloader import Mode, Status, run
from downloader.cli import main
from downloader.errors import FetchError
from downloader.records import Job
from downloader.settings import LOCAL_MODES, ImageFormat, ImageSpec, ResizeMode
from downloader.sources import InputFormat, LocalFiles, UrlList, safe_stem
from downloader.steps import stage_local
from tests import user_transforms
from tests.helpers import LocalServer, corpus_urls, fast_settings, read_manifest

FAST = ["--no-progress", "--threads", "2", "--procs", "1", "--retries", "0"]


def write_photos(folder: Path, count: int) -> dict[str, bytes]:
    """Write ``count`` small JPEGs into ``folder``; return their bytes by name."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = {}
    for number in range(count):
        image = Image.new("RGB", (120, 80), (40 * number, 100, 200))
        path = folder / f"photo-{number}.jpg"
        image.save(path, format="JPEG")
        photos[path.name] = path.read_bytes()
    return photos


def records_by_url(out: Path) -> dict[str, dict[str, object]]:
    """The manifest's records keyed by URL."""
    return {str(record["url"]): record for record in read_manifest(out)}


# ------------------------------------------------------------------ URL lists


def test_csv_names_the_outputs_and_carries_extra_columns(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """name gives the file, the other columns land in the manifest as 'extra'."""
    first, second, third = corpus_urls(server, corpus)[:3]
    listing = tmp_path / "list.csv"
    listing.write_text(
        "url,name,caption\n"
        f"{first},cat,a cat\n"
        f"{second},cat,another cat\n"
        f"{third},,no name\n"
        "not a url,x,broken row\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"

    report = run(listing, fast_settings(out))

    records = records_by_url(out)
    assert [o.status for o in report.results].count(Status.OK) == 3
    assert records[first]["path"] == "cat.jpg"
    assert str(records[second]["path"]).startswith("cat-")
    assert records[third]["path"] == safe_stem(third) + ".jpg"
    assert records[first]["extra"] == {"caption": "a cat"}
    assert records["not a url"]["status"] == "failed"
    assert records["not a url"]["extra"] == {"caption": "broken row"}
    assert (out / "cat.jpg").is_file()


def test_json_lines_with_bad_lines_run_on(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Invalid JSON and a line without url fail alone; the good lines are done."""
    good = corpus_urls(server, corpus)[:2]
    listing = tmp_path / "list.ndjson"
    listing.write_text(
        f'{{"url": "{good[0]}", "id": 1}}\n'
        "{oops\n"
        '{"href": "http://a/1.jpg"}\n'
        f'{{"url": "{good[1]}", "name": "second", "id": 2}}\n',
        encoding="utf-8",
    )
    out = tmp_path / "out"

    report = run(listing, fast_settings(out))

    statuses = sorted(o.status.value for o in report.results)
    assert statuses == ["failed", "failed", "ok", "ok"]
    records = records_by_url(out)
    assert records[good[0]]["extra"] == {"id": 1}
    assert records[good[1]]["path"] == "second.jpg"
    errors = sorted(str(o.error) for o in report.results if o.error)
    assert errors[0].startswith("line is not valid JSON")
    assert errors[1] == 'object has no "url" string'


def test_cli_reads_csv_from_stdin_with_input_format(
    server: LocalServer,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """'--input-format csv -' reads a CSV list from standard input."""
    url = corpus_urls(server, corpus)[0]
    raw = io.BytesIO(f"name,url\nfrom-stdin,{url}\n".encode())
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw, encoding="utf-8"))
    out = tmp_path / "out"

    code = main(["-", "--input-format", "csv", "--out", str(out), *FAST])

    assert code == 0
    assert (out / "from-stdin.jpg").is_file()


def test_cli_csv_without_url_column_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A header without 'url' is a usage error, before any output is made."""
    listing = tmp_path / "list.csv"
    listing.write_text("link\nhttp://a/1.jpg\n", encoding="utf-8")
    out = tmp_path / "out"

    code = main([str(listing), "--out", str(out), *FAST])

    assert code == 2
    assert "has no 'url' column" in capsys.readouterr().err
    assert not out.exists()


def test_url_list_can_force_a_format_from_python(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """UrlList(path, InputFormat.TSV) reads a file whatever its name says."""
    url = corpus_urls(server, corpus)[0]
    listing = tmp_path / "list.data"
    listing.write_text(f"url\tname\n{url}\ttabbed\n", encoding="utf-8")
    out = tmp_path / "out"

    report = run(UrlList(listing, InputFormat.TSV), fast_settings(out))

    assert [o.path for o in report.results] == ["tabbed.jpg"]


# ---------------------------------------------------------------- local files


@pytest.mark.parametrize("mode", list(LOCAL_MODES))
def test_local_files_are_processed_in_every_mode_and_left_alone(
    tmp_path: Path, mode: Mode
) -> None:
    """--input-dir: outputs made, no download, originals unchanged, resumable."""
    photos = write_photos(tmp_path / "in", 3)
    out = tmp_path / "out"
    settings = fast_settings(out, mode=mode)

    report = run(LocalFiles(tmp_path / "in"), settings)
    rerun = run(LocalFiles(tmp_path / "in"), settings)

    assert [o.status for o in report.results] == [Status.OK] * 3
    assert [o.status for o in rerun.results] == [Status.SKIPPED] * 3
    assert report.summary.bytes_downloaded == 0  # local files: nothing downloaded
    for name, data in photos.items():
        original = tmp_path / "in" / name
        assert original.read_bytes() == data
        assert original.stat().st_nlink == 1
        record = records_by_url(out)[original.resolve().as_uri()]
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert "http_status" not in record
        assert "final_url" not in record
        with Image.open(out / str(record["path"])) as image:
            assert max(image.size) <= 64


def test_cli_input_dir_glob_with_sizes(tmp_path: Path) -> None:
    """A quoted glob and --sizes: every file gets a main and a small output."""
    write_photos(tmp_path / "in" / "a", 1)
    write_photos(tmp_path / "in" / "b", 1)
    out = tmp_path / "out"
    pattern = str(tmp_path / "in" / "**" / "*.jpg")

    code = main(["--input-dir", pattern, "--out", str(out), "--sizes", "16,48", *FAST])

    assert code == 0
    records = read_manifest(out)
    assert len(records) == 2
    for record in records:
        with Image.open(out / str(record["path"])) as main_image:
            assert main_image.size == (48, 32)
        outputs = record["outputs"]
        assert isinstance(outputs, list)
        [small] = outputs
        assert str(small).startswith("16/")
        with Image.open(out / str(small)) as small_image:
            assert small_image.size == (16, 11)


def test_cli_input_dir_conflicts_with_a_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--input-dir replaces the URL list: giving both is a usage error."""
    write_photos(tmp_path / "in", 1)

    code = main(["list.txt", "--input-dir", str(tmp_path / "in"), *FAST])

    assert code == 2
    assert "--input-dir takes the place of a URL list" in capsys.readouterr().err


def test_stage_local_links_when_it_can_and_copies_when_it_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same file system: a hard link. EXDEV: a copy. Both hash the same bytes."""
    photo = tmp_path / "in" / "photo-0.jpg"
    data = write_photos(tmp_path / "in", 1)[photo.name]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    job = Job(0, 1, photo.as_uri(), photo.as_uri(), "p", local_path=str(photo))

    linked = stage_local(job, tmp)
    assert os.path.samefile(linked.path, photo)
    linked.path.unlink()

    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    copied = stage_local(job, tmp)

    assert not os.path.samefile(copied.path, photo)
    assert copied.path.read_bytes() == data
    assert linked.sha256 == copied.sha256 == hashlib.sha256(data).hexdigest()
    assert (copied.http_status, copied.final_url, copied.attempts) == (None, None, 0)


def test_stage_local_missing_file_is_a_per_item_failure(tmp_path: Path) -> None:
    """A file that vanished before its turn fails that item only."""
    job = Job(0, 1, "file:///gone.jpg", "file:///gone.jpg", "g", local_path="/gone")

    with pytest.raises(FetchError, match="cannot read local file: No such file"):
        stage_local(job, tmp_path)

    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- transforms


def test_cli_transform_options_reach_the_workers(tmp_path: Path) -> None:
    """fill, grayscale, png and a custom function all apply in worker processes."""
    write_photos(tmp_path / "in", 1)
    out = tmp_path / "out"

    code = main(
        [
            "--input-dir",
            str(tmp_path / "in"),
            "--out",
            str(out),
            "--size",
            "30x30",
            "--resize",
            "fill",
            "--format",
            "png",
            "--grayscale",
            "--transform",
            "tests.user_transforms:mark_corner",
            *FAST,
        ]
    )

    assert code == 0
    [record] = read_manifest(out)
    with Image.open(out / str(record["path"])) as image:
        assert image.format == "PNG"
        assert image.size == (30, 30)
        assert image.getpixel((0, 0)) == user_transforms.MARK
        red, green, blue = image.getpixel((15, 15))  # type: ignore[misc]
        assert red == green == blue  # grey, apart from the marked corner


def test_a_failing_custom_transform_fails_each_item_and_exits_1(
    tmp_path: Path,
) -> None:
    """The function raising is a per-item failure with its exception named."""
    write_photos(tmp_path / "in", 2)
    out = tmp_path / "out"

    code = main(
        [
            "--input-dir",
            str(tmp_path / "in"),
            "--out",
            str(out),
            "--transform",
            "tests.user_transforms:fail",
            *FAST,
        ]
    )

    assert code == 1
    errors = {str(record["error"]) for record in read_manifest(out)}
    assert errors == {"custom transform failed: ValueError: cannot handle 120x80"}


def test_an_unimportable_custom_transform_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A transform that cannot be imported is refused before anything runs."""
    write_photos(tmp_path / "in", 1)
    out = tmp_path / "out"

    code = main(
        [
            "--input-dir",
            str(tmp_path / "in"),
            "--out",
            str(out),
            "--transform",
            "tests.user_transforms:missing",
            *FAST,
        ]
    )

    assert code == 2
    assert "has no attribute 'missing'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "10x"], "not a size"),
        (["--size", "0x10"], "must be greater than 0"),
        (["--max-size", "10", "--size", "10x10"], "not allowed with"),
        (["--resize", "none", "--size", "10x10"], "resize 'none'"),
    ],
)
def test_bad_image_flags_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    """Bad or conflicting box flags are usage errors."""
    write_photos(tmp_path / "in", 1)

    code = main(["--input-dir", str(tmp_path / "in"), *argv, *FAST])

    assert code == 2
    assert message in capsys.readouterr().err


def test_keep_metadata_and_format_keep_from_python(tmp_path: Path) -> None:
    """format=keep keeps PNG as PNG; keep_metadata keeps the EXIF make."""
    folder = tmp_path / "in"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x010F] = "Camera"
    Image.new("RGB", (80, 40), "red").save(folder / "a.png", exif=exif)
    out = tmp_path / "out"
    spec = ImageSpec(max_size=64, format=ImageFormat.KEEP, keep_metadata=True)

    report = run(LocalFiles(folder), fast_settings(out, image=spec))

    [outcome] = report.results
    assert outcome.path is not None
    assert outcome.path.endswith(".png")
    with Image.open(out / outcome.path) as image:
        assert image.format == "PNG"
        assert image.getexif().get(0x010F) == "Camera"


def test_every_mode_gives_the_same_bytes_with_rich_options(tmp_path: Path) -> None:
    """Sizes, fill, webp and a custom function: identical outputs in two modes."""
    write_photos(tmp_path / "in", 2)
    spec = ImageSpec(
        resize=ResizeMode.FILL,
        sizes=((40, 30), (20, 20)),
        format=ImageFormat.WEBP,
        transform="tests.user_transforms:invert",
    )
    hashes = []
    for mode in (Mode.SEQUENTIAL, Mode.PIPELINE):
        out = tmp_path / mode.value
        run(LocalFiles(tmp_path / "in"), fast_settings(out, mode=mode, image=spec))
        files = sorted(p for p in out.rglob("*.webp"))
        hashes.append(
            [
                (p.relative_to(out).as_posix(), hashlib.sha256(p.read_bytes()).digest())
                for p in files
            ]
        )

    assert len(hashes[0]) == 4
    assert hashes[0] == hashes[1]
    manifest = json.loads(
        (tmp_path / "pipeline" / "manifest.jsonl").read_text().split("\n")[0]
    )
    assert manifest["outputs"][0].startswith("20/")


def test_files_an_input_dir_leaves_out_are_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder's files not named as images get one counted line (they were
    counted nowhere: 30 of 34 files appeared in the manifest, silently)."""
    write_photos(tmp_path / "in", 2)
    for name in ("a.heic", "b.HEIC", "notes.txt", "README"):
        (tmp_path / "in" / name).write_bytes(b"x")

    code = main(["--input-dir", str(tmp_path / "in"), "--out", str(tmp_path / "o")])

    err = capsys.readouterr().err
    assert code == 0
    assert len(read_manifest(tmp_path / "o")) == 2
    assert (
        f"{tmp_path / 'in'}: 4 file(s) left out, not named as images "
        "(.heic 2, .txt 1, no suffix 1); processed are .bmp, .gif, .jpeg, .jpg, "
        ".png, .webp"
    ) in err


def test_json_lines_read_as_text_get_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON Lines on stdin without --input-format jsonl: each such line fails with a
    reason that says how to read it (it was only 'whitespace … in URL')."""
    lines = [json.dumps({"url": f"http://127.0.0.1:9/{n}.jpg", "n": n}) for n in (1, 2)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))

    code = main(["-", "--out", str(tmp_path / "o"), "--no-config", *FAST])

    assert code == 1
    records = read_manifest(tmp_path / "o")
    assert [r["error"] for r in records] == [
        "a JSON object, not a URL (for JSON Lines: --input-format jsonl)"
    ] * 2
    assert "--input-format jsonl" in capsys.readouterr().err  # in the summary too


def test_json_lines_extras_keep_their_types_and_csv_stays_text(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Numbers, lists and objects from JSON Lines reach the manifest, the events and
    the records as they were given (they were stored as text: "[1, 2]"); a CSV
    column is text, and stays text even when it looks like a number."""
    url = corpus_urls(server, corpus)[0]
    given = {"id": 7, "tags": [1, 2], "geo": {"lat": 1.5}, "ok": True, "none": None}
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text(json.dumps({"url": url, **given}) + "\n", encoding="utf-8")
    csv_list = tmp_path / "list.csv"
    csv_list.write_text(f"url,id\n{url},7\n", encoding="utf-8")
    events = tmp_path / "events.jsonl"

    code = main(
        [str(jsonl), "--out", str(tmp_path / "j"), "--events", str(events), *FAST]
    )
    main([str(csv_list), "--out", str(tmp_path / "c"), "--no-config", *FAST])

    assert code == 0
    (record,) = read_manifest(tmp_path / "j")
    assert record["extra"] == given
    results = list(map(json.loads, events.read_text().splitlines()))
    assert [e["extra"] for e in results if e["type"] == "result"] == [given]
    (from_csv,) = read_manifest(tmp_path / "c")
    assert from_csv["extra"] == {"id": "7"}


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_an_idna_name_that_does_not_decode_fails_alone(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """``xn--n3h`` (a snowman), ``xn--a`` and ``xn--zz-`` are ASCII names that httpx
    cannot decode: each is that URL's failure with the reason, listed or reached by a
    redirect, and the rest of the run goes on (they crashed it, every rerun again)."""
    good = corpus_urls(server, corpus)[0]
    bad = [f"http://xn--{label}.invalid/x.jpg" for label in ("n3h", "a", "zz-")]
    hop = f"{server.base_url}/location/http%3A%2F%2Fxn--n3h.invalid%2Fy.jpg"

    report = run([*bad, hop, good], fast_settings(tmp_path, mode=mode))
    outcomes = {o.url: o for o in report.results}

    assert outcomes[good].status is Status.OK
    for url in bad:
        assert outcomes[url].status is Status.FAILED
        assert str(outcomes[url].error).startswith("host is not a valid name: "), url
    assert outcomes[hop].status is Status.FAILED
    assert str(outcomes[hop].error).startswith("bad redirect: host is not a valid name")
    assert len(read_manifest(tmp_path)) == 5
