"""Allow ``python -m downloader``."""

from __future__ import annotations

import signal
import sys


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # Importing the package takes a moment: a Ctrl-C or SIGTERM meanwhile ends the
    # command as one at any other time does (one line, exit 130), not a traceback.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from downloader.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    raise SystemExit(main())
