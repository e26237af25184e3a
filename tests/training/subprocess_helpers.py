"""For the tests that run `aift train` in a child process (SIGKILL/Ctrl-C resume, lock and SIGTERM)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def child_env() -> dict:
    """The environment of a training child: unbuffered output, no hub. It reads and writes .pyc files as the
    suite's other processes do (tests/conftest.py says why; Python writes each atomically, so a SIGKILL is safe)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Waits until ``path`` exists, failing if the child exits first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)
