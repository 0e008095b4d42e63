"""What every scheduler shares for one run: output paths, progress sink, cancellation.

``Cancellation`` is the one flag that Ctrl-C, SIGTERM, a fatal error or a library caller
sets to stop a run. Besides a ``threading.Event`` (for download threads) it owns a
self-pipe, so a scheduler blocked in ``multiprocessing.connection.wait`` wakes at once.

Signals: ``interrupt_on_signals`` covers a whole command (a signal raises
``KeyboardInterrupt``); ``cancel_on_signals`` a run inside it (the first signal sets
the ``Cancellation``, so the run stops in order and records every URL).

Helper processes: on Linux workers start through multiprocessing's forkserver, which
multiprocessing keeps for the life of the Python process, its socket in a ``pymp-*``
folder of the system's temporary directory that a killed process never removes.
``helper_processes`` gives it to one run instead: its socket lives in the run's
scratch folder (swept by the next run on that output folder) and it is stopped when
the run ends. ``stop_helper_processes`` also ends the resource tracker, so that the
command line leaves no process behind. A run may have it started as soon as its folder
is taken (``start``: ``api`` does for ``--mode processes``, whose first request is a
worker's), so that the forkserver's own start-up (a fresh interpreter importing the
workers' modules) overlaps the rest of the run's.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import gc
import multiprocessing.forkserver
import multiprocessing.process
import multiprocessing.resource_tracker
import multiprocessing.synchronize
import multiprocessing.util
import os
import select
import shutil
import signal
import stat
import sys
import tempfile
import threading
import weakref
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from downloader.children import launches, mp_context
from downloader.progress import Events

__all__ = [
    "Cancellation",
    "Interrupts",
    "RunContext",
    "Usage",
    "Wakeup",
    "cancel_on_signals",
    "close_at_exit",
    "close_open_runs",
    "helper_processes",
    "interrupt_on_signals",
    "stop_helper_processes",
]

# Bytes of a unix socket's path that Linux accepts (sun_path holds 108 with the NUL).
MAX_SOCKET_PATH_BYTES = 107
# What multiprocessing adds to its temporary folder for the forkserver's socket:
# "/listener-" and 8 random characters (``connection.arbitrary_address``).
_SOCKET_NAME_BYTES = len("/listener-") + 8
# The folder inside a run's scratch folder that holds the forkserver's socket.
_SOCKET_FOLDER = "mp"
# Folders in the system's temporary directory for the socket when the scratch folder's
# path is too long for one; each holds a lock file while its run lives.
FALLBACK_PREFIX = "downloader-mp-"
_FALLBACK_LOCK = "lock"
# How long a helper process may take to exit once told to. A forkserver started by a
# short run may still be importing its preload modules (~0.5 s on a busy machine).
_HELPER_EXIT_S = 10.0


class Wakeup:
    """A self-pipe: any thread (or a signal handler) can wake a ``wait()`` on it."""

    def __init__(self) -> None:
        self._reader, self._writer = os.pipe()
        os.set_blocking(self._reader, False)
        # A full pipe already means "wake up"; a writer must never block on it.
        os.set_blocking(self._writer, False)
        self._closed = False

    def fileno(self) -> int:
        """Return the descriptor to wait on."""
        return self._reader

    def wake(self) -> None:
        """Make the next (or current) wait on this object return."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._writer, b"\0")

    def clear(self) -> None:
        """Consume pending wake-ups."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._reader, 4096):
                pass

    def close(self) -> None:
        """Close both ends (idempotent)."""
        if not self._closed:
            self._closed = True
            os.close(self._reader)
            os.close(self._writer)


class Cancellation:
    """The stop flag of one run, with the reason it was set."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason: str | None = None
        self._wakeups: list[Wakeup] = []
        self._lock = threading.Lock()

    def set(self, reason: str = "interrupted") -> None:
        """Ask the run to stop; the first reason given is kept."""
        if self.reason is None:
            self.reason = reason
        self.event.set()
        for wakeup in list(self._wakeups):
            wakeup.wake()

    def is_set(self) -> bool:
        """Return True once the run has been asked to stop."""
        return self.event.is_set()

    @contextlib.contextmanager
    def waking(self, wakeup: Wakeup) -> Iterator[None]:
        """Wake ``wakeup`` when cancelled, for as long as the block runs."""
        with self._lock:
            self._wakeups.append(wakeup)
        if self.is_set():
            wakeup.wake()
        try:
            yield
        finally:
            with self._lock:
                self._wakeups.remove(wakeup)


class Usage:
    """CPU seconds used by worker processes, which ``os.times`` cannot see.

    Workers are forked by the forkserver, not by this process, so their time never
    shows up in this process's children counters; each reports it when it exits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.worker_cpu_s = 0.0

    def add_worker_cpu(self, seconds: float) -> None:
        """Add the CPU time a finished worker reported."""
        with self._lock:
            self.worker_cpu_s += seconds


@dataclass(frozen=True, slots=True)
class RunContext:
    """Paths and shared objects one scheduler needs besides the settings."""

    out: Path
    """The output folder (final images, manifest)."""
    tmp: Path
    """Scratch folder inside ``out`` for partial downloads and outputs."""
    events: Events
    cancel: Cancellation
    usage: Usage = field(default_factory=Usage)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """SIGINT and SIGTERM for a whole command: raised as KeyboardInterrupt, or noted.

    While ``armed`` a signal raises ``KeyboardInterrupt`` in the main thread, so it
    stops whatever the command is doing, even a blocking ``open()`` of a FIFO that
    has no writer yet (Python retries a call a handler merely returned from). Outside
    it a signal is only noted in ``received``: the command's last steps are not cut
    short, and its exit code still says it was interrupted.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._armed = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: note the first signal; raise while armed."""
        if self.received is None:
            self.received = signal.Signals(signum)
        if self._armed:
            raise KeyboardInterrupt(f"interrupted by {signal.Signals(signum).name}")

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Raise on a signal during the block, and at once for one already noted."""
        self._armed = True
        try:
            if self.received is not None:
                raise KeyboardInterrupt(f"interrupted by {self.received.name}")
            yield
        finally:
            self._armed = False


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[Interrupts]:
    """Handle SIGINT and SIGTERM with an ``Interrupts`` for the block.

    Held by the command line from its first step to its last, so that no signal
    meets the default action (SIGTERM's ends the process at once, skipping every
    cleanup, with 143). ``cancel_on_signals`` takes over while a run goes on.
    Outside the main thread handlers cannot be installed, and nothing is done.
    """
    interrupts = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return
    previous = {number: signal.signal(number, interrupts.handle) for number in _SIGNALS}
    try:
        yield interrupts
    finally:
        _restore(previous)


@contextlib.contextmanager
def cancel_on_signals(cancel: Cancellation) -> Iterator[None]:
    """Turn the first Ctrl-C or SIGTERM into a cancellation; a second one interrupts.

    Outside the main thread signal handlers cannot be installed, so this does nothing
    there and a caller's own KeyboardInterrupt handling applies.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        cancel.set(f"interrupted by {name}")

    previous = {number: signal.signal(number, handle) for number in _SIGNALS}
    try:
        yield
    finally:
        _restore(previous)


def _restore(previous: dict[signal.Signals, signal._HANDLER]) -> None:
    for number, handler in previous.items():
        # None means a handler installed from C; the default is the best we have.
        signal.signal(number, signal.SIG_DFL if handler is None else handler)


@dataclass(slots=True)
class _Home:
    """A folder that holds the forkserver's socket during a run."""

    path: Path
    lock: int | None = None
    """Descriptor of the held lock file of a folder in the system's temporary dir."""

    def remove(self) -> None:
        """Remove the folder, then release its lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


class _HelperState:
    """The runs of this process that share the forkserver (they may overlap in threads).

    The forkserver is process-wide: the first run to start while none is running
    decides its folder; later overlapping runs share it. When the run whose folder
    holds the socket ends before the others, the forkserver is detached (it exits
    once the workers it forked have, and is reaped at the end) and the next start
    makes a new one in a folder of a run still going.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.homes: list[_Home] = []
        self.managing = False
        self.saved_tempdir: tuple[bool, object] = (False, None)
        self.detached: list[int] = []
        self.started_at: int | None = None
        """``children.launches()`` when a run started the forkserver ahead of its
        first worker (``start``); None when it was started otherwise, and once that
        forkserver has been stopped."""


_helpers = _HelperState()


@contextlib.contextmanager
def helper_processes(scratch: Path, *, start: bool = False) -> Iterator[None]:
    """Keep the forkserver of the run inside the run: its socket, its lifetime.

    For the block, multiprocessing's temporary folder is ``scratch/mp``; or, when that
    path is too long for a socket, a ``downloader-mp-*`` folder in the system's
    temporary directory, locked while the run lives and removed by the next run
    that finds it unlocked. The forkserver started in the block is stopped (and
    reaped) when it ends. A forkserver already running before is left alone.

    With ``start`` (a run whose workers start through it) it is started now, with
    ``children.mp_context``'s preload, rather than at the first worker: it imports
    its preload while the run imports and plans. One that started no child by the
    end is killed at once rather than waited for (it may still be importing).
    """
    server = _forkserver()
    if server is None:
        yield
        return
    with _helpers.lock:
        home = _enter(server, scratch)
    try:
        if start and home is not None:
            with _helpers.lock:
                _start_forkserver(server)
        yield
    finally:
        if home is not None:
            try:
                with _helpers.lock:
                    _leave(server, home)
            finally:
                home.remove()


def stop_helper_processes() -> None:
    """End the forkserver and the resource tracker now, so none outlives the caller.

    For the command line's last step, once every worker has ended. The resource
    tracker is left running while a semaphore is still alive (its finalizer would
    start a new one); then it ends right after this process, as usual.
    """
    server = _forkserver()
    if server is not None:
        with _helpers.lock:
            if not _helpers.homes:
                _stop_forkserver(server)
    gc.collect()  # semaphores of a finished run that only a cycle still holds
    if _semaphores_alive():
        return
    tracker: Any = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    if tracker is None or not hasattr(tracker, "_fd"):
        return
    with tracker._lock:
        descriptor, pid = tracker._fd, getattr(tracker, "_pid", None)
        tracker._fd = None
        tracker._pid = None
    if descriptor is not None:
        os.close(descriptor)  # EOF on its pipe: it cleans up and exits
        if pid is not None:
            _reap(pid, kill=False)


def _forkserver() -> Any:
    """multiprocessing's forkserver of this process, when workers start through it."""
    if sys.platform != "linux":
        return None
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    if server is None or not hasattr(server, "_forkserver_pid"):
        return None  # another Python whose forkserver this code does not know
    return server


def _config() -> dict[str, object]:
    """Multiprocessing's settings, where ``get_temp_dir`` keeps its folder."""
    process: Any = multiprocessing.process.current_process()
    config: dict[str, object] = process._config
    return config


def _enter(server: Any, scratch: Path) -> _Home | None:
    """Register a run; the first one sets the forkserver's folder if none runs."""
    if _helpers.homes:
        if not _helpers.managing:
            return None
    elif server._forkserver_pid is not None:
        return None  # started outside any run: not ours to move or stop
    home = _new_home(scratch)
    if home is None:
        return None
    _helpers.homes.append(home)
    if not _helpers.managing:
        _helpers.managing = True
        config = _config()
        _helpers.saved_tempdir = ("tempdir" in config, config.get("tempdir"))
        config["tempdir"] = str(home.path)
    return home


def _leave(server: Any, home: _Home) -> None:
    """Unregister a run: stop the forkserver after the last one, or move it on."""
    _helpers.homes.remove(home)
    config = _config()
    if not _helpers.homes:
        had, value = _helpers.saved_tempdir
        if had:
            config["tempdir"] = value
        else:
            config.pop("tempdir", None)
        _helpers.managing = False
        _stop_forkserver(server)
    elif config.get("tempdir") == str(home.path):
        # The socket goes with this run's folder: the next start makes a new server.
        pid = _forget_forkserver(server)
        if pid is not None:
            _helpers.detached.append(pid)
        config["tempdir"] = str(_helpers.homes[0].path)


def _new_home(scratch: Path) -> _Home | None:
    """The socket's folder in ``scratch``, else a locked one in the temporary dir."""
    path = Path(os.path.abspath(scratch)) / _SOCKET_FOLDER
    if _fits(path):
        try:
            path.mkdir(mode=0o700)
        except OSError:
            pass
        else:
            return _Home(path)
    return _fallback_home()


def _fits(folder: Path) -> bool:
    """True if a socket that multiprocessing names in ``folder`` can be bound."""
    return len(os.fsencode(folder)) + _SOCKET_NAME_BYTES <= MAX_SOCKET_PATH_BYTES


def _fallback_home() -> _Home | None:
    """A new locked folder in the temporary dir, after sweeping unlocked ones."""
    base = Path(tempfile.gettempdir())
    _sweep_fallback_homes(base)
    try:
        # Made under a name the sweep ignores, and renamed once locked, so that a
        # sweep never takes a folder whose lock is not held yet.
        staging = Path(tempfile.mkdtemp(prefix=f".{FALLBACK_PREFIX}", dir=base))
    except OSError:
        return None
    home = _Home(staging)
    try:
        home.lock = os.open(
            staging / _FALLBACK_LOCK, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        fcntl.flock(home.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        final = staging.with_name(staging.name.removeprefix("."))
        os.rename(staging, final)
        home.path = final
    except OSError:
        home.remove()
        return None
    if not _fits(final):
        home.remove()
        return None
    return home


def _sweep_fallback_homes(base: Path) -> None:
    """Remove the fallback folders of this user whose run has ended (lock free)."""
    try:
        entries = [
            entry for entry in base.iterdir() if entry.name.startswith(FALLBACK_PREFIX)
        ]
    except OSError:
        return
    for entry in entries:
        try:
            info = entry.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            descriptor = os.open(
                entry / _FALLBACK_LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
            )
        except OSError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: its run is alive
        else:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(descriptor)


def _forget_forkserver(server: Any) -> int | None:
    """Make multiprocessing start a new forkserver next; return the old one's pid.

    Closing our end of its "alive" pipe lets it exit once the processes it forked
    (which hold the other copies) have.
    """
    with server._lock:
        pid = server._forkserver_pid
        alive, address = server._forkserver_alive_fd, server._forkserver_address
        server._forkserver_pid = None
        server._forkserver_alive_fd = None
        server._forkserver_address = None
    if alive is not None:
        os.close(alive)
    if isinstance(address, str) and address and not address.startswith("\0"):
        with contextlib.suppress(OSError):
            os.unlink(address)
    return pid if isinstance(pid, int) else None


def _start_forkserver(server: Any) -> None:
    """Start the forkserver now, unless it runs, noting that no child started yet.

    Starting it is two process launches (the resource tracker's, the forkserver's);
    the imports of its preload happen in it, not here.
    """
    if server._forkserver_pid is not None:
        return
    mp_context()  # sets the preload the forkserver imports
    try:
        server.ensure_running()
    except OSError:
        return  # no process to spare: the first worker's start meets it as before
    _helpers.started_at = launches()


def _unused_since_started() -> bool:
    """True if a run started the forkserver early and no child started since."""
    started_at, _helpers.started_at = _helpers.started_at, None
    return started_at is not None and launches() == started_at


def _stop_forkserver(server: Any) -> None:
    """Stop the forkserver and reap it (bounded: killed if it does not exit).

    One that started no child holds nothing: it is killed at once, rather than
    waited for while it finishes importing its preload, which nobody will use (a
    run that found nothing to do, or failed before its first worker).
    """
    unused = _unused_since_started()
    pid = _forget_forkserver(server)
    if pid is not None:
        if unused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _helpers.detached.append(pid)
    _reap_detached()


def _reap_detached() -> None:
    """Reap the forkservers let go; each stays listed until reaped, so that one
    interrupted here is still reaped by the next call."""
    while _helpers.detached:
        _reap(_helpers.detached[-1], kill=True)
        _helpers.detached.pop()


def _reap(pid: int, *, kill: bool) -> bool:
    """Wait up to ``_HELPER_EXIT_S`` for the child ``pid`` to exit; reap it.

    Returns False if it is still running then; with ``kill`` it is killed and
    reaped instead (a forkserver holds nothing that needs an orderly end; the
    resource tracker must not be killed, or what it should clean up would leak).
    """
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return True  # reaped already
    except OSError:
        handle = None  # a kernel without pidfds: no wait, only the check below
    if handle is not None:
        try:
            select.select([handle], [], [], _HELPER_EXIT_S)
        finally:
            os.close(handle)
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return True
        if not kill:
            return False
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # reaped by someone else meanwhile
    return True


def _semaphores_alive() -> bool:
    """True while a multiprocessing semaphore of this process still exists."""
    registry = getattr(multiprocessing.util, "_finalizer_registry", {})
    cleanup = getattr(multiprocessing.synchronize.SemLock, "_cleanup", None)
    return any(
        getattr(finalizer, "_callback", None) is cleanup
        for finalizer in list(registry.values())
    )


# ------------------------------------------------------- runs left open at exit

_open_runs: weakref.WeakSet[Generator[Any, None, None]] = weakref.WeakSet()


def close_at_exit(results: Generator[Any, None, None]) -> None:
    """Have ``results`` (an ``iter_results`` generator) closed at interpreter exit
    if its caller has not closed it: the run then stops as when its caller leaves
    early (records for what was not done, every process ended), while the
    interpreter is still whole. Left to the garbage collector, it would be closed
    during the interpreter's teardown, after the exit handlers of the libraries it
    uses (Ray's ``shutdown``), if at all."""
    _open_runs.add(results)


def close_open_runs() -> None:
    """Close every run ``close_at_exit`` was given that is still open."""
    for results in list(_open_runs):
        with contextlib.suppress(ValueError):  # running: the exit is its own caller's
            results.close()


atexit.register(close_open_runs)
