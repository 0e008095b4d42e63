"""CPU per image and fidelity of resize variants, to choose what --resample does.

Usage (from a fresh clone, after ``pip install -e .``)::

    python benchmarks/resample_explore.py              # the corpus's first 96 images
    python benchmarks/resample_explore.py --images 32 --rounds 1

Each variant renders every image the way ``transform.py`` does (open, JPEG ``draft``,
load, resize to fit 512 px, EXIF orientation, JPEG q85) with one thing changed: how
close to the box the JPEG is decoded (``draft_gap``: at least that many times the
target, at libjpeg's 1/2..1/8 scales), Pillow's ``reducing_gap`` for the resize (an
integer ``reduce()`` first), the filter of the last step, libjpeg's fast integer IDCT
(Pillow's draft flag), or the orientation applied before the resize instead of
after. The tool's own ``transform_file`` with each ``--resample`` is measured
alongside, on the same images, in the same rounds.

CPU is ``time.process_time`` of the loop over the images in this one process (other
work on the machine barely changes it), the least over ``--rounds`` rounds, variants
interleaved. Fidelity is ``reference.py``'s: PSNR of each output, decoded, against its
source decoded at full size, turned upright and resized with Lanczos to the output's
size; ``psnr_unencoded`` scores the resized image before JPEG encoding, to show what
the resize alone loses. Writes ``results/resample-explore-<images>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import run as bench  # benchmarks/run.py, beside this file
from PIL import Image, ImageOps
from reference import BOX, QUALITY, psnr

from downloader.settings import ImageSpec, Resample
from downloader.transform import (
    _ORIENTATION_TRANSPOSES,
    _SWAPPING_ORIENTATIONS,
    configure_pillow,
    transform_file,
)

LANCZOS = Image.Resampling.LANCZOS
FILTERS = {
    "lanczos": LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "hamming": Image.Resampling.HAMMING,
    "bilinear": Image.Resampling.BILINEAR,
}


@dataclass(frozen=True, slots=True)
class Variant:
    """One way to make the 512 px output."""

    draft_gap: float | None
    """JPEG decoded at no less than this times the target (None: full size)."""
    reducing_gap: float | None
    """Pillow's ``resize(reducing_gap=...)``: ``reduce()`` down to this times it."""
    resample: str = "lanczos"
    fast_dct: bool = False
    """libjpeg's fast integer IDCT and plain chroma upsampling (Pillow's draft flag)."""
    transpose_first: bool = False
    """Apply the EXIF orientation to the decoded image, before the resize."""

    @property
    def name(self) -> str:
        words = [
            f"draft {self.draft_gap or 'full'}",
            f"gap {self.reducing_gap or 'none'}",
            self.resample,
        ]
        if self.fast_dct:
            words.append("fast-idct")
        if self.transpose_first:
            words.append("transpose-first")
        return ", ".join(words)


def variants() -> list[Variant]:
    """The variants measured.

    For a JPEG drafted to ``draft_gap`` x the target, what is left is a factor under
    ``2 * draft_gap``, so ``reducing_gap`` (>= 1) changes nothing there: the first
    rows vary the JPEG path (PNGs, never drafted, get Lanczos from full size), the
    next the reduce that PNGs (and undrafted JPEGs) get.
    """
    named = tuple(FILTERS)[:3]  # Lanczos, bicubic, Hamming
    jpeg = [
        Variant(draft, None, name)
        for draft in (1.0, 1.25, 1.5, 1.75, 2.0)
        for name in named
    ]
    reduce = [Variant(1.0, gap, name) for gap in (1.0, 1.5, 2.0, 3.0) for name in named]
    others = [
        Variant(None, None),
        Variant(None, 1.0),
        Variant(None, 2.0),
        Variant(2.0, 2.0),  # --resample balanced as it was
        Variant(1.5, 3.0),
        Variant(1.6, 3.0),
        Variant(1.75, 3.0),
        Variant(1.0, 1.0, "bilinear"),
        Variant(1.0, 1.0, fast_dct=True),
        Variant(2.0, 2.0, fast_dct=True),
        Variant(2.0, 2.0, transpose_first=True),
        Variant(None, None, transpose_first=True),
    ]
    return jpeg + reduce + others


def fit(size: tuple[int, int]) -> tuple[int, int]:
    """The output size in ``BOX`` (``transform._fit`` without upscaling)."""
    width, height = size
    if width <= BOX and height <= BOX:
        return size
    if width >= height:
        return BOX, max(1, round(height * BOX / width))
    return max(1, round(width * BOX / height)), BOX


def render(src: Path, variant: Variant) -> tuple[Image.Image, bytes]:
    """The resized upright image and its JPEG, made as ``variant`` says."""
    with Image.open(src) as image:
        orientation = image.getexif().get(0x0112, 1)
        width, height = image.size
        swap = orientation in _SWAPPING_ORIENTATIONS
        upright = fit((height, width) if swap else (width, height))
        target = (upright[1], upright[0]) if swap else upright
        scale = 1.0
        if variant.draft_gap is not None and image.format == "JPEG":
            request = (
                int(target[0] * variant.draft_gap),
                int(target[1] * variant.draft_gap),
            )
            if request[0] < width and request[1] < height:
                drafted = image.draft(None, request)
                scale = drafted[1][2] / width if drafted else 1.0
        if variant.fast_dct and image.format == "JPEG":
            # Pillow's JPEG decoder takes (scale, draft); draft=1 is the fast IDCT.
            image.decoderconfig = (*(image.decoderconfig or (1,))[:1], 1)
        image.load()
        source: Image.Image = image if image.mode == "RGB" else image.convert("RGB")
        box = (0.0, 0.0, width * scale, height * scale)
        if variant.transpose_first:
            source = ImageOps.exif_transpose(source)
            box = (0.0, 0.0, *source.size)
            target = upright
        resized = source
        if target != source.size:
            resized = source.resize(
                target,
                FILTERS[variant.resample],
                box=box,
                reducing_gap=variant.reducing_gap,
            )
        transpose = _ORIENTATION_TRANSPOSES.get(orientation)
        if not variant.transpose_first and transpose is not None:
            resized = resized.transpose(transpose)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG", quality=QUALITY)
    return resized, buffer.getvalue()


def references(sources: list[Path]) -> dict[str, Image.Image]:
    """Each source at full size, upright, Lanczos-resized to the output's size."""
    found = {}
    for src in sources:
        with Image.open(src) as image:
            upright = ImageOps.exif_transpose(image).convert("RGB")
        found[src.name] = upright.resize(fit(upright.size), LANCZOS)
    return found


def timed(
    job: Callable[[Path], Any], sources: list[Path]
) -> tuple[dict[str, float], list[Any]]:
    """CPU seconds per image of ``job`` over ``sources`` (all, and by format)."""
    spent: dict[str, list[float]] = {}
    made = []
    for src in sources:
        begun = time.process_time()
        made.append(job(src))
        cpu = time.process_time() - begun
        spent.setdefault("all", []).append(cpu)
        spent.setdefault(src.suffix.lstrip("."), []).append(cpu)
    return {kind: sum(cpus) / len(cpus) for kind, cpus in spent.items()}, made


def score(
    outputs: list[tuple[Image.Image | None, bytes]],
    sources: list[Path],
    refs: dict[str, Image.Image],
) -> dict[str, Any]:
    """PSNR of the encoded outputs (mean and least; by format too), mean bytes, and
    the mean PSNR of the unencoded ones (those not identical to the reference)."""
    encoded: dict[str, list[float]] = {}
    unencoded = []
    for src, (image, data) in zip(sources, outputs, strict=True):
        reference = refs[src.name]
        with Image.open(io.BytesIO(data)) as decoded:
            value = psnr(decoded.convert("RGB"), reference)
        encoded.setdefault("all", []).append(value)
        encoded.setdefault(src.suffix.lstrip("."), []).append(value)
        if image is not None and math.isfinite(before := psnr(image, reference)):
            unencoded.append(before)
    row: dict[str, Any] = {
        "psnr_db_mean": _mean(encoded.pop("all")),
        "psnr_db_min": min(min(values) for values in encoded.values()),
        "psnr_db_mean_by_format": {kind: _mean(v) for kind, v in encoded.items()},
        "bytes_mean": _mean([len(data) for _, data in outputs]),
    }
    if unencoded:
        row["psnr_unencoded_db_mean"] = _mean(unencoded)
    return row


def _mean(values: list[float] | list[int]) -> float:
    return sum(values) / len(values)


def tool_job(resample: Resample, out: Path) -> Callable[[Path], tuple[None, bytes]]:
    """The tool's ``transform_file`` with ``resample``, returning the output's bytes."""
    spec = ImageSpec(max_size=BOX, quality=QUALITY, resample=resample)

    def job(src: Path) -> tuple[None, bytes]:
        path = out / transform_file(src, out, src.stem, spec, owned=()).path
        data = path.read_bytes()
        path.unlink()
        return None, data

    return job


def explore(sources: list[Path], rounds: int, only: list[str] | None) -> dict[str, Any]:
    """Every variant (or those named in ``only``) and the tool's three choices:
    least CPU per image, fidelity."""
    configure_pillow(ImageSpec())
    refs = references(sources)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as temp:
        jobs: dict[str, Callable[[Path], Any]] = {
            f"tool --resample {r.value}": tool_job(r, Path(temp)) for r in Resample
        }
        for variant in variants():
            if only and variant.name not in only:
                continue
            jobs[variant.name] = lambda src, v=variant: render(src, v)
        for number in range(rounds):
            for name, job in jobs.items():
                bench.say(f"round {number + 1}/{rounds}: {name}")
                cpu, made = timed(job, sources)
                if name not in rows:
                    rows[name] = {**_facts(name), **score(made, sources, refs)}
                rows[name].setdefault("cpu_ms_runs", []).append(
                    {kind: round(value * 1000, 2) for kind, value in cpu.items()}
                )
    for row in rows.values():
        least = min(row["cpu_ms_runs"], key=lambda run: run["all"])
        row["cpu_ms_per_image"] = least["all"]
        row["cpu_ms_per_image_by_format"] = least
    return rows


def _facts(name: str) -> dict[str, Any]:
    """The variant's settings, for the JSON (the tool's rows have none)."""
    for variant in variants():
        if variant.name == name:
            return dataclasses.asdict(variant)
    return {}


def markdown(result: dict[str, Any]) -> str:
    """The table, cheapest first."""
    meta = result["meta"]
    lines = [
        f"Measured {meta['date']} with `{meta['command']}`: {meta['images']} images, "
        f"least CPU of {meta['rounds']} rounds; load average "
        f"{meta['load_at_start'][0]:.1f} at start, {meta['load_at_end'][0]:.1f} "
        "at end.",
        "",
        "| variant | CPU ms/image (JPEG, PNG) | PSNR dB mean / min (JPEG, PNG) "
        "| unencoded | bytes |",
        "|---|---|---|---|---|",
    ]
    ordered = sorted(result["rows"].items(), key=lambda kv: kv[1]["cpu_ms_per_image"])
    for name, row in ordered:
        cpu = row["cpu_ms_per_image_by_format"]
        by_format = row["psnr_db_mean_by_format"]
        unencoded = row.get("psnr_unencoded_db_mean")
        lines.append(
            f"| {name} | {cpu['all']:.1f} ({cpu['jpg']:.1f}, {cpu['png']:.1f}) | "
            f"{row['psnr_db_mean']:.3f} / {row['psnr_db_min']:.2f} "
            f"({by_format['jpg']:.3f}, {by_format['png']:.3f}) | "
            f"{'' if unencoded is None else f'{unencoded:.2f}'} | "
            f"{row['bytes_mean']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    """Measure every variant on the corpus's first images; write JSON and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--only",
        action="append",
        help="measure only this variant (its name in the table; repeatable)",
    )
    parser.add_argument(
        "--name", default="resample-explore", help="results file name, before -<N>"
    )
    args = parser.parse_args()
    sources = bench.images_of(bench.corpus(bench.FULL))[: args.images]
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python", "benchmarks/resample_explore.py", *sys.argv[1:]]
        ),
        "images": len(sources),
        "rounds": args.rounds,
        "load_at_start": os.getloadavg(),
    }
    rows = explore(sources, args.rounds, args.only)
    meta["load_at_end"] = os.getloadavg()
    result = {"meta": meta, "rows": rows}
    plan = dataclasses.replace(bench.FULL, images=len(sources))
    bench.write_json(plan, f"{args.name}-{len(sources)}", result)
    table = markdown(result)
    (plan.results / f"{args.name}-{len(sources)}.md").write_text(
        table + "\n", encoding="utf-8"
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
