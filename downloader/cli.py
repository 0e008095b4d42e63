"""The command line: argparse → ``Settings`` → the library → an exit code.

Exit codes: 0 every URL ok or skipped; 1 some URL failed; 2 usage error; 3 a local
fault (output folder unusable or locked, disk full) stopped the run; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
    ResizeMode,
    Settings,
)
from downloader.sources import InputFormat, LocalFiles, Source, UrlList

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


def _mode_list(text: str) -> tuple[Mode, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = {mode.value: mode for mode in Mode}
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s): {', '.join(unknown) or repr(text)}; choose from "
            + ", ".join(known)
        )
    return tuple(dict.fromkeys(known[name] for name in names))


_BOX = re.compile(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?")


def _box(text: str) -> tuple[int, int]:
    """Parse ``PX`` (a square box) or ``WxH``."""
    match = _BOX.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 800 or 800x600)")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be greater than 0: {text}")
    return width, height


def _box_list(text: str) -> tuple[tuple[int, int], ...]:
    """Parse a comma-separated list of ``PX`` or ``WxH`` boxes."""
    boxes = tuple(_box(part) for part in text.split(",") if part.strip())
    if not boxes:
        raise argparse.ArgumentTypeError(f"no sizes in {text!r} (e.g. 256,1024)")
    return boxes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="downloader",
        description="Download a list of image URLs concurrently and process them "
        "in parallel (resize, re-encode) into an output folder.",
        epilog="Exit codes: 0 all ok or skipped, 1 some failed, 2 usage error, "
        "3 local fault (disk full, output folder unusable), 130 interrupted.",
    )
    parser.add_argument(
        "urls",
        nargs="?",
        help="list of URLs: .txt (one per line), .csv/.tsv (header with a 'url' "
        "column, optional 'name'), .jsonl/.ndjson; '-' reads stdin",
    )
    parser.add_argument(
        "--input-format",
        choices=[f.value for f in InputFormat],
        default=None,
        help="format of the list (default: from its extension; txt for stdin)",
    )
    parser.add_argument(
        "--input-dir",
        metavar="DIR_OR_GLOB",
        default=None,
        help="process local image files instead of downloading: a folder (its "
        "image files) or a quoted glob such as 'photos/**/*.jpg'",
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
    parser.add_argument(
        "--compare",
        action="store_true",
        help="run several modes on the same list into OUT/<mode>/ and compare them "
        "(table, OUT/comparison.json, OUT/comparison.png)",
    )
    parser.add_argument(
        "--modes",
        type=_mode_list,
        default=None,
        help="with --compare: modes to run, comma-separated (default: all)",
    )
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
    boxes = image.add_mutually_exclusive_group()
    boxes.add_argument(
        "--max-size",
        type=_positive_int,
        default=None,
        metavar="PX",
        help="box of PX x PX (default 1024)",
    )
    boxes.add_argument(
        "--size", type=_box, default=None, metavar="WxH", help="box of W x H pixels"
    )
    boxes.add_argument(
        "--sizes",
        type=_box_list,
        default=None,
        metavar="LIST",
        help="several outputs from one decode, e.g. 256,1024 or 320x240,1280x960: "
        "the largest is OUT/<name>.<ext>, each other OUT/<size>/<name>.<ext>",
    )
    image.add_argument(
        "--resize",
        choices=[m.value for m in ResizeMode],
        default="fit",
        help="fit inside the box (default), fill it and crop the centre, "
        "exact (stretch), or none (keep the pixel size)",
    )
    image.add_argument(
        "--upscale", action="store_true", help="enlarge images smaller than the box"
    )
    image.add_argument(
        "--format",
        choices=[f.value for f in ImageFormat],
        default="jpeg",
        help="output format; keep: the source's (jpeg/png/webp), else jpeg "
        "(avif only where this Pillow can write it)",
    )
    image.add_argument(
        "--quality", type=int, default=85, help="JPEG/WebP/AVIF quality 1-100 (85)"
    )
    image.add_argument(
        "--progressive", action="store_true", help="write progressive JPEGs"
    )
    image.add_argument(
        "--optimize",
        action="store_true",
        help="smaller files for more CPU (JPEG optimize, PNG level 9, WebP method 6)",
    )
    image.add_argument(
        "--keep-metadata",
        action="store_true",
        help="keep EXIF (minus orientation, which is applied) and the ICC profile "
        "(default: strip all metadata)",
    )
    image.add_argument(
        "--grayscale", action="store_true", help="convert to shades of grey"
    )
    image.add_argument(
        "--transform",
        metavar="MODULE:FUNCTION",
        default=None,
        help="your function (PIL.Image.Image) -> PIL.Image.Image, applied to each "
        "output in the workers after the built-in steps; MODULE is imported "
        "from the current folder or sys.path",
    )
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
    if args.transform is not None and os.getcwd() not in sys.path:
        # Like `python -m`: a module beside the user's list is importable; worker
        # processes get this sys.path when they start.
        sys.path.insert(0, os.getcwd())
    box = {} if args.max_size is None else {"max_size": args.max_size}
    image = ImageSpec(
        resize=ResizeMode(args.resize),
        size=args.size,
        sizes=args.sizes or (),
        upscale=args.upscale,
        format=ImageFormat(args.format),
        quality=args.quality,
        progressive=args.progressive,
        optimize=args.optimize,
        keep_metadata=args.keep_metadata,
        grayscale=args.grayscale,
        transform=args.transform,
        **box,
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
def _url_list(args: argparse.Namespace) -> Iterator[Source]:
    """Yield the input to run on: the user's list or files, or the demo server's."""
    if args.input_dir is not None:
        if args.urls is not None or args.demo:
            raise InputError("--input-dir takes the place of a URL list and --demo")
        if args.input_format is not None:
            raise InputError("--input-format is for URL lists, not --input-dir")
        yield LocalFiles(args.input_dir)
        return
    if not args.demo:
        if args.urls is None:
            raise InputError(
                "give a file of URLs (or '-' for stdin), --input-dir, or --demo"
            )
        if args.input_format is None:
            yield args.urls  # the format follows the extension
        else:
            yield UrlList(args.urls, InputFormat(args.input_format))
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


def _run_compare(args: argparse.Namespace, settings: Settings, stderr: IO[str]) -> int:
    from downloader.compare import DEFAULT_MODES, compare  # only --compare needs it
    from downloader.report import print_comparison

    cancel = Cancellation()
    with _url_list(args) as source:
        comparison = compare(
            source, settings, args.modes or DEFAULT_MODES, cancel=cancel, log=stderr
        )
    print_comparison(comparison, file=sys.stdout)
    stderr.write(f"comparison written to {settings.out}/comparison.json and .png\n")
    if cancel.is_set():
        return EXIT_INTERRUPTED
    return EXIT_OK if comparison.ok else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        settings = _settings(args)
        if args.compare:
            return _run_compare(args, settings, sys.stderr)
        if args.modes is not None:
            raise InputError("--modes goes with --compare (use --mode for one run)")
        return _run(args, settings, sys.stderr)
    except DownloaderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
