"""The command line: argparse → ``Settings`` → the library → an exit code.

Exit codes: 0 every URL ok or skipped; 1 some URL failed; 2 usage error; 3 a local
fault (output folder unusable or locked, disk full) stopped the run; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from downloader.api import iter_results
from downloader.errors import DownloaderError, InputError
from downloader.progress import Bars
from downloader.records import Status
from downloader.report import Tally, print_summary
from downloader.runtime import Cancellation, Usage
from downloader.settings import (
    VERSION,
    HttpSettings,
    ImageFormat,
    ImageSpec,
    Mode,
    Settings,
)

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEMO_COUNT = 48
DEMO_LATENCY_S = 0.02

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)i?b?\s*$", re.IGNORECASE)
_MULTIPLIER = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _byte_size(text: str) -> int:
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500000, 20M, 1G)")
    return int(float(match.group(1)) * _MULTIPLIER[match.group(2).lower()])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="downloader",
        description="Download a list of image URLs concurrently and process them "
        "in parallel (resize, re-encode) into an output folder.",
        epilog="Exit codes: 0 all ok or skipped, 1 some failed, 2 usage error, "
        "3 local fault (disk full, output folder unusable), 130 interrupted.",
    )
    parser.add_argument(
        "urls", nargs="?", help="text file of URLs, one per line ('-' reads stdin)"
    )
    parser.add_argument("--version", action="version", version=f"downloader {VERSION}")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="serve a generated sample corpus on 127.0.0.1 and run on it (offline)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("output"), help="output folder"
    )
    parser.add_argument("--mode", choices=[m.value for m in Mode], default="pipeline")
    parser.add_argument(
        "--threads", type=_positive_int, default=8, help="download threads"
    )
    parser.add_argument(
        "--procs",
        type=_positive_int,
        default=None,
        help="worker processes (default: cores)",
    )
    parser.add_argument("--force", action="store_true", help="redo URLs already ok")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    http = parser.add_argument_group("download")
    http.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        help="seconds for connecting and for each read (default 30)",
    )
    http.add_argument(
        "--deadline",
        type=_positive_float,
        default=300.0,
        help="seconds for a whole download (default 300)",
    )
    http.add_argument(
        "--retries",
        type=int,
        default=3,
        help="extra attempts on transient errors (default 3)",
    )
    http.add_argument(
        "--max-bytes",
        type=_byte_size,
        default=100 * 1024**2,
        help="largest download accepted, e.g. 20M (default 100M)",
    )
    http.add_argument(
        "--per-host",
        type=_positive_int,
        default=None,
        help="concurrent connections per host (default 4; demo: threads)",
    )
    image = parser.add_argument_group("images")
    image.add_argument(
        "--max-size",
        type=_positive_int,
        default=1024,
        help="fit within PX x PX, never upscale (default 1024)",
    )
    image.add_argument(
        "--format", choices=[f.value for f in ImageFormat], default="jpeg"
    )
    image.add_argument("--quality", type=int, default=85, help="1-100 (default 85)")
    image.add_argument(
        "--item-timeout",
        type=_positive_float,
        default=120.0,
        help="seconds one image may take in a worker (default 120)",
    )
    demo = parser.add_argument_group("demo")
    demo.add_argument(
        "--demo-count",
        type=_positive_int,
        default=DEMO_COUNT,
        help=f"images in the demo corpus (default {DEMO_COUNT})",
    )
    demo.add_argument(
        "--demo-latency",
        type=float,
        default=DEMO_LATENCY_S,
        help="seconds of simulated network latency per request",
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    per_host = args.per_host or (args.threads if args.demo else 4)
    http_kwargs = {
        "timeout": args.timeout,
        "deadline": args.deadline,
        "retries": args.retries,
        "max_bytes": args.max_bytes,
        "per_host": per_host,
    }
    image = ImageSpec(
        max_size=args.max_size, format=ImageFormat(args.format), quality=args.quality
    )
    extra = {} if args.procs is None else {"procs": args.procs}
    return Settings(
        out=args.out,
        mode=Mode(args.mode),
        threads=args.threads,
        force=args.force,
        item_timeout=args.item_timeout,
        http=HttpSettings(**http_kwargs),
        image=image,
        **extra,
    )


@contextlib.contextmanager
def _url_list(args: argparse.Namespace) -> Iterator[str]:
    """Yield the list to run on: the user's, or the demo server's."""
    if not args.demo:
        if args.urls is None:
            raise InputError("give a file of URLs (or '-' for stdin), or --demo")
        yield args.urls
        return
    from downloader.demo import DemoServer, default_corpus  # only the demo needs it

    if args.urls is not None:
        raise InputError("--demo serves its own URL list; give no file with it")
    sys.stderr.write(f"demo: preparing {args.demo_count} sample images...\n")
    corpus = default_corpus(args.demo_count)
    with DemoServer(corpus, latency=args.demo_latency) as server:
        args.out.mkdir(parents=True, exist_ok=True)
        url_list = server.write_url_list(args.out / "demo-urls.txt")
        sys.stderr.write(f"demo: serving {corpus} at {server.base_url}\n")
        yield str(url_list)


def _run(args: argparse.Namespace, settings: Settings, stderr: IO[str]) -> int:
    tally = Tally()
    cancel = Cancellation()
    usage = Usage()
    disable = True if args.no_progress else None
    with _url_list(args) as source, Bars(file=stderr, disable=disable) as bars:
        results = iter_results(
            source, settings, events=bars, cancel=cancel, usage=usage
        )
        for outcome in results:
            tally.add(outcome)
            bars.outcome(outcome)
    summary = tally.summary(
        interrupted=cancel.is_set(), worker_cpu_s=usage.worker_cpu_s
    )
    print_summary(summary, out_dir=str(settings.out), file=stderr)
    if summary.interrupted:
        stderr.write(f"{cancel.reason}; rerun the same command to finish the job\n")
        return EXIT_INTERRUPTED
    return EXIT_FAILED if summary.counts[Status.FAILED] else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        settings = _settings(args)
        return _run(args, settings, sys.stderr)
    except DownloaderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
