#!/usr/bin/env python3
"""Writes an HTML report (loss curves, throughput, memory, system metrics, table of runs) for training runs.

    python scripts/generate_report.py results/                 # every run below results/ -> report/
    python scripts/generate_report.py out/run1 out/run2 --output report/

The same as `aift report`; kept as a script because many fine-tuning guides call it by this name.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import aift  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from aift.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
