"""--resample fast|balanced|best: valid outputs in every mode, fidelity in order."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

from downloader.cli import load_settings, main
from downloader.demo import generate_corpus
from downloader.errors import InputError
from downloader.settings import LOCAL_MODES, ImageFormat, ImageSpec, Mode, Resample
from downloader.transform import transform_file
from tests.helpers import read_manifest
from tests.test_transform import decoded_sizes, two_colour_image, write_image

FAST = ["--threads", "2", "--procs", "2", "--retries", "0"]
BOX = 64


def psnr(output: Image.Image, reference: Image.Image) -> float:
    """Peak signal-to-noise ratio of ``output`` against ``reference``, in dB."""
    diff = ImageChops.difference(output.convert("RGB"), reference.convert("RGB"))
    mse = sum(rms**2 for rms in ImageStat.Stat(diff).rms) / 3
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def photos(folder: Path, count: int, megapixels: float) -> list[Path]:
    """Photo-like JPEGs (the demo corpus's, PNGs left out) of about ``megapixels``."""
    made = generate_corpus(
        folder, count, seed=3, min_megapixels=megapixels, max_megapixels=megapixels
    )
    return [path for path in made if path.suffix == ".jpg"]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three photo-like JPEGs of 0.3 MP: drafted differently by each choice."""
    folder = tmp_path_factory.mktemp("photos")
    photos(folder, 3, 0.3)
    return folder


def expected_bytes(src: Path, tmp_path: Path, resample: Resample) -> bytes:
    """The output the transform makes of ``src`` here, in the test's process."""
    out = tmp_path / f"expected-{resample.value}-{src.stem}"
    out.mkdir(parents=True)
    spec = ImageSpec(max_size=BOX, resample=resample)
    return (out / transform_file(src, out, "x", spec).path).read_bytes()


@pytest.mark.parametrize("mode", list(LOCAL_MODES), ids=lambda m: m.value)
def test_each_choice_reaches_the_workers_in_every_mode(
    mode: Mode, photo_dir: Path, tmp_path: Path
) -> None:
    """--resample fast and best each give, in every mode, the very bytes the
    transform makes with that choice (so it reached the workers), fitted to the box;
    the two choices give different outputs."""
    sources = sorted(photo_dir.glob("*.jpg"))
    made: dict[Resample, dict[str, bytes]] = {}
    for resample in (Resample.FAST, Resample.BEST):
        out = tmp_path / resample.value
        args = ["--input-dir", str(photo_dir), "--out", str(out), "--mode", mode.value]
        args += [*FAST, "--no-config", "--max-size", str(BOX)]

        assert main([*args, "--resample", resample.value]) == 0

        records = {Path(str(r["url"])).name: r for r in read_manifest(out)}
        assert sorted(records) == [src.name for src in sources]
        made[resample] = {}
        for src in sources:
            record = records[src.name]
            assert record["status"] == "ok"
            data = (out / str(record["path"])).read_bytes()
            assert data == expected_bytes(src, tmp_path / mode.value, resample)
            with Image.open(out / str(record["path"])) as output, Image.open(src) as im:
                assert output.format == "JPEG"
                assert max(output.size) == BOX
                ratio = output.size[0] / output.size[1]
                assert abs(ratio - im.size[0] / im.size[1]) < 2 / BOX * ratio
            made[resample][src.name] = data
    assert made[Resample.FAST] != made[Resample.BEST]


def test_fidelity_is_in_the_order_of_the_choices(tmp_path: Path) -> None:
    """On a photo-like 2 MP JPEG boxed to 200 px (PNG output, so that only the
    resize differs), PSNR against a full-size Lanczos resize: best > balanced > fast,
    and every output has the reference's size."""
    (src,) = photos(tmp_path / "in", 1, 2.0)[:1]
    with Image.open(src) as image:
        full = image.convert("RGB")
    found = {}
    for resample in Resample:
        out = tmp_path / resample.value
        out.mkdir()
        spec = ImageSpec(max_size=200, format=ImageFormat.PNG, resample=resample)
        result = transform_file(src, out, "x", spec)
        with Image.open(out / result.path) as output:
            assert max(output.size) == 200
            reference = full.resize(output.size, Image.Resampling.LANCZOS)
            found[resample] = psnr(output, reference)

    assert found[Resample.BEST] > found[Resample.BALANCED] > found[Resample.FAST]


@pytest.mark.parametrize(
    ("resample", "decoded"),
    [
        # 2000x1500 is 1.67x the box: enough for balanced (1.6x), not for its old 2x.
        (Resample.FAST, (2000, 1500)),
        (Resample.BALANCED, (2000, 1500)),
        (Resample.BEST, (4000, 3000)),
    ],
    ids=["fast", "balanced", "best"],
)
def test_each_choice_decodes_a_jpeg_at_its_own_scale(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    resample: Resample,
    decoded: tuple[int, int],
) -> None:
    """A 4000x3000 JPEG boxed to 1200 px: fast and balanced decode it at 1/2 (at
    least 1x and 1.6x the 1200x900 target), best at full size; every output is
    exactly 1200x900."""
    src = write_image(tmp_path / "in", two_colour_image((4000, 3000)), "JPEG")
    sizes = decoded_sizes(monkeypatch)

    result = transform_file(
        src, tmp_path, "x", ImageSpec(max_size=1200, resample=resample)
    )

    assert sizes == [decoded]
    assert (result.width, result.height) == (1200, 900)


def test_balanced_is_the_default(tmp_path: Path) -> None:
    """Without the option the spec says balanced; a config key sets it."""
    config = tmp_path / "downloader.toml"
    config.write_text('resample = "best"\n', encoding="utf-8")

    assert ImageSpec().resample is Resample.BALANCED
    assert load_settings(config).image.resample is Resample.BEST


def test_an_unknown_choice_is_refused(tmp_path: Path) -> None:
    """A value that is not a choice: a clear error from the library, exit 2 from
    the command line, before anything runs."""
    with pytest.raises(InputError, match="--resample must be one of fast, balanced"):
        ImageSpec(resample="slow")  # type: ignore[arg-type]
    out = tmp_path / "out"

    code = main(["--input-dir", str(tmp_path), "--out", str(out), "--resample", "x"])

    assert code == 2
    assert not out.exists()
