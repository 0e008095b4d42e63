"""Shared fixtures: a small generated corpus served by the package's own server."""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing.forkserver
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from PIL import Image

from downloader.children import mp_context
from downloader.demo import generate_corpus, serve_in_thread
from downloader.runtime import stop_helper_processes
from downloader.settings import Mode
from tests.helpers import (
    CORPUS_SIZE,
    FLAT_IMAGE,
    SLOW_IMAGE,
    SLOW_IMAGE_SIZE,
    WAIT_S,
    LocalServer,
)
from tests.user_transforms import KILLS_ENV

# Hypothesis's deadline is a timing assert: under parallel workers on a busy machine
# an example can take longer than 200 ms without anything being wrong.
hypothesis.settings.register_profile("suite", deadline=None)
hypothesis.settings.load_profile("suite")


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, when installed
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """The suite runs in parallel workers (pytest-xdist, ``-n`` in pyproject.toml);
    every test on the session's Ray goes to one worker, so that one Ray runs, started
    once, as in a run without workers.

    xdist's own ``--dist loadgroup`` would do it with ``xdist_group`` marks, but it
    silently stops grouping with pytest 9.2 (pytest-dev/pytest-xdist#1386): the
    controller only sees test ids, so the group is told by the id (``on_ray_worker``)
    and checked against the fixtures at collection (``pytest_collection_modifyitems``).
    """
    if config.getoption("dist") != "loadgroup":
        return None  # another --dist asked for: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class RayTogether(LoadScopeScheduling):  # type: ignore[misc]
        """Each test a unit of its own, the Ray ones one unit: the largest unit is
        sent first, so the Ray tests start at once on one worker."""

        def _split_scope(self, nodeid: str) -> str:
            return "ray" if on_ray_worker(nodeid) else nodeid

    return RayTogether(config, log)


def on_ray_worker(nodeid: str) -> bool:
    """Whether the test runs on the Ray worker: ``ray`` is a word of its id (the file
    test_ray.py, a test named ..._ray_..., a parameter ``ray`` or ``Mode.RAY``)."""
    return "ray" in re.split(r"[^a-z0-9]+", nodeid.lower())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on the session's Ray must be one the scheduler sends to the Ray worker:
    else its worker would start a second Ray."""
    for item in items:
        if _on_ray(item) and not on_ray_worker(item.nodeid):
            raise pytest.UsageError(
                f"{item.nodeid} uses the session's Ray: put 'ray' in its name "
                "(tests/conftest.py keeps such tests on one worker)"
            )


def _on_ray(item: pytest.Item) -> bool:
    """Whether the test joins the session's Ray: it asks for ``ray_cluster`` (maybe
    through another fixture), or runs in ray mode (``shared`` of test_invariants
    asks for the cluster only for that parameter)."""
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec is not None else ()
    fixtures = getattr(item, "fixturenames", ())
    return "ray_cluster" in fixtures or any(value is Mode.RAY for value in params)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dozen small photo-like images, one slow-to-decode PNG and a small flat one."""
    folder = tmp_path_factory.mktemp("corpus")
    generate_corpus(
        folder, CORPUS_SIZE, seed=1, min_megapixels=0.02, max_megapixels=0.06
    )
    Image.new("RGB", SLOW_IMAGE_SIZE, (90, 120, 150)).save(folder / SLOW_IMAGE)
    Image.new("RGB", (40, 30), (150, 120, 90)).save(folder / FLAT_IMAGE)
    return folder


@pytest.fixture
def server(corpus: Path) -> Iterator[LocalServer]:
    """The corpus server in a thread of the test process, fresh request counts."""
    with serve_in_thread(LocalServer(corpus)) as running:
        assert isinstance(running, LocalServer)
        yield running


STOP_FORKSERVER = {"worker_kills", "no_forkserver"}
"""Fixtures that stop a forkserver left running: one warmed for their test would be
stopped at once, still importing its preload (seconds on a loaded machine)."""


@pytest.fixture(scope="session")
def _helpers_end() -> Iterator[None]:
    """Stop the forkserver and resource tracker the session left, at its end."""
    yield
    stop_helper_processes()


@pytest.fixture(autouse=True)
def warm_forkserver(request: pytest.FixtureRequest) -> None:
    """A forkserver already running when a test that downloads the corpus starts.

    Each run starts its own forkserver when none runs (~0.6 CPU-s: a fresh
    interpreter importing ``children.PRELOAD``), and stops it when it ends: most of
    a worker mode's test time. A forkserver started outside any run is one a run
    uses and leaves alone (``runtime.helper_processes``), as a Ray started once
    serves the session's ray tests; so does ``main()`` called in this process (a
    caller's forkserver is not its own to stop). The in-run forkserver keeps its own
    tests: every command line in a subprocess, and the fixtures that stop it first
    (``worker_kills``, ``no_forkserver`` of test_runtime.py). Workers inherit the
    forkserver's environment, not the test's: a test that sets a variable its
    workers must see stops it first, as ``worker_kills`` does.
    """
    fixtures = set(request.fixturenames)
    if "corpus" in fixtures and not fixtures & STOP_FORKSERVER:
        request.getfixturevalue("_helpers_end")
        context = mp_context()  # sets the forkserver's preload, as a run does
        server: Any = getattr(multiprocessing.forkserver, "_forkserver", None)
        if getattr(server, "_forkserver_pid", None) is None:
            # Started here: wait until it has imported its preload (a child starts
            # only then), so that its start-up does not compete with the test for
            # CPU (a rate or a timeout measured meanwhile would feel it).
            child = context.Process(target=os.getpid)
            child.start()
            child.join(WAIT_S)
            assert child.exitcode == 0, "the forkserver started no child"
        multiprocessing.forkserver.ensure_running()


@pytest.fixture
def worker_kills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder where the killing transforms of ``tests.user_transforms`` note
    each kill; its path is in the environment that the run's workers inherit."""
    folder = tmp_path / "kills"
    folder.mkdir()
    monkeypatch.setenv(KILLS_ENV, str(folder))
    # Workers inherit the forkserver's environment: one left running by an earlier
    # test (started outside any run) predates the variable, so stop it first.
    stop_helper_processes()
    return folder


RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "token",
}
"""What downloader.ray_mode sets for a local Ray: no usage statistics, and every
address Ray picks is 127.0.0.1 (Ray reads them when it is imported or started);
and token authentication for the nodes and every driver, as ``ray.init`` turns on
for a Ray it starts (the token is in ``~/.ray/auth_token``)."""
RAY_STOP_S = 2.0


@dataclass(frozen=True)
class RayCluster:
    """The tests' one local Ray: where to join it, where its kills are noted."""

    address: str
    kills: Path
    """``KILLS_ENV`` of its workers (set when the cluster starts: they are not the
    test process's children and do not see a variable set later)."""


@contextlib.contextmanager
def ray_node(*args: str, env: dict[str, str]) -> Iterator[None]:
    """``ray start ARGS`` on 127.0.0.1 in a session of its own; its processes are
    ended (the whole group: never ``ray stop``, which ends every Ray of the user)."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", *args]
    starter = subprocess.Popen(
        [*command, "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
        env={**os.environ, **RAY_ENV, **env},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Ray's processes outlive a test process that is killed (they are not its
    # children): this one ends them then.
    watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCH, str(os.getpid()), str(starter.pid)],
        start_new_session=True,
    )
    try:
        _, stderr = starter.communicate(timeout=120)
        assert starter.returncode == 0, stderr
        yield
    finally:
        _end_group(starter.pid)
        watcher.kill()
        watcher.wait()


_WATCH = """
import os, select, signal, sys
select.select([os.pidfd_open(int(sys.argv[1]))], [], [])
os.killpg(int(sys.argv[2]), signal.SIGKILL)
"""
"""Wait for the test process (argv 1) to end, then kill a process group (argv 2)."""


def _end_group(group: int) -> None:
    """SIGTERM the process group, then SIGKILL what is left after a while."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + RAY_STOP_S
        while time.monotonic() < deadline:
            os.killpg(group, 0)  # raises once the group is gone
            time.sleep(0.1)
        os.killpg(group, signal.SIGKILL)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """One local Ray for the whole session (starting one takes seconds): 2 CPUs,
    bound to 127.0.0.1, no dashboard, no usage statistics.

    Started by ``ray start``, so that its processes are not this process's children
    (tests look for worker processes among those). Library runs in this process use
    it (``ray.is_initialized()``); command-line runs join it with ``--ray-address``.
    """
    kills = tmp_path_factory.mktemp("ray-kills")
    address = f"127.0.0.1:{free_port()}"
    head = (f"--port={address.rpartition(':')[2]}", "--num-cpus=2")
    with ray_node(
        "--head", *head, "--include-dashboard=false", env={KILLS_ENV: str(kills)}
    ):
        os.environ.update(RAY_ENV)
        import ray

        handler = signal.getsignal(signal.SIGTERM)
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        signal.signal(signal.SIGTERM, handler)  # ray.init sets its own
        try:
            yield RayCluster(address, kills)
        finally:
            ray.shutdown()


@contextlib.contextmanager
def second_node(cluster: RayCluster, cpus: int = 2) -> Iterator[None]:
    """One more node of ``cluster`` on this machine (127.0.0.1), for the block;
    ready when the cluster's scheduler sees its CPUs free."""
    ray: Any = importlib.import_module("ray")
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    before = ray.available_resources().get("CPU", 0)
    params = RayParams(
        gcs_address=cluster.address,
        num_cpus=cpus,
        node_manager_port=0,
        min_worker_port=0,
        max_worker_port=0,
    )
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=False)
    try:
        deadline = time.monotonic() + 60
        while ray.available_resources().get("CPU", 0) < before + cpus:
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(0.2)
        yield
    finally:
        node.kill_all_processes(check_alive=False, allow_graceful=True)


@pytest.fixture
def ray_kills(ray_cluster: RayCluster) -> Path:
    """The Ray workers' kills folder, emptied for this test."""
    for entry in ray_cluster.kills.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return ray_cluster.kills
