"""Shared fixtures: a small generated corpus served by the package's own server."""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from downloader.demo import generate_corpus, serve_in_thread
from downloader.runtime import stop_helper_processes
from tests.helpers import (
    CORPUS_SIZE,
    FLAT_IMAGE,
    SLOW_IMAGE,
    SLOW_IMAGE_SIZE,
    LocalServer,
)
from tests.user_transforms import KILLS_ENV


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


@dataclass(frozen=True)
class RayCluster:
    """The tests' one local Ray: where to join it, where its kills are noted."""

    address: str
    kills: Path
    """``KILLS_ENV`` of its workers (set when the cluster starts: they are not the
    test process's children and do not see a variable set later)."""


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """One local Ray for the whole session (starting one takes seconds): 2 CPUs,
    bound to 127.0.0.1, no dashboard, no usage statistics.

    Library runs in this process use it (``ray.is_initialized()``); command-line
    runs join it with ``--ray-address``.
    """
    # As downloader.ray_mode does for a local start; Ray reads them when imported.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    kills = tmp_path_factory.mktemp("ray-kills")
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM,)}
    ray.init(
        address="local",
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        runtime_env={"env_vars": {KILLS_ENV: str(kills)}},
    )
    for number, handler in handlers.items():  # ray.init sets its own SIGTERM one
        signal.signal(number, handler)
    try:
        yield RayCluster(ray.get_runtime_context().gcs_address, kills)
    finally:
        ray.shutdown()


@pytest.fixture
def ray_kills(ray_cluster: RayCluster) -> Path:
    """The Ray workers' kills folder, emptied for this test."""
    for entry in ray_cluster.kills.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return ray_cluster.kills
