"""The CPU stage: one downloaded file on disk to one output image on disk, with Pillow.

::

    src ──open lazily (allow-list)──► pixel guard ──► draft (JPEG: decode at 1/2..1/8)
        ──► load ──► 8-bit L/RGB(A) ──► resize to fit ──► EXIF orientation ──► encode
        ──► out_dir/.tmp/{stem}.{ext}.tmp ──os.replace──► out_dir/{stem}.{ext}

``transform_file`` is a pure function of its arguments: it starts no thread or process,
and the same input and ``ImageSpec`` give the same output bytes in any process. Pillow's
exceptions are translated here, at this one boundary: a bad input image becomes a
``TransformError`` (a per-item failure), a failure to write the output becomes an
``OutputError`` (a local fault that stops the run).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from pathlib import Path

from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from downloader.errors import OutputError, TransformError
from downloader.records import Transformed
from downloader.settings import ImageFormat, ImageSpec

__all__ = ["ALLOWED_FORMATS", "configure_pillow", "transform_file"]

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
"""Formats that are decoded; never EPS/PDF (Ghostscript) nor the rarely used ones."""

# Resize in two steps: a cheap integer reduce() (for JPEG, a scaled decode) down to
# about 3x the target, then Lanczos for the rest. Pillow's docs: from 3.0 on the result
# is indistinguishable from a one-step resize in most cases; smaller is faster.
_REDUCING_GAP = 3.0
_RESAMPLE = Image.Resampling.LANCZOS
# libwebp's default speed/size trade-off (0 is fastest, 6 gives the smallest files).
_WEBP_METHOD = 4
_PNG_COMPRESS_LEVEL = 6
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_SIXTEEN_TO_EIGHT_BIT = 255 / 65535
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
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
_TEMP_DIR = ".tmp"
_SNIFF_BYTES = 64
_HINT_CHARS = 20


def configure_pillow(spec: ImageSpec) -> None:
    """Set this process's Pillow limits from ``spec``; call once in each worker."""
    Image.MAX_IMAGE_PIXELS = spec.max_pixels
    # Pillow only raises above twice the limit and merely warns between 1x and 2x.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    # Corrupt metadata (EXIF) makes Pillow warn on stderr; workers must not write there
    # (it breaks the progress bars), and the pixels are usually fine.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def transform_file(src: Path, out_dir: Path, stem: str, spec: ImageSpec) -> Transformed:
    """Turn the downloaded file ``src`` into ``out_dir/{stem}.{ext}`` as ``spec`` says.

    Raises:
        TransformError: ``src`` is not a usable image; nothing is left behind.
        OutputError: the output could not be written (disk full, read-only folder).
    """
    started = time.perf_counter()
    encoded, (width, height) = _render(src, spec)
    name = f"{stem}.{spec.format.extension}"
    _write_atomically(out_dir, name, encoded)
    return Transformed(
        path=name,
        width=width,
        height=height,
        nbytes=len(encoded),
        elapsed=time.perf_counter() - started,
    )


def _render(src: Path, spec: ImageSpec) -> tuple[bytes, tuple[int, int]]:
    """Decode, reduce and encode ``src``; return the encoded bytes and the size."""
    try:
        with Image.open(src, formats=ALLOWED_FORMATS) as image:
            _refuse_bomb(image.size, spec.max_pixels)
            frame = _reduce(image, spec)
            return _encode(frame, spec), frame.size
    except UnidentifiedImageError as exc:
        raise TransformError(_unidentified_reason(src)) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TransformError(f"decompression bomb: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise TransformError(_decode_failure_reason(exc)) from exc


def _refuse_bomb(size: tuple[int, int], limit: int) -> None:
    """Raise if the image is too large to decode, before anything is decoded."""
    width, height = size
    pixels = width * height
    if pixels > limit:
        raise TransformError(
            f"decompression bomb: {width}x{height} = {pixels} pixels (limit {limit})"
        )


def _reduce(image: ImageFile.ImageFile, spec: ImageSpec) -> Image.Image:
    """Return the first frame of ``image`` fitted, upright, in an output mode."""
    orientation = _orientation(image)
    target = _fitted_size(image.size, spec.max_size)
    crop = None
    if target != image.size:
        # JPEG only (a no-op for the others): decode at 1/2, 1/4 or 1/8 scale, as long
        # as that stays at least _REDUCING_GAP times the target.
        request = (int(target[0] * _REDUCING_GAP), int(target[1] * _REDUCING_GAP))
        drafted = image.draft(None, request)
        # The scaled decode rounds up; this box is the original image within it.
        crop = drafted[1] if drafted else None
    image.load()
    frame = _to_output_mode(image, keep_alpha=spec.format is not ImageFormat.JPEG)
    if frame.size != target:
        frame = frame.resize(target, _RESAMPLE, box=crop, reducing_gap=_REDUCING_GAP)
    transpose = _ORIENTATION_TRANSPOSES.get(orientation)
    return frame if transpose is None else frame.transpose(transpose)


def _orientation(image: Image.Image) -> int:
    """Return the EXIF orientation (1 = upright) without decoding any pixels."""
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) else 1


def _fitted_size(size: tuple[int, int], box: int) -> tuple[int, int]:
    """Return ``size`` scaled to fit a ``box`` x ``box`` square; never enlarge."""
    width, height = size
    longest = max(width, height)
    if longest <= box:
        return size
    return max(1, round(width * box / longest)), max(1, round(height * box / longest))


def _to_output_mode(image: Image.Image, *, keep_alpha: bool) -> Image.Image:
    """Return ``image`` as 8-bit L or RGB, or LA/RGBA when alpha is kept."""
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


def _encode(image: Image.Image, spec: ImageSpec) -> bytes:
    """Return ``image`` encoded as ``spec`` says, without any metadata."""
    # Some encoders copy ICC profiles, comments and transparency from info by default.
    image.info = {}
    options: dict[str, int | bool]
    if spec.format is ImageFormat.JPEG:
        options = {"quality": spec.quality, "optimize": False}
    elif spec.format is ImageFormat.WEBP:
        options = {"quality": spec.quality, "method": _WEBP_METHOD}
    else:
        options = {"compress_level": _PNG_COMPRESS_LEVEL}
    buffer = io.BytesIO()
    try:
        # The enum's names are Pillow's format names.
        image.save(buffer, format=spec.format.name, **options)
    except (OSError, ValueError) as exc:
        raise TransformError(f"cannot encode image: {exc}") from exc
    return buffer.getvalue()


def _unidentified_reason(src: Path) -> str:
    """Explain why Pillow found no allowed image format in ``src``."""
    other_format = _identify_any_format(src)
    if other_format is not None:
        return f"unsupported image format: {other_format}"
    return f"not an image ({_describe_start(src)})"


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
    if "truncated" in str(exc).lower():
        return f"truncated image ({exc})"
    return f"cannot decode image: {exc}"


def _write_atomically(out_dir: Path, name: str, data: bytes) -> None:
    """Write ``data`` to ``out_dir/name`` through a temporary file and a rename."""
    temp = out_dir / _TEMP_DIR / f"{name}.tmp"
    try:
        temp.parent.mkdir(exist_ok=True)
        temp.write_bytes(data)
        os.replace(temp, out_dir / name)
    except OSError as exc:
        # Nothing to remove, or the folder itself is unusable: the error below says so.
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        raise OutputError(
            f"cannot write {exc.filename or temp}: {exc.strerror}"
        ) from exc
