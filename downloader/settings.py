"""Settings: frozen dataclasses made once (by the CLI or a caller) and passed down.

Every field is checked in ``__post_init__`` so that a bad value fails at once with one
line (``InputError``, exit code 2) before any thread or process starts: its type (an
integer field refuses ``True``, ``2.5`` and ``"8"``; a number of seconds takes an int
or a float but not NaN or infinity) and its range, up to an upper bound far above any
real run (the ``*_LIMIT`` constants below), so that a typo such as ``threads=10**6``
is refused instead of costing minutes and gigabytes. Each field's check is a ``Check``
in its class's table, named as the command line names it (``--threads``) where it has
a flag; the command line and the config file use the same checks and messages.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import importlib
import importlib.util
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from downloader.errors import InputError

__all__ = [
    "HEADER_NAME",
    "LOCAL_MODES",
    "OPTION_CHECKS",
    "Check",
    "HttpSettings",
    "ImageFormat",
    "ImageSpec",
    "Mode",
    "NameBy",
    "Number",
    "OutputFormat",
    "Part",
    "Resample",
    "ResizeMode",
    "Settings",
    "Whole",
    "box_label",
    "import_callable",
]

VERSION = "0.1.0"


def _httpx_version() -> str:
    """httpx's version, read from its ``__version__.py`` rather than by importing it.

    Importing httpx is a third of what the command line does before it takes its
    output folder (~0.15 CPU-s of ~0.4), and it needs httpx only for the run, once
    the forkserver that starts its workers is on its way (``api``). The file is the
    one httpx takes its own ``__version__`` from; if it is not there, httpx is
    imported after all.
    """
    spec = importlib.util.find_spec("httpx")
    for folder in (spec and spec.submodule_search_locations) or ():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = (Path(folder) / "__version__.py").read_text(encoding="utf-8")
            found = _VERSION_LINE.search(text)
            if found is not None:
                return found.group(1)
    import httpx  # only where its version cannot be read

    return httpx.__version__


_VERSION_LINE = re.compile(r"""^__version__ = ["']([^"']+)["']""", re.MULTILINE)
USER_AGENT = f"downloader/{VERSION} (+python-httpx/{_httpx_version()})"
"""What the tool is, in the product/version form servers log: no address, since
this project has none of its own to give (``--user-agent`` gives yours)."""
MEGABYTE = 1024 * 1024

# Upper bounds, each far above what a demanding run uses and low enough that a typo
# (an extra zero, milliseconds given as seconds) is refused before it costs anything.
# README.md ("Command line") lists them.
THREADS_LIMIT = 1024
"""Download threads, and connections to one host: each is a socket and a thread
stack, and 1024 is Linux's default limit on open files."""
PROCS_LIMIT = 512
"""Worker (and download) processes: more than the cores of any common machine; each
is an interpreter of ~30 MB or more with its own Pipe and Queue."""
RETRIES_LIMIT = 100
"""Extra attempts per URL: with backoff, 100 already spans hours of waiting."""
REDIRECTS_LIMIT = 50
"""Redirects followed per URL: curl's default cap (browsers stop at 20)."""
SECONDS_LIMIT = 86_400
"""Any timeout, deadline or wait: a day; no single step here sensibly waits longer."""
BYTES_LIMIT = 1024**4
"""``max_bytes``: 1 TiB, far above any image file (a 65535-pixel-square PNG)."""
RATE_LIMIT = 10_000
"""``rate_per_host``: requests per second to one host; far above what any server
that needs a limit accepts."""
SPEED_LIMIT = 1024**3
"""``min_speed``: 1 GiB/s; a higher floor would fail every download as stalled."""
BOX_SIDE_LIMIT = 65_535
"""A box's width or height in pixels: the largest side a JPEG can have."""
BOXES_LIMIT = 64
"""Boxes in ``sizes``: each is one more encode and file per image; responsive-image
sets use a handful."""
PIXELS_LIMIT = BOX_SIDE_LIMIT**2
"""``max_pixels``: the largest JPEG; decoding one takes ~13 GB per worker already."""
MAX_PIXELS_DEFAULT = 200_000_000
"""``max_pixels`` by default: 200 MP, just above the largest photos cameras make today
(a 200 MP phone sensor's 16320x12240 = 199.8 MP; medium format 150 MP, 14204x10652),
while a bomb (a small file declaring 65535x65535 pixels) is still refused. Pillow's own
guard stops at 2 x 89,478,485 = 179.0 MP, which refuses those phones' photos. Decoding
one such image in full takes ~600 MB (RGB) in a worker; a JPEG shrunk to a small box is
decoded at 1/8 scale (``draft``), far less."""
TASKS_LIMIT = 10**9
# Parts of one list (--part K/N): far more machines than any job array gives one job.
PARTS_LIMIT = 100_000
"""``max_tasks_per_worker``: beyond any run's length, i.e. never recycle."""
SHARD_SIZE_LIMIT = 1_000_000
"""``--shard-size``: entries per Ray task; the driver holds the jobs of the shards in
flight (two per cluster CPU), so a million each is already gigabytes there."""
RAY_EXTRA_HINT = "pip install 'downloader[ray]'"
"""How to get Ray, for the one-line error of ``--mode ray`` without it."""
PARQUET_EXTRA_HINT = "pip install 'downloader[parquet]'"
"""How to get pyarrow, for the one-line error of ``--parquet`` without it."""


class Mode(enum.Enum):
    """How the two stages are scheduled; ``.value`` is what ``--mode`` accepts."""

    SEQUENTIAL = "sequential"
    THREADS = "threads"
    PROCESSES = "processes"
    PIPELINE = "pipeline"
    ASYNC = "async"
    RAY = "ray"
    """Shards of the list as tasks on a Ray cluster (``ray_mode``; the extra)."""


LOCAL_MODES: tuple[Mode, ...] = tuple(mode for mode in Mode if mode is not Mode.RAY)
"""The modes that need nothing but this machine (``--compare``'s default)."""


class ImageFormat(enum.Enum):
    """Output encodings; ``.value`` is what ``--format`` accepts."""

    JPEG = "jpeg"
    WEBP = "webp"
    PNG = "png"
    AVIF = "avif"
    KEEP = "keep"
    """The source's own format when it is one of the above, else JPEG."""

    @property
    def extension(self) -> str:
        """File name extension (without the dot) for this format."""
        if self is ImageFormat.KEEP:
            raise ValueError("format 'keep' has no extension of its own")
        return "jpg" if self is ImageFormat.JPEG else self.value


class NameBy(enum.Enum):
    """What output files are named after; ``.value`` is what ``--name-by`` accepts."""

    URL = "url"
    """A safe stem made from the URL (or the list's ``name`` column)."""
    SHA256 = "sha256"
    """The first ``SHA256_STEM_DIGITS`` hex digits of the body's SHA-256; bodies with
    the same content are transformed once."""


class OutputFormat(enum.Enum):
    """How outputs are laid out; ``.value`` is what ``--output-format`` accepts."""

    FILES = "files"
    """One file per output image in the output folder."""
    WEBDATASET = "webdataset"
    """Numbered tar shards (``00000.tar``, ...) of ``shard_size`` list entries each,
    in the WebDataset layout (``<key>.jpg``, ``<key>.json``, ``<key>.txt``)."""


# 16 hex digits = 64 bits: a chance collision needs about 4 billion distinct bodies.
SHA256_STEM_DIGITS = 16


class ResizeMode(enum.Enum):
    """How an image is brought to a box; ``.value`` is what ``--resize`` accepts."""

    FIT = "fit"
    """Scale to fit inside the box, keeping the aspect ratio."""
    FILL = "fill"
    """Scale to cover the box, keeping the aspect ratio, then crop the centre."""
    EXACT = "exact"
    """Scale to the box exactly, changing the aspect ratio if need be."""
    NONE = "none"
    """Keep the pixel size (the image is still oriented and re-encoded)."""


class Resample(enum.Enum):
    """How much CPU resizing spends on fidelity; ``.value`` is what ``--resample``
    accepts. README.md ("Benchmark") gives each one's images/s and PSNR."""

    FAST = "fast"
    """JPEGs decoded at the smallest 1/2..1/8 scale that covers the box, then an
    integer reduce and bicubic for the last factor of less than 2."""
    BALANCED = "balanced"
    """JPEGs decoded at no less than 1.6 times the box, then Lanczos over the rest
    (an integer reduce first only beyond 6x, as for a large PNG)."""
    BEST = "best"
    """Decoded at full size, Lanczos over the whole factor: slowest, most faithful."""


# RFC 9110 token characters (the CLI's --header parser uses it too); a value must not
# break the header block.
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\r\n\x00]")
# A header value httpx can send: printable ASCII (it encodes values as ASCII, and h11
# refuses spaces at either end), or nothing.
_HEADER_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?")
_HEADER_VALUE_WORDS = "printable ASCII, without spaces at either end"
# module:function, where function may be a dotted path (a class's static method).
_CALLABLE_REF = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")


def import_callable(ref: str) -> Callable[..., object]:
    """Import and return the callable that a ``module:function`` reference names.

    Raises:
        InputError: the reference is malformed, its module cannot be imported (any
            exception the import raises), or it names nothing callable.
    """
    match = _CALLABLE_REF.fullmatch(ref)
    if match is None:
        raise InputError(f"transform {ref!r} is not of the form module:function")
    module_name, attribute = match.groups()
    if module_name in ("__main__", "__mp_main__"):
        raise InputError(
            f"transform {ref!r} is in your script (__main__), which worker processes "
            "do not import: put it in a module they can import"
        )
    try:
        target: object = importlib.import_module(module_name)
    # User code: any exception while importing it is a usage error.
    except Exception as exc:
        raise InputError(
            f"cannot import transform module {module_name!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise InputError(
                f"transform module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not callable(target):
        raise InputError(f"transform {ref!r} is not callable")
    return target


def box_label(box: tuple[int, int]) -> str:
    """Return the name of a box: ``"256"`` for a square, ``"640x480"`` otherwise."""
    width, height = box
    return str(width) if width == height else f"{width}x{height}"


def _can_write(image_format: ImageFormat) -> bool:
    """Tell whether the installed Pillow can encode ``image_format``."""
    from PIL import Image  # only needed for this check; keeps settings import light

    Image.init()
    return image_format.name in Image.SAVE


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


# Long reprs (a pasted file, a huge list) are cut so the message stays one short line.
_SHOWN_CHARS = 80


def _refusal(
    label: str, expected: str, value: object, *, wrong_type: bool
) -> InputError:
    """Return the one-line error for a refused value: what was expected, what came.

    The value is shown by its ``repr`` (newlines escaped), with its type when the
    type is what is wrong (``got '8' (str)``, ``got True (bool)``); a date or time
    by its ISO form (``got 2026-01-01 (date)``).
    """
    try:
        # A date in a config file (TOML has them) is shown as written there.
        if isinstance(value, datetime.date | datetime.time):
            shown = value.isoformat()
        else:
            shown = repr(value)
    except ValueError:  # an int past Python's limit on digits to print
        shown = f"<{type(value).__name__} too large to show>"
    if len(shown) > _SHOWN_CHARS:
        shown = shown[: _SHOWN_CHARS - 3] + "..."
    if wrong_type:
        shown += f" ({type(value).__name__})"
    return InputError(f"{label} must be {expected}, got {shown}")


class Check(Protocol):
    """A field's check: refuses a bad value, returns the value to store."""

    @property
    def label(self) -> str:
        """The setting's name for people: the flag (``--threads``) or the field."""
        ...

    def __call__(self, value: object, label: str | None = None) -> object:
        """Return ``value`` as stored (converted where documented).

        Raises:
            InputError: ``value`` has the wrong type or is out of range; the message
                names ``label`` (default: ``self.label``).
        """
        ...


@dataclass(frozen=True, slots=True)
class Whole:
    """An integer from ``low`` to ``high``; bool, float and str are refused."""

    label: str
    low: int
    high: int
    unit: str = ""
    optional: bool = False
    """None is allowed too (it means "automatic")."""

    def __call__(self, value: object, label: str | None = None) -> object:
        """Return ``value`` as an ``int`` (numpy's integers are integers too)."""
        if value is None and self.optional:
            return None
        kind = f"a whole number of {self.unit}" if self.unit else "an integer"
        expected = f"{kind} from {self.low} to {self.high}"
        # bool is an int subclass, but True threads or retries is a mistake.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _refusal(label or self.label, expected, value, wrong_type=True)
        number = int(value)
        if not self.low <= number <= self.high:
            raise _refusal(label or self.label, expected, value, wrong_type=False)
        return number


@dataclass(frozen=True, slots=True)
class Number:
    """A real number from ``low`` (excluded when ``above``) to ``high``."""

    label: str
    low: float
    high: float
    unit: str = ""
    above: bool = False
    optional: bool = False
    """None is allowed too (it means "no limit")."""

    def __call__(self, value: object, label: str | None = None) -> object:
        """Return ``value`` as a ``float``; NaN and infinities fail the range."""
        if value is None and self.optional:
            return None
        kind = f"a number of {self.unit}" if self.unit else "a number"
        if self.above:
            expected = f"{kind} greater than {self.low:g} and at most {self.high:g}"
        else:
            expected = f"{kind} from {self.low:g} to {self.high:g}"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _refusal(label or self.label, expected, value, wrong_type=True)
        try:
            number = float(value)
        except OverflowError:  # an int too big for a float: far out of range
            number = math.inf
        # Written so that NaN, which compares false with everything, fails too.
        inside = self.low < number if self.above else self.low <= number
        if not (inside and number <= self.high):
            raise _refusal(label or self.label, expected, value, wrong_type=False)
        return number


@dataclass(frozen=True, slots=True)
class _Switch:
    """True or False, nothing that merely looks like one (1, "no", None)."""

    label: str

    def __call__(self, value: object, label: str | None = None) -> object:
        if not isinstance(value, bool):
            raise _refusal(label or self.label, "True or False", value, wrong_type=True)
        return value


@dataclass(frozen=True, slots=True)
class _Choice:
    """A member of ``options``, or its ``.value`` (what the flag takes), converted."""

    label: str
    options: type[enum.Enum]

    def __call__(self, value: object, label: str | None = None) -> object:
        if isinstance(value, self.options):
            return value
        if isinstance(value, str):
            try:
                return self.options(value)
            except ValueError:
                pass
        names = ", ".join(str(member.value) for member in self.options)
        raise _refusal(
            label or self.label,
            f"one of {names}",
            value,
            wrong_type=not isinstance(value, str),
        )


@dataclass(frozen=True, slots=True)
class _Location:
    """A non-empty path, given as ``str`` or ``os.PathLike``; stored as a ``Path``."""

    label: str

    def __call__(self, value: object, label: str | None = None) -> object:
        expected = "a non-empty path (str or os.PathLike) without NUL characters"
        text = os.fspath(value) if isinstance(value, str | os.PathLike) else None
        if not isinstance(text, str):  # not a path at all, or a bytes path
            raise _refusal(label or self.label, expected, value, wrong_type=True)
        # Path("") would quietly mean the current folder; no system call takes a NUL.
        if not text or "\0" in text:
            raise _refusal(label or self.label, expected, value, wrong_type=False)
        return Path(text)


@dataclass(frozen=True, slots=True)
class _Text:
    """A ``str``; with ``header``, one that an HTTP header can carry (``_HEADER_VALUE``:
    anything else failed every request, or crashed the client as it was made)."""

    label: str
    optional: bool = False
    header: bool = False

    def __call__(self, value: object, label: str | None = None) -> object:
        if value is None and self.optional:
            return None
        expected = f"a str of {_HEADER_VALUE_WORDS}" if self.header else "a str"
        if not isinstance(value, str):
            raise _refusal(label or self.label, expected, value, wrong_type=True)
        if self.header and not _HEADER_VALUE.fullmatch(value):
            raise _refusal(label or self.label, expected, value, wrong_type=False)
        return value


_RAY_ADDRESS = re.compile(
    r"(?:ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})"
)


@dataclass(frozen=True, slots=True)
class _RayAddress:
    """``auto``, or the ``HOST:PORT`` of a Ray cluster (``ray://`` for Ray Client).

    Checked here, before anything is written: Ray itself takes a malformed address
    only once the run has begun (and a bare word for a cluster it may look for)."""

    label: str

    def __call__(self, value: object, label: str | None = None) -> object:
        if value is None:
            return None
        expected = "auto or HOST:PORT (the head node's address, e.g. 10.0.0.5:6379)"
        if not isinstance(value, str):
            raise _refusal(label or self.label, expected, value, wrong_type=True)
        found = _RAY_ADDRESS.fullmatch(value)
        if value != "auto" and not (found and 0 < int(found[2]) < 65536):
            raise _refusal(label or self.label, expected, value, wrong_type=False)
        return value


@dataclass(frozen=True, slots=True)
class _Instance:
    """An instance of ``kind`` (a group of settings, made and checked on its own)."""

    label: str
    kind: type
    optional: bool = False
    """None is allowed too (the group is not used)."""

    def __call__(self, value: object, label: str | None = None) -> object:
        if value is None and self.optional:
            return None
        if not isinstance(value, self.kind):
            expected = f"an instance of {self.kind.__name__}"
            raise _refusal(label or self.label, expected, value, wrong_type=True)
        return value


def _pairs(value: object) -> list[object] | None:
    """The items of a list-like value; None for a str or bytes, or a non-iterable."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return None
    return list(value)


def _box(value: object, label: str) -> tuple[int, int]:
    """Check one box: a (width, height) pair of integers from 1 to BOX_SIDE_LIMIT."""
    expected = (
        "a (width, height) pair of integers greater than 0 and at most "
        f"{BOX_SIDE_LIMIT}"
    )
    sides = _pairs(value) if isinstance(value, Sequence) else None
    whole = [
        int(side)
        for side in sides or ()
        if isinstance(side, numbers.Integral) and not isinstance(side, bool)
    ]
    if sides is None or len(sides) != 2 or len(whole) != 2:
        raise _refusal(label, expected, value, wrong_type=True)
    width, height = whole
    if not (0 < width <= BOX_SIDE_LIMIT and 0 < height <= BOX_SIDE_LIMIT):
        raise InputError(  # the box shown as the command line writes it
            f"{label} sides must be greater than 0 and at most {BOX_SIDE_LIMIT}, "
            f"got {width}x{height}"
        )
    return width, height


@dataclass(frozen=True, slots=True)
class _Box:
    """One box, or None (no box: ``max_size`` decides)."""

    label: str

    def __call__(self, value: object, label: str | None = None) -> object:
        return None if value is None else _box(value, label or self.label)


@dataclass(frozen=True, slots=True)
class _Boxes:
    """Up to BOXES_LIMIT distinct boxes, from any sequence of pairs; a tuple."""

    label: str

    def __call__(self, value: object, label: str | None = None) -> object:
        label = label or self.label
        items = _pairs(value)
        if items is None or isinstance(value, Mapping):
            expected = "a sequence of (width, height) pairs"
            raise _refusal(label, expected, value, wrong_type=True)
        if len(items) > BOXES_LIMIT:
            raise InputError(
                f"{label} must be at most {BOXES_LIMIT} sizes, got {len(items)}"
            )
        boxes = tuple(_box(item, label) for item in items)
        repeated = sorted({box for box in boxes if boxes.count(box) > 1})
        if repeated:
            shown = ", ".join(box_label(box) for box in repeated)
            raise InputError(f"{label} must not repeat a size, got {shown} twice")
        return boxes


@dataclass(frozen=True, slots=True)
class _Hook:
    """A callable, or None (the built-in behaviour); for library callers only."""

    label: str

    def __call__(self, value: object, label: str | None = None) -> object:
        if value is not None and not callable(value):
            raise _refusal(
                label or self.label, "a callable or None", value, wrong_type=True
            )
        return value


@dataclass(frozen=True, slots=True)
class _ProxyUrl:
    """None, or an ``http://`` or ``https://`` proxy URL with a host."""

    label: str

    def __call__(self, value: object, label: str | None = None) -> object:
        label = label or self.label
        expected = "an http:// or https:// URL"
        if value is None:
            return None
        if not isinstance(value, str):
            raise _refusal(label, expected, value, wrong_type=True)
        try:
            parts = urlsplit(value)
            usable = parts.scheme in ("http", "https") and bool(parts.hostname)
            usable = usable and parts.port != 0
        except ValueError:
            usable = False
        if not usable or _HEADER_VALUE_FORBIDDEN.search(value):
            raise _refusal(label, expected, without_password(value), wrong_type=False)
        return value


_USERINFO = re.compile(r"//[^/@]*@")


def without_password(url: str) -> str:
    """``url`` with its user and password hidden (``http://***@host``).

    Never echo a password: the lines that name a proxy go to terminals and logs.
    """
    return _USERINFO.sub("//***@", url)


_PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")


def check_environment_proxies(http: HttpSettings) -> None:
    """Refuse, before a run starts, a proxy from the environment that httpx would
    refuse as it makes each client (``socks5://`` without its extra, an unknown
    scheme): that crashed every download thread or worker. ``--proxy`` replaces them.

    Raises:
        InputError: naming the variable, its value without a password.
    """
    if http.proxy is not None:
        return
    for name in _PROXY_VARIABLES:
        for variable in (name, name.lower()):
            value = os.environ.get(variable)
            if value:
                _ProxyUrl(f"{variable} (in the environment; or give --proxy)")(value)


@dataclass(frozen=True, slots=True)
class _Headers:
    """(name, value) pairs of ``str`` (or a mapping); a tuple of tuples."""

    label: str

    def __call__(self, value: object, label: str | None = None) -> object:
        label = label or self.label
        expected = "(name, value) pairs of str"
        items = _pairs(value.items() if isinstance(value, Mapping) else value)
        if items is None:
            raise _refusal(label, expected, value, wrong_type=True)
        pairs = []
        for item in items:
            pair = _pairs(item) if isinstance(item, Sequence) else None
            texts = [part for part in pair or () if isinstance(part, str)]
            if pair is None or len(pair) != 2 or len(texts) != 2:
                raise _refusal(label, expected, item, wrong_type=True)
            name, text = texts
            _require(
                HEADER_NAME.fullmatch(name) is not None,
                f"{label} name {name!r} is not a valid HTTP token",
            )
            _require(
                _HEADER_VALUE_FORBIDDEN.search(text) is None,
                f"{label} {name!r} has a line break or NUL in its value",
            )
            _require(
                _HEADER_VALUE.fullmatch(text) is not None,
                f"{label} {name!r} must have a value of {_HEADER_VALUE_WORDS}, "
                f"got {text[:_SHOWN_CHARS]!r}",
            )
            pairs.append((name, text))
        return tuple(pairs)


def _check_fields(settings: object, checks: Mapping[str, Check]) -> None:
    """Run each field's check; store the value it returns when that differs."""
    for name, check in checks.items():
        value = getattr(settings, name)
        checked = check(value)
        if checked is not value:
            object.__setattr__(settings, name, checked)


def _seconds(label: str, *, zero: bool = False) -> Number:
    """A number of seconds up to a day; 0 itself only with ``zero`` (a wait)."""
    return Number(label, 0, SECONDS_LIMIT, unit="seconds", above=not zero)


@dataclass(frozen=True, slots=True)
class Part:
    """Part ``number`` of ``count`` (``--part K/N``; numbered from 1, like job arrays).

    A run with a part handles only the inputs whose URL identity hashes to it
    (``downloader.parts.part_of``), so N runs of one list, on any machines sharing
    the output folder, split it without talking to each other.
    """

    number: int
    count: int

    def __post_init__(self) -> None:
        Whole("--part N", 1, PARTS_LIMIT)(self.count)
        Whole("--part K", 1, int(self.count))(self.number)

    @property
    def label(self) -> str:
        """The part in file names: ``part-2-of-3``."""
        return f"part-{self.number}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.number}/{self.count}"


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpSettings:
    """How one URL is fetched: timeouts, retries, limits.

    Every field is checked (type and range, see ``_HTTP_CHECKS``); seconds may be
    given as ints and are stored as floats, and ``headers`` may be any iterable of
    (name, value) pairs or a mapping, stored as a tuple of pairs.
    """

    timeout: float = 30.0
    """Seconds for connecting and for each read (httpx's per-operation timeout)."""
    deadline: float = 300.0
    """Seconds for a whole download, so a slow drip cannot hold a thread."""
    retries: int = 3
    """Extra attempts after a transient failure (connection, timeout, 429, 5xx)."""
    backoff: float = 0.5
    """Base of the exponential backoff between attempts, in seconds (jittered)."""
    max_backoff: float = 30.0
    """Cap on one wait between attempts, ``Retry-After`` included."""
    max_bytes: int = 100 * MEGABYTE
    """A body larger than this (as written to disk) fails the URL."""
    max_redirects: int = 5
    per_host: int = 4
    """Concurrent connections to one host:port."""
    rate_per_host: float | None = None
    """Most requests per second to one host:port (every hop and retry counts), for
    the whole run in every mode; None: no limit but ``per_host``."""
    min_speed: int = 1024
    """Bytes per second below which a body counts as stalled when measured over
    ``timeout`` seconds (0: no minimum)."""
    user_agent: str = USER_AGENT
    headers: tuple[tuple[str, str], ...] = ()
    """Extra request headers (name, value); they replace defaults of the same name."""
    verify: bool = True
    """Verify TLS certificates; False (``--insecure``) is recorded in the manifest."""
    block_private: bool = False
    """Refuse hosts that resolve to loopback, private, link-local or metadata
    addresses, on every redirect hop too (``--block-private``); the connection is made
    to the address checked."""
    proxy: str | None = None
    """Send every request through this http(s) proxy (``--proxy``); None: the
    environment's (``HTTPS_PROXY``, ``NO_PROXY``, ...), as httpx reads them."""
    honour_noai: bool = True
    """Fail a URL whose response says ``X-Robots-Tag: noai`` or ``noimageai`` (for
    every agent, or for ours), keeping nothing (``--ignore-noai`` turns it off)."""
    resolver: Callable[[str, int], list[str]] | None = None
    """Host and port → addresses, instead of the system's resolver (library only:
    a test, or your own DNS). Must be picklable for the modes with processes."""
    block_policy: Callable[[str], str | None] | None = None
    """An address → why ``block_private`` refuses it, or None; default: loopback,
    private, link-local and the like (``blocked_address_kind``). Library only."""

    def __post_init__(self) -> None:
        _check_fields(self, _HTTP_CHECKS)


_HTTP_CHECKS: Mapping[str, Check] = {
    "timeout": _seconds("--timeout"),
    "deadline": _seconds("--deadline"),
    "retries": Whole("--retries", 0, RETRIES_LIMIT),
    "backoff": _seconds("backoff", zero=True),
    "max_backoff": _seconds("max_backoff", zero=True),
    "max_bytes": Whole("--max-bytes", 1, BYTES_LIMIT, unit="bytes"),
    "max_redirects": Whole("max_redirects", 0, REDIRECTS_LIMIT),
    "per_host": Whole("--per-host", 1, THREADS_LIMIT),
    "rate_per_host": Number(
        "--rate-per-host",
        0,
        RATE_LIMIT,
        unit="requests per second",
        above=True,
        optional=True,
    ),
    "min_speed": Whole("min_speed", 0, SPEED_LIMIT, unit="bytes per second"),
    "user_agent": _Text("--user-agent", header=True),
    "headers": _Headers("--header"),
    "verify": _Switch("verify"),
    "block_private": _Switch("--block-private"),
    "proxy": _ProxyUrl("--proxy"),
    "honour_noai": _Switch("honour_noai"),
    "resolver": _Hook("resolver"),
    "block_policy": _Hook("block_policy"),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageSpec:
    """What the transform stage makes of each downloaded image.

    The box is ``sizes`` (several outputs), else ``size``, else ``max_size`` square.
    With several boxes the largest (by area) makes the main output
    ``{stem}.{ext}``; each other box ``B`` makes ``{label}/{stem}.{ext}``, where the
    label is ``"256"`` for a square box and ``"640x480"`` otherwise.

    Every field is checked (type and range, see ``_IMAGE_CHECKS``); ``resize`` and
    ``format`` also take their string value (``"fill"``, ``"png"``), and boxes any
    sequence of two integers, stored as the enum member and tuples.
    """

    resize: ResizeMode = ResizeMode.FIT
    max_size: int = 1024
    """Side of the square box when neither ``size`` nor ``sizes`` is given."""
    size: tuple[int, int] | None = None
    """The box as (width, height) in pixels."""
    sizes: tuple[tuple[int, int], ...] = ()
    """Several boxes: one output each, from one decode."""
    upscale: bool = False
    """Enlarge images smaller than the box (otherwise they are never enlarged)."""
    format: ImageFormat = ImageFormat.JPEG
    quality: int = 85
    """JPEG, WebP and AVIF quality (PNG is lossless)."""
    progressive: bool = False
    """Write progressive JPEGs."""
    optimize: bool = False
    """Spend more time for smaller files (JPEG optimize, PNG level 9, WebP method 6)."""
    keep_metadata: bool = False
    """Keep EXIF (minus the orientation, which is applied) and the ICC profile."""
    grayscale: bool = False
    resample: Resample = Resample.BALANCED
    """Speed against fidelity of the resize (``--resample``)."""
    transform: str | None = None
    """``module:function`` applied to each output image after the built-in steps."""
    max_pixels: int = MAX_PIXELS_DEFAULT
    """Images with more pixels than this are refused as decompression bombs
    (``--max-pixels``), before any pixel is decoded."""

    def __post_init__(self) -> None:
        _check_fields(self, _IMAGE_CHECKS)
        _require(
            self.resize is not ResizeMode.NONE or not (self.sizes or self.size),
            "resize 'none' keeps the pixel size: give no size or sizes with it",
        )
        if self.format not in (ImageFormat.KEEP, ImageFormat.JPEG):
            _require(
                _can_write(self.format),
                f"this Pillow cannot write {self.format.name} images "
                f"(format {self.format.value!r} is not supported here)",
            )
        if self.transform is not None:
            import_callable(self.transform)

    @property
    def boxes(self) -> tuple[tuple[int, int], ...]:
        """The boxes to make, the main output's first; empty for resize 'none'."""
        if self.resize is ResizeMode.NONE:
            return ()
        if self.sizes:
            main = max(self.sizes, key=lambda box: box[0] * box[1])
            return (main, *(box for box in self.sizes if box != main))
        return (self.size or (self.max_size, self.max_size),)


_IMAGE_CHECKS: Mapping[str, Check] = {
    "resize": _Choice("--resize", ResizeMode),
    "max_size": Whole("--max-size", 1, BOX_SIDE_LIMIT),
    "size": _Box("--size"),
    "sizes": _Boxes("--sizes"),
    "upscale": _Switch("--upscale"),
    "format": _Choice("--format", ImageFormat),
    "quality": Whole("--quality", 1, 100),
    "progressive": _Switch("--progressive"),
    "optimize": _Switch("--optimize"),
    "keep_metadata": _Switch("--keep-metadata"),
    "grayscale": _Switch("--grayscale"),
    "resample": _Choice("--resample", Resample),
    "transform": _Text("--transform", optional=True),
    "max_pixels": Whole("--max-pixels", 1, PIXELS_LIMIT),
}


# Worker processes one download process keeps busy. Measured on 16 cores (README,
# "Scaling"): 8 workers transform ~145 images/s of 1-12 MP photos, and one download
# process fed them ~100-130 (its GIL is the cap); two fed them ~115-135, 0.92 of the
# bare loop against 0.84. One per 4 keeps that headroom at every size.
DOWNLOAD_PROC_PER_WORKERS = 4


def _default_procs() -> int:
    """This machine's cores, within the bound (so the default is always valid)."""
    return min(os.cpu_count() or 1, PROCS_LIMIT)


def _require_parquet(part: Part | None) -> None:
    """Refuse ``--parquet`` where no index can be written: without pyarrow, or in a
    part (whose records are only a share of the folder's until they are merged)."""
    _require(
        part is None,
        "--parquet does not go with --part (a part's records are a share of the "
        "folder's): give it to --merge-parts, which indexes the merged manifest",
    )
    _require(
        importlib.util.find_spec("pyarrow") is not None,
        f"--parquet needs pyarrow, which is not installed: {PARQUET_EXTRA_HINT}",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything one run needs; ``HttpSettings`` and ``ImageSpec`` hold the groups.

    Every field is checked (type and range, see ``_SETTINGS_CHECKS``); ``out`` may be
    any ``str`` or ``os.PathLike`` (stored as a ``Path``), ``mode`` and ``name_by``
    also take their string value (``"threads"``), and seconds may be ints.
    """

    out: Path = Path("output")
    mode: Mode = Mode.PIPELINE
    threads: int = 8
    procs: int = field(default_factory=_default_procs)
    download_procs: int | None = None
    """Processes the pipeline's download threads run in (``--download-procs``); None
    picks one per 4 worker processes (see ``download_processes``)."""
    force: bool = False
    """Redo URLs that the manifest in ``out`` already records as ok."""
    name_by: NameBy = NameBy.URL
    """Name outputs after the URL or after the body's SHA-256 (``--name-by``)."""
    keep_originals: bool = False
    """Keep each download under ``out/originals/`` (``--keep-originals``); a rerun
    with other image settings then works from them instead of downloading again."""
    item_timeout: float = 120.0
    """Seconds one image may take in a worker before that worker is replaced."""
    max_tasks_per_worker: int = 1000
    """A worker process is recycled after this many images, to bound its memory."""
    stall_report: float = 60.0
    """Seconds without any item finishing after which the URLs in progress are logged
    (logger ``downloader``, warning); the run goes on."""
    output_format: OutputFormat = OutputFormat.FILES
    """One file per image, or tar shards (``--output-format``)."""
    shard_size: int = 1000
    """Consecutive list entries per Ray task (``--mode ray``) and per tar shard
    (``--output-format webdataset``): one flag, one slice (``--shard-size``)."""
    ray_address: str | None = None
    """``--mode ray``: the cluster to join (``auto`` or an address); None starts a
    local Ray for the run, on 127.0.0.1 only (``--ray-address``)."""
    http: HttpSettings = field(default_factory=HttpSettings)
    image: ImageSpec = field(default_factory=ImageSpec)
    part: Part | None = None
    """Handle only this part of the list (``--part K/N``); None: all of it."""
    parquet: bool = False
    """Write ``out/manifest.parquet``, one row per manifest record, when the run ends
    (``--parquet``; the extra ``downloader[parquet]``)."""

    def __post_init__(self) -> None:
        _check_fields(self, _SETTINGS_CHECKS)
        if self.parquet:
            _require_parquet(self.part)
        # Content names are shared by every URL with that body, whichever part has
        # it: two parts could write, or a redo remove, the same file.
        _require(
            self.part is None or self.name_by is not NameBy.SHA256,
            "--name-by sha256 does not go with --part: outputs named by content are "
            "shared between URLs of different parts, which would write and remove "
            "the same files",
        )
        if self.output_format is OutputFormat.WEBDATASET:
            _check_webdataset(self)
        if self.mode is Mode.RAY:
            _require(
                self.name_by is NameBy.URL,
                "--name-by sha256 does not go with --mode ray (identical bodies "
                "would be found only within one task): use --name-by url",
            )
            # Ray already splits the list (shards over the cluster's nodes), and its
            # leftover shards are merged into the folder's manifest, not a part's.
            _require(
                self.part is None,
                "--part does not go with --mode ray (Ray already splits the list "
                "over the cluster): run --mode ray once, or --part K/N in a local mode",
            )
            _require(
                importlib.util.find_spec("ray") is not None,
                f"--mode ray needs Ray, which is not installed: {RAY_EXTRA_HINT}",
            )

    @property
    def download_processes(self) -> int:
        """Return how many download processes a pipeline run starts.

        ``download_procs`` when given; else one per 4 worker processes, at least 1
        (one process's GIL caps its downloads near ~120 photos/s, what 6-7 workers
        transform), never more than ``threads``.
        """
        if self.download_procs is not None:
            return self.download_procs
        return max(1, min(self.procs // DOWNLOAD_PROC_PER_WORKERS, self.threads))


def _check_webdataset(settings: Settings) -> None:
    """Refuse what tar shards cannot go with (one line each, exit 2)."""
    # A sample is one URL's own bytes: outputs shared by content have no one key.
    _require(
        settings.name_by is NameBy.URL,
        "--name-by sha256 does not go with --output-format webdataset (each sample "
        "holds its own image, so there is nothing to share): use --name-by url",
    )
    # Parts would number their shards alike in one folder.
    _require(
        settings.part is None,
        "--part does not go with --output-format webdataset (the parts' shards "
        "would share numbers): run the list whole, or --output-format files",
    )


_SETTINGS_CHECKS: Mapping[str, Check] = {
    "out": _Location("--out"),
    "mode": _Choice("--mode", Mode),
    "threads": Whole("--threads", 1, THREADS_LIMIT),
    "procs": Whole("--procs", 1, PROCS_LIMIT),
    "download_procs": Whole("--download-procs", 1, PROCS_LIMIT, optional=True),
    "force": _Switch("--force"),
    "name_by": _Choice("--name-by", NameBy),
    "keep_originals": _Switch("--keep-originals"),
    "item_timeout": _seconds("--item-timeout"),
    "max_tasks_per_worker": Whole("max_tasks_per_worker", 1, TASKS_LIMIT),
    "stall_report": _seconds("stall_report"),
    "output_format": _Choice("--output-format", OutputFormat),
    "shard_size": Whole("--shard-size", 1, SHARD_SIZE_LIMIT),
    "ray_address": _RayAddress("--ray-address"),
    "http": _Instance("http", HttpSettings),
    "image": _Instance("image", ImageSpec),
    "part": _Instance("--part", Part, optional=True),
    "parquet": _Switch("--parquet"),
}

OPTION_CHECKS: Mapping[str, Check] = {
    check.label.removeprefix("--"): check
    for checks in (_SETTINGS_CHECKS, _HTTP_CHECKS, _IMAGE_CHECKS)
    for check in checks.values()
    if check.label.startswith("--")
}
"""The check of each setting that has a flag, by long option name (``"threads"``):
the config file checks its values with them, so that it refuses what ``Settings``
refuses, in the same words."""
