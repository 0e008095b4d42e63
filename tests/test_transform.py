"""Tests for the Pillow stage, on small images generated in ``tmp_path``."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageCms

from downloader.errors import OutputError, TransformError
from downloader.records import Transformed
from downloader.settings import ImageFormat, ImageSpec
from downloader.transform import ALLOWED_FORMATS, configure_pillow, transform_file

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

    assert reason.startswith("truncated image (")
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
    """When the final name cannot be replaced, the temporary file is removed."""
    src = write_image(tmp_path / "in", two_colour_image((40, 20)), "PNG")
    out_dir = tmp_path / "out"
    (out_dir / "img.jpg").mkdir(parents=True)
    (out_dir / "img.jpg" / "keep").write_bytes(b"")

    with pytest.raises(OutputError, match="cannot write "):
        transform_file(src, out_dir, "img", ImageSpec())

    assert list((out_dir / ".tmp").iterdir()) == []
