"""The child-process bootstrap: stop line, parent watch, faults as data, restarts."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerContext, SpawnContext
from pathlib import Path

import pytest

from downloader.children import (
    RESTARTS_PER_CHILD,
    ChildError,
    ChildFault,
    RemoteTraceback,
    RestartBudget,
    StopLine,
    mp_context,
    watch,
)
from downloader.runtime import helper_processes
from tests import child_bodies
from tests.helpers import WAIT_S, wait_gone

ROOT = Path(__file__).resolve().parents[1]

Context = ForkServerContext | SpawnContext


@pytest.fixture
def context(tmp_path: Path) -> Iterator[Context]:
    """The children's start method; a forkserver started here ends with the test."""
    mp = mp_context()
    with helper_processes(tmp_path):
        yield mp


def _receive(reader: Connection) -> object:
    """The next message on ``reader``, waiting at most ``WAIT_S``."""
    assert reader.poll(WAIT_S), f"no message within {WAIT_S} s"
    return reader.recv()


def _fault_of_child(context: Context, *, unpicklable: bool) -> ChildFault:
    """Run ``child_bodies.raising`` in a child; return the fault it sent."""
    reader, writer = context.Pipe(duplex=False)
    with StopLine(context) as stop:
        child = context.Process(
            target=child_bodies.raising, args=(stop.reader, writer, unpicklable)
        )
        child.start()
        writer.close()
        try:
            fault = _receive(reader)
            after = _receive(reader)
        finally:
            child.join(WAIT_S)
            reader.close()
    assert child.exitcode == 0
    assert after == "after the boundary"  # the boundary ends the body, not the child
    assert isinstance(fault, ChildFault)
    return fault


def test_a_fault_in_a_child_comes_back_with_its_type_and_traceback(
    context: Context,
) -> None:
    """The parent gets the type, message and traceback, and can raise it again."""
    fault = _fault_of_child(context, unpicklable=False)

    assert fault.type_name == "LookupError"
    assert fault.message == child_bodies.MESSAGE
    assert "in explode\n" in fault.traceback
    assert fault.traceback.rstrip().endswith(f"LookupError: {child_bodies.MESSAGE}")
    with pytest.raises(LookupError, match=child_bodies.MESSAGE) as raised:
        raise fault.exception()
    cause = raised.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in explode\n" in str(cause)


def test_a_fault_that_does_not_pickle_comes_back_as_text(context: Context) -> None:
    """An exception that cannot be pickled still crosses, as a ``ChildError``."""
    fault = _fault_of_child(context, unpicklable=True)

    assert fault.type_name == "tests.child_bodies.Unpicklable"
    assert fault.pickled is None
    assert "in explode_unpicklably\n" in fault.traceback
    error = fault.exception()
    assert isinstance(error, ChildError)
    assert str(error) == f"tests.child_bodies.Unpicklable: {child_bodies.MESSAGE}"
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "in explode_unpicklably\n" in str(error.__cause__)


class _NeedsTwo(Exception):
    """Pickles, but cannot be rebuilt from its ``args`` (unpickling fails)."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(first)
        self.second = second


def test_a_fault_that_does_not_unpickle_comes_back_as_text() -> None:
    """A pickled exception that fails to rebuild becomes a ``ChildError``."""
    try:
        raise _NeedsTwo("one", "two")
    except _NeedsTwo as exc:
        fault = ChildFault.capture(exc)

    assert fault.pickled is not None
    fault = pickle.loads(pickle.dumps(fault))  # it crosses a Pipe like this
    error = fault.exception()
    assert isinstance(error, ChildError)
    assert str(error) == f"{__name__}._NeedsTwo: one"
    assert "test_a_fault_that_does_not_unpickle" in str(error.__cause__)


def test_closing_the_stop_line_runs_on_stop_in_the_child(context: Context) -> None:
    """EOF on the stop line reaches the child's ``on_stop``; SIGINT is ignored."""
    reader, writer = context.Pipe(duplex=False)
    with StopLine(context) as stop:
        child = context.Process(
            target=child_bodies.stoppable, args=(stop.reader, writer)
        )
        child.start()
        writer.close()
        try:
            ready = _receive(reader)
            stop.stop()
            stopped = _receive(reader)
        finally:
            child.join(WAIT_S)
            reader.close()

    assert ready == ("ready", True)
    assert stopped == "stopped"
    assert child.exitcode == 0


_PARENT = textwrap.dedent(
    """
    import sys
    from downloader.children import StopLine, mp_context
    from tests import child_bodies

    context = mp_context()
    stop = StopLine(context)
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=child_bodies.orphan, args=(stop.reader, writer))
    child.start()
    writer.close()
    if reader.poll({wait}) and reader.recv() == "ready":
        print(child.pid, flush=True)
    sys.stdin.read()  # until the test kills this process (or closes stdin)
    """
)


def test_a_child_exits_when_its_parent_dies() -> None:
    """SIGKILL the parent: its child, busy with its own wait, is gone soon after."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT.format(wait=WAIT_S)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdin is not None
    assert parent.stdout is not None
    try:
        assert wait([parent.stdout.fileno()], WAIT_S), "the parent started no child"
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"the parent's child did not start: {line!r}"
        child = int(line)
        os.kill(parent.pid, signal.SIGKILL)
        assert parent.wait(WAIT_S) == -signal.SIGKILL
        assert wait_gone([child], WAIT_S) == []
    finally:
        parent.kill()
        parent.wait(WAIT_S)
        parent.stdin.close()
        parent.stdout.close()


def test_the_watch_calls_on_stop_once_the_line_is_stopped() -> None:
    """In this process (no parent to watch), a stop still reaches ``on_stop``."""
    called = threading.Event()
    with StopLine(mp_context()) as stop:
        thread = watch(stop.reader, called.set)
        assert not stop.stopped
        stop.stop()
        stop.stop()  # idempotent
        assert stop.stopped
        assert called.wait(WAIT_S)
        thread.join(WAIT_S)
        assert not thread.is_alive()
    stop.close()  # idempotent, after the block closed it too


def test_the_restart_budget_allows_three_fruitless_restarts_per_child() -> None:
    """Restarts are counted per pool; a success starts the count again."""
    budget = RestartBudget(2)

    allowed = [budget.allow() for _ in range(2 * RESTARTS_PER_CHILD)]
    assert allowed == [True] * (2 * RESTARTS_PER_CHILD)
    assert budget.allow() is False

    budget.succeeded()
    assert budget.fruitless == 0
    assert budget.allow() is True


def test_a_restart_budget_needs_a_child() -> None:
    """A pool of no children is a caller's mistake."""
    with pytest.raises(ValueError, match="children must be greater than 0"):
        RestartBudget(0)
