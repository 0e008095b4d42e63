"""``--dry-run``: check a list and say what a run would do, without doing any of it.

::

    source ──read_lines──► Line ──plan_jobs──► Job / Outcome
                 │                               │
                 └── lines that yield nothing ───┴──► PlannedItem per input line:
                     (duplicates)                     fetch / process / skip /
                                                      invalid / duplicate
    OUT/manifest.jsonl (read only, if there) ──► which URLs would be skipped

With ``--part K/N`` the plan holds only the part's lines (a duplicate goes with the
URL it repeats); ``other_parts`` counts the lines left to the other parts, and the
part's own record file is read as well as the manifest.

Nothing is fetched and no name is looked up in DNS; the output folder is neither
created nor locked, and the manifest is only read. The whole plan is kept in memory,
so this is for checking lists, not for streaming huge ones.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit

from downloader.manifest import OutputFolder, PreviousRun
from downloader.parts import part_of
from downloader.records import Job, Outcome, aside
from downloader.resolve import BlockPolicy, blocked_address_kind
from downloader.reuse import settings_fingerprint
from downloader.settings import ImageFormat, NameBy, OutputFormat, Part, Settings
from downloader.shard_writer import (
    ShardIndex,
    first_free_number,
    sample_key,
    shard_name,
)
from downloader.sources import (
    Line,
    LocalFiles,
    Source,
    UrlList,
    check_url,
    local_jobs,
    normalize_url,
    plan_jobs,
    read_lines,
)
from downloader.transform import output_names

__all__ = ["Action", "DryRun", "PlannedItem", "dry_run", "dry_run_json", "print_plan"]

LOCAL_HOST = "(local files)"
"""The "host" that ``--input-dir`` files are counted under."""
BY_CONTENT = "(named by content)"
"""The output path shown with ``--name-by sha256``: known only after the download."""
# How an output name is shown when its extension follows the source (format keep).
_ANY_EXTENSION = "*"


class Action(enum.Enum):
    """What a run would do with one input line."""

    FETCH = "fetch"
    PROCESS = "process"
    """A local file (``--input-dir``, or a kept original): processed, not downloaded."""
    SKIP = "skip"
    """Already ok in the manifest (and its image is there)."""
    INVALID = "invalid"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class PlannedItem:
    """One input line and what a run would do with it."""

    action: Action
    url: str
    line: int | None
    path: str | None = None
    """The main output, relative to the output folder."""
    outputs: tuple[str, ...] = ()
    """The other outputs (one per extra size)."""
    reason: str | None = None
    """Why it is invalid, skipped or a duplicate."""


@dataclass(frozen=True, slots=True)
class DryRun:
    """The plan of a run: every input line in order, and the fetches per host."""

    items: tuple[PlannedItem, ...]
    hosts: dict[str, int]
    """host[:port] → URLs that would be fetched there, most first."""
    out: Path
    part: Part | None = None
    other_parts: int = 0
    """With a part: the lines of the list that belong to the other parts."""

    @property
    def counts(self) -> dict[Action, int]:
        """Lines per action (every action present, maybe 0)."""
        found = Counter(item.action for item in self.items)
        return {action: found[action] for action in Action}

    @property
    def ok(self) -> bool:
        """True if every line is usable (duplicates and skips are fine)."""
        return self.counts[Action.INVALID] == 0


def dry_run(source: Source, settings: Settings) -> DryRun:
    """Plan a run of ``source`` with ``settings`` without fetching or writing anything.

    Raises:
        InputError: the list cannot be read (as ``run`` would raise it).
        OutputError: an existing manifest cannot be read.
    """
    previous = _previous_run(settings)
    first = 0 if settings.force else first_free_number(settings.out)
    items = []
    other_parts = 0
    for item in _planned(source, settings):
        part = settings.part
        if part is not None and part_of(item.url, part.count) != part.number:
            other_parts += 1
        elif isinstance(item, Job):
            items.append(_plan_job(item, settings, previous, first))
        else:
            items.append(item)
    hosts = Counter(
        _host(item.url) for item in items if item.action is Action.FETCH
    ) + Counter(LOCAL_HOST for item in items if item.action is Action.PROCESS)
    return DryRun(
        tuple(items),
        dict(hosts.most_common()),
        settings.out,
        settings.part,
        other_parts,
    )


def _previous_run(settings: Settings) -> PreviousRun | None:
    # An OutputFolder that is never entered: nothing is created or locked.
    folder = OutputFolder.for_settings(settings)
    names = (folder.files.manifest, folder.files.base)
    if settings.force or not any(
        name and (settings.out / name).is_file() for name in names
    ):
        return None
    return PreviousRun(
        folder,
        fingerprint=settings_fingerprint(settings),
        holds=ShardIndex(settings.out).holds,
    )


def _planned(source: Source, settings: Settings) -> Iterator[Job | PlannedItem]:
    """Yield jobs, and a ``PlannedItem`` for every invalid or duplicate line."""
    if isinstance(source, LocalFiles):
        yield from (
            item
            for item in local_jobs(source.pattern, exclude=settings.out)
            if isinstance(item, Job)
        )
        return
    if isinstance(source, UrlList):
        lines = read_lines(source.source, source.format)
    else:
        lines = read_lines(source)
    yield from _with_duplicates(lines)


def _with_duplicates(lines: Iterable[Line]) -> Iterator[Job | PlannedItem]:
    """Run ``plan_jobs`` and name the lines it drops silently as duplicates."""
    consumed: list[Line] = []
    first_line: dict[str, int] = {}

    def tap() -> Iterator[Line]:
        for line in lines:
            consumed.append(line)
            yield line

    for item in plan_jobs(tap()):
        # plan_jobs yields for a line before reading the next one, so the last line
        # read made this item and any before it were dropped.
        *dropped, _ = consumed
        consumed.clear()
        yield from _duplicates(dropped, first_line)
        if isinstance(item, Job):
            first_line.setdefault(item.key, item.line)
            yield item
        else:
            first_line.setdefault(item.url, item.line or 0)
            yield _invalid(item)
    yield from _duplicates(consumed, first_line)


def _duplicates(lines: list[Line], first_line: dict[str, int]) -> Iterator[PlannedItem]:
    for line in lines:
        valid = line.error is None and check_url(line.text) is None
        first = first_line.get(normalize_url(line.text) if valid else line.text)
        yield PlannedItem(
            Action.DUPLICATE, line.text, line.number, reason=f"same as line {first}"
        )


def _invalid(outcome: Outcome) -> PlannedItem:
    return PlannedItem(Action.INVALID, outcome.url, outcome.line, reason=outcome.error)


def _plan_job(
    job: Job, settings: Settings, previous: PreviousRun | None, first: int
) -> PlannedItem:
    """``first``: the number of the first new shard (``--output-format
    webdataset``)."""
    if job.local_path is not None:
        path, *others = _output_names(job, settings, first)
        return PlannedItem(Action.PROCESS, job.url, job.line, path, tuple(others))
    earlier = previous.earlier(job.url) if previous is not None else None
    if previous is not None and earlier is not None:
        if previous.current(earlier):
            return PlannedItem(
                Action.SKIP,
                job.url,
                job.line,
                earlier.path or _in_shard(earlier.shard, earlier.key),
                earlier.outputs or (),
                reason="already ok in the manifest (use --force to redo)",
            )
        if previous.kept_original(earlier) is not None:
            path, *others = _output_names(job, settings, first)
            return PlannedItem(
                Action.PROCESS,
                job.url,
                job.line,
                path,
                tuple(others),
                reason="settings changed: redone from the kept original",
            )
    http = settings.http
    policy = http.block_policy or blocked_address_kind
    blocked = _blocked_literal(job.key, policy) if http.block_private else None
    if blocked is not None:
        return PlannedItem(Action.INVALID, job.url, job.line, reason=blocked)
    path, *others = _output_names(job, settings, first)
    return PlannedItem(Action.FETCH, job.url, job.line, path, tuple(others))


def _in_shard(shard: str | None, key: str | None) -> str | None:
    """How a sample is shown: ``00003.tar:000000123``."""
    return None if shard is None else f"{shard}:{key}"


def _output_names(job: Job, settings: Settings, first: int) -> list[str]:
    if settings.name_by is NameBy.SHA256:
        return [BY_CONTENT]
    names = _file_names(job.stem, settings)
    if settings.output_format is OutputFormat.WEBDATASET:
        shard = shard_name(first + job.index // settings.shard_size)
        extension = PurePosixPath(names[0]).suffix
        return [f"{_in_shard(shard, sample_key(job.index))}{extension}"]
    return names


def _file_names(stem: str, settings: Settings) -> list[str]:
    spec = settings.image
    if spec.format is not ImageFormat.KEEP:
        return output_names(stem, spec, spec.format)
    names = output_names(stem, spec, ImageFormat.JPEG)
    return [name.removesuffix(".jpg") + "." + _ANY_EXTENSION for name in names]


def _host(url: str) -> str:
    """``url``'s host and port as the key writes them (IDNA, lowercased)."""
    return urlsplit(normalize_url(url)).netloc.rpartition("@")[2]


def _blocked_literal(key: str, policy: BlockPolicy) -> str | None:
    """Why ``--block-private`` would refuse a URL whose host is an IP address.

    Only numeric hosts are judged (``inet_aton`` reads ``127.1`` or ``0x7f.1`` as
    the OS would, without any lookup); names would need DNS, which a dry run avoids.
    """
    host = urlsplit(key).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    kind = policy(str(address))
    if kind is None:
        return None
    return f"blocked address {address} ({kind}, --block-private)"


def dry_run_json(plan: DryRun) -> dict[str, Any]:
    """The plan as plain JSON types (what ``--dry-run --json`` prints)."""
    return {
        "ok": plan.ok,
        "out": str(plan.out),
        **(
            {}
            if plan.part is None
            else {"part": str(plan.part), "other_parts": plan.other_parts}
        ),
        "counts": {action.value: n for action, n in plan.counts.items()},
        "hosts": plan.hosts,
        "items": [
            {
                key: value
                for key, value in (
                    ("action", item.action.value),
                    ("line", item.line),
                    ("url", item.url),
                    ("path", item.path),
                    ("outputs", list(item.outputs) or None),
                    ("reason", item.reason),
                )
                if value is not None
            }
            for item in plan.items
        ],
    }


def print_plan(plan: DryRun, *, file: IO[str]) -> None:
    """Print the plan for a person: one line per input line, then the totals."""
    for item in plan.items:
        file.write(_describe(item, plan.out) + "\n")
    counts = plan.counts
    part = "" if plan.part is None else f" (part {plan.part})"
    others = (
        ""
        if plan.part is None
        else f"; {plan.other_parts} entries of the other parts not shown"
    )
    file.write(
        f"dry run{part}: {len(plan.items)} entries: "
        + ", ".join(f"{n} {action.value}" for action, n in counts.items() if n)
        + f"{others}; nothing was downloaded or written\n"
    )
    if plan.hosts:
        per_host = ", ".join(f"{host} {n}" for host, n in plan.hosts.items())
        file.write(f"  per host: {per_host}\n")


def _describe(item: PlannedItem, out: Path) -> str:
    where = f"line {item.line}: " if item.line is not None else ""
    if item.action in (Action.FETCH, Action.PROCESS, Action.SKIP):
        paths = [
            name if name == BY_CONTENT else str(out / name)
            for name in (item.path, *item.outputs)
            if name
        ]
        target = f" -> {', '.join(paths)}" if paths else ""
        line = f"{where}{item.action.value} {item.url}{target}"
        return aside(line, item.reason) if item.reason else line
    return f"{where}{item.action.value} {item.url} -- {item.reason}"
