"""What does a list cost when no name resolves (a machine offline)?

Runs the library on a URL list (default ``sample_urls.txt``) in this process with
``socket.getaddrinfo`` replaced by one that fails at once, as an offline resolver does
(``EAI_AGAIN``), so no packet leaves the machine, and prints the wall time and the
attempts each URL got::

    python benchmarks/offline_names.py

A real offline resolver may take seconds to give up: that is paid per attempt on top.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from pathlib import Path
from typing import NoReturn

from downloader import Settings, run

ROOT = Path(__file__).resolve().parent.parent


def _offline(*args: object, **kwargs: object) -> NoReturn:
    raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")


def main() -> None:
    """Run the list offline; print the time, the URLs and their attempts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="?", default=str(ROOT / "sample_urls.txt"))
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    socket.getaddrinfo = _offline  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        report = run(args.urls, Settings(out=Path(out), procs=args.procs))
        elapsed = time.perf_counter() - started
    attempts = sorted({outcome.attempts or 0 for outcome in report.results})
    print(f"{len(report.results)} URLs failed in {elapsed:.1f} s, attempts {attempts}")
    print(f"e.g. {report.results[0].error}")


if __name__ == "__main__":
    main()
