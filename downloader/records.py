"""Typed records that flow between the stages and into the manifest.

``Job`` (one unique input URL) → ``Fetched`` (its body on disk) → ``Transformed`` (the
output image) → ``Outcome`` (the one manifest line for that URL). Records that cross a
process boundary carry paths and small numbers, never image bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = [
    "Extra",
    "Fetched",
    "Identity",
    "Job",
    "Outcome",
    "Stage",
    "Status",
    "Transformed",
    "aside",
    "one_line",
]

REASON_MAX_CHARS = 500
"""Longest reason or note a record keeps: enough for any message of ours plus a URL,
short enough that a hostile server cannot fill the manifest through one."""


Extra = tuple[tuple[str, Any], ...]
"""An input row's other fields, in order, with their values as given: text from
CSV and TSV, any JSON value (number, list, object, ...) from JSON Lines, so that the
manifest writes ``[1, 2]`` back as ``[1, 2]``, not as the text ``"[1, 2]"``."""

Identity = tuple[int, int]
"""A file's device and inode (``st_dev``, ``st_ino``): which file a name holds."""


def _escaped(char: str) -> str:
    return char if char.isprintable() else ascii(char)[1:-1]


def one_line(text: str) -> str:
    """Return ``text`` as one printable line, for a record's ``error`` or ``note``.

    Reasons reach people through the manifest, ``failed.txt`` and ``-v`` log lines,
    and parts of them come from servers or from tracebacks. A multi-line text keeps
    its first line and its last (a traceback's first line says where, its last what);
    characters that are not printable (a terminal escape from a hostile server, a
    bidi override) are shown escaped (``\\x1b``); the result is cut at
    ``REASON_MAX_CHARS``.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    text = lines[0] if lines[0] == lines[-1] else f"{lines[0]} … {lines[-1]}"
    if not text.isprintable():
        text = "".join(_escaped(char) for char in text)
    if len(text) > REASON_MAX_CHARS:
        text = text[: REASON_MAX_CHARS - 1] + "…"
    return text


def aside(text: str, detail: str) -> str:
    """``text (detail)``, or ``text: detail`` when ``detail`` has parentheses itself.

    A reason often wraps another (``not started (<why the run stopped>)``); nested
    parentheses, ``(already ok (use --force))``, read badly.
    """
    if "(" in detail or ")" in detail:
        return f"{text}: {detail}"
    return f"{text} ({detail})"


def counted(count: int, noun: str) -> str:
    """``1 URL``, ``3 URLs``: a count with its noun, in summaries a person reads."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


class Status(enum.Enum):
    """How a URL ended; ``.value`` is what the manifest writes."""

    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


class Stage(enum.Enum):
    """The two stages of work on one URL."""

    DOWNLOAD = "download"
    TRANSFORM = "transform"


@dataclass(frozen=True, slots=True)
class Job:
    """One unique input URL, with the file stem its outputs will be named after."""

    index: int
    """Position among the unique, valid URLs of this run (0-based)."""
    line: int
    """Line number in the input list (1-based), for messages."""
    url: str
    """The URL as written in the list (stripped)."""
    key: str
    """Normalised URL used to recognise duplicates and earlier results."""
    stem: str
    """Safe output file name without extension, unique per key."""
    extra: Extra = ()
    """Other columns of the input row (CSV, TSV, JSON Lines), for the manifest."""
    local_path: str | None = None
    """A local file to process instead of downloading ``url`` (``--input-dir``)."""
    owned: tuple[str, ...] = ()
    """Files (relative to the output folder) the previous manifest records as this
    URL's: a redo may replace them; anything else at an output name is not ours."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """A URL whose body is complete on disk under a temporary name."""

    job: Job
    path: Path
    nbytes: int
    sha256: str | None
    """None when the worker process that transforms the file hashes it (the
    pipeline's downloads in the main process, ``--name-by url``): it reads the
    whole file anyway, and the main process's CPU is the scarce one."""
    final_url: str | None
    """Where the body came from after redirects; None for a local file."""
    http_status: int | None
    """None for a local file."""
    attempts: int
    elapsed: float
    insecure: bool = False
    """Fetched with TLS certificate verification off (``--insecure``)."""
    identity: Identity | None = None
    """The device and inode of the file as its download closed it, where a worker may
    make a spare of it (``spares``): it links ``path`` only while ``path`` is still
    that file, so a file put in its place is never written over."""


@dataclass(frozen=True, slots=True)
class Transformed:
    """An output image written under its final name."""

    path: str
    """The main output, relative to the output folder."""
    width: int
    height: int
    nbytes: int
    elapsed: float
    outputs: tuple[str, ...] = ()
    """The other outputs (``ImageSpec.sizes``), relative to the output folder."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """The manifest record of one unique input (URL or unusable line)."""

    url: str
    status: Status
    line: int | None = None
    path: str | None = None
    error: str | None = None
    """Why it failed (failed records only)."""
    note: str | None = None
    """Why it was skipped; for an ok record, where its output came from when that
    was not this URL's own download (``same content as …``, a kept original)."""
    stage: Stage | None = None
    """For a failure, the stage where it happened."""
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    final_url: str | None = None
    http_status: int | None = None
    attempts: int = 0
    download_s: float | None = None
    transform_s: float | None = None
    outputs: tuple[str, ...] | None = None
    """Outputs besides ``path`` (one per extra size), relative to the output folder."""
    extra: Extra | None = None
    """The input row's other columns; the manifest writes them as an object."""
    insecure: bool | None = None
    """True when the body was fetched with TLS verification off (``--insecure``)."""
    original: str | None = None
    """The kept download (``--keep-originals``), relative to the output folder."""
    settings: str | None = None
    """Fingerprint of the settings that decide the output files (ok records)."""
    shard: str | None = None
    """The tar shard holding the sample (``--output-format webdataset``), relative
    to the output folder: ``00003.tar``; ``path`` is then None."""
    key: str | None = None
    """The sample's key in ``shard`` (its members are ``<key>.<ext>``)."""

    def __post_init__(self) -> None:
        # Every record passes here, whoever made it: reasons are one line (see
        # one_line). Cheap when they already are.
        for name in ("error", "note"):
            text = getattr(self, name)
            if text is not None and one_line(text) != text:
                object.__setattr__(self, name, one_line(text))

    @property
    def ok(self) -> bool:
        """True for a URL whose output exists (ok now, or skipped as already done)."""
        return self.status is Status.OK or (
            self.status is Status.SKIPPED
            and (self.path is not None or self.shard is not None)
        )

    def to_json(self) -> dict[str, Any]:
        """Return the manifest form: enums as their values, ``None`` fields dropped."""
        # Field by field: asdict's deep copy cost more than the rest of recording
        # a result, and the one field it would copy (``extra``) is rebuilt below.
        record = {name: getattr(self, name) for name in _OUTCOME_FIELDS}
        record["status"] = self.status.value
        record["stage"] = self.stage.value if self.stage else None
        record["outputs"] = list(self.outputs) if self.outputs else None
        record["extra"] = dict(self.extra) if self.extra else None
        return {key: value for key, value in record.items() if value is not None}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Outcome:
        """Rebuild a record from its manifest form, ignoring unknown fields."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in record.items() if key in known}
        values["status"] = Status(values["status"])
        if values.get("stage") is not None:
            values["stage"] = Stage(values["stage"])
        if values.get("outputs") is not None:
            values["outputs"] = tuple(values["outputs"])
        if values.get("extra") is not None:
            values["extra"] = tuple(dict(values["extra"]).items())
        return cls(**values)

    @classmethod
    def success(
        cls,
        fetched: Fetched,
        transformed: Transformed,
        *,
        original: str | None = None,
        note: str | None = None,
    ) -> Outcome:
        """Combine both stages' records of one URL into an ``ok`` record."""
        job = fetched.job
        return cls(
            url=job.url,
            status=Status.OK,
            line=job.line,
            path=transformed.path,
            bytes=fetched.nbytes,
            width=transformed.width,
            height=transformed.height,
            sha256=fetched.sha256,
            final_url=fetched.final_url,
            http_status=fetched.http_status,
            attempts=fetched.attempts,
            download_s=round(fetched.elapsed, 4),
            transform_s=round(transformed.elapsed, 4),
            outputs=transformed.outputs or None,
            extra=job.extra or None,
            insecure=fetched.insecure or None,
            original=original,
            note=note,
        )

    @classmethod
    def failure(
        cls,
        job: Job,
        stage: Stage | None,
        reason: str,
        *,
        fetched: Fetched | None = None,
        http_status: int | None = None,
        attempts: int = 0,
        final_url: str | None = None,
        download_s: float | None = None,
        transform_s: float | None = None,
    ) -> Outcome:
        """Make a ``failed`` record, with what the download told, if it got that far."""
        if fetched is not None:
            return cls(
                url=job.url,
                status=Status.FAILED,
                line=job.line,
                error=reason,
                stage=stage,
                bytes=fetched.nbytes,
                sha256=fetched.sha256,
                final_url=fetched.final_url,
                http_status=fetched.http_status,
                attempts=fetched.attempts,
                download_s=round(fetched.elapsed, 4),
                transform_s=None if transform_s is None else round(transform_s, 4),
                extra=job.extra or None,
                insecure=fetched.insecure or None,
            )
        return cls(
            url=job.url,
            status=Status.FAILED,
            line=job.line,
            error=reason,
            stage=stage,
            http_status=http_status,
            attempts=attempts,
            final_url=final_url,
            download_s=None if download_s is None else round(download_s, 4),
            extra=job.extra or None,
        )

    def skipped(self, note: str, *, line: int | None = None) -> Outcome:
        """Return this earlier ok record as a ``skipped`` one, keeping its facts."""
        return replace(
            self, status=Status.SKIPPED, note=note, line=line, attempts=0, error=None
        )


_OUTCOME_FIELDS = tuple(field.name for field in fields(Outcome))
"""``Outcome``'s fields in order: the keys of its manifest form."""
