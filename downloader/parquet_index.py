"""The Parquet index of an output folder: ``OUT/manifest.parquet`` (``--parquet``).

One row per record of ``manifest.jsonl`` (so one per input URL of every run into the
folder), one column per top-level field, for tools that read tables (pyarrow, pandas,
polars, DuckDB, Spark) rather than JSON lines. The index is derived, never a source:
it is rebuilt whole from the manifest when a run ends (``IndexAtEnd``), after the
manifest's own merge, so it holds exactly the manifest's records, one row per URL
however many reruns made them. ``index_folder`` (``--parquet-only``) rebuilds it from
a folder alone, and ``parts.merge_parts`` after a merge.

**Columns.** Records have different shapes (a failed one has no ``width``, an extra
column of the list appears only in some rows), so the columns are found in the
records themselves, in a first pass over the manifest:

- a field this version writes has a fixed type (``_KNOWN``) and is always a column;
- ``extra`` (the input row's other columns, any JSON values) holds its JSON text, so
  rows of any shape fit one schema;
- any other top-level field (written by a newer version or a plug-in of the record,
  such as a shard name) is a column too: of its values' type when they share one
  scalar type (text, integer, number, boolean), else of each value's JSON text. So is
  a known field whose values do not fit its type (a hand edit), with a warning.

A field a record lacks is null in its row. Text that is not valid Unicode (a lone
surrogate, from a list that was not UTF-8) is written with the escape the manifest
uses (``\\udcff``). The second pass writes the rows in batches of ``BATCH_ROWS``, or
fewer once their JSON text reaches ``BATCH_BYTES`` (a Parquet row group each), each
converted to Arrow ``CONVERT_ROWS`` rows (or ``CONVERT_BYTES``) at a time, so memory
stays flat however long the manifest and however wide its rows.

**Atomic.** The file goes through ``manifest.write_file``: written under a temporary
name in the folder (``.manifest.parquet.new``), flushed, then renamed over the index,
so a reader opens the old index or the new one, never half of one; a link at its name
is refused (at the start of the run, and again when it is written).

pyarrow is imported only when an index is asked for (the extra ``downloader[parquet]``),
so the tool starts as fast without it.
"""

from __future__ import annotations

import enum
import importlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from downloader.errors import DownloaderError, InputError, OutputError
from downloader.manifest import (
    INDEX_NAME,
    MANIFEST_NAME,
    OutputFolder,
    read_record_lines,
    refuse_link,
)
from downloader.settings import PARQUET_EXTRA_HINT

__all__ = [
    "BATCH_ROWS",
    "INDEX_NAME",
    "IndexAtEnd",
    "IndexNotWritten",
    "Indexed",
    "import_pyarrow",
    "index_folder",
    "write_index",
]

BATCH_ROWS = 65_536
"""Rows per batch, written as one Parquet row group: what memory holds at once as
Arrow arrays (~30 MB for a manifest's ~500 bytes a row); large enough that readers
skip through few row groups."""
BATCH_BYTES = 64 * 1024 * 1024
"""A batch also ends once its rows' JSON text reaches this: rows with large
``extra`` columns (kilobytes of a list's other columns) would otherwise hold
``BATCH_ROWS`` times that as Arrow arrays."""
CONVERT_ROWS = 8_192
"""Rows held as Python values (several times their Arrow size) before they are
converted to Arrow arrays and dropped."""
CONVERT_BYTES = 8 * 1024 * 1024
"""...or fewer, once their JSON text reaches this."""
_log = logging.getLogger("downloader")


class _Kind(enum.Enum):
    """What a column holds."""

    TEXT = "text"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    TEXTS = "list of text"
    JSON = "JSON text"
    """Each value's JSON text: for values of mixed or nested types."""


_KNOWN: Mapping[str, _Kind] = {
    "url": _Kind.TEXT,
    "status": _Kind.TEXT,
    "line": _Kind.INTEGER,
    "path": _Kind.TEXT,
    "error": _Kind.TEXT,
    "note": _Kind.TEXT,
    "stage": _Kind.TEXT,
    "bytes": _Kind.INTEGER,
    "width": _Kind.INTEGER,
    "height": _Kind.INTEGER,
    "sha256": _Kind.TEXT,
    "final_url": _Kind.TEXT,
    "http_status": _Kind.INTEGER,
    "attempts": _Kind.INTEGER,
    "download_s": _Kind.NUMBER,
    "transform_s": _Kind.NUMBER,
    "outputs": _Kind.TEXTS,
    "extra": _Kind.JSON,
    "insecure": _Kind.BOOLEAN,
    "original": _Kind.TEXT,
    "settings": _Kind.TEXT,
    "shard": _Kind.TEXT,
    "key": _Kind.TEXT,
}
"""The fields of ``records.Outcome`` as the manifest writes them, in its order: the
first columns of every index, whether or not a record has them."""


class _TextList:
    """The shape of a list whose items are all text."""


class _BigInteger:
    """The shape of an integer beyond 64 bits."""


_INT64 = range(-(2**63), 2**63)
_FITS: Mapping[_Kind, frozenset[type]] = {
    _Kind.BOOLEAN: frozenset({bool}),
    _Kind.INTEGER: frozenset({int}),
    _Kind.NUMBER: frozenset({int, float}),
    _Kind.TEXT: frozenset({str}),
    _Kind.TEXTS: frozenset({_TextList}),
}
"""The shapes of value each typed kind holds; the order is the one tried for a
field this version does not know (``bool`` before ``int``: they are apart here)."""


def _shape(value: Any) -> type:
    """The value's type, told apart where a column type needs it."""
    kind = type(value)
    if kind is list and all(type(item) is str for item in value):
        return _TextList
    if kind is int and value not in _INT64:
        return _BigInteger
    return kind


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    kind: _Kind


def _columns(lines: Iterator[bytes], manifest: Path) -> list[_Column]:
    """The index's columns, from every record's fields (see the module docstring)."""
    seen: dict[str, set[type]] = {name: set() for name in _KNOWN}
    for line in lines:
        for name, value in json.loads(line).items():
            if value is not None:
                seen.setdefault(name, set()).add(_shape(value))
    return [
        _Column(name, _kind(name, shapes, manifest)) for name, shapes in seen.items()
    ]


def _kind(name: str, shapes: set[type], manifest: Path) -> _Kind:
    known = _KNOWN.get(name)
    if known is not None:
        if known is _Kind.JSON or shapes <= _FITS[known]:
            return known
        _log.warning(
            "%s: field %r has values that are not %s (edited by hand?): its column "
            "in %s holds each value's JSON text",
            manifest,
            name,
            known.value,
            INDEX_NAME,
        )
        return _Kind.JSON
    if not shapes:  # null in every record
        return _Kind.TEXT
    for kind, fits in _FITS.items():
        if kind is not _Kind.TEXTS and shapes <= fits:
            return kind
    return _Kind.JSON


def import_pyarrow() -> tuple[Any, Any]:
    """Import ``pyarrow`` and ``pyarrow.parquet`` (only an index needs them).

    Raises:
        InputError: pyarrow is not installed (or cannot be imported).
    """
    try:
        return (
            importlib.import_module("pyarrow"),
            importlib.import_module("pyarrow.parquet"),
        )
    except ImportError as exc:
        raise InputError(
            f"--parquet needs pyarrow, which is not installed: {PARQUET_EXTRA_HINT}"
        ) from exc


class _Chunks:
    """A file for pyarrow to write into, whose bytes are taken as they come."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._written = 0
        self.closed = False

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._chunks.append(chunk)
        self._written += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> list[bytes]:
        """The bytes written since the last ``take``."""
        chunks, self._chunks = self._chunks, []
        return chunks


def _escaped(value: Any) -> Any:
    """``value`` with every lone surrogate in its text written as its escape."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_escaped(item) for item in value]
    return value


class _Table:
    """The index's Arrow schema, and its record batches made from manifest lines."""

    def __init__(self, pa: Any, columns: list[_Column]) -> None:
        self._pa = pa
        self._columns = columns
        types = {
            _Kind.TEXT: pa.string(),
            _Kind.INTEGER: pa.int64(),
            _Kind.NUMBER: pa.float64(),
            _Kind.BOOLEAN: pa.bool_(),
            _Kind.TEXTS: pa.list_(pa.string()),
            _Kind.JSON: pa.string(),
        }
        self._types = [types[column.kind] for column in columns]
        self.schema = pa.schema(
            [(c.name, t) for c, t in zip(columns, self._types, strict=True)]
        )
        self.rows = 0

    def batches(self, lines: Iterator[bytes]) -> Iterator[Any]:
        """One table of up to ``BATCH_ROWS`` lines (and about ``BATCH_BYTES`` of
        them) at a time; none for no lines."""
        taken = _Taken(lines)
        while not taken.ended:
            chunks, rows, size = [], 0, 0
            while rows < BATCH_ROWS and size < BATCH_BYTES and not taken.ended:
                budget = min(CONVERT_BYTES, BATCH_BYTES - size)
                chunk = self._batch(
                    taken.some(min(CONVERT_ROWS, BATCH_ROWS - rows), budget)
                )
                if chunk is not None:
                    chunks.append(chunk)
                    rows += chunk.num_rows
                    size += taken.size
            if chunks:
                yield self._pa.Table.from_batches(chunks, schema=self.schema)

    def _batch(self, lines: Iterator[bytes]) -> Any:
        """The record batch of ``lines``, None if there are none. The Python values
        are gone when it returns: only the Arrow arrays stay."""
        columns: list[list[Any]] = [[] for _ in self._columns]
        for line in lines:
            record = json.loads(line)
            for column, values in zip(self._columns, columns, strict=True):
                values.append(record.get(column.name))
        if not columns[0]:
            return None
        self.rows += len(columns[0])
        arrays = [
            self._array(column, arrow_type, values)
            for column, arrow_type, values in zip(
                self._columns, self._types, columns, strict=True
            )
        ]
        return self._pa.record_batch(arrays, schema=self.schema)

    def _array(self, column: _Column, arrow_type: Any, values: list[Any]) -> Any:
        if column.kind is _Kind.JSON:
            values = [
                None if v is None else json.dumps(v, ensure_ascii=False) for v in values
            ]
        try:
            return self._pa.array(values, type=arrow_type)
        except UnicodeEncodeError:  # a lone surrogate: Arrow text is UTF-8
            return self._pa.array([_escaped(v) for v in values], type=arrow_type)


class _Taken:
    """Lines taken a few at a time, up to a count or a size, whichever comes first."""

    def __init__(self, lines: Iterator[bytes]) -> None:
        self._lines = lines
        self.ended = False
        """True once the lines have run out."""
        self.size = 0
        """Bytes of the lines ``some`` gave last."""

    def some(self, count: int, budget: int) -> Iterator[bytes]:
        """Up to ``count`` lines, ending after the one that reaches ``budget`` bytes."""
        self.size = 0
        for _ in range(count):
            line = next(self._lines, None)
            if line is None:
                self.ended = True
                return
            self.size += len(line)
            yield line
            if self.size >= budget:
                return


def _parquet_bytes(pq: Any, table: _Table, lines: Iterator[bytes]) -> Iterator[bytes]:
    """The Parquet file of ``lines``, a chunk at a time, as pyarrow writes it."""
    sink = _Chunks()
    with pq.ParquetWriter(sink, table.schema) as writer:
        for batch in table.batches(lines):
            writer.write_table(batch, row_group_size=BATCH_ROWS)
            yield from sink.take()
    yield from sink.take()  # the footer, written on close


def write_index(folder: OutputFolder) -> int:
    """Write ``INDEX_NAME`` from the folder's manifest, read twice; return its rows.

    ``folder`` is entered (its lock held), so the manifest is not changing.

    Raises:
        InputError: pyarrow is not installed.
        OutputError: the index cannot be written, or a link is at its name.
    """
    pa, pq = import_pyarrow()
    table = _Table(pa, _columns(read_record_lines(folder), folder.manifest))
    folder.replace_file(
        INDEX_NAME, _parquet_bytes(pq, table, read_record_lines(folder))
    )
    _log.info("%s: %d rows", folder.path / INDEX_NAME, table.rows)
    return table.rows


@dataclass(frozen=True, slots=True)
class Indexed:
    """What ``index_folder`` wrote: the index's path and its number of rows."""

    path: Path
    rows: int


def index_folder(out: Path) -> Indexed:
    """Rebuild ``OUT/manifest.parquet`` from ``OUT/manifest.jsonl``: ``--parquet-only``.

    Takes the folder as a run does (its lock alone, so no run changes the manifest
    meanwhile; what a killed run left of the manifest is merged first), then writes
    the index of the manifest as it stands.

    Raises:
        InputError: pyarrow is not installed.
        OutputError: no manifest in ``out``, the folder is in use, or the index
            cannot be written.
    """
    import_pyarrow()  # before the folder is touched
    if not (out / MANIFEST_NAME).is_file():
        raise OutputError(
            f"no {MANIFEST_NAME} in {out} to index: run a list into it first "
            "(or --merge-parts its parts)"
        )
    with OutputFolder(out) as folder:
        return Indexed(folder.path / INDEX_NAME, write_index(folder))


class IndexNotWritten(OutputError):
    """The index of a run that went well could not be written (exit 3).

    Raised once the run has told its summary: its records are all in the manifest,
    and ``--parquet-only`` writes the index again.
    """


class IndexAtEnd:
    """Write the index when a run's manifest is final (``Settings.parquet``).

    Entered after the run has taken its folder and before its manifest writer (so it
    exits after the manifest's merge). It writes the index when the run ends: done,
    stopped (Ctrl-C, SIGTERM, a caller that left ``iter_results``), whose manifest
    then has a record for every input too; and after a local fault (a full disk),
    when it can: a failure to write it is then a warning, and the fault is raised.
    Not after an interruption that stops at once (a second Ctrl-C): the earlier
    index, if any, stays until the next run with ``--parquet``.

    A failure after a run that went well is kept (``raise_if_failed``), not raised
    on exit: the run's summary comes first, then the fault (exit 3).
    """

    def __init__(self, folder: OutputFolder, enabled: bool) -> None:
        self._folder = folder
        self._enabled = enabled
        self._failure: DownloaderError | None = None
        self.written: str | None = None
        """The index's path once this run wrote it."""

    def raise_if_failed(self) -> None:
        """Raise the fault that kept the index of a finished run from being written.

        Raises:
            IndexNotWritten: from it (a full disk, a link at its name).
        """
        if self._failure is not None:
            raise IndexNotWritten(
                f"{self._failure} (the manifest is complete: --parquet-only "
                "writes the index again)"
            ) from self._failure

    def __enter__(self) -> IndexAtEnd:
        if self._enabled:
            import_pyarrow()  # an install that cannot be imported stops it now
            refuse_link(self._folder.path / INDEX_NAME)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._enabled:
            return
        if exc is None or isinstance(exc, DownloaderError | GeneratorExit):
            try:
                write_index(self._folder)
            except DownloaderError as error:
                if exc is None:
                    self._failure = error
                else:  # the run's own fault is raised
                    _log.warning("%s not written: %s", INDEX_NAME, error)
                return
            self.written = str(self._folder.path / INDEX_NAME)
