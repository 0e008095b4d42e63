"""Hostile servers and hostile images, end to end through ``downloader.run``.

One run fetches every misbehaving route at once (a bad night on the network); each test
then checks one URL's record, the server's request log, and the files on disk.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from downloader import Stage, Status, run
from downloader.demo import serve_in_thread
from downloader.records import Outcome
from downloader.report import RunReport
from downloader.settings import LOCAL_MODES, HttpSettings, ImageSpec, Mode
from downloader.transfer import STALL_RETRIES
from tests.helpers import (
    BIG_BODY,
    FLAT_IMAGE,
    LocalServer,
    corpus_urls,
    fast_settings,
    gzip_bomb,
    leftovers,
    read_manifest,
)

GOOD = "a-good.jpg"
MAX_BYTES = 100_000
MAX_PIXELS = 10_000
RETRIES = 2
ATTEMPTS = RETRIES + 1
STALL_ATTEMPTS = STALL_RETRIES + 1
READ_TIMEOUT_S = 0.5
# Well past the read timeout, so that /silent's attempts end by the read timeout (a
# stall: retried once) and not by the deadline (retried like any timeout), even when
# connecting is slow on a busy machine.
DEADLINE_S = 1.5
MAX_BACKOFF_S = 0.5
LONG_NAME = "x" * 3000 + ".jpg"
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _write_images(folder: Path) -> None:
    """Write one good image and the hostile ones the server offers."""
    Image.linear_gradient("L").resize((48, 32)).convert("RGB").save(folder / GOOD)
    noisy = Image.effect_noise((80, 80), 60).convert("RGB")
    noisy.save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "fake.jpg").write_bytes(b"<html>oops</html>")
    (folder / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (300, 300), RED).save(folder / "bomb.png")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.new("I;16", (40, 30), 40000).save(folder / "sixteen.png")
    palette = Image.new("P", (40, 30), 0)
    palette.putpalette([*RED, *BLUE])
    palette.paste(1, (20, 0, 40, 30))
    palette.save(folder / "palette.png", transparency=0)
    frames = [Image.new("RGB", (30, 30), colour) for colour in (RED, BLUE, BLUE)]
    frames[0].save(
        folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50
    )
    sideways = Image.new("RGB", (40, 20), RED)
    sideways.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    sideways.save(folder / "exif-rotated.jpg", exif=exif, quality=95)


@dataclass(frozen=True)
class Batch:
    """The one hostile run shared by this module's tests."""

    server: LocalServer
    out: Path
    report: RunReport
    by_path: dict[str, Outcome]

    def outcome(self, path: str) -> Outcome:
        """The record of the URL at ``path`` on the server."""
        return self.by_path[path]

    def requests(self, path: str) -> int:
        """Requests the server saw for ``path`` (query ignored)."""
        return self.server.request_count(path)

    def arrivals(self, path: str) -> list[float]:
        """Arrival times of the requests for ``path``."""
        return [when for logged, when in self.server.log if logged == path]


HOSTILE_PATHS = [
    "/status/404",
    "/status/410",
    "/status/500",
    "/status/503",
    f"/flaky/2/{GOOD}",
    f"/retry-after/seconds/{GOOD}",
    f"/retry-after/date/{GOOD}",
    "/html",
    "/reset",
    "/short",
    "/silent",
    "/drip",
    "/chunked-cut",
    "/big",
    "/big-unsized",
    "/gzip-bomb",
    f"/redirect/3/{GOOD}",
    f"/redirect/9/{GOOD}",
    "/loop",
    "/to-file",
    "/to-ftp",
    f"/relative/{GOOD}",
    f"/disposition/dotdot/{GOOD}",
    f"/disposition/absolute/{GOOD}",
    "/named/dir/",
    "/named/a/../b.jpg",
    f"/named/{LONG_NAME}",
    "/named/画像-ünï.jpg",
    "/named/q.jpg?a=1",
    "/named/q.jpg?a=2",
    "/truncated.jpg",
    "/fake.jpg",
    "/bomb.png",
    "/cmyk.jpg",
    "/sixteen.png",
    "/palette.png",
    "/animated.gif",
    "/exif-rotated.jpg",
    "/empty.jpg",
    "/empty",
]


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Batch]:
    """Run once over every hostile route (plus a duplicate and a bad line)."""
    site = tmp_path_factory.mktemp("site")
    _write_images(site)
    out = tmp_path_factory.mktemp("run") / "out"
    settings = fast_settings(
        out,
        threads=12,
        http=HttpSettings(
            timeout=READ_TIMEOUT_S,
            deadline=DEADLINE_S,
            retries=RETRIES,
            backoff=0,
            max_backoff=MAX_BACKOFF_S,
            max_bytes=MAX_BYTES,
            per_host=16,
            min_speed=0,  # /drip is for the deadline
        ),
        image=ImageSpec(max_size=64, max_pixels=MAX_PIXELS),
    )
    # Made before the run: inflating 20 MB at level 9 as the request comes can take
    # longer than the 0.5 s read timeout on a loaded machine.
    gzip_bomb()
    with serve_in_thread(LocalServer(site)) as server:
        assert isinstance(server, LocalServer)
        urls = [server.base_url + path for path in HOSTILE_PATHS]
        lines = [*urls, urls[0], "http://exa mple.com/x.jpg"]
        report = run(lines, settings)
        by_path = {
            o.url.removeprefix(server.base_url): o
            for o in report.results
            if o.url.startswith(server.base_url)
        }
        yield Batch(server, out, report, by_path)


FAILURES = [
    ("/status/404", Stage.DOWNLOAD, "HTTP 404", 1),
    ("/status/410", Stage.DOWNLOAD, "HTTP 410", 1),
    ("/status/500", Stage.DOWNLOAD, f"HTTP 500 after {ATTEMPTS} attempts", ATTEMPTS),
    ("/status/503", Stage.DOWNLOAD, f"HTTP 503 after {ATTEMPTS} attempts", ATTEMPTS),
    (
        "/html",
        Stage.DOWNLOAD,
        "not an image: server sent text/html "
        "(starts with '<html><body>404</body></html>')",
        1,
    ),
    (
        "/short",
        Stage.DOWNLOAD,
        f"connection closed early (100 of 1000 bytes) after {ATTEMPTS} attempts",
        ATTEMPTS,
    ),
    (
        "/silent",
        Stage.DOWNLOAD,
        # Headers, then nothing: a stall, retried once only.
        f"read timeout ({READ_TIMEOUT_S:g}s) after {STALL_ATTEMPTS} attempts",
        STALL_ATTEMPTS,
    ),
    (
        "/drip",
        Stage.DOWNLOAD,
        f"past the {DEADLINE_S:g}s deadline after {ATTEMPTS} attempts",
        ATTEMPTS,
    ),
    (
        "/chunked-cut",
        Stage.DOWNLOAD,
        "peer closed connection without sending complete message body "
        f"(incomplete chunked read) after {ATTEMPTS} attempts",
        ATTEMPTS,
    ),
    (
        "/big",
        Stage.DOWNLOAD,
        f"larger than --max-bytes ({MAX_BYTES} bytes): Content-Length {BIG_BODY}",
        1,
    ),
    ("/big-unsized", Stage.DOWNLOAD, f"larger than --max-bytes ({MAX_BYTES} bytes)", 1),
    ("/gzip-bomb", Stage.DOWNLOAD, f"larger than --max-bytes ({MAX_BYTES} bytes)", 1),
    (f"/redirect/9/{GOOD}", Stage.DOWNLOAD, "too many redirects (more than 5)", 1),
    ("/loop", Stage.DOWNLOAD, "redirect loop", 1),
    ("/to-file", Stage.DOWNLOAD, "redirect to unsupported scheme 'file'", 1),
    ("/to-ftp", Stage.DOWNLOAD, "redirect to unsupported scheme 'ftp'", 1),
    (
        "/fake.jpg",
        Stage.DOWNLOAD,
        "not an image: the body is text (starts with '<html>oops</html>'; "
        "sent as image/jpeg)",
        1,
    ),
    ("/empty.jpg", Stage.DOWNLOAD, "empty body", 1),
    ("/empty", Stage.DOWNLOAD, "empty body", 1),
]


@pytest.mark.parametrize(
    ("path", "stage", "reason", "requests"),
    FAILURES,
    ids=[case[0] for case in FAILURES],
)
def test_a_hostile_route_fails_with_a_plain_reason(
    batch: Batch, path: str, stage: Stage, reason: str, requests: int
) -> None:
    """Each fault fails its URL alone, says why, and is retried only if it may help."""
    outcome = batch.outcome(path)

    assert outcome.status is Status.FAILED
    assert outcome.stage is stage
    assert outcome.error == reason
    assert outcome.path is None
    assert batch.requests(path) == requests


def _nesting(text: str) -> int:
    """How deep parentheses go in ``text``."""
    depth = deepest = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        deepest = max(deepest, depth)
    return deepest


def test_every_reason_reads_as_plain_words(batch: Batch) -> None:
    """No Python repr, no full stop before the reason goes on, no (… (…))."""
    reasons = [o.error or o.note or "" for o in batch.report.results]

    assert len([r for r in reasons if r]) >= len(FAILURES)
    for reason in reasons:
        assert not re.search(r"bytearray|b'|b\"|\.\s+after|\.\)|\.;", reason), reason
        assert _nesting(reason) <= 1, reason


def test_a_connection_reset_mid_body_is_retried_then_failed(batch: Batch) -> None:
    """A reset after 5000 of 100000 bytes counts as transient and is retried."""
    outcome = batch.outcome("/reset")

    assert outcome.status is Status.FAILED
    assert re.fullmatch(
        r"(connection closed early \(5000 of 100000 bytes\)"
        r"|connection error: .*reset by peer.*)"
        f" after {ATTEMPTS} attempts",
        str(outcome.error),
    ), outcome.error
    assert batch.requests("/reset") == ATTEMPTS


def test_redirect_chains_are_followed_by_hand(batch: Batch) -> None:
    """A chain within the limit and a relative Location both end in the image."""
    chain = batch.outcome(f"/redirect/3/{GOOD}")
    relative = batch.outcome(f"/relative/{GOOD}")

    assert chain.status is Status.OK
    assert chain.final_url == f"{batch.server.base_url}/redirect/0/{GOOD}"
    assert [batch.requests(f"/redirect/{n}/{GOOD}") for n in range(4)] == [1] * 4
    assert relative.status is Status.OK
    assert relative.final_url == f"{batch.server.base_url}/{GOOD}"
    assert batch.requests("/redirect/9/a-good.jpg") == 1
    assert batch.requests("/redirect/4/a-good.jpg") == 1  # 9 → 4: five hops, no more


def test_a_503_that_recovers_is_ok_on_the_third_try(batch: Batch) -> None:
    """503, 503, 200: ok, with the attempts recorded."""
    outcome = batch.outcome(f"/flaky/2/{GOOD}")

    assert outcome.status is Status.OK
    assert outcome.attempts == 3
    assert batch.requests(f"/flaky/2/{GOOD}") == 3


@pytest.mark.parametrize("form", ["seconds", "date"])
def test_retry_after_is_honoured_up_to_the_cap(batch: Batch, form: str) -> None:
    """A 429's Retry-After (2 s, as seconds or a date) is waited, capped at 0.5 s."""
    path = f"/retry-after/{form}/{GOOD}"
    outcome = batch.outcome(path)
    first, second = batch.arrivals(path)

    assert outcome.status is Status.OK
    assert outcome.attempts == 2
    # backoff is 0: without Retry-After the retry would follow at once.
    assert second - first >= MAX_BACKOFF_S * 0.9


def test_names_come_from_the_url_never_from_the_server(batch: Batch) -> None:
    """Content-Disposition with ../ or an absolute name is ignored for naming."""
    names = [
        batch.outcome(f"/disposition/{kind}/{GOOD}").path
        for kind in ("dotdot", "absolute")
    ]

    assert all(name is not None and name.startswith("a-good-") for name in names)
    assert not list(batch.out.parent.parent.rglob("evil*"))
    assert not Path("/evil-absolute.jpg").exists()


@pytest.mark.parametrize(
    "path",
    [
        "/named/dir/",
        "/named/a/../b.jpg",
        f"/named/{LONG_NAME}",
        "/named/画像-ünï.jpg",
        "/named/q.jpg?a=1",
        "/named/q.jpg?a=2",
    ],
    ids=["slash", "dotdot", "long", "unicode", "query-1", "query-2"],
)
def test_awkward_url_paths_give_safe_names_inside_out(batch: Batch, path: str) -> None:
    """URLs ending in /, with .., very long or unicode become safe, short names."""
    outcome = batch.outcome(path)

    assert outcome.status is Status.OK
    name = str(outcome.path)
    assert re.fullmatch(r"[A-Za-z0-9._-]+\.jpg", name)
    assert len(name.encode()) <= 100
    assert (batch.out / name).resolve().parent == batch.out.resolve()


def test_queries_that_differ_are_two_urls(batch: Batch) -> None:
    """Query strings that differ only after ? are two records with two files."""
    one = batch.outcome("/named/q.jpg?a=1")
    two = batch.outcome("/named/q.jpg?a=2")

    assert one.path != two.path
    assert batch.requests("/named/q.jpg") == 2


def _output(batch: Batch, path: str) -> Image.Image:
    outcome = batch.outcome(path)
    assert outcome.status is Status.OK, outcome.error
    with Image.open(batch.out / str(outcome.path)) as image:
        image.load()
        return image.copy()


def _close(colour: tuple[int, ...], expected: tuple[int, ...], slack: int = 40) -> bool:
    return all(abs(a - b) <= slack for a, b in zip(colour, expected, strict=True))


def test_a_truncated_jpeg_fails_as_truncated(batch: Batch) -> None:
    """A JPEG cut in half passes a header check but fails the full decode."""
    outcome = batch.outcome("/truncated.jpg")

    assert outcome.status is Status.FAILED
    assert outcome.stage is Stage.TRANSFORM
    assert re.fullmatch(
        r"truncated image \(\d+ bytes not processed\)", str(outcome.error)
    )
    assert batch.requests("/truncated.jpg") == 1


def test_a_decompression_bomb_is_refused_before_decoding(batch: Batch) -> None:
    """300x300 pixels against a limit of 10000: failed as a bomb, not decoded."""
    outcome = batch.outcome("/bomb.png")

    assert outcome.status is Status.FAILED
    assert outcome.stage is Stage.TRANSFORM
    assert outcome.error == "decompression bomb: 90,000 pixels (limit 10,000)"


def test_a_cmyk_jpeg_comes_out_as_rgb(batch: Batch) -> None:
    """CMYK is converted, not written through as CMYK."""
    image = _output(batch, "/cmyk.jpg")

    assert image.mode == "RGB"
    assert _close(image.getpixel((5, 5)), RED)  # type: ignore[arg-type]


def test_a_16_bit_png_is_scaled_not_clipped(batch: Batch) -> None:
    """40000 of 65535 becomes about 156 of 255, not white."""
    image = _output(batch, "/sixteen.png")

    assert image.mode == "L"
    assert abs(int(image.getpixel((5, 5))) - 156) <= 3  # type: ignore[arg-type]


def test_a_transparent_palette_png_is_put_on_white(batch: Batch) -> None:
    """Transparent palette pixels become white in a JPEG; opaque ones keep colour."""
    image = _output(batch, "/palette.png")

    assert image.mode == "RGB"
    assert _close(image.getpixel((3, 15)), (255, 255, 255))  # type: ignore[arg-type]
    assert _close(image.getpixel((36, 15)), BLUE)  # type: ignore[arg-type]


def test_an_animated_gif_gives_its_first_frame(batch: Batch) -> None:
    """The first frame (red) is the output."""
    image = _output(batch, "/animated.gif")

    assert image.size == (30, 30)
    assert _close(image.convert("RGB").getpixel((15, 15)), RED)  # type: ignore[arg-type]


def test_an_exif_rotated_jpeg_comes_out_upright(batch: Batch) -> None:
    """Orientation 6 on a 40x20 image gives a 20x40 image, as a viewer shows it."""
    image = _output(batch, "/exif-rotated.jpg")
    with Image.open(batch.server.corpus / "exif-rotated.jpg") as source:
        upright = ImageOps.exif_transpose(source).convert("RGB")

    assert image.size == upright.size == (20, 40)
    assert "exif" not in image.info
    for point in [(10, 5), (10, 35)]:
        assert _close(image.getpixel(point), upright.getpixel(point))  # type: ignore[arg-type]


def test_one_record_per_unique_url_and_nothing_else_on_disk(batch: Batch) -> None:
    """Duplicates and bad lines included: one record each; only final images stay."""
    records = read_manifest(batch.out)
    ok_paths = {str(r["path"]) for r in records if r["status"] == "ok"}
    kept = {
        p.relative_to(batch.out).as_posix() for p in batch.out.rglob("*") if p.is_file()
    }

    assert len(records) == len(batch.report.results) == len(HOSTILE_PATHS) + 1
    assert len({r["url"] for r in records}) == len(records)
    assert kept == ok_paths | {"manifest.jsonl", "failed.txt", ".lock"}
    assert leftovers(batch.out) == []
    assert [p.name for p in batch.out.parent.iterdir()] == ["out"]
    for name in ok_paths:
        with Image.open(batch.out / name) as image:
            image.load()  # complete, never a partial file under a final name
    failed = [str(r["url"]) for r in records if r["status"] == "failed"]
    listed = (batch.out / "failed.txt").read_text(encoding="utf-8").splitlines()
    assert listed == failed


# --------------------------------------------------------------- other runs


def test_a_hung_decoder_is_cut_off_and_the_run_goes_on(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """An image stuck in a worker past --item-timeout fails; the next one is ok.

    The stuck one hangs in its transform (the flat image); the other passes in
    milliseconds, well within the timeout on a loaded machine too."""
    urls = [server.url_for(FLAT_IMAGE), corpus_urls(server, corpus)[0]]
    out = tmp_path / "out"
    image = ImageSpec(max_size=64, transform="tests.user_transforms:hang_on_flat")

    report = run(urls, fast_settings(out, procs=1, item_timeout=1.5, image=image))

    by_url = {o.url: o for o in report.results}
    stuck = by_url[urls[0]]
    assert stuck.status is Status.FAILED
    assert stuck.stage is Stage.TRANSFORM
    assert stuck.error == "processing timed out after 1.5s (worker replaced)"
    assert by_url[urls[1]].status is Status.OK
    assert leftovers(out) == []


def test_a_stall_names_the_urls_it_is_stuck_on(
    server: LocalServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing finishing for --stall-report seconds logs the stuck URL; the run ends."""
    silent = f"{server.base_url}/silent"
    settings = fast_settings(
        tmp_path / "out",
        stall_report=0.2,
        http=HttpSettings(timeout=1.0, retries=0, backoff=0),
    )

    with caplog.at_level(logging.WARNING, logger="downloader"):
        report = run([silent], settings)

    (outcome,) = report.results
    assert outcome.error == "read timeout (1s)"
    stalls = [r for r in caplog.records if r.name == "downloader"]
    assert stalls
    assert silent in stalls[0].getMessage()
    assert stalls[0].getMessage().startswith("no item finished for ")


def test_per_host_caps_one_host_while_another_proceeds(
    corpus: Path, tmp_path: Path
) -> None:
    """--per-host 2: one host never sees 3 connections; a second host is not starved."""
    with (
        serve_in_thread(LocalServer(corpus, latency=0.05)) as busy,
        serve_in_thread(LocalServer(corpus, latency=0.05)) as other,
    ):
        assert isinstance(busy, LocalServer)
        assert isinstance(other, LocalServer)
        names = sorted(p.name for p in corpus.glob("img-*"))
        # A list sorted by host: 36 URLs of the busy host, then 4 of the other.
        busy_urls = [busy.url_for(n) + f"?copy={i}" for i in range(3) for n in names]
        urls = busy_urls + [other.url_for(n) for n in names[:4]]
        settings = fast_settings(
            tmp_path / "out",
            threads=8,
            http=HttpSettings(timeout=5, retries=0, backoff=0, per_host=2),
        )

        report = run(urls, settings)

    assert [o.status for o in report.results] == [Status.OK] * len(urls)
    assert busy.max_active == 2
    assert other.max_active == 2
    # Threads did not all queue behind the busy host: the other host was done before
    # half of the busy host's requests had even been sent.
    busy_arrivals = sorted(t for _, t in busy.log)
    assert max(t for _, t in other.log) < busy_arrivals[len(busy_urls) // 2]


HOSTILE_LOCATIONS = ("javascript:alert(1)", "http://[::1", "http://127.0.0.1:99999/")


@pytest.mark.parametrize("mode", list(LOCAL_MODES))
def test_bad_redirects_fail_their_urls_in_every_mode(
    server: LocalServer, corpus: Path, tmp_path: Path, mode: Mode
) -> None:
    """A redirect httpx cannot follow fails its URL; the run and every rerun go on.

    It used to escape the one place that translates errors and stop the run at the
    same URL on every rerun.
    """
    good = corpus_urls(server, corpus)[:4]
    bad = [
        server.url_for("location/" + urllib.parse.quote(location, safe=""))
        for location in HOSTILE_LOCATIONS
    ]
    urls = [url for pair in itertools.zip_longest(good, bad) for url in pair if url]
    settings = fast_settings(tmp_path / "out", mode=mode)

    for attempt in (1, 2):
        report = run(urls, settings)

        records = read_manifest(settings.out)
        assert sorted(str(r["url"]) for r in records) == sorted(urls), attempt
        by_url = {r["url"]: r for r in records}
        for url in bad:
            assert by_url[url]["status"] == "failed"
            assert str(by_url[url]["error"]).startswith("bad redirect"), by_url[url]
            assert by_url[url]["attempts"] == 1
        assert report.summary.counts[Status.FAILED] == len(bad)
        assert report.summary.counts[Status.OK if attempt == 1 else Status.SKIPPED] == 4


@pytest.mark.parametrize("mode", list(LOCAL_MODES))
def test_bytes_past_a_body_never_reach_the_next_url_in_every_mode(
    server: LocalServer, corpus: Path, tmp_path: Path, mode: Mode
) -> None:
    """A server that sends more than its Content-Length on a keep-alive connection:
    its URL is ok with its own body, and the next URL from that host, on one
    download thread, is ok at its first attempt (it used to read those bytes as its
    status line and fail, without a retry)."""
    good = corpus_urls(server, corpus)[:4]
    names = [url.rpartition("/")[2] for url in good]
    overrun = [server.url_for(f"overrun/{name}") for name in names]
    urls = [url for pair in zip(overrun, good, strict=True) for url in pair]
    settings = fast_settings(tmp_path / "out", mode=mode, threads=1)

    report = run(urls, settings)

    records = {r["url"]: r for r in read_manifest(settings.out)}
    assert report.summary.counts[Status.OK] == len(urls), records
    for url, name in zip(overrun, names, strict=True):
        served = (corpus / name).read_bytes()
        assert records[url]["sha256"] == hashlib.sha256(served).hexdigest()
    assert {records[url]["attempts"] for url in urls} == {1}
