"""Tests for the demo corpus generator and the local corpus servers."""

from __future__ import annotations

import os
import random
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from downloader.cli import main
from downloader.demo import (
    CorpusHandler,
    CorpusServer,
    DemoServer,
    default_corpus,
    generate_corpus,
    previous_port,
    serve_in_thread,
)
from downloader.errors import OutputError

TIMEOUT = 10.0
EXIF_ORIENTATION_TAG = 0x0112


def generate_tiny(folder: Path, count: int, *, seed: int = 0) -> list[Path]:
    """Generate a corpus of thumbnails, fast enough for any test."""
    return generate_corpus(
        folder, count, seed=seed, min_megapixels=0.01, max_megapixels=0.05
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generate a tiny corpus once for the module."""
    folder = tmp_path_factory.mktemp("corpus")
    generate_tiny(folder, 12)
    return folder


@pytest.fixture
def server(corpus: Path) -> Iterator[CorpusServer]:
    """Serve the tiny corpus from a thread."""
    with serve_in_thread(CorpusServer(corpus)) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    """Give a client with a timeout on every request."""
    with httpx.Client(timeout=TIMEOUT) as http:
        yield http


def raw_status(base_url: str, target: str) -> int:
    """Send ``GET target`` verbatim (no URL normalisation) and return the status."""
    address = urllib.parse.urlsplit(base_url)
    assert address.hostname is not None
    assert address.port is not None
    with socket.create_connection((address.hostname, address.port), TIMEOUT) as sock:
        request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode())
        response = b"".join(iter(lambda: sock.recv(65536), b""))
    return int(response.split(b" ", 2)[1])


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    """Two generations with the same seed write the same bytes under the same names."""
    first = generate_tiny(tmp_path / "a", 7, seed=3)
    second = generate_tiny(tmp_path / "b", 7, seed=3)
    other = generate_tiny(tmp_path / "c", 7, seed=4)

    assert [p.name for p in first] == [p.name for p in second]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]


def test_generation_in_processes_writes_the_same_files(tmp_path: Path) -> None:
    """``processes`` > 1 (the benchmarks' corpus) gives the files of one process."""
    alone = generate_tiny(tmp_path / "a", 7, seed=3)
    spread = generate_corpus(
        tmp_path / "b", 7, seed=3, min_megapixels=0.01, max_megapixels=0.05, processes=2
    )

    assert [p.name for p in spread] == [p.name for p in alone]
    assert [p.read_bytes() for p in spread] == [p.read_bytes() for p in alone]


def test_corpus_mixes_formats_within_the_size_range(corpus: Path) -> None:
    """The corpus holds JPEGs and about 1 in 6 PNGs, each of the requested size."""
    paths = sorted(corpus.iterdir())
    formats: dict[str, str] = {}
    megapixels = []
    for path in paths:
        with Image.open(path) as image:
            formats[path.name] = str(image.format)
            megapixels.append(image.width * image.height / 1e6)

    assert len(paths) == 12
    assert all(name.startswith("img-") for name in formats)
    assert sorted(formats.values()) == ["JPEG"] * 10 + ["PNG"] * 2
    assert all((fmt == "PNG") == name.endswith(".png") for name, fmt in formats.items())
    # Rounding width and height can move the area by a fraction of a percent.
    assert all(0.0098 <= mp <= 0.051 for mp in megapixels)


def test_corpus_has_landscape_and_portrait_images(tmp_path: Path) -> None:
    """Aspect ratios vary in both directions."""
    shapes = set()
    for path in generate_tiny(tmp_path, 24):
        with Image.open(path) as image:
            shapes.add(image.width > image.height)

    assert shapes == {True, False}


def test_some_jpegs_carry_an_exif_orientation(corpus: Path) -> None:
    """At least one JPEG has a rotating EXIF Orientation tag."""
    orientations = []
    for path in sorted(corpus.glob("*.jpg")):
        with Image.open(path) as image:
            orientations.append(image.getexif().get(EXIF_ORIENTATION_TAG))

    assert any(value in {3, 6, 8} for value in orientations)
    assert None in orientations


def test_real_size_jpeg_weighs_like_a_photo(tmp_path: Path) -> None:
    """A 2-2.5 MP JPEG weighs what a photo does, not a flat gradient or pure noise."""
    (path,) = generate_corpus(tmp_path, 1, min_megapixels=2.0, max_megapixels=2.5)

    assert path.suffix == ".jpg"
    assert 150_000 < path.stat().st_size < 3_000_000


def test_generation_leaves_no_temporary_files(tmp_path: Path) -> None:
    """Only the final images remain in the folder after generation."""
    paths = generate_tiny(tmp_path / "new", 3)

    assert sorted((tmp_path / "new").iterdir()) == paths


def test_default_corpus_is_cached_behind_a_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached corpus is generated once, and again only if its marker is missing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = default_corpus(2)
    marker = folder / ".complete"
    first_write = (folder / "img-0000.jpg").stat().st_mtime_ns
    default_corpus(2)
    unchanged = (folder / "img-0000.jpg").stat().st_mtime_ns
    marker.unlink()
    default_corpus(2)

    assert folder == tmp_path / "downloader" / "demo-corpus-v1-2"
    assert unchanged == first_write
    assert marker.is_file()
    assert len(list(folder.glob("img-*"))) == 2


def test_server_sends_exact_bytes_and_type(
    server: CorpusServer, client: httpx.Client, corpus: Path
) -> None:
    """GET returns the file's bytes with its content type and length."""
    jpeg = client.get(server.url_for("img-0000.jpg"))
    png = client.get(server.url_for("img-0005.png"))

    assert jpeg.status_code == 200
    assert jpeg.content == (corpus / "img-0000.jpg").read_bytes()
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert int(jpeg.headers["content-length"]) == len(jpeg.content)
    assert png.headers["content-type"] == "image/png"
    assert png.content == (corpus / "img-0005.png").read_bytes()


def test_head_sends_headers_only(
    server: CorpusServer, client: httpx.Client, corpus: Path
) -> None:
    """HEAD reports the length of the file without sending it."""
    response = client.head(server.url_for("img-0001.jpg"))

    assert response.status_code == 200
    assert response.content == b""
    expected = (corpus / "img-0001.jpg").stat().st_size
    assert int(response.headers["content-length"]) == expected


def test_unknown_name_is_404(server: CorpusServer, client: httpx.Client) -> None:
    """A name that is not in the corpus gets 404, and the connection stays usable."""
    missing = client.get(server.url_for("nope.jpg"))
    marker = client.get(server.url_for(".complete"))
    after = client.get(server.url_for("img-0000.jpg"))

    assert missing.status_code == 404
    assert marker.status_code == 404
    assert after.status_code == 200


@pytest.mark.parametrize(
    "target",
    [
        "/../secret.jpg",
        "/%2e%2e/secret.jpg",
        "/..%2Fsecret.jpg",
        "/sub/inner.jpg",
        "/sub%2Finner.jpg",
        "/..%5Csecret.jpg",
    ],
)
def test_nothing_outside_the_folder_is_served(tmp_path: Path, target: str) -> None:
    """Traversal, encoded slashes and subfolders all get 404."""
    (tmp_path / "secret.jpg").write_bytes(b"secret")
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "inner.jpg").write_bytes(b"inner")

    with serve_in_thread(CorpusServer(corpus)) as running:
        status = raw_status(running.base_url, target)

    assert status == 404


def test_absolute_path_is_not_served(tmp_path: Path) -> None:
    """An encoded absolute path gets 404 even when the file exists."""
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"secret")
    (tmp_path / "corpus").mkdir()

    with serve_in_thread(CorpusServer(tmp_path / "corpus")) as running:
        status = raw_status(running.base_url, "/" + urllib.parse.quote(str(secret), ""))

    assert status == 404


def test_requests_are_counted_per_path(
    server: CorpusServer, client: httpx.Client
) -> None:
    """Every request, found or not, is counted under its path."""
    client.get(server.url_for("img-0002.jpg"))
    client.get(server.url_for("img-0002.jpg"))
    client.head(server.url_for("img-0003.jpg"))
    client.get(server.url_for("missing.jpg"))

    assert server.request_count("/img-0002.jpg") == 2
    assert server.request_count("img-0003.jpg") == 1
    assert server.request_count("/missing.jpg") == 1
    assert server.request_count() == 4


def test_latency_delays_each_response(corpus: Path, client: httpx.Client) -> None:
    """A request takes at least the configured latency."""
    with serve_in_thread(CorpusServer(corpus, latency=0.2)) as running:
        started = time.monotonic()
        response = client.get(running.url_for("img-0000.jpg"))
        elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert elapsed >= 0.2


def test_bandwidth_paces_the_body(tmp_path: Path, client: httpx.Client) -> None:
    """A 200 KB file at 1 MB/s takes at least 0.15 s and arrives intact."""
    payload = random.Random(0).randbytes(200_000)
    (tmp_path / "big.jpg").write_bytes(payload)

    with serve_in_thread(CorpusServer(tmp_path, bandwidth=1_000_000)) as running:
        started = time.monotonic()
        response = client.get(running.url_for("big.jpg"))
        elapsed = time.monotonic() - started

    assert response.content == payload
    assert elapsed >= 0.15


class _StatusHandler(CorpusHandler):
    """Add a /status/<code> route in front of the corpus."""

    def do_GET(self) -> None:
        """Answer /status/<code> with that code, anything else from the corpus."""
        prefix, _, code = self.path.rpartition("/")
        if prefix == "/status":
            self.send_bytes(int(code), b"status\n", "text/plain")
        else:
            super().do_GET()


def test_handler_can_be_subclassed(corpus: Path, client: httpx.Client) -> None:
    """A subclass adds a route and still serves the corpus."""
    with serve_in_thread(CorpusServer(corpus, handler=_StatusHandler)) as running:
        error = client.get(f"{running.base_url}/status/503")
        image = client.get(running.url_for("img-0000.jpg"))

    assert error.status_code == 503
    assert image.status_code == 200


def test_demo_server_runs_in_its_own_process(
    corpus: Path, client: httpx.Client, tmp_path: Path
) -> None:
    """DemoServer serves the corpus from a child process that is gone after exit."""
    with DemoServer(corpus, latency=0.0) as demo:
        urls = demo.urls()
        response = client.get(urls[0])
        url_list = demo.write_url_list(tmp_path / "urls.txt").read_text().splitlines()
        base_url = demo.base_url
    demo.close()

    assert demo.process is not None
    assert not demo.process.is_alive()
    assert len(urls) == 12
    assert response.content == (corpus / "img-0000.jpg").read_bytes()
    assert url_list[0].startswith("#")
    assert base_url in url_list[0]
    assert url_list[1:] == urls
    with pytest.raises(RuntimeError):
        demo.urls()


# --- the URL list goes in OUT: never through a link -----------------------------------


def _precious(tmp_path: Path) -> Path:
    """A file of the user's outside the output folder."""
    folder = tmp_path / "outside"
    folder.mkdir()
    precious = folder / "precious.txt"
    precious.write_text("keep me\n", encoding="utf-8")
    return precious


def test_a_link_at_the_url_list_is_refused_not_replaced(
    corpus: Path, tmp_path: Path
) -> None:
    """A symlink at the list's name: OutputError naming it; the link and its target
    are left as they were, and no temporary file is left beside it."""
    precious = _precious(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "urls.txt").symlink_to(precious)

    with DemoServer(corpus, latency=0.0) as demo, pytest.raises(OutputError) as caught:
        demo.write_url_list(out / "urls.txt")

    assert str(caught.value).startswith(
        f"{out / 'urls.txt'} is a symbolic link (to {precious}): refused"
    )
    assert (out / "urls.txt").is_symlink()
    assert precious.read_text(encoding="utf-8") == "keep me\n"
    assert [p.name for p in out.iterdir()] == ["urls.txt"]


def test_a_link_at_the_url_lists_temporary_name_is_not_followed(
    corpus: Path, tmp_path: Path
) -> None:
    """The list is written under a temporary name of its own first: a link waiting
    at that name is removed, never written through (nor one at the name earlier
    versions used, ``.NAME.PID.tmp``, which they wrote through)."""
    precious = _precious(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    planted = out / f".urls.txt.{os.getpid()}.new"
    planted.symlink_to(precious)
    (out / f".urls.txt.{os.getpid()}.tmp").symlink_to(precious)

    with DemoServer(corpus, latency=0.0) as demo:
        written = demo.write_url_list(out / "urls.txt")
        urls = demo.urls()

    assert precious.read_text(encoding="utf-8") == "keep me\n"
    assert written.read_text(encoding="utf-8").splitlines()[1:] == urls
    assert not planted.is_symlink()
    assert sorted(p.name for p in out.iterdir()) == [
        f".urls.txt.{os.getpid()}.tmp",
        "urls.txt",
    ]


def test_demo_refuses_a_link_at_demo_urls_txt(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--demo with OUT/demo-urls.txt a link of the user's: exit 3, one line."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    precious = _precious(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "demo-urls.txt").symlink_to(precious)

    code = main(["--demo", "--demo-count", "1", "--out", str(out), "-q"])

    assert code == 3
    assert capsys.readouterr().err.splitlines() == [
        f"error: {out / 'demo-urls.txt'} is a symbolic link (to {precious}): refused, "
        "since this tool reads and writes only inside the output folder; remove the "
        "link or choose another --out"
    ]
    assert (out / "demo-urls.txt").is_symlink()
    assert precious.read_text(encoding="utf-8") == "keep me\n"
    assert [p.name for p in out.iterdir()] == ["demo-urls.txt"]


def test_an_odd_file_at_the_demo_list_is_not_read_for_its_port(tmp_path: Path) -> None:
    """previous_port never waits on a FIFO nor reads through a link (/dev/zero)."""
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    link = tmp_path / "link.txt"
    link.symlink_to("/dev/zero")
    listed = tmp_path / "demo-urls.txt"
    listed.write_text("# a demo list\nhttp://127.0.0.1:41234/img-0000.jpg\n")

    assert (previous_port(fifo), previous_port(link)) == (0, 0)
    assert previous_port(listed) == 41234
