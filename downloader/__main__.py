"""Allow ``python -m downloader``."""

from __future__ import annotations

from downloader.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
