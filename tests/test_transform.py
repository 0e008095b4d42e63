"""Tests for the Pillow stage, on small images generated in ``tmp_path``."""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageCms, ImageFile

from downloader.errors import InputError, OutputError, TransformError
from downloader.records import Transformed
from downloader.settings import ImageFormat, ImageSpec, ResizeMode
from downloader.transform import ALLOWED_FORMATS, configure_pillow, transform_file
from tests import user_transforms

ORIENTATION_TAG = 0x0112
MAKE_TAG = 0x010F
RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
# Lossy encoders move colours a little; far less than the distance between them.
COLOUR_TOLERANCE = 40


def write_image(
    path: Path, image: Image.Image, image_format: str, **options: Any
) -> Path:
    """Save ``image`` to ``path`` in ``image_format`` and return the path."""
    image.save(path, format=image_format, **options)
    return path


def two_colour_image(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Return an image whose left half is red and right half blue."""
    image = Image.new(mode, size, RED)
    image.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return image


def noise_jpeg(path: Path) -> Path:
    """Write a JPEG of noise, large enough in bytes to truncate in the scan data."""
    return write_image(path, Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")


def transform(src: Path, out_dir: Path, **spec: Any) -> tuple[Transformed, Image.Image]:
    """Transform ``src`` into ``out_dir``; return the record and the loaded output."""
    out_dir.mkdir(exist_ok=True)
    result = transform_file(src, out_dir, "img", ImageSpec(**spec))
    with Image.open(out_dir / result.path) as output:
        output.load()
        return result, output


def close_to(actual: Any, expected: tuple[int, ...]) -> bool:
    """Tell whether a pixel is within the lossy tolerance of ``expected``."""
    channels = actual if isinstance(actual, tuple) else (actual,)
    return all(
        abs(a - e) <= COLOUR_TOLERANCE for a, e in zip(channels, expected, strict=True)
    )


def fail(src: Path, out_dir: Path, **spec: Any) -> str:
    """Transform ``src`` expecting a TransformError; return its reason."""
    out_dir.mkdir(exist_ok=True)
    with pytest.raises(TransformError) as caught:
        transform_file(src, out_dir, "img", ImageSpec(**spec))
    return caught.value.reason


def leftovers(out_dir: Path) -> list[Path]:
    """List every file under ``out_dir``."""
    return sorted(path for path in out_dir.rglob("*") if path.is_file())


def test_jpeg_fits_within_the_box_and_keeps_its_aspect_ratio(tmp_path: Path) -> None:
    """A large JPEG is scaled down to fit the box with its aspect ratio."""
    src = write_image(tmp_path / "in", two_colour_image((300, 150)), "JPEG")

    result, output = transform(src, tmp_path / "out", max_size=100)

    assert (result.width, result.height) == (100, 50)
    assert output.size == (100, 50)
    assert result.path == "img.jpg"
    assert result.nbytes == (tmp_path / "out" / "img.jpg").stat().st_size
    assert result.elapsed >= 0


def test_small_image_is_not_upscaled(tmp_path: Path) -> None:
    """An image already inside the box keeps its size."""
    src = write_image(tmp_path / "in", two_colour_image((30, 20)), "PNG")

    result, output = transform(src, tmp_path / "out", max_size=100)

    assert (result.width, result.height) == output.size == (30, 20)


def test_large_jpeg_gets_the_exact_size_through_draft(tmp_path: Path) -> None:
    """A 4000x3000 JPEG (decoded at reduced scale) comes out exactly 500x375."""
    src = write_image(tmp_path / "in", two_colour_image((4000, 3000)), "JPEG")

    result, output = transform(src, tmp_path / "out", max_size=500)

    assert output.size == (result.width, result.height) == (500, 375)
    assert close_to(output.getpixel((10, 187)), RED)
    assert close_to(output.getpixel((490, 187)), BLUE)


@pytest.mark.parametrize(
    ("orientation", "max_size", "size", "first", "second"),
    [
        # Raw image: 40x20, red on the left, blue on the right.
        (1, 100, (40, 20), RED, BLUE),
        (3, 100, (40, 20), BLUE, RED),
        (6, 100, (20, 40), RED, BLUE),
        (8, 100, (20, 40), BLUE, RED),
        (6, 20, (10, 20), RED, BLUE),
    ],
)
def test_exif_orientation_is_applied(
    tmp_path: Path,
    orientation: int,
    max_size: int,
    size: tuple[int, int],
    first: tuple[int, int, int],
    second: tuple[int, int, int],
) -> None:
    """The output is upright: first/second are left/right, or top/bottom if tall."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), "JPEG", exif=exif)

    _, output = transform(src, tmp_path / "out", max_size=max_size)

    width, height = output.size
    if width > height:
        points = (width // 4, height // 2), (3 * width // 4, height // 2)
    else:
        points = (width // 2, height // 4), (width // 2, 3 * height // 4)
    assert output.size == size
    assert close_to(output.getpixel(points[0]), first)
    assert close_to(output.getpixel(points[1]), second)
    assert not output.getexif()


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    """A CMYK JPEG is converted to RGB with its colours."""
    src = write_image(
        tmp_path / "in", Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"
    )

    _, output = transform(src, tmp_path / "out")

    assert output.mode == "RGB"
    assert close_to(output.getpixel((10, 10)), RED)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    """A 16-bit grey value of 40000 becomes about 155 of 255, not white."""
    src = write_image(tmp_path / "in", Image.new("I;16", (8, 8), 40000), "PNG")

    _, output = transform(src, tmp_path / "out", format=ImageFormat.PNG)

    assert output.mode == "L"
    assert abs(output.getpixel((4, 4)) - 155) <= 1  # type: ignore[operator]


def test_transparent_palette_png_becomes_white_in_jpeg(tmp_path: Path) -> None:
    """Transparent palette pixels turn white when flattened for JPEG."""
    image = Image.new("P", (40, 20), 0)
    image.putpalette([0, 0, 0, *RED])
    image.paste(1, (20, 0, 40, 20))
    src = write_image(tmp_path / "in", image, "PNG", transparency=0)

    _, output = transform(src, tmp_path / "out", format=ImageFormat.JPEG)

    assert output.mode == "RGB"
    assert close_to(output.getpixel((5, 10)), WHITE)
    assert close_to(output.getpixel((35, 10)), RED)


@pytest.mark.parametrize("output_format", [ImageFormat.PNG, ImageFormat.WEBP])
def test_rgba_keeps_alpha_where_the_format_can(
    tmp_path: Path, output_format: ImageFormat
) -> None:
    """An RGBA input keeps its alpha channel in PNG and WebP output."""
    image = Image.new("RGBA", (40, 20), (*RED, 0))
    image.paste((*BLUE, 255), (20, 0, 40, 20))
    src = write_image(tmp_path / "in", image, "PNG")

    _, output = transform(src, tmp_path / "out", format=output_format)

    assert output.mode == "RGBA"
    assert output.getpixel((5, 10))[3] == 0  # type: ignore[index]
    assert output.getpixel((35, 10))[3] == 255  # type: ignore[index]


@pytest.mark.parametrize("image_format", ["GIF", "WEBP", "PNG"])
def test_animation_gives_its_first_frame(tmp_path: Path, image_format: str) -> None:
    """Only the first frame of an animated GIF, WebP or PNG is used."""
    first, second = Image.new("RGB", (20, 20), RED), Image.new("RGB", (20, 20), BLUE)
    src = write_image(
        tmp_path / "in", first, image_format, save_all=True, append_images=[second]
    )

    _, output = transform(src, tmp_path / "out")

    assert close_to(output.getpixel((10, 10)), RED)


@pytest.mark.parametrize(
    ("mode", "output_format", "output_mode"),
    [
        ("1", ImageFormat.JPEG, "L"),
        ("L", ImageFormat.JPEG, "L"),
        ("LA", ImageFormat.JPEG, "L"),
        ("LA", ImageFormat.PNG, "LA"),
        ("P", ImageFormat.PNG, "RGB"),
        ("RGB", ImageFormat.PNG, "RGB"),
        ("RGBA", ImageFormat.JPEG, "RGB"),
        ("I;16", ImageFormat.JPEG, "L"),
    ],
)
def test_input_modes_map_to_output_modes(
    tmp_path: Path, mode: str, output_format: ImageFormat, output_mode: str
) -> None:
    """Each input mode comes out in a mode the output format stores as intended."""
    src = write_image(tmp_path / "in", Image.new(mode, (30, 30)), "PNG")

    _, output = transform(src, tmp_path / "out", max_size=20, format=output_format)

    assert output.mode == output_mode
    assert output.size == (20, 20)


@pytest.mark.parametrize("image_format", ["BMP", "GIF", "WEBP"])
def test_every_allowed_input_format_is_read(tmp_path: Path, image_format: str) -> None:
    """BMP, GIF and WebP inputs are decoded like JPEG and PNG."""
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), image_format)

    result, output = transform(src, tmp_path / "out", max_size=20)

    assert image_format in ALLOWED_FORMATS
    assert (result.width, result.height) == output.size == (20, 10)
    assert close_to(output.getpixel((2, 5)), RED)


@pytest.mark.parametrize(
    ("output_format", "pillow_format", "extension"),
    [
        (ImageFormat.JPEG, "JPEG", "jpg"),
        (ImageFormat.WEBP, "WEBP", "webp"),
        (ImageFormat.PNG, "PNG", "png"),
    ],
)
def test_output_format_is_right_and_carries_no_metadata(
    tmp_path: Path, output_format: ImageFormat, pillow_format: str, extension: str
) -> None:
    """Each output format decodes as itself, without EXIF, ICC profile or comment."""
    exif = Image.Exif()
    exif[MAKE_TAG] = "Camera"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = write_image(
        tmp_path / "in",
        two_colour_image((40, 20)),
        "JPEG",
        exif=exif,
        icc_profile=icc,
        comment="hello",
    )

    result, output = transform(src, tmp_path / "out", format=output_format)

    assert result.path == f"img.{extension}"
    assert output.format == pillow_format
    assert not output.getexif()
    assert not set(output.info) & {"exif", "icc_profile", "comment", "xmp"}


@pytest.mark.parametrize("output_format", list(ImageFormat))
def test_output_bytes_are_deterministic(
    tmp_path: Path, output_format: ImageFormat
) -> None:
    """The same input and spec give the same bytes every time."""
    image = Image.effect_mandelbrot((200, 120), (-2.0, -1.0, 1.0, 1.0), 40)
    src = write_image(tmp_path / "in", image.convert("RGB"), "JPEG")
    spec = ImageSpec(max_size=64, format=output_format)
    outputs = []
    for name in ("a", "b"):
        out_dir = tmp_path / name
        out_dir.mkdir()
        result = transform_file(src, out_dir, "img", spec)
        outputs.append((out_dir / result.path).read_bytes())

    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_truncated_image_fails(tmp_path: Path, image_format: str) -> None:
    """A JPEG or PNG cut in half fails as truncated and leaves nothing behind."""
    blob = io.BytesIO()
    Image.effect_noise((64, 64), 60).save(blob, format=image_format)
    src = tmp_path / "in"
    src.write_bytes(blob.getvalue()[: len(blob.getvalue()) // 2])

    reason = fail(src, tmp_path / "out")

    # Pillow's own words, without its doubled "image file is truncated (…)".
    assert re.fullmatch(r"truncated image( \(\d+ bytes not processed\))?", reason)
    assert leftovers(tmp_path / "out") == []


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds one empty row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    return signature + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_whatever_a_decoder_raises_fails_the_image_only(tmp_path: Path) -> None:
    """1 x 4,000,000,000 pixels passes a raised --max-pixels, and Pillow then raises
    OverflowError (not OSError or ValueError): still this image's failure, in words."""
    src = tmp_path / "in"
    src.write_bytes(png_header(1, 4_000_000_000))

    reason = fail(src, tmp_path / "out", max_pixels=4_294_836_225)

    assert reason.startswith("cannot decode image: OverflowError: "), reason
    assert leftovers(tmp_path / "out") == []


def test_html_is_not_an_image(tmp_path: Path) -> None:
    """An HTML error page fails as not an image, with a hint of what it is."""
    src = tmp_path / "in"
    src.write_bytes(b"\n<html><head><title>404 Not Found</title></head></html>\n")

    reason = fail(src, tmp_path / "out")

    assert reason.startswith("not an image (")
    assert "starts with '<html" in reason
    assert leftovers(tmp_path / "out") == []


def test_binary_garbage_is_not_an_image(tmp_path: Path) -> None:
    """Unknown binary bytes fail as not an image, quoting the first bytes."""
    src = tmp_path / "in"
    src.write_bytes(bytes(range(256)))

    reason = fail(src, tmp_path / "out")

    assert reason == "not an image (starts with bytes 00 01 02 03 04 05 06 07)"


ISO_MEDIA = b"\x00\x00\x00\x18ftyp"


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (ISO_MEDIA + b"heic\x00\x00\x00\x00mif1heic", "unsupported image format: HEIC"),
        (ISO_MEDIA + b"mif1\x00\x00\x00\x00mif1heic", "unsupported image format: HEIF"),
        (ISO_MEDIA + b"avif\x00\x00\x00\x00avifmif1", "unsupported image format: AVIF"),
        (ISO_MEDIA + b"isom\x00\x00\x02\x00isomiso2", "not an image: a video or "),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "not an image: a PDF document"),
        (b"\xff\x0a\xfa\x1f", "unsupported image format: JPEG XL"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unsupported image format: SVG"),
        (
            b'<?xml version="1.0"?>\n<!-- a comment -->\n<svg width="10"/>',
            "unsupported image format: SVG",
        ),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "damaged PNG image: its header cannot be read"),
    ],
)
def test_a_known_format_that_is_not_decoded_is_named(
    head: bytes, reason: str, tmp_path: Path
) -> None:
    """HEIC, AVIF, PDF, SVG, ...: the reason names the format instead of quoting
    bytes (a HEIC photo was 'not an image (starts with bytes 00 00 00 18 …)')."""
    src = tmp_path / "in"
    src.write_bytes(head + bytes(64))

    assert fail(src, tmp_path / "out").startswith(reason)
    assert leftovers(tmp_path / "out") == []


def test_tiff_is_named_as_unsupported(tmp_path: Path) -> None:
    """A real TIFF (which Pillow could decode, but the transform does not)."""
    src = tmp_path / "in"
    Image.new("RGB", (8, 8)).save(src, format="TIFF")

    assert fail(src, tmp_path / "out") == "unsupported image format: TIFF"


def test_empty_file_is_not_an_image(tmp_path: Path) -> None:
    """An empty file fails as not an image and says it is empty."""
    src = tmp_path / "in"
    src.write_bytes(b"")

    reason = fail(src, tmp_path / "out")

    assert reason == "not an image (empty file)"


def test_missing_file_fails_as_unreadable(tmp_path: Path) -> None:
    """A source file that is gone fails as a per-item error naming the cause."""
    reason = fail(tmp_path / "missing", tmp_path / "out")

    assert reason == "cannot read downloaded file: No such file or directory"


def test_tiff_is_an_unsupported_format(tmp_path: Path) -> None:
    """An image Pillow knows but outside the allow-list fails, naming its format."""
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), "TIFF")

    reason = fail(src, tmp_path / "out")

    assert reason == "unsupported image format: TIFF"


def test_eps_is_an_unsupported_format(tmp_path: Path) -> None:
    """An EPS file is identified by name only and refused, never rendered."""
    src = tmp_path / "in"
    src.write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 20 20\n"
        b"newpath 0 0 moveto 20 20 lineto stroke\n%%EOF\n"
    )

    reason = fail(src, tmp_path / "out")

    assert reason == "unsupported image format: EPS"


def test_decompression_bomb_fails_before_decoding(tmp_path: Path) -> None:
    """An image over spec.max_pixels fails even without configure_pillow."""
    src = write_image(tmp_path / "in", two_colour_image((20, 20)), "PNG")

    reason = fail(src, tmp_path / "out", max_pixels=100)

    assert reason == "decompression bomb: 20x20 = 400 pixels (limit 100)"


def test_configure_pillow_refuses_images_just_over_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After configure_pillow, Pillow itself refuses 1x-2x the limit (not only 2x)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    src = write_image(tmp_path / "in", two_colour_image((20, 20)), "PNG")
    (tmp_path / "out").mkdir()
    spec = ImageSpec(max_pixels=300)
    with warnings.catch_warnings():
        # Start from "warn only" (pytest makes every warning an error) to test ours.
        warnings.simplefilter("ignore")
        configure_pillow(spec)
        with pytest.raises(TransformError) as caught:
            transform_file(src, tmp_path / "out", "img", spec)

    assert Image.MAX_IMAGE_PIXELS == 300
    assert caught.value.reason.startswith("decompression bomb: ")
    assert isinstance(caught.value.__cause__, Image.DecompressionBombWarning)


def test_configure_pillow_silences_corrupt_exif_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corrupt EXIF block does not warn in a configured worker; the image is used."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    exif = Image.Exif()
    exif[MAKE_TAG] = "Camera"
    # Claim that the 7-byte Make string is 1792 bytes long.
    corrupt = exif.tobytes().replace(b"\x00\x00\x00\x07", b"\x00\x00\x07\x00", 1)
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), "JPEG", exif=corrupt)
    with warnings.catch_warnings():
        configure_pillow(ImageSpec())
        result, _ = transform(src, tmp_path / "out")

    assert (result.width, result.height) == (40, 20)


def test_no_temporary_file_is_left_after_success(tmp_path: Path) -> None:
    """After success only the final output exists, with no .tmp name."""
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), "PNG")

    transform(src, tmp_path / "out")

    assert leftovers(tmp_path / "out") == [tmp_path / "out" / "img.jpg"]


def test_unusable_temporary_folder_is_an_output_error(tmp_path: Path) -> None:
    """A write fault (.tmp is a file, so mkdir fails) is an OutputError."""
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), "PNG")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / ".tmp").write_bytes(b"")

    with pytest.raises(OutputError) as caught:
        transform_file(src, out_dir, "img", ImageSpec())

    assert not isinstance(caught.value, TransformError)
    assert str(caught.value).startswith("cannot write ")
    assert caught.value.exit_code == 3
    assert not (out_dir / "img.jpg").exists()


def test_failed_rename_removes_the_temporary_file(tmp_path: Path) -> None:
    """When the final name is taken (a folder), the item fails; no temporary file."""
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), "PNG")
    out_dir = tmp_path / "out"
    (out_dir / "img.jpg").mkdir(parents=True)
    (out_dir / "img.jpg" / "keep").write_bytes(b"")

    with pytest.raises(TransformError, match="exists and is not ours"):
        transform_file(src, out_dir, "img", ImageSpec())

    assert list((out_dir / ".tmp").iterdir()) == []


# ----------------------------------------------------------------- resize modes


def three_band_image(size: tuple[int, int]) -> Image.Image:
    """Return an image in three vertical bands: blue, red, blue."""
    width, height = size
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (width // 3, 0, 2 * width // 3, height))
    return image


@pytest.mark.parametrize(
    ("resize", "box", "expected"),
    [
        (ResizeMode.FIT, (100, 100), (100, 50)),
        (ResizeMode.FIT, (50, 100), (50, 25)),
        (ResizeMode.FIT, (300, 20), (40, 20)),
        (ResizeMode.FILL, (100, 100), (100, 100)),
        (ResizeMode.FILL, (30, 60), (30, 60)),
        (ResizeMode.EXACT, (100, 100), (100, 100)),
        (ResizeMode.EXACT, (120, 10), (120, 10)),
    ],
)
def test_resize_modes_give_their_sizes(
    tmp_path: Path,
    resize: ResizeMode,
    box: tuple[int, int],
    expected: tuple[int, int],
) -> None:
    """fit stays inside the box, fill and exact give the box itself."""
    src = write_image(tmp_path / "in", two_colour_image((300, 150)), "PNG")

    result, output = transform(src, tmp_path / "out", resize=resize, size=box)

    assert output.size == (result.width, result.height) == expected


def test_fill_crops_the_centre(tmp_path: Path) -> None:
    """fill of a wide image into a square keeps the middle third only."""
    src = write_image(tmp_path / "in", three_band_image((300, 100)), "PNG")

    _, output = transform(
        src,
        tmp_path / "out",
        resize=ResizeMode.FILL,
        size=(50, 50),
        format=ImageFormat.PNG,
    )

    assert output.size == (50, 50)
    assert all(
        close_to(output.getpixel(point), RED) for point in [(0, 0), (49, 49), (25, 25)]
    )


def test_exact_stretches_without_cropping(tmp_path: Path) -> None:
    """exact keeps all of the image: both outer bands are still there."""
    src = write_image(tmp_path / "in", three_band_image((300, 100)), "PNG")

    _, output = transform(
        src,
        tmp_path / "out",
        resize=ResizeMode.EXACT,
        size=(60, 60),
        format=ImageFormat.PNG,
    )

    assert close_to(output.getpixel((2, 30)), BLUE)
    assert close_to(output.getpixel((30, 30)), RED)
    assert close_to(output.getpixel((57, 30)), BLUE)


def test_resize_none_keeps_the_pixel_size(tmp_path: Path) -> None:
    """none re-encodes at the source's size, whatever max_size says."""
    src = write_image(tmp_path / "in", two_colour_image((300, 150)), "PNG")

    result, _ = transform(src, tmp_path / "out", resize=ResizeMode.NONE, max_size=10)

    assert (result.width, result.height) == (300, 150)


@pytest.mark.parametrize(
    ("resize", "box", "expected"),
    [
        (ResizeMode.FIT, (100, 100), (40, 20)),
        # The box shrinks, keeping its shape, until it fits inside the image.
        (ResizeMode.FILL, (100, 100), (20, 20)),
        (ResizeMode.FILL, (100, 25), (40, 10)),
        (ResizeMode.EXACT, (200, 50), (40, 10)),
    ],
)
def test_small_images_are_never_enlarged(
    tmp_path: Path,
    resize: ResizeMode,
    box: tuple[int, int],
    expected: tuple[int, int],
) -> None:
    """Without upscale no output side is larger than the source's."""
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), "PNG")

    result, _ = transform(src, tmp_path / "out", resize=resize, size=box)

    assert (result.width, result.height) == expected


@pytest.mark.parametrize(
    ("resize", "expected"),
    [(ResizeMode.FIT, (100, 50)), (ResizeMode.FILL, (100, 100))],
)
def test_upscale_enlarges_small_images(
    tmp_path: Path, resize: ResizeMode, expected: tuple[int, int]
) -> None:
    """With upscale a small image is brought up to the box."""
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), "PNG")

    result, _ = transform(
        src, tmp_path / "out", resize=resize, size=(100, 100), upscale=True
    )

    assert (result.width, result.height) == expected


def test_upscale_beyond_the_pixel_limit_fails(tmp_path: Path) -> None:
    """An enlargement past max_pixels fails the item instead of eating memory."""
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), "PNG")

    reason = fail(
        src, tmp_path / "out", size=(5000, 5000), upscale=True, max_pixels=1_000_000
    )

    assert reason.startswith("output of 5000x2500 pixels is over the limit")


@pytest.mark.parametrize(
    ("resize", "box", "expected"),
    [
        (ResizeMode.FIT, (50, 100), (50, 100)),
        (ResizeMode.FILL, (40, 100), (40, 100)),
        (ResizeMode.EXACT, (30, 90), (30, 90)),
    ],
)
def test_box_applies_to_the_upright_image(
    tmp_path: Path,
    resize: ResizeMode,
    box: tuple[int, int],
    expected: tuple[int, int],
) -> None:
    """A 200x100 JPEG stored sideways (orientation 6) is boxed as 100x200."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    image = two_colour_image((200, 100))
    src = write_image(tmp_path / "in", image, "JPEG", exif=exif)

    _, output = transform(src, tmp_path / "out", resize=resize, size=box)

    assert output.size == expected
    assert close_to(output.getpixel((expected[0] // 2, 5)), RED)
    assert close_to(output.getpixel((expected[0] // 2, expected[1] - 5)), BLUE)


# ------------------------------------------------------- several sizes at once


def decoded_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record the size of every image Pillow decodes from now on."""
    sizes: list[tuple[int, int]] = []
    real = ImageFile.ImageFile.load_prepare

    def spy(self: ImageFile.ImageFile) -> None:
        sizes.append(self.size)
        real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load_prepare", spy)
    return sizes


def test_sizes_make_every_output_from_one_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sizes=256,64: the largest is the main output, the other goes in 64/."""
    src = write_image(tmp_path / "in", two_colour_image((2400, 1200)), "JPEG")
    spec = ImageSpec(sizes=((256, 256), (64, 64)))
    decoded = decoded_sizes(monkeypatch)

    result = transform_file(src, tmp_path, "img", spec)

    # One decode, at quarter scale: still 2x the largest box.
    assert decoded == [(600, 300)]
    assert result.path == "img.jpg"
    assert (result.width, result.height) == (256, 128)
    assert result.outputs == ("64/img.jpg",)
    with Image.open(tmp_path / "64" / "img.jpg") as small:
        assert small.size == (64, 32)


def test_sizes_with_boxes_of_other_shapes(tmp_path: Path) -> None:
    """WxH boxes are labelled WxH; the largest by area is the main output."""
    src = write_image(tmp_path / "in", two_colour_image((400, 200)), "PNG")

    result, _ = transform(
        src,
        tmp_path / "out",
        resize=ResizeMode.FILL,
        sizes=((40, 30), (160, 90), (50, 50)),
    )

    assert (result.width, result.height) == (160, 90)
    assert result.outputs == ("40x30/img.jpg", "50/img.jpg")
    with Image.open(tmp_path / "out" / "40x30" / "img.jpg") as small:
        assert small.size == (40, 30)
    assert leftovers(tmp_path / "out" / ".tmp") == []


def test_sizes_output_is_deterministic(tmp_path: Path) -> None:
    """Several outputs, cropped and in WebP, are byte-identical run after run."""
    image = Image.effect_mandelbrot((300, 200), (-2.0, -1.0, 1.0, 1.0), 40)
    src = write_image(tmp_path / "in", image.convert("RGB"), "JPEG")
    spec = ImageSpec(
        resize=ResizeMode.FILL, sizes=((64, 64), (100, 40)), format=ImageFormat.WEBP
    )
    runs = []
    for name in ("a", "b"):
        out_dir = tmp_path / name
        out_dir.mkdir()
        result = transform_file(src, out_dir, "img", spec)
        runs.append(
            [(out_dir / path).read_bytes() for path in (result.path, *result.outputs)]
        )

    assert runs[0] == runs[1]
    assert len(runs[0]) == 2


def test_a_large_jpeg_is_still_drafted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4000x3000 JPEG boxed to 200 is decoded at 1/8 scale (still 2x the box)."""
    src = write_image(tmp_path / "in", two_colour_image((4000, 3000)), "JPEG")
    decoded = decoded_sizes(monkeypatch)

    transform_file(src, tmp_path, "img", ImageSpec(max_size=200))

    assert decoded == [(500, 375)]


# ------------------------------------------------------------ formats, options


@pytest.mark.parametrize(
    ("source_format", "expected_format", "extension"),
    [
        ("JPEG", "JPEG", "jpg"),
        ("PNG", "PNG", "png"),
        ("WEBP", "WEBP", "webp"),
        ("GIF", "JPEG", "jpg"),
        ("BMP", "JPEG", "jpg"),
    ],
)
def test_keep_writes_the_source_format_when_it_can(
    tmp_path: Path, source_format: str, expected_format: str, extension: str
) -> None:
    """keep: JPEG, PNG and WebP stay themselves; GIF and BMP become JPEG."""
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), source_format)

    result, output = transform(src, tmp_path / "out", format=ImageFormat.KEEP)

    assert result.path == f"img.{extension}"
    assert output.format == expected_format


def test_avif_is_written_or_refused_up_front(tmp_path: Path) -> None:
    """AVIF output works where Pillow can write it, else ImageSpec refuses it."""
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), "PNG")
    Image.init()

    if "AVIF" in Image.SAVE:
        result, output = transform(src, tmp_path / "out", format=ImageFormat.AVIF)
        assert result.path == "img.avif"
        assert output.format == "AVIF"
        assert close_to(output.convert("RGB").getpixel((5, 10)), RED)
    else:
        with pytest.raises(InputError, match="cannot write AVIF"):
            ImageSpec(format=ImageFormat.AVIF)


def test_progressive_jpeg(tmp_path: Path) -> None:
    """progressive=True writes a progressive JPEG; the default does not."""
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), "PNG")

    _, plain = transform(src, tmp_path / "a")
    _, progressive = transform(src, tmp_path / "b", progressive=True)

    assert not plain.info.get("progressive")
    assert progressive.info.get("progressive")


@pytest.mark.parametrize("output_format", [ImageFormat.JPEG, ImageFormat.PNG])
def test_optimize_never_makes_files_larger(
    tmp_path: Path, output_format: ImageFormat
) -> None:
    """optimize gives a file no larger than the default, with the same pixels."""
    image = Image.effect_mandelbrot((120, 80), (-2.0, -1.0, 1.0, 1.0), 40)
    src = write_image(tmp_path / "in", image.convert("RGB"), "PNG")

    plain, plain_image = transform(src, tmp_path / "a", format=output_format)
    optimized, optimized_image = transform(
        src, tmp_path / "b", format=output_format, optimize=True
    )

    assert optimized.nbytes <= plain.nbytes
    assert optimized_image.tobytes() == plain_image.tobytes()


def test_keep_metadata_keeps_exif_and_icc_but_not_orientation(tmp_path: Path) -> None:
    """keep_metadata: the camera make and ICC stay; orientation is applied, dropped."""
    exif = Image.Exif()
    exif[MAKE_TAG] = "Camera"
    exif[ORIENTATION_TAG] = 6
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = write_image(
        tmp_path / "in", two_colour_image((40, 20)), "JPEG", exif=exif, icc_profile=icc
    )

    _, output = transform(src, tmp_path / "out", keep_metadata=True)

    assert output.size == (20, 40)
    assert output.getexif().get(MAKE_TAG) == "Camera"
    assert ORIENTATION_TAG not in output.getexif()
    assert output.info.get("icc_profile") == icc


def test_grayscale_drops_an_rgb_profile_it_no_longer_fits(tmp_path: Path) -> None:
    """A grayscale output keeps EXIF but not an RGB ICC profile."""
    exif = Image.Exif()
    exif[MAKE_TAG] = "Camera"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = write_image(
        tmp_path / "in", two_colour_image((40, 20)), "JPEG", exif=exif, icc_profile=icc
    )

    _, output = transform(src, tmp_path / "out", keep_metadata=True, grayscale=True)

    assert output.mode == "L"
    assert output.getexif().get(MAKE_TAG) == "Camera"
    assert "icc_profile" not in output.info


@pytest.mark.parametrize(
    ("source_mode", "output_format", "expected_mode"),
    [
        ("RGB", ImageFormat.JPEG, "L"),
        ("RGBA", ImageFormat.PNG, "LA"),
        ("P", ImageFormat.JPEG, "L"),
    ],
)
def test_grayscale_output(
    tmp_path: Path, source_mode: str, output_format: ImageFormat, expected_mode: str
) -> None:
    """grayscale gives L, or LA where alpha is kept; red and blue differ in grey."""
    image = two_colour_image((40, 20)).convert(source_mode)
    src = write_image(tmp_path / "in", image, "PNG")

    _, output = transform(src, tmp_path / "out", format=output_format, grayscale=True)

    assert output.mode == expected_mode
    left, right = output.getpixel((5, 10)), output.getpixel((35, 10))
    assert isinstance(left, int | tuple)
    assert left != right


# ------------------------------------------------------------ custom transform


def test_custom_transform_runs_after_the_built_in_steps(tmp_path: Path) -> None:
    """The user's function sees the resized image and its result is what is saved."""
    src = write_image(tmp_path / "in", two_colour_image((300, 150)), "PNG")

    result, output = transform(
        src,
        tmp_path / "out",
        max_size=60,
        format=ImageFormat.PNG,
        transform="tests.user_transforms:mark_corner",
    )

    assert (result.width, result.height) == (60, 30)
    assert output.getpixel((0, 0)) == user_transforms.MARK
    assert output.getpixel((1, 1)) != user_transforms.MARK


def test_custom_transform_applies_to_every_size(tmp_path: Path) -> None:
    """With several sizes each output goes through the function once."""
    src = write_image(tmp_path / "in", two_colour_image((300, 150)), "PNG")

    result, _ = transform(
        src,
        tmp_path / "out",
        sizes=((60, 60), (30, 30)),
        format=ImageFormat.PNG,
        transform="tests.user_transforms:invert",
    )

    for path in (result.path, *result.outputs):
        with Image.open(tmp_path / "out" / path) as output:
            # Inverted red is cyan.
            assert close_to(output.convert("RGB").getpixel((2, 2)), (0, 255, 255))


def test_custom_transform_result_is_made_encodable(tmp_path: Path) -> None:
    """An RGBA result still becomes a JPEG (flattened)."""
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), "PNG")

    _, output = transform(
        src, tmp_path / "out", transform="tests.user_transforms:add_alpha"
    )

    assert output.mode == "RGB"


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("fail", "custom transform failed: ValueError: cannot handle 40x20"),
        ("not_an_image", "custom transform returned int, not a PIL image"),
    ],
)
def test_custom_transform_failure_fails_the_item(
    tmp_path: Path, function: str, expected: str
) -> None:
    """A raising or misbehaving function fails that image and leaves nothing."""
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), "PNG")

    reason = fail(src, tmp_path / "out", transform=f"tests.user_transforms:{function}")

    assert reason == expected
    assert leftovers(tmp_path / "out") == []


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_colon", "is not of the form module:function"),
        ("tests.no_such_module:f", "cannot import transform module"),
        ("tests.user_transforms:missing", "has no attribute 'missing'"),
        ("tests.user_transforms:NOT_CALLABLE", "is not callable"),
    ],
)
def test_bad_transform_reference_is_an_input_error(ref: str, message: str) -> None:
    """A transform that cannot be used is refused when the settings are made."""
    with pytest.raises(InputError, match=message):
        ImageSpec(transform=ref)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"sizes": ((64, 64), (64, 64))}, "must not repeat"),
        ({"sizes": ((0, 64),)}, "greater than 0"),
        ({"size": (10, -1)}, "greater than 0"),
        ({"resize": ResizeMode.NONE, "size": (10, 10)}, "resize 'none'"),
    ],
)
def test_bad_boxes_are_input_errors(spec: dict[str, Any], message: str) -> None:
    """Impossible box settings are refused up front."""
    with pytest.raises(InputError, match=message):
        ImageSpec(**spec)
