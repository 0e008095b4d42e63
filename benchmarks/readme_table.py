"""Print the README's benchmark tables from the committed raw results.

    python benchmarks/readme_table.py

Reads ``benchmarks/results/summary.json``, ``comparison-wan.json`` and ``memory.json``
(written by ``benchmarks/run.py``) and prints the two markdown tables that the README's
"Benchmark" section shows, so the README is regenerated, never retyped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> Any:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def headline_table(summary: dict[str, Any], memory: list[dict[str, Any]]) -> str:
    """The figures the issue asks for, with their targets."""
    figures = summary["headline"]
    small, large = memory[0], memory[-1]
    rows = [
        (
            "pipeline efficiency: floor ÷ pipeline wall time (`wan`, 16 threads, "
            "2 procs); floor = (download CPU + processing CPU) ÷ cores",
            f"**{figures['pipeline_efficiency']:.2f}** (floor "
            f"{figures['floor_s']:.1f} s, pipeline {figures['pipeline_wall_s']:.1f} s)",
            "≥ 0.85",
        ),
        (
            "processing-stage efficiency: images/s of one worker ÷ a bare Pillow "
            "loop doing the same transform in one process",
            f"**{figures['processing_stage_efficiency_vs_bare']:.2f}** "
            f"({figures['stage_images_per_s_per_worker_1proc']:.1f} vs "
            f"{figures['bare_pillow_images_per_s']:.1f} images/s)",
            "≥ 0.9",
        ),
        (
            "speed-up of `pipeline` over `sequential` (`wan`, 16 threads, 2 procs)",
            f"**{figures['speedup_pipeline_over_sequential_wan']:.1f}x**",
            "≥ 5x",
        ),
        (
            "peak memory, main process / largest worker, at "
            f"{small['items']:,} and at {large['items']:,} items",
            f"{small['peak_main_mb']:.0f} / {small['peak_worker_mb']:.0f} MB and "
            f"{large['peak_main_mb']:.0f} / {large['peak_worker_mb']:.0f} MB",
            "flat",
        ),
    ]
    lines = ["| figure | measured | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def modes_table(comparison: dict[str, Any]) -> str:
    """Every mode on the `wan` server."""
    cores = comparison["cores"]
    lines = [
        f"| mode | wall s | images/s | MB/s | CPU % of {cores} cores | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {mode['mode']} | {mode['wall_s']:.2f} | {mode['images_per_s']:.1f} | "
        f"{mode['megabytes_per_s']:.1f} | {mode['cpu_percent']:.0f} | "
        f"{mode['speedup_vs_sequential']:.1f}x |"
        for mode in comparison["modes"]
    ]
    return "\n".join(lines)


def main() -> None:
    """Print both tables."""
    print(headline_table(_load("summary"), _load("memory")))
    print()
    print(modes_table(_load("comparison-wan")))


if __name__ == "__main__":
    main()
