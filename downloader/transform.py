"""The CPU stage: one file on disk to one or more output images on disk, with Pillow.

::

    src ──open lazily (allow-list)──► pixel guard ──► plan each box (upright sizes)
        ──► draft (JPEG: decode once at 1/2..1/8, enough for the largest box) ──► load
        ──► 8-bit L/RGB(A) (grayscale: L/LA) ──► per box: resize/crop ──► orientation
        ──► custom transform ──► encode (metadata kept or stripped)
        ──► out_dir/.tmp/… .tmp ──link, never over another file──► out_dir/{stem}.{ext},
            out_dir/{label}/{stem}.{ext}

``transform_file`` is a pure function of its arguments: it starts no thread or process,
and the same input and ``ImageSpec`` give the same output bytes in any process. Pillow's
exceptions are translated here, at this one boundary: a bad input image becomes a
``TransformError`` (a per-item failure), a failure to write the output becomes an
``OutputError`` (a local fault that stops the run). A user's ``--transform`` function
runs here too; whatever it raises fails that item only.

Output names are deterministic, so something may already be at one: a folder, a
link, a user's file, or this URL's output from an earlier run. A regular file the
caller names in ``owned`` (what the previous manifest records as this URL's) is
replaced; a regular file holding exactly the bytes to be written is kept as it is
(outputs are deterministic: it is this URL's, from a run that stopped before recording
it, or from an attempt that crashed); anything else fails the item
(``TransformError``, the reason naming the path) and is left as it is, never written
through. ``os.link`` places a new output, since unlike a rename it never replaces
what is there.

Resize modes, for a box of BW x BH and an upright image of W x H:

- ``fit``: scale to fit inside the box, keeping the aspect ratio.
- ``fill``: scale to cover the box, then crop the centre to exactly BW x BH.
- ``exact``: scale to BW x BH, changing the aspect ratio.
- ``none``: keep W x H.

Without ``upscale`` nothing is enlarged: ``fit`` keeps a smaller image as it is, and
for ``fill`` and ``exact`` a box larger than the image is first shrunk, keeping its
aspect ratio, until it fits inside the image.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import functools
import io
import math
import os
import re
import stat
import struct
import time
import warnings
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from downloader.errors import InputError, OutputError, TransformError
from downloader.records import Transformed
from downloader.settings import (
    ImageFormat,
    ImageSpec,
    Resample,
    ResizeMode,
    box_label,
    import_callable,
)

__all__ = [
    "ALLOWED_FORMATS",
    "configure_pillow",
    "output_names",
    "place_file",
    "remove_outputs",
    "transform_file",
]

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
"""Formats that are decoded; never EPS/PDF (Ghostscript) nor the rarely used ones."""


@dataclass(frozen=True, slots=True)
class _Resizing:
    """How one ``--resample`` choice resizes.

    Chosen from the variants measured by ``benchmarks/resample_explore.py`` (CPU per
    image and PSNR against a full-size Lanczos resize, JPEG q85 included; every
    variant in ``benchmarks/results/resample-explore-96.md``): at q85 the encoding's
    loss dominates, so decoding a JPEG closer to the box costs little fidelity and
    saves most of the CPU (the scaled decode and the filter's work both shrink).
    """

    draft_gap: float | None
    """A JPEG is decoded at the smallest 1/2..1/8 scale still at least this many
    times the target (libjpeg's scaled IDCT, a fair filter); None: at full size."""
    reducing_gap: float | None
    """Pillow's ``resize(reducing_gap=...)``: what is left to shrink (a PNG's whole
    factor) is first cut by an integer ``reduce()`` (a box filter) down to this many
    times the target; None: the filter over the whole factor."""
    filter: Image.Resampling


_RESIZINGS = {
    # The least CPU still at least as faithful as img2dataset: decoded at the box's
    # scale (under 2x it), bicubic for the rest (Hamming and bilinear fell below).
    Resample.FAST: _Resizing(1.0, 1.0, Image.Resampling.BICUBIC),
    # At least the fidelity balanced had when it decoded at 2x with reducing_gap 2.0,
    # for less CPU: decoded at 1.6x the box at least (1.5 lost 0.001 dB); PNGs get
    # Lanczos over their whole factor up to 6x (Pillow: at 3.0 "indistinguishable
    # from fair resampling in most cases"), which makes up for the JPEGs' 0.001 dB.
    Resample.BALANCED: _Resizing(1.6, 3.0, Image.Resampling.LANCZOS),
    Resample.BEST: _Resizing(None, None, Image.Resampling.LANCZOS),
}

# libwebp's default speed/size trade-off (0 is fastest, 6 gives the smallest files).
_WEBP_METHOD = 4
_WEBP_OPTIMIZED_METHOD = 6
_PNG_COMPRESS_LEVEL = 6
# zlib's smallest; Pillow's own PNG optimize flag came out larger on photos.
_PNG_OPTIMIZED_COMPRESS_LEVEL = 9
# One encoder thread: each worker process already has a core of its own, and a fixed
# thread count keeps the AVIF bytes the same on every machine.
_AVIF_THREADS = 1
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_SIXTEEN_TO_EIGHT_BIT = 255 / 65535
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
_GRAY_FAMILY = frozenset({"1", "L", "LA", "F", *_SIXTEEN_BIT_MODES})
_RGB_FAMILY = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA"})
# Same table as ImageOps.exif_transpose, which cannot be used before the resize: it
# loads the full-size image first, which would defeat draft().
_ORIENTATION_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Orientations whose transpose swaps width and height.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# Formats ``keep`` writes as themselves; any other source becomes JPEG.
_KEPT_FORMATS = {"JPEG": ImageFormat.JPEG, "PNG": ImageFormat.PNG}
_KEPT_IF_WRITABLE = {"WEBP": ImageFormat.WEBP}
_TEMP_DIR = ".tmp"
# Never in a stem ([A-Za-z0-9._-]), so the temporary names of two outputs never meet.
_LABEL_SEPARATOR = "~"
_SNIFF_BYTES = 64
_HINT_CHARS = 20
# How much of a file the format sniffing reads (an SVG may start with a long prolog).
_MAGIC_BYTES = 512
_UNSUPPORTED = "unsupported image format: "
# Files Pillow does not identify here, by how they start: named in the reason, so a
# HEIC photo is not described as 'starts with bytes 00 00 00 18 66 74 79 70'.
_MAGIC_REASONS = (
    (b"%PDF-", "not an image: a PDF document"),
    (b"\xff\x0a", _UNSUPPORTED + "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", _UNSUPPORTED + "JPEG XL"),
    (b"II*\x00", _UNSUPPORTED + "TIFF"),
    (b"MM\x00*", _UNSUPPORTED + "TIFF"),
    (b"8BPS", _UNSUPPORTED + "PSD"),
    # The formats the transform decodes: a file that starts as one but is cut short.
    (b"\xff\xd8\xff", "damaged JPEG image: its header cannot be read"),
    (b"\x89PNG\r\n\x1a\n", "damaged PNG image: its header cannot be read"),
    (b"GIF8", "damaged GIF image: its header cannot be read"),
)
# ISO media files (``....ftyp<brand>``): the brand says which kind.
_FTYP_REASONS = {
    **dict.fromkeys(
        (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"), _UNSUPPORTED + "HEIC"
    ),
    **dict.fromkeys((b"mif1", b"msf1"), _UNSUPPORTED + "HEIF"),
    **dict.fromkeys((b"avif", b"avis"), _UNSUPPORTED + "AVIF"),
}
_FTYP_OTHER = "not an image: a video or other ISO media file"
_CUSTOM_CACHE_SIZE = 4
# os.link errors of file systems (or mounts) that have no hard links: FAT, some FUSE
# and network ones. Their outputs are placed by a look, then a rename.
_NO_HARD_LINKS = frozenset(
    {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
)


def configure_pillow(spec: ImageSpec) -> None:
    """Set this process's Pillow limits from ``spec``; call once in each worker."""
    Image.MAX_IMAGE_PIXELS = spec.max_pixels
    # Pillow only raises above twice the limit and merely warns between 1x and 2x.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    # Corrupt metadata (EXIF) makes Pillow warn on stderr; workers must not write there
    # (it breaks the progress bars), and the pixels are usually fine.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def output_names(stem: str, spec: ImageSpec, image_format: ImageFormat) -> list[str]:
    """Return the output names of ``stem``, the main output's first.

    The main output is ``{stem}.{ext}``; each other box of ``spec.sizes`` gives
    ``{label}/{stem}.{ext}``, with labels like ``256`` or ``640x480``.
    """
    extension = image_format.extension
    labels = ["", *(box_label(box) for box in spec.boxes[1:])]
    return [
        f"{label}/{stem}.{extension}" if label else f"{stem}.{extension}"
        for label in labels
    ]


def transform_file(
    src: Path,
    out_dir: Path,
    stem: str,
    spec: ImageSpec,
    owned: Collection[str] = (),
) -> Transformed:
    """Turn the file ``src`` into ``out_dir/{stem}.{ext}`` (and more) as ``spec`` says.

    An output name already taken is replaced only if it is a regular file named in
    ``owned`` (what the previous manifest records as this URL's files), and kept if
    it already holds the very bytes to be written.

    Raises:
        TransformError: ``src`` is not a usable image, the custom transform failed,
            or an output name is taken by something not ours; nothing is left behind.
        OutputError: an output could not be written (disk full, read-only folder).
    """
    started = time.perf_counter()
    image_format, rendered = _render(src, spec)
    names = output_names(stem, spec, image_format)
    _write_all(out_dir, names, rendered, owned)
    main = rendered[0]
    return Transformed(
        path=names[0],
        width=main.size[0],
        height=main.size[1],
        nbytes=len(main.data),
        elapsed=time.perf_counter() - started,
        outputs=tuple(names[1:]),
    )


@dataclass(frozen=True, slots=True)
class _Rendered:
    """One encoded output image, still in memory."""

    data: bytes
    size: tuple[int, int]


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one box is made from the image, in the image's stored orientation."""

    target: tuple[int, int]
    """Output size before the orientation is applied."""
    crop: tuple[float, float] | None
    """Size of the centred region of the source that is used; None for all of it."""


@dataclass(frozen=True, slots=True)
class _Metadata:
    """What ``keep_metadata`` carries from the source into the outputs."""

    exif: bytes | None
    icc_profile: bytes | None
    source_family: str


def _render(src: Path, spec: ImageSpec) -> tuple[ImageFormat, list[_Rendered]]:
    """Decode ``src`` once and encode every output; return the format and outputs."""
    try:
        with Image.open(src, formats=ALLOWED_FORMATS) as image:
            _refuse_bomb(image.size, spec.max_pixels)
            image_format = _output_format(spec.format, image.format)
            keep_alpha = image_format is not ImageFormat.JPEG
            metadata = _metadata(image) if spec.keep_metadata else None
            frames = _frames(image, spec, keep_alpha=keep_alpha)
            rendered = []
            for frame in frames:
                final = _custom(frame, spec, keep_alpha=keep_alpha)
                data = _encode(final, image_format, spec, metadata)
                rendered.append(_Rendered(data, final.size))
            return image_format, rendered
    except UnidentifiedImageError as exc:
        raise TransformError(_unidentified_reason(src)) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TransformError(_bomb_reason(exc, spec.max_pixels)) from exc
    except (OSError, ValueError) as exc:
        raise TransformError(_decode_failure_reason(exc)) from exc
    except TransformError:
        raise
    # A hostile file can make a decoder raise anything (OverflowError for a PNG of
    # 1 x 4,000,000,000 pixels, struct.error, EOFError, MemoryError…): it is this
    # image's failure, never the worker's or the run's.
    except Exception as exc:
        raise TransformError(
            f"cannot decode image: {type(exc).__name__}: {exc}"
        ) from exc


def _bomb_reason(exc: Exception, limit: int) -> str:
    """Say what Pillow's own guard refused in the words of ``_refuse_bomb``.

    Pillow raises from ``Image.open`` (before our own check can run) and words its
    limit as twice ours when it raises rather than warns; only its count is kept.
    """
    found = re.search(r"\((\d+) pixels\)", str(exc))
    if found is None:
        return f"decompression bomb: {exc}"
    return f"decompression bomb: {int(found.group(1)):,} pixels (limit {limit:,})"


def _refuse_bomb(size: tuple[int, int], limit: int) -> None:
    """Raise if the image is too large to decode, before anything is decoded."""
    width, height = size
    pixels = width * height
    if pixels > limit:
        raise TransformError(
            f"decompression bomb: {width}x{height} = {pixels:,} pixels "
            f"(limit {limit:,})"
        )


def _refuse_huge_output(size: tuple[int, int], limit: int) -> None:
    """Raise if enlarging would make an output with more pixels than allowed."""
    width, height = size
    if width * height > limit:
        raise TransformError(
            f"output of {width}x{height} pixels is over the limit of {limit:,}"
        )


def _output_format(wanted: ImageFormat, source_format: str | None) -> ImageFormat:
    """Resolve ``keep`` against the source's format; other formats stay."""
    if wanted is not ImageFormat.KEEP:
        return wanted
    name = source_format or ""
    if name in _KEPT_FORMATS:
        return _KEPT_FORMATS[name]
    kept = _KEPT_IF_WRITABLE.get(name)
    if kept is not None and kept.name in Image.SAVE:
        return kept
    return ImageFormat.JPEG


def _frames(
    image: ImageFile.ImageFile, spec: ImageSpec, *, keep_alpha: bool
) -> list[Image.Image]:
    """Return the first frame of ``image`` made into each box, upright, main first."""
    orientation = _orientation(image)
    width, height = image.size
    swap = orientation in _SWAPPING_ORIENTATIONS
    upright = (height, width) if swap else (width, height)
    plans = [
        _stored(_plan(upright, box, spec), swap)
        for box in spec.boxes or [upright]  # resize 'none': the image's own size
    ]
    for plan in plans:
        _refuse_huge_output(plan.target, spec.max_pixels)
    resizing = _RESIZINGS[spec.resample]
    scale = _decode_reduced(image, plans, resizing.draft_gap, grayscale=spec.grayscale)
    image.load()
    source = _to_output_mode(image, keep_alpha=keep_alpha, grayscale=spec.grayscale)
    transpose = _ORIENTATION_TRANSPOSES.get(orientation)
    frames = []
    for plan in plans:
        frame = _resize(source, plan, (width, height), scale, resizing)
        if transpose is not None:
            frame = frame.transpose(transpose)
        # A user's function may change its argument in place: never hand it the
        # shared source (or another output's image).
        frames.append(frame.copy() if frame is source else frame)
    return frames


def _orientation(image: Image.Image) -> int:
    """Return the EXIF orientation (1 = upright) without decoding any pixels."""
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) else 1


def _plan(size: tuple[int, int], box: tuple[int, int], spec: ImageSpec) -> _Plan:
    """Plan one box for an upright image of ``size``."""
    width, height = size
    if spec.resize is ResizeMode.NONE:
        return _Plan(size, None)
    if spec.resize is ResizeMode.FIT:
        return _Plan(_fit(size, box, spec.upscale), None)
    if not spec.upscale:
        box = _shrink_to_fit(box, size)
    if spec.resize is ResizeMode.EXACT:
        return _Plan(box, None)
    box_width, box_height = box
    # fill: the largest centred region with the box's aspect ratio.
    if width * box_height > height * box_width:
        crop = (height * box_width / box_height, float(height))
    else:
        crop = (float(width), width * box_height / box_width)
    return _Plan(box, None if crop == (width, height) else crop)


def _fit(size: tuple[int, int], box: tuple[int, int], upscale: bool) -> tuple[int, int]:
    """Return ``size`` scaled to fit inside ``box``, keeping the aspect ratio."""
    width, height = size
    box_width, box_height = box
    if not upscale and width <= box_width and height <= box_height:
        return size
    if width * box_height >= height * box_width:  # the width is what limits
        return box_width, max(1, round(height * box_width / width))
    return max(1, round(width * box_height / height)), box_height


def _shrink_to_fit(box: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Return ``box`` shrunk (keeping its aspect ratio) until it fits in ``size``."""
    box_width, box_height = box
    width, height = size
    factor = min(1.0, width / box_width, height / box_height)
    if factor == 1.0:
        return box
    return max(1, round(box_width * factor)), max(1, round(box_height * factor))


def _stored(plan: _Plan, swap: bool) -> _Plan:
    """Turn a plan for the upright image into one for the image as stored."""
    if not swap:
        return plan
    crop = None if plan.crop is None else (plan.crop[1], plan.crop[0])
    return _Plan((plan.target[1], plan.target[0]), crop)


def _decode_reduced(
    image: ImageFile.ImageFile,
    plans: list[_Plan],
    gap: float | None,
    *,
    grayscale: bool,
) -> float:
    """Ask a JPEG to decode just large enough for every plan; return the scale.

    Decoding at 1/2, 1/4 or 1/8 is a no-op for other formats. The scaled decode is
    kept at least ``gap`` times each target (None: full size), so that the
    resize's filter has that much to work from.
    """
    width, height = image.size
    request = (width, height)
    if gap is not None:
        request = (1, 1)
        for plan in plans:
            crop_width, crop_height = plan.crop or (width, height)
            needed = (
                math.ceil(width * plan.target[0] * gap / crop_width),
                math.ceil(height * plan.target[1] * gap / crop_height),
            )
            request = (max(request[0], needed[0]), max(request[1], needed[1]))
    shrinking = request[0] < width and request[1] < height
    mode = "L" if grayscale else None  # libjpeg decodes the luma channel only
    if not shrinking and mode is None:
        return 1.0
    drafted = image.draft(mode, request if shrinking else None)
    # The scaled decode rounds up; its box is the original image within it.
    return drafted[1][2] / width if drafted else 1.0


def _resize(
    source: Image.Image,
    plan: _Plan,
    stored: tuple[int, int],
    scale: float,
    resizing: _Resizing,
) -> Image.Image:
    """Make one plan's image from ``source``, decoded from a ``stored``-size image."""
    width, height = stored
    crop_width, crop_height = plan.crop or (width, height)
    left, top = (width - crop_width) / 2, (height - crop_height) / 2
    box = (
        left * scale,
        top * scale,
        (left + crop_width) * scale,
        (top + crop_height) * scale,
    )
    if plan.target == source.size and box == (0, 0, *source.size):
        return source
    return source.resize(
        plan.target,
        resizing.filter,
        box=box,
        reducing_gap=resizing.reducing_gap,
    )


def _to_output_mode(
    image: Image.Image, *, keep_alpha: bool, grayscale: bool = False
) -> Image.Image:
    """Return ``image`` as 8-bit L or RGB, or LA/RGBA when alpha is kept."""
    frame = _eight_bit(image, keep_alpha=keep_alpha)
    if grayscale and frame.mode not in ("L", "LA"):
        return frame.convert("LA" if frame.mode == "RGBA" else "L")
    return frame


def _eight_bit(image: Image.Image, *, keep_alpha: bool) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert("L") would clip every value above 255 to white.
        scaled = image.convert("I").point(lambda value: value * _SIXTEEN_TO_EIGHT_BIT)
        return scaled.convert("L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        with_alpha = image if image.mode in ("RGBA", "LA") else image.convert("RGBA")
        return with_alpha if keep_alpha else _on_white(with_alpha)
    if image.mode in ("L", "RGB"):
        return image
    return image.convert("L" if image.mode == "1" else "RGB")


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an LA or RGBA image on a white background."""
    flat = Image.new("L" if image.mode == "LA" else "RGB", image.size, "white")
    flat.paste(image, mask=image.getchannel("A"))
    return flat


@functools.lru_cache(maxsize=_CUSTOM_CACHE_SIZE)
def _custom_function(ref: str) -> Callable[..., object]:
    """Import a ``module:function`` once per process."""
    return import_callable(ref)


def _custom(frame: Image.Image, spec: ImageSpec, *, keep_alpha: bool) -> Image.Image:
    """Apply the user's ``spec.transform`` to one output image, if there is one."""
    if spec.transform is None:
        return frame
    try:
        function = _custom_function(spec.transform)
    except InputError as exc:
        raise TransformError(f"custom transform unavailable: {exc}") from exc
    try:
        result = function(frame)
    # User code: whatever it raises fails this item only (Ctrl-C still stops).
    except Exception as exc:
        raise TransformError(
            f"custom transform failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(result, Image.Image):
        raise TransformError(
            f"custom transform returned {type(result).__name__}, not a PIL image"
        )
    # The function has the last word on the pixels; only make them encodable.
    return _to_output_mode(result, keep_alpha=keep_alpha)


def _metadata(image: Image.Image) -> _Metadata:
    """Read what ``keep_metadata`` keeps, before any pixel is decoded."""
    exif_bytes = None
    with contextlib.suppress(OSError, ValueError, TypeError, SyntaxError, struct.error):
        # A copy: the image's own Exif still says how to orient it.
        exif = Image.Exif()
        exif.load(image.getexif().tobytes())
        exif.pop(ExifTags.Base.Orientation, None)
        exif_bytes = exif.tobytes() if len(exif) else None
    icc = image.info.get("icc_profile")
    return _Metadata(
        exif=exif_bytes,
        icc_profile=icc if isinstance(icc, bytes) and icc else None,
        source_family=_colour_family(image.mode),
    )


def _colour_family(mode: str) -> str:
    """Name the colour space a mode's ICC profile would describe."""
    if mode in _GRAY_FAMILY:
        return "gray"
    if mode in _RGB_FAMILY:
        return "rgb"
    return mode


def _encode(
    image: Image.Image,
    image_format: ImageFormat,
    spec: ImageSpec,
    metadata: _Metadata | None,
) -> bytes:
    """Return ``image`` encoded as ``spec`` says, with metadata only if asked."""
    # Some encoders copy ICC profiles, comments and transparency from info by default.
    image.info = {}
    options = _save_options(image_format, spec)
    if metadata is not None:
        if metadata.exif:
            options["exif"] = metadata.exif
        # A profile for another colour space (CMYK source, grayscale output) is wrong.
        if metadata.icc_profile and _colour_family(image.mode) == (
            metadata.source_family
        ):
            options["icc_profile"] = metadata.icc_profile
    buffer = io.BytesIO()
    try:
        # The enum's names are Pillow's format names.
        image.save(buffer, format=image_format.name, **options)
    except (OSError, ValueError) as exc:
        raise TransformError(f"cannot encode image: {exc}") from exc
    return buffer.getvalue()


def _save_options(
    image_format: ImageFormat, spec: ImageSpec
) -> dict[str, int | bool | bytes]:
    """Return the encoder options of ``image_format`` for ``spec``."""
    if image_format is ImageFormat.JPEG:
        return {
            "quality": spec.quality,
            "optimize": spec.optimize,
            "progressive": spec.progressive,
        }
    if image_format is ImageFormat.WEBP:
        method = _WEBP_OPTIMIZED_METHOD if spec.optimize else _WEBP_METHOD
        return {"quality": spec.quality, "method": method}
    if image_format is ImageFormat.AVIF:
        return {"quality": spec.quality, "max_threads": _AVIF_THREADS}
    level = _PNG_OPTIMIZED_COMPRESS_LEVEL if spec.optimize else _PNG_COMPRESS_LEVEL
    return {"compress_level": level}


def _unidentified_reason(src: Path) -> str:
    """Explain why Pillow found no allowed image format in ``src``."""
    other_format = _identify_any_format(src)
    if other_format is not None:
        return _UNSUPPORTED + other_format
    return _reason_by_magic(src) or f"not an image ({_describe_start(src)})"


def _reason_by_magic(src: Path) -> str | None:
    """Name what ``src`` is from how it starts (HEIC, AVIF, PDF, SVG, ...), or None."""
    try:
        with src.open("rb") as file:
            head = file.read(_MAGIC_BYTES)
    except OSError:
        return None
    if head[4:8] == b"ftyp":
        return _FTYP_REASONS.get(head[8:12], _FTYP_OTHER)
    text = head.lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return _UNSUPPORTED + "SVG (a vector drawing)"
    for magic, reason in _MAGIC_REASONS:
        if head.startswith(magic):
            return reason
    return None


def _identify_any_format(src: Path) -> str | None:
    """Return the format Pillow would read ``src`` as, reading headers only."""
    try:
        # Never load() this: the format may be one whose decoder is not trusted.
        with Image.open(src) as image:
            return image.format
    except (
        OSError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ):
        return None


def _describe_start(src: Path) -> str:
    """Describe how ``src`` starts, for a person to guess what it is."""
    try:
        with src.open("rb") as file:
            head = file.read(_SNIFF_BYTES)
    except OSError as exc:
        return f"cannot read it: {exc.strerror}"
    if not head:
        return "empty file"
    text = head.lstrip()
    if text and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in text):
        first_line = text.splitlines()[0][:_HINT_CHARS].decode("ascii")
        return f"starts with {first_line!r}"
    return f"starts with bytes {head[:8].hex(' ')}"


def _decode_failure_reason(exc: OSError | ValueError) -> str:
    """Explain a decoding failure of an identified image."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"cannot read downloaded file: {exc.strerror}"
    message = str(exc)
    if "truncated" in message.lower():
        # Pillow's "image file is truncated (71 bytes not processed)": its detail only.
        detail = message.lower().removeprefix("image file is truncated").strip(" ()")
        if detail == "truncated file read":
            detail = ""
        return f"truncated image ({detail})" if detail else "truncated image"
    return f"cannot decode image: {message}"


def place_file(src: Path, out_dir: Path, name: str, owned: Collection[str]) -> None:
    """Move the file ``src`` to ``out_dir/name``, never over something not ours.

    ``owned`` names (relative to ``out_dir``) the files the previous manifest records
    as this URL's: only a regular file at one of those names is replaced. A regular
    file with the same bytes as ``src`` is kept (``src`` is removed). ``src`` must be
    on the same file system (the output folder's ``.tmp``).

    Raises:
        TransformError: the name is taken by something else (a folder, a link, a
            user's file), or its folder is not a folder; ``src`` is left as it is.
        OutputError: the file could not be moved (read-only folder, disk full).
    """
    final = out_dir / name
    folder, _, file_name = name.rpartition("/")
    try:
        folder_fd = _open_folder(out_dir, folder)
        try:
            _place(src, folder_fd, file_name, final, ours=name in owned)
        finally:
            os.close(folder_fd)
    except OSError as exc:
        raise OutputError(
            f"cannot write {exc.filename or final}: {exc.strerror}"
        ) from exc


def remove_outputs(out_dir: Path, names: Iterable[str]) -> None:
    """Remove outputs this run placed, for an item that fails after all."""
    for name in names:
        with contextlib.suppress(OSError):
            (out_dir / name).unlink()


def _write_all(
    out_dir: Path, names: list[str], rendered: list[_Rendered], owned: Collection[str]
) -> None:
    """Write every output; if one cannot be, remove those already placed."""
    placed: list[str] = []
    try:
        for name, output in zip(names, rendered, strict=True):
            _write_atomically(out_dir, name, output.data, owned)
            placed.append(name)
    except TransformError:
        remove_outputs(out_dir, placed)
        raise


def _write_atomically(
    out_dir: Path, name: str, data: bytes, owned: Collection[str]
) -> None:
    """Write ``data`` to ``out_dir/name`` through a temporary file and a rename."""
    folder, _, file_name = name.rpartition("/")
    label = f"{_LABEL_SEPARATOR}{folder}" if folder else ""
    temp = out_dir / _TEMP_DIR / f"{file_name}{label}.tmp"
    try:
        try:
            temp.parent.mkdir(exist_ok=True)
            temp.write_bytes(data)
        except OSError as exc:
            raise OutputError(
                f"cannot write {exc.filename or temp}: {exc.strerror}"
            ) from exc
        place_file(temp, out_dir, name, owned)
    except BaseException:
        # Nothing to remove, or the folder itself is unusable: the error says so.
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        raise


_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_folder(out_dir: Path, folder: str) -> int:
    """Open the folder an output goes in (made if need be), never through a link.

    Everything after is done relative to the descriptor, so a link planted at a
    ``--sizes`` or ``originals`` folder during the run is refused, never written
    through, and a folder swapped after the check is not the one written to.
    """
    out_fd = os.open(out_dir, _FOLDER_FLAGS)
    if not folder:
        return out_fd
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, dir_fd=out_fd)
        try:
            return os.open(folder, _FOLDER_FLAGS, dir_fd=out_fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            what = os.lstat(folder, dir_fd=out_fd)
            kind = "a symbolic link" if stat.S_ISLNK(what.st_mode) else "not a folder"
            raise TransformError(
                f"output path {out_dir / folder} exists and is {kind}: refused"
            ) from exc
    finally:
        os.close(out_fd)


def _place(src: Path, folder_fd: int, name: str, final: Path, *, ours: bool) -> None:
    """Rename ``src`` to ``name`` in the folder unless it is taken by what is not ours.

    A hard link is the rename that never replaces: it fails, atomically, if
    anything is at ``final`` (even a dangling link, which is never followed). Only
    then is ``final`` looked at, so the common case costs no extra ``lstat``.
    """
    try:
        os.link(src, name, dst_dir_fd=folder_fd)
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # A file system without hard links: look, then rename.
        try:
            os.lstat(name, dir_fd=folder_fd)
        except FileNotFoundError:
            os.replace(src, name, dst_dir_fd=folder_fd)
            return
    else:
        src.unlink()
        return
    existing = os.lstat(name, dir_fd=folder_fd)
    if not stat.S_ISREG(existing.st_mode):
        raise TransformError(
            f"output path {final} exists and is not ours ({_kind(existing)})"
        )
    if ours:
        os.replace(src, name, dst_dir_fd=folder_fd)  # this URL's own earlier output
    elif filecmp.cmp(src, final, shallow=False):
        # Byte for byte what would be written (outputs are deterministic): this
        # URL's output from a run that stopped before recording it, or a retry's.
        # Keeping it changes nothing.
        src.unlink()
    else:
        raise TransformError(
            f"output path {final} exists and is not ours ({_kind(existing)})"
        )


def _kind(existing: os.stat_result) -> str:
    """Say what a taken output name holds, for the failure reason."""
    mode = existing.st_mode
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISREG(mode):
        return "a file the manifest does not record for this URL"
    return "a special file"
