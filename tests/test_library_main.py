"""The library from any script: worker processes never import the caller's __main__."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from downloader.errors import InputError
from downloader.settings import ImageSpec
from tests.helpers import LocalServer, corpus_urls, read_manifest

ROOT = Path(__file__).resolve().parent.parent

# The README's library example, as a user saves it: no `if __name__ == "__main__":`.
SCRIPT = """\
from downloader import Settings, ImageSpec, run

report = run(
    {urls!r},
    Settings(threads=2, procs=2, out={out!r}, image=ImageSpec(max_size=64)),
)
for outcome in report.results:
    print(outcome.status.value, outcome.url, outcome.path or outcome.error)
"""


@pytest.mark.parametrize("how", ["script", "stdin"])
def test_a_script_without_the_main_guard_runs_once(
    server: LocalServer, corpus: Path, tmp_path: Path, how: str
) -> None:
    """Saved as a file or piped to ``python -``: one run, every URL ok.

    Workers used to import the script again (a second run in each, refused by the
    lock, then "worker processes keep dying"), or fail on ``<stdin>``.
    """
    urls = corpus_urls(server, corpus)[:3]
    out = tmp_path / "imgs"
    code = SCRIPT.format(urls=urls, out=str(out))
    script = tmp_path / "a1.py"
    script.write_text(code)
    argv = [sys.executable, str(script)] if how == "script" else [sys.executable, "-"]

    done = subprocess.run(
        argv,
        input=None if how == "script" else code,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["ok"] * 3
    assert len(read_manifest(out)) == 3


def test_a_transform_in_main_is_refused_up_front() -> None:
    with pytest.raises(InputError, match=r"is in your script \(__main__\)"):
        ImageSpec(transform="__main__:frame")
