"""Functions used as ``--transform module:function`` in the tests.

A module of its own (not a test module) so that worker processes import it cheaply.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from PIL import Image, ImageOps

# Printed into the image so a test can tell the function ran.
MARK = (0, 255, 0)


def mark_corner(image: Image.Image) -> Image.Image:
    """Paint the top-left pixel green (on an RGB copy)."""
    marked = image.convert("RGB")
    marked.putpixel((0, 0), MARK)
    return marked


def invert(image: Image.Image) -> Image.Image:
    """Return the negative of the image."""
    return ImageOps.invert(image.convert("RGB"))


def add_alpha(image: Image.Image) -> Image.Image:
    """Return an RGBA image, which a JPEG output must flatten."""
    return image.convert("RGBA")


def scribble_in_place(image: Image.Image) -> Image.Image:
    """Change the argument itself and return it."""
    image.paste(0, (0, 0, image.width, image.height))
    return image


def fail(image: Image.Image) -> Image.Image:
    """Raise, as a buggy user function would."""
    raise ValueError(f"cannot handle {image.width}x{image.height}")


def not_an_image(image: Image.Image) -> int:
    """Return something that is not an image."""
    return image.width


NOT_CALLABLE = 42


# ------------------------------------------------- transforms that kill their worker

KILLS_ENV = "DOWNLOADER_TEST_KILLS"
"""The variable naming a folder where the killing transforms leave a file per kill
(named by the pid) and the ``once`` mark; tests set it before the run starts its
worker processes, which inherit it."""


def _kill_this_worker(*, once: bool = False) -> None:
    """SIGKILL the calling worker process, noting its pid; with ``once``, only the
    first time in the run (later calls return)."""
    kills = Path(os.environ[KILLS_ENV])
    if once:
        try:
            (kills / "once").touch(exist_ok=False)
        except FileExistsError:
            return
    (kills / str(os.getpid())).touch()
    os.kill(os.getpid(), signal.SIGKILL)


def _is_flat(image: Image.Image) -> bool:
    """Whether every pixel has the same colour (the tests' slow PNG is flat)."""
    extrema = image.convert("RGB").getextrema()  # one (low, high) per band
    return all(isinstance(band, tuple) and band[0] == band[1] for band in extrema)


def kill_worker(image: Image.Image) -> Image.Image:
    """Kill the worker on every image: a transform that always crashes its process."""
    _kill_this_worker()
    return image


def kill_worker_on_flat(image: Image.Image) -> Image.Image:
    """Kill the worker whenever it gets a flat image; pass any other image."""
    if _is_flat(image):
        _kill_this_worker()
    return image


def kill_worker_on_flat_once(image: Image.Image) -> Image.Image:
    """Kill the worker the first time it gets a flat image in the run; pass the rest."""
    if _is_flat(image):
        _kill_this_worker(once=True)
    return image


PLACE_AT = "place-at"
"""The file of ``KILLS_ENV`` that names where ``place_then_kill_worker_on_flat``
puts the image before it kills its worker."""


def place_then_kill_worker_on_flat(image: Image.Image) -> Image.Image:
    """On a flat image: put it, whole, at the path ``KILLS_ENV/place-at`` names (its
    final name in the output folder), then kill the worker; as if the worker had
    died after placing its output and before recording it. Pass any other image."""
    if _is_flat(image):
        target = Path((Path(os.environ[KILLS_ENV]) / PLACE_AT).read_text())
        image.save(target.with_suffix(".tmp"), format="PNG")
        target.with_suffix(".tmp").rename(target)
        _kill_this_worker()
    return image


def kills(folder: Path) -> list[int]:
    """The pids the killing transforms killed, from ``folder`` (``KILLS_ENV``)."""
    return sorted(int(entry.name) for entry in folder.iterdir() if entry.name.isdigit())


def note_worker(image: Image.Image) -> Image.Image:
    """Note the process that ran it (``seen-<pid>`` in ``KILLS_ENV``); pass the image.

    For the test of a second Ray node, started with a folder of its own."""
    (Path(os.environ[KILLS_ENV]) / f"seen-{os.getpid()}").touch()
    return image


def hang(image: Image.Image) -> Image.Image:
    """Hang (bounded: 60 s) on every image, for --item-timeout tests."""
    time.sleep(60)
    return image


def hang_on_flat(image: Image.Image) -> Image.Image:
    """Hang (bounded: 60 s) on a flat image; pass any other at once."""
    if _is_flat(image):
        time.sleep(60)
    return image
