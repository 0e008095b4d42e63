"""Shared fixtures: a small generated corpus served by the package's own server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from downloader.demo import generate_corpus, serve_in_thread
from tests.helpers import CORPUS_SIZE, SLOW_IMAGE, SLOW_IMAGE_SIZE, LocalServer


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dozen small photo-like images, plus one slow-to-decode PNG."""
    folder = tmp_path_factory.mktemp("corpus")
    generate_corpus(
        folder, CORPUS_SIZE, seed=1, min_megapixels=0.02, max_megapixels=0.06
    )
    Image.new("RGB", SLOW_IMAGE_SIZE, (90, 120, 150)).save(folder / SLOW_IMAGE)
    return folder


@pytest.fixture
def server(corpus: Path) -> Iterator[LocalServer]:
    """The corpus server in a thread of the test process, fresh request counts."""
    with serve_in_thread(LocalServer(corpus)) as running:
        assert isinstance(running, LocalServer)
        yield running
