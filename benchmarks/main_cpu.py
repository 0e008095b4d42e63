"""Main-process CPU per image: what the coordinating process spends on each URL.

The workers' CPU is the image work; the main process (download threads, the loop
that reads the workers, the manifest, the bars) should cost little per image. This
measures it as issue 15 defines it: the main process's CPU seconds from its first
request to the end of the command, divided by the images, start-up excluded.

    python benchmarks/main_cpu.py                    # corpus run + 100,000 tiny images
    python benchmarks/main_cpu.py --images 96 --tiny 0 --runs 3
    python benchmarks/main_cpu.py --trees /tmp/old .  # alternate two source trees
    python benchmarks/main_cpu.py --profile --tiny 0  # + per-thread CPU and cProfile

Two workloads, each served from its own process on loopback (``demo.DemoServer``):

- ``corpus``: ``run.py``'s 320 photos (1-12 MP), 100 ms before each response, the
  command ``--threads 16 --procs 2 --download-procs 1`` (pipeline), fit 512 px JPEG
  q85, stderr on a pseudo-terminal so the progress bars are drawn as for a person;
- ``tiny``: ``stream_memory.py``'s long list (tiny images under distinct query
  strings, no latency), ``--threads 8 --procs 2 --max-size 32 --no-progress``.

How: each run is a fresh ``python`` that runs the command line in-process
(``downloader.cli.main``) after installing an audit hook that notes the process's
CPU time (``time.process_time``: every thread of the process, not the workers,
which are other processes) at its first ``socket.connect`` to the server; the
difference to the CPU time when ``main`` returns, over the images, is the figure.
Wall time is measured between the same two moments. With ``--trees`` the runs
alternate between source trees (``PYTHONPATH``), so a before/after comparison
shares the machine's load.

``--profile`` adds, per run: the CPU seconds of every thread of the main process
(from ``/proc/self/task``, grouped by thread name) and a cProfile of every thread
timed in thread CPU (``time.thread_time``), written to ``.work/main-cpu/`` and
summarised by the place the time goes. Profiling slows the run; its CPU figure is
not the headline one.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import pty
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work" / "main-cpu"
CORPUS_ARGS = [
    "--threads", "16", "--procs", "2", "--download-procs", "1", "--mode", "pipeline",
    "--per-host", "64", "--max-size", "512", "--quality", "85",
]  # fmt: skip
TINY_ARGS = [
    "--threads", "8", "--procs", "2", "--download-procs", "1", "--mode", "pipeline",
    "--per-host", "8", "--max-size", "32", "--no-progress",
]  # fmt: skip
CHILD_TIMEOUT_S = 3600
_CATEGORIES = (
    ("hashing", ("_hashlib", "sha256")),
    ("file writes", ("posix.write", "posix.open", "posix.close", "_PartFile")),
    ("socket reads", ("recv", "_ssl")),
    ("h11 / httpcore / httpx", ("/h11/", "/httpcore/", "/httpx/")),
    ("progress bars (tqdm)", ("/tqdm/",)),
    ("events (progress.py, steps.emit)", ("progress.py", "emit", "on_bytes")),
    ("manifest + json", ("manifest.py", "/json/", "records.py")),
    ("worker messages (pickle, pipes, queues)", ("multiprocessing", "pickle")),
    ("locks, waits, threads", ("acquire", "threading.py", "wait", "select", "poll")),
    ("downloader (rest)", ("/downloader/",)),
)


def say(message: str) -> None:
    """Progress on stderr; the tables go to stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------- parent


def corpus_folder() -> Path:
    """``run.py``'s full corpus (generated once, cached under ``.work``)."""
    sys.path.insert(0, str(HERE))
    import run  # the benchmark's own module, for its corpus

    return run.corpus(run.FULL)


def tiny_folder() -> Path:
    """``stream_memory.py``'s tiny images, cached."""
    from downloader.demo import COMPLETE_MARKER, generate_corpus

    folder = HERE / ".work" / "corpus-tiny-stream"
    if not (folder / COMPLETE_MARKER).is_file():
        generate_corpus(folder, 16, seed=3, min_megapixels=0.01, max_megapixels=0.02)
        (folder / COMPLETE_MARKER).write_text("complete\n")
    return folder


def drain(fd: int) -> None:
    """Read a pseudo-terminal's output until it closes (the bars go nowhere)."""
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        return


def run_child(
    tree: Path,
    urls: Path,
    extra: list[str],
    port: int,
    *,
    tty: bool,
    profile: str | None,
) -> dict[str, Any]:
    """One run of the command in a fresh process; its figures."""
    out = WORK / "out"
    shutil.rmtree(out, ignore_errors=True)
    result = WORK / "result.json"
    result.unlink(missing_ok=True)
    command = [
        sys.executable, __file__, "--child", str(result), str(port),
        *(["--child-profile", profile, str(WORK / "profile")] if profile else []),
        "--", str(urls), "--out", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # In the tree: worker processes put the working folder first on their path, so
    # run elsewhere they would import another tree's modules than the main process.
    cwd = str(tree)
    if tty:
        master, slave = pty.openpty()
        reader = threading.Thread(target=drain, args=(master,), daemon=True)
        reader.start()
        try:
            subprocess.run(
                command,
                env=env,
                cwd=cwd,
                stderr=slave,
                check=True,
                timeout=CHILD_TIMEOUT_S,
            )
        finally:
            os.close(slave)
            reader.join(5)
            os.close(master)
    else:
        with (WORK / "stderr.txt").open("w") as log:
            subprocess.run(
                command,
                env=env,
                cwd=cwd,
                stderr=log,
                check=True,
                timeout=CHILD_TIMEOUT_S,
            )
    figures: dict[str, Any] = json.loads(result.read_text())
    figures["ok"] = sum(
        1
        for line in (out / "manifest.jsonl").read_text().splitlines()
        if '"status": "ok"' in line
    )
    return figures


def workload(
    name: str,
    folder: Path,
    count: int,
    extra: list[str],
    args: argparse.Namespace,
    *,
    latency: float,
    tty: bool,
) -> list[dict[str, Any]]:
    """Alternate ``args.runs`` runs per tree of one workload; every run's figures."""
    from downloader.demo import DemoServer

    rows = []
    with DemoServer(folder, latency=latency) as server:
        names = [url.rsplit("/", 1)[1] for url in server.urls()]
        urls = WORK / f"urls-{name}.txt"
        with urls.open("w") as handle:
            for number in range(count):
                if name == "tiny":
                    handle.write(
                        f"{server.base_url}/{names[number % len(names)]}?n={number}\n"
                    )
                else:
                    handle.write(f"{server.base_url}/{names[number]}\n")
        port = int(server.base_url.rsplit(":", 1)[1])
        for run_number in range(args.runs):
            for tree in args.trees:
                say(f"{name}: run {run_number + 1} of {args.runs}, tree {tree}")
                figures = run_child(
                    tree, urls, extra, port, tty=tty, profile=args.profile
                )
                figures.update(workload=name, tree=str(tree), items=count)
                rows.append(figures)
                say(row_text(figures))
    return rows


def row_text(row: dict[str, Any]) -> str:
    """One markdown row of a run."""
    per_item_ms = row["main_cpu_s"] / row["items"] * 1000
    return (
        f"| {row['workload']} | {row['tree']} | {row['items']} | {row['ok']} | "
        f"{row['wall_s']:.2f} | {row['items'] / row['wall_s']:.1f} | "
        f"{row['main_cpu_s']:.2f} | {per_item_ms:.2f} | {row['startup_cpu_s']:.2f} |"
    )


def table(rows: list[dict[str, Any]]) -> str:
    """Every run, then the median main CPU per item of each workload and tree."""
    lines = [
        "| workload | tree | items | ok | wall s | images/s | main CPU s "
        "| main CPU ms/item | start-up CPU s (excluded) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *(row_text(row) for row in rows),
        "",
        "| workload | tree | runs | median main CPU ms/item | median images/s |",
        "|---|---|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["workload"], row["tree"]), []).append(row)
    for (name, tree), runs in groups.items():
        per_item = sorted(r["main_cpu_s"] / r["items"] * 1000 for r in runs)
        rates = sorted(r["items"] / r["wall_s"] for r in runs)
        middle = len(runs) // 2
        lines.append(
            f"| {name} | {tree} | {len(runs)} | {per_item[middle]:.2f} "
            f"| {rates[middle]:.1f} |"
        )
    return "\n".join(lines)


def parent(args: argparse.Namespace) -> int:
    """Generate, serve, run, print."""
    WORK.mkdir(parents=True, exist_ok=True)
    args.trees = [Path(tree).resolve() for tree in args.trees]
    for tree in args.trees:
        if not (tree / "downloader" / "__init__.py").is_file():
            # PYTHONPATH would find no package there, and the child would silently
            # measure the installed one (this checkout's, installed editable).
            say(f"{tree}: not a source tree of this project (no downloader/)")
            return 2
    say(f"load average {os.getloadavg()}")
    rows = []
    if args.images:
        folder = corpus_folder()
        extra = [*CORPUS_ARGS, *args.extra]
        rows += workload(
            "corpus", folder, args.images, extra, args, latency=args.latency, tty=True
        )
    if args.tiny:
        extra = [*TINY_ARGS, *args.extra]
        rows += workload(
            "tiny", tiny_folder(), args.tiny, extra, args, latency=0.0, tty=False
        )
    say(f"load average {os.getloadavg()}")
    text = table(rows)
    print(text)
    (WORK / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


# ---------------------------------------------------------------------- child


def child(result: Path, port: int, argv: list[str], profile: list[str] | None) -> int:
    """Run the command line here; note CPU at the first request and at the end."""
    first: list[float] = []

    def hook(event: str, event_args: tuple[Any, ...]) -> None:
        if event == "socket.connect" and not first:
            address = event_args[1]
            if isinstance(address, tuple) and address[1:2] == (port,):
                usage = resource.getrusage(resource.RUSAGE_SELF)
                first.extend((time.process_time(), time.perf_counter()))
                first.extend((usage.ru_utime, usage.ru_stime))
                first.extend((usage.ru_nvcsw, usage.ru_nivcsw, usage.ru_minflt))

    sys.addaudithook(hook)
    from downloader.cli import main  # after the hook: all counted

    profiler = None
    if profile is not None:
        profiler = Profiling(Path(profile[1]), functions=profile[0] == "full")
    code = main(argv)
    cpu_end, wall_end = time.process_time(), time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures = {
        "exit_code": code,
        "startup_cpu_s": first[0],
        "main_cpu_s": cpu_end - first[0],
        "user_s": usage.ru_utime - first[2],
        "system_s": usage.ru_stime - first[3],
        "switches": usage.ru_nvcsw - first[4],
        "preempted": usage.ru_nivcsw - first[5],
        "minor_faults": usage.ru_minflt - first[6],
        "wall_s": wall_end - first[1],
    }
    if profiler is not None:
        figures["profile"] = profiler.finish()
    result.write_text(json.dumps(figures))
    return 0


class Profiling:
    """cProfile in every thread (timed in thread CPU), and per-thread CPU seconds."""

    def __init__(self, folder: Path, *, functions: bool) -> None:
        self._functions = functions
        self._folder = folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self._profiles: list[tuple[str, cProfile.Profile]] = []
        self._lock = threading.Lock()
        self._threads: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._main = cProfile.Profile(time.thread_time)
        self._sampler = threading.Thread(target=self._sample, name="sampler")
        self._sampler.start()
        if functions:
            threading.setprofile(self._start_thread)
            self._main.enable()

    def _start_thread(self, *_: object) -> None:
        sys.setprofile(None)
        if threading.current_thread().name == "sampler":
            return
        profile = cProfile.Profile(time.thread_time)
        with self._lock:
            self._profiles.append((threading.current_thread().name, profile))
        profile.enable()

    def _sample(self) -> None:
        """Every 0.2 s: CPU seconds of each thread, by name (the last reading wins)."""
        ticks = os.sysconf("SC_CLK_TCK")
        while True:
            names = {t.native_id: t.name for t in threading.enumerate()}
            for task in Path("/proc/self/task").iterdir():
                try:
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                cpu = (int(fields[11]) + int(fields[12])) / ticks
                tid = int(task.name)
                name = names.get(tid) or self._threads.get(tid, ("?", 0.0))[0]
                self._threads[tid] = (name, cpu)
            if self._stop.wait(0.2):
                return

    def finish(self) -> dict[str, Any]:
        """Stop; write the merged profile; return the per-thread and category sums."""
        self._main.disable()
        self._stop.set()
        self._sampler.join()
        threading.setprofile(None)
        by_thread: dict[str, float] = {}
        for name, cpu in self._threads.values():
            group = name.rstrip("0123456789-") or name
            by_thread[group] = by_thread.get(group, 0.0) + cpu
        thread_cpu = {k: round(v, 2) for k, v in by_thread.items()}
        if not self._functions:
            return {"thread_cpu_s": thread_cpu}
        stats = pstats.Stats(self._main)
        groups: dict[str, pstats.Stats] = {"main thread": pstats.Stats(self._main)}
        for name, profile in self._profiles:
            stats.add(profile)
            group = name.rstrip("0123456789-") or name
            if group in groups:
                groups[group].add(profile)
            else:
                groups[group] = pstats.Stats(profile)
        stats.dump_stats(str(self._folder / "all-threads.prof"))
        with (self._folder / "top.txt").open("w") as handle:
            for group, group_stats in groups.items():
                handle.write(f"==== {group}\n")
                group_stats.stream = handle  # type: ignore[attr-defined]
                group_stats.sort_stats("tottime").print_stats(35)
        return {
            "thread_cpu_s": thread_cpu,
            "categories_s": {
                group: categories(group_stats) for group, group_stats in groups.items()
            },
        }


def categories(stats: Any) -> dict[str, float]:
    """Self time (thread CPU) by where it goes, from a ``pstats.Stats``."""
    sums: dict[str, float] = {}
    for (filename, _, function), row in stats.stats.items():
        where = f"{filename}:{function}"
        name = next(
            (n for n, keys in _CATEGORIES if any(k in where for k in keys)), "other"
        )
        sums[name] = sums.get(name, 0.0) + row[2]
    return {k: round(v, 3) for k, v in sorted(sums.items(), key=lambda kv: -kv[1])}


def main() -> int:
    """Parse the options; run as the benchmark or as one measured child."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", type=int, default=320, help="corpus images (0: skip)"
    )
    parser.add_argument("--tiny", type=int, default=100_000, help="tiny URLs (0: skip)")
    parser.add_argument("--runs", type=int, default=2, help="runs per tree")
    parser.add_argument("--latency", type=float, default=0.1, help="corpus server")
    parser.add_argument("--trees", nargs="+", default=[str(ROOT)], help="source trees")
    parser.add_argument(
        "--profile",
        choices=("threads", "full"),
        help="per-thread CPU (threads), and cProfile of every thread (full)",
    )
    parser.add_argument("--extra", nargs="*", default=[], help="more tool options")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-profile", nargs=2, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        argv = rest[1:] if rest[:1] == ["--"] else rest
        return child(Path(args.child[0]), int(args.child[1]), argv, args.child_profile)
    return parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
