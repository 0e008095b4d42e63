"""Bodies of the child processes that ``test_children`` starts.

A module of its own (not a test module) so that children import it cheaply. Each body
waits at most ``LIFETIME_S``, so that a child the test failed to end does not outlive
the test run for long.
"""

from __future__ import annotations

import signal
import threading
from multiprocessing.connection import Connection

from downloader.children import child_process

# Longer than any wait of the tests (tests.helpers.WAIT_S): a child still there after
# the test's wait is a failure of what the test checks, not of this bound.
LIFETIME_S = 120.0
MESSAGE = "no image at index 42"


class Unpicklable(Exception):
    """An exception that cannot be pickled (it holds a lock)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def explode() -> None:
    """The function whose frame the fault's traceback must show."""
    raise LookupError(MESSAGE)


def explode_unpicklably() -> None:
    """Raise an exception that cannot cross as itself, only as text."""
    raise Unpicklable(MESSAGE)


def raising(stop: Connection, results: Connection, unpicklable: bool) -> None:
    """Fail inside the bootstrap's error boundary, then say goodbye."""
    try:
        with child_process(stop, lambda: None, results.send):
            if unpicklable:
                explode_unpicklably()
            else:
                explode()
        results.send("after the boundary")
    finally:
        results.close()


def stoppable(stop: Connection, results: Connection) -> None:
    """Report whether SIGINT is ignored, wait for the stop, report it."""
    stopped = threading.Event()
    try:
        with child_process(stop, stopped.set, results.send):
            ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            results.send(("ready", ignored))
            results.send("stopped" if stopped.wait(LIFETIME_S) else "never stopped")
    finally:
        results.close()


def orphan(stop: Connection, results: Connection) -> None:
    """Say ready, then wait without ever ending by itself (within ``LIFETIME_S``).

    A stop does not end it either: only the watch's exit on the parent's death can.
    """
    never = threading.Event()
    with child_process(stop, lambda: None, results.send):
        results.send("ready")
        results.close()
        never.wait(LIFETIME_S)
