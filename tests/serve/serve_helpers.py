"""Servers for the serve tests: a real `python -m aift serve` in a subprocess on a free loopback port, and a uvicorn
server in a thread of the test process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, alive=lambda: True, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited before answering")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer /health within {timeout} s")


@dataclass
class Subprocess:
    url: str
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@contextmanager
def serve_subprocess(args: list, env: dict, log: Path) -> Iterator[Subprocess]:
    """`python -m aift serve *args --port P` on a free port, output to `log`; stopped on exit."""
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aift", "serve", *map(str, args), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            # one intra-op thread, as the distributed tests do: on a machine running other work, 2 OpenMP threads
            # spin at every barrier and decode ~15x slower (measured); the answers do not depend on it.
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        )
    server = Subprocess(f"http://127.0.0.1:{port}", proc, log)
    try:
        try:
            wait_healthy(server.url, alive=lambda: proc.poll() is None)
        except (RuntimeError, TimeoutError):
            pytest.fail(f"aift serve did not start:\n{server.log_text()[-3000:]}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


class ThreadServer:
    """A uvicorn server for an app, in a thread of this process (so a test can reach the engine)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_healthy(self.url, alive=self.thread.is_alive, timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
