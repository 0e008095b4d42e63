"""Ends the processes of a local Ray when the driver that started it is gone.

::

    driver ──ray.init(local), DOWNLOADER_RAY_OWNER=<token> in the environment──►
      │        gcs_server, raylet, agents, workers (they inherit it, and pass it on)
      ├──pidfd──►  this watcher (its own session): waits for the driver's end,
      └──stdin──►  or for the driver to say its Ray is stopped; then SIGKILLs
                   every process whose environment holds the token, and those
                   it noted (every second) below a marked child of the driver

Why: Ray ties only the processes it starts itself to their parent
(``PR_SET_PDEATHSIG``); after a ``kill -9`` of the driver, the agents and idle workers
that the raylet started live on, reparented to init. They cannot be found by
parentage then, nor by process group (a worker makes its own), and never by name:
other Rays run on the same machine. The token marks exactly this Ray's processes;
where a process title was written over the environment (an agent's, at times),
the descendants noted while the driver lived cover it.

Run by path (``python -I ray_reaper.py TOKEN PIDFD``), with nothing but the standard
library: the driver's working folder and ``sys.path`` are not this one's.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

__all__ = ["OWNER_ENV", "marked_pids", "ray_descendants", "reap"]

OWNER_ENV = "DOWNLOADER_RAY_OWNER"
"""The variable whose value marks the processes of one local Ray."""
REAP_S = 30.0
"""Longest the watcher keeps looking for marked processes once it has begun."""
_SCAN_S = 0.2


def marked_pids(token: str) -> list[int]:
    """The live processes (of this user) whose environment holds ``token``."""
    needle = f"{OWNER_ENV}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with (
            contextlib.suppress(OSError),
            open(f"/proc/{entry}/environ", "rb") as handle,
        ):
            if needle in handle.read().split(b"\0"):
                found.append(int(entry))
    return found


def reap(
    token: str, known: dict[int, str] | None = None, deadline_s: float = REAP_S
) -> list[int]:
    """SIGKILL every process marked with ``token``, and those of ``known`` (pid:
    start time) still alive, until none is left (or the deadline passes: a process
    being created at the last scan is caught at the next); return those still
    found then."""
    known = known or {}
    deadline = time.monotonic() + deadline_s
    empty_scans = 0
    while True:
        pids = set(marked_pids(token))
        pids |= {pid for pid, start in known.items() if _started_at(pid) == start}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        # Twice empty, a while apart: one being started by a dying parent is seen.
        empty_scans = 0 if pids else empty_scans + 1
        if empty_scans == 2 or time.monotonic() > deadline:
            return sorted(pids)
        time.sleep(_SCAN_S)


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name; [] if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return []
    return text[text.rindex(")") + 2 :].split()


def _started_at(pid: int) -> str | None:
    """The start time of a live process (it tells a reused pid), else None."""
    fields = _stat(pid)
    return fields[19] if fields and fields[0] != "Z" else None


def ray_descendants(parent: int, token: str) -> dict[int, str]:
    """The live descendants of ``parent`` that are marked with ``token``, or
    descend from one that is (the raylet's agents and workers), with their start
    times; the parent's other children are not Ray's."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    marked = set(marked_pids(token))
    found: dict[int, str] = {}
    frontier = [(parent, False)]
    while frontier:
        pid, under_ray = frontier.pop()
        for child in children.get(pid, []):
            ray = under_ray or child in marked
            start = _started_at(child)
            if ray and start is not None:
                found[child] = start
            frontier.append((child, ray))
    return found


def _watch(token: str, driver: int) -> None:
    """Wait until the driver (this process's parent) ends (its pidfd) or writes or
    closes standard input; meanwhile note its descendants every ``_NOTE_S``, which
    are ended too: a process whose environment cannot be read (a title written
    over it) is still found by its parent, once noted."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the driver's to handle
    parent = os.getppid()
    watched = [sys.stdin.fileno()] if driver < 0 else [driver, sys.stdin.fileno()]
    known: dict[int, str] = {}
    while not select.select(watched, [], [], _NOTE_S)[0]:
        known.update(ray_descendants(parent, token))
    reap(token, known)


_NOTE_S = 1.0


if __name__ == "__main__":
    _watch(sys.argv[1], int(sys.argv[2]))
