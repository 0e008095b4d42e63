"""This tool side by side with img2dataset, the reference tool: speed and fidelity.

Usage (from a fresh clone, after ``pip install -e .``)::

    python benchmarks/reference.py                 # 320 images, 3 alternated rounds
    python benchmarks/reference.py --images 96     # the corpus's first 96 images
    python benchmarks/reference.py --sweep         # img2dataset's threads/shard sizes

img2dataset is installed on first use into its own virtual environment,
``benchmarks/.work/ref-venv`` (git-ignored), at the versions pinned in
``REFERENCE_PINS`` (the set that imported and ran here). Both tools get exactly the
same task, on ``run.py``'s corpus served by the demo server on 127.0.0.1 with 100 ms
before each response: fit within 512 px without enlarging, JPEG q85 (img2dataset:
``--resize_mode keep_ratio_largest --resize_only_if_bigger True --image_size 512
--encode_format jpg --encode_quality 85 --output_format files``), as many worker
processes as cores. Each tool runs as a fresh process, timed from launch to exit
(start-up included); the runs are alternated, img2dataset then each ``--resample``
choice, ``--rounds`` times, and the best wall time of each counts.

Fidelity: each output is decoded and compared (PSNR, RGB, 8 bits) with its source
decoded at full size and resized with Lanczos to that output's exact size. The
source is taken as stored or turned upright by its EXIF orientation, whichever the
output matches better (img2dataset does not apply the orientation; the count of
outputs it left unturned is reported). Writes ``results/reference-<images>.json``
(and ``results/reference-sweep-<images>.json`` with ``--sweep``) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import run as bench  # benchmarks/run.py, beside this file
from PIL import Image, ImageChops, ImageOps, ImageStat

from downloader.demo import DemoServer
from downloader.settings import ImageSpec, Resample
from downloader.transform import configure_pillow, transform_file

ROOT = bench.HERE.parent
VENV = bench.WORK / "ref-venv"
REFERENCE_PINS = (
    "img2dataset==1.47.0",
    "numpy==2.4.6",
    "opencv-python-headless==4.14.0.94",
    "albumentations==1.4.24",
    "pyarrow==26.0.1",
    "pandas==2.3.3",
)
"""img2dataset and the libraries it resizes and writes with, as installed and run
here (Python 3.11): newer ones are not known to work."""
LATENCY_S = 0.1
BOX = 512
QUALITY = 85
THREADS = 16
"""This tool's download threads (as in ``run.py``)."""
REFERENCE_THREADS = 16
REFERENCE_SHARD = 24
"""img2dataset's best ``--thread_count`` and ``--number_sample_per_shard`` here (see
``--sweep`` and ``results/reference-sweep-96.json``)."""
SWEEP = ((16, 24), (32, 24), (64, 24), (32, 12), (32, 48))
RUN_TIMEOUT_S = 900
# Its import checks for a newer albumentations over the network (not reachable).
QUIET_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}


def child_env() -> dict[str, str]:
    """The environment of a timed launch: as a user's, with bytecode cached.

    This machine sets ``PYTHONDONTWRITEBYTECODE``, which makes every launch compile
    every module again (~1 s here); a package installed by pip has its bytecode.
    """
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def reference_python() -> Path:
    """img2dataset's interpreter, installing it (pinned) on first use."""
    python = VENV / "bin" / "python"
    if not python.is_file():
        bench.say(f"installing {', '.join(REFERENCE_PINS)} into {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", *REFERENCE_PINS]
        subprocess.run(pip, check=True)
    return python


def cores() -> int:
    """Worker processes for both tools: this machine's cores."""
    return os.cpu_count() or 1


def run_ours(url_list: Path, out: Path, resample: Resample) -> float:
    """This tool on the list, as a user runs it; wall seconds from launch to exit."""
    command = [sys.executable, str(ROOT / "cli.py"), str(url_list), "--out", str(out)]
    command += ["--no-config", "--max-size", str(BOX), "--quality", str(QUALITY)]
    command += ["--threads", str(THREADS), "--procs", str(cores())]
    command += ["--per-host", "64", "--resample", resample.value]
    return timed(command, out)


def run_reference(url_list: Path, out: Path, threads: int, shard: int) -> float:
    """img2dataset on the list, the same task; wall seconds from launch to exit."""
    command = [str(reference_python()), "-m", "img2dataset.main"]
    command += ["--url_list", str(url_list), "--input_format", "txt"]
    command += ["--output_folder", str(out), "--output_format", "files"]
    command += ["--processes_count", str(cores()), "--thread_count", str(threads)]
    command += ["--number_sample_per_shard", str(shard)]
    command += ["--resize_mode", "keep_ratio_largest", "--resize_only_if_bigger"]
    command += ["True", "--image_size", str(BOX), "--encode_format", "jpg"]
    command += ["--encode_quality", str(QUALITY), "--distributor", "multiprocessing"]
    command += ["--enable_wandb", "False", "--retries", "1", "--timeout", "30"]
    return timed(command, out)


def timed(command: list[str], out: Path) -> float:
    """Run ``command`` in a fresh output folder; its wall seconds (log in ``out``)."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    env = child_env()
    with log.open("w") as sink:
        begun = time.perf_counter()
        subprocess.run(
            command,
            check=True,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=RUN_TIMEOUT_S,
            cwd=ROOT,
        )
        return time.perf_counter() - begun


def outputs_of_ours(out: Path) -> dict[str, Path]:
    """Source file name → this tool's output, from its manifest."""
    found = {}
    for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["status"] == "ok":
            found[record["url"].rsplit("/", 1)[-1]] = out / record["path"]
    return found


def outputs_of_reference(out: Path) -> dict[str, Path]:
    """Source file name → img2dataset's output, by the url in each key's .json."""
    found = {}
    for sidecar in out.glob("*/*.json"):
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        image = sidecar.with_suffix(".jpg")
        if record.get("status") == "success" and image.is_file():
            found[record["url"].rsplit("/", 1)[-1]] = image
    return found


def psnr(output: Image.Image, reference: Image.Image) -> float:
    """PSNR in dB of ``output`` against ``reference`` (same size, RGB)."""
    diff = ImageChops.difference(output, reference)
    mse = sum(rms**2 for rms in ImageStat.Stat(diff).rms) / len(diff.getbands())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def source_fidelity(
    task: tuple[Path, dict[str, Path]],
) -> dict[str, tuple[float, bool]]:
    """Tool → (PSNR of its output of one source, whether it is left unturned)."""
    source, outputs = task
    with Image.open(source) as image:
        stored = image.convert("RGB")
        upright = ImageOps.exif_transpose(image).convert("RGB")
    found = {}
    for tool, path in outputs.items():
        with Image.open(path) as opened:
            output = opened.convert("RGB")
        candidates = [(upright, False)]
        if stored.size != upright.size or stored.tobytes() != upright.tobytes():
            candidates.append((stored, True))
        aspect = output.width / output.height
        scored = [
            (psnr(output, full.resize(output.size, Image.Resampling.LANCZOS)), flag)
            for full, flag in candidates
            if abs(full.width / full.height - aspect) < 2 * aspect / min(output.size)
        ]
        found[tool] = max(scored) if scored else (0.0, False)
    return found


def fidelity(folder: Path, outputs: dict[str, dict[str, Path]]) -> dict[str, Any]:
    """Mean PSNR of each tool's outputs (the sources every tool made), in parallel."""
    common = set.intersection(*(set(made) for made in outputs.values()))
    tasks = [
        (folder / name, {tool: made[name] for tool, made in outputs.items()})
        for name in sorted(common)
    ]
    with ProcessPoolExecutor(cores()) as pool:
        scores = list(pool.map(source_fidelity, tasks, chunksize=4))
    return {
        tool: {
            "psnr_db_mean": sum(s[tool][0] for s in scores) / len(scores),
            "psnr_db_min": min(s[tool][0] for s in scores),
            "images_compared": len(scores),
            "left_unturned": sum(s[tool][1] for s in scores),
        }
        for tool in outputs
    }


def url_list(urls: list[str]) -> Path:
    """Write the URLs one a line, as both tools read them."""
    path = bench.WORK / "reference-urls.txt"
    path.write_text("".join(f"{url}\n" for url in urls), encoding="utf-8")
    return path


def sweep(plan: bench.Plan, listing: Path) -> list[dict[str, Any]]:
    """img2dataset at several --thread_count / --number_sample_per_shard, once each."""
    rows = []
    for threads, shard in SWEEP:
        bench.say(
            f"img2dataset --thread_count {threads} --number_sample_per_shard {shard}"
        )
        out = bench.WORK / "ref-out" / f"sweep-t{threads}-s{shard}"
        wall = run_reference(listing, out, threads, shard)
        made = len(outputs_of_reference(out))
        rows.append(
            {
                "thread_count": threads,
                "number_sample_per_shard": shard,
                "wall_s": wall,
                "images": made,
                "images_per_s": made / wall,
                "load_average": os.getloadavg(),
            }
        )
        bench.write_json(plan, f"reference-sweep-{plan.images}", rows)
    return rows


def side_by_side(
    plan: bench.Plan, folder: Path, listing: Path, rounds: int
) -> dict[str, Any]:
    """Alternated runs of every tool; the best wall time of each, and fidelity."""
    tools = ["img2dataset", *(f"ours-{r.value}" for r in Resample)]
    walls: dict[str, list[float]] = {tool: [] for tool in tools}
    loads = []
    outputs: dict[str, dict[str, Path]] = {}
    for number in range(rounds):
        for tool in tools:
            bench.say(f"round {number + 1}/{rounds}: {tool}")
            out = bench.WORK / "ref-out" / tool
            loads.append(os.getloadavg()[0])
            if tool == "img2dataset":
                wall = run_reference(listing, out, REFERENCE_THREADS, REFERENCE_SHARD)
                made = outputs_of_reference(out)
            else:
                wall = run_ours(listing, out, Resample(tool.removeprefix("ours-")))
                made = outputs_of_ours(out)
            walls[tool].append(wall)
            if number == 0:  # outputs are the same every round: keep the first
                keep = out.with_name(f"{tool}-kept")
                shutil.rmtree(keep, ignore_errors=True)
                out.rename(keep)
                outputs[tool] = {
                    name: keep / path.relative_to(out) for name, path in made.items()
                }
    bench.say("fidelity: every output against a full-size Lanczos resize")
    quality = fidelity(folder, outputs)
    rows = {}
    for tool in tools:
        best = min(walls[tool])
        rows[tool] = {
            "images": len(outputs[tool]),
            "wall_s_best": best,
            "wall_s_runs": [round(w, 2) for w in walls[tool]],
            "images_per_s": len(outputs[tool]) / best,
            **quality[tool],
        }
    reference = rows["img2dataset"]["images_per_s"]
    for row in rows.values():
        row["ratio_to_img2dataset"] = row["images_per_s"] / reference
    return {"tools": rows, "load_average_1min_at_each_run": loads}


def cpu_per_image(plan: bench.Plan, sources: list[Path]) -> dict[str, Any]:
    """Each --resample choice's CPU seconds per image and fidelity, in this process.

    The tool's ``transform_file`` over the files on disk, one loop per choice: CPU
    time, unlike wall time, changes little with other work on the machine.
    """
    rows: dict[str, Any] = {}
    outputs: dict[str, dict[str, Path]] = {}
    for resample in Resample:
        spec = ImageSpec(max_size=BOX, quality=QUALITY, resample=resample)
        configure_pillow(spec)
        out = bench.WORK / "ref-cpu" / resample.value
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        bench.say(f"CPU per image: --resample {resample.value}")
        begun = time.process_time()
        made = {
            src.name: out / transform_file(src, out, src.stem, spec).path
            for src in sources
        }
        cpu = time.process_time() - begun
        outputs[resample.value] = made
        rows[resample.value] = {"cpu_s_per_image": cpu / len(sources)}
    quality = fidelity(sources[0].parent, outputs)
    for name, row in rows.items():
        row.update(quality[name])
    result = {"images": len(sources), "load_average": os.getloadavg(), "rows": rows}
    bench.write_json(plan, f"resample-cpu-{len(sources)}", result)
    return result


def render(result: dict[str, Any]) -> str:
    """The markdown table of one side-by-side run."""
    meta = result["meta"]
    lines = [
        f"Measured {meta['date']} with `{meta['command']}` on {meta['cores']} cores, "
        f"{meta['corpus']['images']} images ({meta['corpus']['bytes'] / 1e6:.0f} MB, "
        f"{meta['corpus']['min_megapixels']}-{meta['corpus']['max_megapixels']} MP), "
        f"{LATENCY_S * 1000:.0f} ms per response; img2dataset {meta['reference']}, "
        f"--thread_count {REFERENCE_THREADS} --number_sample_per_shard "
        f"{REFERENCE_SHARD}; load average {meta['load_at_start'][0]:.2f} at start, "
        f"{meta['load_at_end'][0]:.2f} at end.",
        "",
        "| tool | images/s (best) | vs img2dataset | PSNR dB (mean / min) | "
        "wall s, every run |",
        "|---|---|---|---|---|",
    ]
    for tool, row in result["tools"].items():
        lines.append(
            f"| {tool} | {row['images_per_s']:.1f} | "
            f"{row['ratio_to_img2dataset']:.2f}x | {row['psnr_db_mean']:.2f} / "
            f"{row['psnr_db_min']:.2f} | "
            f"{', '.join(f'{w:.1f}' for w in row['wall_s_runs'])} |"
        )
    return "\n".join(lines)


def main() -> int:
    """Install img2dataset if need be, run both tools alternated, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=bench.FULL.images)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="img2dataset's settings")
    parser.add_argument(
        "--cpu", action="store_true", help="CPU s per image of each --resample"
    )
    parser.add_argument(
        "--table", action="store_true", help="print the table of the saved results"
    )
    args = parser.parse_args()
    if args.table:
        saved = bench.FULL.results / f"reference-{args.images}.json"
        print(render(json.loads(saved.read_text(encoding="utf-8"))))
        return 0
    plan = dataclasses.replace(bench.FULL, images=args.images, repeat=args.rounds)
    folder = bench.corpus(bench.FULL)
    sources = bench.images_of(folder)[: args.images]
    if args.cpu:
        found = cpu_per_image(plan, sources)
        for name, row in found["rows"].items():
            print(f"{name}: {json.dumps(row)}")
        return 0
    reference_python()
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/reference.py", *sys.argv[1:]]),
        "cores": cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "reference": " ".join(REFERENCE_PINS),
        "corpus": bench.corpus_facts(sources),
        "load_at_start": os.getloadavg(),
    }
    with DemoServer(folder, latency=LATENCY_S) as server:
        listing = url_list(server.urls()[: args.images])
        if args.sweep:
            rows = sweep(plan, listing)
            for row in rows:
                print(json.dumps(row))
            return 0
        result = side_by_side(plan, folder, listing, args.rounds)
    meta["load_at_end"] = os.getloadavg()
    result = {"meta": meta, **result}
    bench.write_json(plan, f"reference-{args.images}", result)
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
