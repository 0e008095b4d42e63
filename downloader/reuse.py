"""Content-addressed names, duplicate bodies, and the settings fingerprint.

Every scheduler calls ``ContentIndex.claim`` on each finished download, just before it
makes the transform ``Task`` (or transforms in place); the caller of the scheduler
passes its records through ``ContentIndex.relay``::

    Fetched ──claim──► Fetched   transform it (--name-by sha256: stem = sha256[:16])
               ├─────► Outcome   same content already done (this run or manifest):
               │                 the record now, pointing at the same output
               └─────► None      same content in flight: the record comes with the
                                 leader's, from relay()
    records ──relay──► stamp each new ok record with the settings fingerprint; after a
                       leader's record, the records of the duplicates that waited on it

So a body is transformed at most once per run whatever the scheduler: the first URL
with a given SHA-256 is the leader; later ones are followers, whose record is ``ok``
with the leader's ``path`` and the note ``same content as <leader URL>`` (or ``failed``
with the leader's error when the leader failed). Only the main process holds the
index; a claim never blocks.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from downloader.errors import OutputError, TransformError
from downloader.records import Fetched, Outcome, Stage, Status, Transformed
from downloader.settings import (
    SHA256_STEM_DIGITS,
    ImageFormat,
    NameBy,
    OutputFormat,
    Resample,
    Settings,
)
from downloader.steps import discard, hashed, keep_download

__all__ = [
    "FINGERPRINT_FIELDS",
    "Claim",
    "ContentIndex",
    "settings_fingerprint",
]

Claim = Callable[[Fetched], Fetched | Outcome | None]
"""What a scheduler calls on a finished download (see the module docstring)."""

FINGERPRINT_FIELDS = frozenset(
    {
        "resize",
        "max_size",
        "size",
        "sizes",
        "upscale",
        "format",
        "quality",
        "progressive",
        "optimize",
        "keep_metadata",
        "grayscale",
        "resample",
        "transform",
    }
)
"""``ImageSpec`` fields that decide the output files (``max_size``, ``size`` and
``sizes`` through ``ImageSpec.boxes``). The others (``max_pixels``) only decide whether
an image is refused. A new field must be added here or to the test's exempt list."""
# Bump when the fingerprint's recipe changes, so that old fingerprints stop matching.
_FINGERPRINT_VERSION = 1
# 12 hex digits: plenty to tell settings apart, short in every manifest line.
_FINGERPRINT_DIGITS = 12


def settings_fingerprint(settings: Settings) -> str:
    """Return a short hash of the settings that decide the output files.

    Covers the image settings that change output bytes or names (boxes, resize,
    format, quality, …, the custom transform's reference but not its code) and
    ``name_by``, and ``output_format`` when it is not ``files`` (a sample in a shard
    is not a file, and back). Records made with another fingerprint are redone on
    a rerun.
    """
    spec = settings.image
    boxes = spec.boxes
    facts = {
        "v": _FINGERPRINT_VERSION,
        "name_by": settings.name_by.value,
        "resize": spec.resize.value,
        # The main box first; the others are named by their label, so their order
        # does not matter.
        "boxes": [list(box) for box in boxes[:1]] + sorted(map(list, boxes[1:])),
        "upscale": spec.upscale,
        "format": spec.format.value,
        # PNG is lossless: quality changes nothing there.
        "quality": None if spec.format is ImageFormat.PNG else spec.quality,
        "progressive": spec.progressive,
        "optimize": spec.optimize,
        "keep_metadata": spec.keep_metadata,
        "grayscale": spec.grayscale,
        "transform": spec.transform,
    }
    if settings.output_format is not OutputFormat.FILES:
        # Only then, so that the fingerprints of files runs stay what they were.
        facts["output_format"] = settings.output_format.value
    if spec.resample is not Resample.BALANCED:
        # Only when not the default, so that outputs made before --resample existed
        # (all balanced) keep their fingerprint and are not redone.
        facts["resample"] = spec.resample.value
    text = json.dumps(facts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_FINGERPRINT_DIGITS]


def _named_by_content(fetched: Fetched) -> Fetched:
    """``fetched`` with its job's stem made from its SHA-256 (``--name-by sha256``)."""
    if fetched.sha256 is None:
        raise ValueError(f"job {fetched.job.index}: a download named by content")
    stem = fetched.sha256[:SHA256_STEM_DIGITS]
    return replace(fetched, job=replace(fetched.job, stem=stem))


def _nothing_known(sha256: str) -> Outcome | None:
    return None


@dataclass(slots=True)
class _Leader:
    """A body being transformed, and the downloads of the same body waiting on it."""

    url: str
    followers: list[Fetched]


class ContentIndex:
    """Which bodies this run has transformed or is transforming, by SHA-256.

    With ``--name-by url`` nothing is indexed: ``claim`` hands every download back
    unchanged and ``relay`` only stamps the fingerprint.
    """

    def __init__(
        self,
        settings: Settings,
        out: Path,
        known: Callable[[str], Outcome | None] = _nothing_known,
    ) -> None:
        """``known(sha256)`` returns an earlier run's current ok record of a body."""
        self._settings = settings
        self._out = out
        self._known = known
        self._by_content = settings.name_by is NameBy.SHA256
        self.fingerprint = settings_fingerprint(settings)
        self._lock = threading.Lock()
        self._leaders: dict[str, str] = {}
        """Leader URL → SHA-256, while its record has not come through ``relay``."""
        self._in_flight: dict[str, _Leader] = {}
        self._done: dict[str, Outcome] = {}
        """SHA-256 → the leader's record, for every body this run finished."""

    def claim(self, fetched: Fetched) -> Fetched | Outcome | None:
        """Decide what becomes of a finished download (any thread may call this).

        Raises:
            OutputError: a duplicate's download could not be kept as the original.
        """
        if not self._by_content:
            return fetched
        fetched = hashed(fetched)
        sha256 = fetched.sha256
        if sha256 is None:
            raise OutputError(f"cannot read {fetched.path}")
        with self._lock:
            earlier = self._done.get(sha256)
            if earlier is None:
                earlier = self._known(sha256)
            if earlier is None:
                leader = self._in_flight.get(sha256)
                if leader is None:
                    self._in_flight[sha256] = _Leader(fetched.job.url, [])
                    self._leaders[fetched.job.url] = sha256
                    return _named_by_content(fetched)
                leader.followers.append(fetched)
        if earlier is None:
            discard(fetched)  # the leader keeps its own copy if originals are kept
            return None
        return self._follow(fetched, earlier)

    def relay(self, outcomes: Iterator[Outcome]) -> Iterator[Outcome]:
        """Yield a scheduler's records, stamped, each leader's followers after it.

        Closing this generator closes ``outcomes``.
        """
        try:
            for outcome in outcomes:
                yield self._stamp(outcome)
                for follower in self._settle(outcome):
                    yield self._stamp(follower)
        finally:
            close = getattr(outcomes, "close", None)
            if close is not None:
                close()
        yield from self._orphans()

    def _stamp(self, outcome: Outcome) -> Outcome:
        if outcome.status is Status.OK and outcome.settings is None:
            return replace(outcome, settings=self.fingerprint)
        return outcome

    def _settle(self, outcome: Outcome) -> list[Outcome]:
        with self._lock:
            sha256 = self._leaders.pop(outcome.url, None)
            if sha256 is None:
                return []
            leader = self._in_flight.pop(sha256)
            self._done[sha256] = outcome
        return [self._follow(fetched, outcome) for fetched in leader.followers]

    def _orphans(self) -> Iterator[Outcome]:
        """Records of followers whose leader never got one (the run was cut short)."""
        with self._lock:
            stranded = list(self._in_flight.values())
            self._in_flight.clear()
            self._leaders.clear()
        for leader in stranded:
            for fetched in leader.followers:
                yield Outcome.failure(
                    fetched.job,
                    None,
                    f"interrupted (same content as {leader.url}, which was not done)",
                    fetched=fetched,
                )

    def _follow(self, fetched: Fetched, leader: Outcome) -> Outcome:
        """The record of a duplicate of ``leader``'s body; its download is let go."""
        note = f"same content as {leader.url}"
        if not leader.ok or leader.path is None:
            discard(fetched)
            failed = Outcome.failure(
                fetched.job,
                leader.stage,
                leader.error or "failed",
                fetched=fetched,
            )
            return replace(failed, note=note)
        original = leader.original
        if original is not None and (self._out / original).is_file():
            discard(fetched)
        elif fetched.path.is_file():  # a follower that waited let its file go
            try:
                original = keep_download(
                    _named_by_content(fetched), self._out, self._settings
                )
            except TransformError as exc:  # its name is taken by what is not ours
                failed = Outcome.failure(
                    fetched.job, Stage.TRANSFORM, exc.reason, fetched=fetched
                )
                return replace(failed, note=note)
        else:
            original = None
        shared = Transformed(
            path=leader.path,
            width=leader.width or 0,
            height=leader.height or 0,
            nbytes=0,
            elapsed=0.0,
            outputs=leader.outputs or (),
        )
        made = Outcome.success(fetched, shared, original=original, note=note)
        return replace(made, transform_s=None)
