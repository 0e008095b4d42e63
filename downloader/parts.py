"""Several runs of one list into one folder, without a coordinator, then one manifest.

::

    the list ──► every part reads all of it ──only_part──► the inputs whose record_key
                                                          hashes to part K (of N)
    part K (--part K/N), on any machine that shares OUT:
        OUT/.lock shared, OUT/.lock.part-K-of-N alone    (manifest.RecordFiles)
        OUT/.tmp/part-K-of-N/                            its scratch folder
        OUT/manifest.part-K-of-N.jsonl                   its records, one write each
        OUT/manifest.part-K-of-N.json                    its header: K, N, settings,
                                                         complete (start/finish_part)
    merge_parts(OUT) ──► OUT/.lock alone (no part runs)
                     ──► OUT/manifest.jsonl, OUT/failed.txt

- A part is a hash split: ``part_of`` takes the manifest's own URL identity
  (``manifest.record_key``), so every machine and Python process computes the same
  split, duplicates of a URL fall in one part, and a change of that identity follows.
- A part writes its records as a run writes the manifest (``ManifestWriter`` over its
  own ``RecordFiles``): appended and flushed per record, a torn last line ignored and
  a killed part's leftovers merged when it starts again. It resumes from its own file
  and from the folder's manifest (a merged one, or an earlier run's).
- The header says whether the part finished: ``complete`` is written false when it
  starts and true only when it reached the end of its list, with a digest of the whole
  list it read (``ListDigest``) and the size of its record file then. ``merge_parts``
  refuses a folder whose parts are missing, unfinished, made with another N or
  settings, made from different lists (a list that grew between two array tasks), or
  whose record files changed since they finished (cut or emptied by hand): each of
  those would lose records without a word.
- The merge is the single writer's (``OutputFolder.merge_files``): the old manifest's
  lines, then the parts' (later lines win, so a redone URL's new record replaces its
  old one). Part files are kept, so merging again gives the same manifest; while they
  are there a run without ``--part`` is refused (``refuse_parts``), so that only the
  merge writes the manifest.

``--mode ray``'s shards (``ray_shards``) share the merge, not the files: a shard's
task appends to ``OUT/.parts/`` under its driver's lock, the driver writes the
manifest, and only what a killed driver left is merged (``OutputFolder.merge_files``)
by the next run without ``--part``; a part run is refused while such leftovers are
there (``ray_shards.merge_leftover_parts``), and ``--part`` does not go with ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from downloader.errors import InputError, OutputError
from downloader.manifest import (
    INDEX_NAME,
    MANIFEST_NAME,
    OutputFolder,
    RecordFiles,
    read_outcomes,
    record_key,
    refuse_link,
)
from downloader.parquet_index import import_pyarrow, write_index
from downloader.records import Job, Outcome, Status
from downloader.settings import PARTS_LIMIT, VERSION, Part

__all__ = [
    "ListDigest",
    "Merged",
    "finish_part",
    "merge_parts",
    "only_part",
    "part_of",
    "refuse_parts",
    "start_part",
]

_PART_FILE = re.compile(r"manifest\.part-([0-9]+)-of-([0-9]+)\.jsonl?\Z")
"""A part's record file or header (``RecordFiles.for_part`` and ``_header_name``)."""
# Bytes of the record key read as the part's number: 64 bits spread any N evenly.
_KEY_BYTES = 8
# Names listed in one message, so that it stays one short line.
_SHOWN = 3


def part_of(url: str, count: int) -> int:
    """Return the part (1 to ``count``) that ``url`` belongs to.

    From the manifest's identity of the URL (``record_key``: normalised, then a
    BLAKE2 digest), never ``hash()``, which differs between Python processes.
    """
    return _part_of_key(record_key(url), count)


def _part_of_key(key: bytes, count: int) -> int:
    return int.from_bytes(key[:_KEY_BYTES], "big") % count + 1


class ListDigest:
    """A digest of every entry of the list, in order, as a part reads it.

    Every part reads the whole list, so parts of one list have one digest; the merge
    refuses parts whose digests differ (a list that grew, or another copy of it).
    """

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=16)
        self._entries = 0

    def add(self, key: bytes) -> None:
        """Count one entry (a job or an unusable line's record) by its record key."""
        self._hash.update(key)
        self._entries += 1

    def value(self) -> str:
        """``ENTRIES:DIGEST``: the count tells a person what differs."""
        return f"{self._entries}:{self._hash.hexdigest()}"


def only_part(
    items: Iterator[Job | Outcome], part: Part | None, digest: ListDigest | None = None
) -> Iterator[Job | Outcome]:
    """Keep the jobs and records of unusable lines that belong to ``part``.

    Applied after the whole list is planned, so that names (and the stems of a
    ``name`` column, which depend on the lines before) are those of a single run.
    ``digest`` sees every entry, this part's or not.
    """
    if part is None:
        return items
    return _only_part(items, part, digest or ListDigest())


def _only_part(
    items: Iterator[Job | Outcome], part: Part, digest: ListDigest
) -> Iterator[Job | Outcome]:
    for item in items:
        key = record_key(item.url)  # once: the digest's and the split's
        digest.add(key)
        if _part_of_key(key, part.count) == part.number:
            yield item


@dataclass(frozen=True, slots=True)
class _Header:
    """What a part says about itself in ``manifest.part-K-of-N.json``."""

    part: Part
    settings: str
    """The settings fingerprint (``reuse.settings_fingerprint``) it ran with."""
    complete: bool
    list_digest: str | None = None
    """``ListDigest.value()`` of the list it read to the end (None: not finished)."""
    record_bytes: int | None = None
    """The size of its record file when it finished (None: not finished)."""

    def to_bytes(self) -> bytes:
        facts = {
            "part": self.part.number,
            "parts": self.part.count,
            "settings": self.settings,
            "complete": self.complete,
            "list": self.list_digest,
            "record_bytes": self.record_bytes,
            "version": VERSION,
        }
        return json.dumps(facts).encode("utf-8") + b"\n"


def _header_name(part: Part) -> str:
    return f"manifest.{part.label}.json"


def start_part(folder: OutputFolder, part: Part | None, fingerprint: str) -> None:
    """Check the entered ``folder`` for a run; for a part, mark it started.

    Raises:
        OutputError: without a part, the folder holds parts (``refuse_parts``); with
            one, it holds parts of a split into another N.
    """
    if part is None:
        refuse_parts(folder.path)
        return
    others = sorted(
        {count for _, count, name in _part_files(folder.path) if count != part.count}
    )
    if others:
        raise OutputError(
            f"{folder.path} holds parts of a split into {_and(others)} "
            f"(manifest.part-K-of-{others[0]}.*): use --part K/{others[0]}, or merge "
            "them (--merge-parts) and remove their files, or choose another --out"
        )
    folder.replace_file(
        _header_name(part), [_Header(part, fingerprint, False).to_bytes()]
    )


def finish_part(
    folder: OutputFolder, part: Part | None, fingerprint: str, digest: ListDigest
) -> None:
    """Mark ``part`` complete: it reached the end of its list (None: nothing to do).

    Called once its records are all written: the header keeps their file's size.
    """
    if part is not None:
        size = _size(folder, RecordFiles.for_part(part).manifest)
        header = _Header(part, fingerprint, True, digest.value(), size)
        folder.replace_file(_header_name(part), [header.to_bytes()])


def _size(folder: OutputFolder, name: str) -> int:
    try:
        return (folder.path / name).lstat().st_size
    except OSError as exc:
        raise OutputError(f"cannot read {folder.path / name}: {exc.strerror}") from exc


def refuse_parts(out: Path) -> None:
    """Refuse a run without ``--part`` on a folder that holds the files of parts.

    Raises:
        OutputError: naming them and what to do.
    """
    names = sorted(name for _, _, name in _part_files(out))
    names = [name for name in names if name.endswith(".jsonl")] or names
    if names:
        raise OutputError(
            f"{out} holds the files of a --part run ({_listed(names)}): run with "
            "--part K/N, or --merge-parts; to run without --part, merge, then "
            "remove manifest.part-* (their records are in manifest.jsonl)"
        )


@dataclass(frozen=True, slots=True)
class Merged:
    """What ``merge_parts`` made."""

    parts: int
    manifest: Path
    counts: dict[Status, int]
    """Records of the merged manifest per status (every status present, maybe 0)."""

    @property
    def records(self) -> int:
        """Lines of the merged manifest: one per URL."""
        return sum(self.counts.values())


def merge_parts(out: Path, *, parquet: bool = False) -> Merged:
    """Merge the parts in ``out`` into ``manifest.jsonl`` and ``failed.txt``.

    Safe to run again: the part files are kept and the result is the same. Holds the
    folder's lock alone, so it is refused while a part (or any run) uses the folder.
    With ``parquet``, the merged manifest's index is written too (``--parquet``).

    Raises:
        InputError: ``parquet`` without pyarrow installed (before anything is done).
        OutputError: no parts, a part missing or unfinished, parts of several N or
            made with different settings, or the folder is in use or unusable.
    """
    if parquet:
        import_pyarrow()
    if not out.is_dir():
        raise OutputError(f"{out} is not a folder: no parts to merge")
    with OutputFolder(out) as folder:
        if parquet:  # refused before the merge, as a run refuses it before fetching
            refuse_link(folder.path / INDEX_NAME)
        parts = _finished_parts(folder)
        record_files = [RecordFiles.for_part(part).manifest for part in parts]
        folder.merge_files(MANIFEST_NAME, [MANIFEST_NAME, *record_files])
        folder.write_failed_list()
        if parquet:
            write_index(folder)
        found = Counter(outcome.status for outcome in read_outcomes(folder))
    return Merged(
        len(parts), folder.manifest, {status: found[status] for status in Status}
    )


def _finished_parts(folder: OutputFolder) -> list[Part]:
    """The parts 1..N of the folder's one split, each complete, with one settings."""
    files = _part_files(folder.path)
    counts = sorted({count for _, count, _ in files})
    if not counts:
        raise OutputError(
            f"{folder.path} holds no parts to merge (manifest.part-K-of-N.json): "
            "run with --part K/N first"
        )
    if len(counts) > 1:
        raise OutputError(
            f"{folder.path} holds parts of splits into {_and(counts)}: keep the files "
            "of one (manifest.part-*-of-N.*) and remove the others"
        )
    count = counts[0]
    names = {name for _, _, name in files}
    parts = [Part(number, count) for number in range(1, count + 1)]
    missing = [
        part
        for part in parts
        if _header_name(part) not in names
        or RecordFiles.for_part(part).manifest not in names
    ]
    if missing:
        raise OutputError(
            f"{_numbers(missing)} of {count} missing in {folder.path}: run "
            f"--part {missing[0]}{' and the others' if len(missing) > 1 else ''} first"
        )
    headers = [_read_header(folder, part) for part in parts]
    unfinished = [header.part for header in headers if not header.complete]
    if unfinished:
        raise OutputError(
            f"{_numbers(unfinished)} of {count} did not finish (stopped or killed): "
            f"rerun --part {unfinished[0]} with the same list and settings"
        )
    _refuse_changed(folder, headers)
    if len({header.settings for header in headers}) > 1:
        shown = ", ".join(f"{h.part.number}: {h.settings}" for h in headers[:_SHOWN])
        raise OutputError(
            f"the parts in {folder.path} were made with different image settings "
            f"(fingerprints of parts {shown}): rerun the odd ones with the same "
            "settings"
        )
    return parts


def _refuse_changed(folder: OutputFolder, headers: list[_Header]) -> None:
    """Refuse parts of different lists, or whose records changed since they ended."""
    lists = {header.list_digest for header in headers}
    if len(lists) > 1:
        shown = ", ".join(
            f"{h.part.number}: {str(h.list_digest).partition(':')[0]} entries"
            for h in headers[:_SHOWN]
        )
        raise OutputError(
            f"the parts in {folder.path} read different lists (parts {shown}, or "
            "the same count with other lines): rerun every part on one list"
        )
    for header in headers:
        name = RecordFiles.for_part(header.part).manifest
        size = _size(folder, name)
        if size != header.record_bytes:
            raise OutputError(
                f"{name} changed after part {header.part} finished ({size} bytes, "
                f"{header.record_bytes} then): rerun --part {header.part} to "
                "complete its records"
            )


def _part_files(out: Path) -> list[tuple[int, int, str]]:
    """(K, N, name) of each part record file and header in ``out``."""
    try:
        names = os.listdir(out)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise OutputError(f"cannot list {out}: {exc.strerror or exc}") from exc
    found = []
    for name in names:
        match = _PART_FILE.match(name)
        if match is not None:
            number, count = int(match.group(1)), int(match.group(2))
            if not 1 <= number <= count <= PARTS_LIMIT:  # not made by a part
                raise OutputError(
                    f"{out / name} is not the file of a part (K/N out of range): "
                    "remove it"
                )
            found.append((number, count, name))
    return found


def _read_header(folder: OutputFolder, part: Part) -> _Header:
    name = _header_name(part)
    try:
        fd = folder.open_file(name, os.O_RDONLY)
        with os.fdopen(fd, "rb") as handle:
            facts = json.loads(handle.read())
        header = _Header(
            Part(facts["part"], facts["parts"]),
            facts["settings"],
            facts["complete"],
            facts.get("list"),
            facts.get("record_bytes"),
        )
    except (OSError, ValueError, KeyError, TypeError, InputError) as exc:
        raise OutputError(f"cannot read {folder.path / name}: {exc}") from exc
    if header.part != part or not isinstance(header.complete, bool):
        raise OutputError(f"{folder.path / name} is not the header of part {part}")
    return header


def _numbers(parts: list[Part]) -> str:
    word = "part" if len(parts) == 1 else "parts"
    return f"{word} {_and([part.number for part in parts])}"


def _and(numbers: Iterable[int]) -> str:
    shown = [str(number) for number in numbers]
    if len(shown) > _SHOWN:
        shown = [*shown[:_SHOWN], f"... ({len(shown)} in all)"]
    return ", ".join(shown)


def _listed(names: list[str]) -> str:
    more = f", ... ({len(names)} files)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more
