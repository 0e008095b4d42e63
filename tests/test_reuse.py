"""Content-addressed names (--name-by sha256) and kept originals (--keep-originals)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from downloader import Mode, Stage, Status, run
from downloader.cli import main
from downloader.progress import EventKind, EventLog
from downloader.records import Fetched, Job, Outcome, Transformed
from downloader.reuse import FINGERPRINT_FIELDS, ContentIndex, settings_fingerprint
from downloader.settings import (
    LOCAL_MODES,
    ImageFormat,
    ImageSpec,
    NameBy,
    Resample,
    Settings,
)
from tests.helpers import (
    LocalServer,
    corpus_urls,
    fast_settings,
    leftovers,
    read_manifest,
    write_list,
)

# The modes whose scheduling differs: the claim happens in a download thread
# (pipeline), a pool thread (threads), the parent between two pool calls
# (processes), the event loop (async) or in turn (sequential).
ALL_MODES = list(LOCAL_MODES)
SMALL = ImageSpec(max_size=64)
SMALLER = ImageSpec(max_size=32)
# ImageSpec fields that never change an output's bytes or name.
NOT_FINGERPRINTED = {"max_pixels"}


def duplicate_urls(server: LocalServer, corpus: Path) -> tuple[list[str], int]:
    """Two distinct images, each under several URLs; and the number of bodies."""
    first, second = corpus_urls(server, corpus)[:2]
    first_name = first.rpartition("/")[2]
    # /named/* serves the first corpus file, which is ``first``.
    urls = [
        first,
        second,
        f"{server.base_url}/redirect/0/{first_name}",
        f"{server.base_url}/named/a.jpg",
        f"{server.base_url}/named/b.jpg",
        f"{server.base_url}/flaky/0/{second.rpartition('/')[2]}",
        f"{server.base_url}/named/c.jpg",
    ]
    return urls, 2


def transforms(log: EventLog) -> int:
    """How many transforms started."""
    return sum(
        1
        for e in log.events
        if e.stage is Stage.TRANSFORM and e.kind is EventKind.STARTED
    )


def file_hash(path: Path) -> str:
    """SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.value)
def test_sha256_names_outputs_by_content_and_transforms_each_body_once(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Every URL is ok; duplicates point at their leader's output, made only once."""
    urls, bodies = duplicate_urls(server, corpus)
    out = tmp_path / "out"
    log = EventLog()

    report = run(urls, fast_settings(out, mode=mode, name_by=NameBy.SHA256), events=log)

    assert [o.status for o in report.results] == [Status.OK] * len(urls)
    assert transforms(log) == bodies
    records = read_manifest(out)
    assert len(records) == len(urls)
    for record in records:
        assert record["path"] == f"{str(record['sha256'])[:16]}.jpg"
    assert len({r["path"] for r in records}) == bodies
    leaders = {r["url"] for r in records if "note" not in r}
    assert len(leaders) == bodies
    followers = [r for r in records if "note" in r]
    assert all(str(r["note"]).startswith("same content as http") for r in followers)
    assert all(r.get("transform_s") is None for r in followers)
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted(
        str(r["path"]) for r in records if r["url"] in leaders
    )
    assert leftovers(out) == []


def test_sha256_outputs_are_byte_identical_in_every_mode(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Same list, every mode: the same names with the same bytes."""
    urls, _ = duplicate_urls(server, corpus)

    outputs = {}
    for mode in ALL_MODES:
        out = tmp_path / mode.value
        run(urls, fast_settings(out, mode=mode, name_by=NameBy.SHA256))
        outputs[mode] = {p.name: file_hash(p) for p in out.glob("*.jpg")}

    assert len(outputs[Mode.SEQUENTIAL]) == 2
    assert all(o == outputs[Mode.SEQUENTIAL] for o in outputs.values())


@pytest.mark.parametrize("mode", [Mode.PIPELINE, Mode.PROCESSES], ids=lambda m: m.value)
def test_a_duplicate_of_a_body_that_fails_fails_the_same_way(
    mode: Mode, server: LocalServer, tmp_path: Path
) -> None:
    """Three URLs with the same body that is no image: one transform, three failed
    records."""
    urls = [f"{server.base_url}/noise/{n}" for n in range(3)]
    out = tmp_path / "out"
    log = EventLog()

    report = run(urls, fast_settings(out, mode=mode, name_by=NameBy.SHA256), events=log)

    assert [o.status for o in report.results] == [Status.FAILED] * 3
    assert transforms(log) == 1
    assert len({o.error for o in report.results}) == 1
    assert sum(1 for o in report.results if o.note) == 2
    assert sorted((out / "failed.txt").read_text().splitlines()) == sorted(urls)


@pytest.mark.parametrize("mode", [Mode.PIPELINE, Mode.THREADS], ids=lambda m: m.value)
def test_a_new_url_with_content_the_manifest_has_is_not_transformed(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Rerun with a new URL for a known body: downloaded, not transformed, ok."""
    first = corpus_urls(server, corpus)[0]
    twin = f"{server.base_url}/named/twin.jpg"
    out = tmp_path / "out"
    settings = fast_settings(out, mode=mode, name_by=NameBy.SHA256)
    run([first], settings)
    log = EventLog()

    report = run([first, twin], settings, events=log)

    by_url = {o.url: o for o in report.results}
    assert by_url[first].status is Status.SKIPPED
    assert by_url[twin].status is Status.OK
    assert by_url[twin].note == f"same content as {first}"
    assert by_url[twin].path == by_url[first].path
    assert transforms(log) == 0
    assert server.requests["/named/twin.jpg"] == 1


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.value)
def test_a_rerun_with_new_settings_redoes_only_changed_items_from_originals(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Kept originals: changed items are redone with no download, the rest skipped."""
    urls = corpus_urls(server, corpus)[:4]
    out = tmp_path / "out"
    run(urls[:2], fast_settings(out, mode=mode, keep_originals=True, image=SMALL))
    run(urls[2:], fast_settings(out, mode=mode, keep_originals=True, image=SMALLER))
    kept = {str(r["url"]): str(r["original"]) for r in read_manifest(out)}
    kept_bytes = {url: (out / name).read_bytes() for url, name in kept.items()}
    requests = server.request_count()
    log = EventLog()

    report = run(
        urls,
        fast_settings(out, mode=mode, keep_originals=True, image=SMALLER),
        events=log,
    )

    assert server.request_count() == requests
    statuses = {o.url: o.status for o in report.results}
    assert statuses == {
        urls[0]: Status.OK,
        urls[1]: Status.OK,
        urls[2]: Status.SKIPPED,
        urls[3]: Status.SKIPPED,
    }
    assert transforms(log) == 2
    fingerprint = settings_fingerprint(fast_settings(out, image=SMALLER))
    records = {str(r["url"]): r for r in read_manifest(out)}
    for url in urls:
        assert records[url]["settings"] == fingerprint
        assert records[url]["original"] == kept[url]
        assert (out / kept[url]).read_bytes() == kept_bytes[url]
        with Image.open(out / str(records[url]["path"])) as image:
            assert max(image.size) <= 32
    assert str(records[urls[0]]["note"]).startswith("processed again from the kept")
    assert leftovers(out) == []


def test_originals_are_the_downloaded_bytes_under_the_detected_extension(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """originals/<stem>.<ext>: the body as served; PNG bodies get .png."""
    jpeg = corpus_urls(server, corpus)[0]
    png = server.url_for("slow.png")
    out = tmp_path / "out"

    report = run([jpeg, png], fast_settings(out, keep_originals=True))

    by_url = {o.url: o for o in report.results}
    assert str(by_url[jpeg].original).endswith(".jpg")
    assert str(by_url[png].original).endswith(".png")
    assert str(by_url[jpeg].original).startswith("originals/")
    assert (out / str(by_url[png].original)).read_bytes() == (
        corpus / "slow.png"
    ).read_bytes()
    assert leftovers(out) == []


@pytest.mark.parametrize("mode", [Mode.PIPELINE, Mode.ASYNC], ids=lambda m: m.value)
def test_sha256_with_originals_keeps_one_original_per_body(
    mode: Mode, server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Duplicates share their leader's original; a new format redoes from it."""
    urls, bodies = duplicate_urls(server, corpus)
    out = tmp_path / "out"
    settings = fast_settings(out, mode=mode, name_by=NameBy.SHA256, keep_originals=True)
    run(urls, settings)
    first = read_manifest(out)
    requests = server.request_count()
    log = EventLog()

    png = dataclasses.replace(SMALL, format=ImageFormat.PNG)
    report = run(urls, dataclasses.replace(settings, image=png), events=log)

    assert len(list((out / "originals").iterdir())) == bodies
    assert all(r["original"] == f"originals/{str(r['sha256'])[:16]}.jpg" for r in first)
    assert server.request_count() == requests
    assert [o.status for o in report.results] == [Status.OK] * len(urls)
    assert transforms(log) == bodies
    assert {Path(str(o.path)).suffix for o in report.results} == {".png"}


def test_without_originals_a_settings_change_downloads_again(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A new format redoes ok URLs (by downloading); the same settings skip them."""
    urls = corpus_urls(server, corpus)[:3]
    out = tmp_path / "out"
    run(urls, fast_settings(out))
    before = server.request_count()

    png = dataclasses.replace(SMALL, format=ImageFormat.PNG)
    redone = run(urls, fast_settings(out, image=png))
    again = run(urls, fast_settings(out, image=png))

    assert server.request_count() - before == len(urls)
    assert [o.status for o in redone.results] == [Status.OK] * 3
    assert all(str(o.path).endswith(".png") for o in redone.results)
    assert [o.status for o in again.results] == [Status.SKIPPED] * 3


def test_records_without_a_fingerprint_count_as_current(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Manifests from before the fingerprint: their ok records are still skipped."""
    urls = corpus_urls(server, corpus)[:2]
    out = tmp_path / "out"
    run(urls, fast_settings(out))
    manifest = out / "manifest.jsonl"
    old = [json.loads(line) for line in manifest.read_text().splitlines()]
    for record in old:
        del record["settings"]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in old))
    before = server.request_count()

    report = run(urls, fast_settings(out, image=SMALLER))

    assert server.request_count() == before
    assert [o.status for o in report.results] == [Status.SKIPPED] * 2


def test_the_fingerprint_covers_exactly_the_output_deciding_fields() -> None:
    """Every ImageSpec field is fingerprinted or listed as not deciding outputs."""
    names = {field.name for field in dataclasses.fields(ImageSpec)}
    base = Settings()

    def changed(**image: object) -> bool:
        spec = dataclasses.replace(base.image, **image)  # type: ignore[arg-type]
        other = dataclasses.replace(base, image=spec)
        return settings_fingerprint(other) != settings_fingerprint(base)

    assert names == FINGERPRINT_FIELDS | NOT_FINGERPRINTED
    assert changed(format=ImageFormat.PNG)
    assert changed(max_size=512)
    assert changed(quality=50)
    assert not changed(max_pixels=1000)
    assert changed(resample=Resample.FAST)
    assert changed(resample=Resample.BEST)
    assert not changed(size=(1024, 1024))  # the same box as max_size 1024
    assert settings_fingerprint(
        dataclasses.replace(base, name_by=NameBy.SHA256)
    ) != settings_fingerprint(base)
    two = dataclasses.replace(base.image, sizes=((64, 64), (32, 32), (16, 16)))
    swapped = dataclasses.replace(base.image, sizes=((64, 64), (16, 16), (32, 32)))
    assert settings_fingerprint(
        dataclasses.replace(base, image=two)
    ) == settings_fingerprint(dataclasses.replace(base, image=swapped))


def test_cli_flags_name_by_sha256_and_keep_originals(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """--name-by sha256 --keep-originals from the command line."""
    urls, bodies = duplicate_urls(server, corpus)
    url_list = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"
    args = [str(url_list), "--out", str(out), "--no-progress", "--procs", "1"]

    code = main([*args, "--max-size", "32", "--name-by", "sha256", "--keep-originals"])

    assert code == 0
    records = read_manifest(out)
    assert len({r["path"] for r in records}) == bodies
    assert len({r["original"] for r in records}) == bodies
    assert len(list(out.glob("*.jpg"))) == bodies


def staged(tmp_path: Path, index: int, body: bytes) -> Fetched:
    """A finished download of ``body`` for job ``index``, as a scheduler holds it."""
    path = tmp_path / f"{index}.part"
    path.write_bytes(body)
    job = Job(index, index + 1, f"http://127.0.0.1/{index}", f"k{index}", f"s{index}")
    sha256 = hashlib.sha256(body).hexdigest()
    return Fetched(job, path, len(body), sha256, job.url, 200, 1, 0.01)


def test_a_duplicate_in_flight_waits_for_its_leaders_record(tmp_path: Path) -> None:
    """Claimed while the leader works: no record now, one after the leader's."""
    index = ContentIndex(fast_settings(tmp_path, name_by=NameBy.SHA256), tmp_path)
    leader = index.claim(staged(tmp_path, 0, b"same"))
    follower = staged(tmp_path, 1, b"same")

    waiting = index.claim(follower)
    assert isinstance(leader, Fetched)
    done = Outcome.success(leader, Transformed("x.jpg", 4, 3, 10, 0.1))
    relayed = list(index.relay(iter([done])))

    assert waiting is None
    assert not follower.path.exists()
    assert leader.job.stem == (leader.sha256 or "")[:16]
    assert [o.url for o in relayed] == [leader.job.url, follower.job.url]
    assert relayed[1].status is Status.OK
    assert relayed[1].path == "x.jpg"
    assert relayed[1].note == f"same content as {leader.job.url}"
    assert relayed[1].settings == index.fingerprint


def test_a_duplicate_whose_leader_never_ends_gets_a_failed_record(
    tmp_path: Path,
) -> None:
    """A run cut short before the leader's record: the follower still gets one."""
    index = ContentIndex(fast_settings(tmp_path, name_by=NameBy.SHA256), tmp_path)
    index.claim(staged(tmp_path, 0, b"same"))
    index.claim(staged(tmp_path, 1, b"same"))

    relayed = list(index.relay(iter([])))

    assert [o.status for o in relayed] == [Status.FAILED]
    assert str(relayed[0].error).startswith("interrupted")


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_outputs_of_old_settings_are_removed_once_replaced(
    server: LocalServer, corpus: Path, tmp_path: Path, mode: Mode
) -> None:
    """A rerun with --format webp: the .jpg files go once the .webp are in place
    (they used to stay, named by no record); a user's own file is left alone."""
    urls = corpus_urls(server, corpus)[:2]
    out = tmp_path / "out"
    first = run(urls, fast_settings(out, mode=mode))
    old = sorted(str(o.path) for o in first.results)
    (out / "mine.jpg").write_bytes(b"not the tool's")

    webp = ImageSpec(max_size=64, format=ImageFormat.WEBP)
    second = run(urls, fast_settings(out, mode=mode, image=webp))

    new = sorted(str(o.path) for o in second.results)
    assert all(name.endswith(".jpg") for name in old)
    assert all(name.endswith(".webp") for name in new)
    assert [(out / name).exists() for name in old] == [False, False]
    assert all((out / name).is_file() for name in new)
    assert (out / "mine.jpg").read_bytes() == b"not the tool's"


def test_a_hand_edited_record_cannot_make_a_rerun_delete_a_users_file(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Old outputs are removed only under the names this URL's outputs get: a record
    edited to name a user's file (or one outside OUT) leaves it alone."""
    urls = corpus_urls(server, corpus)[:1]
    out = tmp_path / "out"
    run(urls, fast_settings(out))
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "photo.jpg").write_text("mine too")
    (tmp_path / "outside.jpg").write_text("not in OUT")
    manifest = out / "manifest.jsonl"
    record = json.loads(manifest.read_text())
    record["path"] = "notes.txt"
    record["outputs"] = ["mine/photo.jpg", "../outside.jpg"]
    manifest.write_text(json.dumps(record) + "\n")

    run(urls, fast_settings(out, image=ImageSpec(max_size=64, format=ImageFormat.WEBP)))

    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "mine" / "photo.jpg").read_text() == "mine too"
    assert (tmp_path / "outside.jpg").read_text() == "not in OUT"
