"""pyproject.toml builds without setuptools' deprecation warnings (what `make setup` prints while installing)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_metadata_builds_without_deprecation_warnings(tmp_path):
    if int(version("setuptools").split(".")[0]) < 77:
        pytest.skip("the build needs setuptools>=77 (pip's isolated build fetches it; this venv has an older one)")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "src" / "aift").mkdir(parents=True)
    (tmp_path / "src" / "aift" / "__init__.py").write_text("")
    code = "from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel('out'))"
    (tmp_path / "out").mkdir()
    run = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Deprecat" not in run.stdout + run.stderr, run.stderr[-3000:]
    metadata = (tmp_path / "out" / run.stdout.splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
