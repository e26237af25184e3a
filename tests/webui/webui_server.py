"""A real `aift webui` server (uvicorn in a thread) and a polling helper, for the API and browser tests."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Server:
    """uvicorn serving create_app(runs_dir) on a free local port."""

    def __init__(self, runs_dir: Path, data_dirs: list[Path]):
        import uvicorn

        from aift.webui.app import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.runs_dir, self.data_dirs = runs_dir, data_dirs
        config = uvicorn.Config(
            create_app(runs_dir, data_dirs), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the webui server did not start in 30 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def request(self, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
        data = None if body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **(headers or {})} if body is not None else headers or {}
        request = urllib.request.Request(self.url + path, data=data, headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                status, raw, kind = response.status, response.read(), response.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, raw, kind = e.code, e.read(), e.headers.get("content-type", "")
        text = raw.decode("utf-8")
        return status, json.loads(text) if kind.startswith("application/json") else text


def wait_for(condition, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
