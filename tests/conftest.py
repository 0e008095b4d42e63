"""Shared fixtures: a small generated corpus served by the package's own server."""

from __future__ import annotations

from collections.abc import Iterator
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
