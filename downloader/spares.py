"""Spare download files: a finished download's inode, written over by the next one.

In the pipeline the download threads write each body to a new ``<stem>.part`` in the
scratch folder, and the worker that transforms it removes it. On this machine's
ext4 that cycle was the main process's largest kernel cost per photo (``perf`` over
``benchmarks/main_cpu.py``: writing the ``.part`` files 9.6% of its samples,
creating them 4.6%, against 6.9% for the socket reads): a new inode is found past
every one freed in the last seconds (``find_inode_bit``, ``recently_deleted``), and
every page of the body is allocated and reserved again (``ext4_da_write_begin``).

So a worker done with a download nobody keeps links it to a spare name first
(``Task.recycle_to``; the link is made before its ``TaskDone`` is sent, so that the
main process, reading that message, finds the spare in place). A download thread
then takes a spare, renames it to its own ``.part`` and writes the new body over
the old pages from the start, cutting the file to what it wrote when it closes it
(``fetch._PartFile``). Nothing changes for the readers: a ``.part`` is only read
once it is closed, by then exactly its body.

A spare is only a name in the run's scratch folder: the run removes the folder when
it ends, and the next run when it starts after a crash. How many there are is
bounded (``most``, lent and ready together), and a body larger than
``MOST_BYTES`` is not kept as one. A spare is written over only if it is still the
file the worker linked (``Identity``: device and inode, checked on the open file):
a new ``.part`` used to be created, never opened, so nothing put under a spare's
name (a link to a file elsewhere, a FIFO) may be written through instead.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from pathlib import Path

from downloader.records import Identity

__all__ = ["MOST_BYTES", "Spare", "SpareFiles"]

MOST_BYTES = 8 * 1024 * 1024
"""The largest download kept as a spare: a spare's pages stay in the scratch folder
until a download takes it, so one huge body must not be kept for small ones."""

Spare = tuple[str, Identity]
"""A spare's name and the identity of the file the worker linked to it."""

SUFFIX = ".spare"
"""No ``.part`` (``<stem>.part``) or output in the scratch folder ends so."""


class SpareFiles:
    """The spares of one run's scratch folder, shared by its threads.

    The transform pool ``lend``s a name for each download it hands to a worker and
    ``settle``s it when the worker answers; a download thread ``take``s a ready one.
    """

    def __init__(self, folder: Path, most: int) -> None:
        self._folder = folder
        self._most = most
        self._ready: deque[Spare] = deque()
        self._lent = 0
        self._numbers = itertools.count()
        self._lock = threading.Lock()

    def lend(self, nbytes: int) -> str | None:
        """A new name for a worker to link the download it is handed to (``nbytes``
        long), or None if no more spares are wanted or the body is too large."""
        if nbytes > MOST_BYTES:
            return None
        with self._lock:
            if self._lent + len(self._ready) >= self._most:
                return None
            self._lent += 1
            number = next(self._numbers)
        return str(self._folder / f"{number}{SUFFIX}")

    def settle(self, name: str, linked: Identity | None) -> None:
        """The worker answered for ``name``: ``linked`` to the file of that identity,
        it is a spare now; None, it is not."""
        with self._lock:
            self._lent -= 1
            if linked is not None:
                self._ready.append((name, linked))

    def take(self) -> Spare | None:
        """A ready spare to write a download over (it is the caller's), or None."""
        try:
            return self._ready.popleft()
        except IndexError:
            return None
