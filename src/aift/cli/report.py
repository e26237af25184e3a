"""`aift report RUN_DIR... [--output report/]`: an HTML page with loss curves and a table of runs.

aift report out/run1 out/run2 --output report/
aift report results/            # every run below results/
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training output dirs, or folders holding them")
    parser.add_argument("--output", default="report", help="folder for report.html and the PNGs (default: report/)")


def run(args: argparse.Namespace) -> int:
    from aift.eval.report import build_report

    page = build_report(args.runs, args.output)
    print(f"wrote {page}")
    return 0
