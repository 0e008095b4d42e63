"""The README's two commands: what they run, and that CI runs the same test command."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make") or "make"


def _planned(target: str, venv: Path) -> list[str]:
    """The commands ``make TARGET`` would run for an environment at ``venv``."""
    # Not a sub-make of the make that may be running the suite (make test).
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")
    }
    done = subprocess.run(
        [MAKE, "--no-print-directory", "-n", target, f"VENV={venv}", "PYTHON=python3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.splitlines()


def test_readme_gives_two_commands() -> None:
    """The front door is two commands: one runs the demo, one runs the tests."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]

    assert commands == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    lines = [
        line.strip()
        for line in script.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]

    assert lines[-1] == "make test"


def test_make_test_creates_the_environment_then_tests(tmp_path: Path) -> None:
    """On a fresh machine the environment is made first, with the test extra."""
    venv = tmp_path / "venv"
    steps = _planned("test", venv)

    assert steps[1] == f"python3 -m venv {venv}"
    assert f"{venv}/bin/python -m pip install --quiet -e '.[test]'" in steps
    assert steps[-1].strip() == f"{venv}/bin/python -m pytest"
    assert f"{venv}/bin/mypy" in steps


def test_make_demo_installs_the_tool_without_test_tools(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    steps = _planned("demo", venv)

    assert steps[1] == f"python3 -m venv {venv}"
    assert f"{venv}/bin/python -m pip install --quiet -e ." in steps
    assert not any("[test]" in step for step in steps)
    assert steps[-1].strip() == (
        f"{venv}/bin/python cli.py --demo --threads 8 --procs 4"
    )


def test_an_existing_environment_is_reused(tmp_path: Path) -> None:
    """Once set up, make runs the job alone: nothing is installed again."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".installed").touch()

    steps = _planned("demo", venv)

    assert [step.strip() for step in steps] == [
        f"{venv}/bin/python cli.py --demo --threads 8 --procs 4"
    ]
