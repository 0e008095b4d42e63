"""Ends the processes of a local Ray when the driver that started it is gone.

::

    driver ──ray.init(local), DOWNLOADER_RAY_OWNER=<token> in the environment──►
      │        gcs_server, raylet, agents, workers (they inherit it, and pass it on)
      ├──pidfd──►  this watcher (its own session): waits for the driver's end,
      └──stdin──►  or for the driver to say its Ray is stopped; then SIGKILLs
                   every process whose environment holds the token

Why: Ray ties only the processes it starts itself to their parent
(``PR_SET_PDEATHSIG``); after a ``kill -9`` of the driver, the agents and idle workers
that the raylet started live on, reparented to init. They cannot be found by
parentage then, nor by process group (a worker makes its own), and never by name:
other Rays run on the same machine. The token marks exactly this Ray's processes.

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

__all__ = ["OWNER_ENV", "marked_pids", "reap"]

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


def reap(token: str, deadline_s: float = REAP_S) -> list[int]:
    """SIGKILL every process marked with ``token`` until none is left (or the
    deadline passes: a process being created at the last scan is caught at the
    next); return those still found then."""
    deadline = time.monotonic() + deadline_s
    empty_scans = 0
    while True:
        pids = marked_pids(token)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        # Twice empty, a while apart: one being started by a dying parent is seen.
        empty_scans = 0 if pids else empty_scans + 1
        if empty_scans == 2 or time.monotonic() > deadline:
            return pids
        time.sleep(_SCAN_S)


def _watch(token: str, driver: int) -> None:
    """Wait until the driver ends (its pidfd) or writes or closes standard input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the driver's to handle
    watched = [sys.stdin.fileno()] if driver < 0 else [driver, sys.stdin.fileno()]
    select.select(watched, [], [])
    reap(token)


if __name__ == "__main__":
    _watch(sys.argv[1], int(sys.argv[2]))
