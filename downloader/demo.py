"""The embedded demo: a generated sample corpus and a local HTTP server for it.

::

    generate_corpus() ──► folder of img-NNNN.jpg / .png (deterministic per seed)
    default_corpus()  ──► the same, cached under $XDG_CACHE_HOME/downloader/
                                      │
    CorpusServer (ThreadingHTTPServer, CorpusHandler)  ◄── serves /<name>
    ├─ serve_in_thread(): in this process (tests)
    └─ DemoServer: in its own spawned process (--demo, benchmarks), so serving
       does not compete with the tool for this process's GIL

Latency and bandwidth are simulated per request, so the demo behaves like a slow
network without leaving 127.0.0.1. Nothing here is used by a real run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import enum
import functools
import http.server
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import socket
import stat
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from multiprocessing.context import SpawnProcess
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, cast

from PIL import Image, ImageChops, ImageDraw, ImageFilter

from downloader.manifest import write_file

__all__ = [
    "CorpusHandler",
    "CorpusServer",
    "DemoServer",
    "default_corpus",
    "generate_corpus",
    "serve_in_thread",
]

_RGB = tuple[int, int, int]

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}

# Every PNG_EVERY-th image is a PNG: about 1 in 6, as in a typical scraped list.
PNG_EVERY = 6
# PNG of a noisy photo costs ~1 byte per pixel, so PNGs stay small to stay a few MB.
PNG_MAX_MEGAPIXELS = 4.0
# Every ORIENTED_EVERY-th image (when it is a JPEG) carries an EXIF Orientation tag.
ORIENTED_EVERY = 5
# Rotated 90° clockwise, 180°, 90° counter-clockwise: what phone cameras write.
ORIENTATIONS = (6, 3, 8)
EXIF_ORIENTATION_TAG = 0x0112
JPEG_QUALITY = 90
ASPECT_RATIOS = (4 / 3, 3 / 2, 16 / 9, 5 / 4, 1.0)
# The scene is drawn at 1/SCENE_SCALE of the final size and upscaled smoothly: that
# keeps generation fast, and the fine noise added at full size gives the texture.
SCENE_SCALE = 4
# Luminance noise amplitude range (± levels); ~6 gives ~0.2 byte/pixel at quality 90,
# which is what camera JPEGs downscaled for the web weigh.
NOISE_AMPLITUDES = (4, 8)
# Bump when the generator's output changes, so stale caches are not reused.
CORPUS_VERSION = 1
COMPLETE_MARKER = ".complete"
# Paced sends are cut into pieces of 1/PACING_SLICES of a second's worth of bytes.
PACING_SLICES = 50
MAX_CHUNK = 256 * 1024
# How often serve_forever checks for shutdown(): it bounds how long teardown waits.
SHUTDOWN_POLL_INTERVAL = 0.05
CHILD_START_TIMEOUT = 30.0
CHILD_JOIN_TIMEOUT = 5.0
THREAD_JOIN_TIMEOUT = 10.0


# --- corpus -------------------------------------------------------------------------


def generate_corpus(
    folder: Path,
    count: int,
    *,
    seed: int = 0,
    min_megapixels: float = 1.0,
    max_megapixels: float = 12.0,
    processes: int = 1,
) -> list[Path]:
    """Write ``count`` deterministic photo-like images into ``folder``.

    The same arguments give byte-identical files. Names are ``img-NNNN.jpg`` or
    ``.png``; each file is written under a temporary name and renamed, so an
    interrupted generation never leaves a partial image. ``processes`` > 1 renders
    in that many processes (each image depends only on its index, so the files are
    the same): the benchmarks' 320-photo corpus takes minutes in one.
    """
    if count < 0:
        raise ValueError("count must be at least 0")
    if not 0 < min_megapixels <= max_megapixels:
        raise ValueError("megapixels must satisfy 0 < min_megapixels <= max_megapixels")
    folder.mkdir(parents=True, exist_ok=True)
    write = functools.partial(
        _write_image,
        folder,
        seed=seed,
        min_megapixels=min_megapixels,
        max_megapixels=max_megapixels,
    )
    if processes <= 1:
        return sorted(map(write, range(count)))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        return sorted(pool.map(write, range(count)))


def default_corpus(count: int = 48) -> Path:
    """Return the cached demo corpus folder, generating it on first use."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folder = Path(cache_home) / "downloader" / f"demo-corpus-v{CORPUS_VERSION}-{count}"
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        generate_corpus(folder, count)
        # Written last: its presence means every image above is complete.
        _write_atomically(marker, f"{count} images, seed 0\n".encode())
    return folder


def _write_image(
    folder: Path, index: int, seed: int, min_megapixels: float, max_megapixels: float
) -> Path:
    """Render image ``index`` of the corpus and write it atomically; return its path."""
    # One generator per image: image i does not depend on how many came before it.
    rng = random.Random(f"downloader-demo:{seed}:{index}")
    is_png = index % PNG_EVERY == PNG_EVERY - 1
    if is_png:
        max_megapixels = max(min_megapixels, min(max_megapixels, PNG_MAX_MEGAPIXELS))
    width, height = _draw_size(rng, min_megapixels, max_megapixels)
    image = _render_photo(rng, width, height)
    path = folder / f"img-{index:04d}.{'png' if is_png else 'jpg'}"
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if is_png:
            # Level 1: noisy pixels barely compress better at 6, and it is 4x faster.
            image.save(temp, format="PNG", compress_level=1)
        else:
            exif = _exif_for(index).tobytes()
            image.save(temp, format="JPEG", quality=JPEG_QUALITY, exif=exif)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def _exif_for(index: int) -> Image.Exif:
    """Return the EXIF block of JPEG ``index``: every few carry an Orientation."""
    exif = Image.Exif()
    if index % ORIENTED_EVERY == ORIENTED_EVERY - 1:
        turn = (index // ORIENTED_EVERY) % len(ORIENTATIONS)
        exif[EXIF_ORIENTATION_TAG] = ORIENTATIONS[turn]
    return exif


def _draw_size(
    rng: random.Random, min_megapixels: float, max_megapixels: float
) -> tuple[int, int]:
    """Pick a pixel size with a common aspect ratio, landscape or portrait."""
    pixels = rng.uniform(min_megapixels, max_megapixels) * 1_000_000
    ratio = rng.choice(ASPECT_RATIOS)
    if rng.random() < 0.35:
        ratio = 1 / ratio
    width = max(1, round(math.sqrt(pixels * ratio)))
    height = max(1, round(pixels / width))
    return width, height


def _render_photo(rng: random.Random, width: int, height: int) -> Image.Image:
    """Draw a smooth scene at low resolution, upscale it, then add sensor-like noise."""
    scene_size = (max(8, -(-width // SCENE_SCALE)), max(8, -(-height // SCENE_SCALE)))
    base = (rng.randrange(40, 216), rng.randrange(40, 216), rng.randrange(40, 216))
    scene = _background(rng, scene_size, base)
    _add_blobs(rng, scene, base)
    _add_shapes(rng, scene, base)
    scene = scene.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.5)))
    image = scene.resize((width, height), Image.Resampling.BICUBIC)
    return _add_noise(rng, image)


def _colour(rng: random.Random, base: _RGB) -> _RGB:
    """Pick a colour near ``base``, so a picture has a palette rather than confetti."""
    r, g, b = (min(255, max(0, c + rng.randint(-90, 90))) for c in base)
    return r, g, b


def _background(rng: random.Random, size: tuple[int, int], base: _RGB) -> Image.Image:
    """Blend two colours along a gradient at a random angle."""
    gradient = Image.linear_gradient("L").rotate(
        rng.uniform(0, 360), resample=Image.Resampling.BILINEAR, expand=True
    )
    centre_x, centre_y = gradient.width // 2, gradient.height // 2
    # The central square is fully covered whatever the rotation angle was.
    gradient = gradient.crop(
        (centre_x - 90, centre_y - 90, centre_x + 90, centre_y + 90)
    )
    mask = gradient.resize(size, Image.Resampling.BILINEAR)
    first = Image.new("RGB", size, _colour(rng, base))
    second = Image.new("RGB", size, _colour(rng, base))
    return Image.composite(first, second, mask)


def _add_blobs(rng: random.Random, image: Image.Image, base: _RGB) -> None:
    """Paste a few soft round patches of colour, like out-of-focus light."""
    # radial_gradient is 0 at the centre and 181 at the edge midpoints: fade to 0 there.
    falloff = [max(0, 255 - value * 255 // 170) for value in range(256)]
    blob = Image.radial_gradient("L").point(falloff)
    short_side = min(image.size)
    for _ in range(rng.randint(3, 7)):
        diameter = max(2, int(short_side * rng.uniform(0.2, 0.9)))
        mask = blob.resize((diameter, diameter), Image.Resampling.BILINEAR)
        corner = (
            rng.randrange(-diameter // 2, image.width),
            rng.randrange(-diameter // 2, image.height),
        )
        image.paste(_colour(rng, base), corner, mask)


def _add_shapes(rng: random.Random, image: Image.Image, base: _RGB) -> None:
    """Draw polygons, ellipses and lines: the sharp edges real scenes have."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(rng.randint(4, 10)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        points = [
            (
                x0 + rng.randint(-width // 4, width // 4),
                y0 + rng.randint(-height // 4, height // 4),
            )
            for _ in range(rng.randint(3, 6))
        ]
        kind = rng.randrange(3)
        if kind == 0:
            draw.polygon(points, fill=_colour(rng, base))
        elif kind == 1:
            (xa, ya), (xb, yb) = points[0], points[1]
            box = (min(xa, xb), min(ya, yb), max(xa, xb) + 1, max(ya, yb) + 1)
            draw.ellipse(box, fill=_colour(rng, base))
        else:
            draw.line(points, fill=_colour(rng, base), width=rng.randint(1, 4))


def _add_noise(rng: random.Random, image: Image.Image) -> Image.Image:
    """Add fine luminance noise at full size: it is what makes JPEG sizes realistic."""
    # Not Image.effect_noise: it draws from C rand(), which no seed controls.
    amplitude = rng.randint(*NOISE_AMPLITUDES)
    noise = Image.frombytes("L", image.size, rng.randbytes(image.width * image.height))
    noise = noise.point([value * (2 * amplitude + 1) // 256 for value in range(256)])
    grain = Image.merge("RGB", (noise, noise, noise))
    return ImageChops.add(image, grain, offset=-amplitude)


def _corpus_files(folder: Path) -> list[Path]:
    """List the servable images of ``folder``, sorted by name."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.suffix.lower() in CONTENT_TYPES
        and not path.name.startswith(".")
        and path.is_file()
    )


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name, then rename it to ``path``.

    For the corpus cache only (the user's own cache folder); a file in an output
    folder goes through ``manifest.write_file``, which never follows a link.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


# --- server ---------------------------------------------------------------------------


class CorpusHandler(http.server.BaseHTTPRequestHandler):
    """Serve the files of ``server.corpus`` at ``/<name>``, with simulated latency.

    Subclasses add routes by overriding ``do_GET`` and falling back to
    ``super().do_GET()``; ``send_bytes`` and ``send_file`` do the writing.
    """

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate sends; with Nagle's algorithm the body waits
    # for the client's delayed ACK of the headers (~40 ms per request on Linux).
    disable_nagle_algorithm = True
    server: CorpusServer

    def do_GET(self) -> None:
        """Answer a GET with the file or a 404."""
        self.serve(head_only=False)

    def do_HEAD(self) -> None:
        """Answer a HEAD with the headers a GET would get."""
        self.serve(head_only=True)

    def log_message(self, format: str, *args: object) -> None:
        """Log nothing: the demo server runs beside progress bars."""

    def serve(self, *, head_only: bool) -> None:
        """Count the request, wait the simulated latency, then answer it."""
        self.count_request()
        if self.server.latency > 0:
            # This sleep is the simulated network round trip, not synchronisation.
            time.sleep(self.server.latency)
        path = self.resolve()
        if path is None:
            self.send_bytes(404, b"not found\n", "text/plain", head_only=head_only)
        else:
            self.send_file(path, head_only=head_only)

    def request_path(self) -> str:
        """Return the decoded path of the request, without its query."""
        return urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)

    def count_request(self) -> None:
        """Add this request to the server's per-path counter."""
        with self.server.lock:
            self.server.requests[self.request_path()] += 1

    def resolve(self) -> Path | None:
        """Map the request to a file of the corpus, or None if there is no such file."""
        name = self.request_path().removeprefix("/")
        # A bare file name only: no traversal, no absolute path, no subfolder, no
        # hidden file (the cache marker and temporary files start with a dot).
        if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
            return None
        path = self.server.corpus / name
        return path if path.is_file() else None

    def send_bytes(
        self,
        status: int,
        body: bytes,
        content_type: str,
        *,
        head_only: bool = False,
    ) -> None:
        """Send a complete response with ``body`` and an exact Content-Length."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def send_file(self, path: Path, *, head_only: bool = False) -> None:
        """Send ``path`` with its content type, paced when a bandwidth is set."""
        content_type = CONTENT_TYPES.get(
            path.suffix.lower(), "application/octet-stream"
        )
        with path.open("rb") as file:
            length = os.fstat(file.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if head_only:
                return
            try:
                self.send_body(file, length)
            except (BrokenPipeError, ConnectionResetError):
                # The client gave up mid-body; nothing to answer, just drop the line.
                self.close_connection = True

    def send_body(self, file: BinaryIO, length: int) -> None:
        """Copy ``length`` bytes of ``file`` to the client."""
        bandwidth = self.server.bandwidth
        if bandwidth is None:
            # Headers sit in wfile's buffer: flush them before the zero-copy send.
            self.wfile.flush()
            self.connection.sendfile(file)
            return
        chunk_size = max(1, min(MAX_CHUNK, bandwidth // PACING_SLICES))
        started = time.monotonic()
        sent = 0
        while sent < length:
            chunk = file.read(min(chunk_size, length - sent))
            if not chunk:
                break
            self.wfile.write(chunk)
            sent += len(chunk)
            ahead = started + sent / bandwidth - time.monotonic()
            if ahead > 0:
                # Pacing is the simulated link speed, not synchronisation.
                time.sleep(ahead)


class CorpusServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP server on a free loopback port, serving one corpus folder."""

    daemon_threads = True

    def __init__(
        self,
        corpus: Path,
        *,
        latency: float = 0.0,
        bandwidth: int | None = None,
        handler: type[http.server.BaseHTTPRequestHandler] = CorpusHandler,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if latency < 0:
            raise ValueError("latency must be at least 0")
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError("bandwidth must be greater than 0")
        self.corpus = Path(corpus)
        self.latency = latency
        self.bandwidth = bandwidth
        self.requests: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        super().__init__((host, port), handler)

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hangs up mid-request is no error; anything else is printed."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]

    @property
    def base_url(self) -> str:
        """The ``http://host:port`` the server listens on."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def url_for(self, name: str) -> str:
        """Return the URL of the corpus file called ``name``."""
        return f"{self.base_url}/{urllib.parse.quote(name)}"

    def request_count(self, path: str | None = None) -> int:
        """Return how many requests reached ``path`` (``/name``), or all paths."""
        with self.lock:
            if path is None:
                return sum(self.requests.values())
            return self.requests["/" + path.removeprefix("/")]

    def process_request(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: object,
    ) -> None:
        """Track the connection so that ``server_close`` can end idle keep-alives."""
        if isinstance(request, socket.socket):
            with self.lock:
                self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(
        self, request: socket.socket | tuple[bytes, socket.socket]
    ) -> None:
        """Forget the connection, then close it."""
        if isinstance(request, socket.socket):
            with self.lock:
                self._connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Stop listening and wake handler threads blocked on idle keep-alives."""
        super().server_close()
        with self.lock:
            connections = list(self._connections)
        for connection in connections:
            # The handler thread sees EOF, returns, and closes its own socket.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def serve_in_thread(server: CorpusServer) -> Iterator[CorpusServer]:
    """Run ``server`` in a thread of this process for the duration of the block."""
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": SHUTDOWN_POLL_INTERVAL},
        name="corpus-server",
        daemon=True,
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=THREAD_JOIN_TIMEOUT)


class _State(enum.Enum):
    """Where a DemoServer is in its life."""

    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


class DemoServer:
    """Run a CorpusServer in its own process, so it does not share the tool's GIL."""

    def __init__(
        self,
        corpus: Path,
        *,
        latency: float = 0.02,
        bandwidth: int | None = None,
        port: int = 0,
    ) -> None:
        """``port``: the one to serve on if it is free, else any free one (0: any)."""
        self.corpus = Path(corpus)
        self.latency = latency
        self.bandwidth = bandwidth
        self.port = port
        self.process: SpawnProcess | None = None
        self._base_url: str | None = None
        self._state = _State.UNOPENED

    def __enter__(self) -> DemoServer:
        """Start the server process and wait until it listens."""
        if self._state is not _State.UNOPENED:
            raise RuntimeError("a DemoServer can only be started once")
        self._state = _State.OPENED
        ctx = multiprocessing.get_context("spawn")
        reader, writer = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_run_demo_server,
            args=(str(self.corpus), self.latency, self.bandwidth, writer, self.port),
            name="downloader-demo-server",
            # Only a safety net if the parent dies abruptly; close() is the normal path.
            daemon=True,
        )
        try:
            self.process.start()
            # Our copy must go, or a dead child would never read as EOF.
            writer.close()
            self._base_url = _receive_base_url(reader)
        except BaseException:
            self.close()
            raise
        finally:
            reader.close()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the server process."""
        self.close()

    def close(self) -> None:
        """Stop the server process; calling it again does nothing."""
        self._state = _State.CLOSED
        process = self.process
        # pid is None when start() itself failed: there is nothing to stop.
        if process is None or process.pid is None or process.exitcode is not None:
            return
        process.terminate()
        process.join(timeout=CHILD_JOIN_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join()

    @property
    def base_url(self) -> str:
        """The ``http://host:port`` of the running server."""
        if self._state is not _State.OPENED or self._base_url is None:
            raise RuntimeError(f"the DemoServer is {self._state.value}, not running")
        return self._base_url

    def urls(self) -> list[str]:
        """Return one URL per corpus file, sorted by name."""
        base_url = self.base_url
        return [
            f"{base_url}/{urllib.parse.quote(path.name)}"
            for path in _corpus_files(self.corpus)
        ]

    def write_url_list(self, path: Path) -> Path:
        """Write the URLs to a text file with a comment header, and return its path.

        ``path`` is in an output folder (``OUT/demo-urls.txt``): it is written through
        ``manifest.write_file``, so a symbolic link there is refused (``OutputError``,
        exit 3) and never written through, nor is the temporary file's name followed.
        """
        urls = self.urls()
        header = (
            f"# downloader demo list: {len(urls)} images served by {self.base_url}\n"
        )
        text = header + "".join(f"{url}\n" for url in urls)
        return write_file(path.parent, path.name, [text.encode()])


def _receive_base_url(reader: multiprocessing.connection.Connection) -> str:
    """Wait for the child to report its address and return it as a base URL."""
    if not reader.poll(CHILD_START_TIMEOUT):
        raise RuntimeError(
            f"the demo server did not start within {CHILD_START_TIMEOUT:.0f} s"
        )
    try:
        return cast(str, reader.recv())
    except EOFError as exc:
        raise RuntimeError("the demo server process exited before listening") from exc


def _run_demo_server(
    corpus: str,
    latency: float,
    bandwidth: int | None,
    writer: multiprocessing.connection.Connection,
    port: int = 0,
) -> None:
    """Serve ``corpus`` until terminated; the body of the DemoServer process."""
    # The parent coordinates shutdown on Ctrl-C; this process just gets terminated.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_exit_with_parent, args=(parent.sentinel,), daemon=True
        ).start()
    try:
        server = CorpusServer(
            Path(corpus), latency=latency, bandwidth=bandwidth, port=port
        )
    except OSError:  # the port asked for is taken: any free one
        server = CorpusServer(Path(corpus), latency=latency, bandwidth=bandwidth)
    with server:
        writer.send(server.base_url)
        writer.close()
        server.serve_forever()


def previous_port(url_list: Path) -> int:
    """The port of the URLs a demo run wrote to ``url_list`` before, else 0.

    Serving there again keeps the demo's URLs, so a rerun of the same command resumes
    (the manifest knows URLs, and a new port would make every one new).
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(url_list, flags)  # never through a link, never a FIFO's wait
    except OSError:
        return 0  # absent, or not ours to read: writing it says why
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return 0
        head = os.read(fd, 4096).decode("utf-8", "replace")  # a comment, then URLs
    except OSError:
        return 0
    finally:
        os.close(fd)
    for line in head.splitlines()[:10]:
        if line.startswith("http://127.0.0.1:"):
            with contextlib.suppress(ValueError):
                return urllib.parse.urlsplit(line.strip()).port or 0
    return 0


def _exit_with_parent(sentinel: int) -> None:
    """Wait for the parent process to end, then end this one at once."""
    multiprocessing.connection.wait([sentinel])
    os._exit(0)
