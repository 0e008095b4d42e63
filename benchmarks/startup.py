"""Start-up: seconds from launching the command to its first request at the server.

Usage (from a fresh clone, after ``pip install -e .``)::

    python benchmarks/startup.py                 # this tool, 5 launches per mode
    python benchmarks/startup.py --reference     # img2dataset too (reference.py's venv)
    python benchmarks/startup.py --trees /tmp/old .  # two checkouts, alternated

A loopback server in this process (127.0.0.1, an ephemeral port) notes the arrival
time of each request and answers a small JPEG. Each launch is ``python cli.py LIST
--out X`` (fresh output folder, no config) run by ``subprocess``: first as typed, with
no ``--mode`` (the default), then with each ``--mode``. The clock starts just before
the launch, so interpreter start-up, imports, settings, the manifest, worker processes
and the first connection all count, and the launch is stopped (Ctrl-C) once its first
request has arrived. When it arrives, the server also adds up the CPU seconds of
every process of the launch (its session: the main process, the forkserver, workers,
and the children they reaped), which other work on the machine barely changes, unlike
the wall time. Also timed: ``import downloader.cli`` alone in a fresh interpreter.

With ``--trees``, each tree (a checkout of this project, e.g. ``git archive REV | tar
-x -C /tmp/old``) is launched in turn for every launch of every mode, so that a change
of load hits both alike. Writes ``results/startup.json`` and prints a table (best and
median of the launches, median CPU; the machine's load beside it).
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
MODES = (None, "pipeline", "threads", "processes", "sequential", "async")
"""None: the command as typed, without ``--mode`` (the pipeline, by default)."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def session_cpu_s(session: int) -> float:
    """CPU seconds of every live process of ``session``, with the children each has
    reaped (Linux ``/proc``)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the command's ")": state is 3rd, session 6th, utime,
            # stime, cutime, cstime 14th to 17th (proc(5)).
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[3]) == session:
            ticks += sum(int(field) for field in fields[11:15])
    return ticks / CLOCK_TICKS


class FirstRequestServer(http.server.ThreadingHTTPServer):
    """Answers every GET with one small JPEG; notes when the first request came, and
    the CPU the launch had used by then."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (120, 90, 60)).save(buffer, "JPEG")
        self.body = buffer.getvalue()
        self.first: float | None = None
        self.cpu_s: float | None = None
        self.session: int | None = None
        self.arrived = threading.Event()
        self._lock = threading.Lock()

    def note(self) -> None:
        """Note the first arrival since ``reset``, and the launch's CPU then."""
        with self._lock:
            if self.first is not None:
                return
            self.first = time.perf_counter()
            if self.session is not None:
                self.cpu_s = session_cpu_s(self.session)
            self.arrived.set()

    def reset(self) -> None:
        """Forget the last launch's first request."""
        with self._lock:
            self.first = self.cpu_s = self.session = None
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


def tree_env(tree: Path) -> dict[str, str]:
    """A timed launch's environment (``reference.child_env``) importing ``tree``."""
    return {**ref.child_env(), "PYTHONPATH": str(tree)}


def launch(
    server: FirstRequestServer, command: list[str], out: Path, tree: Path = ROOT
) -> tuple[float, float]:
    """Seconds from launching ``command`` to its first request, and its CPU seconds
    by then (every process of the launch).

    The launch is stopped then (Ctrl-C to its process group, as a terminal sends it,
    then SIGKILL if it lingers): only its start-up is measured.
    """
    shutil.rmtree(out, ignore_errors=True)
    server.reset()
    env = tree_env(tree)
    begun = time.perf_counter()
    child = subprocess.Popen(
        command,
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    server.session = child.pid  # its session's id (start_new_session)
    try:
        if not server.arrived.wait(WAIT_S):
            raise RuntimeError(f"no request within {WAIT_S} s from {command}")
        first, cpu_s = server.first, server.cpu_s
        assert first is not None
        return first - begun, float("nan") if cpu_s is None else cpu_s
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


def import_seconds(tree: Path = ROOT, clock: str = "perf_counter") -> float:
    """Seconds ``import downloader.cli`` takes in a fresh interpreter, by ``clock``
    (``process_time``: its CPU seconds, which other work on the machine barely
    changes)."""
    code = f"import time; t = time.{clock}(); import downloader.cli; "
    code += f"print(time.{clock}() - t)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tree,  # ``-c`` puts the working folder first on sys.path: the tree's
        env=tree_env(tree),
        check=True,
    )
    return float(done.stdout)


def summary(seconds: list[float], cpu: list[float] | None = None) -> dict[str, Any]:
    """Best, median and every launch; the median CPU seconds and each, if given."""
    row: dict[str, Any] = {
        "best_s": min(seconds),
        "median_s": statistics.median(seconds),
        "runs_s": [round(s, 3) for s in seconds],
    }
    if cpu is not None:
        row["cpu_median_s"] = statistics.median(cpu)
        row["cpu_runs_s"] = [round(s, 3) for s in cpu]
    return row


def _write_bytecode(tree: Path) -> None:
    """Compile the tree's package once, as ``pip install`` does (not timed)."""
    compile_all = [sys.executable, "-m", "compileall", "-q", str(tree / "downloader")]
    subprocess.run(compile_all, check=True, stdout=subprocess.DEVNULL)


def _imports(trees: list[Path], launches: int) -> dict[str, dict[str, Any]]:
    """``import downloader.cli`` in each tree, alternated: wall and CPU seconds."""
    wall: dict[Path, list[float]] = {tree: [] for tree in trees}
    cpu: dict[Path, list[float]] = {tree: [] for tree in trees}
    for _ in range(launches):
        for tree in trees:
            wall[tree].append(import_seconds(tree))
            cpu[tree].append(import_seconds(tree, "process_time"))
    return {str(tree): summary(wall[tree], cpu[tree]) for tree in trees}


def _mode_launches(
    server: FirstRequestServer,
    listing: Path,
    work: Path,
    trees: list[Path],
    mode: str | None,
    launches: int,
) -> dict[str, dict[str, Any]]:
    """One mode's launches in each tree, alternated, after one uncounted each."""
    name = mode or "default"
    bench.say(f"start-up: {name}, {launches} launches x {len(trees)} trees")
    out = work / f"out-{name}"
    runs: dict[Path, list[tuple[float, float]]] = {tree: [] for tree in trees}
    for count in range(launches + 1):
        for tree in trees:
            command = [sys.executable, str(tree / "cli.py"), str(listing)]
            command += ["--out", str(out), "--no-config"]
            command += [] if mode is None else ["--mode", mode]
            timed = launch(server, command, out, tree)
            if count:  # the first warms the disk cache and the forkserver's imports
                runs[tree].append(timed)
    return {
        str(tree): summary([w for w, _ in runs[tree]], [c for _, c in runs[tree]])
        for tree in trees
    }


def measure(
    launches: int,
    reference: bool,
    trees: list[Path],
    modes: tuple[str | None, ...] = MODES,
) -> dict[str, Any]:
    """Every mode's first-request time (and img2dataset's), ``launches`` each,
    keyed by row, then by tree."""
    work = bench.WORK / "startup"
    work.mkdir(parents=True, exist_ok=True)
    server = FirstRequestServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    listing = work / "urls.txt"
    base = f"http://127.0.0.1:{server.server_address[1]}"
    listing.write_text("".join(f"{base}/img-{i}.jpg\n" for i in range(URLS)))
    found: dict[str, Any] = {}
    try:
        for tree in trees:
            _write_bytecode(tree)
            import_seconds(tree)  # not counted: warms the disk cache
        found["import_downloader_cli"] = _imports(trees, launches)
        for mode in modes:
            found[mode or "default"] = _mode_launches(
                server, listing, work, trees, mode, launches
            )
        if reference:
            bench.say(f"start-up: img2dataset, {launches} launches")
            out = work / "out-img2dataset"
            command = [str(ref.reference_python()), "-m", "img2dataset.main"]
            command += ["--url_list", str(listing), "--output_folder", str(out)]
            command += ["--processes_count", str(os.cpu_count() or 1)]
            command += ["--enable_wandb", "False", "--output_format", "files"]
            launch(server, command, out)  # not counted: its bytecode
            timed = [launch(server, command, out) for _ in range(launches)]
            found["img2dataset"] = {
                "img2dataset": summary([w for w, _ in timed], [c for _, c in timed])
            }
    finally:
        server.shutdown()
        server.server_close()
    return found


def print_table(found: dict[str, Any]) -> None:
    """The markdown table of ``found`` (rows by launch, then tree)."""
    print(
        "| launch | tree | first request, best s | median s | CPU s, median |", end=""
    )
    print(" every launch, s (CPU s) |")
    print("|---|---|---|---|---|---|")
    for name, by_tree in found.items():
        for tree, row in by_tree.items():
            cpu = row.get("cpu_runs_s", [float("nan")] * len(row["runs_s"]))
            runs = ", ".join(
                f"{s:.2f} ({c:.2f})" for s, c in zip(row["runs_s"], cpu, strict=True)
            )
            print(
                f"| {name} | {tree} | {row['best_s']:.2f} | {row['median_s']:.2f} "
                f"| {row.get('cpu_median_s', float('nan')):.2f} | {runs} |"
            )


def main() -> int:
    """Measure, write ``results/startup.json``, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=5)
    parser.add_argument(
        "--reference", action="store_true", help="img2dataset's start-up too"
    )
    parser.add_argument(
        "--trees",
        nargs="+",
        type=Path,
        default=[ROOT],
        help="checkouts to launch, alternated (default: this one)",
    )
    parser.add_argument(
        "--modes",
        type=lambda text: tuple(None if m == "default" else m for m in text.split(",")),
        default=MODES,
        help="launches to time, comma-separated (default: default and every mode)",
    )
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.trees]
    load_before = os.getloadavg()
    found = measure(args.launches, args.reference, trees, args.modes)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/startup.py", *sys.argv[1:]]),
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "trees": [str(tree) for tree in trees],
        "seconds_to_first_request": found,
    }
    bench.write_json(bench.FULL, "startup", result)
    print(f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    print_table(found)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
