"""Output names that meet something already there, in every mode.

Output names are deterministic, so a rerun, a user or another tool may have put
something at one. Only a file the manifest records as this URL's output (or one this
run wrote) is replaced; anything else fails that one item, with a reason naming the
real path, and the run goes on.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image

from downloader import Mode, Status, run
from downloader.cli import main
from downloader.errors import TransformError
from downloader.records import Outcome
from downloader.settings import LOCAL_MODES, ImageSpec, NameBy, Settings
from downloader.sources import normalize_url, safe_stem
from downloader.transform import place_file, transform_file
from tests.helpers import (
    LocalServer,
    corpus_urls,
    fast_settings,
    leftovers,
    read_manifest,
    write_list,
)

MODES = list(LOCAL_MODES)
USER_BYTES = b"the user's own notes, not an image\n"
# URLs per run: the blocked one and two that must still end ok.
URLS_PER_RUN = 3


def _output(out: Path, url: str, folder: str = "") -> Path:
    """Where the main output (or the kept original) of ``url`` goes, as a JPEG."""
    name = safe_stem(normalize_url(url)) + ".jpg"
    return out / folder / name if folder else out / name


def _settings(out: Path, mode: Mode, **overrides: object) -> Settings:
    return fast_settings(out, mode=mode, threads=2, procs=1, **overrides)


def _assert_blocked(results: tuple[Outcome, ...], url: str, path: Path, kind: str):
    """``url`` failed naming ``path`` and what is there; every other URL is ok."""
    by_url = {o.url: o for o in results}
    blocked = by_url.pop(url)
    assert blocked.status is Status.FAILED
    assert blocked.error == f"output path {path} exists and is not ours ({kind})"
    assert [o.status for o in by_url.values()] == [Status.OK] * len(by_url)


@pytest.fixture
def urls(server: LocalServer, corpus: Path) -> list[str]:
    """A few corpus URLs; the first is the one whose output name is taken."""
    return corpus_urls(server, corpus)[:URLS_PER_RUN]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_a_directory_at_an_output_name_fails_that_item_only(
    mode: Mode, urls: list[str], tmp_path: Path
) -> None:
    """A folder where the image would go: that URL fails, the others are ok."""
    out = tmp_path / "out"
    blocker = _output(out, urls[0])
    blocker.mkdir(parents=True)

    report = run(urls, _settings(out, mode))

    _assert_blocked(report.results, urls[0], blocker, "a directory")
    assert blocker.is_dir()
    assert len(read_manifest(out)) == len(urls)
    assert leftovers(out) == []


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_a_users_file_at_an_output_name_is_never_overwritten(
    mode: Mode, urls: list[str], tmp_path: Path
) -> None:
    """A file no record names as this URL's output keeps its bytes; the URL fails."""
    out = tmp_path / "out"
    out.mkdir()
    blocker = _output(out, urls[0])
    blocker.write_bytes(USER_BYTES)

    report = run(urls, _settings(out, mode))

    _assert_blocked(
        report.results,
        urls[0],
        blocker,
        "a file the manifest does not record for this URL",
    )
    assert blocker.read_bytes() == USER_BYTES
    assert leftovers(out) == []


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_a_symlink_at_an_output_name_is_never_written_through(
    mode: Mode, urls: list[str], tmp_path: Path
) -> None:
    """A link to a file outside OUT stays a link, and its target keeps its bytes."""
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere.jpg"
    target.write_bytes(USER_BYTES)
    blocker = _output(out, urls[0])
    blocker.symlink_to(target)

    report = run(urls, _settings(out, mode))

    _assert_blocked(report.results, urls[0], blocker, "a symbolic link")
    assert blocker.is_symlink()
    assert os.readlink(blocker) == str(target)
    assert target.read_bytes() == USER_BYTES


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_a_rerun_replaces_its_own_outputs(
    mode: Mode, urls: list[str], tmp_path: Path
) -> None:
    """--force, and a change of settings, redo every URL over its recorded output."""
    out = tmp_path / "out"
    run(urls, _settings(out, mode, keep_originals=True))
    first = _output(out, urls[0]).read_bytes()

    forced = run(urls, _settings(out, mode, keep_originals=True, force=True))
    changed = run(
        urls,
        _settings(
            out, mode, keep_originals=True, image=ImageSpec(sizes=((48, 48), (24, 24)))
        ),
    )

    assert [o.status for o in forced.results] == [Status.OK] * len(urls)
    assert [o.status for o in changed.results] == [Status.OK] * len(urls)
    assert _output(out, urls[0]).read_bytes() != first  # a 48 px box, not 64
    assert all((out / "24" / Path(str(o.path)).name).is_file() for o in changed.results)
    assert len(read_manifest(out)) == len(urls)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_a_taken_original_name_fails_that_item_and_leaves_no_stray_output(
    mode: Mode, urls: list[str], tmp_path: Path
) -> None:
    """--keep-originals: a folder at the original's name fails the URL, not the run."""
    out = tmp_path / "out"
    blocker = _output(out, urls[0], "originals")
    blocker.mkdir(parents=True)

    report = run(urls, _settings(out, mode, keep_originals=True))

    _assert_blocked(report.results, urls[0], blocker, "a directory")
    assert not _output(out, urls[0]).exists()  # its image has no ok record: removed
    assert leftovers(out) == []


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_a_taken_content_name_fails_that_body(
    mode: Mode, urls: list[str], corpus: Path, tmp_path: Path
) -> None:
    """--name-by sha256: a user's file at a body's name is kept; that URL fails."""
    out = tmp_path / "out"
    out.mkdir()
    body = (corpus / urls[0].rpartition("/")[2]).read_bytes()
    blocker = out / (hashlib.sha256(body).hexdigest()[:16] + ".jpg")
    blocker.write_bytes(USER_BYTES)

    report = run(urls, _settings(out, mode, name_by=NameBy.SHA256))

    _assert_blocked(
        report.results,
        urls[0],
        blocker,
        "a file the manifest does not record for this URL",
    )
    assert blocker.read_bytes() == USER_BYTES


def test_the_command_line_goes_on_past_a_taken_name(
    urls: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder at an output name: exit 1 (a failed URL), not 3 (a stopped run)."""
    out = tmp_path / "out"
    blocker = _output(out, urls[0])
    blocker.mkdir(parents=True)
    url_list = write_list(tmp_path / "urls.txt", urls)

    code = main([str(url_list), "--out", str(out), "--no-progress", "--procs", "1"])

    assert code == 1
    assert f"{blocker}" in (out / "manifest.jsonl").read_text(encoding="utf-8")
    assert ".tmp" not in capsys.readouterr().err


def test_a_taken_size_name_removes_the_outputs_already_placed(tmp_path: Path) -> None:
    """--sizes: the second output's name is a folder, so the first is taken back."""
    src = tmp_path / "in.png"
    Image.new("RGB", (80, 60), (200, 40, 40)).save(src)
    out = tmp_path / "out"
    blocker = out / "24" / "img.jpg"
    blocker.mkdir(parents=True)
    spec = ImageSpec(sizes=((64, 64), (24, 24)))

    with pytest.raises(TransformError) as caught:
        transform_file(src, out, "img", spec)

    assert caught.value.reason == (
        f"output path {blocker} exists and is not ours (a directory)"
    )
    assert not (out / "img.jpg").exists()
    assert list((out / ".tmp").iterdir()) == []


def test_only_a_regular_file_named_as_ours_is_replaced(tmp_path: Path) -> None:
    """An owned name holding a file is replaced; one holding a link is not."""
    src = tmp_path / "in.png"
    Image.new("RGB", (80, 60), (200, 40, 40)).save(src)
    out = tmp_path / "out"
    (out / "linked").mkdir(parents=True)
    (out / "img.jpg").write_bytes(USER_BYTES)
    (out / "linked" / "img.jpg").symlink_to(tmp_path / "in.png")
    spec = ImageSpec(sizes=((64, 64), (24, 24)))

    result = transform_file(src, out, "img", spec, owned=("img.jpg", "24/img.jpg"))
    with pytest.raises(TransformError, match=r"\(a symbolic link\)$"):
        transform_file(src, out / "linked", "img", ImageSpec(), owned=("img.jpg",))

    assert result.path == "img.jpg"
    assert (out / "img.jpg").read_bytes().startswith(b"\xff\xd8")
    assert (out / "linked" / "img.jpg").is_symlink()


def test_a_file_with_the_very_bytes_to_be_written_is_kept(tmp_path: Path) -> None:
    """An unrecorded output of a run that stopped early is taken over, not refused."""
    src = tmp_path / "in.png"
    Image.new("RGB", (80, 60), (200, 40, 40)).save(src)
    out = tmp_path / "out"
    out.mkdir()
    transform_file(src, out, "img", ImageSpec())
    inode = (out / "img.jpg").stat().st_ino

    result = transform_file(src, out, "img", ImageSpec())

    assert result.path == "img.jpg"
    assert (out / "img.jpg").stat().st_ino == inode
    assert list((out / ".tmp").iterdir()) == []


@pytest.mark.parametrize("folder", ["256", "originals"])
def test_a_link_planted_at_an_output_folder_is_never_written_through(
    tmp_path: Path, folder: str
) -> None:
    """A --sizes or originals folder swapped for a link mid-run: refused, not followed.

    The folder is opened without following links and the file placed relative to
    it, so a link planted at any moment is found, not written through.
    """
    out, outside = tmp_path / "out", tmp_path / "outside"
    (out / ".tmp").mkdir(parents=True)
    outside.mkdir()
    (out / folder).symlink_to(outside)
    src = out / ".tmp" / "x.jpg.tmp"
    src.write_bytes(b"image")

    with pytest.raises(TransformError, match="is a symbolic link: refused"):
        place_file(src, out, f"{folder}/x.jpg", ())

    assert list(outside.iterdir()) == []
    assert src.read_bytes() == b"image"  # left for the caller to remove
