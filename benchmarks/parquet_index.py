"""What does ``--parquet`` cost at the end of a run, and does its memory stay flat?

Writes a manifest of N records shaped like a real run's (ok records with every field,
one in ten failed, CSV-style extras on all and a JSON list on some) into a temporary
folder, then runs ``python cli.py --parquet-only --out DIR`` on it, in a process of its
own for each N, and prints the rows, the wall time, the process's CPU time (user and
system: on a busy machine a steadier figure than the wall time), the index's size and
the process's peak memory (``ru_maxrss``)::

    python benchmarks/parquet_index.py                  # 100,000 and 300,000 records
    python benchmarks/parquet_index.py --records 1000000
    python benchmarks/parquet_index.py --records 40000 --extra-bytes 20000

Flat memory means the peak does not grow with N: the index is written a batch of
``BATCH_ROWS`` rows (or ``BATCH_BYTES`` of their JSON text) at a time.
``--extra-bytes B`` adds a column of B bytes of text to every record's ``extra``
(a list with long descriptions): wide rows, where the byte budget ends the batches.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _record(number: int, extra_bytes: int = 0) -> dict[str, object]:
    url = f"https://images.example.org/photos/{number // 1000}/photo-{number}.jpg"
    extra: dict[str, object] = {"caption": f"a photo, number {number}", "licence": "CC"}
    if extra_bytes:
        extra["description"] = (f"{number} " * extra_bytes)[:extra_bytes]
    if number % 3 == 0:
        extra["tags"] = ["outdoor", number % 7]
    if number % 10 == 9:
        return {
            "url": url,
            "status": "failed",
            "line": number + 2,
            "error": "HTTP 404",
            "stage": "download",
            "http_status": 404,
            "attempts": 1,
            "download_s": 0.0412,
            "extra": extra,
        }
    return {
        "url": url,
        "status": "ok",
        "line": number + 2,
        "path": f"photo-{number}-{number:012x}.jpg",
        "bytes": 2_000_000 + number,
        "width": 1024,
        "height": 768,
        "sha256": f"{number:064x}",
        "final_url": url,
        "http_status": 200,
        "attempts": 1,
        "download_s": 0.3121,
        "transform_s": 0.0854,
        "extra": extra,
        "settings": "3f2a9c0d5e6b7a81",
    }


def _write_manifest(folder: Path, records: int, extra_bytes: int) -> int:
    with (folder / "manifest.jsonl").open("w", encoding="utf-8") as file:
        for number in range(records):
            record = _record(number, extra_bytes)
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    return (folder / "manifest.jsonl").stat().st_size


def _measure(records: int, extra_bytes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        size = _write_manifest(Path(folder), records, extra_bytes)
        command = [sys.executable, str(ROOT / "cli.py"), "--parquet-only"]
        started = time.perf_counter()
        subprocess.run(
            [*command, "--out", folder, "--no-config", "-q"], check=True, cwd=ROOT
        )
        wall = time.perf_counter() - started
        index = (Path(folder) / "manifest.parquet").stat().st_size
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "records": records,
        "manifest_mb": size / 1e6,
        "wall_s": wall,
        "index_mb": index / 1e6,
        "peak_mb": usage.ru_maxrss / 1024,
    }


def main() -> None:
    """Measure each N in a process of its own; print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, action="append")
    parser.add_argument(
        "--extra-bytes",
        type=int,
        default=0,
        help="bytes of text added to each record's extra (default: 0)",
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is None:
        # RUSAGE_CHILDREN's peak is the largest child's so far: one process per N.
        for records in args.records or [100_000, 300_000]:
            one = ["--one", str(records), "--extra-bytes", str(args.extra_bytes)]
            subprocess.run([sys.executable, __file__, *one], check=True)
        return
    figures = _measure(args.one, args.extra_bytes)
    print(
        f"{figures['records']:,.0f} records ({figures['manifest_mb']:.0f} MB of "
        f"manifest): {figures['wall_s']:.1f} s, CPU {figures['cpu_s']:.1f} s "
        f"({figures['records'] / figures['cpu_s']:,.0f} rows per CPU second), "
        f"index {figures['index_mb']:.1f} MB, peak memory {figures['peak_mb']:.0f} MB"
    )


if __name__ == "__main__":
    main()
