"""The output folder's state: the manifest (single writer), resume data, lock, scratch.

Layout of an output folder::

    DIR/<stem>.<ext>      processed images (final names, written by atomic rename)
    DIR/originals/        the downloads themselves (--keep-originals), <stem>.<ext>
    DIR/manifest.jsonl    one JSON line per unique input URL (its latest outcome)
    DIR/failed.txt        the failed URLs, one per line, ready to feed back in
    DIR/.tmp/             partial downloads and outputs; emptied at start and end
    DIR/.lock             held (flock) while a run uses the folder

During a run, records are appended and flushed one by one, so a crash loses at most the
line being written. A rerun reads the latest record per URL and skips those that are
ok, whose image is still there and whose ``settings`` fingerprint is the current one
(a record without one, from an older version, counts as current). Any other ok record
is redone: from its kept original when there is one, else by downloading again. At the
end the manifest is rewritten so that it holds exactly one line per URL again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from downloader.errors import OutputError
from downloader.records import Outcome, Status
from downloader.sources import check_url, normalize_url

__all__ = [
    "FAILED_NAME",
    "MANIFEST_NAME",
    "ManifestWriter",
    "OutputFolder",
    "PreviousRun",
    "record_key",
]

MANIFEST_NAME = "manifest.jsonl"
FAILED_NAME = "failed.txt"
TMP_NAME = ".tmp"
LOCK_NAME = ".lock"


def record_key(url: str) -> bytes:
    """Return the compact identity of a manifest URL (normalised, then hashed).

    A 16-byte digest instead of the URL string keeps the resume table small.
    """
    key = normalize_url(url) if check_url(url) is None else url
    return hashlib.blake2b(
        key.encode("utf-8", "surrogatepass"), digest_size=16
    ).digest()


def _output_error(action: str, path: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot {action} {path}: {exc.strerror or exc}")


class OutputFolder:
    """Own one output folder for a run: create, check, lock, and clean its scratch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path / TMP_NAME
        self.manifest = path / MANIFEST_NAME
        self._lock_file: IO[bytes] | None = None

    def __enter__(self) -> OutputFolder:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _output_error("create output folder", self.path, exc) from exc
        self._lock()
        try:
            self._reset_scratch()
            self._probe_writable()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):
            shutil.rmtree(self.tmp)
        self._unlock()

    def _lock(self) -> None:
        lock_path = self.path / LOCK_NAME
        try:
            self._lock_file = open(lock_path, "ab")  # noqa: SIM115 (held for the run)
        except OSError as exc:
            raise _output_error("use output folder", self.path, exc) from exc
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise OutputError(
                f"another run is using {self.path} (it holds {lock_path}); "
                "wait for it to finish or choose another --out"
            ) from None

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def _reset_scratch(self) -> None:
        # Anything in the scratch folder was left by a run that crashed or was
        # killed: no record points at it, so it is safe to remove.
        try:
            if self.tmp.is_symlink() or self.tmp.is_file():
                self.tmp.unlink()
            elif self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(mode=0o700)
        except OSError as exc:
            raise _output_error("prepare scratch folder", self.tmp, exc) from exc

    def _probe_writable(self) -> None:
        probe = self.tmp / "probe"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"probe")
            probe.unlink()
        except OSError as exc:
            raise _output_error("write in output folder", self.path, exc) from exc


class PreviousRun:
    """What earlier runs into the same folder finished: the latest record per URL.

    ``fingerprint`` is the current settings' (``reuse.settings_fingerprint``); with
    ``by_content`` the current ok records are also indexed by their body's SHA-256.
    """

    def __init__(
        self,
        folder: OutputFolder,
        *,
        fingerprint: str | None = None,
        by_content: bool = False,
    ) -> None:
        self._folder = folder
        self._fingerprint = fingerprint
        self._done: dict[bytes, str] = {}
        self._by_content: dict[bytes, str] = {}
        self.lines = 0
        self.unique = 0
        self._load()
        if by_content:
            self._index_content()

    def _load(self) -> None:
        latest: dict[bytes, bool] = {}
        for line, outcome in _read_manifest(self._folder.manifest):
            self.lines += 1
            key = record_key(outcome.url)
            latest[key] = outcome.ok
            if outcome.ok and outcome.path:
                self._done[key] = line
            else:
                self._done.pop(key, None)
        self.unique = len(latest)

    def _index_content(self) -> None:
        for line in self._done.values():
            sha256 = json.loads(line).get("sha256")
            if isinstance(sha256, str):
                self._by_content[_content_key(sha256)] = line

    def earlier(self, url: str) -> Outcome | None:
        """Return the latest record of ``url`` if it is ok (its files unchecked)."""
        line = self._done.get(record_key(url))
        return None if line is None else Outcome.from_json(json.loads(line))

    def current(self, outcome: Outcome) -> bool:
        """Tell whether an ok record still stands: same settings, image still there."""
        if outcome.settings is not None and outcome.settings != self._fingerprint:
            return False
        return outcome.path is not None and (self._folder.path / outcome.path).is_file()

    def finished(self, url: str) -> Outcome | None:
        """Return the earlier ok record of ``url`` if it still stands (``current``)."""
        outcome = self.earlier(url)
        return outcome if outcome is not None and self.current(outcome) else None

    def kept_original(self, outcome: Outcome) -> Path | None:
        """Return the kept download of an ok record, if it is still there."""
        if outcome.original is None:
            return None
        path = self._folder.path / outcome.original
        return path if path.is_file() else None

    def same_content(self, sha256: str) -> Outcome | None:
        """Return a standing ok record of a body with this SHA-256 (``by_content``)."""
        line = self._by_content.get(_content_key(sha256))
        if line is None:
            return None
        outcome = Outcome.from_json(json.loads(line))
        if outcome.sha256 != sha256 or not self.current(outcome):
            return None
        return outcome


def _content_key(sha256: str) -> bytes:
    """16 bytes of a hex SHA-256: enough to find a record, which is then checked."""
    try:
        return bytes.fromhex(sha256[:32])
    except ValueError:  # not hex: a hand-edited record; it will not match
        return sha256.encode("utf-8", "surrogatepass")


def _read_manifest(path: Path) -> Iterator[tuple[str, Outcome]]:
    """Yield each readable record of a manifest; a torn last line is ignored."""
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _output_error("read", path, exc) from exc
    with handle:
        for line in handle:
            try:
                outcome = Outcome.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash: its URL is simply redone
            yield line, outcome


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


class ManifestWriter:
    """Append records to the manifest, one flushed line each; the only writer."""

    def __init__(self, folder: OutputFolder, previous: PreviousRun) -> None:
        self._folder = folder
        self._previous = previous
        self.written = 0
        try:
            self._file: IO[str] | None = open(  # noqa: SIM115 (closed in close())
                folder.manifest, "a", encoding="utf-8"
            )
            if self._file.tell() > 0 and not _ends_with_newline(folder.manifest):
                # A crash tore the last line; start ours on a fresh line.
                self._file.write("\n")
        except OSError as exc:
            raise _output_error("open", folder.manifest, exc) from exc

    def write(self, outcome: Outcome) -> None:
        """Append ``outcome`` and flush it to the OS."""
        if self._file is None:
            raise RuntimeError("the manifest is closed")
        line = json.dumps(outcome.to_json(), ensure_ascii=False) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as exc:
            raise _output_error("write", self._folder.manifest, exc) from exc
        self.written += 1

    def close(self) -> None:
        """Close the file, then compact it and write ``failed.txt`` (idempotent)."""
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            file.close()
        except OSError as exc:
            raise _output_error("write", self._folder.manifest, exc) from exc
        if self._previous.lines:
            self._compact()
        self._write_failed_list()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _compact(self) -> None:
        """Rewrite the manifest keeping only the latest line per URL (atomically)."""
        last_line: dict[bytes, int] = {}
        for number, (_, outcome) in enumerate(_read_manifest(self._folder.manifest)):
            last_line[record_key(outcome.url)] = number
        keep = set(last_line.values())
        self._rewrite(
            self._folder.manifest,
            (
                line
                for number, (line, _) in enumerate(
                    _read_manifest(self._folder.manifest)
                )
                if number in keep
            ),
        )

    def _write_failed_list(self) -> None:
        failed = (
            outcome.url + "\n"
            for _, outcome in _read_manifest(self._folder.manifest)
            if outcome.status is Status.FAILED
        )
        self._rewrite(self._folder.path / FAILED_NAME, failed)

    def _rewrite(self, path: Path, lines: Iterator[str]) -> None:
        temporary = self._folder.tmp / (path.name + ".new")
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.writelines(lines)
            os.replace(temporary, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise _output_error("rewrite", path, exc) from exc
