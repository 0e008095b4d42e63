"""Scaling with cores: the pipeline against a bare Pillow loop at 1..N workers.

Usage (from a fresh clone, after ``pip install -e .``; meant for a 16-core machine)::

    python benchmarks/scaling.py --workers 1,2,4,8,16
    python benchmarks/scaling.py --workers 1,2 --images 48     # a smoke run

For each worker count W, on ``run.py``'s corpus (1-12 MP photo-like JPEGs and PNGs):

- **pipeline**: ``--mode pipeline --procs W`` over loopback, the demo server answering
  each request after 100 ms; ``--threads`` = max(16, 8 W) so that downloads keep W
  workers fed; the tool's own number of download processes unless
  ``--download-procs`` says; a fresh process of its own (``compare.run_mode``),
  timed from its first request to its last image (its start-up apart, as the bare
  loop's; images/s with the start-up included is printed beside it).
- **bare loop**: W processes doing the same transform from bytes already in memory
  (each process reads the corpus before the clock starts): the tool's own decode,
  resize and encode (``transform._render``), fit 512 px, JPEG q85, into memory. No
  download, no hand-over, no file written: what W cores can do at best.

It prints images/s of both and their ratio (target: ≥ 0.85 at 16 workers) and writes
``results/scaling-<cores>cores[-<N>dl].json``. At 16 workers the 320 photos take
seconds: ``--images 960`` gives a steadier figure (the corpus is rendered once, in
one process per core). Worker counts above the machine's cores are
run as asked, but say nothing about scaling.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import run as bench  # benchmarks/run.py, beside this file

from downloader import transform
from downloader.compare import run_mode
from downloader.demo import DemoServer
from downloader.runtime import Cancellation
from downloader.settings import Mode

LATENCY_S = 0.1
MIN_THREADS = 16
THREADS_PER_WORKER = 8

_BODIES: list[bytes] = []
"""The corpus in memory, in each bare-loop process (filled by ``_load``)."""


def _load(paths: list[Path]) -> None:
    """Pool initializer: read every file into this process's memory."""
    transform.configure_pillow(bench.TASK)
    _BODIES[:] = [path.read_bytes() for path in paths]


def _ready(_: int) -> int:
    """A no-op task: returns once the pool's processes have loaded the corpus."""
    return len(_BODIES)


def _transform(index: int) -> int:
    """The task's transform of one body, from memory to memory; the output bytes.

    The tool's own decode, resize and encode (``transform._render`` reads a file
    object as well as a path), so that the bare loop follows ``--resample`` and every
    change to the transform; what it leaves out is the download, the hand-over and
    the file written.
    """
    _, rendered = transform._render(io.BytesIO(_BODIES[index]), bench.TASK)  # type: ignore[arg-type]
    return len(rendered[0].data)


def bare_loop(paths: list[Path], workers: int) -> dict[str, Any]:
    """Images/s of ``workers`` processes transforming the corpus from memory."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_load, initargs=(paths,)) as pool:
        # Every process has loaded the corpus once each answers a ready task.
        pool.map(_ready, range(workers * 4), chunksize=1)
        begun = time.perf_counter()
        made = pool.map(_transform, range(len(paths)), chunksize=1)
        wall = time.perf_counter() - begun
    return {"wall_s": wall, "images_per_s": len(made) / wall}


def pipeline(
    urls: list[str], workers: int, out: Path, download_procs: int | None
) -> dict[str, Any]:
    """Images/s of the pipeline with ``workers`` worker processes over loopback.

    ``download_procs`` None keeps the tool's own choice (one download process per 8
    workers), which is what a user gets.
    """
    threads = max(MIN_THREADS, THREADS_PER_WORKER * workers)
    settings = dataclasses.replace(
        bench.settings_for(out, threads, workers), download_procs=download_procs
    )
    result = run_mode(urls, settings, Mode.PIPELINE, cancel=Cancellation())
    row = bench.result_row(result)
    # The bare loop's clock starts once its processes are up; this one's at the
    # first download, so that neither counts starting its processes.
    first = min(span.start for span in result.spans)
    last = max(span.end for span in result.spans)
    return {
        "wall_s": row["wall_s"],
        "images_per_s": row["images_per_s"],
        "first_request_s": round(first, 3),
        "steady_s": round(last - first, 3),
        "steady_images_per_s": round(result.summary.images / (last - first), 2),
        "threads": threads,
        "download_procs": settings.download_processes,
        "cpu_s": row["cpu_s"],
    }


def measure(
    images: int, workers: list[int], download_procs: int | None
) -> list[dict[str, Any]]:
    """One row per worker count: bare loop, then pipeline, and their ratio."""
    plan = bench.Plan(
        "scaling",
        images,
        bench.FULL.min_megapixels,
        bench.FULL.max_megapixels,
        sweep=(),
        memory_counts=(),
        results=bench.FULL.results,
        repeat=1,
    )
    folder = bench.corpus(plan)
    paths = bench.images_of(folder)
    rows = []
    with DemoServer(folder, latency=LATENCY_S) as server:
        urls = server.urls()
        for count in workers:
            bench.say(f"{count} workers: bare Pillow loop from memory")
            bare = bare_loop(paths, count)
            bench.say(f"{count} workers: pipeline over loopback at 100 ms")
            out = bench.WORK / "scaling" / f"w{count}"
            piped = pipeline(urls, count, out, download_procs)
            rows.append(
                {
                    "workers": count,
                    "bare_loop": bare,
                    "pipeline": piped,
                    "ratio": piped["steady_images_per_s"] / bare["images_per_s"],
                    "ratio_with_start": piped["images_per_s"] / bare["images_per_s"],
                    "load_average": os.getloadavg(),
                }
            )
    return rows


def print_table(results: list[dict[str, Any]]) -> None:
    """The table of one or more saved results (``--table``), a row per run."""
    print(
        "| workers | bare loop images/s | pipeline images/s | ratio "
        "| with its start | threads | download procs |"
    )
    print("|---|---|---|---|---|---|---|")
    for result in results:
        for row in result["rows"]:
            print(
                f"| {row['workers']} | {row['bare_loop']['images_per_s']:.1f} | "
                f"{row['pipeline']['steady_images_per_s']:.1f} | "
                f"{row['ratio']:.2f} | {row['pipeline']['images_per_s']:.1f} "
                f"({row['ratio_with_start']:.2f}) | {row['pipeline']['threads']} | "
                f"{row['pipeline']['download_procs']} |"
            )


def main() -> int:
    """Measure every worker count, write the JSON, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workers",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 2, 4, 8, 16],
        help="worker counts, comma-separated (default: 1,2,4,8,16)",
    )
    parser.add_argument("--images", type=int, default=bench.FULL.images)
    parser.add_argument(
        "--download-procs",
        type=int,
        default=None,
        help="the pipeline's download processes (default: the tool's own choice)",
    )
    parser.add_argument(
        "--table",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="print the table of saved results instead of measuring",
    )
    args = parser.parse_args()
    if args.table:
        print_table([json.loads(path.read_text()) for path in args.table])
        return 0
    cores = os.cpu_count() or 1
    load = os.getloadavg()
    rows = measure(args.images, args.workers, args.download_procs)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]]),
        "cores": cores,
        "platform": platform.platform(),
        "images": args.images,
        "load_average_at_start": load,
        "rows": rows,
    }
    name = f"scaling-{cores}cores"
    if args.download_procs is not None:
        name += f"-{args.download_procs}dl"
    bench.write_json(bench.FULL, name, result)
    print(f"{cores} cores, {args.images} images, load average {load[0]:.2f} at start\n")
    print_table([result])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
