"""Entry point users type: ``python cli.py URLS.txt --threads 8 --procs 4``."""

from __future__ import annotations

from downloader.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
