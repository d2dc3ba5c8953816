"""Markdown (and optional CSV) table of every metrics.json under a run or multirun folder.

    python scripts/summarize.py multirun/2026-11-24/10-00-00 [--csv out.csv] [--md out.md]
"""
import sys

from cliphand3d.apps.summarize import main

if __name__ == "__main__":
    sys.exit(main())
