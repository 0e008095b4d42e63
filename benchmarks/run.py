"""Benchmark every mode on a generated corpus served over loopback; print a table.

Usage (from a fresh clone, after ``pip install -e .``)::

    python benchmarks/run.py          # full: 320 images, ~10-20 minutes on 2 cores
    python benchmarks/run.py --quick  # smoke run: 24 small images, ~1 minute

What it does, in order (each step's raw figures go to ``benchmarks/results/*.json``,
or ``benchmarks/.work/results-quick/`` with ``--quick``):

1. Generate the corpus (cached under ``benchmarks/.work``): photo-like JPEGs and some
   PNGs of 1-12 MP, deterministic.
2. Serve it from its own process (``demo.DemoServer``) at two settings: ``fast`` (no
   added latency, zero-copy ``sendfile``) and ``wan`` (100 ms per request and a
   per-connection bandwidth cap).
3. Baselines in this process, on the same files: download-only (16 httpx threads, one
   shared client, to disk; wall and CPU seconds), processing-only (the tool's
   ``transform_file`` in one loop, one process) and a bare Pillow loop (open, draft,
   thumbnail, save JPEG).
4. The comparison of all five modes at each server setting (``--threads 16 --procs
   2``), then a ``--threads``/``--procs`` sweep of the pipeline on ``wan``.
5. The processing stage alone: the pipeline on the same files already on disk
   (``LocalFiles``, i.e. ``--input-dir``) with 1 and 2 worker processes.
6. Peak memory of the pipeline at 300 and 3,000 items (tiny images, distinct URLs by
   query string), to show it does not grow with the list.
7. The headline ratios, and a markdown table of everything (also written to
   ``results/table.md``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from downloader.compare import compare, gil_enabled, run_mode
from downloader.demo import COMPLETE_MARKER, DemoServer, generate_corpus
from downloader.fetch import HostLimiter, fetch, make_client
from downloader.records import Job
from downloader.report import Comparison, ModeResult, comparison_json
from downloader.runtime import Cancellation
from downloader.settings import HttpSettings, ImageSpec, Mode, Settings
from downloader.transform import configure_pillow, transform_file

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
WAN_LATENCY_S = 0.1
# 100 Mbit/s per connection: a 1 MB photo takes ~80 ms on the wire after the 100 ms.
WAN_BANDWIDTH = 12_500_000
TASK = ImageSpec(max_size=512, quality=85)
"""The task of the reference figures: fit within 512 px, JPEG quality 85."""
MAIN_THREADS, MAIN_PROCS = 16, 2
CHILD_TIMEOUT_S = 600


@dataclass(frozen=True, slots=True)
class Plan:
    """How big a run is: the full benchmark or the quick smoke run."""

    name: str
    images: int
    min_megapixels: float
    max_megapixels: float
    sweep: tuple[tuple[int, int], ...]
    memory_counts: tuple[int, ...]
    results: Path
    repeat: int
    """Runs of each headline measurement; the best (least wall time) counts."""


FULL = Plan(
    "full",
    320,
    1.0,
    12.0,
    sweep=((4, 2), (8, 2), (16, 1), (16, 2), (32, 2)),
    memory_counts=(300, 3000),
    results=HERE / "results",
    repeat=3,
)
QUICK = Plan(
    "quick",
    24,
    0.5,
    3.0,
    sweep=((4, 1), (16, 2)),
    memory_counts=(30, 300),
    results=WORK / "results-quick",
    repeat=1,
)


def corpus(plan: Plan) -> Path:
    """Generate (once) and return the corpus folder of ``plan``."""
    folder = WORK / f"corpus-{plan.images}-{plan.min_megapixels}-{plan.max_megapixels}"
    if not (folder / COMPLETE_MARKER).is_file():
        say(f"generating {plan.images} images into {folder} (cached for next time)")
        generate_corpus(
            folder,
            plan.images,
            seed=0,
            min_megapixels=plan.min_megapixels,
            max_megapixels=plan.max_megapixels,
            processes=os.cpu_count() or 1,
        )
        (folder / COMPLETE_MARKER).write_text("complete\n")
    return folder


def tiny_corpus() -> Path:
    """A few small images for the memory runs (many URLs, little work each)."""
    folder = WORK / "corpus-tiny"
    if not (folder / COMPLETE_MARKER).is_file():
        generate_corpus(folder, 20, seed=1, min_megapixels=0.02, max_megapixels=0.05)
        (folder / COMPLETE_MARKER).write_text("complete\n")
    return folder


def images_of(folder: Path) -> list[Path]:
    """The corpus images, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.name.startswith("img-"))


def say(message: str) -> None:
    """Progress on stderr, so stdout is just the table."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    """CPU seconds of this process (all its threads)."""
    times = os.times()
    return times.user + times.system


def settings_for(out: Path, threads: int, procs: int) -> Settings:
    """The benchmark's settings: per-host high enough never to cap the run."""
    http = HttpSettings(per_host=max(threads, 64), retries=1)
    return Settings(out=out, threads=threads, procs=procs, http=http, image=TASK)


# ------------------------------------------------------------------ baselines


def download_only(urls: list[str], tmp: Path, threads: int) -> dict[str, float]:
    """Download every URL to disk with ``threads`` httpx threads; wall and CPU s."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    http = HttpSettings(per_host=threads)
    hosts = HostLimiter(threads)
    cancel = Cancellation()
    jobs = [Job(i, i + 1, url, url, f"dl-{i:05d}") for i, url in enumerate(urls)]
    cpu, wall = cpu_seconds(), time.perf_counter()
    with (
        make_client(http, threads) as client,
        ThreadPoolExecutor(threads) as pool,
    ):
        fetched = list(
            pool.map(
                lambda job: fetch(
                    job, client, http, tmp, cancel=cancel.event, hosts=hosts
                ),
                jobs,
            )
        )
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    nbytes = sum(f.nbytes for f in fetched)
    shutil.rmtree(tmp)
    return {"wall_s": wall, "cpu_s": cpu, "bytes": nbytes, "threads": threads}


def processing_only(paths: list[Path], out: Path) -> dict[str, float]:
    """The tool's transform over files on disk, one loop in this process."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    configure_pillow(TASK)
    cpu, wall = cpu_seconds(), time.perf_counter()
    for path in paths:
        transform_file(path, out, path.stem, TASK)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    shutil.rmtree(out)
    return {"wall_s": wall, "cpu_s": cpu, "images_per_s": len(paths) / wall}


def bare_pillow(paths: list[Path], draft_factor: float) -> dict[str, float]:
    """The least code that does the task: open, draft, thumbnail, encode.

    ``draft_factor`` 2 decodes JPEGs at the scale the tool uses (at least 2x the box,
    for Lanczos quality): the same transform. 1 decodes at the smallest scale that
    still covers the box: faster, and visibly softer.
    """
    box = (TASK.max_size, TASK.max_size)
    request = (round(TASK.max_size * draft_factor),) * 2
    cpu, wall = cpu_seconds(), time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image.draft("RGB", request)
            small = image.convert("RGB")
            # The tool's resampling (Lanczos after a reduce to ~2x the box).
            small.thumbnail(box, Image.Resampling.LANCZOS, reducing_gap=2.0)
            small.save(io.BytesIO(), "JPEG", quality=TASK.quality)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {"wall_s": wall, "cpu_s": cpu, "images_per_s": len(paths) / wall}


# ---------------------------------------------------------------- comparisons


def rows_of(comparison: Comparison) -> list[dict[str, Any]]:
    """The per-mode figures of a comparison, without the timelines."""
    rows: list[dict[str, Any]] = comparison_json(comparison)["modes"]
    for row in rows:
        row.pop("timeline")
    return rows


def result_row(result: ModeResult) -> dict[str, Any]:
    """The figures of one run outside a comparison."""
    (row,) = rows_of(Comparison(results=(result,), gil_enabled=True, cores=1))
    for key in ("speedup_vs_sequential", "outputs_match"):
        row.pop(key)
    return row


def run_figures(result: ModeResult) -> dict[str, float]:
    """The few figures a side-by-side script prints of one run."""
    summary = result.summary
    return {
        "wall_s": round(summary.wall_s, 2),
        "images_per_s": round(summary.images_per_s, 2),
        "cpu_s": round(summary.cpu_s, 1),
        "ok": result.ok,
    }


def write_json(plan: Plan, name: str, data: Any) -> None:
    """Save raw results as ``<results>/<name>.json``."""
    plan.results.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1)
    (plan.results / f"{name}.json").write_text(text + "\n", encoding="utf-8")


SERVER_SETTINGS = (
    ("fast", 0.0, None),
    ("wan", WAN_LATENCY_S, WAN_BANDWIDTH),
)


def corpus_facts(paths: list[Path]) -> dict[str, Any]:
    """Count, bytes and megapixels of the corpus."""
    megapixels = []
    for path in paths:
        with Image.open(path) as image:
            megapixels.append(image.width * image.height / 1e6)
    megapixels.sort()
    return {
        "images": len(paths),
        "bytes": sum(p.stat().st_size for p in paths),
        "min_megapixels": round(megapixels[0], 2),
        "median_megapixels": round(megapixels[len(megapixels) // 2], 2),
        "max_megapixels": round(megapixels[-1], 2),
    }


def run_comparisons(
    plan: Plan, folder: Path, baselines: dict[str, Any]
) -> dict[str, Any]:
    """Both server settings: download-only baseline, all modes, and the sweep."""
    found: dict[str, Any] = {}
    for setting, latency, bandwidth in SERVER_SETTINGS:
        with DemoServer(folder, latency=latency, bandwidth=bandwidth) as server:
            urls = server.urls()
            say(f"{setting}: download-only, {MAIN_THREADS} threads")
            baselines[f"download_only_{setting}"] = best_of(
                plan,
                functools.partial(
                    download_only, urls, WORK / "download-only", MAIN_THREADS
                ),
            )
            say(f"{setting}: comparing every mode")
            out = WORK / "out" / setting
            comparison = compare(
                urls, settings_for(out, MAIN_THREADS, MAIN_PROCS), log=sys.stderr
            )
            write_json(plan, f"comparison-{setting}", comparison_json(comparison))
            shutil.copyfile(
                out / "comparison.png", plan.results / f"comparison-{setting}.png"
            )
            found[setting] = comparison
            if setting == "wan":
                found["sweep"] = sweep(plan, urls)
    return found


def sweep(plan: Plan, urls: list[str]) -> list[dict[str, Any]]:
    """The pipeline at several --threads/--procs."""
    rows = []
    # The headline setting again, so that its best of several runs counts.
    repeats = [(MAIN_THREADS, MAIN_PROCS)] * (plan.repeat - 1)
    for threads, procs in [*plan.sweep, *repeats]:
        say(f"wan: pipeline --threads {threads} --procs {procs}")
        out = WORK / "sweep" / f"t{threads}-p{procs}"
        result = run_mode(
            urls,
            settings_for(out, threads, procs),
            Mode.PIPELINE,
            cancel=Cancellation(),
        )
        rows.append(result_row(result))
    write_json(plan, "sweep-wan", rows)
    return rows


def processing_stage(plan: Plan, folder: Path) -> list[dict[str, Any]]:
    """The pipeline on files already on disk (``LocalFiles``): the processing stage."""
    from downloader.sources import LocalFiles  # --input-dir support

    rows = []
    for procs in [1] * plan.repeat + [MAIN_PROCS]:
        say(f"processing stage alone: pipeline on local files, --procs {procs}")
        out = WORK / "stage" / f"p{procs}"
        result = run_mode(
            LocalFiles(str(folder)),
            settings_for(out, MAIN_THREADS, procs),
            Mode.PIPELINE,
            cancel=Cancellation(),
        )
        rows.append(result_row(result))
    write_json(plan, "processing-stage", rows)
    return rows


def memory_runs(plan: Plan) -> list[dict[str, Any]]:
    """Peak memory of the pipeline for growing lists of tiny images.

    Each run is a fresh process (this script with ``--memory-child``), so that the
    main process's peak is the tool's alone, not this benchmark's leftovers.
    """
    rows = []
    with DemoServer(tiny_corpus(), latency=0.0) as server:
        for count in plan.memory_counts:
            say(f"memory: pipeline on {count} items, in a fresh process")
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--memory-child",
                    server.base_url,
                    str(count),
                ],
                check=True,
                capture_output=True,
                text=True,
                timeout=CHILD_TIMEOUT_S,
            )
            rows.append(json.loads(child.stdout))
    write_json(plan, "memory", rows)
    return rows


def memory_child(base_url: str, count: int) -> int:
    """The body of one memory run: the pipeline on ``count`` URLs; print its row."""
    names = [p.name for p in images_of(tiny_corpus())]
    urls = [f"{base_url}/{names[i % len(names)]}?n={i}" for i in range(count)]
    result = run_mode(
        urls,
        settings_for(WORK / "memory" / str(count), MAIN_THREADS, MAIN_PROCS),
        Mode.PIPELINE,
        cancel=Cancellation(),
    )
    row = result_row(result)
    row["items"] = count
    print(json.dumps(row))
    return 0


def best_of(plan: Plan, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``measure`` ``plan.repeat`` times; keep the fastest, list every wall time."""
    runs = [measure() for _ in range(plan.repeat)]
    best = dict(min(runs, key=lambda run: float(run["wall_s"])))
    best["runs_wall_s"] = [round(float(run["wall_s"]), 3) for run in runs]
    return best


def mode_of(comparison: Comparison, mode: Mode) -> ModeResult:
    """The result of ``mode`` in ``comparison``."""
    return next(r for r in comparison.results if r.mode is mode)


def headline(
    baselines: dict[str, Any], comparisons: dict[str, Any], stage: list[dict[str, Any]]
) -> dict[str, Any]:
    """The figures the issue asks for, with their inputs."""
    cores = os.cpu_count() or 1
    wan: Comparison = comparisons["wan"]
    download = baselines["download_only_wan"]
    processing = baselines["processing_only"]
    floor = max(download["wall_s"], (download["cpu_s"] + processing["cpu_s"]) / cores)
    same_setting = [
        row["wall_s"]
        for row in comparisons["sweep"]
        if (row["threads"], row["procs"]) == (MAIN_THREADS, MAIN_PROCS)
    ]
    pipeline = min([mode_of(wan, Mode.PIPELINE).summary.wall_s, *same_setting])
    sequential = mode_of(wan, Mode.SEQUENTIAL).summary.wall_s
    one_worker = max(row["images_per_s"] for row in stage if row["procs"] == 1)
    two_workers = stage[-1]["images_per_s"] / stage[-1]["procs"]
    return {
        "pipeline_runs_wall_s": [
            round(mode_of(wan, Mode.PIPELINE).summary.wall_s, 3),
            *same_setting,
        ],
        "floor_s": floor,
        "pipeline_wall_s": pipeline,
        "pipeline_efficiency": floor / pipeline,
        "stage_images_per_s_per_worker_1proc": one_worker,
        "stage_images_per_s_per_worker_2procs": two_workers,
        "bare_pillow_images_per_s": baselines["bare_pillow"]["images_per_s"],
        "transform_loop_images_per_s": processing["images_per_s"],
        "processing_stage_efficiency_vs_bare": one_worker
        / baselines["bare_pillow"]["images_per_s"],
        "processing_stage_efficiency_vs_transform_loop": one_worker
        / processing["images_per_s"],
        "speedup_pipeline_over_sequential_wan": sequential / pipeline,
    }


def run(plan: Plan) -> int:
    """Every step of the benchmark; returns the exit code."""
    begun = time.perf_counter()
    folder = corpus(plan)
    paths = images_of(folder)
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        # Other work on the machine slows runs down: the load says how busy it was.
        "load_average_at_start": os.getloadavg(),
        "gil_enabled": gil_enabled(),
        "corpus": corpus_facts(paths),
        "task": {"max_size": TASK.max_size, "format": "jpeg", "quality": TASK.quality},
        "wan": {"latency_s": WAN_LATENCY_S, "bandwidth_bytes_per_s": WAN_BANDWIDTH},
    }
    say("baselines: processing-only and bare Pillow loops, one process")
    baselines: dict[str, Any] = {
        "processing_only": best_of(
            plan, lambda: processing_only(paths, WORK / "processing-only")
        ),
        "bare_pillow": best_of(plan, lambda: bare_pillow(paths, draft_factor=2)),
        "bare_pillow_draft_to_box": best_of(
            plan, lambda: bare_pillow(paths, draft_factor=1)
        ),
    }
    comparisons = run_comparisons(plan, folder, baselines)
    stage = processing_stage(plan, folder)
    memory = memory_runs(plan)
    write_json(plan, "baselines", baselines)
    figures = headline(baselines, comparisons, stage)
    meta["total_s"] = round(time.perf_counter() - begun, 1)
    meta["load_average_at_end"] = os.getloadavg()
    write_json(plan, "summary", {"meta": meta, "headline": figures})
    print(render(meta, figures, baselines, comparisons, stage, memory))
    (plan.results / "table.md").write_text(
        render(meta, figures, baselines, comparisons, stage, memory) + "\n"
    )
    return 0


# ------------------------------------------------------------------ the table


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _mode_cells(row: dict[str, Any]) -> list[str]:
    speedup = row.get("speedup_vs_sequential")
    return [
        row["mode"],
        str(row["threads"] or "-"),
        str(row["procs"] or "-"),
        f"{row['wall_s']:.2f}",
        f"{row['images_per_s']:.1f}",
        f"{row['megabytes_per_s']:.1f}",
        f"{row['cpu_s']:.1f}",
        f"{row['cpu_percent']:.0f}",
        f"{row['peak_main_mb']:.0f} / {row['peak_worker_mb'] or 0:.0f}",
        "-" if speedup is None else f"{speedup:.2f}x",
    ]


_MODE_HEADER = [
    "mode",
    "threads",
    "procs",
    "wall s",
    "images/s",
    "MB/s",
    "CPU s",
    "CPU %",
    "peak MB main / worker",
    "vs sequential",
]


def render(
    meta: dict[str, Any],
    figures: dict[str, Any],
    baselines: dict[str, Any],
    comparisons: dict[str, Any],
    stage: list[dict[str, Any]],
    memory: list[dict[str, Any]],
) -> str:
    """The markdown report of one benchmark run."""
    facts = meta["corpus"]
    lines = [
        f"Measured {meta['date']} with `{meta['command']}` on {meta['cores']} cores "
        f"({meta['platform']}, Python {meta['python']}, GIL "
        f"{'enabled' if meta['gil_enabled'] else 'disabled'}); corpus "
        f"{facts['images']} images, {facts['bytes'] / 1e6:.0f} MB, "
        f"{facts['min_megapixels']}-{facts['max_megapixels']} MP (median "
        f"{facts['median_megapixels']}); load average at start "
        f"{meta['load_average_at_start'][0]:.2f}, at end "
        f"{meta['load_average_at_end'][0]:.2f}; task: fit within {TASK.max_size} "
        f"px, JPEG q{TASK.quality}. `wan` = {WAN_LATENCY_S * 1000:.0f} ms per "
        f"request + {WAN_BANDWIDTH * 8 / 1e6:.0f} Mbit/s per connection; "
        "`fast` = no added latency, sendfile.",
        "",
    ]
    lines += _table(
        ["figure", "measured", "target"],
        [
            [
                "pipeline efficiency: floor ÷ pipeline wall (wan, 16 threads, 2 procs)",
                f"{figures['pipeline_efficiency']:.2f} (floor "
                f"{figures['floor_s']:.1f} s, pipeline "
                f"{figures['pipeline_wall_s']:.1f} s, best of "
                f"{', '.join(f'{w:.1f}' for w in figures['pipeline_runs_wall_s'])})",
                "≥ 0.85",
            ],
            [
                "processing-stage efficiency: images/s of one worker ÷ bare Pillow "
                "loop (same draft scale, Lanczos, q85)",
                f"{figures['processing_stage_efficiency_vs_bare']:.2f} "
                f"({figures['stage_images_per_s_per_worker_1proc']:.1f} vs "
                f"{figures['bare_pillow_images_per_s']:.1f} images/s)",
                "≥ 0.9",
            ],
            [
                "... the same ÷ the tool's transform_file in a plain loop",
                f"{figures['processing_stage_efficiency_vs_transform_loop']:.2f} "
                f"({figures['transform_loop_images_per_s']:.1f} images/s)",
                "",
            ],
            [
                "speed-up pipeline ÷ sequential (wan, 16 threads, 2 procs)",
                f"{figures['speedup_pipeline_over_sequential_wan']:.1f}x",
                "≥ 5x",
            ],
        ],
    )
    for setting in ("fast", "wan"):
        lines += ["", f"All modes, `{setting}` server, --threads 16 --procs 2:", ""]
        lines += _table(
            [*_MODE_HEADER, "outputs"],
            [
                [*_mode_cells(r), "match" if r["outputs_match"] else "DIFFER"]
                for r in rows_of(comparisons[setting])
            ],
        )
    lines += ["", "Pipeline at several --threads/--procs, `wan` server:", ""]
    lines += _table(_MODE_HEADER, [_mode_cells(r) for r in comparisons["sweep"]])
    lines += ["", "Processing stage alone (pipeline on local files, no download):", ""]
    lines += _table(_MODE_HEADER, [_mode_cells(r) for r in stage])
    lines += ["", "Baselines (one process, same files):", ""]
    lines += _table(
        ["baseline", "wall s (best)", "CPU s", "images/s", "every run, wall s"],
        [
            [
                name,
                f"{b['wall_s']:.2f}",
                f"{b['cpu_s']:.2f}",
                f"{b['images_per_s']:.1f}" if "images_per_s" in b else "-",
                ", ".join(f"{w:.2f}" for w in b["runs_wall_s"]),
            ]
            for name, b in baselines.items()
        ],
    )
    lines += ["", "Peak memory of the pipeline vs list length (tiny images):", ""]
    lines += _table(
        ["items", "wall s", "peak MB main", "peak MB largest worker", "peak MB total"],
        [
            [
                str(r["items"]),
                f"{r['wall_s']:.1f}",
                f"{r['peak_main_mb']:.0f}",
                f"{r['peak_worker_mb'] or 0:.0f}",
                f"{r['peak_total_mb'] or 0:.0f}",
            ]
            for r in memory
        ],
    )
    return "\n".join(lines)


def main() -> int:
    """Run the benchmark and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument(
        "--memory-child", nargs=2, metavar=("BASE_URL", "COUNT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child[0], int(args.memory_child[1]))
    return run(QUICK if args.quick else FULL)


if __name__ == "__main__":
    raise SystemExit(main())
