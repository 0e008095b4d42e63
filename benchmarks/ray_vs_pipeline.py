"""``--mode ray`` against the pipeline on the benchmark corpus at 100 ms latency.

Usage (after ``pip install -e '.[ray]'``)::

    python benchmarks/ray_vs_pipeline.py                # 320 images, as run.py
    python benchmarks/ray_vs_pipeline.py --images 96    # a smaller corpus

The corpus and the ``wan`` server are ``run.py``'s (generated once, cached under
``benchmarks/.work``; 100 ms per request, 100 Mbit/s per connection). A local Ray
(all this machine's CPUs, 127.0.0.1) is started first and its start-up timed on its
own; then the two modes run in turn (``--repeat`` times each, best wall time
counts) through ``compare.run_mode``, as ``--compare`` runs them, with the same
settings: ``--threads 16 --procs 2`` (in ray mode the threads are per task, one task
per CPU). Writes ``results/ray-vs-pipeline-<images>.json`` and prints a small table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import run as bench  # benchmarks/run.py, beside this file

from downloader.compare import run_mode
from downloader.demo import DemoServer
from downloader.ray_mode import connected
from downloader.report import ModeResult
from downloader.runtime import Cancellation
from downloader.settings import Mode


def main() -> int:
    """Run both modes on the corpus; print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=bench.FULL.images)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    plan = dataclasses.replace(bench.FULL, images=args.images)
    folder = bench.corpus(plan)
    out = bench.WORK / "out" / "ray-vs-pipeline"
    settings = bench.settings_for(out, bench.MAIN_THREADS, bench.MAIN_PROCS)
    load_start = os.getloadavg()
    begun = time.perf_counter()
    with connected(settings) as ray:
        startup_s = time.perf_counter() - begun
        cpus = int(ray.cluster_resources().get("CPU", 0))
        bench.say(f"Ray ready in {startup_s:.1f} s ({cpus} CPUs)")
        # run_mode runs each mode in a process of its own: the ray one joins this
        # Ray (before its clock starts) instead of starting another.
        joining = dataclasses.replace(
            settings, ray_address=ray.get_runtime_context().gcs_address
        )
        best: dict[Mode, ModeResult] = {}
        with DemoServer(
            folder, latency=bench.WAN_LATENCY_S, bandwidth=bench.WAN_BANDWIDTH
        ) as server:
            urls = server.urls()
            for round_number in range(args.repeat):
                for mode in (Mode.PIPELINE, Mode.RAY):
                    bench.say(f"round {round_number + 1}: {mode.value}")
                    result = run_mode(urls, joining, mode, cancel=Cancellation())
                    kept = best.get(mode)
                    if kept is None or result.summary.wall_s < kept.summary.wall_s:
                        best[mode] = result
    pipeline, ray_result = best[Mode.PIPELINE], best[Mode.RAY]
    ratio = ray_result.summary.images_per_s / pipeline.summary.images_per_s
    report = {
        "command": " ".join(["python", "benchmarks/ray_vs_pipeline.py", *sys.argv[1:]]),
        "images": args.images,
        "cores": os.cpu_count(),
        "ray_cpus": cpus,
        "threads": bench.MAIN_THREADS,
        "procs": bench.MAIN_PROCS,
        "ray_startup_s": round(startup_s, 1),
        "pipeline": bench.run_figures(pipeline),
        "ray": bench.run_figures(ray_result),
        "ray_over_pipeline_images_per_s": round(ratio, 2),
        # Other work on the machine slows runs down: the load says how busy it was.
        "load_average": {"start": load_start, "end": os.getloadavg()},
    }
    results = bench.HERE / "results"
    results.mkdir(exist_ok=True)
    path = results / f"ray-vs-pipeline-{args.images}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print("| mode | wall s | images/s | CPU s |")
    print("|---|---|---|---|")
    for name in ("pipeline", "ray"):
        row = report[name]
        assert isinstance(row, dict)
        print(f"| {name} | {row['wall_s']} | {row['images_per_s']} | {row['cpu_s']} |")
    print(f"ray / pipeline images/s: {ratio:.2f}; Ray start-up {startup_s:.1f} s")
    bench.say(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
