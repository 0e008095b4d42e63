"""Does the main process stay flat while a very long list streams through?

Serves a few tiny images from the package's demo server (its own process), writes a list
of N unique URLs (the same files under distinct query strings, so each one is really
fetched and processed), runs the CLI on it as a subprocess and samples the main
process's resident memory (VmRSS) once a second, next to the number of manifest lines.

    python benchmarks/stream_memory.py --count 100000

Prints a markdown table. Run by hand; the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from downloader.demo import DemoServer, generate_corpus

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_EVERY_S = 1.0


def _rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


def main() -> None:
    """Run the measurement and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        corpus = work / "corpus"
        generate_corpus(corpus, 16, seed=3, min_megapixels=0.01, max_megapixels=0.02)
        names = sorted(p.name for p in corpus.iterdir() if p.name.startswith("img-"))
        with DemoServer(corpus, latency=0.0) as server:
            url_list = work / "urls.txt"
            with url_list.open("w") as handle:
                for number in range(args.count):
                    name = names[number % len(names)]
                    handle.write(f"{server.base_url}/{name}?n={number}\n")
            out = work / "out"
            command = [
                sys.executable, str(ROOT / "cli.py"), str(url_list), "--out", str(out),
                "--threads", str(args.threads), "--procs", str(args.procs),
                "--per-host", str(args.threads), "--max-size", "32", "--no-progress",
            ]  # fmt: skip
            started = time.monotonic()
            samples: list[tuple[float, int, float]] = []
            log = work / "stderr.txt"
            # stderr goes to a file: a pipe read only at the end would fill up and
            # block the child on its next write.
            with (
                log.open("w") as stderr,
                subprocess.Popen(command, stderr=stderr) as child,
            ):
                while child.poll() is None:
                    rss = _rss_mb(child.pid)
                    if rss is not None:
                        done = _lines(out / "manifest.jsonl")
                        samples.append((time.monotonic() - started, done, rss))
                    try:
                        child.wait(timeout=SAMPLE_EVERY_S)
                    except subprocess.TimeoutExpired:
                        continue
            summary = log.read_text()
            print(f"exit code {child.returncode}; stderr:\n{summary.strip()}")
    print("\n| elapsed s | manifest lines | main RSS MB |\n|---:|---:|---:|")
    step = max(1, len(samples) // 12)
    for elapsed, done, rss in [*samples[::step], samples[-1]]:
        print(f"| {elapsed:.0f} | {done} | {rss:.1f} |")


if __name__ == "__main__":
    main()
