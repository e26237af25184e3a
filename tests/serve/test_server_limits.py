"""The server under pressure, in a thread of the test so the engine can be watched: a full queue answers 429, a
client that disconnects stops its generation. The 2-layer tiny model is enough here. Also the CLI's defaults."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from serve_helpers import ThreadServer

from aift.cli import build_parser
from aift.serve import Engine, create_app, load_served_models


@pytest.fixture(scope="module")
def tiny_served(tiny_model_dir):
    return load_served_models(str(tiny_model_dir), name="tiny", device="cpu")


def _chat_body(max_tokens: int, stream: bool = False) -> dict:
    messages = [{"role": "user", "content": "Tell me everything."}]
    return {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_full_queue_answers_429_and_admitted_requests_finish(tiny_served):
    engine = Engine(tiny_served, max_batch=1, max_pending=2)
    statuses: list[int] = []

    def post() -> None:
        statuses.append(httpx.post(f"{server.url}/v1/chat/completions", json=_chat_body(4), timeout=120).status_code)

    with ThreadServer(create_app(engine)) as server:
        with engine.model_lock:  # the worker cannot decode: admitted requests stay pending
            waiting = [threading.Thread(target=post) for _ in range(2)]
            for thread in waiting:
                thread.start()
            _wait_for(lambda: engine.pending == 2)
            full = httpx.post(f"{server.url}/v1/chat/completions", json=_chat_body(4), timeout=30)
        for thread in waiting:
            thread.join(timeout=120)
    engine.close()
    assert full.status_code == 429
    assert full.json()["error"]["type"] == "rate_limit_error" and full.json()["error"]["code"] == "queue_full"
    assert statuses == [200, 200]


def test_client_disconnect_stops_its_generation(tiny_served):
    engine = Engine(tiny_served)
    with ThreadServer(create_app(engine)) as server:
        body = _chat_body(max_tokens=8000, stream=True)
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if '"content"' in line and '"content": ""' not in line:
                    break  # the first token arrived: now hang up
        _wait_for(lambda: engine.pending == 0)
    engine.close()
    assert engine.stats.cancelled == 1 and engine.stats.completed == 0


def test_cli_binds_loopback_and_reads_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("AIFT_API_KEY", "sk-from-env")
    args = build_parser("serve").parse_args(["--adapter", "ja=runs/ja/final", "--adapter", "en=runs/en/final"])
    assert args.host == "127.0.0.1" and args.api_key == "sk-from-env"
    assert args.batching == "continuous"
    assert args.adapter == [("ja", "runs/ja/final"), ("en", "runs/en/final")]
    with pytest.raises(SystemExit):
        build_parser("serve").parse_args(["--adapter", "no-equals-sign"])
