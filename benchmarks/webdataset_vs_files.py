"""``--output-format webdataset`` against ``files``: images/s, side by side.

Usage::

    python benchmarks/webdataset_vs_files.py                  # 96 photos, 2 rounds
    python benchmarks/webdataset_vs_files.py --images 320 --repeat 3

The corpus is ``run.py``'s (1-12 MP photos, generated once, cached under
``benchmarks/.work``), served by the demo server without added latency (``fast``),
so that the main process's extra work (appending every output to its shard, a
rename and an fsync per shard) shows rather than hides behind the network. The two
formats run in turn, each round, in the pipeline mode with ``--threads 16 --procs 2``
and ``run.py``'s task (fit within 512 px, JPEG q85), each in a fresh process of its
own and from scratch (``compare.run_mode``, as ``--compare`` runs a mode); the best
wall time of each counts. Writes ``results/webdataset-vs-files-<images>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import run as bench  # benchmarks/run.py, beside this file

from downloader.compare import run_mode
from downloader.demo import DemoServer
from downloader.report import ModeResult
from downloader.runtime import Cancellation
from downloader.settings import Mode, OutputFormat


def main() -> int:
    """Run both formats on the corpus; print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    plan = dataclasses.replace(bench.FULL, images=args.images)
    folder = bench.corpus(plan)
    load_start = os.getloadavg()
    best: dict[OutputFormat, ModeResult] = {}
    with DemoServer(folder, latency=0.0) as server:
        urls = server.urls()
        for round_number in range(args.repeat):
            for output_format in OutputFormat:
                out = bench.WORK / "out" / f"format-{output_format.value}"
                settings = dataclasses.replace(
                    bench.settings_for(out, bench.MAIN_THREADS, bench.MAIN_PROCS),
                    output_format=output_format,
                    shard_size=args.shard_size,
                )
                bench.say(f"round {round_number + 1}: {output_format.value}")
                result = run_mode(urls, settings, Mode.PIPELINE, cancel=Cancellation())
                kept = best.get(output_format)
                if kept is None or result.summary.wall_s < kept.summary.wall_s:
                    best[output_format] = result
    files, shards = best[OutputFormat.FILES], best[OutputFormat.WEBDATASET]
    ratio = shards.summary.images_per_s / files.summary.images_per_s
    data = {
        "images": args.images,
        "repeat": args.repeat,
        "shard_size": args.shard_size,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "files": bench.run_figures(files),
        "webdataset": bench.run_figures(shards),
        "webdataset_over_files": round(ratio, 3),
    }
    bench.write_json(plan, f"webdataset-vs-files-{args.images}", data)
    print("| format | wall s | images/s | CPU s |")
    print("|---|---|---|---|")
    for name in ("files", "webdataset"):
        row = data[name]
        assert isinstance(row, dict)
        print(f"| {name} | {row['wall_s']} | {row['images_per_s']} | {row['cpu_s']} |")
    print(
        f"webdataset / files: {ratio:.2f} (load average {load_start[0]:.1f} at start)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
