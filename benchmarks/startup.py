"""Start-up: seconds from launching the command to its first request at the server.

Usage (from a fresh clone, after ``pip install -e .``)::

    python benchmarks/startup.py                 # this tool, 5 launches per mode
    python benchmarks/startup.py --reference     # img2dataset too (reference.py's venv)

A loopback server in this process (127.0.0.1, an ephemeral port) notes the arrival
time of each request and answers a small JPEG. Each launch is ``python cli.py LIST
--out X`` (fresh output folder, no config) run by ``subprocess``; the clock starts
just before the launch, so interpreter start-up, imports, settings, the manifest,
worker processes and the first connection all count, and the launch is stopped
(Ctrl-C) once its first request has arrived. Also timed: ``import
downloader.cli`` alone in a fresh interpreter. Writes ``results/startup.json`` and
prints a table (best and median of the launches; the machine's load beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.server
import io
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import reference as ref  # benchmarks/reference.py, beside this file
import run as bench  # benchmarks/run.py, beside this file
from PIL import Image

ROOT = bench.HERE.parent
URLS = 8
WAIT_S = 120.0
STOP_GRACE_S = 30.0
MODES = ("pipeline", "threads", "processes", "sequential", "async")


class FirstRequestServer(http.server.ThreadingHTTPServer):
    """Answers every GET with one small JPEG; notes when the first request came."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (120, 90, 60)).save(buffer, "JPEG")
        self.body = buffer.getvalue()
        self.first: float | None = None
        self.arrived = threading.Event()

    def note(self) -> None:
        """Note the first arrival since ``reset``."""
        if self.first is None:
            self.first = time.perf_counter()
            self.arrived.set()

    def reset(self) -> None:
        """Forget the last launch's first request."""
        self.first = None
        self.arrived.clear()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FirstRequestServer

    def do_GET(self) -> None:
        self.server.note()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the launches' timing is what matters."""


def launch(server: FirstRequestServer, command: list[str], out: Path) -> float:
    """Seconds from launching ``command`` to its first request.

    The launch is stopped then (Ctrl-C to its process group, as a terminal sends it,
    then SIGKILL if it lingers): only its start-up is measured.
    """
    shutil.rmtree(out, ignore_errors=True)
    server.reset()
    env = ref.child_env()
    begun = time.perf_counter()
    child = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        if not server.arrived.wait(WAIT_S):
            raise RuntimeError(f"no request within {WAIT_S} s from {command}")
        first = server.first
        assert first is not None
        return first - begun
    finally:
        _stop(child)


def _stop(child: subprocess.Popen[bytes]) -> None:
    """End a launch and everything it started (its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def import_seconds(clock: str = "perf_counter") -> float:
    """Seconds ``import downloader.cli`` takes in a fresh interpreter, by ``clock``
    (``process_time``: its CPU seconds, which other work on the machine barely
    changes)."""
    code = f"import time; t = time.{clock}(); import downloader.cli; "
    code += f"print(time.{clock}() - t)"
    env = ref.child_env()
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return float(done.stdout)


def summary(seconds: list[float]) -> dict[str, Any]:
    """Best, median and every launch."""
    return {
        "best_s": min(seconds),
        "median_s": statistics.median(seconds),
        "runs_s": [round(s, 3) for s in seconds],
    }


def measure(launches: int, reference: bool) -> dict[str, Any]:
    """Every mode's first-request time (and img2dataset's), ``launches`` each."""
    work = bench.WORK / "startup"
    work.mkdir(parents=True, exist_ok=True)
    server = FirstRequestServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    listing = work / "urls.txt"
    base = f"http://127.0.0.1:{server.server_address[1]}"
    listing.write_text("".join(f"{base}/img-{i}.jpg\n" for i in range(URLS)))
    found: dict[str, Any] = {}
    try:
        import_seconds()  # not counted: writes the bytecode, as pip install does
        found["import_downloader_cli"] = summary(
            [import_seconds() for _ in range(launches)]
        )
        found["import_downloader_cli_cpu"] = summary(
            [import_seconds("process_time") for _ in range(launches)]
        )
        for mode in MODES:
            bench.say(f"start-up: --mode {mode}, {launches} launches")
            out = work / f"out-{mode}"
            command = [sys.executable, str(ROOT / "cli.py"), str(listing)]
            command += ["--out", str(out), "--no-config", "--mode", mode]
            found[mode] = summary(
                [launch(server, command, out) for _ in range(launches)]
            )
        if reference:
            bench.say(f"start-up: img2dataset, {launches} launches")
            out = work / "out-img2dataset"
            command = [str(ref.reference_python()), "-m", "img2dataset.main"]
            command += ["--url_list", str(listing), "--output_folder", str(out)]
            command += ["--processes_count", str(os.cpu_count() or 1)]
            command += ["--enable_wandb", "False", "--output_format", "files"]
            launch(server, command, out)  # not counted: its bytecode
            found["img2dataset"] = summary(
                [launch(server, command, out) for _ in range(launches)]
            )
    finally:
        server.shutdown()
        server.server_close()
    return found


def main() -> int:
    """Measure, write ``results/startup.json``, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=5)
    parser.add_argument(
        "--reference", action="store_true", help="img2dataset's start-up too"
    )
    args = parser.parse_args()
    load_before = os.getloadavg()
    found = measure(args.launches, args.reference)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/startup.py", *sys.argv[1:]]),
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "seconds_to_first_request": found,
    }
    bench.write_json(bench.FULL, "startup", result)
    print(f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    print("| launch | first request, best s | median s | every launch, s |")
    print("|---|---|---|---|")
    for name, row in found.items():
        runs = ", ".join(f"{s:.2f}" for s in row["runs_s"])
        print(f"| {name} | {row['best_s']:.2f} | {row['median_s']:.2f} | {runs} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
