"""Tar shards in the WebDataset layout (``--output-format webdataset``).

The schedulers make outputs as ever (files in the output folder); the main process,
the only writer of results, then moves each finished output into its shard, by
path, and removes the loose file::

    plan ──watch()──► scheduler ──► records ──place()──► manifest
      (job index by URL)              │ ok: output file ──► OUT/.tmp/00003.tar
                                      │                     (appended, by path)
                                      └ slice decided ──► rename to OUT/00003.tar,
                                                          then its records go out

- **Slices.** Entry ``i`` of the list (``Job.index``) belongs to slice
  ``i // shard_size`` (the slices ``--mode ray`` hands out) and to shard
  ``first + slice``, where ``first`` is one more than the highest shard already in
  the folder (0 in a new one), so a rerun never writes into a finished shard. A slice
  none of whose entries made a sample has no shard.
- **Samples.** Key: the entry's index, zero-padded (``000000123``; WebDataset cuts
  keys at the first dot). Members: ``<key>.<ext>`` (the main output),
  ``<key>.<box>.<ext>`` (the other ``--sizes``), ``<key>.json`` (the record, naming
  ``shard`` and ``key``), ``<key>.txt`` (a ``caption`` column).
- **No half shard, no dangling record.** A shard is written in ``OUT/.tmp`` (emptied
  by every run's start and end) and renamed into ``OUT`` once each entry of its slice
  has a record; only then are its samples' records let out to the manifest. A stop
  (Ctrl-C, a local fault) ends the slices with what they hold the same way; a killed
  main process leaves only scratch, and no record names it.
- **In ``--mode ray``** no main process sees the outputs: each task writes its
  slice's shard with a ``SliceShard`` of its own, the same way (``ray_shards``).
- **Bounded.** A shard is open while an entry of its slice is in flight, so open
  shards follow the schedulers' in-flight window; a shard's bytes go from file to
  file, never through memory. Held back are the shards' ok records only.
- **A shard no record names** (``adopt_unrecorded_shards``, as a run takes its
  folder): a run killed between a shard's rename and its records leaves a whole
  shard the manifest does not know. Its samples' records (``<key>.json``) are
  written to the manifest then, so the rerun skips them instead of writing them into
  a second shard; one that cannot be adopted so is renamed ``00003.tar.orphan``,
  out of a ``*.tar`` glob, and said in one line. A run killed *while* it wrote a
  shard's records leaves that shard named by some: its records are the last of the
  manifest (or of a ``--mode ray`` task's part), since one loop writes them one
  after another once the shard is renamed; that shard's unnamed samples are
  recorded the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tarfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import replace
from pathlib import Path, PurePosixPath

from downloader.errors import DownloaderError, OutputError
from downloader.manifest import (
    ManifestWriter,
    OutputFolder,
    PreviousRun,
    parse_record,
    read_outcomes,
    record_key,
    record_line,
)
from downloader.records import Job, Outcome, Stage, Status

__all__ = [
    "ORPHAN_SUFFIX",
    "SHARD_NAME",
    "ShardIndex",
    "ShardWriter",
    "SliceShard",
    "adopt_unrecorded_shards",
    "first_free_number",
    "remove_empty_folders",
    "remove_shards",
    "sample_key",
    "shard_name",
    "shard_records",
]

SHARD_NAME = re.compile(r"[0-9]{5,}\.tar")
"""A finished shard's name in the output folder (``00003.tar``)."""
ORPHAN_SUFFIX = ".orphan"
"""Added to the name of a shard that no record names and that cannot be adopted:
kept for a person to look at, out of the ``OUT/*.tar`` a loader globs."""
_ORPHAN_NAMES = 1000  # 00003.tar.orphan, then 00003.tar.1.orphan ...: a bound
KEY_DIGITS = 9
"""Digits of a sample's key: a billion entries sort right; longer lists still work."""
CAPTION_COLUMN = "caption"
_BLOCK = 512  # tar's block: every header and member is padded to it
_END_OF_ARCHIVE = b"\0" * (2 * _BLOCK)
_COPY_CHUNK = 1024 * 1024
# Shards whose member names a resume keeps: records of one shard come together in a
# manifest, so a few cover the order a run wrote them in without holding them all.
_SHARDS_REMEMBERED = 16
# Most bytes read of one <key>.json: a record is one manifest line, from a list line
# of at most 64 KiB (sources). A shard in the folder may be anyone's, and one member
# claiming gigabytes must not be read whole (every rerun would fail so).
_RECORD_BYTES_LIMIT = 1024 * 1024
_log = logging.getLogger("downloader")


def sample_key(index: int) -> str:
    """The key of list entry ``index``: ``000000123``."""
    return f"{index:0{KEY_DIGITS}d}"


def shard_name(number: int) -> str:
    """The file name of shard ``number``: ``00003.tar``."""
    return f"{number:05d}.tar"


def first_free_number(out: Path) -> int:
    """One past the highest shard number in ``out`` (0 if none, or no folder)."""
    try:
        names = [entry.name for entry in os.scandir(out)]
    except FileNotFoundError:
        return 0
    numbers = [int(name[:-4]) for name in names if SHARD_NAME.fullmatch(name)]
    return max(numbers, default=-1) + 1


def _failed(outcome: Outcome, reason: str) -> Outcome:
    """An ok record whose sample could not be written, as a failure."""
    return replace(
        outcome,
        status=Status.FAILED,
        error=reason,
        stage=Stage.TRANSFORM,
        path=None,
        outputs=None,
        width=None,
        height=None,
        note=None,
        settings=None,
        original=None,
    )


class _Shard:
    """One shard being written: a tar file in scratch, members appended by hand.

    Written without ``tarfile.TarFile`` so that a sample that fails half-way (a full
    disk) can be cut off again (``truncate`` to where it began), leaving a valid tar.
    """

    def __init__(self, name: str, scratch: Path) -> None:
        self.name = name
        self.path = scratch / name
        self.records: list[Outcome] = []
        self._file = self.path.open("xb")

    def add_sample(self, members: list[tuple[str, Path | bytes]]) -> None:
        """Append one sample's members, all or none.

        Raises:
            OSError: it could not be written; the shard is as it was.
        """
        start = self._file.tell()
        try:
            for name, content in members:
                self._add(name, content)
        except BaseException:
            with contextlib.suppress(OSError):
                self._file.truncate(start)
                self._file.seek(start)
            raise

    def _add(self, name: str, content: Path | bytes) -> None:
        info = tarfile.TarInfo(name)
        info.mtime = int(time.time())
        info.mode = 0o644
        if isinstance(content, bytes):
            info.size = len(content)
            self._file.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict"))
            self._file.write(content)
        else:
            with content.open("rb") as source:
                info.size = os.fstat(source.fileno()).st_size
                self._file.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict"))
                shutil.copyfileobj(source, self._file, _COPY_CHUNK)
        self._file.write(b"\0" * (-info.size % _BLOCK))

    def finish(self, out: Path) -> None:
        """End the archive, flush it to disk and rename it to ``out/<name>``.

        Raises:
            OSError: it could not be written or renamed.
        """
        try:
            self._file.write(_END_OF_ARCHIVE)
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        os.replace(self.path, out / self.name)

    def abandon(self) -> None:
        """Close it where it is (scratch, which the folder empties)."""
        self._file.close()


class ShardWriter:
    """Move each run's outputs into numbered shards; hold records until renamed.

    ``watch`` sees the plan (from any thread) and ``place`` the records (in the
    main process's writing loop); see the module docstring.
    """

    def __init__(
        self,
        out: Path,
        scratch: Path,
        shard_size: int,
        fail_run: Callable[[BaseException], None],
        *,
        force: bool = False,
    ) -> None:
        """``force``: remove the folder's shards first (a run that starts over)."""
        self._out = out
        self._scratch = scratch
        self._size = shard_size
        self._fail_run = fail_run
        self._lock = threading.Lock()
        self._index: dict[bytes, int] = {}
        """URL digest → list index, for jobs whose record has not come yet."""
        self._waiting: Counter[int] = Counter()
        """Slice → entries seen in the plan whose record has not come yet."""
        self._seen = -1
        self._ended = False
        self._open: dict[int, SliceShard] = {}
        if force:
            remove_shards(out)
        self._first = first_free_number(out)

    def watch(self, items: Iterable[Job | Outcome]) -> Iterator[Job | Outcome]:
        """Pass the plan on, noting each job's index and slice."""
        for item in items:
            if isinstance(item, Job):
                with self._lock:
                    self._index[record_key(item.url)] = item.index
                    self._waiting[item.index // self._size] += 1
                    self._seen = max(self._seen, item.index)
            yield item
        with self._lock:
            self._ended = True

    def place(self, records: Iterator[Outcome]) -> Generator[Outcome, None, None]:
        """Yield the records to write: others at once, samples' once their shard is.

        At the end, or when ``records`` raises (a local fault, after every input's
        record), the shards still open are finished with what they hold. Closed
        early (the manifest cannot be written), they are left in scratch: no record
        names them.
        """
        try:
            try:
                for outcome in records:
                    yield from self._take(outcome)
            except DownloaderError:
                yield from self._finish(list(self._open))
                raise
            yield from self._finish(list(self._open))
        finally:
            for shard in self._open.values():
                shard.abandon()
            self._open.clear()
            close = getattr(records, "close", None)
            if close is not None:
                close()

    def _take(self, outcome: Outcome) -> Iterator[Outcome]:
        with self._lock:
            index = self._index.pop(record_key(outcome.url), None)
            if index is not None:
                number = index // self._size
                self._waiting[number] -= 1
                if self._waiting[number] == 0 and number not in self._open:
                    del self._waiting[number]  # one slice after another: none kept
        if index is None or outcome.status is not Status.OK:
            yield outcome  # not this run's sample: its record goes as it is
        else:
            failure = self._add(index, outcome)
            if failure is not None:
                yield failure
        yield from self._finish(self._decided())

    def _decided(self) -> list[int]:
        """The open slices every entry of which has its record."""
        with self._lock:
            return [
                number
                for number in self._open
                if self._waiting[number] == 0
                and (self._ended or self._seen >= (number + 1) * self._size - 1)
            ]

    def _add(self, index: int, outcome: Outcome) -> Outcome | None:
        """Append ``outcome``'s sample to its shard; a failure record if it cannot."""
        number = index // self._size
        shard = self._open.get(number)
        if shard is None:
            name = shard_name(self._first + number)
            shard = SliceShard(name, self._out, self._scratch, self._fail_run)
            self._open[number] = shard
        return shard.add(index, outcome)

    def _finish(self, numbers: list[int]) -> Iterator[Outcome]:
        """Rename these slices' shards, then yield their records."""
        for number in numbers:
            yield from self._open.pop(number).finish()
            with self._lock:
                self._waiting.pop(number, None)


class SliceShard:
    """One slice's shard, opened with its first sample: held records, then rename.

    ``ShardWriter`` keeps one per open slice; a ``--mode ray`` task, which runs one
    slice, keeps its own (``ray_shards``). Its ok records are let out by ``finish``
    only, after the rename: a record that names a shard means the shard is there.
    """

    def __init__(
        self,
        name: str,
        out: Path,
        scratch: Path,
        fail_run: Callable[[BaseException], None],
    ) -> None:
        self.name = name
        self._out = out
        self._scratch = scratch
        self._fail_run = fail_run
        self._shard: _Shard | None = None

    def add(self, index: int, outcome: Outcome) -> Outcome | None:
        """Move ok ``outcome``'s outputs (list entry ``index``) into the shard,
        holding its record; a failure record (and the run failed) if it cannot."""
        names = (outcome.path, *(outcome.outputs or ()))
        loose = [self._out / name for name in names if name is not None]
        try:
            if self._shard is None:
                self._shard = _Shard(self.name, self._scratch)
            record = replace(
                outcome,
                path=None,
                outputs=None,
                shard=self.name,
                key=sample_key(index),
            )
            self._shard.add_sample(_members(record, outcome, self._out))
        except OSError as exc:
            reason = f"cannot write shard: {exc.strerror or exc}"
            self._fail_run(OutputError(reason))
            return _failed(outcome, reason)
        finally:
            for path in loose:
                with contextlib.suppress(OSError):
                    path.unlink()
        self._shard.records.append(record)
        return None

    def finish(self) -> list[Outcome]:
        """Rename the shard into the folder; its records (failures if it could not
        be: the run fails). Nothing if it holds no sample."""
        shard, self._shard = self._shard, None
        if shard is None:
            return []
        try:
            shard.finish(self._out)
        except OSError as exc:
            reason = (
                f"cannot write shard {shard.name}: {exc.strerror or exc} "
                "(a rerun redoes its samples)"
            )
            self._fail_run(OutputError(reason))
            return [_failed(record, reason) for record in shard.records]
        return shard.records

    def abandon(self) -> None:
        """Close it in scratch, unrenamed: its records are never let out."""
        if self._shard is not None:
            self._shard.abandon()
            self._shard = None


def remove_shards(out: Path) -> None:
    """Remove the folder's shards (``--force``; files only: a link there is not ours).

    Raises:
        OutputError: one cannot be removed.
    """
    for name in _shard_files(out):
        try:
            os.unlink(out / name)
        except OSError as exc:
            raise OutputError(f"cannot remove {out / name}: {exc.strerror}") from exc


def remove_empty_folders(out: Path, names: Iterable[str]) -> None:
    """Remove the folders ``names`` of ``out`` that are empty (``--sizes``).

    An output is made as a file in its size's folder before it goes into its shard,
    so the folder is made with the first one; once every output of the run is in
    its shard (no worker writes any more), an empty one is only clutter. A folder
    that holds anything, or a link there, stays.
    """
    for name in names:
        with contextlib.suppress(OSError):
            os.rmdir(out / name)


def adopt_unrecorded_shards(
    folder: OutputFolder, previous: PreviousRun, cut_short: Iterable[str] = ()
) -> bool:
    """Record the samples of the shards no record names; set aside what cannot be.

    A run renames a shard into the folder, then writes its samples' records; one
    killed in between leaves a whole shard that the manifest does not name, whose
    samples a rerun would make again into a new shard (a loader that globs
    ``*.tar`` would then see them twice). So, as a run takes its folder, before it
    plans: the samples' records are read back from their ``<key>.json`` and written
    to the manifest, as the killed run would have (the rerun then skips them as
    done, shard and key checked as ever). A shard is adopted whole or not at all;
    newest first, so that of two holding a URL the later one wins. It is not
    adopted if it cannot be read, holds no sample or one that is not a record of
    this shard's (not this tool's), or a sample whose URL has a standing ok record
    (done elsewhere: a shard whose samples were all redone since); it is then
    renamed ``<name>.orphan`` (never deleted: a person may want it) with a warning.
    Links at a shard's name are not ours, and are left alone.

    A run killed *while* it wrote a shard's records leaves it named by some of them.
    Its records are written one after another once it is renamed, so that shard is
    the one the last shard record names: of the manifest, or of the updates file
    the kill left (``OutputFolder.crash_tails``, read before the two are merged), or
    of a killed ``--mode ray`` part (``cut_short``, from ``merge_leftover_parts``).
    Its samples that no record names are recorded too (one its URL's record names
    was recorded, under whatever settings). Only those few shards are read: a
    folder of thousands costs a few reads.

    Returns:
        True if records were written (``previous`` is then out of date).

    Raises:
        OutputError: the manifest cannot be written, or a shard cannot be renamed.
    """
    found = _shard_files(folder.path)
    if not found:  # most runs: nothing to read
        return False
    named: set[str] = set()
    last: set[str] = set()
    for outcome in read_outcomes(folder):
        if outcome.shard:
            named.add(outcome.shard)
            last = {outcome.shard}
    tails = last | folder.crash_tails | set(cut_short)
    partly = tails & named & set(found)
    todo = sorted((set(found) - named) | partly, key=lambda name: int(name[:-4]))
    adopted: set[bytes] = set()
    with contextlib.ExitStack() as stack:
        manifest: ManifestWriter | None = None
        for name in reversed(todo):  # newest first: the later shard wins a URL
            path = folder.path / name
            if name in partly:
                records, why = _unnamed_samples(path, previous, adopted), None
            else:
                records, why = _adoptable(path, previous, adopted)
            if why is not None:
                _set_aside(folder.path, name, why)
                continue
            if not records:
                continue
            if manifest is None:
                manifest = stack.enter_context(ManifestWriter(folder, previous))
            for outcome in records:
                manifest.write(outcome)
            _log.warning(
                "%s: %d samples named by no record (a run was killed as it recorded "
                "them): recorded now, not made again",
                path,
                len(records),
            )
    return manifest is not None


def _unnamed_samples(
    path: Path, previous: PreviousRun, adopted: set[bytes]
) -> list[Outcome]:
    """The records of the samples of shard ``path`` that no record names: those a
    killed run had not written yet.

    The manifest keeps one line per URL, its latest: a sample that line names
    (under any settings) was recorded, and is not recorded again. One whose URL
    stands elsewhere (or in a newer shard adopted just now) is a stray copy, left
    as it is: the shard's other samples are recorded in it. A shard that cannot be
    read gives none (its records then do not stand either). ``adopted`` gains the
    URLs returned.
    """
    try:
        samples, _ = _shard_samples(path)
    except (OSError, tarfile.TarError):
        return []
    records = []
    for outcome in samples:
        key = record_key(outcome.url)
        if outcome.status is not Status.OK or outcome.shard != path.name:
            continue  # not a record of this shard's
        earlier = previous.earlier(outcome.url)
        if key in adopted or (
            earlier is not None
            and (
                (earlier.shard, earlier.key) == (path.name, outcome.key)
                or previous.current(earlier)
            )
        ):
            continue  # recorded here already, or a stray copy
        records.append(outcome)
        adopted.add(key)
    return records


def _shard_files(out: Path) -> list[str]:
    """The names of the shards in ``out`` that are regular files."""
    return [
        entry.name
        for entry in os.scandir(out)
        if SHARD_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
    ]


def _adoptable(
    path: Path, previous: PreviousRun, adopted: set[bytes]
) -> tuple[list[Outcome], str | None]:
    """The records of shard ``path`` to write, or why it cannot be adopted.

    ``adopted``: the URLs adopted from other shards so far; this shard's are added.
    """
    try:
        records, plain = _shard_samples(path)
    except (OSError, tarfile.TarError) as exc:
        return [], f"it cannot be read: {exc}"
    if not plain:
        return [], "it holds links or other members that are not files"
    if not records:
        return [], "it holds no sample of this tool's"
    keys = {record_key(outcome.url) for outcome in records}
    if len(keys) < len(records) or keys & adopted:
        return [], "it holds a URL twice, or one another shard holds"
    for outcome in records:
        if outcome.status is not Status.OK or outcome.shard != path.name:
            return [], "its samples' records are not this shard's"
        earlier = previous.earlier(outcome.url)
        if earlier is not None and previous.current(earlier):
            return (
                [],
                f"{outcome.url} is done elsewhere ({earlier.shard or earlier.path})",
            )
    adopted |= keys
    return records, None


def _set_aside(out: Path, name: str, why: str) -> None:
    """Rename shard ``name`` to ``<name>.orphan`` (a free one), with a warning.

    Raises:
        OutputError: it cannot be renamed.
    """
    for n in range(_ORPHAN_NAMES):
        aside = f"{name}{ORPHAN_SUFFIX}" if n == 0 else f"{name}.{n}{ORPHAN_SUFFIX}"
        if not os.path.lexists(out / aside):
            break
    else:
        raise OutputError(f"cannot set {out / name} aside: {_ORPHAN_NAMES} taken")
    try:
        os.rename(out / name, out / aside)
    except OSError as exc:
        raise OutputError(f"cannot rename {out / name}: {exc.strerror or exc}") from exc
    _log.warning(
        "%s: named by no record and not adopted (%s): renamed %s",
        out / name,
        why,
        aside,
    )


def shard_records(path: Path) -> list[Outcome]:
    """The records of the samples in shard ``path`` (its ``<key>.json`` members
    whose record names that key).

    A ``--mode ray`` task's retry reads them from the shard an earlier attempt
    renamed before it died, to record them: the shard is the slice's commit; a run
    reads them from a shard no record names (``adopt_unrecorded_shards``).

    Raises:
        OSError, tarfile.TarError: it cannot be read.
    """
    return _shard_samples(path)[0]


def _shard_samples(path: Path) -> tuple[list[Outcome], bool]:
    """``shard_records``, and whether every member of the shard is a plain file."""
    samples, plain = _sample_jsons(path)
    records = []
    for key, data in samples.items():
        record = parse_record(data)
        if record is not None and record.key == key:
            records.append(record)
    return records, plain


def _sample_jsons(path: Path) -> tuple[dict[str, bytes], bool]:
    """The ``<key>.json`` of each whole sample of shard ``path``, and whether every
    member is a plain file.

    A sample is whole when the shard also holds a file of its image (``<key>.jpg``,
    ``<key>.320.png``…): a record alone would make a rerun skip a URL whose image is
    nowhere. A json member over ``_RECORD_BYTES_LIMIT`` is not read (not a record).

    Raises:
        OSError, tarfile.TarError: it cannot be read.
    """
    jsons: dict[str, bytes] = {}
    imaged: set[str] = set()
    plain = True
    with tarfile.open(path, "r:") as archive:
        for member in archive:
            if not member.isfile():
                plain = False
                continue
            key, _, rest = member.name.partition(".")
            if rest == "json" and member.size <= _RECORD_BYTES_LIMIT:
                data = archive.extractfile(member)
                if data is not None:
                    jsons[key] = data.read()
            elif rest not in ("", "json", "txt"):
                imaged.add(key)
    return {key: data for key, data in jsons.items() if key in imaged}, plain


def _members(
    record: Outcome, made: Outcome, out: Path
) -> list[tuple[str, Path | bytes]]:
    """A sample's members: its outputs (by path in ``out``), record, caption."""
    key = record.key
    assert made.path is not None  # an ok record of this run
    assert key is not None
    out_names = [(made.path, "")]
    out_names += [
        (name, f".{PurePosixPath(name).parent.name}") for name in made.outputs or ()
    ]
    members: list[tuple[str, Path | bytes]] = [
        (f"{key}{label}{PurePosixPath(name).suffix}", out / name)
        for name, label in out_names
    ]
    members.append((f"{key}.json", record_line(record)))
    # Matched as the url and name columns are: whatever the case of its header.
    captions = [v for k, v in record.extra or () if k.lower() == CAPTION_COLUMN]
    caption = captions[0] if captions else None
    if caption is not None:
        text = caption if isinstance(caption, str) else json.dumps(caption)
        members.append((f"{key}.txt", text.encode("utf-8", "backslashreplace")))
    return members


class ShardIndex:
    """Tell whether a record's shard holds its sample: each shard read once.

    A resume asks it of each ok record in a shard; a shard's samples (key → the URL
    of its ``<key>.json``) are read on the first question (the images are seeked
    over) and the last few shards' are kept. A shard that is gone or cannot be read
    holds nothing.

    The URL is compared, not only the key: a shard's number can be taken again
    (``--force`` removes the folder's shards, a person deletes one) and a key is a
    list position, so ``00000.tar:000000000`` may now be another URL's sample while
    an old record still names it; that record is then redone, never skipped onto
    another URL's image.
    """

    def __init__(self, out: Path) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, dict[str, str]] = OrderedDict()

    def holds(self, outcome: Outcome) -> bool:
        """True if ``outcome.shard`` in the folder has ``<key>.json`` of its URL."""
        name, key = outcome.shard, outcome.key
        if name is None or key is None or not SHARD_NAME.fullmatch(name):
            return False  # a hand-edited record: never read outside the folder
        with self._lock:
            keys = self._keys.get(name)
            if keys is None:
                keys = self._read(self._out / name)
                self._keys[name] = keys
                if len(self._keys) > _SHARDS_REMEMBERED:
                    self._keys.popitem(last=False)
            else:
                self._keys.move_to_end(name)
        return keys.get(key) == outcome.url

    @staticmethod
    def _read(path: Path) -> dict[str, str]:
        if path.is_symlink():
            return {}  # not a shard this tool wrote
        urls: dict[str, str] = {}
        try:
            samples, _ = _sample_jsons(path)
            for key, data in samples.items():
                record = json.loads(data)
                if isinstance(record, dict) and isinstance(record.get("url"), str):
                    urls[key] = record["url"]
        except (OSError, tarfile.TarError, ValueError, RecursionError):
            return {}
        return urls
