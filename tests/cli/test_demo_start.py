"""`aift demo` starts cheaply: the CLI re-executes it on tcmalloc, so nothing heavy may be imported before that."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "numpy")


def test_building_the_demo_parser_imports_no_torch():
    # A fresh interpreter: this test process has torch already. The CLI builds the parser, then re-executes.
    code = (
        "import sys; from aift.cli import build_parser; build_parser('demo'); "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.strip() == "[]", run.stdout
