"""Continuous batching over HTTP with the official openai client, on the 2-layer tiny model: a request that arrives
mid-stream joins the stream's running batch (both answer as alone), and a client that hangs up mid-stream frees
its slot. (That joining rows answer as alone, greedy and seeded, is tested on the real model in test_engine.py.)"""

from __future__ import annotations

import threading
import time

import openai
import pytest
from serve_helpers import ThreadServer

from aift.serve import Engine, create_app, load_served_models

PROMPTS = ["The weather today is", "Once upon a time, in a small village by the sea, there lived", "1, 2, 3,", "Hi"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_served(tiny_model_dir):
    return load_served_models(str(tiny_model_dir), name="tiny", device="cpu")


def _stream_text(stream) -> str:
    return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)


def test_request_arriving_mid_stream_joins_the_running_batch(tiny_served):
    engine = Engine(tiny_served, max_batch=4)
    long_ask = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 300, "temperature": 0}
    short_ask = {"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0}
    with ThreadServer(create_app(engine)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        long_alone = client.completions.create(**long_ask).choices[0].text
        short_alone = client.completions.create(**short_ask).choices[0].text
        before = engine.stats.batches
        stream = client.completions.create(**long_ask, stream=True)
        first = next(iter(stream)).choices[0].text
        short: list[str] = []
        with engine.model_lock:  # the stream's batch waits at its next step until the short request is queued
            asking = threading.Thread(target=lambda: short.append(client.completions.create(**short_ask)))
            asking.start()
            _wait_for(lambda: engine.pending == 2)
        streamed = first + _stream_text(stream)
        asking.join(timeout=120)
    engine.close()
    assert streamed == long_alone and short[0].choices[0].text == short_alone
    assert engine.stats.batches == before + 1 and engine.stats.joined == 1 and engine.stats.largest_batch == 2


def test_client_hanging_up_mid_stream_frees_its_slot(tiny_served):
    engine = Engine(tiny_served, max_batch=1)  # one slot: the next request runs only once the stream left it
    with ThreadServer(create_app(engine)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5000, stream=True)
        next(iter(stream))
        stream.close()  # hang up after the first piece
        after = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=4, temperature=0)
        _wait_for(lambda: engine.pending == 0)
    engine.close()
    assert after.choices[0].finish_reason == "length" and after.usage.completion_tokens == 4
    assert engine.stats.cancelled == 1 and engine.stats.completed == 1


def _wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
