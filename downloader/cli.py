"""The command line: argparse and a TOML config → ``Settings`` → library → exit code.

Exit codes: 0 every URL ok or skipped; 1 some URL failed; 2 usage error; 3 a local
fault (output folder unusable or locked, disk full) stopped the run; 130 interrupted.
With ``--dry-run``: 0 every line is usable (duplicates and already-done URLs
included), 1 some line is not.

Messages go through the ``downloader`` logger, printed above the bars by a
``BarsHandler``: warnings by default, errors only with ``--quiet``, and with
``--verbose`` also the settings at the start and one line per failed URL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, NoReturn

from downloader.config import parse_args
from downloader.errors import DownloaderError, InputError, OutputError
from downloader.manifest import FAILED_NAME, MANIFEST_NAME, RecordFiles
from downloader.parquet_index import INDEX_NAME, IndexNotWritten, index_folder
from downloader.progress import Bars, BarsHandler, Events, EventStream, fan_out
from downloader.records import Status, counted, one_line
from downloader.report import Summary, Tally, print_summary, summary_json
from downloader.runtime import (
    Cancellation,
    Usage,
    interrupt_on_signals,
    stop_helper_processes,
)
from downloader.settings import (
    HEADER_NAME,
    OPTION_CHECKS,
    VERSION,
    Check,
    HttpSettings,
    ImageFormat,
    ImageSpec,
    Mode,
    NameBy,
    Number,
    OutputFormat,
    Part,
    Resample,
    ResizeMode,
    Settings,
    Whole,
)
from downloader.sources import (
    InputFormat,
    LocalFiles,
    Source,
    UrlList,
    count_entries,
)

__all__ = ["USAGE_HINT", "load_settings", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEMO_COUNT = 48
DEMO_LATENCY_S = 0.02
# ~1.5 MB each, generated and cached once: 10000 is ~15 GB; a bigger test wants a list.
DEMO_COUNT_LIMIT = 10_000
# A minute per request: beyond that the demo only waits.
DEMO_LATENCY_LIMIT_S = 60.0
_DEMO_CHECKS: dict[str, Check] = {
    "demo-count": Whole("--demo-count", 1, DEMO_COUNT_LIMIT),
    "demo-latency": Number("--demo-latency", 0, DEMO_LATENCY_LIMIT_S, unit="seconds"),
}
# Flags' types only parse the text; ranges are the settings' (one place, one message),
# and the config file checks its values with the same checks.
_CHECKS: dict[str, Check] = {**OPTION_CHECKS, **_DEMO_CHECKS}
INSECURE_WARNING = (
    "warning: TLS certificate verification is OFF (--insecure): any server can "
    'pose as any https host; every record says "insecure": true'
)

_log = logging.getLogger("downloader")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)i?b?\s*$", re.IGNORECASE)
_MULTIPLIER = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _byte_size(text: str) -> int:
    """``500000``, ``20M``, ``1.5G``: a whole number of bytes (``1.5`` alone is not)."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500000, 20M, 1G)")
    size = Fraction(match.group(1)) * _MULTIPLIER[match.group(2).lower()]
    if size.denominator != 1:
        raise argparse.ArgumentTypeError(
            f"not a whole number of bytes: {text!r} (e.g. 500000, 20M, 1G)"
        )
    return int(size)


_PART = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def _part(text: str) -> tuple[int, int]:
    """Parse ``K/N``; ``Part`` checks the range."""
    match = _PART.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a part: {text!r} (e.g. 2/3)")
    return int(match.group(1)), int(match.group(2))


_RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*(s|min|h))?\s*")
_PER_SECOND = {None: 1, "s": 1, "min": 60, "h": 3600}


def _rate(text: str) -> float:
    """``2/s``, ``30/min``, ``100/h`` or ``2`` (per second): requests per second."""
    match = _RATE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"not a rate: {text!r} (e.g. 2/s, 30/min, 100/h)"
        )
    return float(match.group(1)) / _PER_SECOND[match.group(2)]


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
    """Parse ``PX`` (a square box) or ``WxH``; ``ImageSpec`` checks the range."""
    match = _BOX.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 800 or 800x600)")
    width = int(match.group(1))
    return width, int(match.group(2) or width)


def _box_list(text: str) -> tuple[tuple[int, int], ...]:
    """Parse a comma-separated list of ``PX`` or ``WxH`` boxes."""
    boxes = tuple(_box(part) for part in text.split(",") if part.strip())
    if not boxes:
        raise argparse.ArgumentTypeError(f"no sizes in {text!r} (e.g. 256,1024)")
    return boxes


def _header(text: str) -> tuple[str, str]:
    """Parse ``Name: value`` into a (name, value) pair (``HttpSettings`` checks it)."""
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or HEADER_NAME.fullmatch(name) is None:
        raise argparse.ArgumentTypeError(
            f"not a header: {text!r} (expected 'Name: value')"
        )
    return name, value


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are raised, to be printed as one line.

    argparse prints its whole usage block before the message, and words it
    ``downloader: error:``; the command line's other refusals (a value out of range,
    flags that do not go together) are one ``error:`` line. Raising here makes every
    usage error the same one line (see ``_print_error``).
    """

    _argv: Sequence[str] = ()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        raise InputError(_dash_hint(message.removeprefix("argument "), self._argv))


def _dash_hint(message: str, argv: Sequence[str]) -> str:
    """Say how to give a value that starts with ``-`` (``--part -1/2``).

    argparse takes such a value for an option and says only "expected one
    argument"; written ``--part=-1/2`` it reaches the option's own check, whose
    message says what is wrong with it.
    """
    option, _, what = message.partition(": ")
    if what != "expected one argument" or option not in argv:
        return message
    after = argv.index(option) + 1
    if after < len(argv) and argv[after].startswith("-") and argv[after] != "-":
        return f"{message}, got {argv[after]!r} (write {option}={argv[after]})"
    return message


EXAMPLES = """\
examples:
  downloader urls.txt --threads 8 --procs 4      download and make 1024 px JPEGs
  downloader photos.csv --out imgs --sizes 256,1024 --format webp
  cat list.jsonl | downloader - --input-format jsonl --out imgs
  downloader --input-dir 'shots/**/*.jpg' --out thumbs --max-size 256
  downloader urls.txt --dry-run                  what would be fetched, and where
  downloader urls.txt -q || echo "some failed"   errors only; exit 1 if any failed
  downloader --demo --compare                    every mode on a local demo corpus

exit codes: 0 all ok or skipped, 1 some failed, 2 usage error, 3 local fault (disk
full, output folder unusable), 130 interrupted, 141 the reader of stdout left."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Show each option's default after its help, unless the help says it already.

    A switch (``store_true``) is off unless given, and an option without a value
    (None) says in its help what happens then; neither gets ``(default: …)``.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default:" in text
            or not action.option_strings
            or default in (None, False, [], argparse.SUPPRESS)
        ):
            return text
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        return f"{text} (default: {shown})"


def _parser() -> argparse.ArgumentParser:
    """The command line, its options grouped as the README groups them.

    Each group is a ``(title, adder)`` row of ``_GROUPS``; an option belongs in its
    group's ``_add_*_options`` function.
    """
    parser = _Parser(
        prog="downloader",
        description="Download a list of image URLs concurrently and process them in\n"
        "parallel (resize, re-encode) into an output folder, with a manifest\n"
        "(OUT/manifest.jsonl) that a rerun of the same command resumes from.",
        epilog=EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"downloader {VERSION}")
    defaults = Settings()  # the defaults are the library's
    for title, add_options in _GROUPS:
        add_options(parser.add_argument_group(title), defaults)
    return parser


def _add_input_options(inputs: argparse._ArgumentGroup, defaults: Settings) -> None:
    inputs.add_argument(
        "urls",
        nargs="?",
        help="list of URLs: .txt (one per line), .csv/.tsv (header with a 'url' "
        "column, optional 'name'), .jsonl/.ndjson; '-' reads stdin",
    )
    inputs.add_argument(
        "--input-format",
        choices=[f.value for f in InputFormat],
        default=None,
        help="format of the list (default: from its extension; txt for stdin)",
    )
    inputs.add_argument(
        "--input-dir",
        metavar="DIR_OR_GLOB",
        default=None,
        help="process local image files instead of downloading: a folder (its "
        "image files) or a quoted glob such as 'photos/**/*.jpg'",
    )


def _add_run_options(run: argparse._ArgumentGroup, defaults: Settings) -> None:
    # Text: Settings makes the Path (and refuses '', which Path would make '.').
    run.add_argument(
        "--out",
        default=str(defaults.out),
        help="output folder: images, manifest.jsonl, failed.txt",
    )
    run.add_argument(
        "--output-format",
        choices=[f.value for f in OutputFormat],
        default=defaults.output_format.value,
        help="files: one image file per URL; webdataset: tar shards OUT/00000.tar, "
        "... of --shard-size list entries each (<key>.jpg, <key>.json, <key>.txt "
        "from a caption column)",
    )
    run.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default=defaults.mode.value,
        metavar="MODE",
        help="how downloads and processing are scheduled: "
        + ", ".join(m.value for m in Mode)
        + f" (default: {defaults.mode.value}; see the README's Modes)",
    )
    run.add_argument(
        "--shard-size",
        type=int,
        default=defaults.shard_size,
        metavar="N",
        help="consecutive list entries per Ray task (--mode ray; --per-host "
        "applies per task) and per tar shard (--output-format webdataset; with "
        "both, each task writes its slice's shard)",
    )
    run.add_argument(
        "--ray-address",
        metavar="auto|HOST:PORT",
        default=None,
        help="--mode ray: the Ray cluster to join, auto or the head node's "
        "HOST:PORT (default: start a local Ray on 127.0.0.1 for the run, stopped "
        "after it, and when this process is killed)",
    )
    run.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="download threads",
    )
    run.add_argument(
        "--procs",
        type=int,
        default=None,
        help="worker processes (default: the number of cores)",
    )
    run.add_argument(
        "--download-procs",
        type=int,
        default=None,
        help="processes to run the download threads in (pipeline mode; default: 1, "
        "or one per 4 worker processes); --per-host applies to each",
    )
    run.add_argument(
        "--item-timeout",
        type=float,
        default=defaults.item_timeout,
        help="seconds one image may take in a worker, in pipeline mode",
    )
    run.add_argument(
        "--part",
        type=_part,
        default=None,
        metavar="K/N",
        help="handle only part K of N of the list (K counts from 1: 1/3, 2/3, 3/3): "
        "the URLs that hash to it; run the N parts with the same list, settings and "
        "--out (one shared folder, any machines), then --merge-parts "
        "(default: the whole list)",
    )
    run.add_argument(
        "--merge-parts",
        action="store_true",
        help="merge the parts in --out (after every --part K/N has finished) into "
        "manifest.jsonl and failed.txt; takes no list; safe to rerun",
    )
    run.add_argument(
        "--parquet",
        action="store_true",
        help="also write OUT/manifest.parquet when the run ends: one row per "
        "manifest record, rebuilt from the whole manifest (needs pyarrow: "
        "pip install 'downloader[parquet]'; default: off)",
    )
    run.add_argument(
        "--parquet-only",
        action="store_true",
        help="only rebuild OUT/manifest.parquet from OUT/manifest.jsonl, as "
        "--parquet does at the end of a run; takes no list",
    )
    run.add_argument("--force", action="store_true", help="redo URLs already ok")
    run.add_argument(
        "--name-by",
        choices=[n.value for n in NameBy],
        default=defaults.name_by.value,
        help="name outputs after the URL, or after the body's SHA-256 (which also "
        "transforms identical bodies only once)",
    )
    run.add_argument(
        "--keep-originals",
        action="store_true",
        help="keep the downloads in OUT/originals/; a rerun with other image "
        "settings then redoes only the changed items, without downloading",
    )


def _add_scripting_options(parser: argparse._ArgumentGroup, defaults: Settings) -> None:
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the list and show what would be fetched and where, per host, "
        "without any network traffic or writing (exit 1 if a line is unusable)",
    )
    parser.add_argument(
        "--events",
        metavar="FILE",
        default=None,
        help="write progress events and results as JSON lines to FILE ('-': stdout)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the summary (or comparison, or dry-run plan) as one JSON object "
        "on stdout instead of the text summary",
    )
    chatter = parser.add_mutually_exclusive_group()
    chatter.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="errors only: no bars, no summary; one line if URLs failed",
    )
    chatter.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also the settings at the start and one line per failed URL",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="TOML file of defaults, keys named like the long options "
        '(threads = 8, max-bytes = "20M", headers = ["K: V"]); flags win '
        "(default: ./downloader.toml if present)",
    )
    parser.add_argument(
        "--no-config", action="store_true", help="ignore ./downloader.toml"
    )


def _add_compare_options(parser: argparse._ArgumentGroup, defaults: Settings) -> None:
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
        help="with --compare: modes to run, comma-separated (default: all but ray)",
    )


def _add_download_options(http: argparse._ArgumentGroup, settings: Settings) -> None:
    defaults = settings.http
    http.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout,
        help=(
            "seconds for connecting and for each read; a body slower than "
            f"{defaults.min_speed} bytes/s for this long is cut too; a stall is "
            "retried once"
        ),
    )
    http.add_argument(
        "--deadline",
        type=float,
        default=defaults.deadline,
        help="seconds for one attempt at a download, from connecting to the last byte",
    )
    http.add_argument(
        "--retries",
        type=int,
        default=defaults.retries,
        help="extra attempts on transient errors",
    )
    http.add_argument(
        "--max-bytes",
        type=_byte_size,
        default=defaults.max_bytes,
        help="largest download accepted, e.g. 500000, 20M, 1G "
        f"(default: {defaults.max_bytes / _MULTIPLIER['m']:g}M)",
    )
    http.add_argument(
        "--per-host",
        type=int,
        default=None,
        help=f"concurrent connections per host (default: {defaults.per_host}; "
        "demo: threads)",
    )
    http.add_argument(
        "--rate-per-host",
        type=_rate,
        default=None,
        metavar="RATE",
        help="most requests to one host, e.g. 2/s, 30/min, 100/h, for the whole run "
        "in every mode (default: no limit but --per-host)",
    )
    http.add_argument(
        "--user-agent",
        default=defaults.user_agent,
        metavar="TEXT",
        help="the User-Agent header (default: this tool's name and version)",
    )
    http.add_argument(
        "--proxy",
        default=None,
        metavar="URL",
        help="send every request through this http(s) proxy (default: the "
        "environment's HTTPS_PROXY/HTTP_PROXY/NO_PROXY)",
    )
    http.add_argument(
        "--ignore-noai",
        action="store_true",
        help="download even what the server marks X-Robots-Tag: noai or noimageai "
        "(default: such URLs fail, nothing kept)",
    )
    http.add_argument(
        "--header",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra request header (repeatable); replaces a default of that name",
    )
    http.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify TLS certificates (warned about, recorded in the manifest)",
    )
    http.add_argument(
        "--block-private",
        action="store_true",
        help="refuse hosts that resolve to loopback, private, link-local or "
        "metadata addresses, on every redirect too",
    )


def _add_image_options(image: argparse._ArgumentGroup, defaults: Settings) -> None:
    spec = defaults.image
    boxes = image.add_mutually_exclusive_group()
    boxes.add_argument(
        "--max-size",
        type=int,
        default=None,
        metavar="PX",
        help=f"box of PX x PX (default: {spec.max_size})",
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
        default=spec.resize.value,
        help="fit inside the box, fill it and crop the centre, "
        "exact (stretch), or none (keep the pixel size)",
    )
    image.add_argument(
        "--upscale", action="store_true", help="enlarge images smaller than the box"
    )
    image.add_argument(
        "--format",
        choices=[f.value for f in ImageFormat],
        default=spec.format.value,
        help="output format; keep: the source's (jpeg/png/webp), else jpeg "
        "(avif only where this Pillow can write it)",
    )
    image.add_argument(
        "--quality",
        type=int,
        default=spec.quality,
        help="JPEG/WebP/AVIF quality, 1-100",
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
        "--resample",
        choices=[r.value for r in Resample],
        default=spec.resample.value,
        help="resize speed against fidelity: fast (decode JPEGs at the box's scale, "
        "bicubic), balanced (at 1.6x it, Lanczos), best (full size, Lanczos all the "
        "way) "
        f"(default: {spec.resample.value})",
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
        "--max-pixels",
        type=int,
        default=spec.max_pixels,
        metavar="N",
        help="refuse images with more pixels than this, before decoding them "
        f"(decompression bombs; default: {spec.max_pixels:_}, 200 MP)",
    )


def _add_demo_options(demo: argparse._ArgumentGroup, defaults: Settings) -> None:
    demo.add_argument(
        "--demo",
        action="store_true",
        help="serve a generated sample corpus on 127.0.0.1 and run on it (offline)",
    )
    demo.add_argument(
        "--demo-count",
        type=int,
        default=DEMO_COUNT,
        help=f"with --demo: images in the demo corpus (default: {DEMO_COUNT})",
    )
    demo.add_argument(
        "--demo-latency",
        type=float,
        default=DEMO_LATENCY_S,
        help="with --demo: seconds of simulated network latency per request "
        f"(default: {DEMO_LATENCY_S:g})",
    )


_GROUPS: tuple[tuple[str, Callable[[argparse._ArgumentGroup, Settings], None]], ...] = (
    ("inputs (see the README's Inputs)", _add_input_options),
    ("run", _add_run_options),
    ("download", _add_download_options),
    ("transforms (see the README's Transforms)", _add_image_options),
    ("scripting: dry runs, events, JSON, logging, config", _add_scripting_options),
    ("comparing the modes", _add_compare_options),
    ("demo", _add_demo_options),
)
"""The --help groups, in the README's order: (title, function adding its options)."""


def _settings(args: argparse.Namespace) -> Settings:
    """Build the run's settings from the flags, which they check; check the demo's."""
    for option, check in _DEMO_CHECKS.items():
        check(getattr(args, option.replace("-", "_")))
    if args.per_host is not None:
        per_host = args.per_host
    elif args.demo:  # one host: a connection per thread, so --threads is named first
        OPTION_CHECKS["threads"](args.threads)
        per_host = args.threads
    else:
        per_host = HttpSettings().per_host
    http_kwargs = {
        "timeout": args.timeout,
        "deadline": args.deadline,
        "retries": args.retries,
        "max_bytes": args.max_bytes,
        "per_host": per_host,
        "rate_per_host": args.rate_per_host,
        "user_agent": args.user_agent,
        "proxy": args.proxy,
        "honour_noai": not args.ignore_noai,
        "headers": _last_of_each_name(args.header),
        "verify": not args.insecure,
        "block_private": args.block_private,
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
        resample=Resample(args.resample),
        transform=args.transform,
        max_pixels=args.max_pixels,
        **box,
    )
    extra = {} if args.procs is None else {"procs": args.procs}
    return Settings(
        out=args.out,
        mode=Mode(args.mode),
        threads=args.threads,
        download_procs=args.download_procs,
        force=args.force,
        name_by=NameBy(args.name_by),
        output_format=OutputFormat(args.output_format),
        keep_originals=args.keep_originals,
        item_timeout=args.item_timeout,
        shard_size=args.shard_size,
        ray_address=args.ray_address,
        http=HttpSettings(**http_kwargs),
        image=image,
        part=None if args.part is None else Part(*args.part),
        # A config file's `parquet = true` is only a default: a part leaves the
        # index to --merge-parts (typed, --parquet with --part is refused).
        parquet=args.parquet and args.part is None,
        **extra,
    )


def _last_of_each_name(headers: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Keep the last header of each name (the command line's over the config's)."""
    latest = {name.lower(): (name, value) for name, value in headers}
    return tuple(latest.values())


def load_settings(config: str | Path) -> Settings:
    """Return the ``Settings`` the command line would use with the config file.

    The same keys, values and checks as ``downloader --config FILE``.

    Raises:
        InputError: the file cannot be read, or a key or value is not valid.
    """
    args = parse_args(_parser(), ["--config", str(config)], checks=_CHECKS)
    return _settings(args)


@contextlib.contextmanager
def _url_list(args: argparse.Namespace, say: Callable[[str], None]) -> Iterator[Source]:
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
    from downloader.demo import DemoServer, default_corpus, previous_port

    if args.urls is not None:
        raise InputError("--demo serves its own URL list; give no file with it")
    say(f"demo: preparing {args.demo_count} sample images...")
    corpus = default_corpus(args.demo_count)
    listed = Path(args.out) / "demo-urls.txt"
    port = previous_port(listed)  # the same URLs as last time, if the port is free
    with DemoServer(corpus, latency=args.demo_latency, port=port) as server:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        url_list = server.write_url_list(listed)
        say(f"demo: serving {corpus} at {server.base_url}")
        yield str(url_list)


def _log_level(args: argparse.Namespace) -> int:
    if args.quiet:
        return logging.ERROR
    return logging.INFO if args.verbose else logging.WARNING


@contextlib.contextmanager
def _console_log(level: int, stderr: IO[str]) -> Iterator[BarsHandler]:
    """Print the ``downloader`` logger's messages at ``level`` and above on stderr.

    The handler's ``target`` can be pointed at ``Bars.write`` while bars are drawn.
    """
    handler = BarsHandler(lambda line: print(line, file=stderr, flush=True))
    previous = _log.level
    _log.setLevel(level)
    _log.addHandler(handler)
    try:
        yield handler
    finally:
        _log.removeHandler(handler)
        _log.setLevel(previous)


@contextlib.contextmanager
def _events_to(handler: BarsHandler, write: Callable[[str], None]) -> Iterator[None]:
    saved = handler.target
    handler.target = write
    try:
        yield
    finally:
        handler.target = saved


def _describe(settings: Settings) -> str:
    """One line of the settings that shape a run (header names, never values)."""
    http, image = settings.http, settings.image
    headers = ", ".join(name for name, _ in http.headers) or "none"
    boxes = ", ".join(f"{w}x{h}" for w, h in image.boxes) or "original size"
    return (
        f"mode {settings.mode.value}: {settings.threads} threads in "
        f"{settings.download_processes} download process(es), {settings.procs} "
        f"worker processes, out {settings.out}; download: timeout "
        f"{http.timeout:g}s, deadline {http.deadline:g}s, retries {http.retries}, "
        f"max {http.max_bytes:,} bytes, {http.per_host} per host, TLS verify "
        f"{'on' if http.verify else 'OFF'}, block-private "
        f"{'on' if http.block_private else 'off'}, extra headers: {headers}; "
        f"images: {image.resize.value} {boxes}, {image.format.value} "
        f"q{image.quality}"
    )


EVENTS_READER_LEFT = "the reader of the events left (a closed pipe)"
"""The stop reason when ``--events -``'s reader goes (``| head``)."""


def _open_events(args: argparse.Namespace, cancel: Cancellation) -> EventStream | None:
    """Open ``--events``; when its reader leaves, stop the run as a signal would."""
    if args.events is None:
        return None
    try:
        return EventStream.open(
            args.events, reader_left=lambda: cancel.set(EVENTS_READER_LEFT)
        )
    except OSError as exc:
        raise OutputError(
            f"cannot write events to {args.events}: {exc.strerror or exc}"
        ) from exc


def _print_json(value: dict[str, Any]) -> None:
    print(json.dumps(value, indent=1, ensure_ascii=False), file=sys.stdout)


def _finish(
    args: argparse.Namespace,
    summary: Summary,
    settings: Settings,
    stderr: IO[str],
    *,
    indexed: bool,
) -> None:
    """Print the summary; ``indexed``: the run wrote its Parquet index."""
    index = str(settings.out / INDEX_NAME) if indexed else None
    figures = summary_json(summary, out_dir=str(settings.out), index=index)
    if args.json:
        _print_json(figures)
    elif not args.quiet:
        part = settings.part
        records = None if part is None else RecordFiles.for_part(part).manifest
        print_summary(
            summary,
            out_dir=str(settings.out),
            file=stderr,
            records=records,
            index=INDEX_NAME if indexed else None,
        )
    listed = settings.out / (
        FAILED_NAME
        if settings.part is None
        else RecordFiles.for_part(settings.part).manifest
    )
    _say_failed(args, stderr, summary.counts[Status.FAILED], summary.total, listed)


def _say_failed(
    args: argparse.Namespace, stderr: IO[str], failed: int, total: int, listed: Path
) -> None:
    """With -q (errors only), still one line when URLs failed: they are its errors."""
    if args.quiet and failed:
        print(
            f"failed: {failed} of {counted(total, 'URL')} (listed in {listed})",
            file=stderr,
        )


def _run(
    args: argparse.Namespace,
    settings: Settings,
    log: BarsHandler,
    stderr: IO[str],
) -> int:
    cancel = Cancellation()
    with contextlib.ExitStack() as stack:
        stream = _open_events(args, cancel)
        if stream is not None:
            stack.enter_context(stream)
        summary, index_error = _run_with_bars(
            args, settings, log, stream, cancel, stderr
        )
        indexed = settings.parquet and index_error is None
        _finish(args, summary, settings, stderr, indexed=indexed)
        if index_error is not None:  # after the summary: the run itself went well
            raise index_error
    if summary.interrupted:
        _log.warning("%s; rerun the same command to finish the job", cancel.reason)
    if stream is not None and stream.reader_gone:
        # As ``| head`` expects of a writer; the run has stopped in order, the
        # manifest says how far it got, and a rerun finishes the job.
        raise BrokenPipeError(EVENTS_READER_LEFT)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if summary.counts[Status.FAILED] else EXIT_OK


def _run_with_bars(
    args: argparse.Namespace,
    settings: Settings,
    log: BarsHandler,
    stream: EventStream | None,
    cancel: Cancellation,
    stderr: IO[str],
) -> tuple[Summary, IndexNotWritten | None]:
    """Run with bars drawn (and log lines above them); return the totals, and the
    fault that kept the Parquet index from being written, if only that failed."""
    # Imported here: the run's machinery comes in as its folder is taken (api).
    from downloader.api import iter_results

    index_error = None
    usage = Usage()
    disable = True if args.no_progress or args.quiet else None
    # Bars are drawn on a terminal only (tqdm's disable=None): elsewhere the list is
    # not read once more for their total before the first request.
    drawn = disable is None and stderr.isatty()
    with (
        _url_list(args, _sayer(args, stderr)) as source,
        Bars(
            file=stderr,
            disable=disable,
            total=_total(source, settings) if drawn else None,
        ) as bars,
        _events_to(log, bars.write),
    ):
        # Counted from here: the demo corpus, if any, is ready and being served.
        tally = Tally()
        events: Events = bars if stream is None else fan_out(bars, stream)
        _log.info("%s", _describe(settings))
        results = iter_results(
            source, settings, events=events, cancel=cancel, usage=usage
        )
        # Closed here, whatever ends the loop (a second Ctrl-C, a broken pipe): the
        # run shuts down inside these scopes, before the helpers are stopped.
        with contextlib.closing(results):
            try:
                for outcome in results:
                    tally.add(outcome)  # bars and stream get each record
                    if outcome.status is Status.FAILED:
                        _log.info("failed %s: %s", outcome.url, outcome.error)
            except IndexNotWritten as exc:
                index_error = exc
    summary = tally.summary(
        interrupted=cancel.is_set(), worker_cpu_s=usage.worker_cpu_s
    )
    return summary, index_error


def _total(source: Source, settings: Settings) -> int | None:
    """The bars' total: the list's entries; unknown for a part (a share of them)."""
    return count_entries(source) if settings.part is None else None


def _sayer(args: argparse.Namespace, stderr: IO[str]) -> Callable[[str], None]:
    """Print a progress note on stderr, unless --quiet."""

    def say(message: str) -> None:
        if not args.quiet:
            print(message, file=stderr, flush=True)

    return say


def _run_compare(args: argparse.Namespace, settings: Settings, stderr: IO[str]) -> int:
    from downloader.compare import DEFAULT_MODES, compare  # only --compare needs it
    from downloader.report import comparison_json, print_comparison

    cancel = Cancellation()
    with _url_list(args, _sayer(args, stderr)) as source:
        comparison = compare(
            source,
            settings,
            args.modes or DEFAULT_MODES,
            cancel=cancel,
            log=None if args.quiet else stderr,
        )
    if args.json:
        _print_json(comparison_json(comparison))
    elif not args.quiet:  # -q: errors only; comparison.json and .png still written
        print_comparison(comparison, file=sys.stdout)
    _sayer(args, stderr)(
        f"comparison written to {settings.out}/comparison.json and .png"
    )
    for result in comparison.results:
        failed = result.summary.counts.get(Status.FAILED, 0)
        listed = settings.out / result.mode.value / FAILED_NAME
        _say_failed(args, stderr, failed, result.summary.total, listed)
    if cancel.is_set():
        return EXIT_INTERRUPTED
    return EXIT_OK if comparison.ok else EXIT_FAILED


def _run_dry(args: argparse.Namespace, settings: Settings, stderr: IO[str]) -> int:
    from downloader.dryrun import dry_run, dry_run_json, print_plan

    if args.demo:
        raise InputError("--dry-run checks your list; --demo makes its own")
    with _url_list(args, _sayer(args, stderr)) as source:
        plan = dry_run(source, settings)
    if args.json:
        _print_json(dry_run_json(plan))
    else:
        print_plan(plan, file=sys.stdout)
    return EXIT_OK if plan.ok else EXIT_FAILED


def _run_merge(args: argparse.Namespace, stderr: IO[str]) -> int:
    from downloader.parts import merge_parts  # only --merge-parts needs it

    merged = merge_parts(Path(args.out), parquet=args.parquet)
    counts = {status.value: n for status, n in merged.counts.items()}
    if args.json:
        index = (
            {"index": str(merged.manifest.parent / INDEX_NAME)} if args.parquet else {}
        )
        _print_json(
            {"parts": merged.parts, "manifest": str(merged.manifest), **index, **counts}
        )
    _sayer(args, stderr)(
        f"merged {merged.parts} part(s) into {merged.manifest}: "
        f"{counted(merged.records, 'URL')} ("
        + ", ".join(f"{n} {name}" for name, n in counts.items())
        + ")"
    )
    failed = merged.counts[Status.FAILED]
    listed = merged.manifest.parent / FAILED_NAME
    _say_failed(args, stderr, failed, merged.records, listed)
    return EXIT_FAILED if failed else EXIT_OK


def _run_index(args: argparse.Namespace, stderr: IO[str]) -> int:
    indexed = index_folder(Path(args.out))
    if args.json:
        _print_json({"index": str(indexed.path), "rows": indexed.rows})
    _sayer(args, stderr)(
        f"indexed {indexed.rows} records of {indexed.path.parent / MANIFEST_NAME} "
        f"in {indexed.path}"
    )
    return EXIT_OK


_FOLDER_ONLY = {
    "merge_parts": "--merge-parts merges the parts in --out",
    "parquet_only": "--parquet-only indexes the manifest in --out",
}
"""The commands that work on an output folder alone, and what each does."""


def _check_folder_only(args: argparse.Namespace, dest: str) -> None:
    """Refuse what does not go with --merge-parts or --parquet-only (no list)."""
    given = [
        flag
        for flag, value in (
            ("URL list", args.urls),
            ("--input-dir", args.input_dir),
            ("--demo", args.demo or None),
            ("--part", args.part),
            ("--dry-run", args.dry_run or None),
            ("--compare", args.compare or None),
            ("--events", args.events),
            ("--merge-parts", args.merge_parts or None),
            ("--parquet-only", args.parquet_only or None),
        )
        if value is not None and flag != "--" + dest.replace("_", "-")
    ]
    if given:
        raise InputError(f"{_FOLDER_ONLY[dest]}; it takes no {given[0]}")


def _pipeline(args: argparse.Namespace) -> bool:
    return bool(args.compare) or args.mode == Mode.PIPELINE.value


def _downloads(args: argparse.Namespace) -> bool:
    return args.input_dir is None


_LOCAL_FILES = "--input-dir reads local files, nothing is downloaded"


def _writes_shards(args: argparse.Namespace) -> bool:
    return bool(args.output_format == OutputFormat.WEBDATASET.value)


def _runs_ray(args: argparse.Namespace) -> bool:
    """Whether the command runs ``--mode ray`` (alone, or among --compare's modes)."""
    if args.compare:
        return Mode.RAY in (args.modes or ())
    return bool(args.mode == Mode.RAY.value)


_IGNORED_UNLESS: dict[str, tuple[Callable[[argparse.Namespace], bool], str]] = {
    "demo_count": (lambda args: args.demo, "--demo-count goes with --demo"),
    "demo_latency": (lambda args: args.demo, "--demo-latency goes with --demo"),
    "mode": (
        lambda args: not args.compare,
        "--compare runs --modes (default: all but ray), not --mode",
    ),
    "shard_size": (
        lambda args: _runs_ray(args) or _writes_shards(args),
        "--shard-size goes with --mode ray (or ray in --compare's --modes) or "
        "--output-format webdataset",
    ),
    "ray_address": (
        _runs_ray,
        "--ray-address goes with --mode ray (or ray in --compare's --modes)",
    ),
    "download_procs": (_pipeline, "--download-procs applies to --mode pipeline"),
    "parquet": (
        lambda args: not args.dry_run and args.part is None,
        "--parquet indexes a run's whole manifest: not with --dry-run (which writes "
        "nothing) nor --part (give it to --merge-parts)",
    ),
    "item_timeout": (_pipeline, "--item-timeout applies to --mode pipeline"),
    "insecure": (_downloads, f"--insecure is for downloads; {_LOCAL_FILES}"),
    "proxy": (_downloads, f"--proxy is for downloads; {_LOCAL_FILES}"),
    "user_agent": (_downloads, f"--user-agent is for downloads; {_LOCAL_FILES}"),
    "rate_per_host": (_downloads, f"--rate-per-host is for downloads; {_LOCAL_FILES}"),
    "header": (_downloads, f"--header is for downloads; {_LOCAL_FILES}"),
}
"""Options that a run would ignore unless the condition holds: refused when typed
on the command line (a config file's value is only a default, never refused)."""
_NOT_GIVEN = object()


_FOLDER_TAKES = {"out", "json", "quiet", "verbose", "config", "no_config"}
_TAKES = {
    "merge_parts": (_FOLDER_TAKES | {"merge_parts", "parquet"}, "--out, --parquet, "),
    "parquet_only": (_FOLDER_TAKES | {"parquet_only"}, "--out, "),
}
"""What ``--merge-parts`` and ``--parquet-only`` use (and say they take); any other
option typed with them would be ignored."""


def _typed(argv: Sequence[str] | None) -> set[str]:
    """The options given on the command line itself (not defaults or the config's)."""
    parser = _parser()
    actions = [a for a in parser._actions if a.dest not in ("help", "version")]
    # An appending option (--header) adds to its default: None there, not the marker.
    appending = {a.dest for a in actions if isinstance(a, argparse._AppendAction)}
    parser.set_defaults(**dict.fromkeys({a.dest for a in actions}, _NOT_GIVEN))
    parser.set_defaults(**dict.fromkeys(appending, None))
    plain = parser.parse_args(argv)
    unset = (_NOT_GIVEN, None)
    return {a.dest for a in actions if getattr(plain, a.dest, _NOT_GIVEN) not in unset}


def _check_typed(args: argparse.Namespace, typed: set[str]) -> None:
    """Refuse an option typed where it would be ignored (a usage error, exit 2)."""
    for dest, (takes, named) in _TAKES.items():
        if not getattr(args, dest):
            continue
        extra = sorted(typed - takes - {"urls", "no_progress"})
        if extra:
            raise InputError(
                f"--{dest.replace('_', '-')} takes {named}--json, -q and -v only, "
                f"not --{extra[0].replace('_', '-')}"
            )
    for dest, (applies, refusal) in _IGNORED_UNLESS.items():
        if dest in typed and not applies(args):
            raise InputError(refusal)


def _check_combinations(args: argparse.Namespace) -> None:
    """Refuse flags that cannot go together (a usage error, exit 2)."""
    for dest in _FOLDER_ONLY:
        if getattr(args, dest):
            _check_folder_only(args, dest)
    if args.part is not None and (args.compare or args.demo):
        other = "--compare" if args.compare else "--demo"
        raise InputError(f"--part splits your list; it does not go with {other}")
    if args.modes is not None and not args.compare:
        raise InputError("--modes goes with --compare (use --mode for one run)")
    if args.events is not None and (args.compare or args.dry_run):
        other = "--compare" if args.compare else "--dry-run"
        raise InputError(f"--events records one run; it does not go with {other}")
    if args.compare and _writes_shards(args):
        raise InputError(
            "--compare checks output files; it does not go with --output-format "
            "webdataset"
        )
    if args.dry_run and args.compare:
        raise InputError("--dry-run and --compare do not go together")
    if args.events == "-" and args.json:
        raise InputError("--events - and --json both write to stdout; name a file")
    if args.events is not None:
        _check_events_path(args)


def _check_events_path(args: argparse.Namespace) -> None:
    """Refuse an ``--events`` file that opening would wipe: the list, or any file
    in the output folder (the manifest, an output); an empty name is no file."""
    if args.events == "":
        raise InputError("--events needs a file name ('-': stdout)")
    if args.events == "-":
        return
    events = Path(args.events).resolve()
    if args.urls not in (None, "-") and events == Path(args.urls).resolve():
        raise InputError(f"--events {args.events} is the URL list; name another file")
    if events.is_relative_to(Path(args.out).resolve()):
        raise InputError(
            f"--events {args.events} is inside the output folder {args.out}; "
            "name a file outside it"
        )


def _dispatch(args: argparse.Namespace, log: BarsHandler) -> int:
    _check_combinations(args)
    if args.merge_parts:
        return _run_merge(args, sys.stderr)
    if args.parquet_only:
        return _run_index(args, sys.stderr)
    settings = _settings(args)
    if args.dry_run:
        return _run_dry(args, settings, sys.stderr)
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    if args.compare:
        return _run_compare(args, settings, sys.stderr)
    return _run(args, settings, log, sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code.

    SIGINT and SIGTERM end it with 130 and one line on stderr whenever they come:
    while a run goes on, the run stops in order (``cancel_on_signals``); before it
    (reading the list, which may wait for a FIFO's writer) or after it, they
    interrupt at once. Last, no helper process it started may outlive the command;
    a forkserver already running when it began (a Python caller's) is left alone, as
    a run leaves it (``helper_processes``): stopping it cost the caller a fresh
    interpreter's start (~0.7 CPU-s) at its next worker.
    """
    callers = _forkserver_running()
    with interrupt_on_signals() as interrupts:
        try:
            with interrupts.armed():
                code = _main(argv)
        except KeyboardInterrupt as exc:
            # A second signal stops at once, without recording what was not reached.
            print(
                str(exc) or "interrupted at once; rerun the same command to finish",
                file=sys.stderr,
            )
            code = EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader of our output left (``| head``): stop quietly, as Unix
            # tools do. The run, if any, has ended through its own shutdown path.
            _silence_stdout()
            code = EXIT_BROKEN_PIPE
        if not callers:
            stop_helper_processes()
        if interrupts.received is not None and code != EXIT_INTERRUPTED:
            # Came while the command was ending: what it did stands, but a caller
            # that sent a signal is told it arrived.
            print(f"interrupted by {interrupts.received.name}", file=sys.stderr)
            code = EXIT_INTERRUPTED
    return code


def _forkserver_running() -> bool:
    """Whether multiprocessing's forkserver of this process runs (read, not imported:
    a command line has none before its run)."""
    module = sys.modules.get("multiprocessing.forkserver")
    server = getattr(module, "_forkserver", None)
    return getattr(server, "_forkserver_pid", None) is not None


EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
"""Exit code when stdout's reader left: what a tool killed by SIGPIPE reports."""


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    """Parse, run and map errors to exit codes (``main`` handles interruptions)."""
    try:
        args = parse_args(_parser(), argv, checks=_CHECKS)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except InputError as exc:  # the command line or the config file
        return _print_error(exc)
    try:
        _check_typed(args, _typed(argv))
        with _console_log(_log_level(args), sys.stderr) as log:
            if args.config is not None:
                _log.info("defaults from %s (flags win)", args.config)
            return _dispatch(args, log)
    except DownloaderError as exc:
        return _print_error(exc)


USAGE_HINT = "; see --help"
"""Ends a usage error's line (exit 2): where the options and their syntax are."""


def _print_error(exc: DownloaderError) -> int:
    """Print ``exc`` as the one ``error:`` line; return its exit code."""
    hint = USAGE_HINT if exc.exit_code == EXIT_USAGE else ""
    print(f"error: {one_line(str(exc))}{hint}", file=sys.stderr)
    return exc.exit_code
